//! Re-derivation of a GGUF artifact (`sling verify --source SRC`, with `--sample N` or `--full`; the
//! [`sling_provenance::manifest::Rederiver`] the CLI gives `verify_with` for `gguf` manifests): the plan is rebuilt from
//! the source and the options the manifest records (`options.type`, `options.tokenizer_pre`,
//! `options.allow_nonfinite`, and for `sling quantize` everything in `options.quantize`), then
//!
//! 1. every tensor the manifest lists must be one the plan writes, with the same type, shape, size and
//!    source tensors, and the plan must write no tensor the manifest does not list;
//! 2. the first output file's metadata must be the plan's, key by key and in order (except
//!    `general.name`, which is the source directory's name, and the `split.*` keys);
//! 3. the chosen tensors (a sample spread over the file, or all of them) are recomputed exactly as the
//!    conversion computes them ([`crate::convert::run::tensor_sha256`]) and their sha256 must be the
//!    manifest's and that of the bytes in the file.
//!
//! This catches what the seal cannot: a manifest rewritten and resealed to match altered outputs. It
//! is only as strong as the sample: a forger who knows which tensors a sample takes can alter others,
//! so `--full` is the proof, the sample a cheap spot check.
//!
//! When the plan cannot be rebuilt (the artifact was quantized with an imatrix that was not given,
//! options a manifest from an older sling does not record, an unreadable source) the re-derivation is
//! "not checked": `verify` then reports neither verified nor a mismatch (exit 2), unless it found
//! problems anyway.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use sling_core::{DType, Role};
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::{GgufFile, GgufValue};
use sling_provenance::manifest::{
    hash_file, is_inner_path, problem, Manifest, Problem, ProblemKind, Rederive, RederiveInputs as Inputs,
    RederiveReport, RederiveStatus,
};

use crate::convert::hparams::Kvs;
use crate::convert::run::{build_kvs, tensor_sha256};
use crate::convert::{plan, OutTensor, OutType};
use crate::quantize::rules::TensorTypeRule;
use crate::quantize::{
    parse_override_kv, plan_quantize, plan_quantize_gguf, Ftype, Imatrix, QuantizeOptions, RuleOptions,
};
use sling_pipeline::ops::Op;

/// The `options.type` values `sling convert` writes.
const CONVERT_TYPES: [&str; 4] = ["f32", "f16", "bf16", "q8_0"];

/// Which of `names` (a manifest's tensors, in file order) a sample of `n` re-derives, as indices in
/// increasing order: the middle of each of `n` equal runs of the list, so the sample is spread over the
/// whole file (all of them when `n` is at least their number); when none of those is a routed-expert
/// tensor (`*_exps`) and the list has some, the middle routed-expert tensor replaces the nearest pick.
pub fn sample(names: &[&str], n: usize) -> Vec<usize> {
    sling_provenance::manifest::spread_sample(names.len(), n, |i| Role::of(names[i]) == Role::RoutedExperts)
}

/// A plan rebuilt from the source and the recorded options.
struct Rebuilt {
    ck: Checkpoint,
    tensors: Vec<OutTensor>,
    kvs: Kvs,
    what: String,
}

/// Opens the source as the conversion did: the one weight file when the manifest lists a single
/// `.safetensors` and no index (a conversion of a file), the directory otherwise.
fn open_source(m: &Manifest, source: &Path) -> Result<Checkpoint, String> {
    let weights: Vec<&str> =
        m.sources.iter().map(|s| s.path.as_str()).filter(|p| p.ends_with(".safetensors")).collect();
    let has_index = m.sources.iter().any(|s| s.path == "model.safetensors.index.json");
    let path = match weights.as_slice() {
        [one] if !has_index && is_inner_path(one) => source.join(one),
        _ => source.to_path_buf(),
    };
    Checkpoint::open(&path).map_err(|e| format!("cannot read the source {}: {e}", path.display()))
}

