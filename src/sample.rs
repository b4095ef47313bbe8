//! The sampler chain that turns a row of logits into a token, in llama.cpp's order: logit bias,
//! repetition and presence/frequency penalties over the recent tokens, then top-k, top-p and min-p
//! truncation, then temperature, then a draw from a seeded generator. Temperature 0 (or below) is
//! greedy. The same seed and inputs give the same tokens.

use std::collections::HashMap;

use anyhow::Result;

use crate::gguf::Metadata;
use crate::grammar::{Constraint, GrammarSpec};

/// Sampling settings (llama.cpp's flag names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    pub seed: u64,
    /// Added to these tokens' logits first (OpenAI's `logit_bias`; −∞ bans a token).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

/// Sampling as a command or a request asks for it: unset values take the model's recommended
/// ones (`general.sampling.*`), then llama.cpp's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    pub temp: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repeat_last_n: usize,
    /// None: a seed from the clock.
    pub seed: Option<u64>,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Added to these tokens' logits before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    /// The answer must follow this grammar (structured output).
    pub grammar: Option<GrammarSpec>,
    /// Report each generated token's log-probability with this many alternatives (the server's
    /// logprobs; None: not reported).
    pub logprobs: Option<usize>,
}

impl Settings {
    /// The sampler's settings: these first, then the model's recommendations, then
    /// llama.cpp's defaults (the seed used is in the result).
    pub fn config(&self, md: &Metadata) -> SamplerConfig {
        let d = SamplerConfig::default();
        let f = |k: &str| md.get_f32(&format!("general.sampling.{k}")).ok();
        let seed = self.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
        });
        SamplerConfig {
            temperature: self.temp.or(f("temp")).unwrap_or(d.temperature),
            top_k: self
                .top_k
                .or(md.get_usize("general.sampling.top_k").ok())
                .unwrap_or(d.top_k),
            top_p: self.top_p.or(f("top_p")).unwrap_or(d.top_p),
            min_p: self.min_p.or(f("min_p")).unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: self.repeat_last_n,
            seed,
            logit_bias: self.logit_bias.clone(),
        }
    }
}

