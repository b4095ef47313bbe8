//! The flags commands share (model, placement, template, sampling, reasoning), each turned into
//! the plain options below the command line; Ctrl-C handling.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::backend::cuda::{PassOptions, Prefetch};
use crate::backend::placement::PlacementArgs;
use crate::backend::state::{KvType, KvTypes};
use crate::chat::template::{ChatTemplate, Limits, TemplateOptions};
use crate::engine::load::{ModelOptions, GENERATING, INTERRUPTED};
use crate::gguf::Metadata;
use crate::grammar::GrammarSpec;
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
#[command(next_help_heading = "Model, context and threads")]
pub struct ModelArgs {
    /// The model: a .gguf file (any part of a split one), or a name in Ollama's store
    /// (`smollm2:135m`) or the Hugging Face cache (`org/repo[:quant]`; `-hf` works too).
    #[arg(short = 'm', long = "model", value_name = "FILE|NAME")]
    pub model: Option<String>,
    /// The model, as `-m` (Ollama's `run MODEL`); for `run`, then the prompt's words.
    #[arg(value_name = "MODEL")]
    pub positional: Vec<String>,
    /// Context size in tokens [default: the model's trained length, on the CPU as far as half
    /// the free memory holds its KV caches (at least 4096); with a GPU placement at most 4096;
    /// 0 too].
    #[arg(
        short = 'c',
        long = "ctx-size",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub ctx_size: usize,
    /// Threads [default: the physical cores].
    #[arg(short = 't', long, default_value_t = 0, hide_default_value = true)]
    pub threads: usize,
    /// Prompt tokens per forward pass [default: 512].
    #[arg(
        short = 'b',
        long = "batch-size",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub batch_size: usize,
    /// llama.cpp's physical batch (`-ub`): the same as -b here, and it wins over -b.
    #[arg(long = "ubatch-size", value_name = "N", hide = true)]
    pub ubatch_size: Option<usize>,
    /// Ignore the settings `ggrun tune` saved for this model.
    #[arg(long = "no-profile")]
    pub no_profile: bool,
    /// Exact mode: f32 weights, activations and KV cache (also GGRUN_EXACT=1).
    #[arg(long)]
    pub exact: bool,
    /// No progress bar, no timings on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Keep weights only in the file's layout (no packed copies for the eight-row kernels:
    /// less memory, slower on CPUs that have those kernels).
    #[arg(long)]
    pub no_repack: bool,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub template: TemplateFlags,
    #[command(flatten)]
    pub pass: PassFlags,
    #[command(flatten)]
    pub place: PlacementFlags,
}

/// The KV cache's element types, by llama.cpp's names.
#[derive(Args, Debug, Clone, Default)]
pub struct CacheFlags {
    /// K cache type: f16, q8_0 or q4_0 [default: f16] (`-ctk`). The block types are for layers
    /// run on the CPU (a GPU's cache is f16); exact mode keeps f32.
    #[arg(long = "cache-type-k", value_name = "TYPE", value_parser = KvType::parse)]
    pub k: Option<KvType>,
    /// V cache type: f16, q8_0 or q4_0 [default: f16] (`-ctv`), as the K cache's.
    #[arg(long = "cache-type-v", value_name = "TYPE", value_parser = KvType::parse)]
    pub v: Option<KvType>,
}

impl CacheFlags {
    /// The types asked for, f16 where none was.
    pub fn types(&self) -> KvTypes {
        KvTypes {
            k: self.k.unwrap_or(KvType::F16),
            v: self.v.unwrap_or(KvType::F16),
        }
    }
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
#[command(next_help_heading = "Chat template")]
pub struct TemplateFlags {
    /// The chat template instead of the model's: a name (chatml, llama3, gemma, phi3) or the
    /// Jinja text itself.
    #[arg(long = "chat-template", value_name = "NAME|TEMPLATE")]
    pub chat_template: Option<String>,
    /// The chat template in a Jinja FILE instead of the model's.
    #[arg(
        long = "chat-template-file",
        value_name = "FILE",
        conflicts_with = "chat_template"
    )]
    pub chat_template_file: Option<PathBuf>,
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
            chat_template: self.chat_template.clone(),
            file: self.chat_template_file.clone(),
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
    /// The model as given: `-m`, else the first positional argument.
    pub fn name(&self) -> Result<&str> {
        match (&self.model, self.positional.first()) {
            (Some(m), _) => Ok(m),
            (None, Some(m)) => Ok(m),
            (None, None) => anyhow::bail!("no model: give -m FILE|NAME (or the model first)"),
        }
    }

    /// The positional arguments after the model (a `run` prompt's words).
    pub fn words(&self) -> &[String] {
        let skip = usize::from(self.model.is_none()).min(self.positional.len());
        &self.positional[skip..]
    }

    /// Errors when positional arguments follow the model (commands that take none).
    pub fn no_words(&self) -> Result<()> {
        match self.words().first() {
            Some(w) => anyhow::bail!("unexpected argument {w:?} after the model"),
            None => Ok(()),
        }
    }

    /// The options below the command line, the model's name resolved to its file.
    pub fn options(&self) -> Result<ModelOptions> {
        let name = self.name()?;
        Ok(ModelOptions {
            model: crate::library::resolve(name)?,
            name: name.to_string(),
            ctx_size: self.ctx_size,
            threads: self.threads,
            batch_size: self.ubatch_size.unwrap_or(self.batch_size),
            no_profile: self.no_profile,
            exact: self.exact,
            quiet: self.quiet,
            no_repack: self.no_repack,
            kv: self.cache.types(),
            place: PlacementArgs {
                exact: self.exact,
                ..self.place.args()
            },
            pass: self.pass.options(),
            template: self.template.options(),
        })
    }
}

