//! `--to gguf:auto --target-size SIZE | --target-bpw X`: measure every tensor's sensitivity, choose the types
//! under the budget (`sling_target_gguf::quantize::auto`), and hand the choice on as a recipe: one rule per
//! tensor, which `sling quantize` then follows like any recipe, and which is written out so that `--recipe FILE`
//! makes the same file again.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sling_formats::gguf::write::planned_files;
use sling_formats::gguf::{SplitPolicy, TensorDesc};
use sling_target_gguf::quantize::auto::{self, Allocation, Budget, Sensitivity};
use sling_target_gguf::quantize::{rules, QuantizeOptions, RuleOptions, TensorTypeRule};

use crate::quantize::QuantArgs;

/// The size-target flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AutoArgs {
    /// With --to gguf:auto, vllm:auto or mlx:auto: the size to fit, e.g. 180G, 9.5G, 800M (decimal units; the whole GGUF file,
    /// metadata included; the vllm/MLX weight files).
    #[arg(long, value_name = "SIZE", conflicts_with = "target_bpw")]
    pub(crate) target_size: Option<String>,
    /// With --to gguf:auto, vllm:auto or mlx:auto: bits per weight to fit, over every tensor's elements (as `sling plan` reports bpw).
    #[arg(long, value_name = "X")]
    pub(crate) target_bpw: Option<f64>,
    /// With --to gguf:auto, vllm:auto or mlx:auto: rows of each expert (or 2-D tensor) quantized to measure each candidate; larger
    /// tensors are measured on an even sample.
    #[arg(long, value_name = "N", default_value_t = auto::DEFAULT_SAMPLE_ROWS)]
    pub(crate) sample_rows: u64,
    /// With --to gguf:auto, vllm:auto or mlx:auto and --data: rows of each expert (or 2-D tensor) quantized in a sensitivity probe; the
    /// probe's KL is scaled up by the fraction of rows it quantized.
    #[arg(long, value_name = "N", default_value_t = auto::DEFAULT_PROBE_ROWS)]
    pub(crate) probe_rows: u64,
    /// With --to gguf:auto, vllm:auto or mlx:auto: also write the chosen allocation as a recipe file (`sling quantize` writes one
    /// beside the output anyway, OUT.recipe.toml).
    #[arg(long, value_name = "FILE")]
    pub(crate) save_recipe: Option<PathBuf>,
}

impl AutoArgs {
    fn any(&self) -> bool {
        self.target_size.is_some() || self.target_bpw.is_some() || self.save_recipe.is_some()
    }
}

/// The measured allocation, and what it was asked for: GGUF types (`K` a `DType`) or MLX encodings.
pub struct AutoPlan<K = sling_core::DType> {
    pub sens: sling_quantizers::budget::Sensitivity<K>,
    pub alloc: Allocation,
    pub target: String,
    pub description: String,
    pub recipe: String,
}

/// Is this `--to gguf:auto`?
pub fn is_auto(a: &QuantArgs) -> bool {
    a.to.as_deref().is_some_and(|t| t.eq_ignore_ascii_case("gguf:auto"))
}

/// Is this `--to gguf:auto`? Checks the flags that go with it either way.
pub fn wanted(a: &QuantArgs) -> Result<bool> {
    let auto = is_auto(a);
    if !auto {
        if a.auto.any() {
            bail!("--target-size, --target-bpw and --save-recipe go with --to gguf:auto or mlx:auto");
        }
        return Ok(false);
    }
    if a.auto.target_size.is_none() && a.auto.target_bpw.is_none() {
        bail!("--to gguf:auto needs a size: --target-size SIZE (e.g. 180G) or --target-bpw X (e.g. 2.5)");
    }
    let fixed = [
        ("--recipe", a.recipe.is_some()),
        ("--tensor-type", !a.tensor_type.is_empty()),
        ("--tensor-type-file", a.tensor_type_file.is_some()),
        ("--pure", a.pure),
        ("--output-tensor-type", a.output_tensor_type.is_some()),
        ("--token-embedding-type", a.token_embedding_type.is_some()),
    ];
    if let Some((flag, _)) = fixed.iter().find(|(_, on)| *on) {
        bail!("--to gguf:auto chooses every tensor's type itself; {flag} cannot be combined with it");
    }
    check_common(a, "--to gguf:auto", Some("the GPTQ/AWQ flags apply to vllm:… and mlx:… targets"))?;
    Ok(true)
}

