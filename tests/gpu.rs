//! The CUDA backend on a real device. These tests are ignored by default (CI has no GPU):
//! `scripts/gpu-test.sh` builds them here and runs them with `--ignored` on the device machine.
//!
//! Tolerance: the GPU sums in its own order, in f32, with activations in f32, so each output is
//! compared with a float64 dot of the CPU's dequantized weights and the activations:
//! |gpu − ref| ≤ 1e-5 · Σ|w·x| + 1e-6. Outputs are poisoned (NaN) before each launch, so a
//! row the kernel did not write fails. Whole models (every quantized fixture) run with all
//! weights on the GPU and with routed experts split between GPU and RAM, in exact mode (the GPU's
//! products take f32 activations, so the CPU side keeps f32 too): every row within 1e-3 rel-RMS
//! of the float64 reference and top-1 always equal, the fixtures' exact-mode bounds, with the
//! decode steps fed llama.cpp's greedy tokens as the reference was. (In normal mode the CPU
//! rounds activations as llama.cpp does and the GPU does not; on these random-weight fixtures
//! that flips near-tied routers, so only exact mode can tell a bug from rounding.) The Mamba-2
//! conv and scan kernels match the CPU's on random inputs and states, outputs and updated
//! states each within 1e-5 · (1 + |cpu|) (another summation order over d_state, and expf).

mod common;

use common::{compare, golden, median, run};
use ggrun::backend::cpu::{Cpu, Matrix, Precision};
use ggrun::backend::cuda::{DeviceWeights, Epilogue, Gpu, PassOptions, Prefetch};
use ggrun::backend::placement::{PlacementArgs, Plan};
use ggrun::gguf::Model;
use ggrun::model::{self, LayerState, LoadOptions};
use ggrun_quants::{dequantize_fn, quantize_fn, reference_quantize_fn, GgmlType};

/// Deterministic pseudo-random values in [-1, 1) from `seed`, some of them scaled up.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            if i % 61 == 0 {
                8.0 * v
            } else {
                v
            }
        })
        .collect()
}

/// `rows` × `cols` random values quantized to `ty` by the reference quantizer, on the device.
fn random_matrix(
    gpu: &Gpu,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    seed: u64,
) -> ggrun::backend::cuda::DeviceMatrix {
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let quantize = reference_quantize_fn(ty).unwrap();
    let mut data = vec![0u8; rows * rb];
    for (src, dst) in values(seed, rows * cols)
        .chunks(cols)
        .zip(data.chunks_mut(rb))
    {
        quantize(src, dst);
    }
    let m = Matrix {
        ty,
        data: &data,
        rows,
        cols,
        packed: None,
        device: None,
    };
    gpu.upload(&m).unwrap()
}

