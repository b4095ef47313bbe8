//! AArch64 NEON kernels, with and without the dot-product extension (`sdot`). Blocks are unpacked
//! to signed bytes (two 16-byte registers per 32 elements) and multiplied with the activation
//! bytes; each block's integer sum is reduced exactly and scaled in the scalar reference's order,
//! so legacy, K-quant and i-quant dots are bit-exact with scalar. Functions are `unsafe`
//! only for their CPU features; `specialize` installs them only after detection.

use core::arch::aarch64::*;

mod iquants;
mod packed;

use iquants::{
    iq1m_d, iq1m_n, iq1s_d, iq1s_n, iq2s_d, iq2s_n, iq2xs_d, iq2xs_n, iq2xxs_d, iq2xxs_n, iq3s_d,
    iq3s_n, iq3xxs_d, iq3xxs_n, iq4xs_d, iq4xs_n,
};

use crate::kquants::{
    k4_scales16, q3k_scales, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K,
};
use crate::legacy::{
    h, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, IQ4NL_VALUES,
};
use crate::mxfp4::{e8m0_half, BlockMxfp4, FP4_VALUES};
use crate::{GgmlType, Isa, Kernels};
use bytemuck::cast_slice;

/// Σ a·b of 16 signed bytes into 4 i32 lanes, plain NEON.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn dot16_neon(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpadalq_s16(vpadalq_s16(acc, lo), hi)
}

/// The same with `sdot` (inline assembly: the `vdotq_s32` intrinsic is not stable Rust yet).
#[target_feature(enable = "neon,dotprod")]
#[inline]
pub(super) unsafe fn dot16_sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction; the caller's target features include dotprod.
    core::arch::asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// 16 packed bytes → (low nibbles, high nibbles).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn nibbles(qs: &[u8; 16]) -> (uint8x16_t, uint8x16_t) {
    let v = vld1q_u8(qs.as_ptr());
    (vandq_u8(v, vdupq_n_u8(15)), vshrq_n_u8::<4>(v))
}

