//! GPT-2 style byte-level BPE: pre-tokenizer regexes chosen by `tokenizer.ggml.pre`, the GPT-2
//! byte alphabet, and merges by rank (lowest first, leftmost on ties).

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use fancy_regex::Regex;

const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// (regexes applied in sequence, use a whole-piece vocabulary hit before merging)
fn pre_tokenizer(pre: &str) -> (Vec<&'static str>, bool) {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "pixtral" | "falcon3" | "lfm2" => {
            (vec![LLAMA3], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" => (vec![QWEN2], false),
        "tekken" => (vec![TEKKEN], false),
        "smollm" | "codeshell" | "exaone" | "minerva-7b" => (vec![r"\p{N}", GPT2], false),
        _ => (vec![GPT2], false),
    }
}

/// The GPT-2 byte → char alphabet (printable bytes map to themselves, the rest to U+0100 + k).
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    map
}

pub struct Bpe {
    regexes: Vec<Regex>,
    ignore_merges: bool,
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
}

impl Bpe {
    pub fn new(tokens: &[String], merges: &[&str], pre: &str) -> Result<Bpe> {
        let (exprs, ignore_merges) = pre_tokenizer(pre);
        let regexes = exprs
            .iter()
            .map(|e| Regex::new(e).map_err(|err| anyhow!("pre-tokenizer regex: {err}")))
            .collect::<Result<_>>()?;
        let vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| anyhow!("tokenizer.ggml.merges[{i}]: {m:?} is not 'left right'"))?;
            ranks.insert((a.to_string(), b.to_string()), i);
        }
        let byte_to_char = byte_alphabet();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(Bpe {
            regexes,
            ignore_merges,
            vocab,
            ranks,
            byte_to_char,
            char_to_byte,
        })
    }

    /// Pieces of `text` after every pre-tokenizer regex (matched and unmatched parts both kept).
    fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::new();
            for p in pieces {
                let mut last = 0;
                for m in re.find_iter(p) {
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&p[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < p.len() {
                    next.push(&p[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    /// Appends the ids of `text` (no special tokens in it).
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.split(text) {
            let mapped: String = piece
                .bytes()
                .map(|b| self.byte_to_char[b as usize])
                .collect();
            if self.ignore_merges {
                if let Some(&id) = self.vocab.get(&mapped) {
                    out.push(id);
                    continue;
                }
            }
            let mut syms: Vec<String> = mapped.chars().map(String::from).collect();
            loop {
                let best = syms
                    .windows(2)
                    .enumerate()
                    .filter_map(|(i, w)| {
                        self.ranks
                            .get(&(w[0].clone(), w[1].clone()))
                            .map(|&r| (r, i))
                    })
                    .min();
                let Some((_, i)) = best else { break };
                let right = syms.remove(i + 1);
                syms[i].push_str(&right);
            }
            for s in syms {
                match self.vocab.get(&s) {
                    Some(&id) => out.push(id),
                    // No token for the merged symbol: fall back to its characters (bytes).
                    None => out.extend(
                        s.chars()
                            .filter_map(|c| self.vocab.get(&c.to_string()).copied()),
                    ),
                }
            }
        }
    }

    /// The bytes a normal token stands for.
    pub fn decode_token(&self, text: &str) -> Vec<u8> {
        text.chars()
            .flat_map(|c| match self.char_to_byte.get(&c) {
                Some(&b) => vec![b],
                None => c.to_string().into_bytes(),
            })
            .collect()
    }
}
