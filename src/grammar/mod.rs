//! Structured output: a JSON schema, a Lark grammar or a regular expression compiled by
//! llguidance (the engine llama.cpp, vLLM and SGLang use) against the model's vocabulary into a
//! per-request [`Constraint`], which masks each step's logits to the tokens the grammar allows
//! and follows the tokens sampled.
//!
//! Hostile grammars: llguidance's limits bound a mask's work, yet a crafted schema still takes
//! hundreds of milliseconds per mask (a chain of a few thousand `anyOf` references measured
//! 200-400 ms here), and its compiler recurses once per level of a reference chain (about 10 KB
//! of stack each). So a constraint lives on a thread of its own with a large stack: it compiles
//! there, and after each token it is given it computes the next mask there, while the caller
//! runs the forward pass; the server's scheduler asks [`Constraint::ready`] and lets the other
//! slots go on while a slow mask is computed. Grammar texts are capped at
//! [`MAX_GRAMMAR_BYTES`] and schemas at [`MAX_SCHEMA_BYTES`], which that stack holds with room.

pub mod gbnf;

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    ApproximateTokEnv, InferenceCapabilities, SimpleVob, TokRxInfo, TokTrie,
};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::{TokenType, Tokenizer};

/// What a request constrains its answer to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// JSON valid against this schema (`{"type": "object"}`: any JSON object).
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
    /// Text matching this regular expression.
    Regex(String),
}

/// The longest Lark grammar or regular expression accepted (256 KiB: llama.cpp's sample
/// grammars are a few KiB; a chain of rules this long still compiles within the stack).
pub const MAX_GRAMMAR_BYTES: usize = 256 << 10;
/// The longest JSON schema accepted, serialized (1 MiB).
pub const MAX_SCHEMA_BYTES: usize = 1 << 20;
/// The stack of a constraint's thread (address space, touched only as deep as it recurses).
const STACK_BYTES: usize = 256 << 20;

impl GrammarSpec {
    /// A grammar as llama.cpp takes one (`grammar` field, `--grammar`): llguidance's Lark after
    /// a `%llguidance` line, else llama.cpp's GBNF (translated).
    pub fn from_grammar_text(g: &str) -> Result<GrammarSpec> {
        if g.trim_start().starts_with("%llguidance") {
            Ok(GrammarSpec::Lark(g.to_string()))
        } else {
            Ok(GrammarSpec::Lark(gbnf::to_lark(g)?))
        }
    }
}

/// The model's vocabulary as llguidance sees it, ready to compile grammars against.
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// The trie's end token (where a mask allows it, the grammar may end).
    eos: u32,
    /// Tokens that end generation; allowed wherever the grammar allows its end.
    eog: Vec<u32>,
}

impl Grammars {
    /// Builds the token trie of `tok` (control tokens marked special, so that grammar text
    /// never matches them).
    pub fn for_vocab(tok: &Tokenizer) -> Result<Grammars> {
        let n = tok.tokens.len();
        let eos = tok
            .eos
            .or_else(|| tok.eog.first().copied())
            .ok_or_else(|| anyhow!("the vocabulary has no end-of-generation token"))?;
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|i| match tok.types[i as usize] {
                TokenType::Control | TokenType::Unknown | TokenType::Unused => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(tok.tokens[i as usize].as_bytes());
                    w
                }
                _ => tok.token_bytes(i, false),
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(n as u32, eos), &words);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )?;
        factory.set_stderr_log_level(0);
        Ok(Grammars {
            factory: Arc::new(factory),
            eos,
            eog: tok.eog.clone(),
        })
    }

    /// The constraint of `spec`, or why it cannot be compiled (a request's 400). Blocks while
    /// it compiles (on the constraint's own thread).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(s) => {
                let bytes = serde_json::to_vec(s).map_or(usize::MAX, |v| v.len());
                if bytes > MAX_SCHEMA_BYTES {
                    return Err(too_long("the JSON schema", bytes, MAX_SCHEMA_BYTES));
                }
                TopLevelGrammar::from_json_schema(s.clone())
            }
            GrammarSpec::Lark(g) if g.len() > MAX_GRAMMAR_BYTES => {
                return Err(too_long("the grammar", g.len(), MAX_GRAMMAR_BYTES))
            }
            GrammarSpec::Regex(r) if r.len() > MAX_GRAMMAR_BYTES => {
                return Err(too_long(
                    "the regular expression",
                    r.len(),
                    MAX_GRAMMAR_BYTES,
                ))
            }
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
        };
        let factory = self.factory.clone();
        let (tokens_tx, tokens_rx) = channel::<u32>();
        let (masks_tx, masks_rx) = channel::<Result<SimpleVob, String>>();
        let (compiled_tx, compiled_rx) = channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("grammar".into())
            .stack_size(STACK_BYTES)
            .spawn(move || {
                let matcher = factory
                    .create_parser(grammar)
                    .map_err(|e| first_line(&e.to_string()))
                    .map(|p| Matcher::new(Ok(p)))
                    .and_then(|m| match m.get_error() {
                        Some(e) => Err(first_line(&e)),
                        None => Ok(m),
                    });
                match matcher {
                    Ok(m) => {
                        if compiled_tx.send(Ok(())).is_ok() {
                            follow(m, &tokens_rx, &masks_tx);
                        }
                    }
                    Err(e) => drop(compiled_tx.send(Err(e))),
                }
            })
            .map_err(|e| format!("the grammar cannot be used: no thread for it ({e})"))?;
        compiled_rx
            .recv()
            .map_err(|_| "the grammar cannot be used: its compiler stopped".to_string())??;
        Ok(Constraint {
            tokens: tokens_tx,
            masks: masks_rx,
            next: None,
            eos: self.eos,
            eog: self.eog.clone(),
        })
    }
}

