//! `ggrun serve` against careless and hostile clients (SmolLM2 over loopback): agents' tool
//! histories reach the template whole; idle,
//! slow and surplus connections cannot take the server; bad parameters and prompts that cannot
//! start are 4xx answers naming the problem; the API key is checked before any body; a
//! shutdown ends streams with finish_reason "abort"; and a soak of 16 clients for a minute
//! leaves the server's memory where it was.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::server::{http, post, start};
use serde_json::{json, Value};

fn data() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The tokens of the prompt the server renders of the tool conversation in its OpenAI shape
/// (tests/data/templates/tool-conversation.json with tools.json): what every API's shape of
/// the same conversation must come to.
fn conversation_tokens(addr: &str) -> usize {
    let read = |name: &str| -> Value {
        let text = std::fs::read_to_string(data().join("templates").join(name)).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let (status, rendered, text) = post(
        addr,
        "/apply-template",
        &json!({"messages": read("tool-conversation.json"), "tools": read("tools.json")}),
    );
    assert_eq!(status, 200, "{text}");
    let (_, tokens, _) = post(
        addr,
        "/tokenize",
        &json!({"content": rendered["prompt"], "add_special": true}),
    );
    tokens["tokens"].as_array().unwrap().len()
}

#[test]
fn a_tool_conversation_from_the_openai_client_renders_the_first_call_into_the_next_prompt() {
    let qwen3 = common::real_template("Qwen-Qwen3-0.6B");
    let s = start(&["--chat-template", qwen3.to_str().unwrap()]);
    let conv = data().join("templates/tool-conversation.json");
    let tools = data().join("templates/tools.json");
    let v = common::json_output(std::process::Command::new("python3").args([
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/openai_tools.py"),
        &format!("http://{}/v1", s.addr),
        conv.to_str().unwrap(),
        tools.to_str().unwrap(),
    ]));
    // The prompt the server made of the same request, and its tokens.
    let messages: Value = serde_json::from_str(&std::fs::read_to_string(&conv).unwrap()).unwrap();
    let tool_defs: Value = serde_json::from_str(&std::fs::read_to_string(&tools).unwrap()).unwrap();
    let (status, rendered, text) = post(
        &s.addr,
        "/apply-template",
        &json!({"messages": messages, "tools": tool_defs}),
    );
    assert_eq!(status, 200, "{text}");
    let prompt = rendered["prompt"].as_str().unwrap();
    for call in [
        r#"{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}"#,
        r#"{"temp": 21, "sky": "sunny"}"#,
        r#"{"name": "get_weather", "arguments": {"city": "Tōkyō"}}"#,
    ] {
        assert!(prompt.contains(call), "{call} not in {prompt}");
    }
    let (_, tokens, _) = post(
        &s.addr,
        "/tokenize",
        &json!({"content": prompt, "add_special": true}),
    );
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap() as usize,
        tokens["tokens"].as_array().unwrap().len(),
        "{v}"
    );
}

/// Raises this process's open-file limit to at least `n` (as far as the hard limit allows).
// rlim_t is u64 here, not on every platform.
#[allow(clippy::unnecessary_cast)]
fn allow_open_files(n: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = lim.rlim_max.min(n as libc::rlim_t).max(lim.rlim_cur);
        lim.rlim_cur = want;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur as u64
}

#[test]
fn two_thousand_idle_connections_leave_the_server_answering() {
    let have = allow_open_files(2200);
    assert!(
        have >= 2100,
        "this test needs 2100 open files; the hard limit is {have}"
    );
    let s = start(&[]);
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(&s.addr).unwrap())
        .collect();
    let t0 = Instant::now();
    let (status, body) = http(&s.addr, "GET", "/health", &[], "");
    assert_eq!(status, 200, "{body}");
    let (status, _, text) = post(
        &s.addr,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{text}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    drop(idle);
}

#[test]
fn slow_headers_and_idle_keep_alive_connections_are_closed() {
    let s = start(&["--header-timeout", "1", "--idle-timeout", "2"]);
    let closed_within = |mut c: TcpStream, limit: Duration| {
        c.set_read_timeout(Some(limit)).unwrap();
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some(t0.elapsed())
                }
                Err(_) => return None,
            }
        }
    };
    // Half a request line, then nothing.
    let mut slow = TcpStream::connect(&s.addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t = closed_within(slow, Duration::from_secs(8));
    assert!(t.is_some(), "a slow-header client was not disconnected");
    // A kept-alive connection after its answer.
    let mut kept = TcpStream::connect(&s.addr).unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t = closed_within(kept, Duration::from_secs(10));
    assert!(
        t.is_some_and(|t| t >= Duration::from_millis(1500)),
        "idle connection: {t:?}"
    );
}

