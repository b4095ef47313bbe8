//! Ollama's `/api/chat` (NDJSON streamed by default, or one object) and `/api/tags`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::params::OllamaOptions;
use super::worker::{Done, Event, Prompt};
use super::{begin, collect, error, has_tools, messages, now, parse, split_calls, App, Ask};

#[derive(Deserialize)]
struct ChatRequest {
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

/// An `/api/chat` request, checked (streamed unless `stream` is false, as in Ollama).
pub(super) fn read_chat(body: &Bytes) -> Result<Ask, String> {
    let req: ChatRequest = parse(body)?;
    let messages = messages(&req.messages)?;
    let with_tools = has_tools(&req.tools);
    let (max_tokens, sampling) = req.options.into_sampling().args("options.")?;
    Ok(Ask {
        prompt: Prompt::Chat {
            messages,
            tools: req.tools,
            think: req.think,
        },
        max_tokens,
        sampling,
        stream: req.stream != Some(false),
        with_tools,
    })
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
    let name = app.model.info.name.clone();
    let lines = UnboundedReceiverStream::new(rx).filter_map(move |ev| {
        let v = match ev {
            Event::Started => return None,
            Event::Piece { reasoning, text } => {
                let field = if reasoning { "thinking" } else { "content" };
                json!({"model": name, "created_at": now_rfc3339(), "message": {"role": "assistant", field: text}, "done": false})
            }
            Event::Done(d) => done_line(&d, json!({"role": "assistant", "content": ""})),
            Event::Error { message, .. } => json!({"error": message}),
        };
        Some(Ok::<_, Infallible>(Bytes::from(format!("{v}\n"))))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}
