//! A provenance manifest (`m.sling.json`): parsed (`Manifest::read`) and verified (`manifest::verify`) in a
//! directory that holds it and a small file named like its output; output, tensor and source names must never
//! reach outside the directory, and hostile sizes and offsets must be problems, not panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_provenance::manifest::{verify, Manifest};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("manifest");
    let art = d.join("art");
    if !art.exists() {
        std::fs::create_dir_all(&art).unwrap();
        common::put(&art, "m.gguf", b"GGUF\x03\x00\x00\x00not a real model");
    }
    let p = common::put(&art, "m.sling.json", data);
    if Manifest::read(&p).is_ok() {
        let _ = verify(&p, None);
        let _ = verify(&p, Some(&d.join("src")));
    }
});
