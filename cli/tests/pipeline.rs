//! The pipeline contract (docs/reproducibility.md, docs/pipeline.md):
//! - reproducibility: the same conversion or quantization with 1 and N threads, twice, gives the same
//!   sha256 for every file it writes (GGUF, manifest, model card);
//! - crash safety and resume: a conversion killed at any point (a test hook that exits without cleanup,
//!   and real SIGKILLs) leaves nothing `verify` accepts, and `--resume` ends byte-identical to an
//!   uninterrupted run, reusing only tensors whose hashes check out;
//! - disk full and read-only output are clear errors (exit 2) that leave nothing behind and the source
//!   untouched (a small tmpfs: mounted directly as root, otherwise in a user namespace the test re-runs
//!   itself in; under CI a run that can do neither fails);
//! - the JSON-lines event stream parses and holds the documented fields; the model card is covered by
//!   the manifest.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sling_provenance::manifest::hash_file;

mod common;
use common::{bin, fixture, s, stderr};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `sling <cmd> SRC -o OUT --tokenizer-pre gpt-2 <extra>` with environment `env`.
fn sling(cmd: &str, src: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args([cmd, s(src), "-o", s(out), "--tokenizer-pre", "gpt-2"]).args(extra);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}\nstdout: {}\nstderr: {}", o.status, stdout(o), stderr(o));
}

/// sha256 of every file in `dir`, by name.
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().into_string().unwrap(), hash_file(&e.path()).unwrap().1))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn verify_code(artifact: &Path) -> Option<i32> {
    bin().args(["verify", s(artifact)]).output().unwrap().status.code()
}

/// A directory of its own for one output.
fn out_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    fs::create_dir_all(&d).unwrap();
    d
}

