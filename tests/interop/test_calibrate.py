"""`sling calibrate` computes llama-imatrix's importance matrix with sling's own f32 forward pass.

Parity: on the same text (tests/interop/data/calib.txt), the same 64-token chunks and 8 chunks, sling's GGUF imatrix
and llama-imatrix's on the reference converter's **F32** file hold the same entries, the same per-expert token counts,
and sums of x² equal to float rounding (the fixtures are bf16 checkpoints, so the F32 file holds the same weights).

Against lab.reference_imatrix (llama-imatrix on the BF16 file) the match can only be approximate: llama.cpp's CPU
matmul with BF16 weights rounds the activations to bf16 too (vec_dot_type BF16), so router logits move by ~1e-2 and
near-tie tokens pick another expert. That comparison checks entries, per-tensor total counts and records the gap.

Then llama-quantize accepts sling's file, and `sling quantize --imatrix` with it gives llama-quantize's bytes.

Coverage: the report's unused experts per MoE layer are exactly the experts llama-imatrix writes with count 0, on
calib.txt (none unused) and on a narrow text (a phrase repeated) that leaves several unused. `--all-experts` gives
every expert a count equal to the number of tokens, and changes nothing else (same routing, same dense entries).

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


# A narrow calibration text: one phrase over and over, so that the routing leaves experts unused.
NARROW = "the cat sat on the mat. " * 40
NARROW_CHUNKS = "2"
# Fixtures where the narrow text leaves experts unused (so that the comparison is not between two empty lists).
NARROW_UNUSED = ("qwen3moe", "mixtral", "qwen2moe", "olmoe")


def sling_imatrix(name: str, out, data=lab.CALIB, chunks="8", extra=()) -> dict:
    r = lab.sling("-q", "calibrate", lab.fixture_dir(name), "--data", data, "--ctx", "64", "--chunks", chunks,
                  "-o", out, "--json", *extra)
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


def reference_imatrix_f32(name: str, data=lab.CALIB, chunks="8"):
    """llama-imatrix on the reference converter's F32 file (lab.reference_imatrix's arguments), with an F32 KV cache
    and flash attention off (the default F16 cache rounds K and V: ~5e-4 relative on every later activation)."""
    f32 = lab.reference_convert(name, "f32")[0]
    extra = OVERRIDE.get(name, [])
    key = [lab._bin_hash("llama-imatrix"), data.read_bytes(), "kv-f32", *extra]
    if chunks != "8":
        key.append(f"chunks={chunks}")
    return lab.cached_file("imatrix-f32", name, key, lambda out: lab.run_tool("llama-imatrix", [
        "-m", f32, "-f", data, "-o", out, "-c", "64", "--chunks", chunks, "-t", lab.JOBS,
        "--output-format", "gguf", "-ctk", "f32", "-ctv", "f32", "-fa", "off", *extra]))


def zero_experts(entries: dict) -> dict:
    """{layer: [experts with count 0]} from an imatrix's *_exps entries (all of a layer's must agree)."""
    out = {}
    for n, (_, c) in entries.items():
        if "_exps." not in n:
            continue
        layer = int(n.split(".")[1])
        z = [int(e) for e in np.flatnonzero(c == 0)]
        assert out.setdefault(layer, z) == z, f"{n}: zero-count experts {z} != {out[layer]} of the layer's others"
    return out


def report_zero_experts(report: dict) -> dict:
    return {int(l["layer"]): list(l["zero"]) for l in report["experts"]}


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
    # coverage report: the unused experts are the ones llama-imatrix writes with count 0 (none on this text)
    assert report_zero_experts(report) == zero_experts(ref)


@pytest.mark.parametrize("name", FIXTURES)
def test_coverage_report_names_llama_imatrix_unused_experts(name, tmp_path):
    """On a narrow text, the experts the report lists as unused per layer are exactly those with count 0 in
    llama-imatrix's file (and in sling's); every count still equal."""
    data = tmp_path / "narrow.txt"
    data.write_text(NARROW)
    ref_path = reference_imatrix_f32(name, data, NARROW_CHUNKS)
    ours_path = tmp_path / "imatrix.gguf"
    report = sling_imatrix(name, ours_path, data, NARROW_CHUNKS)
    _, ref = read_imatrix(ref_path)
    _, ours = read_imatrix(ours_path)
    assert sorted(ours) == sorted(ref)
    for n, (_, c_ref) in ref.items():
        assert np.array_equal(ours[n][1], c_ref), f"{n}: counts {ours[n][1].tolist()} != {c_ref.tolist()}"
    ref_zero = zero_experts(ref)
    assert report_zero_experts(report) == ref_zero == zero_experts(ours)
    unused = sum(map(len, ref_zero.values()))
    assert report["coverage"]["unused"] == unused
    lab.record("calibrate", f"{name}/coverage-narrow", {"unused": {str(k): v for k, v in ref_zero.items() if v},
                                                       "tokens": report["tokens"]})
    if name in NARROW_UNUSED:
        assert unused > 0, "the narrow text should leave experts unused here"


@pytest.mark.parametrize("name", FIXTURES)
def test_all_experts(name, tmp_path):
    """--all-experts: every expert count = tokens, > 0; the routing (report) and every other entry unchanged; an
    expert's sums only grow (all tokens include the routed ones)."""
    plain_report = sling_imatrix(name, tmp_path / "plain.gguf")
    report = sling_imatrix(name, tmp_path / "all.gguf", extra=("--all-experts",))
    kv_plain, plain = read_imatrix(tmp_path / "plain.gguf")
    kv_all, every = read_imatrix(tmp_path / "all.gguf")
    assert report["all_experts"] is True
    assert report["experts"] == plain_report["experts"], "the report's routing changed"
    assert sorted(every) == sorted(plain)
    assert kv_all == kv_plain
    n_tok = report["tokens"]
    n_exps = 0
    for n, (s, c) in every.items():
        s0, c0 = plain[n]
        if "_exps." in n:
            n_exps += 1
            assert (c > 0).all() and (c == n_tok).all(), f"{n}: counts {c.tolist()} (tokens {n_tok})"
            assert (s >= s0 * (1 - 1e-6)).all(), f"{n}: sums smaller than the routed tokens' alone"
        else:
            assert np.array_equal(c, c0) and np.array_equal(s, s0), f"{n} changed with --all-experts"
    assert n_exps > 0


