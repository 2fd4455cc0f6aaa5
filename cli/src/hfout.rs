//! `sling quantize --to vllm:SCHEME | mlx:BITS` and `sling plan` for them: Hugging Face-format directories
//! written by the target-agnostic pipeline (`sling_pipeline`) with a target plug-in (`sling_targets`).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sling_formats::checkpoint::Checkpoint;
use sling_pipeline::{Event, ExecOptions, IndexStyle, Plan, Target};
use sling_provenance::manifest;
use sling_targets::{mlx, vllm, To};

use crate::convert::{parse_size, tool, Reporter};
use crate::quantize::{Args, QuantArgs};

/// Files of the source directory an HF-format artifact carries over as they are.
pub const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

/// Refuses the GGUF-only flags with these targets (`--recipe` goes with mlx too, `--imatrix` with mlx:auto).
fn check_flags(a: &QuantArgs, to: To) -> Result<()> {
    crate::auto::check_hf(a, to)?;
    let gguf_only = [
        ("--recipe", a.recipe.is_some() && !matches!(to, To::Mlx(_) | To::MlxAuto | To::Vllm(_) | To::VllmAuto)),
        ("--imatrix", a.imatrix.is_some() && !matches!(to, To::MlxAuto | To::VllmAuto)),
        ("--pure", a.pure),
        ("--leave-output-tensor", a.leave_output_tensor),
        ("--output-tensor-type", a.output_tensor_type.is_some()),
        ("--token-embedding-type", a.token_embedding_type.is_some()),
        ("--tensor-type", !a.tensor_type.is_empty()),
        ("--tensor-type-file", a.tensor_type_file.is_some()),
        ("--override-kv", !a.override_kv.is_empty()),
        ("--tokenizer-pre", a.tokenizer_pre.is_some()),
        ("--allow-requantize", a.allow_requantize),
    ];
    if let Some((flag, _)) = gguf_only.iter().find(|(_, on)| *on) {
        bail!("{flag} applies to --to gguf:… only");
    }
    Ok(())
}

/// A planned HF-format artifact, whichever target.
enum Planned {
    Vllm(vllm::Scheme, Plan<vllm::Enc>),
    Mlx(mlx::MlxPlan),
}

fn open_and_plan(a: &QuantArgs, to: To) -> Result<(Checkpoint, Planned)> {
    check_flags(a, to)?;
    let ck = Checkpoint::open(&a.src).with_context(|| format!("cannot read checkpoint {}", a.src.display()))?;
    let ctx = || format!("cannot quantize {} to {}", a.src.display(), to.label());
    let p = match to {
        To::Vllm(s) => {
            if a.group_size.is_some() {
                bail!("--group-size applies to mlx targets (vllm schemes fix their group size; a --recipe sets group sizes)");
            }
            let plan = match recipe_text(a)? {
                Some(text) => {
                    let name = a.recipe.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                    let mut plan = vllm_for_recipe(&ck, s, a.strict).with_context(ctx)?;
                    vllm_with_recipe(s, &mut plan, &name, &text, a.strict).with_context(ctx)?;
                    plan
                }
                None => vllm::plan(&ck, s, a.strict).with_context(ctx)?,
            };
            Planned::Vllm(s, plan)
        }
        // Planned at the finest group, then the allocation's recipe sets each layer's width and group size.
        To::VllmAuto => {
            Planned::Vllm(VLLM_AUTO_BASE, vllm_for_recipe(&ck, VLLM_AUTO_BASE, a.strict).with_context(ctx)?)
        }
        To::Mlx(b) => Planned::Mlx(match recipe_text(a)? {
            Some(text) => mlx_with_recipe(
                &ck,
                b,
                a.group_size,
                a.strict,
                &a.recipe.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                &text,
            )
            .with_context(ctx)?,
            None => mlx::plan(&ck, b, a.group_size.unwrap_or(64), a.strict).with_context(ctx)?,
        }),
        // Planned at the finest group MLX takes (so that every weight MLX can quantize is measured) and a
        // provisional default; the allocation's recipe then sets both.
        To::MlxAuto => Planned::Mlx(mlx::plan(&ck, mlx::Bits(4), 32, a.strict).with_context(ctx)?),
    };
    Ok((ck, p))
}

/// The scheme `vllm:auto` plans at before its recipe applies (symmetric int4, group 128).
const VLLM_AUTO_BASE: vllm::Scheme = vllm::Scheme::W4A16 { symmetric: true };

