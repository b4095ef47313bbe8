//! NEON kernels over packed eight-row groups (layout in [`crate::packed`]), with and without
//! the dot-product extension. A block's eight group registers become sixteen signed-byte
//! registers (rows 0–3 and rows 4–7 of each), loaded once for every token of the call; each
//! token's block costs eight four-byte activation broadcasts. The weights are made signed
//! (Q4_0: code − 8, Q5_0: code − 16; Q8_0 is signed already), so the integer block sums need no
//! offset correction and are exact; the float step is [`crate::packed::reference`]'s, so results
//! equal it bit for bit.
//!
//! With `sdot`, one instruction per register adds four products into each row's lane. Without
//! it, `smull` pairs two rows per eight products and `sadalp` widens them into (row, half)
//! lanes, which one pairwise add per block folds back into one lane per row. With `smmla`
//! (i8mm), tokens go in pairs: the group registers are zipped into two-row, eight-element
//! registers once per block, and one instruction multiplies two rows by two tokens (eight
//! products each), half the instructions of `sdot` per token; a single token (decode) runs
//! the `sdot` kernel.

use core::arch::aarch64::*;

use super::dot16_sdot;
use crate::legacy::{h, BlockQ8_0};
use bytemuck::cast_slice;

/// Tokens whose accumulators are kept at once; longer calls run in slices of this.
const TOKENS: usize = 8;

/// A block's group registers as signed bytes: `[2g]` rows 0–3 of register g, `[2g + 1]` rows
/// 4–7.
type Regs = [int8x16_t; 16];

/// Q4_0: the nibbles of the four 32-byte chunks (chunk c: register c low, register c + 4
/// high), minus 8.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn regs_q4_0(q: *const u8) -> Regs {
    let (m, eight) = (vdupq_n_u8(15), vdupq_n_s8(8));
    let mut r = [vdupq_n_s8(0); 16];
    for c in 0..4 {
        for half in 0..2 {
            let v = vld1q_u8(q.add(32 * c + 16 * half));
            let lo = vreinterpretq_s8_u8(vandq_u8(v, m));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
            r[2 * c + half] = vsubq_s8(lo, eight);
            r[2 * (c + 4) + half] = vsubq_s8(hi, eight);
        }
    }
    r
}

/// Q5_0: the nibbles plus the fifth bits (bit g of the bit register's byte moved to bit 4 for
/// register g), minus 16.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn regs_q5_0(q: *const u8) -> Regs {
    let (m, sixteen, bit4) = (vdupq_n_u8(15), vdupq_n_s8(16), vdupq_n_u8(0x10));
    let mut r = [vdupq_n_s8(0); 16];
    for half in 0..2 {
        let hb = vld1q_u8(q.add(128 + 16 * half));
        let moved = [
            vshlq_n_u8::<4>(hb),
            vshlq_n_u8::<3>(hb),
            vshlq_n_u8::<2>(hb),
            vshlq_n_u8::<1>(hb),
            hb,
            vshrq_n_u8::<1>(hb),
            vshrq_n_u8::<2>(hb),
            vshrq_n_u8::<3>(hb),
        ];
        for c in 0..4 {
            let v = vld1q_u8(q.add(32 * c + 16 * half));
            let codes = [(c, vandq_u8(v, m)), (c + 4, vshrq_n_u8::<4>(v))];
            for (g, nib) in codes {
                let u = vorrq_u8(nib, vandq_u8(moved[g], bit4));
                r[2 * g + half] = vsubq_s8(vreinterpretq_s8_u8(u), sixteen);
            }
        }
    }
    r
}

/// Q8_0: the signed bytes as they are.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn regs_q8_0(q: *const u8) -> Regs {
    std::array::from_fn(|i| vld1q_s8(q.add(16 * i).cast()))
}

/// Activation bytes 4g..4g+4 in every 32-bit lane.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn bcast(y: &BlockQ8_0, g: usize) -> int8x16_t {
    vreinterpretq_s8_s32(vld1q_dup_s32(y.qs.as_ptr().add(4 * g).cast()))
}

