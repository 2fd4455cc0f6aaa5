"""`sling quantize --to mlx:BITS` (MLX affine directories for mlx-lm) against mlx 0.32.4 / mlx-lm 0.32.2 on the
Linux CPU build.

Cases: the tiny qwen3moe, mixtral, qwen2moe and olmoe fixtures at group 32 (their rows are 32/64/128 wide), bits 4
and 8, qwen3moe also at 2, 3, 5 and 6 bits; qwen3moe-wide at the default group size 64.

  a. mlx_lm.load(dir) loads it; its logits on lab.TOKEN_IDS equal `sling logits` of the same directory. mlx-lm
     computes in the scales' dtype (BF16 activations), which alone moves these random tiny models by KL up to
     ~1e-2, so that run is only recorded; after model.set_dtype(float32) (exact widening of the BF16 scales,
     biases and norms; the packed U32 codes untouched) both forward passes are float32 over the same weights and
     must agree to the float32 floor.
  b. Every quantized tensor is mx.quantize(w, group_size, bits, mode="affine") of the same source weights (float32
     upcast of the BF16 source; routed experts stacked in expert order): packed words bit-identical, scales and
     biases equal to the float32 ones rounded to the stored BF16 (and to mx.quantize of the BF16 weight itself,
     what `mlx_lm convert` does). Kept tensors (norms) are the source tensors. `sling dequantize` of the directory
     is mx.dequantize's float32 result, bit for bit, in the source's names.
  c. config.json: the `quantization` block (group_size, bits, mode "affine", per-module overrides: Qwen3-MoE's
     routers at 8 bits group 64, as its quant_predicate) and an identical `quantization_config`, the source's keys
     otherwise, written as mlx-lm's save_config writes it; the index as mlx-lm's save_model writes it; mlx-lm's loader builds every quantized module with the
     bits and group size the config gives it.

Figures: results/mlx.json.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import hfdir
import lab

CASES = ([(n, b, 32) for n in ("qwen3moe", "mixtral", "qwen2moe", "olmoe") for b in (4, 8)]
         + [("qwen3moe", b, 32) for b in (2, 3, 5, 6)] + [("qwen3moe-wide", 4, None)])
IDS = [f"{n}-q{b}-g{g or 'default'}" for n, b, g in CASES]
ROUTERS = (".mlp.gate", ".block_sparse_moe.gate", "shared_expert_gate")
ROUTER_BITS = {"group_size": 64, "bits": 8}
MIXTRAL_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
F32_MAX_KL = 1e-9  # float32 over identical weights: measured 3e-14 .. 1.1e-12


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return hfdir.Artifacts(tmp_path_factory.mktemp("mlx"))


def _get(art, name, bits, group):
    return art.get(name, f"mlx:{bits}", *(["--group-size", group] if group else []))


def _source_of(name: str, module: str) -> list[str]:
    """The source tensors an MLX module holds: one weight, or the routed experts of a switch_mlp, in order."""
    src = hfdir.source_f32(name)
    if ".switch_mlp." not in module:
        return [module + ".weight"]
    before, proj = module.split(".switch_mlp.")
    if before.endswith("block_sparse_moe"):
        proj = MIXTRAL_PROJ[proj]
    out = []
    while f"{before}.experts.{len(out)}.{proj}.weight" in src:
        out.append(f"{before}.experts.{len(out)}.{proj}.weight")
    assert out, f"{module}: no source experts"
    return out


def _bits_group(cfg: dict, module: str) -> tuple[int, int]:
    q = cfg["quantization"]
    o = q.get(module, {})
    return o.get("bits", q["bits"]), o.get("group_size", q["group_size"])


# ---------------------------------------------------------------------------------------------------------------
# a. mlx-lm loads it and computes sling's logits
@pytest.mark.parametrize("name,bits,group", CASES, ids=IDS)
def test_mlx_lm_loads_and_matches_sling_logits(name, bits, group, art):
    mx = hfdir.mlx_cpu()
    d = _get(art, name, bits, group)
    model, _ = hfdir.mlx_load(d)
    native = hfdir.mlx_logits(model)
    model.set_dtype(mx.float32)
    f32 = hfdir.mlx_logits(model)
    ours = art.logits(d)
    s_native, s = lab.kl_stats(native, ours), lab.kl_stats(f32, ours)  # KL(mlx-lm || sling)
    lab.record("mlx", f"{name}/q{bits}/g{group or 64}/logits", {"float32": s, "mlx_native_bf16": s_native})
    assert np.isfinite(native).all() and np.isfinite(f32).all()
    assert s["kl_mean"] < F32_MAX_KL and s["top1"] == 1.0, f"mlx-lm (float32) vs sling logits: {s}"


# ---------------------------------------------------------------------------------------------------------------
# b. the codes, scales and biases are mx.quantize's
@pytest.mark.parametrize("name,bits,group", CASES, ids=IDS)
def test_affine_tensors_are_mx_quantize(name, bits, group, art):
    import torch
    mx = hfdir.mlx_cpu()
    d = _get(art, name, bits, group)
    cfg, stored, src = hfdir.config(d), hfdir.mlx_read(d), hfdir.source_f32(name)
    raw = hfdir.source_tensors(name)
    modules = [k[: -len(".scales")] for k in stored if k.endswith(".scales")]
    accounted, used, elements = set(), set(), 0
    for m in modules:
        b, g = _bits_group(cfg, m)
        names = _source_of(name, m)
        w = np.stack([src[n].numpy() for n in names]) if ".switch_mlp." in m else src[names[0]].numpy()
        wq, s, bi = mx.quantize(mx.array(w), group_size=g, bits=b, mode="affine")
        sw, ss, sb = stored[m + ".weight"], stored[m + ".scales"], stored[m + ".biases"]
        assert (sw.dtype, ss.dtype, sb.dtype) == (mx.uint32, mx.bfloat16, mx.bfloat16), (m, sw.dtype, ss.dtype)
        assert sw.shape == wq.shape and ss.shape == s.shape, (
            f"{m}: shapes {sw.shape} {ss.shape}, mx.quantize {wq.shape} {s.shape}")
        assert np.array_equal(np.array(sw), np.array(wq)), (
            f"{m} ({b} bits, group {g}): {int((np.array(sw) != np.array(wq)).sum())} of {wq.size} packed words differ")
        for what, got, want in (("scales", ss, s), ("biases", sb, bi)):
            bad = hfdir.mx_bits(got) != hfdir.mx_bits(want.astype(mx.bfloat16))
            assert not bad.any(), (
                f"{m}.{what}: {int(bad.sum())} of {bad.size} differ from mx.quantize's rounded to BF16")
        # what `mlx_lm convert` runs: mx.quantize on the BF16 weight itself
        wb = mx.array(np.stack([raw[n].view(torch.int16).numpy() for n in names]) if ".switch_mlp." in m
                      else raw[names[0]].view(torch.int16).numpy()).view(mx.bfloat16)
        wq2, s2, b2 = mx.quantize(wb, group_size=g, bits=b, mode="affine")
        assert np.array_equal(np.array(wq2), np.array(sw)) and (hfdir.mx_bits(s2) == hfdir.mx_bits(ss)).all() \
            and (hfdir.mx_bits(b2) == hfdir.mx_bits(sb)).all(), f"{m}: differs from mx.quantize of the BF16 weight"
        accounted |= {m + ".weight", m + ".scales", m + ".biases"}
        used |= set(names)
        elements += w.size
    for n, t in stored.items():  # the rest: kept at source precision
        if n in accounted:
            continue
        assert n in raw, f"{n}: neither a quantized module nor a source tensor"
        assert raw[n].dtype == torch.bfloat16 and t.dtype == mx.bfloat16, (n, raw[n].dtype, t.dtype)
        same = (hfdir.mx_bits(t) == raw[n].view(torch.int16).numpy().view(np.uint16)).all()
        assert same, f"{n}: not the source values"
        used.add(n)
    want_used = {k for k in src if not (k == "lm_head.weight" and lab.fixture_config(name).get("tie_word_embeddings"))}
    assert used == want_used, f"source tensors not in the artifact: {sorted(want_used - used)[:5]}"
    lab.record("mlx", f"{name}/q{bits}/g{group or 64}/mx_quantize", {"quantized_modules": len(modules),
                                                                   "elements": elements, "identical": True})


@pytest.mark.parametrize("name,bits,group", CASES, ids=IDS)
def test_sling_dequantize_is_mx_dequantize(name, bits, group, art):
    """`sling dequantize` (what `sling logits` and `sling eval` read) gives, in the source checkpoint's names and
    shapes (stacked experts split back, Mixtral's w1/w2/w3), mx.dequantize's float32 values bit for bit (scales and
    biases widened to float32 first), and the source values for the kept tensors."""
    mx = hfdir.mlx_cpu()
    d = _get(art, name, bits, group)
    cfg, stored, src, deq = hfdir.config(d), hfdir.mlx_read(d), hfdir.source_f32(name), art.dequantized(d)
    tied = lab.fixture_config(name).get("tie_word_embeddings")
    assert set(deq) == {k for k in src if not (tied and k == "lm_head.weight")}, sorted(set(deq) ^ set(src))[:5]
    done = set()
    for m in (k[: -len(".scales")] for k in stored if k.endswith(".scales")):
        b, g = _bits_group(cfg, m)
        w = np.array(mx.dequantize(stored[m + ".weight"], stored[m + ".scales"].astype(mx.float32),
                                   stored[m + ".biases"].astype(mx.float32), group_size=g, bits=b, mode="affine"))
        names = _source_of(name, m)
        for i, n in enumerate(names):
            want = w[i] if ".switch_mlp." in m else w
            got = deq[n].numpy()
            assert got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
                f"{n}: sling dequantize vs mx.dequantize of {m}: {int((got != want).sum())} of {want.size} differ")
        done |= set(names)
    for n in set(deq) - done:
        assert np.array_equal(deq[n].numpy().view(np.uint32), src[n].numpy().view(np.uint32)), f"{n}: not the source"


# ---------------------------------------------------------------------------------------------------------------
# c. config.json, the index, and what mlx-lm's loader makes of them
CONFIG_CASES = [("qwen3moe", 4, 32), ("mixtral", 8, 32), ("qwen2moe", 3, 32), ("olmoe", 4, 32),
                ("qwen3moe-wide", 4, None)]


@pytest.mark.parametrize("name,bits,group", CONFIG_CASES, ids=[f"{n}-q{b}" for n, b, _ in CONFIG_CASES])
def test_config_index_and_loader(name, bits, group, art, tmp_path):
    from mlx_lm.utils import get_total_parameters, save_config
    d = _get(art, name, bits, group)
    text = (d / "config.json").read_text()
    cfg, srccfg = json.loads(text), dict(lab.fixture_config(name))
    g = group or 64
    q = cfg["quantization"]
    assert list(q)[:3] == ["group_size", "bits", "mode"], q
    assert (q["group_size"], q["bits"], q["mode"]) == (g, bits, "affine"), q
    stored = hfdir.mlx_read(d)
    modules = {k[: -len(".scales")] for k in stored if k.endswith(".scales")}
    routers = {m for m in modules if m.endswith(ROUTERS)}
    assert routers, "no router was quantized"
    overrides = {k: v for k, v in q.items() if k not in ("group_size", "bits", "mode")}
    # Qwen3-MoE's quant_predicate puts routers at 8 bits, group 64; Mixtral, Qwen2-MoE and OLMoE have none, so
    # mlx_lm.convert quantizes their routers like any Linear (test_mlx_convert.py checks the bytes against it).
    eight = name.startswith("qwen3moe") and (bits, g) != (8, 64)
    want_overrides = {m: ROUTER_BITS for m in routers} if eight else {}
    assert overrides == want_overrides, f"per-module overrides {overrides}, want {want_overrides}"
    assert cfg["quantization_config"] == q, "quantization_config must be a copy of quantization"
    # the source's keys, as they were (mlx-lm's save_config drops only _name_or_path)
    for k, v in srccfg.items():
        if k not in ("_name_or_path", "quantization_config"):
            assert cfg.get(k) == v, f"config key {k}: {cfg.get(k)!r}, source {v!r}"
    # keys sling adds for mlx-lm's ModelArgs (transformers-5 configs spell them differently): their values
    added = set(cfg) - set(srccfg) - {"quantization", "quantization_config"}
    derived = {"num_experts": srccfg.get("num_local_experts"),
               "rope_theta": (srccfg.get("rope_parameters") or {}).get("rope_theta")}
    assert added <= set(derived) and all(cfg[k] == derived[k] for k in added), {k: cfg[k] for k in added}
    model, _ = hfdir.mlx_load(d)
    built = {p: (m.bits, m.group_size) for p, m in model.named_modules() if hasattr(m, "bits")}
    assert set(built) == modules, f"mlx-lm quantized {sorted(set(built) ^ modules)[:5]} differently from the files"
    wrong = {p: bg for p, bg in built.items() if bg != _bits_group(cfg, p)}
    assert not wrong, f"mlx-lm built modules with other bits/group than config.json says: {wrong}"

    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == sorted(stored) and set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())
    assert index["metadata"]["total_parameters"] == get_total_parameters(model)
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "mlx"}, f.metadata()
    lab.record("mlx", f"{name}/q{bits}/g{g}/config",
               {"quantized_modules": len(modules), "router_overrides": len(overrides)})
    # last: written as mlx-lm's save_config writes it (indent 4, top-level keys sorted, Python's float repr)
    save_config(json.loads(text), tmp_path / "config.json")
    ref = (tmp_path / "config.json").read_text()
    assert json.loads(ref) == cfg
    if text != ref:
        raise AssertionError("config.json is not written as mlx-lm's save_config writes it: " + next(
            f"line {i + 1}: sling {a!r} vs mlx-lm {b!r}" for i, (a, b) in
            enumerate(zip(text.splitlines() + [""], ref.splitlines() + [""])) if a != b))


# ---------------------------------------------------------------------------------------------------------------
# hostile inputs
def _refused(tmp_path, *args) -> str:
    r = lab.sling("quantize", *args, "-o", tmp_path / "out", check=False)
    assert r.returncode == 2, f"exit {r.returncode} (want 2):\n{r.stderr}"
    assert not list(tmp_path.iterdir()), f"something was written: {list(tmp_path.iterdir())}"
    return r.stderr


def test_unknown_bits_are_refused(tmp_path):
    err = _refused(tmp_path, lab.fixture_dir("qwen3moe"), "--to", "mlx:7")
    assert '"7"' in err and "mlx" in err, err


def test_group_size_mlx_cannot_take_is_refused(tmp_path):
    err = _refused(tmp_path, lab.fixture_dir("qwen3moe"), "--to", "mlx:4", "--group-size", "48")
    assert "48" in err and "32, 64 or 128" in err, err


def test_unsupported_architecture_is_refused(tmp_path, tmp_path_factory):
    src = tmp_path_factory.mktemp("phi3")
    shutil.copytree(lab.fixture_dir("llama"), src, dirs_exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "phi3"
    (src / "config.json").write_text(json.dumps(cfg))
    err = _refused(tmp_path, src, "--to", "mlx:4")
    assert "phi3" in err and "qwen3_moe" in err and "deepseek_v3" in err and "gpt_oss" in err, err


def test_strict_names_the_weight_the_group_does_not_divide(tmp_path):
    err = _refused(tmp_path, lab.fixture_dir("qwen3moe"), "--to", "mlx:4", "--group-size", "128", "--strict")
    assert "--strict" in err and ".weight" in err, err
