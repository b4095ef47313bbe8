//! `ggrun-quants`: the tensor element formats of GGUF/ggml.
//!
//! For every supported weight type there is a block struct, a scalar reference dequantizer, a
//! reference quantizer (bit-exact with ggml's), and the dot product of a weight row with an
//! activation row quantized to the type's partner format ([`GgmlType::vec_dot_type`]). SIMD twins
//! (AVX2, AVX-512 with VNNI, NEON with dotprod) are picked once at start-up by runtime feature
//! detection ([`isa`]); `GGRUN_ISA=scalar` forces the scalar path.
//!
//! Rows are passed as byte slices, exactly as they sit in a GGUF file; a row of `n` elements of
//! type `t` is `t.row_bytes(n)` bytes.

pub mod float;
pub mod iq_grid;
pub mod iq_quant;
#[rustfmt::skip] // generated: scripts/gen-iq-grids.py lays the tables out
pub mod iq_tables;
pub mod iquants;
pub mod isa;
pub mod kquants;
pub mod legacy;
pub mod mxfp4;
pub mod packed;
pub mod ssm;
mod types;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use isa::Isa;
pub use types::GgmlType;

use bytemuck::{cast_slice, cast_slice_mut};

/// `dot(weight_row, activation_row)`: both rows as bytes, the activation in the weight type's
/// `vec_dot_type`, with the same number of elements.
pub type DotFn = fn(&[u8], &[u8]) -> f32;
/// `dot4(weight_row, [four activation rows], out)`: the same as four `dot` calls, bit for bit,
/// with each weight block unpacked once (prefill batches).
pub type Dot4Fn = fn(&[u8], [&[u8]; 4], &mut [f32; 4]);
/// `tile(four weight rows, four activation rows, out)`: `out[r][j]` = `dot(w[r], a[j])` bit for
/// bit, with each weight block unpacked once and each activation block prepared once per tile
/// (the register-blocked core of prefill).
pub type TileFn = fn([&[u8]; 4], [&[u8]; 4], &mut [[f32; 4]; 4]);
/// `rows4(four weight rows, activation row, out)`: `out[r]` = `dot(w[r], a)` bit for bit, the
/// activation block prepared once for the four rows (decode).
pub type Rows4Fn = fn([&[u8]; 4], &[u8], &mut [f32; 4]);
/// `octet(eight weight rows, activation rows, out)`: `out[r·n + j]` for eight rows and n tokens,
/// each row's block sums in one lane. Legacy types: the float part is `acc = fma(f16(dw)·f16(da),
/// Σ_block, acc)` per block ([`legacy::octet_reference`]) — not the single-row dot's order;
/// K-quants (Q4_K): the single-row dot's expression, so each result equals `dot`. Prefill only.
pub type OctetFn = fn([&[u8]; 8], &[&[u8]], &mut [f32]);
/// `packed(group, activation rows, their block sums, out)`: `out[r·n + j]` for the eight rows of
/// one packed group ([`packed`]) and n tokens (Q8_0 rows), in [`packed::reference`]'s order,
/// which is [`OctetFn`]'s. Decode and prefill.
pub type PackedFn = fn(&[u8], &[&[u8]], &[&[i32]], &mut [f32]);
/// Dequantize a row of bytes into `dst` (whose length is the element count).
pub type DequantizeFn = fn(&[u8], &mut [f32]);
/// Quantize a row of floats into bytes (`dst` is exactly the row's byte length).
pub type QuantizeFn = fn(&[f32], &mut [u8]);

/// The kernels of one weight type on one instruction set.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub ty: GgmlType,
    /// The activation format `dot` expects.
    pub act_ty: GgmlType,
    pub dot: DotFn,
    /// A four-token `dot` where the tier has one.
    pub dot4: Option<Dot4Fn>,
    /// A four-row × four-token `dot` where the tier has one.
    pub tile: Option<TileFn>,
    /// A four-row × one-token `dot` where the tier has one.
    pub rows4: Option<Rows4Fn>,
    /// An eight-row × n-token kernel with its own float order (see [`OctetFn`]).
    pub octet: Option<OctetFn>,
    /// The kernel over packed eight-row groups where the tier has one (then loading packs the
    /// type's matrices).
    pub packed: Option<PackedFn>,
    pub dequantize: DequantizeFn,
    /// Quantizes an activation row to `act_ty` (the rounding llama.cpp's SIMD paths use).
    pub quantize_act: QuantizeFn,
}

