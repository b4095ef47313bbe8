//! The sampler on a row of Qwen3's vocabulary (151936 logits): `cargo bench --bench sampler`.
//! Each case is one `Sampler::sample` (the logits copied, the cuts, the draw); `full sort` is
//! what every temperature-above-zero token once cost, sorting the whole row.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ggrun::sample::{Sampler, SamplerConfig};

fn logits(n: usize) -> Vec<f32> {
    // A peaked row like a model's: a few tokens far above a broad low tail.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            u * 8.0 - 4.0 + if i.is_multiple_of(9973) { 12.0 } else { 0.0 }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let l = logits(151_936);
    let mut g = c.benchmark_group("sample");
    g.sample_size(30);
    let d = SamplerConfig::default();
    let cases = [
        ("defaults (top-k 40, top-p 0.95, min-p 0.05)", d.clone()),
        (
            "top-p 0.95 alone",
            SamplerConfig {
                top_k: 0,
                min_p: 0.0,
                ..d.clone()
            },
        ),
        (
            "min-p 0.05 alone",
            SamplerConfig {
                top_k: 0,
                top_p: 1.0,
                ..d.clone()
            },
        ),
        (
            "greedy",
            SamplerConfig {
                temperature: 0.0,
                ..d.clone()
            },
        ),
    ];
    for (name, cfg) in cases {
        let mut s = Sampler::new(cfg);
        g.bench_function(name, |b| b.iter(|| s.sample(black_box(&l), &[]).unwrap()));
    }
    g.bench_function("full sort", |b| {
        b.iter(|| {
            let mut cand: Vec<(u32, f32)> =
                l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            black_box(cand[0])
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
