//! Causal grouped-query attention over a per-sequence KV cache, optionally limited to a sliding
//! window of recent positions and with a per-head sink logit (gpt-oss).
//!
//! Normal precision mirrors llama.cpp's F16 cache without flash attention: K and V are stored
//! as f16, and the query and the softmax weights meet them rounded to f16. Exact precision
//! keeps everything in f32. K and V may also be held as q8_0 or q4_0 blocks (llama.cpp's
//! `-ctk`/`-ctv`, which it runs with flash attention): queries then meet quantized keys as
//! q8_0 rows through the weight kernels' integer dots, and value rows are dequantized and
//! summed in f32 with unrounded weights. Heads run in parallel on the calling rayon pool.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::cpu::round_f16_slice;
use super::state::{KvRows, KvType, KvTypes, LayerState};
use ggrun_quants::float::{DotTilesFn, KvElem, WeightedRowsFn, K_TILE};
use ggrun_quants::{GgmlType, Kernels};

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

/// Positions a K cache of `n_ctx` holds: whole tiles in tile layout (f32 and f16 rows).
fn k_positions(ty: KvType, n_ctx: usize) -> usize {
    match ty.block_type() {
        Some(_) => n_ctx,
        None => n_ctx.next_multiple_of(K_TILE),
    }
}

/// Bytes of a CPU cache for `n_ctx` positions (K and V rows of these types, whole K tiles).
pub fn cache_bytes(shape: &AttnShape, n_ctx: usize, kv: KvTypes) -> u64 {
    let row = shape.n_head_kv * shape.head_dim;
    let k = kv.k.bytes(row, k_positions(kv.k, n_ctx));
    let v = kv.v.bytes(row, n_ctx);
    k.zip(v).map_or(u64::MAX, |(k, v)| k.saturating_add(v))
}

