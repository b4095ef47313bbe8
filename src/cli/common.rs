//! What `run` and `chat` share: model, sampling and reasoning flags; loading a model with a
//! progress bar; Ctrl-C handling.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use rayon::prelude::*;

use crate::backend::cpu::Cpu;
use crate::backend::cuda::{DeviceWeights, Gpu};
use crate::backend::placement::{PlacementArgs, Plan};
use crate::chat::template::{ChatTemplate, Limits};
use crate::generate::PREFILL_BATCH;
use crate::gguf::{Metadata, Model};
use crate::model::Forward;
use crate::sample::SamplerConfig;
use crate::tokenizer::Tokenizer;

/// Set by Ctrl-C while a reply is being generated; the generation loop stops at the next token.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// True while generating: Ctrl-C then stops the reply instead of the program.
pub static GENERATING: AtomicBool = AtomicBool::new(false);

/// The error a command returns when Ctrl-C stopped it (exit status 130).
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}
impl std::error::Error for Interrupted {}

/// Ctrl-C: while generating, stop the reply (a second press exits); otherwise exit (130).
pub fn install_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) && !INTERRUPTED.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = crossterm::terminal::disable_raw_mode();
        eprintln!();
        std::process::exit(130);
    });
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The .gguf model file.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// Threads (default: physical cores).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
    /// Prompt tokens per forward pass (default 512).
    #[arg(short = 'b', long = "batch-size", default_value_t = 0)]
    pub batch_size: usize,
    /// Ignore the settings `ggrun tune` saved for this model.
    #[arg(long = "no-profile")]
    pub no_profile: bool,
    /// Exact mode: f32 weights, activations and KV cache (also GGRUN_EXACT=1).
    #[arg(long)]
    pub exact: bool,
    #[command(flatten)]
    pub template: TemplateFlags,
    /// No progress bar, no timings on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Keep weights only in the file's layout (no packed copies for the eight-row kernels:
    /// less memory, slower on CPUs that have those kernels).
    #[arg(long)]
    pub no_repack: bool,
    #[command(flatten)]
    pub place: PlacementFlags,
}

/// Which chat template, how messages reach it, and what a render may spend.
#[derive(Args, Debug, Clone)]
pub struct TemplateFlags {
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long = "chat-template", value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Read special-token text typed in messages (e.g. `<|im_end|>`) as control tokens, as
    /// llama.cpp and Ollama do (default: it reaches the model as the text it is, so that no
    /// message can forge a turn).
    #[arg(long = "parse-message-specials")]
    pub parse_message_specials: bool,
    /// Instructions a chat template may run per render.
    #[arg(long = "template-fuel", value_name = "N", default_value_t = Limits::default().fuel)]
    pub fuel: u64,
    /// Most text a chat template may write per render (e.g. 64MiB).
    #[arg(long = "template-max-output", value_name = "SIZE", value_parser = parse_size, default_value = "64MiB")]
    pub max_output: u64,
    /// Most memory a chat template may use per render (e.g. 512MiB; enforced on Linux, where
    /// templates render in a child process).
    #[arg(long = "template-max-memory", value_name = "SIZE", value_parser = parse_size, default_value = "512MiB")]
    pub max_memory: u64,
}

impl TemplateFlags {
    /// The template these flags ask for (a file, else the model's), rendered in a child
    /// process under their limits, shielding messages unless `--parse-message-specials`.
    pub fn load(&self, md: &Metadata, tok: &Tokenizer) -> Result<ChatTemplate> {
        let mut t = ChatTemplate::for_model(md, tok, self.chat_template.as_deref())?;
        if self.parse_message_specials {
            t.shield = None;
        }
        t.set_limits(Limits {
            fuel: self.fuel,
            max_output: self.max_output,
            max_memory: self.max_memory,
            isolate: true,
        });
        Ok(t)
    }
}

/// Where weights go when a CUDA GPU is present (llama.cpp's flags, and a VRAM budget).
#[derive(Args, Debug, Clone, Default)]
pub struct PlacementFlags {
    /// Layers on the GPU (`-ngl N` works too), counted from the last; more than the model has
    /// puts the output head there too (default: none, or all with --gpu-mem).
    #[arg(long = "n-gpu-layers")]
    pub n_gpu_layers: Option<usize>,
    /// Keep the routed experts of the first N layers in RAM.
    #[arg(long = "n-cpu-moe", default_value_t = 0)]
    pub n_cpu_moe: usize,
    /// VRAM budget (e.g. 24GiB): non-expert weights and buffers first, then as many whole expert
    /// layers as fit.
    #[arg(long = "gpu-mem", value_parser = parse_size)]
    pub gpu_mem: Option<u64>,
    /// Keep exactly these layers' routed experts in RAM (comma-separated layer numbers; the
    /// others must fit the GPU): a plan as `ggrun tune` names it.
    #[arg(long = "experts-in-ram", value_delimiter = ',', value_name = "LAYERS")]
    pub experts_in_ram: Option<Vec<usize>>,
    /// At most this many staging buffers for RAM experts (0-2; default: two where they fit, so
    /// that prefill copies the next RAM layer while the GPU computes).
    #[arg(long = "staging-buffers", value_name = "N")]
    pub staging_buffers: Option<usize>,
    /// VRAM for a cache of the most used experts of the layers whose experts stay in RAM
    /// (e.g. 2GiB; taken from --gpu-mem before whole expert layers; default an eighth of
    /// --gpu-mem when experts spill, 0 turns it off): decode computes cached experts on the
    /// GPU, and the experts it copies over replace the least used.
    #[arg(long = "expert-cache", value_parser = parse_size, value_name = "SIZE")]
    pub expert_cache: Option<u64>,
    /// Sequences whose state the plan reserves (the server's `--parallel`; 0 counts as 1).
    #[arg(skip)]
    pub sequences: usize,
}

