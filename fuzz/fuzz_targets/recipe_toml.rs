//! A quantization recipe (`--recipe FILE.toml`, `Recipe::parse`): base preset, rules, patterns, types.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_target_gguf::quantize::Recipe;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(r) = Recipe::parse("fuzz.toml", text) {
            let _ = r.needs_imatrix();
        }
    }
});
