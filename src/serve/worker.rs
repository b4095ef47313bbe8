//! The inference thread of `ggrun serve`: it owns the model, the chat template and `--parallel`
//! slots (a sequence state each), takes jobs from the HTTP handlers, and streams events back.
//!
//! Scheduling: a job takes a free slot (the one whose state or snapshots share the longest start
//! with its prompt, else the least recently used) and waits in arrival order while all are
//! busy. Every step is one forward pass over the runs of all active slots: one token for each
//! decoding slot, plus one chunk of one prompt being prefilled (a smaller chunk while others
//! decode, so a long prompt does not starve them), so the products read each weight once for
//! all of them. Between jobs a slot keeps its state and snapshots of it (one token short of the
//! end of each prompt, and at intervals of long ones): a prompt that starts with what they hold
//! (an agent resending its history plus a new turn, even when the template rewrote the last
//! answer; or the same prompt again) feeds only the rest, and the job reports the reused tokens
//! as cached.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::cpu::Cpu;
use crate::chat::session::{prepare_prompt, prompt_tokens};
use crate::chat::template::{ChatTemplate, Message, RenderOptions};
use crate::engine::load::{self, ModelOptions};
use crate::generate::{Decoder, GenParams, Piece, Reasoning, Sequence, StopReason};
use crate::gguf::Model as Gguf;
use crate::grammar::GrammarFailed;
use crate::model::{Forward, State};
use crate::sample::Settings;
use crate::tokenizer::Tokenizer;

/// Prompt tokens per chunk while other slots decode (each of their tokens waits for it); alone,
/// a prompt goes in chunks of the batch size (`-b`).
const SHARED_PREFILL_CHUNK: usize = 128;
/// How long a step in which no slot ran waits for a slot's grammar mask before it looks for
/// new jobs again.
const MASK_WAIT: Duration = Duration::from_millis(5);

/// What to generate from.
#[derive(Clone)]
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

/// What the handlers share with the worker to prepare prompts themselves (rendering and
/// tokenizing a long prompt takes time that must not stall the slots' steps).
pub struct Model {
    pub info: ModelInfo,
    pub tok: Tokenizer,
    pub template: ChatTemplate,
    /// The vocabulary prepared for grammars, made when a request first asks for one.
    grammars: std::sync::OnceLock<Result<crate::grammar::Grammars, String>>,
}

impl Model {
    /// `spec` compiled against the vocabulary (blocking: the caller runs it off the step
    /// loop), or why it cannot be (a 400's message).
    pub fn constraint(
        &self,
        spec: &crate::grammar::GrammarSpec,
    ) -> Result<crate::grammar::Constraint, String> {
        let g = self.grammars.get_or_init(|| {
            crate::grammar::Grammars::for_vocab(&self.tok).map_err(|e| format!("{e:#}"))
        });
        g.as_ref().map_err(Clone::clone)?.compile(spec)
    }
}

/// A prompt ready for the worker: its tokens and how to read the reply.
pub struct Prepared {
    pub tokens: Vec<u32>,
    pub reasoning: Reasoning,
}

impl Model {
    /// Renders (chat) and tokenizes a prompt, and checks that it leaves room in the context.
    /// Errors are the client's (a 400): a template that refuses the conversation, a prompt
    /// longer than the context.
    pub fn prepare(&self, prompt: &Prompt) -> Result<Prepared, String> {
        let (tokens, reasoning) = match prompt {
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
                let mut text = self
                    .template
                    .render(messages, &opts)
                    .map_err(|e| format!("{e:#}"))?;
                let reasoning = prepare_prompt(&mut text, *think);
                let shielded = self.template.shield.is_some();
                let t = prompt_tokens(&self.tok, &text, shielded).map_err(|e| format!("{e:#}"))?;
                (t, reasoning)
            }
            Prompt::Text(s) => (
                self.tok.encode(s, true).map_err(|e| format!("{e:#}"))?,
                Reasoning::Verbatim,
            ),
        };
        let n_ctx = self.info.n_ctx;
        if tokens.is_empty() {
            return Err("the prompt is empty".into());
        }
        if tokens.len() >= n_ctx {
            return Err(format!(
                "the prompt is {} tokens but the context holds {n_ctx} (start the server with a larger -c)",
                tokens.len()
            ));
        }
        Ok(Prepared { tokens, reasoning })
    }
}

