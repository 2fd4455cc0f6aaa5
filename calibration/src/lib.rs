//! Calibration engine (issue: calibration and evaluation). Not implemented yet.