fn seed() -> u64 {
    let s = std::env::var("GGRUN_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("GGRUN_TEST_SEED={s}");
    s
}

/// Σ w·x and Σ |w·x| in float64: a product's reference value and the scale of its rounding.
fn dot_and_magnitude(w: &[f32], x: &[f32]) -> (f64, f64) {
    w.iter().zip(x).fold((0.0, 0.0), |(d, m), (a, b)| {
        let p = *a as f64 * *b as f64;
        (d + p, m + p.abs())
    })
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn matmul_of_every_weight_type_matches_the_cpu_dequantization() {
    use GgmlType::*;
    let gpu = Gpu::open(0).expect("a CUDA device");
    let types = [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS, MXFP4, Q2_K, Q3_K, Q4_K,
        Q5_K, Q6_K, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M,
    ];
    matmul_matches_the_cpu_dequantization(&gpu, &types);
}

/// The consumer cards' targets (sm_80: RTX 30 and A100, sm_86: RTX 30 laptops and A-series
/// workstation cards, sm_89: RTX 40): the kernels compile for each, and the sm_80 build runs
/// here (the driver translates its PTX) with the products and attention tests' results.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn kernels_built_for_the_consumer_cards_compile_and_run() {
    use GgmlType::*;
    for target in [(8, 9), (8, 6), (8, 0)] {
        let gpu = Gpu::open_with_kernels_for(0, Some(target))
            .unwrap_or_else(|e| panic!("kernels for sm_{}{}: {e:#}", target.0, target.1));
        if target == (8, 0) {
            let types = [
                F16, Q4_0, Q5_0, Q8_0, Q4_K, Q6_K, IQ4_XS, MXFP4, IQ2_XXS, IQ3_S, IQ1_M,
            ];
            matmul_matches_the_cpu_dequantization(&gpu, &types);
            attention_matches_the_host(&gpu);
        }
    }
}

/// Products by matrices of each of `types` (reference-quantized random values) against the
/// float64 product of the CPU's dequantization, on every kernel family a batch size selects.
fn matmul_matches_the_cpu_dequantization(gpu: &Gpu, types: &[GgmlType]) {
    use GgmlType::*;
    eprintln!(
        "{} sm_{}{} kernels {} ({})",
        gpu.name,
        gpu.arch.0,
        gpu.arch.1,
        gpu.kernel_cache.display(),
        if gpu.compiled { "compiled" } else { "cached" }
    );
    let seed = seed();
    for (k, &ty) in types.iter().enumerate() {
        // Nemotron's widths where the blocks divide them, else a K-quant width.
        for cols in [2688usize, 1856, 4096] {
            if cols % ty.block_size() != 0 {
                continue;
            }
            let rows = 67;
            let rb = ty.row_bytes(cols as u64).unwrap() as usize;
            let wf = values(seed ^ k as u64, rows * cols);
            let mut data = vec![0u8; rows * rb];
            let q = quantize_fn(ty).unwrap();
            for (src, dst) in wf.chunks(cols).zip(data.chunks_mut(rb)) {
                q(src, dst);
            }
            let m = Matrix {
                ty,
                data: &data,
                rows,
                cols,
                packed: None,
                device: None,
            };
            let dq = dequantize_fn(ty).unwrap();
            let mut deq = vec![0f32; rows * cols];
            for (src, dst) in data.chunks(rb).zip(deq.chunks_mut(cols)) {
                dq(src, dst);
            }
            let dm = gpu.upload(&m).unwrap();
            // Decode-sized batches (a block per four rows and token) and tiled ones, partial
            // tiles included, in exact and normal precision. Normal precision puts tiles on the
            // tensor cores (bf16 operands: each product is off by at most 2·2⁻⁸ of itself, so
            // the bound is 2⁻⁷ of Σ|w·x|) and, for the block types but IQ4_NL, quantizes decode
            // activations to int8 (each off by at most half a step, amax/254 of its block of
            // 32, so the bound is Σ over blocks of amax/254 · Σ|w|, beside f32's 1e-5; a
            // K-quant's minimum is applied to the float sum of the activations, exactly).
            let int8 = !matches!(ty, F32 | F16 | BF16 | IQ4_NL);
            for (t, normal) in [
                (1usize, false),
                (3, false),
                (5, false),
                (8, false),
                (67, false),
                (1, true),
                (3, true),
                (5, true),
                (8, true),
                (67, true),
                (130, true),
            ] {
                gpu.set_normal_precision(normal);
                let on_mma = normal && t >= 8 && cols % 32 == 0;
                let on_int8 = normal && t < 8 && int8;
                let x = values(seed.rotate_left(7) ^ (t * 31 + k) as u64, t * cols);
                let dx = gpu.to_device(&x).unwrap();
                let mut dy = gpu.to_device(&vec![f32::NAN; t * rows]).unwrap();
                gpu.matmul(&dm, &dx, t, &mut dy).unwrap();
                let y = gpu.to_host(&dy).unwrap();
                if normal {
                    gpu.set_normal_precision(false);
                    gpu.matmul(&dm, &dx, t, &mut dy).unwrap();
                    let f32_path = gpu.to_host(&dy).unwrap();
                    assert_eq!(
                        y.iter().zip(&f32_path).any(|(a, b)| a != b),
                        on_mma || on_int8,
                        "{ty} t={t}: the normal-precision kernel ran where it should not, or did not run"
                    );
                }
                if t < 8 {
                    // A decode block of several tokens gives each token what it gets alone, bit
                    // for bit (the weights are shared, the order of each token's sums is not
                    // changed).
                    gpu.set_normal_precision(normal);
                    let mut dyj = gpu.to_device(&vec![f32::NAN; rows]).unwrap();
                    for j in 0..t {
                        let dxj = gpu.to_device(&x[j * cols..(j + 1) * cols]).unwrap();
                        gpu.matmul(&dm, &dxj, 1, &mut dyj).unwrap();
                        let alone = gpu.to_host(&dyj).unwrap();
                        assert!(
                            alone.iter().zip(&y[j * rows..(j + 1) * rows]).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{ty} cols={cols} t={t} normal precision {normal} token {j}: not what it gets alone"
                        );
                    }
                }
                for j in 0..t {
                    let xj = &x[j * cols..(j + 1) * cols];
                    for r in 0..rows {
                        let wr = &deq[r * cols..(r + 1) * cols];
                        let (want, mag) = dot_and_magnitude(wr, xj);
                        let bound = if on_mma {
                            mag / 128.0
                        } else if on_int8 {
                            let steps: f64 = wr
                                .chunks(32)
                                .zip(xj.chunks(32))
                                .map(|(w, x)| {
                                    let amax = x.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                                    let wsum: f64 = w.iter().map(|v| v.abs() as f64).sum();
                                    amax / 254.0 * wsum
                                })
                                .sum();
                            steps + 1e-5 * mag
                        } else {
                            1e-5 * mag
                        };
                        let got = y[j * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= bound + 1e-6,
                            "{ty} cols={cols} t={t} normal precision {normal} row {r} token {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Decode's int8 activations, quantized once per product on the device, are what the host
/// computes in f32 for each block of 32: step amax/127, values x · (127/amax) rounded to the
/// nearest (ties to even), and the sum of each eight in order; bit for bit, over widths that
/// end in a partial 256-column chunk, rows with an all-zero block (step 0, values 0) and a
/// block holding the row's large values.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn decode_activations_quantize_to_int8_as_the_host_computes() {
    let gpu = Gpu::open(0).expect("a CUDA device");
    let seed = seed();
    for (rows, cols) in [(1usize, 2688usize), (3, 1856), (5, 4096), (2, 96)] {
        let mut x = values(seed ^ cols as u64, rows * cols);
        x[32..64].fill(0.0);
        let dx = gpu.to_device(&x).unwrap();
        let xq = gpu.quantize_q8(&dx.slice(..), rows, cols).unwrap();
        let got = gpu.to_host(&xq).unwrap();
        let rb = ggrun::backend::cuda::q8_row_bytes(cols);
        assert_eq!(got.len(), rows * rb);
        for r in 0..rows {
            let (row, xr) = (&got[r * rb..(r + 1) * rb], &x[r * cols..(r + 1) * cols]);
            let float = |at: usize| f32::from_le_bytes(row[at..at + 4].try_into().unwrap());
            for (b, xb) in xr.chunks(32).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                let step = float(cols + 4 * b);
                assert_eq!(
                    step.to_bits(),
                    (amax / 127.0).to_bits(),
                    "row {r} block {b} step"
                );
                for (i, v) in xb.iter().enumerate() {
                    let want = (v * inv).round_ties_even() as i8;
                    let at = 32 * b + i;
                    assert_eq!(row[at] as i8, want, "row {r} cols {cols} value {at}");
                }
                for (e, eight) in xb.chunks(8).enumerate() {
                    let sum = eight.iter().fold(0f32, |s, v| s + v);
                    let got = float(cols + cols / 8 + 4 * (4 * b + e));
                    assert_eq!(got.to_bits(), sum.to_bits(), "row {r} block {b} sum {e}");
                }
            }
        }
    }
    // A width the blocks of 32 do not divide is refused, not read past.
    let dx = gpu.to_device(&vec![1f32; 100]).unwrap();
    assert!(gpu.quantize_q8(&dx.slice(..), 1, 100).is_err());
}

/// Attention on the device over a long cache matches a float64 softmax on the host, in both
/// precisions and over f32 and f16 caches (the reference from the values the cache holds): Nemotron's heads (32 over 2 KV heads of 128) at 5000 positions for one and three
/// new tokens (decode splits each head's positions into runs merged afterwards), gpt-oss's (64
/// over 8 of 64) with a 128-position window and sinks, a first token alone (one position), and
/// prefill-sized batches, which in normal precision run on the tensor cores: 40 tokens after
/// 3000, 300 from an empty cache, gpt-oss's shape for 70 tokens, 33 tokens over 4 KV heads (a
/// last tile of rows part-filled) and heads without GQA under a 20-position window. Outputs
/// are poisoned first. Bound per output value: exact (and the f32 kernels) 1e-4 · Σ p·|v| +
/// 1e-6 (f32 sums over thousands of positions in another order, and expf); the tensor-core
/// kernel (2·δ + 3·2^-11) · Σ p·|v| + 1e-5, δ = scale · 2 · 2^-11 · max over the positions of
/// Σ |q·k| (q, k, v and the probabilities rounded to f16, unit roundoff 2^-11: the outlier
/// keys make δ the larger term where they weigh).
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn attention_over_a_long_cache_matches_the_host() {
    attention_matches_the_host(&Gpu::open(0).expect("a CUDA device"));
}

/// Decode and prefill attention (split or not, f32 and f16 caches, both precisions) against
/// the host's, over caches of thousands of positions, windows and sinks.
fn attention_matches_the_host(gpu: &Gpu) {
    use ggrun::backend::attention::AttnShape;
    use ggrun::backend::cuda::DeviceKv;
    let seed = seed();
    // (heads, kv heads, head dim, window, sinks, capacity, past, new tokens)
    let cases = [
        (
            32usize, 2usize, 128usize, None, false, 8192usize, 4999usize, 1usize,
        ),
        (32, 2, 128, None, false, 8192, 4997, 3),
        (64, 8, 64, Some(128usize), true, 4096, 3000, 1),
        (32, 2, 128, None, false, 8192, 0, 1),
        // Prefill-sized: heads × tokens fill the GPU unsplit (tensor cores in normal precision).
        (32, 2, 128, None, false, 4096, 3000, 40),
        (32, 2, 128, None, false, 1024, 0, 300),
        (64, 8, 64, Some(128), true, 4096, 1000, 70),
        (32, 4, 128, None, false, 2048, 5, 33),
        (16, 16, 64, Some(20), false, 512, 0, 100),
    ];
    for (c, &(nh, nkv, hd, window, with_sinks, capacity, past, t)) in cases.iter().enumerate() {
        let row = nkv * hd;
        let shape = AttnShape {
            n_head: nh,
            n_head_kv: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
        };
        let s = seed ^ (c as u64) << 32;
        let q = values(s, t * nh * hd);
        let mut kc = values(s ^ 1, capacity * row);
        let vc = values(s ^ 2, capacity * row);
        // A few keys that stand out, so the softmax is not flat.
        for p in (0..capacity).step_by(97) {
            kc[p * row..(p + 1) * row]
                .iter_mut()
                .for_each(|v| *v *= 4.0);
        }
        let sinks: Vec<f32> = values(s ^ 3, nh).iter().map(|v| 2.0 * v).collect();
        let dq = gpu.to_device(&q).unwrap();
        let dsinks = gpu.to_device(&sinks).unwrap();
        let dpast = gpu.to_device(&[past as i32]).unwrap();
        // An f32 cache (exact mode's) and an f16 one (normal precision's), the reference
        // computed from the values the cache holds.
        for f16 in [false, true] {
            let (kc, vc) = match f16 {
                false => (kc.clone(), vc.clone()),
                true => (round_f16(&kc), round_f16(&vc)),
            };
            // The float64 reference per (token, head): the output, Σ p·|v| per dimension, and the
            // largest Σ |q·k| over the positions (what f16 rounding of q and k can move a logit by).
            let mut want = vec![0f64; t * nh * hd];
            let mut mag = vec![0f64; t * nh * hd];
            let mut qk_abs = vec![0f64; t * nh];
            for ti in 0..t {
                let end = past + ti + 1;
                let first = window.map_or(0, |w| end.saturating_sub(w));
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let qh = &q[(ti * nh + h) * hd..][..hd];
                    let at = (ti * nh + h) * hd;
                    let mut logits = Vec::with_capacity(end - first);
                    for p in first..end {
                        let kr = &kc[p * row + kvh * hd..][..hd];
                        let (mut d, mut a) = (0f64, 0f64);
                        for (x, y) in qh.iter().zip(kr) {
                            d += *x as f64 * *y as f64;
                            a += (*x as f64 * *y as f64).abs();
                        }
                        logits.push(d * shape.scale as f64);
                        qk_abs[ti * nh + h] = qk_abs[ti * nh + h].max(a);
                    }
                    let sink = with_sinks.then(|| sinks[h] as f64);
                    let mx = logits
                        .iter()
                        .chain(sink.iter())
                        .fold(f64::NEG_INFINITY, |m, v| m.max(*v));
                    let denom: f64 = logits
                        .iter()
                        .chain(sink.iter())
                        .map(|l| (l - mx).exp())
                        .sum();
                    for (i, p) in (first..end).enumerate() {
                        let w = (logits[i] - mx).exp() / denom;
                        let vr = &vc[p * row + kvh * hd..][..hd];
                        for d in 0..hd {
                            want[at + d] += w * vr[d] as f64;
                            mag[at + d] += w * (vr[d] as f64).abs();
                        }
                    }
                }
            }
            let cache = |x: &[f32]| match f16 {
                false => DeviceKv::F32(gpu.to_device(x).unwrap()),
                true => DeviceKv::F16(gpu.to_device(&to_f16_bits(x)).unwrap()),
            };
            let (dk, dv) = (cache(&kc), cache(&vc));
            for normal in [false, true] {
                gpu.set_normal_precision(normal);
                let flash = normal && t >= 32;
                let mut dout = gpu.to_device(&vec![f32::NAN; t * nh * hd]).unwrap();
                gpu.attention(
                    &shape,
                    with_sinks.then_some(&dsinks),
                    &dq.slice(..),
                    &dk,
                    &dv,
                    &mut dout.slice_mut(..),
                    t,
                    past,
                    &dpast.slice(..),
                )
                .unwrap();
                let out = gpu.to_host(&dout).unwrap();
                for (i, (&got, (&want, &mag))) in out.iter().zip(want.iter().zip(&mag)).enumerate()
                {
                    let (ti, h, d) = (i / (nh * hd), i / hd % nh, i % hd);
                    // f16 (unit roundoff 2^-11) moves each logit by at most scale · 2 · 2^-11 · Σ|q·k|
                    // and so each probability by twice that; v and p are rounded once each.
                    let u = 2f64.powi(-11);
                    let tol = if flash {
                        let dl = shape.scale as f64 * 2.0 * u * qk_abs[ti * nh + h];
                        (2.0 * dl + 3.0 * u) * mag + 1e-5
                    } else {
                        1e-4 * mag + 1e-6
                    };
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "case {c} (normal {normal}, f16 cache {f16}) token {ti} head {h} dim {d}: \
                     {got} vs {want}"
                    );
                }
            }
        }
    }
}

fn to_f16_bits(x: &[f32]) -> Vec<u16> {
    x.iter()
        .map(|&v| ggrun_quants::float::f32_to_f16(v))
        .collect()
}

/// The values an f16 cache holds for `x`.
fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| ggrun_quants::float::f16_to_f32(ggrun_quants::float::f32_to_f16(v)))
        .collect()
}

/// Decode's fused expert kernels give what the separate launches give, bit for bit: the gate
/// and up products with their biases and the gated activation in one pass, against two
/// products, two bias additions and `gated_act`; a product with its bias added in the kernel,
/// against the product and `add_bias`. Four 48-row "experts" (MXFP4 at gpt-oss's width, Q8_0
/// and Q4_K), three tokens of two experts each, bias rows chosen by ids unlike the weights'
/// (as with a cache's slots), in both precisions and with two activations; outputs poisoned.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn fused_expert_kernels_equal_the_separate_launches() {
    use ggrun::backend::cuda::{DeviceAct, DeviceRows};
    let gpu = Gpu::open(0).expect("a CUDA device");
    let seed = seed();
    let (experts, rows, k, t) = (4usize, 48usize, 2usize, 3usize);
    let pairs = t * k;
    let ids = gpu.to_device(&[3i32, 0, 1, 3, 2, 1]).unwrap();
    let bias_ids = gpu.to_device(&[7i32, 4, 5, 0, 6, 2]).unwrap();
    let cases = [
        (GgmlType::MXFP4, 2880usize),
        (GgmlType::Q8_0, 2688),
        (GgmlType::Q4_K, 4096),
    ];
    for (c, (ty, cols)) in cases.into_iter().enumerate() {
        let upload = |s: u64| random_matrix(&gpu, ty, experts * rows, cols, s);
        let s = seed ^ (c as u64) << 8;
        let (gm, um) = (upload(s ^ 1), upload(s ^ 2));
        let on = |m| DeviceRows {
            gpu: &gpu,
            m,
            start: 0,
            rows: experts * rows,
        };
        let (gate, up) = (on(&gm), on(&um));
        let bg = gpu.to_device(&values(s ^ 3, 8 * rows)).unwrap();
        let bu = gpu.to_device(&values(s ^ 4, 8 * rows)).unwrap();
        let x = gpu.to_device(&values(s ^ 5, t * cols)).unwrap();
        let poisoned = || gpu.to_device(&vec![f32::NAN; pairs * rows]).unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        for normal in [false, true] {
            gpu.set_normal_precision(normal);
            for act in [
                DeviceAct::Silu,
                DeviceAct::SwigluOai {
                    alpha: 1.702,
                    limit: 7.0,
                },
            ] {
                let (mut g, mut u) = (poisoned(), poisoned());
                for (w, y, b) in [(&gate, &mut g, &bg), (&up, &mut u, &bu)] {
                    let mut yv = y.slice_mut(..);
                    w.matmul_id(
                        rows,
                        experts,
                        &ids,
                        &x.slice(..),
                        &mut yv,
                        pairs,
                        k,
                        false,
                        None,
                        Epilogue::Store,
                    )
                    .unwrap();
                    gpu.add_bias(y, b, Some((&bias_ids, 7)), pairs, rows)
                        .unwrap();
                }
                let mut fused_bias = poisoned();
                let mut yv = fused_bias.slice_mut(..);
                let bias = Some((&bg, &bias_ids));
                gate.matmul_id(
                    rows,
                    experts,
                    &ids,
                    &x.slice(..),
                    &mut yv,
                    pairs,
                    k,
                    false,
                    bias,
                    Epilogue::Store,
                )
                .unwrap();
                assert_eq!(
                    bits(gpu.to_host(&fused_bias).unwrap()),
                    bits(gpu.to_host(&g).unwrap()),
                    "{ty} normal {normal}: the product with its bias in the kernel differs"
                );
                gpu.gated_act(&mut g, &u, pairs * rows, act).unwrap();
                let mut fused = poisoned();
                let mut yv = fused.slice_mut(..);
                gate.matmul_gated_id(
                    &up,
                    rows,
                    experts,
                    &ids,
                    &x.slice(..),
                    &mut yv,
                    pairs,
                    k,
                    (Some(&bg), Some(&bu), &bias_ids),
                    act,
                )
                .unwrap();
                let (want, got) = (gpu.to_host(&g).unwrap(), gpu.to_host(&fused).unwrap());
                assert!(
                    want.iter().all(|v| v.is_finite()),
                    "{ty}: separate launches left a row"
                );
                assert_eq!(
                    bits(got),
                    bits(want),
                    "{ty} normal {normal}: the fused gate/up differs"
                );
            }
        }
    }
}

/// Attention's q, k and v in one launch give what three products and their bias additions
/// give, bit for bit: 4096, 512 and 512 rows (gpt-oss's shapes, at 2880 columns) of Q8_0 and
/// MXFP4, k without a bias, for 1, 3 and 8 tokens (8: the tiled kernels, products one after
/// another with the biases added after them) in both precisions; and with v of another type
/// (one after another). Outputs are compared with poisoned separate runs.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn three_products_in_one_launch_equal_them_one_by_one() {
    use ggrun::backend::cuda::DeviceRows;
    let gpu = Gpu::open(0).expect("a CUDA device");
    let seed = seed();
    let cols = 2880usize;
    let upload = |ty: GgmlType, rows: usize, s: u64| random_matrix(&gpu, ty, rows, cols, s);
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    use GgmlType::*;
    for (c, types) in [[Q8_0; 3], [MXFP4; 3], [Q8_0, Q8_0, Q4_0]]
        .into_iter()
        .enumerate()
    {
        let s = seed ^ (c as u64) << 12;
        let shapes = [4096usize, 512, 512];
        let ms: Vec<_> = (0..3)
            .map(|i| upload(types[i], shapes[i], s ^ i as u64))
            .collect();
        let ws: Vec<_> = ms
            .iter()
            .map(|m| DeviceRows {
                gpu: &gpu,
                m,
                start: 0,
                rows: m.rows,
            })
            .collect();
        let bq = gpu.to_device(&values(s ^ 7, 4096)).unwrap();
        let bv = gpu.to_device(&values(s ^ 8, 512)).unwrap();
        let biases = [Some(&bq), None, Some(&bv)];
        for t in [1usize, 3, 8] {
            let x = gpu
                .to_device(&values(s ^ 9 ^ (t as u64) << 20, t * cols))
                .unwrap();
            for normal in [false, true] {
                gpu.set_normal_precision(normal);
                let parts = [
                    (&ws[0], biases[0]),
                    (&ws[1], biases[1]),
                    (&ws[2], biases[2]),
                ];
                let fused = gpu.matmul3(parts, &x, t).unwrap();
                for i in 0..3 {
                    let mut y = gpu.to_device(&vec![f32::NAN; t * shapes[i]]).unwrap();
                    gpu.matmul(ws[i].m, &x, t, &mut y).unwrap();
                    if let Some(b) = biases[i] {
                        gpu.add_bias(&mut y, b, None, t, shapes[i]).unwrap();
                    }
                    let want = gpu.to_host(&y).unwrap();
                    assert!(want.iter().all(|v| v.is_finite()));
                    assert_eq!(
                        bits(gpu.to_host(&fused[i]).unwrap()),
                        bits(want),
                        "{types:?} t={t} normal {normal}: product {i} differs"
                    );
                }
            }
        }
    }
}

