//! The compressed-tensors and MLX affine encodings behind the backend seam ([`crate::Backend::encode_rows`]): a
//! typed description of each encoding ([`RowEncoding`]), the buffers its rows encode into ([`EncodedRows`], laid
//! out exactly as the scalar reference functions append them, so a caller splices them in the same way), the
//! reference itself ([`encode_rows`]: `sling_quantizers::ct` / `::mlx`, what the CPU backend runs), and the host
//! build of the GPU kernels (`cu/ct.cu` via `cu/host_ct.cpp`, [`host_encode_rows`]), which
//! `kernels/tests/host_ct.rs` compares with the reference bit for bit.

use sling_quantizers::ct::{self, IntArgs, ScaleDtype};
use sling_quantizers::mlx;

/// One round-to-nearest weight encoding of whole rows. Group sizes are elements along a row; 0 means one group
/// for the whole row (a group that does not divide the row leaves a shorter last group, as the reference does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowEncoding {
    /// compressed-tensors integer (`pack-quantized`), [`ct::quantize_int_row`]: `bits` in 1..=8.
    Int { bits: u32, symmetric: bool, group: usize, sd: ScaleDtype },
    /// FP8 E4M3 with one scale per row (`float-quantized`, channel), [`ct::quantize_fp8_row`].
    Fp8Channel { sd: ScaleDtype },
    /// FP8 E4M3 with one scale per 128×128 tile of the window (`float-quantized`, block),
    /// [`ct::quantize_fp8_block`]: tiles start at the window's first row, so callers hand in windows that start
    /// on a multiple of 128 rows.
    Fp8Block { sd: ScaleDtype },
    /// NVFP4 (`nvfp4-pack-quantized`) with the tensor's global scale, [`ct::quantize_nvfp4_row`].
    Nvfp4 { global: f32 },
    /// MXFP4 (`mxfp4-pack-quantized`), [`ct::quantize_mxfp4_row`].
    Mxfp4,
    /// MLX affine, [`mlx::quantize_affine_row`]: `bits` in 1..=8.
    Affine { bits: u32, group: usize, sd: ScaleDtype },
}

/// The kernel functions of `cu/ct.cu` (the CUDA backend loads each; `tests/nvrtc.rs` checks the CUBIN has them).
pub const KERNELS: &[&str] = &[
    "sling_ct_int",
    "sling_ct_fp8_row_scale",
    "sling_ct_fp8_tile_scale",
    "sling_ct_fp8_codes",
    "sling_ct_nvfp4",
    "sling_ct_mxfp4",
    "sling_mlx_affine",
    "sling_pack_bits",
];

/// FP8 block tiles are this many rows and columns (`FP8_BLOCK`).
pub const FP8_TILE: usize = 128;

/// What the rows of one call encode to, appended per encoding exactly as the reference functions append:
/// * `Int`: `codes` one byte per element (the `i8` code, two's complement), `scales` one per group, `zeros` one
///   per group when asymmetric;
/// * `Fp8Channel`: `codes` one E4M3 byte per element, `scales` one per row;
/// * `Fp8Block`: `codes` as above, `scales` the window's tile grid `[ceil(rows/128), ceil(cols/128)]`, row-major;
/// * `Nvfp4` / `Mxfp4`: `codes` the packed nibbles (`ceil(cols/2)` bytes per row), `scale_bytes` one E4M3 / E8M0
///   byte per group of 16 / 32;
/// * `Affine`: `words` the packed codes (`ceil(cols·bits/32)` per row), `scales` and `biases` one per group.
///
/// Scales are the stored values (already rounded to their dtype) as `f32`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedRows {
    pub codes: Vec<u8>,
    pub words: Vec<u32>,
    pub scales: Vec<f32>,
    pub scale_bytes: Vec<u8>,
    pub zeros: Vec<i8>,
    pub biases: Vec<f32>,
}

impl EncodedRows {
    /// Empties every buffer, keeping the allocations.
    pub fn clear(&mut self) {
        self.codes.clear();
        self.words.clear();
        self.scales.clear();
        self.scale_bytes.clear();
        self.zeros.clear();
        self.biases.clear();
    }
}

/// Why an encoding cannot run over the given rows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodingError {
    #[error("{bits}-bit codes: the encoding takes 1 to 8 bits")]
    Bits { bits: u32 },
    #[error("rows of {n_per_row} values: {len} values are not whole rows")]
    RowLength { len: usize, n_per_row: usize },
    #[error("rows of {n_per_row} values: the kernels take rows of 1 to 2^31 - 1 values")]
    RowWidth { n_per_row: usize },
}