impl Kernels {
    /// Weight row `w` · each activation row `a(j)` for `j` in `js`, handed to `put(j, value)`:
    /// four activation rows a call where the tier has a four-token dot (each result equal to
    /// the single-row dot's), the rest one by one.
    #[inline]
    pub fn dots<'a>(
        &self,
        w: &[u8],
        js: std::ops::Range<usize>,
        a: impl Fn(usize) -> &'a [u8],
        mut put: impl FnMut(usize, f32),
    ) {
        let mut j = js.start;
        if let Some(dot4) = self.dot4 {
            while j + 4 <= js.end {
                let mut four = [0f32; 4];
                dot4(w, [a(j), a(j + 1), a(j + 2), a(j + 3)], &mut four);
                for (x, v) in four.into_iter().enumerate() {
                    put(j + x, v);
                }
                j += 4;
            }
        }
        for j in j..js.end {
            put(j, (self.dot)(w, a(j)));
        }
    }
}

/// Errors of the row-level helpers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantError {
    Unsupported(GgmlType),
    BadLength {
        ty: GgmlType,
        elements: usize,
        bytes: usize,
    },
}

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantError::Unsupported(t) => write!(f, "tensor type {t} is not supported"),
            QuantError::BadLength {
                ty,
                elements,
                bytes,
            } => write!(
                f,
                "{bytes} bytes do not hold {elements} elements of type {ty}"
            ),
        }
    }
}

impl std::error::Error for QuantError {}

fn check(ty: GgmlType, elements: usize, bytes: usize) -> Result<(), QuantError> {
    match ty.row_bytes(elements as u64) {
        Some(b) if b == bytes as u64 => Ok(()),
        _ => Err(QuantError::BadLength {
            ty,
            elements,
            bytes,
        }),
    }
}

// Byte-slice adapters around the typed scalar functions.
macro_rules! bytes_fn {
    (dequant $name:ident, $f:path) => {
        pub(crate) fn $name(src: &[u8], dst: &mut [f32]) {
            $f(cast_slice(src), dst)
        }
    };
    (quant $name:ident, $f:path) => {
        pub(crate) fn $name(src: &[f32], dst: &mut [u8]) {
            $f(src, cast_slice_mut(dst))
        }
    };
    (dot $name:ident, $f:path) => {
        pub(crate) fn $name(w: &[u8], a: &[u8]) -> f32 {
            $f(cast_slice(w), cast_slice(a))
        }
    };
}

