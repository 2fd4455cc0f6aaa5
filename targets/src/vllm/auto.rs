//! `--to vllm:auto --target-size SIZE | --target-bpw X`: each vLLM layer's integer width and group size chosen
//! under a size budget from measured sensitivities, stored as a compressed-tensors config with one config group per
//! encoding (`pack-quantized`, symmetric: what vLLM's WNA16/Marlin kernels run: 4 or 8 bits, groups 32, 64, 128),
//! or at source precision (listed in `ignore`).
//!
//! The choice is per unit vLLM loads as one layer ([`super::fused_unit`]): a layer's routed experts together (vLLM
//! requires one scheme for gate, up and down of every expert of a `FusedMoE`), q/k/v, gate/up, any other Linear on
//! its own. So unlike GGUF (a type per stacked projection) the three expert projections of a layer share a width.
//!
//! Measured as GGUF's and MLX's auto (`sling_quantizers::budget`): each candidate rounds the unit's sampled rows to
//! its grid exactly as the artifact holds them; the activation-weighted output error (routing-weighted per expert)
//! relative to the output's energy, summed over the unit's weights, is its cost, which probes turn into KL
//! divergence.

use rayon::prelude::*;
use sling_formats::checkpoint::Checkpoint;
use sling_pipeline::{Part, Plan, Weight};
use sling_quantizers::budget::{self, Allocation, Candidate, Measured, Sensitivity};
use sling_quantizers::ct::{IntArgs, IntGrid, ScaleDtype};
use sling_quantizers::gptq::Grid;

use super::{fused_unit, Enc};
use crate::recipe::Choice;
use crate::{read_error, TargetError};

/// One candidate encoding of a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Symmetric integers of `bits`, a scale per `group`.
    Int { bits: u32, group: u32 },
    /// The source precision, unquantized.
    Keep,
}

impl Kind {
    /// `w4a16/g128`, `keep`.
    pub fn label(&self) -> String {
        match self {
            Kind::Int { bits, group } => format!("w{bits}a16/g{group}"),
            Kind::Keep => "keep".into(),
        }
    }

    /// The recipe rule that makes it.
    pub fn choice(self) -> Choice {
        match self {
            Kind::Int { bits, group } => Choice::Quant { bits, group: Some(u64::from(group)) },
            Kind::Keep => Choice::Keep,
        }
    }
}

/// One unit the allocation chooses for: vLLM's layer name (`model.layers.3.mlp.experts`, `….self_attn.qkv`) and
/// its weights, as indices into the plan.
#[derive(Clone, Debug)]
pub struct Unit {
    pub name: String,
    pub weights: Vec<usize>,
}

/// The integer weights of `plan` grouped into units, in the order of each unit's first weight.
pub fn units(plan: &Plan<Enc>) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, w) in plan.weights.iter().enumerate() {
        if !matches!(w.enc, Enc::Int { .. }) {
            continue;
        }
        let name = fused_unit(w);
        match at.get(&name) {
            Some(&k) => out[k].weights.push(i),
            None => {
                at.insert(name.clone(), out.len());
                out.push(Unit { name, weights: vec![i] });
            }
        }
    }
    out
}

fn args(bits: u32, group: u32) -> IntArgs {
    IntArgs { bits, symmetric: true, group: Some(group as usize) }
}

/// Bytes of a `rows` × `cols` weight stored as `kind` with scales (or, kept, values) in `sd`: the tensors
/// [`super::int_parts`] lays out.
pub fn bytes_of(rows: u64, cols: u64, kind: Kind, sd: ScaleDtype) -> u64 {
    let e = sd.dtype().bytes_for(1).unwrap_or(2);
    match kind {
        // weight_packed (i32 words), a scale per group, weight_shape (two i64).
        Kind::Int { bits, group } => {
            rows * ((cols * u64::from(bits)).div_ceil(32) * 4 + cols / u64::from(group).max(1) * e) + 16
        }
        Kind::Keep => rows * cols * e,
    }
}

/// The scale dtype of an integer weight.
fn sd_of(w: &Weight<Enc>) -> ScaleDtype {
    match &w.enc {
        Enc::Int { sd, .. } => *sd,
        _ => ScaleDtype::BF16,
    }
}

/// The candidates of a unit, cheapest first (ties: fewer bits), the source precision last: every width and group
/// size vLLM takes whose group divides each weight's rows.
pub fn ladder(weights: &[&Weight<Enc>]) -> Vec<Kind> {
    let bytes = |k: Kind| weights.iter().map(|w| bytes_of(w.rows(), w.cols(), k, sd_of(w))).sum::<u64>();
    let mut v: Vec<Kind> = super::recipe::LIMITS
        .bits
        .iter()
        .flat_map(|&bits| super::recipe::LIMITS.groups.iter().map(move |&g| Kind::Int { bits, group: g as u32 }))
        .filter(|k| matches!(k, Kind::Int { group, .. } if weights.iter().all(|w| w.cols() % u64::from(*group) == 0)))
        .collect();
    v.sort_by_key(|&k| (bytes(k), k));
    v.push(Kind::Keep);
    v
}

