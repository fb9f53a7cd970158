//! The admin HTTP API (JSON over HTTP/1.1).
//!
//! | method | path | does |
//! |---|---|---|
//! | GET  | `/healthz` | 200 `{"status":"ok","time_ms":...}` (the server's clock) while serving, 503 once shutdown began |
//! | GET  | `/backends` | every backend, as an array of backend elements |
//! | GET  | `/backends/{name}` | one backend element |
//! | POST | `/backends/{name}/drain` | out of rotation; live connections run on. Query: `wait=D` holds the reply until drained or D passes (200 drained, 202 still draining); `force_after=D` closes what is left after D; `close_idle=D` closes, while draining, connections idle for D |
//! | POST | `/backends/{name}/stop` | out of rotation and every connection closed |
//! | POST | `/backends/{name}/start` | back in rotation, from any state |
//! | GET  | `/backends/{name}/connections` | live connections: client, service, age, idle time, bytes each way |
//! | GET  | `/services` | each service: where it listens, its balancing mode and affinity, its backends and backups, its refused clients by reason |
//! | GET  | `/stats` | what became of the clients: established, or refused (limit, no backend, every backend full, resources), or abandoned; accept errors; live total |
//! | POST | `/reload` | reads the configuration file again and applies it whole (200), or refuses it whole (422) with the file, line and field at fault or the fields that need a restart; 409 when sluice was not started from a file |
//! | GET  | `/openapi.json` | this API as an OpenAPI 3.1 document ([`OPENAPI`]) |
//! | GET  | `/` | the dashboard ([`DASHBOARD`]), which needs no token to load |
//! | GET  | `/metrics` | Prometheus text exposition (`crate::metrics`) |
//! | GET  | `/events` | Server-Sent Events: state and health changes, drain progress, `drained`, reloads, refused clients, leave and join, the cluster connection (`crate::events`). `Last-Event-ID` or `last_event_id=N` resumes after event N; the stream holds its admin connection (and its `max_connections` slot) while open |
//!
//! Repeating a drain while the same drain runs keeps one policy, the
//! tighter one (the earlier `force_after` deadline, the shorter
//! `close_idle`). Durations read like `1500ms`, `30s`, `5m`; backend names
//! and query values may be percent-encoded. Errors are `{"error": "..."}`
//! with 400 (bad parameter), 401 (token), 404 (unknown path or backend),
//! 405 (wrong method), 413 (body too large). With `[admin] token` set every
//! call needs `Authorization: Bearer TOKEN`.

mod access;
mod ops;
mod route;
mod stream;

pub use access::Who;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::ErrorView;
use crate::state::Shared;

/// The OpenAPI 3.1 document of this API, written by hand in
/// `src/admin/openapi.json` and served at `GET /openapi.json`;
/// `tests/openapi.rs` holds it to the routes and the replies.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The dashboard: one page, its style and script inline, so it works with
/// no network and no build step.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// Every route the router answers, as (method, path template), for the
/// test that holds the OpenAPI document to them.
#[doc(hidden)]
pub fn routes() -> &'static [(&'static str, &'static str)] {
    route::ROUTES
}

/// Largest request body accepted; the API takes its input in the query.
const MAX_BODY: usize = 4096;
/// How long a refused token waits for its answer: a guesser gets few
/// tries a second per connection slot.
const FAILED_AUTH_DELAY: Duration = Duration::from_millis(250);
/// The send buffer of an admin connection. Without a cap, the kernel
/// lets a loopback socket's grow to megabytes, which an event stream's
/// client that stops reading would fill (thousands of events) before it
/// counts as behind; replies are small, and a large one just waits.
const SEND_BUFFER: usize = 64 * 1024;

