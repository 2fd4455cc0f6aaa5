#!/usr/bin/env python3
"""Run the pinned reference converter for the benchmark: the same wrapper the interop suite uses
(tests/interop/convert_compat.py: convert_hf_to_gguf.py unmodified, except that an unknown tokenizer hash maps to
$SLING_TOKPRE, default "gpt-2", instead of aborting). The benchmark's synthetic checkpoints carry the fixtures'
tiny BPE tokenizer; sling gets the same name through `--tokenizer-pre gpt-2`.

Usage: python scripts/bench/convert_ref.py <convert_hf_to_gguf.py arguments>
"""
import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[2] / "tests" / "interop" / "convert_compat.py"), run_name="__main__")
