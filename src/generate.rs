//! The generation loop shared by `run` and `chat`: a model, its state and the tokens that state
//! has consumed; prompt prefill in batches; sampling until an end-of-generation token, a stop
//! string, the token limit, a full context or an interrupt; reasoning (`<think>` … `</think>`,
//! or gpt-oss's harmony `analysis` channel) kept apart from the answer, with an optional
//! thinking-token budget; streaming text out
//! through a callback that never sees half a UTF-8 character or the start of a stop string.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use crate::backend::cpu::Cpu;
use crate::model::{Forward, State};
use crate::sample::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Prompt tokens evaluated per forward call (bounds activation memory on long prompts).
pub const PREFILL_BATCH: usize = 512;

/// Text appended when the thinking budget runs out: it closes the block so the model answers.
const CLOSE_THINKING: &str = "\n</think>\n\n";

/// The same for harmony: the analysis message ends and a final one begins.
pub const CLOSE_ANALYSIS: &str = "<|end|><|start|>assistant<|channel|>final<|message|>";

/// How a model marks reasoning in what it writes.
enum Markup {
    /// `<think>` … `</think>` (Qwen3, Nemotron, DeepSeek-R1).
    Think {
        open: Option<u32>,
        close: Option<u32>,
    },
    /// gpt-oss's harmony: `<|start|>ROLE<|channel|>NAME<|message|>` opens a message (the
    /// `analysis` channel is reasoning; `final` and `commentary` are answer) and `<|end|>`
    /// closes it. Headers are never shown.
    Harmony {
        start: u32,
        channel: u32,
        message: u32,
        end: u32,
        /// The header being read (from `<|start|>` or `<|channel|>` to `<|message|>`).
        header: Option<Vec<u8>>,
    },
}

impl Markup {
    fn for_vocab(tok: &Tokenizer) -> Markup {
        let id = |s| tok.special_id(s);
        match (
            id("<|start|>"),
            id("<|channel|>"),
            id("<|message|>"),
            id("<|end|>"),
        ) {
            (Some(start), Some(channel), Some(message), Some(end)) => Markup::Harmony {
                start,
                channel,
                message,
                end,
                header: None,
            },
            _ => Markup::Think {
                open: id("<think>"),
                close: id("</think>"),
            },
        }
    }

    /// Whether the vocabulary marks reasoning at all.
    fn can_think(&self) -> bool {
        match self {
            Markup::Think { open, close } => open.is_some() && close.is_some(),
            Markup::Harmony { .. } => true,
        }
    }

    /// What the decoder appends to end reasoning when the budget runs out.
    /// The token that opens reasoning where the model writes it itself (Qwen3's `<think>`).
    fn open_token(&self) -> Option<u32> {
        match self {
            Markup::Think { open, .. } => *open,
            Markup::Harmony { .. } => None,
        }
    }

    fn close_text(&self) -> &'static str {
        match self {
            Markup::Think { .. } => CLOSE_THINKING,
            Markup::Harmony { .. } => CLOSE_ANALYSIS,
        }
    }

    /// Whether `t` itself ends reasoning.
    fn closes(&self, t: u32) -> bool {
        match self {
            Markup::Think { close, .. } => Some(t) == *close,
            Markup::Harmony { end, .. } => t == *end,
        }
    }
}

/// How generated text is split into reasoning and answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reasoning {
    /// Everything is answer, verbatim (raw completion).
    Verbatim,
    /// `<think>` … `</think>` is reasoning; `inside`: the prompt already opened the block.
    Parse { inside: bool },
}

#[derive(Clone, Debug)]
pub struct GenParams {
    /// Most tokens to generate (None: until the context is full).
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    /// Generation stops before any of these strings would appear in the answer.
    pub stop: Vec<String>,
    pub reasoning: Reasoning,
    /// Thinking tokens allowed before the block is closed for the model.
    pub think_budget: Option<usize>,
    /// Feed the last sampled token too, so the state holds everything that was generated
    /// (chat continues from it; a one-shot run does not need the extra step).
    pub feed_last: bool,
}

