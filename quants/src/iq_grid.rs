//! The grid i-quants: IQ2_XXS, IQ2_XS, IQ2_S (2.06–2.56 bits a weight), IQ3_XXS and IQ3_S
//! (3.06 and 3.44), IQ1_S and IQ1_M (1.56 and 1.75). Each names groups of eight (or four)
//! weights by a row of a fixed grid ([`crate::iq_tables`]), with a sign per weight (IQ1: an
//! offset of ±1/8 per group of eight) and a small odd scale per 16 or 32 weights under the
//! super-block's f16 scale. Dequantizers compute what gguf-py's do, operation for operation;
//! dots take Q8_K activations and sum exact integers per super-block (the grid value with its
//! sign times the activation, times the odd scale) before one float product, as llama.cpp's
//! reference dots do. Their quantizers (IQ3_XXS, IQ3_S and IQ2_S so far) are in [`crate::iq_quant`].

// The decoders walk groups by index, as the format is described.
#![allow(clippy::needless_range_loop)]

use bytemuck::{Pod, Zeroable};

use crate::iq_tables::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS,
};
use crate::kquants::{BlockQ8K, QK_K};
use crate::legacy::h;

/// 66 bytes: d (f16), then per 32 weights eight bytes: four grid rows (IQ2XXS_GRID) and a
/// little-endian u32 whose bits 7l.. are group l's sign pattern (KSIGNS index) and whose top
/// four bits are the scale s (weights d · (0.5 + s) / 4 · grid).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq2Xxs {
    pub d: [u8; 2],
    pub qs: [u8; 64],
}

/// 74 bytes: d, 32 little-endian u16 (grid row of IQ2XS_GRID in the low nine bits, KSIGNS index
/// in the high seven) for groups of eight, and sixteen 4-bit scales, one per 16 weights.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq2Xs {
    pub d: [u8; 2],
    pub qs: [u8; 64],
    pub scales: [u8; 8],
}

/// 82 bytes: d, the low eight bits of 32 grid rows (IQ2S_GRID), a sign byte per group of eight,
/// the rows' high two bits (four a byte) and sixteen 4-bit scales.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq2S {
    pub d: [u8; 2],
    pub qs: [u8; 32],
    pub signs: [u8; 32],
    pub qh: [u8; 8],
    pub scales: [u8; 8],
}

/// 98 bytes: d, 64 grid rows of four (IQ3XXS_GRID), and per 32 weights a little-endian u32 of
/// four KSIGNS indices and a 4-bit scale s (weights d · (0.5 + s) / 2 · grid).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq3Xxs {
    pub d: [u8; 2],
    pub qs: [u8; 64],
    pub scales: [u8; 32],
}

/// 110 bytes: d, the low eight bits of 64 grid rows of four (IQ3S_GRID), their ninth bits, a
/// sign byte per eight weights and eight 4-bit scales s, one per 32 (weights d · (1 + 2s) · grid).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq3S {
    pub d: [u8; 2],
    pub qs: [u8; 64],
    pub qh: [u8; 8],
    pub signs: [u8; 32],
    pub scales: [u8; 4],
}

/// 50 bytes: d, the low eight bits of 32 grid rows (IQ1S_GRID), and per 32 weights a u16: the
/// rows' high three bits, a 3-bit scale s and the offset's sign (weights d · (2s + 1) ·
/// (grid ± 1/8)).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq1S {
    pub d: [u8; 2],
    pub qs: [u8; 32],
    pub qh: [u8; 16],
}

/// 56 bytes: the low eight bits of 32 grid rows (IQ1S_GRID); a nibble per row with its high
/// three bits and its offset's sign; four u16 holding sixteen 3-bit scales (one per 16 weights)
/// and, in their top nibbles, the f16 super-block scale.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIq1M {
    pub qs: [u8; 32],
    pub qh: [u8; 16],
    pub scales: [u8; 8],
}

