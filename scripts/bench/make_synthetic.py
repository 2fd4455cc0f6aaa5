#!/usr/bin/env python3
"""Write a synthetic Qwen3-MoE checkpoint in Hugging Face layout, for the conversion benchmark.

    python scripts/bench/make_synthetic.py --size 1 --out /tmp/sling-bench/qwen3moe-1g
    python scripts/bench/make_synthetic.py --size 4 --out /tmp/sling-bench/qwen3moe-4g

Output directory:
  config.json                                  architectures [Qwen3MoeForCausalLM], hub-style keys
  model-0000i-of-0000N.safetensors             bf16 random weights, per-expert 2-D tensors (hub layout)
  model.safetensors.index.json                 weight_map
  tokenizer.json, tokenizer_config.json        the tiny BPE of fixtures/models/qwen3moe (vocab 384)
  generation_config.json

The dimensions are Qwen3-30B-A3B's except for the expert count and the vocabulary: hidden 2048, 32 heads x 128,
4 KV heads, moe_intermediate 768, 32 experts (top-8). One layer is ~338 MB; --size only changes the number of
layers, so every tensor has the same size in the 1 GB and the 4 GB model (expert matrices 3 MiB each, stacked
per layer into 96 MiB GGUF tensors), which makes the peak RSS of a converter comparable across model sizes.
The vocabulary stays at the tokenizer's 384 tokens so that no converter has to pad it.

Nothing goes through torch: the safetensors files are written by hand (JSON header + raw little-endian bytes),
tensor by tensor, from a pool of random bf16 values (normal, std 0.02, rounded to nearest even). Each tensor is
a slice of that pool at a random offset, so generating 4 GB takes seconds and ~100 MB of RAM. The values are
finite, so no converter's NaN/Inf checks trigger. Deterministic for a given --seed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_SRC = REPO / "fixtures" / "models" / "qwen3moe"

HIDDEN = 2048
HEADS = 32
HEAD_DIM = 128
KV_HEADS = 4
MOE_FF = 768
EXPERTS = 32
TOP_K = 8
VOCAB = 384          # = the fixture tokenizer's vocabulary
SHARD_BYTES = 512 * 1024 * 1024   # target shard size (real hub shards are ~4 GB; smaller -> several shards)
POOL_ELEMS = 24 * 1024 * 1024     # random bf16 pool (48 MiB); the largest tensor has 8 Mi elements


def layer_tensors(i: int):
    p = f"model.layers.{i}"
    t = [
        (f"{p}.input_layernorm.weight", (HIDDEN,)),
        (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
        (f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)),
        (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)),
        (f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)),
    ]
    for e in range(EXPERTS):
        t += [
            (f"{p}.mlp.experts.{e}.gate_proj.weight", (MOE_FF, HIDDEN)),
            (f"{p}.mlp.experts.{e}.up_proj.weight", (MOE_FF, HIDDEN)),
            (f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, MOE_FF)),
        ]
    return t


def nbytes(shape) -> int:
    n = 2
    for d in shape:
        n *= d
    return n


def layer_bytes() -> int:
    return sum(nbytes(s) for _, s in layer_tensors(0))


def global_tensors():
    return [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)),
            ("lm_head.weight", (VOCAB, HIDDEN))]


def layers_for(size_gb: float) -> int:
    glob = sum(nbytes(s) for _, s in global_tensors())
    return max(1, round((size_gb * 1e9 - glob) / layer_bytes()))


def bf16_pool(rng: np.random.Generator) -> np.ndarray:
    x = (rng.standard_normal(POOL_ELEMS, dtype=np.float32) * 0.02).view(np.uint32)
    # float32 -> bfloat16, round to nearest even (no NaN/Inf in the input)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)


def norm_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Norm weights around 1.0 (as in trained models), as bf16 bits."""
    x = (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).view(np.uint32)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)


def write_shard(path: Path, tensors, data_for):
    header = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = nbytes(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)   # the safetensors library pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for name, shape in tensors:
            a = data_for(name, shape)
            assert a.dtype == np.uint16 and a.size * 2 == nbytes(shape), name
            f.write(a.astype("<u2", copy=False).tobytes())
    return off


def config(n_layers: int) -> dict:
    # Hub spelling of Qwen/Qwen3-30B-A3B's config.json (num_experts, rope_theta), with our dimensions.
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "decoder_sparse_step": 1,
        "eos_token_id": 0,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
        "max_window_layers": n_layers,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": MOE_FF,
        "norm_topk_prob": True,
        "num_attention_heads": HEADS,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": KV_HEADS,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }


def main():
    global EXPERTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, required=True, help="approximate checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", type=int, default=EXPERTS,
                    help=f"experts per layer (default {EXPERTS}; Qwen3-30B-A3B has 128: 4x larger stacked GGUF tensors)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing directory")
    a = ap.parse_args()

    if a.out.exists():
        if not a.force:
            sys.exit(f"{a.out} exists (use --force)")
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)

    EXPERTS = a.experts
    n_layers = layers_for(a.size)
    rng = np.random.default_rng(a.seed)
    pool = bf16_pool(rng)

    def data_for(name, shape):
        n = nbytes(shape) // 2
        if name.endswith("norm.weight"):
            return norm_values(rng, n)
        off = int(rng.integers(0, POOL_ELEMS - n))
        return pool[off:off + n]

    # Shard plan: embeddings first, layers in order, lm_head + final norm last; a new shard once the target
    # size is exceeded (never splitting a tensor), like transformers' save_pretrained.
    order = [global_tensors()[0]]
    for i in range(n_layers):
        order += layer_tensors(i)
    order += [global_tensors()[1], global_tensors()[2]]
    shards, cur, cur_bytes = [], [], 0
    for name, shape in order:
        if cur and cur_bytes + nbytes(shape) > SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes(shape)
    shards.append(cur)

    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(a.out / fname, tensors, data_for)
        for name, _ in tensors:
            weight_map[name] = fname
    (a.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (a.out / "config.json").write_text(json.dumps(config(n_layers), indent=2))
    (a.out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "transformers_version": "4.51.0"},
                                                             indent=2))
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_SRC / fn, a.out / fn)

    info = {"dir": str(a.out), "layers": n_layers, "experts": EXPERTS, "hidden": HIDDEN, "moe_intermediate": MOE_FF,
            "shards": len(shards), "tensor_bytes": total,
            "files_bytes": sum(p.stat().st_size for p in a.out.iterdir())}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