/// A piece of streamed output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Reasoning(&'a str),
    Answer(&'a str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token.
    Eog,
    /// The token limit.
    Length,
    /// A stop string.
    Stop,
    /// The context is full.
    Context,
    Interrupted,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eog => "eos",
            StopReason::Length => "length",
            StopReason::Stop => "stop",
            StopReason::Context => "context",
            StopReason::Interrupted => "interrupted",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub text: String,
    pub reasoning: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub reasoning_tokens: usize,
    pub prompt_secs: f64,
    pub generate_secs: f64,
}

/// Saved states of earlier prompts, so that a later prompt sharing their start resumes there
/// instead of from scratch (a recurrent state cannot be rewound token by token): one at the end
/// of every prompt, and one every `every` tokens of a long prefill; the newest `keep` are kept.
#[derive(Default)]
struct Snapshots {
    every: usize,
    keep: usize,
    /// (tokens consumed, the state after them), oldest first.
    saved: Vec<(Vec<u32>, Vec<u8>)>,
}

/// Whether `t` is a non-empty start of `prompt` shorter than it: what a state (or snapshot)
/// that consumed `t` can resume `prompt` from, feeding the rest.
fn starts_shorter(prompt: &[u32], t: &[u32]) -> bool {
    !t.is_empty() && t.len() < prompt.len() && prompt.starts_with(t)
}

/// One sequence: its state, every token that state has consumed, and its snapshots. An
/// [`Engine`] drives one; the server keeps one per slot and steps several together.
pub struct Sequence {
    pub state: State,
    /// Every token the state has consumed, in order.
    pub consumed: Vec<u32>,
    /// Saved states of earlier prompts (off unless enabled).
    snapshots: Snapshots,
    /// Tokens per forward pass when feeding a prompt (`-b`; [`PREFILL_BATCH`] by default).
    pub batch: usize,
}

impl Sequence {
    pub fn new(model: &dyn Forward, n_ctx: usize, cpu: &Cpu) -> Result<Sequence> {
        Ok(Sequence {
            state: model.new_state(n_ctx, cpu.kv)?,
            consumed: Vec::new(),
            snapshots: Snapshots::default(),
            batch: PREFILL_BATCH,
        })
    }

    /// Forgets the sequence (its snapshots stay). The state is emptied in place; if that
    /// fails (a device error) a fresh one is made.
    pub fn reset(&mut self, model: &dyn Forward, cpu: &Cpu) -> Result<()> {
        self.consumed.clear();
        if self.state.clear().is_err() {
            self.state = model.new_state(self.state.n_ctx, cpu.kv)?;
        }
        Ok(())
    }

    /// Keeps snapshots of the state: at the end of every prompt and every `every` prompt tokens
    /// (0: only at the end), the newest `keep` of them.
    pub fn enable_snapshots(&mut self, every: usize, keep: usize) {
        self.snapshots.every = every;
        self.snapshots.keep = keep;
    }

    /// Saves the state as it is now (when snapshots are on and this point is not saved yet).
    pub fn snapshot(&mut self) -> Result<()> {
        let s = &mut self.snapshots;
        if s.keep == 0
            || self.consumed.is_empty()
            || s.saved.iter().any(|(t, _)| *t == self.consumed)
        {
            return Ok(());
        }
        if s.saved.len() == s.keep {
            s.saved.remove(0);
        }
        s.saved
            .push((self.consumed.clone(), self.state.to_bytes()?));
        Ok(())
    }

