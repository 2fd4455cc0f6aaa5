#!/usr/bin/env python3
"""Reference vectors for sling-quantizers `ct` and `mlx` (quantizers/tests/ct_mlx_vectors.rs).

Runs the REAL libraries on CPU: compressed-tensors 0.20.1 (its own calculate_qparams, generate_gparam,
generate_mx_scales, cast_to_fp4, pack_to_int32, pack_fp4_to_uint8 and the Packed / NVFP4 / MXFP4 / naive
compressors), torch 2.15's float8_e4m3fn cast, and mlx 0.32.4 (mlx-cpu) mx.quantize / mx.dequantize in
mode="affine". Writes quantizers/tests/data/ct_mlx_vectors.json.

    ~/.cache/sling-lab/venv/bin/python scripts/gen_ct_mlx_vectors.py

Where sling's definition and the library's CPU path differ, the references are produced in the setting where
the two definitions coincide:
  * compressed-tensors on BF16/F16 weights computes scales and x/scale in the weight dtype (double rounding,
    formats-and-algorithms.md §1.3). sling computes in f32 and rounds the scale once to its storage dtype. That is
    exactly compressed-tensors run on *f32* weights with QuantizationArgs.scale_dtype = the storage dtype, which is
    what every compressed-tensors case below does (scale_dtype=None for F32).
  * MLX stores scales/biases in the input dtype; a BF16/F16 case feeds MLX the BF16/F16-rounded input (stored
    here as its own matrix, also a check of sling's ScaleDtype::round) and compares sling's f32 dequantization with
    mx.dequantize of the f32-widened stored scales/biases (mx.dequantize in BF16 would round the result again).
  * Non-finite inputs are not in the library vectors: the libraries have no defined behaviour there (NaN statistics
    poison whole groups); sling's documented policy is covered by the Rust unit tests.

Large arrays (codes, packed words, dequantized values) are stored as FNV-1a-64 hashes of their little-endian bytes
(hex), with the full arrays kept for a few "detail" cases, so the file stays small.
"""

import json
import os
import sys

import numpy as np
import torch

import compressed_tensors
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.quant_args import round_to_quantized_type_dtype
from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales
import mlx.core as mx

mx.set_default_device(mx.cpu)
torch.set_grad_enabled(False)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "quantizers", "tests", "data", "ct_mlx_vectors.json")

ROWS, COLS = 8, 256
SD_TORCH = {"F32": None, "BF16": torch.bfloat16, "F16": torch.float16}
SD_MLX = {"F32": mx.float32, "BF16": mx.bfloat16, "F16": mx.float16}


