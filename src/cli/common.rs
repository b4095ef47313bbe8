//! The flags commands share (model, placement, template, sampling, reasoning), each turned into
//! the plain options below the command line; Ctrl-C handling.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::backend::cuda::{PassOptions, Prefetch};
use crate::backend::placement::PlacementArgs;
use crate::chat::template::{ChatTemplate, Limits, TemplateOptions};
use crate::engine::load::{ModelOptions, GENERATING, INTERRUPTED};
use crate::gguf::Metadata;
use crate::sample::{SamplerConfig, Settings};
use crate::tokenizer::Tokenizer;

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
    #[command(flatten)]
    pub pass: PassFlags,
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

/// How a device-resident pass runs: switches for measurements and tests (hidden; the defaults
/// are what measured best).
#[derive(Args, Debug, Clone, Default)]
pub struct PassFlags {
    /// When prefill copies whole RAM expert layers ahead of use: auto, on or off.
    #[arg(long, value_name = "WHEN", default_value = "auto", hide = true)]
    pub prefetch: Prefetch,
    /// Launch decode steps one by one instead of replaying them as CUDA graphs.
    #[arg(long = "no-cuda-graphs", hide = true)]
    pub no_cuda_graphs: bool,
}

impl PassFlags {
    /// The options below the command line.
    pub fn options(&self) -> PassOptions {
        PassOptions {
            prefetch: self.prefetch,
            cuda_graphs: !self.no_cuda_graphs,
        }
    }
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
    /// The options: a commands' templates render in a child process under these limits.
    pub fn options(&self) -> TemplateOptions {
        TemplateOptions {
            file: self.chat_template.clone(),
            parse_message_specials: self.parse_message_specials,
            limits: Limits {
                fuel: self.fuel,
                max_output: self.max_output,
                max_memory: self.max_memory,
                isolate: true,
            },
        }
    }

    /// The template these flags ask for (see [`TemplateOptions::load`]).
    pub fn load(&self, md: &Metadata, tok: &Tokenizer) -> Result<ChatTemplate> {
        self.options().load(md, tok)
    }
}

impl ModelArgs {
    /// The options below the command line.
    pub fn options(&self) -> ModelOptions {
        ModelOptions {
            model: self.model.clone(),
            ctx_size: self.ctx_size,
            threads: self.threads,
            batch_size: self.batch_size,
            no_profile: self.no_profile,
            exact: self.exact,
            quiet: self.quiet,
            no_repack: self.no_repack,
            place: self.place.args(),
            pass: self.pass.options(),
            template: self.template.options(),
        }
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
}

impl PlacementFlags {
    /// The flags as the planner takes them.
    pub fn args(&self) -> PlacementArgs {
        PlacementArgs {
            n_gpu_layers: self.n_gpu_layers,
            n_cpu_moe: self.n_cpu_moe,
            gpu_mem: self.gpu_mem,
            sequences: 0,
            experts_in_ram: self.experts_in_ram.clone(),
            staging_buffers: self.staging_buffers,
            expert_cache: self.expert_cache,
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::backend::placement::parse_size(s).map_err(|e| e.to_string())
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
    /// The settings below the command line.
    pub fn settings(&self) -> Settings {
        Settings {
            temp: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
            stop: self.stop.clone(),
            logit_bias: Vec::new(),
            grammar: None,
            logprobs: None,
        }
    }

    /// The sampler's settings for a model (see [`Settings::config`]).
    pub fn config(&self, md: &Metadata) -> SamplerConfig {
        self.settings().config(md)
    }
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
