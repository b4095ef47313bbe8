//! Legacy block formats (32 elements a block): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL as weights,
//! Q8_0 and Q8_1 as activations. Block structs, the scalar reference dequantize, the reference
//! quantizers (bit-exact with ggml's `quantize_row_*_ref`), the activation quantizer our kernels use,
//! and the scalar reference dot products that every SIMD kernel is tested against.

use crate::float::{f16_to_f32, f32_to_f16};
use bytemuck::{Pod, Zeroable};

/// Elements per legacy block.
pub const QK: usize = 32;

/// The fixed 16-entry non-linear codebook of IQ4_NL (and IQ4_XS).
pub const IQ4NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; 32],
}

/// Q8_1: Q8_0 plus `s` = d · Σq, which lets Q4_1/Q5_1 dots add their minimum in one multiply.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: [u8; 2],
    pub s: [u8; 2],
    pub qs: [i8; 32],
}

/// IQ4_NL has Q4_0's layout; nibbles index [`IQ4NL_VALUES`].
pub type BlockIq4Nl = BlockQ4_0;

#[inline]
pub(crate) fn h(b: [u8; 2]) -> f32 {
    f16_to_f32(u16::from_le_bytes(b))
}

#[inline]
pub(crate) fn to_h(x: f32) -> [u8; 2] {
    f32_to_f16(x).to_le_bytes()
}

// ---------------------------------------------------------------------------------------------
// Unpacking: each weight block as 32 small integers (element order), shared by dequantize and dot.

/// Q4_0 / IQ4_NL nibbles in element order.
#[inline]
pub fn nibbles(qs: &[u8; 16]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = qs[j] & 15;
        q[j + 16] = qs[j] >> 4;
    }
    q
}

/// Q5 values (0..31) in element order: nibble plus the fifth bit from `qh`.
#[inline]
pub fn five_bits(qs: &[u8; 16], qh: [u8; 4]) -> [u8; 32] {
    let hb = u32::from_le_bytes(qh);
    let mut q = nibbles(qs);
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((hb >> j) & 1) as u8) << 4;
    }
    q
}

// ---------------------------------------------------------------------------------------------
// Dequantize (scalar reference).

