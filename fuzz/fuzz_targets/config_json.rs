//! `config.json` beside a real checkpoint (the qwen3moe fixture's weights): read and checked on opening, then
//! the GGUF conversion plan and the HF-directory targets' tensor list, which divide and allocate by its
//! dimensions; then read back as a quantized artifact (`sling_targets::read`), whose config groups and targets it
//! parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_formats::checkpoint::Checkpoint;
use sling_target_gguf::convert::{plan, OutType};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("config_json");
    if !d.join("model.safetensors").exists() {
        common::put(&d, "model.safetensors", &common::fixture("qwen3moe", "model.safetensors"));
    }
    common::put(&d, "config.json", data);
    if let Ok(ck) = Checkpoint::open(&d) {
        let _ = plan(&ck, OutType::Q8_0);
        let _ = sling_pipeline::hf::tensors(&ck);
    }
    // Read back as an artifact: a compressed-tensors block (config groups, targets as regexes) or an MLX one.
    if let Ok(Some(a)) = sling_targets::read::Artifact::open(&d) {
        let names: Vec<String> = a.tensors().map(|(n, _)| n.to_string()).collect();
        for n in names.iter().take(4) {
            let _ = a.read_outer(n, 0, 1);
        }
    }
});
