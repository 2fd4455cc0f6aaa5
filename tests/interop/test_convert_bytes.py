"""sling convert vs llama.cpp's convert_hf_to_gguf.py, on every fixture and every output type.

Required: every tensor identical (name, GGML type, shape and data bytes), the same tensor order, and every
metadata key identical (type and value), except:

(a) lab.NAMING_KEYS: `general.*` naming keys that the reference derives heuristically from the directory name, a
    model card and the parameter count (gguf-py's `Metadata.load` / `size_label`). They describe the file, not
    the model, and sling derives its own.
(b) lab.INTENDED: deepseekv3 and deepseekv3-fp8 (DeepseekV3ForCausalLM). transformers-saved DeepSeek-V3 configs have
    no `scoring_func` (transformers hard-codes sigmoid), so the reference writes no
    `deepseek2.expert_gating_func` and llama.cpp then routes with softmax (KL ~1e-2 against transformers, see
    fixtures/manifest.json and test_logits.py). sling writes 2 (= LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID) for that
    architecture; we assert that value.

Per fixture/type counts go to results/convert_bytes.json.
"""
from __future__ import annotations

import pytest

import lab  # noqa: I001  (puts llama.cpp's gguf-py on sys.path)
import gguf
import gguf_compare

NAMING_KEYS = lab.NAMING_KEYS
GATING_KEY = lab.GATING_KEY
SIGMOID = lab.SIGMOID
INTENDED = lab.INTENDED

CASES = [(n, t) for n in lab.fixture_names() for t in lab.OUTTYPES]


@pytest.fixture(scope="module")
def references(request):
    """Run the reference conversions this session needs, in parallel, before the first comparison."""
    specs = [(it.callspec.params["name"], it.callspec.params["outtype"], ())
             for it in request.session.items
             if it.module is request.module and hasattr(it, "callspec") and "outtype" in it.callspec.params]
    lab.prewarm_references(specs)


@pytest.mark.parametrize("name,outtype", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_bytes_identical_to_reference(name, outtype, references, tmp_path):
    ref = lab.reference_convert(name, outtype)
    ours = lab.sling_convert(name, outtype, tmp_path / "sling.gguf")
    assert len(ref) == 1 and len(ours) == 1
    c = gguf_compare.compare(str(ours[0]), str(ref[0]), ignore_keys=list(NAMING_KEYS),
                             expected_diffs=INTENDED.get(name))
    skip = set(NAMING_KEYS) | set(INTENDED.get(name, ()))
    ref_order = gguf_compare.read(str(ref[0]))[2]
    entry = {
        "tensors_identical": c.tensors_identical,
        "tensors_total": c.tensors_total,
        "tensor_order_equal": c.order_equal,
        "kv_compared": c.kv_compared,
        "kv_diffs": c.kv_diffs,
        "tensor_diffs": c.tensor_diffs[:20],
        # informational: the order of the metadata keys (both files, less the ignored and intended keys)
        "kv_order_equal": [k for k in c.ours_kvs if k not in skip] == [k for k in c.ref_kvs if k not in skip],
    }
    if name in INTENDED:
        entry["intended"] = {GATING_KEY: {"sling": c.ours_kvs.get(GATING_KEY),
                                          "reference": c.ref_kvs.get(GATING_KEY)}}
    lab.record("convert_bytes", f"{name}/{outtype}", entry)

    assert not c.tensor_diffs, f"{len(c.tensor_diffs)} tensors differ:\n" + "\n".join(c.tensor_diffs[:20])
    assert c.order_equal, f"tensor order differs:\nsling     {c.ours_order}\nreference {ref_order}"
    assert not c.kv_diffs, "metadata differs:\n" + "\n".join(c.kv_diffs)
    assert c.tensors_total > 0 and c.tensors_identical == c.tensors_total
    if name in INTENDED:
        typ, val = c.ours_kvs[GATING_KEY]
        assert typ == str(gguf.GGUFValueType.UINT32) and val == [SIGMOID], (typ, val)
