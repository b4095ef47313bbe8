//! Reference quantizers of the grid i-quants, transcriptions of ggml's (the bytes ggml writes
//! without an importance matrix, or with one for the types ggml requires it of; float operations
//! in ggml's order; ggml-base is compiled without FMA contraction, so none is used here):
//! IQ3_XXS, IQ3_S, IQ2_S and IQ1_M, and with an importance matrix IQ2_XXS, IQ2_XS and IQ1_S. A group of
//! four weights (eight for IQ2_S; their magnitudes, IQ3_XXS flipping an even number of signs
//! per eight, the cheapest one where odd) must land on a row of the grid: candidate scales are
//! tried, each group's nearest levels looked up in a map of the level patterns, and a pattern
//! off the grid replaced by the best of its nearest grid rows (precomputed per pattern, as
//! ggml's `iq3xs_init_impl` and `iq2xs_init_impl` do). ggml's IQ3_S writer misplaces the blocks after an all-zero block
//! of 32 (see [`quantize_iq3_s`]); this one writes the same bytes. IQ1_M and IQ1_S (three
//! levels, groups of eight) instead split each block's sorted weights exhaustively (see
//! [`quantize_iq1_m`]).

// The quantizers walk groups by index, as ggml's do.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use bytemuck::Zeroable;

use crate::iq_grid::{
    BlockIq1M, BlockIq1S, BlockIq2S, BlockIq2Xs, BlockIq2Xxs, BlockIq3S, BlockIq3Xxs,
};
use crate::iq_tables::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
use crate::kquants::{nearest_int, QK_K};

/// A group's levels packed `bits` each (three for groups of four, two for eight): the map's
/// index.
fn pattern(levels: &[i8], bits: usize) -> usize {
    levels
        .iter()
        .enumerate()
        .fold(0, |u, (i, &l)| u | ((l as usize) << (bits * i)))
}

/// A grid as the quantizer sees it (ggml's `iq3_data` and `iq2_data`): each row as N odd
/// values 2l + 1 of the levels l its bytes stand for (ggml builds its rows from a table of
/// level patterns in the dequantizer's row order), and for each level pattern of a group of N
/// (4096 of four at three bits a level; 43692 of eight at two, as ggml sizes it) its row (≥ 0)
/// or −(offset + 1) of its entry in `neighbours`: a count n, then the n rows nearest to it
/// (every row at the smallest `distances_wanted` squared distances, by distance then row).
struct Grid<const N: usize> {
    rows: Vec<[i8; N]>,
    map: Vec<i32>,
    neighbours: Vec<u16>,
}

impl<const N: usize> Grid<N> {
    /// ggml's `iq1_find_best_neighbour2` for the off-grid entry `m`: of its listed rows, the one
    /// whose levels, as the values `level_values` times `scale`, are nearest to `xval` under
    /// `weight`.
    fn best_neighbour_of_values(
        &self,
        m: i32,
        xval: &[f32],
        weight: &[f32],
        scale: f32,
        level_values: &[f32; 3],
    ) -> usize {
        let list = &self.neighbours[(-m - 1) as usize..];
        let n = list[0] as usize;
        let (mut best_d2, mut best) = (f32::MAX, list[1] as usize);
        for &j in &list[1..=n] {
            let g = self.rows[j as usize];
            let mut d2 = 0.0f32;
            for i in 0..N {
                let q = level_values[((g[i] - 1) / 2) as usize];
                let diff = scale * q - xval[i];
                d2 += weight[i] * diff * diff;
            }
            if d2 < best_d2 {
                best_d2 = d2;
                best = j as usize;
            }
        }
        best
    }

    /// Bits a level in a pattern.
    const BITS: usize = if N == 4 { 3 } else { 2 };

    /// ggml's `iq3xs_init_impl` / `iq2xs_init_impl` for a dequantizer's rows `table`, whose
    /// bytes take the values `level_values` (level l at index l).
    fn new(table: &[[u8; N]], level_values: &[u8], patterns: usize, wanted: usize) -> Self {
        let rows: Vec<[i8; N]> = table
            .iter()
            .map(|r| {
                r.map(|b| {
                    let l = level_values.iter().position(|&v| v == b).unwrap_or(0);
                    2 * l as i8 + 1
                })
            })
            .collect();
        let mut map = vec![-1i32; patterns];
        for (j, r) in rows.iter().enumerate() {
            map[pattern(&r.map(|v| (v - 1) / 2), Self::BITS)] = j as i32;
        }
        let mut neighbours = Vec::new();
        let level_mask = (1 << Self::BITS) - 1;
        for i in 0..patterns {
            if map[i] >= 0 {
                continue;
            }
            let pos: [i32; N] =
                std::array::from_fn(|k| 2 * ((i >> (Self::BITS * k)) & level_mask) as i32 + 1);
            let mut dist: Vec<(i32, usize)> = rows
                .iter()
                .enumerate()
                .map(|(j, r)| {
                    let d2 = r
                        .iter()
                        .zip(&pos)
                        .map(|(&g, &p)| (g as i32 - p).pow(2))
                        .sum();
                    (d2, j)
                })
                .collect();
            dist.sort_unstable();
            map[i] = -(neighbours.len() as i32 + 1);
            let at = neighbours.len();
            neighbours.push(0);
            let (mut d2, mut have) = (dist[0].0, 1);
            for &(d, j) in &dist {
                if d > d2 {
                    if have == wanted {
                        break;
                    }
                    d2 = d;
                    have += 1;
                }
                neighbours.push(j as u16);
            }
            neighbours[at] = (neighbours.len() - at - 1) as u16;
        }
        Grid {
            rows,
            map,
            neighbours,
        }
    }

    /// The row of a group's levels, or a negative entry (see [`Grid`]).
    fn index(&self, levels: &[i8]) -> i32 {
        self.map[pattern(levels, Self::BITS)]
    }

    /// ggml's `iq3_find_best_neighbour` (`iq2_` for eight) for the off-grid entry `m`: of its listed rows, the
    /// one whose values times `scale` are nearest to `xval` under `weight`; its levels into `l`.
    fn best_neighbour(
        &self,
        m: i32,
        xval: &[f32],
        weight: &[f32],
        scale: f32,
        l: &mut [i8],
    ) -> usize {
        let list = &self.neighbours[(-m - 1) as usize..];
        let n = list[0] as usize;
        let (mut best_d2, mut best) = (f32::MAX, 0);
        for &j in &list[1..=n] {
            let g = self.rows[j as usize];
            let mut d2 = 0.0f32;
            for i in 0..N {
                let diff = scale * g[i] as f32 - xval[i];
                d2 += weight[i] * diff * diff;
            }
            if d2 < best_d2 {
                best_d2 = d2;
                best = j as usize;
            }
        }
        for i in 0..N {
            l[i] = (self.rows[best][i] - 1) / 2;
        }
        best
    }
}