/// One request for the worker.
pub struct Job {
    pub prompt: Prepared,
    pub max_tokens: Option<usize>,
    /// Sampling as the request set it (unset fields take the model's defaults).
    pub sampling: Settings,
    /// The grammar the answer follows, compiled (structured output).
    pub constraint: Option<crate::grammar::Constraint>,
    pub events: UnboundedSender<Event>,
}

/// What the worker sends back for a job, in order: pieces, then `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    /// The job took a slot: generation begins (sent once, first).
    Started,
    Piece {
        reasoning: bool,
        text: String,
    },
    /// The log-probability of a generated token and of the most likely alternatives (when the
    /// request asked for them), after the pieces of its step: OpenAI's logprobs entry.
    Logprobs(Value),
    Done(Done),
    Error {
        status: u16,
        message: String,
    },
}

/// OpenAI's logprobs entry of token `t` sampled from `logits`: its log-probability under the
/// model (log-softmax of the raw logits) and the `top` most likely tokens', with their text,
/// bytes and (as llama-server adds) id.
fn logprob_entry(tok: &Tokenizer, logits: &[f32], t: u32, top: usize) -> Value {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let entry = |id: u32| {
        let bytes = tok.token_bytes(id, true);
        serde_json::json!({
            "id": id, "token": String::from_utf8_lossy(&bytes), "bytes": bytes,
            "logprob": logits[id as usize] as f64 - lse,
        })
    };
    let mut v = entry(t);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = top.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        order.truncate(k);
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
    } else {
        order.clear();
    }
    v["top_logprobs"] = order.into_iter().map(entry).collect::<Vec<_>>().into();
    v
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
    pub n_vocab: usize,
    pub architecture: String,
    /// Weights in the file.
    pub parameters: u64,
    /// The file's metadata as JSON: scalar values; arrays (the vocabulary and its kin) null.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// `g`'s metadata as [`ModelInfo::metadata`] shows it.
fn metadata_json(g: &crate::gguf::Model) -> serde_json::Map<String, serde_json::Value> {
    use crate::gguf::Value as V;
    use serde_json::Value as J;
    g.metadata()
        .iter()
        .map(|(k, v)| {
            let j = match v {
                V::String(s) => J::from(s.as_str()),
                V::Bool(b) => J::from(*b),
                V::F32(_) | V::F64(_) => v.as_f64().map_or(J::Null, J::from),
                V::Array(_) => J::Null,
                _ => v
                    .as_integer()
                    .and_then(|i| i64::try_from(i).ok())
                    .map_or(J::Null, J::from),
            };
            (k.clone(), j)
        })
        .collect()
}

/// Set on SIGINT/SIGTERM: every job stops after its current token.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// A request error: the message goes to the client with this HTTP status.
struct Rejected(u16, String);

/// How the slots work: how many, and their snapshot policy (every `snapshot_every` prompt
/// tokens, 0: only at prompt ends; the newest `snapshots` kept per slot).
#[derive(Clone, Copy, Debug)]
pub struct Slots {
    pub parallel: usize,
    pub snapshot_every: usize,
    pub snapshots: usize,
}