def fnv(a) -> str:
    """FNV-1a 64 over the little-endian bytes of a numpy array."""
    h = 0xCBF29CE484222325
    for b in np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def f32bits(t) -> list:
    """f32 bit patterns (u32) of a torch tensor / numpy array."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to(torch.float32).numpy()
    return np.asarray(t, dtype=np.float32).reshape(-1).view(np.uint32).tolist()


def u32(t) -> np.ndarray:
    """int32 / uint32 tensor → numpy uint32 (bit pattern)."""
    if isinstance(t, torch.Tensor):
        t = t.numpy()
    return np.asarray(t).view(np.uint32) if np.asarray(t).dtype == np.int32 else np.asarray(t, dtype=np.uint32)


def hostile_matrix() -> np.ndarray:
    rng = np.random.default_rng(20260917)
    x = np.zeros((ROWS, COLS), dtype=np.float32)
    # 0: typical weights
    x[0] = rng.normal(0, 0.02, COLS)
    # 1: per-32 magnitudes from 1e-3 to 10, asymmetric offsets
    mags = np.repeat(10.0 ** rng.uniform(-3, 1, COLS // 32), 32)
    x[1] = rng.normal(0.3, 1.0, COLS) * mags
    # 2: zeros with some negative zeros (all-zero groups)
    x[2] = 0.0
    x[2, ::3] = -0.0
    # 3: constants: 0.37 in the first half, -1.5 in the second
    x[3, :128] = 0.37
    x[3, 128:] = -1.5
    # 4: single outlier per 128 over small values
    x[4] = rng.normal(0, 0.01, COLS)
    x[4, 17] = 50.0
    x[4, 200] = -80.0
    # 5: ties: per 32 the amax is 7.5 (int4-sym scale 1) or 6 (FP4/MX scale 1), the rest on half steps
    half = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
    for g in range(COLS // 32):
        grp = np.concatenate([rng.integers(-8, 8, 16) + 0.5, rng.choice(half, 16) * rng.choice([-1, 1], 16)])
        grp[0] = 7.5 if g % 2 == 0 else 6.0
        x[5, g * 32:(g + 1) * 32] = grp
    # 6: subnormals (±) and negative tiny normals
    sub = rng.integers(1, 1 << 23, 128).astype(np.uint32).view(np.float32) * rng.choice([-1, 1], 128)
    x[6, :128] = sub
    x[6, 128:] = -(10.0 ** rng.uniform(-38, -20, 128))
    x[6, 160:192] = -(10.0 ** rng.uniform(-38, -36, 32))
    # 7: wide dynamic range with random signs, some exact e4m3 / MX grid values
    x[7] = (10.0 ** rng.uniform(-6, 3, COLS)) * rng.choice([-1, 1], COLS)
    x[7, 0:8] = [448.0, -448.0, 6.0, 0.5, 1.75, 3.5, 240.0, 1e-3]
    return x.astype(np.float32)


def group_minmax(x: torch.Tensor, g: int):
    r, c = x.shape
    v = x.reshape(r, c // g, g)
    return v.amin(dim=-1), v.amax(dim=-1)


def int_case(x, bits, sym, group, sd, detail):
    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym,
        strategy="group" if group else "channel", group_size=group,
        scale_dtype=SD_TORCH[sd],
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    mn, mx_ = group_minmax(x, group or x.shape[1])
    scale, zp = calculate_qparams(mn, mx_, args)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int8
    sdict = {"weight": x.clone(), "weight_scale": scale, "weight_zero_point": zp}
    comp = PackedQuantizationCompressor.compress(sdict, scheme)
    packed = u32(comp["weight_packed"])
    # the codes themselves, as the compressor's quantize step produces them
    codes = quantize(x=x, scale=scale, zero_point=zp, args=args, dtype=torch.int8)
    assert torch.equal(unpack_from_int32(comp["weight_packed"], bits, x.shape), codes)
    # PackedQuantizationCompressor.decompress itself fails here for asymmetric 4-bit with <= 8 rows (0.20.1 bug:
    # unpack_from_int32(packed_dim=0) views a [8, 1] transposed tensor whose stride(-1) is 8 as uint8), so
    # dequantize the unpacked codes with the same `dequantize` it calls.
    dec = dequantize(x_q=codes, scale=scale, zero_point=None if sym else zp, args=args, dtype=torch.float32)
    codes = codes.numpy()
    case = {
        "bits": bits, "symmetric": sym, "group": group, "sd": sd,
        "scales": f32bits(scale),
        "codes_fnv": fnv(codes), "packed_fnv": fnv(packed), "dequant_fnv": fnv(dec.numpy()),
    }
    if not sym:
        case["zeros"] = zp.reshape(-1).tolist()
        case["zp_packed"] = u32(comp["weight_zero_point"]).reshape(-1).tolist()
    if detail:
        case["codes"] = codes.reshape(-1).tolist()
        case["packed"] = packed.reshape(-1).tolist()
        case["dequant"] = f32bits(dec)
    return case


def fp8_channel_case(x, sd, detail):
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel", scale_dtype=SD_TORCH[sd])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    mn, mx_ = group_minmax(x, x.shape[1])
    scale, zp = calculate_qparams(mn, mx_, args)
    comp = NaiveQuantizationCompressor.compress({"weight": x.clone(), "weight_scale": scale, "weight_zero_point": zp}, scheme)
    codes = comp["weight"].view(torch.uint8).numpy()
    deq = dequantize(x_q=comp["weight"].to(torch.float32), scale=scale, args=args, dtype=torch.float32)
    case = {"sd": sd, "scales": f32bits(scale), "codes_fnv": fnv(codes), "dequant_fnv": fnv(deq.numpy())}
    if detail:
        case["codes"] = codes.reshape(-1).tolist()
    return case


def fp8_block_case(x, block, sd):
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="block",
                            block_structure=list(block), scale_dtype=SD_TORCH[sd])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    r, c = x.shape
    bh, bw = block
    nbr, nbc = -(-r // bh), -(-c // bw)
    pad = torch.zeros(nbr * bh, nbc * bw)
    pad[:r, :c] = x
    tiles = pad.reshape(nbr, bh, nbc, bw).transpose(1, 2).reshape(nbr, nbc, -1)
    scale, zp = calculate_qparams(tiles.amin(-1), tiles.amax(-1), args)
    comp = NaiveQuantizationCompressor.compress({"weight": x.clone(), "weight_scale": scale, "weight_zero_point": zp}, scheme)
    codes = comp["weight"].view(torch.uint8).numpy()
    assert codes.shape == (r, c)
    return {"rows": r, "cols": c, "block": list(block), "sd": sd, "scales": f32bits(scale), "codes_fnv": fnv(codes)}


def nvfp4_case(x, name, detail):
    args = NVFP4A16["weights"]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    gs = generate_gparam(x.amin(), x.amax())
    mn, mx_ = group_minmax(x, 16)
    scale, zp = calculate_qparams(mn, mx_, args, global_scale=gs)
    comp = NVFP4PackedCompressor.compress(
        {"weight": x.clone(), "weight_scale": scale, "weight_global_scale": gs}, scheme)
    packed = comp["weight_packed"].numpy()
    sbytes = comp["weight_scale"].view(torch.uint8).numpy()
    r, c = x.shape
    fp4 = unpack_fp4_from_uint8(comp["weight_packed"], r, c, dtype=torch.float32)
    deq = dequantize(x_q=fp4, scale=comp["weight_scale"].to(torch.float32), args=args, global_scale=gs,
                     dtype=torch.float32)
    case = {"input": name, "global": f32bits(gs)[0], "scales": sbytes.reshape(-1).tolist(),
            "packed_fnv": fnv(packed), "dequant_fnv": fnv(deq.numpy())}
    if detail:
        case["packed"] = packed.reshape(-1).tolist()
        case["dequant"] = f32bits(deq)
    return case


def mxfp4_case(x, detail):
    args = MXFP4A16["weights"]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    mn, mx_ = group_minmax(x, 32)
    scale, zp = calculate_qparams(mn, mx_, args)
    comp = MXFP4PackedCompressor.compress({"weight": x.clone(), "weight_scale": scale}, scheme)
    packed = comp["weight_packed"].numpy()
    sbytes = comp["weight_scale"].numpy()
    assert sbytes.dtype == np.uint8
    deq = MXFP4PackedCompressor.decompress(dict(comp), scheme)["weight"]  # BF16; exact for MXFP4 values
    case = {"scales": sbytes.reshape(-1).tolist(), "packed_fnv": fnv(packed),
            "dequant_fnv": fnv(deq.to(torch.float32).numpy())}
    if detail:
        case["packed"] = packed.reshape(-1).tolist()
    return case


def mlx_case(xs, bits, group, sd, detail):
    w = mx.array(xs[sd]).astype(SD_MLX[sd])
    wq, s, b = mx.quantize(w, group_size=group, bits=bits, mode="affine")
    s32, b32 = s.astype(mx.float32), b.astype(mx.float32)
    deq = mx.dequantize(wq, s32, b32, group_size=group, bits=bits, mode="affine")
    mx.eval(wq, s32, b32, deq)
    packed = np.array(wq).astype(np.uint32)
    deq = np.array(deq).astype(np.float32)
    case = {"bits": bits, "group": group, "sd": sd, "scales": f32bits(np.array(s32)), "biases": f32bits(np.array(b32)),
            "packed_fnv": fnv(packed), "dequant_fnv": fnv(deq)}
    if sd == "F32":
        # in f32 the stored and the used scales/biases are the same: mx.dequantize of the file itself
        d2 = mx.dequantize(wq, s, b, group_size=group, bits=bits, mode="affine")
        mx.eval(d2)
        assert np.array_equal(np.array(d2).view(np.uint32), deq.view(np.uint32))
    if detail:
        case["packed"] = packed.reshape(-1).tolist()
        case["dequant"] = f32bits(deq)
    return case


def e4m3_inputs() -> np.ndarray:
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    mids = (vals[:-1].astype(np.float64) + vals[1:]) / 2
    mids = mids.astype(np.float32)  # exact: one more bit
    up = np.nextafter(mids, np.float32(np.inf))
    dn = np.nextafter(mids, np.float32(0))
    rng = np.random.default_rng(7)
    rnd = (10.0 ** rng.uniform(-12, 4, 200)).astype(np.float32)
    special = np.array([0.0, 2.0**-10, 1.5 * 2.0**-9, 2.0**-9 * 0.5, 1.0625, 1.1875, 447.9, 448.0, 456.0, 464.0,
                        464.01, 480.0, 500.0, 1e9, 3.4e38, np.inf, 2.0**-6, np.nextafter(np.float32(2.0**-6), 0),
                        np.float32(1e-45), np.float32(1e-40)], dtype=np.float32)
    pos = np.concatenate([vals, mids, up, dn, rnd, special]).astype(np.float32)
    return np.concatenate([pos, -pos, np.array([np.nan, -np.nan], dtype=np.float32)])


def main():
    print("compressed-tensors", compressed_tensors.__version__, "torch", torch.__version__, "mlx", mx.__version__,
          file=sys.stderr)
    x = hostile_matrix()
    xt = torch.from_numpy(x)
    xs = {
        "F32": x,
        "BF16": torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy(),
        "F16": torch.from_numpy(x).to(torch.float16).to(torch.float32).numpy(),
    }
    # NVFP4 ties: a 1-row tensor with amax 5.25 → global = 2688·f32(1/5.25) = 512 exactly (amax 7 would give
    # 384.00003: torch evaluates 2688/t as t.reciprocal()*2688); groups of 16 with amax 3 get scale
    # e4m3(512·3/6) = 256 → effective 256/512 = 0.5, so 0.5·{0.25, 0.75, …} are exact FP4 ties.
    rng = np.random.default_rng(5)
    tie_vals = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 6.0], dtype=np.float32)
    ties6 = torch.from_numpy((0.5 * rng.choice(tie_vals, (1, COLS)) * rng.choice([-1, 1], (1, COLS))).astype(np.float32))
    ties6[0, ::16] = 3.0
    ties6[0, 0] = 5.25
    assert f32bits(generate_gparam(ties6.amin(), ties6.amax()))[0] == np.float32(512.0).view(np.uint32)

    out = {
        "versions": {"compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__,
                     "mlx": mx.__version__},
        "rows": ROWS, "cols": COLS,
        "inputs": {k: f32bits(v) for k, v in xs.items()},
        "ties6": f32bits(ties6),
    }

    # torch float8_e4m3fn cast (saturating RNE)
    e = e4m3_inputs()
    out["e4m3"] = {"x": e.view(np.uint32).tolist(),
                   "codes": torch.from_numpy(e).to(torch.float8_e4m3fn).view(torch.uint8).numpy().tolist()}

    # compressed-tensors FP4 rounding + packing on loose values (pairs packed by pack_fp4_to_uint8)
    th = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], dtype=np.float32)
    f = np.concatenate([th, np.nextafter(th, np.float32(0)), np.nextafter(th, np.float32(np.inf)),
                        np.array([0.0, 0.1, 0.5, 7.0, 100.0, np.inf], dtype=np.float32)])
    f = np.concatenate([f, -f])
    if len(f) % 2:
        f = np.append(f, np.float32(0))
    ft = torch.from_numpy(f.copy()).reshape(1, -1)
    out["e2m1"] = {"x": f.view(np.uint32).tolist(),
                   "packed": pack_fp4_to_uint8(cast_to_fp4(torch.clamp(ft, -6, 6))).numpy().reshape(-1).tolist()}

    # MX scale bytes: generate_mx_scales then the U8 rounding of calculate_qparams step 3
    am = np.array([0.0, 1e-45, 1e-40, 2.0**-126, 2.0**-125, 2.0**-124, 6.0, 7.0, np.nextafter(np.float32(7.0), 0),
                   1.0, 1.75, np.nextafter(np.float32(1.75), 0), 448.0, 3.0e38, 3.4e38, 1.7e38, 1e-3, 0.02],
                  dtype=np.float32)
    mxs = round_to_quantized_type_dtype(generate_mx_scales(torch.from_numpy(am.copy()), 4), dtype=torch.uint8,
                                        cast_to_original_dtype=False)
    out["mx_scale"] = {"amax": am.view(np.uint32).tolist(), "bytes": mxs.numpy().tolist()}

    # NVFP4 global scale
    ga = np.array([0.0, 1e-45, 1e-39, 1e-30, 1.0, 2688.0, 6.0, 123.456, 3e38, np.inf, np.nan], dtype=np.float32)
    gs = [f32bits(generate_gparam(torch.tensor(-a), torch.tensor(a)))[0] for a in ga]
    out["nvfp4_global"] = {"amax": ga.view(np.uint32).tolist(), "global": gs}

    out["int"] = []
    for bits in range(2, 9):
        for sym in (True, False):
            for group in (None, 32, 128):
                for sd in ("F32", "BF16"):
                    if group == 32 and bits not in (3, 4, 8):
                        continue
                    detail = (bits, sym) in ((3, False), (4, True)) and group == 128 and sd == "BF16"
                    out["int"].append(int_case(xt, bits, sym, group, sd, detail))
    for bits, sym in ((4, True), (4, False), (8, True)):
        out["int"].append(int_case(xt, bits, sym, 64, "F16", False))

    out["fp8_channel"] = [fp8_channel_case(xt, sd, sd == "BF16") for sd in ("F32", "BF16", "F16")]
    out["fp8_block"] = [fp8_block_case(xt, blk, sd) for blk in ((128, 128), (3, 100), (8, 256), (1, 32))
                        for sd in ("F32", "BF16")]
    out["nvfp4"] = [nvfp4_case(xt, "F32", False), nvfp4_case(ties6, "ties6", True)]
    out["mxfp4"] = [mxfp4_case(xt, True)]

    out["mlx"] = []
    for bits in (1, 2, 3, 4, 5, 6, 8):
        for group in (32, 64, 128):
            out["mlx"].append(mlx_case(xs, bits, group, "F32", bits == 3 and group == 64))
        out["mlx"].append(mlx_case(xs, bits, 64, "BF16", bits == 4))
    for bits in (4, 8):
        out["mlx"].append(mlx_case(xs, bits, 32, "F16", False))

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(out, fh, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
