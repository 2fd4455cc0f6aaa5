"""What the low-bit presets and the dynamic MoE recipes cost in quality, on the trained Qwen3-MoE fixture
(fixtures/make_trained.py: random-weight fixtures make every low-bit quant look like noise).

Each candidate is `sling quantize --to gguf:NAME --imatrix` (llama-imatrix's statistics over calib.txt, the same
imatrix for all) and is measured with `sling eval --ref --as weights` (the quantizer's error alone) against the bf16 source on eval.txt (held out from training
and calibration): mean KL divergence, perplexity, top-1 agreement, with the file's size and bits per weight. Figures
go to results/iq_quality.json; docs/quantization.md quotes them.

The checks are the orderings a user relies on: more bits cost less quality across and within the IQ families, and
each recipe is better than the plain preset whose routed experts it shares and than a plain preset at least its size.
Not checked: IQ1_M against IQ1_S. On this fixture they measure the same (KLD 0.073 vs 0.072): its 128-wide expert
down-projections fall back to IQ4_NL in both, so they differ only in the experts' gate and up.
"""
from __future__ import annotations

import json

import pytest

import lab

NAME = "qwen3moe-trained"
TEXT = lab.HERE / "data" / "eval.txt"
CTX, CHUNKS = 64, 100
PLAIN = ("Q4_K_M", "Q3_K_S", "Q2_K", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
         "IQ1_M", "IQ1_S")
RECIPES = ("moe-iq2", "moe-iq1")


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iq-quality")
    src = lab.fixture_dir(NAME)
    im = lab.reference_imatrix(NAME)
    n_params = None
    out = {}
    for name in PLAIN + RECIPES:
        gguf = lab.sling_quantize(NAME, name, tmp / f"{name}.gguf", ("--imatrix", im))[0]
        r = lab.sling("-q", "eval", "--ref", src, gguf, "--data", TEXT, "--ctx", str(CTX), "--chunks", str(CHUNKS),
                      "--json", "--as", "weights")
        e = json.loads(r.stdout)
        if n_params is None:
            n_params = sum(t[2] for t in _tensors(gguf))
        size = sum(t[3] for t in _tensors(gguf))
        out[name] = {"kld_mean": e["kld_mean"], "ppl": e["ppl"], "ppl_ref": e["ppl_ref"], "top1": e["top1"],
                     "tensor_bytes": size, "bpw": 8 * size / n_params}
        lab.record("iq_quality", f"{NAME}/{name}", out[name])
    return out


def _tensors(path):
    """(name, type, elements, bytes) of each tensor of a GGUF file, read with llama.cpp's gguf-py."""
    import gguf  # noqa: PLC0415  (lab puts the pinned gguf-py on sys.path)
    r = gguf.GGUFReader(str(path))
    return [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in r.tensors]


def test_every_candidate_evaluates(figures):
    for name, f in figures.items():
        assert f["kld_mean"] >= 0 and f["ppl"] > 0 and 0 <= f["top1"] <= 1, (name, f)


@pytest.mark.parametrize("family", [("IQ3_M", "IQ3_XXS"), ("IQ2_M", "IQ2_XXS"), ("Q4_K_M", "IQ3_XXS"),
                                    ("IQ3_XXS", "IQ2_XXS"), ("IQ2_XXS", "IQ1_S")])
def test_more_bits_cost_less(figures, family):
    hi, lo = (figures[n] for n in family)
    assert hi["bpw"] > lo["bpw"], (family, hi, lo)
    assert hi["kld_mean"] < lo["kld_mean"], (family, hi, lo)


@pytest.mark.parametrize("recipe,plain", [("moe-iq1", "IQ1_S"), ("moe-iq2", "IQ2_XXS")])
def test_recipes_beat_the_plain_preset_of_their_experts(figures, recipe, plain):
    assert figures[recipe]["kld_mean"] < figures[plain]["kld_mean"], (figures[recipe], figures[plain])


@pytest.mark.parametrize("recipe,plain", [("moe-iq1", "IQ2_XXS"), ("moe-iq2", "Q2_K")])
def test_recipes_beat_a_plain_preset_at_least_their_size(figures, recipe, plain):
    r, p = figures[recipe], figures[plain]
    assert p["bpw"] >= r["bpw"] and r["kld_mean"] < p["kld_mean"], (r, p)
