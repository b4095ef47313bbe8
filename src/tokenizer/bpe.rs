//! GPT-2 style byte-level BPE: pre-tokenizer regexes chosen by `tokenizer.ggml.pre`, the GPT-2
//! byte alphabet, and merges by rank (lowest first, leftmost on ties).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use anyhow::{anyhow, Result};
use fancy_regex::Regex;

const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
// Tekken and GPT-4o as llama.cpp adapts them: "a letter that is not a-z / A-Z" instead of the
// upper/lower-case letter categories of the originals.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
    "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
    "\\p{N}+",
];
const DEEPSEEK_CODER: &[&str] = &[
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
    "\\p{N}",
];
const DEEPSEEK_V3: &[&str] = &[
    "\\p{N}{1,3}",
    "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// (regexes applied in sequence, use a whole-piece vocabulary hit before merging), after
/// llama.cpp's table of `tokenizer.ggml.pre` values.
fn pre_tokenizer(pre: &str) -> (Vec<&'static str>, bool) {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "pixtral" | "falcon3" | "falcon-h1" | "lfm2"
        | "midm-2.0" => (vec![LLAMA3], true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => (vec![LLAMA3], false),
        "glm4" | "glm5" => (vec![LLAMA3], true),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => (vec![QWEN2], false),
        "qwen35" => (vec![QWEN35], false),
        "tekken" => (vec![TEKKEN], true),
        "gpt-4o" | "llama4" | "minimax-m2" => (vec![GPT4O], false),
        "deepseek-llm" => (DEEPSEEK_LLM.to_vec(), false),
        "deepseek-coder" => (DEEPSEEK_CODER.to_vec(), false),
        "deepseek-v3" => (DEEPSEEK_V3.to_vec(), false),
        "smollm" | "codeshell" | "exaone" | "minerva-7b" | "starcoder" | "refact" | "command-r" => {
            (vec![r"\p{N}", GPT2], false)
        }
        _ => (vec![GPT2], false),
    }
}

/// Whether `pre` is a value the table above knows (others fall back to GPT-2's regex).
pub fn is_known_pre(pre: &str) -> bool {
    pre_tokenizer(pre) != (vec![GPT2], false)
        || matches!(
            pre,
            "gpt-2" | "default" | "phi-2" | "roberta-bpe" | "mpt" | "olmo" | "jais"
        )
}

/// The GPT-2 byte → char alphabet (printable bytes map to themselves, the rest to U+0100 + k).
pub(crate) fn byte_alphabet() -> [char; 256] {
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
    /// Every symbol a merge can make or take, by text: the vocabulary's tokens keep their ids
    /// (the last one where a text repeats), other texts get ids from `n_vocab` on.
    symbols: HashMap<String, u32>,
    /// Texts of the symbols numbered from `n_vocab` on (not tokens themselves).
    extra: Vec<String>,
    n_vocab: u32,
    /// The symbol of each single character that has one.
    char_symbol: HashMap<char, u32, FastHash>,
    /// (left, right) as [`pair_key`] → (rank, merged symbol); a pair listed twice keeps its
    /// last rank.
    merges: HashMap<u64, (u32, u32), FastHash>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
}

/// A symbol of the piece being merged: its id, its first character's index, and its live
/// neighbours (a doubly linked list over the initial characters).
#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    prev: Option<u32>,
    next: Option<u32>,
}

/// The hasher of the merge table (looked up once per candidate pair; its keys come from the
/// model file, not from the text being encoded).
type FastHash = foldhash::fast::RandomState;

/// A merge table key: the left and right symbols.
fn pair_key(left: u32, right: u32) -> u64 {
    u64::from(left) << 32 | u64::from(right)
}

/// Ids of symbols no merge involves and no token matches (dropped from the output, as a
/// character without a token is).
const NO_SYMBOL: u32 = u32::MAX;

