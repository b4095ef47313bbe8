//! Loading a model for a run, below the command line: the options a run is made with, the
//! context it gets, the plan that puts weights on a GPU, the threads, the model's pages read in
//! behind a progress bar, and the CPU backend; the interrupt flags that stop long work.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Precision};
use crate::backend::cuda::{DeviceWeights, Gpu, PassOptions};
use crate::backend::placement::{PlacementArgs, Plan};
use crate::backend::state::{KvType, KvTypes};
use crate::chat::template::TemplateOptions;
use crate::generate::PREFILL_BATCH;
use crate::gguf::Model;
use crate::model::Forward;
use crate::tokenizer::Tokenizer;

/// How to load and run a model: what `run`, `chat`, `serve` and `bench` take from their flags
/// (0 or None: the default, or the tuned profile's).
#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub model: PathBuf,
    /// The model as the user named it (a path, or an Ollama or Hugging Face name).
    pub name: String,
    /// Context size in tokens (0: [`default_context`]).
    pub ctx_size: usize,
    /// Threads (0: the physical cores).
    pub threads: usize,
    /// Prompt tokens per forward pass (0: 512).
    pub batch_size: usize,
    /// Ignore the settings `ggrun tune` saved for this model.
    pub no_profile: bool,
    /// f32 weights, activations and KV cache.
    pub exact: bool,
    /// No progress bar, no timings on stderr.
    pub quiet: bool,
    /// Keep weights only in the file's layout (no packed copies).
    pub no_repack: bool,
    /// The types of KV caches held in host memory (`-ctk`/`-ctv`; exact mode keeps f32).
    pub kv: KvTypes,
    pub place: PlacementArgs,
    /// How a device-resident pass runs (measurement switches).
    pub pass: PassOptions,
    pub template: TemplateOptions,
}

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

/// Device memory kept free beside the weights for the products' activations (a 512-token
/// batch in and out of the widest matrix, with room to spare).
const COMPUTE_RESERVE: u64 = 512 << 20;

/// Free device memory left unplanned (the CUDA context, the kernels, allocator slack).
pub const DEVICE_MARGIN: u64 = 256 << 20;

/// Where a run's sequence states live, which the default context follows.
#[derive(Clone, Copy, Debug)]
pub enum StateMemory {
    /// Host memory: this many sequences with KV caches of these types.
    Host { sequences: usize, kv: KvTypes },
    /// A GPU: this many sequences in a budget of this many bytes, K/V rows of this type.
    Device {
        sequences: usize,
        budget: u64,
        kv: KvType,
    },
    /// Not known before loading ([`BASE_CONTEXT`] then).
    Unknown,
}

/// The context a run of `g` gets when it `asked` for that many tokens (0: [`default_context`]
/// capped by what fits where the states live), known before loading: what the planner sizes
/// the device state for.
pub fn planned_context(g: &Model, asked: usize, states: StateMemory) -> usize {
    if asked > 0 {
        return asked;
    }
    let fits = match states {
        StateMemory::Host { sequences, kv } => cpu_context_fit(g, sequences, kv),
        StateMemory::Device {
            sequences,
            budget,
            kv,
        } => device_context_fit(g, sequences, budget, kv),
        StateMemory::Unknown => None,
    };
    default_context(trained_context(g), fits)
}

/// The context length the file says the model was trained on (0: not said).
fn trained_context(g: &Model) -> usize {
    g.architecture()
        .ok()
        .and_then(|a| g.metadata().get_usize(&format!("{a}.context_length")).ok())
        .unwrap_or(0)
}

/// States in host memory for these options (a run without device weights).
fn host_states(opts: &ModelOptions) -> StateMemory {
    StateMemory::Host {
        sequences: opts.place.sequences.max(1),
        kv: precision(opts.exact).kv_types(opts.kv),
    }
}

/// The smallest default context (or the trained length, when shorter): what every run got
/// before the default followed the memory.
pub const BASE_CONTEXT: usize = 4096;

/// The share of the memory available at load, less the model file (which the OS caches), that
/// a default context's KV caches may take.
const DEFAULT_KV_SHARE: f64 = 0.5;

/// The default context: the model's `trained` length (unknown: [`BASE_CONTEXT`]), capped at
/// the `fits` tokens the memory holds (when known), and never below `BASE_CONTEXT` (or the
/// trained length when shorter), where a smaller cache would only lose what runs did before.
pub fn default_context(trained: usize, fits: Option<usize>) -> usize {
    let trained = if trained == 0 { BASE_CONTEXT } else { trained };
    let floor = trained.min(BASE_CONTEXT);
    fits.map_or(floor, |f| trained.min(f.max(floor)))
}

