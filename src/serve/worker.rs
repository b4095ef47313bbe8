//! The inference thread of `ggrun serve`: it owns the model, its one sequence state and the
//! chat template, takes jobs from the HTTP handlers in arrival order, and streams events back.
//! Between jobs the state is kept, and snapshots of it at the end of each prompt and at
//! intervals of long ones: a prompt that starts with what the state or a snapshot holds (an
//! agent resending its history plus a new turn, even when the template rewrote the last answer)
//! feeds only the rest, and the job reports the reused tokens as cached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::chat::session::{opens_thinking, prompt_tokens};
use crate::chat::template::{ChatTemplate, Message, RenderOptions};
use crate::cli::common::{self, ModelArgs, SamplingArgs};
use crate::generate::{Engine, GenParams, Piece, Reasoning, StopReason};
use crate::gguf::Model;

/// What to generate from.
pub enum Prompt {
    /// Messages rendered through the model's chat template (tools passed to it; `think`: the
    /// template's `enable_thinking`, None for its default).
    Chat {
        messages: Vec<Message>,
        tools: Option<Value>,
        think: Option<bool>,
    },
    /// Raw text, continued verbatim.
    Text(String),
}

/// One request for the worker.
pub struct Job {
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    /// Sampling as the request set it (unset fields take the model's defaults).
    pub sampling: SamplingArgs,
    pub events: UnboundedSender<Event>,
}

/// What the worker sends back for a job, in order: pieces, then `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    Piece { reasoning: bool, text: String },
    Done(Done),
    Error { status: u16, message: String },
}

#[derive(Debug, Clone)]
pub struct Done {
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub reasoning_tokens: usize,
    /// Seconds spent on the prompt's new tokens and on generation.
    pub prompt_secs: f64,
    pub generate_secs: f64,
}

/// What the handlers need to know of the loaded model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub n_ctx: usize,
    pub file_bytes: u64,
}

/// Set on SIGINT/SIGTERM: the job in progress stops after its current token.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// A request error: the message goes to the client with this HTTP status.
struct Rejected(u16, String);

/// Starts the worker thread: loads the model there, then serves `jobs` until the channel
/// closes. Returns once the model is loaded (or failed to load).
pub fn spawn(args: ModelArgs, snapshots: Snapshots, jobs: Receiver<Job>) -> Result<ModelInfo> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelInfo>>();
    std::thread::Builder::new()
        .name("ggrun-serve-worker".into())
        .spawn(move || {
            if let Err(e) = serve_jobs(&args, snapshots, jobs, &ready_tx) {
                let _ = ready_tx.send(Err(e));
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow!("the model worker stopped while loading"))?
}

/// Snapshot policy: every `every` prompt tokens (0: only at prompt ends), the newest `keep`.
#[derive(Clone, Copy, Debug)]
pub struct Snapshots {
    pub every: usize,
    pub keep: usize,
}

fn serve_jobs(
    args: &ModelArgs,
    snapshots: Snapshots,
    jobs: Receiver<Job>,
    ready: &Sender<Result<ModelInfo>>,
) -> Result<()> {
    let g = Model::open(&args.model)?;
    let n_ctx = common::planned_context(&g, args.ctx_size);
    let dev = common::device_weights(&g, &args.place, args.quiet, n_ctx)?;
    let l = common::load(&g, dev.as_ref(), args)?;
    let template = ChatTemplate::for_model(g.metadata(), &l.tok, args.chat_template.as_deref())?;
    let name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let info = ModelInfo {
        name,
        n_ctx: l.n_ctx,
        file_bytes: std::fs::metadata(&args.model).map(|m| m.len()).unwrap_or(0),
    };
    let mut engine = Engine::new(l.model.as_ref(), l.cpu, l.tok, l.n_ctx)?;
    engine.enable_snapshots(snapshots.every, snapshots.keep);
    let _ = ready.send(Ok(info));
    for job in jobs {
        let events = job.events.clone();
        match run_job(&mut engine, &template, &g, job) {
            Ok(()) => {}
            Err(Rejected(status, message)) => {
                let _ = events.send(Event::Error { status, message });
            }
        }
    }
    Ok(())
}

fn run_job(
    engine: &mut Engine,
    template: &ChatTemplate,
    g: &Model,
    job: Job,
) -> Result<(), Rejected> {
    let bad = |m: String| Rejected(400, m);
    let internal = |e: anyhow::Error| Rejected(500, format!("{e:#}"));
    let (tokens, reasoning) = match &job.prompt {
        Prompt::Chat {
            messages,
            tools,
            think,
        } => {
            let opts = RenderOptions {
                add_generation_prompt: true,
                enable_thinking: *think,
                tools: tools.clone(),
            };
            let mut text = template
                .render(messages, &opts)
                .map_err(|e| bad(format!("{e:#}")))?;
            if *think == Some(false) && opens_thinking(&text) {
                text.push_str("</think>");
            }
            let inside = opens_thinking(&text);
            let t = prompt_tokens(&engine.tok, &text).map_err(internal)?;
            (t, Reasoning::Parse { inside })
        }
        Prompt::Text(s) => (
            engine.tok.encode(s, true).map_err(internal)?,
            Reasoning::Verbatim,
        ),
    };
    let n_ctx = engine.n_ctx();
    if tokens.is_empty() {
        return Err(bad("the prompt is empty".into()));
    }
    if tokens.len() >= n_ctx {
        return Err(bad(format!(
            "the prompt is {} tokens but the context holds {n_ctx} (start the server with a larger -c)",
            tokens.len()
        )));
    }
    let room = n_ctx - tokens.len();
    let max_tokens = job.max_tokens.unwrap_or(room).min(room);
    // Resume from the longest start of this prompt the state or a snapshot holds.
    let cached = engine.resume(&tokens).map_err(internal)?;
    let params = GenParams {
        max_tokens: Some(max_tokens),
        sampler: job.sampling.config(g.metadata()),
        stop: job.sampling.stop.clone(),
        reasoning,
        think_budget: None,
        feed_last: true,
    };
    let events = job.events;
    let mut gone = false;
    let mut on_piece = |p: Piece| -> Result<()> {
        let (reasoning, text) = match p {
            Piece::Reasoning(s) => (true, s),
            Piece::Answer(s) => (false, s),
        };
        let ev = Event::Piece {
            reasoning,
            text: text.to_string(),
        };
        if events.send(ev).is_err() {
            gone = true;
            return Err(anyhow!("the client went away"));
        }
        Ok(())
    };
    let result = engine.generate(&tokens[cached..], &params, &SHUTDOWN, &mut on_piece);
    match result {
        Ok(o) => {
            let finish_reason = match o.stop {
                StopReason::Length | StopReason::Context => "length",
                _ => "stop",
            };
            let _ = events.send(Event::Done(Done {
                finish_reason,
                prompt_tokens: tokens.len(),
                cached_tokens: cached,
                completion_tokens: o.generated_tokens,
                reasoning_tokens: o.reasoning_tokens,
                prompt_secs: o.prompt_secs,
                generate_secs: o.generate_secs,
            }));
            Ok(())
        }
        Err(e) => {
            // A generation cut short leaves the state at an unknown point: start over next time.
            let _ = engine.reset();
            if gone || SHUTDOWN.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err(internal(e))
            }
        }
    }
}

/// A job's channel pair, for handlers.
pub fn channel() -> (
    UnboundedSender<Event>,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    tokio::sync::mpsc::unbounded_channel()
}

/// Shared by the handlers: where jobs go.
pub type Jobs = Arc<std::sync::Mutex<Sender<Job>>>;