const _: () = {
    assert!(std::mem::size_of::<BlockIq2Xxs>() == 66);
    assert!(std::mem::size_of::<BlockIq2Xs>() == 74);
    assert!(std::mem::size_of::<BlockIq2S>() == 82);
    assert!(std::mem::size_of::<BlockIq3Xxs>() == 98);
    assert!(std::mem::size_of::<BlockIq3S>() == 110);
    assert!(std::mem::size_of::<BlockIq1S>() == 50);
    assert!(std::mem::size_of::<BlockIq1M>() == 56);
};

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[2 * i], b[2 * i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// Scale nibble `i` of a byte array (low nibble first).
fn nibble(b: &[u8], i: usize) -> u8 {
    (b[i / 2] >> (4 * (i % 2))) & 15
}

/// Element j's sign from a sign byte: −1 where bit j is set.
fn sign(bits: u8, j: usize) -> f32 {
    if bits >> j & 1 == 1 {
        -1.0
    } else {
        1.0
    }
}

/// The same as an integer.
fn isign(bits: u8, j: usize) -> i32 {
    1 - 2 * (bits >> j & 1) as i32
}

/// Σ_j sign_j · grid_j · a_j over one group (grid row bytes, sign byte, activations).
fn group_sum(grid: &[u8], signs: u8, a: &[i8]) -> i32 {
    grid.iter()
        .zip(a)
        .enumerate()
        .map(|(j, (&g, &x))| isign(signs, j) * g as i32 * x as i32)
        .sum()
}

/// One super-block's grid rows, sign bytes and odd scales for the IQ2/IQ3 layouts: `row(k)` is
/// grid row k (eight or four bytes), `signs(k)` the sign byte of weights 8k..8k+8, `scale(k)`
/// the odd integer 2s + 1 (IQ2, IQ3_XXS) or 1 + 2s (IQ3_S) that multiplies them.
pub(crate) trait Groups {
    /// Weights per grid row (8 or 4).
    const WIDTH: usize;
    /// The float factor of the odd scales: weights are d · scale · FACTOR · grid · sign.
    const FACTOR: f32;
    fn d(&self) -> f32;
    fn row(&self, k: usize) -> [u8; 8];
    /// The sign byte of the eight weights starting at 8k.
    fn signs(&self, k: usize) -> u8;
    /// The odd scale of the weights starting at 8k.
    fn scale(&self, k: usize) -> i32;
    /// The magnitudes of weights 8k..8k+8, packed little-endian.
    #[inline]
    fn row64(&self, k: usize) -> u64 {
        if Self::WIDTH == 8 {
            u64::from_le_bytes(self.row(k))
        } else {
            let (lo, hi) = (self.row(2 * k), self.row(2 * k + 1));
            u64::from_le_bytes(std::array::from_fn(
                |j| if j < 4 { lo[j] } else { hi[j - 4] },
            ))
        }
    }
}

impl Groups for BlockIq2Xxs {
    const WIDTH: usize = 8;
    const FACTOR: f32 = 0.125;
    fn d(&self) -> f32 {
        h(self.d)
    }
    fn row(&self, k: usize) -> [u8; 8] {
        IQ2XXS_GRID[self.qs[8 * (k / 4) + k % 4] as usize].to_le_bytes()
    }
    fn signs(&self, k: usize) -> u8 {
        KSIGNS[(u32_at(&self.qs, 2 * (k / 4) + 1) >> (7 * (k % 4))) as usize & 127]
    }
    fn scale(&self, k: usize) -> i32 {
        2 * (u32_at(&self.qs, 2 * (k / 4) + 1) >> 28) as i32 + 1
    }
}

impl Groups for BlockIq2Xs {
    const WIDTH: usize = 8;
    const FACTOR: f32 = 0.125;
    fn d(&self) -> f32 {
        h(self.d)
    }
    fn row(&self, k: usize) -> [u8; 8] {
        IQ2XS_GRID[(u16_at(&self.qs, k) & 511) as usize].to_le_bytes()
    }
    fn signs(&self, k: usize) -> u8 {
        KSIGNS[(u16_at(&self.qs, k) >> 9) as usize]
    }
    fn scale(&self, k: usize) -> i32 {
        2 * nibble(&self.scales, k / 2) as i32 + 1
    }
}

impl Groups for BlockIq2S {
    const WIDTH: usize = 8;
    const FACTOR: f32 = 0.125;
    fn d(&self) -> f32 {
        h(self.d)
    }
    fn row(&self, k: usize) -> [u8; 8] {
        let hi = (self.qh[k / 4] >> (2 * (k % 4))) & 3;
        IQ2S_GRID[self.qs[k] as usize | (hi as usize) << 8].to_le_bytes()
    }
    fn signs(&self, k: usize) -> u8 {
        self.signs[k]
    }
    fn scale(&self, k: usize) -> i32 {
        2 * nibble(&self.scales, k / 2) as i32 + 1
    }
}

impl Groups for BlockIq3Xxs {
    const WIDTH: usize = 4;
    const FACTOR: f32 = 0.25;
    fn d(&self) -> f32 {
        h(self.d)
    }
    fn row(&self, k: usize) -> [u8; 8] {
        let mut r = [0u8; 8];
        r[..4].copy_from_slice(&IQ3XXS_GRID[self.qs[k] as usize].to_le_bytes());
        r
    }
    fn signs(&self, k: usize) -> u8 {
        KSIGNS[(u32_at(&self.scales, k / 4) >> (7 * (k % 4))) as usize & 127]
    }
    fn scale(&self, k: usize) -> i32 {
        2 * (u32_at(&self.scales, k / 4) >> 28) as i32 + 1
    }
}

impl Groups for BlockIq3S {
    const WIDTH: usize = 4;
    const FACTOR: f32 = 1.0;
    fn d(&self) -> f32 {
        h(self.d)
    }
    fn row(&self, k: usize) -> [u8; 8] {
        let hi = (self.qh[k / 8] >> (k % 8)) & 1;
        let mut r = [0u8; 8];
        r[..4].copy_from_slice(&IQ3S_GRID[self.qs[k] as usize | (hi as usize) << 8].to_le_bytes());
        r
    }
    fn signs(&self, k: usize) -> u8 {
        self.signs[k]
    }
    fn scale(&self, k: usize) -> i32 {
        1 + 2 * nibble(&self.scales, k / 4) as i32
    }
}

/// Dequantizes IQ2/IQ3 super-blocks as gguf-py does: db = d · (0.5 + s) · (1/4 or 1/2) (IQ3_S:
/// d · (1 + 2s)), then db · grid · sign.
fn dequantize_groups<B: Groups>(blocks: &[B], out: &mut [f32], db: impl Fn(f32, i32) -> f32) {
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for (k, y8) in y.chunks_exact_mut(8).enumerate() {
            let dl = db(d, b.scale(k));
            let signs = b.signs(k);
            for (j, v) in y8.iter_mut().enumerate() {
                // Rows of four: weights 8k..8k+8 span rows 2k and 2k + 1.
                let g = if B::WIDTH == 8 {
                    b.row(k)[j]
                } else {
                    b.row(2 * k + j / 4)[j % 4]
                };
                *v = dl * g as f32 * sign(signs, j);
            }
        }
    }
}

