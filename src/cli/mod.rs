//! The command line: clap definitions and one function per subcommand. Results go to stdout,
//! diagnostics to stderr; every failure is one line and a non-zero exit.

mod chat;
pub mod common;
mod run;
mod serve;
mod spelling;
mod tune;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::backend::cpu::Cpu;
use crate::chat::template::{Message, RenderOptions};
use crate::engine::load;
use crate::gguf::Model;
use crate::info::ModelInfo;
use crate::routing::RoutingWindow;
use crate::sample::argmax;

#[derive(Parser, Debug)]
#[command(
    name = "ggrun",
    version,
    about = "GGUF-native LLM runner for sparse MoE and hybrid models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// One prompt in, one answer out (for scripts): the prompt from -p, -f or stdin goes
    /// through the chat template unless --raw; stdout carries only the answer.
    Run(run::RunArgs),
    /// An OpenAI- and Ollama-compatible HTTP server (chat/completions with streaming,
    /// completions, models, health; /api/chat and /api/tags).
    Serve(serve::ServeArgs),
    /// Interactive chat in the terminal (plain line mode when stdin is not a terminal).
    Chat(chat::ChatArgs),
    /// Print the prompt the chat template makes of a conversation (to compare with other
    /// runners, or to debug a --chat-template file).
    Template {
        /// The model: a .gguf file, or a name in Ollama's store or the Hugging Face cache.
        #[arg(short = 'm', long = "model", value_name = "FILE|NAME", value_parser = common::model_path)]
        model: PathBuf,
        #[command(flatten)]
        template: common::TemplateFlags,
        /// The conversation: a JSON array of messages as the OpenAI or Ollama chat APIs take
        /// them (tool calls and results included; default: one user message, "Hello").
        #[arg(long, value_name = "FILE")]
        messages: Option<PathBuf>,
        /// Tool definitions: a JSON array, passed to the template as `tools`.
        #[arg(long, value_name = "FILE")]
        tools: Option<PathBuf>,
        /// Set enable_thinking (default: leave it to the template).
        #[arg(long, value_enum)]
        think: Option<common::OnOff>,
        /// Leave out the assistant header that asks for a reply.
        #[arg(long = "no-generation-prompt")]
        no_generation_prompt: bool,
    },
    /// Describe a GGUF model: architecture, size, tensor types, tokenizer, memory needs.
    Info {
        /// The model: a .gguf file (any part of a split one), or a name in Ollama's store or
        /// the Hugging Face cache.
        #[arg(value_name = "MODEL", value_parser = common::model_path, required_unless_present = "model_flag")]
        model: Option<PathBuf>,
        /// The model, as the positional argument.
        #[arg(short = 'm', long = "model", value_name = "FILE|NAME", value_parser = common::model_path, conflicts_with = "model")]
        model_flag: Option<PathBuf>,
        /// Print one JSON object instead of the text report.
        #[arg(long)]
        json: bool,
        /// With placement flags, also the plan they make (what goes to the GPU and what stays
        /// in RAM), computed from the file alone: no GPU is needed to plan for one.
        #[command(flatten)]
        place: common::PlacementFlags,
    },
    /// List the models ggrun finds by name: Ollama's store and the Hugging Face cache (names
    /// to give -m), with their size and whether they fit the GPU budget.
    #[command(visible_alias = "list")]
    Ls {
        /// The budget to judge against (default: the GPU's free memory, when there is one).
        #[arg(long = "gpu-mem", value_parser = common::parse_size, value_name = "SIZE")]
        gpu_mem: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the SIMD tier in use and the tiers this CPU supports.
    Cpu,
    /// Print the CUDA device ggrun would use (name, compute capability, memory, where its
    /// compiled kernels are cached), or why there is none.
    Gpu,
    /// Measured offload tuning: plans for a VRAM budget (expert layers in RAM, staging
    /// buffers, batch size, threads) measured with short runs; prints the table and the winner
    /// and saves it as the model's profile, which run, chat and bench then use.
    Tune(tune::TuneArgs),
    /// Prompt-processing and generation speed (tokens/s, median of repeats after a warm-up),
    /// like llama-bench's pp and tg: per repeat, a fresh context evaluates P random tokens in
    /// batches of -b (pp), and another generates N tokens one at a time (tg).
    Bench {
        /// The model: a .gguf file, or a name in Ollama's store or the Hugging Face cache.
        #[arg(short = 'm', long = "model", value_name = "FILE|NAME", value_parser = common::model_path)]
        model: PathBuf,
        /// Prompt tokens evaluated (pp).
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        n_prompt: usize,
        /// Prompt tokens per forward pass (default: the whole prompt in one, as llama-bench's
        /// pp with -ub of the prompt's size).
        #[arg(short = 'b', long = "batch-size", default_value_t = 0)]
        batch_size: usize,
        /// Ignore the settings `ggrun tune` saved for this model.
        #[arg(long = "no-profile")]
        no_profile: bool,
        /// Tokens generated one at a time (tg).
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        n_gen: usize,
        /// Tokens already in the context before each test (llama-bench's -d): pp and tg are
        /// measured at that depth (evaluated once, untimed, and restored before each test).
        #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
        depth: usize,
        /// Threads (default: physical cores).
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        /// Measured repeats (after one warm-up round).
        #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
        reps: usize,
        /// Sequences generating together in tg (as the server's --parallel slots do: one token
        /// of each per step); tg is then their aggregate tokens/s.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
        sequences: u64,
        /// Exact mode (also GGRUN_EXACT=1).
        #[arg(long)]
        exact: bool,
        /// Keep weights only in the file's layout (no packed copies for the eight-row kernels:
        /// less memory, slower on CPUs that have those kernels).
        #[arg(long)]
        no_repack: bool,
        #[command(flatten)]
        cache: common::CacheFlags,
        #[command(flatten)]
        place: common::PlacementFlags,
        #[command(flatten)]
        pass: common::PassFlags,
        /// One JSON object with pp_tok_s and tg_tok_s.
        #[arg(long)]
        json: bool,
        /// Also measure the memory-bandwidth roofline: the read bandwidth of the mapped file
        /// with these threads, taken right before each tg round, the weight bytes a token
        /// reads, and each round's tg as a share of bandwidth / bytes (median over rounds).
        #[arg(long)]
        roofline: bool,
        /// Also report routing: per MoE layer, how often each expert was selected over the
        /// last --routing-window tokens, the effective number of experts, and the share the
        /// hottest eighth and quarter of the experts take (what a cache of them would serve).
        /// Reading the counts costs some speed.
        #[arg(long)]
        routing_stats: bool,
        /// Tokens the routing statistics cover (the most recent ones).
        #[arg(long, default_value_t = 1024)]
        routing_window: u64,
    },
    /// Render a chat template for another ggrun process (the sandbox's child: a job in JSON on
    /// stdin, the prompt on stdout).
    #[command(name = "render-template", hide = true)]
    RenderTemplate,
    /// Write a synthetic model with random weights and a real model's widths (or a tiny one).
    #[command(name = "gen-model", hide = true)]
    GenModel {
        /// Preset: nemotron-3-nano, qwen3moe-30b-a3b, gpt-oss-20b, or a tiny decoder: qwen2,
        /// qwen3, qwen3moe, gemma3, gpt-oss.
        #[arg(long, default_value = "nemotron-3-nano")]
        preset: String,
        /// Tiny decoders: write every weight as F32 holding its quantized values.
        #[arg(long)]
        dequantized: bool,
        /// Layers: the first N of the model's (nemotron-3-nano: of its 52-layer pattern, default
        /// 8; the other presets: default all).
        #[arg(long)]
        layers: Option<usize>,
        /// Explicit layer pattern (M Mamba-2, E MoE, * attention, - dense MLP) instead of --layers.
        #[arg(long)]
        pattern: Option<String>,
        /// nemotron-3-nano: f32, q8_0, q4_0, q4_k_m (default), q3_k_m; qwen3moe-30b-a3b and
        /// gpt-oss-20b: f32, f16, q8_0, q4_0, q4_k_m (qwen's default), mxfp4 (gpt-oss's
        /// default), iq4_xs, iq3_xxs, iq2_xxs; tiny decoders: f32, q8_0 (default), q4_0, mxfp4.
        #[arg(long)]
        mix: Option<String>,
        /// Write only the header, the data a hole of the file's size (llama-quantize --dry-run
        /// reads nothing else).
        #[arg(long, hide = true)]
        skeleton: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Token ids of TEXT as one JSON array (BOS added when the model's metadata asks for it).
    Tokenize {
        /// The model: a .gguf file, or a name in Ollama's store or the Hugging Face cache.
        #[arg(short = 'm', long = "model", value_name = "FILE|NAME", value_parser = common::model_path)]
        model: PathBuf,
        /// Do not turn control tokens written in the text (e.g. <|im_start|>) into their ids.
        #[arg(long)]
        no_special: bool,
        /// Print [id, piece] pairs instead of ids.
        #[arg(long)]
        pieces: bool,
        text: String,
    },
    /// Logits of a token sequence: one batched prefill, then greedy decode steps one token at a
    /// time. Writes raw little-endian f32 rows (n_vocab each) and prints one JSON line.
    Logits {
        /// The model: a .gguf file, or a name in Ollama's store or the Hugging Face cache.
        #[arg(short = 'm', long = "model", value_name = "FILE|NAME", value_parser = common::model_path)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
        tokens: Vec<u32>,
        /// Greedy decode steps after the prefill.
        #[arg(long, default_value_t = 0)]
        decode: usize,
        #[arg(long)]
        out: PathBuf,
        /// Threads (default: physical cores).
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        /// Context size in tokens (default: prompt + decode steps).
        #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
        ctx_size: usize,
        /// Exact mode: weights dequantized to f32, activations and KV cache in f32
        /// (also GGRUN_EXACT=1).
        #[arg(long)]
        exact: bool,
        /// Keep weights only in the file's layout (no packed copies for the eight-row kernels:
        /// less memory, slower on CPUs that have those kernels).
        #[arg(long)]
        no_repack: bool,
        #[command(flatten)]
        cache: common::CacheFlags,
        #[command(flatten)]
        place: common::PlacementFlags,
        #[command(flatten)]
        pass: common::PassFlags,
    },
}

/// Why the command line did not give a command: help or the version to print (exit 0), or a
/// usage error (one line, exit 1).
pub enum Exit {
    Print(String),
    Usage(String),
}

/// Reads the command line (`args`, the program name first) in llama.cpp's spellings as well
/// as ours (`spelling`).
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, Exit> {
    let args = spelling::rewrite(args).map_err(Exit::Usage)?;
    Cli::try_parse_from(args).map_err(|e| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Exit::Print(e.to_string()),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                Exit::Usage(format!("a command is needed\n{e}"))
            }
            _ => Exit::Usage(one_line(&e.render().to_string())),
        }
    })
}

