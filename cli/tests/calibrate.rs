//! `sling calibrate` end to end on a fixture with token ids: the coverage report names exactly the experts the
//! file holds with count 0, `--all-experts` leaves none (every count = tokens) without changing anything else,
//! and progress lines go to stderr unless -q. Parity with llama-imatrix: tests/interop/test_calibrate.py.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sling_target_gguf::quantize::imatrix::Imatrix;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

fn calibrate(dir: &Path, tokens: &Path, out: &Path, extra: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_sling"))
        .args(["calibrate", fixture("qwen3moe").to_str().unwrap(), "--tokens"])
        .arg(tokens)
        .args(["--ctx", "32", "-o"])
        .arg(out)
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn coverage_report_and_all_experts() {
    let dir = tempfile::tempdir().unwrap();
    // A narrow text (4 ids over and over): the routing leaves some experts without a token.
    let ids: Vec<String> = [342, 223, 83, 87].iter().cycle().take(128).map(|i: &u32| i.to_string()).collect();
    let tokens = dir.path().join("ids.txt");
    std::fs::write(&tokens, ids.join(",")).unwrap();
    let (plain, all) = (dir.path().join("plain.gguf"), dir.path().join("all.gguf"));

    let o = calibrate(dir.path(), &tokens, &plain, &["--json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("calibrate: 4/4 chunks"), "no progress line:\n{stderr}");
    assert!(stderr.contains("coverage:"), "{stderr}");
    assert_eq!(report["tokens"], 128);
    assert_eq!(report["all_experts"], false);
    let im = Imatrix::load(&plain).unwrap();
    let layers = report["experts"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let mut unused = 0;
    for l in layers {
        let layer = l["layer"].as_u64().unwrap();
        let zero: Vec<u64> = l["zero"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        unused += zero.len();
        for which in ["gate", "up", "down"] {
            let e = &im.entries[&format!("blk.{layer}.ffn_{which}_exps.weight")];
            let file_zero: Vec<u64> = (0..e.counts.len() as u64).filter(|&i| e.counts[i as usize] == 0).collect();
            assert_eq!(zero, file_zero, "layer {layer} {which}: report vs file");
            let counts: Vec<u64> = l["counts"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(counts, e.counts.iter().map(|&c| c as u64).collect::<Vec<_>>(), "layer {layer}");
        }
    }
    assert!(unused > 0, "the narrow text should leave experts unused: {report}");
    assert_eq!(report["coverage"]["unused"], unused);
    // per-tensor activation statistics: one per entry, max >= mean
    let act = report["activations"].as_array().unwrap();
    assert_eq!(act.len() as u64, report["entries"].as_u64().unwrap());
    for t in act {
        assert!(
            t["max_sq"].as_f64().unwrap() >= t["mean_sq"].as_f64().unwrap()
                && t["outlier_ratio"].as_f64().unwrap() >= 1.0,
            "{t}"
        );
    }
    assert!(stderr.contains("activations:"), "{stderr}");

    let o = calibrate(dir.path(), &tokens, &all, &["--json", "--all-experts", "-q"]);
    assert!(o.stderr.is_empty(), "-q: {}", String::from_utf8_lossy(&o.stderr));
    let r2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r2["all_experts"], true);
    // the report keeps the true routing
    assert_eq!(r2["experts"], report["experts"]);
    let im2 = Imatrix::load(&all).unwrap();
    assert_eq!(im2.entries.keys().collect::<Vec<_>>(), im.entries.keys().collect::<Vec<_>>());
    assert_eq!(im2.chunk_count, im.chunk_count);
    for (name, e) in &im2.entries {
        if name.contains("_exps") {
            assert!(e.counts.iter().all(|&c| c == 128), "{name}: {:?}", e.counts);
        } else {
            // routing and forward unchanged: every other entry is identical
            assert_eq!(e.counts, im.entries[name].counts, "{name}");
            assert_eq!(e.weights, im.entries[name].weights, "{name}");
        }
    }
}