/// SplitMix64: small, fast, and the same stream on every platform.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    /// The grammar the tokens must follow: it masks the logits before anything else.
    constraint: Option<Constraint>,
    /// The grammar waits (the model is thinking: the grammar is the answer's).
    hold: bool,
    /// A token allowed beside the grammar's (the one that opens reasoning), not followed by it.
    beside: Option<u32>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = Rng(cfg.seed);
        Sampler {
            cfg,
            rng,
            constraint: None,
            hold: false,
            beside: None,
        }
    }

    /// While `hold`, tokens are sampled free and the grammar does not follow them (it
    /// constrains the answer, not the reasoning before it); `beside` is allowed next beside
    /// what the grammar allows (the token that opens reasoning), and not followed either.
    pub fn hold_grammar(&mut self, hold: bool, beside: Option<u32>) {
        self.hold = hold;
        self.beside = beside;
    }

    /// Makes every sampled token follow `c`.
    pub fn constrain(&mut self, c: Constraint) {
        self.constraint = Some(c);
    }

    /// Whether [`Sampler::sample`] can run without waiting for the grammar's mask; waits up
    /// to `wait` for it.
    pub fn ready(&mut self, wait: std::time::Duration) -> bool {
        match &mut self.constraint {
            _ if self.hold => true,
            Some(c) if wait.is_zero() => c.ready(),
            Some(c) => c.wait(wait),
            None => true,
        }
    }

    /// Picks the next token from `logits`, given the tokens so far (for the penalties): the
    /// grammar's mask first, then the chain.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let mut l = logits.to_vec();
        let grammar = self.constraint.as_mut().filter(|_| !self.hold);
        match grammar {
            Some(g) => {
                let beside = self.beside.filter(|&b| (b as usize) < l.len());
                let kept = beside.map(|b| l[b as usize]);
                g.mask(&mut l)?;
                if let (Some(b), Some(v)) = (beside, kept) {
                    l[b as usize] = v;
                }
                let t = self.pick(l, history);
                if Some(t) != beside {
                    self.constraint.as_mut().map_or(Ok(()), |g| g.commit(t))?;
                }
                Ok(t)
            }
            None => Ok(self.pick(l, history)),
        }
    }

    fn pick(&mut self, mut l: Vec<f32>, history: &[u32]) -> u32 {
        let c = &self.cfg;
        for &(t, b) in &c.logit_bias {
            if let Some(v) = l.get_mut(t as usize) {
                *v += b;
            }
        }
        apply_penalties(&mut l, history, c);
        if c.temperature <= 0.0 {
            return argmax(&l) as u32;
        }
        let mut cand = truncated(&l, c);
        for x in cand.iter_mut() {
            x.1 /= c.temperature;
        }
        let p = softmax(&cand);
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        for (i, pi) in p.iter().enumerate() {
            cum += pi;
            if r < cum {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Highest logit first, ties to the lower id: the candidates' order.
fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Puts the first `m` candidates in order (the `m` highest, sorted) without sorting the rest.
fn order_prefix(cand: &mut [(u32, f32)], m: usize) {
    let m = m.min(cand.len());
    if m == 0 {
        return;
    }
    if m < cand.len() {
        cand.select_nth_unstable_by(m - 1, by_logit);
    }
    cand[..m].sort_by(by_logit);
}

/// The candidates top-k, top-p and min-p keep, in order: what sorting the whole vocabulary and
/// truncating gives, without sorting it (a sort of 151936 candidates took ~6 ms a token, more
/// than a GPU decode step). With top-k, only its k are sorted. Without, top-p sorts a prefix
/// grown until it holds the probability asked for (normalized over the whole vocabulary,
/// summed in id order), and min-p alone sorts only the tokens within ln(min_p) of the top
/// logit (with a margin no rounding reaches); with neither, everything is sorted.
fn truncated(l: &[f32], c: &SamplerConfig) -> Vec<(u32, f32)> {
    if c.top_k > 0 && c.top_k < l.len() {
        let mut cand = top_candidates(l, c.top_k);
        top_p(&mut cand, c.top_p);
        min_p(&mut cand, c.min_p);
        return cand;
    }
    let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    if c.top_p < 1.0 {
        let max = max_of(l, f32::NEG_INFINITY) as f64;
        let total: f64 = l.iter().map(|&v| (v as f64 - max).exp()).sum();
        let (mut m, mut cum, mut done) = (64.min(cand.len()), 0.0, 0);
        order_prefix(&mut cand, m);
        let keep = loop {
            let hit = cand[done..m].iter().position(|x| {
                cum += (x.1 as f64 - max).exp() / total;
                cum >= c.top_p as f64
            });
            if let Some(i) = hit {
                break done + i + 1;
            }
            if m == cand.len() {
                break m;
            }
            done = m;
            m = (4 * m).min(cand.len());
            order_prefix(&mut cand[done..], m - done);
        };
        cand.truncate(keep.max(1));
    } else if c.min_p > 0.0 {
        let max = max_of(l, f32::NEG_INFINITY);
        let floor = max as f64 + (c.min_p as f64).ln() - 1e-3;
        let near: Vec<(u32, f32)> = cand
            .iter()
            .copied()
            .filter(|x| x.1 as f64 >= floor)
            .collect();
        if !near.is_empty() {
            cand = near;
        }
        cand.sort_by(by_logit);
    } else {
        cand.sort_by(by_logit);
    }
    min_p(&mut cand, c.min_p);
    cand
}

/// The `k` (< l.len()) highest candidates, in order. The row is cut into at least k slices;
/// their maxima are k different tokens' logits, so the least of them is at most the k-th
/// largest logit, and only the tokens at or above it (a few hundred of a vocabulary) are
/// selected among. NaNs, which the order puts first (or last, negative), are kept too.
fn top_candidates(l: &[f32], k: usize) -> Vec<(u32, f32)> {
    let floor = l
        .chunks(l.len() / k)
        .map(|s| max_of(s, f32::NEG_INFINITY))
        .fold(f32::INFINITY, |m, x| if x < m { x } else { m });
    let mut cand = Vec::new();
    for (j, s) in l.chunks(LANES).enumerate() {
        // Tested for all sixteen at once.
        if s.iter().fold(false, |any, &x| any | kept(x, floor)) {
            let at = (j * LANES) as u32;
            cand.extend((at..).zip(s.iter().copied()).filter(|x| kept(x.1, floor)));
        }
    }
    order_prefix(&mut cand, k);
    cand.truncate(k);
    cand
}

/// At or above the floor, or NaN (no short circuit, so that sixteen compare as a vector).
fn kept(x: f32, floor: f32) -> bool {
    (x >= floor) | x.is_nan()
}

/// Min-p over ordered candidates: those whose probability is at least `min_p` times the first's.
fn min_p(cand: &mut Vec<(u32, f32)>, min_p: f32) {
    if min_p > 0.0 && !cand.is_empty() {
        let p = softmax(cand);
        let cut = p[0] * min_p as f64;
        let keep = p.iter().take_while(|&&pi| pi >= cut).count();
        cand.truncate(keep.max(1));
    }
}

/// Top-p over ordered candidates: the shortest prefix whose probability reaches `top_p`.
fn top_p(cand: &mut Vec<(u32, f32)>, top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let p = softmax(cand);
    let mut cum = 0.0;
    let mut keep = cand.len();
    for (i, pi) in p.iter().enumerate() {
        cum += pi;
        if cum >= top_p as f64 {
            keep = i + 1;
            break;
        }
    }
    cand.truncate(keep.max(1));
}

fn apply_penalties(l: &mut [f32], history: &[u32], c: &SamplerConfig) {
    if c.repeat_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0 {
        return;
    }
    let recent = &history[history.len().saturating_sub(c.penalty_last_n)..];
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &t in recent {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &n) in &counts {
        let Some(v) = l.get_mut(t as usize) else {
            continue;
        };
        if *v > 0.0 {
            *v /= c.repeat_penalty;
        } else {
            *v *= c.repeat_penalty;
        }
        *v -= c.presence_penalty + c.frequency_penalty * n as f32;
    }
}

/// Probabilities of the candidates (stable softmax in f64).
fn softmax(cand: &[(u32, f32)]) -> Vec<f64> {
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = cand.iter().map(|c| (c.1 as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Index of the largest value (the first on ties; NaNs never win, and a NaN first value
/// gives 0). The maximum is found in sixteen independent lanes, which the compiler turns
/// into vector compares (a 151936-token vocabulary: 117 µs a token scanned one by one, as
/// measured on the device's host), then its first position.
pub fn argmax(v: &[f32]) -> usize {
    let Some(&first) = v.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    let max = max_of(v, first);
    // 0.0 and -0.0 are equal here as in the comparisons above, so the first of either wins.
    v.iter().position(|&x| x == max).unwrap_or(0)
}

/// Whether any value is NaN, tested sixteen at a time without a short circuit inside each
/// sixteen, so that they compare as a vector (a 151936-token row, measured on the development
/// VM in a generic x86-64 build: 20 µs, against 94 µs value by value).
pub fn has_nan(v: &[f32]) -> bool {
    v.chunks(LANES)
        .any(|s| s.iter().fold(false, |any, x| any | x.is_nan()))
}

/// Lanes of the maximum searches, wide enough for the compiler's vector compares.
const LANES: usize = 16;

/// The largest of `start` and the values of v, NaNs passed over, in LANES independent lanes.
fn max_of(v: &[f32], start: f32) -> f32 {
    let mut lanes = [start; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(start, |m, &x| if x > m { x } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan argmax replaced: best moves on a strictly larger value.
    fn argmax_by_scan(v: &[f32]) -> usize {
        let mut best = 0;
        for (i, x) in v.iter().enumerate() {
            if *x > v[best] {
                best = i;
            }
        }
        best
    }

    #[test]
    fn has_nan_finds_a_nan_anywhere() {
        let mut v = vec![1.0f32; 100];
        assert!(!has_nan(&v) && !has_nan(&[]));
        for at in [0, 15, 16, 17, 63, 99] {
            v[at] = if at % 2 == 0 { f32::NAN } else { -f32::NAN };
            assert!(has_nan(&v), "{at}");
            v[at] = f32::INFINITY;
            assert!(!has_nan(&v), "{at}");
        }
    }

    #[test]
    fn argmax_agrees_with_a_plain_scan() {
        let mut state = 0x9e3779b97f4a7c15u64 ^ seed_of_this_run();
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // Few distinct values (ties), signed zeros, infinities and NaNs, at lengths around
        // the lane count.
        let pick = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for round in 0..2000 {
            let n = (next() % 70) as usize + (round % 3) * 151;
            let v: Vec<f32> = (0..n)
                .map(|_| match next() % 4 {
                    0 => pick[(next() % pick.len() as u64) as usize],
                    _ => (next() % 7) as f32 - 3.0,
                })
                .collect();
            assert_eq!(argmax(&v), argmax_by_scan(&v), "{v:?}");
        }
        assert_eq!(argmax(&[]), 0);
    }

    /// A seed that differs per run (printed, so that a failure can be repeated).
    fn seed_of_this_run() -> u64 {
        let s = std::env::var("GGRUN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("GGRUN_TEST_SEED={s}");
        s
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9, -3.0, 1.5]
    }

    fn cfg(temperature: f32) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        }
    }

    #[test]
    fn logit_bias_moves_and_bans_tokens() {
        // Greedy picks 1 (3.0); a bias of +1 on 2 (2.5) makes it win, −∞ on both leaves 5.
        let mut s = Sampler::new(SamplerConfig {
            logit_bias: vec![(2, 1.0)],
            ..cfg(0.0)
        });
        assert_eq!(s.sample(&logits(), &[]).unwrap(), 2);
        let banned = vec![(1, f32::NEG_INFINITY), (2, f32::NEG_INFINITY)];
        let mut s = Sampler::new(SamplerConfig {
            logit_bias: banned.clone(),
            ..cfg(1.0)
        });
        for _ in 0..200 {
            let t = s.sample(&logits(), &[]).unwrap();
            assert!(t != 1 && t != 2);
        }
    }

    fn histogram(c: SamplerConfig, n: usize) -> Vec<usize> {
        let mut s = Sampler::new(c);
        let mut h = vec![0; 8];
        for _ in 0..n {
            h[s.sample(&logits(), &[]).unwrap() as usize] += 1;
        }
        h
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(cfg(0.0));
        for _ in 0..10 {
            assert_eq!(s.sample(&logits(), &[]).unwrap(), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg(1.0) });
            (0..50)
                .map(|_| s.sample(&logits(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let n = 20000;
        let h = histogram(cfg(1.0), n);
        let l = logits();
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &c) in h.iter().enumerate() {
            let p = (l[i] as f64).exp() / z;
            let f = c as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            assert!(
                (f - p).abs() <= 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-4,
                "token {i}: {f} vs {p}"
            );
        }
    }

    #[test]
    fn top_k_top_p_and_min_p_truncate() {
        let h = histogram(
            SamplerConfig {
                top_k: 2,
                ..cfg(1.0)
            },
            2000,
        );
        assert!(
            h.iter()
                .enumerate()
                .all(|(i, &c)| c == 0 || i == 1 || i == 5),
            "{h:?}"
        );
        // Probabilities ≈ 0.38 (1), 0.35 (5), 0.23 (2), ...: top-p 0.5 keeps tokens 1 and 5.
        let h = histogram(
            SamplerConfig {
                top_p: 0.5,
                ..cfg(1.0)
            },
            2000,
        );
        assert!(
            h.iter()
                .enumerate()
                .all(|(i, &c)| c == 0 || i == 1 || i == 5),
            "{h:?}"
        );
        // min-p 0.5 keeps tokens within half the best probability: 1, 5, 2 (e^-0.5 ≈ 0.61).
        let h = histogram(
            SamplerConfig {
                min_p: 0.5,
                ..cfg(1.0)
            },
            2000,
        );
        assert!(
            h.iter()
                .enumerate()
                .all(|(i, &c)| c == 0 || [1, 5, 2].contains(&i)),
            "{h:?}"
        );
        assert!(h[2] > 0);
    }

    /// The truncation as it was first written: sort the whole vocabulary, then cut.
    fn truncated_by_full_sort(l: &[f32], c: &SamplerConfig) -> Vec<(u32, f32)> {
        let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        cand.sort_by(by_logit);
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.truncate(c.top_k);
        }
        top_p(&mut cand, c.top_p);
        min_p(&mut cand, c.min_p);
        cand
    }

    #[test]
    fn truncation_keeps_what_a_full_sort_keeps() {
        // Vocabularies of 3 to 50000 tokens, logits spread from sharp (a few tokens hold the
        // mass) to flat (top-p needs thousands, so the sorted prefix grows several times), with
        // repeated values for the ties; every combination of the three cuts.
        let mut rng = Rng(seed_of_this_run());
        for (n, spread) in [
            (3usize, 1.0f32),
            (100, 4.0),
            (5000, 0.05),
            (50000, 0.3),
            (50000, 12.0),
        ] {
            let l: Vec<f32> = (0..n)
                .map(|_| {
                    let v = (rng.next_f64() as f32 - 0.5) * 2.0 * spread;
                    if rng.next_u64().is_multiple_of(7) {
                        (v * 4.0).round() / 4.0
                    } else {
                        v
                    }
                })
                .collect();
            for top_k in [0, 1, 40, n] {
                for top_p in [1.0, 0.95, 0.5, 0.999] {
                    for min_p in [0.0, 0.05, 0.5] {
                        let c = SamplerConfig {
                            top_k,
                            top_p,
                            min_p,
                            ..cfg(1.0)
                        };
                        assert_eq!(
                            truncated(&l, &c),
                            truncated_by_full_sort(&l, &c),
                            "n {n} spread {spread} {c:?}"
                        );
                    }
                }
            }
        }
        // NaNs (positive ones rank first, negative last) and infinities: top-k keeps the
        // full sort's candidates.
        let ids = |v: Vec<(u32, f32)>| {
            v.into_iter()
                .map(|x| (x.0, x.1.to_bits()))
                .collect::<Vec<_>>()
        };
        let mut l: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        l[5] = f32::NAN;
        l[600] = -f32::NAN;
        l[7] = f32::INFINITY;
        l[8] = f32::NEG_INFINITY;
        for top_k in [1, 3, 40, 999] {
            let c = SamplerConfig { top_k, ..cfg(1.0) };
            assert_eq!(
                ids(truncated(&l, &c)),
                ids(truncated_by_full_sort(&l, &c)),
                "{c:?}"
            );
        }
        // Non-finite logits: no panic, and a candidate is left.
        for l in [
            vec![f32::NAN; 10],
            vec![f32::NEG_INFINITY; 10],
            vec![1.0, f32::INFINITY, 0.0],
        ] {
            for (top_p, min_p) in [(1.0, 0.05), (0.9, 0.0), (1.0, 0.0)] {
                let c = SamplerConfig {
                    top_p,
                    min_p,
                    ..cfg(1.0)
                };
                assert!(!truncated(&l, &c).is_empty(), "{l:?} {c:?}");
            }
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let c = SamplerConfig {
            repeat_penalty: 2.0,
            ..cfg(0.0)
        };
        let mut s = Sampler::new(c);
        // Token 1 (3.0) repeated becomes 1.5; token 5 (2.9) wins.
        assert_eq!(s.sample(&logits(), &[1, 1]).unwrap(), 5);
        let c = SamplerConfig {
            presence_penalty: 1.0,
            ..cfg(0.0)
        };
        assert_eq!(Sampler::new(c).sample(&logits(), &[1, 5]).unwrap(), 2);
        // Negative logits are multiplied, not divided.
        let mut l = vec![-1.0f32, -2.0];
        apply_penalties(
            &mut l,
            &[0],
            &SamplerConfig {
                repeat_penalty: 2.0,
                ..cfg(1.0)
            },
        );
        assert_eq!(l, vec![-2.0, -2.0]);
    }
}
