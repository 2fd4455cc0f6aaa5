//! `--method gptq|awq` for `--to vllm:…|mlx:…`: the calibrated quantization that runs before the pipeline
//! writes the artifact. The calibration pass (`sling_calibration::gptq`) solves every quantized weight layer by
//! layer into a store beside the output (`OUT.solve/`); the target then packs the stored codes instead of
//! rounding to nearest. The store survives an interrupted run for `--resume` (with a fingerprint of everything
//! that decides its contents) and is removed once the artifact is complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Why the calibration flags are refused for GGUF.
pub const GGUF_REFUSAL: &str = "--method, --data and the GPTQ/AWQ flags apply to vllm:… and mlx:… targets; GGUF \
     calibrates through an importance matrix: `sling calibrate SRC --data FILE -o imatrix.gguf`, then `--imatrix`";

/// How the integer schemes choose their codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    // (Plain comments: doc comments on the variants would switch `--help` to clap's long layout.)
    // Round to nearest (no calibration data).
    Rtn,
    // GPTQ: Hessian-based error compensation per linear layer and routed expert.
    Gptq,
    // AWQ: activation-aware per-channel scales, folded into the preceding norm or linear.
    Awq,
    // AWQ's scales, then GPTQ on the smoothed model (llm-compressor's [AWQModifier, GPTQModifier] recipe).
    AwqGptq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::AwqGptq => "awq-gptq",
        }
    }

    /// Whether AWQ's scale search runs (its flags apply).
    pub fn awq(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
    }
}

/// Calibrated quantization for vllm/mlx integer schemes (w4a16, w4a16-asym, w8a16, mlx:BITS).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SolveArgs {
    /// vllm/mlx integer schemes: how codes are chosen: rtn, gptq, awq, awq-gptq (AWQ's scales, then GPTQ).
    /// Default: gptq with --data (or --tokens), rtn without.
    #[arg(long, value_enum)]
    pub(crate) method: Option<Method>,
    /// Calibration text for --method gptq|awq|awq-gptq: a plain text file, or JSONL (.jsonl) with a "text" field
    /// per line.
    #[arg(long, value_name = "FILE")]
    pub(crate) data: Option<PathBuf>,
    /// Calibration token ids instead of text: comma/whitespace-separated integers in a file.
    #[arg(long, value_name = "FILE", conflicts_with = "data")]
    pub(crate) tokens: Option<PathBuf>,
    /// Tokens per calibration sequence (llm-compressor's max_seq_length).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub(crate) ctx: usize,
    /// At most this many calibration sequences (llm-compressor's num_calibration_samples; default: all).
    #[arg(long, value_name = "N")]
    pub(crate) chunks: Option<usize>,
    /// GPTQ dampening: this fraction of the Hessian's mean diagonal is added to its diagonal.
    #[arg(long, value_name = "X", default_value_t = 0.01)]
    pub(crate) damp: f64,
    /// GPTQ block width in columns (error compensation is applied lazily per block).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub(crate) gptq_block_size: usize,
    /// GPTQ: quantize columns in order of decreasing activation energy (llm-compressor actorder="weight":
    /// groups stay consecutive columns, so no g_idx is stored and every runtime loads it).
    #[arg(long)]
    pub(crate) act_order: bool,
    /// Statistics of every routed expert from every calibration token (llm-compressor's calibrate_all_experts);
    /// the forward pass keeps the true routing.
    #[arg(long)]
    pub(crate) all_experts: bool,
    /// A routed expert that received fewer calibration tokens falls back to round-to-nearest (reported in the
    /// run summary, the manifest and the model card).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub(crate) min_expert_tokens: u64,
    /// Calibrate each layer on the source model's activations instead of those of the already-quantized layers
    /// before it (default: sequential, as llm-compressor).
    #[arg(long)]
    pub(crate) no_sequential: bool,
    /// Memory budget for one layer's calibration statistics (e.g. 64G): routed experts are calibrated in groups
    /// that fit, running the layer again per group.
    #[arg(long, value_name = "SIZE")]
    pub(crate) max_ram: Option<String>,
    /// AWQ: grid points tried per mapping (llm-compressor's n_grid).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub(crate) awq_grid: usize,
    /// AWQ: scales from the activations alone, not also divided by the weight magnitude (llm-compressor's
    /// duo_scaling=False).
    #[arg(long)]
    pub(crate) no_duo_scaling: bool,
}