pub fn dequantize_q4_0(blocks: &[BlockQ4_0], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = h(b.d);
        for (v, q) in o.iter_mut().zip(nibbles(&b.qs)) {
            *v = (q as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(blocks: &[BlockQ4_1], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (h(b.d), h(b.m));
        for (v, q) in o.iter_mut().zip(nibbles(&b.qs)) {
            *v = q as f32 * d + m;
        }
    }
}

pub fn dequantize_q5_0(blocks: &[BlockQ5_0], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = h(b.d);
        for (v, q) in o.iter_mut().zip(five_bits(&b.qs, b.qh)) {
            *v = (q as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_q5_1(blocks: &[BlockQ5_1], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (h(b.d), h(b.m));
        for (v, q) in o.iter_mut().zip(five_bits(&b.qs, b.qh)) {
            *v = q as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = h(b.d);
        for (v, q) in o.iter_mut().zip(b.qs) {
            *v = q as f32 * d;
        }
    }
}

pub fn dequantize_q8_1(blocks: &[BlockQ8_1], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = h(b.d);
        for (v, q) in o.iter_mut().zip(b.qs) {
            *v = q as f32 * d;
        }
    }
}

pub fn dequantize_iq4_nl(blocks: &[BlockIq4Nl], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = h(b.d);
        for (v, q) in o.iter_mut().zip(nibbles(&b.qs)) {
            *v = IQ4NL_VALUES[q as usize] as f32 * d;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reference quantizers (ggml's `quantize_row_*_ref`, bit for bit).

/// The element of largest magnitude, keeping its sign (first one on ties).
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

#[inline]
pub(crate) fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

pub fn quantize_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let d = signed_absmax(xb) / -8.0;
        let id = inv(d);
        b.d = to_h(d);
        for j in 0..16 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + 16] * id + 8.5) as i8).min(15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

pub fn quantize_q4_1(x: &[f32], out: &mut [BlockQ4_1]) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = inv(d);
        b.d = to_h(d);
        b.m = to_h(min);
        for j in 0..16 {
            let q0 = (((xb[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((xb[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

pub fn quantize_q5_0(x: &[f32], out: &mut [BlockQ5_0]) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let d = signed_absmax(xb) / -16.0;
        let id = inv(d);
        b.d = to_h(d);
        let mut qh = 0u32;
        for j in 0..16 {
            let q0 = ((xb[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((xb[j + 16] * id + 16.5) as i8).min(31) as u8;
            b.qs[j] = (q0 & 15) | ((q1 & 15) << 4);
            qh |= ((q0 as u32 >> 4) & 1) << j;
            qh |= ((q1 as u32 >> 4) & 1) << (j + 16);
        }
        b.qh = qh.to_le_bytes();
    }
}

pub fn quantize_q5_1(x: &[f32], out: &mut [BlockQ5_1]) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = inv(d);
        b.d = to_h(d);
        b.m = to_h(min);
        let mut qh = 0u32;
        for j in 0..16 {
            let q0 = ((xb[j] - min) * id + 0.5) as u8;
            let q1 = ((xb[j + 16] - min) * id + 0.5) as u8;
            b.qs[j] = (q0 & 15) | ((q1 & 15) << 4);
            qh |= ((q0 as u32 >> 4) & 1) << j;
            qh |= ((q1 as u32 >> 4) & 1) << (j + 16);
        }
        b.qh = qh.to_le_bytes();
    }
}

/// How an 8-bit activation block is rounded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Q8Rounding {
    /// ggml's `_ref`: id = 1/d, round half away from zero.
    Reference,
    /// llama.cpp's SIMD paths (AVX2/AVX-512/NEON alike): id = 127/amax, round half to even.
    Simd,
}

/// Rounds one block of 32 to bytes; returns (d, Σq).
#[inline]
fn q8_block(xb: &[f32], qs: &mut [i8; 32], r: Q8Rounding) -> (f32, i32) {
    let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = match r {
        Q8Rounding::Reference => inv(d),
        Q8Rounding::Simd if amax != 0.0 => 127.0 / amax,
        Q8Rounding::Simd => 0.0,
    };
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(xb) {
        *q = match r {
            Q8Rounding::Reference => (v * id).round(),
            Q8Rounding::Simd => (v * id).round_ties_even(),
        } as i8;
        sum += *q as i32;
    }
    (d, sum)
}

fn quantize_q8_0_with(x: &[f32], out: &mut [BlockQ8_0], r: Q8Rounding) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (d, _) = q8_block(xb, &mut b.qs, r);
        b.d = to_h(d);
    }
}

fn quantize_q8_1_with(x: &[f32], out: &mut [BlockQ8_1], r: Q8Rounding) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (d, sum) = q8_block(xb, &mut b.qs, r);
        b.d = to_h(d);
        b.s = to_h(sum as f32 * d);
    }
}

/// ggml's `quantize_row_q8_0_ref`: d = amax/127, q = round-half-away(x · (1/d)).
pub fn quantize_q8_0_ref(x: &[f32], out: &mut [BlockQ8_0]) {
    quantize_q8_0_with(x, out, Q8Rounding::Reference)
}

/// ggml's `quantize_row_q8_1_ref`: as Q8_0, plus s = f16(d · Σq).
pub fn quantize_q8_1_ref(x: &[f32], out: &mut [BlockQ8_1]) {
    quantize_q8_1_with(x, out, Q8Rounding::Reference)
}

/// The Q8_0 activation quantizer llama.cpp's SIMD paths run (AVX2/AVX-512/NEON alike):
/// id = 127/amax and round half to even. This is what the CPU goldens were computed with, and what
/// ggrun's kernels use; the SIMD twins of this function are bit-exact with it.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    quantize_q8_0_with(x, out, Q8Rounding::Simd)
}

/// Q8_1 with the SIMD paths' rounding (see [`quantize_q8_0`]); s = f16(d · Σq).
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    quantize_q8_1_with(x, out, Q8Rounding::Simd)
}

/// Index of the codebook entry nearest to `x` (ggml's `best_index_int8`: binary search; an exact
/// midpoint goes to the upper entry).
#[inline]
pub(crate) fn iq4nl_index(x: f32) -> u8 {
    let val = &IQ4NL_VALUES;
    if x <= val[0] as f32 {
        return 0;
    }
    if x >= val[15] as f32 {
        return 15;
    }
    let (mut lo, mut hi) = (0usize, 15usize);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < val[mid] as f32 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if x - (val[hi - 1] as f32) < (val[hi] as f32) - x {
        (hi - 1) as u8
    } else {
        hi as u8
    }
}

/// The scale of one block of 32 on IQ4_NL's codebook as ggml's `quantize_row_iq4_nl_impl` finds
/// it without an importance matrix: weights x², a search over 15 scales around amax/127, the
/// best by weighted least squares; `None` for a block whose magnitude is below 1e-15. IQ4_NL
/// stores it; IQ4_XS rounds it onto a 6-bit grid under its super-block's scale.
pub(crate) fn iq4_block_scale(xb: &[f32]) -> Option<f32> {
    const NTRY: i32 = 7;
    let vals = IQ4NL_VALUES.map(|v| v as f32);
    let max = signed_absmax(xb);
    if max.abs() < 1e-15 {
        return None;
    }
    let score = |id: f32| {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for &v in xb {
            let q = vals[iq4nl_index(id * v) as usize];
            let w = v * v;
            sumqx += w * q * v;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let d0 = -max / vals[0];
    let (sumqx, sumq2) = score(1.0 / d0);
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let (sumqx, sumq2) = score((itry as f32 + vals[0]) / max);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    Some(d)
}

/// IQ4_NL as llama-quantize writes it without an importance matrix (ggml's `quantize_iq4_nl`:
/// [`iq4_block_scale`], then a final pass at that scale).
pub fn quantize_iq4_nl(x: &[f32], out: &mut [BlockIq4Nl]) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        b.qs = [0; 16];
        let Some(d) = iq4_block_scale(xb) else {
            b.d = to_h(0.0);
            continue;
        };
        b.d = to_h(d);
        let id = inv(d);
        for j in 0..16 {
            b.qs[j] = iq4nl_index(id * xb[j]) | (iq4nl_index(id * xb[j + 16]) << 4);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar reference dot products (weight row · activation row).

#[inline]
fn idot(w: &[i32; 32], a: &[i8; 32]) -> i32 {
    w.iter().zip(a).map(|(&x, &y)| x * y as i32).sum()
}

#[inline]
fn widen<F: Fn(u8) -> i32>(q: [u8; 32], f: F) -> [i32; 32] {
    q.map(f)
}

pub fn dot_q4_0(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = idot(&widen(nibbles(&w.qs), |q| q as i32 - 8), &a.qs);
            h(w.d) * h(a.d) * s as f32
        })
        .sum()
}

pub fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = idot(&widen(nibbles(&w.qs), |q| q as i32), &a.qs);
            h(w.d) * h(a.d) * s as f32 + h(w.m) * h(a.s)
        })
        .sum()
}

pub fn dot_q5_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = idot(&widen(five_bits(&w.qs, w.qh), |q| q as i32 - 16), &a.qs);
            h(w.d) * h(a.d) * s as f32
        })
        .sum()
}