impl PlacementFlags {
    /// The flags as the planner takes them.
    pub fn args(&self) -> PlacementArgs {
        PlacementArgs {
            n_gpu_layers: self.n_gpu_layers,
            n_cpu_moe: self.n_cpu_moe,
            gpu_mem: self.gpu_mem,
            sequences: self.sequences,
            experts_in_ram: self.experts_in_ram.clone(),
            staging_buffers: self.staging_buffers,
            expert_cache: self.expert_cache,
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::backend::placement::parse_size(s).map_err(|e| e.to_string())
}

/// Device memory kept free beside the weights for the products' activations (a 512-token
/// batch in and out of the widest matrix, with room to spare).
const COMPUTE_RESERVE: u64 = 512 << 20;

/// Free device memory left unplanned (the CUDA context, the kernels, allocator slack).
pub const DEVICE_MARGIN: u64 = 256 << 20;

/// The context a run of `g` gets when `asked` for (0: the model's trained length, at most 4096),
/// known before loading: what the planner sizes the device state for.
pub fn planned_context(g: &Model, asked: usize) -> usize {
    let trained = g
        .architecture()
        .ok()
        .and_then(|a| g.metadata().get_usize(&format!("{a}.context_length")).ok())
        .unwrap_or(4096);
    context_size(asked, trained)
}

/// The plan the flags make for `g` against their budget alone (no device is opened: this is
/// what `info` reports) with the state of an `n_ctx`-token context, or None when they ask for
/// no GPU.
pub fn plan_without_device(
    g: &Model,
    flags: &PlacementFlags,
    n_ctx: usize,
) -> Result<Option<Plan>> {
    let args = flags.args();
    if !args.wants_gpu() {
        return Ok(None);
    }
    Plan::new(g, &args, COMPUTE_RESERVE, n_ctx).map(Some)
}

/// The plan `flags` make for `g` at an `n_ctx`-token context against their budget (`tune`'s
/// candidates; no device is opened).
pub fn plan_for_budget(g: &Model, flags: &PlacementFlags, n_ctx: usize) -> Result<Plan> {
    Plan::new(g, &flags.args(), COMPUTE_RESERVE, n_ctx)
}

/// The weights the flags put on the GPU, or None: when the flags ask for no GPU, or when there is
/// none (said in one line on stderr; the CPU then runs everything). A plan that cannot fit the
/// budget is an error.
pub fn device_weights(
    g: &Model,
    flags: &PlacementFlags,
    quiet: bool,
    n_ctx: usize,
) -> Result<Option<DeviceWeights>> {
    let args = flags.args();
    if !args.wants_gpu() {
        return Ok(None);
    }
    let gpu = match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("no GPU ({e:#}): running on the CPU");
            return Ok(None);
        }
    };
    // Never plan for more than the device has free: a larger --gpu-mem, or -ngl alone on a
    // model that does not fit, keeps whole expert layers in RAM instead of failing to allocate.
    let (free, _) = gpu.memory()?;
    let free = (free as u64).saturating_sub(DEVICE_MARGIN);
    let mut args = args;
    if args.gpu_mem.is_some_and(|b| b > free) && !quiet {
        eprintln!(
            "warning: --gpu-mem is more than the {:.1} GiB free on {}; planning for that",
            free as f64 / (1u64 << 30) as f64,
            gpu.name
        );
    }
    args.gpu_mem = Some(args.gpu_mem.map_or(free, |b| b.min(free)));
    let plan = Plan::new(g, &args, COMPUTE_RESERVE, n_ctx)?;
    if !quiet {
        eprintln!("{}: {}", gpu.name, plan.summary());
    }
    let names = g.tensors().map(|t| t.name.clone());
    Ok(Some(DeviceWeights::new(gpu, plan, names)))
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy (default: the model's recommendation, else 0.8).
    #[arg(long = "temp")]
    pub temp: Option<f32>,
    /// Keep the K most likely tokens; 0 keeps all (default: model's, else 40).
    #[arg(long = "top-k")]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold; 1 disables (default: model's, else 0.95).
    #[arg(long = "top-p")]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the top token's probability (default: model's, else 0.05).
    #[arg(long = "min-p")]
    pub min_p: Option<f32>,
    /// Penalty for repeating recent tokens; 1 disables.
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Penalty for tokens present in the recent window; 0 disables.
    #[arg(long = "presence-penalty", default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Penalty growing with a token's count in the recent window; 0 disables.
    #[arg(long = "frequency-penalty", default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed: the same seed and inputs give the same output (default: random).
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct ThinkArgs {
    /// Reasoning on or off (default: the model's own).
    #[arg(long = "think", value_enum)]
    pub think: Option<OnOff>,
    /// After N thinking tokens, close the thinking block and let the model answer.
    #[arg(long = "think-budget", value_name = "N")]
    pub think_budget: Option<usize>,
}

impl ThinkArgs {
    pub fn enable(&self) -> Option<bool> {
        self.think.map(|t| t == OnOff::On)
    }
}

impl SamplingArgs {
    /// The sampler settings: flags first, then the model's recommended values
    /// (`general.sampling.*`), then llama.cpp's defaults. Returns the seed used too.
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
        }
    }
}