impl SolveArgs {
    /// The method asked for, resolved against the data given.
    pub fn method(&self) -> Result<Method> {
        let has_data = self.data.is_some() || self.tokens.is_some();
        match (self.method, has_data) {
            (None, true) => Ok(Method::Gptq),
            (None, false) | (Some(Method::Rtn), false) => Ok(Method::Rtn),
            (Some(Method::Rtn), true) => bail!("--data/--tokens are calibration data: --method rtn uses none"),
            (Some(m), false) => bail!("--method {} needs calibration data: --data FILE (or --tokens FILE)", m.name()),
            (Some(m), true) => Ok(m),
        }
    }

    /// Whether any calibration flag was given (refused for GGUF targets, which calibrate through --imatrix).
    pub fn any(&self) -> bool {
        self.method.is_some()
            || self.data.is_some()
            || self.tokens.is_some()
            || self.act_order
            || self.all_experts
            || self.no_sequential
            || self.max_ram.is_some()
            || self.chunks.is_some()
            || self.awq_grid != 20
            || self.no_duo_scaling
    }
}

/// `OUT` → `OUT.solve` beside it: where the solved weights wait for the executor.
pub fn store_dir(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".solve");
    output.with_file_name(name)
}

/// sha256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sling_formats::gguf::write::hex(&h.finalize()))
}

/// The calibration sequences: the text (or token ids) tokenized with the checkpoint's tokenizer and cut into `ctx`-token
/// chunks as `sling calibrate` cuts them, at most `chunks` of them; at least one.
fn sequences(
    ck: &sling_formats::checkpoint::Checkpoint,
    text: Option<&Path>,
    ids: Option<&Path>,
    ctx: usize,
    chunks: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    if ctx == 0 {
        bail!("--ctx must be > 0");
    }
    let t = crate::textdata::load(&ck.dir, text, ids)?;
    let seqs = sling_calibration::imatrix::chunks(&t.ids, ctx, chunks, t.bos);
    if seqs.is_empty() {
        bail!(
            "{}: {} tokens, fewer than one --ctx {ctx} sequence; give more data or a smaller --ctx",
            text.or(ids).map_or(String::new(), |p| p.display().to_string()),
            t.ids.len()
        );
    }
    Ok(seqs)
}

/// A calibrated solution ready for the executor.
pub struct Solved {
    pub store: std::sync::Arc<sling_pipeline::solved::Store>,
    /// AWQ's folds, for the target's plan ([`fold_plan`]); `None` for GPTQ.
    pub folds: Option<sling_calibration::awq::Folds>,
    pub dir: PathBuf,
    pub record: sling_provenance::manifest::CalibrationRecord,
    pub report: sling_calibration::gptq::Report,
}

const FINGERPRINT: &str = "fingerprint.json";

