//! `ggrun serve` over loopback with SmolLM2, spoken to in plain HTTP/1.1 from the test (no client
//! library between us and the bytes): answers equal `ggrun run` at temperature 0, streamed and
//! not; the Ollama endpoints; prefix reuse reported in usage; the API key; bad requests get a
//! 4xx with an OpenAI-style error object; a client that disconnects mid-stream frees the server
//! at once; several clients at once are all served, in turn, correctly.

mod common;

use common::server::{dechunk, http, post, start};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// `ggrun run`'s greedy answer to `prompt` in `n` tokens.
fn run_answer(prompt: &str, n: usize) -> String {
    run_answer_with(prompt, n, &[])
}

/// The same with extra flags.
fn run_answer_with(prompt: &str, n: usize, extra: &[&str]) -> String {
    let n = n.to_string();
    let args = ["-q", "--temp", "0", "-t", "2", "-n", &n, "-p", prompt];
    let out = common::stdout_of(
        common::ggrun()
            .args(["run", "-m"])
            .arg(common::smollm2())
            .args(args)
            .args(extra),
    );
    out.trim_end_matches('\n').to_string()
}

fn chat(prompt: &str, n: usize, stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": n,
           "temperature": 0, "stream": stream})
}

/// A second turn: the first user message, the answer it got, a new user message.
fn follow_up(first: &str, answer: &str, next: &str, n: usize) -> Value {
    json!({"messages": [
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": next}], "max_tokens": n, "temperature": 0})
}

fn cached_tokens(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

/// The text of an SSE chat stream (content deltas joined), and whether it ended with [DONE].
fn streamed_text(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
    }
    (text, done)
}

#[test]
fn answers_equal_run_streamed_or_not_and_the_ollama_endpoints_agree() {
    let s = start(&[]);
    let prompt = "What is the capital of France?";
    let want = run_answer(prompt, 12);
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &chat(prompt, 12, false));
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        want.as_str(),
        "{text}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        &chat(prompt, 12, true).to_string(),
    );
    assert_eq!(status, 200);
    assert_eq!(streamed_text(&body), (want.clone(), true), "{body}");
    let ollama = json!({"messages": [{"role": "user", "content": prompt}], "stream": false,
                        "options": {"temperature": 0, "num_predict": 12}});
    let (status, v, text) = post(&s.addr, "/api/chat", &ollama);
    assert_eq!(status, 200, "{text}");
    assert_eq!(v["message"]["content"], want.as_str());
    assert_eq!(v["done"], true);
    let (status, models) = http(&s.addr, "GET", "/v1/models", &[], "");
    assert_eq!(status, 200);
    assert!(models.contains("SmolLM2"), "{models}");
    let (status, tags) = http(&s.addr, "GET", "/api/tags", &[], "");
    assert_eq!(status, 200);
    assert!(tags.contains("SmolLM2"), "{tags}");
    assert_eq!(http(&s.addr, "GET", "/health", &[], "").0, 200);
}

#[test]
fn a_resent_history_is_served_from_the_kept_state() {
    let s = start(&[]);
    let first = chat("Name a color.", 24, false);
    let (_, v, _) = post(&s.addr, "/v1/chat/completions", &first);
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let second = follow_up("Name a color.", &answer, "Another one.", 8);
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &second);
    assert_eq!(status, 200, "{text}");
    let cached = cached_tokens(&v);
    assert!(cached > prompt_tokens, "cached {cached} of {text}");
    // The same first request again (a retry): all but its last token come from the snapshot
    // taken one token short of its end, and the answer is the first one.
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &first);
    assert_eq!(status, 200, "{text}");
    assert_eq!(cached_tokens(&v), prompt_tokens - 1, "{text}");
    assert_eq!(v["choices"][0]["message"]["content"], answer.as_str());
}

#[test]
fn bad_requests_get_openai_error_objects_and_the_key_is_enforced() {
    let s = start(&["--api-key", "sesame"]);
    let auth = [("Authorization", "Bearer sesame")];
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        &chat("hi", 2, false).to_string(),
    );
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(
        &s.addr,
        "POST",
        "/tokenize",
        &[("Authorization", "Bearer wrong")],
        r#"{"content": "hi"}"#,
    );
    assert_eq!(status, 401, "{body}");
    let cases = [
        ("{not json", 400),
        (r#"{"messages": []}"#, 400),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}"#,
            400,
        ),
        (r#"{"messages": "hello"}"#, 400),
    ];
    for (body, want) in cases {
        let (status, text) = http(&s.addr, "POST", "/v1/chat/completions", &auth, body);
        assert_eq!(status, want, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{text}"
        );
    }
    // A prompt longer than the context (2048 tokens).
    let long = "word ".repeat(3000);
    let (status, text) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &auth,
        &chat(&long, 2, false).to_string(),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("context"), "{text}");
    // A body over the limit.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(5 << 20));
    let (status, _) = http(&s.addr, "POST", "/v1/completions", &auth, &huge);
    // (0: the connection was reset while the body was still being sent, after the refusal.)
    assert!(status == 413 || status == 0, "{status}");
    // The server still answers.
    let (status, text) = http(
        &s.addr,
        "POST",
        "/v1/completions",
        &auth,
        r#"{"prompt": "Hello", "max_tokens": 2}"#,
    );
    assert_eq!(status, 200, "{text}");
}

