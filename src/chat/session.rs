//! A conversation bound to an [`Engine`]: messages, system prompt and thinking mode, rendered
//! through the chat template each turn. The model state carries over between turns: a turn
//! feeds only the text that follows the previous answer in the new rendering (the close of
//! that answer, the new user message, the generation prompt), found by anchoring on the
//! answer, so the reasoning a template drops from history does not force a re-read. When the
//! state cannot be matched to the conversation (first turn, a new system prompt, a loaded
//! conversation, an empty answer) the whole rendering is processed from a fresh state.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::template::{ChatTemplate, Message, RenderOptions};
use crate::generate::{Engine, GenParams, Outcome, Piece, Reasoning};
use crate::tokenizer::Tokenizer;

/// What /save writes and /load reads.
#[derive(Serialize, Deserialize, Default)]
struct Saved {
    #[serde(default)]
    system: Option<String>,
    messages: Vec<Message>,
}

/// What a turn does when the conversation and its new message do not fit the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ContextPolicy {
    /// Drop the oldest exchanges (the system prompt stays) and re-read the rest.
    #[default]
    Drop,
    /// Fail the turn (`/reset` or `/clear` start over).
    Error,
}

impl std::str::FromStr for ContextPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<ContextPolicy, String> {
        match s {
            "drop" => Ok(ContextPolicy::Drop),
            "error" => Ok(ContextPolicy::Error),
            _ => Err(format!("{s}: drop or error")),
        }
    }
}

pub struct Session<'m> {
    pub engine: Engine<'m>,
    pub template: ChatTemplate,
    pub system: Option<String>,
    /// None: the template's default.
    pub think: Option<bool>,
    pub messages: Vec<Message>,
    pub policy: ContextPolicy,
    /// Exchanges (a user message and what answered it) the last turn dropped to fit.
    pub dropped: usize,
    /// The engine's state does not correspond to `messages`.
    stale: bool,
}

/// Tokens of a rendered prompt: BOS added as the metadata asks, special tokens parsed where the
/// template wrote them (`shielded`: message text was escaped by the template's shield and stays
/// text), and one BOS dropped when the template wrote `bos_token` itself as well.
pub fn prompt_tokens(tok: &Tokenizer, text: &str, shielded: bool) -> Result<Vec<u32>> {
    let mut t = if shielded {
        tok.encode_rendered(text)?
    } else {
        tok.encode(text, true)?
    };
    if t.len() >= 2 && tok.add_bos && Some(t[0]) == tok.bos && t[1] == t[0] {
        t.remove(0);
    }
    Ok(t)
}

/// Applies the thinking switch to a rendered prompt and says how to read the reply. `<think>`
/// templates that ignore `enable_thinking`: the block they opened is closed. Harmony (gpt-oss,
/// whose prompt ends in an open assistant header): reasoning cannot be switched off, so with
/// thinking off the prompt carries an empty analysis message and opens the final one.
pub fn prepare_prompt(text: &mut String, think: Option<bool>) -> Reasoning {
    if text.ends_with("<|start|>assistant") {
        if think == Some(false) {
            text.push_str("<|channel|>analysis<|message|>");
            text.push_str(crate::generate::CLOSE_ANALYSIS);
        }
        return Reasoning::Parse { inside: false };
    }
    if think == Some(false) && opens_thinking(text) {
        text.push_str("</think>");
    }
    Reasoning::Parse {
        inside: opens_thinking(text),
    }
}

