//! AVX-512 (F/BW/VL) kernels for the legacy block types, two blocks per 512-bit register, in two
//! flavours: `vpmaddubsw` + `vpmaddwd` (plain AVX-512BW) and `vpdpbusd` (VNNI). Blocks are
//! unpacked with the AVX2 helpers; an odd last block goes through the 256-bit path. Every function
//! is `unsafe` only for its CPU features; `x86::specialize` installs the entries only after
//! `Isa::Avx512` / `Isa::Avx512Vnni` were detected.

use core::arch::x86_64::*;

use super::avx2::{
    dot_i8, fp16_mul, hsum_ps, iq4_nl_i8, q4_0_i8, q4_1_u8, q5_0_i8, q5_1_u8, q8_0_i8,
};
use crate::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};
use bytemuck::cast_slice;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn load2(a: &[i8; 32], b: &[i8; 32]) -> __m512i {
    join(
        _mm256_loadu_si256(a.as_ptr().cast()),
        _mm256_loadu_si256(b.as_ptr().cast()),
    )
}

/// Lanes 0..7 = d0, 8..15 = d1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn scales2(d0: f32, d1: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1))
}

/// u8 × i8 products summed in groups of four, as 16 lanes of i32 (BW flavour).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn dpbusd_bw(u: __m512i, s: __m512i) -> __m512i {
    _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1))
}

/// The same with VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn dpbusd_vnni(u: __m512i, s: __m512i) -> __m512i {
    _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s)
}

/// Signed × signed through the sign trick: |w| × (a with w's sign).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn abs_and_signed(w: __m512i, a: __m512i) -> (__m512i, __m512i) {
    let neg = _mm512_movepi8_mask(w);
    (
        _mm512_abs_epi8(w),
        _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a),
    )
}

macro_rules! signed_dot512 {
    ($name:ident, $feat:literal, $dp:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: &[$wb], a: &[BlockQ8_0]) -> f32 {
            let mut acc = _mm512_setzero_ps();
            let pairs = w.len() / 2;
            for i in 0..pairs {
                let (b0, b1, y0, y1) = (&w[2 * i], &w[2 * i + 1], &a[2 * i], &a[2 * i + 1]);
                let (u, s) = abs_and_signed(join($unpack(b0), $unpack(b1)), load2(&y0.qs, &y1.qs));
                let sum = _mm512_cvtepi32_ps($dp(u, s));
                let d = scales2(fp16_mul(b0.d, y0.d), fp16_mul(b1.d, y1.d));
                acc = _mm512_fmadd_ps(d, sum, acc);
            }
            let mut total = _mm512_reduce_add_ps(acc);
            if w.len() % 2 == 1 {
                let (b, y) = (&w[w.len() - 1], &a[w.len() - 1]);
                let s = _mm256_cvtepi32_ps(dot_i8(
                    $unpack(b),
                    _mm256_loadu_si256(y.qs.as_ptr().cast()),
                ));
                total += hsum_ps(_mm256_mul_ps(_mm256_set1_ps(fp16_mul(b.d, y.d)), s));
            }
            total
        }
    };
}

macro_rules! unsigned_dot512 {
    ($name:ident, $feat:literal, $dp:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: &[$wb], a: &[BlockQ8_1]) -> f32 {
            let mut acc = _mm512_setzero_ps();
            let mut mins = 0.0f32;
            let pairs = w.len() / 2;
            for i in 0..pairs {
                let (b0, b1, y0, y1) = (&w[2 * i], &w[2 * i + 1], &a[2 * i], &a[2 * i + 1]);
                let sum =
                    _mm512_cvtepi32_ps($dp(join($unpack(b0), $unpack(b1)), load2(&y0.qs, &y1.qs)));
                let d = scales2(fp16_mul(b0.d, y0.d), fp16_mul(b1.d, y1.d));
                acc = _mm512_fmadd_ps(d, sum, acc);
                mins += fp16_mul(b0.m, y0.s) + fp16_mul(b1.m, y1.s);
            }
            let mut total = _mm512_reduce_add_ps(acc);
            if w.len() % 2 == 1 {
                let (b, y) = (&w[w.len() - 1], &a[w.len() - 1]);
                let p = _mm256_maddubs_epi16($unpack(b), _mm256_loadu_si256(y.qs.as_ptr().cast()));
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
                total += hsum_ps(_mm256_mul_ps(_mm256_set1_ps(fp16_mul(b.d, y.d)), s));
                mins += fp16_mul(b.m, y.s);
            }
            total + mins
        }
    };
}

signed_dot512!(
    q4_0_bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dpbusd_bw,
    BlockQ4_0,
    q4_0_i8
);
signed_dot512!(
    q5_0_bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dpbusd_bw,
    BlockQ5_0,
    q5_0_i8
);
signed_dot512!(
    q8_0_bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dpbusd_bw,
    BlockQ8_0,
    q8_0_i8
);
signed_dot512!(
    iq4_nl_bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dpbusd_bw,
    BlockQ4_0,
    iq4_nl_i8
);
unsigned_dot512!(
    q4_1_bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dpbusd_bw,
    BlockQ4_1,
    q4_1_u8
);
unsigned_dot512!(
    q5_1_bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dpbusd_bw,
    BlockQ5_1,
    q5_1_u8
);
signed_dot512!(
    q4_0_vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dpbusd_vnni,
    BlockQ4_0,
    q4_0_i8
);
signed_dot512!(
    q5_0_vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dpbusd_vnni,
    BlockQ5_0,
    q5_0_i8
);
signed_dot512!(
    q8_0_vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dpbusd_vnni,
    BlockQ8_0,
    q8_0_i8
);
signed_dot512!(
    iq4_nl_vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dpbusd_vnni,
    BlockQ4_0,
    iq4_nl_i8
);
unsigned_dot512!(
    q4_1_vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dpbusd_vnni,
    BlockQ4_1,
    q4_1_u8
);
unsigned_dot512!(
    q5_1_vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dpbusd_vnni,
    BlockQ5_1,
    q5_1_u8
);

macro_rules! entry {
    ($name:ident, $imp:ident) => {
        pub(crate) fn $name(w: &[u8], a: &[u8]) -> f32 {
            // SAFETY: installed by x86::specialize only when this tier's features were detected.
            unsafe { $imp(cast_slice(w), cast_slice(a)) }
        }
    };
}

entry!(dot_q4_0_bw, q4_0_bw);
entry!(dot_q5_0_bw, q5_0_bw);
entry!(dot_q8_0_bw, q8_0_bw);
entry!(dot_iq4_nl_bw, iq4_nl_bw);
entry!(dot_q4_1_bw, q4_1_bw);
entry!(dot_q5_1_bw, q5_1_bw);
entry!(dot_q4_0_vnni, q4_0_vnni);
entry!(dot_q5_0_vnni, q5_0_vnni);
entry!(dot_q8_0_vnni, q8_0_vnni);
entry!(dot_iq4_nl_vnni, iq4_nl_vnni);
entry!(dot_q4_1_vnni, q4_1_vnni);
entry!(dot_q5_1_vnni, q5_1_vnni);
