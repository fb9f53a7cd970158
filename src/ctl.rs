//! `sluice ctl`: the admin API from the command line, and `rollout`, the
//! whole rolling update as one command.
//!
//! Every command returns an [`Outcome`]; the binary turns it into the exit
//! code: 0 done, 1 error, 2 timed out.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::api::{BackendView, ConnView};
use crate::backend::State;
use crate::config::format_duration;

/// New connections on the other backends, while a started one takes none,
/// that show it is not back in rotation.
const SETTLE_EVIDENCE: u64 = 20;

/// The longest wait for one admin API reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How a command ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    TimedOut,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0} is not an admin URL such as http://127.0.0.1:9000")]
    BadUrl(String),
    #[error("cannot reach the admin API at {url}: {error}")]
    Unreachable { url: String, error: std::io::Error },
    #[error("admin API at {url}: {message}")]
    Http { url: String, message: String },
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Rollout(String),
}

/// A client of the admin API.
pub struct Client {
    authority: String,
    url: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client, CtlError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| CtlError::BadUrl(url.to_string()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(CtlError::BadUrl(url.to_string()));
        }
        Ok(Client {
            authority: authority.to_string(),
            url: url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// One request on its own connection; returns status and body. A
    /// silent server is given up on after [`REQUEST_TIMEOUT`], so that a
    /// wedged admin API cannot hang a rollout.
    async fn call(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), CtlError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_once(method, path))
            .await
            .unwrap_or_else(|_| {
                Err(CtlError::Http {
                    url: self.url.clone(),
                    message: format!("no answer within {}", format_duration(REQUEST_TIMEOUT)),
                })
            })
    }

    async fn call_once(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), CtlError> {
        let unreachable = |e| CtlError::Unreachable {
            url: self.url.clone(),
            error: e,
        };
        let http = |e: hyper::Error| CtlError::Http {
            url: self.url.clone(),
            message: e.to_string(),
        };
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(unreachable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| CtlError::Http {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, body))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, T), CtlError> {
        let (status, body) = self.call(method, path).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(CtlError::Api {
                status: status.as_u16(),
                message,
            });
        }
        let v = serde_json::from_slice(&body).map_err(|e| CtlError::Http {
            url: self.url.clone(),
            message: format!("unexpected reply: {e}"),
        })?;
        Ok((status, v))
    }

    /// The server's clock, in Unix milliseconds.
    pub async fn server_time_ms(&self) -> Result<u64, CtlError> {
        let (_, v): (_, serde_json::Value) = self.json(Method::GET, "/healthz").await?;
        v["time_ms"].as_u64().ok_or_else(|| CtlError::Http {
            url: self.url.clone(),
            message: "GET /healthz gave no time_ms".into(),
        })
    }

    pub async fn backends(&self) -> Result<Vec<BackendView>, CtlError> {
        Ok(self.json(Method::GET, "/backends").await?.1)
    }

    pub async fn backend(&self, name: &str) -> Result<BackendView, CtlError> {
        Ok(self
            .json(Method::GET, &format!("/backends/{name}"))
            .await?
            .1)
    }

    pub async fn connections(&self, name: &str) -> Result<Vec<ConnView>, CtlError> {
        Ok(self
            .json(Method::GET, &format!("/backends/{name}/connections"))
            .await?
            .1)
    }

    /// POSTs an action (`drain`, `stop`, `start`) with optional query.
    pub async fn act(
        &self,
        name: &str,
        action: &str,
        query: &[(&str, Option<Duration>)],
    ) -> Result<BackendView, CtlError> {
        let q: Vec<String> = query
            .iter()
            .filter_map(|(k, v)| v.map(|d| format!("{k}={}", format_duration(d))))
            .collect();
        let path = if q.is_empty() {
            format!("/backends/{name}/{action}")
        } else {
            format!("/backends/{name}/{action}?{}", q.join("&"))
        };
        Ok(self.json(Method::POST, &path).await?.1)
    }
}

/// Whether to colour output: only on a terminal.
fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// `HH:MM:SS` in UTC, for step logs.
fn clock() -> String {
    let s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}Z", s / 3600 % 24, s / 60 % 60, s % 60)
}

fn say(msg: &str) {
    println!("[{}] {msg}", clock());
}

