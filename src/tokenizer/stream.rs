//! Streaming detokenization: tokens arrive one at a time and a UTF-8 character may span several
//! of them (byte-fallback tokens, byte-level BPE pieces), so bytes are held back until they form
//! whole characters. Bytes that can never become valid UTF-8 come out as U+FFFD.

/// Turns a stream of token bytes into text without ever emitting half a character.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds `bytes` and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Invalid bytes: replace them and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held (an unfinished character at the end of the stream), lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_pushes_come_out_whole() {
        let text = "añ€😀 done";
        let bytes = text.as_bytes();
        // Every way of cutting the bytes into two pushes, and one byte at a time.
        for cut in 0..=bytes.len() {
            let mut d = StreamDecoder::new();
            let mut out = d.push(&bytes[..cut]);
            assert!(out.chars().all(|c| c != char::REPLACEMENT_CHARACTER));
            out += &d.push(&bytes[cut..]);
            out += &d.finish();
            assert_eq!(out, text, "cut at {cut}");
        }
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for b in bytes {
            let piece = d.push(&[*b]);
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out += &piece;
        }
        assert_eq!(out + &d.finish(), text);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(b"a\xffb"), "a\u{fffd}b");
        // A lone lead byte at the end is held, then flushed lossily.
        assert_eq!(d.push(b"c\xe2\x82"), "c");
        assert_eq!(d.finish(), "\u{fffd}");
        assert_eq!(d.finish(), "");
    }
}
