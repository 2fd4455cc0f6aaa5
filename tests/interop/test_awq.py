"""`sling quantize --to vllm:w4a16|mlx:4 --method awq --data FILE` against llm-compressor's AWQ and the runtimes.

The scale search itself is checked against llm-compressor's `AWQModifier._apply_smoothing` on single layers in
`quantizers/tests/awq.rs` (`awq_matches_llm_compressor`, every grid point's loss and the chosen ratio); the folds
keeping the model's function on six architectures in `calibration/src/awq.rs`. Here, end to end on the trained
Qwen3-MoE fixture (`fixtures/make_trained.py`):

  a. AWQ `vllm:w4a16` and `mlx:4` have a lower mean KL divergence (`sling eval` on eval.txt) than round-to-nearest of
     the same scheme;
  b. llm-compressor 0.14's own AWQ (`scripts/bench/gptq_ref.py --method awq` in $SLING_LAB/venv-llmc: `oneshot` with
     [AWQModifier(n_grid=20, duo_scaling=True), QuantizationModifier(W4A16, ignore lm_head and the routers)], its
     registered Qwen3-MoE mappings, its default `moe_calibrate_all_experts`), on exactly the same calibration token
     ids: sling's AWQ `vllm:w4a16` KLD is at most 5% above it (measured: below it), with sling's defaults (experts
     calibrated on their routed tokens) and with `--all-experts` (llm-compressor's default);
  c. the AWQ outputs load as RTN outputs do (test_vllm.py / test_mlx.py), the folded norms and routers included:
     compressed-tensors decompresses every module to exactly sling's dequantization and transformers' logits match
     sling's; mlx-lm's logits match sling's.
  d. `--method awq-gptq` (AWQ's scales, then GPTQ on the smoothed model) against llm-compressor's stacked
     [AWQModifier, GPTQModifier] recipe (`gptq_ref.py --method awq-gptq`, its defaults: act-order "weight", every
     expert on every token; sling with `--act-order --all-experts`): sling's KLD at most 5% above it (measured:
     0.96x), and below 0.8x sling's own AWQ and round-to-nearest; compressed-tensors decompresses every module to sling's dequantization and
     mlx-lm's float32 logits match sling's.

Figures: results/awq.json.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import lab
import hfdir

LLMC_PY = lab.LAB / "venv-llmc" / "bin" / "python"
REF = lab.HERE.parents[1] / "scripts" / "bench" / "gptq_ref.py"
TRAINED = "qwen3moe-trained"
DATA = lab.HERE / "data"
CTX, EVAL_CHUNKS = 128, 24


def _eval(d: Path) -> dict:
    r = lab.sling("-q", "eval", "--ref", lab.fixture_dir(TRAINED), d, "--data", DATA / "eval.txt", "--ctx", CTX,
                  "--chunks", EVAL_CHUNKS, "--json")
    return json.loads(r.stdout)


class _Art(hfdir.Artifacts):
    """sling outputs keyed by (to, method, extra flags), all calibrated on the same token ids."""

    def __init__(self, root: Path):
        super().__init__(root)
        from tokenizers import Tokenizer
        src = lab.fixture_dir(TRAINED)
        ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(
            (DATA / "calib.txt").read_text(), add_special_tokens=False).ids
        self.chunks = [ids[i * CTX:(i + 1) * CTX] for i in range(len(ids) // CTX)]
        assert len(self.chunks) >= 16, f"calib.txt: {len(ids)} tokens"
        self.tokens_txt = self.root / "calib-tokens.txt"
        self.tokens_txt.write_text("\n".join(" ".join(map(str, c)) for c in self.chunks) + "\n")
        self.tokens_json = self.root / "calib-tokens.json"
        self.tokens_json.write_text(json.dumps({"ctx": CTX, "chunks": self.chunks}))

    def made(self, to: str, method: str, *extra) -> Path:
        key = (to, method, extra)
        if key not in self._dirs:
            out = self.root / "-".join([to.replace(":", "-"), method, *[e.strip("-") for e in extra]])
            flags = ["--method", "rtn"] if method == "rtn" else ["--method", method, "--tokens", self.tokens_txt,
                                                                "--ctx", CTX, *extra]
            hfdir.quantize(TRAINED, to, out, *flags)
            self._dirs[key] = out
        return self._dirs[key]

    def llmc_awq(self, method: str = "awq") -> Path:
        out = self.root / f"llmc-{method}"
        if not out.exists():
            assert LLMC_PY.is_file(), f"llm-compressor's venv is missing: {LLMC_PY}; {lab.SETUP_HINT}"
            r = subprocess.run([str(LLMC_PY), str(REF), str(lab.fixture_dir(TRAINED)), str(out), "--tokens",
                                str(self.tokens_json), "--method", method], capture_output=True, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
            assert r.returncode == 0, f"gptq_ref.py --method {method} failed:\n{r.stderr[-3000:]}"
        return out


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return _Art(tmp_path_factory.mktemp("awq"))


@pytest.mark.parametrize("to", ["vllm:w4a16", "mlx:4"])
def test_awq_beats_round_to_nearest_on_a_trained_model(to, art):
    a, r = art.made(to, "awq"), art.made(to, "rtn")
    ea, er = _eval(a), _eval(r)
    cal = json.loads((a / "sling.json").read_text())["options"]["target"]["calibration"]
    lab.record("awq", f"e2e/{TRAINED}/{to}", {
        "calibration_tokens": cal["data"]["tokens"], "fallbacks": len(cal["fallbacks"]),
        "kld_awq": ea["kld_mean"], "kld_rtn": er["kld_mean"], "kld_ratio": ea["kld_mean"] / er["kld_mean"],
        "top1_awq": ea["top1"], "top1_rtn": er["top1"], "ppl_ref": ea["ppl_ref"], "ppl_awq": ea["ppl"],
        "ppl_rtn": er["ppl"], "eval_tokens": ea["tokens"]})
    assert cal["method"] == "awq" and (cal["n_grid"], cal["duo_scaling"]) == (20, True), cal
    assert "damp" not in cal and "act_order" not in cal, cal
    assert not cal["fallbacks"], cal["fallbacks"][:3]
    # Measured: 0.955 (vllm:w4a16), 0.90 (mlx:4). This fixture's activations have few outlier channels, which is
    # where AWQ gains; llm-compressor's own AWQ gains less here (test below).
    assert ea["kld_mean"] < 0.99 * er["kld_mean"], f"AWQ KLD {ea['kld_mean']:.5g} vs RTN {er['kld_mean']:.5g}"


def test_awq_is_no_worse_than_llm_compressors_awq(art):
    ref = art.llmc_awq()
    er = _eval(ref)
    rtn = _eval(art.made("vllm:w4a16", "rtn"))
    got = {"default": _eval(art.made("vllm:w4a16", "awq")),
           "all_experts": _eval(art.made("vllm:w4a16", "awq", "--all-experts"))}
    lab.record("awq", f"vs-llm-compressor/{TRAINED}/vllm:w4a16", {
        "kld_llmc_awq": er["kld_mean"], "top1_llmc_awq": er["top1"], "kld_sling_rtn": rtn["kld_mean"],
        **{f"kld_sling_awq_{k}": v["kld_mean"] for k, v in got.items()},
        **{f"top1_sling_awq_{k}": v["top1"] for k, v in got.items()},
        "calibration_tokens": len(art.chunks) * CTX})
    for k, v in got.items():
        assert v["kld_mean"] <= 1.05 * er["kld_mean"], f"sling AWQ ({k}) {v['kld_mean']:.5g} vs llm-compressor {er['kld_mean']:.5g}"


def test_awq_vllm_loads_in_compressed_tensors_and_transformers(art):
    d = art.made("vllm:w4a16", "awq")
    tensors, deq = hfdir.read_dir(d), art.dequantized(d)
    qc, sch, comp = hfdir.ct_scheme(d)
    modules = hfdir.ct_modules(tensors)
    assert modules, "no quantized module"
    for m in modules:
        got = hfdir.ct_decompress_f32(hfdir.ct_state(tensors, m, comp, sch), comp, sch)
        assert hfdir.bits_equal(got, deq[m + ".weight"]), f"{m}: {hfdir.first_diff(got, deq[m + '.weight'])}"
    # the folds are in the files: the norms and routers differ from the source's
    import torch
    from safetensors.torch import load_file
    src = load_file(str(lab.fixture_dir(TRAINED) / "model.safetensors"))
    folded = [n for n in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                          "model.layers.1.mlp.gate.weight") if not torch.equal(tensors[n], src[n])]
    assert len(folded) == 3, f"not folded: {folded}"
    model, info = hfdir.transformers_load(d, dequantize=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.float()
    raw = lab.kl_stats(hfdir.transformers_logits(model), art.logits(d))
    # transformers holds bf16(q * scale) (test_gptq.py); with sling's exact weights the forward passes agree.
    hfdir.load_exact_weights(model, deq)
    s = lab.kl_stats(hfdir.transformers_logits(model), art.logits(d))
    lab.record("awq", f"load/{TRAINED}/vllm:w4a16", {"ct_modules_bit_identical": len(modules),
                                                     "transformers_as_loaded": raw, "transformers": s})
    assert raw["top1"] == 1.0, raw
    assert s["kl_mean"] < 1e-5 and s["top1"] == 1.0, s


def test_awq_mlx_loads_in_mlx_lm(art):
    """mlx-lm in float32 over the artifact computes sling's logits (test_mlx.py's bar: 1e-9)."""
    mx = hfdir.mlx_cpu()
    d = art.made("mlx:4", "awq")
    model, _ = hfdir.mlx_load(d)
    model.set_dtype(mx.float32)
    s = lab.kl_stats(hfdir.mlx_logits(model), art.logits(d))
    lab.record("awq", f"load/{TRAINED}/mlx:4", {"mlx_lm_float32": s})
    assert s["kl_mean"] < 1e-9 and s["top1"] == 1.0, s


# ---------------------------------------------------------------------------------------------------------------
# d. AWQ then GPTQ
def test_awq_gptq_is_no_worse_than_llm_compressors_stacked_recipe(art):
    ref = _eval(art.llmc_awq("awq-gptq"))
    got = _eval(art.made("vllm:w4a16", "awq-gptq", "--act-order", "--all-experts"))
    awq_alone = _eval(art.made("vllm:w4a16", "awq", "--all-experts"))
    rtn = _eval(art.made("vllm:w4a16", "rtn"))
    cal = json.loads((art.made("vllm:w4a16", "awq-gptq", "--act-order", "--all-experts") / "sling.json")
                     .read_text())["options"]["target"]["calibration"]
    lab.record("awq", f"awq-gptq/{TRAINED}/vllm:w4a16", {
        "kld_llmc_awq_gptq": ref["kld_mean"], "kld_sling_awq_gptq": got["kld_mean"],
        "kld_sling_awq": awq_alone["kld_mean"], "kld_sling_rtn": rtn["kld_mean"],
        "sling_over_llmc": got["kld_mean"] / ref["kld_mean"], "top1_llmc": ref["top1"], "top1_sling": got["top1"]})
    assert cal["method"] == "awq-gptq" and cal["act_order"] and cal["n_grid"] == 20, cal
    assert got["kld_mean"] <= 1.05 * ref["kld_mean"], f"sling {got['kld_mean']:.5g} vs llm-compressor {ref['kld_mean']:.5g}"
    # measured: 0.0050 against AWQ alone 0.0086 and round-to-nearest 0.0086 (AWQ gains little on this fixture)
    assert got["kld_mean"] < 0.8 * min(awq_alone["kld_mean"], rtn["kld_mean"]), (got, awq_alone, rtn)


@pytest.mark.parametrize("to", ["vllm:w4a16", "mlx:4"])
def test_awq_gptq_loads_in_the_consumers(to, art):
    d = art.made(to, "awq-gptq")
    if to.startswith("vllm"):
        modules = hfdir.ct_modules_are(d, art.dequantized(d))
        lab.record("awq", f"awq-gptq/load/{TRAINED}/{to}", {"ct_modules_bit_identical": len(modules)})
    else:
        mx = hfdir.mlx_cpu()
        model, _ = hfdir.mlx_load(d)
        model.set_dtype(mx.float32)
        s = lab.kl_stats(hfdir.mlx_logits(model), art.logits(d))
        lab.record("awq", f"awq-gptq/load/{TRAINED}/{to}", {"mlx_lm_float32": s})
        assert s["kl_mean"] < 1e-9 and s["top1"] == 1.0, s
