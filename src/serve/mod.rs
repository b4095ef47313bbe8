//! `ggrun serve`: an OpenAI- and Ollama-compatible HTTP API on axum. Handlers parse and check
//! requests (errors are OpenAI-style objects with a 4xx, Ollama's `{"error"}` under /api/;
//! parameters that are not implemented are refused by name), render and tokenize prompts on the
//! blocking pool (so a long prompt never stalls the slots' steps), hand jobs to the inference
//! thread (`worker`), and turn its events into JSON responses, server-sent events (OpenAI
//! streams) or NDJSON (Ollama streams). A stream starts only once its job has a slot, so every
//! error before the first token is a plain 4xx/5xx. A client that goes away drops its event
//! receiver, which stops its generation at the next token. Connections are bounded in number
//! and time (`connections`).

mod anthropic;
mod connections;
mod observe;
mod ollama;
mod openai;
mod params;
mod responses;
mod tools;
mod worker;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::chat::template::Message;
use crate::engine::load::ModelOptions;
use crate::sample::Settings;
use worker::{Done, Event, Job, Jobs, Prepared, Prompt};

/// How the server runs (`ggrun serve`'s flags, below the command line).
#[derive(Clone, Debug)]
pub struct Options {
    pub model: ModelOptions,
    pub host: String,
    pub port: u16,
    /// Sequences served at once, each in a slot with its own state.
    pub parallel: usize,
    /// Requests must carry `Authorization: Bearer KEY` (or `x-api-key: KEY`); /health and
    /// /v1/models stay public unless `auth_all`.
    pub api_key: Option<String>,
    /// The API key guards /health and /v1/models too.
    pub auth_all: bool,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Snapshot the state every N prompt tokens of a long prefill (0: only at prompt ends).
    pub snapshot_every: usize,
    /// Snapshots kept per slot.
    pub snapshots: usize,
    /// Open connections at most (None: 1024, or fewer under a low open-file limit).
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers (and as many for its body).
    pub header_timeout: u64,
    /// Seconds a connection may stay open with no request in flight.
    pub idle_timeout: u64,
}

/// What every handler shares.
struct App {
    jobs: Jobs,
    model: Arc<worker::Model>,
    api_key: Option<String>,
    auth_all: bool,
    metrics: Arc<observe::Metrics>,
    /// A request body's most bytes, and the time it has to arrive.
    max_body: usize,
    body_timeout: Duration,
}

/// Runs the server until SIGINT or SIGTERM: jobs in progress stop after their current token and
/// end with finish_reason "abort"; connections get a few seconds to send that.
pub fn run(a: Options) -> Result<()> {
    let open_files = raise_open_file_limit();
    let max_connections = a
        .max_connections
        .unwrap_or_else(|| 1024.min(open_files.saturating_sub(64) as usize))
        .max(1);
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let slots = worker::Slots {
        parallel: a.parallel,
        snapshot_every: a.snapshot_every,
        snapshots: a.snapshots,
    };
    let model = worker::spawn(a.model, slots, rx)?;
    let app = Arc::new(App {
        jobs: Arc::new(Mutex::new(tx)),
        model,
        api_key: a.api_key,
        auth_all: a.auth_all,
        metrics: Arc::default(),
        max_body: a.max_body,
        body_timeout: Duration::from_secs(a.header_timeout.max(1)),
    });
    let router = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages_endpoint))
        .route("/v1/responses", post(responses::responses))
        .route("/apply-template", post(openai::apply_template))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route("/metrics", get(metrics))
        .route("/api/tags", get(ollama::tags))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/v1/embeddings", post(no_embeddings))
        .route("/embedding", post(no_embeddings))
        .route("/embeddings", post(no_embeddings))
        .route("/api/embed", post(no_embeddings))
        .route("/api/embeddings", post(no_embeddings))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), admit))
        .with_state(app);
    let limits = connections::Limits {
        max_connections,
        header_timeout: Duration::from_secs(a.header_timeout.max(1)),
        idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
        grace: Duration::from_secs(5),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        // A name (localhost) or an address; names resolve as the system does.
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| anyhow!("cannot listen on {}:{}: {e}", a.host, a.port))?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        connections::serve(listener, router, limits, shutdown_signal()).await;
        Ok(())
    });
    // Prompts still being tokenized on the blocking pool are not waited for.
    rt.shutdown_timeout(Duration::from_millis(100));
    served
}

/// Raises the soft limit on open files to the hard one (many idle clients must not make the
/// server unreachable); the limit now in force.
// rlim_t is u64 here, not on every platform.
#[allow(clippy::unnecessary_cast)]
fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct we own; on failure the
    // limit stays as it was and we report what getrlimit said (or a conservative 1024).
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur as u64
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

/// Routes anyone may ask without the API key (health probes, model discovery), unless
/// `--api-key-all-routes`.
const PUBLIC: [&str; 2] = ["/health", "/v1/models"];

