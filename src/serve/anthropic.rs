//! Anthropic's Messages API (`POST /v1/messages`, what Claude Code and the `anthropic` client
//! speak): the system prompt, content blocks (text, thinking, tool_use, tool_result) and tools
//! map onto the same messages the chat template reads, without losing a field; the reply is a
//! message of content blocks (thinking, text, tool_use), whole or as Anthropic's stream of
//! server-sent events. Errors take Anthropic's shape (see the server's middleware).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::params::{reject_unsupported, Sampling, Stop};
use super::worker::{Done, Event, Prompt};
use super::{
    begin, collect, has_tools, id, messages, parse, split_calls, think_for, tool_choice, tools,
    App, Ask,
};

/// Fields of Anthropic requests that change nothing in what is generated here (bookkeeping,
/// prompt-caching hints, routing): accepted and ignored.
const IGNORED: [&str; 8] = [
    "model",
    "metadata",
    "service_tier",
    "cache_control",
    "inference_geo",
    "speed",
    "user_profile_id",
    "workspace_id",
];

#[derive(Deserialize)]
struct MessagesRequest {
    messages: Value,
    max_tokens: i64,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    thinking: Option<Value>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The text of a content field: a string, or the text of its text blocks.
fn text_of(content: &Value, at: &str) -> Result<String, String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (i, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => out.push_str(b["text"].as_str().unwrap_or("")),
                    other => {
                        return Err(format!("{at}[{i}].type: {other:?} where only text is read"))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(format!("{at}: expected a string or a list of text blocks")),
    }
}

/// Anthropic's system prompt and messages as OpenAI-shaped messages (which
/// [`crate::chat::template::Message::list_from_api`] reads): tool_use blocks become an
/// assistant's tool_calls, thinking its reasoning_content, each tool_result a tool message.
fn openai_messages(system: Option<&Value>, msgs: &Value) -> Result<Value, String> {
    let mut out = Vec::new();
    if let Some(s) = system {
        let text = text_of(s, "system")?;
        if !text.is_empty() {
            out.push(json!({"role": "system", "content": text}));
        }
    }
    let Value::Array(items) = msgs else {
        return Err("messages: expected a list of messages".into());
    };
    for (i, m) in items.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(format!("{at}.role: {role:?} (user or assistant)"));
        }
        let blocks = match &m["content"] {
            Value::String(s) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            Value::Array(b) => b,
            _ => return Err(format!("{at}.content: expected a string or content blocks")),
        };
        let (mut parts, mut calls, mut thinking) = (Vec::new(), Vec::new(), String::new());
        for (j, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content[{j}]");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => parts.push(json!({"type": "text", "text": b["text"]})),
                Some("thinking") if role == "assistant" => {
                    thinking.push_str(b["thinking"].as_str().unwrap_or(""))
                }
                Some("redacted_thinking") => {}
                Some("tool_use") if role == "assistant" => calls.push(json!({
                    "id": b["id"], "type": "function",
                    "function": {"name": b["name"], "arguments": b["input"].to_string()},
                })),
                Some("tool_result") if role == "user" => {
                    let content = text_of(&b["content"], &format!("{bat}.content"))?;
                    out.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"],
                                    "content": content}));
                }
                other => {
                    return Err(format!(
                        "{bat}.type: {other:?} is not read in a {role} turn"
                    ))
                }
            }
        }
        if parts.is_empty() && calls.is_empty() && thinking.is_empty() {
            continue;
        }
        let mut msg = json!({"role": role, "content": if parts.is_empty() { Value::Null } else { Value::Array(parts) }});
        if !calls.is_empty() {
            msg["tool_calls"] = calls.into();
        }
        if !thinking.is_empty() {
            msg["reasoning_content"] = thinking.into();
        }
        out.push(msg);
    }
    Ok(out.into())
}

/// Anthropic's tools (name, description, input_schema) as OpenAI's.
fn openai_tools(tools: Option<Value>) -> Result<Option<Value>, String> {
    let Some(Value::Array(list)) = tools else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or(format!("tools[{i}].name: missing"))?;
        out.push(json!({"type": "function", "function": {
            "name": name, "description": t.get("description").cloned().unwrap_or(Value::Null),
            "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
        }}));
    }
    Ok(Some(out.into()))
}

/// A `/v1/messages` request, checked.
pub(super) fn read_messages(body: &Bytes) -> Result<Ask, String> {
    let req: MessagesRequest = parse(body)?;
    reject_unsupported(&req.rest, &IGNORED, "")?;
    let (call, offer) = tool_choice(req.tool_choice.as_ref())?;
    let think = match req
        .thinking
        .as_ref()
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
    {
        None => None,
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(other) => return Err(format!("thinking.type: {other:?} (enabled or disabled)")),
    };
    let msgs = messages(&openai_messages(req.system.as_ref(), &req.messages)?)?;
    let tools = openai_tools(req.tools)?.filter(|_| offer);
    let with_tools = has_tools(&tools);
    let think = think_for(&call, think)?;
    let sampling = Sampling {
        max_tokens: Some(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop: req.stop_sequences.map(Stop::Many),
        ..Default::default()
    };
    let (max_tokens, sampling) = sampling.args("")?;
    Ok(Ask {
        n: 1,
        call,
        prompt: Prompt::Chat {
            messages: msgs,
            tools,
            think,
        },
        max_tokens,
        sampling,
        stream: req.stream,
        with_tools,
    })
}

fn stop_reason(d: &Done, called: bool) -> &'static str {
    if called {
        return "tool_use";
    }
    match d.finish_reason {
        "length" => "max_tokens",
        _ => "end_turn",
    }
}

