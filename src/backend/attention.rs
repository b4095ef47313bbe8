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
use ggrun_quants::float::KvElem;

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

/// Bytes of a cache for `n_ctx` positions (K and V, f16 or f32 values).
pub fn cache_bytes(shape: &AttnShape, n_ctx: usize, f16: bool) -> u64 {
    let elem = if f16 { 2 } else { 4 };
    2 * (shape.n_head_kv * shape.head_dim) as u64 * n_ctx as u64 * elem
}

/// A fresh cache for `n_ctx` positions; an error, not an abort, when memory for it cannot be
/// had (its pages are the OS's zero pages until written).
pub fn new_cache(shape: &AttnShape, n_ctx: usize, f16: bool) -> Result<LayerState> {
    let row = shape.n_head_kv * shape.head_dim;
    let zeros = || -> Result<KvRows> {
        row.checked_mul(n_ctx)
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
    } = state
    else {
        bail!("layer state is not an attention cache");
    };
    let row = *row;
    if *len + t > *capacity {
        bail!("context is full ({} tokens): raise -c/--ctx-size", capacity);
    }
    let past = *len;
    kc.write(past * row, k);
    vc.write(past * row, v);
    *len += t;
    match (&*kc, &*vc) {
        (KvRows::F32(kc), KvRows::F32(vc)) => Ok(attend_rows(kc, vc, row, past, s, sinks, q, t)),
        (KvRows::F16(kc), KvRows::F16(vc)) => Ok(attend_rows(kc, vc, row, past, s, sinks, q, t)),
        _ => bail!("a KV cache holds K and V in different types"),
    }
}

/// The attention of `t` new queries over `past + t` cached positions of K and V rows of `T`
/// (f16 rows: the query and the softmax weights rounded to f16 as they meet them).
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
    let f16 = T::F16;
    let (nh, hd) = (s.n_head, s.head_dim);
    // SIMD kernels of the active tier: q·k for eight positions at once (each summed in d
    // order, which reproduces llama.cpp's greedy continuations), and the value accumulation
    // over all positions with the output in registers.
    let dot_rows = ggrun_quants::float::dot_rows_fn::<T>();
    let weighted_rows = ggrun_quants::float::weighted_rows_fn::<T>();
    let exp_shifted = ggrun_quants::float::exp_shifted_fn();
    let group = nh / s.n_head_kv;
    // Tasks: a few query heads of one KV head (up to four in prefill, so that each K row load
    // serves them all; one in decode, so that every head is its own task) over a run of tokens.
    let heads = if t > 1 { group.min(4) } else { 1 };
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
                dot_rows(&kc[first * row + kvh * hd..], row, &qg, hd, sc_all);
                for (j, sc) in sc_all.chunks_mut(n).enumerate() {
                    softmax_weights(sc, s.scale, sinks.map(|z| z[h0 + j]), f16, exp_shifted);
                    let at = ((ti - t0) * g + j) * hd;
                    weighted_rows(&mut o[at..at + hd], sc, &vc[first * row + kvh * hd..], row);
                }
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

#[cfg(test)]
mod tests {
    use super::max_of;

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
