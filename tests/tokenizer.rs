//! Tokenizers against llama.cpp's ids: gpt2 BPE on ../shared/fixtures/tokens.json (nemo-tiny's
//! `llama-bpe` vocabulary and SmolLM2's `smollm` one), SentencePiece on tests/data/spm-tokens.json
//! (a trained byte-fallback vocabulary with and without the space prefix, made by
//! tests/tools/make_spm_fixture.py), with special-token parsing on and off; streaming decoding;
//! and the `ggrun tokenize` command's output format.

mod common;

use ggrun::gguf::Model;
use ggrun::tokenizer::Tokenizer;

#[test]
fn ids_match_llama_cpp_for_both_vocabularies() {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("tokens.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for (name, m) in j["models"].as_object().unwrap() {
        let path = if name == "smollm2" {
            common::smollm2()
        } else {
            common::fixtures().join(m["file"].as_str().unwrap())
        };
        let g = Model::open(&path).unwrap();
        let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
        for case in m["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            for (special, key) in [(true, "ids_special"), (false, "ids_plain")] {
                let want: Vec<u32> = case[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(
                    tok.encode(text, special).unwrap(),
                    want,
                    "{name} {key} {text:?}"
                );
                checked += 1;
            }
            // Decoding the special-parsed ids with specials shown gives llama.cpp's text back.
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(
                tok.decode(&ids, true),
                case["detok_special"].as_str().unwrap(),
                "{name} {text:?}"
            );
        }
    }
    assert_eq!(checked, 96);
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn sentencepiece_ids_and_text_match_llama_cpp() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("spm-tokens.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for (name, m) in j["models"].as_object().unwrap() {
        let g = Model::open(&data.join(m["file"].as_str().unwrap())).unwrap();
        let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
        for case in m["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            for (special, key) in [(true, "ids_special"), (false, "ids_plain")] {
                assert_eq!(
                    tok.encode(text, special).unwrap(),
                    ids(&case[key]),
                    "{name} {key} {text:?}"
                );
                checked += 1;
            }
            let without_bos = &ids(&case["ids_special"])[1..];
            // Piece by piece (as generation streams them) and as a whole sequence.
            let mut stream = ggrun::tokenizer::StreamDecoder::new();
            let mut pieces = String::new();
            for &t in without_bos {
                pieces += &stream.push(&tok.token_bytes(t, true));
            }
            pieces += &stream.finish();
            assert_eq!(
                pieces,
                case["pieces_special"].as_str().unwrap(),
                "{name} {text:?}"
            );
            assert_eq!(
                tok.decode(without_bos, true),
                case["detok_special"].as_str().unwrap(),
                "{name} {text:?}"
            );
        }
    }
    assert_eq!(checked, 92);
}

#[test]
fn end_of_generation_tokens_come_from_metadata_and_turn_markers() {
    let g = Model::open(&common::smollm2()).unwrap();
    let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
    // eos_token_id 2 is <|im_end|>; <|endoftext|> (0) is a known end marker too.
    assert_eq!(tok.tokens[2], "<|im_end|>");
    assert!(tok.is_eog(2) && tok.is_eog(0));
    assert!(!tok.is_eog(1), "<|im_start|> does not end generation");
    let g = Model::open(&common::fixtures().join("nemo-tiny-f32.gguf")).unwrap();
    let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
    // eos = eot = <|im_end|> (959), listed once; </s> (957) is a known end marker.
    assert_eq!(tok.eog, vec![959, 957]);
    assert!(tok.special_id("<think>").is_some() && tok.special_id("</think>").is_some());
}

#[test]
fn streaming_decode_never_splits_a_character() {
    // Byte-fallback tokens spell multi-byte characters one byte per token.
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let g = Model::open(&data.join("spm-prefix.gguf")).unwrap();
    let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
    let text = "東京 🚀 naïve";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = ggrun::tokenizer::StreamDecoder::new();
    let mut out = String::new();
    for &t in &ids[1..] {
        let piece = stream.push(&tok.token_bytes(t, false));
        assert!(
            !piece.contains('\u{fffd}'),
            "half a character emitted: {piece:?}"
        );
        out += &piece;
    }
    assert_eq!(out + &stream.finish(), format!(" {text}"));
}

#[test]
fn tokenize_cli_prints_one_json_array() {
    let out = common::ggrun()
        .args(["tokenize", "-m"])
        .arg(common::fixtures().join("nemo-tiny-q4_0.gguf"))
        .arg("<|im_start|>user\nhi")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(&v[..3], &[956, 958, 305]);
    let plain = common::ggrun()
        .args(["tokenize", "--no-special", "-m"])
        .arg(common::fixtures().join("nemo-tiny-q4_0.gguf"))
        .arg("<|im_start|>")
        .output()
        .unwrap();
    let v: Vec<u32> = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(
        !v.contains(&958),
        "control token parsed with --no-special: {v:?}"
    );
}

#[test]
fn megabyte_inputs_tokenize_in_under_two_seconds() {
    // One space-free word, and the shapes that stress the pre-tokenizer regexes and the special
    // token split: long runs of spaces, digits, punctuation, mixed scripts, and turn markers.
    let word = "x".repeat(1 << 20);
    let inputs = [
        ("one word", word.clone()),
        ("spaces then a letter", format!("{}a", " ".repeat(1 << 20))),
        ("digits", "7".repeat(1 << 20)),
        ("punctuation", "!?".repeat(1 << 19)),
        ("mixed", "aé東1 !\n".repeat(1 << 17)),
        ("markers", "<|im_start|>x<|im_end|>".repeat(1 << 15)),
    ];
    let spm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm-prefix.gguf");
    for model in [
        common::smollm2(),
        common::fixtures().join("nemo-tiny-f32.gguf"),
        spm,
    ] {
        let g = Model::open(&model).unwrap();
        let tok = Tokenizer::from_metadata(g.metadata()).unwrap();
        for (name, text) in &inputs {
            let t = std::time::Instant::now();
            let ids = tok.encode(text, true).unwrap();
            let secs = t.elapsed().as_secs_f64();
            assert!(!ids.is_empty());
            assert!(secs < 2.0, "{}: {name}: {secs:.2} s", model.display());
        }
        // The word's ids decode back to it.
        let ids = tok.encode(&word, false).unwrap();
        assert_eq!(tok.decode(&ids, false).trim_start(), word);
    }
}