    /// How many tokens of `prompt` [`Sequence::resume`] would keep.
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        std::iter::once(&self.consumed)
            .chain(self.snapshots.saved.iter().map(|(t, _)| t))
            .filter(|t| starts_shorter(prompt, t))
            .map(Vec::len)
            .max()
            .unwrap_or(0)
    }

    /// Brings the state to the longest start of `prompt` it can (shorter than the prompt, so
    /// that feeding the rest yields logits): the state as it is, a snapshot, or a fresh state.
    /// Returns how many tokens of `prompt` the state then holds.
    pub fn resume(&mut self, model: &dyn Forward, cpu: &Cpu, prompt: &[u32]) -> Result<usize> {
        let want = self.reusable(prompt);
        if want == 0 {
            self.reset(model, cpu)?;
            return Ok(0);
        }
        // The state itself when it is that long (nothing to restore), else the snapshot.
        if self.consumed.len() == want && starts_shorter(prompt, &self.consumed) {
            return Ok(want);
        }
        let (tokens, bytes) = self
            .snapshots
            .saved
            .iter()
            .find(|(t, _)| t.len() == want && starts_shorter(prompt, t))
            .ok_or_else(|| anyhow::anyhow!("no snapshot of the {want} tokens to resume from"))?;
        // Restored in place: the snapshot's bytes (megabytes for long prompts) are read, not
        // copied.
        if let Err(e) = self.state.restore(bytes) {
            self.reset(model, cpu)?;
            return Err(e);
        }
        self.consumed.clone_from(tokens);
        Ok(want)
    }

    /// An error unless `n` more tokens fit in the context.
    pub fn check_room(&self, n: usize) -> Result<()> {
        if self.state.pos + n > self.state.n_ctx {
            bail!(
                "{n} tokens do not fit in the context: {} already used of {} (raise -c/--ctx-size)",
                self.state.pos,
                self.state.n_ctx
            );
        }
        Ok(())
    }

    /// Book-keeping after the model consumed `tokens`: they join `consumed`, and after a
    /// prefill batch of a prompt (`of_prompt`) an interval snapshot is taken when one is due.
    pub fn consumed_run(&mut self, tokens: &[u32], of_prompt: bool) -> Result<()> {
        self.consumed.extend_from_slice(tokens);
        let every = self.snapshots.every;
        if every > 0 && of_prompt {
            let last = self.snapshots.saved.last().map_or(0, |(t, _)| t.len());
            if self.consumed.len() >= last + every {
                self.snapshot()?;
            }
        }
        Ok(())
    }

    /// Runs `tokens` (a prompt's when `of_prompt`) through the model in batches; the last row
    /// of logits, or None when interrupted between batches.
    pub fn feed(
        &mut self,
        model: &dyn Forward,
        cpu: &Cpu,
        tokens: &[u32],
        of_prompt: bool,
        interrupt: &AtomicBool,
    ) -> Result<Option<Vec<f32>>> {
        self.check_room(tokens.len())?;
        let mut logits = None;
        for chunk in tokens.chunks(self.batch.max(1)) {
            if interrupt.load(Ordering::Relaxed) {
                return Ok(None);
            }
            logits = Some(model.forward(cpu, &mut self.state, chunk, false)?);
            self.consumed_run(chunk, of_prompt)?;
        }
        Ok(logits)
    }
}

/// A model with one sequence.
pub struct Engine<'m> {
    pub model: &'m dyn Forward,
    pub cpu: Cpu,
    pub tok: Tokenizer,
    pub seq: Sequence,
    /// Every answer follows this grammar (`--grammar`, `--json-schema`), compiled per reply.
    grammar: Option<(crate::grammar::Grammars, crate::grammar::GrammarSpec)>,
}