/// clap's error as one line: the message, its tip, and where to read more.
fn one_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("bad command line");
    let mut line = first.trim_start_matches("error: ").to_string();
    for l in lines {
        if let Some(tip) = l.strip_prefix("tip: ") {
            line += &format!("; {tip}");
        } else if let Some(usage) = l.strip_prefix("Usage: ") {
            let cmd: Vec<&str> = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['-', '<', '[']))
                .collect();
            line += &format!(" (see `{} --help`)", cmd.join(" "));
            break;
        }
    }
    line
}

/// `ggrun ls`: each model the stores hold, its size, and how it fits `budget` (the GPU's
/// free memory when not given): whole, with experts in RAM (the non-expert weights fit), or
/// not at all.
fn list_models(budget: Option<u64>, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let budget = budget.or_else(|| {
        let g = crate::backend::cuda::Gpu::open(0).ok()?;
        g.memory().ok().map(|(free, _)| free as u64)
    });
    let found = crate::library::list();
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    if found.is_empty() && !json {
        let dirs: Vec<String> = [crate::library::ollama_dir(), crate::library::hf_dir()]
            .into_iter()
            .flatten()
            .map(|d| d.display().to_string())
            .collect();
        writeln!(out, "no models found in {}", dirs.join(" or "))?;
        return Ok(());
    }
    if !json {
        writeln!(out, "{:<48} {:>10}  {:<12} GPU", "NAME", "SIZE", "STORE")?;
    }
    for f in &found {
        let info = Model::open(&f.path)
            .ok()
            .and_then(|m| ModelInfo::from_model(&m).ok());
        let fits = match (budget, &info) {
            (None, _) => "no GPU budget".to_string(),
            (_, None) => "unreadable".to_string(),
            (Some(b), Some(i)) if i.non_expert_bytes + i.expert_bytes <= b => "fits".to_string(),
            (Some(b), Some(i)) if i.expert_bytes > 0 && i.non_expert_bytes <= b => {
                "fits, experts in RAM".to_string()
            }
            (Some(_), Some(_)) => "too large".to_string(),
        };
        if json {
            let v = serde_json::json!({"name": f.name, "path": f.path, "bytes": f.bytes,
                                       "store": f.store, "gpu": fits, "budget_bytes": budget});
            writeln!(out, "{v}")?;
        } else {
            writeln!(
                out,
                "{:<48} {:>10}  {:<12} {fits}",
                f.name,
                gib(f.bytes),
                f.store
            )?;
        }
    }
    Ok(())
}

