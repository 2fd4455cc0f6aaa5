"""Split output (--split-max-tensors, --split-max-size) on an MoE fixture.

- sling's shards are convert_hf_to_gguf.py's shards with the same option, whole file (sha256), names included (the
  reference run on the fixture with the sigmoid gating stated in its config: lab.INTENDED);
- llama-gguf-split --merge accepts them, and the merged file's tensors (name, type, shape, bytes, order) and keys
  equal the unsplit output's (less the split.* keys the merge tool writes);
- llama.cpp loads the split model from its first shard and gives bit-identical logits to the unsplit file.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

import lab  # noqa: I001  (puts llama.cpp's gguf-py on sys.path)
import gguf_compare

NAME = "deepseekv3"  # the most involved MoE fixture: MLA, shared expert, grouped routing; 52 tensors, ~1 MB in F32
OUTTYPE = "f32"
SPLITS = {
    "max-tensors": ["--split-max-tensors", "20"],  # 20 + 20 + 12 tensors
    "max-size": ["--split-max-size", "300K"],       # 4 shards
}


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory):
    d = tmp_path_factory.mktemp("unsplit")
    path = lab.sling_convert(NAME, OUTTYPE, d / "model.gguf")[0]
    return path, lab.llama_logits([path], lab.TOKEN_IDS, d)[0]


def _split_keys(path):
    kvs = gguf_compare.read(str(path))[0]
    return {k: v[-1][0] for k, v in kvs.items() if k.startswith("split.")}


@pytest.mark.parametrize("how", list(SPLITS))
def test_split(how, unsplit, tmp_path):
    args = SPLITS[how]
    whole, whole_logits = unsplit
    shards = lab.sling_convert(NAME, OUTTYPE, tmp_path / "model.gguf", args)
    n = len(shards)
    assert n > 1, f"{args} did not split"
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]

    # shard by shard, against the reference converter with the same option
    ref = lab.reference_convert(NAME, OUTTYPE, args, stated=lab.states_gating(NAME))
    assert [p.name for p in shards] == [p.name for p in ref]
    n_tensors = 0
    identical = 0  # tensors byte-identical to the reference converter's, over all shards
    files_identical = 0
    for i, (ours, theirs) in enumerate(zip(shards, ref)):
        c = gguf_compare.compare(str(ours), str(theirs))
        assert c.file_identical, f"shard {ours.name}:\n{c.explain()}"
        files_identical += c.file_identical
        n_tensors += c.tensors_total
        identical += c.tensors_identical
        sk = _split_keys(ours)
        assert sk["split.no"] == i and sk["split.count"] == n, sk
        assert sk["split.tensors.count"] == len(gguf_compare.read(str(whole))[2]), sk

    assert identical == n_tensors, f"{n_tensors - identical} tensors differ from the reference converter's shards"

    # llama-gguf-split --merge
    merged = tmp_path / "merged.gguf"
    r = subprocess.run([str(lab.LLAMA_BIN / "llama-gguf-split"), "--merge", str(shards[0]), str(merged)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"llama-gguf-split --merge failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    c = gguf_compare.compare(str(merged), str(whole), ignore_keys=["split.*"])
    assert c.ok and c.order_equal, "merged != unsplit:\n" + "\n".join(c.tensor_diffs + c.kv_diffs)
    assert c.tensors_identical == c.tensors_total == n_tensors

    # llama.cpp on the split model (first shard) and on the merged file
    split_logits, merged_logits = lab.llama_logits([shards[0], merged], lab.TOKEN_IDS, tmp_path)
    same_split = bool(np.array_equal(split_logits, whole_logits))
    same_merged = bool(np.array_equal(merged_logits, whole_logits))
    lab.record("split", f"{NAME}/{OUTTYPE}/{how}", {
        "args": args, "shards": n, "tensors": n_tensors, "tensors_identical_to_reference": f"{identical}/{n_tensors}",
        "shards_whole_file_identical": f"{files_identical}/{n}",
        "merged_tensors_identical": c.tensors_identical, "logits_split_equal_unsplit": same_split,
        "logits_merged_equal_unsplit": same_merged,
        "maxabs_split_vs_unsplit": float(np.abs(split_logits - whole_logits).max())})
    assert same_split, f"split model logits differ from the unsplit file's: {lab.kl_stats(whole_logits, split_logits)}"
    assert same_merged, f"merged file logits differ from the unsplit file's: {lab.kl_stats(whole_logits, merged_logits)}"
