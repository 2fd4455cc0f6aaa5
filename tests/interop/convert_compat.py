#!/usr/bin/env python3
"""Run llama.cpp's convert_hf_to_gguf.py (the reference converter) unmodified, except that an unknown BPE
pre-tokenizer hash no longer aborts the conversion.

convert_hf_to_gguf.py encodes a fixed probe string with the model's tokenizer, hashes the token ids ("chkhsh")
and looks the hash up in a hard-coded table (`get_vocab_base_pre`). The fixtures' tiny trained BPE is not in that
table, so the script raises NotImplementedError("BPE pre-tokenizer was not recognized ..."). This wrapper catches
exactly that error and answers $SLING_TOKPRE (default "gpt-2": the fixtures use the GPT-2 byte-level regex), the
same thing `sling convert --tokenizer-pre gpt-2` does. Nothing else is changed.

Usage: python convert_compat.py <convert_hf_to_gguf.py arguments>
Env:   SLING_LAB (default ~/.cache/sling-lab), LLAMA_CPP_DIR (default $SLING_LAB/llama.cpp),
       SLING_TOKPRE (default gpt-2)
"""
import logging
import os
import runpy
import sys
from pathlib import Path

LAB = Path(os.environ.get("SLING_LAB", str(Path.home() / ".cache" / "sling-lab")))
LLAMA_CPP_DIR = Path(os.environ.get("LLAMA_CPP_DIR", str(LAB / "llama.cpp")))
TOKPRE = os.environ.get("SLING_TOKPRE", "gpt-2")

script = LLAMA_CPP_DIR / "convert_hf_to_gguf.py"
if not script.is_file():
    raise SystemExit(f"convert_compat: {script} not found; run scripts/setup-reference.sh")

sys.path.insert(0, str(LLAMA_CPP_DIR))
sys.path.insert(1, str(LLAMA_CPP_DIR / "gguf-py"))  # the gguf-py of the same llama.cpp commit

import conversion.base as base  # noqa: E402

_log = logging.getLogger("convert_compat")
_patched = 0
for _name in dir(base):
    _cls = getattr(base, _name)
    if isinstance(_cls, type) and "get_vocab_base_pre" in _cls.__dict__:
        _orig = _cls.__dict__["get_vocab_base_pre"]

        def _patched_get_vocab_base_pre(self, tokenizer, _orig=_orig):
            try:
                return _orig(self, tokenizer)
            except NotImplementedError:
                _log.warning("convert_compat: unknown chkhsh -> tokenizer.ggml.pre = %r", TOKPRE)
                return TOKPRE

        setattr(_cls, "get_vocab_base_pre", _patched_get_vocab_base_pre)
        _patched += 1
if not _patched:
    raise SystemExit("convert_compat: get_vocab_base_pre not found in conversion.base (llama.cpp layout changed?)")

sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
