//! K-quants (super-blocks of 256 elements): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K as weights and Q8_K as
//! their activation format. Block structs, unpacking to small integers and per-sub-block scales,
//! scalar reference dequantize, the reference quantizers (bit-exact with ggml's
//! `quantize_row_*_ref`, which llama-quantize uses when no importance matrix is given) and the
//! scalar reference dot products.

// The quantizers transcribe ggml's reference loops index for index, so that they can be checked
// against it line by line; iterator rewrites would hide that correspondence.
#![allow(clippy::needless_range_loop)]

use crate::legacy::h;
use bytemuck::{Pod, Zeroable};

/// Elements per super-block.
pub const QK_K: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ2K {
    pub scales: [u8; 16],
    pub qs: [u8; 64],
    pub d: [u8; 2],
    pub dmin: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; 32],
    pub qs: [u8; 64],
    pub scales: [u8; 12],
    pub d: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: [u8; 2],
}

/// Q8_K activation block: f32 scale, 256 int8 values, and the sum of each run of 16 values.
/// Stored as bytes so that rows of blocks need no alignment.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: [u8; 4],
    pub qs: [i8; 256],
    pub bsums: [u8; 32],
}

impl BlockQ8K {
    #[inline]
    pub fn d(&self) -> f32 {
        f32::from_le_bytes(self.d)
    }
    #[inline]
    pub fn bsum(&self, i: usize) -> i32 {
        i16::from_le_bytes([self.bsums[2 * i], self.bsums[2 * i + 1]]) as i32
    }
}

// ---------------------------------------------------------------------------------------------
// Scales.

/// Q4_K / Q5_K: the 6-bit (scale, min) of sub-block `j` (0..8) from the packed 12 bytes.
#[inline]
pub fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q3_K: the sixteen signed 6-bit scales (already minus 32).
#[inline]
pub fn q3k_scales(s: &[u8; 12]) -> [i8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, a2) = (w(0), w(1), w(2));
    const M4: u32 = 0x0F0F_0F0F;
    const M2: u32 = 0x0303_0303;
    let words = [
        (a0 & M4) | ((a2 & M2) << 4),
        (a1 & M4) | (((a2 >> 2) & M2) << 4),
        ((a0 >> 4) & M4) | (((a2 >> 4) & M2) << 4),
        ((a1 >> 4) & M4) | (((a2 >> 6) & M2) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, wd) in words.iter().enumerate() {
        for (k, b) in wd.to_le_bytes().iter().enumerate() {
            out[4 * i + k] = (*b as i8).wrapping_sub(32);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Unpacking: the 256 quantized integers of a block in element order (before scale and offset).

/// Q2_K (0..3), Q3_K (−4..3): two halves of 128, pass p takes bits 2p of 32 bytes.
#[inline]
fn unpack_2bit(qs: &[u8; 64]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for half in 0..2 {
        for p in 0..4 {
            for l in 0..32 {
                q[128 * half + 32 * p + l] = (qs[32 * half + l] >> (2 * p)) & 3;
            }
        }
    }
    q
}

pub fn unpack_q2k(b: &BlockQ2K) -> [i8; QK_K] {
    unpack_2bit(&b.qs).map(|v| v as i8)
}

pub fn unpack_q3k(b: &BlockQ3K) -> [i8; QK_K] {
    let low = unpack_2bit(&b.qs);
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        for p in 0..4 {
            for l in 0..32 {
                let e = 128 * half + 32 * p + l;
                let hbit = (b.hmask[l] >> (4 * half + p)) & 1;
                q[e] = low[e] as i8 - if hbit != 0 { 0 } else { 4 };
            }
        }
    }
    q
}

pub fn unpack_q4k(b: &BlockQ4K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            q[64 * c + l] = (b.qs[32 * c + l] & 15) as i8;
            q[64 * c + 32 + l] = (b.qs[32 * c + l] >> 4) as i8;
        }
    }
    q
}

pub fn unpack_q5k(b: &BlockQ5K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            let hl = ((b.qh[l] >> (2 * c)) & 1) << 4;
            let hh = ((b.qh[l] >> (2 * c + 1)) & 1) << 4;
            q[64 * c + l] = ((b.qs[32 * c + l] & 15) | hl) as i8;
            q[64 * c + 32 + l] = ((b.qs[32 * c + l] >> 4) | hh) as i8;
        }
    }
    q
}

