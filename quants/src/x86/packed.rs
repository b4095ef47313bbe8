//! x86 kernels over packed eight-row groups (layout in [`crate::packed`]): one block's eight
//! group registers are loaded once and serve every token of the call, each token's block costing
//! eight activation broadcasts and eight byte products for eight rows. Both tiers compute each
//! row's exact integer block sum, then the reference's float step, so results equal
//! [`crate::packed::reference`] bit for bit.
//!
//! VNNI (AVX-512 VNNI and AVX-VNNI alike): every weight as an unsigned code `u = w + o` (Q4_0:
//! o = 8, Q5_0: 16, Q8_0: 128, the latter by flipping the sign bit) into `vpdpbusd`, seeded with
//! `−o · Σa`. AVX2: `vpmaddubsw` on the codes (Q4_0/Q5_0, whose codes are small enough that two
//! products add in 16 bits), or on |w| and a with w's sign (Q8_0), widened by `vpmaddwd`.

use core::arch::x86_64::*;

use super::avx2::fp16;
use crate::legacy::BlockQ8_0;
use bytemuck::cast_slice;

/// Tokens whose accumulators live on the stack at once; longer calls run in slices of this.
const TOKENS: usize = 16;

/// The eight group registers of a Q4_0 block as codes 0..15.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn regs_q4_0(q: *const u8) -> [__m256i; 8] {
    let m = _mm256_set1_epi8(15);
    let mut r = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        let v = _mm256_loadu_si256(q.add(32 * c).cast());
        r[c] = _mm256_and_si256(v, m);
        r[c + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m);
    }
    r
}

/// Q5_0 codes 0..31: the nibbles plus the fifth bits, bit g of the bit register moved to bit 4.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn regs_q5_0(q: *const u8) -> [__m256i; 8] {
    let mut r = regs_q4_0(q);
    let hb = _mm256_loadu_si256(q.add(128).cast());
    let bit4 = _mm256_set1_epi8(0x10);
    let moved = [
        _mm256_slli_epi16::<4>(hb),
        _mm256_slli_epi16::<3>(hb),
        _mm256_slli_epi16::<2>(hb),
        _mm256_slli_epi16::<1>(hb),
        hb,
        _mm256_srli_epi16::<1>(hb),
        _mm256_srli_epi16::<2>(hb),
        _mm256_srli_epi16::<3>(hb),
    ];
    for (x, m) in r.iter_mut().zip(moved) {
        *x = _mm256_or_si256(*x, _mm256_and_si256(m, bit4));
    }
    r
}

/// Q8_0 weights as signed bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn regs_q8_0(q: *const u8) -> [__m256i; 8] {
    std::array::from_fn(|g| _mm256_loadu_si256(q.add(32 * g).cast()))
}

/// Q8_0 weights as codes w + 128.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn regs_q8_0_u(q: *const u8) -> [__m256i; 8] {
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    std::array::from_fn(|g| _mm256_xor_si256(_mm256_loadu_si256(q.add(32 * g).cast()), flip))
}

/// Activation bytes 4g..4g+4 in every 32-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bcast(y: &BlockQ8_0, g: usize) -> __m256i {
    _mm256_set1_epi32(core::ptr::read_unaligned(
        y.qs.as_ptr().add(4 * g).cast::<i32>(),
    ))
}

/// Σ u·a − seed-free (the caller subtracts o·Σa): codes below 32, two products per 16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn isum_small_avx2(r: &[__m256i; 8], y: &BlockQ8_0, offset_sum: i32) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let mut s = _mm256_set1_epi32(-offset_sum);
    for c in 0..4 {
        let p = _mm256_add_epi16(
            _mm256_maddubs_epi16(r[c], bcast(y, c)),
            _mm256_maddubs_epi16(r[c + 4], bcast(y, c + 4)),
        );
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
    }
    s
}

/// Σ w·a for signed weights by the sign trick (offset_sum unused: no codes).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn isum_signed_avx2(r: &[__m256i; 8], y: &BlockQ8_0, _offset_sum: i32) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let mut s = _mm256_setzero_si256();
    for (g, w) in r.iter().enumerate() {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(*w, *w), _mm256_sign_epi8(bcast(y, g), *w));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
    }
    s
}

/// Σ u·a − o·Σa with `vpdpbusd` (the tier's `dpbusd`), two chains.
macro_rules! isum_vnni {
    ($name:ident, $feat:literal, $dpbusd:path) => {
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $name(r: &[__m256i; 8], y: &BlockQ8_0, offset_sum: i32) -> __m256i {
            let mut s0 = _mm256_set1_epi32(-offset_sum);
            let mut s1 = _mm256_setzero_si256();
            for c in 0..4 {
                s0 = $dpbusd(s0, r[c], bcast(y, c));
                s1 = $dpbusd(s1, r[c + 4], bcast(y, c + 4));
            }
            _mm256_add_epi32(s0, s1)
        }
    };
}