/// Bit i of `qh` as 0x10 in byte i (elements 0..15, 16..31).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn fifth_bits(qh: [u8; 4]) -> (uint8x16_t, uint8x16_t) {
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    let bits = u32::from_le_bytes(qh);
    for j in 0..16 {
        lo[j] = (((bits >> j) & 1) << 4) as u8;
        hi[j] = (((bits >> (j + 16)) & 1) << 4) as u8;
    }
    (vld1q_u8(lo.as_ptr()), vld1q_u8(hi.as_ptr()))
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn q4_0_i8(b: &BlockQ4_0) -> (int8x16_t, int8x16_t) {
    let (l, h) = nibbles(&b.qs);
    let e = vdupq_n_s8(8);
    (
        vsubq_s8(vreinterpretq_s8_u8(l), e),
        vsubq_s8(vreinterpretq_s8_u8(h), e),
    )
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn q5_0_i8(b: &BlockQ5_0) -> (int8x16_t, int8x16_t) {
    let (l, h) = nibbles(&b.qs);
    let (bl, bh) = fifth_bits(b.qh);
    let s = vdupq_n_s8(16);
    (
        vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l, bl)), s),
        vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(h, bh)), s),
    )
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn q8_0_i8(b: &BlockQ8_0) -> (int8x16_t, int8x16_t) {
    (vld1q_s8(b.qs.as_ptr()), vld1q_s8(b.qs.as_ptr().add(16)))
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn iq4_nl_i8(b: &BlockQ4_0) -> (int8x16_t, int8x16_t) {
    let t = vld1q_s8(IQ4NL_VALUES.as_ptr());
    let (l, h) = nibbles(&b.qs);
    (vqtbl1q_s8(t, l), vqtbl1q_s8(t, h))
}

/// MXFP4: the nibbles index twice the E2M1 values.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn mxfp4_i8(b: &BlockMxfp4) -> (int8x16_t, int8x16_t) {
    let t = vld1q_s8(FP4_VALUES.as_ptr());
    let (l, h) = nibbles(&b.qs);
    (vqtbl1q_s8(t, l), vqtbl1q_s8(t, h))
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn q4_1_i8(b: &BlockQ4_1) -> (int8x16_t, int8x16_t) {
    let (l, h) = nibbles(&b.qs);
    (vreinterpretq_s8_u8(l), vreinterpretq_s8_u8(h))
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn q5_1_i8(b: &BlockQ5_1) -> (int8x16_t, int8x16_t) {
    let (l, h) = nibbles(&b.qs);
    let (bl, bh) = fifth_bits(b.qh);
    (
        vreinterpretq_s8_u8(vorrq_u8(l, bl)),
        vreinterpretq_s8_u8(vorrq_u8(h, bh)),
    )
}

macro_rules! legacy_dot {
    ($name:ident, $feat:literal, $dot:ident, $wb:ty, $ab:ty, $unpack:ident, $min:expr) => {
        legacy_dot!($name, $feat, $dot, $wb, $ab, $unpack, $min, f16_scales);
    };
    ($name:ident, $feat:literal, $dot:ident, $wb:ty, $ab:ty, $unpack:ident, $min:expr, $scale:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: &[$wb], a: &[$ab]) -> f32 {
            // The block's integer sum is reduced exactly, then scaled and added in block order:
            // the scalar reference's expression, so both NEON tiers match it bit for bit.
            let mut total = 0.0f32;
            for (b, y) in w.iter().zip(a) {
                let (q0, q1) = $unpack(b);
                let s = $dot(vdupq_n_s32(0), q0, vld1q_s8(y.qs.as_ptr()));
                let s = $dot(s, q1, vld1q_s8(y.qs.as_ptr().add(16)));
                total += $scale(b, y) * vaddvq_s32(s) as f32 + $min(b, y);
            }
            total
        }
    };
}

/// The product of a legacy weight block's f16 scale and the activation block's.
trait F16Scale {
    fn d(&self) -> [u8; 2];
}
macro_rules! f16_scale {
    ($($t:ty),*) => { $(impl F16Scale for $t { fn d(&self) -> [u8; 2] { self.d } })* };
}
f16_scale!(BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1);

fn f16_scales<B: F16Scale, A: F16Scale>(b: &B, y: &A) -> f32 {
    h(b.d()) * h(y.d())
}

/// MXFP4's: 2^(e − 128) times the activation's (the scalar reference's order).
fn mxfp4_scales(b: &BlockMxfp4, y: &BlockQ8_0) -> f32 {
    e8m0_half(b.e) * h(y.d)
}

fn no_min<B, A>(_: &B, _: &A) -> f32 {
    0.0
}
fn min_q4_1(b: &BlockQ4_1, y: &BlockQ8_1) -> f32 {
    h(b.m) * h(y.s)
}
fn min_q5_1(b: &BlockQ5_1, y: &BlockQ8_1) -> f32 {
    h(b.m) * h(y.s)
}

legacy_dot!(q4_0_n, "neon", dot16_neon, BlockQ4_0, BlockQ8_0, q4_0_i8, no_min);
legacy_dot!(q5_0_n, "neon", dot16_neon, BlockQ5_0, BlockQ8_0, q5_0_i8, no_min);
legacy_dot!(q8_0_n, "neon", dot16_neon, BlockQ8_0, BlockQ8_0, q8_0_i8, no_min);
legacy_dot!(iq4_nl_n, "neon", dot16_neon, BlockQ4_0, BlockQ8_0, iq4_nl_i8, no_min);
legacy_dot!(q4_1_n, "neon", dot16_neon, BlockQ4_1, BlockQ8_1, q4_1_i8, min_q4_1);
legacy_dot!(
    mxfp4_n,
    "neon",
    dot16_neon,
    BlockMxfp4,
    BlockQ8_0,
    mxfp4_i8,
    no_min,
    mxfp4_scales
);
legacy_dot!(
    mxfp4_d,
    "neon,dotprod",
    dot16_sdot,
    BlockMxfp4,
    BlockQ8_0,
    mxfp4_i8,
    no_min,
    mxfp4_scales
);
legacy_dot!(q5_1_n, "neon", dot16_neon, BlockQ5_1, BlockQ8_1, q5_1_i8, min_q5_1);
legacy_dot!(
    q4_0_d,
    "neon,dotprod",
    dot16_sdot,
    BlockQ4_0,
    BlockQ8_0,
    q4_0_i8,
    no_min
);
legacy_dot!(
    q5_0_d,
    "neon,dotprod",
    dot16_sdot,
    BlockQ5_0,
    BlockQ8_0,
    q5_0_i8,
    no_min
);
legacy_dot!(
    q8_0_d,
    "neon,dotprod",
    dot16_sdot,
    BlockQ8_0,
    BlockQ8_0,
    q8_0_i8,
    no_min
);
legacy_dot!(
    iq4_nl_d,
    "neon,dotprod",
    dot16_sdot,
    BlockQ4_0,
    BlockQ8_0,
    iq4_nl_i8,
    no_min
);
legacy_dot!(
    q4_1_d,
    "neon,dotprod",
    dot16_sdot,
    BlockQ4_1,
    BlockQ8_1,
    q4_1_i8,
    min_q4_1
);
legacy_dot!(
    q5_1_d,
    "neon,dotprod",
    dot16_sdot,
    BlockQ5_1,
    BlockQ8_1,
    q5_1_i8,
    min_q5_1
);

// ---------------------------------------------------------------------------------------------
// K-quants: unpack a super-block to 16 registers of 16 signed values, then Σ scale_j · isum_j.

macro_rules! kdot {
    ($name:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $name(q: &[int8x16_t; 16], a: &BlockQ8K, scales: &[i16; 16]) -> i32 {
            let mut total = 0i32;
            for j in 0..16 {
                let s = $dot(vdupq_n_s32(0), q[j], vld1q_s8(a.qs.as_ptr().add(16 * j)));
                total += scales[j] as i32 * vaddvq_s32(s);
            }
            total
        }
    };
}
kdot!(kdot_n, "neon", dot16_neon);
kdot!(kdot_d, "neon,dotprod", dot16_sdot);

#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_q2k(b: &BlockQ2K) -> [int8x16_t; 16] {
    let m3 = vdupq_n_u8(3);
    let mut q = [vdupq_n_s8(0); 16];
    for half in 0..2 {
        for k in 0..2 {
            let v = vld1q_u8(b.qs.as_ptr().add(32 * half + 16 * k));
            let fields = [
                vandq_u8(v, m3),
                vandq_u8(vshrq_n_u8::<2>(v), m3),
                vandq_u8(vshrq_n_u8::<4>(v), m3),
                vshrq_n_u8::<6>(v),
            ];
            for (p, f) in fields.iter().enumerate() {
                q[8 * half + 2 * p + k] = vreinterpretq_s8_u8(*f);
            }
        }
    }
    q
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_q3k(b: &BlockQ3K) -> [int8x16_t; 16] {
    let mut q = unpack_q2k(&BlockQ2K {
        scales: [0; 16],
        qs: b.qs,
        d: [0; 2],
        dmin: [0; 2],
    });
    for half in 0..2 {
        for p in 0..4 {
            let m = vdupq_n_u8(1 << (4 * half + p));
            for k in 0..2 {
                let hm = vld1q_u8(b.hmask.as_ptr().add(16 * k));
                // 4 where the high bit is clear, to subtract.
                let clear = vandq_u8(vceqq_u8(vandq_u8(hm, m), vdupq_n_u8(0)), vdupq_n_u8(4));
                let idx = 8 * half + 2 * p + k;
                q[idx] = vsubq_s8(q[idx], vreinterpretq_s8_u8(clear));
            }
        }
    }
    q
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_q4k(b: &BlockQ4K) -> [int8x16_t; 16] {
    let mut q = [vdupq_n_s8(0); 16];
    for c in 0..4 {
        for k in 0..2 {
            let v = vld1q_u8(b.qs.as_ptr().add(32 * c + 16 * k));
            q[4 * c + k] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
            q[4 * c + 2 + k] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
        }
    }
    q
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_q5k(b: &BlockQ5K) -> [int8x16_t; 16] {
    let mut q = unpack_q4k(&BlockQ4K {
        d: b.d,
        dmin: b.dmin,
        scales: b.scales,
        qs: b.qs,
    });
    for c in 0..4 {
        for k in 0..2 {
            let qh = vld1q_u8(b.qh.as_ptr().add(16 * k));
            let lo = vandq_u8(vtstq_u8(qh, vdupq_n_u8(1 << (2 * c))), vdupq_n_u8(16));
            let hi = vandq_u8(vtstq_u8(qh, vdupq_n_u8(2 << (2 * c))), vdupq_n_u8(16));
            q[4 * c + k] = vorrq_s8(q[4 * c + k], vreinterpretq_s8_u8(lo));
            q[4 * c + 2 + k] = vorrq_s8(q[4 * c + 2 + k], vreinterpretq_s8_u8(hi));
        }
    }
    q
}

#[target_feature(enable = "neon")]
#[inline]
unsafe fn unpack_q6k(b: &BlockQ6K) -> [int8x16_t; 16] {
    let mut q = [vdupq_n_s8(0); 16];
    let (m4, m3, o) = (vdupq_n_u8(15), vdupq_n_u8(3), vdupq_n_s8(32));
    for half in 0..2 {
        for k in 0..2 {
            let l0 = vld1q_u8(b.ql.as_ptr().add(64 * half + 16 * k));
            let l1 = vld1q_u8(b.ql.as_ptr().add(64 * half + 32 + 16 * k));
            let hh = vld1q_u8(b.qh.as_ptr().add(32 * half + 16 * k));
            let vals = [
                vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8::<4>(vandq_u8(hh, m3))),
                vorrq_u8(
                    vandq_u8(l1, m4),
                    vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(hh), m3)),
                ),
                vorrq_u8(
                    vshrq_n_u8::<4>(l0),
                    vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(hh), m3)),
                ),
                vorrq_u8(vshrq_n_u8::<4>(l1), vshlq_n_u8::<4>(vshrq_n_u8::<6>(hh))),
            ];
            for (p, v) in vals.iter().enumerate() {
                q[8 * half + 2 * p + k] = vsubq_s8(vreinterpretq_s8_u8(*v), o);
            }
        }
    }
    q
}

