//! Causal grouped-query attention over a per-sequence KV cache, optionally limited to a sliding
//! window of recent positions and with a per-head sink logit (gpt-oss).
//!
//! Normal precision mirrors llama.cpp's F16 cache without flash attention: K and V are stored
//! as f16, and the query and the softmax weights meet them rounded to f16. Exact precision
//! keeps everything in f32. Heads run in parallel on the calling rayon pool.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::cpu::round_f16_slice;
use super::state::{KvRows, LayerState};
use ggrun_quants::float::{DotTilesFn, KvElem, K_TILE};

/// Shape of one attention layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding-window layers: a token sees itself and the `window − 1` positions before it.
    pub window: Option<usize>,
}

/// Bytes of a CPU cache for `n_ctx` positions (K and V, f16 or f32 values, whole K tiles).
pub fn cache_bytes(shape: &AttnShape, n_ctx: usize, f16: bool) -> u64 {
    let elem = if f16 { 2 } else { 4 };
    let positions = n_ctx.next_multiple_of(K_TILE) as u64;
    2 * (shape.n_head_kv * shape.head_dim) as u64 * positions * elem
}

/// A fresh cache for `n_ctx` positions; an error, not an abort, when memory for it cannot be
/// had (its pages are the OS's zero pages until written).
pub fn new_cache(shape: &AttnShape, n_ctx: usize, f16: bool) -> Result<LayerState> {
    let row = shape.n_head_kv * shape.head_dim;
    // K in tile layout holds whole tiles; V as many positions (the same allocation size).
    let positions = n_ctx.next_multiple_of(K_TILE);
    let zeros = || -> Result<KvRows> {
        row.checked_mul(positions)
            .and_then(|n| KvRows::zeroed(n, f16))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "cannot allocate a {:.1} GiB KV cache for {n_ctx} tokens (lower -c/--ctx-size)",
                    cache_bytes(shape, n_ctx, f16) as f64 / (1u64 << 30) as f64
                )
            })
    };
    Ok(LayerState::Attention {
        k: zeros()?,
        v: zeros()?,
        len: 0,
        row,
        capacity: n_ctx,
        k_tiled: true,
    })
}

