//! The VNNI tiers: the AVX2 legacy dots and the prefill tiles with `vpdpbusd` doing the integer
//! part, written once and instantiated for two instruction sets that share it — AVX-512 VNNI
//! (EVEX, on 256-bit registers: AVX-512 servers, Zen 4/5) and AVX-VNNI (VEX: Intel client cores
//! from Alder Lake on, which have no AVX-512). Each module supplies `dpbusd` and `bit4` with its
//! own instructions; everything else is the same code, so the two tiers give the same results
//! bit for bit. The single-row dots keep the AVX2 loop and float order (results bit-identical to
//! the AVX2 tier and to llama.cpp, which does the same on VNNI machines); IQ4_XS's, whose
//! integers per super-block are exact in any order, takes `vpdpbusd` too (decode's hottest dot
//! on i-quant MoE files), and prefetches its weights ahead as the AVX2 dots do. Wider
//! two-blocks-per-register kernels were tried and dropped: no faster here, and their different
//! summation order moved results away from llama.cpp's. `x86::specialize` installs a module's
//! kernels only after its tier was detected.

use core::arch::x86_64::*;

use super::avx2::{
    entry_octet, fp16, fp16_mul, grid_values, hsum4_epi32, hsum_epi32, hsum_ps, iq1_values,
    iq4_nl_i8, load32, nibble_chunks, nibbles, q3k_values, q4_0_i8, q4_1_u8, q5_0_i8, q5_1_u8,
    q5k_values, q6k_values, q8_0_i8, signed_dot, transpose8, two_bit_chunks, unsigned_dot,
    Prefetch,
};
use crate::iq_grid::{
    BlockIq1M, BlockIq1S, BlockIq2S, BlockIq2Xs, BlockIq2Xxs, BlockIq3S, BlockIq3Xxs, Groups, Iq1,
    IQ1_FACTOR,
};
use crate::iquants::BlockIq4Xs;
use crate::kquants::{
    q3k_scales, scale_min_k4, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K,
};
use crate::legacy::IQ4NL_VALUES;
use crate::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};
use bytemuck::cast_slice;

// ---------------------------------------------------------------------------------------------
// Four-row × four-token tiles. A signed weight w is written as u − o with u an unsigned byte and
// o a per-type offset, so `vpdpbusd` multiplies u with the activation directly; seeding each
// product with −o·(sum of each group of four activation bytes) makes every 32-bit lane exactly
// the lane `dot_i8_vnni` computes. Scale products and the float accumulation are the single-row
// ones, so each of the sixteen results equals one `dot` bit for bit.
macro_rules! offset_tile {
    ($feat:literal, $name:ident, $rows4:ident, $wb:ty, $unpack:ident, $offset:literal) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: [&[$wb]; 4], a: [&[BlockQ8_0]; 4], out: &mut [[f32; 4]; 4]) {
            let n = w[0].len();
            let (w, a) = (w.map(|r| &r[..n]), a.map(|r| &r[..n]));
            let zero = _mm256_setzero_si256();
            let off = _mm256_set1_epi8($offset as u8 as i8);
            let mut acc = [[_mm256_setzero_ps(); 4]; 4];
            for i in 0..n {
                // The four rows' blocks unpacked once; then token by token (fewer live
                // registers than holding all four tokens: no accumulator spills).
                let u = [0, 1, 2, 3].map(|r| $unpack(&w[r][i]));
                let dw = [0, 1, 2, 3].map(|r| _mm256_set1_ps(fp16(w[r][i].d)));
                for j in 0..4 {
                    let y = &a[j][i];
                    let ya = load32(&y.qs);
                    let seed = _mm256_sub_epi32(zero, dpbusd(zero, off, ya));
                    let da = _mm256_set1_ps(fp16(y.d));
                    for r in 0..4 {
                        let s = _mm256_cvtepi32_ps(dpbusd(seed, u[r], ya));
                        acc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], da), s, acc[r][j]);
                    }
                }
            }
            for (o, ac) in out.iter_mut().zip(&acc) {
                for (v, x) in o.iter_mut().zip(ac) {
                    *v = hsum_ps(*x);
                }
            }
        }

        /// Four rows, one token (decode): the activation block is prepared once per block.
        #[target_feature(enable = $feat)]
        unsafe fn $rows4(w: [&[$wb]; 4], a: &[BlockQ8_0], out: &mut [f32; 4]) {
            let n = w[0].len();
            let (w, a) = (w.map(|r| &r[..n]), &a[..n]);
            let zero = _mm256_setzero_si256();
            let off = _mm256_set1_epi8($offset as u8 as i8);
            let mut acc = [_mm256_setzero_ps(); 4];
            for i in 0..n {
                let y = &a[i];
                let ya = load32(&y.qs);
                let seed = _mm256_sub_epi32(zero, dpbusd(zero, off, ya));
                let da = _mm256_set1_ps(fp16(y.d));
                for r in 0..4 {
                    let b = &w[r][i];
                    let s = _mm256_cvtepi32_ps(dpbusd(seed, $unpack(b), ya));
                    let d = _mm256_mul_ps(_mm256_set1_ps(fp16(b.d)), da);
                    acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
                }
            }
            for (o, x) in out.iter_mut().zip(acc) {
                *o = hsum_ps(x);
            }
        }
    };
}