impl RowEncoding {
    /// Checks the arguments of a call: bits in range, `x` whole rows of a width the kernels index with `int`.
    pub fn check(&self, len: usize, n_per_row: usize) -> Result<(), EncodingError> {
        match *self {
            RowEncoding::Int { bits, .. } | RowEncoding::Affine { bits, .. } if !(1..=8).contains(&bits) => {
                return Err(EncodingError::Bits { bits });
            }
            _ => {}
        }
        if n_per_row == 0 || n_per_row > i32::MAX as usize {
            return Err(EncodingError::RowWidth { n_per_row });
        }
        if !len.is_multiple_of(n_per_row) {
            return Err(EncodingError::RowLength { len, n_per_row });
        }
        Ok(())
    }

    /// The group length along a row of `cols` (0 resolved to the row), for the encodings with groups.
    pub fn group_len(&self, cols: usize) -> usize {
        let g = match *self {
            RowEncoding::Int { group, .. } | RowEncoding::Affine { group, .. } => group,
            RowEncoding::Nvfp4 { .. } => 16,
            RowEncoding::Mxfp4 => 32,
            RowEncoding::Fp8Channel { .. } | RowEncoding::Fp8Block { .. } => 0,
        };
        if g == 0 {
            cols.max(1)
        } else {
            g
        }
    }

    /// Groups (scales) `rows` rows of `cols` produce: what the backends count as "blocks".
    pub fn groups(&self, rows: usize, cols: usize) -> u64 {
        let n = match self {
            RowEncoding::Fp8Channel { .. } => rows,
            RowEncoding::Fp8Block { .. } => rows.div_ceil(FP8_TILE) * cols.div_ceil(FP8_TILE),
            _ => rows * cols.div_ceil(self.group_len(cols)),
        };
        n as u64
    }
}

/// Whether a window may be encoded on a GPU and give the reference's bytes. The kernels handle NaN and ±Inf
/// elements as the reference does (statistics over finite values; NaN codes built from the bits), but a finite
/// value of magnitude 2^64 or more can make a group's range overflow to infinity, and the NaN that follows in
/// MLX's affine codes carries x86's payload on the CPU and CUDA's canonical one on the GPU. Real weights never
/// come near; such windows run on the CPU. One branch-free pass over the exponent bits.
pub fn device_safe(x: &[f32]) -> bool {
    x.iter().fold(true, |acc, v| {
        let e = (v.to_bits() >> 23) & 0xff;
        acc & (e < 127 + 64 || e == 0xff)
    })
}

/// The reference: `x` as whole rows of `n_per_row`, encoded by `sling_quantizers` and appended to `out`. What
/// [`crate::Backend::encode_rows`] returns on every backend. Where the CPU has AVX2 (and `SLING_NO_SIMD` is unset)
/// the same code runs compiled for AVX2 ([`encode_rows_avx2`]): the integer and MLX affine row quantizers are
/// `#[inline(always)]` down to their element operations, which then run eight to a vector. The same IEEE
/// operations in the same order (no FMA), so the same bytes (`tests::avx2_build_gives_the_reference_bytes`).
pub fn encode_rows(enc: &RowEncoding, x: &[f32], n_per_row: usize, out: &mut EncodedRows) -> Result<(), EncodingError> {
    enc.check(x.len(), n_per_row)?;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && !crate::disabled() {
        // SAFETY: AVX2 is present (checked just above), the one feature `encode_rows_avx2` is built with.
        unsafe { encode_rows_avx2(enc, x, n_per_row, out) };
        return Ok(());
    }
    encode_checked(enc, x, n_per_row, out);
    Ok(())
}

/// [`encode_checked`] built for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_rows_avx2(enc: &RowEncoding, x: &[f32], n_per_row: usize, out: &mut EncodedRows) {
    encode_checked(enc, x, n_per_row, out)
}