/// What every `…:auto` refuses: the calibrated-quantization flags (`--data` only feeds the probes) and zero rows.
/// `method_hint: None` lets the GPTQ flags through (`mlx:auto --method gptq`).
fn check_common(a: &QuantArgs, to: &str, method_hint: Option<&str>) -> Result<()> {
    let s = &a.solve;
    if let Some(hint) = method_hint {
        if s.method.is_some() || s.act_order || s.all_experts || s.no_sequential || s.max_ram.is_some() {
            bail!("{to} takes --data/--tokens, --ctx and --chunks (to measure sensitivities); {hint}");
        }
    }
    if a.auto.sample_rows == 0 || a.auto.probe_rows == 0 {
        bail!("--sample-rows and --probe-rows must be at least 1");
    }
    Ok(())
}

fn budget(a: &AutoArgs) -> Result<(Budget, String)> {
    match (&a.target_size, a.target_bpw) {
        (Some(s), _) => Ok((Budget::Bytes(crate::convert::parse_size(s)?), format!("--target-size {s}"))),
        (None, Some(x)) if x.is_finite() && x > 0.0 => Ok((Budget::Bpw(x), format!("--target-bpw {x}"))),
        (None, Some(x)) => bail!("--target-bpw {x}: must be a positive number"),
        (None, None) => bail!("--to gguf:auto needs --target-size or --target-bpw"),
    }
}

