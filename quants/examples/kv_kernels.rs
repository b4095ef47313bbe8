//! Times the attention's KV kernels for one GQA group over f16 caches of N positions in 30
//! layers of three KV heads (so that the cache comes from DRAM, as in decode at depth): q·k
//! over K in tile layout, and the value sums over V rows.
//! `cargo run --release -p ggrun-quants --example kv_kernels -- N GROUP HEAD_DIM`
use std::time::Instant;

use ggrun_quants::float::{dot_tiles_fn, f32_to_f16, weighted_rows_fn};

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().expect("N GROUP HEAD_DIM"))
        .collect();
    let [n, g, hd] = a[..] else {
        panic!("usage: kv_kernels N GROUP HEAD_DIM");
    };
    let (layers, nkv, reps) = (30, 3, 5);
    let n = n.next_multiple_of(8);
    let row = nkv * hd;
    let caches: Vec<Vec<u16>> = (0..layers)
        .map(|l| {
            (0..n * row)
                .map(|i| f32_to_f16(((i * 7919 + l) % 1000) as f32 / 1000.0))
                .collect()
        })
        .collect();
    let q: Vec<f32> = (0..g * hd).map(|i| (i % 64) as f32 / 64.0).collect();
    let w: Vec<f32> = (0..g * n).map(|i| 1.0 / (1 + i) as f32).collect();
    let (dot, weighted) = (dot_tiles_fn::<u16>(), weighted_rows_fn::<u16>());
    let (mut sc, mut o) = (vec![0f32; g * n], vec![0f32; g * hd]);
    let (mut t_dot, mut t_weighted) = (0.0, 0.0);
    for _ in 0..reps {
        for c in &caches {
            for kvh in 0..nkv {
                let t = Instant::now();
                dot(c, row, kvh * hd, &q, hd, &mut sc);
                t_dot += t.elapsed().as_secs_f64();
                let t = Instant::now();
                weighted(&mut o, &w, g, &c[kvh * hd..], row);
                t_weighted += t.elapsed().as_secs_f64();
            }
        }
    }
    std::hint::black_box((&sc, &o));
    let calls = (reps * layers * nkv) as f64;
    let gbs = |t: f64| (n * hd * 2) as f64 * calls / t / 1e9;
    println!(
        "{n} positions, {g} heads of {hd}: q·k {:.1} µs ({:.1} GB/s), values {:.1} µs ({:.1} GB/s) per KV head",
        t_dot / calls * 1e6,
        gbs(t_dot),
        t_weighted / calls * 1e6,
        gbs(t_weighted)
    );
}