pub fn unpack_q6k(b: &BlockQ6K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        let ql = &b.ql[64 * half..64 * half + 64];
        let qh = &b.qh[32 * half..32 * half + 32];
        for l in 0..32 {
            let base = 128 * half;
            q[base + l] = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i8 - 32;
            q[base + 32 + l] = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            q[base + 64 + l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            q[base + 96 + l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

// ---------------------------------------------------------------------------------------------
// Dequantize (scalar reference).

pub fn dequantize_q2k(blocks: &[BlockQ2K], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (h(b.d), h(b.dmin));
        let q = unpack_q2k(b);
        for (j, (os, qs)) in o.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let sc = b.scales[j];
            let (dl, ml) = (d * (sc & 15) as f32, dmin * (sc >> 4) as f32);
            for (v, &x) in os.iter_mut().zip(qs) {
                *v = dl * x as f32 - ml;
            }
        }
    }
}

pub fn dequantize_q3k(blocks: &[BlockQ3K], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = h(b.d);
        let sc = q3k_scales(&b.scales);
        let q = unpack_q3k(b);
        for (i, v) in o.iter_mut().enumerate() {
            *v = d * sc[i / 16] as f32 * q[i] as f32;
        }
    }
}

pub fn dequantize_q4k(blocks: &[BlockQ4K], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (h(b.d), h(b.dmin));
        let q = unpack_q4k(b);
        for (j, (os, qs)) in o.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
            let (sc, mn) = scale_min_k4(j, &b.scales);
            let (dl, ml) = (d * sc as f32, dmin * mn as f32);
            for (v, &x) in os.iter_mut().zip(qs) {
                *v = dl * x as f32 - ml;
            }
        }
    }
}

pub fn dequantize_q5k(blocks: &[BlockQ5K], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (h(b.d), h(b.dmin));
        let q = unpack_q5k(b);
        for (j, (os, qs)) in o.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
            let (sc, mn) = scale_min_k4(j, &b.scales);
            let (dl, ml) = (d * sc as f32, dmin * mn as f32);
            for (v, &x) in os.iter_mut().zip(qs) {
                *v = dl * x as f32 - ml;
            }
        }
    }
}

pub fn dequantize_q6k(blocks: &[BlockQ6K], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = h(b.d);
        let q = unpack_q6k(b);
        for (i, v) in o.iter_mut().enumerate() {
            *v = d * b.scales[i / 16] as f32 * q[i] as f32;
        }
    }
}

pub fn dequantize_q8k(blocks: &[BlockQ8K], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for (v, q) in o.iter_mut().zip(b.qs) {
            *v = d * q as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reference quantizers.

/// ggml's `nearest_int`: round half to even through the 1.5·2^23 trick (valid for |x| ≤ 2^22).
#[inline]
pub fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

const GROUP_MAX_EPS: f32 = 1e-15;

/// Signed scale for symmetric quants in [−nmax, nmax−1] with weighted refinement
/// (ggml's `make_qx_quants` with rmse_type 1 and weights x² or `qw`). Writes L = l + nmax.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let w = |i: usize| qw.map_or(x[i] * x[i], |q| q[i]);
    let quant = |iscale: f32, i: usize| nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let l = quant(iscale, i);
        l_out[i] = (l + nmax) as i8;
        sumlx += w(i) * x[i] * l as f32;
        suml2 += w(i) * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut slx, mut sl2) = (0.0f32, 0.0f32);
        for i in 0..x.len() {
            let l = quant(iscale, i);
            slx += w(i) * x[i] * l as f32;
            sl2 += w(i) * l as f32 * l as f32;
        }
        if sl2 > 0.0 && slx * slx > best * sl2 {
            for i in 0..x.len() {
                l_out[i] = (nmax + quant(iscale, i)) as i8;
            }
            scale = slx / sl2;
            best = scale * slx;
        }
    }
    scale
}

