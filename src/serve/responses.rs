//! OpenAI's Responses API (`POST /v1/responses`, the default of openai-agents and Codex):
//! `instructions` and input items (messages, function_call, function_call_output, reasoning)
//! map onto the same messages the chat template reads; the reply is a response of output
//! items (reasoning, message, function_call), whole or as the API's stream of typed events.
//! Stateless: `previous_response_id` is refused (send the items again).

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

use super::params::{reject_unsupported, Sampling, OPENAI_IGNORED};
use super::worker::{Done, Event, Prompt};
use super::{
    begin, collect, has_tools, id, messages, now, parse, split_calls, think_for, tool_choice,
    tools, App, Ask,
};

#[derive(Deserialize)]
struct ResponsesRequest {
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    reasoning: Option<Value>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", "schema": ...}}`.
    #[serde(default)]
    text: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Fields beside OpenAI's usual no-ops that change nothing here.
const IGNORED: [&str; 3] = ["truncation", "include", "background"];

/// The text of a message item's content: a string, or its input_text / output_text parts.
fn text_of(content: &Value, at: &str) -> Result<String, String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        out.push_str(p["text"].as_str().unwrap_or(""))
                    }
                    other => return Err(format!("{at}[{i}].type: {other:?} is not read here")),
                }
            }
            Ok(out)
        }
        _ => Err(format!("{at}: expected a string or content parts")),
    }
}

/// `instructions` and the input items as OpenAI chat messages: consecutive function calls and
/// reasoning join the assistant turn they belong to; outputs become tool messages.
fn chat_messages(instructions: Option<&str>, input: &Value) -> Result<Value, String> {
    let mut out: Vec<Value> = Vec::new();
    if let Some(s) = instructions.filter(|s| !s.is_empty()) {
        out.push(json!({"role": "system", "content": s}));
    }
    let items = match input {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(out.into());
        }
        Value::Array(items) => items,
        _ => return Err("input: expected a string or a list of items".into()),
    };
    // The assistant turn being built from reasoning / message / function_call items.
    let mut turn: Option<Value> = None;
    let flush = |turn: &mut Option<Value>, out: &mut Vec<Value>| {
        if let Some(t) = turn.take() {
            out.push(t);
        }
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                let text = text_of(&item["content"], &format!("{at}.content"))?;
                match role {
                    "assistant" => {
                        let t =
                            turn.get_or_insert_with(|| json!({"role": "assistant", "content": ""}));
                        let had = t["content"].as_str().unwrap_or("").to_string();
                        t["content"] = (had + &text).into();
                    }
                    "user" | "system" | "developer" => {
                        flush(&mut turn, &mut out);
                        let role = if role == "user" { "user" } else { "system" };
                        out.push(json!({"role": role, "content": text}));
                    }
                    other => return Err(format!("{at}.role: {other:?}")),
                }
            }
            "reasoning" => {
                let mut text = String::new();
                for field in ["summary", "content"] {
                    if let Some(Value::Array(parts)) = item.get(field) {
                        for p in parts {
                            text.push_str(p["text"].as_str().unwrap_or(""));
                        }
                    }
                }
                let t = turn.get_or_insert_with(|| json!({"role": "assistant", "content": ""}));
                let had = t["reasoning_content"].as_str().unwrap_or("").to_string();
                t["reasoning_content"] = (had + &text).into();
            }
            "function_call" => {
                let t = turn.get_or_insert_with(|| json!({"role": "assistant", "content": ""}));
                let call = json!({"id": item["call_id"], "type": "function",
                                  "function": {"name": item["name"], "arguments": item["arguments"]}});
                match t.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    Some(calls) => calls.push(call),
                    None => t["tool_calls"] = json!([call]),
                }
            }
            "function_call_output" => {
                flush(&mut turn, &mut out);
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    other => text_of(other, &format!("{at}.output"))?,
                };
                out.push(
                    json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}),
                );
            }
            other => return Err(format!("{at}.type: {other:?} is not read here")),
        }
    }
    flush(&mut turn, &mut out);
    Ok(out.into())
}