/// A legacy `.dat` importance matrix covering every quantized tensor of `src`'s `preset` plan, with
/// made-up positive values (calibration data, for the reproducibility test).
fn make_imatrix(src: &Path, preset: &str, path: &Path) {
    let o = bin().args(["plan", s(src), "--to", preset, "--tokenizer-pre", "gpt-2", "--json"]).output().unwrap();
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut entries = Vec::new();
    for t in v["tensors"].as_array().unwrap() {
        let ty = t["type"].as_str().unwrap();
        if ["f32", "f16", "bf16"].contains(&ty) {
            continue;
        }
        let shape: Vec<u64> = t["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        let n = shape[0] * if shape.len() >= 3 { shape[2] } else { 1 };
        entries.push((t["name"].as_str().unwrap().to_string(), n));
    }
    let mut b = (entries.len() as i32).to_le_bytes().to_vec();
    for (k, (name, n)) in entries.iter().enumerate() {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(1i32.to_le_bytes()); // ncall
        b.extend((*n as i32).to_le_bytes());
        for i in 0..*n {
            b.extend((0.5f32 + ((i as usize * 7 + k * 13) % 17) as f32 / 8.0).to_le_bytes());
        }
    }
    fs::write(path, b).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Reproducibility
// ---------------------------------------------------------------------------------------------

/// Runs `cmd` with 1 and 3 threads, twice each, each into its own directory, and checks that every
/// file (GGUF shards, manifest, model card) has the same sha256. Returns the hashes.
fn assert_reproducible(cmd: &str, src: &Path, extra: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, String> {
    let t = tempfile::tempdir().unwrap();
    let mut first: Option<BTreeMap<String, String>> = None;
    for (i, threads) in ["1", "3", "1", "3"].iter().enumerate() {
        let d = out_dir(t.path(), &format!("run{i}"));
        let mut a = vec!["-q", "-t", threads];
        a.extend_from_slice(extra);
        ok(&sling(cmd, src, &d.join("m.gguf"), &a, env));
        let h = hashes(&d);
        assert!(h.contains_key("m.sling.json") && h.contains_key("README.md"), "{h:?}");
        match &first {
            None => first = Some(h),
            Some(f) => assert_eq!(&h, f, "{cmd} {extra:?}: run {i} (-t {threads}) differs from run 0 (-t 1)"),
        }
    }
    first.unwrap()
}

#[test]
fn convert_is_reproducible_across_threads_and_runs() {
    let h = assert_reproducible("convert", &fixture("deepseekv2lite"), &["--type", "q8_0", "--reproducible"], &[]);
    assert_eq!(h.len(), 3, "{h:?}");
    let h = assert_reproducible(
        "convert",
        &fixture("mixtral-sharded"),
        &["--type", "bf16", "--split-max-tensors", "7", "--reproducible"],
        &[],
    );
    assert!(h.keys().any(|k| k.ends_with("-of-00004.gguf")), "{h:?}");
    // SOURCE_DATE_EPOCH pins the timestamp instead of dropping it.
    let t = tempfile::tempdir().unwrap();
    let d = out_dir(t.path(), "o");
    ok(&sling("convert", &fixture("qwen2moe"), &d.join("m.gguf"), &["-q"], &[("SOURCE_DATE_EPOCH", "1700000000")]));
    let m: Value = serde_json::from_slice(&fs::read(d.join("m.sling.json")).unwrap()).unwrap();
    assert_eq!(m["created"], "2023-11-14T22:13:20Z");
    assert!(fs::read_to_string(d.join("README.md")).unwrap().contains("| created | 2023-11-14T22:13:20Z |"));
    assert_reproducible("convert", &fixture("qwen2moe"), &[], &[("SOURCE_DATE_EPOCH", "1700000000")]);
    // Without either, the manifest records when it was made (and is the only file that differs).
    let d2 = out_dir(t.path(), "now");
    ok(&sling("convert", &fixture("qwen2moe"), &d2.join("m.gguf"), &["-q"], &[]));
    let m: Value = serde_json::from_slice(&fs::read(d2.join("m.sling.json")).unwrap()).unwrap();
    assert!(m["created"].as_str().unwrap().ends_with('Z'), "{}", m["created"]);
    assert_eq!(hash_file(&d.join("m.gguf")).unwrap(), hash_file(&d2.join("m.gguf")).unwrap());
    // A SOURCE_DATE_EPOCH that is not a number is refused.
    let o = sling("convert", &fixture("qwen2moe"), &d2.join("x.gguf"), &["-q"], &[("SOURCE_DATE_EPOCH", "yesterday")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("SOURCE_DATE_EPOCH"), "{}", stderr(&o));
}

#[test]
fn quantize_is_reproducible_across_threads_and_runs() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    let im = t.path().join("imatrix.dat");
    make_imatrix(&src, "gguf:Q4_K_M", &im);
    let h = assert_reproducible("quantize", &src, &["--to", "gguf:Q4_K_M", "--imatrix", s(&im), "--reproducible"], &[]);
    assert_eq!(h.len(), 3);
    assert_reproducible(
        "quantize",
        &fixture("deepseekv2lite"),
        &["--to", "gguf:moe-q4", "--split-max-tensors", "100", "--reproducible"],
        &[],
    );
    // The card names the calibration data.
    let d = out_dir(t.path(), "card");
    ok(&sling(
        "quantize",
        &src,
        &d.join("m.gguf"),
        &["-q", "--to", "gguf:Q4_K_M", "--imatrix", s(&im), "--reproducible"],
        &[],
    ));
    let card = fs::read_to_string(d.join("README.md")).unwrap();
    let (_, im_sha) = hash_file(&im).unwrap();
    assert!(card.contains(&im_sha), "{card}");
    assert!(card.contains("| recipe | `Q4_K_M` |"), "{card}");
}

// ---------------------------------------------------------------------------------------------
// Kill and resume
// ---------------------------------------------------------------------------------------------

const KILL_SRC: &str = "deepseekv2lite"; // 312 tensors

/// An uninterrupted reference conversion with `extra` into its own directory.
fn reference(root: &Path, extra: &[&str]) -> BTreeMap<String, String> {
    reference_of(root, "convert", extra)
}

/// An uninterrupted reference run of `sling CMD` with `extra`: the sha256 of every file it wrote.
fn reference_of(root: &Path, cmd: &str, extra: &[&str]) -> BTreeMap<String, String> {
    let d = out_dir(root, "reference");
    let mut a = vec!["-q", "--reproducible"];
    a.extend_from_slice(extra);
    ok(&sling(cmd, &fixture(KILL_SRC), &d.join("m.gguf"), &a, &[]));
    let h = hashes(&d);
    fs::remove_dir_all(&d).unwrap();
    h
}

/// After a kill: no final output and no manifest, only partial files; `verify` does not accept it.
fn assert_nothing_complete(d: &Path) {
    for n in names(d) {
        assert!(n.ends_with(".partial") || n.ends_with(".partial.json"), "a killed run left {n} in {}", d.display());
    }
    assert_eq!(verify_code(&d.join("m.gguf")), Some(2), "verify must not accept a killed run");
    assert_ne!(verify_code(&d.join("m-00001-of-00007.gguf")), Some(0));
}

/// `--resume` after a kill: succeeds, reports how many tensors it reused, and every file is identical to
/// the uninterrupted run.
fn resume_and_compare(d: &Path, extra: &[&str], want: &BTreeMap<String, String>) -> u64 {
    let mut a = vec!["-q", "--reproducible", "--resume", "--json"];
    a.extend_from_slice(extra);
    let o = sling("convert", &fixture(KILL_SRC), &d.join("m.gguf"), &a, &[]);
    ok(&o);
    assert_eq!(&hashes(d), want, "resumed output differs from the uninterrupted run ({})", d.display());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["resumed_tensors"].as_u64().unwrap()
}

#[test]
fn killed_at_several_points_then_resumed_is_identical() {
    let t = tempfile::tempdir().unwrap();
    for split in [None, Some("50")] {
        let mut extra = vec!["--type", "q8_0"];
        if let Some(n) = split {
            extra.extend(["--split-max-tensors", n]);
        }
        let want = reference(t.path(), &extra);
        for at in [0usize, 1, 49, 50, 51, 156, 311, 312] {
            let d = out_dir(t.path(), &format!("kill-{}-{at}", split.unwrap_or("none")));
            let mut a = vec!["-q", "--reproducible"];
            a.extend_from_slice(&extra);
            let n = at.to_string();
            let o = sling(
                "convert",
                &fixture(KILL_SRC),
                &d.join("m.gguf"),
                &a,
                &[("SLING_TEST_ABORT_AFTER_TENSORS", &n), ("SLING_JOURNAL_INTERVAL_MS", "0")],
            );
            assert_eq!(o.status.code(), Some(134), "the hook should stop the run: {}", stderr(&o));
            assert_nothing_complete(&d);
            let reused = resume_and_compare(&d, &extra, &want);
            assert_eq!(reused, at as u64, "split {split:?}, killed after {at} tensors");
            fs::remove_dir_all(&d).unwrap();
        }
        // Killed after the renames, before the manifest: not verifiable; --resume starts over.
        let d = out_dir(t.path(), "renamed");
        let mut a = vec!["-q", "--reproducible"];
        a.extend_from_slice(&extra);
        let o = sling("convert", &fixture(KILL_SRC), &d.join("m.gguf"), &a, &[("SLING_TEST_ABORT_AT", "renamed")]);
        assert_eq!(o.status.code(), Some(134));
        assert!(!d.join("m.sling.json").exists());
        assert_eq!(verify_code(&d.join("m.gguf")), Some(2));
        resume_and_compare(&d, &extra, &want);
        fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn killed_with_the_default_journal_interval_restarts_cleanly() {
    // With the default interval nothing is journaled in so short a run: --resume starts over, and
    // the result is still identical.
    let t = tempfile::tempdir().unwrap();
    let want = reference(t.path(), &[]);
    let d = out_dir(t.path(), "k");
    let o = sling(
        "convert",
        &fixture(KILL_SRC),
        &d.join("m.gguf"),
        &["-q", "--reproducible"],
        &[("SLING_TEST_ABORT_AFTER_TENSORS", "200")],
    );
    assert_eq!(o.status.code(), Some(134));
    assert_nothing_complete(&d);
    assert_eq!(resume_and_compare(&d, &[], &want), 0);
}

/// `sling CMD` on [`KILL_SRC`] with `extra`, SIGKILLed after the `after`-th tensor event of each run (the
/// process keeps running until the signal lands, so the exact point varies; runs alternate `-t 1` / `-t 2`,
/// `interval(k)` is run k's `SLING_JOURNAL_INTERVAL_MS`), then resumed with `--resume`: every resumed output must be
/// `want`, and a killed run must not verify. Returns (runs interrupted, tensors reused in all).
fn sigkill_then_resume(
    root: &Path,
    cmd: &str,
    extra: &[&str],
    afters: &[usize],
    interval: impl Fn(usize) -> &'static str,
    want: &BTreeMap<String, String>,
) -> (usize, u64) {
    let (mut interrupted, mut reused_total) = (0, 0);
    for (k, &after) in afters.iter().enumerate() {
        let d = out_dir(root, &format!("{cmd}-sigkill-{}-{after}", extra.join("_").replace(['/', ':'], "-")));
        let mut c = bin();
        c.args([cmd, s(&fixture(KILL_SRC)), "-o", s(&d.join("m.gguf")), "--tokenizer-pre", "gpt-2"])
            .args(["--reproducible", "--progress", "json", "-t", if k % 2 == 0 { "1" } else { "2" }])
            .args(extra)
            .env("SLING_JOURNAL_INTERVAL_MS", interval(k))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let (mut seen, mut finished) = (0, false);
        for line in BufReader::new(child.stderr.take().unwrap()).lines() {
            let v: Value = serde_json::from_str(&line.unwrap()).unwrap_or(Value::Null);
            if v["event"] == "tensor" {
                seen += 1;
                if seen == after {
                    child.kill().unwrap(); // SIGKILL
                    break;
                }
            }
            finished |= v["event"] == "done";
        }
        let status = child.wait().unwrap();
        if finished || status.success() {
            // Too late to kill: a complete artifact, which verifies.
            assert_eq!(verify_code(&d.join("m.gguf")), Some(0));
            continue;
        }
        if !d.join("m.sling.json").exists() {
            assert_ne!(verify_code(&d.join("m.gguf")), Some(0), "verify accepted a killed run");
        }
        let mut a = vec!["-q", "--reproducible", "--resume", "--json"];
        a.extend_from_slice(extra);
        let o = sling(cmd, &fixture(KILL_SRC), &d.join("m.gguf"), &a, &[]);
        ok(&o);
        assert_eq!(&hashes(&d), want, "resumed output differs from the uninterrupted run ({})", d.display());
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        interrupted += 1;
        reused_total += v["resumed_tensors"].as_u64().unwrap_or(0);
        fs::remove_dir_all(&d).unwrap();
    }
    (interrupted, reused_total)
}

/// Real SIGKILLs at points chosen from the event stream, then `--resume`.
#[test]
fn sigkill_during_conversion_then_resume_is_identical() {
    let t = tempfile::tempdir().unwrap();
    for split in [None, Some("40")] {
        let mut extra = vec!["--type", "bf16"];
        if let Some(n) = split {
            extra.extend(["--split-max-tensors", n]);
        }
        let want = reference(t.path(), &extra);
        let interval = |k| if k == 3 { "20" } else { "0" };
        let (interrupted, reused) =
            sigkill_then_resume(t.path(), "convert", &extra, &[2, 90, 200, 305], interval, &want);
        assert!(interrupted >= 2 && reused > 0, "the kills should land mid-run ({interrupted}, {reused})");
    }
}

/// The same for `quantize` (one-pass llama-quantize presets), single file and split.
#[test]
fn sigkill_during_quantize_then_resume_is_identical() {
    let t = tempfile::tempdir().unwrap();
    for split in [None, Some("40")] {
        let mut extra = vec!["--to", "gguf:Q4_K_M"];
        if let Some(n) = split {
            extra.extend(["--split-max-tensors", n]);
        }
        let want = reference_of(t.path(), "quantize", &extra);
        let (interrupted, reused) = sigkill_then_resume(t.path(), "quantize", &extra, &[3, 100, 220], |_| "0", &want);
        assert!(interrupted >= 2 && reused > 0, "the kills should land mid-run ({interrupted}, {reused})");
    }
}

#[test]
fn resume_rechecks_hashes_and_plans() {
    let t = tempfile::tempdir().unwrap();
    let extra = ["--type", "q8_0"];
    let want = reference(t.path(), &extra);
    let kill = |d: &Path, at: &str| {
        let o = sling(
            "convert",
            &fixture(KILL_SRC),
            &d.join("m.gguf"),
            &["-q", "--reproducible", "--type", "q8_0"],
            &[("SLING_TEST_ABORT_AFTER_TENSORS", at), ("SLING_JOURNAL_INTERVAL_MS", "0")],
        );
        assert_eq!(o.status.code(), Some(134));
    };

    // A flipped byte in a journaled tensor: the tensors before it are kept, it and the rest rewritten.
    let d = out_dir(t.path(), "corrupt");
    kill(&d, "100");
    let journal = fs::read_to_string(d.join("m.gguf.partial.json")).unwrap();
    let e: Value = serde_json::from_str(journal.lines().nth(1 + 40).unwrap()).unwrap();
    assert_eq!(e["i"], 40);
    let p = d.join("m.gguf.partial");
    let mut b = fs::read(&p).unwrap();
    b[e["offset"].as_u64().unwrap() as usize + 3] ^= 0x10;
    fs::write(&p, b).unwrap();
    assert_eq!(resume_and_compare(&d, &extra, &want), 40);

    // Garbage after the journaled prefix (a half-written tensor) is cut off.
    let d = out_dir(t.path(), "garbage");
    kill(&d, "60");
    let mut f = fs::OpenOptions::new().append(true).open(d.join("m.gguf.partial")).unwrap();
    std::io::Write::write_all(&mut f, &[0xab; 777]).unwrap();
    drop(f);
    assert_eq!(resume_and_compare(&d, &extra, &want), 60);

    // A damaged journal line ends what is reused.
    let d = out_dir(t.path(), "journal");
    kill(&d, "30");
    let jp = d.join("m.gguf.partial.json");
    let mut lines: Vec<String> = fs::read_to_string(&jp).unwrap().lines().map(str::to_string).collect();
    lines[1 + 10] = lines[1 + 10].replace("\"sha256\":\"", "\"sha256\":\"00");
    fs::write(&jp, lines.join("\n") + "\n").unwrap();
    assert_eq!(resume_and_compare(&d, &extra, &want), 10);

    // Other options: nothing is reused (a warning says why) and the result is that of the new options.
    let d = out_dir(t.path(), "other-options");
    kill(&d, "150");
    let want_bf16 = reference(t.path(), &["--type", "bf16"]);
    let o = sling(
        "convert",
        &fixture(KILL_SRC),
        &d.join("m.gguf"),
        &["--reproducible", "--resume", "--type", "bf16", "--progress", "json"],
        &[],
    );
    ok(&o);
    let warn = stderr(&o)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "warning")
        .unwrap_or_else(|| panic!("no warning: {}", stderr(&o)));
    assert!(warn["message"].as_str().unwrap().contains("nothing to resume"), "{warn}");
    assert_eq!(hashes(&d), want_bf16);

    // A source modified since the interrupted run: nothing is reused.
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for e in fs::read_dir(fixture(KILL_SRC)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), src.join(e.file_name())).unwrap();
    }
    let d = out_dir(t.path(), "source-changed");
    let a = ["-q", "--reproducible", "--type", "q8_0"];
    let o = sling(
        "convert",
        &src,
        &d.join("m.gguf"),
        &a,
        &[("SLING_TEST_ABORT_AFTER_TENSORS", "100"), ("SLING_JOURNAL_INTERVAL_MS", "0")],
    );
    assert_eq!(o.status.code(), Some(134));
    let cfg = src.join("config.json");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, text + " ").unwrap();
    let o = sling(
        "convert",
        &src,
        &d.join("m.gguf"),
        &["-q", "--reproducible", "--type", "q8_0", "--resume", "--json"],
        &[],
    );
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["resumed_tensors"], 0);

    // Without --resume a stale partial is replaced, and nothing partial is left afterwards.
    let d = out_dir(t.path(), "no-resume");
    kill(&d, "100");
    ok(&sling("convert", &fixture(KILL_SRC), &d.join("m.gguf"), &["-q", "--reproducible", "--type", "q8_0"], &[]));
    assert_eq!(hashes(&d), want);
}