impl<'m> Engine<'m> {
    pub fn new(
        model: &'m dyn Forward,
        cpu: Cpu,
        tok: Tokenizer,
        n_ctx: usize,
    ) -> Result<Engine<'m>> {
        let seq = Sequence::new(model, n_ctx, &cpu)?;
        Ok(Engine {
            model,
            cpu,
            tok,
            seq,
            grammar: None,
        })
    }

    /// Makes every answer follow `spec` (compiled here once, so that a grammar that cannot be
    /// used fails before the model runs).
    pub fn constrain(&mut self, spec: crate::grammar::GrammarSpec) -> Result<()> {
        let g = crate::grammar::Grammars::for_vocab(&self.tok)?;
        g.compile(&spec).map_err(|e| anyhow!("{e}"))?;
        self.grammar = Some((g, spec));
        Ok(())
    }

    pub fn n_ctx(&self) -> usize {
        self.seq.state.n_ctx
    }

    /// Whether the vocabulary marks reasoning (`<think>` and `</think>`, or harmony's channels).
    pub fn can_think(&self) -> bool {
        Markup::for_vocab(&self.tok).can_think()
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) -> Result<()> {
        self.seq.reset(self.model, &self.cpu)
    }

    /// See [`Sequence::resume`].
    pub fn resume(&mut self, prompt: &[u32]) -> Result<usize> {
        self.seq.resume(self.model, &self.cpu, prompt)
    }

    /// Feeds `prompt` (the new tokens only: the state may already hold earlier turns) and
    /// generates, passing text to `on_piece` as it comes. An error from `on_piece` (a closed
    /// stdout) ends generation with that error.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        p: &GenParams,
        interrupt: &AtomicBool,
        on_piece: &mut dyn FnMut(Piece) -> Result<()>,
    ) -> Result<Outcome> {
        let (mut dec, prompt) = Decoder::new(&self.tok, p, prompt, Box::new(on_piece))?;
        if let Some((g, spec)) = &self.grammar {
            dec.constrain(g.compile(spec).map_err(|e| anyhow!("{e}"))?);
        }
        let t0 = Instant::now();
        let before = self.seq.consumed.len();
        let first = self
            .seq
            .feed(self.model, &self.cpu, &prompt, true, interrupt)?;
        // An interrupt may cut the prompt short: count what was read.
        let prompt_read = self.seq.consumed.len() - before;
        if first.is_some() {
            self.seq.snapshot()?;
        }
        let prompt_secs = t0.elapsed().as_secs_f64();
        dec.start();
        let stop = 'gen: {
            let Some(mut logits) = first else {
                break 'gen StopReason::Interrupted;
            };
            loop {
                let step = dec.step(&self.tok, &logits, &self.seq, interrupt)?;
                if !step.feed.is_empty() {
                    let no = AtomicBool::new(false);
                    let fed = self
                        .seq
                        .feed(self.model, &self.cpu, &step.feed, false, &no)?;
                    logits = fed.unwrap_or(logits);
                }
                if let Some(r) = step.stop {
                    break 'gen r;
                }
            }
        };
        dec.finish(stop, prompt_read, prompt_secs)
    }
}

/// What one decode step decided: tokens to feed (the sampled one, plus the block's close when
/// the thinking budget ran out; none when the step stopped without feeding), and whether
/// generation stops.
pub struct Step {
    pub feed: Vec<u32>,
    pub stop: Option<StopReason>,
}

/// Generation after the prompt, one sampled token per [`Decoder::step`]: sampling, reasoning
/// tracking and the thinking budget, stop conditions, and the streamed output. The caller feeds
/// what a step returns (alone, or batched with other sequences) and passes the logits back.
pub struct Decoder<'a> {
    p: GenParams,
    out: Output<'a>,
    sampler: Sampler,
    inside: bool,
    generated: usize,
    thinking: usize,
    markup: Markup,
    started: Instant,
}

