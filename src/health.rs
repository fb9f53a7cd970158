//! Health, its own axis beside the admin state: the [`Health`] value,
//! whose rise and fall is a pure function of what happened, and the active
//! checks (a TCP connect, or `GET path` expecting a status) that feed it.
//! Failed proxied connects (passive checks) feed the same value.
//!
//! Nothing here knows a backend: a check loop reports each result to the
//! function it is given, so this module sits below `backend`.

use std::time::{Duration, SystemTime};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::config::{HealthCheck, HealthConfig, ProxyVersion};
use crate::net::Target;

/// Something that tells about a backend's health.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Active checks start (they are configured for the backend).
    ChecksOn,
    /// Active checks stop; a backend nobody checks counts as up.
    ChecksOff,
    /// An active check that began at this Unix time (ms) passed.
    CheckPassed { started_ms: u64 },
    /// An active check failed, and why.
    CheckFailed(String),
    /// A proxied connect failed.
    ConnectFailed,
    /// A proxied connect succeeded.
    ConnectSucceeded,
}

/// The numbers that turn events into up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Passes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row (checks, or connects while checked) that take an
    /// up backend down.
    pub fall: u32,
}

impl From<&HealthConfig> for Rules {
    fn from(c: &HealthConfig) -> Rules {
        Rules {
            rise: c.rise,
            fall: c.fall,
        }
    }
}

/// A change of health, with the reason to log.
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    pub up: bool,
    pub why: String,
}

/// What is known of one backend's health.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub up: bool,
    /// Whether active checks run, so that a backend marked down can come back.
    pub checked: bool,
    checks_ok_in_row: u32,
    checks_failed_in_row: u32,
    connects_failed_in_row: u32,
    /// Unix time (ms) of the last change of `up`.
    pub since_ms: u64,
    /// Unix time (ms) at which the last passing check began; 0 if none.
    pub last_ok_check_ms: u64,
    /// While down: what took it down (the last check's error, or the
    /// failed connects), for `ctl status`.
    pub why_down: Option<String>,
}

impl Health {
    /// Up and unchecked, as a backend starts.
    pub fn new(now_ms: u64) -> Health {
        Health {
            up: true,
            checked: false,
            checks_ok_in_row: 0,
            checks_failed_in_row: 0,
            connects_failed_in_row: 0,
            since_ms: now_ms,
            last_ok_check_ms: 0,
            why_down: None,
        }
    }

    /// Records `event`; returns the flip it causes, if any.
    ///
    /// - `rise` passing checks in a row bring a down backend up; after
    ///   passive failures one pass is enough, since the connects were what
    ///   took it down.
    /// - `fall` failing checks in a row take it down.
    /// - `fall` failed connects in a row take it down, only while active
    ///   checks run: without them nothing could bring it back.
    pub fn record(&mut self, event: &Event, rules: Rules, now_ms: u64) -> Option<Flip> {
        let flip = match event {
            Event::ChecksOn => {
                self.checked = true;
                None
            }
            Event::ChecksOff => {
                self.checked = false;
                self.turn(true, "health checks are off")
            }
            Event::CheckPassed { started_ms } => {
                self.checks_failed_in_row = 0;
                self.checks_ok_in_row = self.checks_ok_in_row.saturating_add(1);
                let passive = std::mem::take(&mut self.connects_failed_in_row) > 0;
                self.last_ok_check_ms = *started_ms;
                if self.checks_ok_in_row >= rules.rise || passive {
                    self.turn(true, "health check passed")
                } else {
                    None
                }
            }
            Event::CheckFailed(error) => {
                self.checks_ok_in_row = 0;
                self.checks_failed_in_row = self.checks_failed_in_row.saturating_add(1);
                let run = self.checks_failed_in_row;
                if run >= rules.fall {
                    self.turn(
                        false,
                        &format!("{run} health checks failed in a row, last: {error}"),
                    )
                } else {
                    None
                }
            }
            Event::ConnectFailed => {
                self.connects_failed_in_row = self.connects_failed_in_row.saturating_add(1);
                let run = self.connects_failed_in_row;
                if run >= rules.fall && self.checked && self.up {
                    self.checks_ok_in_row = 0;
                    self.turn(false, &format!("{run} connects failed in a row"))
                } else {
                    None
                }
            }
            Event::ConnectSucceeded => {
                self.connects_failed_in_row = 0;
                None
            }
        };
        if flip.is_some() {
            self.since_ms = now_ms;
        }
        flip
    }