#[test]
fn a_client_that_leaves_mid_stream_frees_the_server_and_queued_clients_all_finish() {
    let s = start(&[]);
    // Open a long stream, read its first event, hang up.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let body = chat("Write a long story about a dragon.", 900, true).to_string();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 256];
    let n = c.read(&mut first).unwrap();
    assert!(n > 0);
    drop(c);
    // The next request does not wait for 900 tokens.
    let t0 = Instant::now();
    let (status, _, text) = post(&s.addr, "/v1/chat/completions", &chat("Hi", 4, false));
    assert_eq!(status, 200, "{text}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    // Four clients at once: all answered, each with run's answer.
    let want = run_answer("Say hello.", 6);
    let addr = s.addr.clone();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                post(&addr, "/v1/chat/completions", &chat("Say hello.", 6, false))
            })
        })
        .collect();
    for h in handles {
        let (status, v, text) = h.join().unwrap();
        assert_eq!(status, 200, "{text}");
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    }
}

/// With `--parallel 4`, eight clients at once (different prompts, half of them streamed) all get
/// the answer `ggrun run` gives each alone, and four are decoded together: of a wave of four
/// streams sent together, at least three see their first words before any of them ends (one at
/// a time, only the first would; the fourth may connect late when the other tests load the
/// machine, as in one CI run: it saw its first words 0.3 ms after the first stream ended). Exact mode, where a batched step computes each
/// sequence's logits as it would alone (tests/forward.rs), so greedy answers match token for
/// token.
#[test]
fn parallel_slots_decode_clients_together_and_answer_as_run_does() {
    let s = start(&["--parallel", "4", "--exact"]);
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Name a colour, then count from {i} to {}.", i + 5))
        .collect();
    let n = 16;
    let want: Vec<String> = prompts
        .iter()
        .map(|p| run_answer_with(p, n, &["--exact"]))
        .collect();
    // Each client: (answer, when its first content arrived, when it finished).
    // Client i asks for `tokens` tokens once all clients sharing `gate` are ready.
    let ask = |i: usize, tokens: usize, gate: Arc<Barrier>| {
        let (addr, prompt) = (s.addr.clone(), prompts[i].clone());
        std::thread::spawn(move || {
            let n = tokens;
            gate.wait();
            let t0 = Instant::now();
            if i.is_multiple_of(2) {
                let (status, v, text) =
                    post(&addr, "/v1/chat/completions", &chat(&prompt, n, false));
                assert_eq!(status, 200, "{text}");
                let a = v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string();
                return (a, None, t0.elapsed());
            }
            let mut c = TcpStream::connect(&addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            let body = chat(&prompt, n, true).to_string();
            write!(
                c,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let (mut raw, mut first) = (Vec::new(), None);
            let mut buf = [0u8; 4096];
            loop {
                let k = c.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..k]);
                // Non-empty content (the first event's role delta carries "content":"").
                let t = String::from_utf8_lossy(&raw);
                let words = t
                    .match_indices("\"content\":\"")
                    .any(|(at, m)| !t[at + m.len()..].starts_with('"'));
                if first.is_none() && words {
                    first = Some(t0.elapsed());
                }
            }
            let text = String::from_utf8(raw).unwrap();
            let (_, rest) = text.split_once("\r\n\r\n").unwrap();
            let (answer, done) = streamed_text(&dechunk(rest));
            assert!(done);
            (answer, first, t0.elapsed())
        })
    };
    let gate = Arc::new(Barrier::new(8));
    let clients: Vec<_> = (0..8).map(|i| ask(i, n, gate.clone())).collect();
    let results: Vec<_> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, ((got, _, _), want)) in results.iter().zip(&want).enumerate() {
        // (run's output loses trailing newlines: see run_answer)
        assert_eq!(got.trim_end_matches('\n'), want, "client {i}");
    }
    // A wave of four streams of 48 tokens, sent together: at least three have words before
    // the first one ends.
    let gate = Arc::new(Barrier::new(4));
    let wave: Vec<_> = [1, 3, 5, 7]
        .map(|i| ask(i, 48, gate.clone()))
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let firsts: Vec<Duration> = wave
        .iter()
        .map(|w| w.1.expect("streamed content"))
        .collect();
    let first_end = wave.iter().map(|w| w.2).min().unwrap();
    let together = firsts.iter().filter(|&&f| f < first_end).count();
    assert!(
        together >= 3,
        "only {together} of 4 streams had words before the first ended at {first_end:?}: {firsts:?}"
    );
}

