//! Tokenizers built from GGUF metadata: `gpt2` byte-level BPE (with the pre-tokenizer regexes
//! named by `tokenizer.ggml.pre`) in `bpe`, SentencePiece (`llama`) in `spm`, and the streaming
//! detokenizer in `stream`. Special tokens: control tokens are split out of the text only when
//! asked; user-defined tokens (e.g. `<think>`) always are, as llama.cpp does.

mod bpe;
mod spm;
mod stream;

use aho_corasick::AhoCorasick;
use anyhow::{anyhow, bail, Result};

use crate::gguf::{Metadata, Value};

pub use bpe::Bpe;
pub use spm::Spm;
pub use stream::StreamDecoder;

/// The encoder a vocabulary uses.
enum Encoder {
    Bpe(Box<Bpe>),
    Spm {
        spm: Box<Spm>,
        add_space_prefix: bool,
    },
}

/// Texts of tokens that end a turn in the chat formats we know, beyond the ids metadata names.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|return|>",
    "<|call|>",
    "</s>",
    "<｜end▁of▁sentence｜>",
];

/// GGUF token types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i32(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// A vocabulary and its encoder.
pub struct Tokenizer {
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// End-of-generation tokens: eos, eot, eom and the known end-of-turn control tokens.
    pub eog: Vec<u32>,
    /// Things a user should know (an unknown pre-tokenizer, say); the CLI prints them.
    pub warnings: Vec<String>,
    /// Control, user-defined and unknown tokens, longest first.
    specials: Vec<u32>,
    /// Finds which of `specials` (by index) occur in a text, in one pass.
    special_finder: Option<AhoCorasick>,
    model: Encoder,
}

