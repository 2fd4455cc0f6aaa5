//! Bit-exact checks of `sling_quantizers::{ct, mlx}` against vectors produced by the real libraries:
//! compressed-tensors 0.20.1 + torch 2.15.0 (CPU) and mlx 0.32.4 (mlx-cpu), by `scripts/gen_ct_mlx_vectors.py`
//! (which says, case by case, in which setting sling's definition and the library's coincide). Large arrays are
//! compared through FNV-1a-64 hashes of their little-endian bytes, and in full for a few "detail" cases.

use serde_json::Value;
use sling_quantizers::ct::{self, IntArgs, ScaleDtype};
use sling_quantizers::mlx;

fn data() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ct_mlx_vectors.json");
    let text = std::fs::read_to_string(path).expect("tests/data/ct_mlx_vectors.json (scripts/gen_ct_mlx_vectors.py)");
    serde_json::from_str(&text).expect("valid JSON")
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("unsigned")).collect()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("integer")).collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    u64s(v).into_iter().map(|x| x as u32).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    u32s(v).into_iter().map(f32::from_bits).collect()
}

fn bytes(v: &Value) -> Vec<u8> {
    u64s(v).into_iter().map(|x| x as u8).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn fnv(bytes: impl IntoIterator<Item = u8>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn fnv_u32(v: &[u32]) -> String {
    fnv(v.iter().flat_map(|w| w.to_le_bytes()))
}

fn fnv_f32(v: &[f32]) -> String {
    fnv(v.iter().flat_map(|w| w.to_le_bytes()))
}

fn fnv_i8(v: &[i8]) -> String {
    fnv(v.iter().map(|&q| q as u8))
}

fn sd_of(v: &Value) -> ScaleDtype {
    match v.as_str().expect("sd") {
        "F32" => ScaleDtype::F32,
        "F16" => ScaleDtype::F16,
        "BF16" => ScaleDtype::BF16,
        other => panic!("unknown scale dtype {other}"),
    }
}

fn input(d: &Value, name: &str) -> (Vec<f32>, usize, usize) {
    let cols = d["cols"].as_u64().unwrap() as usize;
    let x = if name == "ties6" { f32s(&d["ties6"]) } else { f32s(&d["inputs"][name]) };
    let rows = x.len() / cols;
    (x, rows, cols)
}

#[test]
fn scale_dtype_round_matches_torch_casts() {
    let d = data();
    let x = f32s(&d["inputs"]["F32"]);
    for (name, sd) in [("BF16", ScaleDtype::BF16), ("F16", ScaleDtype::F16)] {
        let want = u32s(&d["inputs"][name]);
        let got: Vec<u32> = x.iter().map(|&v| sd.round(v).to_bits()).collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn e4m3_matches_torch_float8_cast() {
    let d = data();
    let x = f32s(&d["e4m3"]["x"]);
    let want = bytes(&d["e4m3"]["codes"]);
    assert!(x.len() > 1000);
    for (v, w) in x.iter().zip(&want) {
        assert_eq!(ct::f32_to_e4m3(*v), *w, "x = {v:e} ({:#010x})", v.to_bits());
    }
}

#[test]
fn e2m1_matches_cast_to_fp4_and_pack_fp4_to_uint8() {
    let d = data();
    let x = f32s(&d["e2m1"]["x"]);
    let want = bytes(&d["e2m1"]["packed"]);
    let got: Vec<u8> = x.chunks(2).map(|p| ct::f32_to_e2m1_ct(p[0]) | (ct::f32_to_e2m1_ct(p[1]) << 4)).collect();
    assert_eq!(got, want);
}

#[test]
fn mx_scale_bytes_match_generate_mx_scales() {
    let d = data();
    let amax = f32s(&d["mx_scale"]["amax"]);
    let want = bytes(&d["mx_scale"]["bytes"]);
    for (a, w) in amax.iter().zip(&want) {
        assert_eq!(ct::mx_scale_byte(*a), *w, "amax {a:e}");
    }
}

#[test]
fn nvfp4_global_matches_generate_gparam() {
    let d = data();
    let amax = f32s(&d["nvfp4_global"]["amax"]);
    let want = u32s(&d["nvfp4_global"]["global"]);
    for (a, w) in amax.iter().zip(&want) {
        assert_eq!(ct::nvfp4_global_scale(*a).to_bits(), *w, "amax {a:e}");
    }
}

#[test]
fn int_pack_quantized_matches_compressed_tensors() {
    let d = data();
    let (x, rows, cols) = input(&d, "F32");
    let cases = d["int"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for c in cases {
        let b = c["bits"].as_u64().unwrap() as u32;
        let symmetric = c["symmetric"].as_bool().unwrap();
        let group = c["group"].as_u64().map(|g| g as usize);
        let sd = sd_of(&c["sd"]);
        let a = IntArgs { bits: b, symmetric, group };
        let tag = format!("int{b} sym={symmetric} group={group:?} {sd:?}");
        let (mut codes, mut scales, mut zeros, mut packed, mut deq) = (vec![], vec![], vec![], vec![], vec![]);
        for row in x.chunks(cols) {
            let (c0, s0, z0) = (codes.len(), scales.len(), zeros.len());
            ct::quantize_int_row(row, &a, sd, &mut codes, &mut scales, &mut zeros);
            ct::pack_row(&codes[c0..], b, &mut packed);
            let z = (!symmetric).then(|| &zeros[z0..]);
            ct::dequantize_int_row(&codes[c0..], &scales[s0..], z, group.unwrap_or(cols), &mut deq);
        }
        assert_eq!(codes.len(), rows * cols);
        assert_eq!(bits(&scales), u32s(&c["scales"]), "{tag}: scales");
        if let Some(want) = c.get("codes") {
            let want: Vec<i8> = i64s(want).into_iter().map(|q| q as i8).collect();
            assert_eq!(codes, want, "{tag}: codes");
            assert_eq!(packed, u32s(&c["packed"]), "{tag}: packed");
            assert_eq!(bits(&deq), u32s(&c["dequant"]), "{tag}: dequant");
        }
        assert_eq!(fnv_i8(&codes), c["codes_fnv"].as_str().unwrap(), "{tag}: codes");
        assert_eq!(fnv_u32(&packed), c["packed_fnv"].as_str().unwrap(), "{tag}: packed");
        assert_eq!(fnv_f32(&deq), c["dequant_fnv"].as_str().unwrap(), "{tag}: dequant");
        let mut back = vec![];
        let wpr = (cols * b as usize).div_ceil(32);
        for w in packed.chunks(wpr) {
            ct::unpack_row(w, b, cols, &mut back);
        }
        assert_eq!(back, codes, "{tag}: unpack");
        if !symmetric {
            let want: Vec<i8> = i64s(&c["zeros"]).into_iter().map(|q| q as i8).collect();
            assert_eq!(zeros, want, "{tag}: zero points");
            let ngroups = zeros.len() / rows;
            let zp = ct::pack_zero_points(&zeros, rows, ngroups, b);
            assert_eq!(zp, u32s(&c["zp_packed"]), "{tag}: packed zero points");
            assert_eq!(ct::unpack_zero_points(&zp, rows, ngroups, b), zeros, "{tag}: unpacked zero points");
        }
    }
}

#[test]
fn fp8_channel_and_block_match_compressed_tensors() {
    let d = data();
    let (x, rows, cols) = input(&d, "F32");
    for c in d["fp8_channel"].as_array().unwrap() {
        let sd = sd_of(&c["sd"]);
        let (mut codes, mut scales, mut deq) = (vec![], vec![], vec![]);
        for row in x.chunks(cols) {
            let c0 = codes.len();
            let s = ct::quantize_fp8_row(row, sd, &mut codes);
            ct::dequantize_fp8(&codes[c0..], s, &mut deq);
            scales.push(s);
        }
        assert_eq!(bits(&scales), u32s(&c["scales"]), "fp8 channel {sd:?}: scales");
        if let Some(want) = c.get("codes") {
            assert_eq!(codes, bytes(want), "fp8 channel {sd:?}: codes");
        }
        assert_eq!(fnv(codes.iter().copied()), c["codes_fnv"].as_str().unwrap(), "fp8 channel {sd:?}: codes");
        assert_eq!(fnv_f32(&deq), c["dequant_fnv"].as_str().unwrap(), "fp8 channel {sd:?}: dequant");
    }
    let blocks = d["fp8_block"].as_array().unwrap();
    assert!(!blocks.is_empty());
    for c in blocks {
        let sd = sd_of(&c["sd"]);
        let blk = u64s(&c["block"]);
        let block = (blk[0] as usize, blk[1] as usize);
        let (mut codes, mut scales) = (vec![], vec![]);
        ct::quantize_fp8_block(&x, rows, cols, block, sd, &mut codes, &mut scales);
        assert_eq!(bits(&scales), u32s(&c["scales"]), "fp8 block {block:?} {sd:?}: scales");
        assert_eq!(fnv(codes.iter().copied()), c["codes_fnv"].as_str().unwrap(), "fp8 block {block:?} {sd:?}");
    }
}

#[test]
fn nvfp4_matches_compressed_tensors() {
    let d = data();
    for c in d["nvfp4"].as_array().unwrap() {
        let name = c["input"].as_str().unwrap();
        let (x, _, cols) = input(&d, name);
        let global = ct::nvfp4_global_scale(ct::finite_amax(&x));
        assert_eq!(global.to_bits(), c["global"].as_u64().unwrap() as u32, "{name}: global scale");
        let (mut packed, mut scales, mut deq) = (vec![], vec![], vec![]);
        for row in x.chunks(cols) {
            let (p0, s0) = (packed.len(), scales.len());
            ct::quantize_nvfp4_row(row, global, &mut packed, &mut scales);
            ct::dequantize_nvfp4_row(&packed[p0..], &scales[s0..], global, &mut deq);
        }
        assert_eq!(scales, bytes(&c["scales"]), "{name}: scales");
        if let Some(want) = c.get("packed") {
            assert_eq!(packed, bytes(want), "{name}: packed");
            assert_eq!(bits(&deq), u32s(&c["dequant"]), "{name}: dequant");
        }
        assert_eq!(fnv(packed.iter().copied()), c["packed_fnv"].as_str().unwrap(), "{name}: packed");
        assert_eq!(fnv_f32(&deq), c["dequant_fnv"].as_str().unwrap(), "{name}: dequant");
    }
}

#[test]
fn mxfp4_matches_compressed_tensors() {
    let d = data();
    let (x, _, cols) = input(&d, "F32");
    for c in d["mxfp4"].as_array().unwrap() {
        let (mut packed, mut scales, mut deq) = (vec![], vec![], vec![]);
        for row in x.chunks(cols) {
            let (p0, s0) = (packed.len(), scales.len());
            ct::quantize_mxfp4_row(row, &mut packed, &mut scales);
            ct::dequantize_mxfp4_row(&packed[p0..], &scales[s0..], &mut deq);
        }
        assert_eq!(scales, bytes(&c["scales"]), "mxfp4 scales");
        if let Some(want) = c.get("packed") {
            assert_eq!(packed, bytes(want), "mxfp4 packed");
        }
        assert_eq!(fnv(packed.iter().copied()), c["packed_fnv"].as_str().unwrap(), "mxfp4 packed");
        assert_eq!(fnv_f32(&deq), c["dequant_fnv"].as_str().unwrap(), "mxfp4 dequant");
    }
}

#[test]
fn mlx_affine_matches_mx_quantize() {
    let d = data();
    let cases = d["mlx"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for c in cases {
        let b = c["bits"].as_u64().unwrap() as u32;
        let group = c["group"].as_u64().unwrap() as usize;
        let sd = sd_of(&c["sd"]);
        let name = c["sd"].as_str().unwrap();
        let (x, _, cols) = input(&d, name);
        let tag = format!("mlx {b}-bit g{group} {name}");
        let (mut packed, mut scales, mut biases, mut deq) = (vec![], vec![], vec![], vec![]);
        for row in x.chunks(cols) {
            let (p0, s0) = (packed.len(), scales.len());
            mlx::quantize_affine_row(row, b, group, sd, &mut packed, &mut scales, &mut biases);
            mlx::dequantize_affine_row(&packed[p0..], b, group, cols, &scales[s0..], &biases[s0..], &mut deq);
        }
        assert_eq!(bits(&scales), u32s(&c["scales"]), "{tag}: scales");
        assert_eq!(bits(&biases), u32s(&c["biases"]), "{tag}: biases");
        if let Some(want) = c.get("packed") {
            assert_eq!(packed, u32s(want), "{tag}: packed");
            assert_eq!(bits(&deq), u32s(&c["dequant"]), "{tag}: dequant");
        }
        assert_eq!(fnv_u32(&packed), c["packed_fnv"].as_str().unwrap(), "{tag}: packed");
        assert_eq!(fnv_f32(&deq), c["dequant_fnv"].as_str().unwrap(), "{tag}: dequant");
    }
}
