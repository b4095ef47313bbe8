//! `ggrun tune`: measured offload tuning. It reads the free VRAM and RAM, enumerates plans
//! (which routed-expert layers stay in RAM, staging buffers, prompt batch size, CPU threads),
//! loads and measures each with a short prompt (pp) and generation (tg) within a time limit,
//! prints the table and the winner, and saves the winner as the model's profile
//! ([`crate::profile`]) for `run`, `chat` and `bench`.
//!
//! Which expert layers stay in RAM: the planner's spread (RAM layers evenly through the network,
//! so that prefill prefetch hides copies behind resident layers) against a choice by routing
//! statistics gathered on the calibration prompt during the first measurement: the GPU keeps
//! the layers whose routing is widest (most distinct experts in use, by the exponential of the
//! routing entropy), RAM takes the most concentrated ones (a prefill batch copies fewer of
//! their experts). The measurements decide. Then the hot-expert cache of the RAM layers: the
//! plans above keep the default (an eighth of the budget); the best is measured again with
//! none and with twice as much (more layers in RAM, fewer experts crossing PCIe in decode).
//!
//! A plan's score is the time of one typical turn: a 512-token prompt at its pp speed plus 128
//! tokens at its tg speed; the lowest wins. A plan whose measured VRAM exceeds the budget is
//! never chosen.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::backend::cpu::{Cpu, Precision};
use crate::backend::cuda::{DeviceWeights, Gpu};
use crate::backend::placement::{PlacementArgs, Plan, DEFAULT_CACHE_SHARE};
use crate::engine::load;
use crate::gguf::Model;
use crate::profile::{self, Profile};

/// A built-in calibration text (plain English prose about the runner's own field), used when
/// no --calib file is given.
const CALIBRATION: &str = include_str!("tune_calibration.txt");

/// Prompt tokens of a turn in the score, and tokens generated.
const TURN_PROMPT: f64 = 512.0;
const TURN_GEN: f64 = 128.0;

/// What `ggrun tune` measures against (its flags, below the command line).
#[derive(Clone, Debug)]
pub struct Options {
    pub model: PathBuf,
    /// VRAM budget in bytes (None: what the GPU has free).
    pub gpu_mem: Option<u64>,
    /// Context the plans must hold (0: the model's, at most 4096).
    pub ctx_size: usize,
    /// Time limit for the measurements.
    pub time: Duration,
    /// A text file whose tokens are the calibration prompt (None: a built-in text).
    pub calib: Option<PathBuf>,
    /// Prompt tokens of each pp measurement.
    pub n_prompt: usize,
    /// Tokens of each tg measurement.
    pub n_gen: usize,
    /// One JSON object instead of the table.
    pub json: bool,
    /// Measure without saving the profile.
    pub no_save: bool,
}

/// One plan to measure.
#[derive(Clone, Debug)]
struct Candidate {
    label: String,
    threads: usize,
    batch: usize,
    /// GPU placement (None: CPU only).
    place: Option<PlacementArgs>,
}

/// One measured (or skipped) plan.
struct Row {
    cand: Candidate,
    /// Layers in RAM and staging buffers of the plan (GPU plans).
    ram_layers: Vec<usize>,
    staging: usize,
    /// Bytes of the plan's hot-expert cache.
    cache: u64,
    vram_planned: u64,
    vram_used: u64,
    ram: u64,
    pp: f64,
    tg: f64,
    error: Option<String>,
    /// Routing statistics the measurement gathered (per MoE layer, selections per expert).
    usage: Vec<(usize, Vec<u64>)>,
    /// Seconds the measurement took, loading included.
    secs: f64,
}

impl Row {
    /// How far the VRAM the backend held was from the plan's prediction, in percent of the
    /// prediction (GPU plans; the tuner's accounting goal is within 5).
    fn vram_error_pct(&self) -> Option<f64> {
        (self.cand.place.is_some() && self.vram_planned > 0 && self.error.is_none()).then(|| {
            100.0 * (self.vram_used as f64 - self.vram_planned as f64) / self.vram_planned as f64
        })
    }

    /// Seconds for one typical turn.
    fn turn_s(&self) -> f64 {
        if self.error.is_some() || self.pp <= 0.0 || self.tg <= 0.0 {
            f64::INFINITY
        } else {
            TURN_PROMPT / self.pp + TURN_GEN / self.tg
        }
    }
}

