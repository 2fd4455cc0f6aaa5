//! `tokenizer.json` (with the fixture's `tokenizer_config.json`): loaded as transformers does and hashed as
//! `convert_hf_to_gguf.py` does to pick the pre-tokenizer (`tokenizer::chkhsh`).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("tokenizer_json");
    if !d.join("tokenizer_config.json").exists() {
        common::put(&d, "tokenizer_config.json", &common::fixture("qwen3moe", "tokenizer_config.json"));
    }
    common::put(&d, "tokenizer.json", data);
    let _ = sling_target_gguf::tokenizer::chkhsh(&d);
});
