//! Reference quantizers of the grid i-quants, transcriptions of ggml's (the bytes llama-quantize
//! writes without an importance matrix, float operations in ggml's order; ggml-base is
//! compiled without FMA contraction, so none is used here): IQ3_XXS. A group of four weights
//! (their magnitudes; an even number of signs flipped per eight, the cheapest one where odd)
//! must land on a row of the grid: candidate scales are tried, each group's nearest levels
//! looked up in a map of the 4096 level patterns, and a pattern off the grid replaced by the
//! best of its nearest grid rows (precomputed per pattern, as ggml's `iq3xs_init_impl` does).

// The quantizers walk groups by index, as ggml's do.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use crate::iq_grid::BlockIq3Xxs;
use crate::iq_tables::IQ3XXS_GRID;
use crate::kquants::{nearest_int, QK_K};

/// A group's levels 0..7 per weight packed three bits each: the map's index.
fn pattern(levels: &[i8]) -> usize {
    levels
        .iter()
        .enumerate()
        .fold(0, |u, (i, &l)| u | ((l as usize) << (3 * i)))
}

/// The values of IQ3XXS_GRID's bytes, level l at index l.
const LEVEL_VALUES: [u8; 8] = [4, 12, 20, 28, 36, 44, 52, 62];

/// The grid's row `j` as the quantizer sees it: four odd values 2l + 1 of the levels l its
/// bytes stand for (ggml builds this grid from its own table of level patterns, in the same
/// row order as the dequantizer's IQ3XXS_GRID).
fn row(j: usize) -> [i8; 4] {
    IQ3XXS_GRID[j].to_le_bytes().map(|b| {
        let l = LEVEL_VALUES.iter().position(|&v| v == b).unwrap_or(0);
        2 * l as i8 + 1
    })
}

/// For each of the 4096 level patterns of a group of four: its grid row (≥ 0), or −(offset + 1)
/// of its entry in `neighbours`: a count n, then the n rows nearest to it (every row at the
/// smallest two squared distances, by distance then row).
struct Tables {
    map: Vec<i32>,
    neighbours: Vec<u16>,
}

fn iq3xxs_tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        const DISTANCES_WANTED: usize = 2;
        let mut map = vec![-1i32; 4096];
        for j in 0..IQ3XXS_GRID.len() {
            let levels = row(j).map(|v| (v - 1) / 2);
            map[pattern(&levels)] = j as i32;
        }
        let mut neighbours = Vec::new();
        for i in 0..4096 {
            if map[i] >= 0 {
                continue;
            }
            let pos: [i32; 4] = std::array::from_fn(|k| 2 * ((i >> (3 * k)) & 7) as i32 + 1);
            let mut dist: Vec<(i32, usize)> = (0..IQ3XXS_GRID.len())
                .map(|j| {
                    let d2 = row(j)
                        .iter()
                        .zip(&pos)
                        .map(|(&g, &p)| (g as i32 - p) * (g as i32 - p))
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
                    if have == DISTANCES_WANTED {
                        break;
                    }
                    d2 = d;
                    have += 1;
                }
                neighbours.push(j as u16);
            }
            neighbours[at] = (neighbours.len() - at - 1) as u16;
        }
        Tables { map, neighbours }
    })
}