pub(crate) mod scalar {
    //! Byte-slice entry points of the scalar reference kernels.
    use super::*;
    use crate::{
        iq_grid as g, iq_quant as gq, iquants as i, kquants as k, legacy as l, mxfp4 as m,
    };
    bytes_fn!(dequant dq_q4_0, l::dequantize_q4_0);
    bytes_fn!(dequant dq_q4_1, l::dequantize_q4_1);
    bytes_fn!(dequant dq_q5_0, l::dequantize_q5_0);
    bytes_fn!(dequant dq_q5_1, l::dequantize_q5_1);
    bytes_fn!(dequant dq_q8_0, l::dequantize_q8_0);
    bytes_fn!(dequant dq_q8_1, l::dequantize_q8_1);
    bytes_fn!(dequant dq_iq4_nl, l::dequantize_iq4_nl);
    bytes_fn!(dequant dq_mxfp4, m::dequantize_mxfp4);
    bytes_fn!(dequant dq_iq4_xs, i::dequantize_iq4_xs);
    bytes_fn!(dequant dq_iq2_xxs, g::dequantize_iq2_xxs);
    bytes_fn!(dequant dq_iq2_xs, g::dequantize_iq2_xs);
    bytes_fn!(dequant dq_iq2_s, g::dequantize_iq2_s);
    bytes_fn!(dequant dq_iq3_xxs, g::dequantize_iq3_xxs);
    bytes_fn!(dequant dq_iq3_s, g::dequantize_iq3_s);
    bytes_fn!(dequant dq_iq1_s, g::dequantize_iq1_s);
    bytes_fn!(dequant dq_iq1_m, g::dequantize_iq1_m);
    bytes_fn!(dequant dq_q2_k, k::dequantize_q2k);
    bytes_fn!(dequant dq_q3_k, k::dequantize_q3k);
    bytes_fn!(dequant dq_q4_k, k::dequantize_q4k);
    bytes_fn!(dequant dq_q5_k, k::dequantize_q5k);
    bytes_fn!(dequant dq_q6_k, k::dequantize_q6k);
    bytes_fn!(dequant dq_q8_k, k::dequantize_q8k);
    bytes_fn!(quant q_q4_0, l::quantize_q4_0);
    bytes_fn!(quant q_q4_1, l::quantize_q4_1);
    bytes_fn!(quant q_q5_0, l::quantize_q5_0);
    bytes_fn!(quant q_q5_1, l::quantize_q5_1);
    bytes_fn!(quant q_q8_0_ref, l::quantize_q8_0_ref);
    bytes_fn!(quant q_q8_0, l::quantize_q8_0);
    bytes_fn!(quant q_q8_1, l::quantize_q8_1);
    bytes_fn!(quant q_q8_1_ref, l::quantize_q8_1_ref);
    bytes_fn!(quant q_iq4_nl, l::quantize_iq4_nl);
    bytes_fn!(quant q_mxfp4, m::quantize_mxfp4);
    bytes_fn!(quant q_iq4_xs, i::quantize_iq4_xs);
    bytes_fn!(quant q_iq3_xxs, gq::quantize_iq3_xxs);
    bytes_fn!(quant q_iq3_s, gq::quantize_iq3_s);
    bytes_fn!(quant q_iq2_s, gq::quantize_iq2_s);
    bytes_fn!(quant q_iq1_m, gq::quantize_iq1_m);
    bytes_fn!(quant q_q2_k, k::quantize_q2k);
    bytes_fn!(quant q_q3_k, k::quantize_q3k);
    bytes_fn!(quant q_q4_k, k::quantize_q4k);
    bytes_fn!(quant q_q5_k, k::quantize_q5k);
    bytes_fn!(quant q_q6_k, k::quantize_q6k);
    bytes_fn!(quant q_q8_k, k::quantize_q8k);
    bytes_fn!(dot dot_q4_0, l::dot_q4_0);
    bytes_fn!(dot dot_q4_1, l::dot_q4_1);
    bytes_fn!(dot dot_q5_0, l::dot_q5_0);
    bytes_fn!(dot dot_q5_1, l::dot_q5_1);
    bytes_fn!(dot dot_q8_0, l::dot_q8_0);
    bytes_fn!(dot dot_iq4_nl, l::dot_iq4_nl);
    bytes_fn!(dot dot_mxfp4, m::dot_mxfp4);
    bytes_fn!(dot dot_iq4_xs, i::dot_iq4_xs);
    bytes_fn!(dot dot_iq2_xxs, g::dot_iq2_xxs);
    bytes_fn!(dot dot_iq2_xs, g::dot_iq2_xs);
    bytes_fn!(dot dot_iq2_s, g::dot_iq2_s);
    bytes_fn!(dot dot_iq3_xxs, g::dot_iq3_xxs);
    bytes_fn!(dot dot_iq3_s, g::dot_iq3_s);
    bytes_fn!(dot dot_iq1_s, g::dot_iq1_s);
    bytes_fn!(dot dot_iq1_m, g::dot_iq1_m);
    bytes_fn!(dot dot_q2_k, k::dot_q2k);
    bytes_fn!(dot dot_q3_k, k::dot_q3k);
    bytes_fn!(dot dot_q4_k, k::dot_q4k);
    bytes_fn!(dot dot_q5_k, k::dot_q5k);
    bytes_fn!(dot dot_q6_k, k::dot_q6k);
}