macro_rules! kquant_dots {
    ($feat:literal, $kdot:ident, $q2:ident, $q3:ident, $q4:ident, $q5:ident, $q6:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $q2(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
            let mut total = 0.0f32;
            for (b, y) in w.iter().zip(a) {
                let sum = $kdot(&unpack_q2k(b), y, &b.scales.map(|s| (s & 15) as i16));
                let msum: i32 = (0..16).map(|j| (b.scales[j] >> 4) as i32 * y.bsum(j)).sum();
                total += y.d() * (h(b.d) * sum as f32 - h(b.dmin) * msum as f32);
            }
            total
        }
        #[target_feature(enable = $feat)]
        unsafe fn $q3(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
            let mut total = 0.0f32;
            for (b, y) in w.iter().zip(a) {
                let sum = $kdot(&unpack_q3k(b), y, &q3k_scales(&b.scales).map(|s| s as i16));
                total += y.d() * h(b.d) * sum as f32;
            }
            total
        }
        #[target_feature(enable = $feat)]
        unsafe fn $q4(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
            let mut total = 0.0f32;
            for (b, y) in w.iter().zip(a) {
                let (scales, msum) = k4_scales16(&b.scales, y);
                let sum = $kdot(&unpack_q4k(b), y, &scales);
                total += y.d() * (h(b.d) * sum as f32 - h(b.dmin) * msum as f32);
            }
            total
        }
        #[target_feature(enable = $feat)]
        unsafe fn $q5(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
            let mut total = 0.0f32;
            for (b, y) in w.iter().zip(a) {
                let (scales, msum) = k4_scales16(&b.scales, y);
                let sum = $kdot(&unpack_q5k(b), y, &scales);
                total += y.d() * (h(b.d) * sum as f32 - h(b.dmin) * msum as f32);
            }
            total
        }
        #[target_feature(enable = $feat)]
        unsafe fn $q6(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
            let mut total = 0.0f32;
            for (b, y) in w.iter().zip(a) {
                let sum = $kdot(&unpack_q6k(b), y, &b.scales.map(|s| s as i16));
                total += y.d() * h(b.d) * sum as f32;
            }
            total
        }
    };
}
kquant_dots!("neon", kdot_n, q2k_n, q3k_n, q4k_n, q5k_n, q6k_n);
kquant_dots!("neon,dotprod", kdot_d, q2k_d, q3k_d, q4k_d, q5k_d, q6k_d);