#[test]
fn a_second_writer_of_the_same_output_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = out_dir(t.path(), "o");
    let lock = fs::File::create(d.join("m.gguf.partial.json")).unwrap();
    lock.try_lock().unwrap();
    let o = sling("convert", &fixture("qwen2moe"), &d.join("m.gguf"), &["-q"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("another sling process is writing this output"), "{}", stderr(&o));
    assert_eq!(names(&d), ["m.gguf.partial.json"], "the other writer's files are left alone");
    drop(lock);
    ok(&sling("convert", &fixture("qwen2moe"), &d.join("m.gguf"), &["-q"], &[]));
    assert_eq!(names(&d), ["README.md", "m.gguf", "m.sling.json"]);
}

// ---------------------------------------------------------------------------------------------
// Disk full, read-only output
// ---------------------------------------------------------------------------------------------

/// sha256 of every file of the source, to show it was not touched.
fn source_state(src: &Path) -> BTreeMap<String, (String, std::time::SystemTime)> {
    fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                (hash_file(&e.path()).unwrap().1, e.metadata().unwrap().modified().unwrap()),
            )
        })
        .collect()
}

/// A tmpfs mounted for the test (root only), unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, opts: &str) -> Option<Mount> {
        fs::create_dir_all(at).unwrap();
        // Lets a root run exercise the user-namespace fallback the way a non-root one takes it.
        if std::env::var_os("SLING_TEST_NO_MOUNT").is_some() {
            return None;
        }
        let o = Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs", s(at)]).output().ok()?;
        o.status.success().then(|| Mount(at.to_path_buf()))
    }
}

