//! `--device` and `sling doctor` on a machine without a GPU (CI): `cpu` and `auto` give the same bytes (GGUF, vLLM
//! and MLX targets), `auto`
//! falls back quietly where there is no driver, an explicit `cuda` that cannot start is an input error (exit 2,
//! nothing written), a bad device name is a usage error. GPU parity runs in scripts/gpu-check
//! (kernels/tests/cuda_parity.rs and the CLI comparison over the fixtures).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sling"));
    c.args(args).env("COLUMNS", "100");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn quantize(out: &Path, device: &str, env: &[(&str, &str)]) -> Output {
    let src = fixture("qwen3moe");
    run(
        &[
            "quantize",
            src.to_str().unwrap(),
            "--to",
            "gguf:Q4_K_M",
            "--tokenizer-pre",
            "gpt-2",
            "--device",
            device,
            "--no-manifest",
            "--json",
            "-o",
            out.to_str().unwrap(),
        ],
        env,
    )
}

/// Whether this machine has a CUDA driver (then `--device cuda` may work and the no-GPU expectations don't apply).
fn has_driver() -> bool {
    ["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib64/libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1"]
        .iter()
        .any(|p| Path::new(p).exists())
}

#[test]
fn auto_and_cpu_write_the_same_bytes_and_say_where_blocks_ran() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("auto.gguf"), d.path().join("cpu.gguf"));
    let oa = quantize(&a, "auto", &[]);
    let ob = quantize(&b, "cpu", &[]);
    assert!(oa.status.success() && ob.status.success(), "{}", String::from_utf8_lossy(&oa.stderr));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let j: serde_json::Value = serde_json::from_slice(&ob.stdout).unwrap();
    assert_eq!(j["device"]["gpu"], false);
    assert!(j["device"]["host_blocks"].as_u64().unwrap() > 0);
    assert!(j["device"]["backend"].as_str().unwrap().starts_with("cpu"));
    if !has_driver() {
        // No driver: auto says nothing on stderr at the default verbosity.
        let err = String::from_utf8_lossy(&oa.stderr);
        assert!(!err.contains("GPU"), "{err}");
    }
}

#[test]
fn explicit_cuda_without_a_usable_gpu_is_an_error_and_writes_nothing() {
    if has_driver() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.gguf");
    let o = quantize(&out, "cuda", &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--device cuda:0") && err.contains("sling doctor"), "{err}");
    assert!(err.contains("CUDA"), "{err}");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "something was written");
}

#[test]
fn unknown_device_is_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let o = quantize(&d.path().join("x.gguf"), "gpu", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected auto, cpu, cuda or cuda:N"));
}

/// Every file of directory `a` equals the file of the same name in `b`, and they hold the same names.
fn same_tree(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for n in names(a) {
        assert_eq!(std::fs::read(a.join(&n)).unwrap(), std::fs::read(b.join(&n)).unwrap(), "{n:?} differs");
    }
}

#[test]
fn vllm_and_mlx_targets_write_the_same_bytes_on_auto_and_cpu() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    for to in ["vllm:w4a16", "vllm:fp8-dynamic", "vllm:nvfp4", "mlx:4"] {
        let (a, b) = (d.path().join(format!("{to}-auto")), d.path().join(format!("{to}-cpu")));
        for (out, device) in [(&a, "auto"), (&b, "cpu")] {
            let o = run(
                &[
                    "quantize",
                    src.to_str().unwrap(),
                    "--to",
                    to,
                    "--device",
                    device,
                    "--no-manifest",
                    "-o",
                    out.to_str().unwrap(),
                ],
                &[],
            );
            assert!(o.status.success(), "{to} {device}: {}", String::from_utf8_lossy(&o.stderr));
        }
        same_tree(&a, &b);
    }
}

#[test]
fn vllm_and_mlx_with_explicit_cuda_without_a_usable_gpu_is_an_error_and_writes_nothing() {
    if has_driver() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    for to in ["vllm:w4a16", "mlx:4"] {
        let out = d.path().join("o");
        let o =
            run(&["quantize", src.to_str().unwrap(), "--to", to, "--device", "cuda", "-o", out.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{to}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--device cuda:0") && err.contains("sling doctor"), "{to}: {err}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "{to}: something was written");
    }
}

#[test]
fn doctor_reports_cpu_cuda_and_pins() {
    let o = run(&["doctor", "--json"], &[]);
    assert!(o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["cpu"]["threads"].as_u64().unwrap() >= 1);
    assert!(j["cpu"]["simd"].is_string());
    assert!(j["cuda"]["built"].is_boolean());
    assert!(j["cuda"]["driver"]["ok"].is_boolean());
    assert!(j["cuda"]["nvrtc"]["ok"].is_boolean());
    let tools: Vec<&str> =
        j["reference_tools"].as_array().unwrap().iter().map(|t| t["tool"].as_str().unwrap()).collect();
    assert!(tools.iter().any(|t| t.starts_with("llama.cpp")), "{tools:?}");
    let text = run(&["doctor"], &[]);
    assert!(text.status.success());
    let s = String::from_utf8_lossy(&text.stdout);
    assert!(s.contains("--device auto uses:"), "{s}");
}

/// An error's cause chain prints each cause once (the tokenizer error spells its source out in its own message).
#[test]
fn each_cause_is_printed_once() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("llama");
    let out = d.path().join("x.gguf");
    let o = run(&["quantize", src.to_str().unwrap(), "--to", "gguf:Q4_K_M", "-o", out.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("is not in the reference converter's table").count(), 1, "{err}");
}

fn calibrate(out: &Path, device: &str) -> Output {
    let src = fixture("qwen3moe");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/data/calib.txt");
    run(
        &[
            "calibrate",
            src.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "4",
            "--device",
            device,
            "-q",
            "--json",
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    )
}

/// Calibration on the CPU: `auto` (no GPU here) and `cpu` write the same imatrix and say where the products ran;
/// an explicit `cuda` that cannot start is an input error and writes nothing.
#[test]
fn calibrate_device_auto_cpu_and_unusable_cuda() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("auto.gguf"), d.path().join("cpu.gguf"));
    let (oa, ob) = (calibrate(&a, "auto"), calibrate(&b, "cpu"));
    assert!(oa.status.success() && ob.status.success(), "{}", String::from_utf8_lossy(&oa.stderr));
    let j: serde_json::Value = serde_json::from_slice(&ob.stdout).unwrap();
    assert_eq!((j["device"]["gpu"].as_bool(), j["device"]["device_products"].as_u64()), (Some(false), Some(0)));
    if !has_driver() {
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let c = d.path().join("cuda.gguf");
        let o = calibrate(&c, "cuda");
        assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--device cuda:0") && err.contains("sling doctor"), "{err}");
        assert!(!c.exists(), "an imatrix was written");
    }
}
