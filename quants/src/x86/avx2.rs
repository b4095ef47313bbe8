//! AVX2 (+FMA, F16C) kernels. Every function here is `unsafe` only because it needs those CPU
//! features; the byte-slice wrappers at the bottom are installed by `x86::specialize` only after
//! `Isa::Avx2.is_available()` returned true.
//!
//! Legacy types: each block is unpacked to 32 signed (or unsigned) bytes in one register and
//! multiplied with the activation bytes by `vpmaddubsw` (sign trick for signed weights); block
//! sums are scaled and accumulated in 8 float lanes. K-quants: a super-block is unpacked to eight
//! registers of 32 unsigned values, multiplied with the activation and weighted by the sub-block
//! scales in 32-bit integers; the offset terms use the activation's bsums. The K-quant results
//! are bit-exact with the scalar reference (same integers, same float expression per block).

use core::arch::x86_64::*;

use crate::float::KvElem;
use crate::iq_grid::{
    BlockIq1M, BlockIq1S, BlockIq2S, BlockIq2Xs, BlockIq2Xxs, BlockIq3S, BlockIq3Xxs, Groups, Iq1,
    IQ1_FACTOR,
};
use crate::iquants::BlockIq4Xs;
use crate::kquants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, QK_K};
use crate::legacy::{
    BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, IQ4NL_VALUES,
};
use crate::mxfp4::{e8m0_half, BlockMxfp4, FP4_VALUES};
use bytemuck::{cast_slice, cast_slice_mut, Zeroable};

// ---------------------------------------------------------------------------------------------
// Helpers.

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn fp16(b: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(b) as i32),
    ))
}

/// f16(a) · f16(b) (the product of two block scales). Both halves travel in one 32-bit GPR so
/// that the conversion starts from a `vmovd`: with a single u16, LLVM folds the load into a
/// `vpinsrw` that merges into whatever register is free — in the dot loops, the accumulator —
/// a false dependency that serialised them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn fp16_mul(a: [u8; 2], b: [u8; 2]) -> f32 {
    let bits = u16::from_le_bytes(a) as u32 | ((u16::from_le_bytes(b) as u32) << 16);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    _mm_cvtss_f32(_mm_mul_ss(v, _mm_movehdup_ps(v)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn load32(p: &[i8; 32]) -> __m256i {
    _mm256_loadu_si256(p.as_ptr().cast())
}

/// 32 nibbles in element order: low nibbles (elements 0..15) then high nibbles (16..31).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let t = _mm_loadu_si128(qs.as_ptr().cast());
    let m = _mm_set1_epi8(15);
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(t), m),
        _mm_and_si128(t, m),
    )
}

/// Byte i is 0xFF where bit i of the little-endian u32 `qh` is set, else 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn bits_to_bytes(qh: [u8; 4]) -> __m256i {
    let v = _mm256_set1_epi32(u32::from_le_bytes(qh) as i32);
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, shuf), bit), bit)
}

// Weight blocks as 32 signed bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q4_0_i8(b: &BlockQ4_0) -> __m256i {
    _mm256_sub_epi8(nibbles(&b.qs), _mm256_set1_epi8(8))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q5_0_i8(b: &BlockQ5_0) -> __m256i {
    // nibble | 0xF0 is nibble − 16 as a signed byte: set where the fifth bit is clear.
    let clear = _mm256_andnot_si256(bits_to_bytes(b.qh), _mm256_set1_epi8(0xF0u8 as i8));
    _mm256_or_si256(nibbles(&b.qs), clear)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q8_0_i8(b: &BlockQ8_0) -> __m256i {
    load32(&b.qs)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn iq4_nl_i8(b: &BlockQ4_0) -> __m256i {
    let t = _mm_loadu_si128(IQ4NL_VALUES.as_ptr().cast());
    _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles(&b.qs))
}

/// MXFP4: the nibbles index twice the E2M1 values, as IQ4_NL's index its codebook.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn mxfp4_i8(b: &BlockMxfp4) -> __m256i {
    let t = _mm_loadu_si128(FP4_VALUES.as_ptr().cast());
    _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles(&b.qs))
}

// Unsigned weight blocks (Q4_1 / Q5_1).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q4_1_u8(b: &BlockQ4_1) -> __m256i {
    nibbles(&b.qs)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q5_1_u8(b: &BlockQ5_1) -> __m256i {
    let hi = _mm256_and_si256(bits_to_bytes(b.qh), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles(&b.qs), hi)
}

/// Σ w·a of signed bytes, as 8 lanes of i32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn dot_i8(w: __m256i, a: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// Σ w·a with unsigned w (< 128), as 8 lanes of i32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_u8(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

// ---------------------------------------------------------------------------------------------
// Legacy dot products.

/// A legacy signed-weight dot: per block, the integer dot `$dot` of the unpacked weights with
/// the activation bytes, scaled and accumulated in 8 float lanes in block order — the same order
/// as llama.cpp's AVX2 `ggml_vec_dot_*_q8_0`, so that results agree with it bit for bit.
macro_rules! signed_dot {
    ($name:ident, $name4:ident, $feat:literal, $dot:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: &[$wb], a: &[BlockQ8_0]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (b, y) in w.iter().zip(a) {
                let s = _mm256_cvtepi32_ps($dot($unpack(b), load32(&y.qs)));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16_mul(b.d, y.d)), s, acc);
            }
            hsum_ps(acc)
        }

        /// Four activation rows at once: each block is unpacked once; each row's accumulation
        /// order is the single-row one, so results are identical to four `$name` calls.
        #[target_feature(enable = $feat)]
        unsafe fn $name4(w: &[$wb], a: [&[BlockQ8_0]; 4], out: &mut [f32; 4]) {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, b) in w.iter().enumerate() {
                let q = $unpack(b);
                for (ac, ar) in acc.iter_mut().zip(&a) {
                    let y = &ar[i];
                    let s = _mm256_cvtepi32_ps($dot(q, load32(&y.qs)));
                    *ac = _mm256_fmadd_ps(_mm256_set1_ps(fp16_mul(b.d, y.d)), s, *ac);
                }
            }
            for (o, ac) in out.iter_mut().zip(acc) {
                *o = hsum_ps(ac);
            }
        }
    };
}

/// The same for unsigned weights with a minimum (Q4_1, Q5_1 against Q8_1).
macro_rules! unsigned_dot {
    ($name:ident, $name4:ident, $feat:literal, $dot:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: &[$wb], a: &[BlockQ8_1]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0.0f32;
            for (b, y) in w.iter().zip(a) {
                let s = _mm256_cvtepi32_ps($dot($unpack(b), load32(&y.qs)));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16_mul(b.d, y.d)), s, acc);
                mins += fp16_mul(b.m, y.s);
            }
            hsum_ps(acc) + mins
        }

        #[target_feature(enable = $feat)]
        unsafe fn $name4(w: &[$wb], a: [&[BlockQ8_1]; 4], out: &mut [f32; 4]) {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut mins = [0.0f32; 4];
            for (i, b) in w.iter().enumerate() {
                let q = $unpack(b);
                for ((ac, m), ar) in acc.iter_mut().zip(mins.iter_mut()).zip(&a) {
                    let y = &ar[i];
                    let s = _mm256_cvtepi32_ps($dot(q, load32(&y.qs)));
                    *ac = _mm256_fmadd_ps(_mm256_set1_ps(fp16_mul(b.d, y.d)), s, *ac);
                    *m += fp16_mul(b.m, y.s);
                }
            }
            for ((o, ac), m) in out.iter_mut().zip(acc).zip(mins) {
                *o = hsum_ps(ac) + m;
            }
        }
    };
}

pub(super) use {signed_dot, unsigned_dot};

signed_dot!(
    dot_q4_0_impl,
    dot4_q4_0_impl,
    "avx2,fma,f16c",
    dot_i8,
    BlockQ4_0,
    q4_0_i8
);
signed_dot!(
    dot_q5_0_impl,
    dot4_q5_0_impl,
    "avx2,fma,f16c",
    dot_i8,
    BlockQ5_0,
    q5_0_i8
);
signed_dot!(
    dot_q8_0_impl,
    dot4_q8_0_impl,
    "avx2,fma,f16c",
    dot_i8,
    BlockQ8_0,
    q8_0_i8
);
signed_dot!(
    dot_iq4_nl_impl,
    dot4_iq4_nl_impl,
    "avx2,fma,f16c",
    dot_i8,
    BlockQ4_0,
    iq4_nl_i8
);
unsigned_dot!(
    dot_q4_1_impl,
    dot4_q4_1_impl,
    "avx2,fma,f16c",
    dot_u8,
    BlockQ4_1,
    q4_1_u8
);
unsigned_dot!(
    dot_q5_1_impl,
    dot4_q5_1_impl,
    "avx2,fma,f16c",
    dot_u8,
    BlockQ5_1,
    q5_1_u8
);

