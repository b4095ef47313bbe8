//! Tokenizers built from GGUF metadata. `gpt2` byte-level BPE (with the pre-tokenizer regexes
//! named by `tokenizer.ggml.pre`) lives in `bpe`; SentencePiece (`llama`) is planned.
//! Special tokens: control tokens are split out of the text only when asked; user-defined tokens
//! (e.g. `<think>`) always are, as llama.cpp does.

mod bpe;

use anyhow::{anyhow, bail, Result};

use crate::gguf::{Metadata, Value};

pub use bpe::Bpe;

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
    /// Control, user-defined and unknown tokens, longest first.
    specials: Vec<u32>,
    model: Bpe,
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
            Some(Value::Array(_, v)) => v
                .iter()
                .map(|x| TokenType::from_i32(x.as_integer().unwrap_or(1) as i64))
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
        let model = match kind {
            "gpt2" => {
                let merges = md.get_str_array("tokenizer.ggml.merges")?;
                let pre = md.get_str("tokenizer.ggml.pre").unwrap_or("default");
                Bpe::new(&tokens, &merges, pre)?
            }
            other => bail!("tokenizer.ggml.model {other} is not supported yet (supported: gpt2)"),
        };
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
        Ok(Tokenizer {
            add_bos: md.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            add_eos: md.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
            tokens,
            types,
            bos,
            eos,
            specials,
            model,
        })
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
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(t) => out.push(t),
                Fragment::Text(s) => self.model.encode(s, &mut out),
            }
        }
        if self.add_eos {
            out.push(
                self.eos
                    .ok_or_else(|| anyhow!("add_eos_token is set but there is no eos_token_id"))?,
            );
        }
        Ok(out)
    }

    /// Splits `text` on special tokens (longest first), leaving text fragments between them.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Text(text)];
        for &id in &self.specials {
            if !parse_special
                && matches!(
                    self.types[id as usize],
                    TokenType::Control | TokenType::Unknown
                )
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
            _ => self.model.decode_token(t),
        }
    }

    /// Text of a sequence of ids (lossy UTF-8).
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}
