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

/// `sling quantize qwen2moe --to TO ARGS… -o OUT` with probes over a little calibration text.
fn hf_auto(to: &str, out: &Path, extra: &[&str]) -> Output {
    let src = fixture("qwen2moe");
    let mut a = vec!["quantize", s(&src), "--to", to, "--data", CALIB, "--ctx", "32", "--chunks", "4"];
    a.extend(["-o", s(out)]);
    a.extend(extra);
    sling(&a)
}

/// A target below what `to` can make (`--target-bpw low`) or above the unquantized model: exit 2 naming both
/// bounds, nothing written.
fn refuses_the_bounds(dir: &Path, to: &str, low: &str) {
    for (flag, v, needle) in [
        ("--target-bpw", low, "below the smallest model these types can make"),
        ("--target-size", "1T", "larger than the unquantized model"),
    ] {
        let out = dir.join("x");
        let o = hf_auto(to, &out, &[flag, v]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.starts_with("error: ") && e.contains(needle) && e.matches("bytes (").count() == 2, "{e}");
        assert!(!out.exists(), "nothing may be written");
    }
}

/// `to` at `--target-bpw bpw` with 1 and 2 threads: the same weight files and the same recipe. The two outputs and
/// the first one's recipe.
fn same_across_threads(dir: &Path, to: &str, bpw: &str) -> (Vec<std::path::PathBuf>, std::path::PathBuf) {
    let mut dirs = Vec::new();
    for (i, threads) in ["1", "2"].iter().enumerate() {
        let out = dir.join(format!("a{i}"));
        let o = hf_auto(to, &out, &["--target-bpw", bpw, "-t", threads]);
        assert!(o.status.success(), "{}", stderr(&o));
        dirs.push(out);
    }
    assert_eq!(weights_of(&dirs[0]), weights_of(&dirs[1]), "{to}: outputs differ across threads/runs");
    let recipe = dir.join("a0.recipe.toml");
    assert_eq!(fs::read(&recipe).unwrap(), fs::read(dir.join("a1.recipe.toml")).unwrap());
    (dirs, recipe)
}