macro_rules! entry {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            fn $name(w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: installed by `specialize` only when the function's features were detected.
                unsafe { $imp(cast_slice(w), cast_slice(a)) }
            }
        )*
    };
}
entry!(
    e_q4_0_n => q4_0_n, e_q5_0_n => q5_0_n, e_q8_0_n => q8_0_n, e_iq4_nl_n => iq4_nl_n,
    e_q4_1_n => q4_1_n, e_q5_1_n => q5_1_n, e_q4_0_d => q4_0_d, e_q5_0_d => q5_0_d,
    e_mxfp4_n => mxfp4_n, e_mxfp4_d => mxfp4_d,
    e_q8_0_d => q8_0_d, e_iq4_nl_d => iq4_nl_d, e_q4_1_d => q4_1_d, e_q5_1_d => q5_1_d,
    e_q2k_n => q2k_n, e_q3k_n => q3k_n, e_q4k_n => q4k_n, e_q5k_n => q5k_n, e_q6k_n => q6k_n,
    e_q2k_d => q2k_d, e_q3k_d => q3k_d, e_q4k_d => q4k_d, e_q5k_d => q5k_d, e_q6k_d => q6k_d,
    e_iq4xs_n => iq4xs_n, e_iq2xxs_n => iq2xxs_n, e_iq2xs_n => iq2xs_n, e_iq2s_n => iq2s_n,
    e_iq3xxs_n => iq3xxs_n, e_iq3s_n => iq3s_n, e_iq1s_n => iq1s_n, e_iq1m_n => iq1m_n,
    e_iq4xs_d => iq4xs_d, e_iq2xxs_d => iq2xxs_d, e_iq2xs_d => iq2xs_d, e_iq2s_d => iq2s_d,
    e_iq3xxs_d => iq3xxs_d, e_iq3s_d => iq3s_d, e_iq1s_d => iq1s_d, e_iq1m_d => iq1m_d,
);