/// Re-runs the test `name` inside a private user and mount namespace (`unshare --user --map-root-user
/// --mount`), where an unprivileged user may mount a tmpfs, when this process cannot mount one itself. The
/// outcome of that run is asserted here. If no namespace can be made either, the test fails under CI (a check
/// that silently did not run proves nothing) and says why it did not run elsewhere.
fn rerun_in_user_namespace(name: &str) {
    if std::env::var_os("SLING_TEST_IN_USERNS").is_some() {
        panic!("cannot mount a tmpfs even as root of a user namespace");
    }
    let exe = std::env::current_exe().unwrap();
    let o = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", s(&exe), "--exact", name, "--test-threads", "1", "--nocapture"])
        .env("SLING_TEST_IN_USERNS", "1")
        .env_remove("SLING_TEST_NO_MOUNT")
        .output();
    let why = match o {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("1 passed") => {
            eprintln!("ran in a user namespace (this process cannot mount)");
            return;
        }
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("running 1 test") => {
            panic!("{name} failed in a user namespace:\n{}\n{}", String::from_utf8_lossy(&o.stdout), stderr(&o))
        }
        Ok(o) => format!("unshare could not make a user namespace: {}", stderr(&o).trim()),
        Err(e) => format!("cannot run unshare: {e}"),
    };
    if std::env::var_os("CI").is_some() {
        panic!("{name} cannot run here: not root, and {why}");
    }
    eprintln!("skipped {name}: not root, and {why} (under CI this is a failure)");
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn assert_clear_output_error(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2: {e}");
    assert!(e.starts_with("error: "), "{e}");
    assert!(needles.iter().any(|n| e.contains(n)), "stderr should say one of {needles:?}: {e}");
}

#[test]
fn file_size_limit_is_a_clear_error_and_leaves_nothing() {
    // RLIMIT_FSIZE with SIGXFSZ ignored: writes past the limit fail with EFBIG, as on a full disk.
    let t = tempfile::tempdir().unwrap();
    let src = fixture(KILL_SRC);
    let before = source_state(&src);
    let d = out_dir(t.path(), "o");
    let o = Command::new("bash")
        .args(["-c", "trap '' XFSZ; ulimit -f 300; exec \"$@\"", "sh", env!("CARGO_BIN_EXE_sling")])
        .args(["convert", s(&src), "-o", s(&d.join("m.gguf")), "--tokenizer-pre", "gpt-2", "-q"])
        .output()
        .unwrap();
    assert_clear_output_error(&o, &["file size limit"]);
    assert!(stderr(&o).contains("nothing was left behind"), "{}", stderr(&o));
    assert!(names(&d).is_empty(), "left {:?}", names(&d));
    assert_eq!(source_state(&src), before, "the source must be untouched");

    // With --resume the partial output is kept, with a journal of the tensors that reached the disk
    // (the default journal interval is far longer than this run: they are journaled on the way out),
    // and a later --resume (with room) finishes it.
    let want = reference(t.path(), &[]);
    let o = Command::new("bash")
        .args(["-c", "trap '' XFSZ; ulimit -f 300; exec \"$@\"", "sh", env!("CARGO_BIN_EXE_sling")])
        .args([
            "convert",
            s(&src),
            "-o",
            s(&d.join("m.gguf")),
            "--tokenizer-pre",
            "gpt-2",
            "-q",
            "--resume",
            "--reproducible",
        ])
        .output()
        .unwrap();
    assert_clear_output_error(&o, &["file size limit"]);
    assert!(stderr(&o).contains("rerun with --resume"), "{}", stderr(&o));
    assert!(d.join("m.gguf.partial").exists());
    assert_eq!(verify_code(&d.join("m.gguf")), Some(2));
    let reused = resume_and_compare(&d, &[], &want);
    assert!(reused > 0, "the tensors written before the limit are reused");
    assert_eq!(source_state(&src), before);
}

#[test]
fn full_disk_is_a_clear_error_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let Some(_m) = Mount::tmpfs(&t.path().join("small"), "size=256k") else {
        return rerun_in_user_namespace("full_disk_is_a_clear_error_and_leaves_nothing");
    };
    let src = fixture(KILL_SRC);
    let before = source_state(&src);
    let d = t.path().join("small");
    let o = sling("convert", &src, &d.join("m.gguf"), &["-q"], &[]);
    assert_clear_output_error(&o, &["disk is full"]);
    assert!(names(&d).is_empty(), "left {:?}", names(&d));
    assert_eq!(source_state(&src), before);
    // With --resume the partial output is kept; once there is room, --resume finishes it.
    let want = reference(t.path(), &[]);
    let o = sling("convert", &src, &d.join("m.gguf"), &["-q", "--resume", "--reproducible"], &[]);
    assert_clear_output_error(&o, &["disk is full"]);
    assert!(stderr(&o).contains("rerun with --resume"), "{}", stderr(&o));
    assert_eq!(names(&d), ["m.gguf.partial", "m.gguf.partial.json"]);
    let o = Command::new("mount").args(["-t", "tmpfs", "-o", "remount,size=4m", "tmpfs", s(&d)]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(resume_and_compare(&d, &[], &want) > 0, "the tensors written before the disk filled are reused");
    assert_eq!(source_state(&src), before);
}

#[test]
fn read_only_output_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen2moe");
    let before = source_state(&src);
    let ro = t.path().join("ro");
    let _m = Mount::tmpfs(&ro, "ro,size=1m");
    if _m.is_none() {
        fs::create_dir_all(&ro).unwrap();
        let mut p = fs::metadata(&ro).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o555);
        fs::set_permissions(&ro, p).unwrap();
        if fs::File::create(ro.join("probe")).is_ok() {
            // Root ignores the mode: only a read-only mount stops it.
            return rerun_in_user_namespace("read_only_output_is_a_clear_error");
        }
    }
    let o = sling("convert", &src, &ro.join("m.gguf"), &["-q"], &[]);
    assert_clear_output_error(&o, &["read-only file system", "permission denied"]);
    assert!(names(&ro).is_empty());
    assert_eq!(source_state(&src), before);
}