/// The plan a vLLM recipe applies to: integer scheme `s` at the finest group vLLM takes, so that every weight vLLM
/// can quantize is planned quantized.
fn vllm_for_recipe(ck: &Checkpoint, s: vllm::Scheme, strict: bool) -> Result<Plan<vllm::Enc>> {
    if s.int_args().is_none() {
        bail!("--recipe applies to the integer vllm schemes (w4a16, w4a16-asym, w8a16), not vllm:{}", s.name());
    }
    Ok(vllm::plan_in_groups(ck, s, strict, Some(32))?)
}

/// Applies a vLLM recipe (`--recipe FILE`, or the one a manifest records) to a [`vllm_for_recipe`] plan; its defaults
/// fall back to the scheme's bits and group size (128).
fn vllm_with_recipe(s: vllm::Scheme, plan: &mut Plan<vllm::Enc>, name: &str, text: &str, strict: bool) -> Result<()> {
    let bits = s.int_args().map_or(4, |a| a.bits);
    let r = sling_targets::recipe::RecipeFile::parse(name, text, &vllm::recipe::LIMITS)?;
    vllm::recipe::apply(name, &r, plan, (bits, 128), strict)?;
    Ok(())
}

/// The MLX plan a recipe makes: planned at group 32 (every weight MLX can take), then the recipe's choices, its
/// defaults falling back to `bits` and `group` (64 when not given).
fn mlx_with_recipe(
    ck: &Checkpoint,
    bits: mlx::Bits,
    group: Option<u64>,
    strict: bool,
    name: &str,
    text: &str,
) -> Result<mlx::MlxPlan> {
    let mut r = mlx::recipe::Recipe::parse(name, text)?;
    r.bits = r.bits.or(Some(bits.0));
    r.group_size = r.group_size.or(group).or(Some(64));
    let mut p = mlx::plan(ck, bits, 32, false)?;
    r.apply(&mut p, strict)?;
    Ok(p)
}

/// The recipe `--recipe FILE` gave (mlx), as recorded in the manifest.
fn recipe_text(a: &QuantArgs) -> Result<Option<String>> {
    a.recipe
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()
}

/// `--to vllm:auto | mlx:auto`: measures, allocates and applies the allocation's recipe to the plan.
fn allocate(
    a: &QuantArgs,
    ck: &Checkpoint,
    planned: &mut Planned,
    quiet: bool,
    gemm: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
) -> Result<crate::auto::HfAuto> {
    let (ap, bytes) = match planned {
        Planned::Mlx(p) => {
            let ap = crate::auto::plan_mlx(a, ck, p, quiet, gemm)?;
            mlx::recipe::Recipe::parse("mlx:auto", &ap.recipe)?.apply(p, a.strict)?;
            let bytes = sling_pipeline::plan_bytes(&p.plan);
            (crate::auto::HfAuto::Mlx(ap), bytes)
        }
        Planned::Vllm(s, plan) => {
            let ap = crate::auto::plan_vllm(a, ck, plan, quiet, gemm)?;
            vllm_with_recipe(*s, plan, "vllm:auto", &ap.recipe, a.strict)?;
            (crate::auto::HfAuto::Vllm(ap), sling_pipeline::plan_bytes(plan))
        }
    };
    if bytes > ap.tensor_bytes() {
        bail!("internal error: the allocation holds {} bytes of tensors, the plan {bytes}", ap.tensor_bytes());
    }
    Ok(ap)
}

/// AWQ's folds into whichever plan it is.
fn fold_planned(p: &mut Planned, folds: &sling_calibration::awq::Folds) -> Result<()> {
    match p {
        Planned::Vllm(_, plan) => crate::solve::fold_plan(plan, folds),
        Planned::Mlx(m) => crate::solve::fold_plan(&mut m.plan, folds),
    }
}

/// The weights the plan rounds on a grid that no solver takes (GPTQ/AWQ round them to nearest and list them).
fn unsolvable_of<'p>(ck: &Checkpoint, p: &'p Planned) -> Vec<crate::solve::Unsolvable<'p>> {
    match p {
        Planned::Mlx(m) => mlx::unsolvable(ck, m),
        Planned::Vllm(..) => Vec::new(),
    }
}

