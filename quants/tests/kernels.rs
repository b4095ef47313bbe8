//! Every kernel of every available instruction set against the scalar reference, on fresh random
//! data (seeded per run from the clock unless GGRUN_TEST_SEED is set; the seed is printed so a
//! failure can be replayed).
//!
//! Tolerances: dequantize, activation quantizers and K-quant and IQ4_XS dots are bit-exact
//! (same integers, same float expression). Legacy and float dots sum block results in another order than the
//! scalar loop: |simd − scalar| ≤ 1e-5 · Σ|block terms| + 1e-6; all SIMD tiers of one machine
//! agree with each other bit for bit.

use ggrun_quants::{
    dequantize_fn, kernels_for, reference_quantize_fn, scalar_kernels, GgmlType, Isa,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const WEIGHT_TYPES: [GgmlType; 16] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::MXFP4,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn rng() -> SmallRng {
    let seed = std::env::var("GGRUN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("GGRUN_TEST_SEED={seed}");
    SmallRng::seed_from_u64(seed)
}

/// Random floats with a random scale, some outliers and some exact zeros.
fn floats(r: &mut SmallRng, n: usize) -> Vec<f32> {
    let scale = 10f32.powf(r.random_range(-3.0..2.0));
    (0..n)
        .map(|_| match r.random_range(0..20) {
            0 => 0.0,
            1 => scale * r.random_range(-8.0..8.0),
            _ => scale * r.random_range(-1.0..1.0),
        })
        .collect()
}

/// `count` activation rows of `n` random values in `k`'s activation format.
fn activations(
    k: &ggrun_quants::Kernels,
    r: &mut SmallRng,
    n: usize,
    count: usize,
) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            let mut a = vec![0u8; k.act_ty.row_bytes(n as u64).unwrap() as usize];
            (k.quantize_act)(&floats(r, n), &mut a);
            a
        })
        .collect()
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len() as u64).unwrap() as usize];
    reference_quantize_fn(ty).unwrap()(x, &mut out);
    out
}

/// Element counts to try: one block, an odd number of blocks, and Nemotron's row widths.
fn lengths(ty: GgmlType) -> Vec<usize> {
    let bs = ty.block_size().max(32);
    let mut v = vec![bs, 3 * bs, 7 * bs];
    for n in [2688usize, 1856, 4096] {
        if n % bs == 0 {
            v.push(n);
        }
    }
    v
}

fn simd_tiers() -> Vec<Isa> {
    Isa::available()
        .into_iter()
        .filter(|i| *i != Isa::Scalar)
        .collect()
}

#[test]
fn expected_tiers_are_present() {
    // CI names the tiers it expects each machine to test (GGRUN_EXPECT_ISA=avx2, or
    // neon-dotprod under qemu), so SIMD tests cannot pass by silently testing nothing.
    eprintln!("tiers: {:?}", Isa::available());
    if let Ok(want) = std::env::var("GGRUN_EXPECT_ISA") {
        for name in want.split(',').filter(|s| !s.is_empty()) {
            let isa = Isa::from_name(name).unwrap_or_else(|| panic!("unknown tier {name}"));
            assert!(isa.is_available(), "{name} expected but not available");
        }
    }
}