// ---------------------------------------------------------------------------------------------
// Events, progress, model card
// ---------------------------------------------------------------------------------------------

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

fn check_stream(ev: &[Value], n_tensors: u64) {
    for e in ev {
        assert!(e["event"].is_string() && e["elapsed"].is_number(), "{e}");
    }
    let start = &ev[0];
    assert_eq!(start["event"], "start");
    for k in
        ["tool", "version", "command", "source", "outputs", "type", "tensors", "bytes", "threads", "resumed_tensors"]
    {
        assert!(!start[k].is_null(), "start lacks {k}: {start}");
    }
    assert_eq!(start["tensors"], n_tensors);
    let tensors: Vec<&Value> = ev.iter().filter(|e| e["event"] == "tensor").collect();
    assert_eq!(tensors.len() as u64, n_tensors);
    let mut last = 0;
    for (i, t) in tensors.iter().enumerate() {
        assert_eq!(t["index"], i as u64);
        assert_eq!(t["of"], n_tensors);
        for k in ["name", "type", "bytes", "done_bytes", "total_bytes", "reused"] {
            assert!(!t[k].is_null(), "tensor lacks {k}: {t}");
        }
        let done = t["done_bytes"].as_u64().unwrap();
        assert_eq!(done, last + t["bytes"].as_u64().unwrap());
        last = done;
    }
    assert_eq!(last, start["bytes"].as_u64().unwrap());
    let done = ev.last().unwrap();
    assert_eq!(done["event"], "done", "{done}");
    for k in ["outputs", "manifest", "model_card", "tensors", "bytes", "seconds"] {
        assert!(!done[k].is_null(), "done lacks {k}: {done}");
    }
    for f in done["outputs"].as_array().unwrap() {
        assert_eq!(f["sha256"].as_str().unwrap().len(), 64);
    }
}

