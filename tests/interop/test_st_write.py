"""sling_formats::st_write (the streaming safetensors shard-set writer) against the Python `safetensors` library,
huggingface_hub's shard split and the index transformers' `save_pretrained` writes.

The example binary `st_write_demo` (formats/examples/st_write_demo.rs) writes a deterministic set of tensors; this
test rebuilds the same tensors in Python and checks that every file is BYTE-IDENTICAL to what
`safetensors.numpy.save_file` / `safetensors.torch.save_file` write, that a sharded set matches
`huggingface_hub.split_torch_state_dict_into_shards` + `save_file` per shard + transformers 5's index JSON byte for
byte, and that `safetensors` loads every tensor back. The binary is built here (cargo) or taken from $ST_WRITE_DEMO;
if neither works the test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

import lab

M64 = (1 << 64) - 1

TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U32": torch.uint32,
}
NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "U32": np.uint32,
}
SIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
        "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ---------------------------------------------------------------------------------------------------------------
# the binary
@lru_cache(maxsize=1)
def demo_bin() -> Path:
    env = os.environ.get("ST_WRITE_DEMO")
    if env:
        p = Path(env)
        assert p.is_file() and os.access(p, os.X_OK), f"ST_WRITE_DEMO={env} is not an executable file"
        return p
    target = Path(os.environ.get("CARGO_TARGET_DIR") or lab.REPO / "target")
    exe = target / "release" / "examples" / "st_write_demo"
    cargo = shutil.which("cargo")
    if cargo:
        r = subprocess.run([cargo, "build", "--release", "-p", "sling-formats", "--example", "st_write_demo"],
                           cwd=lab.REPO, capture_output=True, text=True)
        assert r.returncode == 0, f"building st_write_demo failed:\n{r.stderr[-4000:]}"
    assert exe.is_file(), (f"st_write_demo not found at {exe} and cargo {'failed to build it' if cargo else 'is not on PATH'}"
                           f" (build it: cargo build --release -p sling-formats --example st_write_demo, "
                           f"or set ST_WRITE_DEMO)")
    return exe


def run_demo(out: Path, *args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(demo_bin()), str(out), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"st_write_demo failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------------------------
# the same tensors in Python
def data_for(name: str, dtype: str, shape) -> bytes:
    """formats/examples/st_write_demo.rs `data_for`: LCG bytes seeded by FNV-1a of the name; bools as 0/1."""
    x = 0xcbf29ce484222325
    for b in name.encode():
        x = ((x ^ b) * 0x100000001b3) & M64
    n = SIZE[dtype] * int(np.prod(shape, dtype=np.int64)) if shape else SIZE[dtype]
    mask = 1 if dtype == "BOOL" else 0xFF
    out = bytearray(n)
    for i in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & M64
        out[i] = (x >> 56) & mask
    return bytes(out)


def torch_tensor(name, dtype, shape) -> torch.Tensor:
    raw = data_for(name, dtype, shape)
    if not raw:
        return torch.empty(shape, dtype=TORCH[dtype])
    return torch.frombuffer(bytearray(raw), dtype=TORCH[dtype]).reshape(shape).clone()


def numpy_array(name, dtype, shape) -> np.ndarray:
    return np.frombuffer(data_for(name, dtype, shape), dtype=NUMPY[dtype]).reshape(shape).copy()


def given(report) -> list[tuple[str, str, list[int]]]:
    return [(n, d, s) for n, d, s in report["given"]]


def spec(name, dtype, shape) -> str:
    return f"{name}:{dtype}:{'x'.join(map(str, shape))}"


def check_written(out: Path, report: dict) -> None:
    """Written.files / .tensors agree with the files, and safetensors loads every tensor back."""
    import hashlib
    for file, size, sha in report["files"]:
        b = (out / file).read_bytes()
        assert len(b) == size and hashlib.sha256(b).hexdigest() == sha, file
    by_name = {n: (d, s) for n, d, s in given(report)}
    assert sorted(t[0] for t in report["tensors"]) == sorted(by_name)
    for name, file, off, length, sha in report["tensors"]:
        d, s = by_name[name]
        want = data_for(name, d, s)
        b = (out / file).read_bytes()
        assert b[off:off + length] == want and hashlib.sha256(want).hexdigest() == sha, name
        with safe_open(out / file, framework="pt") as f:
            t = f.get_tensor(name)
            assert t.dtype == TORCH[d] and list(t.shape) == s, name
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == want, name
    assert not list(out.glob("*.partial"))


# ---------------------------------------------------------------------------------------------------------------
def test_single_file_matches_torch_save_file(tmp_path):
    out = tmp_path / "sling"
    rep = run_demo(out, "--metadata", "format=pt")
    assert {d for _, d, _ in given(rep)} >= {"I32", "I64", "U32", "U8", "BF16", "F32", "F8_E4M3"}
    assert [f for f, _, _ in rep["files"]] == ["model.safetensors"]
    ref = tmp_path / "ref.safetensors"
    torch_save_file({n: torch_tensor(n, d, s) for n, d, s in given(rep)}, ref, metadata={"format": "pt"})
    got = (out / "model.safetensors").read_bytes()
    assert got == ref.read_bytes(), "sling's file differs from safetensors.torch.save_file"
    check_written(out, rep)
    # without metadata too
    out2 = tmp_path / "sling2"
    rep2 = run_demo(out2, "--piece", "1")
    torch_save_file({n: torch_tensor(n, d, s) for n, d, s in given(rep2)}, tmp_path / "ref2.safetensors")
    assert (out2 / "model.safetensors").read_bytes() == (tmp_path / "ref2.safetensors").read_bytes()
    lab.record("st_write", "torch_save_file", {"bytes": len(got), "tensors": len(given(rep)), "identical": True})


def test_single_file_matches_numpy_save_file(tmp_path):
    specs = [("w.i32", "I32", [3, 5]), ("w.i64", "I64", [4]), ("w.u32", "U32", [2, 3]), ("w.u8", "U8", [7]),
             ("w.f32", "F32", [2, 2]), ("w.f16", "F16", [3]), ("w.f64", "F64", []), ("w.i8", "I8", [9]),
             ("w.i16", "I16", [1]), ("w.b", "BOOL", [5]), ("Z", "F32", [1]), ("w.empty", "U8", [0])]
    out = tmp_path / "sling"
    rep = run_demo(out, "--metadata", "format=np", "--piece", "3", *(spec(*s) for s in specs))
    ref = tmp_path / "ref.safetensors"
    np_save_file({n: numpy_array(n, d, s) for n, d, s in specs}, ref, metadata={"format": "np"})
    assert (out / "model.safetensors").read_bytes() == ref.read_bytes(), \
        "sling's file differs from safetensors.numpy.save_file"
    check_written(out, rep)
    lab.record("st_write", "numpy_save_file", {"tensors": len(specs), "identical": True})


@pytest.mark.parametrize("max_shard", [2048, 700, 1])
def test_sharded_set_matches_hub_split_and_transformers_index(tmp_path, max_shard):
    out = tmp_path / "sling"
    rep = run_demo(out, "--metadata", "format=pt", "--max-shard-bytes", max_shard, "--total-parameters", 12345)
    state = {n: torch_tensor(n, d, s) for n, d, s in given(rep)}
    # What transformers 5 save_pretrained does (modeling_utils.py): split with huggingface_hub, save_file per shard
    # with metadata {"format": "pt"}, index json.dumps(indent=2, sort_keys=True) + "\n".
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard)
    assert split.is_sharded
    ref = tmp_path / "ref"
    ref.mkdir()
    for file, names in split.filename_to_tensors.items():
        torch_save_file({n: state[n] for n in names}, ref / file, metadata={"format": "pt"})
    index = {"metadata": {"total_parameters": 12345, **split.metadata}, "weight_map": split.tensor_to_filename}
    (ref / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    want_files = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == want_files
    assert [f for f, _, _ in rep["files"]] == list(split.filename_to_tensors)
    for name in want_files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), f"{name} differs (max_shard {max_shard})"
    check_written(out, rep)
    # the index maps every name to a shard that holds it
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(idx["weight_map"]) == sorted(state)
    for name, file in idx["weight_map"].items():
        assert name in torch_load_file(out / file)
    lab.record("st_write", f"sharded/{max_shard}", {"files": len(want_files), "identical": True})


def test_oversized_tensor_shard_order_matches_hub(tmp_path):
    # huggingface_hub appends a tensor larger than the limit as its own shard at once, before the shard being
    # filled: [a, BIG, c] -> [BIG], [a, c].
    specs = [("a", "BF16", [8]), ("big", "F32", [64]), ("c", "I64", [2]), ("d", "U8", [20]), ("e", "F8_E4M3", [3])]
    out = tmp_path / "sling"
    rep = run_demo(out, "--max-shard-bytes", 40, *(spec(*s) for s in specs))
    state = {n: torch_tensor(n, d, s) for n, d, s in specs}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors", max_shard_size=40)
    ref = tmp_path / "ref"
    ref.mkdir()
    for file, names in split.filename_to_tensors.items():
        torch_save_file({n: state[n] for n in names}, ref / file)
    assert [f for f, _, _ in rep["files"]] == list(split.filename_to_tensors)
    assert split.filename_to_tensors["model-00001-of-00003.safetensors"] == ["big"]
    for file in split.filename_to_tensors:
        assert (out / file).read_bytes() == (ref / file).read_bytes(), file
    check_written(out, rep)