/// Serves the admin API on `listener` until `stop` is cancelled.
/// What the admin API acts on: the balancer's state, and the upgrader
/// that hands this process over to a new one.
#[derive(Debug)]
pub struct Plane {
    pub shared: Arc<Shared>,
    /// `None` where no upgrade is possible (in tests and the fuzz target).
    pub upgrader: Option<Arc<crate::upgrade::Upgrader>>,
    /// The etcd session, in cluster mode: admin changes go through it.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The configuration file `POST /reload` reads again; `None` when
    /// sluice was not started from a file.
    pub config_path: Option<std::path::PathBuf>,
}

impl Plane {
    /// The admin plane of `shared`, without upgrades.
    pub fn of(shared: Arc<Shared>) -> Arc<Plane> {
        Arc::new(Plane {
            shared,
            upgrader: None,
            cluster: None,
            config_path: None,
        })
    }
}

/// Serves the admin API on `listener` until `stop_accepting` is cancelled;
/// its connections end when `stop` is.
pub async fn serve(
    listener: TcpListener,
    plane: Arc<Plane>,
    stop_accepting: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            // First: once a new process has taken over, not one more.
            biased;
            _ = stop_accepting.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, addr)) => (s, Peer::Tcp(addr)),
                Err(e) => {
                    warn!(error = %e, "admin accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let local = stream.local_addr().ok();
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        admit_connection(stream, peer, local, &plane, &stop);
    }
}

/// Serves the admin API on a unix socket until `stop` is cancelled.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    plane: Arc<Plane>,
    stop_accepting: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            biased;
            _ = stop_accepting.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        admit_connection(stream, Peer::Unix { uid }, None, &plane, &stop);
    }
}

/// Serves a new admin connection if it fits under `[admin]
/// max_connections`; otherwise closes it at once and counts it, so admin
/// clients can never take the descriptors the data plane needs.
fn admit_connection<I>(
    io: I,
    peer: Peer,
    local: Option<SocketAddr>,
    plane: &Arc<Plane>,
    stop: &CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(permit) = plane.shared.admin_limit.try_acquire() else {
        plane
            .shared
            .stats
            .admin_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(%peer, "admin connection over [admin] max_connections; closed");
        return;
    };
    let (plane, stop) = (plane.clone(), stop.clone());
    tokio::spawn(async move {
        serve_connection(io, peer, local, plane, stop).await;
        drop(permit);
    });
}

/// Who is at the other end of an admin connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A client of the unix socket, by user id.
    Unix {
        uid: u32,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix { uid } => write!(f, "unix socket uid {uid}"),
        }
    }
}

