//! `ggrun bench`: prompt-processing (pp) and generation (tg) speed, measured the way
//! llama-bench and ../shared/tools/llamacpp_side.py do — a warm-up round that is dropped, then the
//! median over repeats; random prompt tokens from a fixed seed; pp and tg are separate tests,
//! each on an empty context (tgN: N tokens generated one at a time from a random first token),
//! or, with a depth (llama-bench's `-d`), on a context already holding that many tokens: they
//! are evaluated once, untimed, and each test starts from a restored copy of that state.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::backend::cpu::Cpu;
use crate::backend::state::State;
use crate::gguf::Model;
use crate::model::Forward;
use crate::routing::RoutingWindow;
use crate::sample::argmax;

pub struct BenchResult {
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Tokens in the context before each test.
    pub depth: usize,
    /// Sequences generating together in tg (its figures are their aggregate).
    pub sequences: usize,
    pub pp: Vec<f64>,
    pub tg: Vec<f64>,
    /// Read bandwidth (bytes/s) measured right before each measured tg round, when asked for.
    pub tg_bandwidth: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Tokens between two snapshots of the routing counts when `--routing-stats` records them
/// (reading them is a device round trip per MoE layer where routing runs on the GPU).
pub const ROUTING_SNAPSHOT_EVERY: usize = 32;

/// Runs `reps` measured rounds after one warm-up round, each test on a context holding `depth`
/// tokens; the prompt (and the depth) goes in forward passes of `batch` tokens. With `routing`, the model's selection counts are recorded into it after each
/// prompt pass and every [`ROUTING_SNAPSHOT_EVERY`] generated tokens. With `bandwidth`, it is
/// called right before each measured tg round (the roofline of that round: this machine's
/// bandwidth drifts between runs, so a bandwidth taken apart from the tokens says little).
#[allow(clippy::too_many_arguments)]
pub fn run(
    m: &dyn Forward,
    cpu: &Cpu,
    n_prompt: usize,
    n_gen: usize,
    depth: usize,
    batch: usize,
    reps: usize,
    sequences: usize,
    mut routing: Option<&mut RoutingWindow>,
    bandwidth: Option<&dyn Fn() -> f64>,
) -> Result<BenchResult> {
    let mut tokens = 0u64;
    let record = |tokens: u64, routing: &mut Option<&mut RoutingWindow>| -> Result<()> {
        if let Some(w) = routing.as_deref_mut() {
            w.record(tokens, m.expert_usage()?);
        }
        Ok(())
    };
    let nv = m.n_vocab();
    anyhow::ensure!(nv > 20, "vocabulary too small to benchmark");
    anyhow::ensure!(
        n_prompt + n_gen > 0,
        "nothing to measure: -p and -n are both 0"
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let random = |next: &mut dyn FnMut() -> u64| (10 + next() % (nv as u64 - 20)) as u32;
    // One state for every test, allocated once (a long context is many pages to fault in);
    // tg with several sequences gets the others' beside it.
    let mut st = m.new_state(depth + n_prompt.max(n_gen), cpu.kv)?;
    let mut others = (1..sequences.max(1))
        .map(|_| m.new_state(depth + n_gen, cpu.kv))
        .collect::<Result<Vec<_>>>()?;
    let at_depth = match depth {
        0 => None,
        _ => {
            let filler: Vec<u32> = (0..depth).map(|_| random(&mut next)).collect();
            for chunk in filler.chunks(batch.max(1)) {
                m.forward(cpu, &mut st, chunk, false)?;
                tokens += chunk.len() as u64;
            }
            record(tokens, &mut routing)?;
            Some(st.to_bytes()?)
        }
    };
    let reset = |st: &mut crate::backend::state::State| match &at_depth {
        Some(saved) => st.restore(saved),
        None => st.clear(),
    };
    let (mut pp, mut tg, mut tg_bandwidth) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=reps {
        let prompt: Vec<u32> = (0..n_prompt).map(|_| random(&mut next)).collect();
        let mut tok = random(&mut next);
        if n_prompt > 0 {
            reset(&mut st)?;
            let t0 = Instant::now();
            for chunk in prompt.chunks(batch.max(1)) {
                m.forward(cpu, &mut st, chunk, false)?;
                tokens += chunk.len() as u64;
                record(tokens, &mut routing)?;
            }
            if round > 0 {
                pp.push(n_prompt as f64 / t0.elapsed().as_secs_f64());
            }
        }
        if n_gen > 0 {
            reset(&mut st)?;
            for o in others.iter_mut() {
                reset(o)?;
            }
            if let (true, Some(bw)) = (round > 0, bandwidth) {
                tg_bandwidth.push(bw());
            }
            // Each sequence starts from its own token; a step takes one token of each, in one
            // pass when there are several (the server's slots).
            let mut toks: Vec<u32> = std::iter::once(tok)
                .chain(others.iter().map(|_| random(&mut next)))
                .collect();
            let t0 = Instant::now();
            for i in 0..n_gen {
                if others.is_empty() {
                    let l = m.forward(cpu, &mut st, &toks, false)?;
                    toks[0] = argmax(&l) as u32;
                } else {
                    let mut states: Vec<&mut State> =
                        std::iter::once(&mut st).chain(others.iter_mut()).collect();
                    let runs: Vec<&[u32]> = toks.chunks(1).collect();
                    let rows = m.forward_seqs(cpu, &mut states, &runs)?;
                    toks = rows.iter().map(|l| argmax(l) as u32).collect();
                }
                tokens += toks.len() as u64;
                if (i + 1) % ROUTING_SNAPSHOT_EVERY == 0 || i + 1 == n_gen {
                    record(tokens, &mut routing)?;
                }
            }
            tok = toks[0];
            if round > 0 {
                tg.push((n_gen * toks.len()) as f64 / t0.elapsed().as_secs_f64());
            }
        }
    }
    Ok(BenchResult {
        n_prompt,
        n_gen,
        depth,
        sequences: sequences.max(1),
        pp,
        tg,
        tg_bandwidth,
    })
}

impl BenchResult {
    /// The roofline of the tg rounds given `bytes` a token reads: (median bandwidth, lowest
    /// and highest bandwidth, median over rounds of each round's tg as a percentage of the
    /// bandwidth measured right before it). None without bandwidth readings.
    pub fn roofline(&self, bytes: u64) -> Option<Roofline> {
        if self.tg_bandwidth.is_empty() {
            return None;
        }
        let pct: Vec<f64> = self
            .tg
            .iter()
            .zip(&self.tg_bandwidth)
            .map(|(tg, bw)| 100.0 * tg * bytes as f64 / bw)
            .collect();
        let lo = self.tg_bandwidth.iter().copied().fold(f64::MAX, f64::min);
        let hi = self.tg_bandwidth.iter().copied().fold(0.0, f64::max);
        Some(Roofline {
            bytes,
            bandwidth: median(&self.tg_bandwidth),
            bandwidth_range: (lo, hi),
            tg_pct: median(&pct),
            tg_pct_all: pct,
        })
    }

    pub fn to_json(&self, model: &Path, threads: usize) -> serde_json::Value {
        json!({
            "runner": "ggrun",
            "model": model.display().to_string(),
            "threads": threads,
            "isa": ggrun_quants::isa::active().name(),
            "prompt": self.n_prompt,
            "gen": self.n_gen,
            "depth": self.depth,
            "sequences": self.sequences,
            "pp_tok_s": median(&self.pp),
            "tg_tok_s": median(&self.tg),
            "pp_all": self.pp,
            "tg_all": self.tg,
        })
    }

    pub fn to_text(&self, model: &Path, threads: usize) -> String {
        let at = match self.depth {
            0 => String::new(),
            d => format!(" @ d{d}"),
        };
        let seqs = match self.sequences {
            1 => String::new(),
            n => format!(" x{n} sequences"),
        };
        format!(
            "model {}\nthreads {threads}, {}\npp{}{at} {:9.2} tok/s\ntg{}{at}{seqs} {:9.2} tok/s",
            model.display(),
            ggrun_quants::isa::active().name(),
            self.n_prompt,
            median(&self.pp),
            self.n_gen,
            median(&self.tg)
        )
    }
}

/// tg against the memory-bandwidth roofline (see [`BenchResult::roofline`]).
pub struct Roofline {
    pub bytes: u64,
    pub bandwidth: f64,
    pub bandwidth_range: (f64, f64),
    pub tg_pct: f64,
    pub tg_pct_all: Vec<f64>,
}

/// Weight bytes one generated token reads: every tensor, except that the token embedding
/// contributes one row (unless it doubles as the output head) and routed experts contribute
/// the fraction `expert_used_count / expert_count` of their bytes (uniform routing).
pub fn bytes_per_token(g: &Model) -> Result<u64> {
    let md = g.metadata();
    let arch = g.architecture()?;
    let used = md.get_usize(&format!("{arch}.expert_used_count")).ok();
    let count = md.get_usize(&format!("{arch}.expert_count")).ok();
    let tied = g.tensor("output.weight").is_none();
    let mut total = 0f64;
    for t in g.tensors() {
        let bytes = t.size_bytes as f64;
        total += if t.name == "token_embd.weight" && !tied {
            bytes / t.rows().max(1) as f64
        } else if t.name.contains("_exps.") {
            match (used, count) {
                (Some(u), Some(c)) if c > 0 => bytes * u as f64 / c as f64,
                _ => bytes,
            }
        } else {
            bytes
        };
    }
    Ok(total as u64)
}

/// Read bandwidth of the mapped model file (bytes/s): `threads` threads each read a share of
/// every part, best of `passes` after one warm pass (pages already resident, so the read is of
/// DRAM, not of the disk).
pub fn read_bandwidth(g: &Model, cpu: &Cpu, passes: usize) -> f64 {
    use rayon::prelude::*;
    let total: usize = g.parts.iter().map(|p| p.bytes().len()).sum();
    let mut best = 0f64;
    for pass in 0..=passes {
        let t0 = Instant::now();
        // A checksum that only keeps the reads from being optimised away: it wraps.
        let sum: u64 = cpu.install(|| {
            g.parts
                .iter()
                .map(|p| {
                    p.bytes()
                        .par_chunks(1 << 20)
                        .map(ggrun_quants::float::sum_bytes)
                        .reduce(|| 0, u64::wrapping_add)
                })
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        let bw = total as f64 / t0.elapsed().as_secs_f64();
        if pass > 0 {
            best = best.max(bw);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Precision;
    use crate::backend::state::{KvRows, KvTypes, LayerState, State};
    use crate::model::Seq;
    use std::sync::Mutex;

    /// A model whose one "cache" row per position holds the token there, and which records,
    /// for every pass, the position it started at, its length and the cache's first 16 values.
    struct Recorder(Mutex<Vec<(usize, usize, Vec<f32>)>>);

    impl Forward for Recorder {
        fn n_vocab(&self) -> usize {
            64
        }
        fn n_ctx_train(&self) -> usize {
            1 << 20
        }
        fn new_state(&self, n_ctx: usize, _: KvTypes) -> Result<State> {
            let cache = LayerState::Attention {
                k: KvRows::F32(vec![0.0; n_ctx]),
                v: KvRows::F32(vec![0.0; n_ctx]),
                len: 0,
                row: 1,
                capacity: n_ctx,
                k_tiled: false,
            };
            Ok(State::new(vec![cache], n_ctx))
        }
        fn run(&self, _: &Cpu, seqs: &mut [Seq], tokens: &[u32], _: bool) -> Result<Vec<f32>> {
            let st = &mut *seqs[0].state;
            let LayerState::Attention {
                k: KvRows::F32(k),
                len,
                ..
            } = &mut st.layers[0]
            else {
                unreachable!()
            };
            anyhow::ensure!(*len == st.pos && st.pos + tokens.len() <= st.n_ctx);
            for (i, &t) in tokens.iter().enumerate() {
                k[st.pos + i] = t as f32;
            }
            let head = k[..16.min(k.len())].to_vec();
            self.0.lock().unwrap().push((st.pos, tokens.len(), head));
            *len += tokens.len();
            st.pos += tokens.len();
            Ok(vec![0.0; 64])
        }
    }

    /// A model that records, per pass, each sequence's position and run length.
    struct Steps(Mutex<Vec<Vec<(usize, usize)>>>);

    impl Forward for Steps {
        fn n_vocab(&self) -> usize {
            64
        }
        fn n_ctx_train(&self) -> usize {
            1 << 20
        }
        fn new_state(&self, n_ctx: usize, _: KvTypes) -> Result<State> {
            Ok(State::new(vec![LayerState::None], n_ctx))
        }
        fn run(&self, _: &Cpu, seqs: &mut [Seq], _: &[u32], _: bool) -> Result<Vec<f32>> {
            let pass: Vec<(usize, usize)> = seqs.iter().map(|s| (s.state.pos, s.len)).collect();
            for s in seqs.iter_mut() {
                s.state.pos += s.len;
            }
            self.0.lock().unwrap().push(pass);
            Ok(vec![0.0; 64 * seqs.len()])
        }
    }

    /// tg with several sequences: every step is one pass of one token of each, every round
    /// starts them all from an empty context, and the figure counts every sequence's tokens.
    #[test]
    fn several_sequences_generate_in_one_pass_per_step() {
        let m = Steps(Mutex::new(Vec::new()));
        let cpu = Cpu::new(1, Precision::Exact).unwrap();
        let (n, reps, seqs) = (4, 2, 3);
        let r = run(&m, &cpu, 0, n, 0, 1, reps, seqs, None, None).unwrap();
        assert_eq!((r.tg.len(), r.sequences), (reps, seqs));
        let passes = std::mem::take(&mut *m.0.lock().unwrap());
        assert_eq!(passes.len(), (reps + 1) * n);
        for (i, pass) in passes.iter().enumerate() {
            assert_eq!(pass, &vec![(i % n, 1); seqs], "pass {i}");
        }
        let one = run(&m, &cpu, 0, n, 0, 1, reps, 1, None, None).unwrap();
        assert_eq!(one.sequences, 1);
    }

    /// With a depth, the context is filled once, and every pp pass and tg step of every round
    /// starts from that same context: at the depth, over the same first tokens.
    #[test]
    fn every_test_runs_at_the_depth_over_the_same_context() {
        let m = Recorder(Mutex::new(Vec::new()));
        let cpu = Cpu::new(1, Precision::Exact).unwrap();
        let (depth, p, n, batch, reps) = (40, 12, 5, 16, 2);
        let r = run(&m, &cpu, p, n, depth, batch, reps, 1, None, None).unwrap();
        assert_eq!((r.pp.len(), r.tg.len(), r.depth), (reps, reps, depth));
        let passes = m.0.into_inner().unwrap();
        // The depth in passes of `batch` tokens, once; then per round one pp (in passes of
        // `batch`) and n tg steps.
        let fill: Vec<(usize, usize)> = passes[..3].iter().map(|x| (x.0, x.1)).collect();
        assert_eq!(fill, vec![(0, 16), (16, 16), (32, 8)]);
        let filled = passes[2].2.clone();
        let rest = &passes[3..];
        assert_eq!(rest.len(), (reps + 1) * (1 + n));
        for round in rest.chunks(1 + n) {
            assert_eq!(
                (round[0].0, round[0].1),
                (depth, p),
                "pp starts at the depth"
            );
            for (i, step) in round[1..].iter().enumerate() {
                assert_eq!(
                    (step.0, step.1),
                    (depth + i, 1),
                    "tg steps follow the depth"
                );
            }
        }
        assert!(rest.iter().all(|x| x.2 == filled), "the depth is restored");
        // No depth: every test on an empty context.
        let m = Recorder(Mutex::new(Vec::new()));
        run(&m, &cpu, p, n, 0, batch, 1, 1, None, None).unwrap();
        let starts: Vec<usize> = m.0.into_inner().unwrap().iter().map(|x| x.0).collect();
        assert_eq!(starts, [0, 0, 1, 2, 3, 4].repeat(2));
    }

    /// Each round's share is its own tg against the bandwidth read right before it; the
    /// reported figure is their median, not the median tg over the median bandwidth.
    #[test]
    fn roofline_pairs_each_round_with_its_bandwidth() {
        let r = BenchResult {
            n_prompt: 0,
            n_gen: 8,
            depth: 0,
            sequences: 1,
            pp: vec![],
            tg: vec![10.0, 30.0, 20.0],
            tg_bandwidth: vec![2e9, 3e9, 8e9],
        };
        // 1e8 bytes a token: roofline 20, 30 and 80 tok/s; shares 50%, 100%, 25%.
        let rf = r.roofline(100_000_000).unwrap();
        assert_eq!(rf.tg_pct_all, vec![50.0, 100.0, 25.0]);
        assert_eq!(rf.tg_pct, 50.0);
        assert_eq!(rf.bandwidth, 3e9);
        assert_eq!(rf.bandwidth_range, (2e9, 8e9));
        let none = BenchResult {
            tg_bandwidth: vec![],
            ..r
        };
        assert!(none.roofline(1).is_none());
    }
}
