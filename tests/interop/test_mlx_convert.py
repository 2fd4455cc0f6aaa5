"""`sling quantize --to mlx:BITS` against `mlx_lm.convert -q` itself (mlx-lm 0.32.2, mlx 0.32.4 on the Linux CPU
build), architecture by architecture, including the layouts mlx-lm's `sanitize` rearranges:

* DeepSeek-V2/V3 (experts stacked into `switch_mlp`; the router `MoEGate` is a bare parameter mlx-lm does not
  quantize), and DeepSeek-V3's `kv_b_proj` split per head into `self_attn.embed_q` `[H, rank, nope]` and
  `self_attn.unembed_out` `[H, v, rank]`;
* DeepSeek-V3 FP8 with 128×128 block scales (made here from the bf16 fixture by `make_fixtures.make_fp8`: mlx-lm's
  `sanitize` hard-codes that block size), dequantized to BF16 before quantizing, as mlx-lm does;
* gpt-oss with MXFP4 experts: gate/up de-interleaved, the experts kept in MLX's `mxfp4` mode byte for byte, every
  other module affine, listed in the `quantization` block as mlx-lm's `quantize_model` lists a partially quantized
  model's;
* the routers as each model's `quant_predicate` says: 8 bits, group 64 for Qwen3-MoE and gpt-oss; the run's bits
  for Mixtral, OLMoE and Qwen2-MoE, which have none;
* Qwen3-MoE, whose transformers-5 config mlx-lm cannot read: mlx-lm converts a copy with the transformers-4 keys
  sling adds (`num_experts`, `rope_theta`), sling the fixture itself.

  a. Every tensor is mlx_lm.convert's (names, dtypes, shapes, bytes); config.json and model.safetensors.index.json
     are byte-identical (the `quantization` block's modules in mlx-lm's order, `total_parameters` as mlx-lm
     counts it). model.safetensors itself differs only in layout: MLX orders the data its own way.
  b. mlx-lm loads sling's directory, and after set_dtype(float32) its logits equal `sling logits` of the same
     directory (KL < 1e-9, top-1 equal): sling reads embed_q/unembed_out back as kv_b_proj and MLX's gpt-oss
     experts back as the MXFP4 checkpoint's gate_up_proj/down_proj. Also for bf16 gpt-oss, which mlx_lm.convert
     cannot read (its `sanitize` takes the MXFP4 layout only); sling writes the layout it loads.
  c. `sling dequantize` of those rearranged tensors equals mx.dequantize of mlx-lm's own tensors, rearranged back
     (mxfp4 experts included), bit for bit.

Figures: results/mlx_convert.json.
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

import hfdir
import lab

CASES = [("deepseekv3", 4, 32), ("deepseekv3", 3, 64), ("deepseekv2", 4, 32), ("deepseekv2lite", 8, 32),
         ("deepseekv3-fp8-128", 4, 32), ("gptoss-mxfp4", 4, 32), ("gptoss-mxfp4", 8, 64), ("mixtral", 4, 32),
         ("qwen2moe", 2, 32), ("olmoe", 6, 32), ("qwen3moe", 4, 32), ("llama", 4, 32), ("qwen2", 5, 64)]
IDS = [f"{n}-q{b}-g{g}" for n, b, g in CASES]
F32_MAX_KL = 1e-9


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("mlx-convert")


def _source(work, name: str):
    """(directory sling reads, directory mlx-lm reads) for a case."""
    if name == "deepseekv3-fp8-128":
        d = work / name
        if not d.exists():
            sys.path.insert(0, str(lab.REPO / "fixtures"))
            import make_fixtures
            make_fixtures.make_fp8(lab.fixture_dir("deepseekv3"), d, block=128)
        return d, d
    if name == "qwen3moe":
        d = work / "qwen3moe-t4"
        if not d.exists():
            shutil.copytree(lab.fixture_dir(name), d)
            cfg = json.loads((d / "config.json").read_text())
            cfg.setdefault("num_experts", cfg["num_local_experts"])
            cfg.setdefault("rope_theta", cfg["rope_parameters"]["rope_theta"])
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
        return lab.fixture_dir(name), d
    return lab.fixture_dir(name), lab.fixture_dir(name)


def _pair(work, name, bits, group):
    ours, ref = work / f"sling-{name}-{bits}-{group}", work / f"mlx-{name}-{bits}-{group}"
    src, ref_src = _source(work, name)
    if not ours.exists():
        lab.sling("-q", "quantize", src, "--to", f"mlx:{bits}", "--group-size", str(group), "-o", ours)
    if not ref.exists():
        hfdir.mlx_cpu()
        from mlx_lm import convert
        convert(hf_path=str(ref_src), mlx_path=str(ref), quantize=True, q_bits=bits, q_group_size=group)
    return ours, ref


# ---------------------------------------------------------------------------------------------------------------
# a. mlx_lm.convert's tensors, config and index
@pytest.mark.parametrize("name,bits,group", CASES, ids=IDS)
def test_same_tensors_config_and_index_as_mlx_lm_convert(name, bits, group, work):
    from safetensors import safe_open
    ours, ref = _pair(work, name, bits, group)

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "np") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    out[k] = (sl.get_dtype(), sl.get_shape(), f)
        return out

    a, b = tensors(ref), tensors(ours)
    assert set(a) == set(b), f"only mlx-lm: {sorted(set(a) - set(b))[:5]}, only sling: {sorted(set(b) - set(a))[:5]}"
    meta = {k: (a[k][:2], b[k][:2]) for k in a if a[k][:2] != b[k][:2]}
    assert not meta, f"dtype/shape differ: {dict(list(meta.items())[:5])}"
    mx = hfdir.mlx_cpu()
    ra, rb = hfdir.mlx_read(ref), hfdir.mlx_read(ours)
    differ = [k for k in a if np.array(ra[k].view(mx.uint8)).tobytes() != np.array(rb[k].view(mx.uint8)).tobytes()]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ in bytes from mlx_lm.convert's: {differ[:5]}"
    for f in ("config.json", "model.safetensors.index.json"):
        ta, tb = (ref / f).read_text(), (ours / f).read_text()
        if ta != tb:
            raise AssertionError(f"{f} is not mlx_lm.convert's: " + next(
                f"line {i + 1}: sling {x!r} vs mlx-lm {y!r}" for i, (x, y) in
                enumerate(zip(tb.splitlines() + [""], ta.splitlines() + [""])) if x != y))
    q = hfdir.config(ours)["quantization"]
    modes = {q["mode"]} | {v.get("mode", "affine") for v in q.values() if isinstance(v, dict)}
    lab.record("mlx_convert", f"{name}/q{bits}/g{group}",
               {"tensors": len(a), "identical_tensors": len(a), "config_identical": True, "index_identical": True,
                "bytes": int(sum(np.array(rb[k].view(mx.uint8)).size for k in b)), "modes": sorted(modes)})


# ---------------------------------------------------------------------------------------------------------------
# b. mlx-lm loads it and computes sling's logits
LOGIT_CASES = [c for c in CASES if c[0] in ("deepseekv3", "deepseekv2", "deepseekv3-fp8-128", "gptoss-mxfp4")]


@pytest.mark.parametrize("name,bits,group", LOGIT_CASES + [("gptoss", 4, 32)],
                         ids=[f"{n}-q{b}-g{g}" for n, b, g in LOGIT_CASES + [("gptoss", 4, 32)]])
def test_mlx_lm_loads_and_matches_sling_logits(name, bits, group, work):
    mx = hfdir.mlx_cpu()
    if name == "gptoss":  # mlx_lm.convert cannot read bf16 gpt-oss: sling's directory alone
        ours = work / f"sling-{name}-{bits}-{group}"
        if not ours.exists():
            lab.sling("-q", "quantize", lab.fixture_dir(name), "--to", f"mlx:{bits}", "--group-size", str(group),
                      "-o", ours)
    else:
        ours, _ = _pair(work, name, bits, group)
    model, _ = hfdir.mlx_load(ours)
    model.set_dtype(mx.float32)
    f32 = hfdir.mlx_logits(model)
    got = hfdir.sling_logits(ours, ours.parent / (ours.name + ".logits.npy"))
    s = lab.kl_stats(f32, got)
    lab.record("mlx_convert", f"{name}/q{bits}/g{group}/logits", {"float32": s})
    assert np.isfinite(f32).all()
    assert s["kl_mean"] < F32_MAX_KL and s["top1"] == 1.0, f"mlx-lm (float32) vs sling logits: {s}"


# ---------------------------------------------------------------------------------------------------------------
# c. sling's reading of the rearranged tensors is mx.dequantize's
def _deq(mx, stored, cfg, module):
    q = cfg["quantization"]
    o = q.get(module, {})
    bits, group = o.get("bits", q["bits"]), o.get("group_size", q["group_size"])
    mode = o.get("mode", "affine") if o else q.get("mode", "affine")
    if module + ".scales" not in stored:
        return np.array(stored[module + ".weight"].astype(mx.float32))
    # affine: scales and biases widened to float32 first (as test_mlx.py; sling dequantizes in float32)
    scales, biases = stored[module + ".scales"], stored.get(module + ".biases")
    if mode == "affine":
        scales = scales.astype(mx.float32)
    return np.array(mx.dequantize(stored[module + ".weight"], scales,
                                  None if biases is None else biases.astype(mx.float32),
                                  group_size=group, bits=bits, mode=mode).astype(mx.float32))


@pytest.mark.parametrize("name,bits,group", [("deepseekv3", 4, 32), ("deepseekv3", 3, 64), ("gptoss-mxfp4", 4, 32)])
def test_rearranged_tensors_read_back_as_mx_dequantize(name, bits, group, work):
    from safetensors.numpy import load_file
    mx = hfdir.mlx_cpu()
    ours, ref = _pair(work, name, bits, group)
    out = ours.parent / (ours.name + ".f32.safetensors")
    lab.sling("-q", "dequantize", ours, "-o", out)
    deq, stored, cfg = load_file(str(out)), hfdir.mlx_read(ref), hfdir.config(ref)
    checked = 0
    for k in sorted(deq):
        if k.endswith(".self_attn.kv_b_proj.weight"):
            stem = k[: -len("kv_b_proj.weight")]
            eq = _deq(mx, stored, cfg, stem + "embed_q")  # [H, rank, nope]
            uo = _deq(mx, stored, cfg, stem + "unembed_out")  # [H, v, rank]
            want = np.concatenate([eq.swapaxes(1, 2), uo], axis=1).reshape(-1, eq.shape[1])
        elif k.endswith(".mlp.experts.gate_up_proj"):
            stem = k[: -len("gate_up_proj")]
            g, u = _deq(mx, stored, cfg, stem + "gate_proj"), _deq(mx, stored, cfg, stem + "up_proj")
            want = np.stack([g, u], axis=2).reshape(g.shape[0], -1, g.shape[2])  # rows gate, up, gate, up …
        elif k.endswith(".mlp.experts.down_proj"):
            want = _deq(mx, stored, cfg, k)
        else:
            continue
        got = deq[k]
        assert got.shape == want.shape, f"{k}: sling {got.shape}, mlx-lm {want.shape}"
        bad = got.view(np.uint32) != want.view(np.uint32)
        assert not bad.any(), f"{k}: {int(bad.sum())} of {bad.size} values differ from mx.dequantize's"
        checked += 1
    assert checked >= 2, f"no rearranged tensor found in {sorted(deq)[:8]}"
    lab.record("mlx_convert", f"{name}/q{bits}/g{group}/rearranged", {"tensors": checked, "identical": True})


# ---------------------------------------------------------------------------------------------------------------
CALIBRATED = [("deepseekv3", "gptq"), ("deepseekv3", "awq"), ("deepseekv3-fp8-128", "gptq"), ("gptoss-mxfp4", "gptq"),
              ("gptoss-mxfp4", "awq"), ("gptoss", "gptq")]
# The weights GPTQ/AWQ round to nearest on these layouts (what mlx-lm's own GPTQ does with its MultiLinear): a
# bf16 gpt-oss's stacked experts, DeepSeek-V3's embed_q/unembed_out. gpt-oss MXFP4's experts are the source's codes.
UNSOLVED = {"deepseekv3": (".self_attn.embed_q.", ".self_attn.unembed_out."),
            "deepseekv3-fp8-128": (".self_attn.embed_q.", ".self_attn.unembed_out."),
            "gptoss": (".mlp.experts.",), "gptoss-mxfp4": ()}


@pytest.mark.parametrize("name,method", CALIBRATED, ids=[f"{n}-{m}" for n, m in CALIBRATED])
def test_calibrated_methods_on_rearranged_layouts_load_in_mlx_lm(name, method, work):
    """`--method gptq|awq` where mlx-lm rearranges weights: GPTQ/AWQ solve the Hugging Face tensors; the rearranged
    weights no solver takes are rounded to nearest (byte for byte the tensors of the same run without --method, which
    test a. checks against mlx_lm.convert) and listed in the manifest; gpt-oss's MXFP4 experts stay the source's
    codes. mlx-lm loads the directory and, in float32, computes sling's logits of it."""
    mx = hfdir.mlx_cpu()
    src, _ = _source(work, name)
    rtn = work / f"sling-{name}-4-32"
    if not rtn.exists():
        lab.sling("-q", "quantize", src, "--to", "mlx:4", "--group-size", "32", "-o", rtn)
    out = work / f"sling-{name}-{method}"
    lab.sling("-q", "quantize", src, "--to", "mlx:4", "--group-size", "32", "--method", method,
              "--data", lab.REPO / "tests" / "interop" / "data" / "calib.txt", "--ctx", "128", "-o", out)
    a, b = hfdir.mlx_read(rtn), hfdir.mlx_read(out)
    assert set(a) == set(b)
    raw = {k: (np.array(a[k].view(mx.uint8)).tobytes(), np.array(b[k].view(mx.uint8)).tobytes()) for k in a}
    keep = UNSOLVED[name] + ((".mlp.experts.",) if name == "gptoss-mxfp4" else ())
    kept = [k for k in a if any(u in k for u in keep)]
    solved = [k for k in a if k.endswith(".weight") and k not in kept and raw[k][0] != raw[k][1]]
    assert kept and all(raw[k][0] == raw[k][1] for k in kept), [k for k in kept if raw[k][0] != raw[k][1]][:4]
    assert solved, "no weight differs from round-to-nearest"
    cal = json.loads((out / "sling.json").read_text())["options"]["target"]["calibration"]
    listed = sorted(f["weight"] for f in cal["fallbacks"])
    # (a weight whose rows the group does not divide is kept at source precision: nothing to round)
    want = sorted(k for k in kept if k.endswith(".weight") and any(u in k for u in UNSOLVED[name])
                  and k.removesuffix(".weight") + ".scales" in a)
    assert listed == want, f"fallbacks {listed[:4]} vs {want[:4]}"
    model, _ = hfdir.mlx_load(out)
    model.set_dtype(mx.float32)
    f32 = hfdir.mlx_logits(model)
    s = lab.kl_stats(f32, hfdir.sling_logits(out, out.parent / (out.name + ".logits.npy")))
    lab.record("mlx_convert", f"{name}/q4/g32/{method}", {"float32": s, "solved_weights": len(solved),
                                                          "rounded_to_nearest": len(want), "kept_codes": len(kept)})
    assert np.isfinite(f32).all()
    assert s["kl_mean"] < F32_MAX_KL and s["top1"] == 1.0, f"mlx-lm (float32) vs sling logits: {s}"