/// Q3_K sub-block scale with iterative refinement (ggml's `make_q3_quants`, do_rmse = true).
/// Writes L = l + nmax.
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = l as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..x.len() {
            let w = x[i] * x[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l_out[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for l in l_out.iter_mut() {
        *l += nmax as i8;
    }
    sumlx / suml2
}

/// Asymmetric (scale, min) search (ggml's `make_qkx2_quants`). Returns (scale, −min) with L in
/// [0, nmax].
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        best_error += weights[i] * err(scale * l as f32 + min - x[i]);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur = 0.0f32;
            for i in 0..n {
                cur += weights[i] * err(this_scale * laux[i] as f32 + this_min - x[i]);
            }
            if cur < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8; 64]) {
    for half in 0..2 {
        let j = 128 * half;
        for i in 0..32 {
            qs[32 * half + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

pub fn quantize_q2k(x: &[f32], out: &mut [BlockQ2K]) {
    const Q4SCALE: f32 = 15.0;
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut l = [0u8; QK_K];
        let (mut scales, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        for j in 0..16 {
            let xs = &xb[16 * j..16 * j + 16];
            let weights: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
            let (s, m) = make_qkx2_quants(
                3,
                xs,
                &weights,
                &mut l[16 * j..16 * j + 16],
                -0.5,
                0.1,
                15,
                true,
            );
            scales[j] = s;
            mins[j] = m;
            max_scale = max_scale.max(s);
            max_min = max_min.max(m);
        }
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for j in 0..16 {
                y.scales[j] = nearest_int(iscale * scales[j]) as u8;
            }
            y.d = crate::float::f32_to_f16(max_scale / Q4SCALE).to_le_bytes();
        } else {
            y.scales = [0; 16];
            y.d = [0; 2];
        }
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for j in 0..16 {
                let lm = nearest_int(iscale * mins[j]) as u8;
                y.scales[j] |= lm << 4;
            }
            y.dmin = crate::float::f32_to_f16(max_min / Q4SCALE).to_le_bytes();
        } else {
            y.dmin = [0; 2];
        }
        for j in 0..16 {
            let d = h(y.d) * (y.scales[j] & 15) as f32;
            if d == 0.0 {
                continue;
            }
            let dm = h(y.dmin) * (y.scales[j] >> 4) as f32;
            for ii in 0..16 {
                l[16 * j + ii] = nearest_int((xb[16 * j + ii] + dm) / d).clamp(0, 3) as u8;
            }
        }
        pack_2bit(&l, &mut y.qs);
    }
}

pub fn quantize_q3k(x: &[f32], out: &mut [BlockQ3K]) {
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
        for j in 0..16 {
            scales[j] = make_q3_quants(4, &xb[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
            if scales[j].abs() > amax {
                amax = scales[j].abs();
                max_scale = scales[j];
            }
        }
        y.scales = [0; 12];
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..16 {
                let mut lv = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
                if j < 8 {
                    y.scales[j] = (lv & 15) as u8;
                } else {
                    y.scales[j - 8] |= ((lv & 15) as u8) << 4;
                }
                lv >>= 4;
                y.scales[j % 4 + 8] |= (lv as u8) << (2 * (j / 4));
            }
            y.d = crate::float::f32_to_f16(1.0 / iscale).to_le_bytes();
        } else {
            y.d = [0; 2];
        }
        let sc = q3k_scales(&y.scales);
        for j in 0..16 {
            let d = h(y.d) * sc[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / d).clamp(-4, 3) + 4) as i8;
            }
        }
        y.hmask = [0; 32];
        let mut lu = [0u8; QK_K];
        for (j, v) in l.iter().enumerate() {
            let mut q = *v as u8;
            if q > 3 {
                y.hmask[j % 32] |= 1 << (j / 32);
                q -= 4;
            }
            lu[j] = q;
        }
        pack_2bit(&lu, &mut y.qs);
    }
}

/// Shared by Q4_K and Q5_K: per-32 (scale, min) search, 6-bit packing, final requantization.
fn quantize_k4_like(
    xb: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    scales12: &mut [u8; 12],
) -> ([u8; QK_K], f32, f32) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &xb[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max(s);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    *scales12 = [0; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            scales12[j] = ls;
            scales12[j + 4] = lm;
        } else {
            scales12[j + 4] = (ls & 15) | ((lm & 15) << 4);
            scales12[j - 4] |= (ls >> 4) << 6;
            scales12[j] |= (lm >> 4) << 6;
        }
    }
    let d = h(crate::float::f32_to_f16(max_scale / 63.0).to_le_bytes());
    let dmin = h(crate::float::f32_to_f16(max_min / 63.0).to_le_bytes());
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales12);
        let dd = d * sc as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((xb[32 * j + ii] + dm) / dd).clamp(0, nmax) as u8;
        }
    }
    (l, max_scale / 63.0, max_min / 63.0)
}

pub fn quantize_q4k(x: &[f32], out: &mut [BlockQ4K]) {
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (l, d, dmin) = quantize_k4_like(xb, 15, -1.0, 20, &mut y.scales);
        y.d = crate::float::f32_to_f16(d).to_le_bytes();
        y.dmin = crate::float::f32_to_f16(dmin).to_le_bytes();
        for c in 0..4 {
            for i in 0..32 {
                y.qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
            }
        }
    }
}

pub fn quantize_q5k(x: &[f32], out: &mut [BlockQ5K]) {
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (l, d, dmin) = quantize_k4_like(xb, 31, -0.5, 15, &mut y.scales);
        y.d = crate::float::f32_to_f16(d).to_le_bytes();
        y.dmin = crate::float::f32_to_f16(dmin).to_le_bytes();
        y.qh = [0; 32];
        for c in 0..4 {
            for i in 0..32 {
                let (mut l1, mut l2) = (l[64 * c + i], l[64 * c + 32 + i]);
                if l1 > 15 {
                    l1 -= 16;
                    y.qh[i] |= 1 << (2 * c);
                }
                if l2 > 15 {
                    l2 -= 16;
                    y.qh[i] |= 2 << (2 * c);
                }
                y.qs[32 * c + i] = l1 | (l2 << 4);
            }
        }
    }
}

