//! `ggrun run`: one prompt in, one answer out, for shell scripts. stdout carries only the answer
//! (or one JSON object with --json); progress, timings and reasoning (--show-think) go to
//! stderr.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use clap::Args;

use super::common::{self, ModelArgs, SamplingArgs, ThinkArgs};
use crate::chat::session::{prompt_tokens, Session};
use crate::engine::load::{self, GENERATING, INTERRUPTED};
use crate::generate::{Engine, GenParams, Piece, Reasoning, StopReason};

#[derive(Args, Debug)]
#[command(next_help_heading = "Prompt and output")]
pub struct RunArgs {
    /// The prompt (default: read stdin).
    #[arg(short = 'p', long, conflicts_with = "file", allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Most tokens to generate (default: until the model stops or the context is full).
    #[arg(short = 'n', long = "n-predict")]
    pub n_predict: Option<usize>,
    /// Complete the prompt as given: no chat template (special tokens in it are parsed).
    #[arg(long)]
    pub raw: bool,
    /// System prompt.
    #[arg(long, conflicts_with = "raw", allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Print one JSON object: text, reasoning, stop reason, token counts, timings.
    #[arg(long)]
    pub json: bool,
    /// Print the reasoning to stderr as it streams.
    #[arg(long = "show-think")]
    pub show_think: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub think: ThinkArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

fn read_prompt(a: &RunArgs) -> Result<String> {
    let words = a.model.words();
    if let Some(p) = &a.prompt {
        if let Some(w) = words.first() {
            bail!("unexpected argument {w:?}: the prompt is given by -p");
        }
        return Ok(p.clone());
    }
    if !words.is_empty() {
        // Ollama's `run MODEL PROMPT...`.
        return Ok(words.join(" "));
    }
    if let Some(f) = &a.file {
        return std::fs::read_to_string(f).map_err(|e| anyhow!("{}: {e}", f.display()));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!("no prompt: give -p TEXT, -f FILE, or pipe it on stdin");
    }
    let mut s = String::new();
    stdin
        .lock()
        .read_to_string(&mut s)
        .map_err(|e| anyhow!("reading stdin: {e}"))?;
    Ok(s)
}

pub fn run(a: RunArgs, out: &mut dyn Write) -> Result<()> {
    let prompt_text = read_prompt(&a)?;
    let user = if a.raw {
        prompt_text
    } else {
        prompt_text.trim().to_string()
    };
    if user.is_empty() {
        bail!("the prompt is empty");
    }
    common::install_ctrl_c();
    GENERATING.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let mut opts = a.model.options()?;
    let (g, dev) = load::open(&mut opts)?;
    let l = load::load(&g, dev.as_ref(), &opts)?;
    let load_secs = t0.elapsed().as_secs_f64();
    let n_ctx = l.n_ctx;
    let sampler = a.sampling.config(g.metadata());
    let seed = sampler.seed;
    let mut params = GenParams {
        max_tokens: a.n_predict,
        sampler,
        stop: a.sampling.stop.clone(),
        reasoning: Reasoning::Verbatim,
        think_budget: a.think.think_budget,
        feed_last: false,
    };
    let mut engine = Engine::new(l.model.as_ref(), l.cpu, l.tok, n_ctx)?;
    engine.seq.batch = l.batch;
    a.sampling.check_bias(engine.tok.n_vocab())?;
    if let Some(spec) = a.sampling.grammar()? {
        engine.constrain(spec)?;
    }
    if a.think.think.is_some() && !engine.can_think() && !a.model.quiet {
        eprintln!("warning: this model's vocabulary has no <think> tokens; --think has no effect");
    }
    // The prompt tokens, and how the reply is read.
    let template = opts.template.load(g.metadata(), &engine.tok)?;
    // A base model (no template of its own, none given): complete the text, as --raw.
    let raw = a.raw || template.fallback;
    if template.fallback && !a.raw && !a.model.quiet {
        eprintln!(
            "warning: this model has no chat template: completing the prompt as raw text \
             (--chat-template NAME chats with it; --raw says this is meant)"
        );
    }
    let (tokens, mut engine) = if raw {
        let t = engine.tok.encode(&user, true)?;
        (t, engine)
    } else {
        let mut s = Session::new(engine, template);
        s.system = a.system.clone();
        s.think = a.think.enable();
        let (text, reasoning) = s.render_turn(&user)?;
        params.reasoning = reasoning;
        let shielded = s.template.shield.is_some();
        (prompt_tokens(&s.engine.tok, &text, shielded)?, s.engine)
    };
    if tokens.len() > n_ctx {
        bail!(
            "the prompt is {} tokens but the context holds {n_ctx} (raise -c/--ctx-size)",
            tokens.len()
        );
    }
    let show_think = a.show_think;
    let json = a.json;
    let mut wrote_any = false;
    let mut ends_with_newline = false;
    let mut on_piece = |p: Piece| -> Result<()> {
        match p {
            Piece::Answer(s) if !json => {
                out.write_all(s.as_bytes())?;
                out.flush()?;
                wrote_any = true;
                ends_with_newline = s.ends_with('\n');
            }
            Piece::Reasoning(s) if show_think => {
                eprint!("{s}");
            }
            _ => {}
        }
        Ok(())
    };
    let o = engine.generate(&tokens, &params, &INTERRUPTED, &mut on_piece)?;
    GENERATING.store(false, Ordering::SeqCst);
    if show_think && !o.reasoning.is_empty() {
        eprintln!();
    }
    if json {
        let v = serde_json::json!({
            "text": o.text,
            "reasoning": o.reasoning,
            "stop_reason": o.stop.as_str(),
            "seed": seed,
            "tokens": {
                "prompt": o.prompt_tokens,
                "generated": o.generated_tokens,
                "reasoning": o.reasoning_tokens,
            },
            "timings": {
                "load_s": load_secs,
                "prompt_s": o.prompt_secs,
                "generate_s": o.generate_secs,
                "prompt_tok_s": o.prompt_tokens as f64 / o.prompt_secs.max(1e-9),
                "generate_tok_s": o.generated_tokens as f64 / o.generate_secs.max(1e-9),
            },
        });
        writeln!(out, "{v}")?;
    } else if wrote_any && !ends_with_newline {
        writeln!(out)?;
    }
    out.flush()?;
    if !a.model.quiet {
        eprintln!(
            "prompt: {} | generated: {} | stop: {}",
            common::rate(o.prompt_tokens, o.prompt_secs),
            common::rate(o.generated_tokens, o.generate_secs),
            o.stop.as_str()
        );
    }
    if o.stop == StopReason::Interrupted {
        bail!(load::Interrupted);
    }
    Ok(())
}
