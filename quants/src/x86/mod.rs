//! x86-64 SIMD kernels and the table that installs them per tier.

mod avx2;
mod packed;
mod vnni;

use crate::{GgmlType, Isa, Kernels};

pub(crate) use avx2::{dot_tiles, exp_shifted, ssm_row, weighted_rows};

/// Installs a VNNI tier's kernels (module `vnni::$m`, its packed kernels for Q4_0, Q5_0, Q8_0).
macro_rules! install_vnni {
    ($k:ident, $m:ident, [$p4:path, $p5:path, $p8:path]) => {{
        use vnni::$m as v;
        match $k.ty {
            Q4_0 => {
                ($k.dot, $k.dot4, $k.tile, $k.rows4) = (
                    v::dot_q4_0,
                    d4(v::dot4_q4_0),
                    t4(v::tile_q4_0),
                    r4(v::rows4_q4_0),
                );
                $k.octet = Some(v::octet_q4_0);
                $k.packed = Some($p4);
            }
            Q5_0 => {
                ($k.dot, $k.dot4, $k.tile, $k.rows4) = (
                    v::dot_q5_0,
                    d4(v::dot4_q5_0),
                    t4(v::tile_q5_0),
                    r4(v::rows4_q5_0),
                );
                $k.octet = Some(v::octet_q5_0);
                $k.packed = Some($p5);
            }
            Q8_0 => {
                ($k.dot, $k.dot4, $k.tile, $k.rows4) = (
                    v::dot_q8_0,
                    d4(v::dot4_q8_0),
                    t4(v::tile_q8_0),
                    r4(v::rows4_q8_0),
                );
                $k.octet = Some(v::octet_q8_0);
                $k.packed = Some($p8);
            }
            IQ4_NL => {
                ($k.dot, $k.dot4, $k.tile, $k.rows4) = (
                    v::dot_iq4_nl,
                    d4(v::dot4_iq4_nl),
                    t4(v::tile_iq4_nl),
                    r4(v::rows4_iq4_nl),
                );
                $k.octet = Some(v::octet_iq4_nl);
            }
            Q4_1 => ($k.dot, $k.dot4, $k.tile) = (v::dot_q4_1, d4(v::dot4_q4_1), t4(v::tile_q4_1)),
            Q5_1 => ($k.dot, $k.dot4, $k.tile) = (v::dot_q5_1, d4(v::dot4_q5_1), t4(v::tile_q5_1)),
            Q2_K => $k.octet = Some(v::octet_q2_k),
            Q3_K => $k.octet = Some(v::octet_q3_k),
            Q4_K => $k.octet = Some(v::octet_q4_k),
            Q5_K => $k.octet = Some(v::octet_q5_k),
            Q6_K => $k.octet = Some(v::octet_q6_k),
            IQ4_XS => {
                $k.dot = v::dot_iq4_xs;
                $k.octet = Some(v::octet_iq4_xs);
            }
            IQ2_XXS => $k.octet = Some(v::octet_iq2_xxs),
            IQ2_XS => $k.octet = Some(v::octet_iq2_xs),
            IQ2_S => $k.octet = Some(v::octet_iq2_s),
            IQ3_XXS => $k.octet = Some(v::octet_iq3_xxs),
            IQ3_S => $k.octet = Some(v::octet_iq3_s),
            IQ1_S => $k.octet = Some(v::octet_iq1_s),
            IQ1_M => $k.octet = Some(v::octet_iq1_m),
            _ => {}
        }
    }};
}

