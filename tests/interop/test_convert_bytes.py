"""sling convert vs llama.cpp's convert_hf_to_gguf.py, on every fixture and every output type: the whole file.

Required: sling's output file has the sha256 of the reference converter's output on the same directory (same
directory name: the reference derives the `general.*` naming keys from it): the header, the GGUF version, every
metadata key (naming and sampling keys included) with its type, value and position, the tensor infos, alignment,
padding and every tensor's bytes. On a difference the message says where (gguf_compare.Comparison.explain).

The one intended difference, lab.INTENDED: deepseekv3 and deepseekv3-fp8 (DeepseekV3ForCausalLM). transformers-saved
DeepSeek-V3 configs have no `scoring_func` (transformers hard-codes sigmoid), so the reference writes no
`deepseek2.expert_gating_func` and llama.cpp then routes with softmax (KL ~1e-2 against transformers, see
fixtures/manifest.json and test_logits.py). sling writes 2 (= LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID) for that
architecture. For these two fixtures sling's file must equal, whole file, the reference's output on a copy of the
fixture whose config.json states `"scoring_func": "sigmoid"` (lab.stated_fixture_dir), and differ from the
reference's output on the fixture itself by that one key only (test_intended_difference_is_the_gating_key_only).

Per fixture/type figures go to results/convert_bytes.json.
"""
from __future__ import annotations

import pytest

import lab  # noqa: I001  (puts llama.cpp's gguf-py on sys.path)
import gguf
import gguf_compare

GATING_KEY = lab.GATING_KEY
SIGMOID = lab.SIGMOID
INTENDED = lab.INTENDED

CASES = [(n, t) for n in lab.fixture_names() for t in lab.OUTTYPES]


@pytest.fixture(scope="module")
def references(request):
    """Run the reference conversions this session needs, in parallel, before the first comparison."""
    specs = []
    for it in request.session.items:
        if it.module is request.module and hasattr(it, "callspec") and "outtype" in it.callspec.params:
            name, outtype = it.callspec.params["name"], it.callspec.params["outtype"]
            specs.append((name, outtype, (), lab.states_gating(name)))
            if lab.states_gating(name):
                specs.append((name, outtype, (), False))
    lab.prewarm_references(specs)


@pytest.mark.parametrize("name,outtype", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_whole_file_identical_to_reference(name, outtype, references, tmp_path):
    ref = lab.reference_convert(name, outtype, stated=lab.states_gating(name))
    ours = lab.sling_convert(name, outtype, tmp_path / "sling.gguf")
    assert len(ref) == 1 and len(ours) == 1
    c = gguf_compare.compare(str(ours[0]), str(ref[0]))
    entry = {
        "file_identical": c.file_identical,
        "sha256": c.ours_sha256,
        "bytes": ours[0].stat().st_size,
        "tensors_identical": c.tensors_identical,
        "tensors_total": c.tensors_total,
        "tensor_order_equal": c.order_equal,
        "kv_compared": c.kv_compared,
        "kv_order_equal": c.kv_order_equal,
        "kv_diffs": c.kv_diffs,
        "tensor_diffs": c.tensor_diffs[:20],
        "layout_diffs": c.layout_diffs,
    }
    if lab.states_gating(name):
        entry["reference_config_states"] = lab.STATED_CONFIG
    lab.record("convert_bytes", f"{name}/{outtype}", entry)
    assert c.tensors_total > 0
    assert c.file_identical, f"{name} {outtype}: not the reference's file\n{c.explain()}"


@pytest.mark.parametrize("name,outtype", [(n, t) for n in INTENDED for t in lab.OUTTYPES],
                         ids=[f"{n}-{t}" for n in INTENDED for t in lab.OUTTYPES])
def test_intended_difference_is_the_gating_key_only(name, outtype, references, tmp_path):
    """Against the reference's output on the fixture as it is: every tensor and every other key equal, in order; the
    one extra key is deepseek2.expert_gating_func = 2 (UINT32)."""
    ref = lab.reference_convert(name, outtype)[0]
    ours = lab.sling_convert(name, outtype, tmp_path / "sling.gguf")[0]
    c = gguf_compare.compare(str(ours), str(ref), expected_diffs=INTENDED[name])
    assert not c.tensor_diffs and c.order_equal and not c.kv_diffs, c.explain()
    assert [k for k in c.ours_kvs if k != GATING_KEY] == list(c.ref_kvs), "key order differs"
    assert GATING_KEY not in c.ref_kvs
    typ, val = c.ours_kvs[GATING_KEY]
    assert typ == str(gguf.GGUFValueType.UINT32) and val == [SIGMOID], (typ, val)
    lab.record("convert_bytes_intended", f"{name}/{outtype}", {
        GATING_KEY: {"sling": c.ours_kvs.get(GATING_KEY), "reference": c.ref_kvs.get(GATING_KEY)},
        "other_keys_equal": not c.kv_diffs, "tensors_identical": c.tensors_identical,
        "tensors_total": c.tensors_total})
