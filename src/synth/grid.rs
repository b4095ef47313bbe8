//! Synthetic weights in the grid i-quants (IQ2_XXS, IQ2_S, IQ3_XXS, IQ3_S). Their quantizers
//! are searches over the grid (IQ3_XXS's, one of those here, runs at about a million weights a
//! second on one core: an hour for an 8-layer Qwen3-width file on two), and a synthetic
//! model's weights are random either way, so its grid-typed matrices are written as random
//! valid blocks instead: grid rows drawn from a hash of the position, each weight's sign
//! the sign of the generated value it stands for (IQ2_XXS and IQ3_XXS store seven signs of
//! eight, the eighth is their parity), one middle scale, and the super-block scale chosen so
//! that the block's largest magnitude is the generated values' largest. The values follow the
//! generated ones in sign and scale, not one by one.

use ggrun_quants::{dequantize_fn, GgmlType};

/// Whether [`write_block`] makes blocks of `ty`.
pub fn synthesizes(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, IQ2_XXS | IQ2_S | IQ3_XXS | IQ3_S)
}

/// A row of generated values `x` (whole 256-blocks) as blocks of `ty` in `out`; `seed` varies
/// the grid rows between rows of a matrix.
pub fn write_row(ty: GgmlType, x: &[f32], seed: u64, out: &mut [u8]) {
    let bytes = ty.type_size();
    let deq = dequantize_fn(ty).expect("grid types dequantize");
    let mut y = [0f32; 256];
    for (i, (xb, ob)) in x
        .chunks_exact(256)
        .zip(out.chunks_exact_mut(bytes))
        .enumerate()
    {
        write_block(
            ty,
            xb,
            seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ob,
        );
        // Scale d so that the block's largest magnitude is the values' largest.
        deq(ob, &mut y);
        let want = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let got = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = if got > 0.0 { want / got } else { 0.0 };
        ob[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    }
}

/// One block with d = 1: random grid rows, the values' signs, scale nibbles 7.
fn write_block(ty: GgmlType, x: &[f32], seed: u64, out: &mut [u8]) {
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Sign bits of the eight values from 8k (bit j: value j negative).
    let signs = |k: usize| -> u8 {
        x[8 * k..8 * k + 8]
            .iter()
            .enumerate()
            .fold(0u8, |s, (j, v)| s | (u8::from(*v < 0.0) << j))
    };
    out.fill(0);
    out[..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
    use GgmlType::*;
    match ty {
        IQ2_XXS | IQ3_XXS => {
            // Per 32 weights a u32: four 7-bit sign indices (the eighth sign is their
            // parity) and the scale in the top four bits; IQ2_XXS keeps it after each 32
            // weights' four grid bytes, IQ3_XXS after all 64 grid bytes.
            let rows_per_32 = if ty == IQ2_XXS { 4 } else { 8 };
            for g in 0..8 {
                let mut aux = 7u32 << 28;
                for l in 0..4 {
                    aux |= u32::from(signs(4 * g + l) & 127) << (7 * l);
                }
                let (rows_at, aux_at) = if ty == IQ2_XXS {
                    (2 + 8 * g, 2 + 8 * g + 4)
                } else {
                    (2 + 8 * g, 2 + 64 + 4 * g)
                };
                for r in 0..rows_per_32 {
                    out[rows_at + r] = next() as u8;
                }
                out[aux_at..aux_at + 4].copy_from_slice(&aux.to_le_bytes());
            }
        }
        IQ2_S => {
            // qs (32 low bytes of 10-bit rows), signs (32), qh (two high bits a row), scales.
            for k in 0..32 {
                let row = next() as usize & 1023;
                out[2 + k] = row as u8;
                out[2 + 64 + k / 4] |= ((row >> 8) as u8) << (2 * (k % 4));
                out[2 + 32 + k] = signs(k);
            }
            out[2 + 72..2 + 80].fill(0x77);
        }
        IQ3_S => {
            // qs (64 low bytes of 9-bit rows of four), qh (their ninth bits), signs, scales.
            for k in 0..64 {
                let row = next() as usize & 511;
                out[2 + k] = row as u8;
                out[2 + 64 + k / 8] |= ((row >> 8) as u8) << (k % 8);
            }
            for k in 0..32 {
                out[2 + 72 + k] = signs(k);
            }
            out[2 + 104..2 + 108].fill(0x77);
        }
        _ => unreachable!("not a grid type: {ty}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each type's blocks decode to values with the generated values' signs (all but the
    /// parity sign of IQ2_XXS and IQ3_XXS) and largest magnitude (within f16's rounding of d),
    /// and with more than a few distinct magnitudes (the grid rows vary).
    #[test]
    fn blocks_follow_the_values_signs_and_scale() {
        for ty in [
            GgmlType::IQ2_XXS,
            GgmlType::IQ2_S,
            GgmlType::IQ3_XXS,
            GgmlType::IQ3_S,
        ] {
            let x: Vec<f32> = (0..512)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut out = vec![0u8; 2 * ty.type_size()];
            write_row(ty, &x, 11, &mut out);
            let mut y = vec![0f32; 512];
            dequantize_fn(ty).unwrap()(&out, &mut y);
            for (b, (xb, yb)) in x.chunks(256).zip(y.chunks(256)).enumerate() {
                let amax = |v: &[f32]| v.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (want, got) = (amax(xb), amax(yb));
                assert!(
                    (got - want).abs() <= want * 1e-3,
                    "{ty} block {b}: {got} vs {want}"
                );
                let parity = matches!(ty, GgmlType::IQ2_XXS | GgmlType::IQ3_XXS);
                for (j, (a, v)) in xb.iter().zip(yb).enumerate() {
                    if (parity && j % 8 == 7) || *v == 0.0 || *a == 0.0 {
                        continue;
                    }
                    assert_eq!(a.is_sign_negative(), v.is_sign_negative(), "{ty} {b}/{j}");
                }
                let mut mags: Vec<u32> = yb.iter().map(|v| v.abs().to_bits()).collect();
                mags.sort_unstable();
                mags.dedup();
                assert!(mags.len() >= 3, "{ty}: {} distinct magnitudes", mags.len());
            }
        }
    }
}
