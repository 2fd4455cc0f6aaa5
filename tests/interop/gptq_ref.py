#!/usr/bin/env python3
"""Reference GPTQ on one linear layer: llm-compressor 0.14's own GPTQ code, as `oneshot` runs it.

Run with llm-compressor's venv (scripts/setup-reference.sh makes it):
    $SLING_LAB/venv-llmc/bin/python tests/interop/gptq_ref.py IN.safetensors -o OUT.safetensors \
        [--bits 4|8] [--group 128] [--sym|--asym] [--actorder none|weight] [--damp 0.01] [--block 128] \
        [--scale-dtype bf16|f32] [--seq L] [--threads 1]
    $SLING_LAB/venv-llmc/bin/python tests/interop/gptq_ref.py --selftest [-o OUT.safetensors]   # random 256x256

IN.safetensors holds f32 `weight` [rows, cols] and either `inputs` [n, cols] (or [samples, seq, cols]) or
`hessian` [cols, cols]. OUT.safetensors gets f32 `dequant` [rows, cols] (GPTQ's weight as llm-compressor leaves it
in the module: the dequantized codes), `scales` and `zeros` [rows, cols/group], `codes` [rows, cols] (the integer
codes, recovered as round(dequant/scale) and checked to dequantize back exactly), `rtn` [rows, cols] (round to
nearest with the same qparams: compressed-tensors' fake_quantize of the module weight, what QuantizationModifier
without data stores), and `weight` (the weight as the module held it, i.e. rounded to --scale-dtype). One JSON line
on stdout: the GPTQ loss llm-compressor reports, ||(W - W^)X||^2 of GPTQ and RTN (X = the inputs, f64 sums; with
only a hessian: trace((W - W^) H (W - W^)^T) of the given H), their ratio, and the code statistics.

What runs, in llm-compressor's order (modifiers/gptq/base.py, GPTQModifier):
  1. an nn.Linear(cols, rows, bias=False) in the --scale-dtype (bf16 default: the model's dtype, as oneshot loads a
     bf16 checkpoint; compressed-tensors keeps scales in the weight's dtype), inside a one-module model;
  2. GPTQModifier(config_groups={QuantizationScheme(targets=[Linear], weights=QuantizationArgs(int, num_bits,
     strategy=group, group_size, symmetric, observer default = memoryless_minmax for weights))}, actorder,
     block_size, dampening_frac, batched_quantization=None): initialize_quantization() (apply_quantization_config)
     and start_calibration() (observers, calibration status) -- the modifier's own QuantizationMixin calls;
  3. the modifier's calibrate_module hook on every calibration batch: accumulate_hessian(inp [1, seq, cols]) --
     one sample (sequence) per call, as oneshot's sequential pipeline with batch_size 1 calls the module once per
     calibration sample. H = sum over calls of 2 X^T X (f32), num_samples = number of calls. --seq L splits the
     n input rows into n/L samples of L rows; default: one sample of all n rows. The split changes only the f32
     summation order and the normalisation H/num_samples; GPTQ's result is invariant to a uniform scale of H
     (dampening is relative to the mean diagonal), the reported `gptq_loss` is not;
  4. compress_module_list's steps: observe(weight) -> weight_observer.get_qparams() (scale, zero_point),
     prepare_batch (H / num_samples, stacked), quantize_weight(...) from modifiers/gptq/gptq_quantize.py,
     update_batch_qparams (weight = quantized in the module dtype, weight_scale, weight_zero_point).
Deterministic: a fixed thread count (--threads, default 1), no random state (--selftest seeds its inputs).

Numerics found in llm-compressor 0.14.0.1 / compressed-tensors 0.19.0 (CPU; the CUDA Triton kernel
_gptq_block_update_kernel does the same: div_rn in f32, DEQUANT_DTYPE bf16 rounds q*s to bf16):
  * scale: memoryless_minmax takes min/max of the weight in its own dtype; calculate_qparams computes
    scale = max(|min|, |max|) / (bit_range / 2) IN THE WEIGHT DTYPE (bf16 for a bf16 weight): absmax / 7.5 for int4
    symmetric (bit_range 15: codes -8..7), absmax / 127.5 for int8, rounded once to bf16 by that division. Asymmetric:
    scale = (max - min) / bit_range (min <= 0 <= max), zero_point = clamp(round(bit_min - min / scale)) as int8.
    Zero scales become the dtype's eps.
  * GPTQ codes (eager gptq_block_update -> fake_quantize(strategy=channel) -> _quantize_dequantize): the working
    column is f32 (GPTQ_PRECISION), the scale is the bf16-rounded one, so x / scale is an f32 division of f32 by
    the (exactly widened) bf16 scale; + zero_point (asym), clamp to [qmin, qmax], torch.round (half to even).
    Dequant: code.to(bf16) (- zp), times the bf16 scale, in bf16 -- q*s ROUNDED TO BF16 -- and that bf16 value is
    both the error fed back (w - q) / Hinv[i,i] and the module weight afterwards. The stored codes are recomputed at
    save (pack-quantized compressor: x / scale on the bf16 weight), which gives the same code back since
    |bf16(q*s) - q*s| < s/2.
  * RTN (QuantizationModifier without data, or fake_quantize on the bf16 weight): x / scale is a bf16 / bf16
    division, i.e. the quotient is ROUNDED TO BF16 before round-half-even. This can pick another code than the f32
    quotient when w/s is within bf16 rounding of a .5 tie (reported as `rtn_codes_f32_vs_bf16_division`).
  * With --scale-dtype f32 everything above is f32 (weight, scale, quotient, dequant).
sling (quantizers::gptq) uses: scale rounded to the stored dtype, division in f32 -- identical codes for GPTQ;
for RTN it can differ from llm-compressor at those near-ties; and sling's error feedback uses the exact q*s (f32)
where llm-compressor feeds back bf16(q*s) with a bf16 scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def build(a, W: torch.Tensor):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[a.scale_dtype]
    rows, cols = W.shape

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(cols, rows, bias=False, dtype=dtype)

    model = One()
    with torch.no_grad():
        model.proj.weight.copy_(W.to(dtype))
    qargs = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.sym, strategy="group", group_size=a.group)
    scheme = QuantizationScheme(targets=["Linear"], weights=qargs)
    mod = GPTQModifier(config_groups={"group_0": scheme}, actorder=None if a.actorder == "none" else a.actorder,
                       block_size=a.block, dampening_frac=a.damp, batched_quantization=None)
    mod.initialize_quantization(model)
    mod._module_names = {model.proj: "proj"}
    mod.start_calibration(model)
    return model, mod


def run(a, W: torch.Tensor, X: torch.Tensor | None, Hgiven: torch.Tensor | None) -> tuple[dict, dict]:
    from compressed_tensors.quantization import fake_quantize
    from compressed_tensors.utils import getattr_chain
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import prepare_batch, update_batch_qparams
    from llmcompressor.modifiers.quantization.calibration import observe

    model, mod = build(a, W)
    lin = model.proj
    w_module = lin.weight.detach().clone()                          # the weight as the module holds it
    quant_args = getattr_chain(lin, "quantization_scheme.weights")
    with torch.no_grad():
        if Hgiven is not None:
            mod._hessians[lin] = Hgiven.clone().float()
            mod._num_samples[lin] = torch.tensor(1.0)
        else:
            samples = [X[None]] if X.dim() == 2 and not a.seq else (
                list(X.split(1)) if X.dim() == 3 else [c[None] for c in X.split(a.seq)])
            for s in samples:                                       # the modifier's own forward hook body
                mod.calibrate_module(lin, (s.to(lin.weight.dtype) if a.input_in_dtype else s,), None)
        # GPTQModifier.on_sequential_epoch_end -> observe(weight) ; compress_module_list
        observe([lin], base_name="weight")
        qparams = lin.weight_observer.get_qparams()
        scale, zp = qparams["scale"].clone(), qparams["zero_point"].clone()
        weights, hessians, scales, zero_points, global_scales = prepare_batch(
            [lin], [qparams], mod._hessians, mod._num_samples)
        H_norm = hessians[0].clone()
        quantized, losses, fallback = quantize_weight(
            weights=weights, hessians=hessians, scale=scales, zero_point=zero_points, global_scale=global_scales,
            quant_args=quant_args, blocksize=a.block, percdamp=a.damp)
        update_batch_qparams([lin], quantized, scales, zero_points, global_scales, quant_args)
        dequant = lin.weight.detach().clone()
        rtn = fake_quantize(w_module, scale, zp, quant_args)

        # codes: round(dequant / scale) per group, checked to dequantize back to the module's weight exactly
        g = a.group
        s_full = scale.float().repeat_interleave(g, dim=1)
        z_full = zp.float().repeat_interleave(g, dim=1)
        codes = torch.round(dequant.float() / s_full + (0 if a.sym else z_full))
        back = ((codes.to(scale.dtype) - (0 if a.sym else zp.to(scale.dtype).repeat_interleave(g, dim=1)))
                * scale.repeat_interleave(g, dim=1))
        codes_exact = bool(torch.equal(back.to(dequant.dtype), dequant))
        # RTN codes with an f32 division vs compressed-tensors' division in the weight dtype
        qmin, qmax = (-(2 ** (a.bits - 1)), 2 ** (a.bits - 1) - 1) if a.sym else (-(2 ** (a.bits - 1)), 2 ** (a.bits - 1) - 1)
        c32 = torch.clamp(torch.round(w_module.float() / s_full + (0 if a.sym else z_full)), qmin, qmax)
        cdt = torch.clamp(torch.round((w_module / scale.repeat_interleave(g, dim=1)).float() + (0 if a.sym else z_full)),
                          qmin, qmax)
        rtn_codes = torch.round(rtn.float() / s_full + (0 if a.sym else z_full))

        Wf = w_module.double()
        if X is not None:
            Xf = X.reshape(-1, X.shape[-1]).double()
            err = lambda Q: float(((Wf - Q.double()) @ Xf.T).square().sum())  # noqa: E731
        else:
            Hd = Hgiven.double()
            err = lambda Q: float(torch.einsum("rc,cd,rd->", Wf - Q.double(), Hd, Wf - Q.double()))  # noqa: E731
        e_gptq, e_rtn = err(dequant), err(rtn)
    stats = {
        "rows": W.shape[0], "cols": W.shape[1], "bits": a.bits, "group": a.group, "sym": a.sym, "actorder": a.actorder,
        "damp": a.damp, "block": a.block, "scale_dtype": a.scale_dtype, "weight_dtype": str(w_module.dtype),
        "scale_tensor_dtype": str(scale.dtype), "zero_point_dtype": str(zp.dtype),
        "samples": None if X is None else (len(samples)), "gptq_loss": float(losses[0]),
        "rtn_fallback": bool(fallback[0]), "err_gptq": e_gptq, "err_rtn": e_rtn, "ratio_gptq_over_rtn": e_gptq / e_rtn,
        "codes_dequantize_exactly": codes_exact, "codes_min": int(codes.min()), "codes_max": int(codes.max()),
        "rtn_codes_f32_vs_bf16_division": int((c32 != cdt).sum()),
        "rtn_codes_equal_dtype_division": bool(torch.equal(rtn_codes, cdt)),
        "gptq_codes_differing_from_rtn": int((codes != rtn_codes).sum()),
    }
    tensors = {"dequant": dequant.float(), "scales": scale.float(), "zeros": zp.float(), "codes": codes.float(),
               "rtn": rtn.float(), "weight": w_module.float(), "hessian_normalized": H_norm.float()}
    return stats, tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", nargs="?")
    ap.add_argument("-o", "--out")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--group", type=int, default=128)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True)
    g.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--actorder", choices=("none", "weight", "static"), default="none",
                    help="llm-compressor's GPTQModifier default is static (= weight); default here: none")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--scale-dtype", choices=("bf16", "f32", "f16"), default="bf16",
                    help="the module's (weight's) dtype, hence the scale's")
    ap.add_argument("--seq", type=int, default=0, help="rows per calibration sample (default: one sample of all)")
    ap.add_argument("--input-in-dtype", action="store_true",
                    help="round the inputs to the module dtype first (the activations of a bf16 model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--selftest", action="store_true", help="random 256x256 layer, 512 inputs (seeded)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)

    from safetensors.torch import load_file, save_file
    if a.selftest:
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(256, 256, generator=gen) * 0.02
        # correlated inputs with uneven column energy (random isotropic inputs make GPTQ ~ RTN)
        mix = torch.randn(256, 256, generator=gen) / 16
        X = (torch.randn(512, 256, generator=gen) @ mix) * torch.exp(torch.randn(256, generator=gen))
        Hg = None
        if a.input:
            save_file({"weight": W, "inputs": X}, a.input)
    else:
        if not a.input:
            ap.error("IN.safetensors (or --selftest)")
        t = load_file(a.input)
        W = t["weight"].float()
        X = t["inputs"].float() if "inputs" in t else None
        Hg = t["hessian"].float() if "hessian" in t and X is None else None
        if X is None and Hg is None:
            sys.exit("input needs `inputs` or `hessian`")
    stats, tensors = run(a, W, X, Hg)
    import importlib.metadata as md
    stats["versions"] = {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "torch")}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, a.out, metadata={"stats": json.dumps(stats)})
    print(json.dumps(stats))
    if a.selftest:
        assert stats["codes_dequantize_exactly"], stats
        assert stats["ratio_gptq_over_rtn"] < 1.0, stats
    return 0


if __name__ == "__main__":
    sys.exit(main())
