#!/usr/bin/env python3
"""llm-compressor, the reference producer of compressed-tensors (vLLM) checkpoints, as targets.py measures it.

Runs in llm-compressor's own venv (it pins older torch/transformers than the main lab venv):
    $LAB/venv-llmc/bin/python scripts/bench/targets_ref.py oneshot    SRC OUT [--scheme W4A16]
    $LAB/venv-llmc/bin/python scripts/bench/targets_ref.py model-free SRC OUT --scheme FP8_BLOCK|NVFP4A16

oneshot     the documented data-free path: AutoModelForCausalLM.from_pretrained(SRC, dtype=bfloat16) on the CPU,
            QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=[lm_head, re:.*mlp.gate$]) applied by
            `oneshot(model=..., recipe=...)` without a dataset (RTN, no calibration), then
            save_pretrained(OUT, save_compressed=True) and the tokenizer (as shared/oracles/make_ct_reference.py).
model-free  `model_free_ptq(SRC, OUT, scheme=SCHEME, ignore=[model.embed_tokens, lm_head, re:.*mlp.gate$],
            max_workers=1, device="cpu")`: no model definition, streams the safetensors shard by shard (its
            documented example; max_workers is its default).
The ignore lists are what sling leaves unquantized (embeddings, the output head and the routers).
Prints one JSON line with the seconds spent in each phase (imports, load, quantize, save).
"""
from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["oneshot", "model-free"])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--scheme", default="W4A16")
    ap.add_argument("--max-workers", type=int, default=1)
    a = ap.parse_args()
    phases = {}
    t = time.perf_counter()
    import torch  # noqa: F401
    if a.mode == "oneshot":
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from transformers import AutoModelForCausalLM, AutoTokenizer
        phases["import_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(a.src)
        phases["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        recipe = QuantizationModifier(targets="Linear", scheme=a.scheme, ignore=["lm_head", "re:.*mlp.gate$"])
        oneshot(model=model, recipe=recipe)
        phases["quantize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model.save_pretrained(a.out, save_compressed=True)
        tok.save_pretrained(a.out)
        phases["save_s"] = time.perf_counter() - t
    else:
        from llmcompressor import model_free_ptq
        phases["import_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model_free_ptq(model_stub=a.src, save_directory=a.out, scheme=a.scheme,
                       ignore=["model.embed_tokens", "lm_head", "re:.*mlp.gate$"], max_workers=a.max_workers,
                       device="cpu")
        phases["quantize_and_save_s"] = time.perf_counter() - t
    phases["total_s"] = time.perf_counter() - T0
    print(json.dumps({"mode": a.mode, "scheme": a.scheme, "phases": phases, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