/// Several groups of rows and tokens in one tensor-core launch (a layer's selected experts in
/// prefill): four 40-row "experts" stacked in one matrix, groups of 9, 70 and 8 tokens in an order
/// unlike the experts', each token's outputs within 2⁻⁷ of Σ|w·x| of the float64 product with
/// its own expert (the tensor-core bound above); the output row no group owns stays unwritten;
/// and the grouped kernel really ran (the f32 fallback, one product per group, differs).
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn grouped_products_match_each_group_alone() {
    let gpu = Gpu::open(0).expect("a CUDA device");
    let seed = seed();
    let (experts, rows, cols) = (4usize, 40usize, 1024usize);
    let groups = [(2 * rows, 0usize, 9usize), (0, 9, 70), (3 * rows, 79, 8)];
    let tokens = 88; // one more activation row than the groups cover
    for (k, ty) in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4_K]
        .into_iter()
        .enumerate()
    {
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let wf = values(seed ^ (k as u64 + 101), experts * rows * cols);
        let mut data = vec![0u8; experts * rows * rb];
        let q = reference_quantize_fn(ty).unwrap();
        for (src, dst) in wf.chunks(cols).zip(data.chunks_mut(rb)) {
            q(src, dst);
        }
        let mut deq = vec![0f32; experts * rows * cols];
        let dq = dequantize_fn(ty).unwrap();
        for (src, dst) in data.chunks(rb).zip(deq.chunks_mut(cols)) {
            dq(src, dst);
        }
        let m = Matrix {
            ty,
            data: &data,
            rows: experts * rows,
            cols,
            packed: None,
            device: None,
        };
        let dm = gpu.upload(&m).unwrap();
        let x = values(seed.rotate_left(3) ^ k as u64, tokens * cols);
        let dx = gpu.to_device(&x).unwrap();
        let grouped = |tensor_cores: bool| {
            gpu.set_normal_precision(tensor_cores);
            let mut dy = gpu.to_device(&vec![f32::NAN; tokens * rows]).unwrap();
            gpu.matmul_grouped(
                &dm,
                rows,
                &groups,
                &dx.slice(..),
                &mut dy.slice_mut(..),
                Epilogue::Store,
            )
            .unwrap();
            gpu.to_host(&dy).unwrap()
        };
        let y = grouped(true);
        for &(w_row, row, count) in &groups {
            for j in row..row + count {
                for r in 0..rows {
                    let (want, mag) = dot_and_magnitude(
                        &deq[(w_row + r) * cols..(w_row + r + 1) * cols],
                        &x[j * cols..(j + 1) * cols],
                    );
                    let got = y[j * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= mag / 128.0 + 1e-6,
                        "{ty} token {j} row {r}: {got} vs {want}"
                    );
                }
            }
        }
        let owned = 87 * rows;
        assert!(
            y[owned..].iter().all(|v| v.is_nan()),
            "{ty}: a row no group owns was written"
        );
        let f32_path = grouped(false);
        assert!(
            y[..owned].iter().zip(&f32_path).any(|(a, b)| a != b),
            "{ty}: the grouped tensor-core kernel did not run"
        );
    }
}