/// Q4_1 / Q5_1 tiles against Q8_1 activations: the weights are unsigned already, so `vpdpbusd`
/// takes them as they are; the minimum terms f16(m)·f16(s) are accumulated per token in the
/// lanes of a 128-bit register, in block order, as the single-row dot accumulates them.
macro_rules! unsigned_tile {
    ($feat:literal, $name:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: [&[$wb]; 4], a: [&[BlockQ8_1]; 4], out: &mut [[f32; 4]; 4]) {
            let n = w[0].len();
            let (w, a) = (w.map(|r| &r[..n]), a.map(|r| &r[..n]));
            let zero = _mm256_setzero_si256();
            let mut acc = [[_mm256_setzero_ps(); 4]; 4];
            let mut mins = [_mm_setzero_ps(); 4];
            for i in 0..n {
                let u = [0, 1, 2, 3].map(|r| $unpack(&w[r][i]));
                let dw = [0, 1, 2, 3].map(|r| _mm256_set1_ps(fp16(w[r][i].d)));
                let s4 = _mm_setr_ps(
                    fp16(a[0][i].s),
                    fp16(a[1][i].s),
                    fp16(a[2][i].s),
                    fp16(a[3][i].s),
                );
                for r in 0..4 {
                    let m = _mm_set1_ps(fp16(w[r][i].m));
                    mins[r] = _mm_add_ps(mins[r], _mm_mul_ps(m, s4));
                }
                for j in 0..4 {
                    let y = &a[j][i];
                    let ya = load32(&y.qs);
                    let da = _mm256_set1_ps(fp16(y.d));
                    for r in 0..4 {
                        let s = _mm256_cvtepi32_ps(dpbusd(zero, u[r], ya));
                        acc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], da), s, acc[r][j]);
                    }
                }
            }
            for r in 0..4 {
                let mut m = [0f32; 4];
                _mm_storeu_ps(m.as_mut_ptr(), mins[r]);
                for j in 0..4 {
                    out[r][j] = hsum_ps(acc[r][j]) + m[j];
                }
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Eight rows × many tokens with the rows in the lanes (prefill). The eight rows' blocks are
// unpacked once and transposed so that register g of a block holds bytes 4g..4g+3 of every row;
// `vpdpbusd` against a broadcast group of four activation bytes then accumulates each row's
// whole block sum in its own lane, and one convert, multiply and FMA serve eight rows. The
// activation goes in unsigned (a + 128); the row's −128·Σw, computed once per block, seeds the
// sum. Float order per (row, token): acc = fma(f16(dw)·f16(da), Σ_block, acc) over blocks — not
// the single-row dot's (which sums eight partial lanes), see `octet_reference`.
macro_rules! octet {
    ($feat:literal, $name:ident, $wb:ty, $unpack:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: [&[$wb]; 8], a: &[&[BlockQ8_0]], out: &mut [f32]) {
            let nb = w[0].len();
            let nt = a.len();
            assert!(out.len() >= 8 * nt && w.iter().all(|r| r.len() == nb));
            assert!(a.iter().all(|r| r.len() >= nb));
            let zero = _mm256_setzero_si256();
            let ones = _mm256_set1_epi8(1);
            let mut groups: Vec<__m256i> = Vec::with_capacity(8 * nb);
            let mut seeds: Vec<__m256i> = Vec::with_capacity(nb);
            let mut dws: Vec<__m256> = Vec::with_capacity(nb);
            for b in 0..nb {
                let rows = [0, 1, 2, 3, 4, 5, 6, 7].map(|r| _mm256_castsi256_ps($unpack(&w[r][b])));
                let t = transpose8(rows).map(|v| _mm256_castps_si256(v));
                let mut sw = zero;
                for g in &t {
                    sw = dpbusd(sw, ones, *g);
                }
                seeds.push(_mm256_sub_epi32(zero, _mm256_slli_epi32::<7>(sw)));
                groups.extend_from_slice(&t);
                let d = [0, 1, 2, 3, 4, 5, 6, 7].map(|r| fp16(w[r][b].d));
                dws.push(_mm256_loadu_ps(d.as_ptr()));
            }
            let flip = _mm256_set1_epi32(0x8080_8080u32 as i32);
            // Σ w·a of one token's block: two independent chains of four `vpdpbusd` (integer
            // sums reassociate exactly), activation groups broadcast and made unsigned.
            let block_sum = |y: &BlockQ8_0, g: &[__m256i], seed: __m256i| {
                let grp = |k: usize| {
                    let v = _mm_loadu_si32(y.qs.as_ptr().add(4 * k).cast());
                    _mm256_xor_si256(_mm256_broadcastd_epi32(v), flip)
                };
                let (mut s0, mut s1) = (seed, zero);
                for k in 0..4 {
                    s0 = dpbusd(s0, grp(k), g[k]);
                    s1 = dpbusd(s1, grp(k + 4), g[k + 4]);
                }
                _mm256_add_epi32(s0, s1)
            };
            let step = |acc: __m256, y: &BlockQ8_0, b: usize| {
                let isum = block_sum(y, &groups[8 * b..8 * b + 8], seeds[b]);
                let d = _mm256_mul_ps(dws[b], _mm256_set1_ps(fp16(y.d)));
                _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc)
            };
            let mut lanes = [0f32; 8];
            let mut put = |acc: __m256, j: usize| {
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                for (r, v) in lanes.iter().enumerate() {
                    out[r * nt + j] = *v;
                }
            };
            let mut j = 0;
            // Four tokens at a time (accumulators stay in registers, chains interleave).
            while j + 4 <= nt {
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                for b in 0..nb {
                    a0 = step(a0, &a[j][b], b);
                    a1 = step(a1, &a[j + 1][b], b);
                    a2 = step(a2, &a[j + 2][b], b);
                    a3 = step(a3, &a[j + 3][b], b);
                }
                put(a0, j);
                put(a1, j + 1);
                put(a2, j + 2);
                put(a3, j + 3);
                j += 4;
            }
            while j < nt {
                let mut acc = _mm256_setzero_ps();
                for b in 0..nb {
                    acc = step(acc, &a[j][b], b);
                }
                put(acc, j);
                j += 1;
            }
        }
    };
}

macro_rules! entry_tile {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: [&[u8]; 4], a: [&[u8]; 4], out: &mut [[f32; 4]; 4]) {
                // SAFETY: installed by x86::specialize only on this module's tier.
                unsafe { $imp(w.map(cast_slice), a.map(cast_slice), out) }
            }
        )*
    };
}

macro_rules! entry_rows4 {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: [&[u8]; 4], a: &[u8], out: &mut [f32; 4]) {
                // SAFETY: installed by x86::specialize only on this module's tier.
                unsafe { $imp(w.map(cast_slice), cast_slice(a), out) }
            }
        )*
    };
}

macro_rules! entry {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: installed by x86::specialize only on this module's tier.
                unsafe { $imp(cast_slice(w), cast_slice(a)) }
            }
        )*
    };
}

macro_rules! entry4 {
    ($($name:ident => $imp:ident),* $(,)?) => {
        $(
            pub(crate) fn $name(w: &[u8], a: [&[u8]; 4], out: &mut [f32; 4]) {
                // SAFETY: installed by x86::specialize only on this module's tier.
                unsafe { $imp(cast_slice(w), a.map(cast_slice), out) }
            }
        )*
    };
}

