//! A `.safetensors` file: header length, JSON header, offsets, dtypes and shapes (`SafetensorsFile::open`), then
//! every tensor's bytes through the checked ranges.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_formats::checkpoint::SafetensorsFile;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::put(&common::scratch("safetensors_header"), "model.safetensors", data);
    if let Ok(f) = SafetensorsFile::open(&p, 0) {
        for t in &f.tensors {
            let b = f.bytes(t);
            assert_eq!(b.len() as u64, t.n_bytes());
            assert_eq!(t.dtype.bytes_for(t.numel()), Some(t.n_bytes()), "{}", t.name);
        }
    }
});
