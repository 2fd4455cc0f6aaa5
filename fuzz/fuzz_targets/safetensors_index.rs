//! `model.safetensors.index.json` beside one valid shard (`Checkpoint::open` of the directory): the weight map,
//! its shard names (nothing may be opened outside the directory) and its agreement with the shards.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_formats::checkpoint::Checkpoint;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("safetensors_index");
    if !d.join("config.json").exists() {
        common::put(&d, "config.json", br#"{"architectures": ["LlamaForCausalLM"]}"#);
        // One shard holding a.weight (bf16 [2, 2]), under the name the seed index uses.
        let header = br#"{"a.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header);
        b.extend([0u8; 8]);
        common::put(&d, "model-00001-of-00001.safetensors", &b);
    }
    common::put(&d, "model.safetensors.index.json", data);
    if let Ok(ck) = Checkpoint::open(&d) {
        for t in ck.tensors() {
            assert!(ck.file_of(t).starts_with(&d));
            let _ = ck.bytes(t);
        }
    }
});
