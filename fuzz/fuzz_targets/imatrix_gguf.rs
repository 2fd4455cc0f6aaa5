//! An importance matrix in llama.cpp's GGUF format (`Imatrix::load`: `imatrix.*` metadata, `*.in_sum2` /
//! `*.counts` pairs), then the metadata llama-quantize records from it. Inputs not starting with `GGUF` get the
//! magic prepended so that the GGUF path is what is fuzzed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_target_gguf::quantize::Imatrix;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut b = Vec::with_capacity(data.len() + 4);
    if !data.starts_with(b"GGUF") {
        b.extend(b"GGUF");
    }
    b.extend(data);
    let p = common::put(&common::scratch("imatrix_gguf"), "imatrix.gguf", &b);
    if let Ok(mut m) = Imatrix::load(&p) {
        for e in m.entries.values() {
            assert!(e.weights.iter().all(|w| w.is_finite()));
        }
        let _ = m.kvs();
        m.filter(&["blk".into()], &["attn".into()]);
    }
});