#[test]
fn event_stream_has_the_documented_fields() {
    let t = tempfile::tempdir().unwrap();
    let d = out_dir(t.path(), "o");
    let events = t.path().join("events.jsonl");
    let o = sling(
        "convert",
        &fixture("qwen2moe"),
        &d.join("m.gguf"),
        &["--progress", "json", "--events", s(&events), "--type", "q8_0"],
        &[],
    );
    ok(&o);
    let ev = parse_lines(&stderr(&o));
    check_stream(&ev, 37);
    let stages: Vec<&str> = ev.iter().filter(|e| e["event"] == "stage").map(|e| e["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["hashing sources", "writing manifest"]);
    // The file holds the same events.
    let from_file = parse_lines(&fs::read_to_string(&events).unwrap());
    assert_eq!(from_file.len(), ev.len());
    assert!(from_file.iter().zip(&ev).all(|(a, b)| a["event"] == b["event"] && a.get("name") == b.get("name")));

    // quantize too, with a warning (an imatrix missing most tensors) and the preset in `done`.
    let im = t.path().join("im.dat");
    let name = b"blk.0.attn_q.weight";
    let mut b = 1i32.to_le_bytes().to_vec();
    b.extend((name.len() as i32).to_le_bytes());
    b.extend(name);
    b.extend(1i32.to_le_bytes());
    b.extend(64i32.to_le_bytes());
    for _ in 0..64 {
        b.extend(1.0f32.to_le_bytes());
    }
    fs::write(&im, b).unwrap();
    let o = sling(
        "quantize",
        &fixture("qwen3moe"),
        &d.join("q.gguf"),
        &["--to", "gguf:Q4_K_M", "--imatrix", s(&im), "--progress", "json"],
        &[],
    );
    ok(&o);
    let ev = parse_lines(&stderr(&o));
    let n = ev[0]["tensors"].as_u64().unwrap();
    let warnings: Vec<&Value> = ev.iter().filter(|e| e["event"] == "warning").collect();
    assert!(!warnings.is_empty() && warnings[0]["message"].as_str().unwrap().contains("imatrix"), "{ev:?}");
    let without: Vec<Value> = ev.into_iter().filter(|e| e["event"] != "warning").collect();
    check_stream(&without, n);
    assert_eq!(without.last().unwrap()["preset"], "Q4_K_M");

    // An error ends the stream with an `error` event carrying the exit code.
    let o = bin()
        .args(["convert", s(&fixture("qwen3moe")), "-o", s(&d.join("x.gguf")), "--progress", "json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    let first = err.lines().next().unwrap();
    let v: Value = serde_json::from_str(first).unwrap();
    assert_eq!(v["event"], "error");
    assert_eq!(v["exit_code"], 2);
    assert!(v["message"].as_str().unwrap().contains("--tokenizer-pre"), "{v}");
    // ... followed by the usual human-readable error line.
    assert!(err.lines().nth(1).unwrap().starts_with("error: "), "{err}");
}

#[test]
fn no_progress_bar_when_stderr_is_not_a_terminal() {
    let t = tempfile::tempdir().unwrap();
    let d = out_dir(t.path(), "o");
    let o = sling("convert", &fixture("deepseekv2lite"), &d.join("m.gguf"), &[], &[]);
    ok(&o);
    let e = stderr(&o);
    assert!(!e.contains('\r') && !e.contains('\u{1b}'), "progress bar drawn on a pipe: {e:?}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("wrote "), "{e}");
    // -q: nothing at all.
    let o = sling("convert", &fixture("deepseekv2lite"), &d.join("m.gguf"), &["-q"], &[]);
    ok(&o);
    assert_eq!(stderr(&o), "");
}

#[test]
fn model_card_is_covered_by_the_manifest() {
    let t = tempfile::tempdir().unwrap();
    let d = out_dir(t.path(), "o");
    let out = d.join("m.gguf");
    ok(&sling(
        "convert",
        &fixture("qwen2moe"),
        &out,
        &["-q", "--type", "q8_0", "--split-max-tensors", "20", "--reproducible"],
        &[],
    ));
    assert_eq!(names(&d), ["README.md", "m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "m.sling.json"]);
    let card = fs::read_to_string(d.join("README.md")).unwrap();
    let m: Value = serde_json::from_slice(&fs::read(d.join("m.sling.json")).unwrap()).unwrap();
    assert_eq!(m["model_card"]["name"], "README.md");
    for o in m["outputs"].as_array().unwrap() {
        assert!(card.contains(o["sha256"].as_str().unwrap()), "the card lists each output's sha256");
    }
    for needle in [
        "library_name: gguf",
        "Qwen2MoeForCausalLM",
        "## Recipe",
        "routed_experts",
        "bits per weight",
        "not measured",
        "sling verify",
        "sha256sum -c",
        "model_signing verify",
    ] {
        assert!(card.contains(needle), "card lacks {needle:?}:\n{card}");
    }
    assert_eq!(verify_code(&out), Some(0));
    // An edited card is a mismatch naming it.
    fs::write(d.join("README.md"), card.replace("not measured", "excellent")).unwrap();
    let o = bin().args(["verify", s(&out)]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("README.md: model card differs"), "{}", stdout(&o));
    fs::remove_file(d.join("README.md")).unwrap();
    assert_eq!(verify_code(&out), Some(1));

    // A README.md that is not sling's is never overwritten: the card goes to <stem>.README.md.
    let d2 = out_dir(t.path(), "repo");
    fs::write(d2.join("README.md"), "# my project\n").unwrap();
    ok(&sling("convert", &fixture("qwen2moe"), &d2.join("m.gguf"), &["-q"], &[]));
    assert_eq!(fs::read_to_string(d2.join("README.md")).unwrap(), "# my project\n");
    assert!(d2.join("m.README.md").exists());
    assert_eq!(verify_code(&d2.join("m.gguf")), Some(0));
    // --no-model-card: none, and the earlier one (ours) is removed.
    ok(&sling("convert", &fixture("qwen2moe"), &d2.join("m.gguf"), &["-q", "--no-model-card"], &[]));
    assert_eq!(names(&d2), ["README.md", "m.gguf", "m.sling.json"]);
    assert_eq!(verify_code(&d2.join("m.gguf")), Some(0));
    // --no-manifest: neither manifest nor card.
    let d3 = out_dir(t.path(), "bare");
    ok(&sling("convert", &fixture("qwen2moe"), &d3.join("m.gguf"), &["-q", "--no-manifest"], &[]));
    assert_eq!(names(&d3), ["m.gguf"]);
}

#[test]
fn plan_estimates_memory_disk_and_time() {
    let o = bin()
        .args(["plan", s(&fixture("mixtral")), "--to", "gguf:Q4_K_M", "--tokenizer-pre", "gpt-2", "--json", "-t", "2"])
        .output()
        .unwrap();
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = &v["estimate"];
    assert_eq!(e["threads"], 2);
    assert!(e["disk_bytes"].as_u64().unwrap() > v["bytes"].as_u64().unwrap());
    assert!(e["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert!(e["seconds"].as_f64().unwrap() > 0.0);
    let o = bin()
        .args(["plan", s(&fixture("mixtral")), "--to", "gguf:Q4_K_M", "--tokenizer-pre", "gpt-2"])
        .output()
        .unwrap();
    ok(&o);
    // The estimate depends on the machine: it goes to stderr, the table (stdout) does not change.
    let text = stderr(&o);
    assert!(text.contains("estimated: disk "), "{text}");
    assert!(!stdout(&o).contains("estimated"));
}

#[test]
fn closed_stdout_ends_quietly() {
    // `sling inspect … | head -c 0`: the reader goes away before sling prints. A panic on EPIPE would show up as
    // "panicked" on stderr and exit status 101; the contract is SIGPIPE's default (or success, if the whole table
    // fitted in the pipe before it closed).
    for _ in 0..5 {
        let mut child = bin()
            .args(["inspect", s(&fixture("deepseekv3")), "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert!(o.status.success() || o.status.signal() == Some(13), "{:?}: {err}", o.status);
        }
    }
}