/// Serves one admin connection until it ends or `stop` is cancelled (then
/// the request in progress is answered first). Any byte stream will do,
/// which is how the fuzz target drives the whole request path. `local` is
/// the address the client reached, a name of this API in `Host`.
pub async fn serve_connection<I>(
    io: I,
    peer: Peer,
    local: Option<SocketAddr>,
    plane: Arc<Plane>,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Read per connection, so a reload applies to the next one.
    let timeout = plane.shared.runtime().config.admin.request_timeout;
    let peer = Arc::new(peer);
    // Cancelled when an event stream of this connection falls behind: the
    // connection is dropped, not waited on.
    let cut = CancellationToken::new();
    let link = Link {
        stop: stop.clone(),
        cut: cut.clone(),
    };
    let svc = service_fn(move |req| {
        let (plane, peer, link) = (plane.clone(), peer.clone(), link.clone());
        async move { Ok::<_, Infallible>(handle(req, &plane, &peer, local, timeout, &link).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that sends its request and then shuts its side (as
        // `nc -N` does) still gets the reply.
        .half_close(true)
        .header_read_timeout(timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = cut.cancelled() => {
            debug!("admin connection cut: its event stream fell behind");
            return;
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                _ = cut.cancelled() => return,
            }
        }
    };
    if let Err(e) = r {
        debug!(error = %e, "admin connection ended with an error");
    }
}

type Reply = Response<Full<Bytes>>;

/// What a request gets: a whole reply, or an event stream.
type Answer = Response<Either<Full<Bytes>, stream::Stream>>;

/// What a request's handler knows of its connection: `stop` ends the
/// admin API's connections, `cut` drops this one at once.
#[derive(Clone)]
struct Link {
    stop: CancellationToken,
    cut: CancellationToken,
}

fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A request the API refuses, with what to tell the client.
#[derive(Debug, PartialEq)]
struct Refusal {
    status: StatusCode,
    message: String,
    /// For 405: the method the path takes.
    allow: Option<&'static str>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            allow: None,
        }
    }

    fn reply(self) -> Reply {
        let mut r = json(
            self.status,
            &ErrorView {
                error: self.message,
            },
        );
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            // A client without the token has nothing more to say here.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Answers one request: an event stream for `GET /events`, otherwise
/// what its operation replies.
async fn handle(
    req: Request<Incoming>,
    plane: &Plane,
    peer: &Peer,
    local: Option<SocketAddr>,
    timeout: Duration,
    link: &Link,
) -> Answer {
    let mut answer = answer(req, plane, peer, local, timeout, link).await;
    // Once this process hands over, a client's next request (a browser's
    // pooled connection, the dashboard's stream) must reach the new one.
    if plane.upgrader.as_ref().is_some_and(|u| u.frozen()) {
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    answer
}

async fn answer(
    req: Request<Incoming>,
    plane: &Plane,
    peer: &Peer,
    local: Option<SocketAddr>,
    timeout: Duration,
    link: &Link,
) -> Answer {
    let last_event_id = req.headers().get("last-event-id").cloned();
    let (op, who) = match admit_and_route(req, plane, peer, local, timeout).await {
        Ok(routed) => routed,
        Err(reply) => return reply.map(Either::Left),
    };
    let route::Op::Events { last_event_id: q } = op else {
        return ops::execute(op, plane, ops::Caller { who, peer })
            .await
            .map(Either::Left);
    };
    // The header wins: a browser's EventSource sends it when it
    // reconnects, to the URL (and query) of its first connect.
    let header = last_event_id.map(|v| {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        route::parse_event_id(&v).map_err(|e| format!("Last-Event-ID: {e}"))
    });
    match header.transpose() {
        Ok(h) => {
            stream::reply(&plane.shared.events, h.or(q), &link.stop, &link.cut).map(Either::Right)
        }
        Err(e) => Refusal::new(StatusCode::BAD_REQUEST, e)
            .reply()
            .map(Either::Left),
    }
}

/// Lets a request in (or refuses it), reads its body, and routes it.
async fn admit_and_route(
    req: Request<Incoming>,
    plane: &Plane,
    peer: &Peer,
    local: Option<SocketAddr>,
    timeout: Duration,
) -> Result<(route::Op, Who), Reply> {
    let shared = &plane.shared;
    let runtime = shared.runtime();
    let who = match access::admit(
        req.method(),
        req.uri().path(),
        req.headers(),
        peer,
        local,
        &runtime.config.admin,
    ) {
        Ok(who) => who,
        Err(refusal) => {
            if refusal.status == StatusCode::UNAUTHORIZED {
                shared
                    .stats
                    .admin_unauthorized
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(n) = shared.auth_failures.hit() {
                    warn!(failures = n, last_peer = %peer, "admin API: missing or wrong token");
                }
                tokio::time::sleep(FAILED_AUTH_DELAY).await;
            }
            return Err(refusal.reply());
        }
    };
    drop(runtime);
    let too_long = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64);
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        )
        .reply()
    };
    if too_long {
        return Err(too_large());
    }
    let method = req.method().clone();
    let uri = req.uri().clone();
    let body = tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect());
    match body.await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(too_large()),
        Err(_) => {
            return Err(Refusal::new(StatusCode::REQUEST_TIMEOUT, "request body too slow").reply());
        }
    }
    let exists = |name: &str| shared.backend(name).is_some();
    match route::route(&method, uri.path(), uri.query().unwrap_or(""), exists) {
        Ok(op) => Ok((op, who)),
        Err(refusal) => Err(refusal.reply()),
    }
}
