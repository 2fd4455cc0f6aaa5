//! One descriptor table for every element type sling reads or writes.
//!
//! Facts: ggml ids and block layouts from `ggml/include/ggml.h` / `ggml-common.h` at the pinned
//! llama.cpp (see `../shared/docs/gguf-spec.md` §2.1); safetensors names from the `safetensors`
//! crate's `Dtype`.

use std::fmt;

/// An element type: a safetensors source dtype, a ggml file type, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    Bool,
    /// FP8 E4M3 (DeepSeek-V3 native checkpoints), safetensors only.
    F8E4M3,
    /// FP8 E5M2, safetensors only.
    F8E5M2,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
    IQ2XXS,
    IQ2XS,
    IQ2S,
    IQ3XXS,
    IQ3S,
    IQ1S,
    IQ1M,
    TQ1_0,
    TQ2_0,
    MXFP4,
    /// Unsigned 32-bit words: MLX's packed affine weights.
    U32,
}

/// Static facts about a [`DType`].
#[derive(Debug)]
pub struct DTypeInfo {
    pub dtype: DType,
    /// Name as llama.cpp prints it (`ggml_type_name`) or as safetensors spells it.
    pub name: &'static str,
    /// `enum ggml_type` id, where the type exists in GGUF files.
    pub ggml_id: Option<u32>,
    /// Name in a safetensors header, where the type exists there.
    pub safetensors: Option<&'static str>,
    /// Elements per block (1 for plain scalars).
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// What llama.cpp's CPU backend rounds a matrix product's activations to before the dot products with a
    /// weight of this type (`type_traits_cpu[].vec_dot_type`, `ggml/src/ggml-cpu/ggml-cpu.c`); `None` where the
    /// type is no ggml weight type.
    pub cpu_vec_dot: Option<VecDot>,
}

/// The activation types of llama.cpp's CPU dot products ([`DTypeInfo::cpu_vec_dot`]). Only `F32` leaves the
/// activations as they are; `sling_quantizers::activation` rounds a row to each of the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VecDot {
    F32,
    F16,
    BF16,
    /// Blocks of 32, one f16 scale (`block_q8_0`).
    Q8_0,
    /// Blocks of 32, an f16 scale and an f16 scaled sum (`block_q8_1`).
    Q8_1,
    /// Blocks of 256, one f32 scale (`block_q8_K`).
    Q8K,
}

macro_rules! table {
    ($( $v:ident => $name:literal, $ggml:expr, $st:expr, $be:literal, $bb:literal, $vd:expr; )*) => {
        /// The table: one row per type, in `DType` declaration order.
        pub static TABLE: &[DTypeInfo] = &[
            $( DTypeInfo { dtype: DType::$v, name: $name, ggml_id: $ggml, safetensors: $st,
                           block_elems: $be, block_bytes: $bb, cpu_vec_dot: $vd }, )*
        ];
        impl DType {
            /// All types, in table order.
            pub const ALL: &'static [DType] = &[$(DType::$v),*];
        }
    };
}