/// The weights the plan puts on an integer grid, by Hugging Face tensor name (MLX's stacked experts by each
/// expert's name): what `--method gptq` solves.
fn grids_of(p: &Planned) -> std::collections::HashMap<String, std::sync::Arc<dyn sling_quantizers::gptq::Grid>> {
    let mut m = std::collections::HashMap::new();
    match p {
        Planned::Vllm(_, plan) => {
            for w in &plan.weights {
                if let Some(g) = vllm::grid(&w.enc) {
                    m.insert(w.name.clone(), std::sync::Arc::from(g));
                }
            }
        }
        Planned::Mlx(mp) => {
            for w in &mp.plan.weights {
                if let Some(g) = mlx::grid(&w.enc) {
                    let g: std::sync::Arc<dyn sling_quantizers::gptq::Grid> = std::sync::Arc::from(g);
                    match &w.enc {
                        mlx::Enc::Affine { experts, .. } if !experts.is_empty() => {
                            for e in experts {
                                m.insert(e.clone(), g.clone());
                            }
                        }
                        _ => {
                            m.insert(w.name.clone(), g);
                        }
                    }
                }
            }
        }
    }
    m
}

fn weights_json<E: std::fmt::Debug>(p: &Plan<E>) -> Vec<serde_json::Value> {
    p.weights
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "role": w.role,
                "encoding": format!("{:?}", w.enc),
                "tensors": w.parts.iter().map(|t| json!({"name": t.name, "dtype": t.dtype.name(), "shape": t.shape, "bytes": t.n_bytes()})).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn summary<E: std::fmt::Debug>(label: &str, p: &Plan<E>) -> serde_json::Value {
    let bytes = sling_pipeline::plan_bytes(p);
    let elems: u64 = p.weights.iter().map(|w| w.rows() * w.cols()).sum();
    json!({
        "target": label,
        "bytes": bytes,
        "bpw": if elems > 0 { bytes as f64 * 8.0 / elems as f64 } else { 0.0 },
        "kept": p.kept,
        "weights": weights_json(p),
    })
}

fn plan_of(p: &Planned) -> (String, serde_json::Value) {
    match p {
        Planned::Vllm(s, plan) => {
            let l = format!("vllm:{}", s.name());
            let j = summary(&l, plan);
            (l, j)
        }
        Planned::Mlx(m) => {
            let l = format!("mlx:{}", m.bits);
            let mut j = summary(&l, &m.plan);
            j["group_size"] = m.group.into();
            // As mlx-lm reports it ("Quantized model with … bits per weight"): over the parameters it counts.
            let params = mlx::total_parameters(m);
            if params > 0 {
                j["bpw"] = (sling_pipeline::plan_bytes(&m.plan) as f64 * 8.0 / params as f64).into();
            }
            (l, j)
        }
    }
}

/// `sling plan --to vllm:…|mlx:…`.
pub fn run_plan(a: &QuantArgs, to: To, quiet: bool) -> Result<()> {
    let (ck, mut p) = open_and_plan(a, to)?;
    let method = crate::auto::hf_method(a, to)?;
    let auto = match to {
        To::MlxAuto | To::VllmAuto => Some(allocate(a, &ck, &mut p, quiet, None)?),
        _ => None,
    };
    let (mut label, mut j) = plan_of(&p);
    if let Some(ap) = &auto {
        label = to.label();
        j["target"] = label.clone().into();
        j["auto"] = ap.json();
        if let Some(path) = &a.auto.save_recipe {
            ap.save(path)?;
        }
        if !a.json {
            eprintln!("{}", ap.description());
        }
    }
    if method != crate::solve::Method::Rtn {
        // Before a long calibrated run: which experts the calibration data reaches (a routing-only forward pass).
        let grids = grids_of(&p);
        if grids.is_empty() {
            bail!(
                "--method {} applies to integer schemes; {label} quantizes no weight on an integer grid",
                method.name()
            );
        }
        let cov = crate::solve::coverage(&a.solve, &ck)?;
        j["calibration"] = json!({"method": method.name(), "weights": grids.len(), "expert_tokens": cov.1,
                                  "tokens": cov.0, "min_expert_tokens": a.solve.min_expert_tokens});
        if !a.json {
            eprintln!(
                "{label} --method {}: {} weights on an integer grid; {} calibration tokens route as follows:",
                method.name(),
                grids.len(),
                cov.0
            );
            for (layer, counts) in &cov.1 {
                let few: Vec<usize> = (0..counts.len()).filter(|&e| counts[e] < a.solve.min_expert_tokens).collect();
                eprintln!(
                    "  {layer}: {} experts, routed tokens min {} max {}{}",
                    counts.len(),
                    counts.iter().min().unwrap_or(&0),
                    counts.iter().max().unwrap_or(&0),
                    if few.is_empty() || a.solve.all_experts {
                        String::new()
                    } else {
                        format!(
                            ", {} under --min-expert-tokens {} (round-to-nearest): {few:?}",
                            few.len(),
                            a.solve.min_expert_tokens
                        )
                    }
                );
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("{:<60} {:<16} {:<10} {:>24} {:>12}", "tensor", "role", "dtype", "shape", "bytes");
    for w in j["weights"].as_array().into_iter().flatten() {
        for t in w["tensors"].as_array().into_iter().flatten() {
            let shape =
                t["shape"].as_array().into_iter().flatten().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
            println!(
                "{:<60} {:<16} {:<10} {:>24} {:>12}",
                t["name"].as_str().unwrap_or(""),
                w["role"].as_str().unwrap_or(""),
                t["dtype"].as_str().unwrap_or(""),
                shape,
                t["bytes"]
            );
        }
    }
    // The allocation, one line per choice: what `plan --to …:auto` is run for.
    if let Some(auto) = j.get("auto") {
        let items = if to == To::VllmAuto { "layers" } else { "weights" };
        let kind = "encoding";
        // Cost: predicted KL divergence with --data (probed), relative output error without.
        println!("{:<60} {:<12} {:>12} {:>12}", "allocated", kind, "bytes", "cost");
        for it in auto[items].as_array().into_iter().flatten() {
            println!(
                "{:<60} {:<12} {:>12} {:>12.3e}",
                it["name"].as_str().unwrap_or(""),
                it[kind].as_str().unwrap_or(""),
                it["bytes"].as_u64().unwrap_or(0),
                it["cost"].as_f64().unwrap_or(0.0)
            );
        }
    }
    for k in j["kept"].as_array().into_iter().flatten() {
        println!(
            "kept at source precision: {} ({})",
            k["name"].as_str().unwrap_or(""),
            k["why"].as_str().unwrap_or("")
        );
    }
    println!(
        "total: {label}, {} weights, {} bytes ({:.2} MiB), {:.3} bits per weight, {} kept at source precision",
        j["weights"].as_array().map_or(0, Vec::len),
        j["bytes"],
        j["bytes"].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64,
        j["bpw"].as_f64().unwrap_or(0.0),
        j["kept"].as_array().map_or(0, Vec::len)
    );
    Ok(())
}

/// `sling quantize --to vllm:…|mlx:…`.
pub fn run(a: &Args, to: To, quiet: bool, rep: &Reporter) -> Result<()> {
    if a.split_max_tensors.is_some() {
        bail!("--split-max-tensors applies to --to gguf:… only (use --split-max-size for shard sizes)");
    }
    if a.eval.is_some() {
        bail!("--eval is not supported for {} yet: run `sling eval` on the directory", to.label());
    }
    // Round-to-nearest rows are encoded through the backend (`--device`; every backend writes the same bytes),
    // opened first so that an explicit GPU that cannot start fails before anything is read or written.
    let backend = a.pipeline.backend(rep)?;
    let t0 = Instant::now();
    let (ck, mut planned) = open_and_plan(&a.q, to)?;
    let method = crate::auto::hf_method(&a.q, to)?;
    // A calibrated run writes its store beside the output (`OUT.solve/`) long before the pipeline runs: the
    // output's lock is taken first, so that a second run of the same output touches nothing of this one's.
    let lock = match method {
        crate::solve::Method::Rtn => None,
        _ => {
            sling_pipeline::exec::check_output(&ck, &a.output)?;
            // The lock file is the pipeline's resume journal: one a resumed run finds is kept if this run
            // fails before it writes; a fresh run's goes with it.
            let path = sling_pipeline::exec::journal_path(&a.output);
            Some(match a.pipeline.resume {
                true => sling_formats::lock::OutputLock::acquire(&path)?,
                false => sling_formats::lock::OutputLock::temporary(&path)?,
            })
        }
    };
    let auto = match to {
        To::MlxAuto | To::VllmAuto => {
            let gemm = match a.q.solve.data.is_some() || a.q.solve.tokens.is_some() {
                true => a.pipeline.calibration_backend()?,
                false => None,
            };
            Some(allocate(&a.q, &ck, &mut planned, quiet, gemm)?)
        }
        _ => None,
    };
    let (mut label, summary) = plan_of(&planned);
    if auto.is_some() {
        label = to.label();
    }
    // What chose each weight's bits: the allocation's recipe, or the one given (recorded, and re-applied by
    // `verify --source`).
    let recipe = match &auto {
        Some(ap) => Some(ap.recipe().to_string()),
        None => recipe_text(&a.q)?,
    };
    let solved = match method {
        crate::solve::Method::Rtn => None,
        m => {
            let backend = a.pipeline.calibration_backend()?;
            Some(crate::solve::run(
                &a.q.solve,
                m,
                &ck,
                &grids_of(&planned),
                &label,
                &a.output,
                a.pipeline.resume,
                rep,
                backend,
                &unsolvable_of(&ck, &planned),
            )?)
        }
    };
    if let Some(f) = solved.as_ref().and_then(|s| s.folds.as_ref()) {
        fold_planned(&mut planned, f)?;
    }
    let store = solved.as_ref().map(|s| s.store.clone());
    let max_shard = a.split_max_size.as_deref().map(parse_size).transpose()?.or(Some(5 << 30));
    let record = |what: &str| manifest::Options {
        to: what.to_string(),
        out_type: label.split_once(':').map_or(label.clone(), |(_, s)| s.to_string()),
        split: manifest::Split {
            max_tensors: 0,
            max_bytes: max_shard.unwrap_or(0),
            small_first_shard: false,
            layout: None,
        },
        tokenizer_pre: None,
        allow_nonfinite: a.allow_nonfinite,
        quantize: None,
        target: Some(manifest::TargetRecord {
            target: label.clone(),
            group_size: a.q.group_size,
            strict: a.q.strict,
            calibration: solved.as_ref().map(|s| s.record.clone()),
            recipe: recipe.clone(),
        }),
    };
    let mut card_extra = vec![("target".to_string(), format!("`{label}`"))];
    if let Some(ap) = &auto {
        card_extra.push(("allocation".into(), ap.description().to_string()));
    }
    if let Some(p) = &a.q.recipe {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (_, sha) = manifest::hash_file(p)?;
        card_extra.push(("recipe file".into(), format!("`{name}` (sha256 `{sha}`)")));
    }
    if let Some(s) = &solved {
        let r = &s.record;
        card_extra.push((
            "quantization method".into(),
            format!(
                "{} ({}, {}sequential{}) on {} calibration tokens ({} x {}, `{}` sha256 {})",
                r.method.name(),
                match r.method {
                    manifest::MethodRecord::Awq { n_grid, duo_scaling } => {
                        format!("grid {n_grid}, duo scaling {duo_scaling}")
                    }
                    manifest::MethodRecord::Gptq { damp, block, act_order } => {
                        format!("damp {damp}, block {block}, act-order {act_order}")
                    }
                    manifest::MethodRecord::AwqGptq { n_grid, duo_scaling, damp, block, act_order } => format!(
                        "AWQ grid {n_grid}, duo scaling {duo_scaling}; GPTQ damp {damp}, block {block}, act-order \
                         {act_order}"
                    ),
                },
                if r.sequential { "" } else { "not " },
                if r.all_experts { ", all experts" } else { "" },
                r.data.tokens,
                r.data.chunks,
                r.data.ctx,
                r.data.name,
                &r.data.sha256[..16.min(r.data.sha256.len())]
            ),
        ));
        if !r.fallbacks.is_empty() {
            card_extra.push((
                "round-to-nearest fallbacks".into(),
                format!(
                    "{} weight(s) (too few calibration tokens or no input observed; listed in sling.json)",
                    r.fallbacks.len()
                ),
            ));
        }
    }
    let kept = summary["kept"].as_array().map_or(0, Vec::len);
    if kept > 0 {
        card_extra.push(("kept at source precision".into(), format!("{kept} weight(s), listed below")));
    }
    let base = |files, what: &str, index, meta: BTreeMap<String, String>, card_format: (&str, &str)| ExecOptions {
        output: a.output.clone(),
        max_shard_bytes: max_shard,
        shard_metadata: meta,
        index,
        files,
        copy: COPIED.iter().map(|s| s.to_string()).collect(),
        allow_nonfinite: a.allow_nonfinite,
        window: None,
        resume: a.pipeline.resume,
        provenance: (!a.no_manifest).then(|| (tool(), record(what))),
        created: a.pipeline.created().ok().flatten(),
        model_card: (!a.no_manifest && !a.pipeline.no_model_card).then(|| card_extra.clone()),
        card_format: (card_format.0.to_string(), card_format.1.to_string()),
    };
    let events = |ev: &Event<'_>| on_event(rep, &a.q.src, &label, ev);
    let pt: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let report = match &planned {
        Planned::Vllm(s, plan) => {
            let files = vec![("config.json".to_string(), vllm::config_json(&ck, *s, plan)?)];
            let opts = base(files, "vllm", IndexStyle::Transformers, pt, ("compressed-tensors", "transformers"));
            exec_under(
                lock,
                &vllm::Vllm { scheme: *s, solved: store.clone(), backend: Some(backend.clone()) },
                &ck,
                plan,
                &opts,
                &events,
            )
        }
        Planned::Mlx(m) => {
            let files = vec![("config.json".to_string(), mlx::config_json(&ck, m))];
            let index = IndexStyle::Mlx { total_parameters: mlx::total_parameters(m) };
            let meta: BTreeMap<String, String> = [("format".to_string(), "mlx".to_string())].into();
            let opts = base(files, "mlx", index, meta, ("MLX", "mlx"));
            let t = mlx::Mlx { solved: store.clone(), backend: Some(backend.clone()) };
            exec_under(lock, &t, &ck, &m.plan, &opts, &events)
        }
    }
    .with_context(|| format!("cannot quantize {} to {label}", a.q.src.display()))?;
    if let Some(ap) = &auto {
        // Beside the artifact, not in it: `--recipe` makes the same weights again.
        ap.save(&crate::auto::recipe_path(&a.output))?;
        if let Some(extra) = &a.q.auto.save_recipe {
            ap.save(extra)?;
        }
    }
    if let Some(s) = &solved {
        // The artifact is complete: the solved weights are in it.
        std::fs::remove_dir_all(&s.dir).with_context(|| format!("cannot remove {}", s.dir.display()))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    rep.finish();
    rep.emit("done", json!({"output": report.output, "files": report.files, "manifest": report.manifest, "bytes": report.bytes_out, "seconds": secs}));
    if a.q.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "output": report.output,
                "target": label,
                "files": report.files,
                "manifest": report.manifest,
                "weights": report.weights,
                "tensors": report.tensors,
                "bytes_in": report.bytes_in,
                "bytes_out": report.bytes_out,
                "bpw": summary["bpw"],
                "kept": summary["kept"],
                "calibration": solved.as_ref().map(|s| serde_json::json!({"record": s.record, "weights": s.report.weights})),
                "nonfinite": report.nonfinite,
                "seconds": secs,
            }))?
        );
    } else if !quiet {
        rep.say(&format!(
            "wrote {} ({label}: {} tensors in {} files, {:.2} GB, {:.2} bpw, {kept} weight(s) kept at source precision) in {:.1}s, {:.2} GB/s of input",
            report.output.display(),
            report.tensors,
            report.files.len(),
            report.bytes_out as f64 / 1e9,
            summary["bpw"].as_f64().unwrap_or(0.0),
            secs,
            report.bytes_in as f64 / 1e9 / secs.max(1e-9)
        ));
    }
    Ok(())
}