pub fn dot_q5_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = idot(&widen(five_bits(&w.qs, w.qh), |q| q as i32), &a.qs);
            h(w.d) * h(a.d) * s as f32 + h(w.m) * h(a.s)
        })
        .sum()
}

pub fn dot_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s: i32 =
                w.qs.iter()
                    .zip(&a.qs)
                    .map(|(&x, &y)| x as i32 * y as i32)
                    .sum();
            h(w.d) * h(a.d) * s as f32
        })
        .sum()
}

/// The float order of the eight-row prefill kernels ([`crate::OctetFn`]) for one row and token:
/// over blocks, `acc = fma(f16(dw)·f16(da), Σ w·a, acc)` from 0. None for types without one.
pub fn octet_reference(ty: crate::GgmlType, w: &[u8], a: &[u8]) -> Option<f32> {
    use crate::GgmlType::*;
    if !matches!(ty, Q4_0 | Q5_0 | Q8_0 | IQ4_NL) {
        return None;
    }
    let a: &[BlockQ8_0] = bytemuck::cast_slice(a);
    let run = |blocks: Vec<([u8; 2], [i32; 32])>| {
        blocks.iter().zip(a).fold(0.0f32, |acc, ((d, q), y)| {
            (h(*d) * h(y.d)).mul_add(idot(q, &y.qs) as f32, acc)
        })
    };
    Some(match ty {
        Q4_0 => run(bytemuck::cast_slice::<u8, BlockQ4_0>(w)
            .iter()
            .map(|b| (b.d, widen(nibbles(&b.qs), |q| q as i32 - 8)))
            .collect()),
        Q5_0 => run(bytemuck::cast_slice::<u8, BlockQ5_0>(w)
            .iter()
            .map(|b| (b.d, widen(five_bits(&b.qs, b.qh), |q| q as i32 - 16)))
            .collect()),
        Q8_0 => run(bytemuck::cast_slice::<u8, BlockQ8_0>(w)
            .iter()
            .map(|b| (b.d, b.qs.map(|x| x as i32)))
            .collect()),
        IQ4_NL => run(bytemuck::cast_slice::<u8, BlockIq4Nl>(w)
            .iter()
            .map(|b| {
                (
                    b.d,
                    widen(nibbles(&b.qs), |q| IQ4NL_VALUES[q as usize] as i32),
                )
            })
            .collect()),
        _ => return None,
    })
}

pub fn dot_iq4_nl(w: &[BlockIq4Nl], a: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = idot(
                &widen(nibbles(&w.qs), |q| IQ4NL_VALUES[q as usize] as i32),
                &a.qs,
            );
            h(w.d) * h(a.d) * s as f32
        })
        .sum()
}