#[test]
fn opening_a_gpu_succeeds_or_says_why_in_one_line() {
    match Gpu::open(0) {
        Ok(g) => eprintln!("found {} (sm_{}{})", g.name, g.arch.0, g.arch.1),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("no GPU: {msg}");
            assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
        }
    }
}

/// Every layer and the output head on the GPU.
const ALL_ON_GPU: PlacementArgs = PlacementArgs {
    n_gpu_layers: Some(999),
    n_cpu_moe: 0,
    gpu_mem: None,
    sequences: 1,
    experts_in_ram: None,
    staging_buffers: None,
    expert_cache: None,
    exact: false,
};

/// The weights `args` place on device 0 (planned for a 64-token context, with what the
/// family's executor allocates).
fn placed(gg: &Model, args: &PlacementArgs) -> DeviceWeights {
    let needs = model::executor_needs(gg).unwrap();
    let plan = Plan::for_executor(gg, args, 0, 64, needs).unwrap();
    assert!(plan.uses_gpu());
    DeviceWeights::new(
        Gpu::open(0).unwrap(),
        plan,
        gg.tensors().map(|t| t.name.clone()),
    )
}

fn opts(dev: &DeviceWeights, repack: bool) -> LoadOptions<'_> {
    LoadOptions {
        repack,
        device: Some(dev),
        ..Default::default()
    }
}

