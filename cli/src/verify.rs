//! `sling verify`: checks an artifact against its provenance manifest.

use std::path::{Path, PathBuf};

use sling_provenance::manifest::{
    verify_with, Problem, Rederive, RederiveInputs, RederiveReport, VerifyOptions, VerifyReport, DEFAULT_SAMPLE,
    DIR_MANIFEST, MANIFEST_SUFFIX,
};
use sling_provenance::signing::{self, SigVerifyReport};

/// Exit code: everything matches the manifest.
pub const EXIT_VERIFIED: u8 = 0;
/// Exit code: at least one difference.
pub const EXIT_MISMATCH: u8 = 1;
/// Exit code: the check could not be made.
pub const EXIT_CANNOT_CHECK: u8 = 2;

pub const AFTER_HELP: &str = "Examples (they run as written from the repository root, on its fixtures):
  sling convert fixtures/models/deepseekv3 --to gguf --type q8_0 --split-max-size 100K --tokenizer-pre gpt-2 -o ds-v3-q8_0.gguf
  sling verify ds-v3-q8_0.gguf                      # uses ds-v3-q8_0.sling.json beside it
  sling verify ds-v3-q8_0-00002-of-00003.gguf       # any shard: checks the whole set
  sling verify ds-v3-q8_0.sling.json --source fixtures/models/deepseekv3 --json
  sling verify ds-v3-q8_0.gguf --source fixtures/models/deepseekv3 --full   # re-derive every tensor
  sling calibrate fixtures/models/qwen3moe --data tests/interop/data/calib.txt -o imatrix.gguf
  sling quantize fixtures/models/qwen3moe --to gguf:IQ4_XS --imatrix imatrix.gguf --tokenizer-pre gpt-2 -o q4.gguf
  sling verify q4.gguf --source fixtures/models/qwen3moe --imatrix imatrix.gguf   # made with an imatrix
  sling quantize fixtures/models/qwen3moe --to vllm:w4a16 -o qwen3-w4a16
  sling verify qwen3-w4a16/                         # a vllm/mlx directory: its sling.json
  sling verify qwen3-w4a16/ --source fixtures/models/qwen3moe   # ... and re-derive a sample of weights
  openssl ecparam -name prime256v1 -genkey -noout -out key.pem && openssl ec -in key.pem -pubout -out pub.pem
  sling sign qwen3-w4a16/ --key key.pem --signature model.sig
  sling verify --signature model.sig --public-key pub.pem qwen3-w4a16/   # a model_signing signature

Checks every output file (size, sha256), every tensor (type, shape, offset, sha256 of its bytes), that no file of \
the set is missing or extra, and that the manifest itself was not edited (manifest_sha256). Schema: \
docs/manifest.md.

With --source, also re-hashes the source files the conversion read, and re-derives: rebuilds the plan from the \
source and the options the manifest records, checks every tensor's name, type and shape and the metadata against \
it, and recomputes a sample of tensors (--sample N, default 8, spread over the file, a routed expert among them) \
or all of them (--full), whose sha256 must be the manifest's and the file's. This catches a manifest rewritten to \
match altered outputs, which the seal cannot. An artifact quantized with an imatrix needs --imatrix FILE (the one \
recorded, by sha256); without it, or when the manifest does not record the options (older sling), the \
re-derivation is not checked (exit 2).

With --signature and --public-key, checks an OpenSSF model-signing signature instead (written by `sling sign` or \
`model_signing sign key`, ECDSA P-256): the signature over the signed statement, then every file of ARTIFACT (a \
directory or a single file) against the signed sha256 list, with no missing or extra file (.git, .gitattributes, \
.github, .gitignore at the root, the signature file and the signed ignore_paths are ignored). Format: \
docs/signing.md.

Exit codes: 0 verified; 1 mismatch (each problem is printed on its own line, or listed with --json); 2 could not \
check (no manifest, unreadable or unknown manifest; with --source: the re-derivation could not be made; with \
--signature: unreadable or unsupported key, malformed signature bundle; usage error).";

