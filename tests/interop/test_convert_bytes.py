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


# The fixtures' directory names (qwen3moe, mixtral-sharded, ...) are too ambiguous for gguf-py's heuristics to find a
# basename, finetune or version, and their generation_config.json has no sampling settings. These copies, named and
# configured like real checkpoints, exercise the rest of the naming port (targets/gguf/src/convert/naming.rs) end to
# end: (directory name, fixture, config.json additions, generation_config.json additions, README.md text).
NAMING_CASES = {
    "qwen3-instruct": ("Qwen3-30B-A3B-Instruct-2507", "qwen3moe", {},
                       {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0, "repetition_penalty": 1.05},
                       "# Qwen3\nNo front matter: the reference reads no model card from this file.\n"),
    "name-or-path": ("mixtral-sharded-v0.1-128k", "mixtral", {"_name_or_path": "mistralai/Mixtral-8x7B-Instruct-v0.1"},
                     {"do_sample": True, "temperature": 1, "penalty_repeat": None, "repetition_penalty": 1.2}, None),
    "context-length": ("Llama-2-7b-chat-hf", "llama", {"_name_or_path": "/some/local/path/llama"}, {}, None),
    # model cards (README.md YAML front matter), as Hugging Face model repositories carry them
    "card-typical": ("Qwen3-30B-A3B", "qwen3moe", {}, {"temperature": 0.6, "top_k": 20},
                     "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n"
                     "base_model:\n- Qwen/Qwen3-30B-A3B-Base\ntags:\n- moe\n- chat\nlanguage:\n- en\n- no\n"
                     "datasets: [HuggingFaceFW/fineweb, https://huggingface.co/datasets/foo/bar]\n"
                     "model-index:\n- name: x\n  results:\n  - task:\n      type: text-generation\n"
                     "widget:\n  - text: 'Hello: world'\n---\n# Qwen3\n\nSome text.\n"),
    "card-fields": ("mixtral", "mixtral", {}, {},
                    "---\nlicense: [mit, apache-2.0]  # two\nlicense_name: 'sling''s licence'\n"
                    "license_link: https://example.com/LICENSE\nmodel_name: \"My Mixtral\"\nmodel_creator: someone\n"
                    "version: v2.1\nbase_model: https://huggingface.co/mistralai/Mixtral-8x7B-v0.1\n"
                    "base_models: ignored/because-base_model-wins\ntags: llm\nlanguage: fr\n"
                    "description: A tiny test model\nurl: https://example.com\nquantized_by: nobody\n---\n"),
}


@pytest.mark.parametrize("case", list(NAMING_CASES))
def test_naming_and_sampling_keys_whole_file(case, tmp_path):
    import json
    import shutil
    import subprocess
    dirname, base, cfg_add, gen_add, readme = NAMING_CASES[case]
    src = tmp_path / dirname
    shutil.copytree(lab.fixture_dir(base), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **cfg_add}, indent=2))
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**gen, **gen_add}, indent=2))
    if readme is not None:
        (src / "README.md").write_text(readme)
    ref = tmp_path / "ref.gguf"
    r = subprocess.run([str(lab.LAB / "venv" / "bin" / "python"), str(lab.HERE / "convert_compat.py"), str(src),
                        "--outtype", "bf16", "--outfile", str(ref)], capture_output=True, text=True,
                       env={**__import__("os").environ, "SLING_LAB": str(lab.LAB), "SLING_TOKPRE": lab.TOKPRE})
    assert r.returncode == 0, r.stderr[-3000:]
    ours = tmp_path / "sling.gguf"
    lab.sling("-q", "convert", src, "--type", "bf16", "-o", ours, "--tokenizer-pre", lab.TOKPRE, "--no-manifest")
    c = gguf_compare.compare(str(ours), str(ref))
    # and through `sling quantize` vs llama-quantize on the reference's BF16 file
    ref_q, ours_q = tmp_path / "ref-q4_k_m.gguf", tmp_path / "sling-q4_k_m.gguf"
    lab.run_tool("llama-quantize", [ref, ref_q, "Q4_K_M", "1"])
    lab.sling("-q", "quantize", src, "--to", "gguf:Q4_K_M", "-o", ours_q, "--tokenizer-pre", lab.TOKPRE,
              "--no-manifest")
    cq = gguf_compare.compare(str(ours_q), str(ref_q))
    general = {k: v[-1] for k, v in c.ref_kvs.items() if k.startswith("general.") and k != "general.architecture"}
    lab.record("convert_naming", case, {"directory": dirname, "file_identical": c.file_identical,
                                        "quantize_Q4_K_M_file_identical": cq.file_identical,
                                        "reference_general_keys": general})
    assert c.file_identical, c.explain()
    assert cq.file_identical, "quantize Q4_K_M:\n" + cq.explain()
    # the case is not vacuous: the reference wrote the keys it is about
    want = {"qwen3-instruct": ("general.basename", "general.finetune", "general.version", "general.sampling.top_k",
                               "general.sampling.penalty_repeat"),
            "name-or-path": ("general.organization", "general.basename", "general.finetune",
                             "general.sampling.temp"),
            "context-length": ("general.basename", "general.finetune"),
            "card-typical": ("general.license", "general.base_model.count", "general.base_model.0.repo_url",
                             "general.dataset.count", "general.tags", "general.languages", "general.size_label"),
            "card-fields": ("general.license", "general.license.name", "general.license.link", "general.author",
                            "general.version", "general.description", "general.source.url",
                            "general.base_model.0.name", "general.tags", "general.languages")}[case]
    assert all(k in c.ref_kvs for k in want), sorted(c.ref_kvs)


def test_unreadable_model_card_is_reported(tmp_path):
    """A model card whose metadata sling cannot take as the reference would (here a mapping under `license`) is
    ignored with a warning, never silently: the note is in --json and the conversion still succeeds."""
    import json
    import shutil
    src = tmp_path / "qwen3moe"
    shutil.copytree(lab.fixture_dir("qwen3moe"), src)
    (src / "README.md").write_text("---\nlicense:\n  name: custom\n---\n")
    r = lab.sling("convert", src, "--type", "bf16", "-o", tmp_path / "o.gguf", "--tokenizer-pre", lab.TOKPRE,
                  "--no-manifest", "--json")
    notes = json.loads(r.stdout)["notes"]
    assert any(n.startswith("README.md's model card") for n in notes), notes
    assert "README.md's model card" in r.stderr, r.stderr