/// `k` (the scalar kernels of one type) with every kernel that `isa` or a lower x86 tier
/// implements swapped in. The caller has checked `isa.is_available()`.
pub(crate) fn specialize(mut k: Kernels, isa: Isa) -> Kernels {
    use GgmlType::*;
    if !isa.is_x86() {
        return k;
    }
    match k.ty {
        Q4_0 => {
            (k.dot, k.dot4, k.dequantize) =
                (avx2::dot_q4_0, d4(avx2::dot4_q4_0), avx2::dequant_q4_0);
            k.octet = Some(avx2::octet_q4_0);
            k.packed = Some(packed::packed_q4_0_avx2);
        }
        Q5_0 => {
            (k.dot, k.dot4, k.dequantize) =
                (avx2::dot_q5_0, d4(avx2::dot4_q5_0), avx2::dequant_q5_0);
            k.octet = Some(avx2::octet_q5_0);
            k.packed = Some(packed::packed_q5_0_avx2);
        }
        Q8_0 => {
            (k.dot, k.dot4, k.dequantize) =
                (avx2::dot_q8_0, d4(avx2::dot4_q8_0), avx2::dequant_q8_0);
            k.octet = Some(avx2::octet_q8_0);
            k.packed = Some(packed::packed_q8_0_avx2);
        }
        IQ4_NL => {
            (k.dot, k.dot4, k.dequantize) = (
                avx2::dot_iq4_nl,
                d4(avx2::dot4_iq4_nl),
                avx2::dequant_iq4_nl,
            );
            k.octet = Some(avx2::octet_iq4_nl);
        }
        MXFP4 => (k.dot, k.dot4) = (avx2::dot_mxfp4, d4(avx2::dot4_mxfp4)),
        Q4_1 => (k.dot, k.dot4) = (avx2::dot_q4_1, d4(avx2::dot4_q4_1)),
        Q5_1 => (k.dot, k.dot4) = (avx2::dot_q5_1, d4(avx2::dot4_q5_1)),
        Q2_K => k.dot = avx2::dot_q2_k,
        Q3_K => (k.dot, k.tile) = (avx2::dot_q3_k, t4(avx2::tile_q3_k)),
        Q4_K => (k.dot, k.tile) = (avx2::dot_q4_k, t4(avx2::tile_q4_k)),
        Q5_K => k.dot = avx2::dot_q5_k,
        Q6_K => (k.dot, k.dot4) = (avx2::dot_q6_k, d4(avx2::dot4_q6_k)),
        IQ4_XS => (k.dot, k.dot4) = (avx2::dot_iq4_xs, d4(avx2::dot4_iq4_xs)),
        IQ2_XXS => (k.dot, k.dot4) = (avx2::dot_iq2_xxs, d4(avx2::dot4_iq2_xxs)),
        IQ2_XS => (k.dot, k.dot4) = (avx2::dot_iq2_xs, d4(avx2::dot4_iq2_xs)),
        IQ2_S => (k.dot, k.dot4) = (avx2::dot_iq2_s, d4(avx2::dot4_iq2_s)),
        IQ3_XXS => (k.dot, k.dot4) = (avx2::dot_iq3_xxs, d4(avx2::dot4_iq3_xxs)),
        IQ3_S => (k.dot, k.dot4) = (avx2::dot_iq3_s, d4(avx2::dot4_iq3_s)),
        IQ1_S => (k.dot, k.dot4) = (avx2::dot_iq1_s, d4(avx2::dot4_iq1_s)),
        IQ1_M => (k.dot, k.dot4) = (avx2::dot_iq1_m, d4(avx2::dot4_iq1_m)),
        F32 => k.dot = avx2::dot_f32,
        F16 => k.dot = avx2::dot_f16,
        BF16 => k.dot = avx2::dot_bf16,
        _ => {}
    }
    match k.act_ty {
        Q8_0 => k.quantize_act = avx2::quantize_q8_0,
        Q8_1 => k.quantize_act = avx2::quantize_q8_1,
        Q8_K => k.quantize_act = avx2::quantize_q8_k,
        _ => {}
    }
    // The AVX-512 tier runs the AVX2 kernels; the VNNI tiers swap in their `vpdpbusd` kernels.
    match isa {
        Isa::AvxVnni => install_vnni!(
            k,
            avxvnni,
            [
                packed::packed_q4_0_avxvnni,
                packed::packed_q5_0_avxvnni,
                packed::packed_q8_0_avxvnni
            ]
        ),
        Isa::Avx512Vnni => install_vnni!(
            k,
            avx512,
            [
                packed::packed_q4_0_avx512vnni,
                packed::packed_q5_0_avx512vnni,
                packed::packed_q8_0_avx512vnni
            ]
        ),
        _ => {}
    }
    k
}

/// A four-token kernel as the table's optional function pointer.
fn d4(f: crate::Dot4Fn) -> Option<crate::Dot4Fn> {
    Some(f)
}

/// A tile kernel as the table's optional function pointer.
fn t4(f: crate::TileFn) -> Option<crate::TileFn> {
    Some(f)
}

/// A four-row kernel as the table's optional function pointer.
fn r4(f: crate::Rows4Fn) -> Option<crate::Rows4Fn> {
    Some(f)
}