impl<'a> Decoder<'a> {
    /// A decoder for `p`, and the prompt to feed before the first step (`prompt`, with the
    /// thinking block closed when the budget is zero and the prompt opened it).
    pub fn new(
        tok: &Tokenizer,
        p: &GenParams,
        prompt: &[u32],
        on_piece: Box<dyn FnMut(Piece) -> Result<()> + 'a>,
    ) -> Result<(Decoder<'a>, Vec<u32>)> {
        if prompt.is_empty() {
            bail!("empty prompt: nothing to generate from");
        }
        let mut inside = matches!(p.reasoning, Reasoning::Parse { inside: true });
        let markup = Markup::for_vocab(tok);
        // A zero budget: close the block the prompt opened before the model says anything.
        let mut prompt = prompt.to_vec();
        if inside && p.think_budget == Some(0) {
            prompt.extend(tok.encode_continuation(markup.close_text(), true));
            inside = false;
        }
        let dec = Decoder {
            out: Output::new(p, on_piece),
            sampler: Sampler::new(p.sampler.clone()),
            p: p.clone(),
            inside,
            generated: 0,
            thinking: 0,
            markup,
            started: Instant::now(),
        };
        Ok((dec, prompt))
    }

    /// Makes the answer follow `c` (structured output).
    pub fn constrain(&mut self, c: crate::grammar::Constraint) {
        self.sampler.constrain(c);
    }

    /// Whether the next step can sample without waiting (the grammar's mask, when there is
    /// one, is computed; see [`crate::grammar`]). Waits up to `wait` for it.
    pub fn ready(&mut self, wait: std::time::Duration) -> bool {
        self.hold_grammar();
        self.sampler.ready(wait)
    }

    /// A grammar shapes the answer: the reasoning before it is free, and the first token may
    /// open reasoning (Qwen3 writes `<think>` itself) beside what the grammar allows.
    fn hold_grammar(&mut self) {
        let parse = matches!(self.p.reasoning, Reasoning::Parse { .. });
        let open = (parse && !self.inside && self.generated == 0)
            .then(|| self.markup.open_token())
            .flatten();
        self.sampler.hold_grammar(parse && self.inside, open);
    }

    /// Marks the end of the prompt (generation time counts from here).
    pub fn start(&mut self) {
        self.started = Instant::now();
    }

    /// Samples from `logits` (the last row `seq` produced) and streams the token's text.
    pub fn step(
        &mut self,
        tok: &Tokenizer,
        logits: &[f32],
        seq: &Sequence,
        interrupt: &AtomicBool,
    ) -> Result<Step> {
        let p = &self.p;
        let stop = |r| {
            Ok(Step {
                feed: Vec::new(),
                stop: Some(r),
            })
        };
        if interrupt.load(Ordering::Relaxed) {
            return stop(StopReason::Interrupted);
        }
        if p.max_tokens.is_some_and(|m| self.generated >= m) {
            return stop(StopReason::Length);
        }
        let (pos, n_ctx) = (seq.state.pos, seq.state.n_ctx);
        if pos >= n_ctx {
            return stop(StopReason::Context);
        }
        if crate::sample::has_nan(logits) {
            bail!(
                "the model computed NaN logits after {} tokens (a corrupt or badly quantized weight?)",
                seq.consumed.len()
            );
        }
        let parse = matches!(p.reasoning, Reasoning::Parse { .. });
        let think_budget = p.think_budget;
        self.hold_grammar();
        let t = self.sampler.sample(logits, &seq.consumed)?;
        if tok.is_eog(t) {
            return stop(StopReason::Eog);
        }
        self.generated += 1;
        let mut batch = vec![t];
        if self.inside {
            self.thinking += 1;
        }
        let budget_spent = parse
            && self.inside
            && !self.markup.closes(t)
            && think_budget.is_some_and(|b| self.thinking >= b);
        if budget_spent {
            batch.extend(tok.encode_continuation(self.markup.close_text(), true));
        }
        let mut stopped = false;
        for &t in &batch {
            stopped |= self.route_token(tok, t, parse)?;
        }
        let fits = pos + batch.len() <= n_ctx;
        let reason = if stopped {
            Some(StopReason::Stop)
        } else if self.p.max_tokens.is_some_and(|m| self.generated >= m) {
            Some(StopReason::Length)
        } else if !fits {
            Some(StopReason::Context)
        } else {
            None
        };
        let feed = if reason.is_none() || (self.p.feed_last && fits) {
            batch
        } else {
            Vec::new()
        };
        Ok(Step { feed, stop: reason })
    }

