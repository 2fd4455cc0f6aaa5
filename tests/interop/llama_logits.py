#!/usr/bin/env python3
"""Logits of GGUF files in llama.cpp, through llama-cpp-python's ctypes bindings on our own llama.cpp build.

Run as a separate process by the tests (a GGML_ASSERT in llama.cpp aborts the process; it must not take pytest
down with it):

    LLAMA_CPP_LIB_PATH=$SLING_LAB/llama.cpp-build/bin PYTHONPATH=$SLING_LAB/pylib \
        python llama_logits.py --ids 1,2,3 --out DIR A.gguf [B.gguf ...]

writes DIR/<i>.npy (float64 [n_tokens, n_vocab], i = position of the GGUF in the argument list).

Settings that matter for an exact comparison (see the traps in the project's interop notes):
  - KV cache F32 (llama.cpp's default F16 cache alone adds KL ~7e-7);
  - flash attention off;
  - one batch holding every token, logits for all positions.
For a split model pass the first shard; llama.cpp finds the others.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def logits(llama_cpp, path: str, ids: list[int], n_threads: int) -> np.ndarray:
    n = len(ids)
    n_ctx = max(n, 64)
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          n_threads=n_threads, n_threads_batch=n_threads,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                          verbose=bool(os.environ.get("SLING_LLAMA_VERBOSE")))
    try:
        llm.eval(ids)
        return np.array(llm.scores[:n], dtype=np.float64)
    finally:
        if hasattr(llm, "close"):
            llm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("gguf", nargs="+")
    a = ap.parse_args()
    import llama_cpp

    ids = [int(x) for x in a.ids.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(a.gguf):
        np.save(out / f"{i}.npy", logits(llama_cpp, g, ids, a.threads))


if __name__ == "__main__":
    main()