/// Every request: its log line and metrics ([`observe`]), then [`check`]; errors of Ollama's
/// routes in Ollama's shape.
async fn admit(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let log = observe::RequestLog::new(req.method().as_str(), &path, app.metrics.clone());
    let response = observe::REQUEST
        .scope(log.clone(), check(app, req, next))
        .await;
    let response = if path.starts_with("/api/") {
        error_shape(response, |m| json!({ "error": m })).await
    } else if path == "/v1/messages" {
        error_shape(
            response,
            |m| json!({"type": "error", "error": {"type": "invalid_request_error", "message": m}}),
        )
        .await
    } else {
        response
    };
    log.finish(response)
}

/// Checks the API key from the headers alone, then reads the body within its size and time
/// limits (413, 408), before the handler runs.
async fn check(app: Arc<App>, req: Request, next: Next) -> Response {
    let public = !app.auth_all && PUBLIC.contains(&req.uri().path());
    if let (Some(key), false) = (&app.api_key, public) {
        let h = req.headers();
        let given = |name: header::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
        let ok = given(header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| given(header::HeaderName::from_static("x-api-key")))
            .is_some_and(|k| k == key);
        if !ok {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)",
            );
        }
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, app.max_body);
    let bytes = match tokio::time::timeout(app.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than {} bytes (--max-body)",
                    app.max_body
                ),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s (--header-timeout)",
                    app.body_timeout.as_secs()
                ),
            )
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    observe::exposition(&app.metrics)
}

async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {}", req.method(), req.uri().path()),
    )
}

/// Embedding routes of the three APIs: known, and answered with a 501 saying why, so that a
/// client learns the server runs but does not embed (rather than a 404 that reads as a wrong
/// address).
async fn no_embeddings(req: Request) -> Response {
    error(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{}: embeddings are not supported (ggrun serves generation: chat, completions, \
             messages, responses)",
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {}", req.uri().path(), req.method()),
    )
}

