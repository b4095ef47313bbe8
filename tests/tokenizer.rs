//! The gpt2 BPE tokenizer against llama.cpp's ids in ../shared/fixtures/tokens.json (nemo-tiny's
//! `llama-bpe` vocabulary and SmolLM2's `smollm` one), with special-token parsing on and off, and
//! the `ggrun tokenize` command's output format.

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
