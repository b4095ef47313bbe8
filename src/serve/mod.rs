//! `ggrun serve`: an OpenAI- and Ollama-compatible HTTP API on axum. Handlers parse and check
//! requests (OpenAI-style error objects on bad input), hand jobs to the inference thread
//! (`worker`), and turn its events into JSON responses, server-sent events (OpenAI streams) or
//! NDJSON (Ollama streams). A client that goes away drops its event receiver, which stops its
//! generation at the next token. Requests are served one at a time in arrival order.

mod tools;
mod worker;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::chat::template::Message;
use crate::cli::common::{ModelArgs, SamplingArgs};
use worker::{Done, Event, Job, Jobs, ModelInfo, Prompt};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences served at once (slots, each with its own state of -c tokens): their decode
    /// steps run batched, one pass over the weights for all; more requests wait in order.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub parallel: usize,
    /// Every request must carry `Authorization: Bearer KEY`.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long = "max-body", default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Snapshot the state every N prompt tokens of a long prefill (0: only at prompt ends), so
    /// later prompts sharing that start resume there.
    #[arg(long = "snapshot-every", default_value_t = 1024)]
    pub snapshot_every: usize,
    /// Snapshots kept (0: none; the state itself is still reused when a prompt extends it).
    #[arg(long = "snapshots", default_value_t = 4)]
    pub snapshots: usize,
}

struct App {
    jobs: Jobs,
    info: ModelInfo,
    api_key: Option<String>,
}

/// Runs the server until SIGINT or SIGTERM (the job in progress stops after its current token).
pub fn run(a: ServeArgs) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let slots = worker::Slots {
        parallel: a.parallel,
        snapshot_every: a.snapshot_every,
        snapshots: a.snapshots,
    };
    let info = worker::spawn(a.model, slots, rx)?;
    let app = Arc::new(App {
        jobs: Arc::new(Mutex::new(tx)),
        info,
        api_key: a.api_key,
    });
    let router = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/api/tags", get(tags))
        .route("/api/chat", post(ollama_chat))
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .layer(DefaultBodyLimit::max(a.max_body))
        .with_state(app);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // A name (localhost) or an address; names resolve as the system does.
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| anyhow!("cannot listen on {}:{}: {e}", a.host, a.port))?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| anyhow!("server: {e}"))
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    worker::SHUTDOWN.store(true, Ordering::SeqCst);
    eprintln!("shutting down");
}

/// An OpenAI-style error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| k == key);
        if !ok {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer KEY)",
            );
        }
    }
    next.run(req).await
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Now as RFC 3339 in UTC (Ollama's `created_at`).
fn now_rfc3339() -> String {
    let s = now();
    let (days, rem) = ((s / 86_400) as i64, s % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.info.name, "object": "model", "created": 0, "owned_by": "ggrun",
                  "meta": {"n_ctx": app.info.n_ctx}}],
    }))
}

async fn tags(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"models": [{
        "name": app.info.name, "model": app.info.name, "size": app.info.file_bytes,
        "details": {"format": "gguf"},
    }]}))
}

/// A stop field: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn list(s: Option<Stop>) -> Vec<String> {
        match s {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

/// Sampling and limits shared by the OpenAI request kinds.
#[derive(Deserialize, Default)]
struct Sampling {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
}

impl Sampling {
    fn args(self) -> (Option<usize>, SamplingArgs) {
        let max = self.max_completion_tokens.or(self.max_tokens);
        let a = SamplingArgs {
            temp: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: 1.0,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repeat_last_n: 64,
            seed: self.seed,
            stop: Stop::list(self.stop),
        };
        (max, a)
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    /// Read by [`Message::list_from_api`].
    messages: Value,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Option<Value>,
    /// "none" turns thinking off; any other effort turns it on.
    #[serde(default)]
    reasoning_effort: Option<String>,
    /// Our own and Ollama's switch.
    #[serde(default)]
    think: Option<bool>,
    #[serde(default)]
    chat_template_kwargs: Option<Value>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: String,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    sampling: Sampling,
}

/// The body as `T`, or a 400 that says what is wrong with it.
// axum's Response is the natural error of a handler step (built once per request).
#[allow(clippy::result_large_err)]
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

// axum's Response is the natural error of a handler step (built once per request).
#[allow(clippy::result_large_err)]
fn messages(m: &Value) -> Result<Vec<Message>, Response> {
    let m = Message::list_from_api(m, "messages").map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    if m.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "messages must not be empty"));
    }
    Ok(m)
}

