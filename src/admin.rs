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
//! | GET  | `/stats` | clients refused (limit, no backend), accept errors, live total |
//!
//! Repeating a drain while the same drain runs keeps one policy, the
//! tighter one (the earlier `force_after` deadline, the shorter
//! `close_idle`). Durations read like `1500ms`, `30s`, `5m`; query values
//! may be percent-encoded. Errors are `{"error": "..."}`
//! with 400 (bad parameter), 401 (token), 404 (unknown path or backend),
//! 405 (wrong method), 413 (body too large). With `[admin] token` set every
//! call needs `Authorization: Bearer TOKEN`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::{BackendView, ConnView, ErrorView, HealthzView, StatsView};
use crate::backend::{Backend, ConnInfo, DrainPolicy};
use crate::config::parse_duration;
use crate::health::unix_ms;
use crate::state::Shared;

/// Largest request body accepted; the API takes its input in the query.
const MAX_BODY: usize = 4096;
/// Idle time after which the API counts a connection as idle.
const IDLE_REPORT: Duration = Duration::from_secs(10);

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, addr)) => (s, Peer::Tcp(addr)),
                Err(e) => {
                    warn!(error = %e, "admin accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, peer, shared.clone(), stop.clone()));
    }
}

/// Who is at the other end of an admin connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Serves one admin connection until it ends or `stop` is cancelled (then
/// the request in progress is answered first). Any byte stream will do,
/// which is how the fuzz target drives the whole request path.
pub async fn serve_connection<I>(io: I, peer: Peer, shared: Arc<Shared>, stop: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _ = &peer;
    // Read per connection, so a reload applies to the next one.
    let timeout = shared.runtime().config.admin.request_timeout;
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(req, &shared, timeout).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        debug!(error = %e, "admin connection ended with an error");
    }
}

type Reply = Response<Full<Bytes>>;

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
        }
        r
    }
}

async fn handle(req: Request<Incoming>, shared: &Shared, timeout: Duration) -> Reply {
    if let Some(token) = &shared.runtime().config.admin.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map_or(&b""[..], |v| bearer(v.as_bytes()));
        if !bool::from(given.ct_eq(token.as_bytes())) {
            return Refusal::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer TOKEN",
            )
            .reply();
        }
    }
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
        return too_large();
    }
    let method = req.method().clone();
    let uri = req.uri().clone();
    let body = tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect());
    match body.await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            return Refusal::new(StatusCode::REQUEST_TIMEOUT, "request body too slow").reply();
        }
    }
    let exists = |name: &str| shared.backend(name).is_some();
    match route(&method, uri.path(), uri.query().unwrap_or(""), exists) {
        Ok(op) => execute(op, shared).await,
        Err(refusal) => refusal.reply(),
    }
}

/// The token of an `Authorization: Bearer TOKEN` value, as bytes (a value
/// that is not text compares unequal, it does not fail); empty if none.
fn bearer(value: &[u8]) -> &[u8] {
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return b"";
    };
    let (scheme, token) = value.split_at(space);
    if scheme.eq_ignore_ascii_case(b"bearer") {
        token.trim_ascii()
    } else {
        b""
    }
}

/// What a request asks for, once routed and its parameters read.
#[derive(Debug, PartialEq)]
enum Op {
    Healthz,
    Stats,
    Backends,
    Backend(String),
    Connections(String),
    Drain {
        name: String,
        wait: Option<Duration>,
        policy: DrainPolicy,
    },
    Stop(String),
    Start(String),
}

/// Routes a request to its operation; `exists` tells which backends do.
/// Checked in this order: a parameter given twice, the path, the backend,
/// the method, unknown parameters, then the values in the order the path
/// lists them.
fn route(
    method: &Method,
    path: &str,
    query: &str,
    exists: impl Fn(&str) -> bool,
) -> Result<Op, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    for (i, (k, _)) in params.iter().enumerate() {
        if params[..i].iter().any(|(n, _)| n == k) {
            return Err(bad(format!("parameter `{k}` is given twice")));
        }
    }
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let no_path = || Refusal::new(StatusCode::NOT_FOUND, format!("no such path: {path}"));
    let (allowed, accepted): (&'static str, &[&str]) = match parts.as_slice() {
        ["healthz"] | ["stats"] | ["backends"] => ("GET", &[]),
        ["backends", name, rest @ ..] => {
            if !exists(name) {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!("no backend is named `{name}`"),
                ));
            }
            match rest {
                [] | ["connections"] => ("GET", &[]),
                ["drain"] => ("POST", &["wait", "force_after", "close_idle"]),
                ["stop"] | ["start"] => ("POST", &[]),
                _ => return Err(no_path()),
            }
        }
        _ => return Err(no_path()),
    };
    if method.as_str() != allowed {
        return Err(Refusal {
            allow: Some(allowed),
            ..Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}; use {allowed}"),
            )
        });
    }
    if let Some((k, _)) = params.iter().find(|(k, _)| !accepted.contains(&k.as_str())) {
        let known = if accepted.is_empty() {
            "none".to_string()
        } else {
            accepted.join(", ")
        };
        return Err(bad(format!("unknown parameter `{k}` (accepted: {known})")));
    }
    let mut given = [None; 3];
    for (slot, k) in given.iter_mut().zip(accepted) {
        if let Some((_, v)) = params.iter().find(|(n, _)| n == k) {
            *slot = Some(parse_duration(v).map_err(|e| bad(format!("{k}: {e}")))?);
        }
    }
    let name = || parts[1].to_string();
    Ok(match parts.as_slice() {
        ["healthz"] => Op::Healthz,
        ["stats"] => Op::Stats,
        ["backends"] => Op::Backends,
        ["backends", _] => Op::Backend(name()),
        [_, _, "connections"] => Op::Connections(name()),
        [_, _, "stop"] => Op::Stop(name()),
        [_, _, "start"] => Op::Start(name()),
        _ => Op::Drain {
            name: name(),
            wait: given[0],
            policy: DrainPolicy {
                force_after: given[1],
                close_idle: given[2],
            },
        },
    })
}

