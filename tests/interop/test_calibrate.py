"""`sling calibrate` computes llama-imatrix's importance matrix with sling's own f32 forward pass.

Parity: on the same text (tests/interop/data/calib.txt), the same 64-token chunks and 8 chunks, sling's GGUF imatrix
and llama-imatrix's on the reference converter's **F32** file hold the same entries, the same per-expert token counts,
and sums of x² equal to float rounding (the fixtures are bf16 checkpoints, so the F32 file holds the same weights).

Against lab.reference_imatrix (llama-imatrix on the BF16 file) the match can only be approximate: llama.cpp's CPU
matmul with BF16 weights rounds the activations to bf16 too (vec_dot_type BF16), so router logits move by ~1e-2 and
near-tie tokens pick another expert. That comparison checks entries, per-tensor total counts and records the gap.

Then llama-quantize accepts sling's file, and `sling quantize --imatrix` with it gives llama-quantize's bytes.

Figures go to results/calibrate.json.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import gguf_compare
import lab

FIXTURES = ("qwen3moe", "mixtral", "qwen2moe", "olmoe", "deepseekv2lite", "deepseekv3", "gptoss", "qwen3moe-wide")
# DeepSeek-V3: the reference converter omits the sigmoid gating key (lab.INTENDED), so llama.cpp would run softmax
# gating, another model; the F32 reference run gets the intended value through --override-kv.
OVERRIDE = {"deepseekv3": ["--override-kv", f"{lab.GATING_KEY}=int:{lab.SIGMOID}"]}
MAX_REL = 1e-4  # measured <= 4.4e-6 (see results/calibrate.json)


def sling_imatrix(name: str, out) -> dict:
    r = lab.sling("-q", "calibrate", lab.fixture_dir(name), "--data", lab.CALIB, "--ctx", "64", "--chunks", "8",
                  "-o", out, "--json")
    return json.loads(r.stdout)


def read_imatrix(path) -> tuple[dict, dict]:
    """{kv name: value} (scalars and string arrays) and {entry: (sums [n_mat, ne0], counts [n_mat])}."""
    r = gguf.GGUFReader(str(path))
    kv = {}
    for f in r.fields.values():
        if f.name.startswith("imatrix.") or f.name == "general.type":
            kv[f.name] = f.contents()
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in r.tensors}
    entries = {}
    for n in t:
        if n.endswith(".in_sum2"):
            base = n[: -len(".in_sum2")]
            counts = t[base + ".counts"].reshape(-1)
            entries[base] = (t[n].reshape(len(counts), -1), counts)
    return kv, entries


def reference_imatrix_f32(name: str):
    """llama-imatrix on the reference converter's F32 file (lab.reference_imatrix's arguments), with an F32 KV cache
    and flash attention off (the default F16 cache rounds K and V: ~5e-4 relative on every later activation)."""
    f32 = lab.reference_convert(name, "f32")[0]
    extra = OVERRIDE.get(name, [])
    return lab.cached_file("imatrix-f32", name, [lab._bin_hash("llama-imatrix"), lab.CALIB.read_bytes(), "kv-f32",
                                                 *extra],
                           lambda out: lab.run_tool("llama-imatrix", [
                               "-m", f32, "-f", lab.CALIB, "-o", out, "-c", "64", "--chunks", "8", "-t", lab.JOBS,
                               "--output-format", "gguf", "-ctk", "f32", "-ctv", "f32", "-fa", "off", *extra]))


def rel_err(ours: dict, ref: dict) -> tuple[float, str | None]:
    max_rel, worst = 0.0, None
    for n, (s_ref, _) in ref.items():
        s = ours[n][0]
        assert s.shape == s_ref.shape, f"{n}: shape {s.shape} != {s_ref.shape}"
        rel = float(np.max(np.abs(s - s_ref) / np.maximum(np.abs(s_ref), 1e-30)))
        if rel > max_rel:
            max_rel, worst = rel, n
    return max_rel, worst


@pytest.mark.parametrize("name", FIXTURES)
def test_imatrix_matches_llama_imatrix_bf16_approximately(name, tmp_path):
    ref_path = lab.reference_imatrix(name)
    ours_path = tmp_path / "imatrix.gguf"
    sling_imatrix(name, ours_path)
    kv_ref, ref = read_imatrix(ref_path)
    kv_ours, ours = read_imatrix(ours_path)
    assert sorted(ours) == sorted(ref)
    moved = 0
    for n, (_, c_ref) in ref.items():
        c = ours[n][1]
        assert c.shape == c_ref.shape and c.sum() == c_ref.sum(), f"{n}: counts {c.tolist()} != {c_ref.tolist()}"
        moved += int(np.abs(c - c_ref).sum()) // 2
    max_rel, worst = rel_err(ours, ref)
    lab.record("calibrate", f"{name}/vs-bf16", {"max_rel": max_rel, "worst": worst, "routed_slots_moved": moved})


@pytest.mark.parametrize("name", FIXTURES)
def test_imatrix_matches_llama_imatrix(name, tmp_path):
    ref_path = reference_imatrix_f32(name)
    ours_path = tmp_path / "imatrix.gguf"
    report = sling_imatrix(name, ours_path)
    kv_ref, ref = read_imatrix(ref_path)
    kv_ours, ours = read_imatrix(ours_path)
    assert kv_ours["general.type"] == "imatrix"
    for k in ("imatrix.chunk_count", "imatrix.chunk_size"):
        assert kv_ours[k] == kv_ref[k], f"{k}: {kv_ours[k]} != {kv_ref[k]}"
    assert sorted(ours) == sorted(ref), (f"entries differ: only sling {sorted(set(ours) - set(ref))}, "
                                         f"only llama-imatrix {sorted(set(ref) - set(ours))}")
    max_rel, worst = 0.0, None
    for n, (s_ref, c_ref) in ref.items():
        s, c = ours[n]
        assert s.shape == s_ref.shape, f"{n}: shape {s.shape} != {s_ref.shape}"
        assert np.array_equal(c, c_ref), f"{n}: counts {c.tolist()} != {c_ref.tolist()}"
        rel = float(np.max(np.abs(s - s_ref) / np.maximum(np.abs(s_ref), 1e-30)))
        if rel > max_rel:
            max_rel, worst = rel, n
    lab.record("calibrate", f"{name}/parity", {"entries": len(ref), "max_rel": max_rel, "worst": worst,
                                                "tokens": report["tokens"], "chunks": report["chunks"]})
    assert max_rel <= MAX_REL, f"max relative error {max_rel:.3g} at {worst}"


@pytest.mark.parametrize("name", ("qwen3moe", "mixtral"))
def test_quantize_with_sling_imatrix(name, tmp_path):
    im = tmp_path / "imatrix.gguf"
    sling_imatrix(name, im)
    ref = lab.reference_quantize(name, "Q4_K_M", (), imatrix=im)  # llama-quantize accepts the file
    ours = lab.sling_quantize(name, "Q4_K_M", tmp_path / "sling.gguf", ("--imatrix", im))
    # quantize.imatrix.file: the cached reference recorded the path of an earlier run's temporary file
    c = gguf_compare.compare(str(ours[0]), str(ref), ignore_keys=[*lab.NAMING_KEYS, "quantize.imatrix.file"],
                             expected_diffs=lab.INTENDED.get(name.removesuffix("-wide")))
    lab.record("calibrate", f"{name}/Q4_K_M", {"tensors_identical": c.tensors_identical,
                                               "tensors_total": c.tensors_total, "kv_diffs": c.kv_diffs})
    assert not c.tensor_diffs, f"{len(c.tensor_diffs)} tensors differ:\n" + "\n".join(c.tensor_diffs[:20])
    assert c.order_equal and not c.kv_diffs, "\n".join(c.kv_diffs)
    assert c.tensors_total > 0 and c.tensors_identical == c.tensors_total
