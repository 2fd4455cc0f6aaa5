//! The IQ2 / IQ1 quantization grids and their neighbour maps: a port of `iq2xs_init_impl` (ggml-quants.c), which
//! `ggml_quantize_init` runs before IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S or IQ1_M is quantized. Facts:
//! `../shared/docs/gguf-spec.md` §2.10.
//!
//! For each type the C function builds, from a compact grid list (`kgrid_2bit_256`, `kgrid_2bit_512`,
//! `kgrid_2bit_1024`, `kgrid_1bit_2048`: 2 bits per coordinate, 8 coordinates), the three arrays of
//! `iq2_data[gindex]` that the quantizers read:
//! - `grid`: one `u64` per grid point, byte `i` (little endian, as C's `int8_t *` view of it) = `2*l_i + 1`;
//! - `map` (43692 entries: the 16-bit indices `u = Σ l_i << 2i` up to `0xAAAA`, the largest with every `l_i <= 2`,
//!   which is all the quantizers look up): the grid index of `u` when `u` is a grid point, else `-(offset + 1)` where `neighbours[offset]` is the number `n` of
//!   neighbours of `u` and `neighbours[offset + 1 ..= offset + n]` are their grid indices;
//! - `neighbours`: for every `u` not on the grid, in increasing `u`, its count and then the grid points sorted by
//!   (integer squared distance, grid index), keeping every point within the `nwant` nearest distinct distances
//!   (`nwant` = 2 for IQ2_XXS / IQ2_XS, 1 for IQ2_S, 3 for IQ1_S / IQ1_M).
//!
//! C sorts all grid points with `qsort` on the `(d2, index)` pairs; that is a total order, so the result does not
//! depend on the sort algorithm. This port finds the same lists without sorting: it takes the `nwant` smallest
//! distinct distances from a histogram and lists, distance by distance, the grid indices at that distance in
//! increasing order, which is exactly the sorted order. The layout (offsets, counts) is C's, value for value.
//!
//! IQ1_S and IQ1_M share one entry, as in C (`iq2_data_index`). Each entry is built once, on first use, behind a
//! [`OnceLock`], and shared by all threads.
//!
//! The compact grid lists and the decode tables live in [`crate::iq_tables`], generated from the pinned C sources
//! by `scripts/gen_iq_tables.py`.

use std::sync::OnceLock;

use sling_core::DType;

use crate::iq_tables::{KGRID_1BIT_2048, KGRID_2BIT_1024, KGRID_2BIT_256, KGRID_2BIT_512};

/// `kmap_size` in `iq2xs_init_impl`: every index `u` with 2-bit fields up to 2 (`0xAAAA`), plus one.
pub const KMAP_SIZE: usize = 43692;

/// One entry of C's `iq2_data[]` (`iq2_entry_t`): see the module documentation for the layout.
#[derive(Debug, PartialEq, Eq)]
pub struct Iq2Maps {
    /// `kgrid_q2xs`: grid point `k` as 8 little-endian `i8` bytes `2*l + 1`.
    pub grid: Vec<u64>,
    /// `kmap_q2xs` ([`KMAP_SIZE`] entries): grid index, or `-(offset + 1)` into `neighbours` for off-grid points.
    pub map: Vec<i32>,
    /// `kneighbors_q2xs`: for each off-grid point, its count followed by that many grid indices.
    pub neighbours: Vec<u16>,
}

impl Iq2Maps {
    /// The neighbour grid indices of the off-grid point `u` (C: `kneighbors_q2xs - kmap_q2xs[u] - 1`, without the
    /// leading count). Panics if `u` is on the grid.
    #[inline(always)]
    pub fn neighbours_of(&self, u: usize) -> &[u16] {
        let m = self.map[u];
        assert!(m < 0, "point {u} is on the grid");
        let start = (-m - 1) as usize;
        let n = self.neighbours[start] as usize;
        &self.neighbours[start + 1..start + 1 + n]
    }
}

/// `iq2_data_index`: the entry a type uses (IQ1_S and IQ1_M share one).
fn data_index(dtype: DType) -> usize {
    match dtype {
        DType::IQ2XXS => 0,
        DType::IQ2XS => 1,
        DType::IQ1S | DType::IQ1M => 2,
        DType::IQ2S => 3,
        other => panic!("iq2_maps: {other} has no IQ2/IQ1 grid (only IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M)"),
    }
}