/// The official `openai` Python package (installed by .ci/run) as the client: chat whole and
/// streamed, models, structured output (20 seeds validated by a pydantic model, `.parse()`),
/// logprobs whole and streamed, n = 2.
#[test]
fn the_openai_python_client_gets_the_same_answer() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("skipped: the openai Python package is not installed (pip install openai)");
        return;
    }
    let s = start(&["--api-key", "k1"]);
    let prompt = "What is the capital of France?";
    let want = run_answer(prompt, 12);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/openai_client.py");
    let v = common::json_output(std::process::Command::new("python3").args([
        script,
        &format!("http://{}/v1", s.addr),
        "k1",
        prompt,
        "12",
    ]));
    assert_eq!(v["text"], want.as_str(), "{v}");
    assert_eq!(v["streamed"], want.as_str(), "{v}");
    assert_eq!(v["completion_tokens"], 12);
    assert!(
        v["models"][0]
            .as_str()
            .is_some_and(|m| m.contains("SmolLM2")),
        "{v}"
    );
    // Structured output validated by the client's own pydantic model, 20 seeds and .parse().
    assert_eq!(v["people"].as_array().unwrap().len(), 20, "{v}");
    assert!(v["parsed"]["name"].is_string(), "{v}");
    let tokens: Vec<&str> = v["logprob_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat().trim_start(), want, "{v}");
    assert!(
        v["top_logprobs"].as_array().unwrap().iter().all(|k| k == 2),
        "{v}"
    );
    assert_eq!(v["streamed_logprob_tokens"], v["logprob_tokens"], "{v}");
    assert_eq!(v["n2"], json!([0, 1]), "{v}");
}

/// SIGTERM: the server stops listening and exits cleanly.
#[test]
fn sigterm_stops_the_server() {
    let mut s = start(&[]);
    let (status, _, _) = post(
        &s.addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(status, 200);
    s.terminate();
    assert_eq!(s.exit_within(Duration::from_secs(20)), Some(0));
}

/// A long history comes back after another conversation replaced the state: the snapshot taken
/// one token short of the end of its prompt serves it, and its prompt costs a fraction of the
/// first prefill.
#[test]
fn a_snapshot_serves_a_history_after_another_conversation() {
    let s = start(&[]);
    let story = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(100);
    let (_, first, text) = post(&s.addr, "/v1/chat/completions", &chat(&story, 4, false));
    let answer = first["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let long_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(long_prompt > 1000, "{text}");
    // Another conversation in between: the state now holds it.
    let (status, _, _) = post(&s.addr, "/v1/chat/completions", &chat("Hello!", 4, false));
    assert_eq!(status, 200);
    let again = follow_up(&story, &answer, "Summarise it.", 4);
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &again);
    assert_eq!(status, 200, "{text}");
    let cached = cached_tokens(&v);
    assert!(
        cached + 1 >= long_prompt,
        "cached {cached} of {long_prompt}: {text}"
    );
    let (t_first, t_again) = (
        first["usage"]["timings"]["prompt_ms"].as_f64().unwrap(),
        v["usage"]["timings"]["prompt_ms"].as_f64().unwrap(),
    );
    eprintln!(
        "resent history: first prefill {long_prompt} tokens in {t_first:.0} ms; resent with a new turn: {} new tokens in {t_again:.0} ms",
        v["usage"]["timings"]["prompt_n"]
    );
    assert!(t_again * 3.0 < t_first, "{t_again} ms vs {t_first} ms");
}

/// With tools in the request, the template gets them, and the streamed answer (held back from
/// where a tool call may begin) adds up to the non-streamed one, in OpenAI's and Ollama's
/// streams. (The parsing of calls is
/// unit-tested in src/serve/tools.rs: SmolLM2 does not call tools reliably.)
#[test]
fn with_tools_the_stream_adds_up_to_the_whole_answer() {
    let s = start(&[]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let mut req = chat("What is the weather in Paris?", 24, false);
    req["tools"] = tools;
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &req);
    assert_eq!(status, 200, "{text}");
    let whole = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let calls = v["choices"][0]["message"]["tool_calls"].clone();
    req["stream"] = true.into();
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        &req.to_string(),
    );
    assert_eq!(status, 200);
    let (streamed, done) = streamed_text(&body);
    assert!(done);
    assert_eq!(streamed, whole, "{body}");
    if !calls.is_null() {
        assert!(body.contains("tool_calls"), "{body}");
    }
    // Ollama's chat: the streamed lines add up to the whole reply, calls included.
    let mut req = json!({"messages": req["messages"], "tools": req["tools"], "stream": false,
                         "options": {"temperature": 0, "num_predict": 24}});
    let (status, whole, text) = post(&s.addr, "/api/chat", &req);
    assert_eq!(status, 200, "{text}");
    req["stream"] = true.into();
    let (status, body) = http(&s.addr, "POST", "/api/chat", &[], &req.to_string());
    assert_eq!(status, 200);
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let content: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        content,
        whole["message"]["content"].as_str().unwrap(),
        "{body}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(
        last["message"]["tool_calls"], whole["message"]["tool_calls"],
        "{body}"
    );
    assert!(!body.contains("<tool_call>"), "{body}");
}