    /// Whether a run of failed connects is under way.
    pub fn connects_failing(&self) -> bool {
        self.connects_failed_in_row > 0
    }

    fn turn(&mut self, up: bool, why: &str) -> Option<Flip> {
        if self.up == up {
            return None;
        }
        self.up = up;
        self.why_down = (!up).then(|| why.to_string());
        Some(Flip {
            up,
            why: why.to_string(),
        })
    }
}

/// What to check and where.
#[derive(Debug, Clone)]
pub struct Probe {
    pub check: HealthCheck,
    pub target: Target,
    /// A PROXY header to send first, for a server that refuses
    /// connections without one: v2 `LOCAL`, v1 `UNKNOWN`, which say the
    /// connection is the checker's own.
    pub send_proxy: Option<ProxyVersion>,
}

/// Checks every `cfg.interval` until `stop` is cancelled, and reports each
/// result to `report` (starting with [`Event::ChecksOn`]).
pub async fn run(
    probe: Probe,
    cfg: HealthConfig,
    stop: CancellationToken,
    report: impl Fn(Event) + Send,
) {
    report(Event::ChecksOn);
    loop {
        let started_ms = unix_ms();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(cfg.timeout, check_once(&probe, cfg.timeout)) => r,
        };
        match result {
            Ok(Ok(())) => report(Event::CheckPassed { started_ms }),
            // sluice's own shortage says nothing of the backend.
            Ok(Err(Failure::Shortage(e))) => {
                tracing::debug!(target = %probe.target, error = %e, "health check skipped: sluice is short of a resource");
            }
            Ok(Err(Failure::Backend(e))) => report(Event::CheckFailed(e)),
            Err(_) => report(Event::CheckFailed(
                "no answer within the check timeout".into(),
            )),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a check did not pass.
enum Failure {
    /// The backend's doing, with what to log.
    Backend(String),
    /// sluice had no descriptor or buffer to check with.
    Shortage(std::io::Error),
}

impl Failure {
    /// A failed connect or write: sluice's shortage (its OS error says
    /// so), or else the backend's, told with `what` was done.
    fn of(e: std::io::Error, what: impl FnOnce() -> String) -> Failure {
        if crate::net::is_shortage(&e) {
            Failure::Shortage(e)
        } else {
            Failure::Backend(format!("{}: {e}", what()))
        }
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Backend(e)
    }
}

/// One check; the caller bounds the whole of it by `timeout` as well.
async fn check_once(probe: &Probe, timeout: Duration) -> Result<(), Failure> {
    let mut stream = crate::net::connect(&probe.target, timeout)
        .await
        .map_err(|e| Failure::of(e, || format!("connect to {}", probe.target)))?;
    if let Some(v) = probe.send_proxy {
        send_header(&mut stream, v, &probe.target).await?;
    }
    let HealthCheck::Http { path, status, .. } = &probe.check else {
        return Ok(());
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    // The connection task ends with the check: dropping the sender closes it.
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path.as_str())
        .header(hyper::header::HOST, probe.target.to_string())
        .header(hyper::header::USER_AGENT, "sluice-health")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let reply = sender.send_request(req).await;
    conn.abort();
    let code = reply.map_err(|e| format!("GET {path}: {e}"))?.status();
    if code.as_u16() == *status {
        Ok(())
    } else {
        Err(format!("GET {path} answered {}, expected {status}", code.as_u16()).into())
    }
}

/// Writes the header that says the connection is the checker's own.
async fn send_header<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    version: ProxyVersion,
    target: &Target,
) -> Result<(), Failure> {
    let header = crate::proxy_header::encode(version, None);
    tokio::io::AsyncWriteExt::write_all(stream, header.as_bytes())
        .await
        .map_err(|e| Failure::of(e, || format!("send the PROXY header to {target}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules { rise: 2, fall: 2 };

    fn checked() -> Health {
        let mut h = Health::new(0);
        h.record(&Event::ChecksOn, RULES, 0);
        h
    }

    fn failed() -> Event {
        Event::CheckFailed("x".into())
    }

    #[test]
    fn fall_then_rise() {
        let mut h = checked();
        assert_eq!(h.record(&failed(), RULES, 1), None);
        let down = h.record(&failed(), RULES, 2).unwrap();
        assert!(!down.up && down.why.contains("2 health checks failed"));
        assert_eq!(h.since_ms, 2);
        assert_eq!(
            h.record(&Event::CheckPassed { started_ms: 3 }, RULES, 3),
            None
        );
        assert!(!h.up, "one pass is not a rise of 2");
        assert!(
            h.record(&Event::CheckPassed { started_ms: 4 }, RULES, 4)
                .unwrap()
                .up
        );
        assert_eq!(h.last_ok_check_ms, 4);
    }

    #[test]
    fn a_pass_breaks_a_run_of_failures() {
        let mut h = checked();
        h.record(&failed(), RULES, 1);
        h.record(&Event::CheckPassed { started_ms: 2 }, RULES, 2);
        assert_eq!(h.record(&failed(), RULES, 3), None);
        assert!(h.up);
    }

    #[test]
    fn passive_failures_need_active_checks() {
        let mut h = Health::new(0);
        for t in 0..5 {
            assert_eq!(h.record(&Event::ConnectFailed, RULES, t), None);
        }
        assert!(h.up, "nothing would bring it back without checks");
    }

    #[test]
    fn passive_failures_take_it_down_until_one_check_passes() {
        let mut h = checked();
        h.record(&Event::ConnectFailed, RULES, 1);
        assert!(!h.record(&Event::ConnectFailed, RULES, 2).unwrap().up);
        let up = h
            .record(&Event::CheckPassed { started_ms: 3 }, RULES, 3)
            .unwrap();
        assert!(up.up, "one pass is enough after passive failures");
    }

    #[test]
    fn a_good_connect_resets_the_passive_run() {
        let mut h = checked();
        h.record(&Event::ConnectFailed, RULES, 1);
        h.record(&Event::ConnectSucceeded, RULES, 2);
        assert_eq!(h.record(&Event::ConnectFailed, RULES, 3), None);
        assert!(h.up);
    }

    /// A header write that fails for want of buffers skips the check, as
    /// a connect that does: it says nothing of the backend.
    #[tokio::test]
    async fn a_header_write_short_of_buffers_is_no_backend_failure() {
        let target = Target::Host("b".into(), 80);
        let mut w = crate::net::FailingWriter(libc::ENOBUFS);
        let r = send_header(&mut w, ProxyVersion::V2, &target).await;
        assert!(matches!(r, Err(Failure::Shortage(e)) if e.raw_os_error() == Some(libc::ENOBUFS)));
        let mut w = crate::net::FailingWriter(libc::EPIPE);
        let r = send_header(&mut w, ProxyVersion::V2, &target).await;
        assert!(
            matches!(r, Err(Failure::Backend(e)) if e.starts_with("send the PROXY header to b:80: "))
        );
    }

    #[test]
    fn checks_off_brings_it_up() {
        let mut h = checked();
        h.record(&failed(), RULES, 1);
        h.record(&failed(), RULES, 2);
        assert!(h.record(&Event::ChecksOff, RULES, 3).unwrap().up);
        assert!(!h.checked);
        assert_eq!(h.record(&Event::ChecksOff, RULES, 4), None);
    }
}