/// Runs the pipeline, under the lock taken before a calibration pass when there is one.
fn exec_under<T: Target<Error = sling_pipeline::ExecError>>(
    lock: Option<sling_formats::lock::OutputLock>,
    t: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    opts: &ExecOptions,
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<sling_pipeline::ExecReport> {
    Ok(match lock {
        Some(lock) => sling_pipeline::exec::execute_locked(t, ck, plan, opts, lock, events)?,
        None => sling_pipeline::execute(t, ck, plan, opts, events)?,
    })
}

fn on_event(rep: &Reporter, src: &std::path::Path, label: &str, ev: &Event<'_>) {
    match ev {
        Event::Start { weights, bytes, resumed, note } => {
            rep.set_length(*bytes);
            rep.emit(
                "start",
                json!({"tool": "sling", "version": env!("CARGO_PKG_VERSION"), "command": "quantize", "source": src,
                       "type": label, "weights": weights, "bytes": bytes, "threads": rayon::current_num_threads(),
                       "resumed_weights": resumed}),
            );
            if let Some(note) = note {
                rep.warn(&format!("--resume: {note}"));
            }
            if *resumed > 0 {
                rep.say(&format!(
                    "resuming: {resumed} of {weights} weights re-checked and reused from the interrupted run"
                ));
            }
        }
        Event::Weight { index, of, name, done_bytes, total_bytes } => {
            rep.set_position(*done_bytes, name);
            rep.emit(
                "weight",
                json!({"index": index, "of": of, "name": name, "done_bytes": done_bytes, "total_bytes": total_bytes}),
            );
        }
        Event::Stage(s) => {
            rep.set_message(s);
            rep.emit("stage", json!({"stage": s}));
        }
    }
}

/// `sling verify --source` for a vllm/mlx artifact directory: plans it again from the source and the options the
/// manifest records, checks every stored tensor's name, dtype and shape against that plan, and recomputes the
/// parts of a sample of weights (spread over the plan, a routed expert among them) or all of them, comparing
/// their sha256 with the manifest's (which `verify` has checked against the files).
pub fn rederive(
    m: &manifest::Manifest,
    source: &std::path::Path,
    mode: manifest::Rederive,
    data: Option<&std::path::Path>,
) -> (manifest::RederiveReport, Vec<manifest::Problem>) {
    use manifest::{Problem, ProblemKind, RederiveReport, RederiveStatus};
    let (sample, mode_name) = match mode {
        manifest::Rederive::Sample(n) => (Some(n), "sample"),
        _ => (None, "full"),
    };
    let mut report = RederiveReport {
        status: RederiveStatus::NotChecked,
        mode: mode_name,
        sample,
        plan: None,
        tensors: Vec::new(),
        metadata_checked: false,
        imatrix: None,
        error: None,
    };
    let mut problems = Vec::new();
    let res = (|| -> Result<()> {
        let rec = m.options.target.as_ref().context("the manifest does not record the target's options")?;
        let to = To::parse(&rec.target)?.context("not a vllm/mlx target")?;
        let ck = Checkpoint::open(source).with_context(|| format!("cannot read checkpoint {}", source.display()))?;
        report.plan = Some(rec.target.clone());
        let recorded: std::collections::HashMap<&str, &manifest::TensorRecord> =
            m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let check = |plan_parts: Vec<(String, String, Vec<u64>)>, problems: &mut Vec<Problem>| {
            let mut seen = std::collections::HashSet::new();
            for (name, dtype, shape) in plan_parts {
                let ne: Vec<u64> = shape.iter().rev().copied().collect();
                match recorded.get(name.as_str()) {
                    Some(t) if t.dtype == dtype && t.ne == ne => {}
                    Some(t) => problems.push(Problem {
                        kind: ProblemKind::RederivedTensor,
                        file: Some(t.file.clone()),
                        tensor: Some(name.clone()),
                        message: format!("tensor {name}: the source and the recorded options give {dtype} {ne:?}; the manifest says {} {:?}", t.dtype, t.ne),
                    }),
                    None => problems.push(Problem {
                        kind: ProblemKind::RederivedTensor,
                        file: None,
                        tensor: Some(name.clone()),
                        message: format!("tensor {name}: the source and the recorded options give it, the manifest does not list it"),
                    }),
                }
                seen.insert(name);
            }
            for t in &m.tensors {
                if !seen.contains(&t.name) {
                    problems.push(Problem {
                        kind: ProblemKind::RederivedTensor,
                        file: Some(t.file.clone()),
                        tensor: Some(t.name.clone()),
                        message: format!(
                            "tensor {}: in the manifest, but the source and the recorded options do not give it",
                            t.name
                        ),
                    });
                }
            }
        };
        let allow = m.options.allow_nonfinite;
        // A calibrated artifact: the calibration pass runs again on the same data, into a scratch store.
        let mut tmp: Option<std::path::PathBuf> = None;
        let resolve = |rec: &manifest::TargetRecord,
                       ck: &Checkpoint,
                       planned: &mut Planned,
                       tmp: &mut Option<std::path::PathBuf>|
         -> Result<Option<std::sync::Arc<sling_pipeline::solved::Store>>> {
            let Some(cal) = &rec.calibration else { return Ok(None) };
            let data =
                data.with_context(|| {
                    format!(
                    "made with --method {} on calibration data {} (sha256 {}): give it with --data FILE to re-derive",
                    cal.method.name(), cal.data.name, cal.data.sha256
                )
                })?;
            let sha = crate::solve::file_sha256(data)?;
            if sha != cal.data.sha256 {
                bail!(
                    "--data {}: sha256 {sha}, but the artifact was calibrated on {} (sha256 {})",
                    data.display(),
                    cal.data.name,
                    cal.data.sha256
                );
            }
            let dir = std::env::temp_dir().join(format!("sling-verify-{}-{}", std::process::id(), &sha[..12]));
            *tmp = Some(dir.clone());
            let (store, folds) = crate::solve::replay(
                cal,
                data,
                ck,
                &grids_of(planned),
                &rec.target,
                &dir,
                &unsolvable_of(ck, planned),
            )?;
            if let Some(f) = &folds {
                fold_planned(planned, f)?;
            }
            Ok(Some(store))
        };
        let r = (|| -> Result<()> {
            match to {
                To::Vllm(_) | To::VllmAuto => {
                    let s = match to {
                        To::Vllm(s) => s,
                        _ => VLLM_AUTO_BASE,
                    };
                    let plan = match (&rec.recipe, to) {
                        (Some(r), _) => {
                            let mut plan = vllm_for_recipe(&ck, s, rec.strict)?;
                            vllm_with_recipe(s, &mut plan, "the recorded recipe", r, rec.strict)?;
                            plan
                        }
                        (None, To::VllmAuto) => bail!("a vllm:auto manifest without its recipe"),
                        (None, _) => vllm::plan(&ck, s, rec.strict)?,
                    };
                    check(parts_of(&plan), &mut problems);
                    let mut planned = Planned::Vllm(s, plan);
                    let solved = resolve(rec, &ck, &mut planned, &mut tmp)?;
                    let Planned::Vllm(_, plan) = planned else { unreachable!() };
                    let t = vllm::Vllm { scheme: s, solved, backend: None };
                    for i in pick(&plan, sample) {
                        let hashes = sling_pipeline::exec::part_sha256(&t, &ck, &plan, i, allow)?;
                        compare(&plan.weights[i], &hashes, &recorded, &mut problems, &mut report.tensors);
                    }
                }
                To::Mlx(_) | To::MlxAuto => {
                    let b = match to {
                        To::Mlx(b) => b,
                        _ => mlx::Bits(4),
                    };
                    let p = match (&rec.recipe, to) {
                        (Some(r), _) => mlx_with_recipe(&ck, b, rec.group_size, rec.strict, "the recorded recipe", r)?,
                        (None, To::MlxAuto) => bail!("an mlx:auto manifest without its recipe"),
                        (None, _) => mlx::plan(&ck, b, rec.group_size.unwrap_or(64), rec.strict)?,
                    };
                    check(parts_of(&p.plan), &mut problems);
                    let mut planned = Planned::Mlx(p);
                    let solved = resolve(rec, &ck, &mut planned, &mut tmp)?;
                    let Planned::Mlx(p) = planned else { unreachable!() };
                    let t = mlx::Mlx { solved, backend: None };
                    for i in pick(&p.plan, sample) {
                        let hashes = sling_pipeline::exec::part_sha256(&t, &ck, &p.plan, i, allow)?;
                        compare(&p.plan.weights[i], &hashes, &recorded, &mut problems, &mut report.tensors);
                    }
                }
            }
            Ok(())
        })();
        if let Some(d) = tmp {
            let _ = std::fs::remove_dir_all(d);
        }
        r
    })();
    match res {
        Ok(()) => {
            report.status = if problems.is_empty() { RederiveStatus::Verified } else { RederiveStatus::Mismatch };
        }
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    (report, problems)
}

fn parts_of<E>(p: &Plan<E>) -> Vec<(String, String, Vec<u64>)> {
    p.weights
        .iter()
        .flat_map(|w| &w.parts)
        .map(|t| (t.name.clone(), t.dtype.name().to_string(), t.shape.clone()))
        .collect()
}

/// Weights a sample of `n` recomputes: the middle of each of `n` equal runs of the plan, with the middle routed
/// expert in place of the nearest pick when none is routed (as the GGUF re-derivation samples); all for `None`.
fn pick<E>(p: &Plan<E>, n: Option<usize>) -> Vec<usize> {
    let len = p.weights.len();
    manifest::spread_sample(len, n.unwrap_or(len), |i| p.weights[i].role == sling_core::Role::RoutedExperts)
}

fn compare<E>(
    w: &sling_pipeline::Weight<E>,
    hashes: &[String],
    recorded: &std::collections::HashMap<&str, &manifest::TensorRecord>,
    problems: &mut Vec<manifest::Problem>,
    done: &mut Vec<String>,
) {
    for (part, sha) in w.parts.iter().zip(hashes) {
        done.push(part.name.clone());
        if let Some(t) = recorded.get(part.name.as_str()) {
            if t.sha256 != *sha {
                problems.push(manifest::Problem {
                    kind: manifest::ProblemKind::RederivedData,
                    file: Some(t.file.clone()),
                    tensor: Some(part.name.clone()),
                    message: format!(
                        "tensor {}: recomputed from the source it hashes to {sha}; the manifest says {}",
                        part.name, t.sha256
                    ),
                });
            }
        }
    }
}