/// The weight files and config.json of an MLX directory (the manifest and card record the command line).
fn weights_of(d: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || p.ends_with("config.json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn mlx_allocation_is_deterministic_fits_and_its_recipe_makes_the_same_weights() {
    let t = tempfile::tempdir().unwrap();
    let (dirs, recipe) = same_across_threads(t.path(), "mlx:auto", "4.2");
    // Mixed precision, as mlx-lm reads it: per-module overrides in the `quantization` block.
    let cfg: serde_json::Value = serde_json::from_slice(&fs::read(dirs[0].join("config.json")).unwrap()).unwrap();
    let q = cfg["quantization"].as_object().unwrap();
    assert!(q.values().filter(|v| v.is_object()).count() >= 2, "{q:?}");
    // Within the target: tensor bytes over the planned elements.
    let src = fixture("qwen2moe");
    let o = sling(&["plan", s(&src), "--to", "mlx:auto", "--target-bpw", "4.2", "--data", CALIB, "--ctx", "32"]);
    let o2 = sling(&[
        "plan",
        s(&src),
        "--to",
        "mlx:auto",
        "--target-bpw",
        "4.2",
        "--data",
        CALIB,
        "--ctx",
        "32",
        "--chunks",
        "4",
        "--json",
    ]);
    assert!(o.status.success() && o2.status.success(), "{}{}", stderr(&o), stderr(&o2));
    let v: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert!(v["bpw"].as_f64().unwrap() <= 4.2, "{}", v["bpw"]);
    assert!(v["auto"]["file_bytes"].as_u64().unwrap() <= v["auto"]["budget_bytes"].as_u64().unwrap());
    assert!(v["auto"]["weights"].as_array().unwrap().iter().all(|w| w["probes"][0]["kld"].as_f64().is_some()));
    // The recipe fed back makes the same weights, whatever --to's bits.
    let again = t.path().join("again");
    let o = sling(&["quantize", s(&src), "--to", "mlx:8", "--recipe", s(&recipe), "-o", s(&again)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weights_of(&again), weights_of(&dirs[0]), "--recipe of the written recipe made other weights");
    // `verify --source` re-derives every weight from the recipe the manifest records.
    let o = sling(&["verify", s(&dirs[0]), "--source", s(&src), "--full"]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}

#[test]
fn mlx_targets_outside_the_bounds_and_mixed_flags_are_refused() {
    let t = tempfile::tempdir().unwrap();
    refuses_the_bounds(t.path(), "mlx:auto", "0.5");
    let src = fixture("qwen2moe");
    for (to, extra, needle) in [
        ("mlx:auto", &[][..], "needs a size"),
        ("mlx:auto", &["--target-bpw", "4", "--group-size", "64"][..], "--group-size cannot be combined"),
        ("mlx:auto", &["--target-bpw", "4", "--method", "gptq"][..], "--method gptq needs calibration data"),
        ("mlx:auto", &["--target-bpw", "4", "--act-order"][..], "--method gptq and its flags solve"),
        ("mlx:auto", &["--target-bpw", "4", "--method", "awq", "--data", "calib.txt"][..], "not awq"),
        ("mlx:4", &["--target-bpw", "4"][..], "go with --to gguf:auto, vllm:auto or mlx:auto"),
        ("vllm:nvfp4", &["--recipe", "r.toml"][..], "cannot read r.toml"),
    ] {
        let mut a = vec!["plan", s(&src), "--to", to];
        a.extend(extra);
        let o = sling(&a);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{to} {extra:?}: {}", stderr(&o));
    }
    // A recipe MLX cannot take is refused naming the rule.
    let bad = t.path().join("bad.toml");
    fs::write(&bad, "[[rule]]\nname = \"q_proj\"\nbits = 7\n").unwrap();
    let o = sling(&["plan", s(&src), "--to", "mlx:4", "--recipe", s(&bad)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("bits 7"), "{}", stderr(&o));
}

#[test]
fn vllm_allocation_is_deterministic_fits_and_its_recipe_makes_the_same_weights() {
    let t = tempfile::tempdir().unwrap();
    let (dirs, recipe) = same_across_threads(t.path(), "vllm:auto", "10");
    // Mixed precision as compressed-tensors holds it: one config group per encoding, each naming its modules.
    let cfg: serde_json::Value = serde_json::from_slice(&fs::read(dirs[0].join("config.json")).unwrap()).unwrap();
    let groups = cfg["quantization_config"]["config_groups"].as_object().unwrap();
    assert!(groups.len() >= 2, "{groups:?}");
    assert!(groups.values().all(|g| g["targets"].as_array().unwrap().iter().all(|t| t != "Linear")), "{groups:?}");
    let src = fixture("qwen2moe");
    let o = sling(&[
        "plan",
        s(&src),
        "--to",
        "vllm:auto",
        "--target-bpw",
        "10",
        "--data",
        CALIB,
        "--ctx",
        "32",
        "--chunks",
        "4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["bpw"].as_f64().unwrap() <= 10.0, "{}", v["bpw"]);
    assert!(v["auto"]["file_bytes"].as_u64().unwrap() <= v["auto"]["budget_bytes"].as_u64().unwrap());
    assert!(v["auto"]["layers"].as_array().unwrap().iter().all(|w| w["probes"][0]["kld"].as_f64().is_some()));
    // The recipe fed back makes the same weights, through either integer scheme's defaults.
    for to in ["vllm:w4a16", "vllm:w8a16"] {
        let again = t.path().join(to.replace(':', "-"));
        let o = sling(&["quantize", s(&src), "--to", to, "--recipe", s(&recipe), "-o", s(&again)]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(weights_of(&again), weights_of(&dirs[0]), "{to} --recipe of the written recipe made other weights");
    }
    let o = sling(&["verify", s(&dirs[0]), "--source", s(&src), "--full"]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}

#[test]
fn vllm_targets_outside_the_bounds_split_layers_and_mixed_flags_are_refused() {
    let t = tempfile::tempdir().unwrap();
    refuses_the_bounds(t.path(), "vllm:auto", "2");
    let src = fixture("qwen2moe");
    let split = t.path().join("split.toml");
    fs::write(&split, "[[rule]]\nname = \"layers\\\\.0\\\\.self_attn\\\\.q_proj\"\nbits = 8\ngroup_size = 32\n")
        .unwrap();
    let bad = t.path().join("bad.toml");
    fs::write(&bad, "[[rule]]\nname = \"q_proj\"\nbits = 6\n").unwrap();
    let coarse = t.path().join("coarse.toml");
    fs::write(&coarse, "[[rule]]\nname = \"self_attn\"\nbits = 8\ngroup_size = 128\n").unwrap();
    for (to, extra, needle) in [
        ("vllm:auto", &[][..], "needs a size"),
        ("vllm:auto", &["--target-bpw", "9", "--recipe", s(&bad)][..], "--recipe and --group-size cannot be combined"),
        ("vllm:auto", &["--target-bpw", "9", "--method", "awq", "--data", "calib.txt"][..], "not awq"),
        ("vllm:w4a16", &["--recipe", s(&split)][..], "as one layer (model.layers.0.self_attn.qkv)"),
        ("vllm:w4a16", &["--recipe", s(&bad)][..], "bits 6: vLLM recipes take 4 or 8"),
        ("vllm:w4a16", &["--recipe", s(&coarse)][..], "not a multiple of the rule's group size 128"),
        ("vllm:nvfp4", &["--recipe", s(&bad)][..], "integer vllm schemes"),
    ] {
        let mut a = vec!["plan", s(&src), "--to", to];
        a.extend(extra);
        let o = sling(&a);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{to} {extra:?}: {}", stderr(&o));
    }
}
