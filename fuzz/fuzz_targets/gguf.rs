//! A GGUF file (`GgufFile::open`: magic, version, counts, metadata values and arrays, tensor infos, alignment,
//! data offsets), then every key and every tensor's bytes through the checked ranges.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_formats::gguf::GgufFile;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::put(&common::scratch("gguf"), "m.gguf", data);
    if let Ok(g) = GgufFile::open(&p) {
        for (k, _) in &g.kvs {
            assert!(g.get(k).is_some());
        }
        for t in &g.tensors {
            let _ = t.n_elements();
            let b = g.tensor_data(t);
            assert!(b.len() as u64 <= g.file_len());
        }
    }
});