async fn execute(op: Op, shared: &Shared) -> Reply {
    let backend = |name: &str| shared.backend(name);
    match op {
        Op::Healthz => {
            if shared.shutting_down.load(Ordering::SeqCst) {
                let v = HealthzView {
                    status: "shutting down".into(),
                    time_ms: None,
                };
                json(StatusCode::SERVICE_UNAVAILABLE, &v)
            } else {
                let v = HealthzView {
                    status: "ok".into(),
                    time_ms: Some(unix_ms()),
                };
                json(StatusCode::OK, &v)
            }
        }
        Op::Stats => {
            let s = &shared.stats;
            let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            let v = StatsView {
                abandoned: n(&s.abandoned),
                accept_errors: n(&s.accept_errors),
                accepted: n(&s.accepted),
                active_connections: shared.live(),
                established: n(&s.established),
                rejected_limit: n(&s.rejected_limit),
                rejected_no_backend: n(&s.rejected_no_backend),
                rejected_resources: n(&s.rejected_resources),
                resource_shortages: n(&s.shortage.total),
            };
            json(StatusCode::OK, &v)
        }
        Op::Backends => {
            let views: Vec<_> = shared
                .backends()
                .iter()
                .map(|b| backend_view(b, shared))
                .collect();
            json(StatusCode::OK, &views)
        }
        // A backend removed between routing and here is simply gone.
        Op::Backend(name) => with(backend(&name), &name, |b| {
            json(StatusCode::OK, &backend_view(&b, shared))
        }),
        Op::Connections(name) => with(backend(&name), &name, |b| {
            let v: Vec<_> = b.connections().iter().map(|c| conn_view(c)).collect();
            json(StatusCode::OK, &v)
        }),
        Op::Drain { name, wait, policy } => {
            let Some(b) = backend(&name) else {
                return gone(&name);
            };
            let drain = b.drain(policy, &shared.tasks);
            if let Some(limit) = wait {
                // Also over when someone starts the backend again meanwhile.
                drain.wait(limit).await;
            }
            let status = if b.is_drained() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            json(status, &backend_view(&b, shared))
        }
        Op::Stop(name) => {
            let Some(b) = backend(&name) else {
                return gone(&name);
            };
            b.stop();
            // Closing is asynchronous; give the connections a moment so
            // the reply shows the count they leave behind.
            b.wait_until(Duration::from_secs(1), |b| b.live() == 0)
                .await;
            json(StatusCode::OK, &backend_view(&b, shared))
        }
        Op::Start(name) => with(backend(&name), &name, |b| {
            b.start();
            json(StatusCode::OK, &backend_view(&b, shared))
        }),
    }
}

fn gone(name: &str) -> Reply {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("no backend is named `{name}`"),
    )
    .reply()
}

fn with(b: Option<Arc<Backend>>, name: &str, f: impl FnOnce(Arc<Backend>) -> Reply) -> Reply {
    b.map_or_else(|| gone(name), f)
}

/// One backend as the API shows it.
fn backend_view(b: &Backend, shared: &Shared) -> BackendView {
    let health = b.health();
    BackendView {
        services: shared.services_of(b),
        name: b.name.clone(),
        address: b.address().to_string(),
        state: b.state(),
        healthy: health.up,
        health_checked: health.checked,
        weight: b.weight(),
        active_connections: b.live(),
        idle_connections: b.idle_count(IDLE_REPORT),
        total_connections: b.total_connections.load(Ordering::Relaxed),
        connect_failures: b.connect_failures.load(Ordering::Relaxed),
        bytes_in: b.bytes_in.load(Ordering::Relaxed),
        bytes_out: b.bytes_out.load(Ordering::Relaxed),
        bytes_spliced: b.bytes_spliced.load(Ordering::Relaxed),
        state_since_ms: b.state_since_ms(),
        health_since_ms: health.since_ms,
        last_ok_check_ms: health.last_ok_check_ms,
    }
}