/// The `k` MoE layers with the most concentrated routing (fewest effective experts), sorted.
pub fn concentrated_layers(usage: &[(usize, Vec<u64>)], k: usize) -> Vec<usize> {
    let mut by: Vec<(f64, usize)> = usage
        .iter()
        .map(|(l, c)| (crate::routing::effective_experts(c), *l))
        .collect();
    by.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut out: Vec<usize> = by.into_iter().take(k).map(|(_, l)| l).collect();
    out.sort_unstable();
    out
}

pub fn run(a: Options, out: &mut dyn Write) -> Result<()> {
    let g = Model::open(&a.model)?;
    crate::model::check_architecture(&g)?;
    let n_ctx = load::planned_context(&g, a.ctx_size, load::StateMemory::Unknown);
    let tok = crate::tokenizer::Tokenizer::from_metadata(g.metadata())?;
    let text = match &a.calib {
        Some(p) => std::fs::read_to_string(p).with_context(|| p.display().to_string())?,
        None => CALIBRATION.to_string(),
    };
    let calib = tok.encode(&text, true)?;
    if calib.is_empty() {
        bail!("the calibration text has no tokens");
    }
    let n_prompt = a.n_prompt.clamp(1, n_ctx.saturating_sub(1).max(1));
    let prompt: Vec<u32> = calib.iter().cycle().take(n_prompt).copied().collect();
    let physical = num_cpus::get_physical().max(1);
    let ram_free = crate::backend::cpu::available_memory();
    let gpu = match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            if !a.json {
                eprintln!("no GPU ({e:#}): tuning threads and batch size for the CPU");
            }
            None
        }
    };
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let (device, budget) = match gpu {
        None => {
            let mut cands = Vec::new();
            let mut threads = vec![physical];
            if physical >= 4 {
                threads.push(physical / 2);
            }
            for &t in &threads {
                for b in batches(&[512, 256, 1024], prompt.len()) {
                    cands.push(Candidate {
                        label: format!("cpu t={t} b={b}"),
                        threads: t,
                        batch: b,
                        place: None,
                    });
                }
            }
            measure_all(&a, &prompt, n_ctx, ram_free, cands, &mut rows, started)?;
            (profile::CPU.to_string(), None)
        }
        Some(gpu) => {
            let (free, _) = gpu.memory()?;
            let free = (free as u64).saturating_sub(load::DEVICE_MARGIN);
            let budget = a.gpu_mem.map_or(free, |b| b.min(free));
            let name = gpu.name.clone();
            drop(gpu);
            gpu_plans(
                &g, &a, &prompt, n_ctx, budget, physical, ram_free, &mut rows, started,
            )?;
            (name, Some(budget))
        }
    };
    let best = fastest(&rows, budget)
        .ok_or_else(|| anyhow!("no plan could be measured: {}", first_error(&rows)))?;
    let p = Profile {
        device: device.clone(),
        gpu_mem: budget,
        ctx_size: n_ctx,
        threads: best.cand.threads,
        batch_size: best.cand.batch,
        experts_in_ram: best.cand.place.as_ref().map(|_| best.ram_layers.clone()),
        staging_buffers: best.cand.place.as_ref().map(|_| best.staging),
        expert_cache: best.cand.place.as_ref().map(|_| best.cache),
        plan: best.cand.label.clone(),
        pp_tok_s: best.pp,
        tg_tok_s: best.tg,
        tuned_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let saved = if a.no_save {
        None
    } else {
        Some(profile::save(&a.model, &p)?)
    };
    if a.json {
        let table: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "plan": r.cand.label, "threads": r.cand.threads, "batch": r.cand.batch,
                    "experts_in_ram": r.ram_layers, "staging_buffers": r.staging,
                    "expert_cache": r.cache,
                    "vram_planned": r.vram_planned, "vram_used": r.vram_used, "ram": r.ram,
                    "pp_tok_s": r.pp, "tg_tok_s": r.tg, "error": r.error,
                    "vram_error_pct": r.vram_error_pct(),
                })
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({
                "model": a.model.display().to_string(), "device": device, "gpu_mem": budget,
                "ctx_size": n_ctx, "plans": table, "winner": p.plan, "flags": p.flags(),
                "profile": saved.as_ref().map(|s| s.display().to_string()),
            })
        )?;
        return Ok(());
    }
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    writeln!(
        out,
        "{} on {device}{}, context {n_ctx}",
        a.model.display(),
        budget.map_or(String::new(), |b| format!(" (budget {})", gib(b)))
    )?;
    writeln!(
        out,
        "{:<34} {:>22} {:>12} {:>9} {:>9} {:>8}",
        "plan", "VRAM planned / used", "RAM weights", "pp tok/s", "tg tok/s", "turn s"
    )?;
    for r in &rows {
        match &r.error {
            Some(e) => writeln!(out, "{:<34} skipped: {e}", r.cand.label)?,
            None => writeln!(
                out,
                "{:<34} {:>22} {:>12} {:>9.1} {:>9.1} {:>8.2}{}",
                r.cand.label,
                if r.cand.place.is_some() {
                    format!("{} / {}", gib(r.vram_planned), gib(r.vram_used))
                } else {
                    "-".into()
                },
                gib(r.ram),
                r.pp,
                r.tg,
                r.turn_s(),
                match (budget.is_some_and(|b| r.vram_used > b), r.vram_error_pct()) {
                    (true, _) => "  over budget".to_string(),
                    (false, Some(e)) if e.abs() > 5.0 => format!("  VRAM {e:+.1}% off the plan"),
                    _ => String::new(),
                }
            )?,
        }
    }
    writeln!(
        out,
        "winner: {} (a turn of {TURN_PROMPT} prompt + {TURN_GEN} generated tokens in {:.2} s)",
        p.plan,
        best.turn_s()
    )?;
    writeln!(out, "manual flags: {}", p.flags())?;
    if let Some(s) = saved {
        writeln!(
            out,
            "profile saved: {} (run, chat and bench use it; --no-profile to ignore)",
            s.display()
        )?;
    }
    Ok(())
}

