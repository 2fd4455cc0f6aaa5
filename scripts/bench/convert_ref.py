#!/usr/bin/env python3
"""Run llama.cpp's convert_hf_to_gguf.py (the pinned reference converter) unmodified, except that a tokenizer
whose pre-tokenizer hash ("chkhsh") it does not know is mapped to $BENCH_TOKPRE (default "gpt-2") instead of
aborting with NotImplementedError. The benchmark's synthetic checkpoints carry the fixtures' tiny BPE tokenizer,
whose hash is in no table; sling gets the same name through `--tokenizer-pre gpt-2`.

Usage: python scripts/bench/convert_ref.py <convert_hf_to_gguf.py arguments>
Env:   LLAMA_CPP_DIR (default ~/.cache/sling-lab/llama.cpp), BENCH_TOKPRE (default gpt-2)
"""
import logging
import os
import runpy
import sys
from pathlib import Path

LLAMA_CPP_DIR = Path(os.environ.get("LLAMA_CPP_DIR", str(Path.home() / ".cache" / "sling-lab" / "llama.cpp")))
TOKPRE = os.environ.get("BENCH_TOKPRE", "gpt-2")

sys.path.insert(0, str(LLAMA_CPP_DIR))
sys.path.insert(1, str(LLAMA_CPP_DIR / "gguf-py"))

import conversion.base as base  # noqa: E402

_log = logging.getLogger("convert_ref")
_patched = 0
for _name in dir(base):
    _cls = getattr(base, _name)
    if isinstance(_cls, type) and "get_vocab_base_pre" in _cls.__dict__:
        def _patched_fn(self, tokenizer, _orig=_cls.__dict__["get_vocab_base_pre"]):
            try:
                return _orig(self, tokenizer)
            except NotImplementedError:
                _log.warning("convert_ref: unknown chkhsh -> tokenizer.ggml.pre = %r", TOKPRE)
                return TOKPRE
        setattr(_cls, "get_vocab_base_pre", _patched_fn)
        _patched += 1
if not _patched:
    raise SystemExit("convert_ref: get_vocab_base_pre not found in conversion.base (llama.cpp layout changed?)")

sys.argv = [str(LLAMA_CPP_DIR / "convert_hf_to_gguf.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