/// Rebuilds the plan. `Err` says why it cannot be (the re-derivation is then not checked); a
/// problem found on the way (an imatrix of another sha256) is pushed to `problems`.
fn rebuild(
    inp: &Inputs<'_>,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
    imatrix_used: &mut Option<String>,
) -> Result<Rebuilt, String> {
    let m = inp.manifest;
    let Some(q) = &m.options.quantize else {
        if !CONVERT_TYPES.contains(&m.options.out_type.as_str()) {
            return Err(format!(
                "the manifest does not record the options `{}` was quantized with (written by an older sling), so the plan cannot be rebuilt",
                m.options.out_type
            ));
        }
        if let Some(p) = inp.imatrix {
            notes.push(format!("--imatrix {}: ignored, the artifact was converted without one", p.display()));
        }
        let out =
            OutType::parse(&m.options.out_type).ok_or_else(|| format!("unknown type {:?}", m.options.out_type))?;
        let ck = open_source(m, inp.source)?;
        let p = plan(&ck, out).map_err(|e| format!("cannot rebuild the plan: {e}"))?;
        let mxfp4 = p.tensors.iter().any(|t| matches!(t.op, Op::Mxfp4(_)));
        let kvs = build_kvs(&ck, out, m.options.tokenizer_pre.clone(), mxfp4, &p.tensors)
            .map_err(|e| format!("cannot rebuild the metadata: {e}"))?;
        return Ok(Rebuilt { ck, tensors: p.tensors, kvs, what: format!("convert {}", m.options.out_type) });
    };

    let bad = |e: String| format!("options.quantize: {e}");
    let ftype = Ftype::parse(&q.ftype)
        .filter(|f| f.id == q.file_type)
        .ok_or_else(|| bad(format!("unknown preset {:?} (file type {})", q.ftype, q.file_type)))?;
    let tensor_types = q
        .rules
        .iter()
        .map(TensorTypeRule::from_record)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let dtype = |s: &Option<String>| -> Result<Option<DType>, String> {
        s.as_deref()
            .map(|t| {
                DType::from_name(t)
                    .filter(|d| d.info().ggml_id.is_some())
                    .ok_or_else(|| bad(format!("unknown type {t:?}")))
            })
            .transpose()
    };
    let overrides = q
        .override_kv
        .iter()
        .map(|s| parse_override_kv(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let imatrix = match (&q.imatrix, inp.imatrix) {
        (Some(rec), None) => {
            return Err(format!(
                "the artifact was quantized with the imatrix {} (sha256 {}): give it with --imatrix FILE to re-derive the tensors",
                rec.path, rec.sha256
            ))
        }
        (Some(rec), Some(p)) => {
            let shown = p.display().to_string();
            let (size, sha) = hash_file(p).map_err(|e| format!("--imatrix: {e}"))?;
            if size != rec.size || sha != rec.sha256 {
                problems.push(problem(
                    ProblemKind::ImatrixHash,
                    &shown,
                    None,
                    format!(
                        "imatrix {shown}: not the one the artifact was quantized with: sha256 {sha}, {size} bytes; the manifest says {} (sha256 {}, {} bytes)",
                        rec.path, rec.sha256, rec.size
                    ),
                ));
                return Err(format!("the imatrix {shown} is not the one the artifact was quantized with"));
            }
            let mut im = Imatrix::load(p).map_err(|e| e.to_string())?;
            im.filter(&rec.include_weights, &rec.exclude_weights);
            // As recorded: `quantize.imatrix.file` holds the path given to `quantize`.
            im.file = rec.path.clone();
            *imatrix_used = Some(shown);
            Some(im)
        }
        (None, Some(p)) => {
            notes.push(format!("--imatrix {}: ignored, the artifact was quantized without an imatrix", p.display()));
            None
        }
        (None, None) => None,
    };
    let opts = QuantizeOptions {
        rules: RuleOptions {
            ftype,
            pure: q.pure,
            leave_output: q.leave_output_tensor,
            output_tensor_type: dtype(&q.output_tensor_type)?,
            token_embedding_type: dtype(&q.token_embedding_type)?,
            tensor_types,
            has_imatrix: false,
        },
        imatrix,
        allow_requantize: q.allow_requantize,
        tokenizer_pre: m.options.tokenizer_pre.clone(),
        label: m.options.out_type.clone(),
        overrides,
        dry_run: false,
    };
    let (ck, qp) = match &q.source_gguf {
        Some(name) => {
            if !is_inner_path(name) {
                return Err(bad(format!("source_gguf {name:?} leaves the source directory")));
            }
            plan_quantize_gguf(&inp.source.join(name), &opts).map_err(|e| format!("cannot rebuild the plan: {e}"))?
        }
        None => {
            let ck = open_source(m, inp.source)?;
            let qp = plan_quantize(&ck, &opts).map_err(|e| format!("cannot rebuild the plan: {e}"))?;
            (ck, qp)
        }
    };
    Ok(Rebuilt {
        ck,
        tensors: qp.prepared.tensors,
        kvs: qp.prepared.kvs,
        what: format!("quantize {}", m.options.out_type),
    })
}

/// A metadata value, shortened for a message.
fn short(v: &GgufValue) -> String {
    let s = format!("{v:?}");
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// Compares the first output's metadata with the plan's; returns whether the file could be read.
fn check_metadata(inp: &Inputs<'_>, kvs: &Kvs, problems: &mut Vec<Problem>) -> bool {
    let Some(first) = inp.manifest.outputs.first() else { return false };
    let name = first.name.as_str();
    let Ok(g) = GgufFile::open(&inp.dir.join(name)) else { return false };
    // The naming keys come from the source directory's name (convert/naming.rs), which `verify --source` may give
    // under another name; the file's own bytes are checked against the manifest's sha256 anyway.
    let skip = |k: &str| {
        matches!(
            k,
            "general.name"
                | "general.basename"
                | "general.finetune"
                | "general.version"
                | "general.organization"
                | "general.size_label"
        ) || k.starts_with("split.")
    };
    let want: Vec<&(String, GgufValue)> = kvs.0.iter().filter(|(k, _)| !skip(k)).collect();
    let got: Vec<&(String, GgufValue)> = g.kvs.iter().filter(|(k, _)| !skip(k)).collect();
    let got_map: HashMap<&str, &GgufValue> = got.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let want_keys: HashSet<&str> = want.iter().map(|(k, _)| k.as_str()).collect();
    let before = problems.len();
    let mut push =
        |msg: String| problems.push(problem(ProblemKind::RederivedMetadata, name, None, format!("{name}: {msg}")));
    for (k, v) in &want {
        match got_map.get(k.as_str()) {
            None => push(format!("metadata key {k} is missing; the source and the recorded options give {}", short(v))),
            Some(x) if *x != v => {
                push(format!("metadata key {k} is {}; the source and the recorded options give {}", short(x), short(v)))
            }
            _ => {}
        }
    }
    for (k, _) in &got {
        if !want_keys.contains(k.as_str()) {
            push(format!("metadata key {k} is not one the source and the recorded options give"));
        }
    }
    if problems.len() == before && want.iter().map(|(k, _)| k).ne(got.iter().map(|(k, _)| k)) {
        problems.push(problem(
            ProblemKind::RederivedMetadata,
            name,
            None,
            format!("{name}: metadata keys are in another order than the source and the recorded options give"),
        ));
    }
    true
}

/// Re-derives as `inp` says; pushes what differs to `problems`. `inp.file_hashes`: the sha256 of each
/// tensor's bytes in the output files, as `verify` found them.
pub fn run(inp: &Inputs<'_>, problems: &mut Vec<Problem>, notes: &mut Vec<String>) -> RederiveReport {
    let (sources_differ, file_hashes) = (inp.sources_differ, inp.file_hashes);
    let (mode, sample_n) = match inp.mode {
        Rederive::Sample(n) => ("sample", Some(n)),
        _ => ("full", None),
    };
    let mut report = RederiveReport {
        status: RederiveStatus::NotChecked,
        mode,
        sample: sample_n,
        plan: None,
        tensors: Vec::new(),
        metadata_checked: false,
        imatrix: None,
        error: None,
    };
    if sources_differ {
        report.error = Some("not re-derived: the source files differ from the ones the manifest records".into());
        return report;
    }
    let before = problems.len();
    let mut imatrix_used = None;
    let rebuilt = rebuild(inp, problems, notes, &mut imatrix_used);
    report.imatrix = imatrix_used;
    let r = match rebuilt {
        Ok(r) => r,
        Err(e) => {
            if problems.len() > before {
                report.status = RederiveStatus::Mismatch;
            }
            report.error = Some(e);
            return report;
        }
    };
    report.plan = Some(r.what.clone());
    let m = inp.manifest;

    // 1. The plan: names, types, shapes, sizes, source tensors.
    let planned: HashMap<&str, &OutTensor> = r.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut eligible = Vec::new();
    for (i, rec) in m.tensors.iter().enumerate() {
        let (f, tn) = (rec.file.as_str(), rec.name.as_str());
        match planned.get(tn) {
            None => problems.push(problem(
                ProblemKind::RederivedTensor,
                f,
                Some(tn),
                format!("{f}: tensor {tn}: the source and the recorded options give no such tensor"),
            )),
            Some(t) if t.dtype.name() != rec.dtype || t.ne != rec.ne || t.n_bytes() != rec.n_bytes => {
                problems.push(problem(
                    ProblemKind::RederivedTensor,
                    f,
                    Some(tn),
                    format!(
                        "{f}: tensor {tn}: the source and the recorded options give {} {:?} ({} bytes); the manifest says {} {:?} ({} bytes)",
                        t.dtype.name(),
                        t.ne,
                        t.n_bytes(),
                        rec.dtype,
                        rec.ne,
                        rec.n_bytes
                    ),
                ))
            }
            Some(t) if t.sources != rec.sources => problems.push(problem(
                ProblemKind::RederivedTensor,
                f,
                Some(tn),
                format!(
                    "{f}: tensor {tn}: the source and the recorded options compute it from {:?}; the manifest says {:?}",
                    t.sources, rec.sources
                ),
            )),
            Some(_) => eligible.push(i),
        }
    }
    let listed: HashSet<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
    let first = m.outputs.first().map(|o| o.name.as_str()).unwrap_or(m.output.as_str());
    for t in &r.tensors {
        if !listed.contains(t.name.as_str()) {
            let tn = t.name.as_str();
            problems.push(problem(
                ProblemKind::RederivedTensor,
                first,
                Some(tn),
                format!(
                    "{first}: the source and the recorded options give tensor {tn}, which the manifest does not list"
                ),
            ));
        }
    }

    // 2. The metadata.
    report.metadata_checked = check_metadata(inp, &r.kvs, problems);

    // 3. The bytes of the chosen tensors.
    let chosen: Vec<usize> = match inp.mode {
        Rederive::Sample(n) => {
            let names: Vec<&str> = eligible.iter().map(|&i| m.tensors[i].name.as_str()).collect();
            sample(&names, n).into_iter().map(|k| eligible[k]).collect()
        }
        _ => eligible,
    };
    for i in chosen {
        let rec = &m.tensors[i];
        let (f, tn) = (rec.file.as_str(), rec.name.as_str());
        let Some(t) = planned.get(tn) else { continue };
        match tensor_sha256(&r.ck, t, m.options.allow_nonfinite) {
            Ok((sha, n)) => {
                report.tensors.push(rec.name.clone());
                let in_file = file_hashes.get(tn);
                if sha != rec.sha256 || n != rec.n_bytes || in_file.is_some_and(|x| *x != sha) {
                    let file_part = match in_file {
                        Some(x) if *x != rec.sha256 => format!(", the file's bytes {x}"),
                        _ => String::new(),
                    };
                    problems.push(problem(
                        ProblemKind::RederivedData,
                        f,
                        Some(tn),
                        format!(
                            "{f}: tensor {tn}: re-derived from the source: sha256 {sha} ({n} bytes); the manifest says {} ({} bytes){file_part}",
                            rec.sha256, rec.n_bytes
                        ),
                    ));
                }
            }
            Err(e) => {
                report.error = Some(format!("cannot re-derive tensor {tn}: {e}"));
                break;
            }
        }
    }
    report.status = if problems.len() > before {
        RederiveStatus::Mismatch
    } else if report.error.is_some() {
        RederiveStatus::NotChecked
    } else {
        RederiveStatus::Verified
    };
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_spread_and_include_a_routed_expert() {
        let names: Vec<String> = (0..20).map(|i| format!("blk.{i}.attn_q.weight")).collect();
        let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(sample(&names, 4), vec![2, 7, 12, 17]);
        assert_eq!(sample(&names, 1), vec![10]);
        assert_eq!(sample(&names, 0), Vec::<usize>::new());
        assert_eq!(sample(&names, 25), (0..20).collect::<Vec<_>>());
        names[9] = "blk.4.ffn_up_exps.weight";
        assert_eq!(sample(&names, 4), vec![2, 9, 12, 17]);
        names[8] = "blk.4.ffn_gate_exps.weight";
        names[11] = "blk.5.ffn_down_exps.weight";
        assert_eq!(sample(&names, 4), vec![2, 9, 12, 17], "the middle routed tensor (9) replaces the nearest pick (7)");
        // An already routed pick is kept as it is.
        names[12] = "blk.5.ffn_up_exps.weight";
        assert_eq!(sample(&names, 4), vec![2, 7, 12, 17]);
    }
}