/// A fresh cache for `n_ctx` positions; an error, not an abort, when memory for it cannot be
/// had (its pages are the OS's zero pages until written), or when a block type does not
/// divide the head size.
pub fn new_cache(shape: &AttnShape, n_ctx: usize, kv: KvTypes) -> Result<LayerState> {
    let row = shape.n_head_kv * shape.head_dim;
    for ty in [kv.k, kv.v] {
        if ty.block_type().is_some() && !shape.head_dim.is_multiple_of(32) {
            bail!(
                "a {} KV cache needs a head size that is a multiple of 32 (this model's is {}): use f16",
                ty.name(),
                shape.head_dim
            );
        }
    }
    let no_room = || {
        anyhow::anyhow!(
            "cannot allocate a {:.1} GiB KV cache for {n_ctx} tokens (lower -c/--ctx-size)",
            cache_bytes(shape, n_ctx, kv) as f64 / (1u64 << 30) as f64
        )
    };
    Ok(LayerState::Attention {
        k: KvRows::zeroed(kv.k, row, k_positions(kv.k, n_ctx)).ok_or_else(no_room)?,
        v: KvRows::zeroed(kv.v, row, n_ctx).ok_or_else(no_room)?,
        len: 0,
        row,
        capacity: n_ctx,
        k_tiled: kv.k.block_type().is_none(),
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
        k_tiled,
    } = state
    else {
        bail!("layer state is not a CPU attention cache");
    };
    // The CPU keeps f32 and f16 K in tile layout, block K position after position.
    if *k_tiled == matches!(kc, KvRows::Quant { .. }) {
        bail!("layer state is not a CPU attention cache");
    }
    let row = *row;
    if *len + t > *capacity {
        bail!("context is full ({} tokens): raise -c/--ctx-size", capacity);
    }
    let past = *len;
    let hd = s.head_dim;
    let (k_rot, v_rot) = (k_rotation(kc, hd), v_rotation(vc, hd));
    let rotated = |x: &[f32], n: Option<usize>| {
        n.map(|n| {
            let mut r = x.to_vec();
            hadamard(&mut r, n);
            r
        })
    };
    let (kr, vr, qr) = (rotated(k, k_rot), rotated(v, v_rot), rotated(q, k_rot));
    kc.write_rows(past, row, *k_tiled, kr.as_deref().unwrap_or(k));
    vc.write_rows(past, row, false, vr.as_deref().unwrap_or(v));
    *len += t;
    let step = Step {
        row,
        past,
        s,
        sinks,
        q: qr.as_deref().unwrap_or(q),
        t,
    };
    let mut out = match &*kc {
        KvRows::F32(k) => with_values(&Tiled::new(k), vc, &step),
        KvRows::F16(k) => with_values(&Tiled::new(k), vc, &step),
        KvRows::Quant { ty, data } => with_values(&Blocks::new(*ty, data), vc, &step),
    };
    // The values were rotated: so is their weighted sum; H is its own inverse.
    if let Some(n) = v_rot {
        hadamard(&mut out, n);
    }
    Ok(out)
}

/// llama.cpp rotates keys (and the queries with them) by an orthonormal Walsh–Hadamard matrix
/// before a block cache holds them, which leaves every q·k as it was but spreads a head's
/// outlier channels over its blocks: the rotation's size is the largest power of two from 64
/// up that divides the head size. None: f32 or f16 rows, or a head size not a multiple of 64.
fn k_rotation(rows: &KvRows, hd: usize) -> Option<usize> {
    let quantized = matches!(rows, KvRows::Quant { .. });
    (quantized && hd.is_multiple_of(64)).then(|| {
        let mut n = 64;
        while hd.is_multiple_of(2 * n) {
            n *= 2;
        }
        n
    })
}

/// The same for values, always by 64 (llama.cpp found smaller rotations better for V); the
/// attention output is rotated back.
fn v_rotation(rows: &KvRows, hd: usize) -> Option<usize> {
    (matches!(rows, KvRows::Quant { .. }) && hd.is_multiple_of(64)).then_some(64)
}

/// `x ← H x` for each run of `n` values (`n` a power of two), `H` the orthonormal
/// Walsh–Hadamard matrix in Sylvester order (`H_2s = [[H_s, H_s], [H_s, −H_s]]`, scaled by
/// 1/√n): the in-place butterflies, then one scaling.
fn hadamard(x: &mut [f32], n: usize) {
    let scale = 1.0 / (n as f32).sqrt();
    for c in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (c[j], c[j + h]);
                    c[j] = a + b;
                    c[j + h] = a - b;
                }
            }
            h *= 2;
        }
        for v in c.iter_mut() {
            *v *= scale;
        }
    }
}

/// One attention step's arguments: `t` new queries `q` over `past + t` cached positions of
/// rows of `row` values.
struct Step<'a> {
    row: usize,
    past: usize,
    s: &'a AttnShape,
    sinks: Option<&'a [f32]>,
    q: &'a [f32],
    t: usize,
}

/// [`attend_rows`] over `keys` and the V rows `vc`, whichever their type.
fn with_values<K: Keys>(keys: &K, vc: &KvRows, step: &Step) -> Vec<f32> {
    match vc {
        KvRows::F32(v) => attend_rows(keys, &Plain::new(v), step),
        KvRows::F16(v) => attend_rows(keys, &Plain::new(v), step),
        KvRows::Quant { ty, data } => attend_rows(keys, &Blocks::new(*ty, data), step),
    }
}

/// A cache's K rows as the scores read them.
trait Keys: Sync {
    /// Whether queries are rounded to f16 before they meet these keys.
    const F16_QUERY: bool;

    /// The scores of queries `qg` (the heads of one KV head, `hd` values each) at positions
    /// `at`, the KV head's columns from `col`: each head's `at.len()` scores in `out`, heads
    /// `at.len()` apart.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        &self,
        row: usize,
        col: usize,
        qg: &[f32],
        hd: usize,
        at: std::ops::Range<usize>,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    );
}