/// An address it cannot listen on is a one-line error and exit status 1.
#[test]
fn an_unusable_address_is_a_one_line_error() {
    let out = common::ggrun()
        .args(["serve", "-m"])
        .arg(common::smollm2())
        .args(["--host", "nohost.invalid", "-q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot listen on nohost.invalid:8080"),
        "{err}"
    );
}

/// The routes beside generation, and what every request leaves behind: /health and
/// /v1/models public beside --api-key (private with --api-key-all-routes), `x-api-key`,
/// JSON errors for unknown routes and methods (Ollama's shape under /api/), parameters we do
/// not implement refused by name, /detokenize, Ollama's generate (whole, streamed, raw), show,
/// ps and version, the Prometheus counters and one log line per request.
#[test]
fn the_api_surface_answers_in_each_apis_shape() {
    let s = start(&["--api-key", "sesame"]);
    let key = [("x-api-key", "sesame")];
    for path in ["/health", "/v1/models"] {
        let (status, body) = http(&s.addr, "GET", path, &[], "");
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, body) = http(&s.addr, "GET", "/api/version", &[], "");
    assert_eq!(status, 401, "{body}");
    // Unknown routes and methods: JSON errors, in Ollama's shape under /api/.
    let (status, body) = http(&s.addr, "GET", "/v1/nothing", &key, "");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/nothing"),
        "{body}"
    );
    let (status, body) = http(&s.addr, "GET", "/api/nothing", &key, "");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 404);
    assert!(
        v["error"].as_str().unwrap().contains("/api/nothing"),
        "{body}"
    );
    // Embeddings: known routes that say they are not supported, each in its API's shape.
    let (status, body) = http(&s.addr, "POST", "/v1/embeddings", &key, r#"{"input":"x"}"#);
    assert_eq!(status, 501, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("embeddings are not supported"),
        "{body}"
    );
    let (status, body) = http(&s.addr, "POST", "/api/embed", &key, r#"{"input":"x"}"#);
    assert_eq!(status, 501, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("embeddings are not supported"),
        "{body}"
    );
    let (status, body) = http(&s.addr, "GET", "/v1/chat/completions", &key, "");
    assert_eq!(status, 405, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"].is_string());
    // Parameters that would change the answer and are not implemented: a 400 naming them.
    let mut req = chat("hi", 2, false);
    req["audio"] = json!({"voice": "alloy"});
    req["frobnicate"] = json!(true);
    req["user"] = json!("someone");
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &key,
        &req.to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("audio, frobnicate"), "{body}");
    assert!(!body.contains("user"), "{body}");
    let ollama = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "options": {"mirostat": 2}, "stream": false});
    let (status, body) = http(&s.addr, "POST", "/api/chat", &key, &ollama.to_string());
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("options.mirostat"),
        "{body}"
    );
    // logit_bias: +100 makes a token the greedy choice, -100 bans it, an id past the
    // vocabulary is a 400.
    let (_, body) = http(
        &s.addr,
        "POST",
        "/tokenize",
        &key,
        r#"{"content": " banana"}"#,
    );
    let banana = serde_json::from_str::<Value>(&body).unwrap()["tokens"][0]
        .as_u64()
        .unwrap();
    let mut req = chat("Name a colour.", 1, false);
    let first = |req: &Value| {
        let (status, body) = http(
            &s.addr,
            "POST",
            "/v1/chat/completions",
            &key,
            &req.to_string(),
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let plain = first(&req);
    req["logit_bias"] = json!({ banana.to_string(): 100 });
    assert_eq!(first(&req).trim_start(), "banana");
    let (_, body) = http(
        &s.addr,
        "POST",
        "/tokenize",
        &key,
        &json!({ "content": plain }).to_string(),
    );
    let plain_id = serde_json::from_str::<Value>(&body).unwrap()["tokens"][0].clone();
    req["logit_bias"] = json!({ plain_id.to_string(): -100 });
    assert_ne!(first(&req), plain);
    req["logit_bias"] = json!({"99999999": 1});
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &key,
        &req.to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("logit_bias"), "{body}");
    // n choices: each its own job, seeds seed + i; usage counts the prompt once.
    let mut req = chat("Name a colour.", 6, false);
    req["temperature"] = json!(1.0);
    req["seed"] = json!(5);
    req["n"] = json!(3);
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &key,
        &req.to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let many: Value = serde_json::from_str(&body).unwrap();
    let choices = many["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{body}");
    req["n"] = json!(1);
    req["seed"] = json!(6);
    let (_, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &key,
        &req.to_string(),
    );
    let one: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(
        choices[1]["message"]["content"],
        one["choices"][0]["message"]["content"]
    );
    let generated: u64 = choices
        .iter()
        .map(|c| {
            let text = c["message"]["content"].as_str().unwrap();
            assert!(!text.is_empty() || c["finish_reason"] == "stop");
            1
        })
        .sum();
    assert_eq!(generated, 3);
    assert_eq!(
        many["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"],
        "{body}"
    );
    // Streamed: both choices' chunks, told apart by index; choice 1 is seed 6's answer.
    req["n"] = json!(2);
    req["seed"] = json!(5);
    req["stream"] = json!(true);
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &key,
        &req.to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(data).unwrap();
        let i = c["choices"][0]["index"].as_u64().unwrap() as usize;
        texts[i] += c["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        finished[i] |= !c["choices"][0]["finish_reason"].is_null();
    }
    assert_eq!(finished, [true, true], "{body}");
    assert_eq!(
        texts[1].as_str(),
        one["choices"][0]["message"]["content"].as_str().unwrap(),
        "{body}"
    );
    // Streamed completions too: choice i of n=2 equals the whole completion with seed 5 + i.
    let ask = |n: u64, seed: u64, stream: bool| {
        json!({"prompt": "Colours:", "max_tokens": 6, "temperature": 1.0, "seed": seed,
               "n": n, "stream": stream})
    };
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    let (status, body) = http(
        &s.addr,
        "POST",
        "/v1/completions",
        &key,
        &ask(2, 5, true).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(data).unwrap();
        let i = c["choices"][0]["index"].as_u64().unwrap() as usize;
        texts[i] += c["choices"][0]["text"].as_str().unwrap_or("");
        finished[i] |= !c["choices"][0]["finish_reason"].is_null();
    }
    assert_eq!(finished, [true, true], "{body}");
    for (i, text) in texts.iter().enumerate() {
        let whole = ask(1, 5 + i as u64, false).to_string();
        let (_, body) = http(&s.addr, "POST", "/v1/completions", &key, &whole);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            text.as_str(),
            v["choices"][0]["text"].as_str().unwrap(),
            "{body}"
        );
    }
    assert_ne!(texts[0], texts[1], "two seeds, one answer: {texts:?}");
    // /detokenize inverts /tokenize.
    let text = "Hello, world! Ünïcode too.";
    let (_, body) = http(
        &s.addr,
        "POST",
        "/tokenize",
        &key,
        &json!({ "content": text }).to_string(),
    );
    let tokens = serde_json::from_str::<Value>(&body).unwrap()["tokens"].clone();
    let (status, body) = http(
        &s.addr,
        "POST",
        "/detokenize",
        &key,
        &json!({ "tokens": tokens }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["content"],
        text
    );
    let (status, _) = http(&s.addr, "POST", "/detokenize", &key, r#"{"tokens": [-1]}"#);
    assert_eq!(status, 400);
    // Ollama's generate: the prompt as a user turn, as `ggrun run` renders it; whole and
    // streamed alike; raw continues the text as /v1/completions does.
    let prompt = "Name three colours.";
    let want = run_answer(prompt, 8);
    let gen = |stream: bool, raw: bool| {
        json!({"model": "m", "prompt": prompt, "stream": stream, "raw": raw,
               "options": {"temperature": 0, "num_predict": 8}})
        .to_string()
    };
    let (status, body) = http(&s.addr, "POST", "/api/generate", &key, &gen(false, false));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"], want.as_str(), "{body}");
    assert_eq!(
        (v["done"].as_bool(), v["eval_count"].as_u64()),
        (Some(true), Some(8))
    );
    let (status, body) = http(&s.addr, "POST", "/api/generate", &key, &gen(true, false));
    assert_eq!(status, 200);
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let joined: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(joined, want);
    assert_eq!(lines.last().unwrap()["done"], true);
    let (_, body) = http(&s.addr, "POST", "/api/generate", &key, &gen(false, true));
    let raw = serde_json::from_str::<Value>(&body).unwrap()["response"].clone();
    let (_, body) = http(
        &s.addr,
        "POST",
        "/v1/completions",
        &key,
        &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}).to_string(),
    );
    let completion = serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["text"].clone();
    assert_eq!(raw, completion);
    // show, ps, version.
    let (status, body) = http(&s.addr, "POST", "/api/show", &key, r#"{"model": ""}"#);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["template"].as_str().unwrap().contains("im_start"),
        "{body}"
    );
    assert_eq!(v["model_info"]["general.architecture"], "llama");
    assert!(v["model_info"]["llama.context_length"].as_u64().is_some());
    let (status, body) = http(&s.addr, "POST", "/api/show", &key, r#"{"model": "other"}"#);
    assert_eq!(status, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    let (_, body) = http(&s.addr, "GET", "/api/ps", &key, "");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["models"][0]["context_length"], 2048);
    let (_, body) = http(&s.addr, "GET", "/api/version", &key, "");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["version"].is_string());
    // The counters and the log lines.
    let (status, metrics) = http(&s.addr, "GET", "/metrics", &key, "");
    assert_eq!(status, 200);
    let text = metrics;
    assert!(
        text.contains(r#"ggrun_requests_total{route="/api/generate",status="200"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"ggrun_requests_total{route="other",status="404"} 2"#),
        "{text}"
    );
    let generated: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ggrun_generated_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(generated >= 32, "{text}");
    std::thread::sleep(Duration::from_millis(200));
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l.starts_with("POST /api/generate 200 ") && l.contains("+8 tokens")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with("GET /v1/nothing 404 ")),
        "{log:?}"
    );

    let private = start(&["--api-key", "sesame", "--api-key-all-routes"]);
    let (status, _) = http(&private.addr, "GET", "/health", &[], "");
    assert_eq!(status, 401);
    let (status, _) = http(&private.addr, "GET", "/health", &key, "");
    assert_eq!(status, 200);
}