/// ggml's `iq3_find_best_neighbour`: of the rows listed at `list` (count first), the one whose
/// values times `scale` are nearest to `xval` under `weight`; its levels into `l`.
fn best_neighbour(list: &[u16], xval: &[f32], weight: &[f32], scale: f32, l: &mut [i8]) -> usize {
    let n = list[0] as usize;
    let (mut best_d2, mut best) = (f32::MAX, usize::MAX);
    for &j in &list[1..=n] {
        let g = row(j as usize);
        let mut d2 = 0.0f32;
        for i in 0..4 {
            let diff = scale * g[i] as f32 - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if d2 < best_d2 {
            best_d2 = d2;
            best = j as usize;
        }
    }
    let g = row(best);
    for i in 0..4 {
        l[i] = (g[i] - 1) / 2;
    }
    best
}

/// ggml's `GROUP_MAX_EPS_IQ3_XXS`: a block of 32 whose largest magnitude is below it is zero.
const GROUP_MAX_EPS: f32 = 1e-8;

/// ggml's `quantize_row_iq3_xxs_ref`: x (a multiple of 256 values) into IQ3_XXS blocks.
pub fn quantize_iq3_xxs(x: &[f32], out: &mut [BlockIq3Xxs]) {
    const K_MAX_Q: i32 = 8;
    let t = iq3xxs_tables();
    let grid_of = |l: &[i8]| t.map[pattern(l)];
    let neighbours_of = |m: i32| &t.neighbours[(-m - 1) as usize..];
    for (xbl, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut q3 = [0u8; 96];
        let mut scales = [0.0f32; QK_K / 32];
        let mut max_scale = 0.0f32;
        for ib in 0..QK_K / 32 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            let weight: [f32; 32] = std::array::from_fn(|i| xb[i] * xb[i]);
            let waux: [f32; 32] = std::array::from_fn(|i| weight[i].sqrt());
            let mut xval = [0.0f32; 32];
            let mut block_signs = [0u32; 4];
            for k in 0..4 {
                let (mut nflip, mut s) = (0, 0u32);
                for i in 0..8 {
                    let v = xb[8 * k + i];
                    if v >= 0.0 {
                        xval[8 * k + i] = v;
                    } else {
                        xval[8 * k + i] = -v;
                        nflip += 1;
                        s |= 1 << i;
                    }
                }
                if nflip % 2 == 1 {
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
            let mut max = xval[0];
            for &v in &xval[1..] {
                max = if max > v { max } else { v };
            }
            let mut l = [0i8; 32];
            if max < GROUP_MAX_EPS {
                scales[ib] = 0.0;
                continue;
            }
            let mut best = 0.0f32;
            let mut scale = max / (2 * K_MAX_Q - 1) as f32;
            let mut on_grid = [true; 8];
            for is in -15..=15 {
                let id = ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.2) / max;
                let this_scale = 1.0 / id;
                let mut laux = [0i8; 32];
                let mut on_grid_aux = [true; 8];
                for k in 0..8 {
                    for i in 0..4 {
                        let q = nearest_int(0.5 * (id * xval[4 * k + i] - 1.0));
                        laux[4 * k + i] = q.clamp(0, K_MAX_Q - 1) as i8;
                    }
                    let m = grid_of(&laux[4 * k..4 * k + 4]);
                    if m < 0 {
                        on_grid_aux[k] = false;
                        let r = 4 * k..4 * k + 4;
                        best_neighbour(
                            neighbours_of(m),
                            &xval[r.clone()],
                            &waux[r.clone()],
                            this_scale,
                            &mut laux[r],
                        );
                    }
                }
                let (sumqx, sumq2) = sums(&weight, &xval, &laux);
                if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    l = laux;
                    on_grid = on_grid_aux;
                }
            }
            if on_grid.contains(&false) && scale > 0.0 {
                let id = 1.0 / scale;
                for k in 0..8 {
                    if on_grid[k] {
                        continue;
                    }
                    let r = 4 * k..4 * k + 4;
                    for i in r.clone() {
                        l[i] = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, K_MAX_Q - 1) as i8;
                    }
                    let mut m = grid_of(&l[r.clone()]);
                    if m < 0 {
                        let list = neighbours_of(m);
                        m = best_neighbour(
                            list,
                            &xval[r.clone()],
                            &waux[r.clone()],
                            scale,
                            &mut [0; 4],
                        ) as i32;
                    }
                    let g = row(m as usize);
                    for i in 0..4 {
                        l[4 * k + i] = (g[i] - 1) / 2;
                    }
                }
                let (sumqx, sumq2) = sums(&weight, &xval, &l);
                if sumq2 > 0.0 {
                    scale = sumqx / sumq2;
                }
            }
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s & 127;
                }
            }
            for k in 0..8 {
                let m = grid_of(&l[4 * k..4 * k + 4]);
                debug_assert!(m >= 0, "a group's levels are off the grid");
                q3[8 * ib + k] = m.max(0) as u8;
            }
            let signs =
                block_signs[0] | block_signs[1] << 7 | block_signs[2] << 14 | block_signs[3] << 21;
            q3[64 + 4 * ib..68 + 4 * ib].copy_from_slice(&signs.to_le_bytes());
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            *b = BlockIq3Xxs {
                d: [0; 2],
                qs: [0; 64],
                scales: [0; 32],
            };
            continue;
        }
        let d = max_scale / 31.0;
        b.d = crate::float::f32_to_f16(d * 1.0125).to_le_bytes();
        let id = 1.0 / d;
        for ib in 0..QK_K / 32 {
            let s = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15) as u32;
            let at = 64 + 4 * ib;
            let v = u32::from_le_bytes(q3[at..at + 4].try_into().unwrap()) | s << 28;
            q3[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        b.qs.copy_from_slice(&q3[..64]);
        b.scales.copy_from_slice(&q3[64..]);
    }
}