/// Every kernel of a VNNI tier, for the target features `$feat`; the invoking module defines
/// `dpbusd` (u8 × i8 groups of four, summed into i32 lanes) and `bit4` (0x10 in byte i where
/// bit i of a Q5 block's `qh` is set) for those features.
/// The grid i-quants' eight-row entries of a tier: each casts the rows and runs the tier's
/// `grid_octet` with the type's unpack, scale and factor.
macro_rules! entry_grid_octet {
    ($($entry:ident => $block:ty, $values:ident, $d:path, $factor:expr;)*) => {
        $(
            pub(crate) fn $entry(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
                let a: Vec<&[BlockQ8K]> = a.iter().map(|r| cast_slice(r)).collect();
                // SAFETY: installed by x86::specialize only on this module's tier; the kernel
                // asserts every length it indexes by, and `values` needs only AVX2, which
                // every VNNI tier has.
                unsafe {
                    grid_octet::<$block>(
                        w.map(cast_slice),
                        &a,
                        out,
                        $values::<$block>,
                        $d,
                        $factor,
                    )
                }
            }
        )*
    };
}

macro_rules! vnni_kernels {
    ($feat:literal) => {
        /// Σ w·a of signed bytes as 8 lanes of i32: |w| × (a with w's sign), with `vpdpbusd`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn dot_i8_vnni(w: __m256i, a: __m256i) -> __m256i {
            dpbusd(
                _mm256_setzero_si256(),
                _mm256_sign_epi8(w, w),
                _mm256_sign_epi8(a, w),
            )
        }

        /// Σ w·a with unsigned w.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn dot_u8_vnni(w: __m256i, a: __m256i) -> __m256i {
            dpbusd(_mm256_setzero_si256(), w, a)
        }

        signed_dot!(
            q4_0,
            q4_0_4,
            $feat,
            dot_i8_vnni,
            BlockQ4_0,
            q4_0_i8
        );
        signed_dot!(
            q5_0,
            q5_0_4,
            $feat,
            dot_i8_vnni,
            BlockQ5_0,
            q5_0_i8
        );
        signed_dot!(
            q8_0,
            q8_0_4,
            $feat,
            dot_i8_vnni,
            BlockQ8_0,
            q8_0_i8
        );
        signed_dot!(
            iq4_nl,
            iq4_nl_4,
            $feat,
            dot_i8_vnni,
            BlockQ4_0,
            iq4_nl_i8
        );
        unsigned_dot!(
            q4_1,
            q4_1_4,
            $feat,
            dot_u8_vnni,
            BlockQ4_1,
            q4_1_u8
        );
        unsigned_dot!(
            q5_1,
            q5_1_4,
            $feat,
            dot_u8_vnni,
            BlockQ5_1,
            q5_1_u8
        );

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn q4_0_u(b: &BlockQ4_0) -> __m256i {
            nibbles(&b.qs)
        }

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn q5_0_u(b: &BlockQ5_0) -> __m256i {
            // The fifth bits as a byte mask straight from qh (AVX-512BW), 0x10 where set.
            let hi = bit4(b.qh);
            _mm256_or_si256(nibbles(&b.qs), hi)
        }

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn q8_0_u(b: &BlockQ8_0) -> __m256i {
            _mm256_xor_si256(load32(&b.qs), _mm256_set1_epi8(0x80u8 as i8))
        }

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn iq4_nl_u(b: &BlockQ4_0) -> __m256i {
            let t = _mm_xor_si128(
                _mm_loadu_si128(IQ4NL_VALUES.as_ptr().cast()),
                _mm_set1_epi8(0x80u8 as i8),
            );
            _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles(&b.qs))
        }

        offset_tile!($feat, q4_0_tile, q4_0_rows4, BlockQ4_0, q4_0_u, 8);
        offset_tile!($feat, q5_0_tile, q5_0_rows4, BlockQ5_0, q5_0_u, 16);
        offset_tile!($feat, q8_0_tile, q8_0_rows4, BlockQ8_0, q8_0_u, 128);
        offset_tile!($feat, iq4_nl_tile, iq4_nl_rows4, BlockQ4_0, iq4_nl_u, 128);

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn q5_1_u(b: &BlockQ5_1) -> __m256i {
            let hi = bit4(b.qh);
            _mm256_or_si256(nibbles(&b.qs), hi)
        }

        unsigned_tile!($feat, q4_1_tile, BlockQ4_1, q4_1_u8);
        unsigned_tile!($feat, q5_1_tile, BlockQ5_1, q5_1_u);

        octet!($feat, q4_0_octet, BlockQ4_0, q4_0_i8);
        octet!($feat, q5_0_octet, BlockQ5_0, q5_0_i8);
        octet!($feat, q8_0_octet, BlockQ8_0, q8_0_i8);
        octet!($feat, iq4_nl_octet, BlockQ4_0, iq4_nl_i8);

        entry_octet!(
            octet_q4_0 => q4_0_octet, octet_q5_0 => q5_0_octet, octet_q8_0 => q8_0_octet,
            octet_iq4_nl => iq4_nl_octet,
        );

        // -----------------------------------------------------------------------------------------
        // Q4_K, eight rows × n tokens with the rows in the lanes (prefill). Per
        // super-block the eight rows' nibbles are transposed once into 64 group
        // registers (sub-block j, group g: elements 32j + 4g .. +4 of every row) and
        // their 6-bit scales and mins into lanes; per token each sub-block's eight
        // broadcast activation groups meet the group registers through `vpdpbusd`
        // (nibbles are unsigned, so no offset), the sub-block sums are weighted by the
        // rows' scales in 32 bits, and the float step is the single-row dot's
        // expression, without FMA: `a.d · (d · Σ sc·isum − dmin · Σ min·bsum)`, added to
        // an accumulator that starts at −0. So each result equals the Q4_K `dot` bit for
        // bit.

        /// One super-block of eight rows, unpacked for [`q4k_octet`].
        struct Q4kOctet {
            q: [__m256i; 64],
            sc: [__m256i; 8],
            mn: [__m256i; 8],
            d: __m256,
            dmin: __m256,
        }

        /// Tokens a `term` call of the eight-row kernels takes: each unpacked weight register
        /// is loaded once for all of them (with one token a call, the `vpdpbusd` stream waited
        /// on two loads an instruction, the weights' spilled register and the activations'
        /// broadcast), and their sums form side by side.
        const TERM_TOKENS: usize = 4;

        /// The eight-row skeleton of the super-block types: `unpack` turns the eight rows'
        /// block b into what `term` needs; per TERM_TOKENS tokens, `term` gives each token's
        /// eight rows' block terms, summed in block order onto `start`, the single-row dot's
        /// first value (−0 for the K-quants, whose scalar dots fold with `Sum`; +0 for IQ4_XS
        /// and the grid types, so that a row of zero terms keeps the dot's sign of zero).
        /// Blocks are the outer loop (one unpacked block at a time, in L1), tokens the inner,
        /// in runs of up to 64 tokens whose accumulators stay on the stack; a run's last call
        /// repeats its last token where fewer than TERM_TOKENS are left (those terms are
        /// dropped). A token's terms do not depend on its companions.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn rows_in_lanes<B, U>(
            w: [&[B]; 8],
            a: &[&[BlockQ8K]],
            out: &mut [f32],
            start: f32,
            unpack: impl Fn([&B; 8]) -> U,
            term: impl Fn(&U, [&BlockQ8K; TERM_TOKENS]) -> [__m256; TERM_TOKENS],
        ) {
            const RUN: usize = 64;
            let nb = w[0].len();
            let nt = a.len();
            assert!(out.len() >= 8 * nt && w.iter().all(|r| r.len() == nb));
            assert!(a.iter().all(|r| r.len() >= nb));
            let mut lanes = [0f32; 8];
            for t0 in (0..nt).step_by(RUN) {
                let run = &a[t0..nt.min(t0 + RUN)];
                let mut acc = [_mm256_set1_ps(start); RUN];
                for b in 0..nb {
                    let u = unpack(std::array::from_fn(|r| &w[r][b]));
                    for (i, acc) in (0..run.len())
                        .step_by(TERM_TOKENS)
                        .zip(acc.chunks_mut(TERM_TOKENS))
                    {
                        let ys = std::array::from_fn(|k| &run[(i + k).min(run.len() - 1)][b]);
                        let terms = term(&u, ys);
                        for (acc, t) in acc.iter_mut().zip(terms).take(run.len() - i) {
                            *acc = _mm256_add_ps(*acc, t);
                        }
                    }
                }
                for (i, acc) in acc.iter().take(run.len()).enumerate() {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                    for (r, v) in lanes.iter().enumerate() {
                        out[r * nt + t0 + i] = *v;
                    }
                }
            }
        }

        /// Eight rows' eight 32-byte registers (rows × chunks) as 64 group registers:
        /// chunk c, group g holds bytes 4g..4g + 4 of chunk c of every row.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn transpose_chunks(chunks: [[__m256i; 8]; 8]) -> [__m256i; 64] {
            let mut q = [_mm256_setzero_si256(); 64];
            for c in 0..8 {
                let regs = [0, 1, 2, 3, 4, 5, 6, 7].map(|r| _mm256_castsi256_ps(chunks[r][c]));
                for (g, reg) in transpose8(regs).into_iter().enumerate() {
                    q[8 * c + g] = _mm256_castps_si256(reg);
                }
            }
            q
        }

        /// Four activation bytes at `p` in every 32-bit lane.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn bcast4(p: *const i8) -> __m256i {
            _mm256_set1_epi32(core::ptr::read_unaligned(p.cast::<i32>()))
        }

        /// Each token's `isum` plus, over groups g0..g0 + n of a super-block, `vpdpbusd` of
        /// group register q[g] with the token's activation bytes 4g..4g + 4: the weight
        /// register is loaded once for the TERM_TOKENS tokens.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn group_sums(
            q: &[__m256i; 64],
            g0: usize,
            n: usize,
            ys: [&BlockQ8K; TERM_TOKENS],
            mut isum: [__m256i; TERM_TOKENS],
        ) -> [__m256i; TERM_TOKENS] {
            for g in g0..g0 + n {
                let w = q[g];
                for (isum, y) in isum.iter_mut().zip(ys) {
                    *isum = dpbusd(*isum, w, bcast4(y.qs.as_ptr().add(4 * g)));
                }
            }
            isum
        }

        /// The sixteen 16-element sub-blocks' sums for each token: Σ_j sc[j] · (sub-block j's
        /// group sums), and Σ_j bw[j] · (the token's activation sum over sub-block j), in 32
        /// bits (Q3_K/Q6_K weight the activation sums by their scales for the offset, Q2_K
        /// by its mins).
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn sub16_sums(
            q: &[__m256i; 64],
            sc: &[__m256i; 16],
            bw: &[__m256i; 16],
            ys: [&BlockQ8K; TERM_TOKENS],
        ) -> ([__m256i; TERM_TOKENS], [__m256i; TERM_TOKENS]) {
            let mut s = [_mm256_setzero_si256(); TERM_TOKENS];
            let mut b = [_mm256_setzero_si256(); TERM_TOKENS];
            for j in 0..16 {
                let zero = [_mm256_setzero_si256(); TERM_TOKENS];
                let isum = group_sums(q, 4 * j, 4, ys, zero);
                for k in 0..TERM_TOKENS {
                    s[k] = _mm256_add_epi32(s[k], _mm256_mullo_epi32(isum[k], sc[j]));
                    let bs = _mm256_set1_epi32(ys[k].bsum(j));
                    b[k] = _mm256_add_epi32(b[k], _mm256_mullo_epi32(bw[j], bs));
                }
            }
            (s, b)
        }

        /// The Q4_K eight-row kernel over Q4_K and Q5_K: `values` gives a super-block's 256
        /// unsigned values in element order, 32 a register (nibbles; Q5_K's with the fifth
        /// bit); both types share the scales, mins and float expression.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn k4_octet<B>(
            w: [&[B]; 8],
            a: &[&[BlockQ8K]],
            out: &mut [f32],
            values: impl Fn(&B) -> [__m256i; 8],
            parts: impl Fn(&B) -> (&[u8; 12], [u8; 2], [u8; 2]),
        ) {
            let unpack = |rows: [&B; 8]| {
                let parts = rows.map(&parts);
                let lanes_of = |f: &dyn Fn(&[u8; 12]) -> i32| {
                    let v: [i32; 8] = std::array::from_fn(|r| f(parts[r].0));
                    _mm256_loadu_si256(v.as_ptr().cast())
                };
                let sc = std::array::from_fn(|j| lanes_of(&|s| scale_min_k4(j, s).0 as i32));
                let mn = std::array::from_fn(|j| lanes_of(&|s| scale_min_k4(j, s).1 as i32));
                let d = parts.map(|p| fp16(p.1));
                let dmin = parts.map(|p| fp16(p.2));
                Q4kOctet {
                    q: transpose_chunks(rows.map(&values)),
                    sc,
                    mn,
                    d: _mm256_loadu_ps(d.as_ptr()),
                    dmin: _mm256_loadu_ps(dmin.as_ptr()),
                }
            };
            let term = |u: &Q4kOctet, ys: [&BlockQ8K; TERM_TOKENS]| {
                let mut s = [_mm256_setzero_si256(); TERM_TOKENS];
                let mut m = [_mm256_setzero_si256(); TERM_TOKENS];
                for j in 0..8 {
                    let zero = [_mm256_setzero_si256(); TERM_TOKENS];
                    let isum = group_sums(&u.q, 8 * j, 8, ys, zero);
                    for k in 0..TERM_TOKENS {
                        s[k] = _mm256_add_epi32(s[k], _mm256_mullo_epi32(isum[k], u.sc[j]));
                        let bs = _mm256_set1_epi32(ys[k].bsum(2 * j) + ys[k].bsum(2 * j + 1));
                        m[k] = _mm256_add_epi32(m[k], _mm256_mullo_epi32(u.mn[j], bs));
                    }
                }
                std::array::from_fn(|k| {
                    let ds = _mm256_mul_ps(u.d, _mm256_cvtepi32_ps(s[k]));
                    let dm = _mm256_mul_ps(u.dmin, _mm256_cvtepi32_ps(m[k]));
                    _mm256_mul_ps(_mm256_set1_ps(ys[k].d()), _mm256_sub_ps(ds, dm))
                })
            };
            rows_in_lanes(w, a, out, -0.0, unpack, term)
        }

        #[target_feature(enable = $feat)]
        unsafe fn q4k_octet(w: [&[BlockQ4K]; 8], a: &[&[BlockQ8K]], out: &mut [f32]) {
            let values = |b: &BlockQ4K| nibble_chunks(&b.qs);
            k4_octet(w, a, out, values, |b| (&b.scales, b.d, b.dmin))
        }

        #[target_feature(enable = $feat)]
        unsafe fn q5k_octet(w: [&[BlockQ5K]; 8], a: &[&[BlockQ8K]], out: &mut [f32]) {
            let values = |b: &BlockQ5K| q5k_values(b);
            k4_octet(w, a, out, values, |b| (&b.scales, b.d, b.dmin))
        }

        /// Q3_K and Q6_K the same way: values stored as q plus an offset (Q3_K's 4: 0..7;
        /// Q6_K's 32: 0..63) transposed per chunk of 32 (two 16-element sub-blocks, four groups
        /// each), sub-block sums weighted by the rows' signed scales, the `offset · Σ
        /// scale · bsum` correction in 32 bits (offset = 1 << SHIFT), and the single-row
        /// dots' float expression `(a.d · d) · (Σ − offset · Σ scale · bsum)`: each result
        /// equals the type's `dot` bit for bit.
        struct Signed16Octet {
            q: [__m256i; 64],
            sc: [__m256i; 16],
            d: __m256,
        }

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn signed16_octet<B, const SHIFT: i32>(
            w: [&[B]; 8],
            a: &[&[BlockQ8K]],
            out: &mut [f32],
            values: impl Fn(&B) -> [__m256i; 8],
            scales_and_d: impl Fn(&B) -> ([i8; 16], [u8; 2]),
        ) {
            let unpack = |rows: [&B; 8]| {
                let parts = rows.map(&scales_and_d);
                let sc = std::array::from_fn(|j| {
                    let v: [i32; 8] = std::array::from_fn(|r| parts[r].0[j] as i32);
                    _mm256_loadu_si256(v.as_ptr().cast())
                });
                let d = parts.map(|p| fp16(p.1));
                Signed16Octet {
                    q: transpose_chunks(rows.map(&values)),
                    sc,
                    d: _mm256_loadu_ps(d.as_ptr()),
                }
            };
            let term = |u: &Signed16Octet, ys: [&BlockQ8K; TERM_TOKENS]| {
                let (s, off) = sub16_sums(&u.q, &u.sc, &u.sc, ys);
                std::array::from_fn(|k| {
                    let x = _mm256_sub_epi32(s[k], _mm256_slli_epi32::<SHIFT>(off[k]));
                    _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_set1_ps(ys[k].d()), u.d),
                        _mm256_cvtepi32_ps(x),
                    )
                })
            };
            rows_in_lanes(w, a, out, -0.0, unpack, term)
        }

        #[target_feature(enable = $feat)]
        unsafe fn q3k_octet(w: [&[BlockQ3K]; 8], a: &[&[BlockQ8K]], out: &mut [f32]) {
            let values = |b: &BlockQ3K| q3k_values(b);
            signed16_octet::<_, 2>(w, a, out, values, |b| (q3k_scales(&b.scales), b.d))
        }

        #[target_feature(enable = $feat)]
        unsafe fn q6k_octet(w: [&[BlockQ6K]; 8], a: &[&[BlockQ8K]], out: &mut [f32]) {
            let values = |b: &BlockQ6K| q6k_values(b);
            signed16_octet::<_, 5>(w, a, out, values, |b| (b.scales, b.d))
        }

        /// Q2_K the same way: values 0..3 transposed per chunk of 32, each 16-element
        /// sub-block's sum weighted by the rows' 4-bit scales and its activation sum by their
        /// 4-bit mins, in 32 bits, and the single-row dot's float expression `a.d · (d · Σ −
        /// dmin · Σ min · bsum)`: each result equals the Q2_K `dot` bit for bit.
        struct Q2kOctet {
            q: [__m256i; 64],
            sc: [__m256i; 16],
            mn: [__m256i; 16],
            d: __m256,
            dmin: __m256,
        }

        #[target_feature(enable = $feat)]
        unsafe fn q2k_octet(w: [&[BlockQ2K]; 8], a: &[&[BlockQ8K]], out: &mut [f32]) {
            let unpack = |rows: [&BlockQ2K; 8]| {
                let lanes_of = |f: &dyn Fn(&BlockQ2K) -> i32| {
                    let v: [i32; 8] = std::array::from_fn(|r| f(rows[r]));
                    _mm256_loadu_si256(v.as_ptr().cast())
                };
                let sc = std::array::from_fn(|j| lanes_of(&|b| (b.scales[j] & 15) as i32));
                let mn = std::array::from_fn(|j| lanes_of(&|b| (b.scales[j] >> 4) as i32));
                let d = rows.map(|b| fp16(b.d));
                let dmin = rows.map(|b| fp16(b.dmin));
                Q2kOctet {
                    q: transpose_chunks(rows.map(|b| two_bit_chunks(&b.qs))),
                    sc,
                    mn,
                    d: _mm256_loadu_ps(d.as_ptr()),
                    dmin: _mm256_loadu_ps(dmin.as_ptr()),
                }
            };
            let term = |u: &Q2kOctet, ys: [&BlockQ8K; TERM_TOKENS]| {
                let (s, m) = sub16_sums(&u.q, &u.sc, &u.mn, ys);
                std::array::from_fn(|k| {
                    let ds = _mm256_mul_ps(u.d, _mm256_cvtepi32_ps(s[k]));
                    let dm = _mm256_mul_ps(u.dmin, _mm256_cvtepi32_ps(m[k]));
                    _mm256_mul_ps(_mm256_set1_ps(ys[k].d()), _mm256_sub_ps(ds, dm))
                })
            };
            rows_in_lanes(w, a, out, -0.0, unpack, term)
        }

        /// IQ4_XS the same way: each sub-block's codes looked up to IQ4_NL's values plus
        /// 128 (unsigned bytes for `vpdpbusd`; 128 · the sub-block's activation sum, from
        /// the bsums, taken back off), transposed per sub-block; the sub-block sums weighted
        /// by the rows' 6-bit scales in 32 bits, and the single-row dot's float expression
        /// `(d · a.d) · Σ`: each result equals the IQ4_XS `dot` bit for bit.
        struct Iq4XsOctet {
            q: [__m256i; 64],
            sc: [__m256i; 8],
            d: __m256,
        }

        /// IQ4_NL's codebook plus 128 (unsigned bytes for `vpdpbusd`) in both 128-bit lanes.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn iq4_u8_table() -> __m256i {
            let t = _mm_xor_si128(
                _mm_loadu_si128(IQ4NL_VALUES.as_ptr().cast()),
                _mm_set1_epi8(-128),
            );
            _mm256_set_m128i(t, t)
        }

        #[target_feature(enable = $feat)]
        unsafe fn iq4xs_octet(w: [&[BlockIq4Xs]; 8], a: &[&[BlockQ8K]], out: &mut [f32]) {
            let table = iq4_u8_table();
            let m4 = _mm256_set1_epi8(15);
            // The codes transposed before the lookup, which works on bytes in any order: rows
            // r and r + 4 share a register (low and high 128 bits), and a 4 × 4 transpose of
            // words in each half leaves word d of the eight rows' 16 code bytes in one
            // register, whose low nibbles are group d and high nibbles group 4 + d. Half the
            // shuffles of transposing the looked-up 32-byte chunks (`transpose_chunks`), which
            // made the unpacking as costly as 13 tokens' terms. Plain loops: array closures
            // here compiled as functions of their own (not inlined).
            let unpack = |rows: [&BlockIq4Xs; 8]| {
                let mut q = [_mm256_setzero_si256(); 64];
                for ib in 0..8 {
                    let mut a = [_mm256_setzero_si256(); 4];
                    for (r, a) in a.iter_mut().enumerate() {
                        let lo = rows[r].qs[16 * ib..16 * ib + 16].as_ptr();
                        let hi = rows[r + 4].qs[16 * ib..16 * ib + 16].as_ptr();
                        *a = _mm256_loadu2_m128i(hi.cast(), lo.cast());
                    }
                    let t0 = _mm256_unpacklo_epi32(a[0], a[1]);
                    let t1 = _mm256_unpackhi_epi32(a[0], a[1]);
                    let t2 = _mm256_unpacklo_epi32(a[2], a[3]);
                    let t3 = _mm256_unpackhi_epi32(a[2], a[3]);
                    let words = [
                        _mm256_unpacklo_epi64(t0, t2),
                        _mm256_unpackhi_epi64(t0, t2),
                        _mm256_unpacklo_epi64(t1, t3),
                        _mm256_unpackhi_epi64(t1, t3),
                    ];
                    for (d, w) in words.into_iter().enumerate() {
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4);
                        q[8 * ib + d] = _mm256_shuffle_epi8(table, _mm256_and_si256(w, m4));
                        q[8 * ib + 4 + d] = _mm256_shuffle_epi8(table, hi);
                    }
                }
                // The 6-bit scales: four low bits from scales_l, two high from scales_h.
                let mut sl = [0i32; 8];
                let mut sh = [0i32; 8];
                let mut d = [0f32; 8];
                for (r, blk) in rows.iter().enumerate() {
                    sl[r] = i32::from_le_bytes(blk.scales_l);
                    sh[r] = u16::from_le_bytes(blk.scales_h) as i32;
                    d[r] = fp16(blk.d);
                }
                let sl = _mm256_loadu_si256(sl.as_ptr().cast());
                let sh = _mm256_loadu_si256(sh.as_ptr().cast());
                let mut sc = [_mm256_setzero_si256(); 8];
                for (ib, sc) in sc.iter_mut().enumerate() {
                    let lo = _mm256_srlv_epi32(sl, _mm256_set1_epi32(4 * ib as i32));
                    let hi = _mm256_srlv_epi32(sh, _mm256_set1_epi32(2 * ib as i32));
                    let v = _mm256_or_si256(
                        _mm256_and_si256(lo, _mm256_set1_epi32(15)),
                        _mm256_slli_epi32::<4>(_mm256_and_si256(hi, _mm256_set1_epi32(3))),
                    );
                    *sc = _mm256_sub_epi32(v, _mm256_set1_epi32(32));
                }
                Iq4XsOctet {
                    q,
                    sc,
                    d: _mm256_loadu_ps(d.as_ptr()),
                }
            };
            let term = |u: &Iq4XsOctet, ys: [&BlockQ8K; TERM_TOKENS]| {
                let mut s = [_mm256_setzero_si256(); TERM_TOKENS];
                for j in 0..8 {
                    let init = ys.map(|y| {
                        _mm256_set1_epi32(-128 * (y.bsum(2 * j) + y.bsum(2 * j + 1)))
                    });
                    let isum = group_sums(&u.q, 8 * j, 8, ys, init);
                    for k in 0..TERM_TOKENS {
                        s[k] = _mm256_add_epi32(s[k], _mm256_mullo_epi32(isum[k], u.sc[j]));
                    }
                }
                std::array::from_fn(|k| {
                    _mm256_mul_ps(
                        _mm256_mul_ps(u.d, _mm256_set1_ps(ys[k].d())),
                        _mm256_cvtepi32_ps(s[k]),
                    )
                })
            };
            rows_in_lanes(w, a, out, 0.0, unpack, term)
        }

        /// One IQ4_XS super-block against one Q8_K block as 8 lanes of i32 whose sum is the
        /// scalar dot's integer. Sub-blocks go in pairs: one load of their 32 code bytes gives
        /// both halves of each (low nibbles: elements 0..16, high: 16..32), looked up with 128
        /// added (unsigned for `vpdpbusd`) against the matching activation halves; the pair's
        /// lanes are weighted by its two scales in 32 bits, and 128 · Σ scale · (sub-block
        /// activation sum) is taken off, those sums from the block's `bsums`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn iq4_xs_lanes(table: __m256i, w: &BlockIq4Xs, y: &BlockQ8K) -> __m256i {
            let zero = _mm256_setzero_si256();
            let m4 = _mm256_set1_epi8(15);
            // The eight 6-bit scales in i32 lanes: 4 low bits from scales_l, 2 from scales_h.
            let lo = _mm256_srlv_epi32(
                _mm256_set1_epi32(u32::from_le_bytes(w.scales_l) as i32),
                _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
            );
            let hi = _mm256_srlv_epi32(
                _mm256_set1_epi32(u16::from_le_bytes(w.scales_h) as i32),
                _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
            );
            let ls = _mm256_sub_epi32(
                _mm256_or_si256(
                    _mm256_and_si256(lo, _mm256_set1_epi32(15)),
                    _mm256_slli_epi32::<4>(_mm256_and_si256(hi, _mm256_set1_epi32(3))),
                ),
                _mm256_set1_epi32(32),
            );
            let pair_sums = _mm256_madd_epi16(
                _mm256_loadu_si256(y.bsums.as_ptr().cast()),
                _mm256_set1_epi16(1),
            );
            let mut acc = _mm256_sub_epi32(
                zero,
                _mm256_slli_epi32::<7>(_mm256_mullo_epi32(ls, pair_sums)),
            );
            let x = y.qs.as_ptr();
            for j in 0..4 {
                let q = _mm256_loadu_si256(w.qs[32 * j..].as_ptr().cast());
                let ulo = _mm256_shuffle_epi8(table, _mm256_and_si256(q, m4));
                let uhi = _mm256_shuffle_epi8(
                    table,
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
                );
                let xlo = _mm256_loadu2_m128i(x.add(64 * j + 32).cast(), x.add(64 * j).cast());
                let xhi =
                    _mm256_loadu2_m128i(x.add(64 * j + 48).cast(), x.add(64 * j + 16).cast());
                let p = dpbusd(dpbusd(zero, ulo, xlo), uhi, xhi);
                // Scale 2j in the low four lanes, 2j + 1 in the high four.
                let pick = _mm256_add_epi32(
                    _mm256_set1_epi32(2 * j as i32),
                    _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                );
                let sc = _mm256_permutevar8x32_epi32(ls, pick);
                acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(p, sc));
            }
            acc
        }

        /// IQ4_XS · Q8_K with `vpdpbusd`, four super-blocks' lanes summed horizontally at
        /// once; the same integer per super-block and the same float expression, in the same
        /// order, as the scalar dot: bit for bit.
        #[target_feature(enable = $feat)]
        unsafe fn iq4_xs_dot(w: &[BlockIq4Xs], a: &[BlockQ8K]) -> f32 {
            let n = w.len().min(a.len());
            let (w, a) = (&w[..n], &a[..n]);
            let table = iq4_u8_table();
            let mut sum = 0.0f32;
            let mut i = 0;
            let mut ahead = Prefetch::new(w);
            while i + 4 <= n {
                ahead.through(i + 3);
                let isums = hsum4_epi32(
                    iq4_xs_lanes(table, &w[i], &a[i]),
                    iq4_xs_lanes(table, &w[i + 1], &a[i + 1]),
                    iq4_xs_lanes(table, &w[i + 2], &a[i + 2]),
                    iq4_xs_lanes(table, &w[i + 3], &a[i + 3]),
                );
                for (k, is) in isums.into_iter().enumerate() {
                    sum += fp16(w[i + k].d) * a[i + k].d() * is as f32;
                }
                i += 4;
            }
            for (w, y) in w[i..].iter().zip(&a[i..]) {
                sum += fp16(w.d) * y.d() * hsum_epi32(iq4_xs_lanes(table, w, y)) as f32;
            }
            sum
        }

        pub(crate) fn octet_iq4_xs(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
            let a: Vec<&[BlockQ8K]> = a.iter().map(|r| cast_slice(r)).collect();
            // SAFETY: installed by x86::specialize only on this module's tier; the kernel
            // asserts every length it indexes by.
            unsafe { iq4xs_octet(w.map(cast_slice), &a, out) }
        }

        /// The grid i-quants the same way: each unit of 32 signed weights plus 128
        /// (unsigned for `vpdpbusd`; 128 · each half's activation sum taken back off),
        /// transposed per unit; each half's sum weighted by the rows' odd scales in 32 bits,
        /// the single-row dot's `(d · a.d) · Σ` per super-block and its factor at the end:
        /// each result equals the type's `dot` bit for bit.
        struct GridOctet {
            q: [__m256i; 64],
            sc: [__m256i; 16],
            d: __m256,
        }

        /// The grid octet over one block type: `values` unpacks unit u of a super-block,
        /// `d` is its scale, `factor` the type's float factor.
        #[target_feature(enable = $feat)]
        unsafe fn grid_octet<B>(
            w: [&[B]; 8],
            a: &[&[BlockQ8K]],
            out: &mut [f32],
            values: unsafe fn(&B, usize) -> (__m256i, [i32; 2]),
            d: fn(&B) -> f32,
            factor: f32,
        ) {
            let unpack = |rows: [&B; 8]| {
                let mut chunks = [[_mm256_setzero_si256(); 8]; 8];
                let mut sc16 = [[0i32; 8]; 16];
                for (r, blk) in rows.iter().enumerate() {
                    for u in 0..8 {
                        let (v, s) = values(blk, u);
                        chunks[r][u] = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
                        sc16[2 * u][r] = s[0];
                        sc16[2 * u + 1][r] = s[1];
                    }
                }
                let ds = rows.map(d);
                GridOctet {
                    q: transpose_chunks(chunks),
                    sc: sc16.map(|v| _mm256_loadu_si256(v.as_ptr().cast())),
                    d: _mm256_loadu_ps(ds.as_ptr()),
                }
            };
            let term = |u: &GridOctet, ys: [&BlockQ8K; TERM_TOKENS]| {
                let mut s = [_mm256_setzero_si256(); TERM_TOKENS];
                for j in 0..8 {
                    for half in 0..2 {
                        let init = ys.map(|y| _mm256_set1_epi32(-128 * y.bsum(2 * j + half)));
                        let isum = group_sums(&u.q, 8 * j + 4 * half, 4, ys, init);
                        for k in 0..TERM_TOKENS {
                            let sc = u.sc[2 * j + half];
                            s[k] = _mm256_add_epi32(s[k], _mm256_mullo_epi32(isum[k], sc));
                        }
                    }
                }
                std::array::from_fn(|k| {
                    _mm256_mul_ps(
                        _mm256_mul_ps(u.d, _mm256_set1_ps(ys[k].d())),
                        _mm256_cvtepi32_ps(s[k]),
                    )
                })
            };
            rows_in_lanes(w, a, out, 0.0, unpack, term);
            for v in out[..8 * a.len()].iter_mut() {
                *v *= factor;
            }
        }

        entry_grid_octet!(
            octet_iq2_xxs => BlockIq2Xxs, grid_values, Groups::d, <BlockIq2Xxs as Groups>::FACTOR;
            octet_iq2_xs => BlockIq2Xs, grid_values, Groups::d, <BlockIq2Xs as Groups>::FACTOR;
            octet_iq2_s => BlockIq2S, grid_values, Groups::d, <BlockIq2S as Groups>::FACTOR;
            octet_iq3_xxs => BlockIq3Xxs, grid_values, Groups::d, <BlockIq3Xxs as Groups>::FACTOR;
            octet_iq3_s => BlockIq3S, grid_values, Groups::d, <BlockIq3S as Groups>::FACTOR;
            octet_iq1_s => BlockIq1S, iq1_values, Iq1::d, IQ1_FACTOR;
            octet_iq1_m => BlockIq1M, iq1_values, Iq1::d, IQ1_FACTOR;
        );

        pub(crate) fn octet_q2_k(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
            let a: Vec<&[BlockQ8K]> = a.iter().map(|r| cast_slice(r)).collect();
            // SAFETY: installed by x86::specialize only on this module's tier; the kernel
            // asserts every length it indexes by.
            unsafe { q2k_octet(w.map(cast_slice), &a, out) }
        }

        pub(crate) fn octet_q3_k(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
            let a: Vec<&[BlockQ8K]> = a.iter().map(|r| cast_slice(r)).collect();
            // SAFETY: installed by x86::specialize only on this module's tier; the kernel
            // asserts every length it indexes by.
            unsafe { q3k_octet(w.map(cast_slice), &a, out) }
        }

        pub(crate) fn octet_q4_k(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
            let a: Vec<&[BlockQ8K]> = a.iter().map(|r| cast_slice(r)).collect();
            // SAFETY: installed by x86::specialize only on this module's tier; the kernel
            // asserts every length it indexes by.
            unsafe { q4k_octet(w.map(cast_slice), &a, out) }
        }

        pub(crate) fn octet_q5_k(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
            let a: Vec<&[BlockQ8K]> = a.iter().map(|r| cast_slice(r)).collect();
            // SAFETY: installed by x86::specialize only on this module's tier; the kernel
            // asserts every length it indexes by.
            unsafe { q5k_octet(w.map(cast_slice), &a, out) }
        }
        pub(crate) fn octet_q6_k(w: [&[u8]; 8], a: &[&[u8]], out: &mut [f32]) {
            let a: Vec<&[BlockQ8K]> = a.iter().map(|r| cast_slice(r)).collect();
            // SAFETY: installed by x86::specialize only on this module's tier; the kernel
            // asserts every length it indexes by.
            unsafe { q6k_octet(w.map(cast_slice), &a, out) }
        }

        entry_tile!(
            tile_q4_0 => q4_0_tile, tile_q5_0 => q5_0_tile, tile_q8_0 => q8_0_tile,
            tile_iq4_nl => iq4_nl_tile, tile_q4_1 => q4_1_tile,
            tile_q5_1 => q5_1_tile,
        );

        entry_rows4!(
            rows4_q4_0 => q4_0_rows4, rows4_q5_0 => q5_0_rows4, rows4_q8_0 => q8_0_rows4,
            rows4_iq4_nl => iq4_nl_rows4,
        );

        entry!(
            dot_q4_0 => q4_0, dot_q5_0 => q5_0, dot_q8_0 => q8_0,
            dot_iq4_nl => iq4_nl, dot_q4_1 => q4_1, dot_q5_1 => q5_1,
            dot_iq4_xs => iq4_xs_dot,
        );

        entry4!(
            dot4_q4_0 => q4_0_4, dot4_q5_0 => q5_0_4, dot4_q8_0 => q8_0_4,
            dot4_iq4_nl => iq4_nl_4, dot4_q4_1 => q4_1_4, dot4_q5_1 => q5_1_4,
        );
    };
}

/// AVX-512 VNNI: EVEX `vpdpbusd` on 256-bit registers.
pub(super) mod avx512 {
    use super::*;

    #[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512bw,avx512vnni")]
    #[inline]
    pub(in crate::x86) unsafe fn dpbusd(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, a)
    }

    /// The fifth bits as a byte mask straight from `qh` (AVX-512BW).
    #[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn bit4(qh: [u8; 4]) -> __m256i {
        _mm256_maskz_mov_epi8(u32::from_le_bytes(qh), _mm256_set1_epi8(0x10))
    }

    vnni_kernels!("avx2,fma,f16c,avx512vl,avx512bw,avx512vnni");
}

/// AVX-VNNI: the VEX encoding of `vpdpbusd`, for CPUs without AVX-512.
pub(super) mod avxvnni {
    use super::*;
    use crate::x86::avx2::bits_to_bytes;

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[inline]
    pub(in crate::x86) unsafe fn dpbusd(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, u, a)
    }

    /// The fifth bits through the AVX2 byte expansion.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[inline]
    unsafe fn bit4(qh: [u8; 4]) -> __m256i {
        _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10))
    }

    vnni_kernels!("avx2,fma,f16c,avxvnni");
}