/// The share of a GPU budget a default context's device states may take when the whole model
/// does not fit beside them (one part in this many): more pushes expert layers into RAM.
const DEFAULT_DEVICE_STATE_SHARE: u64 = 8;

/// Tokens whose device states (`sequences` of them, K/V rows of type `kv`) fit a GPU `budget`:
/// the room the whole model file and the compute buffers leave, or an eighth of the budget
/// when that is more (the model spills anyway); None when the state size is unknown.
fn device_context_fit(g: &Model, sequences: usize, budget: u64, kv: KvType) -> Option<usize> {
    let at = |n| crate::backend::placement::state_bytes(g, n, kv).ok();
    let (fixed, per_token) = (at(0)?, at(2)?.checked_sub(at(1)?)?);
    Some(device_tokens(
        budget,
        g.file_bytes(),
        fixed,
        per_token,
        sequences,
    ))
}

/// Tokens of `per_token` bytes (beside `fixed` bytes) for each of `sequences` that fit the
/// room a `file` leaves in a GPU `budget` with the compute buffers, or an eighth of the budget
/// when that is more, in whole 256-token steps.
fn device_tokens(budget: u64, file: u64, fixed: u64, per_token: u64, sequences: usize) -> usize {
    let room = budget
        .saturating_sub(file + COMPUTE_RESERVE)
        .max(budget / DEFAULT_DEVICE_STATE_SHARE);
    let per_sequence = room / sequences.max(1) as u64;
    let tokens = per_sequence.saturating_sub(fixed) / per_token.max(1);
    usize::try_from(tokens).unwrap_or(usize::MAX) / 256 * 256
}

/// Tokens whose CPU KV caches (rows of types `kv`; `sequences` of them) fit the memory
/// available now beside the model file; None when either size is unknown.
fn cpu_context_fit(g: &Model, sequences: usize, kv: KvTypes) -> Option<usize> {
    let available = crate::backend::cpu::available_memory()?;
    let file: u64 = g.parts.iter().map(|p| p.bytes().len() as u64).sum();
    // The device layout's figure (f32 K and V rows) per token, scaled to these types' bytes
    // per 32 values (f32 128, f16 64, q8_0 34, q4_0 18).
    let at = |n| crate::backend::placement::state_bytes(g, n, KvType::F32).ok();
    let per_token_f32 = at(2)?.checked_sub(at(1)?)?;
    let per_32 = kv.k.bytes(32, 1)? + kv.v.bytes(32, 1)?;
    let per_token = per_token_f32 * per_32 / 256;
    Some(tokens_that_fit(available, file, per_token, sequences))
}

/// Tokens of `per_token` bytes for each of `sequences` that fit [`DEFAULT_KV_SHARE`] of the
/// memory `available` less the model `file`, in whole 256-token steps.
fn tokens_that_fit(available: u64, file: u64, per_token: u64, sequences: usize) -> usize {
    let budget = available.saturating_sub(file) as f64 * DEFAULT_KV_SHARE;
    let tokens = budget / (per_token.max(1) * sequences.max(1) as u64) as f64;
    (tokens as usize) / 256 * 256
}

/// The plan `place` makes for `g` against its budget alone (no device is opened: this is
/// what `info` reports) at the default context for that budget (unknown without --gpu-mem:
/// [`BASE_CONTEXT`]), or None when they ask for no GPU.
pub fn plan_without_device(g: &Model, place: &PlacementArgs) -> Result<Option<Plan>> {
    if !place.wants_gpu() {
        return Ok(None);
    }
    plan_with_context(g, place, 0).map(Some)
}

/// The plan `place` makes for `g` at an `n_ctx`-token context against its budget (`tune`'s
/// candidates; no device is opened).
pub fn plan_for_budget(g: &Model, place: &PlacementArgs, n_ctx: usize) -> Result<Plan> {
    plan(g, place, n_ctx)
}

/// The plan for `place` (its `gpu_mem` the budget) at `ctx_size` tokens, or (0) at the default
/// context for the budget, or the floor context ([`default_context`] with the memory unknown)
/// when the default's state leaves the weights no room.
fn plan_with_context(g: &Model, place: &PlacementArgs, ctx_size: usize) -> Result<Plan> {
    let states = match place.gpu_mem {
        Some(budget) => StateMemory::Device {
            sequences: place.sequences.max(1),
            budget,
            kv: place.device_kv(),
        },
        None => StateMemory::Unknown,
    };
    let n_ctx = planned_context(g, ctx_size, states);
    let floor = default_context(trained_context(g), None);
    match plan(g, place, n_ctx) {
        Err(_) if ctx_size == 0 && n_ctx > floor => plan(g, place, floor),
        planned => planned,
    }
}