/// The eight rows' block sums (rows 0–3, rows 4–7) with `sdot`.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn isum_sdot(r: &Regs, y: &BlockQ8_0) -> (int32x4_t, int32x4_t) {
    let (mut lo, mut hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
    for g in 0..8 {
        let a = bcast(y, g);
        lo = dot16_sdot(lo, r[2 * g], a);
        hi = dot16_sdot(hi, r[2 * g + 1], a);
    }
    (lo, hi)
}

/// The same with plain NEON: lanes (row, half of the four products) per pair of rows, folded
/// at the end.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn isum_neon(r: &Regs, y: &BlockQ8_0) -> (int32x4_t, int32x4_t) {
    let mut p = [vdupq_n_s32(0); 4];
    for g in 0..8 {
        let a = bcast(y, g);
        for half in 0..2 {
            let w = r[2 * g + half];
            p[2 * half] = vpadalq_s16(p[2 * half], vmull_s8(vget_low_s8(w), vget_low_s8(a)));
            p[2 * half + 1] = vpadalq_s16(p[2 * half + 1], vmull_high_s8(w, a));
        }
    }
    (vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]))
}

/// `smmla`: `acc` (lanes r0·t0, r0·t1, r1·t0, r1·t1) plus the products of two rows of eight
/// signed bytes (`rows`) with two tokens' eight (`toks`).
#[target_feature(enable = "neon,i8mm")]
#[inline]
unsafe fn mmla(mut acc: int32x4_t, rows: int8x16_t, toks: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction; the caller's target features include i8mm.
    core::arch::asm!(
        "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) rows,
        b = in(vreg) toks,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// A block's registers for `smmla`: `[p][q]` holds rows 2q and 2q + 1, elements 8p..8p + 8
/// (group registers 2p and 2p + 1 zipped by 32-bit lanes).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn row_pairs(r: &Regs) -> [[int8x16_t; 4]; 4] {
    std::array::from_fn(|p| {
        let (g0, g1) = (2 * p, 2 * p + 1);
        let z = |a: int8x16_t, b: int8x16_t, second: bool| {
            let (a, b) = (vreinterpretq_s32_s8(a), vreinterpretq_s32_s8(b));
            vreinterpretq_s8_s32(if second {
                vzip2q_s32(a, b)
            } else {
                vzip1q_s32(a, b)
            })
        };
        [
            z(r[2 * g0], r[2 * g1], false),
            z(r[2 * g0], r[2 * g1], true),
            z(r[2 * g0 + 1], r[2 * g1 + 1], false),
            z(r[2 * g0 + 1], r[2 * g1 + 1], true),
        ]
    })
}

/// The eight rows' block sums for two tokens with `smmla`: ((rows 0–3, rows 4–7) of y0, the
/// same of y1).
#[target_feature(enable = "neon,i8mm")]
#[inline]
#[allow(clippy::type_complexity)]
unsafe fn isum_mmla(
    rp: &[[int8x16_t; 4]; 4],
    y0: &BlockQ8_0,
    y1: &BlockQ8_0,
) -> ((int32x4_t, int32x4_t), (int32x4_t, int32x4_t)) {
    let mut acc = [vdupq_n_s32(0); 4];
    for (p, regs) in rp.iter().enumerate() {
        let a = vcombine_s8(
            vld1_s8(y0.qs.as_ptr().add(8 * p).cast()),
            vld1_s8(y1.qs.as_ptr().add(8 * p).cast()),
        );
        for (ac, &w) in acc.iter_mut().zip(regs) {
            *ac = mmla(*ac, w, a);
        }
    }
    (
        (vuzp1q_s32(acc[0], acc[1]), vuzp1q_s32(acc[2], acc[3])),
        (vuzp2q_s32(acc[0], acc[1]), vuzp2q_s32(acc[2], acc[3])),
    )
}

/// The eight rows' f16 scales as f32 (rows 0–3, rows 4–7), converted exactly by `fcvtl`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn scales(blk: *const u8) -> (float32x4_t, float32x4_t) {
    let v = vld1q_u16(blk.cast());
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: register-only conversions of base AArch64 SIMD (half to single precision).
    core::arch::asm!(
        "fcvtl {lo:v}.4s, {v:v}.4h",
        "fcvtl2 {hi:v}.4s, {v:v}.8h",
        v = in(vreg) v,
        lo = out(vreg) lo,
        hi = out(vreg) hi,
        options(pure, nomem, nostack, preserves_flags)
    );
    (lo, hi)
}

