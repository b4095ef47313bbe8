//! AVX-512 VNNI variants of the AVX2 legacy dots: the same 256-bit loop and float order (so
//! results are bit-identical to the AVX2 tier and to llama.cpp, which does the same on VNNI
//! machines), with `vpdpbusd` replacing `vpmaddubsw` + `vpmaddwd` for the integer part. Wider
//! two-blocks-per-register kernels were tried and dropped: no faster here, and their different
//! summation order moved results away from llama.cpp's. `x86::specialize` installs these only
//! after `Isa::Avx512Vnni` was detected.

use core::arch::x86_64::*;

use super::avx2::{
    fp16_mul, hsum_ps, iq4_nl_i8, load32, q4_0_i8, q4_1_u8, q5_0_i8, q5_1_u8, q8_0_i8, signed_dot,
    unsigned_dot,
};
use crate::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};
use bytemuck::cast_slice;

/// Σ w·a of signed bytes as 8 lanes of i32: |w| × (a with w's sign), with `vpdpbusd`.
#[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512vnni")]
#[inline]
unsafe fn dot_i8_vnni(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(
        _mm256_setzero_si256(),
        _mm256_sign_epi8(w, w),
        _mm256_sign_epi8(a, w),
    )
}

/// Σ w·a with unsigned w.
#[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512vnni")]
#[inline]
unsafe fn dot_u8_vnni(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
}

signed_dot!(
    q4_0,
    q4_0_4,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    dot_i8_vnni,
    BlockQ4_0,
    q4_0_i8
);
signed_dot!(
    q5_0,
    q5_0_4,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    dot_i8_vnni,
    BlockQ5_0,
    q5_0_i8
);
signed_dot!(
    q8_0,
    q8_0_4,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    dot_i8_vnni,
    BlockQ8_0,
    q8_0_i8
);
signed_dot!(
    iq4_nl,
    iq4_nl_4,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    dot_i8_vnni,
    BlockQ4_0,
    iq4_nl_i8
);
unsigned_dot!(
    q4_1,
    q4_1_4,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    dot_u8_vnni,
    BlockQ4_1,
    q4_1_u8
);
unsigned_dot!(
    q5_1,
    q5_1_4,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    dot_u8_vnni,
    BlockQ5_1,
    q5_1_u8
);

macro_rules! entry {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: installed by x86::specialize only when Isa::Avx512Vnni is available.
                unsafe { $imp(cast_slice(w), cast_slice(a)) }
            }
        )*
    };
}

entry!(
    dot_q4_0 => q4_0, dot_q5_0 => q5_0, dot_q8_0 => q8_0,
    dot_iq4_nl => iq4_nl, dot_q4_1 => q4_1, dot_q5_1 => q5_1,
);

macro_rules! entry4 {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: &[u8], a: [&[u8]; 4], out: &mut [f32; 4]) {
                // SAFETY: installed by x86::specialize only when Isa::Avx512Vnni is available.
                unsafe { $imp(cast_slice(w), a.map(cast_slice), out) }
            }
        )*
    };
}

entry4!(
    dot4_q4_0 => q4_0_4, dot4_q5_0 => q5_0_4, dot4_q8_0 => q8_0_4,
    dot4_iq4_nl => iq4_nl_4, dot4_q4_1 => q4_1_4, dot4_q5_1 => q5_1_4,
);
