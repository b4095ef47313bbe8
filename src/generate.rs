//! The generation loop shared by `run` and `chat`: a model, its state and the tokens that state
//! has consumed; prompt prefill in batches; sampling until an end-of-generation token, a stop
//! string, the token limit, a full context or an interrupt; reasoning (`<think>` … `</think>`)
//! kept apart from the answer, with an optional thinking-token budget; streaming text out
//! through a callback that never sees half a UTF-8 character or the start of a stop string.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};

use crate::backend::cpu::Cpu;
use crate::model::{Forward, State};
use crate::sample::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Prompt tokens evaluated per forward call (bounds activation memory on long prompts).
const PREFILL_BATCH: usize = 512;

/// Text appended when the thinking budget runs out: it closes the block so the model answers.
const CLOSE_THINKING: &str = "\n</think>\n\n";

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

/// A model with one sequence's state.
pub struct Engine<'m> {
    pub model: &'m dyn Forward,
    pub cpu: Cpu,
    pub tok: Tokenizer,
    pub state: State,
    /// Every token the state has consumed, in order.
    pub consumed: Vec<u32>,
    /// Saved states of earlier prompts (off unless enabled).
    snapshots: Snapshots,
    think_open: Option<u32>,
    think_close: Option<u32>,
}

impl<'m> Engine<'m> {
    pub fn new(
        model: &'m dyn Forward,
        cpu: Cpu,
        tok: Tokenizer,
        n_ctx: usize,
    ) -> Result<Engine<'m>> {
        let state = model.new_state(n_ctx, cpu.precision)?;
        Ok(Engine {
            think_open: tok.special_id("<think>"),
            think_close: tok.special_id("</think>"),
            model,
            cpu,
            tok,
            state,
            consumed: Vec::new(),
            snapshots: Snapshots::default(),
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.state.n_ctx
    }

    /// Whether the vocabulary has `<think>` and `</think>` tokens.
    pub fn can_think(&self) -> bool {
        self.think_open.is_some() && self.think_close.is_some()
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) -> Result<()> {
        self.state = self.model.new_state(self.state.n_ctx, self.cpu.precision)?;
        self.consumed.clear();
        Ok(())
    }

    /// Keeps snapshots of the state: at the end of every prompt and every `every` prompt tokens
    /// (0: only at the end), the newest `keep` of them.
    pub fn enable_snapshots(&mut self, every: usize, keep: usize) {
        self.snapshots.every = every;
        self.snapshots.keep = keep;
    }

    /// Saves the state as it is now (when snapshots are on and this point is not saved yet).
    fn snapshot(&mut self) -> Result<()> {
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

    /// Brings the state to the longest start of `prompt` it can (shorter than the prompt, so
    /// that feeding the rest yields logits): the state as it is, a snapshot, or a fresh state.
    /// Returns how many tokens of `prompt` the state then holds.
    pub fn resume(&mut self, prompt: &[u32]) -> Result<usize> {
        let usable = |t: &[u32]| !t.is_empty() && t.len() < prompt.len() && prompt.starts_with(t);
        let here = if usable(&self.consumed) {
            self.consumed.len()
        } else {
            0
        };
        let best = self
            .snapshots
            .saved
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| usable(t) && t.len() > here)
            .max_by_key(|(_, (t, _))| t.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                // Restored in place: the snapshot's bytes (megabytes for long prompts) are read,
                // not copied.
                let (tokens, bytes) = &self.snapshots.saved[i];
                let restored = self.state.restore(bytes);
                if let Err(e) = restored {
                    self.reset()?;
                    return Err(e);
                }
                self.consumed.clone_from(tokens);
                Ok(self.consumed.len())
            }
            None if here > 0 => Ok(here),
            None => {
                self.reset()?;
                Ok(0)
            }
        }
    }

