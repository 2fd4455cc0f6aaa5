//! The hot spots of the i-quant encoders (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) behind one
//! trait, so that `sling-kernels` can run faster versions of them inside the very encoders of [`crate::iq1`],
//! [`crate::iq2`] and [`crate::iq3`]. The provided methods are the scalar reference (the C code's loops as they
//! are); an implementation must return exactly what they return, for every input.

use crate::iq1::{self, Pair, IQ1M_BLOCK_SIZE, IQ1S_BLOCK_SIZE};
use crate::iq2::Iq2Step;
use crate::iq3::{Iq3Best, Iq3Data};
use crate::iqgrid::Iq2Maps;

/// The result of the partition search over the sorted block: `besti1`, `besti2`, the shift (IQ1_S: `1` for
/// `x_p`, `-1` for `x_m`, `0` when nothing scored; IQ1_M: the sign combination `best_k` 0..3, `-1` when nothing
/// scored) and the scale (`max` when nothing scored).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Partition {
    pub i1: i32,
    pub i2: i32,
    pub shift: i32,
    pub scale: f32,
}

/// The hot spots (module doc).
pub trait IqSearch {
    /// The `(value, index)` pairs of a block sorted as glibc's `qsort` sorts them ([`sorted_pairs`]).
    #[inline(always)]
    fn sort<const N: usize>(xb: &[f32; N]) -> [Pair; N] {
        iq1::sorted_pairs(xb)
    }
    /// IQ1_S's search over the partitions `i1 <= i2` of the sorted block into levels 0/1/2, both delta signs;
    /// `sumx`, `sumw`: prefix sums of `w·x` and `w` in sorted order.
    #[inline(always)]
    fn partition_s(sumx: &[f32; IQ1S_BLOCK_SIZE + 1], sumw: &[f32; IQ1S_BLOCK_SIZE + 1], max: f32) -> Partition {
        iq1::partition_s(sumx, sumw, max)
    }
    /// IQ1_M's search: as [`IqSearch::partition_s`] with the four delta sign combinations of the two halves;
    /// `px[h]`, `pw[h]`: prefix sums (sorted order) of the values of half `h` only.
    #[inline(always)]
    fn partition_m(px: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], pw: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], max: f32) -> Partition {
        iq1::partition_m(px, pw, max)
    }
    /// `iq1_find_best_neighbour2` ([`iq1::find_best_neighbour2`]).
    #[inline(always)]
    fn neighbour_iq1(
        maps: &Iq2Maps,
        nb: &[u16],
        xval: &[f32],
        weight: &[f32],
        scale: f32,
        xg: &[f32; 3],
        l_out: &mut [i8],
    ) -> usize {
        iq1::find_best_neighbour2(maps, nb, xval, weight, scale, xg, l_out)
    }
    /// `iq2_find_best_neighbour` ([`crate::iq2::find_best_neighbour`]) for the off-grid point `u`.
    #[inline(always)]
    fn neighbour_iq2(maps: &Iq2Maps, u: usize, xval: &[f32], weight: &[f32], scale: f32, l: &mut [i8]) -> usize {
        crate::iq2::find_best_neighbour(maps, u, xval, weight, scale, l)
    }
    /// The step loop of the IQ2 scale searches ([`crate::iq2::step_search`], with `Self`'s neighbour search).
    #[inline(always)]
    fn steps_iq2<const G: usize>(
        maps: &Iq2Maps,
        nsteps: i32,
        den: f32,
        xval: &[f32],
        weight: &[f32],
        waux: &[f32],
    ) -> Option<Iq2Step<G>>
    where
        Self: Sized,
    {
        crate::iq2::step_search::<Self, G>(maps, nsteps, den, xval, weight, waux)
    }
    /// The scale search of one IQ3_XXS (`XXS`) or IQ3_S sub-block ([`crate::iq3::scale_search`]).
    #[inline(always)]
    fn scale_search_iq3<const XXS: bool>(
        data: &Iq3Data,
        xval: &[f32; 32],
        weight: &[f32; 32],
        waux: &[f32; 32],
        max: f32,
    ) -> Iq3Best {
        crate::iq3::scale_search::<XXS>(data, xval, weight, waux, max)
    }
}

/// The scalar reference: the C code's loops as they are.
pub struct Reference;
impl IqSearch for Reference {}