/// The context size: asked, else the model's trained length capped at 4096.
pub fn context_size(asked: usize, n_ctx_train: usize) -> usize {
    if asked > 0 {
        asked
    } else if n_ctx_train > 0 {
        n_ctx_train.min(4096)
    } else {
        4096
    }
}

/// Reads every page of the mapped model once so the first tokens do not stall on page faults,
/// with a progress bar on stderr when that takes more than a moment. Skipped when the model
/// does not fit in available memory (sparse MoE models then fault in only what they use).
pub fn prefault(g: &Model, quiet: bool) -> Result<()> {
    let total: u64 = g.parts.iter().map(|p| p.bytes().len() as u64).sum();
    if crate::backend::cpu::available_memory().is_some_and(|m| total > m / 10 * 9) {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::hidden(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "loading {bar:30} {binary_bytes}/{binary_total_bytes} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let shown = AtomicBool::new(false);
    const CHUNK: usize = 16 << 20;
    for part in &g.parts {
        part.bytes().par_chunks(CHUNK).for_each(|chunk| {
            let mut sum = 0u8;
            for page in chunk.chunks(4096) {
                sum = sum.wrapping_add(page[0]);
            }
            std::hint::black_box(sum);
            bar.inc(chunk.len() as u64);
            if !quiet
                && start.elapsed() > Duration::from_millis(300)
                && !shown.swap(true, Ordering::Relaxed)
            {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
        });
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!(Interrupted);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// What `run` and `chat` need from a model file before generating.
pub struct Loaded<'g> {
    pub model: Box<dyn Forward + 'g>,
    pub tok: Tokenizer,
    pub cpu: Cpu,
    pub n_ctx: usize,
    /// Prompt tokens per forward pass.
    pub batch: usize,
}

/// The tokenizer (its warnings printed unless quiet), the architecture, the model's pages read
/// once behind a progress bar, the CPU backend and the context size, for these flags.
pub fn load<'g>(
    g: &'g Model,
    device: Option<&'g DeviceWeights>,
    args: &ModelArgs,
) -> Result<Loaded<'g>> {
    let tok = Tokenizer::from_metadata(g.metadata())?;
    if !args.quiet {
        tok.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    }
    let precision = super::precision(args.exact);
    crate::model::check_architecture(g)?;
    prefault(g, args.quiet)?;
    let opts = crate::model::LoadOptions {
        repack: super::repack(args.no_repack, precision, g),
        device,
    };
    let model = crate::model::load_with(g, opts)?;
    let cpu = Cpu::new(threads(args.threads, args.quiet), precision)?;
    let trained = model.n_ctx_train();
    if args.ctx_size > trained && trained > 0 && !args.quiet {
        eprintln!(
            "warning: -c {} is above the {trained} tokens this model was trained on; expect worse answers past them",
            args.ctx_size
        );
    }
    let n_ctx = context_size(args.ctx_size, trained);
    Ok(Loaded {
        model,
        tok,
        cpu,
        n_ctx,
        batch: batch_size(args.batch_size),
    })
}

/// The threads `asked` for (0: the physical cores), at most the CPUs this process may use
/// (more only contend for them; said unless `quiet`).
pub fn threads(asked: usize, quiet: bool) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if asked > cpus {
        if !quiet {
            eprintln!("warning: -t {asked} is more than the {cpus} CPUs available; using {cpus}");
        }
        return cpus;
    }
    asked
}

/// The prompt batch `asked` for (0: [`PREFILL_BATCH`]).
pub fn batch_size(asked: usize) -> usize {
    if asked == 0 {
        PREFILL_BATCH
    } else {
        asked
    }
}

/// Fills what `args` leaves open from the model's tuned profile (see [`crate::profile`]).
pub fn apply_profile(args: &mut ModelArgs) -> Result<()> {
    let open = crate::profile::Open {
        ctx_size: &mut args.ctx_size,
        threads: &mut args.threads,
        batch_size: &mut args.batch_size,
        place: &mut args.place,
    };
    crate::profile::apply(&args.model, open, args.no_profile, args.quiet)?;
    Ok(())
}

/// "N tokens, S s (R tok/s)".
pub fn rate(tokens: usize, secs: f64) -> String {
    let r = if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    };
    format!("{tokens} tokens, {secs:.2} s ({r:.1} tok/s)")
}
