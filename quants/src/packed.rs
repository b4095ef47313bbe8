//! Eight-row interleaved ("packed") copies of Q4_0, Q5_0 and Q8_0 weights, made once at load for
//! the wide decode and prefill kernels, with the scalar reference those kernels are tested
//! against. The GGUF mapping stays the source of truth: a packed group is a re-arrangement of
//! eight rows' bytes, nothing is re-quantized, and [`unpack`] gives the rows back exactly.
//!
//! A group is eight consecutive rows; its blocks follow each other, block `b` of the group is
//! - the eight rows' scales, f16, row order (16 bytes);
//! - the quants as "group registers": register `g` (32 bytes) holds elements `4g..4g+4` of every
//!   row, row `r` at bytes `4r..4r+4`. Q8_0 stores the eight registers as signed bytes. Q4_0 and
//!   Q5_0 store four 32-byte chunks: chunk `c` holds register `c` in its low nibbles and register
//!   `c + 4` in its high nibbles (each row's `qs[4c..4c+4]`, as in the file);
//! - Q5_0 only: the fifth bits as one 32-byte register, bit `g` of byte `4r + k` being the fifth
//!   bit of element `4g + k` of row `r`.
//!
//! So a group is exactly as large as its eight rows (no extra memory beyond the copy itself).
//! The kernels take one Q8_0 activation row per token plus that row's per-block sums (so that
//! unsigned weight codes `u = w + o` can feed an unsigned × signed byte product, subtracting
//! `o · Σa`); their float order is [`crate::legacy::octet_reference`]'s: per row,
//! `acc = fma(f16(dw) · f16(da), Σ_block, acc)` over the blocks.

use crate::legacy::{h, BlockQ4_0, BlockQ5_0, BlockQ8_0, QK};
use crate::GgmlType;

/// Rows per packed group.
pub const ROWS: usize = 8;

/// Whether `ty` has a packed layout.
pub fn packable(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0)
}

/// Bytes of one packed block (eight rows × 32 elements), or None when `ty` has no packed layout.
pub fn block_bytes(ty: GgmlType) -> Option<usize> {
    Some(match ty {
        GgmlType::Q4_0 => 16 + 128,
        GgmlType::Q5_0 => 16 + 128 + 32,
        GgmlType::Q8_0 => 16 + 256,
        _ => return None,
    })
}

/// Bytes of one packed group of eight rows of `cols` elements (`cols` a multiple of 32).
pub fn group_bytes(ty: GgmlType, cols: usize) -> Option<usize> {
    if cols == 0 || !cols.is_multiple_of(QK) {
        return None;
    }
    Some(block_bytes(ty)? * (cols / QK))
}

/// Eight rows of blocks of type `B`.
fn blocks<B: bytemuck::Pod>(rows: [&[u8]; ROWS]) -> [&[B]; ROWS] {
    rows.map(|r| bytemuck::cast_slice::<u8, B>(r))
}

/// Register bytes: row `r`'s four bytes `src` go to `dst[32·g + 4·r..]`, for each of the `N`
/// four-byte pieces `g` of `src`.
#[inline]
fn scatter_rows<const N: usize>(dst: &mut [u8], r: usize, src: &[u8]) {
    for g in 0..N {
        dst[32 * g + 4 * r..32 * g + 4 * r + 4].copy_from_slice(&src[4 * g..4 * g + 4]);
    }
}

/// Packs eight rows (GGUF bytes of type `ty`, equal lengths) into `out`
/// (`group_bytes(ty, cols)` bytes). Panics on a type without a packed layout or on mismatched
/// lengths (callers check with [`group_bytes`]).
pub fn pack(ty: GgmlType, rows: [&[u8]; ROWS], out: &mut [u8]) {
    let bb = block_bytes(ty).expect("packable type");
    let rb = rows[0].len();
    assert!(rows.iter().all(|r| r.len() == rb));
    let nb = rb / ty.type_size();
    assert_eq!(out.len(), nb * bb);
    let out = out.chunks_exact_mut(bb);
    match ty {
        GgmlType::Q8_0 => {
            let w = blocks::<BlockQ8_0>(rows);
            for (b, o) in out.enumerate() {
                let (d, q) = o.split_at_mut(16);
                for (r, row) in w.iter().enumerate() {
                    d[2 * r..2 * r + 2].copy_from_slice(&row[b].d);
                    scatter_rows::<8>(q, r, bytemuck::cast_slice(&row[b].qs));
                }
            }
        }
        GgmlType::Q4_0 => {
            let w = blocks::<BlockQ4_0>(rows);
            for (b, o) in out.enumerate() {
                let (d, q) = o.split_at_mut(16);
                for (r, row) in w.iter().enumerate() {
                    d[2 * r..2 * r + 2].copy_from_slice(&row[b].d);
                    scatter_rows::<4>(q, r, &row[b].qs);
                }
            }
        }
        GgmlType::Q5_0 => {
            let w = blocks::<BlockQ5_0>(rows);
            for (b, o) in out.enumerate() {
                let (d, q) = o.split_at_mut(16);
                let (q, hb) = q.split_at_mut(128);
                for (r, row) in w.iter().enumerate() {
                    d[2 * r..2 * r + 2].copy_from_slice(&row[b].d);
                    scatter_rows::<4>(q, r, &row[b].qs);
                    // Byte 4r + k gathers bit 4g + k of qh into its bit g.
                    let qh = u32::from_le_bytes(row[b].qh);
                    for k in 0..4 {
                        let mut v = 0u8;
                        for g in 0..8 {
                            v |= (((qh >> (4 * g + k)) & 1) as u8) << g;
                        }
                        hb[4 * r + k] = v;
                    }
                }
            }
        }
        _ => unreachable!("checked by block_bytes"),
    }
}

