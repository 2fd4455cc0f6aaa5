//! `--to mlx:auto --target-size SIZE | --target-bpw X`: each weight's bits and group size chosen under a size
//! budget from measured sensitivities, stored the way mlx-lm stores mixed precision (its `mixed_*` recipes and
//! `dynamic_quant`): a per-module `{"bits", "group_size"}` override in `config.json`'s `quantization` block, which
//! `mlx_lm.load` hands to `nn.quantize` module by module. A weight whose best choice is its source precision is
//! stored unquantized, without `.scales` (the loader then leaves the module as it is). Routed experts are one
//! `SwitchLinear` per layer and projection in mlx-lm, so the choice is per stacked projection, never per expert;
//! routers keep mlx-lm's 8 bits, group 64.
//!
//! Measured like GGUF's auto (`sling_quantizers::budget`): for each candidate the weight's sampled rows are
//! rounded to the affine grid exactly as the artifact will hold them, and the activation-weighted output error
//! (routing-weighted per expert) relative to the output's energy is the candidate's cost, which probes turn into
//! KL divergence.

use rayon::prelude::*;
use sling_core::{DType, Role};
use sling_formats::checkpoint::Checkpoint;
use sling_pipeline::{Part, Weight};
use sling_quantizers::budget::{self, Allocation, Candidate, Measured, Sensitivity};
use sling_quantizers::ct::ScaleDtype;
use sling_quantizers::gptq::Grid;
use sling_quantizers::mlx::AffineGrid;

use super::{Enc, MlxPlan, RouterQuant, GROUP_SIZES};
use crate::{read_error, TargetError};

/// Bit widths the ladder takes (MLX's affine mode; 1 bit is left out: no mlx-lm recipe uses it).
pub const BITS: &[u32] = &[2, 3, 4, 5, 6, 8];

/// One candidate encoding of a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Affine {
        bits: u32,
        group: u32,
    },
    /// The source precision, unquantized.
    Keep,
}

impl Kind {
    /// `4b/g64`, `keep`.
    pub fn label(&self) -> String {
        match self {
            Kind::Affine { bits, group } => format!("{bits}b/g{group}"),
            Kind::Keep => "keep".into(),
        }
    }
}

/// A weight's importance data: `cols * n_mat` mean squared input activations (an imatrix entry: expert `e` at
/// `e * cols`) and the tokens each matrix saw.
pub struct Importance {
    pub weights: Vec<f32>,
    pub counts: Vec<i64>,
}

/// The stored tensors of `module` (`lead` + `[cols]` its shape) at `bits`, group `g`, scales in `sd`.
pub(crate) fn affine_parts(module: &str, lead: &[u64], cols: u64, bits: u32, g: u64, sd: ScaleDtype) -> Vec<Part> {
    let shape = |last: u64| {
        let mut s = lead.to_vec();
        s.push(last);
        s
    };
    let sdt = sd.dtype();
    vec![
        Part::new(format!("{module}.weight"), DType::U32, shape(cols * u64::from(bits) / 32)),
        Part::new(format!("{module}.scales"), sdt, shape(cols / g)),
        Part::new(format!("{module}.biases"), sdt, shape(cols / g)),
    ]
}

/// Bytes of a weight of `rows` × `cols` stored as `kind` with scales (or, kept, values) in `sd`.
pub fn bytes_of(rows: u64, cols: u64, kind: Kind, sd: ScaleDtype) -> u64 {
    let e = sd.dtype().bytes_for(1).unwrap_or(2);
    match kind {
        Kind::Affine { bits, group } => rows * (cols * u64::from(bits) / 32 * 4 + 2 * (cols / u64::from(group)) * e),
        Kind::Keep => rows * cols * e,
    }
}

/// The candidates of a weight with rows of `cols`, cheapest first (ties: fewer bits), the source precision last.
pub fn ladder(rows: u64, cols: u64, sd: ScaleDtype) -> Vec<Kind> {
    let mut v: Vec<Kind> = BITS
        .iter()
        .flat_map(|&bits| GROUP_SIZES.iter().map(move |&g| Kind::Affine { bits, group: g as u32 }))
        .filter(|k| matches!(k, Kind::Affine { group, .. } if cols % u64::from(*group) == 0))
        .collect();
    v.sort_by_key(|&k| (bytes_of(rows, cols, k, sd), k));
    v.push(Kind::Keep);
    v
}

/// The scales' dtype of an affine weight.
fn affine_sd(w: &Weight<Enc>) -> Option<ScaleDtype> {
    match &w.enc {
        Enc::Affine { sd, .. } => Some(*sd),
        _ => None,
    }
}