/// Green in service, yellow draining, red out of service or down.
fn colour_of(b: &BackendView) -> &'static str {
    const GREEN: &str = "\x1b[32m";
    const YELLOW: &str = "\x1b[33m";
    const RED: &str = "\x1b[31m";
    match (b.state, b.healthy) {
        (State::Draining, _) => YELLOW,
        (State::Drained | State::Stopped, _) | (State::Active, false) => RED,
        (State::Active, true) => GREEN,
    }
}

/// The status table.
pub fn status_table(backends: &[BackendView], colour: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<24} {:<9} {:<7} {:>6} {:>10}",
        "NAME", "ADDRESS", "STATE", "HEALTH", "LIVE", "TOTAL"
    );
    for b in backends {
        let c = colour_of(b);
        let state = format!("{:<9}", b.state.as_str());
        let state = if colour {
            format!("{c}{state}\x1b[0m")
        } else {
            state
        };
        let health = if b.healthy { "up" } else { "down" };
        let _ = writeln!(
            out,
            "{:<12} {:<24} {state} {:<7} {:>6} {:>10}",
            b.name, b.address, health, b.active_connections, b.total_connections
        );
    }
    out
}

pub async fn status(c: &Client, json: bool) -> Result<Outcome, CtlError> {
    let bs = c.backends().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&bs).unwrap_or_default());
    } else {
        print!("{}", status_table(&bs, colour()));
    }
    Ok(Outcome::Done)
}

pub async fn conns(c: &Client, name: &str, json: bool) -> Result<Outcome, CtlError> {
    let list = c.connections(name).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(Outcome::Done);
    }
    println!(
        "{:<24} {:<10} {:>10} {:>10} {:>12} {:>12}",
        "CLIENT", "SERVICE", "AGE", "IDLE", "BYTES IN", "BYTES OUT"
    );
    for x in &list {
        println!(
            "{:<24} {:<10} {:>10} {:>10} {:>12} {:>12}",
            x.client,
            x.service,
            format!("{:.1}s", x.age_ms as f64 / 1000.0),
            format!("{:.1}s", x.idle_ms as f64 / 1000.0),
            x.bytes_in,
            x.bytes_out
        );
    }
    println!("{} live connection(s) on {name}", list.len());
    Ok(Outcome::Done)
}

/// Drain options shared by `drain` and `rollout`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainOpts {
    /// Give up waiting after this long; `None` waits until drained.
    pub wait: Option<Duration>,
    pub force_after: Option<Duration>,
    pub close_idle: Option<Duration>,
}

