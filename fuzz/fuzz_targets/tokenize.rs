//! Fuzzes the tokenizers: byte-level BPE (a tiny qwen3 vocabulary, qwen2's pre-tokenizer) and
//! SentencePiece (a tiny gemma3 vocabulary and a trained byte-fallback one) on any text, with
//! special tokens parsed and not, and through the chat shield. Never a panic; byte-level BPE
//! gives its text back exactly, shielded text included.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ggrun::gguf::Model;
use ggrun::synth::decoder::{write_tiny, TinyMix};
use ggrun::tokenizer::{Shield, Tokenizer};
use libfuzzer_sys::fuzz_target;

struct Vocab {
    tok: Tokenizer,
    shield: Shield,
    byte_level: bool,
}

fn vocabs() -> &'static [Vocab] {
    static V: OnceLock<Vec<Vocab>> = OnceLock::new();
    V.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ggrun-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut paths: Vec<(PathBuf, bool)> = Vec::new();
        for (arch, byte_level) in [("qwen3", true), ("gemma3", false)] {
            let p = dir.join(format!("{arch}.gguf"));
            write_tiny(arch, TinyMix::F32, 1, false, &p).unwrap();
            paths.push((p, byte_level));
        }
        let spm = dir.join("spm.gguf");
        std::fs::write(&spm, include_bytes!("../../tests/data/spm-prefix.gguf")).unwrap();
        paths.push((spm, false));
        paths
            .into_iter()
            .map(|(p, byte_level)| {
                let g = Model::open(&p).unwrap();
                let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
                let shield = tok.shield().unwrap();
                Vocab {
                    tok,
                    shield,
                    byte_level,
                }
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for v in vocabs() {
        let parsed = v.tok.encode(&text, true).unwrap();
        let plain = v.tok.encode(&text, false).unwrap();
        let _ = v.tok.decode(&parsed, true);
        let shielded = v.tok.encode_rendered(&v.shield.escape(&text, false)).unwrap();
        if v.byte_level {
            // Byte-level BPE loses nothing: shielded text reads back as written.
            let strip = |ids: &[u32]| -> Vec<u32> {
                ids.iter().copied().filter(|&i| Some(i) != v.tok.bos).collect()
            };
            assert_eq!(v.tok.decode(&strip(&shielded), true), text);
            assert_eq!(v.tok.decode(&strip(&parsed), true), text);
            let _ = plain;
        }
    }
});
