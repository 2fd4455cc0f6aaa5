//! An MLX recipe (`--to mlx:BITS --recipe FILE.toml`, `mlx::recipe::Recipe::parse`): defaults, rules, regexes, bits
//! and group sizes; what parses is written back out and must parse again to the same choices.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_targets::mlx::recipe::Recipe;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(r) = Recipe::parse("fuzz.toml", text) {
            let choices: Vec<(String, _)> = r.rules.iter().map(|x| (x.regex.as_str().to_string(), x.kind)).collect();
            let again = Recipe::toml(&r.description, r.bits.unwrap_or(4), r.group_size.unwrap_or(64), &choices);
            let back = Recipe::parse("again.toml", &again).expect("a written recipe parses");
            assert_eq!(back.rules.len(), r.rules.len());
        }
    }
});
