//! An importance matrix in the legacy `.dat` format (`Imatrix::load`: entry count, names, ncall, values, the
//! optional chunk/dataset trailer). Inputs starting with `GGUF` are skipped (that is `imatrix_gguf`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_target_gguf::quantize::Imatrix;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"GGUF") {
        return;
    }
    let p = common::put(&common::scratch("imatrix_dat"), "imatrix.dat", data);
    if let Ok(m) = Imatrix::load(&p) {
        for e in m.entries.values() {
            assert!(e.weights.iter().all(|w| w.is_finite()));
        }
        let _ = m.kvs();
    }
});