/// A cache's V rows as the value sums read them.
trait Values: Sync {
    /// Whether the softmax weights are rounded to f16 before they meet these values (where
    /// llama.cpp's weights meet an f16 V).
    const F16_WEIGHTS: bool;

    /// For each of `heads` heads h: `out_h += Σ_p w_h[p] · V[first + p][col..col + cols]`
    /// (`cols = out.len() / heads`, `n = w.len() / heads` positions), each element summed in
    /// position order.
    fn weighted(
        &self,
        out: &mut [f32],
        w: &[f32],
        heads: usize,
        row: usize,
        first: usize,
        col: usize,
    );
}

/// f32 or f16 K rows in tile layout, read by the tier's eight-position q·k kernel (each score
/// summed in d order, which reproduces llama.cpp's greedy continuations).
struct Tiled<'a, T: KvElem> {
    k: &'a [T],
    dot: DotTilesFn<T>,
}

impl<'a, T: KvElem> Tiled<'a, T> {
    fn new(k: &'a [T]) -> Self {
        Tiled {
            k,
            dot: ggrun_quants::float::dot_tiles_fn::<T>(),
        }
    }
}

impl<T: KvElem> Keys for Tiled<'_, T> {
    const F16_QUERY: bool = T::F16;

    fn scores(
        &self,
        row: usize,
        col: usize,
        qg: &[f32],
        hd: usize,
        at: std::ops::Range<usize>,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        tile_scores(self.dot, self.k, row, col, qg, hd, at, out, scratch)
    }
}

/// f32 or f16 V rows position after position, summed by the tier's kernel (outputs in
/// registers across the positions).
struct Plain<'a, T: KvElem> {
    v: &'a [T],
    weighted: WeightedRowsFn<T>,
}

impl<'a, T: KvElem> Plain<'a, T> {
    fn new(v: &'a [T]) -> Self {
        Plain {
            v,
            weighted: ggrun_quants::float::weighted_rows_fn::<T>(),
        }
    }
}

impl<T: KvElem> Values for Plain<'_, T> {
    const F16_WEIGHTS: bool = T::F16;

    fn weighted(
        &self,
        out: &mut [f32],
        w: &[f32],
        heads: usize,
        row: usize,
        first: usize,
        col: usize,
    ) {
        (self.weighted)(out, w, heads, &self.v[first * row + col..], row)
    }
}

/// K or V rows of a block type (q8_0, q4_0), position after position, read through that
/// type's weight kernels: keys meet the queries quantized to q8_0 in the integer dots
/// (llama.cpp's flash attention does the same), values are dequantized a run of positions at
/// a time and summed by the f32 weighted-rows kernel.
struct Blocks<'a> {
    data: &'a [u8],
    kernels: Kernels,
    /// Bytes of one block of 32 values.
    block: usize,
    weighted: WeightedRowsFn<f32>,
}

impl<'a> Blocks<'a> {
    fn new(ty: GgmlType, data: &'a [u8]) -> Self {
        Blocks {
            data,
            kernels: ggrun_quants::kernels(ty).expect("kernels for a KV block type"),
            block: ty.row_bytes(32).expect("a block type") as usize,
            weighted: ggrun_quants::float::weighted_rows_fn::<f32>(),
        }
    }

    /// The bytes of `cols` values of position `p` from column `col` (both whole blocks).
    fn span(&self, row: usize, p: usize, col: usize, cols: usize) -> &[u8] {
        let rb = row / 32 * self.block;
        &self.data[p * rb + col / 32 * self.block..][..cols / 32 * self.block]
    }
}

