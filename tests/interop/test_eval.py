"""`sling eval` measures a GGUF against its HF source like `llama-perplexity` does.

On the "-wide" fixtures (K-quants on their main path), the candidate is `sling quantize --to gguf:PRESET` (byte-identical
to llama-quantize's, test_quantize.py). On the same text (tests/interop/data/eval.txt: a snapshot of sling's docs), 64-token chunks and 200 chunks (6200
scored tokens), `sling eval` with its default `--as llama.cpp-cpu` (every product's activations rounded as llama.cpp's
CPU kernels round them):

* PPL: vs `llama-perplexity -m CANDIDATE`: within 0.5 %;
* mean KLD: vs `llama-perplexity --kl-divergence` with base logits from the reference converter's F32 file (KV cache
  F32, flash attention off): within 0.5 % relative for the lossy presets (measured: 0.00-0.03 %), within 6 % for the
  near-lossless Q8_0 and MXFP4_MOE (measured: 0.5-3.8 %; `--as weights` is 16-31 % off there).

Figures go to results/eval.json.
"""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

import lab

CTX, CHUNKS = 64, 200
TEXT = lab.HERE / "data" / "eval.txt"
# gpt-oss: Q4_K_M requantizes the source's MXFP4 experts to Q4_K (--allow-requantize); MXFP4_MOE copies them. With
# `--as weights` near-lossless presets could not be compared: their KLD is of the order of llama.cpp's own activation
# rounding (MXFP4_MOE: weights 0.0093, llama.cpp 0.0136). The MXFP4 read-back itself is exact (cli/tests/eval.rs:
# F32 files keep the MXFP4 experts and evaluate with KLD 0 under --as weights).
EXTRA = {("gptoss-mxfp4-wide", "Q4_K_M"): ("--allow-requantize",)}
CASES = [("qwen3moe-wide", "Q4_K_M"), ("qwen3moe-wide", "Q2_K"), ("qwen3moe-wide", "IQ4_XS"), ("qwen3moe-wide", "Q8_0"),
         ("mixtral-wide", "Q4_K_M"), ("deepseekv3-wide", "Q4_K_M"), ("deepseekv3-wide", "Q8_0"),
         ("gptoss-mxfp4-wide", "Q4_K_M"), ("gptoss-mxfp4-wide", "MXFP4_MOE")]
# Measured 2026-12-06 (--as llama.cpp-cpu): PPL within 0.22 % (DeepSeek-V3 Q4_K_M), mean KLD within 0.03 % for the
# lossy presets; for the near-lossless ones 0.54 % (qwen3moe Q8_0), 2.2 % (DeepSeek-V3 Q8_0), 3.8 % (gpt-oss
# MXFP4_MOE), where `--as weights` is 16-31 % off. On these random-init models a KLD that small is of the order of
# what routing flips from summation order alone move (docs/eval.md); the bounds leave a margin, not room for a bug.
MAX_PPL_REL = 0.005
MAX_KLD_REL = {"Q8_0": 0.06, "MXFP4_MOE": 0.06}
MAX_KLD_REL_LOSSY = 0.005
PPL_ARGS = ["-c", str(CTX), "--chunks", str(CHUNKS), "-ctk", "f32", "-ctv", "f32", "-fa", "off"]


def gating(name: str) -> list[str]:
    # DeepSeek-V3 fixtures: the reference converter omits the sigmoid gating key (lab.INTENDED); sling writes it.
    return ["--override-kv", f"{lab.GATING_KEY}=int:{lab.SIGMOID}"] if name.startswith("deepseekv3") else []


def llama_ppl(model, ppl_args: list[str] = PPL_ARGS) -> float:
    out = lab.llama_perplexity(TEXT, ppl_args, ["-m", str(model)], "Final estimate")
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    assert m, out[-2000:]
    return float(m.group(1))


def llama_kld(name: str, model, tmp_path) -> dict:
    base = tmp_path / "base.kld"
    lab.llama_kld_base(name, base, TEXT, PPL_ARGS, gating(name))
    return lab.llama_kld(model, base, TEXT, PPL_ARGS, gating(name))