/// Structured output (llguidance): replies to a JSON schema validate for 20 seeds at
/// temperature 1, through OpenAI's response_format, llama-server's json_schema and Ollama's
/// format; `json_object` gives an object; a Lark grammar limits the answer to its words; a
/// schema or grammar that cannot be used is a 400 within a second. llama.cpp's GBNF works too.
#[test]
fn structured_output_follows_the_schema_or_grammar() {
    let s = start(&[]);
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"], "additionalProperties": false});
    let valid = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 2, "{text}");
        assert!(
            o["name"].as_str().is_some_and(|n| n.chars().count() <= 20),
            "{text}"
        );
        assert!(o["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
    };
    let ask = |seed: u64| {
        json!({"messages": [{"role": "user", "content": "Describe a person as JSON."}],
               "max_tokens": 100, "temperature": 1.0, "seed": seed})
    };
    for seed in 0..20 {
        let mut req = ask(seed);
        req["response_format"] = json!({"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": schema}});
        let (status, v, text) = post(&s.addr, "/v1/chat/completions", &req);
        assert_eq!(status, 200, "{text}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text}");
        valid(v["choices"][0]["message"]["content"].as_str().unwrap());
    }
    let mut req = ask(7);
    req["json_schema"] = schema.clone();
    let (_, v, text) = post(&s.addr, "/v1/chat/completions", &req);
    valid(v["choices"][0]["message"]["content"].as_str().expect(&text));
    let ollama = json!({"messages": req["messages"], "format": schema, "stream": false,
                        "options": {"temperature": 1.0, "seed": 3, "num_predict": 100}});
    let (status, v, text) = post(&s.addr, "/api/chat", &ollama);
    assert_eq!(status, 200, "{text}");
    valid(v["message"]["content"].as_str().unwrap());
    let mut req = ask(1);
    req["response_format"] = json!({"type": "json_object"});
    req["max_tokens"] = json!(200);
    req["temperature"] = json!(0.3);
    let (_, v, text) = post(&s.addr, "/v1/chat/completions", &req);
    if v["choices"][0]["finish_reason"] == "stop" {
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        let answer: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(answer.is_object(), "{text}");
    }
    // A Lark grammar (llama-server's grammar field, llguidance syntax).
    for seed in 0..5 {
        let mut req = ask(seed);
        req["messages"][0]["content"] = json!("Is the sky blue?");
        req["grammar"] = json!("%llguidance {}\nstart: \"yes\" | \"no\" | \"maybe\"");
        let (status, v, text) = post(&s.addr, "/v1/chat/completions", &req);
        assert_eq!(status, 200, "{text}");
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(["yes", "no", "maybe"].contains(&answer), "{text}");
    }
    // What cannot be used is a 400 at once.
    let bad = [
        json!({"response_format": {"type": "json_schema",
                                   "json_schema": {"schema": {"type": "nonsense"}}}}),
        json!({"json_schema": {"type": "string", "pattern": "(unclosed"}}),
        json!({"grammar": "root ::= (\"yes\""}),
        json!({"grammar": "%llguidance {}\nstart: undefined_rule"}),
        json!({"json_schema": {"type": "object"}, "response_format": {"type": "json_object"}}),
        json!({"response_format": {"type": "xml"}}),
    ];
    for extra in bad {
        let mut req = ask(0);
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let t0 = Instant::now();
        let (status, v, text) = post(&s.addr, "/v1/chat/completions", &req);
        assert_eq!(status, 400, "{extra}: {text}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{extra}: {:?}",
            t0.elapsed()
        );
    }
    // Deep structures compile on the grammar's own stack (each of these crashed a 2 MiB
    // thread, and with it the server): a chain of 16,000 Lark rules, one of 1,000 schema
    // references. Past the size caps: a 400 naming the size.
    let mut lark = String::from("start: a0\n");
    for i in 0..16_000 {
        lark += &format!("a{i}: a{}\n", i + 1);
    }
    lark += "a16000: \"z\"\n";
    assert!(lark.len() < 256 << 10);
    let mut req = ask(0);
    req["grammar"] = json!(format!("%llguidance {{}}\n{lark}"));
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &req);
    assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
    assert_eq!(v["choices"][0]["message"]["content"], "z");
    let mut defs = serde_json::Map::new();
    for i in 0..1000 {
        let next = format!("#/$defs/d{}", i + 1);
        defs.insert(
            format!("d{i}"),
            json!({"type": "object", "properties": {"x": {"$ref": next}}}),
        );
    }
    defs.insert("d1000".into(), json!({"type": "string"}));
    let mut req = ask(0);
    req["json_schema"] = json!({"$ref": "#/$defs/d0", "$defs": defs});
    req["max_tokens"] = json!(12);
    let (status, _, text) = post(&s.addr, "/v1/chat/completions", &req);
    assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
    let mut req = ask(0);
    req["grammar"] = json!(format!(
        "%llguidance {{}}\n{lark}{}",
        "\n".repeat(256 << 10)
    ));
    let (status, _, text) = post(&s.addr, "/v1/chat/completions", &req);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("KiB"), "{text}");
    // llama.cpp's GBNF (llama-server's grammar field): three lowercase words of at most twelve
    // letters, so that any sample completes within the token budget (with `[a-z]+` a seed once
    // spelled one 40-token word and hit the limit: the grammar held, the test's budget did not).
    let gbnf = "root ::= item (\",\" ws item){2}\nitem ::= [a-z]{1,12} # a word\nws ::= \" \"?\n";
    for seed in 0..5 {
        let mut req = ask(seed);
        req["messages"][0]["content"] = json!("Name three fruits.");
        req["grammar"] = json!(gbnf);
        req["max_tokens"] = json!(64);
        let (status, v, text) = post(&s.addr, "/v1/chat/completions", &req);
        assert_eq!(status, 200, "{text}");
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        let words: Vec<&str> = answer.split(',').map(str::trim_start).collect();
        assert_eq!(words.len(), 3, "{text}");
        assert!(
            words
                .iter()
                .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase())),
            "{text}"
        );
    }
    let (_, _, text) = post(
        &s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "grammar": "root = \"a\""}),
    );
    assert!(text.contains("GBNF"), "{text}");
}

