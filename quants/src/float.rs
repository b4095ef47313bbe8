//! Plain float element types: F32, F16 and BF16. Conversions, row dequantize/quantize and the
//! scalar reference dot products (accumulated in f64, so the SIMD twins are checked against the
//! most accurate sum rather than one particular summation order).

use half::f16;

/// IEEE half bits → f32.
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// f32 → IEEE half bits, round to nearest even (what ggml's F16C and reference paths do).
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// bfloat16 bits → f32.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bfloat16 bits with round-to-nearest-even; NaN stays a (quiet) NaN.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[inline]
fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[2 * i], b[2 * i + 1]])
}

#[inline]
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (i, d) in dst.iter_mut().enumerate() {
        *d = f32_at(src, i);
    }
}

pub fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (i, d) in dst.iter_mut().enumerate() {
        *d = f16_to_f32(u16_at(src, i));
    }
}

pub fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (i, d) in dst.iter_mut().enumerate() {
        *d = bf16_to_f32(u16_at(src, i));
    }
}

pub fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (x, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

pub fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (x, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_f16(*x).to_le_bytes());
    }
}

pub fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (x, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_bf16(*x).to_le_bytes());
    }
}

pub fn dot_f32(w: &[u8], a: &[u8]) -> f32 {
    let n = w.len() / 4;
    (0..n)
        .map(|i| f32_at(w, i) as f64 * f32_at(a, i) as f64)
        .sum::<f64>() as f32
}

pub fn dot_f16(w: &[u8], a: &[u8]) -> f32 {
    let n = w.len() / 2;
    (0..n)
        .map(|i| f16_to_f32(u16_at(w, i)) as f64 * f16_to_f32(u16_at(a, i)) as f64)
        .sum::<f64>() as f32
}

pub fn dot_bf16(w: &[u8], a: &[u8]) -> f32 {
    let n = w.len() / 2;
    (0..n)
        .map(|i| bf16_to_f32(u16_at(w, i)) as f64 * bf16_to_f32(u16_at(a, i)) as f64)
        .sum::<f64>() as f32
}

/// Wrapping sum of `bytes` read as little-endian u64 words (plus the tail bytes): a plain
/// sequential read of memory, for measuring read bandwidth.
pub fn sum_bytes(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail: u64 = words.remainder().iter().map(|&b| b as u64).sum();
    words
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
        .fold(tail, u64::wrapping_add)
}