impl ChatRequest {
    fn think(&self) -> Option<bool> {
        let kw = self
            .chat_template_kwargs
            .as_ref()
            .and_then(|k| k.get("enable_thinking"))
            .and_then(Value::as_bool);
        let effort = self.reasoning_effort.as_deref().map(|e| e != "none");
        self.think.or(kw).or(effort)
    }
}

/// Queues a job; the receiver of its events.
// axum's Response is the natural error of a handler step (built once per request).
#[allow(clippy::result_large_err)]
fn submit(
    app: &App,
    prompt: Prompt,
    sampling: Sampling,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, Response> {
    let (max_tokens, sampling) = sampling.args();
    let (events, rx) = worker::channel();
    let job = Job {
        prompt,
        max_tokens,
        sampling,
        events,
    };
    let jobs = app.jobs.lock().unwrap_or_else(|e| e.into_inner());
    jobs.send(job).map_err(|_| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model worker has stopped",
        )
    })?;
    Ok(rx)
}

/// Whether a request offers tools (a non-empty list).
fn has_tools(tools: &Option<Value>) -> bool {
    tools
        .as_ref()
        .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
}

/// A whole answer's text and the tool calls in it (none looked for without tools).
fn split_calls(text: String, with_tools: bool) -> (String, Vec<tools::ToolCall>) {
    if with_tools {
        tools::parse(&text)
    } else {
        (text, Vec::new())
    }
}

/// Everything a job produced, for non-streaming answers.
struct Collected {
    text: String,
    reasoning: String,
    done: Done,
}

async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<Collected, Response> {
    let (mut text, mut reasoning) = (String::new(), String::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Piece {
                reasoning: true,
                text: t,
            } => reasoning.push_str(&t),
            Event::Piece { text: t, .. } => text.push_str(&t),
            Event::Done(done) => {
                return Ok(Collected {
                    text,
                    reasoning,
                    done,
                })
            }
            Event::Error { status, message } => {
                let s = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Err(error(s, message));
            }
        }
    }
    Err(error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the model worker stopped",
    ))
}

fn usage(d: &Done) -> Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": d.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": d.reasoning_tokens},
        // llama.cpp server's timing fields: the prompt's new tokens and the generated ones.
        "timings": {
            "prompt_n": d.prompt_tokens - d.cached_tokens,
            "prompt_ms": d.prompt_secs * 1e3,
            "predicted_n": d.completion_tokens,
            "predicted_ms": d.generate_secs * 1e3,
        },
    })
}

fn id(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{n:x}")
}