/// IQ2_XXS's 256 rows of eight (byte values 8, 25, 43), neighbours at the two nearest
/// distances.
fn iq2xxs_grid() -> &'static Grid<8> {
    static GRID: OnceLock<Grid<8>> = OnceLock::new();
    GRID.get_or_init(|| {
        let rows: Vec<[u8; 8]> = IQ2XXS_GRID.iter().map(|r| r.to_le_bytes()).collect();
        Grid::new(&rows, &[8, 25, 43], 43692, 2)
    })
}

/// IQ2_XS's 512 rows of eight (byte values 8, 25, 43), neighbours at the two nearest distances.
fn iq2xs_grid() -> &'static Grid<8> {
    static GRID: OnceLock<Grid<8>> = OnceLock::new();
    GRID.get_or_init(|| {
        let rows: Vec<[u8; 8]> = IQ2XS_GRID.iter().map(|r| r.to_le_bytes()).collect();
        Grid::new(&rows, &[8, 25, 43], 43692, 2)
    })
}

/// IQ3_XXS's 256 rows (byte values 4, 12, ..., 62), neighbours at the two nearest distances.
fn iq3xxs_grid() -> &'static Grid<4> {
    static GRID: OnceLock<Grid<4>> = OnceLock::new();
    GRID.get_or_init(|| {
        let rows: Vec<[u8; 4]> = IQ3XXS_GRID.iter().map(|r| r.to_le_bytes()).collect();
        Grid::new(&rows, &[4, 12, 20, 28, 36, 44, 52, 62], 4096, 2)
    })
}

/// IQ3_S's 512 rows (byte values 1, 3, ..., 15), neighbours at the three nearest distances.
fn iq3s_grid() -> &'static Grid<4> {
    static GRID: OnceLock<Grid<4>> = OnceLock::new();
    GRID.get_or_init(|| {
        let rows: Vec<[u8; 4]> = IQ3S_GRID.iter().map(|r| r.to_le_bytes()).collect();
        Grid::new(&rows, &[1, 3, 5, 7, 9, 11, 13, 15], 4096, 3)
    })
}

/// IQ2_S's 1024 rows of eight (byte values 8, 25, 43), neighbours at the nearest distance.
fn iq2s_grid() -> &'static Grid<8> {
    static GRID: OnceLock<Grid<8>> = OnceLock::new();
    GRID.get_or_init(|| {
        let rows: Vec<[u8; 8]> = IQ2S_GRID.iter().map(|r| r.to_le_bytes()).collect();
        Grid::new(&rows, &[8, 25, 43], 43692, 1)
    })
}

/// IQ1_M's (and IQ1_S's) 2048 rows of eight levels (bytes −1, 0, 1), neighbours at the three
/// nearest distances.
fn iq1_grid() -> &'static Grid<8> {
    static GRID: OnceLock<Grid<8>> = OnceLock::new();
    GRID.get_or_init(|| {
        let rows: Vec<[u8; 8]> = IQ1S_GRID.iter().map(|r| r.to_le_bytes()).collect();
        Grid::new(&rows, &[0xff, 0x00, 0x01], 43692, 3)
    })
}

/// ggml's `GROUP_MAX_EPS_IQ3_XXS` and `_IQ2_S`: a block whose largest magnitude is below it is
/// zero.
const GROUP_MAX_EPS: f32 = 1e-8;

/// How the two IQ3 searches differ (ggml's code for each, not a design).
struct Search {
    /// The largest level + 1 (ggml's kMaxQ: 8 for IQ3, 3 for IQ2_S).
    k_max_q: i32,
    /// Candidate scales (2·k_max_q − 1 + step·is)/max for is in −steps..=steps.
    steps: i32,
    step: f32,
    /// Whether a group counts as on the grid before any candidate won (IQ3_XXS, IQ2_S: yes).
    on_grid_at_first: bool,
    /// Whether the final pass re-fits every group at the chosen scale (IQ3_S) or only those
    /// off the grid.
    refit_all: bool,
    /// Whether the final pass runs even when every group landed on the grid (IQ2_XXS).
    refit_always: bool,
}

impl Search {
    /// The levels (all 0) and scale (max / (2·k_max_q − 1)) the IQ3 and IQ2_S searches keep
    /// where no candidate fits.
    fn start<const B: usize>(&self, max: f32) -> ([i8; B], f32) {
        ([0; B], max / (2 * self.k_max_q - 1) as f32)
    }
}

/// The levels and scale of B magnitudes `xval` (groups of N) under `weight` on `grid`: the
/// candidate scale whose on-grid levels fit best, then a re-fit at that scale (ggml's search,
/// shared by quantize_row_iq3_xxs_impl, quantize_row_iq3_s_impl and quantize_row_iq2_s_impl).
/// `max` is xval's largest value (IQ2_XXS: its largest level times its first fit's scale),
/// `start` the levels and scale kept where no candidate fits.
fn search<const N: usize, const B: usize>(
    grid: &Grid<N>,
    xval: &[f32; B],
    weight: &[f32; B],
    max: f32,
    start: ([i8; B], f32),
    how: &Search,
) -> ([i8; B], f32) {
    let groups = B / N;
    let k_max_q = how.k_max_q;
    let waux: [f32; B] = std::array::from_fn(|i| weight[i].sqrt());
    let nearest = |id: f32, v: f32| nearest_int(0.5 * (id * v - 1.0)).clamp(0, k_max_q - 1) as i8;
    let (mut l, mut scale) = start;
    let mut best = 0.0f32;
    let mut on_grid = [how.on_grid_at_first; 8];
    for is in -how.steps..=how.steps {
        let id = ((2 * k_max_q - 1) as f32 + is as f32 * how.step) / max;
        let this_scale = 1.0 / id;
        let mut laux = [0i8; B];
        let mut on_grid_aux = [true; 8];
        for k in 0..groups {
            let r = N * k..N * k + N;
            for i in r.clone() {
                laux[i] = nearest(id, xval[i]);
            }
            let m = grid.index(&laux[r.clone()]);
            if m < 0 {
                on_grid_aux[k] = false;
                let (xv, wv) = (&xval[r.clone()], &waux[r.clone()]);
                grid.best_neighbour(m, xv, wv, this_scale, &mut laux[r]);
            }
        }
        let (sumqx, sumq2) = sums(weight, xval, &laux);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            l = laux;
            on_grid = on_grid_aux;
        }
    }
    if (how.refit_always || on_grid[..groups].contains(&false)) && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..groups {
            if on_grid[k] && !how.refit_all {
                continue;
            }
            let r = N * k..N * k + N;
            let levels: [i8; N] = std::array::from_fn(|i| nearest(id, xval[N * k + i]));
            let mut m = grid.index(&levels);
            if m < 0 {
                let (xv, wv) = (&xval[r.clone()], &waux[r.clone()]);
                m = grid.best_neighbour(m, xv, wv, scale, &mut [0; N]) as i32;
            }
            for i in 0..N {
                l[N * k + i] = (grid.rows[m as usize][i] - 1) / 2;
            }
        }
        let (sumqx, sumq2) = sums(weight, xval, &l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    (l, scale)
}

