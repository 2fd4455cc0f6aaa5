"""Interop suite: sling's outputs against the tools that really consume them (llama.cpp's convert_hf_to_gguf.py,
llama.cpp itself, llama-gguf-split, transformers). Run it with `scripts/test`, or directly:

    $SLING_LAB/venv/bin/python -m pytest tests/interop -q

Every reference tool is required: a missing one fails the session (locally and in CI alike) with a message
pointing at scripts/setup-reference.sh; nothing is skipped silently.
"""
from __future__ import annotations

import os

import pytest

import lab


def pytest_report_header(config):
    return [f"sling: {lab.SLING_BIN}",
            f"reference tools: {lab.LAB} ({', '.join(f'{k} {v}' for k, v in lab.versions().items())})",
            f"reference cache: {lab.CACHE}; results: {lab.RESULTS}; jobs: {lab.JOBS}"]


def pytest_sessionstart(session):
    miss = lab.missing_tools()
    if miss:
        where = "CI" if os.environ.get("CI") else "this machine"
        msg = (f"interop tests cannot run on {where}: missing\n  - " + "\n  - ".join(miss) + f"\n{lab.SETUP_HINT}")
        pytest.exit(msg, returncode=pytest.ExitCode.TESTS_FAILED)


def pytest_sessionfinish(session, exitstatus):
    lab.write_results()
