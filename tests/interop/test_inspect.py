"""`sling inspect --json`: the fields it documents (cli/src/inspect.rs `Report`), and parameter counts that agree
with the safetensors python package (for checkpoints) and with gguf-py (for GGUF files)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import lab  # noqa: I001  (puts llama.cpp's gguf-py on sys.path)
import gguf

TOP = {"path", "format", "architecture", "layers", "hidden_size", "experts", "params", "groups", "estimates"}
GROUP = {"tensors", "params", "bytes", "dtypes"}


def inspect_json(path) -> dict:
    r = lab.sling("inspect", path, "--json")
    try:
        return json.loads(r.stdout)
    except ValueError as e:
        raise AssertionError(f"sling inspect --json printed no JSON: {e}\n{r.stdout[:2000]}") from e


def safetensors_counts(d: Path) -> tuple[int, int, int]:
    """(params, tensors, data bytes) read with the safetensors package. Params are numel, except in MXFP4 packs:
    a `*_blocks` byte holds two FP4 values and `*_scales` bytes are per-32-block exponents (not parameters);
    FP8 `*_scale_inv` block scales are not parameters either."""
    from safetensors import safe_open
    params = tensors = nbytes = 0
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                numel = 1
                for s in sl.get_shape():
                    numel *= s
                nbytes += numel * itemsize[sl.get_dtype()]
                tensors += 1
                mx = sl.get_dtype() == "U8" and k.endswith(("_blocks", "_scales"))
                if k.endswith("_scale_inv"):
                    continue
                params += (2 * numel if k.endswith("_blocks") else 0) if mx else numel
    return params, tensors, nbytes


@pytest.mark.parametrize("name", lab.fixture_names())
def test_inspect_checkpoint(name):
    d = lab.FIXTURES / name
    j = inspect_json(d)
    assert TOP <= set(j), f"missing fields: {TOP - set(j)}"
    cfg = lab.fixture_config(name)
    assert j["format"] == "safetensors"
    assert j["architecture"] == cfg["architectures"][0]
    assert j["layers"] == cfg["num_hidden_layers"] and j["hidden_size"] == cfg["hidden_size"]
    assert set(j["experts"]) == {"routed", "active_per_token", "shared"}
    assert set(j["params"]) == {"total", "active"}
    params, tensors, nbytes = safetensors_counts(d)
    assert j["params"]["total"] == params, (j["params"], params)
    assert 0 < j["params"]["active"] <= j["params"]["total"]
    if j["experts"]["routed"]:
        assert j["params"]["active"] < j["params"]["total"]
        routed = [v for v in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(v)]
        assert j["experts"]["routed"] == cfg[routed[0]]
        assert j["experts"]["active_per_token"] == cfg["num_experts_per_tok"]
    for g, v in j["groups"].items():
        assert set(v) == GROUP, (g, v)
        assert sum(v["dtypes"].values()) == v["bytes"], (g, v)
    assert sum(v["params"] for v in j["groups"].values()) == params
    assert sum(v["tensors"] for v in j["groups"].values()) == tensors
    assert sum(v["bytes"] for v in j["groups"].values()) == nbytes
    assert j["estimates"] and all(isinstance(v, int) and v > 0 for v in j["estimates"].values())
    lab.record("inspect", name, {"params_total": j["params"]["total"], "params_active": j["params"]["active"],
                                 "safetensors_params": params, "manifest_n_params": manifest_n_params(name)})


def manifest_n_params(name):
    m = json.loads((lab.REPO / "fixtures" / "manifest.json").read_text())
    return next((f.get("n_params") for f in m["fixtures"] if f["name"] == name), None)


def test_inspect_gguf(tmp_path):
    path = lab.sling_convert("qwen3moe", "f32", tmp_path / "model.gguf")[0]
    j = inspect_json(path)
    assert TOP <= set(j)
    r = gguf.GGUFReader(str(path))
    assert j["format"] == "gguf"
    assert j["architecture"] == "qwen3moe"
    assert j["params"]["total"] == sum(int(t.n_elements) for t in r.tensors)
    assert sum(v["tensors"] for v in j["groups"].values()) == len(r.tensors)
    assert sum(v["bytes"] for v in j["groups"].values()) == sum(int(t.n_bytes) for t in r.tensors)
    assert j["experts"]["routed"] == 8 and j["experts"]["active_per_token"] == 2