/// The official `ollama` Python client (installed by .ci/run): its list, generate (whole and
/// streamed, equal to `ggrun run`'s greedy answer), show, ps, chat with tools whole and
/// streamed (the same text and calls), chat under a JSON schema, and a streamed tool call.
#[test]
fn the_ollama_python_client_gets_the_same_answers() {
    let s = start(&[]);
    let llama3 = common::real_template("meta-llama-Llama-3.1-8B-Instruct");
    let s3 = start(&["--chat-template", llama3.to_str().unwrap()]);
    let prompt = "Name three colours.";
    let v = common::json_output(std::process::Command::new("python3").args([
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/ollama_client.py"),
        &format!("http://{}", s.addr),
        prompt,
        &format!("http://{}", s3.addr),
    ]));
    // A streamed tool call: Llama 3's bare-JSON call, shaped by `format`, parsed in the stream.
    assert_eq!(v["streamed_calls"][0]["name"], "get_weather", "{v}");
    assert!(
        v["streamed_calls"][0]["arguments"]["city"].is_string(),
        "{v}"
    );
    let want = run_answer(prompt, 8);
    assert_eq!(v["generate"], want.as_str(), "{v}");
    assert_eq!(v["generate_streamed"], want.as_str(), "{v}");
    assert_eq!(v["eval_count"], 8, "{v}");
    assert!(v["template"].as_str().unwrap().contains("im_start"), "{v}");
    assert_eq!(v["architecture"], "llama", "{v}");
    assert_eq!(v["ps"][0], v["model"], "{v}");
    assert_eq!(v["chat_streamed"], v["chat"], "{v}");
    assert_eq!(v["chat_streamed_calls"], v["chat_calls"], "{v}");
    let city = v["formatted"]["city"].as_str().unwrap();
    assert!(city.chars().count() <= 30, "{v}");
    assert_eq!(v["formatted"].as_object().unwrap().len(), 1, "{v}");
}