def sling_eval(name: str, candidate, *extra, check=True) -> subprocess.CompletedProcess:
    return lab.sling("-q", "eval", "--ref", lab.fixture_dir(name), candidate, "--data", TEXT, "--ctx", str(CTX),
                     "--chunks", str(CHUNKS), "--json", *extra, check=check)


@pytest.mark.parametrize("name,preset", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_eval_matches_llama_perplexity(name, preset, tmp_path):
    cand = lab.sling_quantize(name, preset, tmp_path / "cand.gguf", EXTRA.get((name, preset), ()))[0]
    ours = json.loads(sling_eval(name, cand).stdout)
    assert ours["arithmetic"] == "llama.cpp-cpu"
    weights = json.loads(sling_eval(name, cand, "--as", "weights").stdout)
    assert ours["chunks"] == CHUNKS and ours["tokens"] == CHUNKS * (CTX - CTX // 2 - 1)
    ppl = llama_ppl(cand)
    kld = llama_kld(name, cand, tmp_path)
    ppl_rel = abs(ours["ppl"] - ppl) / ppl
    kld_rel = abs(ours["kld_mean"] - kld["kld_mean"]) / kld["kld_mean"]
    lab.record("eval", f"{name}/{preset}", {
        "sling": {k: ours[k] for k in ("ppl", "ppl_ref", "kld_mean", "kld_p99", "kld_max", "top1", "dp_rms")},
        "sling_weights": {k: weights[k] for k in ("ppl", "kld_mean", "top1")},
        "llama_perplexity": {"ppl": ppl, **kld}, "ppl_rel": ppl_rel, "kld_rel": kld_rel})
    assert ppl_rel <= MAX_PPL_REL, f"PPL {ours['ppl']:.4f} vs llama-perplexity {ppl:.4f} ({ppl_rel:.2%})"
    assert kld_rel <= MAX_KLD_REL.get(preset, MAX_KLD_REL_LOSSY), f"KLD {ours['kld_mean']:.6f} vs llama-perplexity {kld['kld_mean']:.6f} ({kld_rel:.2%})"


def test_llama_perplexity_keeps_its_figures_under_cpu_load(tmp_path):
    """The figures the suite reads from llama-perplexity survive a starved CPU: with 3 busy processes per core
    running, 6 runs in a row each print the final estimate and the KLD summary, first time (no retry). Before
    setup-reference.sh made llama-perplexity drain its asynchronous logger at exit, such runs exited 0 without
    them (issue "Every claim checked the strong way", §0)."""
    import os
    import sys
    import time
    name = "qwen3moe-wide"
    f32 = lab.reference_convert(name, "f32")[0]
    args = ["-c", "64", "--chunks", "8", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-t", str(lab.JOBS)]
    base = tmp_path / "base.kld"
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3 * (os.cpu_count() or 1))]
    try:
        time.sleep(0.5)
        runs = [["-m", str(f32), "--kl-divergence-base", str(base)]] + \
               [["-m", str(f32), "--kl-divergence-base", str(base), "--kl-divergence"]] * 5
        for i, extra in enumerate(runs):
            r = subprocess.run([str(lab.LLAMA_BIN / "llama-perplexity"), "-f", str(TEXT), *args, *extra],
                               capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(lab.LLAMA_BIN)})
            out = r.stdout + r.stderr
            want = "Final estimate" if i == 0 else "Same top p:"
            assert r.returncode == 0 and want in out, f"run {i}: exit {r.returncode}, {want!r} missing:\n{out[-2000:]}"
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_eval_gate_exit_codes(tmp_path):
    name = "qwen3moe-wide"
    cand = lab.sling_quantize(name, "Q2_K", tmp_path / "cand.gguf")[0]
    ok = sling_eval(name, cand, "--max-kld", "100")
    assert json.loads(ok.stdout)["pass"] is True
    bad = sling_eval(name, cand, "--max-kld", "1e-9", check=False)
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["pass"] is False
    assert "FAIL" in bad.stderr


