//! I-quants: IQ4_XS, IQ4_NL's 16-value codebook in super-blocks of 256 with a 6-bit scale per
//! sub-block of 32 (4.25 bits a weight). Dotted with Q8_K activations, as llama.cpp does.

// The quantizer follows ggml's loop over sub-blocks index for index.
#![allow(clippy::needless_range_loop)]

use bytemuck::{Pod, Zeroable};

use crate::kquants::{nearest_int, BlockQ8K, QK_K};
use crate::legacy::{h, inv, iq4_block_scale, iq4nl_index, to_h, IQ4NL_VALUES};

/// 136 bytes: d (f16), the high two bits of the eight sub-block scales (u16, two bits each),
/// their low four bits (two a byte), and 128 bytes of nibbles (per sub-block of 32, 16 bytes:
/// element j in the low nibble of byte j, element j + 16 in its high nibble).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq4Xs {
    pub d: [u8; 2],
    pub scales_h: [u8; 2],
    pub scales_l: [u8; 4],
    pub qs: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<BlockIq4Xs>() == 136);

impl BlockIq4Xs {
    /// The scale of sub-block `ib` (0..8), from −32 to 31.
    #[inline]
    pub fn scale(&self, ib: usize) -> i32 {
        let lo = (self.scales_l[ib / 2] >> (4 * (ib % 2))) & 15;
        let hi = (u16::from_le_bytes(self.scales_h) >> (2 * ib)) & 3;
        (lo as i32 | (hi as i32) << 4) - 32
    }

    /// The codebook indices of sub-block `ib` in element order.
    #[inline]
    pub fn codes(&self, ib: usize) -> [u8; 32] {
        let q = &self.qs[16 * ib..16 * ib + 16];
        std::array::from_fn(|j| if j < 16 { q[j] & 15 } else { q[j - 16] >> 4 })
    }
}

pub fn dequantize_iq4_xs(blocks: &[BlockIq4Xs], out: &mut [f32]) {
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = h(b.d);
        for ib in 0..8 {
            let dl = d * b.scale(ib) as f32;
            for (v, q) in y[32 * ib..32 * ib + 32].iter_mut().zip(b.codes(ib)) {
                *v = dl * IQ4NL_VALUES[q as usize] as f32;
            }
        }
    }
}

/// IQ4_XS as llama-quantize writes it without an importance matrix (ggml's
/// `quantize_row_iq4_nl_impl` for super-blocks of 256): each sub-block's best scale
/// ([`iq4_block_scale`]), the super-block scale d = −(the largest of them, by magnitude) / 32,
/// each sub-block's scale rounded to an integer multiple l of d in [−32, 31], and the codes at
/// d · l.
pub fn quantize_iq4_xs(x: &[f32], out: &mut [BlockIq4Xs]) {
    for (xs, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut scales = [0.0f32; 8];
        let (mut max_scale, mut amax_scale) = (0.0f32, 0.0f32);
        for ib in 0..8 {
            let d = iq4_block_scale(&xs[32 * ib..32 * ib + 32]).unwrap_or(0.0);
            scales[ib] = d;
            if d.abs() > amax_scale {
                amax_scale = d.abs();
                max_scale = d;
            }
        }
        let d = -max_scale / 32.0;
        b.d = to_h(d);
        b.scales_h = [0; 2];
        b.scales_l = [0; 4];
        let id = inv(d);
        let mut scales_h = 0u16;
        for ib in 0..8 {
            let l = nearest_int(id * scales[ib]).clamp(-32, 31);
            let idl = inv(d * l as f32);
            let xb = &xs[32 * ib..32 * ib + 32];
            for j in 0..16 {
                b.qs[16 * ib + j] = iq4nl_index(idl * xb[j]) | (iq4nl_index(idl * xb[j + 16]) << 4);
            }
            let l = (l + 32) as u8;
            b.scales_l[ib / 2] |= (l & 15) << (4 * (ib % 2));
            scales_h |= ((l >> 4) as u16) << (2 * ib);
        }
        b.scales_h = scales_h.to_le_bytes();
    }
}

/// Weight row · Q8_K activation row: per super-block the exact integer Σ_sub-blocks l · Σ(code
/// value · activation), times d_w · d_a, summed over super-blocks in order (the SIMD kernels
/// compute the same integers and the same float expression: bit-exact).
pub fn dot_iq4_xs(w: &[BlockIq4Xs], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (w, a) in w.iter().zip(a) {
        let mut isum = 0i32;
        for ib in 0..8 {
            let q8 = &a.qs[32 * ib..32 * ib + 32];
            let s: i32 = w
                .codes(ib)
                .iter()
                .zip(q8)
                .map(|(&c, &x)| IQ4NL_VALUES[c as usize] as i32 * x as i32)
                .sum();
            isum += w.scale(ib) * s;
        }
        sum += h(w.d) * a.d() * isum as f32;
    }
    sum
}
