#!/usr/bin/env python3
"""llm-compressor `oneshot` GPTQ (or AWQ) W4A16 on pre-tokenized calibration samples, as scripts/bench/gptq.py
measures it.

Runs in llm-compressor's own venv (scripts/setup-reference.sh makes $SLING_LAB/venv-llmc):
    $LAB/venv-llmc/bin/python scripts/bench/gptq_ref.py SRC OUT --tokens TOKENS.json
        [--scheme W4A16] [--actorder weight|none] [--damp 0.01] [--block 128] [--no-all-experts]
        [--method gptq|awq|awq-gptq]
        [--dtype bfloat16|float32]

TOKENS.json: {"ctx": L, "chunks": [[ids...] x L] x N} -- the calibration samples, already tokenized, so that
llm-compressor and sling see identical tokens (gptq.py writes it from tests/interop/data/calib.txt).

What runs: AutoModelForCausalLM.from_pretrained(SRC, dtype=bfloat16 or --dtype float32) on the CPU, a datasets.Dataset with
`input_ids` / `attention_mask` columns (llm-compressor uses a dataset that already has input_ids as is),
GPTQModifier(targets="Linear", scheme=SCHEME, ignore=[lm_head, re:.*mlp.gate$], actorder, dampening_frac,
block_size) applied by oneshot(model, dataset, recipe, max_seq_length=L, num_calibration_samples=N,
pipeline="sequential", batch_size=1, shuffle_calibration_samples=False, moe_calibrate_all_experts=...), then
save_pretrained(OUT, save_compressed=True) and the tokenizer. The ignore list is what sling leaves unquantized
(embeddings are not Linear; the output head and the routers). llm-compressor's defaults kept unless given:
actorder static (= weight), dampening 0.01, block 128, moe_calibrate_all_experts True (every routed expert sees
every calibration token; the forward keeps the true routing).
--method awq: the recipe is [AWQModifier(n_grid=20, duo_scaling=True), QuantizationModifier(targets="Linear",
scheme=SCHEME, ignore=[lm_head, re:.*mlp.gate$])] (AWQ only folds scales; the quantization modifier rounds to nearest
after it), with llm-compressor's registered mappings for the architecture (Qwen3-MoE: `_moe_default_mappings`).
--method awq-gptq: [AWQModifier(n_grid=20, duo_scaling=True), GPTQModifier(...as above)], the stacked recipe of
llm-compressor's `examples/awq/llama_gptq_example.py` (AWQ's scales, then GPTQ on the smoothed model).
Prints one JSON line with the seconds spent in each phase (imports, load, quantize, save) and the settings.
"""
from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--scheme", default="W4A16")
    ap.add_argument("--actorder", default="weight", choices=("weight", "static", "none"))
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--no-all-experts", dest="all_experts", action="store_false")
    ap.add_argument("--method", default="gptq", choices=("gptq", "awq", "awq-gptq"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the dtype the model is loaded and calibrated in (default bfloat16)")
    a = ap.parse_args()
    phases = {}
    t = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    phases["import_s"] = time.perf_counter() - t

    spec = json.loads(open(a.tokens).read())
    chunks, ctx = spec["chunks"], spec["ctx"]
    assert all(len(c) == ctx for c in chunks), "every calibration sample must have ctx tokens"
    ds = Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * ctx for _ in chunks]})

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=getattr(torch, a.dtype))
    tok = AutoTokenizer.from_pretrained(a.src)
    phases["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ignore = ["lm_head", "re:.*mlp.gate$"]
    gptq = GPTQModifier(targets="Linear", scheme=a.scheme, ignore=ignore,
                        actorder=None if a.actorder == "none" else a.actorder, dampening_frac=a.damp,
                        block_size=a.block)
    if a.method in ("awq", "awq-gptq"):
        # llm-compressor 0.14's AWQ pins its cached activations (`IntermediatesCache.pin_memory`), which needs a CUDA
        # driver; on a CPU-only machine pinning is meaningless, so it is made the identity.
        if not torch.cuda.is_available():
            torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        quantize = QuantizationModifier(targets="Linear", scheme=a.scheme, ignore=ignore) if a.method == "awq" else gptq
        recipe = [AWQModifier(n_grid=20, duo_scaling=True), quantize]
    else:
        recipe = gptq
    oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, max_seq_length=ctx,
            num_calibration_samples=len(chunks), pipeline="sequential", batch_size=1,
            shuffle_calibration_samples=False, moe_calibrate_all_experts=a.all_experts)
    phases["quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    phases["save_s"] = time.perf_counter() - t
    phases["total_s"] = time.perf_counter() - T0
    print(json.dumps({"mode": f"oneshot-{a.method}", "scheme": a.scheme, "actorder": a.actorder, "damp": a.damp,
                      "block": a.block, "all_experts": a.all_experts, "samples": len(chunks), "ctx": ctx,
                      "phases": phases, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