/// The model on `dev` (as [`opts`]) with these pass options.
fn load_with_pass<'g>(
    gg: &'g Model,
    dev: &'g DeviceWeights,
    repack: bool,
    pass: PassOptions,
) -> Box<dyn ggrun::model::Forward + 'g> {
    model::load_with(
        gg,
        LoadOptions {
            pass,
            ..opts(dev, repack)
        },
    )
    .unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn whole_and_split_models_on_the_gpu_match_the_float64_reference() {
    let cpu = Cpu::new(4, Precision::Exact).unwrap();
    let mut failures = Vec::new();
    for name in [
        "nemo-tiny-q8_0",
        "nemo-tiny-q4_0",
        "nemo-tiny-q4_k_m",
        "nemo-tiny-q3_k_m",
        "nemo-dense-tiny-q4_k_m",
    ] {
        let g = golden(name);
        let gg = Model::open(&g.model).unwrap();
        let steps = g.generated.len();
        let forced = Some(g.generated.as_slice());
        let reference = g.reference.as_ref().unwrap();
        let split = PlacementArgs {
            n_gpu_layers: Some(999),
            n_cpu_moe: 2,
            gpu_mem: None,
            sequences: 1,
            ..ALL_ON_GPU
        };
        let all_in_ram = PlacementArgs {
            n_gpu_layers: Some(999),
            n_cpu_moe: 999,
            gpu_mem: None,
            sequences: 1,
            ..ALL_ON_GPU
        };
        let some_layers = PlacementArgs {
            n_gpu_layers: Some(3),
            ..Default::default()
        };
        // (what, placement, prefill prefetch forced on)
        for (what, args, prefetch) in [
            ("all on the GPU (device-resident)", ALL_ON_GPU, false),
            (
                "experts of layers 0-1 in RAM (device-resident, CPU experts)",
                split,
                false,
            ),
            // The first MoE layer of the prompt runs its experts on the CPU, the second copies
            // them to the GPU, the rest go by the measured costs: both paths run.
            (
                "all routed experts in RAM (CPU or copied in)",
                all_in_ram.clone(),
                false,
            ),
            // Every RAM layer of the prompt copied whole on the copy stream, two buffers in
            // turn, while the GPU computes the layers before it.
            (
                "all routed experts in RAM, prefetched whole (--prefetch on)",
                all_in_ram.clone(),
                true,
            ),
            // Decode computes cached experts on the GPU; ten slots of sixteen experts per
            // layer, so the copies evict (the Q8_0 file's experts are 87,040 bytes).
            (
                "all routed experts in RAM, a hot-expert cache of 10 per layer",
                PlacementArgs {
                    expert_cache: Some(3 * 10 * 87_040),
                    ..all_in_ram.clone()
                },
                false,
            ),
            // The same with prefill prefetching whole layers: after the decode steps filled the
            // caches, a second prompt copies only the uncached experts.
            (
                "all routed experts in RAM, prefetched, a hot-expert cache of 10 per layer",
                PlacementArgs {
                    expert_cache: Some(3 * 10 * 87_040),
                    ..all_in_ram.clone()
                },
                true,
            ),
            // No staging buffer: the CPU computes every RAM expert, and decode steps, which
            // wait for it, must not run as CUDA graphs (they once did, replaying stale ids).
            (
                "all routed experts in RAM, no staging (CPU experts only)",
                PlacementArgs {
                    staging_buffers: Some(0),
                    ..all_in_ram
                },
                false,
            ),
            (
                "last 3 layers on the GPU (products cross PCIe)",
                some_layers,
                false,
            ),
        ] {
            let dev = placed(&gg, &args);
            let pass = PassOptions {
                prefetch: if prefetch {
                    Prefetch::On
                } else {
                    Prefetch::Auto
                },
                ..Default::default()
            };
            let m = load_with_pass(&gg, &dev, true, pass);
            let (mut rows, _) = run(m.as_ref(), &cpu, &g.prompt_tokens, steps, forced);
            if prefetch && args.expert_cache.is_some() {
                // The prompt again, now that the caches hold experts: its rows replace the first
                // run's, against the same reference.
                let mut st = m
                    .new_state(64, ggrun::backend::state::KvTypes::F32)
                    .unwrap();
                let again = m.forward(&cpu, &mut st, &g.prompt_tokens, true).unwrap();
                rows[..again.len()].copy_from_slice(&again);
            }
            let report = m.offload_report().unwrap_or_default();
            eprintln!("{name} {what}: {report}");
            if prefetch {
                assert!(
                    !report.contains("(0 of them prefetched"),
                    "{name}: nothing was prefetched: {report}"
                );
            }
            assert!(dev.uploaded_bytes() > 0, "{name}: nothing was uploaded");
            if args.expert_cache.is_some() && name == "nemo-tiny-q8_0" {
                assert!(
                    report.contains("expert cache: 10 experts in each of 3 RAM layers")
                        && !report.contains(" 0.0% of"),
                    "{name}: the cache did not serve: {report}"
                );
            }
            let (errs, top1) = compare(&rows, reference, g.n_vocab);
            let worst = errs.iter().cloned().fold(0.0, f64::max);
            eprintln!(
                "{name} {what}: vs the float64 reference worst row {worst:.2e} median {:.2e} top1 {top1:.3}",
                median(&errs)
            );
            if worst > 1e-3 || top1 < 1.0 {
                failures.push(format!("{name} {what}: worst {worst:.2e} top1 {top1}"));
            }
        }
    }
    assert!(failures.is_empty(), "outside the bounds: {failures:?}");
}

/// Normal precision on the device: prompts run on the tensor cores (bf16 operands), decode in
/// f32. That is closer to the exact math than llama.cpp's rounded activations, so the bound is
/// llama.cpp's own distance from the float64 reference: our median row rel-RMS against the
/// reference is at most llama.cpp's (measured here from the golden files), top-1 against the
/// reference ≥ 0.9. (The README's normal-mode bound against llama.cpp's logits needs its exact
/// roundings, which float activations do not reproduce: the README says so.)
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn normal_precision_on_the_tensor_cores_meets_the_normal_mode_bound() {
    let cpu = Cpu::new(4, Precision::Normal).unwrap();
    for name in [
        "nemo-dense-tiny-q4_k_m",
        "nemo-tiny-q4_k_m",
        "nemo-tiny-q8_0",
    ] {
        let g = golden(name);
        assert!(
            g.prompt_tokens.len() >= 8,
            "the prompt must reach the tensor-core kernel"
        );
        let gg = Model::open(&g.model).unwrap();
        let dev = placed(&gg, &ALL_ON_GPU);
        let m = model::load_with(&gg, opts(&dev, false)).unwrap();
        let forced = Some(g.generated.as_slice());
        let (rows, _) = run(
            m.as_ref(),
            &cpu,
            &g.prompt_tokens,
            g.generated.len(),
            forced,
        );
        let reference = g.reference.as_ref().unwrap();
        let (errs, top1) = compare(&rows, reference, g.n_vocab);
        let med = median(&errs);
        let (theirs, _) = compare(&g.logits, reference, g.n_vocab);
        let bound = median(&theirs);
        eprintln!(
            "{name} normal precision on the GPU vs the float64 reference: median {med:.4} (llama.cpp {bound:.4}) top1 {top1:.3}"
        );
        assert!(
            med <= bound && top1 >= 0.9,
            "{name}: median {med} top1 {top1}"
        );
    }
}

/// The device-resident pass keeps the state on the GPU: feeding a prompt in chunks (1 and 3
/// tokens run the routed experts with device-side ids, 7 and the whole prompt group tokens per
/// expert) gives the one-batch logits within 1e-4 rel-RMS (other kernels sum in other orders;
/// exact mode), and a state saved to bytes and restored into a fresh device state continues
/// bit-identically.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn device_state_chunks_and_restores() {
    let cpu = Cpu::new(4, Precision::Exact).unwrap();
    for name in ["nemo-tiny-q4_k_m", "nemo-dense-tiny-q4_k_m"] {
        let g = golden(name);
        let gg = Model::open(&g.model).unwrap();
        let dev = placed(&gg, &ALL_ON_GPU);
        let m = model::load_with(&gg, opts(&dev, false)).unwrap();
        let st = m.new_state(8, cpu.kv).unwrap();
        assert!(
            st.layers.iter().any(|l| matches!(l, LayerState::Device(_))),
            "{name}: the state is not on the device"
        );
        common::check_chunks_and_restore(m.as_ref(), &cpu, &g.prompt_tokens, 1e-4, name);
        eprintln!("{name}: device state chunks and restores");
    }
}

/// RMSNorm of one row in float64: x · w / sqrt(mean(x²) + eps).
fn rms_norm_f64(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &w)| v as f64 * inv * w as f64)
        .collect()
}