/// 2^(e − 128) · f16(d), broadcast. The f16 goes through `fp16_mul` (times an f16 1.0) so that
/// its conversion starts from a `vmovd`, for the reason given there: a lone u16 became a
/// `vpinsrw` merging into a live register, and the kernel ran at half speed (4.8 against 9.5
/// GiB/s in `cargo bench -- MXFP4/dot/avx2`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn mxfp4_scale(e: u8, d: [u8; 2]) -> __m256 {
    _mm256_set1_ps(fp16_mul(d, [0x00, 0x3c]) * e8m0_half(e))
}

/// MXFP4 against Q8_0: the signed-byte dot of the legacy types, each block scaled by
/// 2^(e − 128) · d_a (ggml's AVX2 kernel multiplies the same two factors).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_mxfp4_impl(w: &[BlockMxfp4], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, y) in w.iter().zip(a) {
        let s = _mm256_cvtepi32_ps(dot_i8(mxfp4_i8(b), load32(&y.qs)));
        acc = _mm256_fmadd_ps(mxfp4_scale(b.e, y.d), s, acc);
    }
    hsum_ps(acc)
}

/// Four activation rows at once, each in the single-row order.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_mxfp4_impl(w: &[BlockMxfp4], a: [&[BlockQ8_0]; 4], out: &mut [f32; 4]) {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (i, b) in w.iter().enumerate() {
        let q = mxfp4_i8(b);
        for (ac, ar) in acc.iter_mut().zip(&a) {
            let y = &ar[i];
            let s = _mm256_cvtepi32_ps(dot_i8(q, load32(&y.qs)));
            *ac = _mm256_fmadd_ps(mxfp4_scale(b.e, y.d), s, *ac);
        }
    }
    for (o, ac) in out.iter_mut().zip(acc) {
        *o = hsum_ps(ac);
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy dequantize (bit-exact with scalar: one float multiply per element).

macro_rules! signed_dequant {
    ($name:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(w: &[$wb], out: &mut [f32]) {
            for (b, o) in w.iter().zip(out.chunks_exact_mut(32)) {
                let q = $unpack(b);
                let d = _mm256_set1_ps(fp16(b.d));
                let lo = _mm256_castsi256_si128(q);
                let hi = _mm256_extracti128_si256::<1>(q);
                let parts = [
                    lo,
                    _mm_unpackhi_epi64(lo, lo),
                    hi,
                    _mm_unpackhi_epi64(hi, hi),
                ];
                for (k, p) in parts.iter().enumerate() {
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(*p));
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * k), _mm256_mul_ps(f, d));
                }
            }
        }
    };
}

signed_dequant!(dequant_q4_0_impl, BlockQ4_0, q4_0_i8);
signed_dequant!(dequant_q5_0_impl, BlockQ5_0, q5_0_i8);
signed_dequant!(dequant_q8_0_impl, BlockQ8_0, q8_0_i8);
signed_dequant!(dequant_iq4_nl_impl, BlockQ4_0, iq4_nl_i8);

// ---------------------------------------------------------------------------------------------
// Activation quantizers (bit-exact with `legacy::quantize_q8_0` / `quantize_q8_1`).

/// Rounds one block of 32 floats to bytes the way llama.cpp's AVX paths do; returns (d, Σq).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_block(x: &[f32], qs: &mut [i8; 32]) -> (f32, i32) {
    let v = [
        _mm256_loadu_ps(x.as_ptr()),
        _mm256_loadu_ps(x.as_ptr().add(8)),
        _mm256_loadu_ps(x.as_ptr().add(16)),
        _mm256_loadu_ps(x.as_ptr().add(24)),
    ];
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut m = _mm256_and_ps(v[0], abs);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_and_ps(*vi, abs));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let i: [__m256i; 4] = [
        _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v[0], id))),
        _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v[1], id))),
        _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v[2], id))),
        _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v[3], id))),
    ];
    let sum = hsum_epi32(_mm256_add_epi32(
        _mm256_add_epi32(i[0], i[1]),
        _mm256_add_epi32(i[2], i[3]),
    ));
    let p16a = _mm256_packs_epi32(i[0], i[1]);
    let p16b = _mm256_packs_epi32(i[2], i[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    // The packs interleave 128-bit lanes; put the eight 4-byte groups back in order.
    let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr().cast(), p8);
    (d, sum)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_0_impl(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, _) = q8_block(xb, &mut b.qs);
        b.d = crate::float::f32_to_f16(d).to_le_bytes();
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_1_impl(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, sum) = q8_block(xb, &mut b.qs);
        b.d = crate::float::f32_to_f16(d).to_le_bytes();
        b.s = crate::float::f32_to_f16(sum as f32 * d).to_le_bytes();
    }
}

/// Q8_K (the K-quants' and i-quants' activations), bit-exact with `kquants::quantize_q8k` for
/// finite input and quiet NaNs: the signed value of largest magnitude (the first such), `iscale = −127 / max`,
/// each value `iscale · x` rounded half to even and capped at 127, the block sums of 16.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_k_impl(x: &[f32], out: &mut [BlockQ8K]) {
    const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let mut m = _mm256_setzero_ps();
        for c in 0..32 {
            // A NaN lane keeps m, as the scalar loop's `>` skips NaN.
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p.add(8 * c)), abs), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        if amax == 0.0 {
            *y = BlockQ8K::zeroed();
            continue;
        }
        let target = _mm256_set1_ps(amax);
        let mut max = amax;
        for c in 0..32 {
            let v = _mm256_and_ps(_mm256_loadu_ps(p.add(8 * c)), abs);
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, target));
            if hit != 0 {
                max = xb[8 * c + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let vs = _mm256_set1_ps(iscale);
        let cap = _mm256_set1_epi32(127);
        let mut sums = [_mm256_setzero_si256(); 16];
        for c in 0..8 {
            let i: [__m256i; 4] = std::array::from_fn(|k| {
                let v = _mm256_mul_ps(vs, _mm256_loadu_ps(p.add(32 * c + 8 * k)));
                // NaN to 0, what the scalar `nearest_int` makes of a quiet NaN.
                let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
                _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_round_ps::<RN>(v)), cap)
            });
            sums[2 * c] = _mm256_add_epi32(i[0], i[1]);
            sums[2 * c + 1] = _mm256_add_epi32(i[2], i[3]);
            // |q| <= 127: the packs do not saturate.
            let p8 = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * c).cast(), p8);
        }
        // Four groups' eight lanes at a time to four sums: two rounds of hadd, then the halves.
        let mut bs = [_mm_setzero_si128(); 4];
        for (q, b) in bs.iter_mut().enumerate() {
            let g = &sums[4 * q..4 * q + 4];
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(g[0], g[1]), _mm256_hadd_epi32(g[2], g[3]));
            *b = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        }
        _mm_storeu_si128(y.bsums.as_mut_ptr().cast(), _mm_packs_epi32(bs[0], bs[1]));
        _mm_storeu_si128(
            y.bsums.as_mut_ptr().add(16).cast(),
            _mm_packs_epi32(bs[2], bs[3]),
        );
        y.d = (1.0 / iscale).to_le_bytes();
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants.

/// The 2-bit fields of a Q2_K/Q3_K `qs` as 8 chunks of 32 (chunk 4h+p: half h, shift 2p).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn two_bit_chunks(qs: &[u8; 64]) -> [__m256i; 8] {
    let m3 = _mm256_set1_epi8(3);
    let mut q = [_mm256_setzero_si256(); 8];
    for half in 0..2 {
        let v = _mm256_loadu_si256(qs.as_ptr().add(32 * half).cast());
        q[4 * half] = _mm256_and_si256(v, m3);
        q[4 * half + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(v), m3);
        q[4 * half + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m3);
        q[4 * half + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(v), m3);
    }
    q
}