async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let think = req.think();
    let msgs = match messages(&req.messages) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let with_tools = has_tools(&req.tools);
    let prompt = Prompt::Chat {
        messages: msgs,
        tools: req.tools,
        think,
    };
    let rx = match submit(&app, prompt, req.sampling) {
        Ok(rx) => rx,
        Err(e) => return e,
    };
    let (cid, model, created) = (id("chatcmpl"), app.info.name.clone(), now());
    if !req.stream {
        return match collect(rx).await {
            Ok(c) => {
                let (text, calls) = split_calls(c.text, with_tools);
                let mut message = json!({"role": "assistant", "content": text});
                let mut finish = c.done.finish_reason;
                if !calls.is_empty() {
                    let v: Vec<Value> = calls
                        .iter()
                        .enumerate()
                        .map(|(i, t)| t.to_openai(i, &cid))
                        .collect();
                    message["tool_calls"] = v.into();
                    if text.is_empty() {
                        message["content"] = Value::Null;
                    }
                    finish = "tool_calls";
                }
                if !c.reasoning.is_empty() {
                    message["reasoning_content"] = c.reasoning.into();
                }
                Json(json!({
                    "id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage(&c.done),
                }))
                .into_response()
            }
            Err(e) => e,
        };
    }
    let chunk = move |delta: Value, finish: Option<&str>, usage: Option<Value>| {
        let mut v = json!({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None, None);
    // With tools, answer text is held back from where a call may begin.
    let mut hold = with_tools.then(tools::Holdback::default);
    let call_id = id("call");
    let events = UnboundedReceiverStream::new(rx).map(move |ev| {
        Ok::<_, Infallible>(match ev {
            Event::Piece {
                reasoning: true,
                text,
            } => chunk(json!({"reasoning_content": text}), None, None),
            Event::Piece { text, .. } => match &mut hold {
                Some(h) => chunk(json!({"content": h.push(&text)}), None, None),
                None => chunk(json!({"content": text}), None, None),
            },
            Event::Done(d) => {
                let mut delta = json!({});
                let mut finish = d.finish_reason;
                if let Some(h) = hold.take() {
                    let (rest, calls) = h.finish();
                    if !rest.is_empty() {
                        delta["content"] = rest.into();
                    }
                    if !calls.is_empty() {
                        let v: Vec<Value> = calls
                            .iter()
                            .enumerate()
                            .map(|(i, t)| t.to_openai(i, &call_id))
                            .collect();
                        delta["tool_calls"] = v.into();
                        finish = "tool_calls";
                    }
                }
                chunk(delta, Some(finish), Some(usage(&d)))
            }
            Event::Error { message, .. } => SseEvent::default()
                .data(json!({"error": {"message": message, "type": "server_error"}}).to_string()),
        })
    });
    let stream = tokio_stream::once(Ok(first))
        .chain(events)
        .chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(stream).into_response()
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if req.prompt.is_empty() {
        return error(StatusCode::BAD_REQUEST, "prompt must not be empty");
    }
    let rx = match submit(&app, Prompt::Text(req.prompt), req.sampling) {
        Ok(rx) => rx,
        Err(e) => return e,
    };
    let (cid, model, created) = (id("cmpl"), app.info.name.clone(), now());
    if !req.stream {
        return match collect(rx).await {
            Ok(c) => Json(json!({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": c.text, "finish_reason": c.done.finish_reason}],
                "usage": usage(&c.done),
            }))
            .into_response(),
            Err(e) => e,
        };
    }
    let events = UnboundedReceiverStream::new(rx).map(move |ev| {
        let v = match ev {
            Event::Piece { text, .. } => json!({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": null}],
            }),
            Event::Done(d) => json!({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": "", "finish_reason": d.finish_reason}],
                "usage": usage(&d),
            }),
            Event::Error { message, .. } => {
                json!({"error": {"message": message, "type": "server_error"}})
            }
        };
        Ok::<_, Infallible>(SseEvent::default().data(v.to_string()))
    });
    let stream = events.chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(stream).into_response()
}

#[derive(Deserialize, Default)]
struct OllamaOptions {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    seed: Option<u64>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct OllamaChat {
    messages: Value,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    think: Option<bool>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    options: OllamaOptions,
}

async fn ollama_chat(State(app): State<Arc<App>>, _headers: HeaderMap, body: Bytes) -> Response {
    let req: OllamaChat = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let msgs = match messages(&req.messages) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let o = req.options;
    let sampling = Sampling {
        max_tokens: o.num_predict.filter(|n| *n >= 0).map(|n| n as usize),
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k,
        min_p: o.min_p,
        seed: o.seed,
        stop: o.stop.map(Stop::Many),
        ..Default::default()
    };
    let with_tools = has_tools(&req.tools);
    let prompt = Prompt::Chat {
        messages: msgs,
        tools: req.tools,
        think: req.think,
    };
    let rx = match submit(&app, prompt, sampling) {
        Ok(rx) => rx,
        Err(e) => return e,
    };
    let model = app.info.name.clone();
    let done_line = move |d: &Done, message: Value| {
        json!({
            "model": model, "created_at": now_rfc3339(), "message": message, "done": true,
            "done_reason": d.finish_reason, "prompt_eval_count": d.prompt_tokens,
            "eval_count": d.completion_tokens,
        })
    };
    if req.stream == Some(false) {
        return match collect(rx).await {
            Ok(c) => {
                let (text, calls) = split_calls(c.text, with_tools);
                let mut message = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    let v: Vec<Value> = calls
                        .iter()
                        .map(|t| json!({"function": {"name": t.name, "arguments": t.arguments}}))
                        .collect();
                    message["tool_calls"] = v.into();
                }
                if !c.reasoning.is_empty() {
                    message["thinking"] = c.reasoning.into();
                }
                Json(done_line(&c.done, message)).into_response()
            }
            Err(e) => e,
        };
    }
    let name = app.info.name.clone();
    let lines = UnboundedReceiverStream::new(rx).map(move |ev| {
        let v = match ev {
            Event::Piece { reasoning, text } => {
                let field = if reasoning { "thinking" } else { "content" };
                json!({"model": name, "created_at": now_rfc3339(), "message": {"role": "assistant", field: text}, "done": false})
            }
            Event::Done(d) => done_line(&d, json!({"role": "assistant", "content": ""})),
            Event::Error { message, .. } => json!({"error": message}),
        };
        Ok::<_, Infallible>(Bytes::from(format!("{v}\n")))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}