/// Cephes' single-precision exp: n = round(x·log2 e), r = x − n·ln 2 (in two parts), then a
/// degree-5 polynomial in r, times 2^n; within 2 ulp of e^x over [−87, 88] (the argument is
/// clamped there; below, 2^n underflows to 0). Every multiply-add is fused, so the SIMD twins
/// compute the same values bit for bit.
#[inline]
pub fn exp_cephes(x: f32) -> f32 {
    let x = x.clamp(EXP_RANGE.0, EXP_RANGE.1);
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(-EXP_LN2.0, x);
    let r = n.mul_add(EXP_LN2.1, r);
    let z = r * r;
    let mut y = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        y = y.mul_add(r, c);
    }
    let y = y.mul_add(z, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// [`exp_cephes`]'s argument range, ln 2 in two parts (subtracted, then added back), and its
/// polynomial's coefficients from the highest power; the SIMD twins read the same constants.
pub(crate) const EXP_RANGE: (f32, f32) = (-87.336_54, 88.376_26);
pub(crate) const EXP_LN2: (f32, f32) = (0.693_359_4, 2.121_944_4e-4);
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `xs[i] = e^(xs[i] − max)` for every element (the softmax's exponentials).
pub type ExpShiftedFn = fn(&mut [f32], f32);

pub fn exp_shifted_scalar(xs: &mut [f32], max: f32) {
    for x in xs.iter_mut() {
        *x = exp_cephes(*x - max);
    }
}

/// The exp kernel of `isa` (scalar where the tier has none).
pub fn exp_shifted_for(isa: crate::Isa) -> ExpShiftedFn {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() && isa.is_available() {
        return crate::x86::exp_shifted;
    }
    let _ = isa;
    exp_shifted_scalar
}

/// The exp kernel of the active tier.
pub fn exp_shifted_fn() -> ExpShiftedFn {
    exp_shifted_for(crate::isa::active())
}

/// An element of a KV cache row: f32, or f16 bits (the cache's storage in normal precision).
/// The kernels convert f16 rows to f32 as they read them, so a row stored as f16 gives exactly
/// what the same values stored as f32 give.
pub trait KvElem: Copy + Send + Sync + 'static {
    const F16: bool;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const F16: bool = false;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for u16 {
    const F16: bool = true;
    #[inline]
    fn to_f32(self) -> f32 {
        f16_to_f32(self)
    }
}

/// For each of `heads` heads h: `out_h += Σ_p w_h[p] · v[p·stride ..][..cols]`, where `out`
/// holds the heads' rows of `cols = out.len() / heads` and `w` their weights over
/// `n = w.len() / heads` positions: the attention's value accumulation for the query heads of
/// one KV head (a GQA group), which share every row of V. Each element sums its terms in
/// position order with one rounding per term (fused multiply-add); the SIMD twins keep the
/// outputs in registers across the positions and let the heads share each row load, and equal
/// this bit for bit.
pub type WeightedRowsFn<T = f32> = fn(&mut [f32], &[f32], usize, &[T], usize);

pub fn weighted_rows_scalar<T: KvElem>(
    out: &mut [f32],
    w: &[f32],
    heads: usize,
    v: &[T],
    stride: usize,
) {
    let heads = heads.max(1);
    let (cols, n) = (out.len() / heads, w.len() / heads);
    if cols == 0 || n == 0 {
        return;
    }
    for (out, w) in out.chunks_mut(cols).zip(w.chunks(n)) {
        for (p, &wp) in w.iter().enumerate() {
            let row = &v[p * stride..p * stride + cols];
            for (o, x) in out.iter_mut().zip(row) {
                *o = wp.mul_add(x.to_f32(), *o);
            }
        }
    }
}

/// The weighted-rows kernel of the active tier.
pub fn weighted_rows_fn<T: KvElem>() -> WeightedRowsFn<T> {
    weighted_rows_for(crate::isa::active())
}

/// The weighted-rows kernel of `isa` (scalar where the tier has none).
pub fn weighted_rows_for<T: KvElem>(isa: crate::Isa) -> WeightedRowsFn<T> {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() && isa.is_available() {
        return crate::x86::weighted_rows::<T>;
    }
    let _ = isa;
    weighted_rows_scalar::<T>
}

/// The definition of the attention's q·k scores over rows: for each of the `qs.len() / hd`
/// queries j, `out[j·n + p] = Σ_d k[p·stride + d] · qs[j·hd + d]` for p < n = `out.len()` /
/// queries, each sum taken in d order (product rounded, then added), the order that reproduces
/// llama.cpp's greedy continuations. The kernels read K in tile layout ([`DotTilesFn`]); this
/// is their reference.
pub fn dot_rows_scalar<T: KvElem>(k: &[T], stride: usize, qs: &[f32], hd: usize, out: &mut [f32]) {
    let g = (qs.len() / hd.max(1)).max(1);
    let n = out.len() / g;
    for (q, out) in qs.chunks(hd.max(1)).zip(out.chunks_mut(n.max(1))) {
        for (p, o) in out.iter_mut().enumerate() {
            let row = &k[p * stride..p * stride + hd];
            *o = row
                .iter()
                .zip(q)
                .fold(-0.0f32, |acc, (a, b)| acc + a.to_f32() * b);
        }
    }
}

/// Positions per tile of a K cache in tile layout: within a tile, each column's values for the
/// eight positions are adjacent, so that a kernel loads one column of eight positions as one
/// vector (no transposes) and streams a KV head's part of a tile as one contiguous run.
pub const K_TILE: usize = 8;

/// The index of position `p`, column `c` in a K cache of `row` columns in tile layout.
#[inline]
pub fn k_tile_index(p: usize, c: usize, row: usize) -> usize {
    (p / K_TILE) * K_TILE * row + c * K_TILE + p % K_TILE
}

/// q·k over whole tiles of a K cache in tile layout: `k` starts at a tile, `row` columns per
/// position, the KV head's columns from `col`. For each of the `qs.len() / hd` queries j:
/// `out[j·n + p] = Σ_d k(p, col + d) · qs[j·hd + d]` for p < n = `out.len()` / queries (a
/// multiple of [`K_TILE`]), each sum taken in d order (product rounded, then added): the scores
/// of [`dot_rows_scalar`] over the same values in row layout, bit for bit. Over f16 rows the
/// queries must hold f16 values (the attention rounds them so), which makes every product exact.
pub type DotTilesFn<T = f32> = fn(&[T], usize, usize, &[f32], usize, &mut [f32]);

pub fn dot_tiles_scalar<T: KvElem>(
    k: &[T],
    row: usize,
    col: usize,
    qs: &[f32],
    hd: usize,
    out: &mut [f32],
) {
    let g = (qs.len() / hd.max(1)).max(1);
    let n = out.len() / g;
    for (q, out) in qs.chunks(hd.max(1)).zip(out.chunks_mut(n.max(1))) {
        for (p, o) in out.iter_mut().enumerate() {
            *o = q.iter().enumerate().fold(-0.0f32, |acc, (d, b)| {
                acc + k[k_tile_index(p, col + d, row)].to_f32() * b
            });
        }
    }
}

/// The tile-layout q·k kernel of the active tier.
pub fn dot_tiles_fn<T: KvElem>() -> DotTilesFn<T> {
    dot_tiles_for(crate::isa::active())
}

pub fn dot_tiles_for<T: KvElem>(isa: crate::Isa) -> DotTilesFn<T> {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() && isa.is_available() {
        return crate::x86::dot_tiles::<T>;
    }
    let _ = isa;
    dot_tiles_scalar::<T>
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1.0 + 2^-8 lies exactly between two bf16 values: ties go to the even mantissa (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1.0 + 3·2^-8 ties between 1+2^-7 (odd) and 1+2^-6 (even): goes up.
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn f16_round_trip() {
        for x in [0.0f32, -0.0, 1.0, -65504.0, 6.1035156e-5, 0.33325195] {
            assert_eq!(f16_to_f32(f32_to_f16(x)), x);
        }
    }
}