/// The scalar dequantizer of `ty` (any type with a float meaning, activation formats included).
pub fn dequantize_fn(ty: GgmlType) -> Option<DequantizeFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => float::dequantize_f32,
        F16 => float::dequantize_f16,
        BF16 => float::dequantize_bf16,
        Q4_0 => scalar::dq_q4_0,
        Q4_1 => scalar::dq_q4_1,
        Q5_0 => scalar::dq_q5_0,
        Q5_1 => scalar::dq_q5_1,
        Q8_0 => scalar::dq_q8_0,
        Q8_1 => scalar::dq_q8_1,
        IQ4_NL => scalar::dq_iq4_nl,
        IQ4_XS => scalar::dq_iq4_xs,
        IQ2_XXS => scalar::dq_iq2_xxs,
        IQ2_XS => scalar::dq_iq2_xs,
        IQ2_S => scalar::dq_iq2_s,
        IQ3_XXS => scalar::dq_iq3_xxs,
        IQ3_S => scalar::dq_iq3_s,
        IQ1_S => scalar::dq_iq1_s,
        IQ1_M => scalar::dq_iq1_m,
        MXFP4 => scalar::dq_mxfp4,
        Q2_K => scalar::dq_q2_k,
        Q3_K => scalar::dq_q3_k,
        Q4_K => scalar::dq_q4_k,
        Q5_K => scalar::dq_q5_k,
        Q6_K => scalar::dq_q6_k,
        Q8_K => scalar::dq_q8_k,
        _ => return None,
    })
}

/// The reference quantizer of `ty`: what llama-quantize writes for a weight of this type when no
/// importance matrix is given (ggml's `quantize_row_*_ref`; for IQ4_NL and IQ4_XS,
/// `quantize_iq4_nl` and `quantize_iq4_xs`).
/// For Q8_0/Q8_1 this is the reference rounding (half away from zero); see
/// [`Kernels::quantize_act`] for the activation rounding.
pub fn reference_quantize_fn(ty: GgmlType) -> Option<QuantizeFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => float::quantize_f32,
        F16 => float::quantize_f16,
        BF16 => float::quantize_bf16,
        Q4_0 => scalar::q_q4_0,
        Q4_1 => scalar::q_q4_1,
        Q5_0 => scalar::q_q5_0,
        Q5_1 => scalar::q_q5_1,
        Q8_0 => scalar::q_q8_0_ref,
        Q8_1 => scalar::q_q8_1_ref,
        IQ4_NL => scalar::q_iq4_nl,
        IQ4_XS => scalar::q_iq4_xs,
        IQ3_XXS => scalar::q_iq3_xxs,
        IQ3_S => scalar::q_iq3_s,
        IQ2_S => scalar::q_iq2_s,
        IQ1_M => scalar::q_iq1_m,
        MXFP4 => scalar::q_mxfp4,
        Q2_K => scalar::q_q2_k,
        Q3_K => scalar::q_q3_k,
        Q4_K => scalar::q_q4_k,
        Q5_K => scalar::q_q5_k,
        Q6_K => scalar::q_q6_k,
        Q8_K => scalar::q_q8_k,
        _ => return None,
    })
}

/// A quantizer for every type that has one: [`reference_quantize_fn`], or for the i-quants ggml
/// quantizes only under an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S) that quantizer under a
/// flat one (every column weighted alike), for synthetic weights and tests.
pub fn quantize_fn(ty: GgmlType) -> Option<QuantizeFn> {
    fn flat<B: bytemuck::Pod>(q: fn(&[f32], &[f32], &mut [B])) -> impl Fn(&[f32], &mut [u8]) {
        move |x, out| q(x, &vec![1.0; x.len()], bytemuck::cast_slice_mut(out))
    }
    fn iq2_xxs(x: &[f32], out: &mut [u8]) {
        flat(iq_quant::quantize_iq2_xxs)(x, out)
    }
    fn iq2_xs(x: &[f32], out: &mut [u8]) {
        flat(iq_quant::quantize_iq2_xs)(x, out)
    }
    fn iq1_s(x: &[f32], out: &mut [u8]) {
        flat(iq_quant::quantize_iq1_s)(x, out)
    }
    match ty {
        GgmlType::IQ2_XXS => Some(iq2_xxs),
        GgmlType::IQ2_XS => Some(iq2_xs),
        GgmlType::IQ1_S => Some(iq1_s),
        _ => reference_quantize_fn(ty),
    }
}