/// An error response in another API's shape (Ollama's `{"error": "..."}`, Anthropic's
/// `{"type": "error", ...}`) instead of OpenAI's object: `shape` makes it of the message.
async fn error_shape(response: Response, shape: impl Fn(String) -> Value) -> Response {
    if response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string));
    match message {
        Some(m) => (parts.status, Json(shape(m))).into_response(),
        None => Response::from_parts(parts, axum::body::Body::from(bytes)),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn id(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{n:x}")
}

/// The body as `T`, or what is wrong with it.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

/// A request's `messages`, or what is wrong with them.
fn messages(m: &Value) -> Result<Vec<Message>, String> {
    let m = Message::list_from_api(m, "messages")?;
    if m.is_empty() {
        return Err("messages must not be empty".into());
    }
    Ok(m)
}

/// A 400 with `message`.
fn bad(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

/// Whether a request offers tools (a non-empty list).
fn has_tools(tools: &Option<Value>) -> bool {
    tools
        .as_ref()
        .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
}

/// Renders and tokenizes `prompt` on the blocking pool; a 400 when the template refuses it or
/// it does not fit the context.
async fn prepare(app: &Arc<App>, prompt: Prompt) -> Result<Prepared, Response> {
    let model = app.model.clone();
    tokio::task::spawn_blocking(move || model.prepare(&prompt))
        .await
        .map_err(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "preparing the prompt failed",
            )
        })?
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

/// A generation request as read from its body, checked: what to generate from and how.
#[derive(Clone)]
struct Ask {
    /// Choices asked for (`n`): each runs as a job of its own.
    n: usize,
    /// The answer must be a call of a tool (`tool_choice` "required" or a named function).
    call: Option<CallChoice>,
    prompt: Prompt,
    max_tokens: Option<usize>,
    sampling: Settings,
    stream: bool,
    /// The request offers tools: look for calls in the answer.
    with_tools: bool,
}

/// A tool call the request requires: of any of its tools, or of the one named.
#[derive(Clone, Debug, PartialEq)]
enum CallChoice {
    Any,
    Named(String),
}

/// What a `tool_choice` asks for: None (auto), no tools at all ("none": the tools are not
/// offered), or a required call; or what is wrong with it. OpenAI's ("auto", "none",
/// "required", `{"type": "function", "function": {"name": N}}`), the Responses API's
/// (`{"type": "function", "name": N}`) and Anthropic's (`{"type": "auto" | "any" | "none" |
/// "tool", "name": N}`) forms.
fn tool_choice(v: Option<&Value>) -> Result<(Option<CallChoice>, bool), String> {
    let named = |n: Option<&Value>| -> Result<Option<CallChoice>, String> {
        n.and_then(Value::as_str)
            .map(|n| Some(CallChoice::Named(n.to_string())))
            .ok_or_else(|| "tool_choice: a named choice needs the function's name".to_string())
    };
    let kind = match v {
        None | Some(Value::Null) => return Ok((None, true)),
        Some(Value::String(s)) => s.as_str(),
        Some(o) => o.get("type").and_then(Value::as_str).unwrap_or(""),
    };
    match kind {
        "auto" => Ok((None, true)),
        "none" => Ok((None, false)),
        "required" | "any" => Ok((Some(CallChoice::Any), true)),
        "function" => {
            let o = v.unwrap_or(&Value::Null);
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or(o.get("name"));
            Ok((named(name)?, true))
        }
        "tool" => Ok((named(v.and_then(|o| o.get("name")))?, true)),
        other => Err(format!(
            "tool_choice: {other:?} (auto, none, required, or a named function)"
        )),
    }
}

/// The thinking switch of a turn that `call` may force: a required call starts the answer, so
/// thinking is off (asking for it is an error); otherwise `think` as asked.
fn think_for(call: &Option<CallChoice>, think: Option<bool>) -> Result<Option<bool>, String> {
    match (call, think) {
        (Some(_), Some(true)) => {
            Err("tool_choice: a required call cannot follow thinking (turn it off)".into())
        }
        (Some(_), _) => Ok(Some(false)),
        (None, t) => Ok(t),
    }
}

/// Reads a request body as the handler of `path` does (JSON shape, messages, sampling ranges),
/// without a model: what the request parsers' fuzz target runs. An error is the 400's message.
pub fn read_request(path: &str, body: &[u8]) -> Result<(), String> {
    let body = Bytes::copy_from_slice(body);
    match path {
        "/v1/chat/completions" => openai::read_chat(&body).map(drop),
        "/v1/completions" => openai::read_completion(&body).map(drop),
        "/api/chat" => ollama::read_chat(&body).map(drop),
        "/api/generate" => ollama::read_generate(&body).map(drop),
        "/v1/messages" => anthropic::read_messages(&body).map(drop),
        "/v1/responses" => responses::read_responses(&body).map(drop),
        "/detokenize" => openai::read_detokenize(&body, 1 << 20).map(drop),
        "/apply-template" => openai::read_apply_template(&body).map(drop),
        "/tokenize" => openai::read_tokenize(&body).map(drop),
        _ => Err(format!("no endpoint {path}")),
    }
}

/// A generation handler's first half: reads the body with `read` (a 400 when it is wrong) and
/// [`start`]s the job; its events, and whether the request streams and offers tools.
async fn begin(
    app: &Arc<App>,
    body: &Bytes,
    read: fn(&Bytes) -> Result<Ask, String>,
) -> Result<(UnboundedReceiver<Event>, bool, bool), Response> {
    let ask = read_checked(app, body, read).map_err(bad)?;
    if ask.n > 1 {
        return Err(bad(
            "n: more than one choice is served by the chat and completions \
                        endpoints only, not streamed"
                .into(),
        ));
    }
    let (stream, with_tools) = (ask.stream, ask.with_tools);
    Ok((start(app, ask).await?, stream, with_tools))
}

/// Reads a body with `read` and checks what needs the model (token ids); or the 400's message.
fn read_checked(
    app: &Arc<App>,
    body: &Bytes,
    read: fn(&Bytes) -> Result<Ask, String>,
) -> Result<Ask, String> {
    let ask = read(body)?;
    let n_vocab = app.model.info.n_vocab;
    let bias = &ask.sampling.logit_bias;
    if let Some((t, _)) = bias.iter().find(|b| b.0 as usize >= n_vocab) {
        return Err(format!(
            "logit_bias: {t} is not a token id (0 to {})",
            n_vocab - 1
        ));
    }
    Ok(ask)
}

/// Starts `ask`'s `n` choices for a stream: the first at once (its failure is the response),
/// the others beside it (seeds `seed + i`); every choice's events come tagged with its index,
/// the channel closing when all are done.
async fn start_choices(
    app: &Arc<App>,
    ask: Ask,
) -> Result<UnboundedReceiver<(usize, Event)>, Response> {
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    let forward = |i: usize,
                   mut rx: UnboundedReceiver<Event>,
                   tx: UnboundedSender<(usize, Event)>| async move {
        while let Some(ev) = rx.recv().await {
            if tx.send((i, ev)).is_err() {
                return;
            }
        }
    };
    let log = observe::REQUEST.try_with(Arc::clone).ok();
    let mut first = ask.clone();
    first.n = 1;
    let rx0 = start(app, first).await?;
    tokio::spawn(forward(0, rx0, tx.clone()));
    for i in 1..ask.n {
        let mut a = ask.clone();
        a.sampling.seed = a.sampling.seed.map(|s| s.wrapping_add(i as u64));
        let (app, tx, log) = (app.clone(), tx.clone(), log.clone());
        let job = async move {
            match start(&app, a).await {
                Ok(rx) => forward(i, rx, tx).await,
                Err(_) => {
                    let message = "this choice could not start".to_string();
                    let _ = tx.send((
                        i,
                        Event::Error {
                            status: 500,
                            message,
                        },
                    ));
                }
            }
        };
        match log {
            Some(l) => tokio::spawn(observe::REQUEST.scope(l, job)),
            None => tokio::spawn(job),
        };
    }
    Ok(out)
}

/// Runs `ask`'s `n` choices as jobs of their own (seeds `seed + i` when a seed is given) and
/// collects them all.
async fn collect_choices(app: &Arc<App>, ask: Ask) -> Result<Vec<Collected>, Response> {
    let mut handles = Vec::with_capacity(ask.n);
    let log = observe::REQUEST.try_with(Arc::clone).ok();
    for i in 0..ask.n {
        let mut a = ask.clone();
        a.sampling.seed = a.sampling.seed.map(|s| s.wrapping_add(i as u64));
        let app = app.clone();
        let job = async move {
            let rx = start(&app, a).await?;
            collect(rx).await
        };
        // Each choice's tokens count on the request's line.
        handles.push(match log.clone() {
            Some(l) => tokio::spawn(observe::REQUEST.scope(l, job)),
            None => tokio::spawn(job),
        });
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(
            h.await
                .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "a choice's job failed"))??,
        );
    }
    Ok(out)
}

