//! Fuzzes the server's request readers: a body for each endpoint (the first byte picks it),
//! read as its handler reads it (JSON shape, messages in the OpenAI and Ollama shapes, sampling
//! ranges). Never a panic: a value or the message of a 400.
#![no_main]

use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 9] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/apply-template",
    "/tokenize",
    "/api/generate",
    "/detokenize",
    "/v1/messages",
    "/v1/responses",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[pick as usize % PATHS.len()];
    let _ = ggrun::serve::read_request(path, body);
});
