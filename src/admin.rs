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
//! Durations read like `1500ms`, `30s`, `5m`. Errors are `{"error": "..."}`
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
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::{BackendView, ConnView};
use crate::backend::{Backend, ConnInfo, State};
use crate::config::parse_duration;
use crate::server::Shared;

/// Largest request body accepted; the API takes its input in the query.
const MAX_BODY: usize = 4096;
/// Idle time after which `close_idle` counts a connection as idle, when
/// nothing else says.
const IDLE_REPORT: Duration = Duration::from_secs(10);

/// One backend as the API shows it.
fn backend_view(b: &Backend, shared: &Shared) -> BackendView {
    BackendView {
        services: shared.services_of(b),
        name: b.name.clone(),
        address: b.address().to_string(),
        state: b.state(),
        healthy: b.healthy(),
        health_checked: b.is_checked(),
        weight: b.weight(),
        active_connections: b.live(),
        idle_connections: b.idle_count(IDLE_REPORT),
        total_connections: b.total_connections.load(Ordering::Relaxed),
        connect_failures: b.connect_failures.load(Ordering::Relaxed),
        bytes_in: b.bytes_in.load(Ordering::Relaxed),
        bytes_out: b.bytes_out.load(Ordering::Relaxed),
        bytes_spliced: b.bytes_spliced.load(Ordering::Relaxed),
        state_since_ms: b.state_since_ms(),
        health_since_ms: b.health_since_ms(),
        last_ok_check_ms: b.last_ok_check_ms(),
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

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        let timeout = shared.admin_timeout;
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
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
        });
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

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    json(status, &serde_json::json!({ "error": message.into() }))
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Reply {
    if let Some(token) = shared.admin_token() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, t)| t.trim());
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer TOKEN",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let too_long = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if too_long {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        );
    }
    let body = tokio::time::timeout(
        shared.admin_timeout,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await;
    match body {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            );
        }
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "request body too slow"),
    }
    route(&method, &path, &query, shared).await
}

async fn route(method: &Method, path: &str, query: &str, shared: &Shared) -> Reply {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let allow = |allowed: &'static str| -> Option<Reply> {
        if method.as_str() == allowed {
            return None;
        }
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}; use {allowed}"),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
        Some(r)
    };
    let params = match parse_query(query) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let only = |names: &[&str]| -> Option<Reply> {
        params
            .iter()
            .find(|(k, _)| !names.contains(&k.as_str()))
            .map(|(k, _)| {
                let known = if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                };
                error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter `{k}` (accepted: {known})"),
                )
            })
    };
    match parts.as_slice() {
        ["healthz"] => {
            if let Some(r) = allow("GET").or_else(|| only(&[])) {
                return r;
            }
            if shared.shutting_down.load(Ordering::SeqCst) {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({ "status": "shutting down" }),
                )
            } else {
                // The server's clock, so that clients on other hosts can
                // compare check times without trusting their own.
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "status": "ok", "time_ms": now_ms }),
                )
            }
        }
        ["stats"] => {
            if let Some(r) = allow("GET").or_else(|| only(&[])) {
                return r;
            }
            let s = &shared.stats;
            let live: usize = shared.backends().iter().map(|b| b.live()).sum();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "active_connections": live,
                    "rejected_limit": s.rejected_limit.load(Ordering::Relaxed),
                    "rejected_no_backend": s.rejected_no_backend.load(Ordering::Relaxed),
                    "accept_errors": s.accept_errors.load(Ordering::Relaxed),
                }),
            )
        }
        ["backends"] => {
            if let Some(r) = allow("GET").or_else(|| only(&[])) {
                return r;
            }
            let views: Vec<_> = shared
                .backends()
                .iter()
                .map(|b| backend_view(b, shared))
                .collect();
            json(StatusCode::OK, &views)
        }
        ["backends", name, rest @ ..] => {
            let Some(b) = shared.backend(name) else {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no backend is named `{name}`"),
                );
            };
            match rest {
                [] => allow("GET")
                    .or_else(|| only(&[]))
                    .unwrap_or_else(|| json(StatusCode::OK, &backend_view(&b, shared))),
                ["connections"] => allow("GET").or_else(|| only(&[])).unwrap_or_else(|| {
                    let v: Vec<_> = b.connections().iter().map(|c| conn_view(c)).collect();
                    json(StatusCode::OK, &v)
                }),
                ["drain"] => {
                    if let Some(r) =
                        allow("POST").or_else(|| only(&["wait", "force_after", "close_idle"]))
                    {
                        return r;
                    }
                    let mut d = [None, None, None];
                    for (i, k) in ["wait", "force_after", "close_idle"].iter().enumerate() {
                        if let Some((_, v)) = params.iter().find(|(n, _)| n == k) {
                            match parse_duration(v) {
                                Ok(x) => d[i] = Some(x),
                                Err(e) => {
                                    return error(StatusCode::BAD_REQUEST, format!("{k}: {e}"));
                                }
                            }
                        }
                    }
                    drain(&b, shared, d[0], d[1], d[2]).await
                }
                ["stop"] => {
                    if let Some(r) = allow("POST").or_else(|| only(&[])) {
                        return r;
                    }
                    b.stop();
                    // Closing is asynchronous; give the connections a moment
                    // so the reply shows the count they leave behind.
                    b.wait_until(Duration::from_secs(1), |b| b.live() == 0)
                        .await;
                    json(StatusCode::OK, &backend_view(&b, shared))
                }
                ["start"] => {
                    if let Some(r) = allow("POST").or_else(|| only(&[])) {
                        return r;
                    }
                    b.start();
                    json(StatusCode::OK, &backend_view(&b, shared))
                }
                _ => error(StatusCode::NOT_FOUND, format!("no such path: {path}")),
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such path: {path}")),
    }
}

async fn drain(
    b: &Arc<Backend>,
    shared: &Shared,
    wait: Option<Duration>,
    force_after: Option<Duration>,
    close_idle: Option<Duration>,
) -> Reply {
    let generation = b.drain();
    if let Some(limit) = force_after {
        let b = b.clone();
        tokio::spawn(async move {
            if !b.wait_until(limit, |b| b.state() != State::Draining).await {
                b.force_close_if(generation);
            }
        });
    }
    if let Some(idle) = close_idle {
        let b = b.clone();
        tokio::spawn(async move {
            let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
            while b.state() == State::Draining && b.generation() == generation {
                let n = b.close_idle(idle);
                if n > 0 {
                    tracing::info!(backend = %b.name, closed = n, "closed idle connections of a draining backend");
                }
                b.wait_until(every, |b| b.state() != State::Draining).await;
            }
        });
    }
    if let Some(limit) = wait {
        // Also done when someone starts the backend again meanwhile.
        b.wait_until(limit, |b| {
            b.is_drained() || b.generation() != generation && b.state() == State::Active
        })
        .await;
    }
    let status = if b.is_drained() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    json(status, &backend_view(b, shared))
}

fn parse_query(q: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if out.iter().any(|(n, _)| n == k) {
            return Err(format!("parameter `{k}` is given twice"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn query() {
        assert_eq!(parse_query("wait=5s&force_after=1m").unwrap().len(), 2);
        assert!(parse_query("wait=1s&wait=2s").is_err());
        assert!(parse_query("").unwrap().is_empty());
    }
}