/// Prepares the prompt, queues the job and waits until it has a slot: the receiver of its
/// events after [`Event::Started`], or the response for why it could not start.
async fn start(app: &Arc<App>, ask: Ask) -> Result<UnboundedReceiver<Event>, Response> {
    let Ask {
        prompt,
        max_tokens,
        sampling,
        call: ask_call,
        ..
    } = ask;
    let mut sampling = sampling;
    if let (Some(choice), Prompt::Chat { tools: Some(t), .. }) = (&ask_call, &prompt) {
        if sampling.grammar.is_some() {
            return Err(bad(
                "tool_choice: a required call cannot be combined with a response format".into(),
            ));
        }
        let syntax = tools::CallSyntax::of_template(app.model.template.source());
        let only = match choice {
            CallChoice::Any => None,
            CallChoice::Named(n) => Some(n.as_str()),
        };
        let lark = tools::call_grammar(syntax, t, only).map_err(bad)?;
        sampling.grammar = Some(crate::grammar::GrammarSpec::Lark(lark));
    } else if ask_call.is_some() {
        return Err(bad("tool_choice: a required call needs tools".into()));
    }
    let prompt = prepare(app, prompt).await?;
    let constraint = match sampling.grammar.clone() {
        Some(spec) => {
            let model = app.model.clone();
            let compiled = tokio::task::spawn_blocking(move || model.constraint(&spec))
                .await
                .map_err(|_| {
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "compiling the grammar failed",
                    )
                })?;
            Some(compiled.map_err(bad)?)
        }
        None => None,
    };
    let (events, mut rx) = worker::channel();
    let job = Job {
        prompt,
        max_tokens,
        sampling,
        constraint,
        events,
    };
    {
        let jobs = app.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.send(job).map_err(|_| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model worker has stopped",
            )
        })?;
    }
    match rx.recv().await {
        Some(Event::Started) => Ok(counted(rx)),
        Some(Event::Error { status, message }) => Err(error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message,
        )),
        _ => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )),
    }
}

/// The job's events as they come, its tokens recorded on the request's log line and in the
/// metrics when it is done.
fn counted(mut rx: UnboundedReceiver<Event>) -> UnboundedReceiver<Event> {
    let Ok(log) = observe::REQUEST.try_with(Arc::clone) else {
        return rx;
    };
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if let Event::Done(d) = &ev {
                log.tokens(d.prompt_tokens, d.completion_tokens);
            }
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    out
}

/// Everything a job produced, for non-streaming answers.
struct Collected {
    text: String,
    reasoning: String,
    /// Each generated token's logprobs entry, when the request asked for them.
    logprobs: Vec<Value>,
    done: Done,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, Response> {
    let (mut text, mut reasoning, mut logprobs) = (String::new(), String::new(), Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Started => {}
            Event::Logprobs(e) => logprobs.push(e),
            Event::Piece {
                reasoning: true,
                text: t,
            } => reasoning.push_str(&t),
            Event::Piece { text: t, .. } => text.push_str(&t),
            Event::Done(done) => {
                return Ok(Collected {
                    text,
                    reasoning,
                    logprobs,
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

/// A whole answer's text and the tool calls in it (none looked for without tools).
fn split_calls(text: String, with_tools: bool) -> (String, Vec<tools::ToolCall>) {
    if with_tools {
        tools::parse(&text)
    } else {
        (text, Vec::new())
    }
}
