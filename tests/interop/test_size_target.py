"""`sling quantize --to gguf:auto --target-bpw X`: the allocation chosen from measured sensitivities against the
preset frontier and sling's named recipes, on the trained Qwen3-MoE fixture (fixtures/make_trained.py; random-weight
fixtures make every low-bit quant look like noise), measured as llama.cpp measures it.

Every candidate — 20 llama-quantize presets, the 5 named MoE recipes, gguf:auto at several sizes — is made by
`sling quantize` with the same imatrix (llama-imatrix over calib.txt), and scored by `llama-perplexity
--kl-divergence` (llama.cpp's CPU kernels) against the reference converter's F32 file on eval.txt: held out from the
fixture's training, the imatrix and the sensitivity probes (those run on calib.txt). bpw is of the whole file's
tensors (gguf-py), as in test_iq_quality.py.

The preset frontier: the presets no other preset beats at a smaller or equal size (lower mean KLD), its KLD
interpolated in log space between the neighbouring frontier points. Checked, at the three test targets and at each
named recipe's size: gguf:auto fits the target, lies below the frontier (by at least GOAL), and is no worse than the
named recipe nearest in size; every sweep point is GOAL below the frontier too. Figures go to results/size_target.json; docs/quantization.md quotes them.
"""
from __future__ import annotations

import math

import pytest

import lab

NAME = "qwen3moe-trained"
TEXT = lab.HERE / "data" / "eval.txt"
CALIB = lab.HERE / "data" / "calib.txt"
CTX, CHUNKS = 64, 100
PPL_ARGS = ["-c", str(CTX), "--chunks", str(CHUNKS), "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "Q2_K",
           "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
RECIPES = ("moe-iq1", "moe-iq2", "moe-q2", "moe-iq4", "moe-q4")
# Test targets (bpw of this fixture, where every figure sits 1-2 bpw above the same preset on a real checkpoint: see
# docs/quantization.md) from the frontier's low end to its high end, and a sweep for the docs table.
TARGETS = (3.25, 3.7, 5.4)
SWEEP = (3.0, 3.1, 3.5, 4.0, 4.5, 5.0, 6.0, 6.5)
# Probes over the imatrix's text and chunking.
AUTO_ARGS = ("--data", CALIB, "--ctx", "64", "--chunks", "8")
# How far below the frontier gguf:auto must be (relative KLD): the goal is 30 %.
GOAL = 0.30


def _tensors(path):
    import gguf  # noqa: PLC0415  (lab puts the pinned gguf-py on sys.path)
    r = gguf.GGUFReader(str(path))
    return [(int(t.n_elements), int(t.n_bytes)) for t in r.tensors]


@pytest.fixture(scope="module")
def lab_state(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("size-target")
    base = lab.llama_kld_base(NAME, tmp / "base.kld", TEXT, PPL_ARGS)
    return tmp, base, lab.reference_imatrix(NAME)


def _measure(state, key: str, to: str, extra=()) -> dict:
    tmp, base, im = state
    out = tmp / f"{key}.gguf"
    lab.sling("-q", "quantize", lab.fixture_dir(NAME), "--to", to, "-o", out, "--tokenizer-pre", lab.TOKPRE,
              "--no-manifest", "--imatrix", im, *extra)
    t = _tensors(out)
    f = {**lab.llama_kld(out, base, TEXT, PPL_ARGS), "bpw": 8 * sum(b for _, b in t) / sum(n for n, _ in t),
         "file_bytes": out.stat().st_size}
    lab.record("size_target", f"{NAME}/{key}", f)
    return f


@pytest.fixture(scope="module")
def presets(lab_state):
    return {p: _measure(lab_state, p, f"gguf:{p}") for p in PRESETS + RECIPES}


def auto(state, bpw: float) -> dict:
    return _measure(state, f"auto-{bpw}", "gguf:auto", ("--target-bpw", str(bpw), *AUTO_ARGS))


def frontier_at(figs: dict, bpw: float) -> float:
    """The preset frontier's KLD at `bpw`."""
    return lab.frontier_at([(figs[p]["bpw"], figs[p]["kld_mean"]) for p in PRESETS], bpw)


def nearest_recipe(figs: dict, bpw: float) -> str:
    return min(RECIPES, key=lambda r: abs(figs[r]["bpw"] - bpw))


@pytest.mark.parametrize("bpw", TARGETS)
def test_auto_beats_the_preset_frontier_and_the_nearest_recipe(lab_state, presets, bpw):
    a = auto(lab_state, bpw)
    assert a["bpw"] <= bpw + 1e-9, a
    assert a["bpw"] >= bpw - 0.1, f"{a['bpw']:.3f} bpw, well below the {bpw} target"
    f = frontier_at(presets, bpw)
    r = nearest_recipe(presets, bpw)
    lab.record("size_target", f"{NAME}/auto-{bpw}/vs", {"frontier_kld": f, "recipe": r,
                                                        "recipe_kld": presets[r]["kld_mean"]})
    assert a["kld_mean"] <= (1 - GOAL) * f, f"auto {a['kld_mean']:.5f} vs frontier {f:.5f} at {bpw} bpw"
    assert a["kld_mean"] <= presets[r]["kld_mean"], (a, r, presets[r])


@pytest.mark.parametrize("recipe", RECIPES)
def test_auto_at_a_recipes_size_is_no_worse_than_the_recipe(lab_state, presets, recipe):
    r = presets[recipe]
    # The recipe's own size, rounded down to the 4th decimal so that the target is never above it.
    bpw = math.floor(r["bpw"] * 1e4) / 1e4
    a = auto(lab_state, bpw)
    assert a["bpw"] <= r["bpw"], (a, r)
    assert a["kld_mean"] <= r["kld_mean"], f"auto {a['kld_mean']:.5f} vs {recipe} {r['kld_mean']:.5f} at {bpw} bpw"


def test_sweep_for_the_docs(lab_state, presets):
    """The docs table: gguf:auto from 3 to 6.5 bpw, each point within the target and at least GOAL below the
    frontier (every point lies within the presets' range)."""
    for bpw in SWEEP:
        a = auto(lab_state, bpw)
        assert a["bpw"] <= bpw + 1e-9, a
        assert a["kld_mean"] <= (1 - GOAL) * frontier_at(presets, bpw), (bpw, a)


def test_without_data_the_measured_errors_alone_still_beat_the_frontier(lab_state, presets):
    """No --data: the allocation from the imatrix-weighted errors alone (every tensor equally sensitive). Cheaper
    and worse than with the probes (the docs quote both); still below the frontier."""
    bpw = TARGETS[0]
    a = _measure(lab_state, f"auto-{bpw}-nodata", "gguf:auto", ("--target-bpw", str(bpw)))
    assert a["bpw"] <= bpw + 1e-9, a
    assert a["kld_mean"] < frontier_at(presets, bpw), a