/// The float step of one block for one token: `ac += (d_rows · d_y) · Σ` for rows 0–3 and 4–7
/// (`fma`, the packed reference's order).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn block_step(
    ac: &mut (float32x4_t, float32x4_t),
    (dlo, dhi): (float32x4_t, float32x4_t),
    y: &BlockQ8_0,
    (lo, hi): (int32x4_t, int32x4_t),
) {
    let dy = vdupq_n_f32(h(y.d));
    ac.0 = vfmaq_f32(ac.0, vmulq_f32(dlo, dy), vcvtq_f32_s32(lo));
    ac.1 = vfmaq_f32(ac.1, vmulq_f32(dhi, dy), vcvtq_f32_s32(hi));
}

/// Tokens `t0..` of the slice in `acc`: each token's eight rows into `out` (row r at r·nt + j).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn store_slice(acc: &[(float32x4_t, float32x4_t)], t0: usize, nt: usize, out: &mut [f32]) {
    let mut lanes = [0f32; 8];
    for (j, ac) in (t0..).zip(acc) {
        vst1q_f32(lanes.as_mut_ptr(), ac.0);
        vst1q_f32(lanes.as_mut_ptr().add(4), ac.1);
        for (r, v) in lanes.iter().enumerate() {
            out[r * nt + j] = *v;
        }
    }
}

/// One packed kernel: `$regs` unpacks a block's quants, `$isum` forms the eight block sums,
/// `$bb` is the packed block size.
macro_rules! packed_kernel {
    ($name:ident, $entry:ident, $feat:literal, $regs:ident, $isum:ident, $bb:expr) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(packed: &[u8], act: &[&[BlockQ8_0]], out: &mut [f32]) {
            let nb = packed.len() / $bb;
            let nt = act.len();
            assert!(packed.len() == nb * $bb && out.len() >= 8 * nt);
            assert!(act.iter().all(|a| a.len() >= nb));
            let base = packed.as_ptr();
            for t0 in (0..nt).step_by(TOKENS) {
                let t1 = (t0 + TOKENS).min(nt);
                let mut acc = [(vdupq_n_f32(0.0), vdupq_n_f32(0.0)); TOKENS];
                for b in 0..nb {
                    let blk = base.add(b * $bb);
                    let regs = $regs(blk.add(16));
                    let d = scales(blk);
                    for (j, ac) in (t0..t1).zip(acc.iter_mut()) {
                        let y = act[j].get_unchecked(b);
                        block_step(ac, d, y, $isum(&regs, y));
                    }
                }
                store_slice(&acc[..t1 - t0], t0, nt, out);
            }
        }

        pub(super) fn $entry(packed: &[u8], act: &[&[u8]], sums: &[&[i32]], out: &mut [f32]) {
            // Signed weights need no block sums; the signature is the tiers' common one.
            assert_eq!(sums.len(), act.len());
            let act: Vec<&[BlockQ8_0]> = act.iter().map(|a| cast_slice(a)).collect();
            // SAFETY: installed by neon::specialize only where the CPU has the features the
            // kernel enables; the kernel asserts the lengths it reads by (the unchecked reads
            // are below them) and loads whole blocks inside `packed`.
            unsafe { $name(packed, &act, out) }
        }
    };
}

packed_kernel!(q4_0_n, packed_q4_0_neon, "neon", regs_q4_0, isum_neon, 144);
packed_kernel!(q5_0_n, packed_q5_0_neon, "neon", regs_q5_0, isum_neon, 176);
packed_kernel!(q8_0_n, packed_q8_0_neon, "neon", regs_q8_0, isum_neon, 272);
packed_kernel!(
    q4_0_d,
    packed_q4_0_sdot,
    "neon,dotprod",
    regs_q4_0,
    isum_sdot,
    144
);
packed_kernel!(
    q5_0_d,
    packed_q5_0_sdot,
    "neon,dotprod",
    regs_q5_0,
    isum_sdot,
    176
);
packed_kernel!(
    q8_0_d,
    packed_q8_0_sdot,
    "neon,dotprod",
    regs_q8_0,
    isum_sdot,
    272
);

