//! Ollama's API: `/api/chat` and `/api/generate` (NDJSON streamed by default, or one object),
//! `/api/tags`, `/api/show`, `/api/ps` and `/api/version`. Errors take Ollama's shape
//! (`{"error": "..."}`, see the server's middleware).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::params::{ollama_format, reject_unsupported, OllamaOptions};
use super::worker::{Done, Event, Prompt};
use super::{
    bad, begin, collect, error, has_tools, messages, now, parse, split_calls, tools, App, Ask,
};
use crate::chat::template::Message;

#[derive(Deserialize)]
struct ChatRequest {
    messages: Value,
    #[serde(default)]
    stream: Option<bool>,
    /// true/false, or a level ("low", "medium", "high": on).
    #[serde(default)]
    think: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    options: OllamaOptions,
    /// "json" or a JSON schema: structured output.
    #[serde(default)]
    format: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The Ollama version whose API this follows (what clients check features against).
const OLLAMA_VERSION: &str = "0.12.0";

pub async fn version() -> Json<Value> {
    Json(json!({ "version": OLLAMA_VERSION }))
}

/// `details` of the model as Ollama lists it.
fn details(app: &App) -> Value {
    let info = &app.model.info;
    let quant = info
        .metadata
        .get("general.file_type")
        .and_then(Value::as_u64)
        .map_or("unknown".to_string(), |t| format!("file type {t}"));
    json!({
        "format": "gguf", "family": info.architecture, "families": [info.architecture],
        "parameter_size": format!("{:.1}B", info.parameters as f64 / 1e9),
        "quantization_level": quant,
    })
}

/// The loaded model (always loaded while the server runs).
pub async fn ps(State(app): State<Arc<App>>) -> Json<Value> {
    let info = &app.model.info;
    Json(json!({"models": [{
        "name": info.name, "model": info.name, "size": info.file_bytes,
        "details": details(&app), "context_length": info.n_ctx,
    }]}))
}

#[derive(Deserialize)]
struct ShowRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    verbose: bool,
}

/// The model's chat template (Jinja, as the GGUF or --chat-template gives it), its details and
/// its metadata (`model_info`).
pub async fn show(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req: ShowRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let info = &app.model.info;
    if let Some(m) = req
        .model
        .or(req.name)
        .filter(|m| !m.is_empty() && *m != info.name)
    {
        return error(
            StatusCode::NOT_FOUND,
            format!("model '{m}' not found (this server runs {})", info.name),
        );
    }
    let _ = req.verbose;
    Json(json!({
        "template": app.model.template.source(),
        "parameters": "",
        "details": details(&app),
        "model_info": info.metadata,
        "capabilities": ["completion", "tools"],
    }))
    .into_response()
}

pub async fn tags(State(app): State<Arc<App>>) -> Json<Value> {
    let info = &app.model.info;
    Json(json!({"models": [{
        "name": info.name, "model": info.name, "size": info.file_bytes,
        "details": {"format": "gguf"},
    }]}))
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

/// Ollama's `think`: a switch, or a level of effort (which turns thinking on).
fn think_of(v: Option<Value>) -> Result<Option<bool>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) if matches!(s.as_str(), "low" | "medium" | "high") => Ok(Some(true)),
        Some(other) => Err(format!(
            "think: {other} (true, false, \"low\", \"medium\" or \"high\")"
        )),
    }
}

/// An `/api/chat` request, checked (streamed unless `stream` is false, as in Ollama).
pub(super) fn read_chat(body: &Bytes) -> Result<Ask, String> {
    let req: ChatRequest = parse(body)?;
    reject_unsupported(&req.rest, &["model", "keep_alive"], "")?;
    let messages = messages(&req.messages)?;
    let with_tools = has_tools(&req.tools);
    let (max_tokens, mut sampling) = req.options.into_sampling()?.args("options.")?;
    sampling.grammar = ollama_format(req.format)?;
    Ok(Ask {
        n: 1,
        call: None,
        prompt: Prompt::Chat {
            messages,
            tools: req.tools,
            think: think_of(req.think)?,
        },
        max_tokens,
        sampling,
        stream: req.stream != Some(false),
        with_tools,
    })
}