isum_vnni!(
    isum_avx512vnni,
    "avx2,fma,f16c,avx512vl,avx512bw,avx512vnni",
    super::vnni::avx512::dpbusd
);
isum_vnni!(
    isum_avxvnni,
    "avx2,fma,f16c,avxvnni",
    super::vnni::avxvnni::dpbusd
);

/// One packed kernel: `$regs` unpacks a block's quants, `$isum` forms the eight block sums
/// given `offset · Σa`, `$bb` is the packed block size.
macro_rules! packed_kernel {
    ($name:ident, $entry:ident, $feat:literal, $regs:ident, $isum:ident, $offset:expr, $bb:expr) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(packed: &[u8], act: &[&[BlockQ8_0]], sums: &[&[i32]], out: &mut [f32]) {
            let nb = packed.len() / $bb;
            let nt = act.len();
            assert!(packed.len() == nb * $bb && out.len() >= 8 * nt && sums.len() == nt);
            assert!(act.iter().all(|a| a.len() >= nb) && sums.iter().all(|s| s.len() >= nb));
            let mut lanes = [0f32; 8];
            // Weight prefetch (first pass over the blocks only): one line at a time, `dist`
            // bytes ahead, running on past this group into the next one as decode reads it.
            let dist = crate::isa::weight_prefetch_bytes();
            let base = packed.as_ptr();
            let mut ahead = dist;
            for t0 in (0..nt).step_by(TOKENS) {
                let t1 = (t0 + TOKENS).min(nt);
                let mut acc = [_mm256_setzero_ps(); TOKENS];
                for b in 0..nb {
                    let blk = base.add(b * $bb);
                    if dist > 0 && t0 == 0 {
                        ahead = crate::isa::prefetch(packed, ahead, (b + 1) * $bb + dist);
                    }
                    let regs = $regs(blk.add(16));
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
                    for (j, ac) in (t0..t1).zip(acc.iter_mut()) {
                        let y = act[j].get_unchecked(b);
                        let isum = $isum(&regs, y, $offset * *sums[j].get_unchecked(b));
                        let d = _mm256_mul_ps(dw, _mm256_set1_ps(fp16(y.d)));
                        *ac = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), *ac);
                    }
                }
                for (j, ac) in (t0..t1).zip(acc) {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), ac);
                    for (r, v) in lanes.iter().enumerate() {
                        out[r * nt + j] = *v;
                    }
                }
            }
        }

        pub(crate) fn $entry(packed: &[u8], act: &[&[u8]], sums: &[&[i32]], out: &mut [f32]) {
            let act: Vec<&[BlockQ8_0]> = act.iter().map(|a| cast_slice(a)).collect();
            // SAFETY: installed by x86::specialize only where the CPU has the features the
            // kernel enables; the kernel asserts every length it reads by (the unchecked reads
            // are below those bounds) and loads whole blocks inside `packed`.
            unsafe { $name(packed, &act, sums, out) }
        }
    };
}

packed_kernel!(
    q4_0_avx2,
    packed_q4_0_avx2,
    "avx2,fma,f16c",
    regs_q4_0,
    isum_small_avx2,
    8,
    144
);
packed_kernel!(
    q5_0_avx2,
    packed_q5_0_avx2,
    "avx2,fma,f16c",
    regs_q5_0,
    isum_small_avx2,
    16,
    176
);
packed_kernel!(
    q8_0_avx2,
    packed_q8_0_avx2,
    "avx2,fma,f16c",
    regs_q8_0,
    isum_signed_avx2,
    0,
    272
);
packed_kernel!(
    q4_0_avx512vnni,
    packed_q4_0_avx512vnni,
    "avx2,fma,f16c,avx512vl,avx512bw,avx512vnni",
    regs_q4_0,
    isum_avx512vnni,
    8,
    144
);
packed_kernel!(
    q5_0_avx512vnni,
    packed_q5_0_avx512vnni,
    "avx2,fma,f16c,avx512vl,avx512bw,avx512vnni",
    regs_q5_0,
    isum_avx512vnni,
    16,
    176
);
packed_kernel!(
    q8_0_avx512vnni,
    packed_q8_0_avx512vnni,
    "avx2,fma,f16c,avx512vl,avx512bw,avx512vnni",
    regs_q8_0_u,
    isum_avx512vnni,
    128,
    272
);
packed_kernel!(
    q4_0_avxvnni,
    packed_q4_0_avxvnni,
    "avx2,fma,f16c,avxvnni",
    regs_q4_0,
    isum_avxvnni,
    8,
    144
);
packed_kernel!(
    q5_0_avxvnni,
    packed_q5_0_avxvnni,
    "avx2,fma,f16c,avxvnni",
    regs_q5_0,
    isum_avxvnni,
    16,
    176
);
packed_kernel!(
    q8_0_avxvnni,
    packed_q8_0_avxvnni,
    "avx2,fma,f16c,avxvnni",
    regs_q8_0_u,
    isum_avxvnni,
    128,
    272
);