/// The magnitudes of B weights as ggml takes them (`x >= 0 ? x : -x`) and their signs, a bit
/// per weight and a byte per eight (S = B / 8).
fn magnitudes_and_signs<const B: usize, const S: usize>(xb: &[f32]) -> ([f32; B], [u8; S]) {
    let (mut xval, mut signs) = ([0.0f32; B], [0u8; S]);
    for (i, &v) in xb[..B].iter().enumerate() {
        if v >= 0.0 {
            xval[i] = v;
        } else {
            xval[i] = -v;
            signs[i / 8] |= 1 << (i % 8);
        }
    }
    (xval, signs)
}

/// The magnitudes and sign sets of B weights for the types that store seven signs of each
/// eight, the eighth their parity (IQ3_XXS, IQ2_XXS, IQ2_XS; S = B / 8 sets): where the count of
/// negatives is odd, the cheapest weight's (w·x²) sign is flipped instead, its magnitude
/// negated.
fn parity_signs<const B: usize, const S: usize>(
    xb: &[f32],
    weight: &[f32; B],
) -> ([f32; B], [u32; S]) {
    let (mut xval, bytes) = magnitudes_and_signs::<B, S>(xb);
    let mut block_signs = [0u32; S];
    for k in 0..S {
        let mut s = bytes[k] as u32;
        if s.count_ones() % 2 == 1 {
            let cost = |i: usize| weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
            let (mut imin, mut min) = (0, cost(0));
            for i in 1..8 {
                if cost(i) < min {
                    min = cost(i);
                    imin = i;
                }
            }
            xval[8 * k + imin] = -xval[8 * k + imin];
            s ^= 1 << imin;
        }
        block_signs[k] = s & 127;
    }
    (xval, block_signs)
}

/// A negative fitted scale made positive with every stored sign flipped (seven-bit sign sets;
/// ggml: "should never happen"), as ggml's IQ3_XXS, IQ2_XXS and IQ2_XS writers do.
fn positive_with_parity_signs(scale: f32, signs: &mut [u32]) -> f32 {
    // ggml's test (`scale < 0`): a NaN scale stays as it is.
    if scale < 0.0 {
        for s in signs {
            *s = !*s & 127;
        }
        return -scale;
    }
    scale
}

