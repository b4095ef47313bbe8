//! OpenAI's chat completions and completions (whole or streamed as server-sent events), the
//! model list, and llama-server's `/apply-template` and `/tokenize`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::params::{reject_unsupported, Sampling, OPENAI_IGNORED};
use super::worker::{Done, Event, Prompt};
use super::{
    bad, collect_choices, error, has_tools, id, messages, now, parse, read_checked, split_calls,
    start_choices, think_for, tool_choice, tools, App, Ask, Collected,
};
use crate::chat::template::{Message, RenderOptions};

#[derive(Deserialize)]
struct ChatRequest {
    /// Read by [`crate::chat::template::Message::list_from_api`].
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
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(flatten)]
    sampling: Sampling,
    /// Everything else (see [`reject_unsupported`]).
    #[serde(flatten)]
    rest: Map<String, Value>,
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

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: String,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let info = &app.model.info;
    Json(json!({
        "object": "list",
        "data": [{"id": info.name, "object": "model", "created": 0, "owned_by": "ggrun",
                  "meta": {"n_ctx": info.n_ctx, "n_vocab": info.n_vocab}}],
    }))
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

/// A chat completion request, checked.
pub(super) fn read_chat(body: &Bytes) -> Result<Ask, String> {
    let req: ChatRequest = parse(body)?;
    reject_unsupported(&req.rest, &OPENAI_IGNORED, "")?;
    let n = req.sampling.choices()?;
    let (call, offer) = tool_choice(req.tool_choice.as_ref())?;
    let think = think_for(&call, req.think())?;
    let messages = messages(&req.messages)?;
    let tools = req.tools.filter(|_| offer);
    let with_tools = has_tools(&tools);
    let (max_tokens, sampling) = req.sampling.args("")?;
    Ok(Ask {
        n,
        call,
        prompt: Prompt::Chat {
            messages,
            tools,
            think,
        },
        max_tokens,
        sampling,
        stream: req.stream,
        with_tools,
    })
}