#[test]
fn beyond_the_connection_cap_a_busy_server_answers_503() {
    let s = start(&["--max-connections", "2"]);
    // Two connections busy with long streams (one generating, one queued behind it).
    let long = json!({"messages": [{"role": "user", "content": "Write a long story."}],
                      "max_tokens": 400, "stream": true});
    let busy: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(&s.addr).unwrap();
            let body = long.to_string();
            write!(
                c,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = http(&s.addr, "GET", "/health", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    drop(busy);
    // Once they go, the server answers again.
    let t0 = Instant::now();
    loop {
        let (status, _) = http(&s.addr, "GET", "/health", &[], "");
        if status == 200 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "still {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_api_key_is_checked_before_the_body_arrives() {
    let s = start(&["--api-key", "k"]);
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Headers announcing a large body that never comes.
    c.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = c.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[test]
fn every_bad_parameter_is_a_400_naming_it_and_streams_that_cannot_start_are_4xx() {
    let s = start(&[]);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        ("temperature", json!(-1), "temperature"),
        ("temperature", json!(1e39), "temperature"),
        ("top_p", json!(5), "top_p"),
        ("min_p", json!(-5), "min_p"),
        ("top_k", json!(1_000_000_000_000_000_000u64), "top_k"),
        ("presence_penalty", json!(9), "presence_penalty"),
        ("max_tokens", json!(0), "max_tokens"),
        ("n", json!(99), "n"),
        ("stop", json!(vec!["x"; 40]), "stop"),
    ];
    for (field, value, name) in cases {
        for stream in [false, true] {
            let mut body = json!({"messages": msgs, "stream": stream});
            body[field] = value.clone();
            let (status, v, text) = post(&s.addr, "/v1/chat/completions", &body);
            assert_eq!(status, 400, "{field}={value}: {text}");
            let m = v["error"]["message"].as_str().unwrap_or("");
            assert!(m.starts_with(&format!("{name}:")), "{field}={value}: {m}");
        }
    }
    let (status, v, text) = post(
        &s.addr,
        "/api/chat",
        &json!({"messages": msgs, "options": {"temperature": -2}}),
    );
    assert_eq!(status, 400, "{text}");
    // Ollama's error shape under /api/.
    assert!(v["error"]
        .as_str()
        .unwrap()
        .starts_with("options.temperature:"));
    // A streamed request whose prompt does not fit: a 400 before any event, not a 200 stream.
    let long = "word ".repeat(3000);
    let body = json!({"messages": [{"role": "user", "content": long}], "stream": true});
    let (status, v, text) = post(&s.addr, "/v1/chat/completions", &body);
    assert_eq!(status, 400, "{text}");
    assert!(v["error"]["message"].as_str().unwrap().contains("context"));
    let body = json!({"messages": [{"role": "user", "content": long}]});
    let (status, _, text) = post(&s.addr, "/api/chat", &body);
    assert_eq!(status, 400, "{text}");
}

#[test]
fn a_stream_cut_by_sigterm_ends_with_finish_reason_abort() {
    let s = start(&[]);
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = json!({"messages": [{"role": "user", "content": "Write a long story."}],
                      "max_tokens": 1000, "stream": true})
    .to_string();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).unwrap();
    raw.extend_from_slice(&buf[..n]);
    s.terminate();
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => raw.extend_from_slice(&buf[..k]),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("\"finish_reason\":\"abort\""), "{text}");
    assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
}

#[test]
fn sigterm_while_a_megabyte_prompt_is_tokenized_still_stops_the_server() {
    let mut s = start(&[]);
    let addr = s.addr.clone();
    let client = std::thread::spawn(move || {
        let word = "y".repeat(3 << 20);
        post(
            &addr,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": word}], "max_tokens": 4}),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    s.terminate();
    assert_eq!(s.exit_within(Duration::from_secs(10)), Some(0));
    let _ = client.join();
}

/// Resident memory of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn sixteen_clients_for_a_minute_leave_the_servers_memory_where_it_was() {
    let s = start(&["--parallel", "4"]);
    let pid = s.child.id();
    let stop_at = Instant::now() + Duration::from_secs(60);
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let addr = s.addr.clone();
            std::thread::spawn(move || {
                let mut served = 0;
                let mut k = 0usize;
                while Instant::now() < stop_at {
                    k += 1;
                    // Different prompts, lengths and kinds, some bad, some abandoned.
                    let prompt = format!("Client {i}, request {k}: {}", "tell me more. ".repeat(k % 7));
                    let (status, _) = match k % 5 {
                        0 => {
                            let body = json!({"messages": [{"role": "user", "content": prompt}],
                                              "max_tokens": 8, "stream": true});
                            http(&addr, "POST", "/v1/chat/completions", &[], &body.to_string())
                        }
                        1 => http(&addr, "POST", "/v1/chat/completions", &[], "{broken"),
                        2 => {
                            let mut c = TcpStream::connect(&addr).unwrap();
                            let body = json!({"messages": [{"role": "user", "content": prompt}],
                                              "max_tokens": 50, "stream": true})
                            .to_string();
                            let _ = write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                            let mut b = [0u8; 64];
                            let _ = c.read(&mut b);
                            (200, String::new())
                        }
                        3 => {
                            let body = json!({"prompt": prompt, "max_tokens": 6});
                            http(&addr, "POST", "/v1/completions", &[], &body.to_string())
                        }
                        _ => {
                            let body = json!({"messages": [{"role": "user", "content": prompt}],
                                              "stream": false, "options": {"num_predict": 6}});
                            http(&addr, "POST", "/api/chat", &[], &body.to_string())
                        }
                    };
                    if status == 200 {
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    // RSS once the server has warmed up, then every second.
    std::thread::sleep(Duration::from_secs(10));
    let warm = rss(pid);
    let mut highest = warm;
    while Instant::now() < stop_at {
        std::thread::sleep(Duration::from_secs(1));
        highest = highest.max(rss(pid));
    }
    let served: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let end = rss(pid);
    eprintln!(
        "soak: {served} requests answered; RSS after 10 s {} MiB, highest {} MiB, at the end {} MiB",
        warm >> 20,
        highest >> 20,
        end >> 20
    );
    assert!(served > 100, "{served}");
    assert!(
        end <= warm + warm / 5,
        "RSS grew from {warm} to {end} bytes"
    );
    // And it still answers.
    assert_eq!(http(&s.addr, "GET", "/health", &[], "").0, 200);
}

/// The official `anthropic` Python client (installed by .ci/run) against /v1/messages: a greedy
/// answer equals the chat completion of the same prompt, streamed or not, and a tool
/// conversation in Anthropic's shape (system, thinking and tool_use blocks, tool_result blocks)
/// makes exactly the prompt the OpenAI shape of the same conversation makes (its tokens).
#[test]
fn the_anthropic_client_gets_the_same_answers_and_prompts() {
    let qwen3 = common::real_template("Qwen-Qwen3-0.6B");
    let s = start(&["--chat-template", qwen3.to_str().unwrap()]);
    let prompt = "Name three rivers.";
    let v = common::json_output(
        std::process::Command::new("python3").args([
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tools/anthropic_client.py"
            ),
            &format!("http://{}", s.addr),
            prompt,
            data()
                .join("templates/tool-conversation.anthropic.json")
                .to_str()
                .unwrap(),
        ]),
    );
    let (status, chat, text) = post(
        &s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                "temperature": 0}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(v["text"], chat["choices"][0]["message"]["content"], "{v}");
    assert_eq!(v["streamed"], v["text"], "{v}");
    let want_stop = match chat["choices"][0]["finish_reason"].as_str() {
        Some("length") => "max_tokens",
        _ => "end_turn",
    };
    assert_eq!(v["stop_reason"], want_stop, "{v}");
    assert_eq!(v["streamed_stop_reason"], want_stop, "{v}");
    assert_eq!(
        v["tool_input_tokens"].as_u64().unwrap() as usize,
        conversation_tokens(&s.addr),
        "{v}"
    );
    // Errors in Anthropic's shape.
    let (status, err, text) = post(&s.addr, "/v1/messages", &json!({"messages": []}));
    assert_eq!(status, 400, "{text}");
    assert_eq!(err["type"], "error", "{text}");
    assert!(err["error"]["message"].is_string(), "{text}");
}

/// The official `openai` client's Responses API against /v1/responses: a greedy answer equals
/// the chat completion of the same prompt, whole and streamed (created, deltas, completed), and
/// a tool conversation as Responses items makes exactly the prompt of its chat shape.
#[test]
fn the_responses_api_gets_the_same_answers_and_prompts() {
    let qwen3 = common::real_template("Qwen-Qwen3-0.6B");
    let s = start(&["--chat-template", qwen3.to_str().unwrap()]);
    let prompt = "Name three rivers.";
    let v = common::json_output(
        std::process::Command::new("python3").args([
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tools/openai_responses.py"
            ),
            &format!("http://{}/v1", s.addr),
            prompt,
            data()
                .join("templates/tool-conversation.responses.json")
                .to_str()
                .unwrap(),
        ]),
    );
    let (status, chat, text) = post(
        &s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                "temperature": 0}),
    );
    assert_eq!(status, 200, "{text}");
    let answer = &chat["choices"][0]["message"]["content"];
    assert_eq!(&v["text"], answer, "{v}");
    assert_eq!(&v["streamed"], answer, "{v}");
    assert_eq!(&v["final_text"], answer, "{v}");
    let kinds: Vec<&str> = v["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"response.created"), "{v}");
    assert_eq!(kinds.last(), Some(&"response.completed"), "{v}");
    let want_status = match chat["choices"][0]["finish_reason"].as_str() {
        Some("length") => "incomplete",
        _ => "completed",
    };
    assert_eq!(v["status"], want_status, "{v}");
    assert_eq!(
        v["tool_input_tokens"].as_u64().unwrap() as usize,
        conversation_tokens(&s.addr),
        "{v}"
    );
    let (status, _, text) = post(
        &s.addr,
        "/v1/responses",
        &json!({"input": "hi", "previous_response_id": "resp_1"}),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("previous_response_id"), "{text}");
}
