"""Helpers for the interop tests of sling's Hugging Face-format outputs (`sling quantize --to vllm:SCHEME` and
`--to mlx:BITS`, tests test_vllm.py and test_mlx.py): running sling on them, reading them and the fixtures, and
driving the consumers (compressed-tensors, transformers, mlx / mlx-lm, llama.cpp's convert_hf_to_gguf.py).

Everything sling writes is made once per session (`Artifacts`) and shared by the tests of a module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

import lab

# The tokenizer and generation files sling copies into an HF-format artifact (those the fixtures have).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# ---------------------------------------------------------------------------------------------------------------
# sling
def quantize(name: str, to: str, out: Path, *extra, check: bool = True) -> subprocess.CompletedProcess:
    return lab.sling("-q", "quantize", lab.fixture_dir(name), "--to", to, "-o", out, *extra, check=check)


def sling_logits(d: Path, out: Path) -> np.ndarray:
    """`sling logits` of a checkpoint or of an artifact directory (weights dequantized by sling) on lab.TOKEN_IDS."""
    lab.sling("-q", "logits", d, "--ids", ",".join(map(str, lab.TOKEN_IDS)), "--out", out)
    got = np.load(out).astype(np.float64)
    assert got.shape[0] == len(lab.TOKEN_IDS), f"sling logits: shape {got.shape}"
    return got


class Artifacts:
    """sling outputs made once per session under `root`, keyed by (fixture, --to, extra flags); their
    `sling dequantize` and `sling logits` are cached as well."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._dirs: dict = {}
        self._deq: dict = {}
        self._logits: dict = {}

    def get(self, name: str, to: str, *extra) -> Path:
        key = (name, to, tuple(map(str, extra)))
        if key not in self._dirs:
            out = self.root / "-".join([name, to.replace(":", "-"), *(e.strip("-") for e in key[2])])
            quantize(name, to, out, *extra)
            assert (out / "config.json").is_file(), f"sling quantize {name} --to {to}: no config.json in {out}"
            self._dirs[key] = out
        return self._dirs[key]

    def dequantized(self, d: Path) -> dict:
        """`sling dequantize DIR`: {source tensor name: torch float32 tensor}."""
        if d not in self._deq:
            import torch
            from safetensors.torch import load_file
            out = d.parent / (d.name + ".sling-f32.safetensors")
            lab.sling("-q", "dequantize", d, "-o", out)
            t = load_file(str(out))
            assert all(v.dtype == torch.float32 for v in t.values()), "sling dequantize wrote non-F32 tensors"
            self._deq[d] = t
        return self._deq[d]

    def logits(self, d: Path) -> np.ndarray:
        if d not in self._logits:
            self._logits[d] = sling_logits(d, d.parent / (d.name + ".sling-logits.npy"))
        return self._logits[d]


