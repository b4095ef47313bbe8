//! SentencePiece in BPE mode with scores (GGUF `llama` vocabularies: Llama 1/2, Mistral v1,
//! Gemma): spaces become U+2581, symbols start as single characters, the adjacent pair whose
//! concatenation is the highest-scoring token merges first (leftmost on ties), and characters no
//! token covers fall back to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// The SentencePiece word-boundary marker that stands for a space.
pub const SPACE: char = '\u{2581}';

pub struct Spm {
    vocab: HashMap<String, u32>,
    scores: Vec<f32>,
    /// `<0xXX>` token of each byte, when the vocabulary has one.
    byte_tokens: [Option<u32>; 256],
    unknown: Option<u32>,
}

/// A candidate merge of symbols `left` and `left`'s current right neighbour.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text when the bigram was made (stale if it changed since).
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// A symbol of the text being merged: a byte range, linked to its live neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    pub fn new(tokens: &[String], scores: Vec<f32>, unknown: Option<u32>) -> Spm {
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab
                .get(&format!("<0x{b:02X}>"))
                .or_else(|| {
                    vocab
                        .get(&char::from(b as u8).to_string())
                        .filter(|_| b < 128)
                })
                .copied();
        }
        Spm {
            vocab,
            scores,
            byte_tokens,
            unknown,
        }
    }

    /// Appends the ids of `text` (already space-escaped and prefixed by the caller).
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut syms: Vec<Symbol> = text
            .char_indices()
            .map(|(i, c)| Symbol {
                start: i,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let n = syms.len();
        for (i, s) in syms.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < n).then_some(i + 1);
        }
        // Only pairs whose concatenation is a token are queued, so every merged symbol is a
        // token and the final symbols are tokens or single characters.
        let mut heap = BinaryHeap::new();
        let try_add =
            |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], l: Option<usize>, r: Option<usize>| {
                let (Some(l), Some(r)) = (l, r) else {
                    return;
                };
                let start = syms[l].start;
                let s = &text[start..start + syms[l].len + syms[r].len];
                let Some(&score) = self
                    .vocab
                    .get(s)
                    .and_then(|&id| self.scores.get(id as usize))
                else {
                    return;
                };
                heap.push(Bigram {
                    score,
                    left: l,
                    right: r,
                    len: s.len(),
                });
            };
        for i in 1..n {
            try_add(&mut heap, &syms, Some(i - 1), Some(i));
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            // Stale: one side was merged elsewhere since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.len {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if let Some(nx) = r.next {
                syms[nx].prev = Some(bg.left);
            }
            try_add(&mut heap, &syms, l.prev, Some(bg.left));
            try_add(&mut heap, &syms, Some(bg.left), syms[bg.left].next);
        }
        let mut i = Some(0);
        while let Some(k) = i {
            let s = syms[k];
            let piece = &text[s.start..s.start + s.len];
            match self.vocab.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.byte_tokens[b as usize].or(self.unknown)),
                ),
            }
            i = s.next;
        }
    }

    /// The bytes a normal token stands for: U+2581 becomes a space.
    pub fn decode_token(&self, text: &str) -> Vec<u8> {
        text.replace(SPACE, " ").into_bytes()
    }
}

/// Byte value of a `<0xXX>` token.
pub fn byte_of_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