/// Where bit `bit` of each byte of `v` is set: `val`, else 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bit_to(v: __m256i, bit: usize, val: i8) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << bit) as i8);
    _mm256_and_si256(
        _mm256_cmpeq_epi8(_mm256_and_si256(v, m), m),
        _mm256_set1_epi8(val),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q2k_impl(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
    let m4 = _mm_set1_epi8(15);
    let mut acc = -0.0f32;
    for (b, y) in w.iter().zip(a) {
        let q = two_bit_chunks(&b.qs);
        let sv = _mm_loadu_si128(b.scales.as_ptr().cast());
        let scales = _mm256_cvtepu8_epi16(_mm_and_si128(sv, m4));
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sv), m4));
        let sc = scale_pairs(scales);
        let mut s = _mm256_setzero_si256();
        for c in 0..8 {
            let ay = _mm256_loadu_si256(y.qs.as_ptr().add(32 * c).cast());
            s = pairs_madd(s, _mm256_maddubs_epi16(q[c], ay), sc[c]);
        }
        let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
        let (sum, msum) = hsum2_epi32(s, _mm256_madd_epi16(bs, mins));
        acc += y.d() * (fp16(b.d) * sum as f32 - fp16(b.dmin) * msum as f32);
    }
    acc
}

/// The single-row Q3_K dot: the tile's unpack and term per super-block (vector scales and bsum
/// correction), so a dot and a tile cell are the same expression.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q3k_impl(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    let mut acc = -0.0f32;
    for (b, y) in w.iter().zip(a) {
        acc += q3k_term(&q3k_unpack(b), y);
    }
    acc
}

/// Q5_K's 256 values (0..31), element order, 32 a register.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q5k_values(b: &BlockQ5K) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(15);
    let qh = _mm256_loadu_si256(b.qh.as_ptr().cast());
    let mut q = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        let v = _mm256_loadu_si256(b.qs.as_ptr().add(32 * c).cast());
        q[2 * c] = _mm256_or_si256(_mm256_and_si256(v, m4), bit_to(qh, 2 * c, 16));
        q[2 * c + 1] = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
            bit_to(qh, 2 * c + 1, 16),
        );
    }
    q
}

/// A single-row dot's weight prefetch: the packed kernels' stream ([`crate::isa::prefetch`] at
/// [`crate::isa::weight_prefetch_bytes`]: 8 KiB on Intel, none elsewhere) over a row of
/// blocks. Decode streams every row once from memory, a few hundred bytes to a few KiB per
/// call, too short for the hardware prefetchers: on an Emerald Rapids VM at 2 threads the
/// IQ4_XS and Q6_K dots' prefetch took a Qwen3-width IQ4_XS decode from 27.3 to 35 tok/s.
pub(super) struct Prefetch<'a> {
    row: &'a [u8],
    block: usize,
    dist: usize,
    ahead: usize,
}

impl<'a> Prefetch<'a> {
    #[inline(always)]
    pub(super) fn new<B: bytemuck::Pod>(row: &'a [B]) -> Prefetch<'a> {
        let dist = crate::isa::weight_prefetch_bytes();
        Prefetch {
            row: cast_slice(row),
            block: std::mem::size_of::<B>(),
            dist,
            ahead: dist,
        }
    }

    /// Asks for the lines `dist` bytes past the end of block `i` not asked for yet (running on
    /// past the row into the rows after it, as decode reads them).
    #[inline(always)]
    pub(super) fn through(&mut self, i: usize) {
        if self.dist > 0 {
            self.ahead =
                crate::isa::prefetch(self.row, self.ahead, (i + 1) * self.block + self.dist);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5k_impl(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    // A plain loop: a closure here is compiled as a function of its own, the block's registers
    // passed through memory. `Sum` for f32 folds from −0.0, as this does.
    let mut acc = -0.0f32;
    let mut ahead = Prefetch::new(w);
    for (i, (b, y)) in w.iter().zip(a).enumerate() {
        ahead.through(i);
        let (sc, mins) = k4_scales_simd(&b.scales);
        let u = Q4kUnpacked {
            q: q5k_values(b),
            sc,
            mins,
            d: fp16(b.d),
            dmin: fp16(b.dmin),
        };
        acc += q4k_term(&u, y);
    }
    acc
}

/// One Q6_K super-block unpacked for `vpmaddubsw`: the 256 values (q + 32, 0..63) as eight
/// registers of 32, each chunk's pair of scales as 16-bit lanes, and the sixteen scales.
struct Q6kUnpacked {
    q: [__m256i; 8],
    sc: [__m256i; 8],
    sc16: __m256i,
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_unpack(b: &BlockQ6K) -> Q6kUnpacked {
    let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.scales.as_ptr().cast()));
    Q6kUnpacked {
        q: q6k_values(b),
        sc: scale_pairs(sc16),
        sc16,
    }
}

/// Q6_K's 256 values stored as q + 32 (0..63), element order, 32 a register.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q6k_values(b: &BlockQ6K) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(15);
    let m3 = _mm256_set1_epi8(3);
    let mut q = [_mm256_setzero_si256(); 8];
    for half in 0..2 {
        let l0 = _mm256_loadu_si256(b.ql.as_ptr().add(64 * half).cast());
        let l1 = _mm256_loadu_si256(b.ql.as_ptr().add(64 * half + 32).cast());
        let hh = _mm256_loadu_si256(b.qh.as_ptr().add(32 * half).cast());
        // The two high bits of each value, moved to bits 4..5.
        let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(hh, m3));
        let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(hh), m3));
        let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(hh), m3));
        let h3 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(hh), m3));
        q[4 * half] = _mm256_or_si256(_mm256_and_si256(l0, m4), h0);
        q[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), h1);
        q[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4), h2);
        q[4 * half + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), h3);
    }
    q
}

/// An unpacked Q6_K super-block against its activations, before the horizontal sums: the
/// lanes of Σ scale · (q + 32) · a, and of Σ scale · bsum (the offset's share).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_lanes(u: &Q6kUnpacked, y: &BlockQ8K) -> (__m256i, __m256i) {
    let mut s = _mm256_setzero_si256();
    for (c, (qc, scc)) in u.q.iter().zip(&u.sc).enumerate() {
        let ay = _mm256_loadu_si256(y.qs.as_ptr().add(32 * c).cast());
        s = pairs_madd(s, _mm256_maddubs_epi16(*qc, ay), *scc);
    }
    let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
    (s, _mm256_madd_epi16(bs, u.sc16))
}

/// A Q6_K super-block's term `a.d · d · (Σ sc·(q+32)·a − 32 · Σ sc·bsum)` from its integer sums
/// (values were stored as q + 32, 0..63).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_term(b: &BlockQ6K, y: &BlockQ8K, sum: i32, off: i32) -> f32 {
    y.d() * fp16(b.d) * (sum - 32 * off) as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k_impl(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    // Plain loops (a closure here is compiled as a function of its own, the block's registers
    // passed through memory), super-blocks in pairs whose four integer sums share one
    // horizontal sum. The terms and their float sum are the scalar reference's, in its order
    // (`Sum` for f32 folds from −0.0).
    let n = w.len().min(a.len());
    let mut acc = -0.0f32;
    let mut i = 0;
    let mut ahead = Prefetch::new(w);
    while i + 2 <= n {
        ahead.through(i + 1);
        let (s0, o0) = q6k_lanes(&q6k_unpack(&w[i]), &a[i]);
        let (s1, o1) = q6k_lanes(&q6k_unpack(&w[i + 1]), &a[i + 1]);
        let [s0, o0, s1, o1] = hsum4_epi32(s0, o0, s1, o1);
        acc += q6k_term(&w[i], &a[i], s0, o0);
        acc += q6k_term(&w[i + 1], &a[i + 1], s1, o1);
        i += 2;
    }
    if i < n {
        let (s, o) = q6k_lanes(&q6k_unpack(&w[i]), &a[i]);
        let (s, o) = hsum2_epi32(s, o);
        acc += q6k_term(&w[i], &a[i], s, o);
    }
    acc
}

/// Four activation rows at once (prefill), each super-block unpacked once; each result equals
/// the single-row dot's bit for bit (the same integer sums and terms, each row's terms added in
/// the same order).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q6k_impl(w: &[BlockQ6K], a: [&[BlockQ8K]; 4], out: &mut [f32; 4]) {
    let mut acc = [-0.0f32; 4];
    for (i, b) in w.iter().enumerate() {
        let u = q6k_unpack(b);
        for r in [0, 2] {
            let (y0, y1) = (&a[r][i], &a[r + 1][i]);
            let (s0, o0) = q6k_lanes(&u, y0);
            let (s1, o1) = q6k_lanes(&u, y1);
            let [s0, o0, s1, o1] = hsum4_epi32(s0, o0, s1, o1);
            acc[r] += q6k_term(b, y0, s0, o0);
            acc[r + 1] += q6k_term(b, y1, s1, o1);
        }
    }
    *out = acc;
}

