//! What the server tells its operator: one line per request on stderr (method, route, status,
//! prompt and generated tokens, time), printed when the response ends (a stream's last event,
//! or a client that went away), and Prometheus counters at `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use tokio_stream::StreamExt;

/// The routes the server answers: the label of a request in the metrics (others count as
/// "other", so that clients cannot grow the label set).
pub const ROUTES: [&str; 16] = [
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/responses",
    "/apply-template",
    "/tokenize",
    "/detokenize",
    "/api/tags",
    "/api/chat",
    "/api/generate",
    "/api/show",
    "/api/ps",
    "/api/version",
];

fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other")
}

/// Counters since the server started.
#[derive(Default)]
pub struct Metrics {
    /// (route, status) → requests answered.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    in_flight: AtomicU64,
}

impl Metrics {
    /// Counts a generation's tokens.
    pub fn tokens(&self, prompt: usize, generated: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of the counters.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out += "# HELP ggrun_requests_total Requests answered, by route and status.\n";
        out += "# TYPE ggrun_requests_total counter\n";
        let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for ((route, status), n) in requests.iter() {
            out += &format!("ggrun_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n");
        }
        let counters = [
            (
                "ggrun_prompt_tokens_total",
                "Prompt tokens of the generations served.",
                "counter",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "ggrun_generated_tokens_total",
                "Tokens generated.",
                "counter",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "ggrun_requests_in_flight",
                "Requests being answered now.",
                "gauge",
                self.in_flight.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, kind, v) in counters {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n");
        }
        out
    }
}

/// One request in flight: what its log line and the metrics need.
pub struct RequestLog {
    method: String,
    path: String,
    started: Instant,
    status: AtomicU16,
    /// (prompt, generated) tokens of its generation, when it ran one.
    tokens: Mutex<Option<(usize, usize)>>,
    metrics: Arc<Metrics>,
}

tokio::task_local! {
    /// The request the current handler serves (set by the server's middleware).
    pub static REQUEST: Arc<RequestLog>;
}

impl RequestLog {
    pub fn new(method: &str, path: &str, metrics: Arc<Metrics>) -> Arc<RequestLog> {
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        Arc::new(RequestLog {
            method: method.to_string(),
            path: path.to_string(),
            started: Instant::now(),
            status: AtomicU16::new(0),
            tokens: Mutex::new(None),
            metrics,
        })
    }

    /// Records a generation's tokens (on this request's line and in the metrics; the choices
    /// of one request add their generated tokens to one prompt).
    pub fn tokens(&self, prompt: usize, generated: usize) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        *t = Some(match *t {
            Some((p, g)) => (p.max(prompt), g + generated),
            None => (prompt, generated),
        });
        self.metrics.tokens(prompt, generated);
    }

    /// Takes the response's status; the line is printed when the body ends: at once for a
    /// whole body, after the last event of a stream.
    pub fn finish(self: Arc<Self>, response: Response) -> Response {
        self.status
            .store(response.status().as_u16(), Ordering::Relaxed);
        let streamed = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream") || t.contains("ndjson"));
        if !streamed {
            return response;
        }
        let (parts, body) = response.into_parts();
        let guard = self;
        let stream = body.into_data_stream().map(move |chunk| {
            let _ = &guard;
            chunk
        });
        Response::from_parts(parts, Body::from_stream(stream))
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let status = self.status.load(Ordering::Relaxed);
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        let tokens = match *self.tokens.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((p, g)) => format!(" {p}+{g} tokens"),
            None => String::new(),
        };
        let shown = if status == 0 {
            "dropped".to_string()
        } else {
            status.to_string()
        };
        eprintln!(
            "{} {} {shown}{tokens} {ms:.0} ms",
            self.method,
            self.path.chars().take(200).collect::<String>()
        );
        let m = &self.metrics;
        m.in_flight.fetch_sub(1, Ordering::Relaxed);
        *m.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route_label(&self.path), status))
            .or_default() += 1;
    }
}

/// The Prometheus response for `/metrics`.
pub fn exposition(m: &Metrics) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Body::from(Bytes::from(m.render())))
        .unwrap_or_default()
}