pub fn quantize_q6k(x: &[f32], out: &mut [BlockQ6K]) {
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
        for ib in 0..16 {
            scales[ib] = make_qx_quants(
                32,
                &xb[16 * ib..16 * ib + 16],
                &mut l[16 * ib..16 * ib + 16],
                None,
            );
            if scales[ib].abs() > max_abs {
                max_abs = scales[ib].abs();
                max_scale = scales[ib];
            }
        }
        if max_abs < GROUP_MAX_EPS {
            *y = BlockQ6K::zeroed();
            continue;
        }
        let iscale = -128.0 / max_scale;
        y.d = crate::float::f32_to_f16(1.0 / iscale).to_le_bytes();
        for ib in 0..16 {
            y.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..16 {
            let d = h(y.d) * y.scales[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
            }
        }
        let lu = l.map(|v| v as u8);
        for half in 0..2 {
            let j = 128 * half;
            for i in 0..32 {
                let (q1, q2, q3, q4) = (lu[j + i], lu[j + i + 32], lu[j + i + 64], lu[j + i + 96]);
                y.ql[64 * half + i] = (q1 & 15) | ((q3 & 15) << 4);
                y.ql[64 * half + i + 32] = (q2 & 15) | ((q4 & 15) << 4);
                y.qh[32 * half + i] =
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
    }
}

/// ggml's `quantize_row_q8_K_ref` (also what its x86 CPU path runs): iscale = −127/max with max
/// the signed element of largest magnitude, q = min(127, nearest_int(iscale·x)), d = 1/iscale.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *y = BlockQ8K::zeroed();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, v) in y.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for j in 0..16 {
            let s: i32 = y.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
            y.bsums[2 * j..2 * j + 2].copy_from_slice(&(s as i16).to_le_bytes());
        }
        y.d = (1.0 / iscale).to_le_bytes();
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar reference dot products with Q8_K activations.

/// Σ q·a over each run of 16 elements.
#[inline]
pub fn isums16(q: &[i8; QK_K], a: &[i8; QK_K]) -> [i32; 16] {
    let mut s = [0i32; 16];
    for (i, (x, y)) in q.iter().zip(a).enumerate() {
        s[i / 16] += *x as i32 * *y as i32;
    }
    s
}

pub fn dot_q2k(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = isums16(&unpack_q2k(w), &a.qs);
            let (mut sum, mut msum) = (0i32, 0i32);
            for j in 0..16 {
                sum += (w.scales[j] & 15) as i32 * s[j];
                msum += (w.scales[j] >> 4) as i32 * a.bsum(j);
            }
            a.d() * (h(w.d) * sum as f32 - h(w.dmin) * msum as f32)
        })
        .sum()
}

pub fn dot_q3k(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = isums16(&unpack_q3k(w), &a.qs);
            let sc = q3k_scales(&w.scales);
            let sum: i32 = (0..16).map(|j| sc[j] as i32 * s[j]).sum();
            a.d() * h(w.d) * sum as f32
        })
        .sum()
}

/// Q4_K / Q5_K: the sub-block scales repeated per run of 16 (what the kernels multiply by), and
/// the mins term Σ min_j · (activation sum of sub-block j).
pub(crate) fn k4_scales16(s: &[u8; 12], a: &BlockQ8K) -> ([i16; 16], i32) {
    let mut scales = [0i16; 16];
    let mut msum = 0i32;
    for j in 0..8 {
        let (sc, mn) = scale_min_k4(j, s);
        scales[2 * j] = sc as i16;
        scales[2 * j + 1] = sc as i16;
        msum += mn as i32 * (a.bsum(2 * j) + a.bsum(2 * j + 1));
    }
    (scales, msum)
}

fn dot_k4_like(q: &[i8; QK_K], scales: &[u8; 12], d: f32, dmin: f32, a: &BlockQ8K) -> f32 {
    let s = isums16(q, &a.qs);
    let (sc16, msum) = k4_scales16(scales, a);
    let sum: i32 = (0..16).map(|j| sc16[j] as i32 * s[j]).sum();
    a.d() * (d * sum as f32 - dmin * msum as f32)
}

pub fn dot_q4k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| dot_k4_like(&unpack_q4k(w), &w.scales, h(w.d), h(w.dmin), a))
        .sum()
}

pub fn dot_q5k(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| dot_k4_like(&unpack_q5k(w), &w.scales, h(w.d), h(w.dmin), a))
        .sum()
}

pub fn dot_q6k(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let s = isums16(&unpack_q6k(w), &a.qs);
            let sum: i32 = (0..16).map(|j| w.scales[j] as i32 * s[j]).sum();
            a.d() * h(w.d) * sum as f32
        })
        .sum()
}
