//! `--to gguf:auto`: the size-targeted allocation is deterministic, its recipe makes the same file again, the file
//! fits the target, and targets outside what the types can make are refused naming the bounds. Quality (KLD
//! against the preset frontier and the named recipes) is tested on the trained fixture in
//! tests/interop/test_size_target.py.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::{bin, fixture, s, stderr};

const CALIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/interop/data/calib.txt");

fn sling(args: &[&str]) -> Output {
    bin().arg("-q").args(args).output().unwrap()
}

/// `sling quantize qwen2moe --to gguf:auto ARGS… -o OUT` with probes over a little calibration text.
fn auto(out: &Path, extra: &[&str]) -> Output {
    let src = fixture("qwen2moe");
    let mut a = vec!["quantize", s(&src), "--to", "gguf:auto", "--tokenizer-pre", "gpt-2", "--no-manifest"];
    a.extend(["--data", CALIB, "--ctx", "32", "--chunks", "4", "-o", s(out)]);
    a.extend(extra);
    sling(&a)
}

#[test]
fn the_allocation_is_deterministic_and_its_recipe_makes_the_same_file() {
    let t = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut recipes = Vec::new();
    for (i, threads) in ["1", "2", "2"].iter().enumerate() {
        let out = t.path().join(format!("a{i}.gguf"));
        let o = auto(&out, &["--target-bpw", "5.5", "-t", threads]);
        assert!(o.status.success(), "{}", stderr(&o));
        files.push(fs::read(&out).unwrap());
        recipes.push(fs::read_to_string(t.path().join(format!("a{i}.gguf.recipe.toml"))).unwrap());
    }
    assert!(files.windows(2).all(|w| w[0] == w[1]), "outputs differ across threads/runs");
    assert!(recipes.windows(2).all(|w| w[0] == w[1]), "recipes differ across threads/runs");
    // The recipe fed back makes the same bytes.
    let again = t.path().join("again.gguf");
    let src = fixture("qwen2moe");
    let rp = t.path().join("a0.gguf.recipe.toml");
    let o =
        sling(&["quantize", s(&src), "--recipe", s(&rp), "--tokenizer-pre", "gpt-2", "--no-manifest", "-o", s(&again)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read(&again).unwrap(), files[0], "--recipe of the written recipe made another file");
    // `sling plan` chooses the same and saves the same recipe.
    let saved = t.path().join("plan.toml");
    let o = sling(&[
        "plan",
        s(&src),
        "--to",
        "gguf:auto",
        "--target-bpw",
        "5.5",
        "--tokenizer-pre",
        "gpt-2",
        "--data",
        CALIB,
        "--ctx",
        "32",
        "--chunks",
        "4",
        "--save-recipe",
        s(&saved),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(&saved).unwrap(), recipes[0]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = &v["auto"];
    assert!(a["file_bytes"].as_u64().unwrap() <= a["budget_bytes"].as_u64().unwrap(), "{a}");
    assert!(a["tensors"].as_array().unwrap().iter().all(|t| t["probes"][0]["kld"].as_f64().is_some()), "{a}");
}

#[test]
fn the_file_fits_the_target_size() {
    let t = tempfile::tempdir().unwrap();
    for size in ["120000", "200K"] {
        let out = t.path().join(format!("s{size}.gguf"));
        let o = auto(&out, &["--target-size", size]);
        assert!(o.status.success(), "{}", stderr(&o));
        let want = if size.ends_with('K') { 200_000 } else { 120_000 };
        let got = fs::metadata(&out).unwrap().len();
        // Within the target, and not far below it (the types' granularity on a model this small).
        assert!(got <= want && got as f64 >= 0.9 * want as f64, "{size}: {got} bytes");
    }
}

#[test]
fn targets_outside_the_bounds_are_refused_naming_them() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("out");
    fs::create_dir_all(&dir).unwrap();
    for (flag, v, needle) in [
        ("--target-bpw", "0.5", "below the smallest model these types can make"),
        ("--target-size", "1T", "larger than the unquantized model"),
    ] {
        let o = auto(&dir.join("x.gguf"), &[flag, v]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.starts_with("error: ") && e.contains(needle) && e.matches("bytes (").count() == 2, "{e}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing may be written");
    }
    // A size is required, and the flags that fix types by hand do not mix with it.
    let src = fixture("qwen2moe");
    for (extra, needle) in [
        (&[][..], "needs a size"),
        (&["--target-bpw", "4", "--pure"][..], "--pure cannot be combined"),
        (&["--target-bpw=-1"][..], "must be a positive number"),
    ] {
        let mut a = vec!["plan", s(&src), "--to", "gguf:auto", "--tokenizer-pre", "gpt-2"];
        a.extend(extra);
        let o = sling(&a);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
    let o = sling(&["plan", s(&src), "--to", "gguf:Q4_K_M", "--target-bpw", "4", "--tokenizer-pre", "gpt-2"]);
    assert!(stderr(&o).contains("go with --to gguf:auto"), "{}", stderr(&o));
}