/// logprobs: each generated token's log-probability and its top alternatives equal the
/// log-softmax of the logits `ggrun logits` computes for the same tokens (within 2e-2: the
/// server runs the prompt in other batches), the chosen token is the top one at temperature 0,
/// streamed chunks carry the same entries, and the completions API gets its legacy form.
#[test]
fn logprobs_are_the_models_log_softmax() {
    let s = start(&[]);
    let messages = json!([{"role": "user", "content": "Name a river."}]);
    let n = 6;
    let req = json!({"messages": messages, "max_tokens": n, "temperature": 0,
                     "logprobs": true, "top_logprobs": 3});
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &req);
    assert_eq!(status, 200, "{text}");
    let entries = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(entries.len(), n, "{text}");
    let joined: String = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        joined.trim_start(),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // The reference: the prompt's tokens and the same continuation through `ggrun logits`.
    let (_, rendered, _) = post(&s.addr, "/apply-template", &json!({ "messages": messages }));
    let (_, toks, _) = post(
        &s.addr,
        "/tokenize",
        &json!({"content": rendered["prompt"], "add_special": true}),
    );
    let prompt: Vec<String> = toks["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let out = std::env::temp_dir().join(format!("ggrun-logprobs-{}.f32", std::process::id()));
    common::stdout_of(
        common::ggrun()
            .args(["logits", "-m"])
            .arg(common::smollm2())
            .args([
                "-t",
                "2",
                "--tokens",
                &prompt.join(","),
                "--decode",
                &n.to_string(),
            ])
            .arg("--out")
            .arg(&out),
    );
    let rows = common::read_f32(&out);
    let _ = std::fs::remove_file(&out);
    let nv = rows.len() / (prompt.len() + n);
    for (i, e) in entries.iter().enumerate() {
        let row = &rows[(prompt.len() - 1 + i) * nv..(prompt.len() + i) * nv];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let id = e["id"].as_u64().unwrap() as usize;
        let want = row[id] as f64 - lse;
        let got = e["logprob"].as_f64().unwrap();
        assert!((got - want).abs() < 2e-2, "token {i}: {got} vs {want}");
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["id"], e["id"], "greedy picks the top token");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
    }
    // Streamed: the same entries, one per chunk.
    let mut req = req.clone();
    req["stream"] = true.into();
    let (_, body) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        &req.to_string(),
    );
    let streamed: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    let ids = |v: &[Value]| v.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&streamed), ids(&entries));
    // Completions: the legacy lists.
    let (_, v, text) = post(
        &s.addr,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                "logprobs": 2}),
    );
    let lp = &v["choices"][0]["logprobs"];
    let tokens: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, v["choices"][0]["text"].as_str().unwrap(), "{text}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(
        lp["top_logprobs"][0].as_object().unwrap().len(),
        2,
        "{text}"
    );
}