/// The grid and neighbour maps of `dtype`, built on first use (`iq2xs_init_impl`) and shared from then on.
///
/// # Panics
/// For any type other than IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M (C's `GGML_ASSERT` in `iq2_data_index`).
pub fn iq2_maps(dtype: DType) -> &'static Iq2Maps {
    static DATA: [OnceLock<Iq2Maps>; 4] = [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let gindex = data_index(dtype);
    DATA[gindex].get_or_init(|| match gindex {
        0 => build(&KGRID_2BIT_256, 2),
        1 => build(&KGRID_2BIT_512, 2),
        2 => build(&KGRID_1BIT_2048, 3),
        _ => build(&KGRID_2BIT_1024, 1),
    })
}

/// `iq2xs_init_impl` for one compact grid list and its `nwant`.
fn build(kgrid: &[u16], nwant: usize) -> Iq2Maps {
    let grid_size = kgrid.len();
    // the_grid: pos[i] = 2*l + 1, byte i of the u64.
    let grid: Vec<u64> = kgrid
        .iter()
        .map(|&g| {
            let mut pos = [0u8; 8];
            for (i, p) in pos.iter_mut().enumerate() {
                let l = (g >> (2 * i)) & 0x3;
                *p = (2 * l + 1) as u8;
            }
            u64::from_le_bytes(pos)
        })
        .collect();
    let mut map = vec![-1i32; KMAP_SIZE];
    for (i, &g) in grid.iter().enumerate() {
        let mut index = 0usize;
        for (k, &b) in g.to_le_bytes().iter().enumerate() {
            let q = (b as usize - 1) / 2;
            index |= q << (2 * k);
        }
        map[index] = i as i32;
    }
    // The grid as i32 coordinates, for the distance loop.
    let coords: Vec<[i32; 8]> = grid.iter().map(|g| g.to_le_bytes().map(|b| b as i8 as i32)).collect();
    // Squared distances are at most 8 * (7 - 1)^2 = 288.
    const MAX_D2: usize = 8 * 36;
    let mut neighbours: Vec<u16> = Vec::new();
    let mut dist2 = vec![0u16; grid_size];
    for (i, m) in map.iter_mut().enumerate() {
        if *m >= 0 {
            continue;
        }
        let mut pos = [0i32; 8];
        for (k, p) in pos.iter_mut().enumerate() {
            let l = ((i >> (2 * k)) & 0x3) as i32;
            *p = 2 * l + 1;
        }
        let mut hist = [0u32; MAX_D2 + 1];
        for (d, pg) in dist2.iter_mut().zip(&coords) {
            let mut d2 = 0i32;
            for k in 0..8 {
                d2 += (pg[k] - pos[k]) * (pg[k] - pos[k]);
            }
            *d = d2 as u16;
            hist[d2 as usize] += 1;
        }
        // The nwant smallest distinct distances, ascending (fewer if the grid has fewer).
        let wanted: Vec<u16> = (0..=MAX_D2).filter(|&d| hist[d] > 0).take(nwant).map(|d| d as u16).collect();
        let n: u32 = wanted.iter().map(|&d| hist[d as usize]).sum();
        let offset = neighbours.len();
        *m = -(offset as i32 + 1);
        neighbours.push(n as u16);
        for &d in &wanted {
            neighbours.extend(dist2.iter().enumerate().filter(|&(_, &dj)| dj == d).map(|(j, _)| j as u16));
        }
    }
    Iq2Maps { grid, map, neighbours }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iq_tables::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID};

    const TYPES: [DType; 5] = [DType::IQ2XXS, DType::IQ2XS, DType::IQ2S, DType::IQ1S, DType::IQ1M];

    /// `iq2xs_init_impl` transcribed literally (qsort of all `(d2, j)` pairs, the counting pass then the writing
    /// pass), to check the histogram version against.
    fn build_literal(kgrid: &[u16], nwant: usize) -> Iq2Maps {
        let grid_size = kgrid.len();
        let grid = build(kgrid, nwant).grid;
        let mut map = vec![-1i32; KMAP_SIZE];
        for (i, g) in grid.iter().enumerate() {
            let b = g.to_le_bytes();
            let index = (0..8).fold(0usize, |acc, k| acc | (((b[k] as usize - 1) / 2) << (2 * k)));
            map[index] = i as i32;
        }
        let sorted = |i: usize| {
            let pos: Vec<i32> = (0..8).map(|k| 2 * ((i >> (2 * k)) & 3) as i32 + 1).collect();
            let mut dist2: Vec<(i32, i32)> = (0..grid_size)
                .map(|j| {
                    let pg = grid[j].to_le_bytes();
                    ((0..8).map(|k| (pg[k] as i8 as i32 - pos[k]).pow(2)).sum(), j as i32)
                })
                .collect();
            dist2.sort();
            dist2
        };
        let mut neighbours = Vec::new();
        for i in 0..KMAP_SIZE {
            if map[i] >= 0 {
                continue;
            }
            let dist2 = sorted(i);
            let start = neighbours.len();
            map[i] = -(start as i32 + 1);
            neighbours.push(0u16);
            let (mut d2, mut n, mut nhave) = (dist2[0].0, 0, 1);
            for &(d, j) in &dist2 {
                if d > d2 {
                    if nhave == nwant {
                        break;
                    }
                    d2 = d;
                    nhave += 1;
                }
                neighbours.push(j as u16);
                n += 1;
            }
            neighbours[start] = n;
        }
        Iq2Maps { grid, map, neighbours }
    }

    /// The init grid (bytes `2l + 1`) decodes to ggml-common.h's tables through one fixed level map per family:
    /// IQ2 `1, 3, 5, 7 -> 0x08, 0x19, 0x2b, 0x3e`, IQ1 `1, 3, 5 -> -1, 0, 1`.
    #[test]
    fn grids_agree_with_the_decode_tables() {
        let iq2_level = |b: u8| [0x08u8, 0x19, 0x2b, 0x3e][(b as usize - 1) / 2];
        for (dtype, table) in
            [(DType::IQ2XXS, &IQ2XXS_GRID[..]), (DType::IQ2XS, &IQ2XS_GRID[..]), (DType::IQ2S, &IQ2S_GRID[..])]
        {
            let m = iq2_maps(dtype);
            assert_eq!(m.grid.len(), table.len(), "{dtype}");
            for (k, (&g, &t)) in m.grid.iter().zip(table).enumerate() {
                assert_eq!(u64::from_le_bytes(g.to_le_bytes().map(iq2_level)), t, "{dtype} grid point {k}");
            }
        }
        let m = iq2_maps(DType::IQ1S);
        assert_eq!(m.grid.len(), IQ1S_GRID.len());
        for (k, (&g, &t)) in m.grid.iter().zip(&IQ1S_GRID).enumerate() {
            assert!(g.to_le_bytes().iter().all(|&b| b == 1 || b == 3 || b == 5), "IQ1 grid point {k}");
            assert_eq!(u64::from_le_bytes(g.to_le_bytes().map(|b| ((b as i8 - 1) / 2 - 1) as u8)), t, "IQ1 {k}");
        }
    }

    #[test]
    fn maps_are_consistent_and_match_the_literal_transcription() {
        for (dtype, kgrid, nwant) in [
            (DType::IQ2XXS, &KGRID_2BIT_256[..], 2),
            (DType::IQ2XS, &KGRID_2BIT_512[..], 2),
            (DType::IQ2S, &KGRID_2BIT_1024[..], 1),
            (DType::IQ1S, &KGRID_1BIT_2048[..], 3),
        ] {
            let m = iq2_maps(dtype);
            let grid_size = kgrid.len();
            // Every grid point maps to itself; everything else to a neighbour list.
            let on_grid = m.map.iter().filter(|&&v| v >= 0).count();
            assert_eq!(on_grid, grid_size, "{dtype}: distinct grid points");
            for (k, &g) in kgrid.iter().enumerate() {
                assert_eq!(m.map[g as usize], k as i32, "{dtype}");
            }
            let off_grid = KMAP_SIZE - grid_size;
            let mut total = 0;
            for u in 0..KMAP_SIZE {
                if m.map[u] >= 0 {
                    continue;
                }
                let nb = m.neighbours_of(u);
                assert!(!nb.is_empty() && nb.len() <= grid_size, "{dtype} {u}");
                assert!(nb.iter().all(|&j| (j as usize) < grid_size), "{dtype} {u}");
                total += nb.len();
            }
            assert_eq!(m.neighbours.len(), total + off_grid, "{dtype}: counts plus indices");
            // Same result as the literal C transcription (qsort + two passes); the 2048 grid takes a few seconds
            // in debug builds, so only the smaller ones are compared there.
            if grid_size <= 1024 || !cfg!(debug_assertions) {
                assert!(build_literal(kgrid, nwant) == *m, "{dtype}: differs from the literal transcription");
            }
        }
    }

    #[test]
    fn built_once_shared_and_deterministic() {
        for dtype in TYPES {
            assert!(std::ptr::eq(iq2_maps(dtype), iq2_maps(dtype)), "{dtype}");
        }
        assert!(std::ptr::eq(iq2_maps(DType::IQ1S), iq2_maps(DType::IQ1M)));
        // A second, independent build gives the same arrays.
        assert!(build(&KGRID_2BIT_512, 2) == *iq2_maps(DType::IQ2XS));
        // Built concurrently from several threads: one value.
        let ptrs: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| iq2_maps(DType::IQ2S) as *const Iq2Maps as usize)).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ptrs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    #[should_panic(expected = "no IQ2/IQ1 grid")]
    fn other_types_panic() {
        let _ = iq2_maps(DType::Q4K);
    }
}