fn usage(d: &Done) -> Value {
    json!({"input_tokens": d.prompt_tokens, "output_tokens": d.completion_tokens,
           "cache_read_input_tokens": d.cached_tokens})
}

pub async fn messages_endpoint(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let (rx, stream, with_tools) = match begin(&app, &body, read_messages).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (mid, model) = (id("msg"), app.model.info.name.clone());
    if !stream {
        return match collect(rx).await {
            Ok(c) => {
                let (text, calls) = split_calls(c.text, with_tools);
                let mut content = Vec::new();
                if !c.reasoning.is_empty() {
                    content.push(
                        json!({"type": "thinking", "thinking": c.reasoning, "signature": ""}),
                    );
                }
                if !text.is_empty() || calls.is_empty() {
                    content.push(json!({"type": "text", "text": text}));
                }
                for (i, t) in calls.iter().enumerate() {
                    content.push(json!({"type": "tool_use", "id": format!("toolu_{mid}_{i}"),
                                        "name": t.name, "input": t.arguments}));
                }
                Json(json!({
                    "id": mid, "type": "message", "role": "assistant", "model": model,
                    "content": content, "stop_reason": stop_reason(&c.done, !calls.is_empty()),
                    "stop_sequence": null, "usage": usage(&c.done),
                }))
                .into_response()
            }
            Err(e) => e,
        };
    }
    let event = |name: &str, v: Value| SseEvent::default().event(name).data(v.to_string());
    let start = event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0}}}),
    );
    let mut blocks = Blocks::default();
    let mut hold = with_tools.then(tools::Holdback::default);
    let call_id = format!("toolu_{mid}");
    // Each event of the job becomes zero or more SSE events, sent on by a task (a client
    // that goes away drops the stream, which stops the task and so the job).
    let (tx, events) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    let mut rx = rx;
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let mut out = Vec::new();
            match ev {
                Event::Started | Event::Logprobs(_) => {}
                Event::Piece {
                    reasoning: true,
                    text,
                } => blocks.delta(&mut out, "thinking", &text),
                Event::Piece { text, .. } => {
                    let text = match &mut hold {
                        Some(h) => h.push(&text),
                        None => text,
                    };
                    if !text.is_empty() {
                        blocks.delta(&mut out, "text", &text);
                    }
                }
                Event::Done(d) => {
                    let mut calls = Vec::new();
                    if let Some(h) = hold.take() {
                        let (rest, c) = h.finish();
                        if !rest.is_empty() {
                            blocks.delta(&mut out, "text", &rest);
                        }
                        calls = c;
                    }
                    for (i, t) in calls.iter().enumerate() {
                        blocks.tool_use(&mut out, &format!("{call_id}_{i}"), t);
                    }
                    blocks.close(&mut out);
                    out.push(event(
                        "message_delta",
                        json!({"type": "message_delta",
                               "delta": {"stop_reason": stop_reason(&d, !calls.is_empty()),
                                         "stop_sequence": null},
                               "usage": usage(&d)}),
                    ));
                    out.push(event("message_stop", json!({"type": "message_stop"})));
                }
                Event::Error { message, .. } => out.push(event(
                    "error",
                    json!({"type": "error", "error": {"type": "api_error", "message": message}}),
                )),
            }
            for e in out {
                if tx.send(Ok(e)).is_err() {
                    return;
                }
            }
        }
    });
    let events = UnboundedReceiverStream::new(events);
    Sse::new(tokio_stream::once(Ok(start)).chain(events)).into_response()
}

/// The content blocks of a streamed message: which is open and the next index.
#[derive(Default)]
struct Blocks {
    open: Option<&'static str>,
    next: usize,
}

impl Blocks {
    fn event(name: &str, v: Value) -> SseEvent {
        SseEvent::default().event(name).data(v.to_string())
    }

    /// Text of `kind` ("text" or "thinking"), in the open block of that kind or a new one.
    fn delta(&mut self, out: &mut Vec<SseEvent>, kind: &'static str, text: &str) {
        if self.open != Some(kind) {
            self.close(out);
            let block = if kind == "text" {
                json!({"type": "text", "text": ""})
            } else {
                json!({"type": "thinking", "thinking": "", "signature": ""})
            };
            out.push(Self::event(
                "content_block_start",
                json!({"type": "content_block_start", "index": self.next, "content_block": block}),
            ));
            self.open = Some(kind);
        }
        let delta = if kind == "text" {
            json!({"type": "text_delta", "text": text})
        } else {
            json!({"type": "thinking_delta", "thinking": text})
        };
        out.push(Self::event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.next, "delta": delta}),
        ));
    }

    /// A whole tool_use block.
    fn tool_use(&mut self, out: &mut Vec<SseEvent>, id: &str, call: &tools::ToolCall) {
        self.close(out);
        out.push(Self::event(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.next,
                   "content_block": {"type": "tool_use", "id": id, "name": call.name,
                                     "input": {}}}),
        ));
        out.push(Self::event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.next,
                   "delta": {"type": "input_json_delta",
                             "partial_json": call.arguments.to_string()}}),
        ));
        self.open = Some("tool_use");
        self.close(out);
    }

    fn close(&mut self, out: &mut Vec<SseEvent>) {
        if self.open.take().is_some() {
            out.push(Self::event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.next}),
            ));
            self.next += 1;
        }
    }
}