/// Runs the calibration pass of `a` (GPTQ) for the weights `grids` names, into `OUT.solve/` (reused with
/// `--resume` when its fingerprint matches). `label` is the target (`vllm:w4a16`), `what` the source.
#[allow(clippy::too_many_arguments)]
pub fn run(
    s: &SolveArgs,
    method: Method,
    ck: &sling_formats::checkpoint::Checkpoint,
    grids: &std::collections::HashMap<String, std::sync::Arc<dyn sling_quantizers::gptq::Grid>>,
    label: &str,
    output: &Path,
    resume: bool,
    rep: &crate::convert::Reporter,
    backend: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
    unsolvable: &[Unsolvable<'_>],
) -> Result<Solved> {
    use sling_calibration::gptq::{self, Progress, Settings};
    use sling_provenance::manifest::{CalibrationData, CalibrationFallback, CalibrationRecord, MethodRecord};
    if method == Method::Awq && s.act_order {
        bail!("--act-order applies to --method gptq or awq-gptq (AWQ rounds every weight to nearest after its scales)");
    }
    if method == Method::Gptq && (s.awq_grid != 20 || s.no_duo_scaling) {
        bail!("--awq-grid and --no-duo-scaling apply to --method awq or awq-gptq");
    }
    let method_record = match method {
        Method::Awq => MethodRecord::Awq { n_grid: s.awq_grid as u64, duo_scaling: !s.no_duo_scaling },
        Method::AwqGptq => MethodRecord::AwqGptq {
            n_grid: s.awq_grid as u64,
            duo_scaling: !s.no_duo_scaling,
            damp: s.damp,
            block: s.gptq_block_size as u64,
            act_order: s.act_order,
        },
        _ => MethodRecord::Gptq { damp: s.damp, block: s.gptq_block_size as u64, act_order: s.act_order },
    };
    if grids.is_empty() {
        bail!(
            "--method {} applies to integer schemes (vllm:w4a16, vllm:w4a16-asym, vllm:w8a16, mlx:BITS); {label} \
             quantizes no weight on an integer grid",
            method.name()
        );
    }
    awq_options(s.awq_grid, !s.no_duo_scaling)?; // checked before anything runs
    if !(s.damp.is_finite() && s.damp >= 0.0) || s.gptq_block_size == 0 {
        bail!("--damp must be a finite number >= 0 and --gptq-block-size > 0");
    }
    let max_ram = s.max_ram.as_deref().map(crate::convert::parse_size).transpose()?;
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", ck.dir.display()))?;
    let data_path = s.data.as_deref().or(s.tokens.as_deref()).context("no calibration data")?;
    let seqs = sequences(ck, s.data.as_deref(), s.tokens.as_deref(), s.ctx, s.chunks)?;
    let data_sha = file_sha256(data_path)?;
    let settings = Settings {
        gptq: gptq_options(&method_record),
        min_expert_tokens: s.min_expert_tokens,
        all_experts: s.all_experts,
        sequential: !s.no_sequential,
        max_ram,
        backend,
        ..Default::default()
    };
    // Everything that decides the store's contents: a resumed run reuses it only when all of it is the same.
    let fp = serde_json::json!({
        "schema": "sling.solve/1",
        "version": env!("CARGO_PKG_VERSION"),
        "target": label,
        "method": method.name(),
        "sources": sling_provenance::manifest::source_stamps(ck),
        "data_sha256": data_sha,
        "ctx": s.ctx, "chunks": seqs.len(),
        "damp": s.damp, "block": s.gptq_block_size, "act_order": s.act_order, "all_experts": s.all_experts,
        "min_expert_tokens": s.min_expert_tokens, "sequential": !s.no_sequential,
        "awq": method.awq().then(|| serde_json::json!({"n_grid": s.awq_grid, "duo": !s.no_duo_scaling})),
        "grids": grids.keys().collect::<std::collections::BTreeSet<_>>(),
    })
    .to_string();
    let dir = store_dir(output);
    let reuse = resume && std::fs::read_to_string(dir.join(FINGERPRINT)).is_ok_and(|f| f == fp);
    if !reuse && dir.exists() {
        if resume {
            rep.say(&format!("{}: made with other options or data; calibrating from the start", dir.display()));
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let store = sling_pipeline::solved::Store::open(&dir)?;
    std::fs::write(dir.join(FINGERPRINT), &fp).with_context(|| format!("cannot write {}", dir.display()))?;

    let n_tok: usize = seqs.iter().map(Vec::len).sum();
    rep.say(&format!(
        "{}: {} on {} sequences x {} tokens ({n_tok} tokens) from {}{}",
        label,
        method.name(),
        seqs.len(),
        s.ctx,
        data_path.display(),
        if reuse { ", resuming" } else { "" }
    ));
    let base = sling_calibration::CheckpointSource::new(ck);
    let src = forward_source(ck, &base, unsolvable);
    let lookup = |hf: &str| grids.get(hf).cloned();
    let abort_after: Option<usize> = std::env::var("SLING_TEST_ABORT_AFTER_SOLVED").ok().and_then(|v| v.parse().ok());
    // `solved` counts one pass's weights (awq-gptq runs two); `reported` all of them, for the test hook.
    let (mut solved, mut total, mut reported, mut pass) = (0usize, 0usize, 0usize, 0usize);
    let t0 = std::time::Instant::now();
    let mut on_progress = |p: Progress<'_>| match p {
        Progress::Start { layers, weights } => {
            // (awq-gptq: once per pass)
            solved = 0;
            pass += 1;
            total = weights;
            rep.set_length(weights as u64);
            rep.emit("calibrate_start", serde_json::json!({"layers": layers, "weights": weights, "tokens": n_tok}));
        }
        Progress::LayerStart { layer, .. } => {
            let what = match (method, pass) {
                (Method::AwqGptq, 1) => "awq (then gptq)",
                (Method::AwqGptq, _) => "gptq (after awq)",
                (m, _) => m.name(),
            };
            rep.set_message(&format!("{what} layer {layer}"));
        }
        Progress::Solved { weight } => {
            solved += 1;
            reported += 1;
            rep.set_position(solved as u64, &weight.name);
            rep.emit("solved", serde_json::json!({"index": solved, "of": total, "weight": weight}));
            if abort_after == Some(reported) {
                // Test hook, as the executor's SLING_TEST_ABORT_AFTER_WEIGHTS: stop at once (exit status 134, no
                // destructor runs), what `kill -9` leaves.
                std::process::exit(134);
            }
        }
        Progress::LayerDone { layer } => rep.emit("layer_done", serde_json::json!({"layer": layer})),
    };
    let (report, folds) = calibrate(&method_record, &src, &cfg, &seqs, &lookup, &store, &settings, &mut on_progress)
        .with_context(|| format!("{}: calibration pass failed", ck.dir.display()))?;
    let n_gptq = report.count(|m| !matches!(m, gptq::Method::Rtn { .. }));
    let mut fallbacks: Vec<CalibrationFallback> = report
        .fallbacks()
        .map(|(w, tokens, why)| CalibrationFallback { weight: w.to_string(), tokens, why: why.to_string() })
        .collect();
    // Every calibration token reaches them; no solver takes their layout.
    fallbacks.extend(unsolvable.iter().map(|(w, why)| CalibrationFallback {
        weight: w.name.clone(),
        tokens: report.tokens,
        why: why.to_string(),
    }));
    let unsolved: Vec<&String> = {
        let mut seen: std::collections::HashSet<&str> = report.weights.iter().map(|w| w.name.as_str()).collect();
        seen.extend(unsolvable.iter().map(|(w, _)| w.name.as_str()));
        let mut v: Vec<&String> = grids.keys().filter(|k| !seen.contains(k.as_str())).collect();
        v.sort();
        v
    };
    rep.say(&format!(
        "calibrated {} weights in {:.1}s: {n_gptq} by {}, {} by round-to-nearest{}",
        report.weights.len(),
        t0.elapsed().as_secs_f64(),
        method.name(),
        fallbacks.len(),
        if unsolved.is_empty() {
            String::new()
        } else {
            format!(", {} outside the decoder layers by round-to-nearest", unsolved.len())
        }
    ));
    print_coverage(&report, s.min_expert_tokens, s.all_experts, rep);
    for f in fallbacks.iter().take(20) {
        rep.say(&format!("  round-to-nearest: {} ({} tokens): {}", f.weight, f.tokens, f.why));
    }
    if fallbacks.len() > 20 {
        rep.say(&format!("  … and {} more (all listed in the manifest)", fallbacks.len() - 20));
    }
    let record = CalibrationRecord {
        method: method_record,
        sequential: !s.no_sequential,
        all_experts: s.all_experts,
        min_expert_tokens: s.min_expert_tokens,
        data: CalibrationData {
            name: data_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            token_ids: s.tokens.is_some(),
            sha256: data_sha,
            ctx: s.ctx as u64,
            chunks: seqs.len() as u64,
            tokens: n_tok as u64,
        },
        fallbacks,
        expert_tokens: report.expert_tokens(),
    };
    Ok(Solved { store: std::sync::Arc::new(store), folds, dir, record, report })
}

/// A weight the target rounds to nearest on a grid that no solver takes (the MLX target's rearranged layouts,
/// [`sling_targets::mlx::unsolvable`]), and why.
pub type Unsolvable<'p> = (&'p sling_pipeline::Weight<sling_targets::mlx::Enc>, &'static str);

/// The calibration pass's source: the checkpoint, with the source tensors of the [`Unsolvable`] weights replaced by
/// the values the artifact holds for them (DeepSeek's `kv_b_proj` from the rounded `embed_q`/`unembed_out`), so
/// that the sequential pass propagates what the quantized model computes. The other tensors are the checkpoint's.
fn forward_source<'a>(
    ck: &'a sling_formats::checkpoint::Checkpoint,
    base: &'a sling_calibration::CheckpointSource<'a>,
    unsolvable: &'a [Unsolvable<'a>],
) -> sling_calibration::sensitivity::Substituted<'a> {
    let outputs = unsolvable
        .iter()
        .map(|&(w, _)| {
            let rows: sling_calibration::sensitivity::Rows<'a> = Box::new(move |r0, r1| {
                sling_targets::mlx::rows_as_stored(ck, w, r0, r1)
                    .map_err(|e| sling_calibration::Error::Read { tensor: w.name.clone(), why: e.to_string() })
            });
            (&w.op, w.cols(), rows)
        })
        .collect();
    sling_calibration::sensitivity::Substituted::of_ops(base, outputs)
}