/// The batch sizes of `sizes` that differ on a `prompt`-token measurement: those below it, and
/// the first that takes it whole (larger ones would run the same passes).
fn batches(sizes: &[usize], prompt: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for &b in sizes {
        let eff = b.min(prompt);
        if !out.iter().any(|&o| o.min(prompt) == eff) {
            out.push(b);
        }
    }
    out
}

/// The measured plan with the fastest turn that stays within `budget`.
fn fastest(rows: &[Row], budget: Option<u64>) -> Option<&Row> {
    rows.iter()
        .filter(|r| r.turn_s().is_finite() && budget.is_none_or(|b| r.vram_used <= b))
        .min_by(|x, y| x.turn_s().total_cmp(&y.turn_s()))
}

fn first_error(rows: &[Row]) -> String {
    rows.iter()
        .find_map(|r| r.error.clone())
        .unwrap_or_else(|| "the time limit ran out first".into())
}

/// GPU plans: everything on the GPU when it fits; else the planner's spread with two staging
/// buffers (measured first, gathering routing statistics) and with one, then the same numbers
/// of RAM layers chosen by routing, then a larger prompt batch and half the threads for the
/// best so far. (More RAM layers than the budget needs are never tried: they only add DRAM
/// traffic; the staging choice is what trades a layer for prefill overlap.)
#[allow(clippy::too_many_arguments)]
fn gpu_plans(
    g: &Model,
    a: &Options,
    prompt: &[u32],
    n_ctx: usize,
    budget: u64,
    physical: usize,
    ram_free: Option<u64>,
    rows: &mut Vec<Row>,
    started: Instant,
) -> Result<()> {
    let plan_for = |place: &PlacementArgs| load::plan_for_budget(g, place, n_ctx);
    let by_budget = |staging: usize| PlacementArgs {
        gpu_mem: Some(budget),
        staging_buffers: Some(staging),
        ..Default::default()
    };
    let first = match plan_for(&by_budget(2)) {
        Ok(p) => p,
        Err(e) => {
            let fits = largest_context(g, budget, n_ctx);
            bail!(
                "{e:#}{}",
                match fits {
                    Some(c) => format!("; the largest context that fits this budget is {c} tokens"),
                    None => "; no context fits this budget".into(),
                }
            );
        }
    };
    let named = |ram: Vec<usize>, staging: usize| PlacementArgs {
        n_gpu_layers: Some(999),
        gpu_mem: Some(budget),
        experts_in_ram: Some(ram),
        staging_buffers: Some(staging),
        ..Default::default()
    };
    let cand = |label: String, place: PlacementArgs, batch: usize| Candidate {
        label,
        threads: physical,
        batch,
        place: Some(place),
    };
    if first.expert_layers_in_ram.is_empty() {
        let cands = batches(&[512, 1024, 2048], prompt.len())
            .into_iter()
            .map(|b| cand(format!("all on the GPU b={b}"), named(vec![], 0), b))
            .collect();
        return measure_all(a, prompt, n_ctx, ram_free, cands, rows, started);
    }
    let spread2 = first.expert_layers_in_ram.clone();
    let spread1 = plan_for(&by_budget(1))?.expert_layers_in_ram;
    let mut cands = vec![
        cand(
            format!("{} RAM layers, spread, 2 staging", spread2.len()),
            named(spread2.clone(), 2),
            512,
        ),
        cand(
            format!("{} RAM layers, spread, 1 staging", spread1.len()),
            named(spread1.clone(), 1),
            512,
        ),
    ];
    measure_all(
        a,
        prompt,
        n_ctx,
        ram_free,
        cands.drain(..1).collect(),
        rows,
        started,
    )?;
    let usage = rows.last().map(|r| r.usage.clone()).unwrap_or_default();
    if !usage.is_empty() {
        for (n, staging) in [(spread2.len(), 2), (spread1.len(), 1)] {
            let ram = concentrated_layers(&usage, n);
            cands.push(cand(
                format!("{n} RAM layers, by routing, {staging} staging"),
                named(ram, staging),
                512,
            ));
        }
    }
    measure_all(a, prompt, n_ctx, ram_free, cands, rows, started)?;
    // For the best plan so far: a larger prompt batch (fewer copies per prompt token), then
    // half the threads (the CPU's share of decode is DRAM-bound; fewer threads may contend less
    // with the copies).
    let best = |rows: &[Row]| fastest(rows, Some(budget)).map(|r| r.cand.clone());
    if let Some(mut c) = best(rows) {
        if batches(&[512, 1024], prompt.len()).contains(&1024) {
            c.batch = 1024;
            c.label = format!("{} b=1024", c.label);
            measure_all(a, prompt, n_ctx, ram_free, vec![c], rows, started)?;
        }
    }
    // The hot-expert cache (the plans above have the default, an eighth of the budget):
    // none, and twice as much (more RAM layers, fewer copies in decode).
    if let Some(c) = best(rows) {
        let staging = c
            .place
            .as_ref()
            .and_then(|p| p.staging_buffers)
            .unwrap_or(2);
        let mut more = Vec::new();
        for (what, cache) in [
            ("no expert cache", 0),
            ("expert cache x2", 2 * budget / DEFAULT_CACHE_SHARE),
        ] {
            let place = PlacementArgs {
                expert_cache: Some(cache),
                ..by_budget(staging)
            };
            if let Ok(p) = plan_for(&place) {
                let ram = p.expert_layers_in_ram;
                let label = format!(
                    "{} RAM layers, spread, {staging} staging, {what}",
                    ram.len()
                );
                let named = PlacementArgs {
                    expert_cache: Some(cache),
                    ..named(ram, staging)
                };
                more.push(Candidate {
                    label,
                    place: Some(named),
                    ..c.clone()
                });
            }
        }
        measure_all(a, prompt, n_ctx, ram_free, more, rows, started)?;
    }
    if let Some(mut c) = best(rows).filter(|_| physical >= 4) {
        c.threads = physical / 2;
        c.label = format!("{} t={}", c.label, c.threads);
        measure_all(a, prompt, n_ctx, ram_free, vec![c], rows, started)?;
    }
    Ok(())
}

