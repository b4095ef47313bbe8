//! MXFP4 (gpt-oss's expert weights): blocks of 32 four-bit E2M1 values sharing one E8M0 power-of-
//! two scale. Block: the exponent byte `e`, then 16 bytes whose low nibbles are elements 0..15
//! and high nibbles elements 16..31 (Q4_0's order). An element is `FP4_VALUES[nibble] · 2^(e −
//! 128)`: the table holds twice the E2M1 values, so the scale is half of 2^(e − 127), as in ggml.
//! Activations meet it as Q8_0 rows. Scalar reference dequantize, quantize (ggml's
//! `quantize_row_mxfp4_ref`) and dot.

use bytemuck::{Pod, Zeroable};

use crate::legacy::{h, BlockQ8_0};

/// Twice the E2M1 values of each nibble (sign in bit 3).
pub const FP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockMxfp4 {
    pub e: u8,
    pub qs: [u8; 16],
}

/// 2^(e − 128): half the E8M0 value, built from its bits (e < 2 gives the subnormals).
#[inline]
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e as u32 - 1) << 23
    };
    f32::from_bits(bits)
}

/// The block's 32 table values in element order.
#[inline]
pub fn values(b: &BlockMxfp4) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = FP4_VALUES[(b.qs[j] & 15) as usize];
        q[j + 16] = FP4_VALUES[(b.qs[j] >> 4) as usize];
    }
    q
}

pub fn dequantize_mxfp4(blocks: &[BlockMxfp4], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(32)) {
        let d = e8m0_half(b.e);
        for (v, q) in o.iter_mut().zip(values(b)) {
            *v = q as f32 * d;
        }
    }
}

/// The table index whose value times `d` is nearest `x` (the first of equals).
fn nearest(x: f32, d: f32) -> u8 {
    let mut best = 0;
    let mut err = (FP4_VALUES[0] as f32 * d - x).abs();
    for (i, &v) in FP4_VALUES.iter().enumerate().skip(1) {
        let e = (v as f32 * d - x).abs();
        if e < err {
            best = i as u8;
            err = e;
        }
    }
    best
}

/// ggml's reference quantizer: the exponent from the block's largest magnitude
/// (floor(log2 amax) − 2 + 127), each element to its nearest table value.
pub fn quantize_mxfp4(x: &[f32], out: &mut [BlockMxfp4]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        b.e = if amax > 0.0 {
            (amax.log2().floor() - 2.0 + 127.0).clamp(0.0, 255.0) as u8
        } else {
            0
        };
        let d = e8m0_half(b.e);
        for j in 0..16 {
            b.qs[j] = nearest(xb[j], d) | (nearest(xb[j + 16], d) << 4);
        }
    }
}

/// Σ over blocks of 2^(e − 128) · d_a · Σ value·q (the order of ggml's scalar loop).
pub fn dot_mxfp4(w: &[BlockMxfp4], a: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s: i32 = values(w)
                .iter()
                .zip(&a.qs)
                .map(|(&x, &y)| x as i32 * y as i32)
                .sum();
            e8m0_half(w.e) * h(a.d) * s as f32
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_half_is_a_power_of_two() {
        for e in 0..=254u8 {
            let want = 2f64.powi(e as i32 - 128);
            assert_eq!(e8m0_half(e) as f64, want, "e={e}");
        }
    }

    #[test]
    fn table_values_are_twice_e2m1() {
        let e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (i, &v) in FP4_VALUES.iter().enumerate() {
            let mag = e2m1[i & 7] * 2.0;
            let want = if i & 8 != 0 { -mag } else { mag };
            assert_eq!(v as f32, want);
        }
    }
}