/// The body of [`encode_rows`], after [`RowEncoding::check`].
#[inline(always)]
fn encode_checked(enc: &RowEncoding, x: &[f32], n_per_row: usize, out: &mut EncodedRows) {
    match *enc {
        RowEncoding::Int { bits, symmetric, group, sd } => {
            let args = IntArgs { bits, symmetric, group: Some(group) };
            let mut codes = Vec::with_capacity(n_per_row);
            for row in x.chunks_exact(n_per_row) {
                codes.clear();
                ct::quantize_int_row(row, &args, sd, &mut codes, &mut out.scales, &mut out.zeros);
                out.codes.extend(codes.iter().map(|&c| c as u8));
            }
        }
        RowEncoding::Fp8Channel { sd } => {
            for row in x.chunks_exact(n_per_row) {
                let s = ct::quantize_fp8_row(row, sd, &mut out.codes);
                out.scales.push(s);
            }
        }
        RowEncoding::Fp8Block { sd } => {
            let rows = x.len() / n_per_row;
            ct::quantize_fp8_block(x, rows, n_per_row, (FP8_TILE, FP8_TILE), sd, &mut out.codes, &mut out.scales);
        }
        RowEncoding::Nvfp4 { global } => {
            for row in x.chunks_exact(n_per_row) {
                ct::quantize_nvfp4_row(row, global, &mut out.codes, &mut out.scale_bytes);
            }
        }
        RowEncoding::Mxfp4 => {
            for row in x.chunks_exact(n_per_row) {
                ct::quantize_mxfp4_row(row, &mut out.codes, &mut out.scale_bytes);
            }
        }
        RowEncoding::Affine { bits, group, sd } => {
            for row in x.chunks_exact(n_per_row) {
                mlx::quantize_affine_row(row, bits, group, sd, &mut out.words, &mut out.scales, &mut out.biases);
            }
        }
    }
}

/// `ScaleDtype` as the kernels take it (`SLING_SD_*` in `cu/ct.cu`).
pub(crate) fn sd_code(sd: ScaleDtype) -> i32 {
    match sd {
        ScaleDtype::F32 => 0,
        ScaleDtype::F16 => 1,
        ScaleDtype::BF16 => 2,
    }
}

/// Lengths of the outputs `rows` rows of `cols` produce: (codes, words, scales, scale bytes, zeros, biases).
pub(crate) fn output_lens(enc: &RowEncoding, rows: usize, cols: usize) -> [usize; 6] {
    let groups = enc.groups(rows, cols) as usize;
    match *enc {
        RowEncoding::Int { symmetric, .. } => [rows * cols, 0, groups, 0, if symmetric { 0 } else { groups }, 0],
        RowEncoding::Fp8Channel { .. } | RowEncoding::Fp8Block { .. } => [rows * cols, 0, groups, 0, 0, 0],
        RowEncoding::Nvfp4 { .. } | RowEncoding::Mxfp4 => [rows * cols.div_ceil(2), 0, 0, groups, 0, 0],
        RowEncoding::Affine { bits, .. } => {
            [rows * cols, rows * (cols * bits as usize).div_ceil(32), groups, 0, 0, groups]
        }
    }
}

extern "C" {
    fn sling_host_ct_int(
        x: *const f32,
        nrows: i64,
        cols: i32,
        group: i32,
        bits: i32,
        symmetric: i32,
        sd: i32,
        codes: *mut i8,
        scales: *mut f32,
        zeros: *mut i8,
    );
    fn sling_host_ct_fp8(x: *const f32, nrows: i64, cols: i32, tiled: i32, sd: i32, codes: *mut u8, scales: *mut f32);
    fn sling_host_ct_nvfp4(x: *const f32, nrows: i64, cols: i32, global: f32, packed: *mut u8, scales: *mut u8);
    fn sling_host_ct_mxfp4(x: *const f32, nrows: i64, cols: i32, packed: *mut u8, scales: *mut u8);
    #[allow(clippy::too_many_arguments)]
    fn sling_host_mlx_affine(
        x: *const f32,
        nrows: i64,
        cols: i32,
        group: i32,
        bits: i32,
        sd: i32,
        codes: *mut u8,
        words: *mut u32,
        scales: *mut f32,
        biases: *mut f32,
    );
}