/// A whole reply's choice `index`: the message (text, tool calls, reasoning), finish reason
/// and logprobs.
fn chat_choice(c: Collected, index: usize, cid: &str, with_tools: bool) -> Value {
    let (text, calls) = split_calls(c.text, with_tools);
    let mut message = json!({"role": "assistant", "content": text});
    let mut finish = c.done.finish_reason;
    if !calls.is_empty() {
        let v: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, t)| t.to_openai(i, &format!("{cid}-{index}")))
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
    let logprobs = if c.logprobs.is_empty() {
        Value::Null
    } else {
        json!({ "content": c.logprobs })
    };
    json!({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
}

/// Usage over several choices: the prompt once, every choice's generated tokens.
fn usage_of(done: &[Done]) -> Value {
    let mut u = usage(&done[0]);
    let generated: usize = done.iter().map(|d| d.completion_tokens).sum();
    u["completion_tokens"] = generated.into();
    u["total_tokens"] = (done[0].prompt_tokens + generated).into();
    u
}

pub async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let ask = match read_checked(&app, &body, read_chat) {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    let (stream, with_tools) = (ask.stream, ask.with_tools);
    let (cid, model, created) = (id("chatcmpl"), app.model.info.name.clone(), now());
    if !stream {
        return match collect_choices(&app, ask).await {
            Ok(cs) => {
                let done: Vec<Done> = cs.iter().map(|c| c.done.clone()).collect();
                let choices: Vec<Value> = cs
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| chat_choice(c, i, &cid, with_tools))
                    .collect();
                Json(json!({
                    "id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": choices, "usage": usage_of(&done),
                }))
                .into_response()
            }
            Err(e) => e,
        };
    }
    let n = ask.n;
    let rx = match start_choices(&app, ask).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    // A chunk of choice `i`: a delta, the finish reason at the end, usage, and logprobs
    // entries (which travel in chunks of their own, with an empty delta).
    let chunk = move |i: usize,
                      delta: Value,
                      finish: Option<&str>,
                      usage: Option<Value>,
                      lp: Option<Value>| {
        let mut v = json!({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": i, "delta": delta, "finish_reason": finish}],
        });
        if let Some(e) = lp {
            v["choices"][0]["logprobs"] = json!({ "content": [e] });
        }
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    let first: Vec<Result<SseEvent, Infallible>> = (0..n)
        .map(|i| {
            Ok(chunk(
                i,
                json!({"role": "assistant", "content": ""}),
                None,
                None,
                None,
            ))
        })
        .collect();
    // With tools, answer text is held back from where a call may begin (per choice).
    let mut holds: Vec<Option<tools::Holdback>> = (0..n)
        .map(|_| with_tools.then(tools::Holdback::default))
        .collect();
    let call_id = id("call");
    let events = UnboundedReceiverStream::new(rx).filter_map(move |(i, ev)| {
        let e = match ev {
            Event::Started => return None,
            Event::Logprobs(e) => chunk(i, json!({}), None, None, Some(e)),
            Event::Piece {
                reasoning: true,
                text,
            } => chunk(i, json!({"reasoning_content": text}), None, None, None),
            Event::Piece { text, .. } => match &mut holds[i] {
                Some(h) => chunk(i, json!({"content": h.push(&text)}), None, None, None),
                None => chunk(i, json!({"content": text}), None, None, None),
            },
            Event::Done(d) => {
                let mut delta = json!({});
                let mut finish = d.finish_reason;
                if let Some(h) = holds[i].take() {
                    let (rest, calls) = h.finish();
                    if !rest.is_empty() {
                        delta["content"] = rest.into();
                    }
                    if !calls.is_empty() {
                        let v: Vec<Value> = calls
                            .iter()
                            .enumerate()
                            .map(|(k, t)| t.to_openai(k, &format!("{call_id}-{i}")))
                            .collect();
                        delta["tool_calls"] = v.into();
                        finish = "tool_calls";
                    }
                }
                chunk(i, delta, Some(finish), Some(usage(&d)), None)
            }
            Event::Error { message, .. } => SseEvent::default()
                .data(json!({"error": {"message": message, "type": "server_error"}}).to_string()),
        };
        Some(Ok::<_, Infallible>(e))
    });
    let stream = tokio_stream::iter(first)
        .chain(events)
        .chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(stream).into_response()
}

/// A completion request, checked.
pub(super) fn read_completion(body: &Bytes) -> Result<Ask, String> {
    let req: CompletionRequest = parse(body)?;
    reject_unsupported(&req.rest, &OPENAI_IGNORED, "")?;
    if req.prompt.is_empty() {
        return Err("prompt must not be empty".into());
    }
    let n = req.sampling.choices()?;
    let (max_tokens, sampling) = req.sampling.args("")?;
    Ok(Ask {
        n,
        call: None,
        prompt: Prompt::Text(req.prompt),
        max_tokens,
        sampling,
        stream: req.stream,
        with_tools: false,
    })
}

pub async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let ask = match read_checked(&app, &body, read_completion) {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    let (cid, model, created) = (id("cmpl"), app.model.info.name.clone(), now());
    if !ask.stream {
        return match collect_choices(&app, ask).await {
            Ok(cs) => {
                let done: Vec<Done> = cs.iter().map(|c| c.done.clone()).collect();
                let choices: Vec<Value> = cs
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        json!({"index": i, "text": c.text, "finish_reason": c.done.finish_reason,
                               "logprobs": legacy_logprobs(&c.logprobs)})
                    })
                    .collect();
                Json(json!({
                    "id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, "usage": usage_of(&done),
                }))
                .into_response()
            }
            Err(e) => e,
        };
    }
    // Every choice streams, its chunks tagged with its index (as chat's).
    let rx = match start_choices(&app, ask).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let events = UnboundedReceiverStream::new(rx).filter_map(move |(i, ev)| {
        let v = match ev {
            Event::Started => return None,
            Event::Logprobs(e) => json!({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": "", "finish_reason": null,
                             "logprobs": legacy_logprobs(&[e])}],
            }),
            Event::Piece { text, .. } => json!({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": text, "finish_reason": null}],
            }),
            Event::Done(d) => json!({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": "", "finish_reason": d.finish_reason}],
                "usage": usage(&d),
            }),
            Event::Error { message, .. } => {
                json!({"error": {"message": message, "type": "server_error"}})
            }
        };
        Some(Ok::<_, Infallible>(SseEvent::default().data(v.to_string())))
    });
    let stream = events.chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(stream).into_response()
}