impl Keys for Blocks<'_> {
    const F16_QUERY: bool = false;

    fn scores(
        &self,
        row: usize,
        col: usize,
        qg: &[f32],
        hd: usize,
        at: std::ops::Range<usize>,
        out: &mut [f32],
        _scratch: &mut Vec<f32>,
    ) {
        let (g, n) = (qg.len() / hd, at.len());
        let qb = hd / 32 * GgmlType::Q8_0.row_bytes(32).expect("q8_0") as usize;
        let mut qq = vec![0u8; g * qb];
        for (x, b) in qg.chunks_exact(hd).zip(qq.chunks_exact_mut(qb)) {
            (self.kernels.quantize_act)(x, b);
        }
        for (i, p) in at.enumerate() {
            let kr = self.span(row, p, col, hd);
            let head = |j: usize| &qq[j * qb..(j + 1) * qb];
            self.kernels.dots(kr, 0..g, head, |j, v| out[j * n + i] = v);
        }
    }
}

impl Values for Blocks<'_> {
    const F16_WEIGHTS: bool = false;

    fn weighted(
        &self,
        out: &mut [f32],
        w: &[f32],
        heads: usize,
        row: usize,
        first: usize,
        col: usize,
    ) {
        const RUN: usize = 64;
        let heads = heads.max(1);
        let (cols, n) = (out.len() / heads, w.len() / heads);
        if cols == 0 || n == 0 {
            return;
        }
        let mut rows = vec![0f32; RUN * cols];
        let mut wr = vec![0f32; heads * RUN];
        for p0 in (0..n).step_by(RUN) {
            let m = RUN.min(n - p0);
            for (i, dst) in rows.chunks_exact_mut(cols).take(m).enumerate() {
                (self.kernels.dequantize)(self.span(row, first + p0 + i, col, cols), dst);
            }
            for (h, dst) in wr.chunks_exact_mut(m).take(heads).enumerate() {
                dst.copy_from_slice(&w[h * n + p0..h * n + p0 + m]);
            }
            (self.weighted)(out, &wr[..heads * m], heads, &rows[..m * cols], cols);
        }
    }
}