#[derive(clap::Args)]
pub struct Args {
    /// The manifest (OUT.sling.json) or an output of `sling convert` (OUT.gguf, or any shard of a split
    /// output, whose manifest is named after the base OUT), or a directory written by `sling quantize --to
    /// vllm:…|mlx:…` (its sling.json). With --signature: the signed model directory or file.
    artifact: PathBuf,
    /// Also re-hash the source files listed in the manifest, found under this directory, and re-derive
    /// tensors from them (see --sample, --full).
    #[arg(long, value_name = "SRC")]
    source: Option<PathBuf>,
    /// With --source: how many tensors to recompute from the source (spread over the file, a routed
    /// expert among them); every tensor's type and shape and the metadata are checked against the
    /// rebuilt plan in any case. 0: only re-hash the source files.
    #[arg(long, value_name = "N", requires = "source", conflicts_with = "full", default_value_t = DEFAULT_SAMPLE)]
    sample: usize,
    /// With --source: recompute every tensor (as long as the conversion itself).
    #[arg(long, requires = "source")]
    full: bool,
    /// With --source: the imatrix the artifact was quantized with (its size and sha256 must be the ones
    /// the manifest records), needed to re-derive such an artifact.
    #[arg(long, value_name = "FILE", requires = "source")]
    imatrix: Option<PathBuf>,
    /// With --source: the calibration data a `--method gptq` artifact was quantized with (its sha256 must be the
    /// one the manifest records), needed to re-derive such an artifact: the calibration pass runs again.
    #[arg(long, value_name = "FILE", requires = "source")]
    data: Option<PathBuf>,
    /// Check this OpenSSF model-signing signature (model.sig, from `sling sign` or `model_signing
    /// sign key`) instead of the provenance manifest.
    #[arg(long, value_name = "SIG", requires = "public_key", conflicts_with = "source")]
    signature: Option<PathBuf>,
    /// The signer's ECDSA P-256 public key (PEM) for --signature.
    #[arg(long, value_name = "PUB.pem", requires = "signature")]
    public_key: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// `m-00001-of-00003` → `m`.
fn strip_shard_suffix(stem: &str) -> Option<&str> {
    let b = stem.as_bytes();
    let n = b.len();
    if n < 16 {
        return None;
    }
    let tail = &b[n - 15..];
    let ok = tail[0] == b'-'
        && tail[1..6].iter().all(u8::is_ascii_digit)
        && &tail[6..10] == b"-of-"
        && tail[10..15].iter().all(u8::is_ascii_digit);
    ok.then(|| &stem[..n - 15])
}

/// The manifest for ARTIFACT: itself, `<stem>.sling.json` beside it, or for a shard the one named
/// after the base name.
fn find_manifest(artifact: &Path) -> Result<PathBuf, String> {
    if artifact.is_dir() {
        // A directory artifact (`--to vllm:…|mlx:…`) holds its manifest.
        let m = artifact.join(DIR_MANIFEST);
        if m.is_file() {
            return Ok(m);
        }
        return Err(format!(
            "no manifest in {} (looked for {}): not verifiable — it was not written by `sling quantize --to vllm:…|mlx:…`, or the run did not finish",
            artifact.display(),
            m.display()
        ));
    }
    let name = artifact.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(MANIFEST_SUFFIX) {
        return Ok(artifact.to_path_buf());
    }
    let stem = artifact.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut candidates = vec![artifact.with_file_name(format!("{stem}{MANIFEST_SUFFIX}"))];
    if let Some(base) = strip_shard_suffix(&stem) {
        // A shard name finds the set's manifest only when that shard is there: for a mistyped
        // `m-00001-of-00004.gguf`, reporting the set of `m.sling.json` verified would answer another question.
        // (The `-o` name of a split set, `m.gguf`, is never written and finds `m.sling.json` directly.)
        let set = artifact.with_file_name(format!("{base}{MANIFEST_SUFFIX}"));
        if !artifact.exists() && set.is_file() {
            return Err(format!(
                "{}: no such file (the set {} describes lists its shards)",
                artifact.display(),
                set.display()
            ));
        }
        candidates.push(set);
    }
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(format!(
        "no manifest for {} (looked for {}): not verifiable — it was not written by `sling convert`, or the conversion did not finish",
        artifact.display(),
        tried.join(", ")
    ))
}

fn cannot_check(json: bool, artifact: &Path, msg: &str) -> u8 {
    if json {
        let v = serde_json::json!({ "status": "error", "artifact": artifact, "error": msg });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    eprintln!("error: cannot verify: {msg}");
    EXIT_CANNOT_CHECK
}

/// Runs the check; returns the exit code.
pub fn run(a: Args, quiet: bool) -> u8 {
    if let (Some(sig), Some(public_key)) = (&a.signature, &a.public_key) {
        return match signing::verify(&a.artifact, sig, public_key) {
            Ok(r) => {
                print_signature_report(&r, &a.artifact, a.json, quiet);
                if r.verified() {
                    EXIT_VERIFIED
                } else {
                    EXIT_MISMATCH
                }
            }
            Err(e) => cannot_check(a.json, &a.artifact, &e.to_string()),
        };
    }
    let manifest = match find_manifest(&a.artifact) {
        Ok(m) => m,
        Err(msg) => return cannot_check(a.json, &a.artifact, &msg),
    };
    if let Some(src) = &a.source {
        if !src.is_dir() {
            return cannot_check(a.json, &a.artifact, &format!("--source {}: not a directory", src.display()));
        }
    }
    if let Some(im) = &a.imatrix {
        if !im.is_file() {
            return cannot_check(a.json, &a.artifact, &format!("--imatrix {}: not a file", im.display()));
        }
    }
    let rederive = match (a.full, a.sample) {
        (true, _) => Rederive::Full,
        (false, 0) => Rederive::Off,
        (false, n) => Rederive::Sample(n),
    };
    let opts = VerifyOptions { source: a.source.clone(), rederive, imatrix: a.imatrix.clone(), data: a.data.clone() };
    let report = match verify_with(&manifest, &opts, Some(&rederive_by_target)) {
        Ok(r) => r,
        Err(e) => return cannot_check(a.json, &a.artifact, &e.to_string()),
    };
    print_report(&report, a.json, quiet);
    exit_code(&report)
}

/// Re-derivation is the target's: GGUF's (`sling_target_gguf::rederive`), or for a directory artifact vLLM's or
/// MLX's (`hfout::rederive`), here where the targets are known.
fn rederive_by_target(
    inp: &RederiveInputs<'_>,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
) -> RederiveReport {
    if inp.manifest.options.to == "gguf" {
        sling_target_gguf::rederive::run(inp, problems, notes)
    } else {
        let (r, p) = crate::hfout::rederive(inp.manifest, inp.source, inp.mode, inp.data);
        problems.extend(p);
        r
    }
}

/// 1 for any problem, else 2 when a check asked for could not be made, else 0.
fn exit_code(r: &VerifyReport) -> u8 {
    if !r.problems.is_empty() {
        EXIT_MISMATCH
    } else if r.incomplete().is_some() {
        EXIT_CANNOT_CHECK
    } else {
        EXIT_VERIFIED
    }
}

/// `re-derived 8 tensors from the source (sample; every tensor's type and shape and the metadata
/// checked against the plan): a, b, …`.
fn rederived_line(r: &VerifyReport) -> Option<String> {
    let d = r.rederive.as_ref()?;
    if d.tensors.is_empty() && d.plan.is_none() {
        return None;
    }
    let what = d.plan.as_deref().unwrap_or("?");
    let mode = match d.sample {
        Some(n) => format!("a sample of {n}"),
        None => "all".to_string(),
    };
    let meta = if d.metadata_checked { " and the metadata" } else { "" };
    Some(format!(
        "re-derived {} tensor{} from the source ({mode}; plan `{what}`; every tensor's type and shape{meta} checked against it): {}",
        d.tensors.len(),
        if d.tensors.len() == 1 { "" } else { "s" },
        d.tensors.join(", ")
    ))
}

fn print_report(r: &VerifyReport, json: bool, quiet: bool) {
    if json {
        let status = match exit_code(r) {
            EXIT_VERIFIED => "verified",
            EXIT_MISMATCH => "mismatch",
            _ => "error",
        };
        let mut v = serde_json::json!({
            "status": status,
            "manifest": r.manifest,
            "files_checked": r.files_checked,
            "tensors_checked": r.tensors_checked,
            "sources_checked": r.sources_checked,
            "rederived": r.rederive,
            "problems": r.problems,
            "notes": r.notes,
        });
        if let Some(e) = r.incomplete() {
            v["error"] = format!("the tensors could not be re-derived from the source: {e}").into();
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    let src = if r.sources_checked > 0 { format!(", {} source files", r.sources_checked) } else { String::new() };
    if r.verified() {
        if !quiet {
            println!(
                "verified: {} ({} files, {} tensors{src})",
                r.manifest.display(),
                r.files_checked,
                r.tensors_checked
            );
            if let Some(line) = rederived_line(r) {
                println!("{line}");
            }
        }
        return;
    }
    if let Some(e) = r.incomplete() {
        println!(
            "not verified: {} ({} files, {} tensors{src} match it, but the tensors could not be re-derived from the source)",
            r.manifest.display(),
            r.files_checked,
            r.tensors_checked
        );
        eprintln!("error: cannot verify: the tensors could not be re-derived from the source: {e}");
        return;
    }
    for p in &r.problems {
        println!("{p}");
    }
    if let Some(d) = &r.rederive {
        if let Some(line) = rederived_line(r) {
            eprintln!("{line}");
        }
        if let Some(e) = &d.error {
            eprintln!("note: re-derivation incomplete: {e}");
        }
    }
    eprintln!(
        "error: verification failed: {} problem{} against {}",
        r.problems.len(),
        if r.problems.len() == 1 { "" } else { "s" },
        r.manifest.display()
    );
}

fn print_signature_report(r: &SigVerifyReport, artifact: &Path, json: bool, quiet: bool) {
    if json {
        let v = serde_json::json!({
            "status": if r.verified() { "verified" } else { "mismatch" },
            "artifact": artifact,
            "signature": r.signature,
            "model_name": r.model_name,
            "root_digest": r.root_digest,
            "files_checked": r.files_checked,
            "problems": r.problems,
            "warnings": r.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    if r.verified() {
        if !quiet {
            println!(
                "verified: {} against signature {} ({} files, root sha256 {})",
                artifact.display(),
                r.signature.display(),
                r.files_checked,
                r.root_digest.as_deref().unwrap_or("?")
            );
        }
        return;
    }
    for p in &r.problems {
        println!("{p}");
    }
    eprintln!(
        "error: verification failed: {} problem{} against signature {}",
        r.problems.len(),
        if r.problems.len() == 1 { "" } else { "s" },
        r.signature.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_suffix() {
        assert_eq!(strip_shard_suffix("m-00001-of-00003"), Some("m"));
        assert_eq!(strip_shard_suffix("a-b-00010-of-00012"), Some("a-b"));
        assert_eq!(strip_shard_suffix("-00001-of-00003"), None);
        assert_eq!(strip_shard_suffix("m-0001-of-00003"), None);
        assert_eq!(strip_shard_suffix("m"), None);
    }
}