/// The Responses API's function tools (flat: name, description, parameters) as chat tools.
fn chat_tools(tools: Option<Value>) -> Result<Option<Value>, String> {
    let Some(Value::Array(list)) = tools else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(format!(
                "tools[{i}].type: {:?} (only function tools are served)",
                t.get("type")
            ));
        }
        out.push(json!({"type": "function", "function": {
            "name": t["name"], "description": t.get("description").cloned().unwrap_or(Value::Null),
            "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
        }}));
    }
    Ok(Some(out.into()))
}

/// A `/v1/responses` request, checked.
pub(super) fn read_responses(body: &Bytes) -> Result<Ask, String> {
    let req: ResponsesRequest = parse(body)?;
    let ignored: Vec<&str> = OPENAI_IGNORED.iter().chain(&IGNORED).copied().collect();
    reject_unsupported(&req.rest, &ignored, "")?;
    let (call, offer) = tool_choice(req.tool_choice.as_ref())?;
    let think = req
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str)
        .map(|e| e != "none" && e != "minimal");
    let response_format = match req.text.as_ref().and_then(|t| t.get("format")) {
        None => None,
        Some(f) if f.get("type").and_then(Value::as_str) == Some("json_schema") => Some(json!({
            "type": "json_schema", "json_schema": {"schema": f.get("schema").cloned().unwrap_or(json!({}))}
        })),
        Some(f) => Some(f.clone()),
    };
    let msgs = messages(&chat_messages(req.instructions.as_deref(), &req.input)?)?;
    let tools = chat_tools(req.tools)?.filter(|_| offer);
    let with_tools = has_tools(&tools);
    let think = think_for(&call, think)?;
    let sampling = Sampling {
        max_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        response_format,
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

fn usage(d: &Done) -> Value {
    json!({
        "input_tokens": d.prompt_tokens, "output_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
        "input_tokens_details": {"cached_tokens": d.cached_tokens},
        "output_tokens_details": {"reasoning_tokens": d.reasoning_tokens},
    })
}

/// The response object around `output` items.
fn response(
    rid: &str,
    model: &str,
    created: u64,
    output: Vec<Value>,
    done: Option<&Done>,
) -> Value {
    let (status, incomplete) = match done.map(|d| d.finish_reason) {
        None => ("in_progress", Value::Null),
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some(_) => ("completed", Value::Null),
    };
    json!({
        "id": rid, "object": "response", "created_at": created, "status": status,
        "model": model, "output": output, "incomplete_details": incomplete, "error": null,
        "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
        "usage": done.map(usage),
    })
}

fn message_item(mid: &str, text: &str) -> Value {
    json!({"type": "message", "id": mid, "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn reasoning_item(rid: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": format!("rs_{rid}"), "summary": [],
           "content": [{"type": "reasoning_text", "text": text}]})
}

fn call_item(rid: &str, i: usize, call: &tools::ToolCall) -> Value {
    json!({"type": "function_call", "id": format!("fc_{rid}_{i}"),
           "call_id": format!("call_{rid}_{i}"), "name": call.name,
           "arguments": call.arguments.to_string(), "status": "completed"})
}

pub async fn responses(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let (mut rx, stream, with_tools) = match begin(&app, &body, read_responses).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (rid, model, created) = (id("resp"), app.model.info.name.clone(), now());
    let mid = format!("msg_{rid}");
    if !stream {
        return match collect(rx).await {
            Ok(c) => {
                let (text, calls) = split_calls(c.text, with_tools);
                let mut output = Vec::new();
                if !c.reasoning.is_empty() {
                    output.push(reasoning_item(&rid, &c.reasoning));
                }
                if !text.is_empty() || calls.is_empty() {
                    output.push(message_item(&mid, &text));
                }
                output.extend(calls.iter().enumerate().map(|(i, t)| call_item(&rid, i, t)));
                Json(response(&rid, &model, created, output, Some(&c.done))).into_response()
            }
            Err(e) => e,
        };
    }
    // The stream: created, then the message item's text as deltas (reasoning gathered into a
    // reasoning item first), then function calls, then completed. Sent on by a task, so that a
    // client that goes away stops the job.
    let (tx, events) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut send = |v: Value| {
            let mut v = v;
            v["sequence_number"] = seq.into();
            seq += 1;
            let name = v["type"].as_str().unwrap_or("").to_string();
            tx.send(Ok(SseEvent::default().event(name).data(v.to_string())))
                .is_ok()
        };
        if !send(json!({"type": "response.created",
                        "response": response(&rid, &model, created, vec![], None)}))
        {
            return;
        }
        let mut hold = with_tools.then(tools::Holdback::default);
        let (mut reasoning, mut text) = (String::new(), String::new());
        let mut message_open = false;
        let mut output: Vec<Value> = Vec::new();
        while let Some(ev) = rx.recv().await {
            let ok = match ev {
                Event::Started | Event::Logprobs(_) => true,
                Event::Piece {
                    reasoning: true,
                    text: t,
                } => {
                    reasoning.push_str(&t);
                    true
                }
                Event::Piece { text: t, .. } => {
                    let t = match &mut hold {
                        Some(h) => h.push(&t),
                        None => t,
                    };
                    let mut ok = true;
                    if !t.is_empty() {
                        if !message_open {
                            if !reasoning.is_empty() {
                                let item = reasoning_item(&rid, &reasoning);
                                ok &= send(json!({"type": "response.output_item.added",
                                                  "output_index": output.len(), "item": item}));
                                ok &= send(json!({"type": "response.output_item.done",
                                                  "output_index": output.len(), "item": item}));
                                output.push(item);
                            }
                            let item = json!({"type": "message", "id": mid, "status": "in_progress",
                                              "role": "assistant", "content": []});
                            ok &= send(json!({"type": "response.output_item.added",
                                              "output_index": output.len(), "item": item}));
                            ok &= send(json!({"type": "response.content_part.added",
                                              "item_id": mid, "output_index": output.len(),
                                              "content_index": 0,
                                              "part": {"type": "output_text", "text": "",
                                                       "annotations": []}}));
                            message_open = true;
                        }
                        ok &= send(json!({"type": "response.output_text.delta", "item_id": mid,
                                          "output_index": output.len(), "content_index": 0,
                                          "delta": t}));
                        text.push_str(&t);
                    }
                    ok
                }
                Event::Done(d) => {
                    let mut calls = Vec::new();
                    if let Some(h) = hold.take() {
                        let (rest, c) = h.finish();
                        text.push_str(&rest);
                        calls = c;
                    }
                    if !message_open && !reasoning.is_empty() {
                        output.push(reasoning_item(&rid, &reasoning));
                    }
                    if message_open || calls.is_empty() {
                        let item = message_item(&mid, &text);
                        send(json!({"type": "response.output_text.done", "item_id": mid,
                                    "output_index": output.len(), "content_index": 0,
                                    "text": text}));
                        send(json!({"type": "response.output_item.done",
                                    "output_index": output.len(), "item": item}));
                        output.push(item);
                    }
                    for (i, c) in calls.iter().enumerate() {
                        let item = call_item(&rid, i, c);
                        send(json!({"type": "response.output_item.added",
                                    "output_index": output.len(), "item": item}));
                        send(json!({"type": "response.function_call_arguments.done",
                                    "item_id": item["id"], "output_index": output.len(),
                                    "arguments": item["arguments"]}));
                        send(json!({"type": "response.output_item.done",
                                    "output_index": output.len(), "item": item}));
                        output.push(item);
                    }
                    let full =
                        response(&rid, &model, created, std::mem::take(&mut output), Some(&d));
                    send(json!({"type": "response.completed", "response": full}));
                    false
                }
                Event::Error { message, .. } => {
                    send(json!({"type": "error", "message": message}));
                    false
                }
            };
            if !ok {
                return;
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(events)).into_response()
}
