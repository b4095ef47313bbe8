//! The connections of `ggrun serve`: the accept loop, HTTP/1.1 on hyper, and what keeps idle or
//! slow clients from taking the server's sockets. A request's headers must arrive within the
//! header timeout of its first byte (its body too: see the server's body reader), and a
//! connection with no request in flight and nothing sent closes after the idle timeout. At most
//! `max_connections` are open: at the cap a new connection closes the one idle the longest,
//! and gets a 503 only when every open one is busy. On shutdown connections finish what they
//! are sending and close, for at most a grace period.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

/// How connections are bounded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// A connection with no request in flight closes after this.
    pub idle_timeout: Duration,
    /// How long shutdown waits for connections to finish.
    pub grace: Duration,
}

/// What is known of an open connection, shared by its task, its requests and the accept loop.
struct State {
    /// Requests in flight (a response counts until its body has been sent).
    busy: AtomicUsize,
    /// When the connection opened or last started or finished a request.
    active: Mutex<Instant>,
    /// When the first byte of a request not yet dispatched arrived (None: nothing pending).
    pending_since: Mutex<Option<Instant>>,
    close: Notify,
}

impl State {
    fn active(&self) -> Instant {
        *self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending_since(&self) -> Option<Instant> {
        *self.pending_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request was dispatched or finished: the connection is active now, nothing pending.
    fn touch(&self) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        *self.pending_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

type Table = Arc<Mutex<HashMap<u64, Arc<State>>>>;

/// The reply to a connection beyond the cap when none can be closed for it.
fn busy_reply() -> Vec<u8> {
    let body = serde_json::json!({"error": {"message": "too many connections",
        "type": "server_error", "param": null, "code": null}})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open connections finish
/// for at most the grace period.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let table: Table = Arc::new(Mutex::new(HashMap::new()));
    let mut next_id = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let mut warned = false;
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, say: wait for connections to close.
                    if !warned {
                        eprintln!("warning: accepting a connection failed: {e}");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        if !make_room(&table, limits.max_connections) {
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = stream.write_all(&busy_reply()).await;
                let _ = stream.shutdown().await;
            });
            continue;
        }
        let state = Arc::new(State {
            busy: AtomicUsize::new(0),
            active: Mutex::new(Instant::now()),
            pending_since: Mutex::new(None),
            close: Notify::new(),
        });
        next_id += 1;
        let id = next_id;
        lock(&table).insert(id, state.clone());
        let (router, table) = (router.clone(), table.clone());
        tasks.spawn(async move {
            run_connection(state, stream, router, limits).await;
            lock(&table).remove(&id);
        });
    }
    // Shutdown: every connection finishes its response and closes; idle ones close now.
    for state in lock(&table).values() {
        state.close.notify_one();
    }
    let _ = tokio::time::timeout(limits.grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

fn lock(t: &Table) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<State>>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a new connection may open: below the cap, or after closing the connection idle
/// the longest.
fn make_room(table: &Table, max: usize) -> bool {
    let t = lock(table);
    if t.len() < max {
        return true;
    }
    let idle = t
        .values()
        .filter(|s| s.busy.load(Ordering::SeqCst) == 0)
        .min_by_key(|s| s.active());
    match idle {
        Some(s) => {
            s.close.notify_one();
            true
        }
        None => false,
    }
}

/// One connection: serves its requests until it closes, is closed for another, or times out.
async fn run_connection(
    state: Arc<State>,
    stream: tokio::net::TcpStream,
    router: Router,
    limits: Limits,
) {
    let for_requests = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let guard = Busy::start(for_requests.clone());
        let call = router.clone().oneshot(req.map(Body::new));
        async move {
            let resp = match call.await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            Ok::<_, Infallible>(resp.map(|body| Guarded { body, _busy: guard }))
        }
    });
    let io = Watched {
        inner: stream,
        state: state.clone(),
    };
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let tick = Duration::from_millis(200);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = state.close.notified(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(tick) => {
                if state.busy.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                match state.pending_since() {
                    // Headers started and not finished in time: drop the connection.
                    Some(t) if t.elapsed() >= limits.header_timeout => return,
                    Some(_) => {}
                    None if state.active().elapsed() >= limits.idle_timeout && !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    None => {}
                }
            }
        }
    }
}

/// The socket, noting when bytes of a request arrive while none is in flight.
struct Watched {
    inner: tokio::net::TcpStream,
    state: Arc<State>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let s = &self.state;
            if s.busy.load(Ordering::SeqCst) == 0 {
                s.pending_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
            }
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request as in flight until its response body is dropped (sent or abandoned).
struct Busy(Arc<State>);

impl Busy {
    fn start(state: Arc<State>) -> Busy {
        state.busy.fetch_add(1, Ordering::SeqCst);
        state.touch();
        Busy(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that holds its request's [`Busy`] until it is done.
struct Guarded {
    body: Body,
    _busy: Busy,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