// ---------------------------------------------------------------------------------------------
// Float dot products.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32_impl(w: &[f32], a: &[f32]) -> f32 {
    let n = w.len().min(a.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, ac) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(w.as_ptr().add(i + 8 * k));
            let y = _mm256_loadu_ps(a.as_ptr().add(i + 8 * k));
            *ac = _mm256_fmadd_ps(x, y, *ac);
        }
        i += 32;
    }
    let mut s = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += w[i] * a[i];
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_impl(w: &[u16], a: &[u16]) -> f32 {
    let n = w.len().min(a.len());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (k, ac) in acc.iter_mut().enumerate() {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 8 * k).cast()));
            let y = _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(i + 8 * k).cast()));
            *ac = _mm256_fmadd_ps(x, y, *ac);
        }
        i += 16;
    }
    let mut s = hsum_ps(_mm256_add_ps(acc[0], acc[1]));
    while i < n {
        s += crate::float::f16_to_f32(w[i]) * crate::float::f16_to_f32(a[i]);
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16_impl(w: &[u16], a: &[u16]) -> f32 {
    let n = w.len().min(a.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    let widen = |p: *const u16| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p.cast()),
        )))
    };
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(widen(w.as_ptr().add(i)), widen(a.as_ptr().add(i)), acc);
        i += 8;
    }
    let mut s = hsum_ps(acc);
    while i < n {
        s += crate::float::bf16_to_f32(w[i]) * crate::float::bf16_to_f32(a[i]);
        i += 1;
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Byte-slice entry points installed in the kernel table.

macro_rules! entry {
    (dot $name:ident, $imp:ident) => {
        pub(crate) fn $name(w: &[u8], a: &[u8]) -> f32 {
            // SAFETY: installed by x86::specialize only when Isa::Avx2 is available.
            unsafe { $imp(cast_slice(w), cast_slice(a)) }
        }
    };
    (dequant $name:ident, $imp:ident) => {
        pub(crate) fn $name(src: &[u8], dst: &mut [f32]) {
            // SAFETY: installed by x86::specialize only when Isa::Avx2 is available.
            unsafe { $imp(cast_slice(src), dst) }
        }
    };
    (dot4 $name:ident, $imp:ident) => {
        pub(crate) fn $name(w: &[u8], a: [&[u8]; 4], out: &mut [f32; 4]) {
            // SAFETY: installed by x86::specialize only when Isa::Avx2 is available.
            unsafe { $imp(cast_slice(w), a.map(cast_slice), out) }
        }
    };
    (quant $name:ident, $imp:ident) => {
        pub(crate) fn $name(src: &[f32], dst: &mut [u8]) {
            // SAFETY: installed by x86::specialize only when Isa::Avx2 is available.
            unsafe { $imp(src, cast_slice_mut(dst)) }
        }
    };
}

entry!(dot dot_q4_0, dot_q4_0_impl);
entry!(dot dot_q4_1, dot_q4_1_impl);
entry!(dot dot_q5_0, dot_q5_0_impl);
entry!(dot dot_q5_1, dot_q5_1_impl);
entry!(dot dot_q8_0, dot_q8_0_impl);
entry!(dot dot_iq4_nl, dot_iq4_nl_impl);
entry!(dot dot_mxfp4, dot_mxfp4_impl);
entry!(dot4 dot4_q4_0, dot4_q4_0_impl);
entry!(dot4 dot4_q4_1, dot4_q4_1_impl);
entry!(dot4 dot4_q5_0, dot4_q5_0_impl);
entry!(dot4 dot4_q5_1, dot4_q5_1_impl);
entry!(dot4 dot4_q8_0, dot4_q8_0_impl);
entry!(dot4 dot4_iq4_nl, dot4_iq4_nl_impl);
entry!(dot4 dot4_mxfp4, dot4_mxfp4_impl);
entry!(dot dot_q2_k, dot_q2k_impl);
entry!(dot dot_q3_k, dot_q3k_impl);
entry!(dot dot_q5_k, dot_q5k_impl);
entry!(dot dot_q6_k, dot_q6k_impl);
entry!(dot4 dot4_q6_k, dot4_q6k_impl);
entry!(dot dot_iq4_xs, dot_iq4_xs_impl);
entry!(dot4 dot4_iq4_xs, dot4_iq4_xs_impl);
entry!(dot dot_f32, dot_f32_impl);
entry!(dot dot_f16, dot_f16_impl);
entry!(dot dot_bf16, dot_bf16_impl);
entry!(dequant dequant_q4_0, dequant_q4_0_impl);
entry!(dequant dequant_q5_0, dequant_q5_0_impl);
entry!(dequant dequant_q8_0, dequant_q8_0_impl);
entry!(dequant dequant_iq4_nl, dequant_iq4_nl_impl);
entry!(quant quantize_q8_0, quantize_q8_0_impl);
entry!(quant quantize_q8_1, quantize_q8_1_impl);
entry!(quant quantize_q8_k, quantize_q8_k_impl);

/// IQ4_XS sub-block `ib`'s codes looked up to signed bytes (IQ4_NL's codebook), in element
/// order, and their absolute values (for `vpmaddubsw`'s unsigned operand).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq4_xs_i8(table: __m256i, w: &BlockIq4Xs, ib: usize) -> (__m256i, __m256i) {
    let qs: &[u8; 16] = w.qs[16 * ib..16 * ib + 16].try_into().unwrap();
    let v = _mm256_shuffle_epi8(table, nibbles(qs));
    (v, _mm256_sign_epi8(v, v))
}

/// Σ_sub-blocks l · Σ(value · activation) of one super-block against one activation block, as
/// 8 lanes of i32: the pair sums of `vpmaddubsw` weighted by l in `vpmaddwd`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq4_xs_block(units: &[(__m256i, __m256i); 8], ls: &[i16; 8], a: &BlockQ8K) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for (ib, &(v, av)) in units.iter().enumerate() {
        let x = _mm256_loadu_si256(a.qs[32 * ib..].as_ptr().cast());
        let p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(x, v));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(ls[ib])));
    }
    hsum_epi32(acc)
}

/// A super-block unpacked once: its eight sub-blocks' values and scales.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq4_xs_unpack(table: __m256i, w: &BlockIq4Xs) -> ([(__m256i, __m256i); 8], [i16; 8]) {
    let units = std::array::from_fn(|ib| iq4_xs_i8(table, w, ib));
    (units, std::array::from_fn(|ib| w.scale(ib) as i16))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq4_table() -> __m256i {
    let t = _mm_loadu_si128(IQ4NL_VALUES.as_ptr().cast());
    _mm256_set_m128i(t, t)
}

/// IQ4_XS · Q8_K, bit-exact with the scalar reference (the same integers per super-block, the
/// same float expression and order).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_iq4_xs_impl(w: &[BlockIq4Xs], a: &[BlockQ8K]) -> f32 {
    let table = iq4_table();
    let mut sum = 0.0f32;
    let mut ahead = Prefetch::new(w);
    for (i, (w, a)) in w.iter().zip(a).enumerate() {
        ahead.through(i);
        let (units, ls) = iq4_xs_unpack(table, w);
        sum += fp16(w.d) * a.d() * iq4_xs_block(&units, &ls, a) as f32;
    }
    sum
}

/// Four activation rows at once: each sub-block's values looked up once for the four, one
/// accumulator per row (no unpacked super-block held in registers), and one horizontal sum
/// for the four rows' integers per super-block; each result equals the single-row dot's bit
/// for bit (the same integers in the same float expression).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_iq4_xs_impl(w: &[BlockIq4Xs], a: [&[BlockQ8K]; 4], out: &mut [f32; 4]) {
    let table = iq4_table();
    let mut sum = [0.0f32; 4];
    for (i, w) in w.iter().enumerate() {
        let ys = [&a[0][i], &a[1][i], &a[2][i], &a[3][i]];
        let mut acc = [_mm256_setzero_si256(); 4];
        for ib in 0..8 {
            let (v, av) = iq4_xs_i8(table, w, ib);
            let sc = _mm256_set1_epi16(w.scale(ib) as i16);
            for (ac, y) in acc.iter_mut().zip(&ys) {
                let x = _mm256_loadu_si256(y.qs[32 * ib..].as_ptr().cast());
                let p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(x, v));
                *ac = _mm256_add_epi32(*ac, _mm256_madd_epi16(p, sc));
            }
        }
        let isums = hsum4_epi32(acc[0], acc[1], acc[2], acc[3]);
        let d = fp16(w.d);
        for ((s, y), is) in sum.iter_mut().zip(&ys).zip(isums) {
            *s += d * y.d() * is as f32;
        }
    }
    *out = sum;
}

// ---------------------------------------------------------------------------------------------
// The grid i-quants (IQ2_XXS/XS/S, IQ3_XXS/S, IQ1_S/M): the grid rows, signs and scales are
// looked up as the scalar reference does; each unit of 32 weights is one `vpmaddubsw` (the
// magnitudes against the activations with the weights' signs) and one `vpmaddwd` by the unit's
// two 16-weight scales. The same integers per super-block and the same float expression as
// the scalar dots: bit for bit.