/// Starts the worker thread: loads the model there, then serves `jobs` until the channel
/// closes. Returns once the model is loaded (or failed to load).
pub fn spawn(mut args: ModelOptions, slots: Slots, jobs: Receiver<Job>) -> Result<Arc<Model>> {
    args.place.sequences = slots.parallel;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Arc<Model>>>();
    std::thread::Builder::new()
        .name("ggrun-serve-worker".into())
        .spawn(move || {
            if let Err(e) = serve_jobs(args, slots, jobs, &ready_tx) {
                let _ = ready_tx.send(Err(e));
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow!("the model worker stopped while loading"))?
}

fn serve_jobs(
    mut args: ModelOptions,
    slots: Slots,
    jobs: Receiver<Job>,
    ready: &Sender<Result<Arc<Model>>>,
) -> Result<()> {
    let (g, dev) = load::open(&mut args)?;
    let l = load::load(&g, dev.as_ref(), &args)?;
    let template = args.template.load(g.metadata(), &l.tok)?;
    if template.fallback {
        eprintln!(
            "warning: this model has no chat template: the chat endpoints use ChatML \
             (--chat-template NAME chooses one); /v1/completions and raw generate complete text"
        );
    }
    let tok = l.tok;
    // The name the user gave (a path's file name).
    let name = match std::path::Path::new(&args.name).file_name() {
        Some(n) if args.name.ends_with(".gguf") => n.to_string_lossy().into_owned(),
        _ => args.name.clone(),
    };
    let shared = Arc::new(Model {
        info: ModelInfo {
            name,
            n_ctx: l.n_ctx,
            file_bytes: std::fs::metadata(&args.model).map(|m| m.len()).unwrap_or(0),
            n_vocab: tok.n_vocab(),
            architecture: g.architecture().unwrap_or("unknown").to_string(),
            parameters: g.tensors().map(|t| t.elements()).sum(),
            metadata: metadata_json(&g),
        },
        tok,
        template,
        grammars: std::sync::OnceLock::new(),
    });
    let model = l.model.as_ref();
    let mut seqs = Vec::with_capacity(slots.parallel);
    for _ in 0..slots.parallel.max(1) {
        let mut seq = Sequence::new(model, l.n_ctx, &l.cpu)?;
        seq.enable_snapshots(slots.snapshot_every, slots.snapshots);
        seqs.push(Slot { seq, last_used: 0 });
    }
    let mut s = Scheduler {
        model,
        batch: l.batch,
        cpu: &l.cpu,
        tok: &shared.tok,
        g: &g,
        slots: seqs,
        active: Vec::new(),
        clock: 0,
    };
    let _ = ready.send(Ok(shared.clone()));
    loop {
        // Take jobs while a slot is free: wait for one when nothing runs.
        while s.active.len() < s.slots.len() {
            let job = if s.active.is_empty() {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return Ok(()),
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            let events = job.events.clone();
            if let Err(Rejected(status, message)) = s.admit(job) {
                let _ = events.send(Event::Error { status, message });
            }
        }
        s.step();
    }
}

struct Slot {
    seq: Sequence,
    /// When the slot last took a job (the scheduler's clock).
    last_used: u64,
}

/// A job in a slot.
struct Active {
    slot: usize,
    events: UnboundedSender<Event>,
    /// Set when sending to the client failed (it went away).
    gone: Rc<Cell<bool>>,
    decoder: Decoder<'static>,
    /// The prompt tokens to feed (after the cached ones), and how many are fed.
    prompt: Vec<u32>,
    fed: usize,
    prompt_tokens: usize,
    cached: usize,
    started: Instant,
    prompt_secs: f64,
    /// Tokens to feed next (decode), and the logits the last run left.
    pending: Vec<u32>,
    logits: Option<Vec<f32>>,
    /// Generation has stopped; the job ends once `pending` is fed.
    stop: Option<StopReason>,
    /// Send each generated token's logprobs entry with this many alternatives.
    logprobs: Option<usize>,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }
}

struct Scheduler<'a> {
    model: &'a dyn Forward,
    /// Prompt tokens per chunk when no slot decodes.
    batch: usize,
    cpu: &'a Cpu,
    tok: &'a Tokenizer,
    g: &'a Gguf,
    slots: Vec<Slot>,
    /// In arrival order.
    active: Vec<Active>,
    clock: u64,
}

impl Scheduler<'_> {
    /// Picks a job's slot and resumes the slot's state there.
    fn admit(&mut self, job: Job) -> Result<(), Rejected> {
        let bad = |m: String| Rejected(400, m);
        let internal = |e: anyhow::Error| Rejected(500, format!("{e:#}"));
        let Prepared { tokens, reasoning } = job.prompt;
        let n_ctx = self.slots[0].seq.state.n_ctx;
        if tokens.is_empty() || tokens.len() >= n_ctx {
            return Err(bad(format!(
                "a prompt of {} tokens does not fit a context of {n_ctx}",
                tokens.len()
            )));
        }
        let room = n_ctx - tokens.len();
        let max_tokens = job.max_tokens.unwrap_or(room).min(room);
        // The free slot that can reuse most of the prompt, else the least recently used.
        let busy: Vec<usize> = self.active.iter().map(|a| a.slot).collect();
        let slot = (0..self.slots.len())
            .filter(|i| !busy.contains(i))
            .max_by_key(|&i| {
                let s = &self.slots[i];
                (s.seq.reusable(&tokens), std::cmp::Reverse(s.last_used))
            })
            .ok_or_else(|| internal(anyhow!("no free slot")))?;
        self.clock += 1;
        let s = &mut self.slots[slot];
        s.last_used = self.clock;
        let cached = s
            .seq
            .resume(self.model, self.cpu, &tokens)
            .map_err(internal)?;
        let params = GenParams {
            max_tokens: Some(max_tokens),
            sampler: job.sampling.config(self.g.metadata()),
            stop: job.sampling.stop.clone(),
            reasoning,
            think_budget: None,
            feed_last: true,
        };
        let gone = Rc::new(Cell::new(false));
        let on_piece = {
            let (events, gone) = (job.events.clone(), gone.clone());
            move |p: Piece| -> Result<()> {
                let (reasoning, text) = match p {
                    Piece::Reasoning(s) => (true, s),
                    Piece::Answer(s) => (false, s),
                };
                let ev = Event::Piece {
                    reasoning,
                    text: text.to_string(),
                };
                if events.send(ev).is_err() {
                    gone.set(true);
                    return Err(anyhow!("the client went away"));
                }
                Ok(())
            }
        };
        let (mut decoder, prompt) =
            Decoder::new(self.tok, &params, &tokens[cached..], Box::new(on_piece))
                .map_err(internal)?;
        if let Some(c) = job.constraint {
            decoder.constrain(c);
        }
        s.seq
            .check_room(prompt.len())
            .map_err(|e| bad(format!("{e:#}")))?;
        if prompt.len() == 1 {
            // Already one token short of the prompt's end: the end-of-prompt snapshot.
            s.seq.snapshot().map_err(internal)?;
        }
        let _ = job.events.send(Event::Started);
        self.active.push(Active {
            slot,
            events: job.events,
            gone,
            decoder,
            prompt,
            fed: 0,
            prompt_tokens: tokens.len(),
            cached,
            started: Instant::now(),
            prompt_secs: 0.0,
            pending: Vec::new(),
            logits: None,
            stop: None,
            logprobs: job.sampling.logprobs,
        });
        Ok(())
    }

    /// One forward pass over the active slots' runs, then one decode step for each slot that
    /// has logits; finished jobs leave their slots.
    fn step(&mut self) {
        let shutdown = SHUTDOWN.load(Ordering::Relaxed);
        // Jobs whose client left, and prompts cut short by a shutdown, end before the pass.
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            if a.events.is_closed() || a.gone.get() {
                self.active.remove(i);
            } else if shutdown && a.prefilling() {
                let a = self.active.remove(i);
                self.finish(a, StopReason::Interrupted);
            } else {
                i += 1;
            }
        }
        // The runs: every decoding slot's pending tokens and one prompt's next chunk.
        let decoding = self.active.iter().filter(|a| !a.prefilling()).count();
        let chunk = if decoding > 0 {
            SHARED_PREFILL_CHUNK.min(self.batch)
        } else {
            self.batch
        };
        let mut runs: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        let mut prefill_taken = false;
        for (ai, a) in self.active.iter().enumerate() {
            if a.prefilling() {
                if !prefill_taken {
                    prefill_taken = true;
                    // The last prompt token runs alone, after the end-of-prompt snapshot: a state
                    // serves only prompts longer than what it holds, so a snapshot one token
                    // short of the end serves the same prompt sent again (a retry, a
                    // regenerate) as well as every prompt that extends it.
                    let last = a.prompt.len() - 1;
                    let end = (a.fed + chunk).min(a.prompt.len());
                    let end = if end == a.prompt.len() && a.fed < last {
                        last
                    } else {
                        end
                    };
                    runs.push((ai, a.prompt[a.fed..end].to_vec(), true));
                }
            } else if !a.pending.is_empty() {
                runs.push((ai, a.pending.clone(), false));
            }
        }
        if !runs.is_empty() {
            if let Err(e) = self.forward(&runs) {
                // The states of the slots in the pass are at an unknown point: start them over.
                let message = format!("{e:#}");
                let mut failed: Vec<usize> = runs.iter().map(|r| r.0).collect();
                failed.sort_unstable();
                for ai in failed.into_iter().rev() {
                    let a = self.active.remove(ai);
                    let _ = self.slots[a.slot].seq.reset(self.model, self.cpu);
                    let _ = a.events.send(Event::Error {
                        status: 500,
                        message: message.clone(),
                    });
                }
            }
        }
        // Decode steps for the slots with fresh logits; jobs that stopped and fed all end.
        let mut i = 0;
        while i < self.active.len() {
            let a = &mut self.active[i];
            let mut end = a.stop.filter(|_| a.pending.is_empty());
            // A slot whose grammar mask is still being computed keeps its logits and sits
            // out this step; the others go on (see crate::grammar). When no slot ran in this
            // pass, waiting a little for the mask costs nobody anything.
            let wait = if runs.is_empty() {
                MASK_WAIT
            } else {
                Duration::ZERO
            };
            if end.is_none() && a.stop.is_none() && a.logits.is_some() && a.decoder.ready(wait) {
                if let Some(logits) = a.logits.take() {
                    let seq = &self.slots[a.slot].seq;
                    match a.decoder.step(self.tok, &logits, seq, &SHUTDOWN) {
                        Ok(step) => {
                            if let (Some(top), Some(&t)) = (a.logprobs, step.feed.first()) {
                                let entry = logprob_entry(self.tok, &logits, t, top);
                                let _ = a.events.send(Event::Logprobs(entry));
                            }
                            a.pending = step.feed;
                            a.stop = step.stop;
                            end = a.stop.filter(|_| a.pending.is_empty());
                        }
                        Err(e) => {
                            // The client went away, its grammar failed, or the model computed
                            // NaN logits.
                            let a = self.active.remove(i);
                            let grammar = e.downcast_ref::<GrammarFailed>().is_some();
                            if !a.gone.get() {
                                let _ = a.events.send(Event::Error {
                                    status: if grammar { 400 } else { 500 },
                                    message: format!("{e:#}"),
                                });
                            }
                            continue;
                        }
                    }
                }
            }
            match end {
                Some(stop) => {
                    let a = self.active.remove(i);
                    self.finish(a, stop);
                }
                None => i += 1,
            }
        }
    }

    /// Runs `runs` (active index, tokens, whether a prompt chunk) in one pass and books the
    /// results into their jobs and slots.
    fn forward(&mut self, runs: &[(usize, Vec<u32>, bool)]) -> Result<()> {
        let slot_of: Vec<usize> = runs.iter().map(|r| self.active[r.0].slot).collect();
        let mut by_slot: Vec<Option<&mut State>> = self
            .slots
            .iter_mut()
            .map(|s| Some(&mut s.seq.state))
            .collect();
        let mut states: Vec<&mut State> = slot_of
            .iter()
            .map(|&s| by_slot[s].take().expect("one run per slot"))
            .collect();
        let toks: Vec<&[u32]> = runs.iter().map(|r| r.1.as_slice()).collect();
        let rows = self.model.forward_seqs(self.cpu, &mut states, &toks)?;
        for ((ai, tokens, of_prompt), logits) in runs.iter().zip(rows) {
            let a = &mut self.active[*ai];
            let seq = &mut self.slots[a.slot].seq;
            seq.consumed_run(tokens, *of_prompt)?;
            if *of_prompt {
                a.fed += tokens.len();
                if a.fed + 1 == a.prompt.len() {
                    seq.snapshot()?;
                }
                if a.prefilling() {
                    continue;
                }
                a.prompt_secs = a.started.elapsed().as_secs_f64();
                a.decoder.start();
            } else {
                a.pending.clear();
            }
            a.logits = Some(logits);
        }
        Ok(())
    }

    fn finish(&mut self, a: Active, stop: StopReason) {
        let Active {
            events,
            decoder,
            prompt_tokens,
            cached,
            prompt_secs,
            ..
        } = a;
        let Ok(o) = decoder.finish(stop, prompt_tokens, prompt_secs) else {
            return; // the client went away
        };
        let finish_reason = match o.stop {
            StopReason::Length | StopReason::Context => "length",
            // Only a shutdown interrupts a server's job.
            StopReason::Interrupted => "abort",
            _ => "stop",
        };
        let _ = events.send(Event::Done(Done {
            finish_reason,
            prompt_tokens,
            cached_tokens: cached,
            completion_tokens: o.generated_tokens,
            reasoning_tokens: o.reasoning_tokens,
            prompt_secs: o.prompt_secs,
            generate_secs: o.generate_secs,
        }));
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