/// One live connection as the API shows it.
fn conn_view(c: &ConnInfo) -> ConnView {
    ConnView {
        id: c.id,
        client: c.client.to_string(),
        service: c.service.to_string(),
        age_ms: c.started.elapsed().as_millis() as u64,
        idle_ms: c.idle().as_millis() as u64,
        bytes_in: c.bytes_in.load(Ordering::Relaxed),
        bytes_out: c.bytes_out.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(method: Method, target: &str) -> Result<Op, Refusal> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        route(&method, path, query, |n| n == "web1")
    }

    fn refused(r: Result<Op, Refusal>) -> (u16, String) {
        let r = r.unwrap_err();
        (r.status.as_u16(), r.message)
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer s3cret"), b"s3cret");
        assert_eq!(bearer(b"bearer  s3cret "), b"s3cret");
        assert_eq!(bearer(b"Basic s3cret"), b"");
        assert_eq!(bearer(b"s3cret"), b"");
        assert_eq!(bearer("Bearer s\u{e9}".as_bytes()), "s\u{e9}".as_bytes());
    }

    #[test]
    fn reads_and_actions() {
        assert_eq!(at(Method::GET, "/healthz"), Ok(Op::Healthz));
        assert_eq!(at(Method::GET, "/stats/"), Ok(Op::Stats));
        assert_eq!(at(Method::GET, "/backends"), Ok(Op::Backends));
        assert_eq!(
            at(Method::GET, "/backends/web1"),
            Ok(Op::Backend("web1".into()))
        );
        assert_eq!(
            at(Method::GET, "/backends/web1/connections"),
            Ok(Op::Connections("web1".into()))
        );
        assert_eq!(
            at(Method::POST, "/backends/web1/stop"),
            Ok(Op::Stop("web1".into()))
        );
        assert_eq!(
            at(Method::POST, "/backends/web1/start"),
            Ok(Op::Start("web1".into()))
        );
    }

    #[test]
    fn drain_reads_its_durations_percent_decoded() {
        let s = |x| Some(Duration::from_secs(x));
        assert_eq!(
            at(
                Method::POST,
                "/backends/web1/drain?wait=5s&force_after=1m&close_idle=%32s"
            ),
            Ok(Op::Drain {
                name: "web1".into(),
                wait: s(5),
                policy: DrainPolicy {
                    force_after: s(60),
                    close_idle: s(2),
                },
            })
        );
        assert_eq!(
            at(Method::POST, "/backends/web1/drain"),
            Ok(Op::Drain {
                name: "web1".into(),
                wait: None,
                policy: DrainPolicy::default(),
            })
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        assert_eq!(
            refused(at(Method::GET, "/nope")),
            (404, "no such path: /nope".into())
        );
        assert_eq!(
            refused(at(Method::POST, "/backends/web2/drain")),
            (404, "no backend is named `web2`".into()),
            "an unknown backend before the method"
        );
        assert_eq!(
            refused(at(Method::GET, "/backends/web1/bogus")),
            (404, "no such path: /backends/web1/bogus".into())
        );
        let r = at(Method::GET, "/backends/web1/drain").unwrap_err();
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.allow, Some("POST"));
        assert_eq!(
            refused(at(Method::POST, "/backends/web1/drain?wait=1s&wait=2s")),
            (400, "parameter `wait` is given twice".into())
        );
        assert_eq!(
            refused(at(Method::POST, "/backends/web1/drain?speed=1s")),
            (
                400,
                "unknown parameter `speed` (accepted: wait, force_after, close_idle)".into()
            )
        );
        assert_eq!(
            refused(at(Method::GET, "/backends?x=1")),
            (400, "unknown parameter `x` (accepted: none)".into())
        );
        assert_eq!(
            refused(at(Method::GET, "/nope?a=1&a=2")),
            (400, "parameter `a` is given twice".into()),
            "a repeated parameter before the path"
        );
        assert_eq!(
            refused(at(Method::POST, "/backends/web1/drain?wait=bad&speed=1s")),
            (
                400,
                "unknown parameter `speed` (accepted: wait, force_after, close_idle)".into()
            ),
            "unknown parameters before values"
        );
        let (_, message) = refused(at(Method::POST, "/backends/web1/drain?close_idle=x&wait=y"));
        assert!(
            message.starts_with("wait: "),
            "values in the path's order: {message}"
        );
        let (status, message) = refused(at(Method::POST, "/backends/web1/drain?wait=soon"));
        assert_eq!(status, 400);
        assert!(
            message.starts_with("wait: `soon` is not a duration"),
            "{message}"
        );
    }
}