# The trained fixture, where the figures mean something (random-init fixtures score noise), with candidates made
# by the reference tools themselves (convert_hf_to_gguf.py + llama-quantize, as docs/eval.md promises sling eval
# takes them). 128-token chunks of eval.txt, held out from the fixture's training. Every figure is compared: token
# and chunk counts, both PPLs, top-1 agreement, mean KLD and its median and 99th percentile.
#
# Two things make llama-perplexity's figures differ from sling's, and both are measured here (docs/eval.md,
# "Agreement with llama-perplexity"):
# - its CPU kernels round the activations before every dot product with the weights (to q8_0/q8_K for quantized
#   types, to bf16 for BF16 weights): its KLD is the weights' error plus the kernels'. The BF16 candidate (the
#   source's own weights) shows the kernels' part alone: sling's KLD is exactly 0 there, llama-perplexity's not;
# - in --kl-divergence mode it stores the base log-probabilities in 16 bits (perplexity.cpp `log_softmax`), so its
#   "Mean PPL(base)" is off by ~0.1 %; its plain perplexity run of the F32 file is compared instead (to 1e-5).
TRAINED = "qwen3moe-trained"
T_CTX, T_CHUNKS = 128, 100
T_ARGS = ["-c", str(T_CTX), "--chunks", str(T_CHUNKS), "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
# Measured sling / llama-perplexity mean-KLD ratios (2026-12-05): Q8_0 0.55, Q6_K 0.87, Q4_K_M 1.00, IQ4_XS 0.97,
# Q2_K 1.00; the bounds leave a margin, they are not a tolerance for a bug.
T_KLD_RATIO = {"Q8_0": (0.3, 0.8), "Q6_K": (0.7, 0.97), "Q4_K_M": (0.9, 1.05), "IQ4_XS": (0.88, 1.05),
               "Q2_K": (0.93, 1.05)}


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained-base") / "base.kld"
    lab.llama_kld_base(TRAINED, base, TEXT, T_ARGS)
    return base, llama_ppl(lab.reference_convert(TRAINED, "f32")[0], T_ARGS)


def _sling_eval(cand, arithmetic: str | None = None) -> dict:
    extra = ["--as", arithmetic] if arithmetic else []
    return json.loads(lab.sling("-q", "eval", "--ref", lab.fixture_dir(TRAINED), cand, "--data", TEXT, "--ctx",
                                str(T_CTX), "--chunks", str(T_CHUNKS), "--json", *extra).stdout)


# `sling eval --as llama.cpp-cpu` (the default for a GGUF candidate) against llama-perplexity on the same file:
# measured 2026-12-06, mean-KLD ratios 0.925 (BF16) and 0.998-1.003 (Q8_0 … Q2_K), top-1 within 0.05 points, PPL
# within 0.01 %. The bounds leave a margin, not room for a bug.
EMU_KLD = {"BF16": (0.85, 1.1), "default": (0.97, 1.03)}
EMU_TOP1 = 0.005
EMU_PPL_REL = 0.001


def _check_emulated(preset: str, emu: dict, theirs: dict, plain: float | None) -> float:
    """The llama.cpp-cpu figures against llama-perplexity's (`plain`: its plain-perplexity run of the candidate, else
    the PPL of its --kl-divergence run); returns the mean-KLD ratio."""
    assert emu["arithmetic"] == "llama.cpp-cpu"
    ratio = emu["kld_mean"] / theirs["kld_mean"]
    lo, hi = EMU_KLD.get(preset, EMU_KLD["default"])
    assert lo <= ratio <= hi, f"{preset}: --as llama.cpp-cpu KLD / llama-perplexity KLD = {ratio:.4f}, outside [{lo}, {hi}]"
    assert abs(emu["top1"] - theirs["top1"]) < EMU_TOP1, (emu["top1"], theirs["top1"])
    plain = theirs["ppl"] if plain is None else plain
    assert abs(emu["ppl"] / plain - 1) < EMU_PPL_REL, (emu["ppl"], plain)
    return ratio


@pytest.mark.parametrize("preset", list(T_KLD_RATIO))
def test_eval_of_reference_quants_on_the_trained_fixture(preset, trained_base):
    base, ppl_f32 = trained_base
    cand = lab.reference_quantize(TRAINED, preset)
    ours = _sling_eval(cand, "weights")
    emu = _sling_eval(cand)
    theirs = lab.llama_kld(cand, base, TEXT, T_ARGS)
    plain = llama_ppl(cand, T_ARGS)
    ratio = ours["kld_mean"] / theirs["kld_mean"]
    keys = ("ppl", "ppl_ref", "kld_mean", "kld_median", "kld_p99", "kld_p999", "kld_max", "top1")
    lab.record("eval_trained", preset, {"sling": {k: ours[k] for k in keys + ("chunks", "tokens")},
                                        "sling_llama_cpp_cpu": {k: emu[k] for k in keys},
                                        "llama_perplexity": {**{k: theirs[k] for k in keys + ("chunks",)},
                                                             "ppl_plain": plain, "ppl_ref_plain": ppl_f32},
                                        "kld_ratio": ratio, "kld_ratio_llama_cpp_cpu": emu["kld_mean"] / theirs["kld_mean"]})
    _check_emulated(preset, emu, theirs, plain)
    for k in ("kld_median", "kld_p99"):
        assert 0.95 <= emu[k] / theirs[k] <= 1.05, (k, emu[k], theirs[k])
    # the reference runs with ggml's RMSNorm under --as llama.cpp-cpu: the same PPL to float precision
    assert emu["chunks"] == ours["chunks"] and abs(emu["ppl_ref"] / ours["ppl_ref"] - 1) < 1e-6
    assert ours["chunks"] == T_CHUNKS and ours["tokens"] == T_CHUNKS * (T_CTX - T_CTX // 2 - 1)
    if theirs["chunks"] is not None:
        assert theirs["chunks"] == ours["chunks"]
    assert abs(ours["ppl_ref"] / ppl_f32 - 1) < 1e-5, (ours["ppl_ref"], ppl_f32)
    assert abs(ours["ppl_ref"] / theirs["ppl_ref"] - 1) < 0.005, (ours["ppl_ref"], theirs["ppl_ref"])
    assert abs(ours["ppl"] / plain - 1) < 0.01, (ours["ppl"], plain)
    assert abs(ours["top1"] - theirs["top1"]) < 0.03, (ours["top1"], theirs["top1"])
    lo, hi = T_KLD_RATIO[preset]
    assert lo <= ratio <= hi, f"{preset}: sling KLD / llama-perplexity KLD = {ratio:.3f}, outside [{lo}, {hi}]"
    for k in ("kld_median", "kld_p99"):
        assert lo / 4 <= ours[k] / theirs[k] <= hi * 1.5, (k, ours[k], theirs[k])


def test_the_kernels_own_error_on_the_trained_fixture(trained_base):
    """The BF16 candidate holds the source's weights exactly: `--as weights` gives KLD 0, llama-perplexity what its
    kernels add (activations rounded to bf16 for BF16 weights), and `--as llama.cpp-cpu` reproduces that."""
    base, ppl_f32 = trained_base
    cand = lab.reference_convert(TRAINED, "bf16")[0]
    ours = _sling_eval(cand, "weights")
    emu = _sling_eval(cand)
    theirs = lab.llama_kld(cand, base, TEXT, T_ARGS)
    keys = ("ppl", "ppl_ref", "kld_mean", "kld_median", "kld_p99", "top1")
    lab.record("eval_trained", "BF16 (the source's weights)", {
        "sling": {k: ours[k] for k in keys},
        "sling_llama_cpp_cpu": {k: emu[k] for k in keys},
        "llama_perplexity": {k: theirs[k] for k in ("ppl", "ppl_ref", "kld_mean", "top1")},
        "kld_ratio_llama_cpp_cpu": emu["kld_mean"] / theirs["kld_mean"]})
    assert ours["kld_mean"] == 0 and ours["top1"] == 1 and ours["ppl"] == ours["ppl_ref"]
    _check_emulated("BF16", emu, theirs, None)
    assert abs(ours["ppl_ref"] / ppl_f32 - 1) < 1e-5
    assert theirs["kld_mean"] > 0


# The emulation checked position by position: llama.cpp's own logits (llama-cpp-python on the pinned build, KV cache
# F32, flash attention off, one batch) against `sling logits --gguf` under both arithmetics, on the same 128 token
# ids; KL(llama.cpp ‖ sling) per position. With `--as llama.cpp-cpu` the logits are llama.cpp's to float precision
# (KL ~1e-13) except where the two runs take a different branch: an expert choice or an activation code that the last
# bit of a sum decides, after which later positions, attending to that one, may differ too (qwen3moe-wide Q8_0:
# positions 0-13 at 1e-13, then ~1e-4). Measured 2026-12-06: on the trained fixture 64-83 % of the positions, and
# the median, are at float precision (`--as weights`: median 1e-4); on the random-init fixtures, whose near-tied
# routers branch early, the median is 3-10 % of the `--as weights` one. ggml's RMSNorm (squares rounded to f32) is
# part of the emulation: with sling's exact squares the trained IQ4_XS file branched at position 1 and stayed apart
# (24 positions at float precision; 102 with it). Checked: the median within 15 % of the `--as weights` median
# everywhere, and below 1e-9 on the trained fixture.
LOGIT_IDS = [(i * 97 + 13) % 384 for i in range(128)]
LOGIT_CASES = [("qwen3moe-trained", "BF16"), ("qwen3moe-trained", "Q8_0"), ("qwen3moe-trained", "Q6_K"),
               ("qwen3moe-trained", "Q4_K_M"), ("qwen3moe-trained", "IQ4_XS"), ("qwen3moe-trained", "Q2_K"), ("qwen3moe-wide", "Q8_0"), ("mixtral-wide", "Q4_K_M"),
               ("deepseekv3-wide", "Q8_0"), ("deepseekv3-wide", "Q4_K_M"), ("gptoss-mxfp4-wide", "MXFP4_MOE")]
MAX_KL_FRACTION = 0.15
MAX_KL_TRAINED = 1e-9


def _kl_per_position(p_logits, q_logits) -> np.ndarray:
    lp, lq = lab.log_softmax(p_logits.astype(np.float64)), lab.log_softmax(q_logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


@pytest.mark.parametrize("name,preset", LOGIT_CASES, ids=[f"{n}-{p}" for n, p in LOGIT_CASES])
def test_llama_cpp_cpu_reproduces_llama_cpps_logits(name, preset, tmp_path):
    if name == TRAINED:
        cand = (lab.reference_convert(TRAINED, "bf16")[0] if preset == "BF16"
                else lab.reference_quantize(TRAINED, preset))
    else:
        cand = lab.sling_quantize(name, preset, tmp_path / "cand.gguf")[0]
    theirs = lab.llama_logits([cand], LOGIT_IDS, tmp_path)[0]
    kl = {}
    for arith in ("llama.cpp-cpu", "weights"):
        out = tmp_path / f"{arith}.npy"
        lab.sling("-q", "logits", lab.fixture_dir(name), "--gguf", cand, "--as", arith, "--ids",
                  ",".join(map(str, LOGIT_IDS)), "--out", out)
        kl[arith] = _kl_per_position(theirs, np.load(out))
    med = {a: float(np.median(v)) for a, v in kl.items()}
    same = kl["llama.cpp-cpu"] < 1e-9
    lab.record("eval_logits", f"{name}/{preset}", {
        "tokens": len(LOGIT_IDS), "positions_at_float_precision": int(same.sum()),
        "first_divergent_position": int(np.argmin(same)) if not same.all() else None,
        **{f"kl_{k}_{a}": float(f(v)) for a, v in kl.items() for k, f in
           (("median", np.median), ("mean", np.mean), ("max", np.max))}})
    assert med["weights"] > 0, med
    assert med["llama.cpp-cpu"] <= MAX_KL_FRACTION * med["weights"], med
    if name == TRAINED:
        assert med["llama.cpp-cpu"] < MAX_KL_TRAINED, med