/// One unit of 32 weights ready for `vpmaddubsw`: their magnitudes, a vector whose byte signs
/// are theirs (±1, or the weights themselves), and their two 16-weight scales as i16 lanes.
type GridUnit = (__m256i, __m256i, __m256i);

/// Unit u (weights 32u..32u+32) of an IQ2/IQ3 super-block: four rows of eight magnitudes,
/// their sign bytes spread to ±1 bytes, the scales of groups 4u and 4u + 2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn grid_unit<B: Groups>(b: &B, u: usize) -> GridUnit {
    let k = 4 * u;
    let row = |i: usize| b.row64(k + i) as i64;
    let g = _mm256_set_epi64x(row(3), row(2), row(1), row(0));
    let spread = |i: usize| (b.signs(k + i) as u64 * 0x0101_0101_0101_0101) as i64;
    let s = _mm256_set_epi64x(spread(3), spread(2), spread(1), spread(0));
    let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let neg = _mm256_cmpeq_epi8(_mm256_and_si256(s, bits), bits);
    let sign = _mm256_or_si256(neg, _mm256_set1_epi8(1));
    let (lo, hi) = (b.scale(k) as i16, b.scale(k + 2) as i16);
    (
        g,
        sign,
        _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo)),
    )
}

/// Unit u of an IQ1 super-block: the weights 8 · grid ± 1 as signed bytes (their own signs).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq1_unit<B: Iq1>(b: &B, u: usize) -> GridUnit {
    let mut v = [0i8; 32];
    let mut odd = [0i16; 4];
    for i in 0..4 {
        let (row, delta, o) = b.group(4 * u + i);
        for (x, &g) in v[8 * i..8 * i + 8].iter_mut().zip(&row) {
            *x = 8 * g + delta as i8;
        }
        odd[i] = o as i16;
    }
    let v = _mm256_loadu_si256(v.as_ptr().cast());
    let sc = _mm256_set_m128i(_mm_set1_epi16(odd[2]), _mm_set1_epi16(odd[0]));
    (_mm256_sign_epi8(v, v), v, sc)
}

/// Σ_units Σ_halves scale · Σ magnitude · sign · activation of one super-block against one
/// activation block: the scalar reference's integer.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn grid_block(units: &[GridUnit; 8], a: &BlockQ8K) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for (u, &unit) in units.iter().enumerate() {
        acc = _mm256_add_epi32(acc, unit_term(unit, a, u));
    }
    hsum_epi32(acc)
}

/// Unit u's share of that integer against activation block `a`, as eight i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unit_term((mag, sign, sc): GridUnit, a: &BlockQ8K, u: usize) -> __m256i {
    let x = _mm256_loadu_si256(a.qs[32 * u..].as_ptr().cast());
    _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(x, sign)), sc)
}

/// Unit u of a grid super-block as 32 signed weights (magnitude with its sign) and the odd
/// scales of its two halves of 16 (the eight-row VNNI kernels' unpack).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn grid_values<B: Groups>(b: &B, u: usize) -> (__m256i, [i32; 2]) {
    let (mag, sign, _) = grid_unit(b, u);
    (
        _mm256_sign_epi8(mag, sign),
        [b.scale(4 * u), b.scale(4 * u + 2)],
    )
}

/// The same for IQ1: weights 8 · grid ± 1 and the odd scales of the two halves.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn iq1_values<B: Iq1>(b: &B, u: usize) -> (__m256i, [i32; 2]) {
    let (_, v, _) = iq1_unit(b, u);
    (v, [b.group(4 * u).2, b.group(4 * u + 2).2])
}

/// The integer of `grid_block` with each unit consumed as it is made: holding a super-block's
/// eight units spilled them to the stack (criterion, 128 × 4096 in L2, one thread: IQ2_XXS dot
/// 56.7 -> 38.3 us, IQ2_S 51.6 -> 32.8; IQ3_XXS decode 36.7-37.8 -> 43.7 tok/s).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn grid_block_streamed<B: Groups>(b: &B, a: &BlockQ8K) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for u in 0..8 {
        acc = _mm256_add_epi32(acc, unit_term(grid_unit(b, u), a, u));
    }
    hsum_epi32(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq1_block<B: Iq1>(b: &B, a: &BlockQ8K) -> i32 {
    grid_block(&iq1_units(b), a)
}

/// A super-block's eight IQ1 units (closures would lose the target features, and with them the
/// inlining: decode fell from ~160 to ~105 tok/s that way).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq1_units<B: Iq1>(b: &B) -> [GridUnit; 8] {
    let z = _mm256_setzero_si256();
    let mut units = [(z, z, z); 8];
    for (u, unit) in units.iter_mut().enumerate() {
        *unit = iq1_unit(b, u);
    }
    units
}

/// Row · Q8_K row and four rows at once (each unit made once for the four; each result the
/// single-row dot's), with `$factor` as the scalar dot's.
macro_rules! grid_dots {
    ($($dot:ident, $dot4:ident => $imp:ident, $imp4:ident ($block:ty, $block_int:ident, $unit:ident, $factor:expr)),* $(,)?) => {
        $(
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $imp(w: &[$block], a: &[BlockQ8K]) -> f32 {
                let mut sum = 0.0f32;
                for (b, a) in w.iter().zip(a) {
                    sum += b.d() * a.d() * $block_int(b, a) as f32;
                }
                sum * $factor
            }
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $imp4(w: &[$block], a: [&[BlockQ8K]; 4], out: &mut [f32; 4]) {
                let mut sum = [0.0f32; 4];
                for (i, b) in w.iter().enumerate() {
                    // Each unit made once for the four rows, one accumulator per row, one
                    // horizontal sum for the four: grid_block's integers.
                    let ys = [&a[0][i], &a[1][i], &a[2][i], &a[3][i]];
                    let mut acc = [_mm256_setzero_si256(); 4];
                    for u in 0..8 {
                        let unit = $unit(b, u);
                        for (ac, y) in acc.iter_mut().zip(&ys) {
                            *ac = _mm256_add_epi32(*ac, unit_term(unit, y, u));
                        }
                    }
                    let isums = hsum4_epi32(acc[0], acc[1], acc[2], acc[3]);
                    let db = b.d();
                    for ((s, y), is) in sum.iter_mut().zip(&ys).zip(isums) {
                        *s += db * y.d() * is as f32;
                    }
                }
                *out = sum.map(|s| s * $factor);
            }
            entry!(dot $dot, $imp);
            entry!(dot4 $dot4, $imp4);
        )*
    };
}

grid_dots!(
    dot_iq2_xxs, dot4_iq2_xxs =>
        dot_iq2_xxs_impl, dot4_iq2_xxs_impl(BlockIq2Xxs, grid_block_streamed, grid_unit, <BlockIq2Xxs as Groups>::FACTOR),
    dot_iq2_xs, dot4_iq2_xs =>
        dot_iq2_xs_impl, dot4_iq2_xs_impl(BlockIq2Xs, grid_block_streamed, grid_unit, <BlockIq2Xs as Groups>::FACTOR),
    dot_iq2_s, dot4_iq2_s =>
        dot_iq2_s_impl, dot4_iq2_s_impl(BlockIq2S, grid_block_streamed, grid_unit, <BlockIq2S as Groups>::FACTOR),
    dot_iq3_xxs, dot4_iq3_xxs =>
        dot_iq3_xxs_impl, dot4_iq3_xxs_impl(BlockIq3Xxs, grid_block_streamed, grid_unit, <BlockIq3Xxs as Groups>::FACTOR),
    dot_iq3_s, dot4_iq3_s =>
        dot_iq3_s_impl, dot4_iq3_s_impl(BlockIq3S, grid_block_streamed, grid_unit, <BlockIq3S as Groups>::FACTOR),
    dot_iq1_s, dot4_iq1_s =>
        dot_iq1_s_impl, dot4_iq1_s_impl(BlockIq1S, iq1_block, iq1_unit, IQ1_FACTOR),
    dot_iq1_m, dot4_iq1_m =>
        dot_iq1_m_impl, dot4_iq1_m_impl(BlockIq1M, iq1_block, iq1_unit, IQ1_FACTOR),
);

// ---------------------------------------------------------------------------------------------
// Q3_K / Q4_K super-block kernels: a super-block unpacked once per row (values for
// `vpmaddubsw`, sub-block scales as 16-bit lanes, mins/offsets against the activation's bsums),
// one term per super-block in the scalar reference's float expression, a single-row Q4_K dot
// and 4×4 tiles. Every result equals the scalar reference bit for bit.

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pairs_madd(acc: __m256i, p: __m256i, sc: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc))
}