/// `k` with the NEON kernels of its type swapped in (dotprod ones at that tier).
pub(crate) fn specialize(mut k: Kernels, isa: Isa) -> Kernels {
    use GgmlType::*;
    let d = match isa {
        Isa::Neon => false,
        Isa::NeonDotprod | Isa::NeonI8mm => true,
        _ => return k,
    };
    let dot: Option<crate::DotFn> = match (k.ty, d) {
        (Q4_0, false) => Some(e_q4_0_n),
        (Q5_0, false) => Some(e_q5_0_n),
        (Q8_0, false) => Some(e_q8_0_n),
        (IQ4_NL, false) => Some(e_iq4_nl_n),
        (MXFP4, false) => Some(e_mxfp4_n),
        (Q4_1, false) => Some(e_q4_1_n),
        (Q5_1, false) => Some(e_q5_1_n),
        (Q2_K, false) => Some(e_q2k_n),
        (Q3_K, false) => Some(e_q3k_n),
        (Q4_K, false) => Some(e_q4k_n),
        (Q5_K, false) => Some(e_q5k_n),
        (Q6_K, false) => Some(e_q6k_n),
        (Q4_0, true) => Some(e_q4_0_d),
        (Q5_0, true) => Some(e_q5_0_d),
        (Q8_0, true) => Some(e_q8_0_d),
        (IQ4_NL, true) => Some(e_iq4_nl_d),
        (MXFP4, true) => Some(e_mxfp4_d),
        (Q4_1, true) => Some(e_q4_1_d),
        (Q5_1, true) => Some(e_q5_1_d),
        (Q2_K, true) => Some(e_q2k_d),
        (Q3_K, true) => Some(e_q3k_d),
        (Q4_K, true) => Some(e_q4k_d),
        (Q5_K, true) => Some(e_q5k_d),
        (Q6_K, true) => Some(e_q6k_d),
        (IQ4_XS, false) => Some(e_iq4xs_n),
        (IQ2_XXS, false) => Some(e_iq2xxs_n),
        (IQ2_XS, false) => Some(e_iq2xs_n),
        (IQ2_S, false) => Some(e_iq2s_n),
        (IQ3_XXS, false) => Some(e_iq3xxs_n),
        (IQ3_S, false) => Some(e_iq3s_n),
        (IQ1_S, false) => Some(e_iq1s_n),
        (IQ1_M, false) => Some(e_iq1m_n),
        (IQ4_XS, true) => Some(e_iq4xs_d),
        (IQ2_XXS, true) => Some(e_iq2xxs_d),
        (IQ2_XS, true) => Some(e_iq2xs_d),
        (IQ2_S, true) => Some(e_iq2s_d),
        (IQ3_XXS, true) => Some(e_iq3xxs_d),
        (IQ3_S, true) => Some(e_iq3s_d),
        (IQ1_S, true) => Some(e_iq1s_d),
        (IQ1_M, true) => Some(e_iq1m_d),
        _ => None,
    };
    if let Some(f) = dot {
        k.dot = f;
    }
    k.packed = packed::kernel(k.ty, isa);
    k
}