/// Whether the allocation chooses this weight's encoding: every affine weight but the routers the model's
/// `quant_predicate` sets (8 bits, group 64: [`RouterQuant::Eight`]).
fn chosen(p: &MlxPlan, w: &Weight<Enc>) -> Option<ScaleDtype> {
    affine_sd(w).filter(|_| !(w.role == Role::Router && p.arch.router == RouterQuant::Eight))
}

/// Bytes of the artifact's weight files besides tensor data, an upper bound: each shard's 8-byte length and JSON
/// header (`{"dtype":…,"shape":[…],"data_offsets":[…,…]}` per stored tensor, 160 bytes besides the name at
/// most), for each weight's three stored tensors whatever it becomes.
pub fn overhead_bytes(p: &MlxPlan) -> u64 {
    let names: u64 = p.plan.weights.iter().map(|w| 3 * (w.name.len() as u64 + 160)).sum();
    names + 4096
}

/// Measures every weight whose encoding the allocation chooses, at every candidate of its ladder. `importance`
/// gives a weight's imatrix data, when there is one.
pub fn measure<'i>(
    ck: &Checkpoint,
    p: &MlxPlan,
    importance: &(dyn Fn(&Weight<Enc>) -> Option<&'i Importance> + Sync),
    sample_rows: u64,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<Sensitivity<Kind>, TargetError> {
    let imp: Vec<Option<&Importance>> =
        p.plan.weights.iter().map(|w| chosen(p, w).and_then(|_| importance(w))).collect();
    let tokens = imp.iter().flatten().flat_map(|i| i.counts.iter().copied()).max().unwrap_or(0).max(1) as f64;
    let (mut kept_bytes, mut elements, mut tensors) = (0, 0, Vec::new());
    let todo: Vec<usize> = (0..p.plan.weights.len()).filter(|&i| chosen(p, &p.plan.weights[i]).is_some()).collect();
    for w in &p.plan.weights {
        elements += w.rows() * w.cols();
        if chosen(p, w).is_none() {
            kept_bytes += w.parts.iter().map(Part::n_bytes).sum::<u64>();
        }
    }
    for (k, &i) in todo.iter().enumerate() {
        let w = &p.plan.weights[i];
        progress(k, todo.len(), &w.name);
        tensors.push(measure_weight(ck, w, imp[i], tokens, sample_rows)?);
        ck.release_pages();
    }
    progress(todo.len(), todo.len(), "");
    Ok(Sensitivity { tensors, kept_bytes, elements, overhead_bytes: overhead_bytes(p) })
}

/// Matrices of a weight (stacked experts) and rows of each.
fn mats(w: &Weight<Enc>) -> (u64, u64) {
    let n = match &w.enc {
        Enc::Affine { experts, .. } if !experts.is_empty() => experts.len() as u64,
        // one source tensor of stacked experts (a bf16 gpt-oss's): `[E, out, in]`
        _ if w.role == Role::RoutedExperts => match w.parts.first().map(|p| &p.shape[..]) {
            Some(&[e, _, _]) if e > 0 && w.rows() % e == 0 => e,
            _ => 1,
        },
        _ => 1,
    };
    (n, w.rows() / n)
}

fn measure_weight(
    ck: &Checkpoint,
    w: &Weight<Enc>,
    imp: Option<&Importance>,
    tokens: f64,
    sample_rows: u64,
) -> Result<Measured<Kind>, TargetError> {
    let (rows, cols) = (w.rows(), w.cols());
    let sd = affine_sd(w).unwrap_or(ScaleDtype::BF16);
    let (n_mat, per_mat) = mats(w);
    let step = per_mat.div_ceil(sample_rows.max(1)).max(1);
    let imp = imp.filter(|i| i.weights.len() as u64 == cols * n_mat);
    let is_embd = w.role == Role::Embeddings;
    // Per matrix: its sampled rows and its error weights.
    let sampled: Vec<(Vec<f32>, Vec<f64>)> = (0..n_mat)
        .into_par_iter()
        .map(|e| {
            let v = sample_rows_of(ck, w, e * per_mat, (e + 1) * per_mat, step)?;
            let ew = match imp {
                Some(i) => {
                    let freq = match i.counts.get(e as usize) {
                        Some(&c) if i.counts.len() as u64 == n_mat => c.max(1) as f64 / tokens,
                        _ => 1.0,
                    };
                    i.weights[(e * cols) as usize..((e + 1) * cols) as usize].iter().map(|&a| a as f64 * freq).collect()
                }
                None => vec![if is_embd { 1.0 / per_mat as f64 } else { 1.0 }; cols as usize],
            };
            Ok((v, ew))
        })
        .collect::<Result<_, TargetError>>()?;
    let scale = per_mat as f64 / per_mat.div_ceil(step) as f64;
    let signal: f64 = sampled.iter().map(|(v, ew)| budget::energy(v, ew, cols as usize)).sum::<f64>() * scale;
    let candidates: Vec<Candidate<Kind>> = ladder(rows, cols, sd)
        .into_par_iter()
        .map(|kind| {
            let mut error = 0.0;
            if let Kind::Affine { bits, group } = kind {
                let g = AffineGrid { bits, group: group as usize, sd };
                for (v, ew) in &sampled {
                    let mut back = v.clone();
                    back.chunks_exact_mut(cols as usize).for_each(|r| g.roundtrip_row(r));
                    error += budget::weighted_error(v, &back, ew, cols as usize);
                }
                error *= scale;
            }
            let relative = if signal > 0.0 { error / signal } else { 0.0 };
            Candidate { kind, bytes: bytes_of(rows, cols, kind, sd), error, relative, cost: relative }
        })
        .collect();
    if !signal.is_finite() || candidates.iter().any(|c| !c.cost.is_finite()) {
        return Err(TargetError::Unsupported(format!(
            "{}: the measured error is not a finite number (NaN or Inf in the weights?)",
            w.name
        )));
    }
    Ok(Measured {
        name: w.name.clone(),
        ne: vec![cols, rows],
        role: w.role,
        signal,
        rows_measured: n_mat * per_mat.div_ceil(step),
        rows,
        weighted: imp.is_some(),
        candidates,
        gain: None,
        exponent: 1.0,
        probes: Vec::new(),
    })
}

/// Every `step`-th row of `r0..r1` of `w` ([`budget::sample_rows`], a block at a time where the op makes blocks).
fn sample_rows_of(ck: &Checkpoint, w: &Weight<Enc>, r0: u64, r1: u64, step: u64) -> Result<Vec<f32>, TargetError> {
    let cols = w.cols().max(1);
    let mut v = budget::sample_rows(r0, r1, step, w.op.granule() / cols, cols, |a, b, out| {
        w.op.read(ck, a, b, out).map_err(|x| read_error(w, x))
    })?;
    super::as_written(w, &mut v);
    Ok(v)
}

/// Rows `r0..r1` of `w` with every `k`-th row of each expert (at most `sample_rows` of each; the fraction is
/// [`probe_fraction`]) rounded to `kind`, the other rows as they are: what a sensitivity probe substitutes.
pub fn roundtrip(
    ck: &Checkpoint,
    w: &Weight<Enc>,
    kind: Kind,
    sample_rows: u64,
    r0: u64,
    r1: u64,
) -> Result<Vec<f32>, TargetError> {
    let cols = w.cols() as usize;
    let (_, per_mat) = mats(w);
    let step = per_mat.div_ceil(sample_rows.max(1)).max(1);
    let mut v = Vec::new();
    w.op.read(ck, r0, r1, &mut v).map_err(|x| read_error(w, x))?;
    if let (Kind::Affine { bits, group }, Some(sd)) = (kind, affine_sd(w)) {
        let g = AffineGrid { bits, group: group as usize, sd };
        v.par_chunks_exact_mut(cols)
            .enumerate()
            .filter(|(i, _)| ((r0 + *i as u64) % per_mat.max(1)) % step == 0)
            .for_each(|(_, row)| {
                super::as_written(w, row);
                g.roundtrip_row(row)
            });
    }
    Ok(v)
}

/// The fraction of `w`'s rows [`roundtrip`] rounds with `sample_rows`.
pub fn probe_fraction(w: &Weight<Enc>, sample_rows: u64) -> f64 {
    let (_, per_mat) = mats(w);
    let step = per_mat.div_ceil(sample_rows.max(1)).max(1);
    per_mat.div_ceil(step) as f64 / per_mat.max(1) as f64
}

/// The weights of `p` the allocation chose for, in [`Sensitivity::tensors`] order (indices into the plan).
pub fn measured_weights(p: &MlxPlan) -> Vec<usize> {
    (0..p.plan.weights.len()).filter(|&i| chosen(p, &p.plan.weights[i]).is_some()).collect()
}

/// The allocation as a recipe ([`super::recipe`]): the quantized choice holding the most elements as the default
/// (the `quantization` block's `bits` and `group_size`), one anchored rule per measured weight. Applying it to the
/// plan makes the allocated artifact; written out, `--recipe` makes it again.
pub fn recipe_toml(sens: &Sensitivity<Kind>, a: &Allocation, description: &str, fallback: (u32, u64)) -> String {
    // The default: the quantized choice holding the most elements.
    let (bits, group) = match sens.dominant(a, |k| k != Kind::Keep) {
        Some(Kind::Affine { bits, group }) => (bits, u64::from(group)),
        _ => fallback,
    };
    let choices: Vec<(String, Kind)> = sens.chosen(a).map(|(m, c)| (m.name.clone(), c.kind)).collect();
    super::recipe::Recipe::toml(description, bits, group, &choices)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stacked experts are measured (and imatrix-weighted, routing-weighted) one matrix per expert, whether the
    /// checkpoint stores them apart (Qwen3-MoE) or as one tensor (bf16 gpt-oss); anything else is one matrix.
    #[test]
    fn stacked_experts_are_one_matrix_per_expert() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
        for (name, weight, n) in [
            ("gptoss", "model.layers.0.mlp.experts.gate_proj.weight", 4),
            ("gptoss", "model.layers.0.mlp.experts.down_proj.weight", 4),
            ("qwen3moe", "model.layers.0.mlp.switch_mlp.up_proj.weight", 8),
            ("deepseekv3", "model.layers.0.self_attn.unembed_out.weight", 1),
            ("qwen3moe", "model.layers.0.self_attn.q_proj.weight", 1),
        ] {
            let ck = Checkpoint::open(&root.join(name)).unwrap();
            let p = super::super::plan(&ck, super::super::Bits(4), 32, false).unwrap();
            let w = p.plan.weights.iter().find(|w| w.name == weight).unwrap_or_else(|| panic!("{name} {weight}"));
            assert_eq!(mats(w), (n, w.rows() / n), "{name} {weight}");
        }
    }

    /// A probe rounding every row substitutes exactly what the artifact holds ([`super::super::rows_as_stored`]),
    /// DeepSeek FP8 sources rounded to BF16 first as the writer rounds them (and as the measurement reads them).
    #[test]
    fn probes_round_fp8_sources_as_the_writer_does() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
        let ck = Checkpoint::open(&root.join("deepseekv3-fp8")).unwrap();
        let p = super::super::plan(&ck, super::super::Bits(4), 32, false).unwrap();
        let mut seen = 0;
        for w in p.plan.weights.iter().filter(|w| super::super::from_fp8(&w.op)) {
            let Enc::Affine { bits, group, .. } = w.enc else { continue };
            let kind = Kind::Affine { bits, group: group as u32 };
            let all = roundtrip(&ck, w, kind, w.rows(), 0, w.rows()).unwrap();
            assert_eq!(all, super::super::rows_as_stored(&ck, w, 0, w.rows()).unwrap(), "{}", w.name);
            let mut raw = Vec::new();
            w.op.read(&ck, 0, w.rows(), &mut raw).unwrap();
            let measured = sample_rows_of(&ck, w, 0, w.rows(), 1).unwrap();
            assert_ne!(measured, raw, "{}: FP8 values BF16 cannot hold", w.name);
            assert!(measured.iter().all(|x| half::bf16::from_f32(*x).to_f32() == *x), "{}", w.name);
            seen += 1;
        }
        assert!(seen > 0, "no FP8 weight quantized");
    }

    #[test]
    fn ladder_is_cheapest_first_and_fits_the_rows() {
        let l = ladder(8, 128, ScaleDtype::BF16);
        assert_eq!(l.first(), Some(&Kind::Affine { bits: 2, group: 128 }));
        assert_eq!(l.last(), Some(&Kind::Keep));
        assert_eq!(l.len(), BITS.len() * 3 + 1);
        let b: Vec<u64> = l.iter().map(|&k| bytes_of(8, 128, k, ScaleDtype::BF16)).collect();
        assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
        // 4 bits, group 64, bf16 scales: 4.5 bits per weight.
        assert_eq!(bytes_of(8, 128, Kind::Affine { bits: 4, group: 64 }, ScaleDtype::BF16) * 8, 8 * 128 * 9 / 2);
        // Rows of 96: group 32 only.
        assert!(ladder(1, 96, ScaleDtype::BF16)
            .iter()
            .all(|k| matches!(k, Kind::Affine { group: 32, .. } | Kind::Keep)));
    }

    #[test]
    fn roundtrip_is_what_the_file_holds() {
        let row: Vec<f32> = (0..128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for bits in [2, 3, 4, 8] {
            let g = AffineGrid { bits, group: 64, sd: ScaleDtype::BF16 };
            let (mut packed, mut scales, mut biases) = (Vec::new(), Vec::new(), Vec::new());
            sling_quantizers::mlx::quantize_affine_row(&row, bits, 64, g.sd, &mut packed, &mut scales, &mut biases);
            let mut want = Vec::new();
            sling_quantizers::mlx::dequantize_affine_row(&packed, bits, 64, 128, &scales, &biases, &mut want);
            let mut got = row.clone();
            g.roundtrip_row(&mut got);
            assert_eq!(got, want, "{bits} bits");
        }
    }
}
