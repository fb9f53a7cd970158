//! Active health checks: a TCP connect, or `GET path` expecting a status.
//!
//! Health is its own axis: a check only ever flips a backend's `healthy`
//! flag, never its admin state. Passive checks (failed proxied connects)
//! are counted in [`crate::backend::Backend::connect_failed`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{HealthCheck, HealthConfig};
use crate::pool::Target;

/// What to check and where.
#[derive(Debug, Clone)]
pub struct Probe {
    pub check: HealthCheck,
    pub target: Target,
}

/// Checks `backend` every `cfg.interval` until `stop` is cancelled.
pub async fn run(backend: Arc<Backend>, probe: Probe, cfg: HealthConfig, stop: CancellationToken) {
    backend.set_checked(true);
    loop {
        let started = unix_ms();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(cfg.timeout, check_once(&probe)) => r,
        };
        match result {
            Ok(Ok(())) => backend.check_passed(started, cfg.rise),
            Ok(Err(e)) => backend.check_failed(cfg.fall, &e),
            Err(_) => backend.check_failed(cfg.fall, "no answer within the check timeout"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One check; the caller bounds it with the timeout.
async fn check_once(probe: &Probe) -> Result<(), String> {
    let mut s = crate::proxy::connect(&probe.target, Duration::from_secs(3600))
        .await
        .map_err(|e| format!("connect to {}: {e}", probe.target))?;
    let HealthCheck::Http { path, status, .. } = &probe.check else {
        return Ok(());
    };
    let host = match &probe.target {
        Target::Addr(a) => a.to_string(),
        Target::Host(h, p) => format!("{h}:{p}"),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send request: {e}"))?;
    // Only the status line matters; read until it is complete.
    let mut buf = [0u8; 512];
    let mut len = 0;
    while !buf[..len].contains(&b'\n') && len < buf.len() {
        let n = s
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("read reply: {e}"))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let line = line.lines().next().unwrap_or("");
    let got: Option<u16> = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok());
    match got {
        Some(code) if code == *status => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}, expected {status}")),
        None => Err(format!("GET {path}: no HTTP status line in the reply")),
    }
}
