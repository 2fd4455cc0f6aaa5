//! Every example in `README.md` and in every command's `--help` runs as written (issue "Every claim checked the
//! strong way", §3): a newcomer's first command must not fail.
//!
//! The examples name the committed fixtures (`fixtures/models/…`) and the interop suite's text
//! (`tests/interop/data/…`) by paths relative to the repository root and write their outputs to the working
//! directory. Each block runs top to bottom with `bash -o pipefail -c LINE` in a fresh scratch directory that
//! holds `fixtures` and `tests` as links to the repository's, so that outputs of one run never meet another's and
//! a later example may use what an earlier one of the same block wrote (an imatrix, a recipe, an artifact).
//! `sling` is the binary under test (first on `PATH`); `openssl` and `jq` come from the system, as for a reader.
//! The README's set-up line runs with `sling` in place of `cargo run --release -p sling --` (the same binary,
//! without a nested cargo build).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// `sling ARGS --help` without wrapping (clap reads `COLUMNS` when stdout is not a terminal).
fn help(cmd: &[&str]) -> String {
    let o = bin().args(cmd).arg("--help").env("COLUMNS", "1000").output().unwrap();
    assert!(o.status.success(), "sling {cmd:?} --help failed");
    String::from_utf8(o.stdout).unwrap()
}

/// The lines of the `Examples…:` paragraph of a help text: those indented by two spaces after it, up to the
/// first blank line.
fn help_examples(text: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("Examples"));
    assert!(lines.next().is_some(), "no Examples paragraph in\n{text}");
    lines.take_while(|l| !l.trim().is_empty()).map(|l| l.strip_prefix("  ").unwrap_or(l).to_string()).collect()
}

/// The commands `sling --help` lists (not `help`), then the hidden developer commands that carry examples.
fn commands() -> Vec<String> {
    let top = help(&[]);
    let mut cmds: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(cmds.len() >= 9, "commands of `sling --help`: {cmds:?}");
    cmds.extend(["logits".to_string(), "dequantize".to_string()]);
    cmds
}

/// The README's shell examples: the set-up block's `cargo run` line and the whole `## Examples` block.
fn readme_examples() -> Vec<String> {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    let block_after = |heading: &str| -> Vec<String> {
        let at = readme.find(heading).unwrap_or_else(|| panic!("README.md has no {heading:?}"));
        let rest = &readme[at..];
        let start = rest.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
        let end = rest[start..].find("```").unwrap() + start;
        rest[start..end].lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
    };
    let setup = block_after("## Set up and try it");
    let run = setup
        .iter()
        .find_map(|l| l.strip_prefix("cargo run --release -p sling -- "))
        .expect("the set-up block's `cargo run --release -p sling -- …` line");
    let mut v = vec![format!("sling {run}")];
    v.extend(block_after("## Examples"));
    v
}

/// Runs `lines` top to bottom in a fresh scratch directory; panics naming the first line that fails.
fn run_block(what: &str, lines: &[String]) {
    assert!(!lines.is_empty(), "{what}: no examples");
    let t = tempfile::tempdir().unwrap();
    let root = repo();
    std::os::unix::fs::symlink(root.join("fixtures"), t.path().join("fixtures")).unwrap();
    std::os::unix::fs::symlink(root.join("tests"), t.path().join("tests")).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_sling")).parent().unwrap().to_path_buf();
    let path = std::env::join_paths(
        std::iter::once(bin_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    for line in lines {
        let mut c = Command::new("bash");
        c.args(["-o", "pipefail", "-c", line]).current_dir(t.path()).env("PATH", &path);
        for k in
            ["SOURCE_DATE_EPOCH", "SLING_JOURNAL_INTERVAL_MS", "SLING_TEST_ABORT_AFTER_TENSORS", "SLING_TEST_ABORT_AT"]
        {
            c.env_remove(k);
        }
        let o = c.output().unwrap();
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b);
            let skip = s.chars().count().saturating_sub(4000);
            s.chars().skip(skip).collect::<String>()
        };
        assert!(
            o.status.success(),
            "{what}: the example\n  {line}\nexited with {:?}\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
            o.status.code(),
            tail(&o.stdout),
            tail(&o.stderr)
        );
    }
}

#[test]
fn readme_examples_run_as_written() {
    let lines = readme_examples();
    assert!(lines.len() >= 20, "README examples: {lines:?}");
    run_block("README.md", &lines);
}

#[test]
fn quantize_help_examples_run_as_written() {
    run_block("sling quantize --help", &help_examples(&help(&["quantize"])));
}

#[test]
fn every_other_help_example_runs_as_written() {
    run_block("sling --help", &help_examples(&help(&[])));
    for cmd in commands().iter().filter(|c| *c != "quantize") {
        run_block(&format!("sling {cmd} --help"), &help_examples(&help(&[cmd])));
    }
}

#[test]
fn every_example_names_only_committed_inputs() {
    // The inputs the examples read are the committed ones, so "runs as written" holds on a fresh clone: a
    // `./Some-Model` directory or a `/tmp` path would only run on the machine that wrote it.
    let mut all = readme_examples();
    all.extend(help_examples(&help(&[])));
    for cmd in commands() {
        all.extend(help_examples(&help(&[&cmd])));
    }
    for l in &all {
        assert!(!l.contains("/tmp") && !l.contains(" ./"), "an example outside the fixtures: {l}");
    }
}
