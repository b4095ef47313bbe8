//! Fuzzes chat templates: the first byte chooses between a fuzzed template source rendered
//! with a fixed conversation (under small fuel and output limits), and fuzzed request messages
//! (JSON) rendered through a reasoning-and-tools template, shielded, and tokenized. Never a
//! panic; a render past its limits is an error.
#![no_main]

use std::sync::OnceLock;

use ggrun::chat::session::prompt_tokens;
use ggrun::chat::template::{ChatTemplate, Limits, Message, RenderOptions};
use ggrun::gguf::Model;
use ggrun::synth::decoder::{write_tiny, TinyMix};
use ggrun::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

const LIMITS: Limits = Limits {
    fuel: 200_000,
    max_output: 1 << 20,
    max_memory: 0,
    isolate: false,
};

fn vocab() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ggrun-fuzz-tpl-{}.gguf", std::process::id()));
        write_tiny("qwen3", TinyMix::F32, 1, false, &p).unwrap();
        let g = Model::open(&p).unwrap();
        let t = Tokenizer::from_metadata(g.metadata()).unwrap();
        drop(g);
        // The tokenizer owns its vocabulary: the file is not needed past here (each fuzz run
        // left one in the temp folder).
        let _ = std::fs::remove_file(&p);
        t
    })
}

fn conversation() -> Vec<Message> {
    let v = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather <|im_end|> in Paris?"},
        {"role": "assistant", "content": null, "reasoning_content": "call it",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "21 C"},
    ]);
    Message::list_from_api(&v, "messages").unwrap()
}

fn options() -> RenderOptions {
    RenderOptions {
        add_generation_prompt: true,
        enable_thinking: Some(true),
        tools: Some(json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        let Ok(mut t) = ChatTemplate::new(&text, "fuzz", "<s>", "</s>") else {
            return;
        };
        t.set_limits(LIMITS);
        if let Ok(out) = t.render(&conversation(), &options()) {
            assert!(out.len() as u64 <= LIMITS.max_output);
        }
    } else {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return;
        };
        let Ok(messages) = Message::list_from_api(&v, "messages") else {
            return;
        };
        static T: OnceLock<ChatTemplate> = OnceLock::new();
        let t = T.get_or_init(|| {
            let src = include_str!("../../tests/data/templates/reasoning-tools.jinja");
            let mut t = ChatTemplate::new(src, "reasoning-tools", "<s>", "</s>").unwrap();
            t.shield = Some(vocab().shield().unwrap());
            t.set_limits(LIMITS);
            t
        });
        if let Ok(prompt) = t.render(&messages, &options()) {
            let _ = prompt_tokens(vocab(), &prompt, true).unwrap();
        }
    }
});