/// Whether the rendered prompt leaves a `<think>` block open for the model.
pub fn opens_thinking(prompt: &str) -> bool {
    match (prompt.rfind("<think>"), prompt.rfind("</think>")) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

impl<'m> Session<'m> {
    pub fn new(engine: Engine<'m>, template: ChatTemplate) -> Session<'m> {
        Session {
            engine,
            template,
            system: None,
            think: None,
            messages: Vec::new(),
            policy: ContextPolicy::Drop,
            dropped: 0,
            stale: true,
        }
    }

    /// The messages the template sees: the system prompt first when there is one.
    fn all_messages(&self) -> Vec<Message> {
        let mut v = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            v.push(Message::new("system", s));
        }
        v.extend(self.messages.iter().cloned());
        v
    }

    /// The prompt text for the conversation so far plus `user`, and how to read the reply.
    pub fn render_turn(&self, user: &str) -> Result<(String, Reasoning)> {
        let mut msgs = self.all_messages();
        msgs.push(Message::new("user", user));
        let mut text = self.template.render(
            &msgs,
            &RenderOptions {
                add_generation_prompt: true,
                enable_thinking: self.think,
                tools: None,
            },
        )?;
        let reasoning = prepare_prompt(&mut text, self.think);
        Ok((text, reasoning))
    }

    /// Runs one turn: renders, feeds what the state lacks, generates, records the exchange.
    pub fn turn(
        &mut self,
        user: &str,
        params: &GenParams,
        interrupt: &AtomicBool,
        on_piece: &mut dyn FnMut(Piece) -> Result<()>,
    ) -> Result<Outcome> {
        self.dropped = 0;
        let n_ctx = self.engine.n_ctx();
        // Room kept for the answer: what -n asks, else a quarter of the context.
        let reserve = params.max_tokens.unwrap_or(n_ctx / 4).min(n_ctx / 2);
        let (text, mut reasoning) = self.render_turn(user)?;
        let mut tokens = match self.continuation(&text, user) {
            Some(t) => t,
            None => {
                self.engine.reset()?;
                prompt_tokens(&self.engine.tok, &text, self.template.shield.is_some())?
            }
        };
        let mut held = self.engine.seq.consumed.len();
        while held + tokens.len() + reserve > n_ctx {
            let exchanges = self.messages.iter().filter(|m| m.role == "user").count();
            let what = format!(
                "the conversation and this message are {} tokens; the context holds {n_ctx}",
                held + tokens.len()
            );
            if self.policy == ContextPolicy::Error {
                bail!("{what} (/reset starts over; --ctx-policy drop drops the oldest turns)");
            }
            if exchanges == 0 {
                // Nothing left to drop: go on if the prompt itself fits.
                if tokens.len() < n_ctx {
                    break;
                }
                bail!("this message is {} tokens with the system prompt; the context holds {n_ctx} (raise -c)", tokens.len());
            }
            // The oldest exchange: its user message and everything up to the next one.
            let next = self.messages[1..]
                .iter()
                .position(|m| m.role == "user")
                .map_or(self.messages.len(), |i| i + 1);
            self.messages.drain(..next);
            self.dropped += 1;
            let (text, r) = self.render_turn(user)?;
            reasoning = r;
            self.engine.reset()?;
            self.stale = true;
            held = 0;
            tokens = prompt_tokens(&self.engine.tok, &text, self.template.shield.is_some())?;
        }
        let p = GenParams {
            reasoning,
            feed_last: true,
            ..params.clone()
        };
        let out = match self.engine.generate(&tokens, &p, interrupt, on_piece) {
            Ok(o) => o,
            Err(e) => {
                self.stale = true;
                return Err(e);
            }
        };
        self.messages.push(Message::new("user", user));
        let mut reply = Message::new("assistant", &out.text);
        if !out.reasoning.is_empty() {
            reply.reasoning_content = Some(out.reasoning.clone());
        }
        self.messages.push(reply);
        self.stale = out.text.trim().is_empty();
        Ok(out)
    }

    /// The tokens to feed on top of the current state for prompt `text`, when the state holds
    /// the conversation up to the last answer.
    fn continuation(&self, text: &str, user: &str) -> Option<Vec<u32>> {
        if self.stale || self.engine.seq.consumed.is_empty() {
            return None;
        }
        let answer = self.messages.last().filter(|m| m.role == "assistant")?;
        let answer = answer.content.trim();
        if answer.is_empty() {
            return None;
        }
        // The new user message is the last occurrence of its text; the answer precedes it.
        let user_at = text.rfind(user.trim()).unwrap_or(text.len());
        let at = text[..user_at].rfind(answer)? + answer.len();
        let tok = &self.engine.tok;
        Some(match self.template.shield {
            Some(_) => tok.encode_rendered_continuation(&text[at..]),
            None => tok.encode_continuation(&text[at..], true),
        })
    }

    /// Forgets the conversation (the system prompt stays).
    pub fn reset(&mut self) -> Result<()> {
        self.messages.clear();
        self.engine.reset()?;
        self.stale = true;
        Ok(())
    }

    pub fn set_system(&mut self, s: Option<String>) {
        self.system = s;
        self.stale = true;
    }

    pub fn set_think(&mut self, on: Option<bool>) {
        self.think = on;
        self.stale = true;
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let s = Saved {
            system: self.system.clone(),
            messages: self.messages.clone(),
        };
        let json = serde_json::to_string_pretty(&s)?;
        std::fs::write(path, json + "\n").map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let s: Saved = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not a saved conversation: {e}", path.display()))?;
        self.system = s.system;
        self.messages = s.messages;
        self.engine.reset()?;
        self.stale = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_written_bos_is_not_doubled() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/nemo-tiny-f32.gguf");
        let g = crate::gguf::Model::open(&path).unwrap();
        let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
        assert!(tok.add_bos);
        let plain = prompt_tokens(&tok, "<|im_start|>user", true).unwrap();
        let with_bos = prompt_tokens(&tok, "<s><|im_start|>user", true).unwrap();
        assert_eq!(plain, with_bos);
        assert_eq!(plain[0], tok.bos.unwrap());
    }

    #[test]
    fn open_thinking_block_detection() {
        assert!(opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!opens_thinking("<|im_start|>assistant\n<think></think>"));
        assert!(!opens_thinking("<|im_start|>assistant\n"));
        assert!(opens_thinking("<think>a</think> b <think>"));
    }
}
