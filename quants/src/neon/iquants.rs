//! NEON dots of the i-quants against Q8_K activations: IQ4_XS (codebook lookups with `tbl`),
//! the grid types IQ2_XXS/XS/S and IQ3_XXS/S (grid rows with their signs applied) and IQ1_S/M
//! (8 · grid ± 1). Each super-block becomes sixteen registers of sixteen signed weights with one
//! scale each, multiplied by the activations exactly as the K-quants are (`kdot_n` / `kdot_d`):
//! the scalar references' integers in their float expressions, so bit for bit equal to them.

use core::arch::aarch64::*;

use super::{kdot_d, kdot_n};
use crate::iq_grid::{
    BlockIq1M, BlockIq1S, BlockIq2S, BlockIq2Xs, BlockIq2Xxs, BlockIq3S, BlockIq3Xxs, Groups, Iq1,
    IQ1_FACTOR,
};
use crate::iquants::BlockIq4Xs;
use crate::kquants::BlockQ8K;
use crate::legacy::{h, IQ4NL_VALUES};

/// IQ4_XS: sub-block ib's low nibbles are weights 32ib..32ib+16, its high ones the next 16,
/// each looked up in IQ4_NL's codebook; one scale per sub-block.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_iq4_xs(b: &BlockIq4Xs) -> ([int8x16_t; 16], [i16; 16]) {
    let table = vld1q_s8(IQ4NL_VALUES.as_ptr());
    let mut q = [vdupq_n_s8(0); 16];
    let mut scales = [0i16; 16];
    for ib in 0..8 {
        let v = vld1q_u8(b.qs.as_ptr().add(16 * ib));
        q[2 * ib] = vqtbl1q_s8(table, vandq_u8(v, vdupq_n_u8(15)));
        q[2 * ib + 1] = vqtbl1q_s8(table, vshrq_n_u8::<4>(v));
        let s = b.scale(ib) as i16;
        (scales[2 * ib], scales[2 * ib + 1]) = (s, s);
    }
    (q, scales)
}

/// A grid type: weights 16j..16j+16 are the rows of groups 2j and 2j + 1 with their signs
/// applied (magnitudes are below 128, so the negation is exact), under group 2j's scale (the
/// scale spans at least 16 weights in every layout).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_grid<B: Groups>(b: &B) -> ([int8x16_t; 16], [i16; 16]) {
    let bits = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    let mut q = [vdupq_n_s8(0); 16];
    let mut scales = [0i16; 16];
    for j in 0..16 {
        let (k0, k1) = (2 * j, 2 * j + 1);
        let mag = vreinterpretq_s8_u64(vcombine_u64(
            vcreate_u64(b.row64(k0)),
            vcreate_u64(b.row64(k1)),
        ));
        let signs = vcombine_u8(vdup_n_u8(b.signs(k0)), vdup_n_u8(b.signs(k1)));
        let neg = vtstq_u8(signs, bits);
        q[j] = vbslq_s8(neg, vnegq_s8(mag), mag);
        scales[j] = b.scale(k0) as i16;
    }
    (q, scales)
}

/// IQ1: weights 16j..16j+16 are 8 · grid ± 1 of groups 2j and 2j + 1, under group 2j's odd
/// scale (one per two groups or more).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_iq1<B: Iq1>(b: &B) -> ([int8x16_t; 16], [i16; 16]) {
    let mut q = [vdupq_n_s8(0); 16];
    let mut scales = [0i16; 16];
    for j in 0..16 {
        let mut v = [0i8; 16];
        let mut odd = 0;
        for (half, k) in [2 * j, 2 * j + 1].into_iter().enumerate() {
            let (row, delta, o) = b.group(k);
            for (x, &g) in v[8 * half..8 * half + 8].iter_mut().zip(&row) {
                *x = 8 * g + delta as i8;
            }
            if half == 0 {
                odd = o;
            }
        }
        q[j] = vld1q_s8(v.as_ptr());
        scales[j] = odd as i16;
    }
    (q, scales)
}

macro_rules! iquant_dots {
    ($feat:literal, $kdot:ident, $($name:ident($block:ty, $unpack:ident, $d:expr, $factor:expr)),* $(,)?) => {
        $(
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(w: &[$block], a: &[BlockQ8K]) -> f32 {
                let mut sum = 0.0f32;
                for (b, y) in w.iter().zip(a) {
                    let (q, scales) = $unpack(b);
                    let isum = $kdot(&q, y, &scales);
                    sum += $d(b) * y.d() * isum as f32;
                }
                sum * $factor
            }
        )*
    };
}

fn d_iq4_xs(b: &BlockIq4Xs) -> f32 {
    h(b.d)
}

macro_rules! tier {
    ($feat:literal, $kdot:ident, $iq4xs:ident, $iq2xxs:ident, $iq2xs:ident, $iq2s:ident,
     $iq3xxs:ident, $iq3s:ident, $iq1s:ident, $iq1m:ident) => {
        iquant_dots!(
            $feat,
            $kdot,
            $iq4xs(BlockIq4Xs, unpack_iq4_xs, d_iq4_xs, 1.0),
            $iq2xxs(
                BlockIq2Xxs,
                unpack_grid,
                Groups::d,
                <BlockIq2Xxs as Groups>::FACTOR
            ),
            $iq2xs(
                BlockIq2Xs,
                unpack_grid,
                Groups::d,
                <BlockIq2Xs as Groups>::FACTOR
            ),
            $iq2s(
                BlockIq2S,
                unpack_grid,
                Groups::d,
                <BlockIq2S as Groups>::FACTOR
            ),
            $iq3xxs(
                BlockIq3Xxs,
                unpack_grid,
                Groups::d,
                <BlockIq3Xxs as Groups>::FACTOR
            ),
            $iq3s(
                BlockIq3S,
                unpack_grid,
                Groups::d,
                <BlockIq3S as Groups>::FACTOR
            ),
            $iq1s(BlockIq1S, unpack_iq1, Iq1::d, IQ1_FACTOR),
            $iq1m(BlockIq1M, unpack_iq1, Iq1::d, IQ1_FACTOR),
        );
    };
}
tier!("neon", kdot_n, iq4xs_n, iq2xxs_n, iq2xs_n, iq2s_n, iq3xxs_n, iq3s_n, iq1s_n, iq1m_n);
tier!(
    "neon,dotprod",
    kdot_d,
    iq4xs_d,
    iq2xxs_d,
    iq2xs_d,
    iq2s_d,
    iq3xxs_d,
    iq3s_d,
    iq1s_d,
    iq1m_d
);
