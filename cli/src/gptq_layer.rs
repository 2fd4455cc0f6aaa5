//! `sling gptq-layer` (developer command): GPTQ (or RTN) of one weight matrix on the grid of a vLLM integer scheme
//! or of MLX affine quantization, from a weight and its layer inputs (or a Hessian) in a safetensors file. What the
//! interop suite compares with llm-compressor's `quantize_weight`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sling_quantizers::ct::{IntArgs, IntGrid, ScaleDtype};
use sling_quantizers::gptq::{self, Grid, Options, Solution};
use sling_quantizers::mlx::AffineGrid;
use sling_targets::{vllm::Scheme, To};

pub const AFTER_HELP: &str = "IN holds `weight` F32 [rows, cols] and either `inputs` F32 [n, cols] (the Hessian is \
then 2/n Σ x xᵀ, accumulated in f64: llm-compressor's `accumulate_hessian` up to a positive factor, which GPTQ \
does not see) or, with --hessian, `hessian` F32/F64 [cols, cols]. OUT holds `dequant` F32 [rows, cols], `codes` \
[rows, cols] (I8 for vllm, U8 for mlx), `scales` and `zeros` F32 [rows, groups] (zero points as numbers; MLX \
biases). Prints one JSON line: loss (GPTQ's Σ err²/2), fallback (the Hessian was not positive definite: RTN), and \
with inputs err = ‖(W − Ŵ) Xᵀ‖² and rtn_err, the same for round to nearest.\n\n\
Example:\n  sling gptq-layer layer.safetensors --to vllm:w4a16 --act-order -o /tmp/q.safetensors";

#[derive(clap::Args)]
pub struct Args {
    /// Input .safetensors: `weight` and `inputs` (or `hessian` with --hessian).
    input: PathBuf,
    /// The grid: vllm:w4a16, vllm:w4a16-asym, vllm:w8a16 or mlx:BITS.
    #[arg(long)]
    to: String,
    /// Elements per group (default: 128 for vllm, 64 for mlx).
    #[arg(long)]
    group_size: Option<usize>,
    /// gptq or rtn.
    #[arg(long, default_value = "gptq")]
    method: String,
    /// Dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Columns per GPTQ block.
    #[arg(long, default_value_t = 128)]
    block: usize,
    /// Process columns by descending Hessian diagonal (llm-compressor actorder="weight").
    #[arg(long)]
    act_order: bool,
    /// IN holds `hessian` instead of `inputs`.
    #[arg(long)]
    hessian: bool,
    /// Scale dtype: bf16, f16 or f32 (compressed-tensors stores scales in the weight dtype; MLX likewise).
    #[arg(long, default_value = "bf16")]
    scale_dtype: String,
    /// Output .safetensors file.
    #[arg(short, long = "output")]
    output: PathBuf,
}