/// Bytes of the artifact's weight files besides tensor data, an upper bound: each shard's 8-byte length and JSON
/// header (`{"dtype":…,"shape":[…],"data_offsets":[…,…]}` per stored tensor, 160 bytes besides the name at most), for
/// each weight's stored tensors whatever it becomes (at most four: packed values, scales, shape, zero points).
pub fn overhead_bytes(plan: &Plan<Enc>) -> u64 {
    plan.weights.iter().map(|w| 4 * (w.name.len() as u64 + 32 + 160)).sum::<u64>() + 4096
}

/// A weight's importance data: the mean squared input activation of each column (an imatrix entry's slice for
/// this matrix), and the share of the calibration tokens routed to it (1 for a dense weight).
pub struct Importance<'a> {
    pub weights: &'a [f32],
    pub freq: f64,
}

/// Measures every unit of `plan` at every candidate of its ladder. `importance` gives a weight's activation
/// statistics, when there are some.
pub fn measure<'i>(
    ck: &Checkpoint,
    plan: &Plan<Enc>,
    units: &[Unit],
    importance: &(dyn Fn(&Weight<Enc>) -> Option<Importance<'i>> + Sync),
    sample_rows: u64,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<Sensitivity<Kind>, TargetError> {
    let mut in_unit = vec![false; plan.weights.len()];
    units.iter().flat_map(|u| &u.weights).for_each(|&i| in_unit[i] = true);
    let (mut kept_bytes, mut elements) = (0, 0);
    for (w, chosen) in plan.weights.iter().zip(&in_unit) {
        elements += w.rows() * w.cols();
        if !chosen {
            kept_bytes += w.parts.iter().map(Part::n_bytes).sum::<u64>();
        }
    }
    let mut tensors = Vec::new();
    for (k, u) in units.iter().enumerate() {
        progress(k, units.len(), &u.name);
        tensors.push(measure_unit(ck, plan, u, importance, sample_rows)?);
        ck.release_pages();
    }
    progress(units.len(), units.len(), "");
    Ok(Sensitivity { tensors, kept_bytes, elements, overhead_bytes: overhead_bytes(plan) })
}

/// Rows of a weight a sample of `sample_rows` takes: every `step`-th.
fn step_of(w: &Weight<Enc>, sample_rows: u64) -> u64 {
    w.rows().div_ceil(sample_rows.max(1)).max(1)
}

fn measure_unit<'i>(
    ck: &Checkpoint,
    plan: &Plan<Enc>,
    u: &Unit,
    importance: &(dyn Fn(&Weight<Enc>) -> Option<Importance<'i>> + Sync),
    sample_rows: u64,
) -> Result<Measured<Kind>, TargetError> {
    let ws: Vec<&Weight<Enc>> = u.weights.iter().map(|&i| &plan.weights[i]).collect();
    let ladder = ladder(&ws);
    // Per weight: its sampled rows, error weights, and the factor from sampled rows to all of them.
    let sampled: Vec<(Vec<f32>, Vec<f64>, f64, bool)> = ws
        .par_iter()
        .map(|w| {
            let (rows, cols) = (w.rows(), w.cols());
            let step = step_of(w, sample_rows);
            let v = budget::sample_rows(0, rows, step, w.op.granule() / cols.max(1), cols, |a, b, out| {
                w.op.read(ck, a, b, out).map_err(|x| read_error(w, x))
            })?;
            let (ew, weighted) = match importance(w).filter(|i| i.weights.len() as u64 == cols) {
                Some(i) => (i.weights.iter().map(|&a| a as f64 * i.freq).collect(), true),
                None => (vec![1.0; cols as usize], false),
            };
            Ok((v, ew, rows as f64 / rows.div_ceil(step) as f64, weighted))
        })
        .collect::<Result<_, TargetError>>()?;
    let signal: f64 =
        ws.iter().zip(&sampled).map(|(w, (v, ew, scale, _))| budget::energy(v, ew, w.cols() as usize) * scale).sum();
    let candidates: Vec<Candidate<Kind>> = ladder
        .into_par_iter()
        .map(|kind| {
            let mut error = 0.0;
            if let Kind::Int { bits, group } = kind {
                for (w, (v, ew, scale, _)) in ws.iter().zip(&sampled) {
                    let g = IntGrid { args: args(bits, group), sd: sd_of(w) };
                    let cols = w.cols() as usize;
                    let mut back = v.clone();
                    back.chunks_exact_mut(cols).for_each(|r| g.roundtrip_row(r));
                    error += budget::weighted_error(v, &back, ew, cols) * scale;
                }
            }
            let relative = if signal > 0.0 { error / signal } else { 0.0 };
            let bytes = ws.iter().map(|w| bytes_of(w.rows(), w.cols(), kind, sd_of(w))).sum();
            Candidate { kind, bytes, error, relative, cost: relative }
        })
        .collect();
    if !signal.is_finite() || candidates.iter().any(|c| !c.cost.is_finite()) {
        return Err(TargetError::Unsupported(format!(
            "{}: the measured error is not a finite number (NaN or Inf in the weights?)",
            u.name
        )));
    }
    let rows: u64 = ws.iter().map(|w| w.rows()).sum();
    Ok(Measured {
        name: u.name.clone(),
        ne: vec![ws[0].cols(), rows],
        role: ws[0].role,
        signal,
        rows_measured: ws.iter().map(|w| w.rows().div_ceil(step_of(w, sample_rows))).sum(),
        rows,
        weighted: sampled.iter().any(|s| s.3),
        candidates,
        gain: None,
        exponent: 1.0,
        probes: Vec::new(),
    })
}

/// Rows `r0..r1` of `w` with every `k`-th row (at most `sample_rows` of it; the fraction is [`probe_fraction`])
/// rounded to `kind`, the other rows as they are: what a sensitivity probe substitutes.
pub fn roundtrip(
    ck: &Checkpoint,
    w: &Weight<Enc>,
    kind: Kind,
    sample_rows: u64,
    r0: u64,
    r1: u64,
) -> Result<Vec<f32>, TargetError> {
    let cols = w.cols() as usize;
    let step = step_of(w, sample_rows);
    let mut v = Vec::new();
    w.op.read(ck, r0, r1, &mut v).map_err(|x| read_error(w, x))?;
    if let Kind::Int { bits, group } = kind {
        let g = IntGrid { args: args(bits, group), sd: sd_of(w) };
        v.par_chunks_exact_mut(cols)
            .enumerate()
            .filter(|(i, _)| (r0 + *i as u64) % step == 0)
            .for_each(|(_, row)| g.roundtrip_row(row));
    }
    Ok(v)
}

/// The fraction of a unit's elements [`roundtrip`] rounds with `sample_rows`.
pub fn probe_fraction(ws: &[&Weight<Enc>], sample_rows: u64) -> f64 {
    let all: u64 = ws.iter().map(|w| w.rows() * w.cols()).sum();
    let probed: u64 = ws.iter().map(|w| w.rows().div_ceil(step_of(w, sample_rows)) * w.cols()).sum();
    probed as f64 / all.max(1) as f64
}

/// The allocation as a recipe ([`super::recipe`]): the quantized choice holding the most elements as the default,
/// one rule per unit. Applying it to the plan makes the allocated artifact; written out, `--recipe` makes it again.
pub fn recipe_toml(
    plan: &Plan<Enc>,
    units: &[Unit],
    sens: &Sensitivity<Kind>,
    a: &Allocation,
    description: &str,
) -> String {
    let (bits, group) = match sens.dominant(a, |k| k != Kind::Keep) {
        Some(Kind::Int { bits, group }) => (bits, u64::from(group)),
        _ => (4, 128),
    };
    let rules: Vec<(String, Choice)> = units
        .iter()
        .zip(sens.chosen(a))
        .map(|(u, (_, c))| {
            let names: Vec<&str> = u.weights.iter().map(|&i| plan.weights[i].name.as_str()).collect();
            (super::recipe::unit_pattern(&names), c.kind.choice())
        })
        .collect();
    super::recipe::toml(description, (bits, group), &rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_is_what_the_file_holds() {
        let row: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for (bits, group) in [(4, 32), (4, 128), (8, 64)] {
            let a = args(bits, group);
            let (mut codes, mut scales, mut zeros) = (Vec::new(), Vec::new(), Vec::new());
            sling_quantizers::ct::quantize_int_row(&row, &a, ScaleDtype::BF16, &mut codes, &mut scales, &mut zeros);
            let mut want = Vec::new();
            let scales: Vec<f32> = scales.iter().map(|&s| ScaleDtype::BF16.round(s)).collect();
            sling_quantizers::ct::dequantize_int_row(&codes, &scales, None, group as usize, &mut want);
            // As compressed-tensors decompresses: in the scale dtype.
            want.iter_mut().for_each(|x| *x = ScaleDtype::BF16.round(*x));
            let mut got = row.clone();
            IntGrid { args: a, sd: ScaleDtype::BF16 }.roundtrip_row(&mut got);
            assert_eq!(got, want, "{bits} bits, group {group}");
        }
    }

    #[test]
    fn bytes_are_the_stored_tensors() {
        for (bits, group, cols) in [(4, 32, 256), (8, 128, 384), (4, 64, 192)] {
            let parts = super::super::int_parts("m", 6, cols, args(bits, group), ScaleDtype::F16).0;
            let want: u64 = parts.iter().map(Part::n_bytes).sum();
            assert_eq!(bytes_of(6, cols, Kind::Int { bits, group }, ScaleDtype::F16), want, "{bits} {group} {cols}");
        }
        // 4 bits: 256/8 words of 4 bytes, 2 bf16 scales per row of 256 in groups of 128; weight_shape 16 bytes.
        assert_eq!(bytes_of(8, 256, Kind::Int { bits: 4, group: 128 }, ScaleDtype::BF16), 8 * (128 + 4) + 16);
        assert_eq!(bytes_of(8, 256, Kind::Int { bits: 8, group: 32 }, ScaleDtype::BF16), 8 * (256 + 16) + 16);
        assert_eq!(bytes_of(8, 256, Kind::Keep, ScaleDtype::BF16), 8 * 256 * 2);
    }
}
