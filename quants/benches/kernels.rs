//! Dequantize and dot throughput per weight type and instruction-set tier, in bytes of weight
//! data per second. Each iteration walks 128 rows of 4096 elements (256 rows of 2688 for types
//! whose blocks divide 2688 but not 4096), so the weights stay in L2 and the kernel is what is
//! measured, not DRAM.
//!
//!     cargo bench -p ggrun-quants --bench kernels [-- FILTER]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ggrun_quants::{kernels_for, packed, reference_quantize_fn, GgmlType, Isa, Kernels};
use std::hint::black_box;

const TYPES: [GgmlType; 20] = [
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4_1,
    GgmlType::Q5_1,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::MXFP4,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

fn data(n: usize) -> Vec<f32> {
    // Deterministic pseudo-random values in [-1, 1).
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `count` distinct activation rows of `n` values in `k`'s activation format.
fn act_rows(k: &Kernels, n: usize, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut a = vec![0u8; k.act_ty.row_bytes(n as u64).unwrap() as usize];
            (k.quantize_act)(&data(n + i)[i..], &mut a);
            a
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rows = 128;
    let n = 4096;
    for ty in TYPES {
        let row_bytes = ty.row_bytes(n as u64).unwrap() as usize;
        let x = data(rows * n);
        let mut w = vec![0u8; rows * row_bytes];
        match reference_quantize_fn(ty) {
            Some(q) => {
                for (xr, wr) in x.chunks(n).zip(w.chunks_mut(row_bytes)) {
                    q(xr, wr);
                }
            }
            None => {
                // The grid i-quants without a quantizer: any bytes are valid blocks of them
                // (every index field is in range) once each block's f16 scale is finite.
                for (i, b) in w.iter_mut().enumerate() {
                    *b = (x[i % x.len()].to_bits() >> 7) as u8;
                }
                for blk in w.chunks_mut(ty.type_size()) {
                    blk[..2].copy_from_slice(&0x2c00u16.to_le_bytes());
                }
            }
        }
        let act = data(n);
        let mut g = c.benchmark_group(ty.name());
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.sample_size(20);
        g.warm_up_time(std::time::Duration::from_millis(300));
        g.measurement_time(std::time::Duration::from_millis(800));
        for isa in Isa::available() {
            let k = kernels_for(ty, isa).unwrap();
            let mut a = vec![0u8; k.act_ty.row_bytes(n as u64).unwrap() as usize];
            (k.quantize_act)(&act, &mut a);
            g.bench_function(BenchmarkId::new("dot", isa.name()), |b| {
                b.iter(|| {
                    let mut s = 0.0f32;
                    for wr in w.chunks(row_bytes) {
                        s += (k.dot)(black_box(wr), black_box(&a));
                    }
                    s
                })
            });
            if let Some(tile) = k.tile {
                // Four tokens per pass; reported per token (weight bytes x 4 / time) so that it
                // compares with "dot".
                let acts = act_rows(&k, n, 4);
                g.throughput(Throughput::Bytes(4 * w.len() as u64));
                g.bench_function(BenchmarkId::new("tile4x4", isa.name()), |b| {
                    b.iter(|| {
                        let mut out = [[0f32; 4]; 4];
                        for four in w.chunks(4 * row_bytes) {
                            let r: Vec<&[u8]> = four.chunks(row_bytes).collect();
                            tile(
                                black_box([r[0], r[1], r[2], r[3]]),
                                [&acts[0], &acts[1], &acts[2], &acts[3]],
                                &mut out,
                            );
                        }
                        out[0][0]
                    })
                });
                g.throughput(Throughput::Bytes(w.len() as u64));
            }
            if let Some(rows4) = k.rows4 {
                g.bench_function(BenchmarkId::new("rows4", isa.name()), |b| {
                    b.iter(|| {
                        let mut out = [0f32; 4];
                        for four in w.chunks(4 * row_bytes) {
                            let r: Vec<&[u8]> = four.chunks(row_bytes).collect();
                            rows4(black_box([r[0], r[1], r[2], r[3]]), &a, &mut out);
                        }
                        out[0]
                    })
                });
            }
            if let Some(dot4) = k.dot4 {
                // Four tokens per row (prefill without a wider kernel), per token.
                let acts = act_rows(&k, n, 4);
                g.throughput(Throughput::Bytes(4 * w.len() as u64));
                g.bench_function(BenchmarkId::new("dot4", isa.name()), |b| {
                    b.iter(|| {
                        let mut out = [0f32; 4];
                        for wr in w.chunks(row_bytes) {
                            dot4(
                                black_box(wr),
                                [&acts[0], &acts[1], &acts[2], &acts[3]],
                                &mut out,
                            );
                        }
                        out[0]
                    })
                });
                g.throughput(Throughput::Bytes(w.len() as u64));
            }
            if let Some(octet) = k.octet {
                // Eight rows × four tokens (a small prefill block) and × sixteen (prefill), on
                // the file's layout, per token.
                for nt in [4usize, 16] {
                    let acts = act_rows(&k, n, nt);
                    let a: Vec<&[u8]> = acts.iter().map(|v| v.as_slice()).collect();
                    g.throughput(Throughput::Bytes((nt * w.len()) as u64));
                    g.bench_function(BenchmarkId::new(format!("octet{nt}"), isa.name()), |b| {
                        b.iter(|| {
                            let mut out = vec![0f32; 8 * nt];
                            for rows8 in w.chunks(8 * row_bytes) {
                                let r: Vec<&[u8]> = rows8.chunks(row_bytes).collect();
                                octet(black_box(std::array::from_fn(|i| r[i])), &a, &mut out);
                            }
                            out[0]
                        })
                    });
                }
                g.throughput(Throughput::Bytes(w.len() as u64));
            }
            if let Some(kernel) = k.packed {
                // Packed eight-row groups: one token (decode), and sixteen tokens reported per
                // token like tile4x4.
                let gb = packed::group_bytes(ty, n).unwrap();
                let mut pw = vec![0u8; w.len()];
                for (rows8, o) in w.chunks(8 * row_bytes).zip(pw.chunks_mut(gb)) {
                    let r: Vec<&[u8]> = rows8.chunks(row_bytes).collect();
                    packed::pack(ty, std::array::from_fn(|i| r[i]), o);
                }
                let acts = act_rows(&k, n, 16);
                let sums: Vec<Vec<i32>> = acts
                    .iter()
                    .map(|a| {
                        let mut s = vec![0i32; n / 32];
                        packed::block_sums(a, &mut s);
                        s
                    })
                    .collect();
                let a: Vec<&[u8]> = acts.iter().map(|v| v.as_slice()).collect();
                let s: Vec<&[i32]> = sums.iter().map(|v| v.as_slice()).collect();
                for nt in [1, 16] {
                    g.throughput(Throughput::Bytes((nt * w.len()) as u64));
                    let name = format!("packed{nt}");
                    g.bench_function(BenchmarkId::new(name, isa.name()), |b| {
                        b.iter(|| {
                            let mut out = [0f32; 8 * 16];
                            for grp in pw.chunks(gb) {
                                kernel(black_box(grp), &a[..nt], &s[..nt], &mut out);
                            }
                            out[0]
                        })
                    });
                }
                g.throughput(Throughput::Bytes(w.len() as u64));
            }
            let mut out = vec![0f32; n];
            g.bench_function(BenchmarkId::new("dequantize", isa.name()), |b| {
                b.iter(|| {
                    for wr in w.chunks(row_bytes) {
                        (k.dequantize)(black_box(wr), &mut out);
                    }
                    out[0]
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