/// The inverse of [`pack`]: the eight rows' GGUF bytes back (tests check that packing loses
/// nothing).
pub fn unpack(ty: GgmlType, packed: &[u8], mut rows: [&mut [u8]; ROWS]) {
    let bb = block_bytes(ty).expect("packable type");
    let tb = ty.type_size();
    for (b, blk) in packed.chunks_exact(bb).enumerate() {
        let (d, q) = blk.split_at(16);
        for (r, row) in rows.iter_mut().enumerate() {
            let out = &mut row[b * tb..(b + 1) * tb];
            out[..2].copy_from_slice(&d[2 * r..2 * r + 2]);
            let regs = |out: &mut [u8], n: usize| {
                for g in 0..n {
                    out[4 * g..4 * g + 4].copy_from_slice(&q[32 * g + 4 * r..32 * g + 4 * r + 4]);
                }
            };
            match ty {
                GgmlType::Q8_0 => regs(&mut out[2..], 8),
                GgmlType::Q4_0 => regs(&mut out[2..], 4),
                GgmlType::Q5_0 => {
                    let mut qh = 0u32;
                    for e in 0..QK {
                        let (g, k) = (e / 4, e % 4);
                        qh |= (((q[128 + 4 * r + k] >> g) & 1) as u32) << e;
                    }
                    out[2..6].copy_from_slice(&qh.to_le_bytes());
                    regs(&mut out[6..], 4);
                }
                _ => unreachable!("checked by block_bytes"),
            }
        }
    }
}

/// Per-block sums of a Q8_0 activation row's quants (the `Σa` the kernels subtract `o ·` of).
pub fn block_sums(act: &[u8], out: &mut [i32]) {
    let a: &[BlockQ8_0] = bytemuck::cast_slice(act);
    for (s, y) in out.iter_mut().zip(a) {
        *s = y.qs.iter().map(|&v| v as i32).sum();
    }
}

/// The weight of element `e` of row `r` in packed block `blk` (signed, as the file means it).
fn weight(ty: GgmlType, blk: &[u8], r: usize, e: usize) -> i32 {
    let q = &blk[16..];
    let (g, k) = (e / 4, e % 4);
    match ty {
        GgmlType::Q8_0 => q[32 * g + 4 * r + k] as i8 as i32,
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let byte = q[32 * (g % 4) + 4 * r + k];
            let nib = if g < 4 { byte & 15 } else { byte >> 4 } as i32;
            if ty == GgmlType::Q4_0 {
                nib - 8
            } else {
                let hi = ((q[128 + 4 * r + k] >> g) & 1) as i32;
                nib + 16 * hi - 16
            }
        }
        _ => unreachable!("packable type"),
    }
}

/// Scalar reference of the packed kernels: `out[r·n + j]` = row `r` of the group · token `j`,
/// for `n = act.len()` tokens (each a Q8_0 row of the group's width). `sums` is accepted for the
/// kernels' signature and checked against the activations.
pub fn reference(ty: GgmlType, packed: &[u8], act: &[&[u8]], sums: &[&[i32]], out: &mut [f32]) {
    let bb = block_bytes(ty).expect("packable type");
    let nt = act.len();
    assert!(out.len() >= ROWS * nt && sums.len() == nt);
    for (j, (a, s)) in act.iter().zip(sums).enumerate() {
        let a: &[BlockQ8_0] = bytemuck::cast_slice(a);
        let mut want = vec![0i32; a.len()];
        block_sums(bytemuck::cast_slice(a), &mut want);
        assert_eq!(
            &want[..],
            &s[..a.len()],
            "block sums do not match the activations"
        );
        for r in 0..ROWS {
            let mut acc = 0f32;
            for (blk, y) in packed.chunks_exact(bb).zip(a) {
                let dw = h([blk[2 * r], blk[2 * r + 1]]);
                let isum: i32 = (0..QK)
                    .map(|e| weight(ty, blk, r, e) * y.qs[e] as i32)
                    .sum();
                acc = (dw * h(y.d)).mul_add(isum as f32, acc);
            }
            out[r * nt + j] = acc;
        }
    }
}