/// [Σ lanes of `a`, of `b`, of `c`, of `d`]: four sums for the work of two.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn hsum4_epi32(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> [i32; 4] {
    let ab = _mm256_hadd_epi32(a, b); // a01 a23 b01 b23 | a45 a67 b45 b67
    let cd = _mm256_hadd_epi32(c, d);
    let abcd = _mm256_hadd_epi32(ab, cd); // a0123 b0123 c0123 d0123 | a4567 b4567 ...
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(abcd),
        _mm256_extracti128_si256::<1>(abcd),
    );
    let mut out = [0i32; 4];
    _mm_storeu_si128(out.as_mut_ptr().cast(), s);
    out
}

/// (Σ lanes of `a`, Σ lanes of `b`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum2_epi32(a: __m256i, b: __m256i) -> (i32, i32) {
    let h = _mm256_hadd_epi32(a, b); // a01 a23 b01 b23 | a45 a67 b45 b67
    let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
    let s = _mm_hadd_epi32(s, s); // a, b, a, b
    (_mm_cvtsi128_si32(s), _mm_extract_epi32::<1>(s))
}

/// One Q4_K super-block unpacked for `vpmaddubsw`: the 256 nibbles as eight registers of 32, the
/// eight 6-bit sub-block scales broadcast as 16-bit lanes, the mins repeated per pair of 16
/// (to meet the activation's bsums), and the two scales.
struct Q4kUnpacked {
    q: [__m256i; 8],
    sc: [__m256i; 8],
    mins: __m256i,
    d: f32,
    dmin: f32,
}

/// 256 nibbles in element order as eight registers (chunk 2c: low nibbles of bytes 32c..,
/// chunk 2c + 1: their high nibbles).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn nibble_chunks(qs: &[u8; 128]) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(15);
    let mut q = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        let v = _mm256_loadu_si256(qs.as_ptr().add(32 * c).cast());
        q[2 * c] = _mm256_and_si256(v, m4);
        q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    }
    q
}

/// One Q4_K super-block unpacked. Written out at each use (LLVM would not inline a function
/// returning the struct into the dot loop, which then round-tripped it through the stack).
macro_rules! q4k_unpack {
    ($b:expr) => {{
        let b: &BlockQ4K = $b;
        let (sc, mins) = k4_scales_simd(&b.scales);
        Q4kUnpacked {
            q: nibble_chunks(&b.qs),
            sc,
            mins,
            d: fp16(b.d),
            dmin: fp16(b.dmin),
        }
    }};
}

/// Q4_K/Q5_K's eight 6-bit scales and mins ([`crate::kquants::scale_min_k4`]) in registers: the
/// scale of chunk j broadcast as 16-bit lanes, and the mins repeated per run of 16 (to meet the
/// activation's bsums).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_scales_simd(s: &[u8; 12]) -> ([__m256i; 8], __m256i) {
    let w = |i: usize| u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().unwrap());
    let (w0, w1, w2) = (w(0), w(1), w(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    // Bytes: scales 0..3, scales 4..7, mins 0..3, mins 4..7.
    let scales_lo = w0 & LOW6;
    let scales_hi = (w2 & LOW4) | (((w0 >> 6) & TOP2) << 4);
    let mins_lo = w1 & LOW6;
    let mins_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & TOP2) << 4);
    let v = _mm_setr_epi32(
        scales_lo as i32,
        scales_hi as i32,
        mins_lo as i32,
        mins_hi as i32,
    );
    let x = _mm256_cvtepu8_epi16(v); // scales in lanes 0..7, mins in 8..15
    let even = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, //
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
    );
    let odd = _mm256_add_epi8(even, _mm256_set1_epi8(2));
    let sc = std::array::from_fn(|j| {
        let pair = _mm256_permutevar8x32_epi32(x, _mm256_set1_epi32((j / 2) as i32));
        _mm256_shuffle_epi8(pair, if j % 2 == 0 { even } else { odd })
    });
    let m = _mm256_extracti128_si256::<1>(x);
    let mins = _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));
    (sc, mins)
}

/// One super-block's term `a.d · (d · Σ sc·q·a − dmin · Σ min·bsum)` (the scalar reference's
/// expression): `vpmaddubsw` pairs nibbles with the activation, `vpmaddwd` weights the pairs by
/// their sub-block scale (as fast here as VNNI's `vpdpwssd`, so the VNNI tier uses this too).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4k_term(u: &Q4kUnpacked, y: &BlockQ8K) -> f32 {
    let mut s = _mm256_setzero_si256();
    for c in 0..8 {
        let ay = _mm256_loadu_si256(y.qs.as_ptr().add(32 * c).cast());
        s = pairs_madd(s, _mm256_maddubs_epi16(u.q[c], ay), u.sc[c]);
    }
    let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
    let (sum, msum) = hsum2_epi32(s, _mm256_madd_epi16(bs, u.mins));
    y.d() * (u.d * sum as f32 - u.dmin * msum as f32)
}

/// Q4_K dot: the terms summed in block order, as the reference's `Iterator::sum`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let mut acc = -0.0f32;
    let mut ahead = Prefetch::new(w);
    for (i, (b, y)) in w.iter().zip(a).enumerate() {
        ahead.through(i);
        acc += q4k_term(&q4k_unpack!(b), y);
    }
    acc
}

/// Q4_K tile: each row's super-block unpacked once for the four tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_tile(w: [&[BlockQ4K]; 4], a: [&[BlockQ8K]; 4], out: &mut [[f32; 4]; 4]) {
    let mut acc = [[-0.0f32; 4]; 4];
    for i in 0..w[0].len() {
        for (r, row) in w.iter().enumerate() {
            let u = q4k_unpack!(&row[i]);
            for (j, col) in a.iter().enumerate() {
                acc[r][j] += q4k_term(&u, &col[i]);
            }
        }
    }
    *out = acc;
}

/// One Q3_K super-block for `vpmaddubsw`: the values stored as q + 4 (0..7) in eight registers,
/// the sixteen signed scales as 16-bit lanes per register (one scale per half), the scales
/// again in one register to meet the activation's bsums, and d.
struct Q3kUnpacked {
    q: [__m256i; 8],
    sc: [__m256i; 8],
    sc16: __m256i,
    d: f32,
}

/// Q3_K's 256 values stored as q + 4 (0..7), element order, 32 a register.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q3k_values(b: &BlockQ3K) -> [__m256i; 8] {
    let mut q = two_bit_chunks(&b.qs);
    let hm = _mm256_loadu_si256(b.hmask.as_ptr().cast());
    for (c, qc) in q.iter_mut().enumerate() {
        *qc = _mm256_or_si256(*qc, bit_to(hm, c, 4));
    }
    q
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q3k_unpack(b: &BlockQ3K) -> Q3kUnpacked {
    let sc16 = _mm256_cvtepi8_epi16(q3k_scales_simd(&b.scales));
    Q3kUnpacked {
        q: q3k_values(b),
        sc: scale_pairs(sc16),
        sc16,
        d: fp16(b.d),
    }
}

/// Sixteen sub-block scales (16-bit lanes) as the eight registers `kdot`-style loops multiply
/// chunk c by: scale 2c in the low half, 2c + 1 in the high half.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scale_pairs(sc16: __m256i) -> [__m256i; 8] {
    let pick = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, //
        2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
    );
    std::array::from_fn(|c| {
        // Dword c holds the pair (2c, 2c + 1).
        let pair = _mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(c as i32));
        _mm256_shuffle_epi8(pair, pick)
    })
}

/// The sixteen 6-bit Q3_K scales minus 32 as signed bytes ([`crate::kquants::q3k_scales`] in
/// registers: low nibbles from bytes 0..8, high nibbles next, the top two bits from bytes 8..12).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q3k_scales_simd(s: &[u8; 12]) -> __m128i {
    let lo = u64::from_le_bytes(s[..8].try_into().unwrap());
    let top = u32::from_le_bytes(s[8..].try_into().unwrap());
    let m4 = _mm_set1_epi8(15);
    let v = _mm_cvtsi64_si128(lo as i64);
    let nib = _mm_unpacklo_epi64(
        _mm_and_si128(v, m4),
        _mm_and_si128(_mm_srli_epi16::<4>(v), m4),
    );
    // Dword k of the result takes bits 2k..2k+1 of each byte of `top`, moved to bits 4..5.
    let t = _mm_srlv_epi32(_mm_set1_epi32(top as i32), _mm_setr_epi32(0, 2, 4, 6));
    let hi = _mm_slli_epi16::<4>(_mm_and_si128(t, _mm_set1_epi8(3)));
    _mm_sub_epi8(_mm_or_si128(nib, hi), _mm_set1_epi8(32))
}

