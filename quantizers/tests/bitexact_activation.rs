//! `sling_quantizers::activation` against llama.cpp's CPU backend itself (`ggml-quant-ref act`, linked against the
//! pinned libggml-cpu: its `from_float` of each weight type's `vec_dot_type`, the build's SIMD code): the
//! descriptor table's `cpu_vec_dot` column equals `ggml_get_type_traits_cpu(t)->vec_dot_type` for every ggml
//! weight type, and the rounded activations are the same bits, on the hostile rows (zeros, subnormals, constant,
//! large, tiny …) and random ones. Activations are finite in a forward pass; NaN/Inf rows are not compared.

mod common;

use sling_core::{DType, VecDot};
use sling_quantizers::activation::round_like_ggml_cpu;

fn vec_dot_name(v: VecDot) -> &'static str {
    match v {
        VecDot::F32 => "f32",
        VecDot::F16 => "f16",
        VecDot::BF16 => "bf16",
        VecDot::Q8_0 => "q8_0",
        VecDot::Q8_1 => "q8_1",
        VecDot::Q8K => "q8_K",
    }
}

#[test]
fn activation_rounding_is_llama_cpp_cpu_backends() {
    let Some(oracle) = common::oracle() else { return };
    let n = 512;
    let mut rows: Vec<(String, Vec<f32>)> =
        common::hostile_rows(n, 0x5eed_00a1).into_iter().map(|(c, x)| (c.to_string(), x)).collect();
    let mut r = common::Rng::new(5);
    for i in 0..6 {
        let scale = [1.0, 0.01, 40.0, 1e-3, 7.0, 300.0][i];
        rows.push((format!("random×{scale}"), (0..n).map(|_| r.normal() * scale).collect()));
    }
    // Half-way codes: x · 127/amax lands on k + 0.5 (round half to even vs away from zero).
    rows.push(("ties".into(), (0..n).map(|i| if i % 32 == 0 { 127.0 } else { (i % 32) as f32 - 0.5 }).collect()));
    let x: Vec<f32> = rows.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let mut checked = 0;
    for d in DType::ALL.iter().copied() {
        let (Some(_), Some(v)) = (d.info().ggml_id, d.info().cpu_vec_dot) else { continue };
        assert_eq!(oracle.activation_type(d.name()), vec_dot_name(v), "{d}: the table's cpu_vec_dot");
        let theirs = oracle.activations(d.name(), &x, n);
        let mut ours = x.clone();
        for row in ours.chunks_exact_mut(n) {
            assert!(round_like_ggml_cpu(row, v));
        }
        for (ri, ((name, _), (a, b))) in rows.iter().zip(ours.chunks(n).zip(theirs.chunks(n))).enumerate() {
            let bad = a.iter().zip(b).position(|(p, q)| p.to_bits() != q.to_bits());
            assert!(
                bad.is_none(),
                "{d} ({v:?}), row {ri} {name}: element {} is {} here, {} in ggml",
                bad.unwrap(),
                a[bad.unwrap()],
                b[bad.unwrap()]
            );
        }
        checked += 1;
    }
    eprintln!("{checked} weight types: vec_dot_type and rounded activations identical to libggml-cpu's");
    assert!(checked >= 20);
}