/// The plan for `g`'s family's executor (what it allocates is what is reserved).
fn plan(g: &Model, place: &PlacementArgs, n_ctx: usize) -> Result<Plan> {
    let needs = crate::model::executor_needs(g)?;
    Plan::for_executor(g, place, COMPUTE_RESERVE, n_ctx, needs)
}

/// The weights `place` puts on the GPU, or None: when it asks for no GPU, or when there is
/// none (said in one line on stderr; the CPU then runs everything). The plan's context is
/// `ctx_size`, or (0) the default for the budget (see [`planned_context`]; the plan's `n_ctx`
/// says which). A plan that cannot fit the budget is an error.
pub fn device_weights(
    g: &Model,
    place: &PlacementArgs,
    quiet: bool,
    ctx_size: usize,
) -> Result<Option<DeviceWeights>> {
    let mut args = place.clone();
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
    if args.gpu_mem.is_some_and(|b| b > free) && !quiet {
        eprintln!(
            "warning: --gpu-mem is more than the {:.1} GiB free on {}; planning for that",
            free as f64 / (1u64 << 30) as f64,
            gpu.name
        );
    }
    args.gpu_mem = Some(args.gpu_mem.map_or(free, |b| b.min(free)));
    let plan = plan_with_context(g, &args, ctx_size)?;
    if !quiet {
        eprintln!("{}: {}", gpu.name, plan.summary());
    }
    let names = g.tensors().map(|t| t.name.clone());
    Ok(Some(DeviceWeights::new(gpu, plan, names)))
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

/// Opens the model `opts` name and puts on the GPU what their placement asks for, at the
/// context they plan for (the profile's settings applied first, where `opts` leave them open):
/// the file and its device weights, for [`load`].
pub fn open(opts: &mut ModelOptions) -> Result<(Model, Option<DeviceWeights>)> {
    apply_profile(opts)?;
    let g = Model::open(&opts.model)?;
    let dev = device_weights(&g, &opts.place, opts.quiet, opts.ctx_size)?;
    Ok((g, dev))
}

/// What a command needs from a model file before generating.
pub struct Loaded<'g> {
    pub model: Box<dyn Forward + 'g>,
    pub tok: Tokenizer,
    pub cpu: Cpu,
    pub n_ctx: usize,
    /// Prompt tokens per forward pass.
    pub batch: usize,
}

/// The tokenizer (its warnings printed unless quiet), the architecture, the model's pages read
/// once behind a progress bar, the CPU backend and the context size, for these options.
pub fn load<'g>(
    g: &'g Model,
    device: Option<&'g DeviceWeights>,
    args: &ModelOptions,
) -> Result<Loaded<'g>> {
    let tok = Tokenizer::from_metadata(g.metadata())?;
    if !args.quiet {
        tok.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    }
    let precision = precision(args.exact);
    crate::model::check_architecture(g)?;
    prefault(g, args.quiet)?;
    let opts = crate::model::LoadOptions {
        repack: repack(args.no_repack, precision, g),
        device,
        pass: args.pass,
    };
    let model = crate::model::load_with(g, opts)?;
    let cpu = Cpu::new(threads(args.threads, args.quiet), precision)?.with_kv_types(args.kv);
    if args.kv != KvTypes::F16 && !args.quiet {
        if args.place.wants_gpu() {
            eprintln!("note: q8_0/q4_0 caches are for layers run on the CPU; layers on the GPU keep an f16 cache");
        }
        if precision == Precision::Exact {
            eprintln!("note: exact mode keeps the KV cache in f32 (-ctk/-ctv ignored)");
        }
    }
    let trained = model.n_ctx_train();
    if args.ctx_size > trained && trained > 0 && !args.quiet {
        eprintln!(
            "warning: -c {} is above the {trained} tokens this model was trained on; expect worse answers past them",
            args.ctx_size
        );
    }
    let n_ctx = match device {
        Some(d) => d.plan.n_ctx,
        None => planned_context(g, args.ctx_size, host_states(args)),
    };
    if args.ctx_size == 0 && n_ctx > BASE_CONTEXT && !args.quiet {
        let why = if n_ctx == trained {
            "the model's trained length"
        } else if device.is_some() {
            "what fits the GPU budget beside the weights, or an eighth of it"
        } else {
            "what fits half the memory available"
        };
        eprintln!("context: {n_ctx} tokens ({why}; -c sets it)");
    }
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
pub fn apply_profile(args: &mut ModelOptions) -> Result<()> {
    let open = crate::profile::Open {
        ctx_size: &mut args.ctx_size,
        threads: &mut args.threads,
        batch_size: &mut args.batch_size,
        place: &mut args.place,
    };
    crate::profile::apply(&args.model, open, args.no_profile, args.quiet)?;
    Ok(())
}