/// Where weights go when a CUDA GPU is present (llama.cpp's flags, and a VRAM budget).
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "GPU placement")]
pub struct PlacementFlags {
    /// Layers on the GPU (`-ngl N` works too), counted from the last; more than the model has
    /// puts the output head there too (default: none, or all with --gpu-mem).
    #[arg(long = "n-gpu-layers")]
    pub n_gpu_layers: Option<usize>,
    /// Keep the routed experts of the first N layers in RAM [default: none] (`-ncmoe N`;
    /// `-cmoe` keeps them all there).
    #[arg(
        long = "n-cpu-moe",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
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
            exact: false,
        }
    }
}

/// llama.cpp's `--logit-bias` value: `15043+1`, `15043-0.5`, `15043-inf`.
fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let at = s
        .find(['+', '-'])
        .ok_or_else(|| format!("{s}: expected ID+BIAS or ID-BIAS (e.g. 15043+1)"))?;
    let id = s[..at]
        .parse::<u32>()
        .map_err(|_| format!("{s}: {:?} is not a token id", &s[..at]))?;
    let bias = s[at..]
        .parse::<f32>()
        .map_err(|_| format!("{s}: {:?} is not a bias", &s[at..]))?;
    Ok((id, bias))
}

/// A `-m` value resolved to its file ([`crate::library::resolve`]).
pub fn model_path(s: &str) -> Result<PathBuf, String> {
    crate::library::resolve(s).map_err(|e| format!("{e:#}"))
}

/// A size flag's value (`24GiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    crate::backend::placement::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Sampling and structured output")]
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
    /// Stop before this text (repeatable; `-r`/`--reverse-prompt` work too).
    #[arg(
        long = "stop",
        visible_alias = "reverse-prompt",
        short = 'r',
        value_name = "TEXT"
    )]
    pub stop: Vec<String>,
    /// Add BIAS to token ID's logit, as `ID+BIAS` or `ID-BIAS` (`ID-inf` bans it; repeatable).
    #[arg(short = 'l', long = "logit-bias", value_name = "ID(+|-)BIAS", value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// The answer follows this grammar: llama.cpp's GBNF, or llguidance's Lark after a
    /// `%llguidance {}` line (the reasoning of thinking models stays free).
    #[arg(long, value_name = "GRAMMAR", group = "structured")]
    pub grammar: Option<String>,
    /// The answer follows the grammar in FILE.
    #[arg(long = "grammar-file", value_name = "FILE", group = "structured")]
    pub grammar_file: Option<PathBuf>,
    /// The answer is JSON valid against this JSON schema (`{}`: any JSON).
    #[arg(
        short = 'j',
        long = "json-schema",
        value_name = "SCHEMA",
        group = "structured"
    )]
    pub json_schema: Option<String>,
    /// The answer is JSON valid against the schema in FILE (`-jf` works too).
    #[arg(long = "json-schema-file", value_name = "FILE", group = "structured")]
    pub json_schema_file: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Reasoning")]
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
            logit_bias: self.logit_bias.clone(),
            grammar: None,
            logprobs: None,
        }
    }

    /// The grammar the answer must follow (`--grammar`, `--json-schema` and their files), if
    /// any.
    pub fn grammar(&self) -> Result<Option<GrammarSpec>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        };
        let schema = |text: &str, what: &str| -> Result<GrammarSpec> {
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| anyhow::anyhow!("{what}: not JSON ({e})"))?;
            // llama.cpp's `-j {}` means any JSON value.
            let v = match v.as_object() {
                Some(o) if o.is_empty() => {
                    serde_json::json!({"type": ["object", "array", "string", "number", "boolean", "null"]})
                }
                _ => v,
            };
            Ok(GrammarSpec::JsonSchema(v))
        };
        let text = |g: &str, what: &str| {
            GrammarSpec::from_grammar_text(g).map_err(|e| anyhow::anyhow!("{what}: {e:#}"))
        };
        Ok(
            match (
                &self.grammar,
                &self.grammar_file,
                &self.json_schema,
                &self.json_schema_file,
            ) {
                (Some(g), ..) => Some(text(g, "--grammar")?),
                (_, Some(f), ..) => Some(text(&read(f)?, &f.display().to_string())?),
                (_, _, Some(j), _) => Some(schema(j, "--json-schema")?),
                (_, _, _, Some(f)) => Some(schema(&read(f)?, &f.display().to_string())?),
                _ => None,
            },
        )
    }

    /// Errors when a `--logit-bias` names a token the vocabulary does not have.
    pub fn check_bias(&self, n_vocab: usize) -> Result<()> {
        match self.logit_bias.iter().find(|b| b.0 as usize >= n_vocab) {
            Some((t, _)) => {
                anyhow::bail!("--logit-bias: {t} is not a token id (0 to {})", n_vocab - 1)
            }
            None => Ok(()),
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