/// One super-block's term `a.d · d · (Σ sc·(q+4)·a − 4 · Σ sc·bsum)`, the scalar reference's
/// expression.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q3k_term(u: &Q3kUnpacked, y: &BlockQ8K) -> f32 {
    let mut s = _mm256_setzero_si256();
    for c in 0..8 {
        let ay = _mm256_loadu_si256(y.qs.as_ptr().add(32 * c).cast());
        s = pairs_madd(s, _mm256_maddubs_epi16(u.q[c], ay), u.sc[c]);
    }
    let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
    let (sum, off) = hsum2_epi32(s, _mm256_madd_epi16(bs, u.sc16));
    y.d() * u.d * (sum - 4 * off) as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3k_tile(w: [&[BlockQ3K]; 4], a: [&[BlockQ8K]; 4], out: &mut [[f32; 4]; 4]) {
    let mut acc = [[-0.0f32; 4]; 4];
    for i in 0..w[0].len() {
        for (r, row) in w.iter().enumerate() {
            let u = q3k_unpack(&row[i]);
            for (j, col) in a.iter().enumerate() {
                acc[r][j] += q3k_term(&u, &col[i]);
            }
        }
    }
    *out = acc;
}

macro_rules! entry_ktile {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: [&[u8]; 4], a: [&[u8]; 4], out: &mut [[f32; 4]; 4]) {
                // SAFETY: installed by x86::specialize only when Isa::Avx2 is available.
                unsafe { $imp(w.map(cast_slice), a.map(cast_slice), out) }
            }
        )*
    };
}

entry_ktile!(tile_q4_k => q4k_tile, tile_q3_k => q3k_tile);
entry!(dot dot_q4_k, q4k);

// ---------------------------------------------------------------------------------------------
// Eight rows × many tokens with the rows in the lanes, for AVX2 machines (the VNNI tier has its
// own, see vnni.rs). Register g of a block holds bytes 4g..4g+3 of every row; against a broadcast
// group of four activation bytes the sign trick (|w| times a with w's sign) feeds `vpmaddubsw`,
// `vpmaddwd` widens, and each lane collects its row's block sum. Float order as
// `legacy::octet_reference`, so the results equal the VNNI kernel's bit for bit.

macro_rules! octet_avx2 {
    ($name:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(w: [&[$wb]; 8], a: &[&[BlockQ8_0]], out: &mut [f32]) {
            let nb = w[0].len();
            let nt = a.len();
            assert!(out.len() >= 8 * nt && w.iter().all(|r| r.len() == nb));
            assert!(a.iter().all(|r| r.len() >= nb));
            let ones = _mm256_set1_epi16(1);
            // Per block: eight (|w|, w) register pairs and the rows' scales.
            let mut groups: Vec<(__m256i, __m256i)> = Vec::with_capacity(8 * nb);
            let mut dws: Vec<__m256> = Vec::with_capacity(nb);
            for b in 0..nb {
                let rows = [0, 1, 2, 3, 4, 5, 6, 7].map(|r| _mm256_castsi256_ps($unpack(&w[r][b])));
                for g in transpose8(rows) {
                    let g = _mm256_castps_si256(g);
                    groups.push((_mm256_sign_epi8(g, g), g));
                }
                let d = [0, 1, 2, 3, 4, 5, 6, 7].map(|r| fp16(w[r][b].d));
                dws.push(_mm256_loadu_ps(d.as_ptr()));
            }
            let step = |acc: __m256, y: &BlockQ8_0, b: usize| {
                let g = &groups[8 * b..8 * b + 8];
                let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for k in 0..4 {
                    for (kk, s) in [(k, &mut s0), (k + 4, &mut s1)] {
                        let v = _mm_loadu_si32(y.qs.as_ptr().add(4 * kk).cast());
                        let ag = _mm256_broadcastd_epi32(v);
                        let (aw, wg) = g[kk];
                        let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(ag, wg));
                        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                    }
                }
                let isum = _mm256_add_epi32(s0, s1);
                let d = _mm256_mul_ps(dws[b], _mm256_set1_ps(fp16(y.d)));
                _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc)
            };
            let mut lanes = [0f32; 8];
            for (j, row) in a.iter().enumerate() {
                let mut acc = _mm256_setzero_ps();
                for b in 0..nb {
                    acc = step(acc, &row[b], b);
                }
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                for (r, v) in lanes.iter().enumerate() {
                    out[r * nt + j] = *v;
                }
            }
        }
    };
}

octet_avx2!(octet_q4_0_impl, BlockQ4_0, q4_0_i8);
octet_avx2!(octet_q5_0_impl, BlockQ5_0, q5_0_i8);
octet_avx2!(octet_q8_0_impl, BlockQ8_0, q8_0_i8);
octet_avx2!(octet_iq4_nl_impl, BlockQ4_0, iq4_nl_i8);

/// Byte-slice wrappers for the eight-row kernels (shared by the AVX2 and VNNI tiers).
macro_rules! entry_octet {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
                let a: Vec<&[BlockQ8_0]> = a.iter().map(|r| cast_slice(r)).collect();
                // SAFETY: installed by x86::specialize only on a tier whose features the kernel
                // enables (AVX2 here, AVX-512 VNNI for vnni.rs); the kernel asserts every
                // length it indexes by.
                unsafe { $imp(w.map(cast_slice), &a, out) }
            }
        )*
    };
}
pub(super) use entry_octet;

entry_octet!(
    octet_q4_0 => octet_q4_0_impl, octet_q5_0 => octet_q5_0_impl,
    octet_q8_0 => octet_q8_0_impl, octet_iq4_nl => octet_iq4_nl_impl,
);

// ---------------------------------------------------------------------------------------------
// The Mamba-2 state row (see `crate::ssm`): sixteen lanes as two registers, FMA as the reference
// uses `mul_add`, and the reference's reduction tree.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ssm_row_impl(s: &mut [f32], b: &[f32], c: &[f32], da: f32, xdt: f32) -> f32 {
    let n = s.len().min(b.len()).min(c.len());
    let body = n / 16 * 16;
    let (vda, vx) = (_mm256_set1_ps(da), _mm256_set1_ps(xdt));
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..body).step_by(16) {
        for (half, acc) in [(0, &mut a0), (8, &mut a1)] {
            let p = s.as_mut_ptr().add(i + half);
            let v = _mm256_fmadd_ps(
                _mm256_loadu_ps(p),
                vda,
                _mm256_mul_ps(_mm256_loadu_ps(b.as_ptr().add(i + half)), vx),
            );
            _mm256_storeu_ps(p, v);
            *acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(c.as_ptr().add(i + half)), *acc);
        }
    }
    // (k + k+8), (k + k+4), (k + k+2), (k + k+1).
    let t = _mm256_add_ps(a0, a1);
    let t = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
    let t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
    for i in body..n {
        let v = s[i].mul_add(da, b[i] * xdt);
        s[i] = v;
        sum = v.mul_add(c[i], sum);
    }
    sum
}

pub(crate) fn ssm_row(s: &mut [f32], b: &[f32], c: &[f32], da: f32, xdt: f32) -> f32 {
    // SAFETY: selected by ssm::ssm_row_for only when an AVX2 tier is available; every pointer
    // access is below `n`, the shortest slice's length.
    unsafe { ssm_row_impl(s, b, c, da, xdt) }
}

/// [`crate::float::exp_cephes`] of eight lanes, the same operations in the same order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn exp8(x: __m256) -> __m256 {
    use crate::float::{EXP_LN2, EXP_POLY, EXP_RANGE};
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_RANGE.0)),
        _mm256_set1_ps(EXP_RANGE.1),
    );
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_LN2.0), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2.1), r);
    let z = _mm256_mul_ps(r, r);
    let mut y = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, z, r), _mm256_set1_ps(1.0));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_shifted_impl(xs: &mut [f32], max: f32) {
    let m = _mm256_set1_ps(max);
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m);
        _mm256_storeu_ps(c.as_mut_ptr(), exp8(v));
    }
    crate::float::exp_shifted_scalar(chunks.into_remainder(), max);
}

pub(crate) fn exp_shifted(xs: &mut [f32], max: f32) {
    // SAFETY: selected by float::exp_shifted_for only when an AVX2 tier is available; loads and
    // stores stay within each whole chunk of eight.
    unsafe { exp_shifted_impl(xs, max) }
}