/// Measures and allocates. `base` holds the user's other options (imatrix, --leave-output-tensor, …); `gemm`
/// runs the probes' forward-pass products (cuBLAS with `--device cuda`; the CPU when `None`).
pub fn plan(
    a: &QuantArgs,
    base: &QuantizeOptions,
    quiet: bool,
    gemm: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
) -> Result<AutoPlan> {
    let (budget, target) = budget(&a.auto)?;
    // Every quantizable tensor rewritten (Q8_0, no mixture rules) so that each carries its importance weights.
    let probe_opts = QuantizeOptions {
        rules: RuleOptions { ftype: rules::Q8_0, pure: true, tensor_types: Vec::new(), ..base.rules.clone() },
        dry_run: true,
        ..base.clone()
    };
    let (ck, p) = crate::quantize::open_and_plan(&a.src, &probe_opts)?;
    let t = &p.prepared.tensors;
    let descs = t.iter().map(|t| TensorDesc::new(t.name.clone(), t.dtype, t.ne.clone())).collect();
    let files = planned_files(Path::new("model.gguf"), p.prepared.kvs.0.clone(), descs, SplitPolicy::None)?;
    let disk: u64 = files.iter().map(|f| f.1).sum();
    let data: u64 = t.iter().map(|t| t.n_bytes()).sum();
    // Another type changes a tensor's alignment padding by at most the alignment (32 bytes).
    let overhead = disk.saturating_sub(data) + 32 * t.len() as u64;
    let bar = progress_bar(p.rows.len() as u64, quiet);
    let backend = sling_kernels::backend::CpuBackend::default();
    let t0 = std::time::Instant::now();
    let sens = auto::measure(&ck, &p, overhead, a.auto.sample_rows, &backend, &on_progress(&bar))
        .with_context(|| format!("cannot measure the sensitivities of {}", a.src.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    tracing::info!("measured {} tensors in {:.1}s", sens.tensors.len(), t0.elapsed().as_secs_f64());
    let mut sens = sens;
    let probed = match (&a.solve.data, &a.solve.tokens) {
        (None, None) => false,
        _ => {
            let t1 = std::time::Instant::now();
            let probes = probe(a, &ck, &p, &sens, &backend, gemm, quiet)?;
            tracing::info!("probed {} tensors in {:.1}s", probes.len(), t1.elapsed().as_secs_f64());
            sens.set_gains(&probes);
            true
        }
    };
    let alloc = sens.allocate(budget).map_err(auto::AutoError::from)?;
    let description = describe("gguf:auto", &target, &alloc, probed, sens.tensors.len(), "tensors");
    let recipe = auto::recipe_toml(&sens, &alloc, &description);
    Ok(AutoPlan { sens, alloc, target, description, recipe })
}

/// The allocation in one line (the recipe's `description`, the card's `allocation`).
fn describe(to: &str, target: &str, alloc: &Allocation, probed: bool, n: usize, what: &str) -> String {
    let quality = if probed {
        format!("predicted KLD {:.4} (probe-measured gains)", alloc.cost)
    } else {
        format!("predicted relative output error {:.4} (no --data: unprobed)", alloc.cost)
    };
    format!("{to} {target}: {} bytes, {:.3} bpw, {quality}, {n} {what}", alloc.file_bytes, alloc.bpw)
}

/// Hidden states of the probes carried at once (one `[tokens, hidden]` f32 matrix per probe and batch); more
/// probes run as further passes.
const PROBE_STREAM_BYTES: u64 = 2 << 30;

/// Each measured tensor's probe: its type and the KL divergence the model shows with that tensor alone
/// quantized to it (`sling_calibration::sensitivity`), over the `--data` text.
fn probe(
    a: &QuantArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
    p: &sling_target_gguf::quantize::QuantizePlan,
    sens: &Sensitivity,
    backend: &dyn sling_kernels::Backend,
    gemm: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
    quiet: bool,
) -> Result<Vec<Vec<(sling_core::DType, f64)>>> {
    use sling_calibration::sensitivity::{At, Substituted};
    let ref_src = sling_calibration::CheckpointSource::new(ck);
    let n_layers = n_layers(a, ck)?;
    // (measured tensor, where it acts, probe type), and each measured tensor's place in the plan
    let mut todo = Vec::new();
    let mut plan_index = vec![0; sens.tensors.len()];
    for (i, m) in sens.tensors.iter().enumerate() {
        let at = match (m.name.as_str(), rules::layer_of(&m.name)) {
            ("token_embd.weight", _) => At::Embedding,
            ("output.weight", _) => At::Head,
            (_, Some(l)) if (l as usize) < n_layers => At::Layer(l as usize),
            _ => continue,
        };
        let Some(pi) = p.rows.iter().position(|r| r.name == m.name) else { continue };
        // Codes copied from the source (gpt-oss's MXFP4 experts) have no values to substitute: such a tensor is
        // priced with the median gain of the probed ones (`Sensitivity::set_gains`).
        if matches!(p.prepared.tensors[pi].op, sling_pipeline::ops::Op::Mxfp4(_) | sling_pipeline::ops::Op::Gguf(_)) {
            continue;
        }
        plan_index[i] = pi;
        for dt in m.probe_kinds() {
            todo.push((i, at, dt));
        }
    }
    let make = |i: usize, dt: sling_core::DType| {
        let t = &p.prepared.tensors[plan_index[i]];
        let rows: sling_calibration::sensitivity::Rows = Box::new(move |r0, r1| {
            auto::roundtrip(ck, t, dt, a.auto.probe_rows, r0, r1, backend)
                .map_err(|e| sling_calibration::Error::Read { tensor: t.name.clone(), why: e.to_string() })
        });
        Ok((Substituted::new(&ref_src, t, rows)?, auto::probe_fraction(t, a.auto.probe_rows)))
    };
    run_probes(a, ck, &ref_src, gemm, quiet, &todo, sens.tensors.len(), &make)
}

/// Decoder layers of the source's forward pass.
fn n_layers(a: &QuantArgs, ck: &sling_formats::checkpoint::Checkpoint) -> Result<usize> {
    if !a.src.is_dir() {
        bail!(
            "--data (sensitivity probes) needs a Hugging Face model directory as the source, not {}",
            a.src.display()
        );
    }
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", a.src.display()))?;
    let src = sling_calibration::CheckpointSource::new(ck);
    let m = sling_calibration::Model::new(&src, &cfg)
        .with_context(|| format!("{}: cannot run the forward pass", a.src.display()))?;
    Ok(m.spec().n_layers)
}

/// A probe's substitution for measured tensor `i` at candidate `K`, and the fraction of its rows it rounds.
type MakeProbe<'s, K> = dyn Fn(usize, K) -> Result<(sling_calibration::sensitivity::Substituted<'s>, f64)> + 's;

/// Runs the probes `todo` (measured tensor, where it acts, candidate) over the `--data` text in groups bounded by
/// [`PROBE_STREAM_BYTES`]; each probe's KL is scaled up by the fraction of rows it rounded. Per measured tensor
/// (`n` of them): its probes.
#[allow(clippy::too_many_arguments)] // the probe run's inputs, each used once; a struct would only rename them
fn run_probes<'s, K: Copy>(
    a: &QuantArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
    ref_src: &'s sling_calibration::CheckpointSource<'s>,
    gemm: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
    quiet: bool,
    todo: &[(usize, sling_calibration::sensitivity::At, K)],
    n: usize,
    make: &MakeProbe<'s, K>,
) -> Result<Vec<Vec<(K, f64)>>> {
    use sling_calibration::sensitivity::{probe_kld, Probe};
    use sling_calibration::Model;
    let d = crate::eval::DataArgs {
        data: a.solve.data.clone(),
        tokens: a.solve.tokens.clone(),
        ctx: a.solve.ctx,
        chunks: a.solve.chunks,
    };
    let (_, chunks) = crate::eval::load_chunks(&a.src, &d)?;
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", a.src.display()))?;
    let reference = Model::new(ref_src, &cfg)
        .with_context(|| format!("{}: cannot run the forward pass", a.src.display()))?
        .with_backend(gemm.clone());
    let per_batch =
        sling_calibration::eval::chunks_per_batch(a.solve.ctx, reference.spec().vocab).min(chunks.len().max(1));
    let mut out = vec![Vec::new(); n];
    let stream = (per_batch * a.solve.ctx * reference.spec().hidden * 4) as u64;
    let per_group = (PROBE_STREAM_BYTES / stream.max(1)).max(1) as usize;
    let mut start = 0;
    while start < todo.len() {
        let end = (start + per_group).min(todo.len());
        let group = &todo[start..end];
        let subs = group.iter().map(|&(i, _, k)| make(i, k)).collect::<Result<Vec<_>>>()?;
        let models = subs
            .iter()
            .map(|(s, _)| Model::new(s, &cfg).map(|m| m.with_backend(gemm.clone())))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let probes: Vec<Probe> = group.iter().zip(&models).map(|(&(_, at, _), model)| Probe { at, model }).collect();
        let bar = progress_bar(0, quiet);
        let klds = probe_kld(&reference, &probes, &chunks, a.solve.ctx, per_batch, &mut |done, total| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
                b.set_message(format!("probes {}..{} of {}", start + 1, end, todo.len()));
            }
        })
        .context("the sensitivity probes failed")?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        for ((&(i, _, k), kld), (_, frac)) in group.iter().zip(klds).zip(&subs) {
            out[i].push((k, kld / frac));
        }
        start = end;
    }
    Ok(out)
}