/// Weight row · Q8_K row for the IQ2/IQ3 layouts: per super-block the exact integer
/// Σ_groups scale · Σ_j sign · grid · a, times d_w · d_a; the sum times the type's factor.
fn dot_groups<B: Groups>(w: &[B], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (b, a) in w.iter().zip(a) {
        let mut isum = 0i32;
        for k in 0..QK_K / 8 {
            let q8 = &a.qs[8 * k..8 * k + 8];
            isum += b.scale(k) * group_sum(&b.row64(k).to_le_bytes(), b.signs(k), q8);
        }
        sum += b.d() * a.d() * isum as f32;
    }
    sum * B::FACTOR
}

/// gguf-py's IQ2 scale: d · (0.5 + s) · 0.25, from the odd scale 2s + 1.
fn db_iq2(d: f32, odd: i32) -> f32 {
    d * (0.5 + ((odd - 1) / 2) as f32) * 0.25
}

pub fn dequantize_iq2_xxs(blocks: &[BlockIq2Xxs], out: &mut [f32]) {
    dequantize_groups(blocks, out, db_iq2)
}

pub fn dequantize_iq2_xs(blocks: &[BlockIq2Xs], out: &mut [f32]) {
    dequantize_groups(blocks, out, db_iq2)
}

pub fn dequantize_iq2_s(blocks: &[BlockIq2S], out: &mut [f32]) {
    dequantize_groups(blocks, out, db_iq2)
}

pub fn dequantize_iq3_xxs(blocks: &[BlockIq3Xxs], out: &mut [f32]) {
    dequantize_groups(blocks, out, |d, odd| {
        d * (0.5 + ((odd - 1) / 2) as f32) * 0.5
    })
}

pub fn dequantize_iq3_s(blocks: &[BlockIq3S], out: &mut [f32]) {
    dequantize_groups(blocks, out, |d, odd| d * odd as f32)
}

pub fn dot_iq2_xxs(w: &[BlockIq2Xxs], a: &[BlockQ8K]) -> f32 {
    dot_groups(w, a)
}

pub fn dot_iq2_xs(w: &[BlockIq2Xs], a: &[BlockQ8K]) -> f32 {
    dot_groups(w, a)
}

pub fn dot_iq2_s(w: &[BlockIq2S], a: &[BlockQ8K]) -> f32 {
    dot_groups(w, a)
}