/// The scalar kernels of `ty`, the reference every SIMD kernel is tested against.
pub fn scalar_kernels(ty: GgmlType) -> Option<Kernels> {
    use GgmlType::*;
    let act_ty = ty.vec_dot_type()?;
    let dot: DotFn = match ty {
        F32 => float::dot_f32,
        F16 => float::dot_f16,
        BF16 => float::dot_bf16,
        Q4_0 => scalar::dot_q4_0,
        Q4_1 => scalar::dot_q4_1,
        Q5_0 => scalar::dot_q5_0,
        Q5_1 => scalar::dot_q5_1,
        Q8_0 => scalar::dot_q8_0,
        IQ4_NL => scalar::dot_iq4_nl,
        IQ4_XS => scalar::dot_iq4_xs,
        IQ2_XXS => scalar::dot_iq2_xxs,
        IQ2_XS => scalar::dot_iq2_xs,
        IQ2_S => scalar::dot_iq2_s,
        IQ3_XXS => scalar::dot_iq3_xxs,
        IQ3_S => scalar::dot_iq3_s,
        IQ1_S => scalar::dot_iq1_s,
        IQ1_M => scalar::dot_iq1_m,
        MXFP4 => scalar::dot_mxfp4,
        Q2_K => scalar::dot_q2_k,
        Q3_K => scalar::dot_q3_k,
        Q4_K => scalar::dot_q4_k,
        Q5_K => scalar::dot_q5_k,
        Q6_K => scalar::dot_q6_k,
        _ => return None,
    };
    let quantize_act: QuantizeFn = match act_ty {
        Q8_0 => scalar::q_q8_0,
        Q8_1 => scalar::q_q8_1,
        Q8_K => scalar::q_q8_k,
        F32 => float::quantize_f32,
        F16 => float::quantize_f16,
        BF16 => float::quantize_bf16,
        _ => return None,
    };
    Some(Kernels {
        ty,
        act_ty,
        dot,
        dot4: None,
        tile: None,
        rows4: None,
        octet: None,
        packed: None,
        dequantize: dequantize_fn(ty)?,
        quantize_act,
    })
}

/// The kernels of `ty` on instruction set `isa` (falling back, kernel by kernel, to the best lower
/// tier that has one, and finally to scalar). `isa` must be supported by this CPU
/// ([`Isa::is_available`]); otherwise the scalar kernels are returned.
pub fn kernels_for(ty: GgmlType, isa: Isa) -> Option<Kernels> {
    let k = scalar_kernels(ty)?;
    if !isa.is_available() {
        return Some(k);
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(x86::specialize(k, isa))
    }
    #[cfg(target_arch = "aarch64")]
    {
        Some(neon::specialize(k, isa))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Some(k)
    }
}

/// The kernels of `ty` on the active instruction set ([`isa::active`]).
pub fn kernels(ty: GgmlType) -> Option<Kernels> {
    kernels_for(ty, isa::active())
}

/// Dequantize one row (`dst.len()` elements) of type `ty`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let f = dequantize_fn(ty).ok_or(QuantError::Unsupported(ty))?;
    check(ty, dst.len(), src.len())?;
    f(src, dst);
    Ok(())
}

/// Quantize one row with the reference quantizer of `ty` ([`reference_quantize_fn`]).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    let f = reference_quantize_fn(ty).ok_or(QuantError::Unsupported(ty))?;
    check(ty, src.len(), dst.len())?;
    f(src, dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every quantized weight type has a quantizer ([`quantize_fn`]; IQ2_XXS, IQ2_XS and IQ1_S
    /// under a flat importance matrix), and quantizing then dequantizing uniform random values
    /// keeps them within the type's precision (relative RMS error, bounds by bits a weight).
    #[test]
    fn every_weight_type_quantizes_within_its_precision() {
        use GgmlType::*;
        let cols = 512;
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let x: Vec<f32> = (0..cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        for ty in [
            Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS, MXFP4, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
            IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M,
        ] {
            let q = quantize_fn(ty).unwrap_or_else(|| panic!("{ty}: no quantizer"));
            let mut b = vec![0u8; ty.row_bytes(cols as u64).unwrap() as usize];
            q(&x, &mut b);
            let mut y = vec![0f32; cols];
            dequantize_row(ty, &b, &mut y).unwrap();
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
            let rel = (err / x.iter().map(|a| a * a).sum::<f32>()).sqrt();
            // About 1.5 times what each group measured on these values.
            let bound = match ty {
                Q8_0 | Q5_0 | Q5_1 | Q5_K | Q6_K => 0.05,
                Q4_0 | Q4_1 | Q4_K | IQ4_NL | IQ4_XS => 0.1,
                MXFP4 | Q3_K | IQ3_S => 0.2,
                Q2_K | IQ2_S | IQ2_XS | IQ3_XXS => 0.4,
                IQ2_XXS => 0.5,
                _ => 0.75,
            };
            assert!(rel < bound, "{ty}: relative RMS error {rel}");
        }
    }
}