/// Whether loading packs weights: not when asked not to, nor in exact mode (which dequantizes
/// from the file's layout), nor when the machine's available memory could not hold the model
/// as anonymous copies (they cannot be evicted the way mapped pages can; a warning says so).
pub fn repack(no_repack_flag: bool, precision: Precision, g: &Model) -> bool {
    if no_repack_flag || precision != Precision::Normal {
        return false;
    }
    match crate::backend::cpu::available_memory() {
        Some(avail) if g.file_bytes() + (512 << 20) > avail => {
            eprintln!(
                "warning: {:.1} GiB available is too little for packed weight copies of this {:.1} GiB model; using the file's layout (slower; --no-repack silences this)",
                avail as f64 / (1u64 << 30) as f64,
                g.file_bytes() as f64 / (1u64 << 30) as f64
            );
            false
        }
        _ => true,
    }
}

/// Exact precision when asked by flag or by GGRUN_EXACT=1; normal otherwise.
pub fn precision(exact_flag: bool) -> Precision {
    if exact_flag || std::env::var("GGRUN_EXACT").is_ok_and(|v| v == "1") {
        Precision::Exact
    } else {
        Precision::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::{default_context, device_tokens, tokens_that_fit, BASE_CONTEXT, COMPUTE_RESERVE};

    /// On a GPU: the room the whole model leaves, or an eighth of the budget when the model
    /// spills anyway, per sequence, less each sequence's fixed (Mamba) state.
    #[test]
    fn the_device_default_takes_the_room_left_or_an_eighth() {
        let gib = 1u64 << 30;
        // Nemotron 3 Nano's device state: f16 K and V rows of 6 attention layers, 2 KV heads
        // of 128; its Mamba states are the fixed part.
        let per_token = 6 * 2 * 2 * 128 * 2;
        let fixed = 50 << 20;
        // Q4_0 (17.8 GiB) in 24 GiB: what the file leaves (262144 tokens need 1.5 GiB).
        let q4 = device_tokens(24 * gib, 17 * gib + gib * 8 / 10, fixed, per_token, 1);
        let left = 24 * gib - (17 * gib + gib * 8 / 10) - COMPUTE_RESERVE - fixed;
        assert_eq!(q4, (left / per_token) as usize / 256 * 256);
        assert!(q4 >= 262_144, "{q4}");
        // Q8_0 (31.2 GiB) spills: an eighth of the budget.
        let q8 = device_tokens(24 * gib, 31 * gib, fixed, per_token, 1);
        assert_eq!(q8, ((3 * gib - fixed) / per_token) as usize / 256 * 256);
        // Four sequences share it.
        let four = device_tokens(24 * gib, 31 * gib, fixed, per_token, 4);
        assert_eq!(
            four,
            ((3 * gib / 4 - fixed) / per_token) as usize / 256 * 256
        );
        // A budget below the fixed state: no tokens (the floor context then applies).
        assert_eq!(device_tokens(100 << 20, gib, 200 << 20, per_token, 1), 0);
    }

    /// Half of what the model file leaves, split among the sequences, in 256-token steps.
    #[test]
    fn the_memory_share_divides_among_the_sequences() {
        let gib = 1u64 << 30;
        // Nemotron 3 Nano's f16 cache: 6 attention layers × K and V × 2 KV heads × 128 × 2 bytes.
        let per_token = 6 * 2 * 2 * 128 * 2;
        assert_eq!(tokens_that_fit(16 * gib, 4 * gib, per_token, 1), 1 << 20);
        assert_eq!(tokens_that_fit(16 * gib, 4 * gib, per_token, 4), 1 << 18);
        assert_eq!(tokens_that_fit(16 * gib, 4 * gib, 1000, 3) % 256, 0);
        assert!(tokens_that_fit(16 * gib, 4 * gib, 1000, 3) as u64 * 1000 * 3 <= 6 * gib);
        assert_eq!(tokens_that_fit(4 * gib, 8 * gib, per_token, 1), 0);
    }

    /// The trained length, capped by what fits, never below the old default (or the trained
    /// length when shorter); unknown memory or a GPU state keeps the old default.
    #[test]
    fn the_default_context_follows_the_memory_within_its_bounds() {
        assert_eq!(default_context(0, None), BASE_CONTEXT);
        assert_eq!(default_context(0, Some(1 << 20)), BASE_CONTEXT);
        assert_eq!(default_context(2048, None), 2048);
        assert_eq!(default_context(2048, Some(1 << 20)), 2048);
        assert_eq!(default_context(2048, Some(512)), 2048);
        assert_eq!(default_context(8192, None), BASE_CONTEXT);
        assert_eq!(default_context(8192, Some(100_000)), 8192);
        assert_eq!(default_context(1 << 20, Some(20_224)), 20_224);
        assert_eq!(default_context(1 << 20, Some(1000)), BASE_CONTEXT);
    }
}
