//! Structured output: a JSON schema, a Lark grammar or a regular expression compiled by
//! llguidance (the engine llama.cpp, vLLM and SGLang use) against the model's vocabulary into a
//! per-request [`Constraint`], which masks each step's logits to the tokens the grammar allows
//! and follows the tokens sampled. llguidance's default limits bound the work of one mask
//! (about 15 ms at most), so a hostile grammar costs its own request a slow step, never the
//! other slots more than one; a schema it cannot compile is an error before generation starts.

pub mod gbnf;

use std::sync::Arc;

use anyhow::{anyhow, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokRxInfo, TokTrie};
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

/// The model's vocabulary as llguidance sees it, ready to compile grammars against.
pub struct Grammars {
    factory: ParserFactory,
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
            factory,
            eos,
            eog: tok.eog.clone(),
        })
    }

    /// The constraint of `spec`, or why it cannot be compiled (a request's 400).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(s.clone()),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| first_line(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(first_line(&e));
        }
        Ok(Constraint {
            matcher,
            eos: self.eos,
            eog: self.eog.clone(),
        })
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    let cut: String = line.chars().take(300).collect();
    format!("the grammar cannot be used: {cut}")
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
    eos: u32,
    eog: Vec<u32>,
}

impl Constraint {
    /// Sets the logits of tokens the grammar does not allow next to −∞ (where the grammar may
    /// end, the end-of-generation tokens stay allowed; once it is complete, only they are).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| anyhow!("structured output: {}", first_line(&e.to_string())))?;
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

    /// Follows a sampled token (end-of-generation tokens end the answer and are not fed).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        if self.eog.contains(&token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("structured output: {}", first_line(&e.to_string())))
    }
}