@pytest.mark.parametrize("name", ("qwen3moe", "mixtral"))
def test_quantize_with_sling_imatrix(name, tmp_path):
    im = tmp_path / "imatrix.gguf"
    sling_imatrix(name, im)
    ref = lab.reference_quantize(name, "Q4_K_M", (), imatrix=im)  # llama-quantize accepts the file
    ours = lab.sling_quantize(name, "Q4_K_M", tmp_path / "sling.gguf", ("--imatrix", im))
    # quantize.imatrix.file: the cached reference recorded the path of an earlier run's temporary file
    c = gguf_compare.compare(str(ours[0]), str(ref), ignore_keys=["quantize.imatrix.file"],
                             expected_diffs=lab.INTENDED.get(name.removesuffix("-wide")))
    lab.record("calibrate", f"{name}/Q4_K_M", {"tensors_identical": c.tensors_identical,
                                               "tensors_total": c.tensors_total, "kv_diffs": c.kv_diffs})
    assert not c.tensor_diffs, f"{len(c.tensor_diffs)} tensors differ:\n" + "\n".join(c.tensor_diffs[:20])
    assert c.order_equal and not c.kv_diffs, "\n".join(c.kv_diffs)
    assert c.tensors_total > 0 and c.tensors_identical == c.tensors_total


@pytest.mark.parametrize("name,preset", [("qwen3moe", "Q4_K_M"), ("qwen3moe-wide", "IQ4_XS")])
def test_quantize_same_bytes_with_either_writers_file(name, preset, tmp_path):
    """Equal contents, two writers: llama-imatrix reads sling's file (--in-file) and writes its own; the sums and
    counts are then equal, and `sling quantize --imatrix` gives the same tensors with either file (only the
    quantize.imatrix.* metadata, which names the file and its chunking, differs)."""
    ours = tmp_path / "sling-imatrix.gguf"
    sling_imatrix(name, ours)
    theirs = tmp_path / "llama-imatrix.gguf"
    lab.run_tool("llama-imatrix", ["-m", lab.reference_convert(name, "bf16")[0], "--in-file", ours, "-o", theirs,
                                   "--output-format", "gguf"])
    _, a = read_imatrix(ours)
    _, b = read_imatrix(theirs)
    assert sorted(a) == sorted(b)
    for n in a:
        assert np.array_equal(a[n][0], b[n][0]) and np.array_equal(a[n][1], b[n][1]), n
    q1 = lab.sling_quantize(name, preset, tmp_path / "with-sling.gguf", ("--imatrix", ours))[0]
    q2 = lab.sling_quantize(name, preset, tmp_path / "with-llama.gguf", ("--imatrix", theirs))[0]
    c = gguf_compare.compare(str(q1), str(q2), ignore_keys=[k for k in ("quantize.imatrix.file",
                             "quantize.imatrix.dataset", "quantize.imatrix.chunks_count")])
    lab.record("calibrate", f"{name}/{preset}/either-writer", {"tensors_identical": c.tensors_identical,
                                                                "tensors_total": c.tensors_total})
    assert not c.tensor_diffs and c.tensors_total > 0 and c.tensors_identical == c.tensors_total
    assert c.order_equal and not c.kv_diffs, "\n".join(c.kv_diffs)
