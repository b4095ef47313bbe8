//! Single-row dot products streamed from DRAM, the way decode reads a weight matrix that has no
//! packed layout (K-quants, Q4_1, ...): `threads` threads each walk their share of the rows of a
//! matrix far larger than the caches, with and without the weight prefetch
//! (`isa::prefetch` `ahead` bytes on, as backend::cpu does), beside a plain read of the same
//! bytes. GB/s of weight bytes (10^9).
//!
//!     cargo run --release -p ggrun-quants --example stream -- TYPE [THREADS] [MIB] [AHEAD]

use ggrun_quants::{isa, kernels, reference_quantize_fn, GgmlType};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ty = match args.get(1).map(|s| s.to_ascii_uppercase()).as_deref() {
        Some("Q4_K") => GgmlType::Q4_K,
        Some("Q6_K") => GgmlType::Q6_K,
        Some("Q5_K") => GgmlType::Q5_K,
        Some("Q3_K") => GgmlType::Q3_K,
        Some("Q4_1") => GgmlType::Q4_1,
        Some("Q8_0") => GgmlType::Q8_0,
        _ => {
            eprintln!("usage: stream Q4_K|Q6_K|Q5_K|Q3_K|Q4_1|Q8_0 [THREADS] [MIB] [AHEAD]");
            std::process::exit(2);
        }
    };
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let mib: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(512);
    let ahead: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(8192);
    let k = kernels(ty).expect("kernels");
    let n = 4096;
    let rb = ty.row_bytes(n as u64).unwrap() as usize;
    let rows = (mib << 20) / rb;
    // A few distinct quantized rows, repeated (the bytes' values do not change the speed).
    let q = reference_quantize_fn(ty).unwrap();
    let mut distinct = vec![0u8; 16 * rb];
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for r in distinct.chunks_mut(rb) {
        let x: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        q(&x, r);
    }
    let w: Vec<u8> = distinct.iter().copied().cycle().take(rows * rb).collect();
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut act = vec![0u8; k.act_ty.row_bytes(n as u64).unwrap() as usize];
    (k.quantize_act)(&x, &mut act);
    let gb = w.len() as f64 / 1e9;
    let per = rows / threads;
    let run = |ahead: usize| -> f64 {
        let t0 = Instant::now();
        let total: f32 = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads)
                .map(|i| {
                    let (w, act) = (&w, &act);
                    sc.spawn(move || {
                        let mut sum = 0f32;
                        for r in i * per..(i + 1) * per {
                            let at = r * rb;
                            if ahead > 0 {
                                isa::prefetch(w, at + ahead, at + rb + ahead);
                            }
                            sum += (k.dot)(&w[at..at + rb], act);
                        }
                        sum
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        std::hint::black_box(total);
        gb / t0.elapsed().as_secs_f64()
    };
    let read = || -> f64 {
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = w
                .chunks(per * rb)
                .take(threads)
                .map(|c| sc.spawn(move || ggrun_quants::float::sum_bytes(c)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        gb / t0.elapsed().as_secs_f64()
    };
    println!(
        "{ty} {threads} threads {mib} MiB, {} ({}), ahead {ahead} B",
        isa::active().name(),
        isa::vendor()
    );
    for _ in 0..4 {
        println!(
            "read {:6.1}  dot {:6.1}  dot+prefetch {:6.1} GB/s",
            read(),
            run(0),
            run(ahead)
        );
    }
}