/// The attention of `t` new queries over `past + t` cached positions of `keys` and `values`
/// (f16 rows: the query and the softmax weights rounded to f16 as they meet them).
///
/// The query heads of one KV head (a GQA group) share every K and V row load. A decode step
/// (`t` = 1) over a long cache splits its work three ways so that every thread streams its own
/// part of the cache: scores over runs of positions, then each head's softmax, then value sums
/// over slices of the head's columns. Every path computes each score and each output element
/// in the same order, so they agree bit for bit.
fn attend_rows<K: Keys, V: Values>(keys: &K, values: &V, step: &Step) -> Vec<f32> {
    let &Step {
        row,
        past,
        s,
        sinks,
        q,
        t,
    } = step;
    if t == 1 && past + 1 >= SPLIT_DECODE_AT {
        return attend_one_split(keys, values, step);
    }
    let (nh, hd) = (s.n_head, s.head_dim);
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
            if s.window.is_none() {
                let qs = &q[(t0 * nh) * hd..(t1 * nh) * hd];
                return run_in_chunks(keys, values, step, h0, g, past + t0, qs, exp_shifted);
            }
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
                if K::F16_QUERY {
                    round_f16_slice(&mut qg);
                }
                let sc_all = &mut scores[..g * n];
                keys.scores(row, kvh * hd, &qg, hd, first..end, sc_all, &mut scratch);
                for (j, sc) in sc_all.chunks_mut(n).enumerate() {
                    let sink = sinks.map(|z| z[h0 + j]);
                    softmax_weights(sc, s.scale, sink, V::F16_WEIGHTS, exp_shifted);
                }
                let at = (ti - t0) * g * hd;
                let o = &mut o[at..at + g * hd];
                values.weighted(o, sc_all, g, row, first, kvh * hd);
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

/// The attention of a run of consecutive tokens (the first at position `at`; `qs` their query
/// rows, all heads) for the `g` heads from `h0` of one KV head, over every position before and
/// at each token (no window): the K and V rows are read in chunks of positions, each chunk
/// serving every token of the run while it is in cache (reading them once per token streamed
/// a long cache from memory for every token). Each score, weight and output element is
/// computed in the same order as one token at a time, so the results are the same bit for bit.
/// Returns the run's outputs, token after token, `g · head_dim` each.
#[allow(clippy::too_many_arguments)]
fn run_in_chunks<K: Keys, V: Values>(
    keys: &K,
    values: &V,
    step: &Step,
    h0: usize,
    g: usize,
    at: usize,
    qs: &[f32],
    exp_shifted: ggrun_quants::float::ExpShiftedFn,
) -> Vec<f32> {
    const CHUNK: usize = 512;
    let (s, row) = (step.s, step.row);
    let (nh, hd) = (s.n_head, s.head_dim);
    let kvh = h0 / (nh / s.n_head_kv);
    let tn = qs.len() / (nh * hd);
    // Token i sees positions 0..at + i + 1; rows (token, head) are `n_max` scores apart.
    let n_max = at + tn;
    // Every row's scores are held at once: at long depth the run goes in shorter runs that
    // keep them within SCORES_MAX floats (each token's results are its own: no bit changes).
    let per_run = (SCORES_MAX / (g * n_max)).max(1);
    if tn > per_run {
        let mut o = Vec::with_capacity(tn * g * hd);
        for i0 in (0..tn).step_by(per_run) {
            let i1 = (i0 + per_run).min(tn);
            let qs = &qs[i0 * nh * hd..i1 * nh * hd];
            o.extend(run_in_chunks(
                keys,
                values,
                step,
                h0,
                g,
                at + i0,
                qs,
                exp_shifted,
            ));
        }
        return o;
    }
    let rows = tn * g;
    let mut qg = Vec::with_capacity(rows * hd);
    for i in 0..tn {
        qg.extend_from_slice(&qs[(i * nh + h0) * hd..(i * nh + h0 + g) * hd]);
    }
    if K::F16_QUERY {
        round_f16_slice(&mut qg);
    }
    let mut sc = vec![0f32; rows * n_max];
    let (mut part, mut scratch) = (vec![0f32; rows * CHUNK], Vec::new());
    for p0 in (0..n_max).step_by(CHUNK) {
        let m = CHUNK.min(n_max - p0);
        let part = &mut part[..rows * m];
        keys.scores(row, kvh * hd, &qg, hd, p0..p0 + m, part, &mut scratch);
        for (r, src) in part.chunks_exact(m).enumerate() {
            sc[r * n_max + p0..][..m].copy_from_slice(src);
        }
    }
    for (r, sc) in sc.chunks_exact_mut(n_max).enumerate() {
        let (i, j) = (r / g, r % g);
        let sink = step.sinks.map(|z| z[h0 + j]);
        softmax_weights(
            &mut sc[..at + i + 1],
            s.scale,
            sink,
            V::F16_WEIGHTS,
            exp_shifted,
        );
    }
    let mut o = vec![0f32; rows * hd];
    let mut w = vec![0f32; g * CHUNK];
    for p0 in (0..n_max).step_by(CHUNK) {
        for i in 0..tn {
            let n = at + i + 1;
            if p0 >= n {
                continue;
            }
            let m = CHUNK.min(n - p0);
            for (j, dst) in w.chunks_exact_mut(m).take(g).enumerate() {
                dst.copy_from_slice(&sc[(i * g + j) * n_max + p0..][..m]);
            }
            let oi = &mut o[i * g * hd..(i + 1) * g * hd];
            values.weighted(oi, &w[..g * m], g, row, p0, kvh * hd);
        }
    }
    o
}

/// The most scores [`run_in_chunks`] holds at once (16 MiB of f32 per task; small under test,
/// so that the unit tests take the shorter runs too).
const SCORES_MAX: usize = if cfg!(test) { 4096 } else { 1 << 22 };

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
fn attend_one_split<K: Keys, V: Values>(keys: &K, values: &V, step: &Step) -> Vec<f32> {
    let &Step {
        row,
        past,
        s,
        sinks,
        q,
        ..
    } = step;
    const POSITIONS_PER_TASK: usize = 512;
    const COLUMNS_PER_TASK: usize = 32;
    let (nh, nkv, hd) = (s.n_head, s.n_head_kv, s.head_dim);
    let group = nh / nkv;
    let end = past + 1;
    let first = s.window.map_or(0, |w| end.saturating_sub(w));
    let n = end - first;
    let exp_shifted = ggrun_quants::float::exp_shifted_fn();
    let mut qr = q[..nh * hd].to_vec();
    if K::F16_QUERY {
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
            keys.scores(row, kvh * hd, qg, hd, at, &mut sc, &mut Vec::new());
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
    w.par_chunks_mut(n).enumerate().for_each(|(h, sc)| {
        softmax_weights(
            sc,
            s.scale,
            sinks.map(|z| z[h]),
            V::F16_WEIGHTS,
            exp_shifted,
        )
    });
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
            values.weighted(&mut o, wg, group, row, first, kvh * hd + c0);
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

    /// [`attend`] on a fresh cache of types `kv` that already holds the first `past` rows of `k`
    /// and `v`, for the `t` rows after them.
    #[allow(clippy::too_many_arguments)]
    fn through_attend(
        s: &AttnShape,
        kv: KvTypes,
        k: &[f32],
        v: &[f32],
        past: usize,
        sinks: Option<&[f32]>,
        q: &[f32],
        t: usize,
    ) -> Vec<f32> {
        let row = s.n_head_kv * s.head_dim;
        let mut cache = new_cache(s, past + t, kv).unwrap();
        let LayerState::Attention {
            k: kc,
            v: vc,
            len,
            k_tiled,
            ..
        } = &mut cache
        else {
            unreachable!()
        };
        // The first rows as `attend` would have stored them (rotated for block caches).
        let (mut kp, mut vp) = (k[..past * row].to_vec(), v[..past * row].to_vec());
        if let Some(n) = k_rotation(kc, s.head_dim) {
            hadamard(&mut kp, n);
        }
        if let Some(n) = v_rotation(vc, s.head_dim) {
            hadamard(&mut vp, n);
        }
        kc.write_rows(0, row, *k_tiled, &kp);
        vc.write_rows(0, row, false, &vp);
        *len = past;
        let (k, v) = (&k[past * row..], &v[past * row..]);
        attend(&mut cache, s, sinks, q, k, v, t).unwrap()
    }

    /// The reference for caches with block rows (and f16 beside them): one query head and one
    /// position at a time: f16 keys through the scalar q·k of the query rounded to f16, block
    /// keys through the type's `dot` of the query quantized to q8_0; the weights rounded to f16
    /// for f16 values, which the scalar kernel sums, and left in f32 for block values, which
    /// are dequantized and summed by the same kernel.
    #[allow(clippy::too_many_arguments)]
    fn reference_blocks(
        kv: KvTypes,
        k32: &[f32],
        v32: &[f32],
        row: usize,
        past: usize,
        s: &AttnShape,
        sinks: Option<&[f32]>,
        q: &[f32],
        t: usize,
    ) -> Vec<f32> {
        let (nh, hd) = (s.n_head, s.head_dim);
        let group = nh / s.n_head_kv;
        let n_all = past + t;
        // Block caches hold rotated rows (f16 ones do not), and the output is rotated back.
        let rot = |ty: KvType, n: usize, x: &[f32]| {
            let mut r = x.to_vec();
            if ty.block_type().is_some() && hd % 64 == 0 {
                hadamard(&mut r, n);
            }
            r
        };
        let k_n = if hd % 128 == 0 { 128 } else { 64 };
        let (k32, q) = (&rot(kv.k, k_n, k32)[..], &rot(kv.k, k_n, q)[..]);
        let v32 = &rot(kv.v, 64, v32)[..];
        let rows_of = |ty: KvType, x: &[f32]| {
            let mut r = KvRows::zeroed(ty, row, n_all).unwrap();
            r.write_rows(0, row, false, x);
            r
        };
        let (kr, vr) = (rows_of(kv.k, k32), rows_of(kv.v, v32));
        let v_back = vr.rows_f32(n_all, row, false).into_owned();
        let v16: Vec<u16> = v32.iter().map(|&x| f32_to_f16(x)).collect();
        let k16: Vec<u16> = k32.iter().map(|&x| f32_to_f16(x)).collect();
        let mut out = vec![0f32; t * nh * hd];
        for ti in 0..t {
            let end = past + ti + 1;
            let first = s.window.map_or(0, |w| end.saturating_sub(w));
            let n = end - first;
            for h in 0..nh {
                let kvh = h / group;
                let mut qh = q[(ti * nh + h) * hd..][..hd].to_vec();
                let mut sc = vec![0f32; n];
                match &kr {
                    KvRows::Quant { ty, data } => {
                        let k = ggrun_quants::kernels(*ty).unwrap();
                        let qb = GgmlType::Q8_0.row_bytes(hd as u64).unwrap() as usize;
                        let mut qq = vec![0u8; qb];
                        (k.quantize_act)(&qh, &mut qq);
                        let bb = ty.row_bytes(32).unwrap() as usize;
                        let (rb, hb) = (row / 32 * bb, hd / 32 * bb);
                        for (i, p) in (first..end).enumerate() {
                            let at = p * rb + kvh * hb;
                            sc[i] = (k.dot)(&data[at..at + hb], &qq);
                        }
                    }
                    _ => {
                        round_f16_slice(&mut qh);
                        dot_rows_scalar(&k16[first * row + kvh * hd..], row, &qh, hd, &mut sc);
                    }
                }
                let f16_v = kv.v == KvType::F16;
                let exp = ggrun_quants::float::exp_shifted_scalar;
                softmax_weights(&mut sc, s.scale, sinks.map(|z| z[h]), f16_v, exp);
                let o = &mut out[(ti * nh + h) * hd..][..hd];
                if f16_v {
                    weighted_rows_scalar(o, &sc, 1, &v16[first * row + kvh * hd..], row);
                } else {
                    weighted_rows_scalar(o, &sc, 1, &v_back[first * row + kvh * hd..], row);
                }
            }
        }
        rot(kv.v, 64, &out)
    }

    /// `x ← H x` per run of `n` with H built as llama.cpp builds it (the Sylvester recursion
    /// written out as a matrix) and multiplied row by row.
    fn hadamard_by_matrix(x: &mut [f32], n: usize) {
        let mut h = vec![0f32; n * n];
        h[0] = 1.0 / (n as f32).sqrt();
        let mut s = 1;
        while s < n {
            for i in 0..s {
                for j in 0..s {
                    let v = h[i * n + j];
                    h[(i + s) * n + j] = v;
                    h[i * n + j + s] = v;
                    h[(i + s) * n + j + s] = -v;
                }
            }
            s *= 2;
        }
        for c in x.chunks_exact_mut(n) {
            let y: Vec<f32> = (0..n)
                .map(|i| {
                    (0..n)
                        .map(|k| h[i * n + k] as f64 * c[k] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            c.copy_from_slice(&y);
        }
    }

    /// The butterflies compute llama.cpp's matrix (within f32 rounding), and applying them
    /// twice gives the input back: H is orthonormal and symmetric.
    #[test]
    fn the_fast_rotation_is_the_walsh_hadamard_matrix() {
        for n in [64, 128, 256] {
            let x: Vec<f32> = (0..2 * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let (mut fast, mut slow) = (x.clone(), x.clone());
            hadamard(&mut fast, n);
            hadamard_by_matrix(&mut slow, n);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "n {n}: {a} vs {b}");
            }
            hadamard(&mut fast, n);
            for (a, b) in fast.iter().zip(&x) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "n {n}: {a} vs {b}");
            }
        }
    }

    /// The block-row combinations the tests run (each type as K and as V, and beside f16).
    const BLOCK_PAIRS: [(KvType, KvType); 5] = [
        (KvType::Q8_0, KvType::Q8_0),
        (KvType::Q4_0, KvType::Q4_0),
        (KvType::Q8_0, KvType::F16),
        (KvType::F16, KvType::Q4_0),
        (KvType::Q4_0, KvType::Q8_0),
    ];

    /// Decode at short and long caches (one task per KV head, and the three-way split), and a
    /// prefill chunk, with and without a window and sinks, over f32 and f16 rows and rows of
    /// q8_0 and q4_0 blocks: every path equals the one-head-at-a-time reference bit for bit.
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
                    let got = through_attend(&s, KvTypes::F32, &k32, &v32, past, sinks, &q, t);
                    let want = reference(&k32, &v32, row, past, &s, sinks, &q, t);
                    assert!(got == want, "f32 {nh}/{nkv}×{hd} past {past} t {t}");
                    let k16: Vec<u16> = k32.iter().map(|&x| f32_to_f16(x)).collect();
                    let v16: Vec<u16> = v32.iter().map(|&x| f32_to_f16(x)).collect();
                    let got = through_attend(&s, KvTypes::F16, &k32, &v32, past, sinks, &q, t);
                    let want = reference(&k16, &v16, row, past, &s, sinks, &q, t);
                    assert!(got == want, "f16 {nh}/{nkv}×{hd} past {past} t {t}");
                    if hd % 32 != 0 {
                        continue;
                    }
                    for (k, v) in BLOCK_PAIRS {
                        let kv = KvTypes { k, v };
                        let got = through_attend(&s, kv, &k32, &v32, past, sinks, &q, t);
                        let want = reference_blocks(kv, &k32, &v32, row, past, &s, sinks, &q, t);
                        assert!(got == want, "{kv:?} {nh}/{nkv}×{hd} past {past} t {t}");
                    }
                }
            }
        }
    }

    /// Block caches compute the same attention as f32 rows up to their quantization: on random
    /// rows, the outputs' RMS error relative to the f32 outputs' RMS stays within 2% for q8_0
    /// (about 0.4% per value) and 20% for q4_0 (about 7% per value), K and V alike.
    #[test]
    fn block_caches_stay_near_the_f32_attention() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let s = AttnShape {
            n_head: 8,
            n_head_kv: 2,
            head_dim: 64,
            scale: 0.125,
            window: None,
        };
        let (past, t, row) = (300, 3, 128);
        let k: Vec<f32> = (0..(past + t) * row).map(|_| 2.0 * rand()).collect();
        let v: Vec<f32> = (0..(past + t) * row).map(|_| rand()).collect();
        let q: Vec<f32> = (0..t * 8 * 64).map(|_| 2.0 * rand()).collect();
        let want = through_attend(&s, KvTypes::F32, &k, &v, past, None, &q, t);
        let rms = |x: &[f32]| (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        for (ty, bound) in [(KvType::Q8_0, 0.02), (KvType::Q4_0, 0.2)] {
            for kv in [
                KvTypes { k: ty, v: ty },
                KvTypes {
                    k: ty,
                    v: KvType::F16,
                },
            ] {
                let got = through_attend(&s, kv, &k, &v, past, None, &q, t);
                let err: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
                let rel = rms(&err) / rms(&want);
                eprintln!("{kv:?}: relative RMS error {rel:.4}");
                assert!(rel <= bound, "{kv:?}: relative RMS error {rel}");
                assert!(rel > 0.0, "{kv:?}: no quantization at all?");
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