/// The decoder's fused glue: the residual add with the next norm (bit for bit what the add and
/// the norm launched apart give, and within 1e-5 · (1 + |ref|) of float64), and the per-head
/// q/k norms with RoPE in one launch (within 1e-5 · (1 + |ref|) of a float64 norm and rotation
/// by the same (cos, sin) table), for head dims 64, 128 and 256, full and partial rotation,
/// both pairings, with and without norm weights. Outputs are poisoned (NaN) first.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn fused_decoder_glue_matches_the_host() {
    use ggrun::backend::attention::AttnShape;
    let gpu = Gpu::open(0).expect("a CUDA device");
    let seed = seed();
    let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs());
    for (n, rows) in [(2048usize, 1usize), (2880, 3), (96, 5)] {
        let sd = seed ^ (n * 10 + rows) as u64;
        let (x0, y, w) = (
            values(sd, rows * n),
            values(sd ^ 1, rows * n),
            values(sd ^ 2, n),
        );
        let eps = 1e-6f32;
        let (wd, yd) = (gpu.to_device(&w).unwrap(), gpu.to_device(&y).unwrap());
        let mut xd = gpu.to_device(&x0).unwrap();
        let mut hd = gpu.to_device(&vec![f32::NAN; rows * n]).unwrap();
        gpu.add_rms_norm(&mut xd, &yd, &wd, &mut hd, eps).unwrap();
        let (x1, h) = (gpu.to_host(&xd).unwrap(), gpu.to_host(&hd).unwrap());
        // The same by two launches.
        let mut xs = gpu.to_device(&x0).unwrap();
        gpu.add(&mut xs, &yd, rows * n).unwrap();
        let mut hs = gpu.to_device(&vec![f32::NAN; rows * n]).unwrap();
        gpu.rms_norm(&xs.slice(..), &wd, &mut hs.slice_mut(..), rows, eps)
            .unwrap();
        assert_eq!(x1, gpu.to_host(&xs).unwrap(), "add_rms_norm's sum, n {n}");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&h),
            bits(&gpu.to_host(&hs).unwrap()),
            "add_rms_norm, n {n}"
        );
        for r in 0..rows {
            let sum: Vec<f32> = (0..n).map(|i| x0[r * n + i] + y[r * n + i]).collect();
            assert_eq!(
                &x1[r * n..(r + 1) * n],
                &sum[..],
                "add_rms_norm's sum, row {r}"
            );
            let want = rms_norm_f64(&sum, &w, eps);
            for (i, (&g, &wv)) in h[r * n..(r + 1) * n].iter().zip(&want).enumerate() {
                assert!(
                    close(g, wv),
                    "add_rms_norm n {n} row {r} [{i}]: {g} vs {wv}"
                );
            }
        }
    }
    let cases = [
        (128usize, 128usize, true, true, 4usize, 2usize, 3usize),
        (128, 64, false, true, 8, 8, 1),
        (64, 64, true, false, 6, 2, 5),
        (256, 256, false, false, 4, 1, 2),
        (256, 128, true, true, 8, 4, 33),
    ];
    for (ci, &(hd, n_rot, neox, normed, nh, nkv, t)) in cases.iter().enumerate() {
        let sd = seed ^ (1000 + ci) as u64;
        let q0 = values(sd, t * nh * hd);
        let k0 = values(sd ^ 1, t * nkv * hd);
        let (qw, kw) = (values(sd ^ 2, hd), values(sd ^ 3, hd));
        let half = n_rot / 2;
        let cs: Vec<f32> = values(sd ^ 4, t * half)
            .iter()
            .flat_map(|&v| {
                let th = 40.0 * v;
                [th.cos(), th.sin()]
            })
            .collect();
        let eps = 1e-6f32;
        let shape = AttnShape {
            n_head: nh,
            n_head_kv: nkv,
            head_dim: hd,
            scale: 1.0,
            window: None,
        };
        let mut qd = gpu.to_device(&q0).unwrap();
        let mut kd = gpu.to_device(&k0).unwrap();
        let (qwd, kwd) = (gpu.to_device(&qw).unwrap(), gpu.to_device(&kw).unwrap());
        let csd = gpu.to_device(&cs).unwrap();
        let norms = match normed {
            true => (Some(&qwd), Some(&kwd)),
            false => (None, None),
        };
        gpu.qk_norm_rope(&mut qd, &mut kd, norms, &csd, &shape, t, (n_rot, neox), eps)
            .unwrap();
        let (q, k) = (gpu.to_host(&qd).unwrap(), gpu.to_host(&kd).unwrap());
        for (got, x0, w, heads, what) in [(&q, &q0, &qw, nh, "q"), (&k, &k0, &kw, nkv, "k")] {
            for r in 0..t {
                for h in 0..heads {
                    let at = (r * heads + h) * hd;
                    let head = &x0[at..at + hd];
                    let mut v: Vec<f64> = match normed {
                        true => rms_norm_f64(head, w, eps),
                        false => head.iter().map(|&v| v as f64).collect(),
                    };
                    for p in 0..half {
                        let (c, s) = (
                            cs[(r * half + p) * 2] as f64,
                            cs[(r * half + p) * 2 + 1] as f64,
                        );
                        let (ia, ib) = if neox {
                            (p, p + half)
                        } else {
                            (2 * p, 2 * p + 1)
                        };
                        let (a, b) = (v[ia], v[ib]);
                        v[ia] = a * c - b * s;
                        v[ib] = a * s + b * c;
                    }
                    for (i, want) in v.iter().enumerate() {
                        let g = got[at + i];
                        assert!(
                            close(g, *want),
                            "qk_norm_rope case {ci} {what} row {r} head {h} [{i}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn mamba_conv_and_scan_on_the_device_match_the_cpu() {
    use ggrun::backend::ssm::{self, SsmShape};
    use ggrun::model::LayerState;
    let gpu = Gpu::open(0).expect("a CUDA device");
    let seed = seed();
    // Nemotron 3 Nano's head geometry at fewer heads, and a smaller state size.
    for (k, (d_state, n_head, n_group)) in [(128usize, 8usize, 2usize), (64, 6, 3)]
        .into_iter()
        .enumerate()
    {
        let s = SsmShape {
            d_conv: 4,
            d_inner: 64 * n_head,
            d_state,
            n_head,
            n_group,
        };
        let ch = s.conv_channels();
        for t in [1usize, 37] {
            let sd = seed ^ (k * 100 + t) as u64;
            let x = values(sd, t * ch);
            let w = values(sd ^ 1, ch * s.d_conv);
            let bias = values(sd ^ 2, ch);
            let conv0 = values(sd ^ 3, (s.d_conv - 1) * ch);
            let ssm0: Vec<f32> = values(sd ^ 4, n_head * 64 * d_state)
                .iter()
                .map(|v| 0.1 * v)
                .collect();
            let dt: Vec<f32> = values(sd ^ 5, t * n_head)
                .iter()
                .map(|v| 0.05 + 0.1 * v.abs())
                .collect();
            let a: Vec<f32> = values(sd ^ 6, n_head)
                .iter()
                .map(|v| -1.0 - v.abs())
                .collect();
            let d = values(sd ^ 7, n_head);
            // CPU reference.
            let mut st = LayerState::Mamba {
                conv: conv0.clone(),
                ssm: ssm0.clone(),
            };
            let xbc = ssm::conv(&mut st, &s, &x, t, &w, Some(&bias)).unwrap();
            let y = ssm::scan(&mut st, &s, &xbc, &dt, t, &a, &d).unwrap();
            let LayerState::Mamba {
                conv: conv1,
                ssm: ssm1,
            } = st
            else {
                unreachable!()
            };
            // Device.
            let dx = gpu.to_device(&x).unwrap();
            let mut dconv = gpu.to_device(&conv0).unwrap();
            let dw = gpu.to_device(&w).unwrap();
            let db = gpu.to_device(&bias).unwrap();
            let mut dxbc = gpu.to_device(&vec![f32::NAN; t * ch]).unwrap();
            let (x_view, mut xbc_view) = (dx.slice(..), dxbc.slice_mut(..));
            gpu.mamba_conv(
                &x_view,
                &mut dconv,
                &dw,
                Some(&db),
                &mut xbc_view,
                t,
                ch,
                s.d_conv,
            )
            .unwrap();
            let mut dssm = gpu.to_device(&ssm0).unwrap();
            let mut dy = gpu.to_device(&vec![f32::NAN; t * s.d_inner]).unwrap();
            let (ddt, da, dd) = (
                gpu.to_device(&dt).unwrap(),
                gpu.to_device(&a).unwrap(),
                gpu.to_device(&d).unwrap(),
            );
            let (xbc_view, dt_view, mut y_view) = (dxbc.slice(..), ddt.slice(..), dy.slice_mut(..));
            gpu.mamba_scan(&s, &xbc_view, &dt_view, &da, &dd, &mut dssm, &mut y_view, t)
                .unwrap();
            let close = |what: &str, got: &[f32], want: &[f32]| {
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{what} d_state={d_state} t={t} [{i}]: {g} vs {w}"
                    );
                }
            };
            close("conv out", &gpu.to_host(&dxbc).unwrap(), &xbc);
            close("conv state", &gpu.to_host(&dconv).unwrap(), &conv1);
            close("y", &gpu.to_host(&dy).unwrap(), &y);
            close("ssm state", &gpu.to_host(&dssm).unwrap(), &ssm1);
        }
    }
}

/// `tune` on the device, on a fixture: with the free memory as the budget everything fits and
/// only all-on-the-GPU plans are measured; with a budget just above the smallest plan (every
/// expert layer in RAM, one staging buffer) plus one expert layer, the spill plans are
/// measured, no measured plan holds more VRAM than the budget, the winner keeps expert layers
/// in RAM, and it is saved as this GPU's profile of the model.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn tune_on_the_device_picks_a_plan_within_the_budget() {
    use ggrun::backend::placement::PlacementArgs;
    use ggrun::engine::load::plan_for_budget;
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("GGRUN_CACHE_DIR", cache.path());
    let model = common::fixtures().join("nemo-tiny-q8_0.gguf");
    let g = Model::open(&model).unwrap();
    let tune = |gpu_mem: Option<u64>| {
        let args = ggrun::tune::Options {
            model: model.clone(),
            gpu_mem,
            ctx_size: 64,
            time: std::time::Duration::from_secs(120),
            calib: None,
            n_prompt: 48,
            n_gen: 4,
            json: true,
            no_save: false,
        };
        let mut out = Vec::new();
        ggrun::tune::run(args, &mut out).unwrap();
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()
    };
    let v = tune(None);
    let plans = v["plans"].as_array().unwrap();
    assert!(!plans.is_empty());
    assert!(
        plans
            .iter()
            .all(|p| p["plan"].as_str().unwrap().starts_with("all on the GPU")),
        "{v}"
    );
    let smallest = plan_for_budget(
        &g,
        &PlacementArgs {
            n_gpu_layers: Some(999),
            n_cpu_moe: usize::MAX,
            staging_buffers: Some(1),
            ..Default::default()
        },
        64,
    )
    .unwrap();
    let layer = smallest.staging_bytes;
    assert!(
        layer > 0,
        "the fixture's experts spill into a staging buffer"
    );
    let budget = smallest.gpu_weight_bytes
        + smallest.reserved_bytes
        + smallest.state_bytes
        + smallest.staging_bytes
        + layer;
    let v = tune(Some(budget));
    let plans = v["plans"].as_array().unwrap();
    let measured: Vec<_> = plans.iter().filter(|p| p["error"].is_null()).collect();
    assert!(!measured.is_empty(), "{v}");
    for p in &measured {
        assert!(p["vram_used"].as_u64().unwrap() <= budget, "{p}");
        assert!(p["pp_tok_s"].as_f64().unwrap() > 0.0 && p["tg_tok_s"].as_f64().unwrap() > 0.0);
    }
    let winner = plans.iter().find(|p| p["plan"] == v["winner"]).unwrap();
    let ram: Vec<usize> = serde_json::from_value(winner["experts_in_ram"].clone()).unwrap();
    assert!(!ram.is_empty(), "{winner}");
    let (p, path) = ggrun::profile::find(&model)
        .unwrap()
        .expect("a saved profile");
    assert_eq!(p.device, Gpu::open(0).unwrap().name);
    assert_eq!(p.experts_in_ram.as_deref(), Some(ram.as_slice()));
    assert_eq!(v["profile"].as_str().unwrap(), path.display().to_string());
    eprintln!("tune at {budget} bytes: {v}");
}

/// Decode steps replayed as CUDA graphs (on unless the pass options say off) compute what the
/// same steps launched one by one do, bit for bit (the same kernels at the same addresses), in
/// both precisions, over a prompt and twelve greedy steps, for Nemotron-H and for the decoder
/// families (gemma3's two RoPEs, gpt-oss's sinks and biases, qwen3moe's routing), and for three
/// sequences decoding in one pass (one graph for the three); with graphs on, the steps after
/// the second really ran as graphs; cleared states (the same buffers) replay their graph from
/// their start again.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn decode_steps_as_cuda_graphs_match_launches_bit_for_bit() {
    use ggrun::synth::decoder::{write_tiny, TinyMix};
    let dir = std::env::temp_dir().join("ggrun-gpu-graphs");
    std::fs::create_dir_all(&dir).unwrap();
    let nemo = golden("nemo-tiny-q8_0").model;
    let mut files = vec![(nemo.clone(), 1), (nemo, 3)];
    for (arch, mix) in [
        ("qwen3moe", TinyMix::Q8_0),
        ("gemma3", TinyMix::Q8_0),
        ("gpt-oss", TinyMix::Mxfp4),
    ] {
        let path = dir.join(format!("{arch}.gguf"));
        write_tiny(arch, mix, 3, false, &path).unwrap();
        files.push((path.clone(), 1));
        files.push((path, 3));
    }
    let prompts: [Vec<u32>; 3] = [
        (0..11).map(|i| 40 + (i * 7) % 200).collect(),
        (0..5).map(|i| 90 + i * 3).collect(),
        vec![7, 8, 9],
    ];
    for (path, n_seqs) in &files {
        let gg = Model::open(path).unwrap();
        let steps = |graphs: bool, precision: Precision| {
            let dev = placed(&gg, &ALL_ON_GPU);
            let pass = PassOptions {
                cuda_graphs: graphs,
                ..Default::default()
            };
            let m = load_with_pass(&gg, &dev, false, pass);
            let cpu = Cpu::new(4, precision).unwrap();
            let mut states: Vec<_> = (0..*n_seqs)
                .map(|_| m.new_state(64, cpu.kv).unwrap())
                .collect();
            let mut rows = Vec::new();
            for round in 0..2 {
                let mut last = Vec::new();
                for (st, p) in states.iter_mut().zip(&prompts) {
                    st.clear().unwrap();
                    last.push(m.forward(&cpu, st, p, false).unwrap());
                }
                for _ in 0..12 {
                    let toks: Vec<[u32; 1]> = last
                        .iter()
                        .map(|l| [ggrun::sample::argmax(l) as u32])
                        .collect();
                    let runs: Vec<&[u32]> = toks.iter().map(|t| &t[..]).collect();
                    let mut refs: Vec<&mut _> = states.iter_mut().collect();
                    last = m.forward_seqs(&cpu, &mut refs, &runs).unwrap();
                    if round == 1 || !graphs {
                        rows.push(last.concat());
                    }
                }
            }
            let report = m.offload_report().unwrap_or_default();
            (rows, report)
        };
        let name = format!("{} ({n_seqs} sequences)", path.display());
        for precision in [Precision::Exact, Precision::Normal] {
            let (off, report_off) = steps(false, precision);
            let (on, report_on) = steps(true, precision);
            assert!(report_off.is_empty(), "{name}: {report_off}");
            assert!(
                report_on.contains("ran as CUDA graphs"),
                "{name}: graphs did not run: {report_on:?}"
            );
            // Graphs on: the second round's 12 steps; off: both rounds' (the same tokens).
            assert_eq!(off[12..], on[..], "{name} {precision:?}");
            eprintln!("{name} {precision:?}: {report_on}");
        }
    }
}

/// Nemotron-H's device-resident pass over several sequences at once (the products over all
/// their rows, Mamba scans and attention per sequence with its own state and position)
/// computes what each sequence does alone: decode steps and a prompt chunk beside them, all on
/// the GPU and with routed experts in RAM (bounds as in `check_batch_equals_alone`; with RAM
/// experts a batch may pick the other executor for a layer, so normal mode gets 0.03).
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn nemotron_h_sequences_in_one_device_pass_match_each_alone() {
    for name in ["nemo-tiny-q8_0", "nemo-tiny-q4_k_m"] {
        let gg = Model::open(&golden(name).model).unwrap();
        let split = PlacementArgs {
            n_cpu_moe: 2,
            sequences: 3,
            ..ALL_ON_GPU
        };
        let all = PlacementArgs {
            sequences: 3,
            ..ALL_ON_GPU
        };
        for (what, args, normal_tol) in [
            ("all on the GPU", all, 1e-3),
            ("experts of layers 0-1 in RAM", split, 0.03),
        ] {
            let dev = placed(&gg, &args);
            let m = model::load_with(&gg, opts(&dev, false)).unwrap();
            let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) = (
                (0..9).map(|i| 40 + i * 3).collect(),
                (0..17).map(|i| 90 + i * 5).collect(),
                vec![7, 8],
            );
            for next in [
                &[&[5u32][..], &[61], &[200]][..],
                &[&[5], &[61, 62, 63, 64, 65], &[200]],
            ] {
                common::check_batch_equals_alone(
                    m.as_ref(),
                    &[&a, &b, &c],
                    next,
                    &format!("{name} {what}"),
                    normal_tol,
                );
            }
            eprintln!("{name} {what}: 3 sequences in one pass match each alone");
        }
    }
}