/// An Ollama stream: one JSON object a line.
fn ndjson(lines: impl tokio_stream::Stream<Item = Value> + Send + 'static) -> Response {
    let body = lines.map(|v| Ok::<_, Infallible>(Bytes::from(format!("{v}\n"))));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// Tool calls as Ollama writes them (arguments as an object).
fn ollama_calls(calls: &[tools::ToolCall]) -> Value {
    calls
        .iter()
        .map(|t| json!({"function": {"name": t.name, "arguments": t.arguments}}))
        .collect::<Vec<_>>()
        .into()
}

pub async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let (rx, stream, with_tools) = match begin(&app, &body, read_chat).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let model = app.model.info.name.clone();
    let done_line = move |d: &Done, message: Value| {
        json!({
            "model": model, "created_at": now_rfc3339(), "message": message, "done": true,
            "done_reason": d.finish_reason, "prompt_eval_count": d.prompt_tokens,
            "eval_count": d.completion_tokens,
        })
    };
    if !stream {
        return match collect(rx).await {
            Ok(c) => {
                let (text, calls) = split_calls(c.text, with_tools);
                let mut message = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    message["tool_calls"] = ollama_calls(&calls);
                }
                if !c.reasoning.is_empty() {
                    message["thinking"] = c.reasoning.into();
                }
                Json(done_line(&c.done, message)).into_response()
            }
            Err(e) => e,
        };
    }
    let name = app.model.info.name.clone();
    // With tools, answer text is held back from where a call may begin; the calls come in the
    // last line, parsed as in a whole reply.
    let mut hold = with_tools.then(tools::Holdback::default);
    let lines = UnboundedReceiverStream::new(rx).filter_map(move |ev| {
        let line = |message: Value| {
            json!({"model": name, "created_at": now_rfc3339(), "message": message, "done": false})
        };
        let v = match ev {
            Event::Started | Event::Logprobs(_) => return None,
            Event::Piece {
                reasoning: true,
                text,
            } => line(json!({"role": "assistant", "content": "", "thinking": text})),
            Event::Piece { text, .. } => {
                let text = match &mut hold {
                    Some(h) => h.push(&text),
                    None => text,
                };
                if text.is_empty() {
                    return None;
                }
                line(json!({"role": "assistant", "content": text}))
            }
            Event::Done(d) => {
                let mut message = json!({"role": "assistant", "content": ""});
                if let Some(h) = hold.take() {
                    let (rest, calls) = h.finish();
                    message["content"] = rest.into();
                    if !calls.is_empty() {
                        message["tool_calls"] = ollama_calls(&calls);
                    }
                }
                done_line(&d, message)
            }
            Event::Error { message, .. } => json!({"error": message}),
        };
        Some(v)
    });
    ndjson(lines)
}

#[derive(Deserialize)]
struct GenerateRequest {
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    /// The prompt as it is, without the chat template.
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    think: Option<Value>,
    /// Ollama's Go template in place of the model's: only empty (the model's Jinja template).
    #[serde(default)]
    template: Option<String>,
    /// Tokens of an earlier /api/generate to continue: only empty.
    #[serde(default)]
    context: Option<Vec<i64>>,
    #[serde(default)]
    options: OllamaOptions,
    #[serde(default)]
    format: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// An `/api/generate` request, checked: `prompt` as one user turn (after `system`) through the
/// chat template, or as it is with `raw`.
pub(super) fn read_generate(body: &Bytes) -> Result<Ask, String> {
    let req: GenerateRequest = parse(body)?;
    reject_unsupported(&req.rest, &["model", "keep_alive"], "")?;
    if req.template.as_deref().is_some_and(|t| !t.is_empty()) {
        return Err("template: only the model's own chat template is used (leave it empty)".into());
    }
    if req.context.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err("context: continuing earlier tokens is not supported (send the conversation to /api/chat)".into());
    }
    if req.prompt.is_empty() {
        return Err("prompt must not be empty".into());
    }
    let (max_tokens, mut sampling) = req.options.into_sampling()?.args("options.")?;
    sampling.grammar = ollama_format(req.format)?;
    let prompt = if req.raw {
        Prompt::Text(req.prompt)
    } else {
        let mut turns = Vec::new();
        if let Some(s) = req.system.filter(|s| !s.is_empty()) {
            turns.push(Message::new("system", &s));
        }
        turns.push(Message::new("user", &req.prompt));
        Prompt::Chat {
            messages: turns,
            tools: None,
            think: think_of(req.think)?,
        }
    };
    Ok(Ask {
        n: 1,
        call: None,
        prompt,
        max_tokens,
        sampling,
        stream: req.stream != Some(false),
        with_tools: false,
    })
}

pub async fn generate(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let (rx, stream, _) = match begin(&app, &body, read_generate).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let model = app.model.info.name.clone();
    let done_line = move |d: &Done, response: &str, thinking: &str| {
        let mut v = json!({
            "model": model, "created_at": now_rfc3339(), "response": response, "done": true,
            "done_reason": d.finish_reason, "prompt_eval_count": d.prompt_tokens,
            "eval_count": d.completion_tokens,
        });
        if !thinking.is_empty() {
            v["thinking"] = thinking.into();
        }
        v
    };
    if !stream {
        return match collect(rx).await {
            Ok(c) => Json(done_line(&c.done, &c.text, &c.reasoning)).into_response(),
            Err(e) => e,
        };
    }
    let name = app.model.info.name.clone();
    let lines = UnboundedReceiverStream::new(rx).filter_map(move |ev| {
        let v = match ev {
            Event::Started | Event::Logprobs(_) => return None,
            Event::Piece { reasoning, text } => {
                let field = if reasoning { "thinking" } else { "response" };
                let mut v = json!({"model": name, "created_at": now_rfc3339(), "response": "", "done": false});
                v[field] = text.into();
                v
            }
            Event::Done(d) => done_line(&d, "", ""),
            Event::Error { message, .. } => json!({"error": message}),
        };
        Some(v)
    });
    ndjson(lines)
}