/// ggml's `make_qp_quants` for 32 values under weights `w`: levels up to nmax and their scale,
/// the best of nine candidate scales then up to five passes moving single levels. ggml keeps
/// the levels as bytes, so a negative x (IQ2_XXS flips one sign of each odd set) wraps to
/// 255 where the bytes are read back; this does the same.
fn make_qp_quants(nmax: i32, x: &[f32; 32], w: &[f32; 32]) -> ([i8; 32], f32) {
    let mut l = [0u8; 32];
    let max = x.iter().fold(0.0f32, |m, &v| if m > v { m } else { v });
    if max < 1e-15 {
        return ([0; 32], 0.0);
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..32 {
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..32 {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += w[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..32 {
            let li = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * li as f32;
            mse += w[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..32 {
        let li = nearest_int(iscale * x[i]).min(nmax);
        l[i] = li as u8;
        sumlx += w[i] * x[i] * li as f32;
        suml2 += w[i] * li as f32 * li as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..32 {
            let li = l[i] as f32;
            let mut slx = sumlx - w[i] * x[i] * li;
            let mut sl2 = suml2 - w[i] * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    slx += w[i] * x[i] * new_l as f32;
                    sl2 += w[i] * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    let scale = if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    (l.map(|v| v as i8), scale)
}

/// ggml's `quantize_row_iq2_xxs_impl`, which requires an importance matrix: one row `x` (a
/// multiple of 256 values) into IQ2_XXS under `imatrix` (one weight per column, as
/// llama-quantize passes it).
pub fn quantize_iq2_xxs(x: &[f32], imatrix: &[f32], out: &mut [BlockIq2Xxs]) {
    let grid = iq2xxs_grid();
    let how = Search {
        k_max_q: 3,
        steps: 6,
        step: 0.1,
        on_grid_at_first: true,
        refit_all: true,
        refit_always: true,
    };
    for (ibl, (xbl, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
        *b = BlockIq2Xxs::zeroed();
        let mut q2 = [0u32; QK_K / 16];
        let sigma2 = sum_of_squares(xbl) / QK_K as f32;
        let mut scales = [0.0f32; QK_K / 32];
        let mut max_scale = 0.0f32;
        for ib in 0..QK_K / 32 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            let qw = &imatrix[QK_K * ibl + 32 * ib..][..32];
            let weight: [f32; 32] = imatrix_weights(xb, qw, sigma2);
            let (xval, mut block_signs) = parity_signs::<32, 4>(xb, &weight);
            let max = max_of(&xval);
            if max < 1e-15 {
                continue;
            }
            let (l0, scale0) = make_qp_quants(how.k_max_q + 1, &xval, &weight);
            let eff_max = scale0 * how.k_max_q as f32;
            if eff_max <= 0.0 {
                continue;
            }
            let (l, scale) = search(grid, &xval, &weight, eff_max, (l0, scale0), &how);
            let scale = positive_with_parity_signs(scale, &mut block_signs);
            for k in 0..4 {
                let m = grid.index(&l[8 * k..8 * k + 8]);
                debug_assert!(m >= 0, "a group's levels are off the grid");
                q2[2 * ib] |= (m.max(0) as u32) << (8 * k);
                q2[2 * ib + 1] |= block_signs[k] << (7 * k);
            }
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            continue;
        }
        let (d, l) = scale_indices(&scales, max_scale, 16);
        b.d = crate::float::f32_to_f16(d).to_le_bytes();
        for ib in 0..QK_K / 32 {
            q2[2 * ib + 1] |= (l[ib] as u32) << 28;
        }
        for (dst, v) in b.qs.chunks_exact_mut(4).zip(q2) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// ggml's `quantize_row_iq2_xs_impl`, which requires an importance matrix: one row `x` (a
/// multiple of 256 values) into IQ2_XS under `imatrix` (one weight per column). Blocks of 16,
/// the search of IQ2_S; each group's grid row (nine bits) and seven signs in a u16.
pub fn quantize_iq2_xs(x: &[f32], imatrix: &[f32], out: &mut [BlockIq2Xs]) {
    let grid = iq2xs_grid();
    let how = Search {
        k_max_q: 3,
        steps: 9,
        step: 0.1,
        on_grid_at_first: true,
        refit_all: false,
        refit_always: false,
    };
    for (ibl, (xbl, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
        *b = BlockIq2Xs::zeroed();
        let mut q2 = [0u16; QK_K / 8];
        let sigma2 = sum_of_squares(xbl) / QK_K as f32;
        let mut scales = [0.0f32; QK_K / 16];
        let mut max_scale = 0.0f32;
        for ib in 0..QK_K / 16 {
            let xb = &xbl[16 * ib..16 * ib + 16];
            let qw = &imatrix[QK_K * ibl + 16 * ib..][..16];
            let weight: [f32; 16] = imatrix_weights(xb, qw, sigma2);
            let (xval, mut block_signs) = parity_signs::<16, 2>(xb, &weight);
            let max = max_of(&xval);
            if max < 1e-15 {
                continue;
            }
            let (l, scale) = search(grid, &xval, &weight, max, how.start(max), &how);
            let scale = positive_with_parity_signs(scale, &mut block_signs);
            for k in 0..2 {
                let m = grid.index(&l[8 * k..8 * k + 8]);
                debug_assert!(m >= 0, "a group's levels are off the grid");
                q2[2 * ib + k] = m.max(0) as u16 | (block_signs[k] << 9) as u16;
            }
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            continue;
        }
        let (d, l) = scale_indices(&scales, max_scale, 16);
        b.d = crate::float::f32_to_f16(d).to_le_bytes();
        for ib in 0..QK_K / 16 {
            b.scales[ib / 2] |= (l[ib] as u8) << (4 * (ib % 2));
        }
        for (dst, v) in b.qs.chunks_exact_mut(2).zip(q2) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// A super-block's scale d = max_scale / (2·levels − 1) and each block's scale index l in
/// 0..levels, the block's scale nearest d·(2l + 1) / 2 (ggml's encoding of the block scales of
/// the grid i-quants: 16 levels, IQ1's 8).
fn scale_indices<const N: usize>(
    scales: &[f32; N],
    max_scale: f32,
    levels: i32,
) -> (f32, [i32; N]) {
    let d = max_scale / (2 * levels - 1) as f32;
    let id = 1.0 / d;
    let l = scales.map(|s| nearest_int(0.5 * (id * s - 1.0)).clamp(0, levels - 1));
    (d, l)
}

/// Σ v², in order.
fn sum_of_squares(v: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &x in v {
        s += x * x;
    }
    s
}

/// The weights of B values `xb` under their importance-matrix entries `qw`, as ggml takes them:
/// qw · √(σ² + x²).
fn imatrix_weights<const B: usize>(xb: &[f32], qw: &[f32], sigma2: f32) -> [f32; B] {
    std::array::from_fn(|i| qw[i] * (sigma2 + xb[i] * xb[i]).sqrt())
}

/// The largest of `v` as ggml's MAX macro finds it.
fn max_of(v: &[f32]) -> f32 {
    v[1..].iter().fold(v[0], |m, &x| if m > x { m } else { x })
}

/// ggml's `quantize_row_iq3_xxs_ref`: x (a multiple of 256 values) into IQ3_XXS blocks.
pub fn quantize_iq3_xxs(x: &[f32], out: &mut [BlockIq3Xxs]) {
    let grid = iq3xxs_grid();
    let how = Search {
        k_max_q: 8,
        steps: 15,
        step: 0.2,
        on_grid_at_first: true,
        refit_all: false,
        refit_always: false,
    };
    for (xbl, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut q3 = [0u8; 96];
        let mut scales = [0.0f32; QK_K / 32];
        let mut max_scale = 0.0f32;
        for ib in 0..QK_K / 32 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            let weight: [f32; 32] = std::array::from_fn(|i| xb[i] * xb[i]);
            let (xval, mut block_signs) = parity_signs::<32, 4>(xb, &weight);
            let max = max_of(&xval);
            if max < GROUP_MAX_EPS {
                scales[ib] = 0.0;
                continue;
            }
            let (l, scale) = search(grid, &xval, &weight, max, how.start(max), &how);
            let scale = positive_with_parity_signs(scale, &mut block_signs);
            for k in 0..8 {
                let m = grid.index(&l[4 * k..4 * k + 4]);
                debug_assert!(m >= 0, "a group's levels are off the grid");
                q3[8 * ib + k] = m.max(0) as u8;
            }
            let signs =
                block_signs[0] | block_signs[1] << 7 | block_signs[2] << 14 | block_signs[3] << 21;
            q3[64 + 4 * ib..68 + 4 * ib].copy_from_slice(&signs.to_le_bytes());
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        *b = BlockIq3Xxs {
            d: [0; 2],
            qs: [0; 64],
            scales: [0; 32],
        };
        if max_scale == 0.0 {
            continue;
        }
        let (d, l) = scale_indices(&scales, max_scale, 16);
        b.d = crate::float::f32_to_f16(d * 1.0125).to_le_bytes();
        for ib in 0..QK_K / 32 {
            let at = 64 + 4 * ib;
            let v = u32::from_le_bytes(q3[at..at + 4].try_into().unwrap()) | (l[ib] as u32) << 28;
            q3[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        b.qs.copy_from_slice(&q3[..64]);
        b.scales.copy_from_slice(&q3[64..]);
    }
}

/// ggml's `quantize_row_iq3_s_ref` (blocks of 32): x (a multiple of 256 values) into IQ3_S.
pub fn quantize_iq3_s(x: &[f32], out: &mut [BlockIq3S]) {
    let grid = iq3s_grid();
    let how = Search {
        k_max_q: 8,
        steps: 9,
        step: 0.2,
        on_grid_at_first: false,
        refit_all: true,
        refit_always: false,
    };
    for (xbl, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        *b = BlockIq3S {
            d: [0; 2],
            qs: [0; 64],
            qh: [0; 8],
            signs: [0; 32],
            scales: [0; 4],
        };
        let mut scales = [0.0f32; QK_K / 32];
        let mut max_scale = 0.0f32;
        // Where the next block of 32 puts its grid rows and signs. As in ggml, an all-zero
        // block does not advance it (its `continue` skips the increments), so the blocks after
        // one land a slot early and dequantize with the wrong scale and high bits; the files
        // llama-quantize writes hold the same bytes.
        let mut slot = 0;
        for ib in 0..QK_K / 32 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            let weight: [f32; 32] = std::array::from_fn(|i| xb[i] * xb[i]);
            let (xval, mut block_signs) = magnitudes_and_signs::<32, 4>(xb);
            let max = max_of(&xval);
            if max == 0.0 {
                scales[ib] = 0.0;
                continue;
            }
            let (l, mut scale) = search(grid, &xval, &weight, max, how.start(max), &how);
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s;
                }
            }
            for k in 0..8 {
                let m = grid.index(&l[4 * k..4 * k + 4]);
                debug_assert!(m >= 0, "a group's levels are off the grid");
                let m = m.max(0) as usize;
                b.qs[8 * slot + k] = m as u8;
                b.qh[ib] |= ((m >> 8) << k) as u8;
            }
            b.signs[4 * slot..4 * slot + 4].copy_from_slice(&block_signs);
            slot += 1;
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            continue;
        }
        let (d, l) = scale_indices(&scales, max_scale, 16);
        b.d = crate::float::f32_to_f16(d * 1.033).to_le_bytes();
        for ib in (0..QK_K / 32).step_by(2) {
            b.scales[ib / 2] = l[ib] as u8 | (l[ib + 1] as u8) << 4;
        }
    }
}

/// ggml's `quantize_row_iq2_s_ref` (blocks of 16, groups of eight): x (a multiple of 256
/// values) into IQ2_S.
pub fn quantize_iq2_s(x: &[f32], out: &mut [BlockIq2S]) {
    let grid = iq2s_grid();
    let how = Search {
        k_max_q: 3,
        steps: 9,
        step: 0.1,
        on_grid_at_first: true,
        refit_all: false,
        refit_always: false,
    };
    for (xbl, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        *b = BlockIq2S::zeroed();
        let sigma2 = 2.0 * sum_of_squares(xbl) / QK_K as f32;
        let mut scales = [0.0f32; QK_K / 16];
        let mut max_scale = 0.0f32;
        for ib in 0..QK_K / 16 {
            let xb = &xbl[16 * ib..16 * ib + 16];
            let weight: [f32; 16] = std::array::from_fn(|i| 0.25 * sigma2 + xb[i] * xb[i]);
            let (xval, mut block_signs) = magnitudes_and_signs::<16, 2>(xb);
            let max = max_of(&xval);
            if max < GROUP_MAX_EPS {
                scales[ib] = 0.0;
                continue;
            }
            let (l, mut scale) = search(grid, &xval, &weight, max, how.start(max), &how);
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s;
                }
            }
            for k in 0..2 {
                let m = grid.index(&l[8 * k..8 * k + 8]);
                debug_assert!(m >= 0, "a group's levels are off the grid");
                let (m, i8) = (m.max(0) as usize, 2 * ib + k);
                b.qs[i8] = m as u8;
                b.qh[i8 / 4] |= ((m >> 8) << (2 * (i8 % 4))) as u8;
                b.signs[i8] = block_signs[k];
            }
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            continue;
        }
        let (d, l) = scale_indices(&scales, max_scale, 16);
        b.d = crate::float::f32_to_f16(d * 0.9875).to_le_bytes();
        for ib in 0..QK_K / 16 {
            b.scales[ib / 2] |= (l[ib] as u8) << (4 * (ib % 2));
        }
    }
}

/// IQ1_S's and IQ1_M's offset: a block's (IQ1_M: a group's) values {−1, 0, 1} shifted by ±
/// this.
const IQ1_DELTA: f32 = 0.125;

/// ggml's `quantize_row_iq1_m_impl` without an importance matrix (blocks of 16, groups of
/// eight): x (a multiple of 256 values) into IQ1_M. Per block the best split of its sorted
/// weights into the three levels is found exhaustively for each of the four shift signs (one
/// per group of eight), a group off the grid takes its nearest listed row, and the super-block
/// scale is refitted over the 3-bit block scales.
pub fn quantize_iq1_m(x: &[f32], out: &mut [BlockIq1M]) {
    const BLOCK: usize = 16;
    let grid = iq1_grid();
    let x_p = [-1.0 + IQ1_DELTA, IQ1_DELTA, 1.0 + IQ1_DELTA];
    let x_m = [-1.0 - IQ1_DELTA, -IQ1_DELTA, 1.0 - IQ1_DELTA];
    let masks = [0x00u8, 0x80, 0x08, 0x88];
    // The values of group k (0 or 1) of a block whose shifts are `shift` (0: +,+ 1: +,− 2: −,+
    // 3: −,−).
    let values = |shift: usize, k: usize| {
        let plus = if k == 0 {
            shift < 2
        } else {
            shift.is_multiple_of(2)
        };
        if plus {
            &x_p
        } else {
            &x_m
        }
    };
    for (xbl, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        *y = BlockIq1M::zeroed();
        let mut scales = [0.0f32; QK_K / BLOCK];
        let mut shifts = [0usize; QK_K / BLOCK];
        let mut max_scale = 0.0f32;
        for ib in 0..QK_K / BLOCK {
            let xb = &xbl[BLOCK * ib..BLOCK * ib + BLOCK];
            let weight: [f32; BLOCK] = std::array::from_fn(|i| xb[i] * xb[i]);
            let max = xb.iter().fold(xb[0].abs(), |m, v| m.max(v.abs()));
            if max < 1e-7 {
                continue;
            }
            // Weights in ascending order with prefix sums per half.
            let idx = ascending::<BLOCK>(xb);
            let (mut px, mut pw) = ([[0.0f32; BLOCK + 1]; 2], [[0.0f32; BLOCK + 1]; 2]);
            for j in 0..BLOCK {
                let i = idx[j];
                let h = (i >= BLOCK / 2) as usize;
                px[h][j + 1] = px[h][j] + weight[i] * xb[i];
                px[1 - h][j + 1] = px[1 - h][j];
                pw[h][j + 1] = pw[h][j] + weight[i];
                pw[1 - h][j + 1] = pw[1 - h][j];
            }
            let txs = [px[0][BLOCK], px[1][BLOCK]];
            let tws = [pw[0][BLOCK], pw[1][BLOCK]];
            let (p2, m2) = (x_p[2], x_m[2]);
            let cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1];
            let cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2];
            let cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1];
            let cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2];
            let (mut best_score, mut scale) = (-f32::MAX, max);
            let mut best: Option<(usize, usize, usize)> = None;
            for i1 in 0..=BLOCK {
                for i2 in i1..=BLOCK {
                    let (mut qx_p, mut qx_m, mut q2_p, mut q2_m) =
                        ([0.0f32; 2], [0.0; 2], [0.0; 2], [0.0; 2]);
                    for h in 0..2 {
                        let sx = px[h][i1] + px[h][i2];
                        qx_p[h] = txs[h] * p2 - sx;
                        qx_m[h] = txs[h] * m2 - sx;
                        q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                        q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                    }
                    let sumqx = [
                        qx_p[0] + qx_p[1],
                        qx_p[0] + qx_m[1],
                        qx_m[0] + qx_p[1],
                        qx_m[0] + qx_m[1],
                    ];
                    let sumq2 = [
                        q2_p[0] + q2_p[1],
                        q2_p[0] + q2_m[1],
                        q2_m[0] + q2_p[1],
                        q2_m[0] + q2_m[1],
                    ];
                    for k in 0..4 {
                        if sumq2[k] > 0.0 && sumqx[k] * sumqx[k] > best_score * sumq2[k] {
                            scale = sumqx[k] / sumq2[k];
                            best_score = scale * sumqx[k];
                            best = Some((i1, i2, k));
                        }
                    }
                }
            }
            let Some((i1, i2, mut shift)) = best else {
                continue;
            };
            let mut l = split_levels::<BLOCK>(&idx, i1, i2);
            if scale < 0.0 {
                for v in &mut l {
                    *v = 2 - *v;
                }
                scale = -scale;
                shift = 3 - shift;
            }
            let (index, scale) = iq1_rows(grid, &l, xb, &weight, scale, |k| values(shift, k));
            y.qs[2 * ib] = index[0] as u8;
            y.qs[2 * ib + 1] = index[1] as u8;
            y.qh[ib] = ((index[0] >> 8) | ((index[1] >> 8) << 4)) as u8;
            scales[ib] = scale;
            shifts[ib] = shift;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            continue;
        }
        let mut sc = [0u16; 4];
        let (d, ls) = scale_indices(&scales, max_scale, 8);
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for ib in 0..QK_K / BLOCK {
            let l = ls[ib];
            sc[ib / 4] |= (l as u16) << (3 * (ib % 4));
            y.qh[ib] |= masks[shifts[ib]];
            let xb = &xbl[BLOCK * ib..BLOCK * ib + BLOCK];
            for k in 0..2 {
                let xx = values(shifts[ib], k);
                let row =
                    y.qs[2 * ib + k] as usize + (((y.qh[ib] as usize) << (8 - 4 * k)) & 0x700);
                let g = grid.rows[row];
                for j in 0..8 {
                    let w = xb[8 * k + j] * xb[8 * k + j];
                    let q = xx[((g[j] - 1) / 2) as usize] * (2 * l + 1) as f32;
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
        }
        let d = if sumq2 > 0.0 { sumqx / sumq2 } else { d };
        let s = crate::float::f32_to_f16(d * 1.1125);
        sc[0] |= (s & 0x000f) << 12;
        sc[1] |= (s & 0x00f0) << 8;
        sc[2] |= (s & 0x0f00) << 4;
        sc[3] |= s & 0xf000;
        for (dst, v) in y.scales.chunks_exact_mut(2).zip(sc) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// The order of B values ascending, ties in place: ggml sorts with qsort, which glibc (2.36
/// here, where the goldens were made) runs as a stable merge sort.
fn ascending<const B: usize>(xb: &[f32]) -> [usize; B] {
    let mut idx: [usize; B] = std::array::from_fn(|j| j);
    idx.sort_by(|&a, &b| {
        xb[a]
            .partial_cmp(&xb[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx
}

/// Levels 0, 1, 2 for B values from their ascending order `idx`: the first i1 take 0, up to
/// i2 take 1, the rest 2.
fn split_levels<const B: usize>(idx: &[usize; B], i1: usize, i2: usize) -> [i8; B] {
    let mut l = [0i8; B];
    for (j, &i) in idx.iter().enumerate() {
        l[i] = if j < i1 {
            0
        } else if j < i2 {
            1
        } else {
            2
        };
    }
    l
}

/// The grid rows of an IQ1 block's groups of eight levels `l` (at most four groups; a group
/// off the grid takes its nearest listed row under group k's values `values(k)` and `scale`),
/// and the scale refitted to those rows where any group was off the grid (ggml keeps the
/// split's scale otherwise, and a refit that is not positive).
fn iq1_rows<'a>(
    grid: &Grid<8>,
    l: &[i8],
    xb: &[f32],
    weight: &[f32],
    mut scale: f32,
    values: impl Fn(usize) -> &'a [f32; 3],
) -> ([usize; 4], f32) {
    let groups = l.len() / 8;
    let mut index = [0usize; 4];
    let mut all_on_grid = true;
    for k in 0..groups {
        let r = 8 * k..8 * k + 8;
        let m = grid.index(&l[r.clone()]);
        index[k] = if m >= 0 {
            m as usize
        } else {
            all_on_grid = false;
            grid.best_neighbour_of_values(m, &xb[r.clone()], &weight[r], scale, values(k))
        };
    }
    if !all_on_grid {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for k in 0..groups {
            let (g, xx) = (grid.rows[index[k]], values(k));
            for j in 0..8 {
                let (w, q) = (weight[8 * k + j], xx[((g[j] - 1) / 2) as usize]);
                sumqx += w * q * xb[8 * k + j];
                sumq2 += w * q * q;
            }
        }
        if sumqx > 0.0 && sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    (index, scale)
}

/// ggml's `quantize_row_iq1_s_impl`, which requires an importance matrix: one row `x` (a
/// multiple of 256 values) into IQ1_S under `imatrix` (one weight per column). Per block of 32
/// the best split of its sorted weights into the levels −1, 0, 1, shifted by ±IQ1_DELTA (one
/// shift a block), found exhaustively; groups of eight off the grid take their nearest listed
/// row.
pub fn quantize_iq1_s(x: &[f32], imatrix: &[f32], out: &mut [BlockIq1S]) {
    const BLOCK: usize = 32;
    let grid = iq1_grid();
    let x_p = [-1.0 + IQ1_DELTA, IQ1_DELTA, 1.0 + IQ1_DELTA];
    let x_m = [-1.0 - IQ1_DELTA, -IQ1_DELTA, 1.0 - IQ1_DELTA];
    for (ibl, (xbl, y)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
        *y = BlockIq1S::zeroed();
        let mut qh = [0u16; QK_K / BLOCK];
        let mut scales = [0.0f32; QK_K / BLOCK];
        let mut shifts = [1i32; QK_K / BLOCK];
        let mut max_scale = 0.0f32;
        let sigma2 = 2.0 * sum_of_squares(xbl) / QK_K as f32;
        for ib in 0..QK_K / BLOCK {
            let xb = &xbl[BLOCK * ib..BLOCK * ib + BLOCK];
            let qw = &imatrix[QK_K * ibl + BLOCK * ib..][..BLOCK];
            let weight: [f32; BLOCK] = imatrix_weights(xb, qw, sigma2);
            let max = xb.iter().fold(xb[0].abs(), |m, v| m.max(v.abs()));
            if max < 1e-12 {
                continue;
            }
            let idx = ascending::<BLOCK>(xb);
            let (mut sumx, mut sumw) = ([0.0f32; BLOCK + 1], [0.0f32; BLOCK + 1]);
            for j in 0..BLOCK {
                let i = idx[j];
                sumx[j + 1] = sumx[j] + weight[i] * xb[i];
                sumw[j + 1] = sumw[j] + weight[i];
            }
            let (mut best_score, mut scale) = (-f32::MAX, max);
            let mut best: Option<(usize, usize, i32)> = None;
            for i1 in 0..=BLOCK {
                for i2 in i1..=BLOCK {
                    for (xx, shift) in [(&x_p, 1), (&x_m, -1)] {
                        let sumqx = (sumx[i1] - sumx[0]) * xx[0]
                            + (sumx[i2] - sumx[i1]) * xx[1]
                            + (sumx[BLOCK] - sumx[i2]) * xx[2];
                        let sumq2 = (sumw[i1] - sumw[0]) * xx[0] * xx[0]
                            + (sumw[i2] - sumw[i1]) * xx[1] * xx[1]
                            + (sumw[BLOCK] - sumw[i2]) * xx[2] * xx[2];
                        if sumq2 > 0.0 && sumqx * sumqx > best_score * sumq2 {
                            scale = sumqx / sumq2;
                            best_score = scale * sumqx;
                            best = Some((i1, i2, shift));
                        }
                    }
                }
            }
            let Some((i1, i2, mut shift)) = best else {
                continue;
            };
            let mut l = split_levels::<BLOCK>(&idx, i1, i2);
            if scale < 0.0 {
                for v in &mut l {
                    *v = 2 - *v;
                }
                scale = -scale;
                shift = -shift;
            }
            let xx = if shift == 1 { &x_p } else { &x_m };
            let (index, scale) = iq1_rows(grid, &l, xb, &weight, scale, |_| xx);
            for k in 0..BLOCK / 8 {
                y.qs[(BLOCK / 8) * ib + k] = index[k] as u8;
                qh[ib] |= ((index[k] >> 8) << (3 * k)) as u16;
            }
            scales[ib] = scale;
            shifts[ib] = shift;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale != 0.0 {
            let (d, ls) = scale_indices(&scales, max_scale, 8);
            y.d = crate::float::f32_to_f16(d * 1.125).to_le_bytes();
            for ib in 0..QK_K / BLOCK {
                let mut l = ls[ib];
                if shifts[ib] == -1 {
                    l |= 8;
                }
                qh[ib] |= (l as u16) << 12;
            }
        }
        for (dst, v) in y.qh.chunks_exact_mut(2).zip(qh) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Σ w·x·q and Σ w·q² for the odd values q = 2l + 1, in ggml's order.
fn sums<const B: usize>(weight: &[f32; B], xval: &[f32; B], l: &[i8; B]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for i in 0..B {
        let (w, q) = (weight[i], (2 * l[i] as i32 + 1) as f32);
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iq_grid::{
        dequantize_iq1_m, dequantize_iq1_s, dequantize_iq2_s, dequantize_iq2_xs,
        dequantize_iq2_xxs, dequantize_iq3_s, dequantize_iq3_xxs,
    };
    use bytemuck::Zeroable;

    /// The committed input: 16 rows of 512 values (normal, scaled down, with outliers,
    /// uniform, a zero block of 32 and a zero super-block).
    fn input() -> Vec<f32> {
        include_bytes!("../tests/data/grid.input.f32")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    /// Fresh roughly normal values (a sum of four uniforms), seeded from the clock.
    fn fresh(n: usize) -> Vec<f32> {
        let mut s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("seed {s}");
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (0..4)
                    .map(|k| ((s >> (16 * k)) & 0xffff) as f32 / 65536.0 - 0.5)
                    .sum::<f32>()
            })
            .collect()
    }

    fn relative_rms(x: &[f32], y: &[f32]) -> f32 {
        let err: f32 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
        let norm: f32 = x.iter().map(|a| a * a).sum();
        (err / norm).sqrt()
    }

    fn assert_blocks_equal(ours: &[u8], want: &[u8], block: usize, ty: &str) {
        assert_eq!(ours.len(), want.len());
        for (i, (a, b)) in ours.chunks(block).zip(want.chunks(block)).enumerate() {
            assert_eq!(a, b, "{ty} block {i} differs from ggml's");
        }
    }

    /// What ggml writes for the committed input: its `ggml_quantize_chunk` without an
    /// importance matrix, run on llama.cpp's libggml-base (the source vendored in
    /// llama-cpp-python 0.3.36) by scripts/ggml-quantize-rows.c (types 18, 21, 22 and 29;
    /// 16, 17 and 19 with the committed importance matrix).
    #[test]
    fn grid_quantizers_write_ggml_s_bytes() {
        let x = input();
        let blank = BlockIq3Xxs::zeroed();
        let mut xxs = vec![blank; x.len() / QK_K];
        quantize_iq3_xxs(&x, &mut xxs);
        let want = include_bytes!("../tests/data/iq3_xxs.ggml.bin");
        assert_blocks_equal(bytemuck::cast_slice(&xxs), want, 98, "IQ3_XXS");
        let mut s = vec![BlockIq3S::zeroed(); x.len() / QK_K];
        quantize_iq3_s(&x, &mut s);
        let want = include_bytes!("../tests/data/iq3_s.ggml.bin");
        assert_blocks_equal(bytemuck::cast_slice(&s), want, 110, "IQ3_S");
        let mut s2 = vec![BlockIq2S::zeroed(); x.len() / QK_K];
        quantize_iq2_s(&x, &mut s2);
        let want = include_bytes!("../tests/data/iq2_s.ggml.bin");
        assert_blocks_equal(bytemuck::cast_slice(&s2), want, 82, "IQ2_S");
        let mut m1 = vec![BlockIq1M::zeroed(); x.len() / QK_K];
        quantize_iq1_m(&x, &mut m1);
        let want = include_bytes!("../tests/data/iq1_m.ggml.bin");
        assert_blocks_equal(bytemuck::cast_slice(&m1), want, 56, "IQ1_M");
        // IQ2_XXS needs an importance matrix: the committed one (positive, every 37th ×10).
        let imatrix: Vec<f32> = include_bytes!("../tests/data/grid.imatrix.f32")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let row = imatrix.len();
        let mut xx = vec![BlockIq2Xxs::zeroed(); x.len() / QK_K];
        for (xr, out) in x.chunks_exact(row).zip(xx.chunks_exact_mut(row / QK_K)) {
            quantize_iq2_xxs(xr, &imatrix, out);
        }
        let want = include_bytes!("../tests/data/iq2_xxs.ggml.bin");
        assert_blocks_equal(bytemuck::cast_slice(&xx), want, 66, "IQ2_XXS");
        let mut xs = vec![BlockIq2Xs::zeroed(); x.len() / QK_K];
        for (xr, out) in x.chunks_exact(row).zip(xs.chunks_exact_mut(row / QK_K)) {
            quantize_iq2_xs(xr, &imatrix, out);
        }
        let want = include_bytes!("../tests/data/iq2_xs.ggml.bin");
        assert_blocks_equal(bytemuck::cast_slice(&xs), want, 74, "IQ2_XS");
        let mut s1 = vec![BlockIq1S::zeroed(); x.len() / QK_K];
        for (xr, out) in x.chunks_exact(row).zip(s1.chunks_exact_mut(row / QK_K)) {
            quantize_iq1_s(xr, &imatrix, out);
        }
        let want = include_bytes!("../tests/data/iq1_s.ggml.bin");
        assert_blocks_equal(bytemuck::cast_slice(&s1), want, 50, "IQ1_S");
    }

    /// Each grid's map names every row by its levels, and every pattern off the grid has
    /// neighbours, each of them a row.
    #[test]
    fn every_level_pattern_has_a_row_or_neighbours() {
        fn check<const N: usize>(grid: &Grid<N>, rows: usize) {
            assert_eq!(grid.rows.len(), rows);
            assert_eq!(grid.map.iter().filter(|&&m| m >= 0).count(), rows);
            for (u, &m) in grid.map.iter().enumerate() {
                if m >= 0 {
                    let levels = grid.rows[m as usize].map(|v| (v - 1) / 2);
                    assert_eq!(pattern(&levels, Grid::<N>::BITS), u);
                } else {
                    let list = &grid.neighbours[(-m - 1) as usize..];
                    assert!(list[0] > 0, "pattern {u} has no neighbours");
                    let n = list[0] as usize;
                    assert!(list[1..=n].iter().all(|&j| (j as usize) < rows));
                }
            }
        }
        check(iq3xxs_grid(), 256);
        check(iq3s_grid(), 512);
        check(iq2s_grid(), 1024);
        check(iq1_grid(), 2048);
        check(iq2xxs_grid(), 256);
        check(iq2xs_grid(), 512);
    }

    /// Fresh random rows round-trip within each type's error: relative RMS error below 0.25
    /// for IQ3_XXS (3.06 bits a weight), 0.2 for IQ3_S (3.44), 0.4 for IQ2_S (2.56) and 0.7
    /// for IQ1_M (1.75); ggml's own bytes for such rows without an importance matrix sit at
    /// 0.21, ~0.17, ~0.26 and ~0.55 (the same bytes for IQ1_M: 0.55 and 0.58 in two runs).
    /// IQ2_XXS (2.06), IQ2_XS (2.31) and IQ1_S (1.56) under a flat importance matrix: below
    /// 0.45, 0.4 and 0.7 (0.33-0.34, 0.29-0.30 and 0.48-0.49 in two runs, the bytes ggml
    /// writes).
    /// Zeros stay zero.
    #[test]
    fn quantized_rows_dequantize_near_the_input() {
        let x = fresh(4 * QK_K);
        let mut y = vec![0.0f32; x.len()];
        let mut q = vec![BlockIq3Xxs::zeroed(); 4];
        quantize_iq3_xxs(&x, &mut q);
        dequantize_iq3_xxs(&q, &mut y);
        assert!(
            relative_rms(&x, &y) < 0.25,
            "IQ3_XXS {}",
            relative_rms(&x, &y)
        );
        let mut q = vec![BlockIq3S::zeroed(); 4];
        quantize_iq3_s(&x, &mut q);
        dequantize_iq3_s(&q, &mut y);
        assert!(relative_rms(&x, &y) < 0.2, "IQ3_S {}", relative_rms(&x, &y));
        let mut q = vec![BlockIq2S::zeroed(); 4];
        quantize_iq2_s(&x, &mut q);
        dequantize_iq2_s(&q, &mut y);
        assert!(relative_rms(&x, &y) < 0.4, "IQ2_S {}", relative_rms(&x, &y));
        let mut q = vec![BlockIq1M::zeroed(); 4];
        quantize_iq1_m(&x, &mut q);
        dequantize_iq1_m(&q, &mut y);
        assert!(relative_rms(&x, &y) < 0.7, "IQ1_M {}", relative_rms(&x, &y));
        // The importance-matrix types under a flat matrix.
        let flat = vec![1.0f32; x.len()];
        let mut q = vec![BlockIq2Xxs::zeroed(); 4];
        quantize_iq2_xxs(&x, &flat, &mut q);
        dequantize_iq2_xxs(&q, &mut y);
        assert!(
            relative_rms(&x, &y) < 0.45,
            "IQ2_XXS {}",
            relative_rms(&x, &y)
        );
        let mut q = vec![BlockIq2Xs::zeroed(); 4];
        quantize_iq2_xs(&x, &flat, &mut q);
        dequantize_iq2_xs(&q, &mut y);
        assert!(
            relative_rms(&x, &y) < 0.4,
            "IQ2_XS {}",
            relative_rms(&x, &y)
        );
        let mut q = vec![BlockIq1S::zeroed(); 4];
        quantize_iq1_s(&x, &flat, &mut q);
        dequantize_iq1_s(&q, &mut y);
        assert!(relative_rms(&x, &y) < 0.7, "IQ1_S {}", relative_rms(&x, &y));
        let (mut z, mut zs) = ([BlockIq3Xxs::zeroed()], [BlockIq3S::zeroed()]);
        quantize_iq3_xxs(&[0.0; QK_K], &mut z);
        quantize_iq3_s(&[0.0; QK_K], &mut zs);
        assert!(bytemuck::bytes_of(&z[0]).iter().all(|&b| b == 0));
        assert!(bytemuck::bytes_of(&zs[0]).iter().all(|&b| b == 0));
    }
}
