//! GPTQ's column update ([`sling_quantizers::gptq::Update`]) for the best instruction set present: the
//! scalar reference [`sling_quantizers::gptq::sub_scaled`] vectorises only 4 wide on the x86-64 baseline (SSE2);
//! the AVX2 twin runs 8 wide. Both round `e · h` and then the subtraction (no fused multiply-add), so the bits
//! are the reference's.

use sling_quantizers::gptq::{sub_scaled, Update};

/// The fastest [`Update`] this machine runs (the scalar reference under `SLING_NO_SIMD=1`).
pub fn update() -> Update {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && !crate::disabled() {
        return sub_scaled_avx2_checked;
    }
    sub_scaled
}

/// Only handed out by [`update`] after the AVX2 check.
#[cfg(target_arch = "x86_64")]
fn sub_scaled_avx2_checked(dst: &mut [f32], e: f32, h: &[f32]) {
    // SAFETY: `update` returns this function only when the CPU supports AVX2, the one feature
    // `sub_scaled_avx2` is built with.
    unsafe { sub_scaled_avx2(dst, e, h) }
}

/// `dst[i] -= e · h[i]` over `min(dst.len(), h.len())` elements, 8 at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sub_scaled_avx2(dst: &mut [f32], e: f32, h: &[f32]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(h.len());
    let ev = _mm256_set1_ps(e);
    let (d, hp) = (dst.as_mut_ptr(), h.as_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, which both slices hold; unaligned loads and stores.
        let v = _mm256_loadu_ps(d.add(i));
        let hv = _mm256_loadu_ps(hp.add(i));
        _mm256_storeu_ps(d.add(i), _mm256_sub_ps(v, _mm256_mul_ps(ev, hv)));
        i += 8;
    }
    sub_scaled(&mut dst[i..n], e, &h[i..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bits_as_the_reference() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut r = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            f32::from_bits((s >> 32) as u32 & 0x3fff_ffff | ((s & 1) as u32) << 31)
            // finite, mixed magnitudes
        };
        let f = update();
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 63, 64, 127, 200] {
            for _ in 0..20 {
                let h: Vec<f32> = (0..n).map(|_| r()).collect();
                let d0: Vec<f32> = (0..n + 3).map(|_| r()).collect();
                let e = r();
                let (mut a, mut b) = (d0.clone(), d0.clone());
                sub_scaled(&mut a, e, &h);
                f(&mut b, e, &h);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "n = {n}");
            }
        }
        // special values: NaN, infinities, signed zeros, subnormals
        let sp = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-40, -1e-40, f32::MAX, 1.0];
        let h: Vec<f32> = (0..81).map(|i| sp[i % 9]).collect();
        for &e in &sp {
            let d0: Vec<f32> = (0..81).map(|i| sp[(i / 9) % 9]).collect();
            let (mut a, mut b) = (d0.clone(), d0.clone());
            sub_scaled(&mut a, e, &h);
            f(&mut b, e, &h);
            for (x, y) in a.iter().zip(&b) {
                assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
            }
        }
    }
}