table! {
    F32    => "f32",    Some(0),  Some("F32"),      1, 4, Some(VecDot::F32);
    F16    => "f16",    Some(1),  Some("F16"),      1, 2, Some(VecDot::F16);
    BF16   => "bf16",   Some(30), Some("BF16"),     1, 2, Some(VecDot::BF16);
    F64    => "f64",    Some(28), Some("F64"),      1, 8, None;
    I8     => "i8",     Some(24), Some("I8"),       1, 1, None;
    I16    => "i16",    Some(25), Some("I16"),      1, 2, None;
    I32    => "i32",    Some(26), Some("I32"),      1, 4, None;
    I64    => "i64",    Some(27), Some("I64"),      1, 8, None;
    U8     => "u8",     None,     Some("U8"),       1, 1, None;
    Bool   => "bool",   None,     Some("BOOL"),     1, 1, None;
    F8E4M3 => "f8_e4m3", None,    Some("F8_E4M3"),  1, 1, None;
    F8E5M2 => "f8_e5m2", None,    Some("F8_E5M2"),  1, 1, None;
    Q4_0   => "q4_0",   Some(2),  None,            32, 18, Some(VecDot::Q8_0);
    Q4_1   => "q4_1",   Some(3),  None,            32, 20, Some(VecDot::Q8_1);
    Q5_0   => "q5_0",   Some(6),  None,            32, 22, Some(VecDot::Q8_0);
    Q5_1   => "q5_1",   Some(7),  None,            32, 24, Some(VecDot::Q8_1);
    Q8_0   => "q8_0",   Some(8),  None,            32, 34, Some(VecDot::Q8_0);
    Q2K    => "q2_K",   Some(10), None,           256, 84, Some(VecDot::Q8K);
    Q3K    => "q3_K",   Some(11), None,           256, 110, Some(VecDot::Q8K);
    Q4K    => "q4_K",   Some(12), None,           256, 144, Some(VecDot::Q8K);
    Q5K    => "q5_K",   Some(13), None,           256, 176, Some(VecDot::Q8K);
    Q6K    => "q6_K",   Some(14), None,           256, 210, Some(VecDot::Q8K);
    IQ4NL  => "iq4_nl", Some(20), None,            32, 18, Some(VecDot::Q8_0);
    IQ4XS  => "iq4_xs", Some(23), None,           256, 136, Some(VecDot::Q8K);
    IQ2XXS => "iq2_xxs", Some(16), None,          256, 66, Some(VecDot::Q8K);
    IQ2XS  => "iq2_xs", Some(17), None,           256, 74, Some(VecDot::Q8K);
    IQ2S   => "iq2_s",  Some(22), None,           256, 82, Some(VecDot::Q8K);
    IQ3XXS => "iq3_xxs", Some(18), None,          256, 98, Some(VecDot::Q8K);
    IQ3S   => "iq3_s",  Some(21), None,           256, 110, Some(VecDot::Q8K);
    IQ1S   => "iq1_s",  Some(19), None,           256, 50, Some(VecDot::Q8K);
    IQ1M   => "iq1_m",  Some(29), None,           256, 56, Some(VecDot::Q8K);
    TQ1_0  => "tq1_0",  Some(34), None,           256, 54, Some(VecDot::Q8K);
    TQ2_0  => "tq2_0",  Some(35), None,           256, 66, Some(VecDot::Q8K);
    MXFP4  => "mxfp4",  Some(39), None,            32, 17, Some(VecDot::Q8_0);
    U32    => "u32",    None,     Some("U32"),      1, 4, None;
}

impl DType {
    /// This type's row of [`TABLE`].
    pub fn info(self) -> &'static DTypeInfo {
        // The table is generated in declaration order, so the discriminant indexes it.
        &TABLE[self as usize]
    }
    pub fn name(self) -> &'static str {
        self.info().name
    }
    pub fn block_elems(self) -> usize {
        self.info().block_elems
    }
    pub fn block_bytes(self) -> usize {
        self.info().block_bytes
    }
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }
    /// Looks a type up by its ggml id.
    pub fn from_ggml_id(id: u32) -> Option<DType> {
        TABLE.iter().find(|i| i.ggml_id == Some(id)).map(|i| i.dtype)
    }
    /// Looks a type up by its safetensors spelling.
    pub fn from_safetensors(name: &str) -> Option<DType> {
        TABLE.iter().find(|i| i.safetensors == Some(name)).map(|i| i.dtype)
    }
    /// Looks a type up by its name (case-insensitive): `q8_0`, `bf16`, `Q4_K`.
    pub fn from_name(name: &str) -> Option<DType> {
        TABLE.iter().find(|i| i.name.eq_ignore_ascii_case(name)).map(|i| i.dtype)
    }
    /// Bytes of `n` elements, or `None` if `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if n % be != 0 {
            return None;
        }
        (n / be).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_declaration_order() {
        for (i, d) in DType::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
            assert_eq!(TABLE[i].dtype, *d);
        }
    }

    #[test]
    fn ids_and_names_are_unique_and_round_trip() {
        for d in DType::ALL {
            if let Some(id) = d.info().ggml_id {
                assert_eq!(DType::from_ggml_id(id), Some(*d));
            }
            if let Some(s) = d.info().safetensors {
                assert_eq!(DType::from_safetensors(s), Some(*d));
            }
            assert_eq!(DType::from_name(d.name()), Some(*d));
        }
    }

    #[test]
    fn bytes_for_checks_blocks() {
        assert_eq!(DType::Q8_0.bytes_for(64), Some(68));
        assert_eq!(DType::Q8_0.bytes_for(33), None);
        assert_eq!(DType::BF16.bytes_for(3), Some(6));
        assert_eq!(DType::Q4K.bytes_for(256), Some(144));
    }
}