/// GPTQ's settings in a method record (the defaults where it runs no GPTQ).
fn gptq_options(m: &sling_provenance::manifest::MethodRecord) -> sling_quantizers::gptq::Options {
    use sling_provenance::manifest::MethodRecord;
    match *m {
        MethodRecord::Gptq { damp, block, act_order } | MethodRecord::AwqGptq { damp, block, act_order, .. } => {
            sling_quantizers::gptq::Options { block: block as usize, damp, act_order }
        }
        MethodRecord::Awq { .. } => sling_quantizers::gptq::Options::default(),
    }
}

/// Runs the calibration pass `m` records (`settings.gptq` from [`gptq_options`]): GPTQ; AWQ; or AWQ, then GPTQ
/// calibrated on and solving the smoothed model (`awq::folded`: llm-compressor's `[AWQModifier, GPTQModifier]`
/// recipe), whose report is the run's. The folds come back for the target's plan.
#[allow(clippy::too_many_arguments)]
fn calibrate(
    m: &sling_provenance::manifest::MethodRecord,
    src: &dyn sling_calibration::TensorSource,
    cfg: &sling_core::ModelConfig,
    seqs: &[Vec<u32>],
    grids: &sling_calibration::gptq::Grids<'_>,
    store: &sling_pipeline::solved::Store,
    settings: &sling_calibration::gptq::Settings,
    progress: &mut dyn FnMut(sling_calibration::gptq::Progress<'_>),
) -> Result<(sling_calibration::gptq::Report, Option<sling_calibration::awq::Folds>)> {
    use sling_calibration::{awq, gptq};
    use sling_provenance::manifest::MethodRecord;
    Ok(match *m {
        MethodRecord::Gptq { .. } => (gptq::run(src, cfg, seqs, grids, store, settings, progress)?, None),
        MethodRecord::Awq { n_grid, duo_scaling } | MethodRecord::AwqGptq { n_grid, duo_scaling, .. } => {
            let opts = awq_options(n_grid as usize, duo_scaling)?;
            let o = awq::run(src, cfg, seqs, grids, store, settings, &opts, progress)?;
            let report = match m {
                MethodRecord::AwqGptq { .. } => {
                    gptq::run(&awq::folded(src, &o.folds), cfg, seqs, grids, store, settings, progress)?
                }
                _ => o.report,
            };
            (report, Some(o.folds))
        }
    })
}

/// AWQ's grid settings, checked.
fn awq_options(n_grid: usize, duo_scaling: bool) -> Result<sling_quantizers::awq::Options> {
    let min = if duo_scaling { 3 } else { 2 };
    if n_grid < min || n_grid > 1000 {
        bail!("--awq-grid must be between {min} and 1000{}", if duo_scaling { "" } else { " with --no-duo-scaling" });
    }
    Ok(sling_quantizers::awq::Options { n_grid, duo_scaling })
}

/// Folds AWQ's scales into a target's plan: every tensor a fold names must be read by some weight of the plan.
pub fn fold_plan<E>(plan: &mut sling_pipeline::Plan<E>, folds: &sling_calibration::awq::Folds) -> Result<()> {
    let missed = plan.fold(folds);
    if !missed.is_empty() {
        bail!("internal error: AWQ folded {} tensor(s) the plan does not read (first: {})", missed.len(), missed[0]);
    }
    Ok(())
}

/// The per-expert coverage table: routed calibration tokens per expert of each MoE layer.
pub fn print_coverage(
    report: &sling_calibration::gptq::Report,
    min_tokens: u64,
    all_experts: bool,
    rep: &crate::convert::Reporter,
) {
    for r in &report.routing {
        let (mn, mx) = (r.counts.iter().min().copied().unwrap_or(0), r.counts.iter().max().copied().unwrap_or(0));
        let few: Vec<usize> = (0..r.counts.len()).filter(|&e| r.counts[e] < min_tokens).collect();
        rep.say(&format!(
            "  layer {:>3}: {} experts, routed tokens min {mn} max {mx}{}",
            r.layer,
            r.counts.len(),
            if all_experts {
                " (--all-experts: every expert calibrated on every token)".to_string()
            } else if few.is_empty() {
                String::new()
            } else {
                format!(", {} under --min-expert-tokens {min_tokens}: {few:?}", few.len())
            }
        ));
    }
}

/// Runs the calibration pass a manifest records again (`verify --source --data`), into `dir`, quietly.
pub fn replay(
    cal: &sling_provenance::manifest::CalibrationRecord,
    data: &Path,
    ck: &sling_formats::checkpoint::Checkpoint,
    grids: &std::collections::HashMap<String, std::sync::Arc<dyn sling_quantizers::gptq::Grid>>,
    label: &str,
    dir: &Path,
    unsolvable: &[Unsolvable<'_>],
) -> Result<(std::sync::Arc<sling_pipeline::solved::Store>, Option<sling_calibration::awq::Folds>)> {
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", ck.dir.display()))?;
    let (text, ids) = if cal.data.token_ids { (None, Some(data)) } else { (Some(data), None) };
    let seqs = sequences(ck, text, ids, cal.data.ctx as usize, Some(cal.data.chunks as usize))?;
    let settings = sling_calibration::gptq::Settings {
        gptq: gptq_options(&cal.method),
        min_expert_tokens: cal.min_expert_tokens,
        all_experts: cal.all_experts,
        sequential: cal.sequential,
        ..Default::default()
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let store = sling_pipeline::solved::Store::open(dir)?;
    let base = sling_calibration::CheckpointSource::new(ck);
    let src = forward_source(ck, &base, unsolvable);
    let lookup = |hf: &str| grids.get(hf).cloned();
    let (_, folds) = calibrate(&cal.method, &src, &cfg, &seqs, &lookup, &store, &settings, &mut |_| {})
        .with_context(|| format!("{label}: calibration pass failed"))?;
    Ok((std::sync::Arc::new(store), folds))
}

/// The routing of the calibration data (a forward pass of the source model that only counts): total tokens, and per
/// MoE layer (`model.layers.N`) the tokens routed to each expert. For `sling plan` before a long calibrated run.
pub fn coverage(
    s: &SolveArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
) -> Result<(u64, std::collections::BTreeMap<String, Vec<u64>>)> {
    struct Routing(std::collections::BTreeMap<String, Vec<u64>>);
    impl sling_calibration::Observer for Routing {
        fn linear_input(&mut self, _: &sling_calibration::LinearInput<'_>) {}
        fn routing(&mut self, layer: usize, counts: &[u64]) {
            let e = self.0.entry(format!("model.layers.{layer}")).or_insert_with(|| vec![0; counts.len()]);
            e.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
        }
    }
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", ck.dir.display()))?;
    let seqs = sequences(ck, s.data.as_deref(), s.tokens.as_deref(), s.ctx, s.chunks)?;
    let src = sling_calibration::CheckpointSource::new(ck);
    let model = sling_calibration::Model::new(&src, &cfg)?;
    let mut r = Routing(Default::default());
    let per_batch = (2048 / s.ctx).max(1);
    for b in seqs.chunks(per_batch) {
        model.hidden_states(b, Some(&mut r)).with_context(|| format!("{}: forward pass failed", ck.dir.display()))?;
    }
    Ok((seqs.iter().map(|q| q.len() as u64).sum(), r.0))
}