#[test]
fn dot_products_match_scalar_on_every_tier() {
    let mut r = rng();
    for ty in WEIGHT_TYPES {
        let s = scalar_kernels(ty).unwrap();
        for n in lengths(ty) {
            for _ in 0..20 {
                let w = quantize(ty, &floats(&mut r, n));
                let x = floats(&mut r, n);
                let mut a = vec![0u8; s.act_ty.row_bytes(n as u64).unwrap() as usize];
                (s.quantize_act)(&x, &mut a);
                let want = (s.dot)(&w, &a);
                // Bound for reordering error: the dot of absolute dequantized values.
                let (mut wf, mut af) = (vec![0f32; n], vec![0f32; n]);
                (s.dequantize)(&w, &mut wf);
                dequantize_fn(s.act_ty).unwrap()(&a, &mut af);
                let mag: f32 = wf.iter().zip(&af).map(|(p, q)| (p * q).abs()).sum();
                let mut first_simd: Option<f32> = None;
                for isa in simd_tiers() {
                    let k = kernels_for(ty, isa).unwrap();
                    let got = (k.dot)(&w, &a);
                    // Every SIMD tier sums in the same order (llama.cpp's AVX2 order on x86), so
                    // the tiers agree with each other bit for bit.
                    let f = *first_simd.get_or_insert(got);
                    assert_eq!(
                        got.to_bits(),
                        f.to_bits(),
                        "{ty} {isa:?} n={n}: tiers disagree"
                    );
                    if ty.is_k_quant() || ty == GgmlType::IQ4_XS {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{ty} {isa:?} n={n}: {got} vs {want}"
                        );
                    } else {
                        let tol = 1e-5 * mag + 1e-6;
                        assert!(
                            (got - want).abs() <= tol,
                            "{ty} {isa:?} n={n}: {got} vs {want} (tol {tol})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dequantize_and_activation_quantizers_are_bit_exact_on_every_tier() {
    let mut r = rng();
    for ty in WEIGHT_TYPES {
        let s = scalar_kernels(ty).unwrap();
        for n in lengths(ty) {
            let w = quantize(ty, &floats(&mut r, n));
            let x = floats(&mut r, n);
            let mut want = vec![0f32; n];
            (s.dequantize)(&w, &mut want);
            let mut want_a = vec![0u8; s.act_ty.row_bytes(n as u64).unwrap() as usize];
            (s.quantize_act)(&x, &mut want_a);
            for isa in simd_tiers() {
                let k = kernels_for(ty, isa).unwrap();
                let mut got = vec![0f32; n];
                (k.dequantize)(&w, &mut got);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty} {isa:?} dequantize"
                );
                let mut got_a = vec![0u8; want_a.len()];
                (k.quantize_act)(&x, &mut got_a);
                assert_eq!(
                    got_a, want_a,
                    "{ty} {isa:?} activation quantizer ({})",
                    k.act_ty
                );
            }
        }
    }
}

/// Q8_K activations on the blocks random floats rarely give: an all-zero block, the largest
/// magnitude reached twice with both signs (the first decides the scale's sign), at the block's
/// last element, values that land on half steps, and NaN lanes (the scalar search skips them).
#[test]
fn q8k_activation_quantizers_match_scalar_on_edge_blocks() {
    let mut r = rng();
    let mut blocks: Vec<Vec<f32>> = vec![vec![0.0; 256]];
    let mut tie = floats(&mut r, 256);
    tie[17] = 3.5;
    tie[200] = -3.5;
    blocks.push(tie.clone());
    tie[17] = -3.5;
    tie[200] = 3.5;
    blocks.push(tie);
    let mut last = floats(&mut r, 256);
    last[255] = -9.0;
    blocks.push(last);
    // -127/max · x = k + 0.5 for x = -(k + 0.5)·max/127 with max = 127: exact half steps.
    let mut halves: Vec<f32> = (0..256).map(|i| -((i % 100) as f32 + 0.5)).collect();
    halves[0] = 127.0;
    blocks.push(halves);
    let mut nan = floats(&mut r, 256);
    nan[3] = f32::NAN;
    nan[130] = f32::NAN;
    blocks.push(nan);
    let s = scalar_kernels(GgmlType::Q4_K).unwrap();
    assert_eq!(s.act_ty, GgmlType::Q8_K);
    let x: Vec<f32> = blocks.concat();
    let mut want = vec![0u8; s.act_ty.row_bytes(x.len() as u64).unwrap() as usize];
    (s.quantize_act)(&x, &mut want);
    for isa in simd_tiers() {
        let k = kernels_for(GgmlType::Q4_K, isa).unwrap();
        let mut got = vec![0u8; want.len()];
        (k.quantize_act)(&x, &mut got);
        for (b, (g, w)) in got.chunks(292).zip(want.chunks(292)).enumerate() {
            assert_eq!(g, w, "{isa:?} Q8_K block {b}");
        }
    }
}

/// The dot of the dequantized weight and activation rows in f64, and Σ|w·a| (the scale of
/// the rounding a dot may show).
fn dequantized_dot(s: &ggrun_quants::Kernels, w: &[u8], a: &[u8], n: usize) -> (f64, f64) {
    let (mut wf, mut af) = (vec![0f32; n], vec![0f32; n]);
    (s.dequantize)(w, &mut wf);
    dequantize_fn(s.act_ty).unwrap()(a, &mut af);
    let exact: f64 = wf.iter().zip(&af).map(|(p, q)| *p as f64 * *q as f64).sum();
    let mag: f64 = wf
        .iter()
        .zip(&af)
        .map(|(p, q)| (*p as f64 * *q as f64).abs())
        .sum();
    (exact, mag)
}

/// The grid i-quants, tested on random blocks (every code, sign and scale pattern, more than
/// a quantizer would write).
const GRID_TYPES: [GgmlType; 7] = [
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
];

/// Random blocks of `ty` (every code, sign and scale pattern), the f16 super-block scale kept
/// finite and below 2 (bit 14 cleared: at bytes 0-1, or for IQ1_M in the top nibble of its
/// last scale word).
fn random_blocks(r: &mut SmallRng, ty: GgmlType, n: usize) -> Vec<u8> {
    let mut w: Vec<u8> = (0..ty.row_bytes(n as u64).unwrap())
        .map(|_| r.random())
        .collect();
    let bb = ty.type_size();
    let hi = if ty == GgmlType::IQ1_M { bb - 1 } else { 1 };
    for b in w.chunks_mut(bb) {
        b[hi] &= 0xbf;
    }
    w
}

#[test]
fn grid_iquant_dots_equal_the_dot_of_dequantized_rows() {
    let mut r = rng();
    for ty in GRID_TYPES {
        assert!(ty.is_supported(), "{ty}");
        let s = scalar_kernels(ty).unwrap();
        for n in lengths(ty) {
            for _ in 0..10 {
                let w = random_blocks(&mut r, ty, n);
                let mut a = vec![0u8; s.act_ty.row_bytes(n as u64).unwrap() as usize];
                (s.quantize_act)(&floats(&mut r, n), &mut a);
                let (exact, mag) = dequantized_dot(&s, &w, &a, n);
                let got = (s.dot)(&w, &a) as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-6,
                    "{ty} n={n}: {got} vs {exact}"
                );
                // The x86 tiers' dots (AVX2; NEON has none yet and uses the scalar) sum the same
                // integers in the same float expression: bit for bit, and so do their
                // four-token dots (prefill) against four single dots.
                let acts = activations(&s, &mut r, n, 4);
                let want: Vec<u32> = acts.iter().map(|x| (s.dot)(&w, x).to_bits()).collect();
                for isa in simd_tiers() {
                    let k = kernels_for(ty, isa).unwrap();
                    assert_eq!((k.dot)(&w, &a).to_bits(), (got as f32).to_bits(), "{ty}");
                    if let Some(dot4) = k.dot4 {
                        let mut out = [0f32; 4];
                        dot4(&w, [&acts[0], &acts[1], &acts[2], &acts[3]], &mut out);
                        assert_eq!(out.map(f32::to_bits).to_vec(), want, "{ty} {isa:?} dot4");
                    }
                    // The eight-row prefill kernels (VNNI tiers): eight random rows against
                    // the four activations, each result the single-row dot's bit for bit.
                    if let Some(octet) = k.octet {
                        let rows: Vec<Vec<u8>> =
                            (0..8).map(|_| random_blocks(&mut r, ty, n)).collect();
                        let rs: [&[u8]; 8] = std::array::from_fn(|i| rows[i].as_slice());
                        let a4: Vec<&[u8]> = acts.iter().map(|v| v.as_slice()).collect();
                        let mut out = vec![0f32; 8 * a4.len()];
                        octet(rs, &a4, &mut out);
                        for (i, row) in rows.iter().enumerate() {
                            for (j, act) in acts.iter().enumerate() {
                                let d = (k.dot)(row, act);
                                let got = out[i * a4.len() + j];
                                assert_eq!(got.to_bits(), d.to_bits(), "{ty} {isa:?} octet");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn scalar_dot_equals_the_dot_of_dequantized_rows() {
    // Checks each scalar dot formula against the independent dequantize formulas.
    let mut r = rng();
    for ty in WEIGHT_TYPES {
        let s = scalar_kernels(ty).unwrap();
        for n in lengths(ty) {
            let w = quantize(ty, &floats(&mut r, n));
            let x = floats(&mut r, n);
            let mut a = vec![0u8; s.act_ty.row_bytes(n as u64).unwrap() as usize];
            (s.quantize_act)(&x, &mut a);
            let (exact, mag) = dequantized_dot(&s, &w, &a, n);
            let mut af = vec![0f32; n];
            dequantize_fn(s.act_ty).unwrap()(&a, &mut af);
            let got = (s.dot)(&w, &a) as f64;
            // Q4_1/Q5_1 fold each block's min m through the f16-rounded s = f16(d·Σq): that
            // rounding (relative 2^-11) errs by up to |m|·|s|·2^-11 per block, which can dwarf
            // Σ|w·a| when w straddles zero. Bound it by 1e-3 · Σ_blocks |m| · Σ|a|.
            let min_mag: f64 = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                let bb = ty.type_size();
                w.chunks(bb)
                    .zip(af.chunks(32))
                    .map(|(blk, ab)| {
                        let m =
                            ggrun_quants::float::f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                        m.abs() as f64 * ab.iter().map(|x| x.abs() as f64).sum::<f64>()
                    })
                    .sum()
            } else {
                0.0
            };
            let tol = 1e-5 * mag + 1e-3 * min_mag + 1e-6;
            assert!((got - exact).abs() <= tol, "{ty} n={n}: {got} vs {exact}");
        }
    }
}

#[test]
fn reference_quantizers_round_trip_within_their_step() {
    let mut r = rng();
    // Worst-case error per element relative to the block's max |x| (generous bounds per type).
    let bound = |ty: GgmlType| match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 | GgmlType::BF16 => 4e-3,
        GgmlType::Q8_0 => 0.01,
        GgmlType::Q6_K | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 0.07,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::IQ4_NL => 0.14,
        // The sub-block scale on a 6-bit grid under the super-block's adds its rounding.
        GgmlType::IQ4_XS => 0.2,
        GgmlType::Q3_K => 0.3,
        _ => 0.6,
    };
    for ty in WEIGHT_TYPES {
        let n = lengths(ty)[1];
        let x = floats(&mut r, n);
        let w = quantize(ty, &x);
        let mut y = vec![0f32; n];
        dequantize_fn(ty).unwrap()(&w, &mut y);
        let bs = ty.block_size().max(32);
        for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in xb.iter().zip(yb) {
                assert!(
                    (a - b).abs() <= bound(ty) * amax + 1e-30,
                    "{ty}: {a} -> {b} (amax {amax})"
                );
            }
        }
    }
}

#[test]
fn q8_activation_roundings_differ_only_on_ties() {
    use ggrun_quants::legacy::{quantize_q8_0, quantize_q8_0_ref, BlockQ8_0};
    // 0.5 steps: x·127/amax lands exactly on .5 for these values.
    let mut x = [0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 0.5;
    let mut simd = [BlockQ8_0 {
        d: [0; 2],
        qs: [0; 32],
    }];
    let mut refb = simd;
    quantize_q8_0(&x, &mut simd);
    quantize_q8_0_ref(&x, &mut refb);
    assert_eq!(&simd[0].qs[..4], &[127, 2, -4, 0]); // half to even
    assert_eq!(&refb[0].qs[..4], &[127, 3, -4, 1]); // half away from zero
                                                    // Away from ties the two agree.
    let mut r = rng();
    let x = floats(&mut r, 4096);
    let mut a = vec![
        BlockQ8_0 {
            d: [0; 2],
            qs: [0; 32]
        };
        128
    ];
    let mut b = a.clone();
    quantize_q8_0(&x, &mut a);
    quantize_q8_0_ref(&x, &mut b);
    let differing = a
        .iter()
        .zip(&b)
        .flat_map(|(p, q)| p.qs.iter().zip(q.qs.iter()))
        .filter(|(p, q)| p != q)
        .count();
    assert!(differing <= 8, "{differing} of 4096 differ");
}

#[test]
fn tiles_and_four_row_kernels_equal_single_dots_bit_for_bit() {
    let mut r = rng();
    let mut tested = 0;
    for ty in WEIGHT_TYPES {
        for n in lengths(ty) {
            for isa in Isa::available() {
                let k = kernels_for(ty, isa).unwrap();
                let Some(tile) = k.tile else { continue };
                let rows: Vec<Vec<u8>> = (0..4).map(|_| quantize(ty, &floats(&mut r, n))).collect();
                let acts = activations(&k, &mut r, n, 4);
                let mut out = [[0f32; 4]; 4];
                tile(
                    [&rows[0], &rows[1], &rows[2], &rows[3]],
                    [&acts[0], &acts[1], &acts[2], &acts[3]],
                    &mut out,
                );
                for (o, w) in out.iter().zip(&rows) {
                    for (v, a) in o.iter().zip(&acts) {
                        assert_eq!(v.to_bits(), (k.dot)(w, a).to_bits(), "{ty} {isa:?} n={n}");
                    }
                }
                if let Some(rows4) = k.rows4 {
                    for a in &acts {
                        let mut o = [0f32; 4];
                        rows4([&rows[0], &rows[1], &rows[2], &rows[3]], a, &mut o);
                        for (v, w) in o.iter().zip(&rows) {
                            assert_eq!(v.to_bits(), (k.dot)(w, a).to_bits(), "rows4 {ty} {isa:?}");
                        }
                    }
                }
                tested += 1;
            }
        }
    }
    if std::env::var("GGRUN_EXPECT_ISA").is_ok_and(|v| v.contains("vnni")) {
        assert!(tested > 0, "no tile kernel was tested");
    }
}

#[test]
fn four_token_dots_equal_four_single_dots_bit_for_bit() {
    let mut r = rng();
    let mut tested = 0;
    for ty in WEIGHT_TYPES {
        for n in lengths(ty) {
            for isa in Isa::available() {
                let k = kernels_for(ty, isa).unwrap();
                let Some(dot4) = k.dot4 else { continue };
                let w = quantize(ty, &floats(&mut r, n));
                let acts = activations(&k, &mut r, n, 4);
                let mut out = [0f32; 4];
                dot4(&w, [&acts[0], &acts[1], &acts[2], &acts[3]], &mut out);
                for (o, a) in out.iter().zip(&acts) {
                    assert_eq!(o.to_bits(), (k.dot)(&w, a).to_bits(), "{ty} {isa:?} n={n}");
                }
                tested += 1;
            }
        }
    }
    if std::env::var("GGRUN_EXPECT_ISA").is_ok_and(|v| v.contains("avx2")) {
        assert!(tested > 0, "no four-token kernel was tested");
    }
}

#[test]
fn ssm_state_rows_match_the_scalar_reference_bit_for_bit() {
    use ggrun_quants::ssm::{ssm_row_for, ssm_row_scalar};
    let mut r = rng();
    for isa in Isa::available() {
        let k = ssm_row_for(isa);
        for n in [1, 15, 16, 17, 64, 128, 131] {
            let s0 = floats(&mut r, n);
            let (b, c) = (floats(&mut r, n), floats(&mut r, n));
            let (da, xdt) = (0.9f32, 0.37f32);
            let (mut s1, mut s2) = (s0.clone(), s0.clone());
            let y1 = ssm_row_scalar(&mut s1, &b, &c, da, xdt);
            let y2 = k(&mut s2, &b, &c, da, xdt);
            assert_eq!(y1.to_bits(), y2.to_bits(), "{isa:?} n={n}");
            assert!(s1.iter().zip(&s2).all(|(x, y)| x.to_bits() == y.to_bits()));
            // And the update is the one the model means (f64 check, loose).
            let want: f64 = s0
                .iter()
                .zip(&b)
                .zip(&c)
                .map(|((s, b), c)| (*s as f64 * da as f64 + *b as f64 * xdt as f64) * *c as f64)
                .sum();
            assert!(
                (y1 as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{y1} vs {want}"
            );
        }
    }
}

#[test]
fn weighted_rows_match_the_scalar_reference_bit_for_bit() {
    use ggrun_quants::float::{weighted_rows_for, weighted_rows_scalar};
    let mut r = rng();
    for isa in Isa::available() {
        // (positions, columns, stride, heads): head sizes below, at and above a register
        // slice; GQA groups of one to eight heads (blocks of three and six, and a remainder).
        for (n, hd, stride, g) in [
            (1, 64, 64, 1),
            (5, 7, 7, 1),
            (9, 8, 24, 2),
            (33, 64, 192, 3),
            (4, 100, 128, 1),
            (17, 32, 96, 8),
            (12, 16, 48, 7),
            (6, 72, 144, 4),
        ] {
            let v = floats(&mut r, (n - 1) * stride + hd);
            let w = floats(&mut r, g * n);
            let y0 = floats(&mut r, g * hd);
            let (mut a, mut b) = (y0.clone(), y0.clone());
            weighted_rows_scalar(&mut a, &w, g, &v, stride);
            weighted_rows_for(isa)(&mut b, &w, g, &v, stride);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} {n} {hd} {g}"
            );
            // Each head alone gives its own row.
            for h in 0..g {
                let mut alone = y0[h * hd..(h + 1) * hd].to_vec();
                weighted_rows_for(isa)(&mut alone, &w[h * n..(h + 1) * n], 1, &v, stride);
                assert_eq!(alone, b[h * hd..(h + 1) * hd], "{isa:?} {n} {hd} head {h}");
            }
            // The reference is the plain sum, up to f32 rounding: n+1 additions, each off by at
            // most half an ulp of a partial sum bounded by Σ|terms|.
            for (i, got) in a.iter().enumerate() {
                let (h, d) = (i / hd, i % hd);
                let terms = (0..n).map(|p| w[h * n + p] as f64 * v[p * stride + d] as f64);
                let want: f64 = y0[i] as f64 + terms.clone().sum::<f64>();
                let mag: f64 = (y0[i] as f64).abs() + terms.map(f64::abs).sum::<f64>();
                let tol = (n + 1) as f64 * 6e-8 * mag + 1e-30;
                assert!((*got as f64 - want).abs() <= tol, "{got} vs {want} ({mag})");
            }
        }
    }
}

/// q·k over a K cache in tile layout: every tier equals the scalar twin bit for bit, and both
/// give what the row-layout kernel gives over the same values (f32 and f16 rows).
#[test]
fn tile_layout_dots_equal_the_row_layout_dots() {
    use ggrun_quants::float::{
        dot_rows_scalar, dot_tiles_for, dot_tiles_scalar, f16_to_f32, f32_to_f16, k_tile_index,
    };
    let mut r = rng();
    // (tiles, head size, KV heads, queries): one query, GQA groups of two, three and seven
    // (blocks of three and a remainder), tile counts around the blocks of eight, four, three.
    for (tiles, hd, nkv, g) in [
        (1, 64, 1, 1),
        (9, 64, 3, 1),
        (5, 64, 3, 3),
        (7, 40, 2, 2),
        (11, 128, 2, 7),
        (2, 12, 4, 3),
    ] {
        let (row, n) = (nkv * hd, tiles * 8);
        let rows32 = floats(&mut r, n * row);
        let rows16: Vec<u16> = rows32.iter().map(|&x| f32_to_f16(x)).collect();
        let mut tiled32 = vec![0f32; n * row];
        let mut tiled16 = vec![0u16; n * row];
        for p in 0..n {
            for c in 0..row {
                tiled32[k_tile_index(p, c, row)] = rows32[p * row + c];
                tiled16[k_tile_index(p, c, row)] = rows16[p * row + c];
            }
        }
        let qs = floats(&mut r, g * hd);
        let qs16: Vec<f32> = qs.iter().map(|&x| f16_to_f32(f32_to_f16(x))).collect();
        for kvh in 0..nkv {
            let col = kvh * hd;
            let mut want = vec![0f32; g * n];
            dot_rows_scalar(&rows32[col..], row, &qs, hd, &mut want);
            let mut scalar = vec![0f32; g * n];
            dot_tiles_scalar(&tiled32, row, col, &qs, hd, &mut scalar);
            assert_eq!(scalar, want, "scalar {tiles} {hd} {g}");
            let mut want16 = vec![0f32; g * n];
            dot_rows_scalar(&rows16[col..], row, &qs16, hd, &mut want16);
            let first: f32 = (0..hd).map(|d| rows32[col + d] * qs[d]).sum();
            assert_eq!(want[0].to_bits(), first.to_bits(), "the sum in d order");
            for isa in Isa::available() {
                let mut got = vec![0f32; g * n];
                dot_tiles_for::<f32>(isa)(&tiled32, row, col, &qs, hd, &mut got);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "f32 {isa:?} {tiles} {hd} {g}"
                );
                let mut got = vec![0f32; g * n];
                dot_tiles_for::<u16>(isa)(&tiled16, row, col, &qs16, hd, &mut got);
                assert!(
                    got.iter()
                        .zip(&want16)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "f16 {isa:?} {tiles} {hd} {g}"
                );
                // Query j alone gives its own row of scores.
                for j in 0..g {
                    let mut alone = vec![0f32; n];
                    let q = &qs16[j * hd..(j + 1) * hd];
                    dot_tiles_for::<u16>(isa)(&tiled16, row, col, q, hd, &mut alone);
                    assert_eq!(alone, got[j * n..(j + 1) * n], "{isa:?} query {j}");
                }
            }
        }
    }
}

/// The softmax's exponentials: every tier equals the scalar Cephes exp bit for bit, and that is
/// within 2 ulp of e^x (f64) wherever the result is a normal float.
#[test]
fn exponentials_match_the_scalar_twin_and_the_true_exp() {
    use ggrun_quants::float::{exp_cephes, exp_shifted_for, exp_shifted_scalar};
    let mut r = rng();
    for n in [1usize, 7, 8, 33, 1000] {
        let xs: Vec<f32> = (0..n)
            .map(|i| match i % 5 {
                0 => r.random_range(-100.0..0.0),
                1 => r.random_range(-1.0..1.0),
                _ => r.random_range(-20.0..5.0),
            })
            .collect();
        let max = r.random_range(-3.0..3.0);
        let mut want = xs.clone();
        exp_shifted_scalar(&mut want, max);
        for isa in Isa::available() {
            let mut got = xs.clone();
            exp_shifted_for(isa)(&mut got, max);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{isa:?} n={n}"
            );
        }
    }
    for i in 0..200_000 {
        let x = -87.0 + 175.0 * (i as f32 / 200_000.0);
        let (got, true_exp) = (exp_cephes(x) as f64, (x as f64).exp());
        if true_exp < f32::MIN_POSITIVE as f64 {
            continue;
        }
        let ulp = (true_exp as f32).abs() as f64 * f32::EPSILON as f64;
        assert!(
            (got - true_exp).abs() <= 2.0 * ulp,
            "exp({x}) = {got}, not {true_exp}"
        );
    }
}

/// V rows stored as f16 (normal precision's cache): every tier's value kernel over f16 rows
/// gives bit for bit what it gives over the same values as f32 rows (the q·k kernel's twin
/// property is in the tile-layout test).
#[test]
fn f16_kv_rows_give_what_the_same_values_as_f32_give() {
    use ggrun_quants::float::{f16_to_f32, f32_to_f16, weighted_rows_for};
    let mut r = rng();
    for isa in Isa::available() {
        for (n, hd, stride, g) in [
            (1, 64, 64, 1),
            (21, 64, 576, 3),
            (17, 12, 12, 2),
            (40, 128, 256, 6),
        ] {
            let v16: Vec<u16> = floats(&mut r, (n - 1) * stride + hd)
                .iter()
                .map(|&x| f32_to_f16(x))
                .collect();
            let v32: Vec<f32> = v16.iter().map(|&b| f16_to_f32(b)).collect();
            let w = floats(&mut r, g * n);
            let y0 = floats(&mut r, g * hd);
            let (mut a, mut b) = (y0.clone(), y0);
            weighted_rows_for::<f32>(isa)(&mut a, &w, g, &v32, stride);
            weighted_rows_for::<u16>(isa)(&mut b, &w, g, &v16, stride);
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "weighted_rows {isa:?} {n} {hd}"
            );
        }
    }
}

#[test]
fn eight_row_prefill_kernels_follow_their_reference_order() {
    use ggrun_quants::legacy::octet_reference;
    let mut r = rng();
    let mut tested = 0;
    for ty in WEIGHT_TYPES {
        for n in lengths(ty) {
            for isa in Isa::available() {
                let k = kernels_for(ty, isa).unwrap();
                let Some(octet) = k.octet else { continue };
                let rows: Vec<Vec<u8>> = (0..8).map(|_| quantize(ty, &floats(&mut r, n))).collect();
                // Five tokens: one call of four and a last token alone; seventy: past a run
                // of 64 accumulators, ending in a call of two.
                let nt = if tested % 2 == 0 { 5 } else { 70 };
                let acts = activations(&k, &mut r, n, nt);
                let a: Vec<&[u8]> = acts.iter().map(|v| v.as_slice()).collect();
                let w: [&[u8]; 8] = std::array::from_fn(|i| rows[i].as_slice());
                let mut out = vec![0f32; 8 * a.len()];
                octet(w, &a, &mut out);
                for (i, row) in rows.iter().enumerate() {
                    for (j, act) in acts.iter().enumerate() {
                        let got = out[i * a.len() + j];
                        let d = (k.dot)(row, act);
                        // K-quant octets keep the single-row dot's expression: bit for bit.
                        let Some(want) = octet_reference(ty, row, act) else {
                            assert_eq!(got.to_bits(), d.to_bits(), "{ty} {isa:?} n={n}");
                            continue;
                        };
                        assert_eq!(got.to_bits(), want.to_bits(), "{ty} {isa:?} n={n}");
                        // And it is the same dot product up to float order: the two orders
                        // round differently, by at most 1e-5 of the dot of absolute values (the
                        // exact check is the one against the reference above).
                        let (mut wf, mut af) = (vec![0f32; n], vec![0f32; n]);
                        (k.dequantize)(row, &mut wf);
                        dequantize_fn(k.act_ty).unwrap()(act, &mut af);
                        let mag: f32 = wf.iter().zip(&af).map(|(p, q)| (p * q).abs()).sum();
                        let tol = 1e-5 * mag + 1e-6;
                        assert!((got - d).abs() <= tol, "{ty} {isa:?} n={n}: {got} vs {d}");
                    }
                }
                tested += 1;
            }
        }
    }
    if std::env::var("GGRUN_EXPECT_ISA").is_ok_and(|v| v.contains("vnni")) {
        assert!(tested > 0, "no eight-row kernel was tested");
    }
}

#[test]
fn packed_groups_round_trip_and_kernels_match_their_reference() {
    use ggrun_quants::legacy::octet_reference;
    use ggrun_quants::packed;
    let mut r = rng();
    let mut tested = 0;
    for ty in WEIGHT_TYPES.into_iter().filter(|t| packed::packable(*t)) {
        for n in lengths(ty) {
            let rows: Vec<Vec<u8>> = (0..8).map(|_| quantize(ty, &floats(&mut r, n))).collect();
            let w: [&[u8]; 8] = std::array::from_fn(|i| rows[i].as_slice());
            let mut group = vec![0u8; packed::group_bytes(ty, n).unwrap()];
            assert_eq!(
                group.len(),
                8 * rows[0].len(),
                "a group is as large as its rows"
            );
            packed::pack(ty, w, &mut group);
            // Packing loses nothing.
            let mut back = vec![vec![0u8; rows[0].len()]; 8];
            {
                let mut it = back.iter_mut();
                let outs: [&mut [u8]; 8] =
                    std::array::from_fn(|_| it.next().unwrap().as_mut_slice());
                packed::unpack(ty, &group, outs);
            }
            assert_eq!(back, rows, "{ty} n={n}: unpack(pack(rows)) != rows");
            // Token counts below, at and above the kernels' on-stack slice of 16.
            for nt in [1, 3, 16, 21] {
                let k = scalar_kernels(ty).unwrap();
                let acts = activations(&k, &mut r, n, nt);
                let a: Vec<&[u8]> = acts.iter().map(|v| v.as_slice()).collect();
                let sums: Vec<Vec<i32>> = acts
                    .iter()
                    .map(|act| {
                        let mut s = vec![0i32; n / 32];
                        packed::block_sums(act, &mut s);
                        s
                    })
                    .collect();
                let s: Vec<&[i32]> = sums.iter().map(|v| v.as_slice()).collect();
                let mut want = vec![0f32; 8 * nt];
                packed::reference(ty, &group, &a, &s, &mut want);
                // The reference is the eight-row order of the GGUF-layout rows.
                for (i, row) in rows.iter().enumerate() {
                    for (j, act) in acts.iter().enumerate() {
                        let o = octet_reference(ty, row, act).unwrap();
                        assert_eq!(want[i * nt + j].to_bits(), o.to_bits(), "{ty} n={n}");
                    }
                }
                for isa in Isa::available() {
                    let Some(kernel) = kernels_for(ty, isa).unwrap().packed else {
                        continue;
                    };
                    // With and without the weight prefetch (whichever this CPU's default is;
                    // 64 KiB ahead runs far past the group).
                    for prefetch in [0, 192, 65536] {
                        ggrun_quants::isa::set_weight_prefetch_bytes(prefetch);
                        let mut got = vec![f32::NAN; 8 * nt];
                        kernel(&group, &a, &s, &mut got);
                        for (g, w) in got.iter().zip(&want) {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{ty} {isa:?} n={n} nt={nt} prefetch {prefetch}"
                            );
                        }
                    }
                    tested += 1;
                }
            }
        }
    }
    if std::env::var("GGRUN_EXPECT_ISA").is_ok_and(|v| v.contains("avx2") || v.contains("neon")) {
        assert!(tested > 0, "no packed kernel was tested");
    }
}