/// Whether `e` comes from writing to a closed pipe (`ggrun ... | head -1`): the reader left,
/// which ends the program quietly.
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs a parsed command, writing results to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a, out)?,
        Command::Tune(a) => crate::tune::run(a.options(), out)?,
        Command::Serve(a) => crate::serve::run(a.options()?)?,
        Command::Chat(a) => chat::run(a, out)?,
        Command::Template {
            model,
            template,
            messages,
            tools,
            think,
            no_generation_prompt,
        } => {
            let g = Model::open(&model)?;
            let tok = crate::tokenizer::Tokenizer::from_metadata(g.metadata())?;
            let t = template.load(g.metadata(), &tok)?;
            let read_json = |p: &PathBuf| -> anyhow::Result<serde_json::Value> {
                let s = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                serde_json::from_str(&s).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            };
            let msgs: Vec<Message> = match &messages {
                Some(p) => Message::list_from_api(&read_json(p)?, "messages")
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
                None => vec![Message::new("user", "Hello")],
            };
            let opts = RenderOptions {
                add_generation_prompt: !no_generation_prompt,
                enable_thinking: think.map(|t| t == common::OnOff::On),
                tools: tools.as_ref().map(read_json).transpose()?,
            };
            write!(out, "{}", t.render_text(&msgs, &opts)?)?;
        }
        Command::Info {
            model,
            model_flag,
            json,
            place,
        } => {
            let model = model.or(model_flag).expect("clap requires one");
            let m = Model::open(&model)?;
            let info = ModelInfo::from_model(&m)?;
            let plan = load::plan_without_device(&m, &place.args())?;
            if json {
                let mut v = info.to_json();
                if let Some(p) = &plan {
                    v["placement"] = serde_json::json!({
                        "n_ctx": p.n_ctx,
                        "gpu_weight_bytes": p.gpu_weight_bytes,
                        "reserved_bytes": p.reserved_bytes,
                        "state_bytes": p.state_bytes,
                        "staging_bytes": p.staging_bytes,
                        "expert_cache_bytes": p.cache_bytes,
                        "cpu_weight_bytes": p.cpu_weight_bytes,
                        "expert_layers_on_gpu": p.expert_layers_on_gpu,
                        "expert_layers_in_ram": p.expert_layers_in_ram,
                    });
                }
                writeln!(out, "{v}")?;
            } else {
                write!(out, "{}", info.to_text())?;
                if let Some(p) = &plan {
                    writeln!(out, "placement: {}", p.summary())?;
                }
            }
        }
        Command::Logits {
            model,
            tokens,
            decode,
            out: path,
            threads,
            ctx_size,
            exact,
            no_repack,
            cache,
            place,
            pass,
        } => {
            let precision = load::precision(exact);
            let g = Model::open(&model)?;
            let n_ctx = if ctx_size == 0 {
                tokens.len() + decode
            } else {
                ctx_size
            };
            let place = crate::backend::placement::PlacementArgs {
                exact,
                ..place.args()
            };
            let dev = load::device_weights(&g, &place, false, n_ctx)?;
            let opts = crate::model::LoadOptions {
                repack: load::repack(no_repack, precision, &g),
                device: dev.as_ref(),
                pass: pass.options(),
            };
            let m = crate::model::load_with(&g, opts)?;
            let cpu =
                Cpu::new(load::threads(threads, false), precision)?.with_kv_types(cache.types());
            if tokens.len() + decode > n_ctx {
                anyhow::bail!(
                    "{} prompt tokens + {decode} decode steps do not fit in a context of {n_ctx} (raise -c/--ctx-size)",
                    tokens.len()
                );
            }
            let mut state = m.new_state(n_ctx, cpu.kv)?;
            let mut rows = m.forward(&cpu, &mut state, &tokens, true)?;
            let nv = m.n_vocab();
            let mut generated = Vec::with_capacity(decode);
            for _ in 0..decode {
                let last = &rows[rows.len() - nv..];
                let tok = argmax(last) as u32;
                generated.push(tok);
                let r = m.forward(&cpu, &mut state, &[tok], false)?;
                rows.extend_from_slice(&r);
            }
            let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(&path, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            writeln!(
                out,
                "{}",
                serde_json::json!({"rows": rows.len() / nv, "n_vocab": nv, "generated": generated})
            )?;
        }
        Command::Bench {
            model,
            n_prompt,
            n_gen,
            depth,
            batch_size,
            no_profile,
            mut threads,
            reps,
            sequences,
            exact,
            json,
            roofline,
            routing_stats,
            routing_window,
            no_repack,
            cache,
            place,
            pass,
        } => {
            let precision = load::precision(exact);
            let sequences = sequences as usize;
            let mut place = place.args();
            place.sequences = sequences;
            place.exact = exact;
            let mut batch = batch_size;
            let mut ctx = 0;
            let open = crate::profile::Open {
                ctx_size: &mut ctx,
                threads: &mut threads,
                batch_size: &mut batch,
                place: &mut place,
            };
            crate::profile::apply(&model, open, no_profile, json)?;
            if batch_size == 0 && batch == 0 {
                batch = n_prompt;
            }
            let g = Model::open(&model)?;
            let dev = load::device_weights(&g, &place, json, depth + n_prompt.max(n_gen))?;
            let opts = crate::model::LoadOptions {
                repack: load::repack(no_repack, precision, &g),
                device: dev.as_ref(),
                pass: pass.options(),
            };
            let m = crate::model::load_with(&g, opts)?;
            let cpu =
                Cpu::new(load::threads(threads, false), precision)?.with_kv_types(cache.types());
            let mut window = routing_stats.then(|| RoutingWindow::new(routing_window));
            let bandwidth = || crate::bench::read_bandwidth(&g, &cpu, 2);
            let r = crate::bench::run(
                m.as_ref(),
                &cpu,
                n_prompt,
                n_gen,
                depth,
                batch,
                reps.max(1),
                sequences,
                window.as_mut(),
                roofline.then_some(&bandwidth as &dyn Fn() -> f64),
            )?;
            let roof = match roofline {
                true => r.roofline(crate::bench::bytes_per_token(&g)?),
                false => None,
            };
            if json {
                let mut v = r.to_json(&model, cpu.threads);
                v["type_k"] = cpu.kv.k.name().into();
                v["type_v"] = cpu.kv.v.name().into();
                v["repacked_bytes"] = g.derived_bytes().into();
                if let Some(d) = &dev {
                    v["gpu"] = d.gpu.name.clone().into();
                    v["gpu_weight_bytes"] = d.uploaded_bytes().into();
                }
                if let Some(line) = m.offload_report() {
                    v["offload"] = line.into();
                }
                if let Some(w) = &window {
                    v["routing"] = w.to_json();
                }
                if let Some(rf) = &roof {
                    v["bytes_per_token"] = rf.bytes.into();
                    v["read_gb_s"] = (rf.bandwidth / 1e9).into();
                    v["read_gb_s_range"] =
                        vec![rf.bandwidth_range.0 / 1e9, rf.bandwidth_range.1 / 1e9].into();
                    v["roofline_tok_s"] = (rf.bandwidth / rf.bytes as f64).into();
                    v["tg_roofline_pct"] = rf.tg_pct.into();
                    v["tg_roofline_pct_all"] = rf.tg_pct_all.clone().into();
                }
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "{}", r.to_text(&model, cpu.threads))?;
                if let Some(line) = m.offload_report() {
                    writeln!(out, "{line}")?;
                }
                writeln!(
                    out,
                    "packed weight copies: {:.1} MiB",
                    g.derived_bytes() as f64 / (1 << 20) as f64
                )?;
                if let Some(rf) = &roof {
                    writeln!(
                        out,
                        "roofline: {:.1} MB/token, read {:.1} GB/s ({:.1}-{:.1} over the rounds) \
                         -> {:.2} tok/s; tg is {:.1}% of each round's roofline (median)",
                        rf.bytes as f64 / 1e6,
                        rf.bandwidth / 1e9,
                        rf.bandwidth_range.0 / 1e9,
                        rf.bandwidth_range.1 / 1e9,
                        rf.bandwidth / rf.bytes as f64,
                        rf.tg_pct
                    )?;
                }
                if let Some(w) = &window {
                    write!(out, "{}", w.to_text())?;
                }
            }
        }
        Command::GenModel {
            preset,
            dequantized,
            layers,
            pattern,
            mix,
            skeleton,
            seed,
            out: path,
        } => {
            use crate::synth::decoder::{self as dec, PresetMix, TinyMix, ARCHS, PRESETS};
            if ARCHS.contains(&preset.as_str()) {
                let mix = TinyMix::parse(mix.as_deref().unwrap_or("q8_0"))?;
                dec::write_tiny(&preset, mix, seed, dequantized, &path)?;
            } else if let Some((name, arch)) = PRESETS.iter().find(|p| p.0 == preset) {
                let default = if *arch == "gpt-oss" {
                    "mxfp4"
                } else {
                    "q4_k_m"
                };
                let mix = PresetMix::parse(mix.as_deref().unwrap_or(default))?;
                dec::write_preset(name, layers, mix, seed, skeleton, &path)?;
            } else if preset == "nemotron-3-nano" {
                let p =
                    crate::synth::NemotronPreset::nano(layers.unwrap_or(8), pattern.as_deref())?;
                let mix = crate::synth::Mix::parse(mix.as_deref().unwrap_or("q4_k_m"))?;
                crate::synth::write_nemotron(&p, mix, seed, &path)?;
            } else {
                anyhow::bail!(
                    "unknown preset {preset} (nemotron-3-nano, {}, or a tiny decoder: {})",
                    PRESETS.map(|p| p.0).join(", "),
                    ARCHS.join(", ")
                );
            }
            writeln!(out, "{}", path.display())?;
        }
        Command::Tokenize {
            model,
            no_special,
            pieces,
            text,
        } => {
            let g = Model::open(&model)?;
            let tok = crate::tokenizer::Tokenizer::from_metadata(g.metadata())?;
            let ids = tok.encode(&text, !no_special)?;
            let v = if pieces {
                serde_json::json!(ids
                    .iter()
                    .map(|&i| serde_json::json!([
                        i,
                        String::from_utf8_lossy(&tok.token_bytes(i, true))
                    ]))
                    .collect::<Vec<_>>())
            } else {
                serde_json::json!(ids)
            };
            writeln!(out, "{v}")?;
        }
        Command::Gpu => match crate::backend::cuda::Gpu::open(0) {
            Ok(g) => {
                let (free, total) = g.memory()?;
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                writeln!(
                    out,
                    "device: {}\ncompute capability: {}.{}\nmemory: {:.1} GiB free of {:.1} GiB\nkernels: {} ({})",
                    g.name,
                    g.arch.0,
                    g.arch.1,
                    gib(free),
                    gib(total),
                    g.kernel_cache.display(),
                    if g.compiled { "compiled now" } else { "cached" }
                )?;
            }
            Err(e) => writeln!(out, "no GPU: {e:#}")?,
        },
        Command::RenderTemplate => crate::chat::sandbox::serve_child()?,
        Command::Ls { gpu_mem, json } => list_models(gpu_mem, json, out)?,
        Command::Cpu => {
            let sel = ggrun_quants::isa::selection();
            let tiers: Vec<_> = ggrun_quants::Isa::available()
                .iter()
                .map(|i| i.name())
                .collect();
            writeln!(
                out,
                "active: {}\navailable: {}\nvendor: {}\nweight prefetch: {} bytes ahead",
                sel.active.name(),
                tiers.join(" "),
                ggrun_quants::isa::vendor(),
                ggrun_quants::isa::weight_prefetch_bytes()
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