impl Tokenizer {
    pub fn from_metadata(md: &Metadata) -> Result<Tokenizer> {
        let kind = md.get_str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = md
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let types: Vec<TokenType> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => (0..v.len())
                .map(|i| TokenType::from_i32(v.integer(i).unwrap_or(1) as i64))
                .collect(),
            _ => vec![TokenType::Normal; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "tokenizer.ggml.token_type: {} entries for {} tokens",
                types.len(),
                tokens.len()
            );
        }
        let id = |k: &str| -> Result<Option<u32>> {
            match md.get(k) {
                None => Ok(None),
                Some(_) => {
                    let v = md.get_usize(k)?;
                    if v >= tokens.len() {
                        bail!("{k}: {v} is outside the vocabulary of {}", tokens.len());
                    }
                    Ok(Some(v as u32))
                }
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let mut warnings = Vec::new();
        let model = match kind {
            "gpt2" => {
                let merges = md.get_str_array("tokenizer.ggml.merges")?;
                let pre = md.get_str("tokenizer.ggml.pre").unwrap_or("default");
                if !bpe::is_known_pre(pre) {
                    warnings.push(format!(
                        "tokenizer.ggml.pre {pre:?} is not known; splitting text as GPT-2 does"
                    ));
                }
                Encoder::Bpe(Box::new(Bpe::new(&tokens, &merges, pre)?))
            }
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                    Some(Value::Array(v)) => (0..v.len())
                        .map(|i| v.float(i).unwrap_or(0.0) as f32)
                        .collect(),
                    _ => bail!("tokenizer.ggml.scores: missing"),
                };
                if scores.len() != tokens.len() {
                    bail!(
                        "tokenizer.ggml.scores: {} entries for {} tokens",
                        scores.len(),
                        tokens.len()
                    );
                }
                let unknown = id("tokenizer.ggml.unknown_token_id")?;
                Encoder::Spm {
                    spm: Box::new(Spm::new(&tokens, scores, unknown)),
                    add_space_prefix: md
                        .get_bool("tokenizer.ggml.add_space_prefix")
                        .unwrap_or(true),
                }
            }
            other => {
                bail!("tokenizer.ggml.model {other} is not supported (supported: gpt2, llama)")
            }
        };
        let mut eog: Vec<u32> = Vec::new();
        let by_text = tokens.iter().enumerate().filter(|(i, t)| {
            matches!(types[*i], TokenType::Control | TokenType::UserDefined)
                && END_OF_TURN_TEXTS.contains(&t.as_str())
        });
        let ids = [
            eos,
            id("tokenizer.ggml.eot_token_id")?,
            id("tokenizer.ggml.eom_token_id")?,
        ];
        for i in ids
            .into_iter()
            .flatten()
            .chain(by_text.map(|(i, _)| i as u32))
        {
            if !eog.contains(&i) {
                eog.push(i);
            }
        }
        // Harmony (gpt-oss) ends a message with <|end|> but a generation with <|return|> or
        // <|call|>: where both of those exist, <|end|> is not an end (llama.cpp's rule).
        let has = |text: &str| eog.iter().any(|&i| tokens[i as usize] == text);
        if has("<|return|>") && has("<|call|>") {
            eog.retain(|&i| tokens[i as usize] != "<|end|>");
        }
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                )
            })
            .filter(|&i| !tokens[i as usize].is_empty())
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        let special_finder = match specials.is_empty() {
            true => None,
            false => Some(
                AhoCorasick::new(specials.iter().map(|&i| &tokens[i as usize]))
                    .map_err(|e| anyhow!("special tokens: {e}"))?,
            ),
        };
        Ok(Tokenizer {
            add_bos: md.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            add_eos: md.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
            tokens,
            types,
            bos,
            eos,
            eog,
            warnings,
            specials,
            special_finder,
            model,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The id of a special (control or user-defined) token written as `text`.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.specials
            .iter()
            .copied()
            .find(|&i| self.tokens[i as usize] == text)
    }

    /// Token ids of `text` with no BOS/EOS added (for text appended to a running sequence).
    pub fn encode_continuation(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_fragments(text, parse_special, false, &mut out);
        out
    }

    /// Token ids of `text`; BOS/EOS added as the metadata asks. With `parse_special`, control
    /// tokens written in the text become their ids.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        if self.add_bos {
            out.push(
                self.bos
                    .ok_or_else(|| anyhow!("add_bos_token is set but there is no bos_token_id"))?,
            );
        }
        self.encode_fragments(text, parse_special, true, &mut out);
        if self.add_eos {
            out.push(
                self.eos
                    .ok_or_else(|| anyhow!("add_eos_token is set but there is no eos_token_id"))?,
            );
        }
        Ok(out)
    }

    /// Encodes `text` split on special tokens. `at_start`: the text begins a sequence (SentencePiece
    /// then prefixes a space, as it does after every special token).
    fn encode_fragments(
        &self,
        text: &str,
        parse_special: bool,
        at_start: bool,
        out: &mut Vec<u32>,
    ) {
        let mut prev_special = at_start;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(t) => {
                    out.push(t);
                    prev_special = true;
                }
                Fragment::Text(s) => {
                    match &self.model {
                        Encoder::Bpe(bpe) => bpe.encode(s, out),
                        Encoder::Spm {
                            spm,
                            add_space_prefix,
                        } => {
                            let mut t = String::with_capacity(s.len() + 3);
                            if *add_space_prefix && prev_special {
                                t.push(spm::SPACE);
                            }
                            t.extend(s.chars().map(|c| if c == ' ' { spm::SPACE } else { c }));
                            spm.encode(&t, out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
    }

    /// Splits `text` on special tokens (longest first, each at every place the longer ones
    /// left), leaving text fragments between them. Only the specials that occur in `text` are
    /// searched for, so this costs a pass over the text per special present, however large
    /// the vocabulary's list of them.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(text)];
        let Some(finder) = &self.special_finder else {
            return frags;
        };
        let mut present = vec![false; self.specials.len()];
        for m in finder.find_overlapping_iter(text) {
            present[m.pattern().as_usize()] = true;
        }
        for (k, &id) in self.specials.iter().enumerate() {
            if !present[k]
                || (!parse_special
                    && matches!(
                        self.types[id as usize],
                        TokenType::Control | TokenType::Unknown
                    ))
            {
                continue;
            }
            let pat = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Fragment::Text(mut s) => {
                        while let Some(i) = s.find(pat) {
                            if i > 0 {
                                next.push(Fragment::Text(&s[..i]));
                            }
                            next.push(Fragment::Token(id));
                            s = &s[i + pat.len()..];
                        }
                        if !s.is_empty() {
                            next.push(Fragment::Text(s));
                        }
                    }
                    t => next.push(t),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token stands for (control tokens: their text only when `special`).
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown if !special => Vec::new(),
            TokenType::Control | TokenType::UserDefined | TokenType::Unknown => {
                t.as_bytes().to_vec()
            }
            TokenType::Byte => match spm::byte_of_token(t) {
                Some(b) => vec![b],
                None => t.as_bytes().to_vec(),
            },
            TokenType::Unused => Vec::new(),
            TokenType::Normal => match &self.model {
                Encoder::Bpe(bpe) => bpe.decode_token(t),
                Encoder::Spm { spm, .. } => spm.decode_token(t),
            },
        }
    }

    /// Text of a sequence of ids from the start of a sequence (lossy UTF-8). SentencePiece drops
    /// the space its prefix rule added before the first token, as llama.cpp does.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes: Vec<u8> = Vec::new();
        let mut strip = matches!(
            self.model,
            Encoder::Spm {
                add_space_prefix: true,
                ..
            }
        );
        for &i in ids {
            let mut b = self.token_bytes(i, special);
            if strip && b.first() == Some(&b' ') {
                b.remove(0);
            }
            strip = false;
            bytes.extend(b);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}