/// The largest context (at most `asked`) whose state fits `budget` with every expert in RAM and
/// one staging buffer, or None.
fn largest_context(g: &Model, budget: u64, asked: usize) -> Option<usize> {
    let fits = |ctx: usize| {
        let place = PlacementArgs {
            gpu_mem: Some(budget),
            n_cpu_moe: usize::MAX,
            staging_buffers: Some(1),
            ..Default::default()
        };
        load::plan_for_budget(g, &place, ctx).is_ok()
    };
    if !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1usize, asked);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// Measures candidates in order while the time limit allows (a candidate starts only when the
/// slowest one so far would still finish in time), with a progress bar on stderr.
#[allow(clippy::too_many_arguments)]
fn measure_all(
    a: &Options,
    prompt: &[u32],
    n_ctx: usize,
    ram_free: Option<u64>,
    cands: Vec<Candidate>,
    rows: &mut Vec<Row>,
    started: Instant,
) -> Result<()> {
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.time.as_secs().max(1))
    };
    bar.set_style(
        ProgressStyle::with_template("tune [{bar:30}] {elapsed} of {duration}, eta {eta} {msg}")
            .map_err(|e| anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let mut slowest = rows.iter().map(|r| r.secs).fold(0f64, f64::max);
    for c in cands {
        let elapsed = started.elapsed().as_secs_f64();
        if !rows.is_empty() && elapsed + slowest > a.time.as_secs_f64() {
            break;
        }
        bar.set_position(elapsed as u64);
        bar.set_message(c.label.clone());
        let t0 = Instant::now();
        let row = measure(a, prompt, n_ctx, ram_free, c)?;
        let secs = t0.elapsed().as_secs_f64();
        slowest = slowest.max(secs);
        rows.push(Row { secs, ..row });
    }
    bar.finish_and_clear();
    Ok(())
}

/// Loads the model (a fresh mapping) with candidate `c`, measures pp over `prompt` (in batches
/// of c.batch), tg over a.n_gen tokens (the faster of two runs), and the VRAM the backend
/// really holds at the end (its memory pool keeps the peak of the compute buffers).
fn measure(
    a: &Options,
    prompt: &[u32],
    n_ctx: usize,
    ram_free: Option<u64>,
    c: Candidate,
) -> Result<Row> {
    let mut row = Row {
        cand: c.clone(),
        ram_layers: Vec::new(),
        staging: 0,
        cache: 0,
        vram_planned: 0,
        vram_used: 0,
        ram: 0,
        pp: 0.0,
        tg: 0.0,
        error: None,
        usage: Vec::new(),
        secs: 0.0,
    };
    // A model of its own: the packed copies of its RAM-side weights go with it.
    let g = &Model::open(&a.model)?;
    let mut free_before = 0u64;
    let dev: Option<DeviceWeights> = match &c.place {
        None => None,
        Some(place) => {
            let plan = match load::plan_for_budget(g, place, n_ctx) {
                Ok(p) => p,
                Err(e) => {
                    row.error = Some(format!("{e:#}"));
                    return Ok(row);
                }
            };
            row.ram_layers = plan.expert_layers_in_ram.clone();
            row.staging = staging_count(g, &plan);
            row.cache = plan.cache_bytes;
            row.vram_planned = plan.gpu_weight_bytes
                + plan.reserved_bytes
                + plan.state_bytes
                + plan.staging_bytes
                + plan.cache_bytes;
            let gpu = Gpu::open(0)?;
            gpu.release_pool()?;
            free_before = gpu.memory()?.0 as u64;
            let names = g.tensors().map(|t| t.name.clone());
            Some(DeviceWeights::new(gpu, plan, names))
        }
    };
    let opts = crate::model::LoadOptions {
        repack: true,
        device: dev.as_ref(),
        pass: Default::default(),
    };
    let cpu_bytes = dev.as_ref().map_or_else(
        || g.tensors().map(|t| t.size_bytes).sum(),
        |d| d.plan.cpu_weight_bytes,
    );
    if let Some(free) = ram_free {
        if cpu_bytes > free {
            row.error = Some(format!(
                "needs {:.1} GiB of RAM for weights, {:.1} GiB available",
                cpu_bytes as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            ));
            return Ok(row);
        }
    }
    // A plan the device cannot hold fails here (an allocation error): a row, not the end.
    let m = match crate::model::load_with(g, opts) {
        Ok(m) => m,
        Err(e) => {
            row.error = Some(format!("{e:#}"));
            return Ok(row);
        }
    };
    row.ram = cpu_bytes;
    let cpu = Cpu::new(load::threads(c.threads, true), Precision::Normal)?;
    let r = (|| -> Result<(f64, f64)> {
        let mut st = m.new_state(n_ctx, cpu.kv)?;
        // Warm-up: a short prompt and a few tokens (kernels, caches, page-locking).
        let warm = &prompt[..prompt.len().min(16)];
        m.forward(&cpu, &mut st, warm, false)?;
        st.clear()?;
        let t0 = Instant::now();
        for chunk in prompt.chunks(c.batch.max(1)) {
            m.forward(&cpu, &mut st, chunk, false)?;
        }
        let pp = prompt.len() as f64 / t0.elapsed().as_secs_f64();
        // Generation twice from an empty context, the faster kept: a few dozen tokens vary by
        // ~10% between runs, and a slow one is disturbance, not the plan.
        let n_gen = a.n_gen.clamp(1, n_ctx - 1);
        let mut tg = 0f64;
        for _ in 0..2 {
            st.clear()?;
            let mut tok = prompt[0];
            let t0 = Instant::now();
            for _ in 0..n_gen {
                let l = m.forward(&cpu, &mut st, &[tok], false)?;
                tok = crate::sample::argmax(&l) as u32;
            }
            tg = tg.max(n_gen as f64 / t0.elapsed().as_secs_f64());
        }
        Ok((pp, tg))
    })();
    match r {
        Ok((pp, tg)) => {
            row.pp = pp;
            row.tg = tg;
        }
        Err(e) => row.error = Some(format!("{e:#}")),
    }
    row.usage = m.expert_usage().unwrap_or_default();
    if let Some(d) = &dev {
        let free_after = d.gpu.memory()?.0 as u64;
        row.vram_used = free_before.saturating_sub(free_after);
    }
    Ok(row)
}

/// Staging buffers a plan reserved (its staging bytes over one buffer's size).
fn staging_count(g: &Model, plan: &Plan) -> usize {
    if plan.staging_bytes == 0 {
        return 0;
    }
    let one = crate::backend::placement::staging_buffer_bytes(g);
    plan.staging_bytes.checked_div(one).unwrap_or(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_that_run_the_same_passes_are_tried_once() {
        assert_eq!(batches(&[512, 256, 1024], 1024), vec![512, 256, 1024]);
        assert_eq!(batches(&[512, 256, 1024], 512), vec![512, 256]);
        assert_eq!(batches(&[512, 256, 1024], 40), vec![512]);
        assert_eq!(batches(&[512, 1024, 2048], 1024), vec![512, 1024]);
    }

    /// The largest context that fits a budget does fit, one more token does not, and a budget
    /// below the non-expert weights fits none.
    #[test]
    fn the_largest_context_that_fits_is_exact() {
        let dir = std::env::var_os("GGRUN_FIXTURES").map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
            PathBuf::from,
        );
        let g = Model::open(&dir.join("nemo-tiny-q4_0.gguf")).expect("the fixture model");
        let fits = |budget: u64, ctx: usize| {
            let place = PlacementArgs {
                gpu_mem: Some(budget),
                n_cpu_moe: usize::MAX,
                staging_buffers: Some(1),
                ..Default::default()
            };
            load::plan_for_budget(&g, &place, ctx).is_ok()
        };
        let base = load::plan_for_budget(
            &g,
            &PlacementArgs {
                gpu_mem: Some(u64::MAX / 2),
                n_cpu_moe: usize::MAX,
                staging_buffers: Some(1),
                ..Default::default()
            },
            1,
        )
        .unwrap();
        let per_token =
            crate::backend::placement::state_bytes(&g, 2, crate::backend::state::KvType::F16)
                .unwrap()
                - crate::backend::placement::state_bytes(&g, 1, crate::backend::state::KvType::F16)
                    .unwrap();
        assert!(per_token > 0);
        let fixed = base.gpu_weight_bytes + base.reserved_bytes + base.staging_bytes;
        let budget = fixed + base.state_bytes + 1000 * per_token;
        let c = largest_context(&g, budget, 1 << 20).unwrap();
        assert!(fits(budget, c) && !fits(budget, c + 1), "{c}");
        // At least the room given (more: the staging buffer is optional and left out when the
        // state needs its room).
        assert!(c >= 1000, "{c}");
        assert_eq!(largest_context(&g, budget, 500), Some(500));
        assert_eq!(largest_context(&g, fixed / 2, 100), None);
    }

    #[test]
    fn concentrated_routing_goes_to_ram_first() {
        use crate::routing::effective_experts;
        let uniform = vec![10u64; 8];
        let skewed = vec![70, 2, 2, 2, 1, 1, 1, 1];
        let half = vec![20, 20, 20, 20, 0, 0, 0, 0];
        assert!((effective_experts(&uniform) - 8.0).abs() < 1e-9);
        assert!((effective_experts(&half) - 4.0).abs() < 1e-9);
        assert!(effective_experts(&skewed) < effective_experts(&half));
        let usage = vec![(1, uniform), (3, skewed), (5, half)];
        assert_eq!(concentrated_layers(&usage, 1), vec![3]);
        assert_eq!(concentrated_layers(&usage, 2), vec![3, 5]);
        assert_eq!(concentrated_layers(&usage, 0), Vec::<usize>::new());
    }
}