/// Encodes whole rows with the host build of the GPU kernels (`cu/ct.cu`), launched with the CUDA backend's
/// shape, appending to `out`. For tests; the CPU backend runs the reference.
pub fn host_encode_rows(
    enc: &RowEncoding,
    x: &[f32],
    n_per_row: usize,
    out: &mut EncodedRows,
) -> Result<(), EncodingError> {
    enc.check(x.len(), n_per_row)?;
    let rows = x.len() / n_per_row;
    let (nrows, cols) = (rows as i64, n_per_row as i32);
    let [nc, nw, ns, nsb, nz, nb] = output_lens(enc, rows, n_per_row);
    let mut codes = vec![0u8; nc.max(1)];
    let mut words = vec![0u32; nw.max(1)];
    let mut scales = vec![0f32; ns.max(1)];
    let mut scale_bytes = vec![0u8; nsb.max(1)];
    let mut zeros = vec![0i8; nz.max(1)];
    let mut biases = vec![0f32; nb.max(1)];
    let group = enc.group_len(n_per_row) as i32;
    // SAFETY (every call below): `x` holds `rows * n_per_row` values and each output buffer at least the length
    // `output_lens` gives for this encoding, which is what the launcher writes for `rows` rows of `n_per_row`
    // (one entry per element, packed byte or word, group or tile); buffers an encoding does not write are not
    // touched. `check` bounded the bits to 1..=8 and the row width to the kernels' `int`.
    unsafe {
        match *enc {
            RowEncoding::Int { bits, symmetric, sd, .. } => sling_host_ct_int(
                x.as_ptr(),
                nrows,
                cols,
                group,
                bits as i32,
                i32::from(symmetric),
                sd_code(sd),
                codes.as_mut_ptr().cast(),
                scales.as_mut_ptr(),
                zeros.as_mut_ptr(),
            ),
            RowEncoding::Fp8Channel { sd } => {
                sling_host_ct_fp8(x.as_ptr(), nrows, cols, 0, sd_code(sd), codes.as_mut_ptr(), scales.as_mut_ptr())
            }
            RowEncoding::Fp8Block { sd } => {
                sling_host_ct_fp8(x.as_ptr(), nrows, cols, 1, sd_code(sd), codes.as_mut_ptr(), scales.as_mut_ptr())
            }
            RowEncoding::Nvfp4 { global } => {
                sling_host_ct_nvfp4(x.as_ptr(), nrows, cols, global, codes.as_mut_ptr(), scale_bytes.as_mut_ptr())
            }
            RowEncoding::Mxfp4 => {
                sling_host_ct_mxfp4(x.as_ptr(), nrows, cols, codes.as_mut_ptr(), scale_bytes.as_mut_ptr())
            }
            RowEncoding::Affine { bits, sd, .. } => sling_host_mlx_affine(
                x.as_ptr(),
                nrows,
                cols,
                group,
                bits as i32,
                sd_code(sd),
                codes.as_mut_ptr(),
                words.as_mut_ptr(),
                scales.as_mut_ptr(),
                biases.as_mut_ptr(),
            ),
        }
    }
    // Affine codes are scratch for the packing; the words are the output.
    let nc = if matches!(enc, RowEncoding::Affine { .. }) { 0 } else { nc };
    out.codes.extend_from_slice(&codes[..nc]);
    out.words.extend_from_slice(&words[..nw]);
    out.scales.extend_from_slice(&scales[..ns]);
    out.scale_bytes.extend_from_slice(&scale_bytes[..nsb]);
    out.zeros.extend_from_slice(&zeros[..nz]);
    out.biases.extend_from_slice(&biases[..nb]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rows::row as rows;

    fn bits_of(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn avx2_build_gives_the_reference_bytes() {
        let cols = 256;
        let x = rows(7, cols * 12);
        let sds = [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16];
        let mut encs = Vec::new();
        for sd in sds {
            for group in [0, 32, 64, 128, 96] {
                for bits in 1..=8 {
                    encs.push(RowEncoding::Affine { bits, group, sd });
                    for symmetric in [true, false] {
                        encs.push(RowEncoding::Int { bits, symmetric, group, sd });
                    }
                }
            }
            encs.extend([RowEncoding::Fp8Channel { sd }, RowEncoding::Fp8Block { sd }]);
        }
        encs.extend([RowEncoding::Nvfp4 { global: 0.37 }, RowEncoding::Mxfp4]);
        for enc in encs {
            let (mut want, mut got) = (EncodedRows::default(), EncodedRows::default());
            encode_checked(&enc, &x, cols, &mut want); // the baseline build
            encode_rows(&enc, &x, cols, &mut got).unwrap(); // AVX2 where present
            assert_eq!(got.codes, want.codes, "{enc:?}");
            assert_eq!(got.words, want.words, "{enc:?}");
            assert_eq!(got.zeros, want.zeros, "{enc:?}");
            assert_eq!(got.scale_bytes, want.scale_bytes, "{enc:?}");
            assert_eq!(bits_of(&got.scales), bits_of(&want.scales), "{enc:?}");
            assert_eq!(bits_of(&got.biases), bits_of(&want.biases), "{enc:?}");
        }
    }
}