    /// Passes token `t`'s text on to the reasoning or the answer, or, with `parse`, takes it as
    /// markup; true when a stop string was reached.
    fn route_token(&mut self, tok: &Tokenizer, t: u32, parse: bool) -> Result<bool> {
        let Decoder {
            markup,
            out,
            inside,
            ..
        } = self;
        if parse {
            match markup {
                Markup::Think { open, close } => {
                    if Some(t) == *open || Some(t) == *close {
                        out.flush_decoder(*inside)?;
                        *inside = Some(t) == *open;
                        return Ok(false);
                    }
                }
                Markup::Harmony {
                    start,
                    channel,
                    message,
                    end,
                    header,
                } => {
                    if t == *start || t == *channel {
                        if header.is_none() {
                            out.flush_decoder(*inside)?;
                        }
                        header.get_or_insert_with(Vec::new);
                        return Ok(false);
                    }
                    if t == *message {
                        let h = header.take().unwrap_or_default();
                        *inside = String::from_utf8_lossy(&h).contains("analysis");
                        return Ok(false);
                    }
                    if t == *end {
                        out.flush_decoder(*inside)?;
                        *header = None;
                        *inside = false;
                        return Ok(false);
                    }
                    if let Some(h) = header {
                        h.extend(tok.token_bytes(t, false));
                        return Ok(false);
                    }
                }
            }
        }
        out.push(&tok.token_bytes(t, false), *inside)
    }

    /// Ends generation for `stop`: flushes what the output holds back and sums it up.
    pub fn finish(
        mut self,
        stop: StopReason,
        prompt_tokens: usize,
        prompt_secs: f64,
    ) -> Result<Outcome> {
        if stop != StopReason::Stop {
            self.out.finish(self.inside)?;
        }
        Ok(Outcome {
            text: std::mem::take(&mut self.out.answer),
            reasoning: std::mem::take(&mut self.out.reasoning),
            stop,
            prompt_tokens,
            generated_tokens: self.generated,
            reasoning_tokens: self.thinking,
            prompt_secs,
            generate_secs: self.started.elapsed().as_secs_f64(),
        })
    }
}

/// Routes decoded text to the two channels, trimming leading whitespace of each channel in
/// parse mode, and holds back answer text that could be the start of a stop string.
struct Output<'a> {
    on_piece: Box<dyn FnMut(Piece) -> Result<()> + 'a>,
    decoder: StreamDecoder,
    stop: Vec<String>,
    trim: bool,
    answer: String,
    reasoning: String,
    /// Answer text not yet passed on (a possible stop-string prefix).
    held: String,
}

impl<'a> Output<'a> {
    fn new(p: &GenParams, on_piece: Box<dyn FnMut(Piece) -> Result<()> + 'a>) -> Self {
        Output {
            on_piece,
            decoder: StreamDecoder::new(),
            stop: p.stop.clone(),
            trim: matches!(p.reasoning, Reasoning::Parse { .. }),
            answer: String::new(),
            reasoning: String::new(),
            held: String::new(),
        }
    }

    /// Adds a token's bytes; true when a stop string was reached.
    fn push(&mut self, bytes: &[u8], inside: bool) -> Result<bool> {
        let text = self.decoder.push(bytes);
        self.route(&text, inside)
    }

    /// Ends a channel: whatever the decoder holds goes to it.
    fn flush_decoder(&mut self, inside: bool) -> Result<()> {
        let text = self.decoder.finish();
        self.route(&text, inside)?;
        Ok(())
    }