/// `tool_choice` "required" or a named function makes the answer a call in the syntax the
/// model's template teaches (Qwen 3's JSON in tags, Qwen3-Coder's XML, Llama 3's JSON), which
/// comes back parsed as a tool call with arguments of the tool's schema, even from SmolLM2,
/// which does not call tools on its own; "none" offers no tools; Anthropic's "any" and the
/// Responses API's named function too.
#[test]
fn a_required_tool_choice_makes_a_call_in_the_templates_syntax() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather",
         "parameters": {"type": "object", "properties": {
             "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Time",
         "parameters": {"type": "object", "properties": {
             "zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}]);
    let ask = |choice: Value| {
        json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
               "tools": tools, "tool_choice": choice, "max_tokens": 80, "temperature": 0})
    };
    for template in [
        "Qwen-Qwen3-0.6B",
        "Qwen3-Coder",
        "meta-llama-Llama-3.1-8B-Instruct",
    ] {
        let path = common::real_template(template);
        let s = start(&["--chat-template", path.to_str().unwrap()]);
        for (choice, want) in [
            (json!("required"), None),
            (
                json!({"type": "function", "function": {"name": "get_time"}}),
                Some("get_time"),
            ),
        ] {
            let (status, v, text) = post(&s.addr, "/v1/chat/completions", &ask(choice));
            assert_eq!(status, 200, "{template}: {text}");
            assert_eq!(
                v["choices"][0]["finish_reason"], "tool_calls",
                "{template}: {text}"
            );
            let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
            let name = call["name"].as_str().unwrap();
            let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
            match want {
                Some(w) => assert_eq!(name, w, "{template}: {text}"),
                None => assert!(["get_weather", "get_time"].contains(&name), "{text}"),
            }
            let key = if name == "get_time" { "zone" } else { "city" };
            assert!(args[key].is_string(), "{template}: {text}");
        }
        // "none": the tools are not offered (a shorter prompt) and no call is looked for.
        let (_, with, _) = post(&s.addr, "/v1/chat/completions", &ask(json!("auto")));
        let (_, none, text) = post(&s.addr, "/v1/chat/completions", &ask(json!("none")));
        assert!(
            none["usage"]["prompt_tokens"].as_u64() < with["usage"]["prompt_tokens"].as_u64(),
            "{template}: {text}"
        );
        if template == "Qwen-Qwen3-0.6B" {
            let anthropic = json!({"max_tokens": 80, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": [{"name": "get_weather", "input_schema": tools[0]["function"]["parameters"]}],
                "tool_choice": {"type": "any"}});
            let (status, v, text) = post(&s.addr, "/v1/messages", &anthropic);
            assert_eq!(status, 200, "{text}");
            assert_eq!(v["stop_reason"], "tool_use", "{text}");
            let block = v["content"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["type"] == "tool_use");
            assert!(block.unwrap()["input"]["city"].is_string(), "{text}");
            let responses = json!({"input": "What is the weather in Paris?", "temperature": 0,
                "max_output_tokens": 80,
                "tools": [{"type": "function", "name": "get_weather",
                           "parameters": tools[0]["function"]["parameters"]}],
                "tool_choice": {"type": "function", "name": "get_weather"}});
            let (status, v, text) = post(&s.addr, "/v1/responses", &responses);
            assert_eq!(status, 200, "{text}");
            let item = v["output"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["type"] == "function_call");
            assert_eq!(item.unwrap()["name"], "get_weather", "{text}");
        }
    }
}