# ---------------------------------------------------------------------------------------------------------------
# reading checkpoints
def read_dir(d: Path) -> dict:
    """Every tensor of a safetensors directory (torch, stored dtype); names must be unique across shards."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        t = load_file(str(f))
        dup = set(t) & set(out)
        assert not dup, f"{f.name}: tensors also in another shard: {sorted(dup)[:5]}"
        out.update(t)
    return out


def config(d: Path) -> dict:
    return json.loads((Path(d) / "config.json").read_text())


@lru_cache(maxsize=None)
def source_tensors(name: str) -> dict:
    return read_dir(lab.fixture_dir(name))


@lru_cache(maxsize=None)
def source_f32(name: str) -> dict:
    """The fixture's tensors as float32 values, as sling reads them: bf16/f16 widened exactly; DeepSeek FP8 weights
    decoded as `weight.float() * weight_scale_inv` per block (make_fixtures.fp8_decode; the scales dropped)."""
    import torch
    src = source_tensors(name)
    q = lab.fixture_config(name).get("quantization_config") or {}
    out = {}
    for k, v in src.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            br, bc = q["weight_block_size"]
            s = src[k + "_scale_inv"].float().repeat_interleave(br, 0).repeat_interleave(bc, 1)
            out[k] = v.float() * s[: v.shape[0], : v.shape[1]]
        else:
            out[k] = v.float()
    return out


def bits_equal(a, b) -> bool:
    """Bitwise equality of two float tensors (the same dtype; -0.0 != 0.0, NaNs by payload)."""
    import torch
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    iv = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
          torch.float8_e4m3fn: torch.uint8}[a.dtype]
    return bool(torch.equal(a.contiguous().view(iv), b.contiguous().view(iv)))


def first_diff(got, want) -> str:
    """Where two tensors differ first, for messages."""
    import torch
    ne = (got.float() != want.float()) | (torch.signbit(got.float()) != torch.signbit(want.float()))
    idx = ne.nonzero()
    if len(idx) == 0:
        return "no value differs"
    i = tuple(idx[0].tolist())
    return (f"{int(ne.sum())} of {ne.numel()} elements differ; first at {list(i)}: got {got[i].item()!r}, "
            f"expected {want[i].item()!r}")


# ---------------------------------------------------------------------------------------------------------------
# compressed-tensors
def ct_scheme(d: Path):
    """(QuantizationConfig, the one config group's QuantizationScheme, its compressor class) of an artifact."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    qc = QuantizationConfig.model_validate(config(d)["quantization_config"])
    assert len(qc.config_groups) == 1, f"expected one config group, got {list(qc.config_groups)}"
    scheme = next(iter(qc.config_groups.values()))
    return qc, scheme, BaseCompressor.get_value_from_registry(scheme.format)


def ct_layout(scheme, rows: int, cols: int) -> dict:
    """{local tensor name: (torch dtype, shape)} compressed-tensors 0.20.1 writes for a [rows, cols] BF16 weight
    (formats-and-algorithms.md §1.2)."""
    import torch
    w, fmt = scheme.weights, scheme.format
    b = w.num_bits
    if fmt == "pack-quantized":
        g = w.group_size
        lay = {"weight_packed": (torch.int32, (rows, -(-cols * b // 32))),
               "weight_scale": (torch.bfloat16, (rows, cols // g)), "weight_shape": (torch.int64, (2,))}
        if not w.symmetric:
            lay["weight_zero_point"] = (torch.int32, (-(-rows * b // 32), cols // g))
        return lay
    if fmt == "float-quantized":
        if w.strategy == "block":
            bh, bw = w.block_structure
            return {"weight": (torch.float8_e4m3fn, (rows, cols)),
                    "weight_scale": (torch.bfloat16, (-(-rows // bh), -(-cols // bw)))}
        return {"weight": (torch.float8_e4m3fn, (rows, cols)), "weight_scale": (torch.bfloat16, (rows, 1))}
    if fmt == "nvfp4-pack-quantized":
        return {"weight_packed": (torch.uint8, (rows, cols // 2)),
                "weight_scale": (torch.float8_e4m3fn, (rows, cols // 16)),
                "weight_global_scale": (torch.float32, (1,))}
    if fmt == "mxfp4-pack-quantized":
        return {"weight_packed": (torch.uint8, (rows, cols // 2)), "weight_scale": (torch.uint8, (rows, cols // 32))}
    raise AssertionError(f"unexpected format {fmt}")


def ct_modules(tensors: dict) -> list[str]:
    """The modules compressed-tensors would decompress: those with a `weight_scale`, in file order."""
    return [n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale")]


def ct_state(tensors: dict, module: str, compressor, scheme) -> dict:
    """One module's compressed state dict with local names (what compressor.decompress takes)."""
    names = compressor.compression_param_names(scheme)
    missing = [p for p in names if f"{module}.{p}" not in tensors]
    assert not missing, f"{module}: compressed-tensors needs {missing} (has {ct_params_of(tensors, module)})"
    return {p: tensors[f"{module}.{p}"] for p in names}


def ct_modules_are(d: Path, deq: dict) -> list[str]:
    """Every module of the single-scheme compressed-tensors directory `d`, decompressed by compressed-tensors' own
    compressor ([`ct_decompress_f32`]), is bit for bit `deq[module + ".weight"]` (sling's dequantization); the
    modules checked (at least one)."""
    tensors = read_dir(d)
    _, sch, comp = ct_scheme(d)
    modules = ct_modules(tensors)
    assert modules, "no quantized module"
    for m in modules:
        got = ct_decompress_f32(ct_state(tensors, m, comp, sch), comp, sch)
        assert bits_equal(got, deq[m + ".weight"]), f"{m}: {first_diff(got, deq[m + '.weight'])}"
    return modules


def ct_params_of(tensors: dict, module: str) -> list[str]:
    return sorted(n[len(module) + 1:] for n in tensors if n.startswith(module + ".") and "." not in n[len(module) + 1:])


def ct_decompress_f32(state: dict, compressor, scheme):
    """compressed-tensors' own decompression of one module, with float32 arithmetic and output: the stored
    BF16 scales are widened (exactly) before the compressor runs, so no rounding to BF16 happens at the end.
    NVFP4's compressor unpacks to BF16 unconditionally (unpack_fp4_from_uint8's default), so there the same
    two CT calls it makes are made with dtype float32."""
    import torch
    fmt = scheme.format
    if fmt == "nvfp4-pack-quantized":
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
        from compressed_tensors.quantization.lifecycle.forward import dequantize
        p = state["weight_packed"]
        x = unpack_fp4_from_uint8(p, p.shape[0], p.shape[1] * 2, dtype=torch.float32)
        return dequantize(x_q=x, scale=state["weight_scale"].to(torch.float32), args=scheme.weights,
                          global_scale=state["weight_global_scale"], dtype=torch.float32)
    st = dict(state)
    if st["weight_scale"].dtype in (torch.bfloat16, torch.float16):
        st["weight_scale"] = st["weight_scale"].float()
    return compressor.decompress(st, scheme)["weight"].float()


def unpack_bits(words, bits: int, n: int) -> np.ndarray:
    """Our own reading of the pack-quantized layout (formats-and-algorithms.md §1.3), independent of CT's code:
    each row of int32 words is an LSB-first little-endian bitstream, element i at bits [i*b, i*b+b); the stored
    value is unsigned (q + 2^(b-1)). Returns the signed codes q, int8, [rows, n]."""
    w = np.ascontiguousarray(np.asarray(words).astype(np.int32)).view(np.uint32)
    by = w.view(np.uint8).reshape(w.shape[0], -1)
    bitstream = np.unpackbits(by, axis=1, bitorder="little")[:, : n * bits].reshape(w.shape[0], n, bits)
    u = (bitstream.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(-1)
    return (u - (1 << (bits - 1))).astype(np.int8)


FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)


def unpack_fp4(packed) -> np.ndarray:
    """Our own reading of the FP4 packing (§1.4): element 2k in the low nibble, 2k+1 in the high one, code =
    sign<<3 | magnitude index; float32 values, -0.0 for 0x8."""
    p = np.asarray(packed).astype(np.uint8)
    codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)
    v = FP4[codes & 7]
    return np.where(codes & 8, -v, v).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's convert_hf_to_gguf.py (through convert_compat.py), several at once
def convert_f32_many(jobs: list[tuple[Path, Path]]) -> None:
    """convert_hf_to_gguf.py --outtype f32 for each (hf_dir, out.gguf), two at a time."""
    env = {**os.environ, "SLING_LAB": str(lab.LAB), "SLING_TOKPRE": lab.TOKPRE,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for src, out in jobs:
        cmd = [str(lab.LAB / "venv" / "bin" / "python"), str(lab.HERE / "convert_compat.py"), str(src),
               "--outtype", "f32", "--outfile", str(out)]
        procs.append((src, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)))
        if len(procs) >= max(2, lab.JOBS):
            _wait(procs.pop(0))
    for p in procs:
        _wait(p)


def _wait(p) -> None:
    src, proc = p
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"convert_hf_to_gguf.py failed on {src}:\n{lab._tail(err)}")


def hf_dir_of(name: str, tensors_file: Path, out: Path) -> Path:
    """A plain HF directory: the fixture's config.json (its quantization_config removed) and tokenizer files, with
    the tensors of `tensors_file` as model.safetensors."""
    out.mkdir(parents=True)
    cfg = dict(lab.fixture_config(name))
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in AUX_FILES:
        if (lab.fixture_dir(name) / f).exists():
            shutil.copy(lab.fixture_dir(name) / f, out / f)
    shutil.copy(tensors_file, out / "model.safetensors")
    return out


# ---------------------------------------------------------------------------------------------------------------
# transformers
def transformers_load(d: Path, dequantize: bool):
    """transformers 5.24 on CPU, float32: (model, loading info)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    torch.set_num_threads(lab.JOBS)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True, **kw)
    return model.eval(), info


def load_exact_weights(model, deq: dict) -> int:
    """Copies sling's dequantized weights (`Artifacts.dequantized`) into a transformers model wherever a parameter of
    the same name and shape exists, so that what is left between the two tools' logits is their forward passes.
    Returns how many were copied."""
    import torch
    sd, n = model.state_dict(), 0
    with torch.no_grad():
        for name, w in deq.items():
            t = sd.get(transformers_name(name))
            if t is not None and t.shape == w.shape:
                t.copy_(w)
                n += 1
    return n


def transformers_logits(model) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([lab.TOKEN_IDS], dtype=torch.long), use_cache=False).logits[0].double().numpy()


def transformers_name(source_name: str) -> str:
    """A source checkpoint name as transformers 5 names the parameter holding it (Mixtral's block_sparse_moe is
    renamed mlp; per-expert names are left for the caller to stack)."""
    return source_name.replace(".block_sparse_moe.", ".mlp.")


def expected_transformers_params(deq: dict) -> tuple[dict, dict]:
    """transformers-5 parameters built from per-expert source tensors: experts.gate_up_proj [E, 2I, H] =
    cat(gate/w1, up/w3) per expert, experts.down_proj [E, H, I] (w2); other tensors under transformers_name.
    Returns ({parameter: value}, {parameter: [source tensor names it holds]})."""
    import re

    import torch
    out, sources, experts = {}, {}, {}
    for n, v in deq.items():
        m = re.match(r"(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$", n)
        if m:
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(m.group(3), m.group(3))
            experts.setdefault(transformers_name(m.group(1) + "."), {}).setdefault(proj, {})[int(m.group(2))] = (n, v)
        else:
            out[transformers_name(n)], sources[transformers_name(n)] = v, [n]
    for base, projs in experts.items():
        n_e = len(projs["down_proj"])
        gu = [(projs["gate_proj"][e], projs["up_proj"][e]) for e in range(n_e)]
        out[base + "experts.gate_up_proj"] = torch.stack([torch.cat([g[1], u[1]], 0) for g, u in gu])
        sources[base + "experts.gate_up_proj"] = [x[0] for pair in gu for x in pair]
        out[base + "experts.down_proj"] = torch.stack([projs["down_proj"][e][1] for e in range(n_e)])
        sources[base + "experts.down_proj"] = [projs["down_proj"][e][0] for e in range(n_e)]
    return out, sources


def check_transformers_params(model, deq: dict) -> tuple[int, list[str]]:
    """Every parameter (and buffer) of a loaded transformers model that holds a checkpoint tensor equals sling's
    float32 dequantization of it exactly, or its BF16 rounding. Returns (how many are exact, the source names of
    the BF16-rounded ones)."""
    want_params, sources = expected_transformers_params(deq)
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    exact, rounded = 0, []
    for n, want in want_params.items():
        p = params.get(n)
        assert p is not None, f"{n}: not a parameter of the loaded model (it has {sorted(params)[:6]} ...)"
        p = p.detach().float()
        if bits_equal(p, want):
            exact += 1
        else:
            assert bits_equal(p, want.bfloat16().float()), f"{n}: transformers' weight: {first_diff(p, want)}"
            rounded += sources[n]
    return exact, rounded


# ---------------------------------------------------------------------------------------------------------------
# mlx / mlx-lm
def mlx_cpu():
    import mlx.core as mx
    mx.set_default_device(mx.cpu)
    return mx


def mlx_load(d: Path):
    """mlx_lm.load on the CPU: (model, config)."""
    mlx_cpu()
    from mlx_lm import load
    model, _tok, cfg = load(str(d), return_config=True)
    return model, cfg


def mlx_logits(model) -> np.ndarray:
    mx = mlx_cpu()
    out = model(mx.array([lab.TOKEN_IDS]))
    return np.array(out[0].astype(mx.float32), dtype=np.float64)


def mlx_read(d: Path) -> dict:
    """Every tensor of an MLX directory as mx arrays (stored dtypes: U32 codes, BF16 scales/biases)."""
    mx = mlx_cpu()
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def mx_bits(a) -> np.ndarray:
    """The bit pattern of an mx array as numpy (bf16/f16 as uint16), for bitwise comparisons."""
    mx = mlx_cpu()
    if a.dtype in (mx.bfloat16, mx.float16):
        return np.array(a.view(mx.uint16))
    return np.array(a)


def same_bytes(a, b) -> bool:
    """Same dtype, shape and bytes (any dtype)."""
    import torch
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))