fn too_long(what: &str, bytes: usize, max: usize) -> String {
    format!(
        "the grammar cannot be used: {what} is {} KiB, more than {} KiB",
        bytes.div_ceil(1024),
        max >> 10
    )
}

/// A constraint's thread: the mask for the next token, then the token sampled, until the
/// request ends (its [`Constraint`] is dropped) or the grammar fails.
fn follow(mut m: Matcher, tokens: &Receiver<u32>, masks: &Sender<Result<SimpleVob, String>>) {
    loop {
        let mask = m
            .compute_mask_or_eos()
            .map_err(|e| first_line(&e.to_string()));
        let failed = mask.is_err();
        if masks.send(mask).is_err() || failed {
            return;
        }
        let Ok(t) = tokens.recv() else { return };
        if let Err(e) = m.consume_token(t) {
            let _ = masks.send(Err(first_line(&e.to_string())));
            return;
        }
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    let cut: String = line.chars().take(300).collect();
    format!("the grammar cannot be used: {cut}")
}

/// A grammar that failed while it was followed (a mask past llguidance's limits, a token it
/// cannot take): the request's fault, not the server's.
#[derive(Debug)]
pub struct GrammarFailed(pub String);

impl std::fmt::Display for GrammarFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "structured output: {}", self.0)
    }
}

impl std::error::Error for GrammarFailed {}

/// One request's grammar state: the handle of its thread (see the module's doc).
pub struct Constraint {
    tokens: Sender<u32>,
    masks: Receiver<Result<SimpleVob, String>>,
    /// The next mask, once computed.
    next: Option<Result<SimpleVob, String>>,
    eos: u32,
    eog: Vec<u32>,
}

impl Constraint {
    /// Whether the mask for the next token is computed (so that [`Constraint::mask`] does not
    /// wait).
    pub fn ready(&mut self) -> bool {
        if self.next.is_none() {
            match self.masks.try_recv() {
                Ok(m) => self.next = Some(m),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => {
                    self.next = Some(Err("the grammar stopped".to_string()))
                }
            }
        }
        true
    }

    /// Waits up to `timeout` for the next mask; whether it is computed.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        if self.next.is_none() {
            if let Ok(m) = self.masks.recv_timeout(timeout) {
                self.next = Some(m);
            }
        }
        self.ready()
    }

    /// Sets the logits of tokens the grammar does not allow next to −∞ (where the grammar may
    /// end, the end-of-generation tokens stay allowed; once it is complete, only they are).
    /// Waits for the mask if it is not computed yet; the mask holds until [`Constraint::commit`].
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        if self.next.is_none() {
            let m = self.masks.recv();
            self.next = Some(m.unwrap_or_else(|_| Err("the grammar stopped".to_string())));
        }
        // The mask stays until a token is committed (a token sampled beside the grammar, which
        // opens reasoning, leaves the grammar where it was).
        let mask = match &self.next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(GrammarFailed(e.clone()).into()),
            None => unreachable!("set above"),
        };
        let end = mask.is_allowed(self.eos);
        for (i, l) in logits.iter_mut().enumerate() {
            let id = i as u32;
            let allowed = if self.eog.contains(&id) {
                end
            } else {
                mask.is_allowed(id)
            };
            if !allowed {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Follows a sampled token (end-of-generation tokens end the answer and are not fed); the
    /// thread starts on the next mask. A token the grammar rejects fails the next mask.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        if self.eog.contains(&token) {
            return Ok(());
        }
        // A closed channel means the thread ended on an error, which the next mask reports.
        self.next = None;
        let _ = self.tokens.send(token);
        Ok(())
    }
}