    /// Runs `tokens` through the model in batches; the last row of logits, or None when
    /// interrupted between batches.
    pub fn feed(&mut self, tokens: &[u32], interrupt: &AtomicBool) -> Result<Option<Vec<f32>>> {
        if self.state.pos + tokens.len() > self.state.n_ctx {
            bail!(
                "{} tokens do not fit in the context: {} already used of {} (raise -c/--ctx-size)",
                tokens.len(),
                self.state.pos,
                self.state.n_ctx
            );
        }
        let mut logits = None;
        for chunk in tokens.chunks(PREFILL_BATCH) {
            if interrupt.load(Ordering::Relaxed) {
                return Ok(None);
            }
            logits = Some(
                self.model
                    .forward(&self.cpu, &mut self.state, chunk, false)?,
            );
            self.consumed.extend_from_slice(chunk);
            let every = self.snapshots.every;
            if every > 0 && tokens.len() > 1 && chunk.len() == PREFILL_BATCH {
                let last = self.snapshots.saved.last().map_or(0, |(t, _)| t.len());
                if self.consumed.len() >= last + every {
                    self.snapshot()?;
                }
            }
        }
        Ok(logits)
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
        if prompt.is_empty() {
            bail!("empty prompt: nothing to generate from");
        }
        let mut inside = matches!(p.reasoning, Reasoning::Parse { inside: true });
        // A zero budget: close the block the prompt opened before the model says anything.
        let mut prompt = prompt.to_vec();
        if inside && p.think_budget == Some(0) {
            prompt.extend(self.tok.encode_continuation(CLOSE_THINKING, true));
            inside = false;
        }
        let t0 = Instant::now();
        let first = self.feed(&prompt, interrupt)?;
        if first.is_some() {
            self.snapshot()?;
        }
        let prompt_secs = t0.elapsed().as_secs_f64();
        let mut out = Output::new(p, on_piece);
        let mut sampler = Sampler::new(p.sampler.clone());
        let parse = matches!(p.reasoning, Reasoning::Parse { .. });
        let (mut generated, mut thinking) = (0usize, 0usize);
        let t1 = Instant::now();
        let stop = 'gen: {
            let Some(mut logits) = first else {
                break 'gen StopReason::Interrupted;
            };
            loop {
                if interrupt.load(Ordering::Relaxed) {
                    break 'gen StopReason::Interrupted;
                }
                if p.max_tokens.is_some_and(|m| generated >= m) {
                    break 'gen StopReason::Length;
                }
                if self.state.pos >= self.state.n_ctx {
                    break 'gen StopReason::Context;
                }
                let tok = sampler.sample(&logits, &self.consumed);
                if self.tok.is_eog(tok) {
                    break 'gen StopReason::Eog;
                }
                generated += 1;
                let mut batch = vec![tok];
                if inside {
                    thinking += 1;
                }
                let budget_spent = parse
                    && inside
                    && tok != self.think_close.unwrap_or(u32::MAX)
                    && p.think_budget.is_some_and(|b| thinking >= b);
                if budget_spent {
                    batch.extend(self.tok.encode_continuation(CLOSE_THINKING, true));
                }
                let mut stopped = false;
                for &t in &batch {
                    if parse && Some(t) == self.think_open {
                        out.flush_decoder(inside)?;
                        inside = true;
                    } else if parse && Some(t) == self.think_close {
                        out.flush_decoder(inside)?;
                        inside = false;
                    } else {
                        stopped |= out.push(&self.tok.token_bytes(t, false), inside)?;
                    }
                }
                let fits = self.state.pos + batch.len() <= self.state.n_ctx;
                let reason = if stopped {
                    Some(StopReason::Stop)
                } else if p.max_tokens.is_some_and(|m| generated >= m) {
                    Some(StopReason::Length)
                } else if !fits {
                    Some(StopReason::Context)
                } else {
                    None
                };
                if reason.is_none() || (p.feed_last && fits) {
                    if let Some(l) = self.feed(&batch, &AtomicBool::new(false))? {
                        logits = l;
                    }
                }
                if let Some(r) = reason {
                    break 'gen r;
                }
            }
        };
        if stop != StopReason::Stop {
            out.finish(inside)?;
        }
        Ok(Outcome {
            text: out.answer,
            reasoning: out.reasoning,
            stop,
            prompt_tokens: prompt.len(),
            generated_tokens: generated,
            reasoning_tokens: thinking,
            prompt_secs,
            generate_secs: t1.elapsed().as_secs_f64(),
        })
    }
}

/// Routes decoded text to the two channels, trimming leading whitespace of each channel in
/// parse mode, and holds back answer text that could be the start of a stop string.
struct Output<'a> {
    on_piece: &'a mut dyn FnMut(Piece) -> Result<()>,
    decoder: StreamDecoder,
    stop: &'a [String],
    trim: bool,
    answer: String,
    reasoning: String,
    /// Answer text not yet passed on (a possible stop-string prefix).
    held: String,
}

impl<'a> Output<'a> {
    fn new(p: &'a GenParams, on_piece: &'a mut dyn FnMut(Piece) -> Result<()>) -> Self {
        Output {
            on_piece,
            decoder: StreamDecoder::new(),
            stop: &p.stop,
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
        let mut out = Output::new(p, &mut cb);
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