pub fn dot_iq3_xxs(w: &[BlockIq3Xxs], a: &[BlockQ8K]) -> f32 {
    dot_groups(w, a)
}

pub fn dot_iq3_s(w: &[BlockIq3S], a: &[BlockQ8K]) -> f32 {
    dot_groups(w, a)
}

/// IQ1 offset: +1/8, or −1/8 where the flag is set.
const IQ1_DELTA: f32 = 0.125;

/// The float factor of IQ1's integer dot: weights are d · (2s + 1) · (8 · grid ± 1) / 8.
pub(crate) const IQ1_FACTOR: f32 = 0.125;

/// The IQ1 layouts per group of eight: grid row (i8 values), the offset's sign (±1), and the
/// odd scale 2s + 1.
pub(crate) trait Iq1 {
    fn d(&self) -> f32;
    fn group(&self, k: usize) -> ([i8; 8], i32, i32);
}

impl Iq1 for BlockIq1S {
    fn d(&self) -> f32 {
        h(self.d)
    }
    fn group(&self, k: usize) -> ([i8; 8], i32, i32) {
        let qh = u16_at(&self.qh, k / 4);
        let idx = self.qs[k] as usize | (((qh >> (3 * (k % 4))) & 7) as usize) << 8;
        let delta = if qh & 0x8000 == 0 { 1 } else { -1 };
        let row = IQ1S_GRID[idx].to_le_bytes().map(|b| b as i8);
        (row, delta, 2 * ((qh >> 12) & 7) as i32 + 1)
    }
}

impl Iq1 for BlockIq1M {
    fn d(&self) -> f32 {
        let sc = |i| u16_at(&self.scales, i);
        let bits =
            (sc(0) >> 12) | ((sc(1) >> 8) & 0x00f0) | ((sc(2) >> 4) & 0x0f00) | (sc(3) & 0xf000);
        h(bits.to_le_bytes())
    }
    fn group(&self, k: usize) -> ([i8; 8], i32, i32) {
        let nib = (self.qh[k / 2] >> (4 * (k % 2))) & 15;
        let idx = self.qs[k] as usize | ((nib & 7) as usize) << 8;
        let delta = if nib & 8 == 0 { 1 } else { -1 };
        // Sixteen 3-bit scales, four per u16, one per two groups.
        let m = k / 2;
        let s = (u16_at(&self.scales, m / 4) >> (3 * (m % 4))) & 7;
        let row = IQ1S_GRID[idx].to_le_bytes().map(|b| b as i8);
        (row, delta, 2 * s as i32 + 1)
    }
}

/// gguf-py's IQ1: dl = d · (2s + 1), then dl · (grid + delta).
fn dequantize_iq1<B: Iq1>(blocks: &[B], out: &mut [f32]) {
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for (k, y8) in y.chunks_exact_mut(8).enumerate() {
            let (row, delta, odd) = b.group(k);
            let dl = d * odd as f32;
            let delta = delta as f32 * IQ1_DELTA;
            for (v, &g) in y8.iter_mut().zip(&row) {
                *v = dl * (g as f32 + delta);
            }
        }
    }
}

/// Weight row · Q8_K row for IQ1: weights are d · (2s + 1) · (8 · grid ± 1) / 8, so per
/// super-block the exact integer Σ_groups (2s + 1) · Σ_j (8 · grid ± 1) · a, times d_w · d_a; the
/// sum over super-blocks times 1/8.
fn dot_iq1<B: Iq1>(w: &[B], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (b, a) in w.iter().zip(a) {
        let mut isum = 0i32;
        for k in 0..QK_K / 8 {
            let (row, delta, odd) = b.group(k);
            let s: i32 = row
                .iter()
                .zip(&a.qs[8 * k..8 * k + 8])
                .map(|(&g, &x)| (8 * g as i32 + delta) * x as i32)
                .sum();
            isum += odd * s;
        }
        sum += b.d() * a.d() * isum as f32;
    }
    sum * IQ1_FACTOR
}

pub fn dequantize_iq1_s(blocks: &[BlockIq1S], out: &mut [f32]) {
    dequantize_iq1(blocks, out)
}

pub fn dequantize_iq1_m(blocks: &[BlockIq1M], out: &mut [f32]) {
    dequantize_iq1(blocks, out)
}

pub fn dot_iq1_s(w: &[BlockIq1S], a: &[BlockQ8K]) -> f32 {
    dot_iq1(w, a)
}

pub fn dot_iq1_m(w: &[BlockIq1M], a: &[BlockQ8K]) -> f32 {
    dot_iq1(w, a)
}