#[derive(Deserialize)]
struct ApplyTemplate {
    messages: Value,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    think: Option<bool>,
    #[serde(default)]
    chat_template_kwargs: Option<Value>,
}

/// An `/apply-template` request, checked: the messages and how to render them.
pub(super) fn read_apply_template(body: &Bytes) -> Result<(Vec<Message>, RenderOptions), String> {
    let req: ApplyTemplate = parse(body)?;
    let msgs = messages(&req.messages)?;
    let think = req.think.or(req
        .chat_template_kwargs
        .as_ref()
        .and_then(|k| k.get("enable_thinking"))
        .and_then(Value::as_bool));
    let opts = RenderOptions {
        add_generation_prompt: true,
        enable_thinking: think,
        tools: req.tools,
    };
    Ok((msgs, opts))
}

/// llama-server's `/apply-template`: the prompt the chat template makes of `messages` (with
/// the generation prompt), as text, without generating.
pub async fn apply_template(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let (msgs, opts) = match read_apply_template(&body) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let model = app.model.clone();
    match tokio::task::spawn_blocking(move || model.template.render_text(&msgs, &opts)).await {
        Ok(Ok(prompt)) => Json(json!({ "prompt": prompt })).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed"),
    }
}

#[derive(Deserialize)]
pub(super) struct Tokenize {
    content: String,
    /// Add BOS/EOS as the model's metadata asks.
    #[serde(default)]
    add_special: bool,
    /// Read special-token text as those tokens.
    #[serde(default = "yes")]
    parse_special: bool,
    /// Ids with their text.
    #[serde(default)]
    with_pieces: bool,
}

fn yes() -> bool {
    true
}

/// A `/tokenize` request, checked.
pub(super) fn read_tokenize(body: &Bytes) -> Result<Tokenize, String> {
    parse(body)
}

/// llama-server's `/tokenize`: the ids of `content`.
pub async fn tokenize(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req = match read_tokenize(&body) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let model = app.model.clone();
    let work = move || -> anyhow::Result<Value> {
        let tok = &model.tok;
        let ids = if req.add_special {
            tok.encode(&req.content, req.parse_special)?
        } else {
            tok.encode_continuation(&req.content, req.parse_special)
        };
        Ok(if req.with_pieces {
            let v: Vec<Value> = ids
                .iter()
                .map(|&i| {
                    let piece = String::from_utf8_lossy(&tok.token_bytes(i, true)).into_owned();
                    json!({"id": i, "piece": piece})
                })
                .collect();
            json!({ "tokens": v })
        } else {
            json!({ "tokens": ids })
        })
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "tokenizing failed"),
    }
}

#[derive(Deserialize)]
pub(super) struct Detokenize {
    tokens: Vec<i64>,
}

/// A `/detokenize` request, checked against the vocabulary.
pub(super) fn read_detokenize(body: &Bytes, n_vocab: usize) -> Result<Vec<u32>, String> {
    let req: Detokenize = parse(body)?;
    req.tokens
        .iter()
        .map(|&t| {
            u32::try_from(t)
                .ok()
                .filter(|&i| (i as usize) < n_vocab)
                .ok_or_else(|| format!("tokens: {t} is not a token id (0 to {})", n_vocab - 1))
        })
        .collect()
}

/// llama-server's `/detokenize`: the text of `tokens` (control tokens as their text).
pub async fn detokenize(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let ids = match read_detokenize(&body, app.model.info.n_vocab) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let model = app.model.clone();
    match tokio::task::spawn_blocking(move || model.tok.decode(&ids, true)).await {
        Ok(content) => Json(json!({ "content": content })).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "detokenizing failed"),
    }
}

/// The completions API's logprobs form of chat entries: parallel lists of tokens, their
/// log-probabilities and their alternatives as {token: logprob} (null for none).
fn legacy_logprobs(entries: &[Value]) -> Value {
    if entries.is_empty() {
        return Value::Null;
    }
    let tops: Vec<Value> = entries
        .iter()
        .map(|e| {
            let m: Map<String, Value> = e["top_logprobs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap_or("").to_string(),
                        t["logprob"].clone(),
                    )
                })
                .collect();
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": tops,
    })
}