/// One `smmla` kernel (tokens in pairs; an odd last token paired with itself, its copy
/// discarded), over `$regs` and blocks of `$bb` bytes; a single token runs `$one` (`sdot`).
macro_rules! packed_kernel_mmla {
    ($name:ident, $entry:ident, $regs:ident, $bb:expr, $one:ident) => {
        #[target_feature(enable = "neon,dotprod,i8mm")]
        unsafe fn $name(packed: &[u8], act: &[&[BlockQ8_0]], out: &mut [f32]) {
            let nb = packed.len() / $bb;
            let nt = act.len();
            assert!(packed.len() == nb * $bb && out.len() >= 8 * nt);
            assert!(act.iter().all(|a| a.len() >= nb));
            let base = packed.as_ptr();
            for t0 in (0..nt).step_by(TOKENS) {
                let t1 = (t0 + TOKENS).min(nt);
                let mut acc = [(vdupq_n_f32(0.0), vdupq_n_f32(0.0)); TOKENS];
                for b in 0..nb {
                    let blk = base.add(b * $bb);
                    let rp = row_pairs(&$regs(blk.add(16)));
                    let d = scales(blk);
                    for j in (t0..t1).step_by(2) {
                        let j2 = (j + 1).min(t1 - 1);
                        let (y0, y1) = (act[j].get_unchecked(b), act[j2].get_unchecked(b));
                        let (s0, s1) = isum_mmla(&rp, y0, y1);
                        block_step(&mut acc[j - t0], d, y0, s0);
                        if j2 > j {
                            block_step(&mut acc[j2 - t0], d, y1, s1);
                        }
                    }
                }
                store_slice(&acc[..t1 - t0], t0, nt, out);
            }
        }

        pub(super) fn $entry(packed: &[u8], act: &[&[u8]], sums: &[&[i32]], out: &mut [f32]) {
            if act.len() == 1 {
                return $one(packed, act, sums, out);
            }
            assert_eq!(sums.len(), act.len());
            let act: Vec<&[BlockQ8_0]> = act.iter().map(|a| cast_slice(a)).collect();
            // SAFETY: installed by neon::specialize only where the CPU has neon, dotprod and
            // i8mm; the kernel asserts the lengths it reads by (the unchecked reads are below
            // them) and loads whole blocks inside `packed`.
            unsafe { $name(packed, &act, out) }
        }
    };
}

packed_kernel_mmla!(q4_0_m, packed_q4_0_mmla, regs_q4_0, 144, packed_q4_0_sdot);
packed_kernel_mmla!(q5_0_m, packed_q5_0_mmla, regs_q5_0, 176, packed_q5_0_sdot);
packed_kernel_mmla!(q8_0_m, packed_q8_0_mmla, regs_q8_0, 272, packed_q8_0_sdot);

/// The packed kernel of `ty` at this NEON tier.
pub(super) fn kernel(ty: crate::GgmlType, isa: crate::Isa) -> Option<crate::PackedFn> {
    use crate::GgmlType::*;
    use crate::Isa::*;
    Some(match (ty, isa) {
        (Q4_0, Neon) => packed_q4_0_neon,
        (Q5_0, Neon) => packed_q5_0_neon,
        (Q8_0, Neon) => packed_q8_0_neon,
        (Q4_0, NeonDotprod) => packed_q4_0_sdot,
        (Q5_0, NeonDotprod) => packed_q5_0_sdot,
        (Q8_0, NeonDotprod) => packed_q8_0_sdot,
        (Q4_0, NeonI8mm) => packed_q4_0_mmla,
        (Q5_0, NeonI8mm) => packed_q5_0_mmla,
        (Q8_0, NeonI8mm) => packed_q8_0_mmla,
        _ => return None,
    })
}
