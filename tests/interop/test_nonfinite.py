"""Non-finite weights through the two Q8_0 references, with `--allow-nonfinite` (without it sling refuses them, exit
2, as the references do or should: cli/tests/cli.rs, cli/tests/hostile.rs).

Q8_0 has two references that agree on every finite block and differ on a block holding a NaN:
- `convert --type q8_0` is `convert_hf_to_gguf.py --outtype q8_0`: gguf-py's numpy `Q8_0.quantize_blocks`, whose
  `max` propagates a NaN (the block's scale is NaN, its codes 0); ±Inf gives an infinite scale. The converter writes
  them without a word; compared here on the whole file (sha256).
- `quantize --to gguf:Q8_0` is `convert_hf_to_gguf.py --outtype bf16` + `llama-quantize Q8_0`, whose blocks are
  ggml's `ggml_quantize_chunk` (C `quantize_row_q8_0_ref`: `MAX(amax, fabsf(v))` forgets a NaN at the next element,
  so the scale comes from the elements after the block's last NaN). llama-quantize refuses any non-finite input
  ("has invalid data", checked here), so there is no reference file to match: sling's `--allow-nonfinite` output is
  checked to be llama-quantize's file of the clean fixture except in the poisoned tensors, whose bytes are
  `ggml_quantize_chunk`'s for the poisoned values (`ggml-quant-ref`, the quantizer oracle).

The poisoned fixture is a copy of qwen3moe (same directory name, so the same `general.*` naming keys) with NaN,
-NaN and (for convert) ±Inf written into attention and expert weights.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import lab  # noqa: I001
import gguf_compare


def _poisoned(tmp, with_inf: bool):
    import torch
    from safetensors.torch import load_file, save_file

    src = lab.fixture_dir("qwen3moe")
    out = tmp / ("inf" if with_inf else "nan") / "qwen3moe"
    shutil.copytree(src, out)
    st = out / "model.safetensors"
    t = load_file(str(st))
    nan = float("nan")
    q = t["model.layers.0.self_attn.q_proj.weight"]
    q[0, 3] = 40.0   # an outlier ggml forgets: the NaN after it, in the same block, resets MAX
    q[0, 9] = nan
    q[1, 5] = -nan
    q[2, 0] = nan
    q[2, 33] = nan
    g = t["model.layers.1.mlp.experts.2.gate_proj.weight"]
    g[4, 7] = nan
    d = t["model.layers.0.mlp.experts.5.down_proj.weight"]   # 32-wide rows: one block per row
    d[3, 10] = nan
    if with_inf:
        k = t["model.layers.0.self_attn.k_proj.weight"]
        k[0, 4] = float("inf")
        k[5, 60] = float("-inf")
        v = t["model.layers.1.self_attn.v_proj.weight"]
        v[1, 31] = nan   # the block's last element: gguf-py and ggml both give a NaN scale
    assert all(x.dtype == torch.bfloat16 for x in t.values())
    save_file(t, str(st), metadata={"format": "pt"})
    return out


def _reference_convert(src, outtype: str, out):
    env = {**os.environ, "SLING_LAB": str(lab.LAB), "SLING_TOKPRE": lab.TOKPRE, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(lab.LAB / "venv" / "bin" / "python"), str(lab.HERE / "convert_compat.py"), str(src),
                        "--outtype", outtype, "--outfile", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"reference converter failed:\n{r.stderr[-3000:]}"


def _record(key: str, c) -> None:
    lab.record("nonfinite", key, {"file_identical": c.file_identical, "tensors_identical": c.tensors_identical,
                                  "tensors_total": c.tensors_total, "tensor_diffs": c.tensor_diffs[:10]})


def test_convert_q8_0_matches_gguf_py_on_nan_and_inf(tmp_path):
    src = _poisoned(tmp_path, with_inf=True)
    ref = tmp_path / "ref.gguf"
    _reference_convert(src, "q8_0", ref)
    ours = tmp_path / "ours.gguf"
    refused = lab.sling("-q", "convert", src, "--type", "q8_0", "--tokenizer-pre", lab.TOKPRE, "-o", ours,
                        check=False)
    assert refused.returncode == 2 and "non-finite" in refused.stderr, refused.stderr
    lab.sling("-q", "convert", src, "--type", "q8_0", "--tokenizer-pre", lab.TOKPRE, "--allow-nonfinite",
              "-o", ours)
    c = gguf_compare.compare(str(ours), str(ref))
    _record("convert q8_0 (NaN, -NaN, ±Inf)", c)
    assert c.file_identical, f"not convert_hf_to_gguf.py's file\n{c.explain()}"


# The poisoned tensors of the NaN-only fixture: GGUF name -> (safetensors names, stacked in this order).
POISONED = {
    "blk.0.attn_q.weight": ["model.layers.0.self_attn.q_proj.weight"],
    "blk.1.ffn_gate_exps.weight": [f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(8)],
    "blk.0.ffn_down_exps.weight": [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(8)],
}


def _oracle_q8_0(rows) -> bytes:
    import numpy as np
    x = np.ascontiguousarray(rows, dtype=np.float32)
    r = subprocess.run([str(lab.LLAMA_BIN / "ggml-quant-ref"), "quant", "q8_0", str(x.shape[0]), str(x.shape[1])],
                       input=x.tobytes(), capture_output=True, env={**os.environ, "LD_LIBRARY_PATH": str(lab.LLAMA_BIN)})
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return r.stdout


def test_quantize_q8_0_is_ggml_quantize_chunk_on_nan(tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file

    src = _poisoned(tmp_path, with_inf=False)
    ours = tmp_path / "ours.gguf"
    refused = lab.sling("-q", "quantize", src, "--to", "gguf:Q8_0", "--tokenizer-pre", lab.TOKPRE, "--no-manifest",
                        "-o", ours, check=False)
    assert refused.returncode == 2 and "non-finite" in refused.stderr, refused.stderr
    lab.sling("-q", "quantize", src, "--to", "gguf:Q8_0", "--tokenizer-pre", lab.TOKPRE, "--allow-nonfinite",
              "--no-manifest", "-o", ours)
    clean = lab.reference_quantize("qwen3moe", "Q8_0")
    c = gguf_compare.compare(str(ours), str(clean))
    kv_a, t_a, order_a = gguf_compare.read(str(ours))
    kv_b, t_b, order_b = gguf_compare.read(str(clean))
    assert kv_a == kv_b and order_a == order_b and gguf_compare.layout(str(ours)) == gguf_compare.layout(str(clean))
    differ = {n for n in t_a if t_a[n] != t_b[n]}
    assert differ == set(POISONED), f"tensors that differ from the clean reference: {sorted(differ)}"
    weights = load_file(str(src / "model.safetensors"))
    oracle_equal = []
    for name, parts in POISONED.items():
        rows = torch.cat([weights[p].float() for p in parts]).numpy()
        if t_a[name][2] == hashlib.sha256(_oracle_q8_0(rows)).hexdigest():
            oracle_equal.append(name)
    lab.record("nonfinite", "quantize Q8_0 (NaN, -NaN)", {
        "clean_tensors_identical": c.tensors_identical, "tensors_total": c.tensors_total,
        "poisoned": len(POISONED), "poisoned_equal_to_ggml_quantize_chunk": len(oracle_equal)})
    assert sorted(oracle_equal) == sorted(POISONED), "not ggml_quantize_chunk's Q8_0 bytes"
    # The two references differ on these blocks, so the two sling paths must too (one Q8_0 encoder serving both
    # would match only one of them).
    conv = tmp_path / "conv.gguf"
    lab.sling("-q", "convert", src, "--type", "q8_0", "--tokenizer-pre", lab.TOKPRE, "--allow-nonfinite",
              "--no-manifest", "-o", conv)
    assert gguf_compare.read(str(conv))[1]["blk.0.attn_q.weight"][2] != t_a["blk.0.attn_q.weight"][2]


def test_llama_quantize_refuses_non_finite_input(tmp_path):
    """Why the quantize test above has no reference file: llama-quantize checks its input rows and stops."""
    for with_inf, what in ((False, "NaN"), (True, "infinities")):
        src = _poisoned(tmp_path / what, with_inf=with_inf)
        bf16 = tmp_path / what / "ref-bf16.gguf"
        _reference_convert(src, "bf16", bf16)
        r = subprocess.run([str(lab.LLAMA_BIN / "llama-quantize"), str(bf16), str(tmp_path / what / "x.gguf"), "Q8_0",
                            "1"], capture_output=True, text=True,
                           env={**os.environ, "LD_LIBRARY_PATH": str(lab.LLAMA_BIN)})
        log = r.stdout + r.stderr
        assert r.returncode != 0 and "has invalid data" in log and what in log, log[-2000:]