/// Eight elements of a KV row as f32 (f16 rows converted as they load).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<T: KvElem>(p: *const T) -> __m256 {
    if T::F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    } else {
        _mm256_loadu_ps(p.cast())
    }
}

/// `H` heads × `L` eight-column lanes of [`weighted_rows_impl`], the accumulators held in
/// registers over all `n` positions: `out` points at the first head's first column (heads `hd`
/// apart), `w` at its weights (heads `n` apart), `v` at the first row's first column.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn weighted_block<T: KvElem, const L: usize, const H: usize>(
    out: *mut f32,
    hd: usize,
    w: *const f32,
    n: usize,
    v: *const T,
    stride: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); L]; H];
    for (h, a) in acc.iter_mut().enumerate() {
        for (l, a) in a.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(out.add(h * hd + 8 * l));
        }
    }
    for p in 0..n {
        let row = v.add(p * stride);
        let wv: [__m256; H] = std::array::from_fn(|h| _mm256_set1_ps(*w.add(h * n + p)));
        for l in 0..L {
            let x = load8(row.add(8 * l));
            for (a, wv) in acc.iter_mut().zip(&wv) {
                a[l] = _mm256_fmadd_ps(*wv, x, a[l]);
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (l, a) in a.iter().enumerate() {
            _mm256_storeu_ps(out.add(h * hd + 8 * l), *a);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_rows_impl<T: KvElem>(
    out: &mut [f32],
    w: &[f32],
    heads: usize,
    v: &[T],
    stride: usize,
) {
    let g = heads.max(1);
    let (hd, n) = (out.len() / g, w.len() / g);
    assert!(
        g * hd == out.len() && g * n == w.len() && (n == 0 || (n - 1) * stride + hd <= v.len()),
        "weighted_rows: rows out of range"
    );
    // Slices of 32 columns for blocks of up to two heads, then slices of eight for blocks of
    // up to eight: each row load serves the block's heads, eight accumulators stay in
    // registers, and every element still sums its terms in position order. (Blocks of three
    // heads need 17 of AVX2's 16 registers: the spilled accumulator's store and reload sat in
    // its FMA chain and halved the speed.)
    let (o, wp, vp) = (out.as_mut_ptr(), w.as_ptr(), v.as_ptr());
    // The block of heads h0.. at columns d0.. (L lanes, H heads).
    macro_rules! block {
        ($l:literal, $h:literal, $h0:expr, $d0:expr) => {
            weighted_block::<T, $l, $h>(
                o.add($h0 * hd + $d0),
                hd,
                wp.add($h0 * n),
                n,
                vp.add($d0),
                stride,
            )
        };
    }
    let mut d0 = 0;
    while d0 + 32 <= hd {
        for h0 in (0..g).step_by(2) {
            match (g - h0).min(2) {
                2 => block!(4, 2, h0, d0),
                _ => block!(4, 1, h0, d0),
            }
        }
        d0 += 32;
    }
    while d0 + 8 <= hd {
        for h0 in (0..g).step_by(8) {
            match (g - h0).min(8) {
                8 => block!(1, 8, h0, d0),
                7 => block!(1, 7, h0, d0),
                6 => block!(1, 6, h0, d0),
                5 => block!(1, 5, h0, d0),
                4 => block!(1, 4, h0, d0),
                3 => block!(1, 3, h0, d0),
                2 => block!(1, 2, h0, d0),
                _ => block!(1, 1, h0, d0),
            }
        }
        d0 += 8;
    }
    for h in 0..g {
        for d in d0..hd {
            let o = &mut out[h * hd + d];
            for p in 0..n {
                *o = w[h * n + p].mul_add(v[p * stride + d].to_f32(), *o);
            }
        }
    }
}

pub(crate) fn weighted_rows<T: KvElem>(
    out: &mut [f32],
    w: &[f32],
    heads: usize,
    v: &[T],
    stride: usize,
) {
    // SAFETY: selected by float::weighted_rows_for only when an AVX2 tier is available; the
    // assert in weighted_rows_impl bounds every row read (p < n, columns below hd) and every
    // weight index (h·n + p with h < g, p < n), and writes stay below out.len() = g·hd.
    unsafe { weighted_rows_impl(out, w, heads, v, stride) }
}

/// Eight rows of eight floats transposed: lane i of result d is element d of row i.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// `TL` tiles × `QN` queries of [`dot_tiles_impl`]: accumulators for eight positions each,
/// summed over the head's columns in order. `k` points at the first tile's first column of the
/// KV head (tiles `8·row` apart), `q` at the first query (queries `hd` apart), `out` at the first
/// query's first score (queries `n` apart). For f16 rows the query is f16 too, so each product
/// is exact (the contract of [`crate::float::DotTilesFn`]) and a fused multiply-add rounds as
/// the product-then-add of the definition does.
/// How far ahead [`dot_tile_block`] asks for K: the cache of a long context comes from DRAM,
/// and a KV head's part of a tile is a short run that the hardware prefetcher alone follows
/// late.
const PREFETCH_BLOCKS: usize = 2;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_tile_block<T: KvElem, const TL: usize, const QN: usize>(
    k: *const T,
    row: usize,
    q: *const f32,
    hd: usize,
    out: *mut f32,
    n: usize,
) {
    let mut acc = [[_mm256_set1_ps(-0.0); QN]; TL];
    for d in 0..hd {
        let mut qb = [_mm256_setzero_ps(); QN];
        for (j, b) in qb.iter_mut().enumerate() {
            *b = _mm256_set1_ps(*q.add(j * hd + d));
        }
        for (t, a) in acc.iter_mut().enumerate() {
            if d % 4 == 0 {
                // The same columns PREFETCH_BLOCKS blocks ahead (past the end a hint only).
                let ahead = k.wrapping_add((t + PREFETCH_BLOCKS * TL) * 8 * row + d * 8);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
            let x = load8(k.add(t * 8 * row + d * 8));
            for (a, b) in a.iter_mut().zip(&qb) {
                *a = if T::F16 {
                    _mm256_fmadd_ps(x, *b, *a)
                } else {
                    _mm256_add_ps(*a, _mm256_mul_ps(x, *b))
                };
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        for (j, a) in a.iter().enumerate() {
            _mm256_storeu_ps(out.add(j * n + 8 * t), *a);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tiles_impl<T: KvElem>(
    k: &[T],
    row: usize,
    col: usize,
    qs: &[f32],
    hd: usize,
    out: &mut [f32],
) {
    let g = qs.len() / hd.max(1);
    if g == 0 || hd == 0 {
        return;
    }
    let n = out.len() / g;
    let tiles = n / 8;
    assert!(
        g * hd == qs.len()
            && g * n == out.len()
            && n == 8 * tiles
            && col + hd <= row
            && (tiles == 0 || (tiles - 1) * 8 * row + (col + hd) * 8 <= k.len()),
        "dot_tiles: tiles out of range"
    );
    // Queries in blocks of up to three, tiles in blocks that keep eight or nine accumulators
    // (independent sums) in flight.
    let (kp, o) = (k.as_ptr().add(col * 8), out.as_mut_ptr());
    // TL tiles from tile t against QN queries from j0.
    macro_rules! block {
        ($tl:literal, $qn:literal, $t:expr, $j0:expr) => {
            dot_tile_block::<T, $tl, $qn>(
                kp.add($t * 8 * row),
                row,
                qs.as_ptr().add($j0 * hd),
                hd,
                o.add($j0 * n + 8 * $t),
                n,
            )
        };
    }
    for j0 in (0..g).step_by(3) {
        let qn = (g - j0).min(3);
        let block = [8, 4, 3][qn - 1];
        let mut t = 0;
        while t + block <= tiles {
            match qn {
                1 => block!(8, 1, t, j0),
                2 => block!(4, 2, t, j0),
                _ => block!(3, 3, t, j0),
            }
            t += block;
        }
        while t < tiles {
            match qn {
                1 => block!(1, 1, t, j0),
                2 => block!(1, 2, t, j0),
                _ => block!(1, 3, t, j0),
            }
            t += 1;
        }
    }
}

pub(crate) fn dot_tiles<T: KvElem>(
    k: &[T],
    row: usize,
    col: usize,
    qs: &[f32],
    hd: usize,
    out: &mut [f32],
) {
    // SAFETY: selected by float::dot_tiles_for only when an AVX2 tier is available; the assert
    // in dot_tiles_impl bounds every tile read (the last tile's last column of this KV head is
    // at (tiles−1)·8·row + (col+hd)·8 − 1), every query read (j·hd + d < g·hd) and every write
    // (j·n + p < g·n).
    unsafe { dot_tiles_impl(k, row, col, qs, hd, out) }
}