/// Σ w·x·q and Σ w·q² for the odd values q = 2l + 1, in ggml's order.
fn sums(weight: &[f32; 32], xval: &[f32; 32], l: &[i8; 32]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for i in 0..32 {
        let (w, q) = (weight[i], (2 * l[i] as i32 + 1) as f32);
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iq_grid::dequantize_iq3_xxs;

    /// What ggml writes for 16 rows of 512 values (normal, scaled down, with outliers, uniform,
    /// a zero block of 32 and a zero super-block): its `ggml_quantize_chunk` without an
    /// importance matrix, run on llama.cpp's libggml-base (the source vendored in
    /// llama-cpp-python 0.3.36) by a ten-line C caller, on the committed input.
    #[test]
    fn iq3_xxs_writes_ggml_s_bytes() {
        let input = include_bytes!("../tests/data/iq3_xxs.input.f32");
        let want = include_bytes!("../tests/data/iq3_xxs.ggml.bin");
        let x: Vec<f32> = input
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut ours = vec![
            BlockIq3Xxs {
                d: [0; 2],
                qs: [0; 64],
                scales: [0; 32]
            };
            x.len() / QK_K
        ];
        quantize_iq3_xxs(&x, &mut ours);
        let ours: &[u8] = bytemuck::cast_slice(&ours);
        assert_eq!(ours.len(), want.len());
        for (i, (a, b)) in ours.chunks(98).zip(want.chunks(98)).enumerate() {
            assert_eq!(a, b, "block {i} differs from ggml's");
        }
    }

    /// The map names every grid row by its levels, and every pattern off the grid has
    /// neighbours, each of them a grid row.
    #[test]
    fn every_level_pattern_has_a_row_or_neighbours() {
        let t = iq3xxs_tables();
        let on: usize = t.map.iter().filter(|&&m| m >= 0).count();
        assert_eq!(on, IQ3XXS_GRID.len());
        for (u, &m) in t.map.iter().enumerate() {
            if m >= 0 {
                let levels = row(m as usize).map(|v| (v - 1) / 2);
                assert_eq!(pattern(&levels), u);
            } else {
                let list = &t.neighbours[(-m - 1) as usize..];
                assert!(list[0] > 0, "pattern {u} has no neighbours");
                assert!(list[1..=list[0] as usize]
                    .iter()
                    .all(|&j| (j as usize) < IQ3XXS_GRID.len()));
            }
        }
    }

    /// Fresh random rows round-trip within IQ3_XXS's error: relative RMS error below 0.25
    /// (3.06 bits a weight; ggml's own bytes for such rows sit at 0.20-0.22, without an
    /// importance matrix), and zeros stay zero.
    #[test]
    fn quantized_rows_dequantize_near_the_input() {
        let mut s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("seed {s}");
        let x: Vec<f32> = (0..4 * QK_K)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // A sum of uniforms: roughly normal.
                (0..4)
                    .map(|k| ((s >> (16 * k)) & 0xffff) as f32 / 65536.0 - 0.5)
                    .sum::<f32>()
            })
            .collect();
        let blank = BlockIq3Xxs {
            d: [0; 2],
            qs: [0; 64],
            scales: [0; 32],
        };
        let mut q = vec![blank; 4];
        quantize_iq3_xxs(&x, &mut q);
        let mut y = vec![0.0f32; x.len()];
        dequantize_iq3_xxs(&q, &mut y);
        let err: f32 = x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
        let norm: f32 = x.iter().map(|a| a * a).sum();
        assert!(
            (err / norm).sqrt() < 0.25,
            "relative RMS error {}",
            (err / norm).sqrt()
        );
        let mut z = vec![blank; 1];
        quantize_iq3_xxs(&[0.0; QK_K], &mut z);
        assert_eq!(bytemuck::bytes_of(&z[0]), &[0u8; 98][..]);
    }
}