impl Bpe {
    pub fn new(tokens: &[String], merges: &[&str], pre: &str) -> Result<Bpe> {
        let (exprs, ignore_merges) = pre_tokenizer(pre);
        let regexes = exprs
            .iter()
            .map(|e| Regex::new(e).map_err(|err| anyhow!("pre-tokenizer regex: {err}")))
            .collect::<Result<_>>()?;
        let n_vocab = u32::try_from(tokens.len())
            .ok()
            .filter(|&n| n < NO_SYMBOL / 4)
            .ok_or_else(|| anyhow!("a vocabulary of {} tokens is too large", tokens.len()))?;
        let mut symbols: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut extra = Vec::new();
        let mut intern = |text: &str, symbols: &mut HashMap<String, u32>| -> u32 {
            if let Some(&id) = symbols.get(text) {
                return id;
            }
            let id = n_vocab + extra.len() as u32;
            extra.push(text.to_string());
            symbols.insert(text.to_string(), id);
            id
        };
        let mut pairs = HashMap::with_capacity_and_hasher(merges.len(), FastHash::default());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| anyhow!("tokenizer.ggml.merges[{i}]: {m:?} is not 'left right'"))?;
            let left = intern(a, &mut symbols);
            let right = intern(b, &mut symbols);
            let merged = intern(&format!("{a}{b}"), &mut symbols);
            pairs.insert(pair_key(left, right), (i as u32, merged));
        }
        let char_symbol = symbols
            .iter()
            .filter_map(|(t, &id)| {
                let mut cs = t.chars();
                match (cs.next(), cs.next()) {
                    (Some(c), None) => Some((c, id)),
                    _ => None,
                }
            })
            .collect();
        let byte_to_char = byte_alphabet();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(Bpe {
            regexes,
            ignore_merges,
            symbols,
            extra,
            n_vocab,
            char_symbol,
            merges: pairs,
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
        let mut syms = Vec::new();
        for piece in self.split(text) {
            let mapped: String = piece
                .bytes()
                .map(|b| self.byte_to_char[b as usize])
                .collect();
            if self.ignore_merges {
                if let Some(&id) = self.symbols.get(&mapped).filter(|&&id| id < self.n_vocab) {
                    out.push(id);
                    continue;
                }
            }
            self.merge(&mapped, &mut syms);
            self.emit(&syms, out);
        }
    }

    /// Merges the characters of `piece` into `syms`: the pair of adjacent symbols with the
    /// lowest merge rank first, the leftmost of equal ranks. A heap of candidate pairs over a
    /// linked list of symbols: O(n log n) in the piece's length. Entries that went stale (a
    /// side merged elsewhere since) are skipped when they come up.
    fn merge(&self, piece: &str, syms: &mut Vec<Sym>) {
        syms.clear();
        let n = piece.chars().count();
        syms.extend(piece.chars().enumerate().map(|(i, c)| Sym {
            id: self.char_symbol.get(&c).copied().unwrap_or(NO_SYMBOL),
            prev: i.checked_sub(1).map(|p| p as u32),
            next: (i + 1 < n).then_some(i as u32 + 1),
        }));
        // rank << 32 | left index: the smallest first. An entry is checked when it comes up: the
        // pair now at that index must still have that rank (else a side merged elsewhere since
        // and the pair it became was queued on its own).
        let mut heap: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
        let pair = |syms: &[Sym], l: u32| -> Option<(u32, u32)> {
            let left = syms[l as usize];
            let right = syms[left.next? as usize];
            self.merges.get(&pair_key(left.id, right.id)).copied()
        };
        let key = |rank: u32, l: u32| Reverse(u64::from(rank) << 32 | u64::from(l));
        heap.extend((0..n as u32).filter_map(|l| pair(syms, l).map(|(rank, _)| key(rank, l))));
        while let Some(Reverse(k)) = heap.pop() {
            let (rank, l) = ((k >> 32) as u32, k as u32);
            let Some((now, merged)) = pair(syms, l) else {
                continue;
            };
            if now != rank {
                continue;
            }
            let left = syms[l as usize];
            let r = left.next.unwrap_or_default();
            let after = syms[r as usize].next;
            syms[l as usize].id = merged;
            syms[l as usize].next = after;
            if let Some(nx) = after {
                syms[nx as usize].prev = Some(l);
            }
            syms[r as usize].prev = None;
            syms[r as usize].next = None;
            if let Some(p) = left.prev {
                heap.extend(pair(syms, p).map(|(rank, _)| key(rank, p)));
            }
            heap.extend(pair(syms, l).map(|(rank, _)| key(rank, l)));
        }
    }

    /// The ids of the merged symbols: a symbol that is no token falls back to the tokens of its
    /// characters (characters without one are dropped).
    fn emit(&self, syms: &[Sym], out: &mut Vec<u32>) {
        let mut at = (!syms.is_empty()).then_some(0u32);
        while let Some(i) = at {
            let s = syms[i as usize];
            if s.id < self.n_vocab {
                out.push(s.id);
            } else if let Some(text) = self.extra.get((s.id - self.n_vocab) as usize) {
                out.extend(
                    text.chars()
                        .filter_map(|c| self.char_symbol.get(&c))
                        .filter(|&&id| id < self.n_vocab),
                );
            }
            at = s.next;
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

#[cfg(test)]
mod tests {
    use super::*;

    const PRES: &[&str] = &[
        "llama-bpe",
        "dbrx",
        "glm4",
        "qwen2",
        "qwen35",
        "tekken",
        "gpt-4o",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "smollm",
        "gpt-2",
        "unknown-value",
    ];

    fn split(pre: &str, text: &str) -> Vec<String> {
        let bpe = Bpe::new(&[], &[], pre).unwrap_or_else(|e| panic!("{pre}: {e:#}"));
        bpe.split(text).into_iter().map(String::from).collect()
    }

    /// The merge loop as it was first written (and as the BPE papers state it): rescan every
    /// adjacent pair for the lowest rank, leftmost on ties, merge, repeat. Quadratic; the
    /// reference the heap version must equal id for id.
    fn reference_encode(tokens: &[String], merges: &[&str], piece: &str) -> Vec<u32> {
        let vocab: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let mut ranks = HashMap::new();
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').unwrap();
            ranks.insert((a.to_string(), b.to_string()), i);
        }
        let mut syms: Vec<String> = piece.chars().map(String::from).collect();
        loop {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        let mut out = Vec::new();
        for s in syms {
            match vocab.get(s.as_str()) {
                Some(&id) => out.push(id),
                None => out.extend(s.chars().filter_map(|c| vocab.get(c.to_string().as_str()))),
            }
        }
        out
    }

    /// A draw below `n` (the sampler's generator, for the random vocabularies below).
    fn below(rng: &mut crate::sample::Rng, n: usize) -> usize {
        (rng.next_u64() % n as u64) as usize
    }

    #[test]
    fn heap_merges_equal_the_rescanning_reference() {
        // Random vocabularies over a small alphabet, with what real and hostile files contain:
        // merges whose parts or result are no token, pairs listed twice, repeated token texts,
        // characters without a token. Pieces are long runs of few letters (many equal ranks).
        let alphabet: Vec<char> = "abcdeé".chars().collect();
        for seed in 0..60u64 {
            let mut rng = crate::sample::Rng(seed);
            let mut tokens: Vec<String> = alphabet[..5].iter().map(|c| c.to_string()).collect();
            let mut merges: Vec<String> = Vec::new();
            for _ in 0..below(&mut rng, 40) + 5 {
                let a = tokens[below(&mut rng, tokens.len())].clone();
                let b = tokens[below(&mut rng, tokens.len())].clone();
                merges.push(format!("{a} {b}"));
                match below(&mut rng, 8) {
                    0 => {}                                // the result is no token
                    1 => tokens.push(a.clone()),           // a repeated text
                    2 => merges.push(format!("{a}x {b}")), // a part that is no token
                    _ => tokens.push(format!("{a}{b}")),
                }
                if below(&mut rng, 6) == 0 {
                    let dup = merges[below(&mut rng, merges.len())].clone();
                    merges.push(dup);
                }
            }
            let refs: Vec<&str> = merges.iter().map(String::as_str).collect();
            let bpe = Bpe::new(&tokens, &refs, "gpt-2").unwrap();
            let mut syms = Vec::new();
            for _ in 0..20 {
                let len = below(&mut rng, 60);
                let piece: String = (0..len)
                    .map(|_| alphabet[below(&mut rng, alphabet.len())])
                    .collect();
                let mut got = Vec::new();
                bpe.merge(&piece, &mut syms);
                bpe.emit(&syms, &mut got);
                assert_eq!(
                    got,
                    reference_encode(&tokens, &refs, &piece),
                    "seed {seed} piece {piece:?}"
                );
            }
        }
    }

    #[test]
    fn a_long_word_merges_in_log_linear_time() {
        // 200k characters in one piece: the rescanning loop would take minutes.
        let tokens: Vec<String> = ["a", "b", "ab", "abab", "abababab"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let bpe = Bpe::new(&tokens, &["a b", "ab ab", "abab abab"], "gpt-2").unwrap();
        let piece = "ab".repeat(100_000);
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        bpe.encode(&piece, &mut out);
        assert_eq!(out, vec![4; 25_000]);
        assert!(t.elapsed().as_secs_f64() < 2.0, "{:?}", t.elapsed());
    }

    #[test]
    fn every_pre_tokenizer_compiles_and_keeps_all_text() {
        let text = "Hello, World! It's 12345 cafés\n\n  naïve 東京タワー x";
        for pre in PRES {
            let pieces = split(pre, text);
            assert_eq!(pieces.concat(), text, "{pre}");
            assert!(pieces.len() > 5, "{pre}: {pieces:?}");
        }
    }

    #[test]
    fn unknown_pre_values_are_reported() {
        assert!(PRES[..PRES.len() - 1].iter().all(|p| is_known_pre(p)));
        assert!(!is_known_pre("unknown-value"));
    }

    #[test]
    fn digit_grouping_follows_the_pre_tokenizer() {
        let digits = |pre: &str| {
            split(pre, "12345")
                .into_iter()
                .map(|s| s.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(digits("llama-bpe"), [3, 2]);
        assert_eq!(digits("deepseek-v3"), [3, 2]);
        assert_eq!(digits("gpt-4o"), [3, 2]);
        assert_eq!(digits("qwen2"), [1, 1, 1, 1, 1]);
        assert_eq!(digits("smollm"), [1, 1, 1, 1, 1]);
        assert_eq!(digits("deepseek-llm"), [5]);
        // Case-split words (Tekken, GPT-4o): "HelloWorld" is two pieces.
        assert_eq!(split("tekken", "HelloWorld"), ["Hello", "World"]);
        assert_eq!(split("gpt-4o", "HelloWorld's"), ["Hello", "World's"]);
    }
}
