#!/usr/bin/env python3
"""Reference AWQ scale search on one mapping (a norm -> one or more linears): llm-compressor 0.14's own AWQModifier.

Run with llm-compressor's venv (scripts/setup-reference.sh makes it):
    $SLING_LAB/venv-llmc/bin/python tests/interop/awq_ref.py IN.safetensors [-o OUT.safetensors] \
        [--bits 4|8] [--group 128] [--sym|--asym] [--n-grid 20] [--duo true|false|both] [--dtype f32|bf16] \
        [--seq L] [--threads 1]
    $SLING_LAB/venv-llmc/bin/python tests/interop/awq_ref.py --selftest [IN.safetensors] [-o OUT.safetensors]

IN.safetensors holds f32 `weight` [rows, cols] (or several `weight.0`, `weight.1`, ... [rows_i, cols] that read the
same input) and `inputs` [n, cols]: the inputs of the linears, i.e. the output of the smooth layer (the norm).
--selftest makes a seeded random 256x256 layer with 512 inputs whose channels 3, 77, 130, 201 are scaled x20
(and writes it to IN.safetensors when given).

sling's regression data (quantizers/tests/data/awq_llmc_reference.json, checked by quantizers/tests/awq.rs
`awq_matches_llm_compressor`): `SLING_AWQ_CASE_DIR=D cargo test -p sling-quantizers --test awq -- --ignored
write_awq_reference_cases`, run this on D/awq_case_single.safetensors and D/awq_case_multi.safetensors with -o, and
store each JSON line under "single" / "multi" with the output's `x_mean` added as a list.

OUT.safetensors gets, per linear i (suffix `.i` only with several): `eff` [rows, cols] = Q(W.s)/s (the smoothed,
quantized, dequantized weight with the scales folded back: it computes what the smoothed model computes, in the
original input space), `rtn` = Q(W) (round to nearest, no smoothing), `smoothed` = W.s (what AWQModifier leaves in
the module), plus `scales` [cols] (AWQ's best scales; the norm weight becomes norm/scales) and `norm` [cols] (the
ones-norm after `_apply_smoothing`, = 1/scales). One JSON line on stdout: the chosen ratio and duo flag,
sum_i ||(W_i - eff_i) X||^2 and sum_i ||(W_i - rtn_i) X||^2 (f64, X = the inputs), their ratio, the loss of every
grid point as llm-compressor computes it (MSE of the parent's output, normalised by its element count) and its own
initial/best error metrics.

What runs (llmcompressor/modifiers/transform/awq/base.py):
  1. a toy module `Parent` whose linears lin0, lin1, ... (nn.Linear(cols, rows_i, bias=False) in --dtype) read the
     same input and whose output is their outputs concatenated -- so llm-compressor's loss, the MSE of the parent's
     output, is sum_i ||(W_i - Q(W_i s)/s) X||^2 / (n sum_i rows_i): for one linear exactly what AWQModifier
     measures for the v_proj -> o_proj and up_proj -> down_proj mappings, whose parent (the lowest common ancestor
     of a single balance layer) is the balance layer itself; and a 1-D `norm` weight (ones) as the smooth layer;
  2. QuantizationModifier(config_groups={W(int, bits, group, symmetric), targets Linear}).initialize_quantization +
     start_calibration: the quantization scheme and weight observers on the linears, as oneshot sets them up before
     AWQModifier.on_calibration_start;
  3. AWQModifier(n_grid, duo_scaling) with one ResolvedMapping(norm -> lin0, lin1, ..., parent = Parent), its
     activation hooks (cache_parent_kwargs_hook on Parent, cache_smooth_activations_hook on lin0) fed by running
     Parent on every calibration sample (--seq L rows each; default: one sample of all n rows), then
     `_apply_smoothing` itself: `_compute_best_scale` (grid search, memoryless_minmax observer on W.s,
     forward_quantize, / s, `_compute_loss`) and `_smooth` (linears *= s, norm /= s);
  4. Q(W.s) for the output: the same memoryless_minmax observer + update_qparams + forward_quantize on the smoothed
     module weight (what the QuantizationModifier that follows AWQ computes for it with a memoryless_minmax weight
     observer), divided by the scales.
The chosen ratio is not returned by llm-compressor; it is recovered by recomputing every grid point's scales with
the formula of `_compute_best_scale` and matching them exactly against the best scales.
On a machine without CUDA, IntermediatesCache.pin_memory (called by _apply_smoothing; it only pins host memory) is
replaced by a no-op, since pinning needs a driver.
Deterministic: a fixed thread count (--threads, default 1), no random state (--selftest seeds its inputs).

Precision notes (llm-compressor 0.14.0.1): `_compute_layer_means` sums in float64 (get_high_precision), so with duo
scaling the scales are float64 (x_mean.pow(r) in f32, divided by the f64 w_mean.pow(1-r) + 1e-4); W.s is computed in
f64 and stored in the module dtype; Q(W.s) / s is again f64, cast back to the module dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


class Parent(torch.nn.Module):
    def __init__(self, shapes, cols, dtype):
        super().__init__()
        self.lins = [torch.nn.Linear(cols, r, bias=False, dtype=dtype) for r in shapes]
        for i, lin in enumerate(self.lins):
            self.add_module(f"lin{i}", lin)

    def forward(self, hidden_states):
        return torch.cat([lin(hidden_states) for lin in self.lins], dim=-1)


class Norm(torch.nn.Module):
    def __init__(self, cols, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(cols, dtype=dtype))

    def forward(self, x):  # not run: the inputs given are already its output
        return x * self.weight


class Toy(torch.nn.Module):
    def __init__(self, shapes, cols, dtype):
        super().__init__()
        self.norm = Norm(cols, dtype)
        self.parent = Parent(shapes, cols, dtype)


def grid_params(n_grid: int, duo) -> list[tuple[float, bool]]:
    """`AWQModifier._get_grid_search_params`."""
    if duo == "both":
        n = int(n_grid / 2)
        return [(i / (n - 1), d) for i in range(n) for d in (False, True)]
    if duo is False:
        return [(i / (n_grid - 1), False) for i in range(n_grid)]
    return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]


def point_scales(x_mean, w_mean, ratio, duo):
    """The scales of one grid point, as `_compute_best_scale` computes them."""
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
    s = s / (s.max() * s.min()).sqrt()
    s[torch.isinf(s)] = 1
    s[torch.isnan(s)] = 1
    return s


def run(a, Ws: list[torch.Tensor], X: torch.Tensor):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, forward_quantize
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.quantization.calibration import observe, update_qparams
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.awq.mappings import ResolvedMapping
    from llmcompressor.observers.base import Observer
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[a.dtype]
    cols = X.shape[-1]
    model = Toy([w.shape[0] for w in Ws], cols, dtype)
    lins = model.parent.lins
    with torch.no_grad():
        for lin, w in zip(lins, Ws):
            lin.weight.copy_(w.to(dtype))
    w_module = [lin.weight.detach().clone() for lin in lins]

    qargs = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.sym, strategy="group", group_size=a.group)
    qmod = QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=qargs)})
    qmod.initialize_quantization(model)
    qmod.start_calibration(model)

    duo = {"true": True, "false": False, "both": "both"}[a.duo]
    awq = AWQModifier(n_grid=a.n_grid, duo_scaling=duo, offload_device=None)
    awq._resolved_mappings = [ResolvedMapping(
        smooth_name="norm", smooth_layer=model.norm, balance_layers=list(lins),
        balance_names=[f"parent.lin{i}" for i in range(len(lins))], parent=model.parent, parent_name="parent")]
    awq._setup_activation_cache_hooks()
    if not torch.cuda.is_available():
        # _apply_smoothing pins the cached parent args (a transfer optimisation that changes no value);
        # pinning needs a CUDA driver, so on a CPU-only machine it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    # Record every grid point's loss: wrap the modifier's own _compute_loss.
    losses = []
    orig_loss = awq._compute_loss

    def recording_loss(fp16_outputs, int_w_outputs):
        v = orig_loss(fp16_outputs, int_w_outputs)
        losses.append(v)
        return v

    awq._compute_loss = recording_loss
    best = {}
    orig_best = awq._compute_best_scale

    def recording_best(mapping, fp16_outputs, orig_layer_weights):
        s = orig_best(mapping, fp16_outputs, orig_layer_weights)
        best["scales"] = s.clone()
        return s

    awq._compute_best_scale = recording_best

    samples = [X] if not a.seq else list(X.split(a.seq))
    with torch.no_grad():
        for s in samples:  # calibration forward passes: the hooks cache the parent's args and |x| sums
            model.parent(s[None].to(dtype))
        x_sum, count = awq._smooth_activation_stats["norm"]
        x_mean = (x_sum / count).clone()
        w_mean = AWQModifier._compute_layer_means(list(lins)) if duo is not False else None
        awq._apply_smoothing(model)
    awq.remove_hooks()

    scales = best["scales"]
    points = grid_params(a.n_grid, duo)
    match = [i for i, (r, d) in enumerate(points)
             if torch.equal(point_scales(x_mean, w_mean, r, d).to(scales.dtype), scales)]
    ratio, dflag = points[match[0]] if match else (float("nan"), None)

    # Q(W.s) with a memoryless_minmax observer, as the following QuantizationModifier computes it, then / s.
    with torch.no_grad():
        smoothed = [lin.weight.detach().clone() for lin in lins]
        q_smoothed, q_rtn = [], []
        for lin, wm in zip(lins, w_module):
            for target, out in ((None, q_smoothed), (wm, q_rtn)):
                obs = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=qargs)
                saved = lin.weight.detach().clone()
                if target is not None:
                    lin.weight.data.copy_(target)
                lin.weight_observer = obs
                observe([lin], "weight")
                update_qparams([lin], "weight")
                out.append(forward_quantize(lin, lin.weight, "weight", qargs).detach().clone())
                lin.weight.data.copy_(saved)
        Xd = X.double()
        eff = [(q.double() / scales.double().view(1, -1)) for q in q_smoothed]
        err = lambda W, Q: float(((W.double() - Q.double()) @ Xd.T).square().sum())  # noqa: E731
        e_awq = sum(err(w, e) for w, e in zip(w_module, eff))
        e_rtn = sum(err(w, q) for w, q in zip(w_module, q_rtn))
    metrics = awq._error_metrics[0] if awq._error_metrics else {}
    stats = {
        "shapes": [list(w.shape) for w in Ws], "n": int(X.shape[0]), "bits": a.bits, "group": a.group, "sym": a.sym,
        "n_grid": a.n_grid, "duo_scaling": a.duo, "dtype": a.dtype, "samples": len(samples),
        "ratio": ratio, "duo": dflag, "grid_index": match[0] if match else None, "grid_matches": len(match),
        "scales_dtype": str(scales.dtype),
        "err_awq": e_awq, "err_rtn": e_rtn, "ratio_awq_over_rtn": e_awq / e_rtn if e_rtn > 0 else None,
        "llmc_initial_error": metrics.get("initial_error"), "llmc_best_error": metrics.get("best_error"),
        "grid": [[r, d, l] for (r, d), l in zip(points, losses)],
    }
    tensors = {"scales": scales.float(), "norm": model.norm.weight.detach().float(), "x_mean": x_mean.float()}
    if w_mean is not None:
        tensors["w_mean"] = w_mean.float()
    suffix = (lambda i: f".{i}") if len(Ws) > 1 else (lambda i: "")
    for i in range(len(Ws)):
        tensors["eff" + suffix(i)] = eff[i].float()
        tensors["rtn" + suffix(i)] = q_rtn[i].float()
        tensors["smoothed" + suffix(i)] = smoothed[i].float()
    return stats, tensors


def selftest_case():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(256, 256, generator=gen) * 0.02
    X = torch.randn(512, 256, generator=gen)
    X[:, [3, 77, 130, 201]] *= 20.0
    return W, X


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", nargs="?")
    ap.add_argument("-o", "--out")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--group", type=int, default=128)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True)
    g.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--duo", choices=("true", "false", "both"), default="true")
    ap.add_argument("--dtype", choices=("f32", "bf16", "f16"), default="f32", help="the modules' dtype")
    ap.add_argument("--seq", type=int, default=0, help="rows per calibration sample (default: one sample of all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--selftest", action="store_true", help="seeded 256x256 layer, 512 inputs, 4 channels x20")
    a = ap.parse_args()
    # llm-compressor logs to stdout (loguru): keep the real stdout for the JSON line, send fd 1 to stderr.
    sys.stdout.flush()
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)

    from safetensors.torch import load_file, save_file
    if a.selftest:
        W, X = selftest_case()
        Ws = [W]
        if a.input:
            save_file({"weight": W, "inputs": X}, a.input)
    else:
        if not a.input:
            ap.error("IN.safetensors (or --selftest)")
        t = load_file(a.input)
        X = t["inputs"].float().reshape(-1, t["inputs"].shape[-1])
        if "weight" in t:
            Ws = [t["weight"].float()]
        else:
            Ws, i = [], 0
            while f"weight.{i}" in t:
                Ws.append(t[f"weight.{i}"].float())
                i += 1
            if not Ws:
                sys.exit("input needs `weight` or `weight.0`, `weight.1`, ...")
    stats, tensors = run(a, Ws, X)
    import importlib.metadata as md
    stats["versions"] = {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "torch")}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, a.out, metadata={"stats": json.dumps(stats)})
    print(json.dumps(stats), file=result_out, flush=True)
    if a.selftest:
        assert stats["grid_matches"] >= 1, stats
        assert stats["ratio_awq_over_rtn"] < 1.0, stats
    return 0


if __name__ == "__main__":
    sys.exit(main())