    fn route(&mut self, text: &str, inside: bool) -> Result<bool> {
        if text.is_empty() {
            return Ok(false);
        }
        if inside {
            let t = if self.trim && self.reasoning.is_empty() {
                text.trim_start()
            } else {
                text
            };
            if !t.is_empty() {
                self.reasoning.push_str(t);
                (self.on_piece)(Piece::Reasoning(t))?;
            }
            return Ok(false);
        }
        let t = if self.trim && self.answer.is_empty() && self.held.is_empty() {
            text.trim_start()
        } else {
            text
        };
        self.held.push_str(t);
        // A complete stop string: emit what precedes it and stop.
        if let Some(at) = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let before = self.held[..at].to_string();
            self.emit_answer(&before)?;
            self.held.clear();
            return Ok(true);
        }
        // Keep back the longest tail that could still grow into a stop string.
        let keep = self
            .stop
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let ready = self.held[..cut].to_string();
        self.held.drain(..cut);
        self.emit_answer(&ready)?;
        Ok(false)
    }

    fn emit_answer(&mut self, s: &str) -> Result<()> {
        if !s.is_empty() {
            self.answer.push_str(s);
            (self.on_piece)(Piece::Answer(s))?;
        }
        Ok(())
    }

    /// End of generation: flush the decoder and any held-back text.
    fn finish(&mut self, inside: bool) -> Result<()> {
        let text = self.decoder.finish();
        self.route(&text, inside)?;
        let held = std::mem::take(&mut self.held);
        self.emit_answer(&held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (on char
/// boundaries).
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            stop.is_char_boundary(n)
                && text.is_char_boundary(text.len() - n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_suffix_overlap() {
        assert_eq!(longest_prefix_suffix("hello wor", "world"), 3);
        assert_eq!(longest_prefix_suffix("hello", "world"), 0);
        assert_eq!(longest_prefix_suffix("ab", "abc"), 2);
        assert_eq!(longest_prefix_suffix("xé", "éa"), 2);
    }

    fn params(stop: &[&str], reasoning: Reasoning) -> GenParams {
        GenParams {
            max_tokens: None,
            sampler: SamplerConfig::default(),
            stop: stop.iter().map(|s| s.to_string()).collect(),
            reasoning,
            think_budget: None,
            feed_last: false,
        }
    }

    /// Feeds `chunks` through an Output; returns the pieces seen, whether it stopped, and the
    /// final answer.
    fn run(p: &GenParams, chunks: &[(&str, bool)]) -> (Vec<String>, bool, String, String) {
        let mut seen = Vec::new();
        let mut cb = |piece: Piece| {
            seen.push(match piece {
                Piece::Answer(s) => format!("A:{s}"),
                Piece::Reasoning(s) => format!("R:{s}"),
            });
            Ok(())
        };
        let mut out = Output::new(p, Box::new(&mut cb));
        let mut stopped = false;
        for (c, inside) in chunks {
            if out.push(c.as_bytes(), *inside).unwrap() {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.finish(false).unwrap();
        }
        let (a, r) = (out.answer.clone(), out.reasoning.clone());
        drop(out);
        (seen, stopped, a, r)
    }

    #[test]
    fn stop_strings_are_never_streamed_even_across_tokens() {
        let p = params(&["\nUser:"], Reasoning::Verbatim);
        let (seen, stopped, answer, _) = run(
            &p,
            &[("Hi", false), (" there\nUs", false), ("er: more", false)],
        );
        assert!(stopped);
        assert_eq!(answer, "Hi there");
        assert_eq!(seen.concat(), "A:HiA: there");
        // A partial match that does not complete is released.
        let (_, stopped, answer, _) = run(&p, &[("a\nUs", false), ("ed", false)]);
        assert!(!stopped);
        assert_eq!(answer, "a\nUsed");
    }

    #[test]
    fn reasoning_and_answer_are_split_and_trimmed() {
        let p = params(&[], Reasoning::Parse { inside: true });
        let (seen, _, answer, reasoning) = run(
            &p,
            &[
                ("\nplan", true),
                (" it", true),
                ("\n\nThe", false),
                (" answer", false),
            ],
        );
        assert_eq!(reasoning, "plan it");
        assert_eq!(answer, "The answer");
        assert_eq!(seen, ["R:plan", "R: it", "A:The", "A: answer"]);
    }
}