/// The decoder architectures (qwen2, qwen3, qwen3moe, gemma3, gpt-oss with MXFP4 experts) on
/// the GPU — all weights (the device-resident pass), the routed experts of the first two layers
/// left in RAM (resident; the prompt's first RAM layer computed on the CPU, the second copied to
/// a staging buffer and computed on the GPU), the same with a hot-expert cache (decode splits
/// each RAM layer's experts between the cache and the CPU), and only the last two layers (each
/// product crossing PCIe) — compute what the CPU does: in exact mode every row within 1e-3 rel-RMS of
/// the CPU's exact rows and top-1 always equal, and the median row within 1e-5; in normal
/// precision (tensor cores, int8 decode) the median row within 0.03 and top-1 on 90% of rows,
/// the fixtures' normal-mode bounds. Resident placements keep their state on the device; three
/// sequences in one pass compute what each does alone, and a prompt in chunks and a restored
/// state what one batch does.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test.sh on the device machine"]
fn decoder_models_on_the_gpu_match_the_cpu() {
    use ggrun::synth::decoder::{write_tiny, TinyMix};
    let dir = std::env::temp_dir().join("ggrun-gpu-decoders");
    std::fs::create_dir_all(&dir).unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| 40 + (i * 7) % 200).collect();
    for (arch, mix) in [
        ("qwen2", TinyMix::Q8_0),
        ("qwen3", TinyMix::Q4_0),
        ("qwen3moe", TinyMix::Q8_0),
        ("gemma3", TinyMix::Q8_0),
        ("gpt-oss", TinyMix::Mxfp4),
    ] {
        let path = dir.join(format!("{arch}.gguf"));
        write_tiny(arch, mix, 1, false, &path).unwrap();
        let gg = Model::open(&path).unwrap();
        let splits = [
            ("all on the GPU", ALL_ON_GPU, true),
            (
                "experts of layers 0-1 in RAM",
                PlacementArgs {
                    n_cpu_moe: 2,
                    ..ALL_ON_GPU
                },
                true,
            ),
            (
                "the last two layers on the GPU",
                PlacementArgs {
                    n_gpu_layers: Some(2),
                    ..Default::default()
                },
                false,
            ),
            (
                "experts of layers 0-1 in RAM, a hot-expert cache",
                PlacementArgs {
                    n_cpu_moe: 2,
                    expert_cache: Some(1 << 30),
                    ..ALL_ON_GPU
                },
                true,
            ),
        ];
        for precision in [Precision::Exact, Precision::Normal] {
            let cpu = Cpu::new(4, precision).unwrap();
            let on_cpu = model::load(&gg).unwrap();
            let (want, forced) = run(on_cpu.as_ref(), &cpu, &prompt, 12, None);
            for (what, args, resident) in &splits {
                let dev = placed(&gg, args);
                let m = model::load_with(&gg, opts(&dev, false)).unwrap();
                let st = m.new_state(8, cpu.kv).unwrap();
                assert_eq!(
                    matches!(st.layers[0], LayerState::Device(_)),
                    *resident,
                    "{arch} {what}: the state is where the pass runs"
                );
                let (rows, _) = run(m.as_ref(), &cpu, &prompt, 12, Some(&forced));
                if arch == "qwen3moe" || arch == "gpt-oss" {
                    // The prompt's first RAM layer runs on the CPU (its cost measured), the
                    // second is copied to the staging buffer (copying not yet measured).
                    let report = m.offload_report().unwrap_or_default();
                    let staged = "1 layer-batches copied to the GPU (0 of them prefetched whole), 1 computed on the CPU";
                    assert_eq!(
                        report.contains(staged),
                        args.n_cpu_moe > 0,
                        "{arch} {what}: {report}"
                    );
                    // Decode computes cached experts on the GPU (the cache holds every expert
                    // of a RAM layer here; copies start once the CPU's cost is measured).
                    if args.expert_cache.is_some() {
                        assert!(
                            report.contains("expert cache") && !report.contains(" 0.0% of"),
                            "{arch} {what}: the cache did not serve: {report}"
                        );
                    }
                }
                let (errs, top1) = compare(&rows, &want, m.n_vocab());
                let (med, max) = (median(&errs), errs.iter().copied().fold(0.0, f64::max));
                eprintln!(
                    "{arch} {precision:?} {what}: median {med:.2e} max {max:.2e} top1 {top1:.3}"
                );
                if precision == Precision::Exact {
                    assert!(max <= 1e-3 && med <= 1e-5 && top1 == 1.0, "{arch} {what}");
                } else {
                    assert!(med <= 0.03 && top1 >= 0.9, "{arch} {what}");
                }
                if *resident && precision == Precision::Exact {
                    let name = format!("{arch} {what}");
                    common::check_chunks_and_restore(m.as_ref(), &cpu, &prompt, 1e-4, &name);
                }
            }
        }
        if arch == "qwen3moe" || arch == "gpt-oss" {
            // Prefill prefetching the RAM layers (copy stream, two buffers) computes what the
            // CPU does, in exact mode within the bounds above.
            let cpu = Cpu::new(4, Precision::Exact).unwrap();
            let (want, forced) = run(model::load(&gg).unwrap().as_ref(), &cpu, &prompt, 12, None);
            let dev = placed(&gg, &splits[1].1);
            let pass = PassOptions {
                prefetch: Prefetch::On,
                ..Default::default()
            };
            let m = load_with_pass(&gg, &dev, false, pass);
            let (rows, _) = run(m.as_ref(), &cpu, &prompt, 12, Some(&forced));
            let report = m.offload_report().unwrap_or_default();
            assert!(
                report.contains("(2 of them prefetched whole)"),
                "{arch}: prefill did not prefetch: {report}"
            );
            let (errs, top1) = compare(&rows, &want, m.n_vocab());
            let (med, max) = (median(&errs), errs.iter().copied().fold(0.0, f64::max));
            eprintln!("{arch} prefetched: median {med:.2e} max {max:.2e} top1 {top1:.3}");
            assert!(
                max <= 1e-3 && med <= 1e-5 && top1 == 1.0,
                "{arch} prefetched"
            );
        }
        for (what, args, _) in &splits[..2] {
            let dev = placed(&gg, args);
            let m = model::load_with(&gg, opts(&dev, false)).unwrap();
            let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) = (
                (0..9).map(|i| 40 + i * 3).collect(),
                (0..17).map(|i| 90 + i * 5).collect(),
                vec![7, 8],
            );
            // With RAM experts, a batch may compute a RAM layer on the other executor than
            // each sequence alone did (the measured CPU-or-copy choice): in normal mode that
            // is the executors' difference, bounded as above.
            let normal_tol = if args.n_cpu_moe > 0 { 0.03 } else { 1e-3 };
            common::check_batch_equals_alone(
                m.as_ref(),
                &[&a, &b, &c],
                &[&[5], &[61, 62, 63], &[200]],
                &format!("{arch} {what}"),
                normal_tol,
            );
        }
    }
}