/// [`attend`] for the rows of several sequences in one pass: sequence i owns rows `segs[i]` of
/// `q`, `k` and `v` and attends over its own cache `states[i]`. Returns the outputs in row order.
/// `sinks`: one logit per query head that joins every softmax's denominator (gpt-oss).
#[allow(clippy::too_many_arguments)]
pub fn attend_each(
    states: &mut [&mut LayerState],
    segs: &[std::ops::Range<usize>],
    s: &AttnShape,
    sinks: Option<&[f32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<Vec<f32>> {
    let (qd, kd) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
    let t = segs.last().map_or(0, |r| r.end);
    let mut out = Vec::with_capacity(t * qd);
    for (st, r) in states.iter_mut().zip(segs) {
        out.extend(attend(
            st,
            s,
            sinks,
            &q[r.start * qd..r.end * qd],
            &k[r.start * kd..r.end * kd],
            &v[r.start * kd..r.end * kd],
            r.len(),
        )?);
    }
    Ok(out)
}

/// Scores (q·k) into attention weights in place: scaled, exponentiated against their maximum
/// (Cephes' exp, eight lanes at a time where the tier has SIMD: within 2 ulp of e^x),
/// normalised by their sum (taken in f64, in position order), and rounded to f16 when the
/// cache is f16 (where llama.cpp's weights meet an f16 V). A sink logit joins the maximum and
/// the sum but has no value row. Separate passes, so that the scaling and the maximum
/// vectorize and the sum stays in a register (a call to exp in the same loop spilled it to the
/// stack every position).
fn softmax_weights(
    sc: &mut [f32],
    scale: f32,
    sink: Option<f32>,
    f16: bool,
    exp_shifted: ggrun_quants::float::ExpShiftedFn,
) {
    for x in sc.iter_mut() {
        *x *= scale;
    }
    let max = max_of(sc).max(sink.unwrap_or(f32::NEG_INFINITY));
    exp_shifted(sc, max);
    let sink = sink.map_or(0.0, |z| ggrun_quants::float::exp_cephes(z - max) as f64);
    let sum: f64 = sc.iter().map(|&x| x as f64).sum::<f64>() + sink;
    let inv = (1.0 / sum) as f32;
    for x in sc.iter_mut() {
        *x *= inv;
    }
    if f16 {
        round_f16_slice(sc);
    }
}

/// The largest value (−∞ for none), eight lanes at a time.
fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, x) in lanes.iter_mut().zip(c) {
            *m = m.max(*x);
        }
    }
    lanes
        .into_iter()
        .chain(tail.iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Appends `t` tokens' k and v (t × n_head_kv·head_dim each) and returns the attention output
/// (t × n_head·head_dim) for queries `q` (t × n_head·head_dim) at the new positions; `sinks` as
/// in [`attend_each`].
pub fn attend(
    state: &mut LayerState,
    s: &AttnShape,
    sinks: Option<&[f32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
) -> Result<Vec<f32>> {
    let LayerState::Attention {
        k: kc,
        v: vc,
        len,
        row,
        capacity,
        k_tiled: true,
    } = state
    else {
        bail!("layer state is not a CPU attention cache");
    };
    let row = *row;
    if *len + t > *capacity {
        bail!("context is full ({} tokens): raise -c/--ctx-size", capacity);
    }
    let past = *len;
    kc.write_rows(past, row, true, k);
    vc.write_rows(past, row, false, v);
    *len += t;
    match (&*kc, &*vc) {
        (KvRows::F32(kc), KvRows::F32(vc)) => Ok(attend_rows(kc, vc, row, past, s, sinks, q, t)),
        (KvRows::F16(kc), KvRows::F16(vc)) => Ok(attend_rows(kc, vc, row, past, s, sinks, q, t)),
        _ => bail!("a KV cache holds K and V in different types"),
    }
}

/// The attention of `t` new queries over `past + t` cached positions of K and V rows of `T`
/// (f16 rows: the query and the softmax weights rounded to f16 as they meet them).
///
/// The query heads of one KV head (a GQA group) share every K and V row load. A decode step
/// (`t` = 1) over a long cache splits its work three ways so that every thread streams its own
/// part of the cache: scores over runs of positions, then each head's softmax, then value sums
/// over slices of the head's columns. Every path computes each score and each output element
/// in the same order, so they agree bit for bit.
#[allow(clippy::too_many_arguments)]
fn attend_rows<T: KvElem>(
    kc: &[T],
    vc: &[T],
    row: usize,
    past: usize,
    s: &AttnShape,
    sinks: Option<&[f32]>,
    q: &[f32],
    t: usize,
) -> Vec<f32> {
    if t == 1 && past + 1 >= SPLIT_DECODE_AT {
        return attend_one_split(kc, vc, row, past, s, sinks, q);
    }
    let f16 = T::F16;
    let (nh, hd) = (s.n_head, s.head_dim);
    // SIMD kernels of the active tier: q·k for eight positions at once (each summed in d
    // order, which reproduces llama.cpp's greedy continuations), and the value accumulation
    // over all positions with the outputs in registers.
    let dot = ggrun_quants::float::dot_tiles_fn::<T>();
    let weighted_rows = ggrun_quants::float::weighted_rows_fn::<T>();
    let exp_shifted = ggrun_quants::float::exp_shifted_fn();
    let group = nh / s.n_head_kv;
    // Tasks: the query heads of one KV head (up to four in prefill) over a run of tokens.
    let heads = if t > 1 { group.min(4) } else { group };
    const TOKENS_PER_TASK: usize = 16;
    // (first head, heads, first token), the heads all of one KV head.
    let tasks: Vec<(usize, usize, usize)> = (0..s.n_head_kv)
        .flat_map(|kvh| {
            (0..group).step_by(heads).flat_map(move |j0| {
                let (h0, g) = (kvh * group + j0, heads.min(group - j0));
                (0..t).step_by(TOKENS_PER_TASK).map(move |t0| (h0, g, t0))
            })
        })
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(h0, g, t0)| {
            let kvh = h0 / group;
            let t1 = (t0 + TOKENS_PER_TASK).min(t);
            let mut o = vec![0f32; (t1 - t0) * g * hd];
            let mut scores = vec![0f32; g * (past + t1)];
            let mut scratch = Vec::new();
            let mut qg = vec![0f32; g * hd];
            for ti in t0..t1 {
                // Positions first..end: all before and at this token, or the window's.
                let end = past + ti + 1;
                let first = s.window.map_or(0, |w| end.saturating_sub(w));
                let n = end - first;
                qg.copy_from_slice(&q[(ti * nh + h0) * hd..(ti * nh + h0 + g) * hd]);
                if f16 {
                    round_f16_slice(&mut qg);
                }
                let sc_all = &mut scores[..g * n];
                tile_scores(
                    dot,
                    kc,
                    row,
                    kvh * hd,
                    &qg,
                    hd,
                    first..end,
                    sc_all,
                    &mut scratch,
                );
                for (j, sc) in sc_all.chunks_mut(n).enumerate() {
                    softmax_weights(sc, s.scale, sinks.map(|z| z[h0 + j]), f16, exp_shifted);
                }
                let at = (ti - t0) * g * hd;
                let o = &mut o[at..at + g * hd];
                weighted_rows(o, sc_all, g, &vc[first * row + kvh * hd..], row);
            }
            o
        })
        .collect();
    let mut out = vec![0f32; t * nh * hd];
    for (&(h0, g, t0), o) in tasks.iter().zip(&results) {
        let t1 = (t0 + TOKENS_PER_TASK).min(t);
        for ti in t0..t1 {
            let src = &o[(ti - t0) * g * hd..(ti - t0 + 1) * g * hd];
            out[(ti * nh + h0) * hd..(ti * nh + h0 + g) * hd].copy_from_slice(src);
        }
    }
    out
}

/// The scores of queries `qg` (the heads of one KV head, `hd` values each) at positions `at`
/// over a K cache in tile layout, the KV head's columns from `col`: each head's `at.len()`
/// scores in `out`, heads `at.len()` apart. The kernel computes whole tiles; where `at` does
/// not begin and end on tile boundaries, they go to `scratch` and the positions outside `at`
/// are dropped.
#[allow(clippy::too_many_arguments)]
fn tile_scores<T: KvElem>(
    dot: DotTilesFn<T>,
    kc: &[T],
    row: usize,
    col: usize,
    qg: &[f32],
    hd: usize,
    at: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (t0, t1) = (at.start / K_TILE, at.end.div_ceil(K_TILE));
    let (n, whole) = (at.len(), (t1 - t0) * K_TILE);
    let k = &kc[t0 * K_TILE * row..];
    if whole == n {
        return dot(k, row, col, qg, hd, out);
    }
    let g = out.len() / n.max(1);
    scratch.resize(g * whole, 0.0);
    dot(k, row, col, qg, hd, scratch);
    let skip = at.start - t0 * K_TILE;
    for (o, s) in out.chunks_mut(n).zip(scratch.chunks(whole)) {
        o.copy_from_slice(&s[skip..skip + n]);
    }
}

/// Cached positions from which a decode step splits its work over positions and columns
/// rather than KV heads alone (below it, one task per KV head costs less than three rounds of
/// tasks).
const SPLIT_DECODE_AT: usize = 1024;

/// [`attend_rows`] for one new token over a long cache: (1) scores of a GQA group over runs of
/// positions, (2) each head's softmax, (3) the group's value sums over slices of columns, each
/// element over every position in order.
fn attend_one_split<T: KvElem>(
    kc: &[T],
    vc: &[T],
    row: usize,
    past: usize,
    s: &AttnShape,
    sinks: Option<&[f32]>,
    q: &[f32],
) -> Vec<f32> {
    const POSITIONS_PER_TASK: usize = 512;
    const COLUMNS_PER_TASK: usize = 32;
    let (nh, nkv, hd) = (s.n_head, s.n_head_kv, s.head_dim);
    let group = nh / nkv;
    let end = past + 1;
    let first = s.window.map_or(0, |w| end.saturating_sub(w));
    let n = end - first;
    let dot = ggrun_quants::float::dot_tiles_fn::<T>();
    let weighted_rows = ggrun_quants::float::weighted_rows_fn::<T>();
    let exp_shifted = ggrun_quants::float::exp_shifted_fn();
    let mut qr = q[..nh * hd].to_vec();
    if T::F16 {
        round_f16_slice(&mut qr);
    }
    let runs = n.div_ceil(POSITIONS_PER_TASK);
    let score_tasks: Vec<(usize, usize)> = (0..nkv)
        .flat_map(|kvh| (0..runs).map(move |r| (kvh, r * POSITIONS_PER_TASK)))
        .collect();
    let parts: Vec<Vec<f32>> = score_tasks
        .par_iter()
        .map(|&(kvh, p0)| {
            let len = POSITIONS_PER_TASK.min(n - p0);
            let mut sc = vec![0f32; group * len];
            let qg = &qr[kvh * group * hd..(kvh + 1) * group * hd];
            let at = first + p0..first + p0 + len;
            tile_scores(dot, kc, row, kvh * hd, qg, hd, at, &mut sc, &mut Vec::new());
            sc
        })
        .collect();
    // Head h's weights are w[h·n..(h+1)·n]; the heads of a KV head are adjacent.
    let mut w = vec![0f32; nh * n];
    for (&(kvh, p0), sc) in score_tasks.iter().zip(&parts) {
        let len = sc.len() / group;
        for (j, run) in sc.chunks(len).enumerate() {
            w[(kvh * group + j) * n + p0..][..len].copy_from_slice(run);
        }
    }
    w.par_chunks_mut(n)
        .enumerate()
        .for_each(|(h, sc)| softmax_weights(sc, s.scale, sinks.map(|z| z[h]), T::F16, exp_shifted));
    let width = if hd.is_multiple_of(COLUMNS_PER_TASK) {
        COLUMNS_PER_TASK
    } else {
        hd
    };
    let value_tasks: Vec<(usize, usize)> = (0..nkv)
        .flat_map(|kvh| (0..hd).step_by(width).map(move |c0| (kvh, c0)))
        .collect();
    let sums: Vec<Vec<f32>> = value_tasks
        .par_iter()
        .map(|&(kvh, c0)| {
            let mut o = vec![0f32; group * width];
            let wg = &w[kvh * group * n..(kvh + 1) * group * n];
            weighted_rows(&mut o, wg, group, &vc[first * row + kvh * hd + c0..], row);
            o
        })
        .collect();
    let mut out = vec![0f32; nh * hd];
    for (&(kvh, c0), o) in value_tasks.iter().zip(&sums) {
        for (j, cols) in o.chunks(width).enumerate() {
            out[(kvh * group + j) * hd + c0..][..width].copy_from_slice(cols);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggrun_quants::float::{dot_rows_scalar, f32_to_f16, weighted_rows_scalar};

    /// One query head at a time with the scalar kernels: what every path must equal bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn reference<T: KvElem>(
        kc: &[T],
        vc: &[T],
        row: usize,
        past: usize,
        s: &AttnShape,
        sinks: Option<&[f32]>,
        q: &[f32],
        t: usize,
    ) -> Vec<f32> {
        let (nh, hd) = (s.n_head, s.head_dim);
        let group = nh / s.n_head_kv;
        let mut out = vec![0f32; t * nh * hd];
        for ti in 0..t {
            let end = past + ti + 1;
            let first = s.window.map_or(0, |w| end.saturating_sub(w));
            let n = end - first;
            for h in 0..nh {
                let kvh = h / group;
                let mut qh = q[(ti * nh + h) * hd..][..hd].to_vec();
                if T::F16 {
                    round_f16_slice(&mut qh);
                }
                let mut sc = vec![0f32; n];
                dot_rows_scalar(&kc[first * row + kvh * hd..], row, &qh, hd, &mut sc);
                let exp = ggrun_quants::float::exp_shifted_scalar;
                softmax_weights(&mut sc, s.scale, sinks.map(|z| z[h]), T::F16, exp);
                let o = &mut out[(ti * nh + h) * hd..][..hd];
                weighted_rows_scalar(o, &sc, 1, &vc[first * row + kvh * hd..], row);
            }
        }
        out
    }

    /// [`attend`] on a fresh cache (f16 or f32) that already holds the first `past` rows of `k`
    /// and `v`, for the `t` rows after them.
    #[allow(clippy::too_many_arguments)]
    fn through_attend(
        s: &AttnShape,
        f16: bool,
        k: &[f32],
        v: &[f32],
        past: usize,
        sinks: Option<&[f32]>,
        q: &[f32],
        t: usize,
    ) -> Vec<f32> {
        let row = s.n_head_kv * s.head_dim;
        let mut cache = new_cache(s, past + t, f16).unwrap();
        let LayerState::Attention {
            k: kc, v: vc, len, ..
        } = &mut cache
        else {
            unreachable!()
        };
        kc.write_rows(0, row, true, &k[..past * row]);
        vc.write_rows(0, row, false, &v[..past * row]);
        *len = past;
        let (k, v) = (&k[past * row..], &v[past * row..]);
        attend(&mut cache, s, sinks, q, k, v, t).unwrap()
    }

    /// Decode at short and long caches (one task per KV head, and the three-way split), and a
    /// prefill chunk, with and without a window and sinks, over f32 and f16 rows: every path
    /// equals the one-head-at-a-time scalar reference bit for bit.
    #[test]
    fn every_path_equals_the_scalar_reference() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for (nh, nkv, hd) in [(9, 3, 64), (8, 2, 40), (4, 4, 32)] {
            for (past, t) in [
                (40, 1),
                (1500, 1),
                (1100, 5),
                (2100, 1),
                (13, 20),
                (1027, 1),
            ] {
                for (window, sink) in [(None, false), (Some(700), true), (Some(9), false)] {
                    let s = AttnShape {
                        n_head: nh,
                        n_head_kv: nkv,
                        head_dim: hd,
                        scale: 1.0 / (hd as f32).sqrt(),
                        window,
                    };
                    let row = nkv * hd;
                    let len = (past + t) * row;
                    let k32: Vec<f32> = (0..len).map(|_| 2.0 * rand()).collect();
                    let v32: Vec<f32> = (0..len).map(|_| rand()).collect();
                    let q: Vec<f32> = (0..t * nh * hd).map(|_| 2.0 * rand()).collect();
                    let sinks: Vec<f32> = (0..nh).map(|_| rand()).collect();
                    let sinks = sink.then_some(&sinks[..]);
                    let got = through_attend(&s, false, &k32, &v32, past, sinks, &q, t);
                    let want = reference(&k32, &v32, row, past, &s, sinks, &q, t);
                    assert!(got == want, "f32 {nh}/{nkv}×{hd} past {past} t {t}");
                    let k16: Vec<u16> = k32.iter().map(|&x| f32_to_f16(x)).collect();
                    let v16: Vec<u16> = v32.iter().map(|&x| f32_to_f16(x)).collect();
                    let got = through_attend(&s, true, &k32, &v32, past, sinks, &q, t);
                    let want = reference(&k16, &v16, row, past, &s, sinks, &q, t);
                    assert!(got == want, "f16 {nh}/{nkv}×{hd} past {past} t {t}");
                }
            }
        }
    }

    #[test]
    fn the_lane_maximum_is_the_maximum() {
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
        for n in 1..40 {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 + n * 31) % 97) as f32 - 60.5)
                .collect();
            let want = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&xs), want, "{xs:?}");
        }
    }
}