fn f32s(t: &TensorView, name: &str) -> Result<Vec<f32>> {
    if t.dtype() != Dtype::F32 {
        bail!("{name}: expected F32, found {:?}", t.dtype());
    }
    Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// 2/n Σ x xᵀ over the rows of `x` (`n × cols`), in f64, upper triangle mirrored.
fn hessian_of(x: &[f32], cols: usize) -> Vec<f64> {
    let n = x.len() / cols.max(1);
    let mut h = vec![0f64; cols * cols];
    let mut xd = vec![0f64; cols];
    for s in x.chunks_exact(cols) {
        for (d, &v) in xd.iter_mut().zip(s) {
            *d = f64::from(v);
        }
        for i in 0..cols {
            let xi = xd[i];
            for (hv, &xj) in h[i * cols + i..(i + 1) * cols].iter_mut().zip(&xd[i..]) {
                *hv += xi * xj;
            }
        }
    }
    let f = 2.0 / n.max(1) as f64;
    for i in 0..cols {
        for j in i..cols {
            let v = h[i * cols + j] * f;
            h[i * cols + j] = v;
            h[j * cols + i] = v;
        }
    }
    h
}

/// ‖(W − Ŵ) Xᵀ‖², in f64.
fn output_err(w: &[f32], dq: &[f32], x: &[f32], cols: usize) -> f64 {
    let diff: Vec<f64> = w.iter().zip(dq).map(|(a, b)| f64::from(*a) - f64::from(*b)).collect();
    let mut e = 0.0;
    for s in x.chunks_exact(cols) {
        for d in diff.chunks_exact(cols) {
            let v: f64 = d.iter().zip(s).map(|(a, &b)| a * f64::from(b)).sum();
            e += v * v;
        }
    }
    e
}

pub fn run(a: Args) -> Result<()> {
    let sd = match a.scale_dtype.to_ascii_lowercase().as_str() {
        "bf16" => ScaleDtype::BF16,
        "f16" => ScaleDtype::F16,
        "f32" => ScaleDtype::F32,
        other => bail!("--scale-dtype {other:?}: bf16, f16 or f32"),
    };
    let (grid, signed): (Box<dyn Grid>, bool) = match To::parse(&a.to)? {
        Some(To::Vllm(s)) => {
            let (bits, symmetric) = match s {
                Scheme::W4A16 { symmetric } => (4, symmetric),
                Scheme::W8A16 => (8, true),
                other => bail!("--to vllm:{}: GPTQ takes the integer schemes (w4a16, w4a16-asym, w8a16)", other.name()),
            };
            let group = Some(a.group_size.unwrap_or(128));
            (Box::new(IntGrid { args: IntArgs { bits, symmetric, group }, sd }), true)
        }
        Some(To::Mlx(b)) => (Box::new(AffineGrid { bits: b.0, group: a.group_size.unwrap_or(64), sd }), false),
        Some(t @ (To::MlxAuto | To::VllmAuto)) => {
            bail!("--to {}: chooses bits per weight; gptq-layer takes vllm:SCHEME or mlx:BITS", t.label())
        }
        None => bail!("--to {}: GPTQ takes vllm:w4a16, vllm:w4a16-asym, vllm:w8a16 or mlx:BITS", a.to),
    };
    let rtn_only = match a.method.as_str() {
        "gptq" => false,
        "rtn" => true,
        other => bail!("--method {other:?}: gptq or rtn"),
    };
    let bytes = std::fs::read(&a.input).with_context(|| format!("cannot read {}", a.input.display()))?;
    let st =
        SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a safetensors file", a.input.display()))?;
    let wt = st.tensor("weight").context("IN has no `weight` tensor")?;
    let [rows, cols] = wt.shape() else { bail!("weight: expected [rows, cols], found {:?}", wt.shape()) };
    let (rows, cols) = (*rows, *cols);
    let w = f32s(&wt, "weight")?;
    let (h, x) = if a.hessian {
        let ht = st.tensor("hessian").context("--hessian: IN has no `hessian` tensor")?;
        if ht.shape() != [cols, cols] {
            bail!("hessian: expected [{cols}, {cols}], found {:?}", ht.shape());
        }
        let h: Vec<f64> = match ht.dtype() {
            Dtype::F64 => {
                ht.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect()
            }
            Dtype::F32 => f32s(&ht, "hessian")?.into_iter().map(f64::from).collect(),
            d => bail!("hessian: expected F32 or F64, found {d:?}"),
        };
        (h, None)
    } else {
        let xt = st.tensor("inputs").context("IN has no `inputs` tensor (or pass --hessian)")?;
        if xt.shape().len() != 2 || xt.shape()[1] != cols {
            bail!("inputs: expected [n, {cols}], found {:?}", xt.shape());
        }
        let x = f32s(&xt, "inputs")?;
        (hessian_of(&x, cols), Some(x))
    };
    let o = Options { block: a.block, damp: a.damp, act_order: a.act_order };
    let rtn = gptq::rtn(&w, rows, cols, grid.as_ref())?;
    let s: Solution = if rtn_only { rtn.clone() } else { gptq::solve(&w, rows, cols, &h, grid.as_ref(), &o)? };

    let ng = s.params.len() / rows.max(1);
    let le = |v: &mut dyn Iterator<Item = f32>| v.flat_map(f32::to_le_bytes).collect::<Vec<u8>>();
    let dequant = le(&mut s.dequant.iter().copied());
    let scales = le(&mut s.params.iter().map(|p| p.scale));
    let zeros = le(&mut s.params.iter().map(|p| p.zero));
    let code_dtype = if signed { Dtype::I8 } else { Dtype::U8 };
    let views = vec![
        ("codes", TensorView::new(code_dtype, vec![rows, cols], &s.codes)?),
        ("dequant", TensorView::new(Dtype::F32, vec![rows, cols], &dequant)?),
        ("scales", TensorView::new(Dtype::F32, vec![rows, ng], &scales)?),
        ("zeros", TensorView::new(Dtype::F32, vec![rows, ng], &zeros)?),
    ];
    safetensors::tensor::serialize_to_file(views, None::<HashMap<String, String>>, &a.output)
        .with_context(|| format!("cannot write {}", a.output.display()))?;

    let mut j = serde_json::json!({"loss": s.loss, "fallback": s.fallback.is_some()});
    if let Some(x) = &x {
        j["err"] = output_err(&w, &s.dequant, x, cols).into();
        j["rtn_err"] = output_err(&w, &rtn.dequant, x, cols).into();
    }
    println!("{j}");
    Ok(())
}
