#!/usr/bin/env python3
"""Writes the committed seed inputs of the fuzz targets (fuzz/seeds/TARGET/*): small valid files of each format,
so that libFuzzer starts from inputs that get past the first checks. Standard library only.
Run from the repository root: python3 fuzz/make_seeds.py [path/to/sling.sling.json ...]"""
import json, os, shutil, struct, sys, glob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, meta=None):
    header, off, data = {}, 0, b""
    if meta:
        header["__metadata__"] = meta
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kvs, tensors, align=32):
    """kvs: (key, type id, packed value bytes); tensors: (name, ggml type, ne, raw)."""
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, t, v in kvs:
        b += gstr(k) + struct.pack("<I", t) + v
    off, offs = 0, []
    for name, ty, ne, raw in tensors:
        b += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", x) for x in ne)
        b += struct.pack("<IQ", ty, off)
        off += -(-len(raw) // align) * align
    b += b"\0" * (-len(b) % align)
    for _, _, _, raw in tensors:
        b += raw + b"\0" * (-len(raw) % align)
    return b


def f32(*v):
    return struct.pack(f"<{len(v)}f", *v)


def main():
    # Inputs that once crashed a target (`crash-*`, copied from fuzz/artifacts when the bug was fixed) stay as
    # regression seeds: every run replays them first.
    kept = {p: open(p, "rb").read() for p in glob.glob(os.path.join(SEEDS, "*", "crash-*"))}
    shutil.rmtree(SEEDS, ignore_errors=True)
    for p, data in kept.items():
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    # safetensors header
    put("safetensors_header", "small.safetensors", safetensors([
        ("a.weight", "BF16", [2, 2], b"\x80\x3f" * 4),
        ("b.bias", "F32", [3], f32(1, 2, 3)),
        ("c.blocks", "U8", [1, 2, 16], bytes(range(32))),
        ("d.scale_inv", "F8_E4M3", [2], b"\x38\x40"),
    ], {"format": "pt"}))
    put("safetensors_header", "empty.safetensors", safetensors([]))
    # index
    put("safetensors_index", "index.json", json.dumps(
        {"metadata": {"total_size": 8}, "weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}))
    # config.json: every fixture's
    for p in sorted(glob.glob(os.path.join(ROOT, "fixtures/models/*/config.json"))):
        put("config_json", os.path.basename(os.path.dirname(p)) + ".json", open(p, "rb").read())
    # ... and the qwen3moe fixture's as a mixed-precision compressed-tensors artifact (vllm:auto's shape: config
    # groups targeting modules by name and FusedMoE layers by regex)
    cfg = json.load(open(os.path.join(ROOT, "fixtures/models/qwen3moe/config.json")))
    group = lambda bits, targets: {"format": "pack-quantized", "input_activations": None,  # noqa: E731
                                   "output_activations": None, "targets": targets,
                                   "weights": {"dynamic": False, "group_size": 32, "num_bits": bits,
                                               "strategy": "group", "symmetric": True, "type": "int"}}
    cfg["quantization_config"] = {
        "config_groups": {
            "group_0": group(4, ["re:^model\\.layers\\.0\\.mlp\\.experts\\.\\d+\\.(?:down_proj|gate_proj|up_proj)$"]),
            "group_1": group(8, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]),
        },
        "format": "pack-quantized", "ignore": ["lm_head", "model.layers.1.mlp.experts"],
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "version": "0.20.1"}
    put("config_json", "qwen3moe-ct-mixed.json", json.dumps(cfg, indent=2, sort_keys=True))
    # tokenizer.json: the fixture's (one BPE tokenizer is shared by the fixtures)
    seen = set()
    for p in sorted(glob.glob(os.path.join(ROOT, "fixtures/models/*/tokenizer.json"))):
        b = open(p, "rb").read()
        if b not in seen:
            seen.add(b)
            put("tokenizer_json", os.path.basename(os.path.dirname(p)) + ".json", b)
    # GGUF: every value type, an array, two tensors
    kvs = [
        ("general.architecture", 8, gstr("llama")),
        ("general.alignment", 4, struct.pack("<I", 32)),
        ("a.u8", 0, b"\x07"), ("a.i8", 1, b"\xf9"), ("a.u16", 2, struct.pack("<H", 7)),
        ("a.i16", 3, struct.pack("<h", -7)), ("a.i32", 5, struct.pack("<i", -7)), ("a.f32", 6, f32(0.5)),
        ("a.bool", 7, b"\x01"), ("a.u64", 10, struct.pack("<Q", 7)), ("a.i64", 11, struct.pack("<q", -7)),
        ("a.f64", 12, struct.pack("<d", 0.25)),
        ("a.arr", 9, struct.pack("<IQ", 8, 2) + gstr("x") + gstr("yz")),
    ]
    put("gguf", "small.gguf", gguf(kvs, [
        ("w", 0, [4, 2], f32(*range(8))),
        ("q", 8, [32, 1], struct.pack("<e", 1.0) + bytes(range(32))),  # one Q8_0 block
    ]))
    # imatrix GGUF (llama.cpp layout) and legacy .dat
    ikvs = [
        ("imatrix.datasets", 9, struct.pack("<IQ", 8, 1) + gstr("calib.txt")),
        ("imatrix.chunk_count", 4, struct.pack("<I", 8)),
        ("imatrix.chunk_size", 4, struct.pack("<I", 512)),
    ]
    put("imatrix_gguf", "imatrix.gguf", gguf(ikvs, [
        ("blk.0.attn_q.weight.in_sum2", 0, [4, 1], f32(1, 2, 3, 4)),
        ("blk.0.attn_q.weight.counts", 0, [1, 1], f32(8)),
        ("blk.0.ffn_up_exps.weight.in_sum2", 0, [2, 2], f32(1, 2, 3, 4)),
        ("blk.0.ffn_up_exps.weight.counts", 0, [1, 2], f32(8, 0)),
    ]))
    dat = struct.pack("<i", 2)
    for name, ncall, vals in [("blk.0.attn_q.weight", 4, (8, 2)), ("blk.0.ffn_up.weight", 1, (1, 1, 1))]:
        dat += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals)) + f32(*vals)
    dat += struct.pack("<ii", 10, 8) + b"wiki.txt"
    put("imatrix_dat", "imatrix.dat", dat)
    # recipe TOML: the named recipes (raw strings in targets/gguf/src/quantize/recipe.rs) and one inline
    import re
    src = open(os.path.join(ROOT, "targets/gguf/src/quantize/recipe.rs")).read()
    for i, m in enumerate(re.findall(r'r#"(.*?)"#', src, re.S)):
        if "base =" in m:
            put("recipe_toml", f"named{i}.toml", m)
    put("recipe_toml", "inline.toml", 'base = "Q4_K_M"\n[[rule]]\nrole = "routed_experts"\nlayers = [0, 3]\ntype = "q4_k"\n[[rule]]\nname = "attn_v"\ntype = "q6_k"\n')
    put("mlx_recipe", "inline.toml", 'bits = 3\ngroup_size = 64\n[[rule]]\nname = "self_attn"\nbits = 8\n[[rule]]\nname = "switch_mlp\\\\.down_proj"\nbits = 6\ngroup_size = 32\n[[rule]]\nname = "^model\\\\.embed_tokens\\\\.weight$"\nkeep = true\n')
    # resume_journal, signature_bundle: the targets edit a genuine journal / bundle they make themselves
    # (common::edit: 3-byte operations); these seeds are a few such edit programs and the untouched original.
    for t in ("resume_journal", "signature_bundle"):
        put(t, "original", b"")
        put(t, "flip-early", bytes([10, 0, ord("x")]))
        put(t, "truncate-middle", bytes([120, 0, 0]))
        put(t, "append", bytes([255, 255, ord("}")]))
    # manifests given on the command line (e.g. from `sling convert fixtures/models/mixtral -o /tmp/m.gguf`)
    for p in sys.argv[1:]:
        put("manifest", os.path.basename(p), open(p, "rb").read())


if __name__ == "__main__":
    main()