/// Drains `name` and shows its live count falling until it is drained.
pub async fn drain(c: &Client, name: &str, opts: DrainOpts) -> Result<Outcome, CtlError> {
    let started = Instant::now();
    let b = c
        .act(
            name,
            "drain",
            &[
                ("force_after", opts.force_after),
                ("close_idle", opts.close_idle),
            ],
        )
        .await?;
    if b.state == State::Draining {
        say(&format!(
            "{name}: draining with {} live connection(s); new clients go elsewhere",
            b.active_connections
        ));
    }
    let mut last = b.active_connections;
    loop {
        let b = c.backend(name).await?;
        if matches!(b.state, State::Drained | State::Stopped) && b.active_connections == 0 {
            say(&format!(
                "{name}: {} after {:.1}s, 0 live connections",
                b.state.as_str(),
                started.elapsed().as_secs_f64()
            ));
            return Ok(Outcome::Done);
        }
        if b.state == State::Active {
            return Err(CtlError::Rollout(format!(
                "{name} was started again while draining"
            )));
        }
        if b.active_connections != last {
            say(&format!(
                "{name}: {} live connection(s), {} idle",
                b.active_connections, b.idle_connections
            ));
            last = b.active_connections;
        }
        if let Some(w) = opts.wait
            && started.elapsed() >= w
        {
            say(&format!(
                "{name}: still draining after {} with {} live connection(s)",
                format_duration(w),
                b.active_connections
            ));
            return Ok(Outcome::TimedOut);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn stop(c: &Client, name: &str) -> Result<Outcome, CtlError> {
    let b = c.act(name, "stop", &[]).await?;
    say(&format!(
        "{name}: stopped, {} live connection(s) left",
        b.active_connections
    ));
    Ok(Outcome::Done)
}

pub async fn start(
    c: &Client,
    name: &str,
    wait_healthy: Option<Duration>,
) -> Result<Outcome, CtlError> {
    let b = c.act(name, "start", &[]).await?;
    say(&format!(
        "{name}: active{}",
        if b.healthy {
            ""
        } else {
            " (health check failing)"
        }
    ));
    let Some(limit) = wait_healthy else {
        return Ok(Outcome::Done);
    };
    let since = b.state_since_ms;
    if wait_until_healthy(c, name, since, limit).await? {
        say(&format!("{name}: healthy"));
        Ok(Outcome::Done)
    } else {
        say(&format!(
            "{name}: not healthy after {}",
            format_duration(limit)
        ));
        Ok(Outcome::TimedOut)
    }
}

/// Waits until a health check that began at or after `since_ms` passed.
/// A backend without active checks counts as healthy at once.
async fn wait_until_healthy(
    c: &Client,
    name: &str,
    since_ms: u64,
    limit: Duration,
) -> Result<bool, CtlError> {
    let started = Instant::now();
    loop {
        let b = c.backend(name).await?;
        if !b.health_checked || (b.healthy && b.last_ok_check_ms >= since_ms) {
            return Ok(true);
        }
        if started.elapsed() >= limit {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Options of `rollout`.
#[derive(Debug, Clone)]
pub struct RolloutOpts {
    pub exec: String,
    pub smoke: Option<String>,
    /// Backends in order; every backend when empty.
    pub backends: Vec<String>,
    pub min_active: usize,
    pub drain: DrainOpts,
    pub healthy_timeout: Duration,
    /// How long to wait for a started backend to take a new connection.
    pub settle: Duration,
}

/// Updates backends one at a time: drain, run the command, check health
/// and smoke, start, see it take traffic, next. Stops at the first failure
/// with the failing backend left out of rotation.
pub async fn rollout(c: &Client, opts: &RolloutOpts) -> Result<Outcome, CtlError> {
    let all = c.backends().await?;
    let order: Vec<String> = if opts.backends.is_empty() {
        all.iter().map(|b| b.name.clone()).collect()
    } else {
        for n in &opts.backends {
            if !all.iter().any(|b| &b.name == n) {
                return Err(CtlError::Rollout(format!("no backend is named `{n}`")));
            }
        }
        opts.backends.clone()
    };
    say(&format!(
        "rollout of {} backend(s): {}",
        order.len(),
        order.join(", ")
    ));
    let started = Instant::now();
    let mut done: Vec<String> = Vec::new();
    for name in &order {
        // A backend an admin took out stays as it is: a rollout must not
        // bring it back.
        if let Some(b) = all.iter().find(|b| &b.name == name)
            && b.state != State::Active
        {
            say(&format!(
                "{name}: {}, so skipped and left as it is",
                b.state.as_str()
            ));
            continue;
        }
        match rollout_one(c, name, opts).await {
            Ok(()) => done.push(name.clone()),
            Err((outcome, why)) => {
                say(&format!("{name}: FAILED: {why}"));
                let left: Vec<&String> = order
                    .iter()
                    .filter(|n| !done.contains(n) && *n != name)
                    .collect();
                println!(
                    "\nrollout stopped after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                println!("  updated:     {}", list(done.iter()));
                println!("  failed:      {name} ({why}); it stays out of rotation");
                println!("  not touched: {}", list(left.into_iter()));
                return match outcome {
                    Outcome::TimedOut => Ok(Outcome::TimedOut),
                    Outcome::Done => Err(CtlError::Rollout(format!("rollout failed at {name}"))),
                };
            }
        }
    }
    println!(
        "\nrollout done in {:.1}s: {} updated, every one back in rotation",
        started.elapsed().as_secs_f64(),
        done.join(", ")
    );
    Ok(Outcome::Done)
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

type StepError = (Outcome, String);

fn failed(e: CtlError) -> StepError {
    (Outcome::Done, e.to_string())
}

async fn rollout_one(c: &Client, name: &str, opts: &RolloutOpts) -> Result<(), StepError> {
    // 1. Enough others in service, in every service this backend serves.
    let all = c.backends().await.map_err(failed)?;
    // A reload may have removed it since the rollout began.
    let Some(me) = all.iter().find(|b| b.name == name) else {
        return Err((
            Outcome::Done,
            format!("no backend is named `{name}` any more (removed by a reload?)"),
        ));
    };
    let serving =
        |b: &&BackendView| b.name != name && b.state == State::Active && b.healthy && b.weight > 0;
    let short = if me.services.is_empty() {
        // A backend in no service: count every other one.
        let n = all.iter().filter(serving).count();
        (n < opts.min_active).then(|| format!("{n} other active healthy backend(s)"))
    } else {
        me.services.iter().find_map(|svc| {
            let n = all
                .iter()
                .filter(serving)
                .filter(|b| b.services.contains(svc))
                .count();
            (n < opts.min_active)
                .then(|| format!("service `{svc}` would keep {n} active healthy backend(s)"))
        })
    };
    if let Some(why) = short {
        return Err((
            Outcome::Done,
            format!(
                "refusing to take it out: {why}, --min-active is {}",
                opts.min_active
            ),
        ));
    }
    let address = me.address.clone();

    // 2. Drain.
    say(&format!("{name}: 1/5 drain"));
    match drain(c, name, opts.drain).await.map_err(failed)? {
        Outcome::Done => {}
        Outcome::TimedOut => {
            return Err((Outcome::TimedOut, "drain did not finish in time".into()));
        }
    }

    // 3. The command.
    say(&format!("{name}: 2/5 run: {}", opts.exec));
    run_shell(&opts.exec, name, &address)
        .await
        .map_err(|e| (Outcome::Done, e))?;
    // By the server's clock: ctl may run on another host.
    let after_command = c.server_time_ms().await.map_err(failed)?;

    // 4. Health, then smoke.
    say(&format!("{name}: 3/5 wait for a passing health check"));
    if !wait_until_healthy(c, name, after_command, opts.healthy_timeout)
        .await
        .map_err(failed)?
    {
        return Err((
            Outcome::TimedOut,
            format!(
                "no passing health check within {}",
                format_duration(opts.healthy_timeout)
            ),
        ));
    }
    if let Some(smoke) = &opts.smoke {
        say(&format!("{name}: 3/5 smoke test: {smoke}"));
        run_shell(smoke, name, &address)
            .await
            .map_err(|e| (Outcome::Done, e))?;
    }

    // 5. Back in rotation, and taking traffic.
    say(&format!("{name}: 4/5 start"));
    let before = c.backends().await.map_err(failed)?;
    c.act(name, "start", &[]).await.map_err(failed)?;
    say(&format!("{name}: 5/5 wait for new connections"));
    let total = |bs: &[BackendView], n: &str| {
        bs.iter()
            .find(|b| b.name == n)
            .map_or(0, |b| b.total_connections)
    };
    let others_total = |bs: &[BackendView]| -> u64 {
        bs.iter()
            .filter(|b| b.name != name)
            .map(|b| b.total_connections)
            .sum()
    };
    let t0 = Instant::now();
    loop {
        let now = c.backends().await.map_err(failed)?;
        if total(&now, name) > total(&before, name) {
            say(&format!("{name}: back in rotation and taking connections"));
            return Ok(());
        }
        if t0.elapsed() >= opts.settle {
            // Only a clear imbalance is a failure: with light traffic the
            // few new clients may all have gone elsewhere by turn.
            let others_new = others_total(&now) - others_total(&before);
            if others_new >= SETTLE_EVIDENCE {
                // Out of rotation again, as the report will say.
                let _ = c.act(name, "drain", &[]).await;
                return Err((
                    Outcome::Done,
                    format!(
                        "took no new connection within {} while the others took {others_new}",
                        format_duration(opts.settle)
                    ),
                ));
            }
            say(&format!(
                "{name}: back in rotation (no client arrived within {}: no traffic)",
                format_duration(opts.settle)
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `command` with `sh -c`, its output shown, with the backend in its
/// environment.
async fn run_shell(command: &str, name: &str, address: &str) -> Result<(), String> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("SLUICE_BACKEND", name)
        .env("SLUICE_ADDRESS", address)
        .stdin(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("cannot run `{command}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{command}` failed ({status})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(Client::new("http://127.0.0.1:9000", None).is_ok());
        assert!(Client::new("http://127.0.0.1:9000/", None).is_ok());
        for bad in ["127.0.0.1:9000", "https://x:1", "http://", "http://a/b"] {
            assert!(Client::new(bad, None).is_err(), "{bad}");
        }
    }
}