impl AutoPlan {
    pub fn rules(&self) -> Vec<TensorTypeRule> {
        auto::rules(&self.sens, &self.alloc)
    }

    pub fn json(&self) -> serde_json::Value {
        let mut j = self.json_with("tensors", "type", |d| d.name().to_string());
        j["base"] = auto::base_of(&self.sens, &self.alloc).name.into();
        j
    }
}

impl<K: Copy + PartialEq> AutoPlan<K> {
    /// `plan --json`'s `auto`: the budget, the bounds, the predicted cost and, per measured tensor (under `items`),
    /// its choice (under `kind`, named by `label`), every candidate and the probes.
    fn json_with(&self, items: &str, kind: &str, label: impl Fn(K) -> String) -> serde_json::Value {
        let (min, max) = self.sens.bounds();
        let mut j = json!({
            "target": self.target,
            "budget_bytes": self.alloc.budget_bytes,
            "file_bytes": self.alloc.file_bytes,
            "bpw": self.alloc.bpw,
            "min_bytes": min,
            "max_bytes": max,
            "predicted_cost": self.alloc.cost,
        });
        j[items] = self
            .sens
            .chosen(&self.alloc)
            .map(|(m, c)| {
                json!({
                    "name": m.name,
                    kind: label(c.kind),
                    "bytes": c.bytes,
                    "cost": c.cost,
                    "gain": m.gain,
                    "exponent": m.exponent,
                    "probes": m.probes.iter().map(|&(d, kld)| json!({ kind: label(d), "kld": kld })).collect::<Vec<_>>(),
                    "rows_measured": m.rows_measured,
                    "weighted": m.weighted,
                    "candidates": m.candidates.iter().map(|c| json!({
                        kind: label(c.kind), "bytes": c.bytes, "relative": c.relative, "cost": c.cost,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        j
    }

    /// Writes the recipe to `path` (a temporary file renamed when complete).
    pub fn save(&self, path: &Path) -> Result<()> {
        save_text(&self.recipe, path)
    }
}

/// Writes `text` to `path` through a temporary file renamed when complete.
fn save_text(text: &str, path: &Path) -> Result<()> {
    let tmp = path.with_extension("toml.partial");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Where `sling quantize --to gguf:auto -o OUT` writes the recipe: `OUT.recipe.toml`.
pub fn recipe_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_os_string();
    s.push(".recipe.toml");
    PathBuf::from(s)
}

/// A measurement pass's progress callback: the item's index and name on `bar`.
fn on_progress(bar: &Option<indicatif::ProgressBar>) -> impl Fn(usize, usize, &str) + Sync + '_ {
    move |i, _, name| {
        if let Some(b) = bar {
            b.set_position(i as u64);
            b.set_message(name.to_string());
        }
    }
}

/// After a vllm/mlx measurement pass: the bar cleared, and an `--imatrix` that weighted nothing refused.
fn measured<K>(
    a: &QuantArgs,
    sens: &sling_quantizers::budget::Sensitivity<K>,
    bar: Option<indicatif::ProgressBar>,
    t0: std::time::Instant,
    what: &str,
) -> Result<()> {
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.imatrix.is_some() && !sens.tensors.iter().any(|m| m.weighted) {
        bail!(
            "--imatrix {}: no entry matches a weight of {}",
            a.imatrix.as_ref().map_or(String::new(), |p| p.display().to_string()),
            a.src.display()
        );
    }
    tracing::info!("measured {} {what} in {:.1}s", sens.tensors.len(), t0.elapsed().as_secs_f64());
    Ok(())
}

fn progress_bar(n: u64, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let b = indicatif::ProgressBar::new(n);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len}, ETA {eta} {msg}") {
        b.set_style(style);
    }
    Some(b)
}

/// `--to mlx:auto`: the measured allocation and the recipe that makes it.
pub type MlxAutoPlan = AutoPlan<mlx_auto::Kind>;

use sling_targets::mlx::auto as mlx_auto;

/// Checks the size-target flags against a vllm/mlx target: they go with `vllm:auto` and `mlx:auto`, which need a size.
pub fn check_hf(a: &QuantArgs, to: sling_targets::To) -> Result<()> {
    use sling_targets::To;
    let auto = matches!(to, To::MlxAuto | To::VllmAuto);
    if !auto {
        if a.auto.any() {
            bail!("--target-size, --target-bpw and --save-recipe go with --to gguf:auto, vllm:auto or mlx:auto");
        }
        return Ok(());
    }
    let (label, example, base) = match to {
        To::VllmAuto => ("--to vllm:auto", "5", "vllm:w4a16"),
        _ => ("--to mlx:auto", "3.5", "mlx:4"),
    };
    if a.auto.target_size.is_none() && a.auto.target_bpw.is_none() {
        bail!("{label} needs a size: --target-size SIZE (e.g. 16G) or --target-bpw X (e.g. {example})");
    }
    if a.recipe.is_some() || a.group_size.is_some() {
        bail!("{label} chooses every weight's bits and group size itself; --recipe and --group-size cannot be combined with it");
    }
    // GPTQ solves each weight on the grid the allocation chose for it (the same bytes per weight, so the same
    // size); AWQ would rescale the very weights the allocation measured, and is not offered here.
    match a.solve.method {
        Some(crate::solve::Method::Gptq) => check_common(a, label, None),
        Some(m @ (crate::solve::Method::Awq | crate::solve::Method::AwqGptq)) => bail!(
            "{label} takes --method gptq (or rtn), not {}: write the allocation with --save-recipe, then \
             --to {base} --recipe FILE --method {}",
            m.name(),
            m.name()
        ),
        _ => check_common(a, label, Some("--method gptq and its flags solve the allocation's grids")),
    }
}

/// The method that quantizes a vllm/mlx target. For `…:auto`, round to nearest unless `--method gptq` asks: there
/// `--data` feeds the sensitivity probes first, and is not a request for GPTQ by itself as with mlx:BITS.
pub fn hf_method(a: &QuantArgs, to: sling_targets::To) -> Result<crate::solve::Method> {
    use sling_targets::To;
    match (to, a.solve.method) {
        (To::MlxAuto | To::VllmAuto, Some(crate::solve::Method::Gptq)) | (To::Vllm(_) | To::Mlx(_), _) => {
            a.solve.method()
        }
        (To::MlxAuto | To::VllmAuto, _) => Ok(crate::solve::Method::Rtn),
    }
}

/// `--imatrix`'s entries (llama-imatrix's or `sling calibrate`'s GGUF names), each with the source tensors of the GGUF
/// tensor it is for, found through the GGUF conversion plan of the same checkpoint.
fn imatrix_entries(
    a: &QuantArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
) -> Result<Vec<(Vec<String>, sling_target_gguf::quantize::imatrix::Entry)>> {
    let Some(path) = &a.imatrix else { return Ok(Vec::new()) };
    let mut m = sling_target_gguf::quantize::Imatrix::load(path)?;
    m.filter(&a.include_weights, &a.exclude_weights);
    let plan = sling_target_gguf::convert::plan(ck, sling_target_gguf::convert::OutType::BF16)
        .with_context(|| format!("cannot map {} to GGUF names for the imatrix", a.src.display()))?;
    Ok(plan.tensors.into_iter().filter_map(|t| Some((t.sources, m.entries.remove(&t.name)?))).collect())
}

/// Per source tensor of the checkpoint, its imatrix data: the mean squared activation of each input column of the
/// matrix the tensor is (an expert's slice of a stacked entry), and the tokens it saw.
fn source_importance(
    a: &QuantArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
) -> Result<std::collections::HashMap<String, (Vec<f32>, i64)>> {
    let mut out = std::collections::HashMap::new();
    for (sources, e) in imatrix_entries(a, ck)? {
        let n = e.counts.len().max(1);
        let cols = e.weights.len() / n;
        for (i, s) in sources.iter().enumerate() {
            // One matrix per source (stacked experts), or one matrix all sources feed (a fused tensor).
            let k = if n == sources.len() { i } else { 0 };
            let w = e.weights.get(k * cols..(k + 1) * cols).unwrap_or_default().to_vec();
            out.insert(s.clone(), (w, e.counts.get(k).copied().unwrap_or(0)));
        }
    }
    Ok(out)
}

/// `--to vllm:auto`: the measured allocation and the recipe that makes it.
pub type VllmAutoPlan = AutoPlan<vllm_auto::Kind>;

use sling_targets::vllm::auto as vllm_auto;

/// Measures the vLLM plan's layers, probes them with `--data`, and allocates under the size asked for.
pub fn plan_vllm(
    a: &QuantArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
    plan: &sling_pipeline::Plan<sling_targets::vllm::Enc>,
    quiet: bool,
    gemm: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
) -> Result<VllmAutoPlan> {
    use sling_calibration::sensitivity::{At, Substituted};
    let (budget, target) = budget(&a.auto)?;
    let importance = source_importance(a, ck)?;
    let tokens = importance.values().map(|v| v.1).max().unwrap_or(0).max(1) as f64;
    let units = vllm_auto::units(plan);
    let bar = progress_bar(units.len() as u64, quiet);
    let t0 = std::time::Instant::now();
    let find = |w: &sling_pipeline::Weight<sling_targets::vllm::Enc>| {
        let (v, count) = w.sources.iter().find_map(|s| importance.get(s))?;
        // A dense weight counts every token; an expert its routed share.
        let freq = if w.role == sling_core::Role::RoutedExperts { (*count).max(1) as f64 / tokens } else { 1.0 };
        Some(vllm_auto::Importance { weights: v, freq })
    };
    let mut sens = vllm_auto::measure(ck, plan, &units, &find, a.auto.sample_rows, &on_progress(&bar))
        .with_context(|| format!("cannot measure the sensitivities of {}", a.src.display()))?;
    measured(a, &sens, bar, t0, "layers")?;
    let probed = a.solve.data.is_some() || a.solve.tokens.is_some();
    if probed {
        let t1 = std::time::Instant::now();
        let ref_src = sling_calibration::CheckpointSource::new(ck);
        let n_layers = n_layers(a, ck)?;
        let mut todo = Vec::new();
        for (i, m) in sens.tensors.iter().enumerate() {
            match sling_pipeline::hf::layer_of(&m.name) {
                Some(l) if (l as usize) < n_layers => {
                    for k in m.probe_kinds() {
                        todo.push((i, At::Layer(l as usize), k));
                    }
                }
                _ => {}
            }
        }
        let make = |i: usize, k: vllm_auto::Kind| {
            let ws: Vec<&sling_pipeline::Weight<sling_targets::vllm::Enc>> =
                units[i].weights.iter().map(|&j| &plan.weights[j]).collect();
            let outputs = ws
                .iter()
                .map(|&w| {
                    let rows: sling_calibration::sensitivity::Rows = Box::new(move |r0, r1| {
                        vllm_auto::roundtrip(ck, w, k, a.auto.probe_rows, r0, r1)
                            .map_err(|e| sling_calibration::Error::Read { tensor: w.name.clone(), why: e.to_string() })
                    });
                    (&w.op, w.cols(), rows)
                })
                .collect();
            Ok((Substituted::of_ops(&ref_src, outputs), vllm_auto::probe_fraction(&ws, a.auto.probe_rows)))
        };
        let probes = run_probes(a, ck, &ref_src, gemm, quiet, &todo, sens.tensors.len(), &make)?;
        tracing::info!("probed {} layers in {:.1}s", todo.len(), t1.elapsed().as_secs_f64());
        sens.set_gains(&probes);
    }
    let alloc = sens.allocate(budget)?;
    let description = describe("vllm:auto", &target, &alloc, probed, sens.tensors.len(), "layers");
    let recipe = vllm_auto::recipe_toml(plan, &units, &sens, &alloc, &description);
    Ok(VllmAutoPlan { sens, alloc, target, description, recipe })
}

impl VllmAutoPlan {
    pub fn json(&self) -> serde_json::Value {
        self.json_with("layers", "encoding", |k| k.label())
    }
}

/// A vllm/mlx size-targeted allocation, whichever target.
pub enum HfAuto {
    Vllm(VllmAutoPlan),
    Mlx(MlxAutoPlan),
}

impl HfAuto {
    pub fn description(&self) -> &str {
        match self {
            HfAuto::Vllm(p) => &p.description,
            HfAuto::Mlx(p) => &p.description,
        }
    }

    pub fn recipe(&self) -> &str {
        match self {
            HfAuto::Vllm(p) => &p.recipe,
            HfAuto::Mlx(p) => &p.recipe,
        }
    }

    pub fn tensor_bytes(&self) -> u64 {
        match self {
            HfAuto::Vllm(p) => p.alloc.tensor_bytes,
            HfAuto::Mlx(p) => p.alloc.tensor_bytes,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        match self {
            HfAuto::Vllm(p) => p.json(),
            HfAuto::Mlx(p) => p.json(),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_text(self.recipe(), path)
    }
}

/// Each MLX weight's imatrix entry (GGUF names: llama-imatrix's or `sling calibrate`'s), found through the GGUF
/// conversion plan of the same checkpoint: the GGUF tensor made of exactly the weight's source tensors.
fn mlx_importance(
    a: &QuantArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
) -> Result<std::collections::HashMap<Vec<String>, mlx_auto::Importance>> {
    Ok(imatrix_entries(a, ck)?
        .into_iter()
        .map(|(mut key, e)| {
            key.sort();
            (key, mlx_auto::Importance { weights: e.weights, counts: e.counts })
        })
        .collect())
}

/// Measures the MLX plan's weights, probes them with `--data`, and allocates under the size asked for.
pub fn plan_mlx(
    a: &QuantArgs,
    ck: &sling_formats::checkpoint::Checkpoint,
    p: &sling_targets::mlx::MlxPlan,
    quiet: bool,
    gemm: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
) -> Result<MlxAutoPlan> {
    use sling_calibration::sensitivity::{At, Substituted};
    let (budget, target) = budget(&a.auto)?;
    let importance = mlx_importance(a, ck)?;
    let bar = progress_bar(p.plan.weights.len() as u64, quiet);
    let t0 = std::time::Instant::now();
    let find = |w: &sling_pipeline::Weight<sling_targets::mlx::Enc>| {
        let mut key = w.sources.clone();
        key.sort();
        importance.get(&key)
    };
    let mut sens = mlx_auto::measure(ck, p, &find, a.auto.sample_rows, &on_progress(&bar))
        .with_context(|| format!("cannot measure the sensitivities of {}", a.src.display()))?;
    measured(a, &sens, bar, t0, "weights")?;
    let probed = a.solve.data.is_some() || a.solve.tokens.is_some();
    if probed {
        let t1 = std::time::Instant::now();
        let ref_src = sling_calibration::CheckpointSource::new(ck);
        let n_layers = n_layers(a, ck)?;
        let idx = mlx_auto::measured_weights(p);
        let mut todo = Vec::new();
        for (i, m) in sens.tensors.iter().enumerate() {
            let at = match (m.role, sling_pipeline::hf::layer_of(&m.name)) {
                (sling_core::Role::Embeddings, _) => At::Embedding,
                (sling_core::Role::Output, _) => At::Head,
                (_, Some(l)) if (l as usize) < n_layers => At::Layer(l as usize),
                _ => continue,
            };
            for k in m.probe_kinds() {
                todo.push((i, at, k));
            }
        }
        let make = |i: usize, k: mlx_auto::Kind| {
            let w = &p.plan.weights[idx[i]];
            let rows: sling_calibration::sensitivity::Rows = Box::new(move |r0, r1| {
                mlx_auto::roundtrip(ck, w, k, a.auto.probe_rows, r0, r1)
                    .map_err(|e| sling_calibration::Error::Read { tensor: w.name.clone(), why: e.to_string() })
            });
            Ok((Substituted::of_op(&ref_src, &w.op, w.cols(), rows), mlx_auto::probe_fraction(w, a.auto.probe_rows)))
        };
        let probes = run_probes(a, ck, &ref_src, gemm, quiet, &todo, sens.tensors.len(), &make)?;
        tracing::info!("probed {} weights in {:.1}s", todo.len(), t1.elapsed().as_secs_f64());
        sens.set_gains(&probes);
    }
    let alloc = sens.allocate(budget)?;
    let description = describe("mlx:auto", &target, &alloc, probed, sens.tensors.len(), "weights");
    let recipe = mlx_auto::recipe_toml(&sens, &alloc, &description, (p.bits, p.group));
    Ok(MlxAutoPlan { sens, alloc, target, description, recipe })
}

impl MlxAutoPlan {
    pub fn json(&self) -> serde_json::Value {
        self.json_with("weights", "encoding", |k| k.label())
    }
}
