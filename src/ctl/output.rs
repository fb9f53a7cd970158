//! What `sluice ctl` shows a person, as pure functions where it can be, so
//! the text is testable without a server; and how it is written, so that a
//! closed output never stops ctl.

use std::fmt::Write as _;
use std::io::{IsTerminal, Read as _, Write as _};
use std::os::fd::AsFd;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tokio::io::AsyncReadExt as _;
use tokio::net::unix::pipe;

use crate::api::{BackendView, ConnView};
use crate::backend::State;

/// One of ctl's own output streams.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stream {
    Out,
    Err,
}

/// Set once a write to the stream failed: ctl writes to it no more.
static CLOSED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

/// Writes `bytes` to stdout or stderr. Output never stops an operation on
/// the balancer: when the stream is closed (EPIPE, as under `| head -1`)
/// or fails otherwise, ctl stops writing to it and carries on. Rust's
/// `print!` would panic instead, halfway through a drain or a rollout.
pub(super) fn write(to: Stream, bytes: &[u8]) {
    let closed = &CLOSED[to as usize];
    if closed.load(Ordering::Relaxed) {
        return;
    }
    let written = match to {
        Stream::Out => {
            let mut o = std::io::stdout().lock();
            o.write_all(bytes).and_then(|()| o.flush())
        }
        Stream::Err => std::io::stderr().lock().write_all(bytes),
    };
    if written.is_err() {
        closed.store(true, Ordering::Relaxed);
    }
}

/// Whether stdout is closed: a command that only prints can stop.
pub(super) fn out_closed() -> bool {
    CLOSED[Stream::Out as usize].load(Ordering::Relaxed)
}

/// Text for stdout; see [`write`].
pub(super) fn out(text: &str) {
    write(Stream::Out, text.as_bytes());
}

/// Text for stderr; see [`write`].
pub(super) fn err(text: &str) {
    write(Stream::Err, text.as_bytes());
}

/// Whether the stream is a pipe or a socket: a reader that may go away.
fn is_pipe(to: Stream) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let fd = match to {
        Stream::Out => std::io::stdout().as_fd().try_clone_to_owned(),
        Stream::Err => std::io::stderr().as_fd().try_clone_to_owned(),
    };
    fd.and_then(|fd| std::fs::File::from(fd).metadata())
        .is_ok_and(|m| m.file_type().is_fifo() || m.file_type().is_socket())
}

/// Runs `cmd` to its end and returns how it exited. Its stdout and stderr
/// are ctl's own, except that where ctl's is a pipe (whose reader may go
/// away, as under `| head`) ctl relays the command's output through
/// [`write`], so that the command never dies of SIGPIPE: killing
/// `apt-get` halfway because a pager quit would be far worse than losing
/// its output.
pub(super) async fn run_relayed(mut cmd: tokio::process::Command) -> std::io::Result<ExitStatus> {
    if is_pipe(Stream::Out) {
        cmd.stdout(std::process::Stdio::piped());
    }
    if is_pipe(Stream::Err) {
        cmd.stderr(std::process::Stdio::piped());
    }
    let mut child = cmd.spawn()?;
    let mut out = Relay::new(child.stdout.take().map(|s| s.into_owned_fd()), Stream::Out)?;
    let mut err = Relay::new(child.stderr.take().map(|s| s.into_owned_fd()), Stream::Err)?;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            () = out.step(), if out.is_open() => {}
            () = err.step(), if err.is_open() => {}
        }
    };
    out.finish();
    err.finish();
    Ok(status)
}

/// Copies a child's output pipe to one of ctl's streams.
struct Relay {
    pipe: Option<pipe::Receiver>,
    to: Stream,
    buf: Vec<u8>,
}

impl Relay {
    fn new(
        fd: Option<std::io::Result<std::os::fd::OwnedFd>>,
        to: Stream,
    ) -> std::io::Result<Relay> {
        let pipe = fd
            .transpose()?
            .map(pipe::Receiver::from_owned_fd)
            .transpose()?;
        Ok(Relay {
            pipe,
            to,
            buf: vec![0; 16 * 1024],
        })
    }

    fn is_open(&self) -> bool {
        self.pipe.is_some()
    }

    /// Copies one read's worth. Cancel-safe: a read that did not complete
    /// took nothing from the pipe.
    async fn step(&mut self) {
        let Some(p) = &mut self.pipe else {
            return std::future::pending().await;
        };
        match p.read(&mut self.buf).await {
            Ok(0) | Err(_) => self.pipe = None,
            Ok(n) => write(self.to, &self.buf[..n]),
        }
    }

    /// After the command exited: copies what it left in the pipe now, so
    /// that it shows before ctl's next line. A process the command left
    /// running may hold the pipe open; what it writes later is copied in
    /// the background for as long as ctl runs.
    fn finish(mut self) {
        let Some(p) = self.pipe.take() else { return };
        // Read the descriptor directly: tokio's readiness may not have
        // seen the last bytes yet, and the pipe is non-blocking.
        let Ok(direct) = p.as_fd().try_clone_to_owned().map(std::fs::File::from) else {
            return;
        };
        loop {
            match (&direct).read(&mut self.buf) {
                Ok(0) => return,
                Ok(n) => write(self.to, &self.buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        self.pipe = Some(p);
        tokio::spawn(async move {
            while self.is_open() {
                self.step().await;
            }
        });
    }
}

/// Whether to colour output: only on a terminal.
pub(super) fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// `HH:MM:SS` in UTC, for step logs.
fn clock() -> String {
    let s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(s)
}

/// `HH:MM:SSZ` of a Unix time in seconds.
pub(super) fn utc(s: u64) -> String {
    format!("{:02}:{:02}:{:02}Z", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// One step log line, stamped so a slow step shows in the log.
pub(super) fn say(msg: &str) {
    out(&format!("[{}] {msg}\n", clock()));
}

/// Pretty JSON for `--json`, the same shape the API sends.
pub(super) fn print_json(v: &impl serde::Serialize) {
    out(&format!(
        "{}\n",
        serde_json::to_string_pretty(v).unwrap_or_default()
    ));
}

/// Names joined by commas, or `none`.
pub(super) fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
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

/// The status table: one row per backend, and under a backend that is
/// down, a line that says why.
pub fn status_table(backends: &[BackendView], colour: bool) -> String {
    let mut out = String::new();
    // As wide as the longest address: an IPv6 one is longer than 24.
    let wide = backends
        .iter()
        .map(|b| b.address.len())
        .max()
        .unwrap_or(0)
        .max(24);
    let _ = writeln!(
        out,
        "{:<12} {:<wide$} {:<9} {:<7} {:>6} {:>10}  SERVICES",
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
        let services = if b.services.is_empty() {
            "-".to_string()
        } else {
            b.services.join(",")
        };
        let _ = writeln!(
            out,
            "{:<12} {:<wide$} {state} {:<7} {:>6} {:>10}  {services}",
            b.name, b.address, health, b.active_connections, b.total_connections
        );
        let mut notes = Vec::new();
        if b.backup {
            notes.push("backup: serves only when no primary can".to_string());
        }
        if let Some(max) = b.max_connections {
            notes.push(format!("max_connections {max}"));
        }
        match (&b.slow_start, b.effective_weight) {
            (Some(len), Some(w)) => notes.push(format!(
                "slow-starting ({len}): weight now {w:.2} of {}",
                b.weight
            )),
            (Some(len), None) => notes.push(format!("slow_start {len}")),
            _ => {}
        }
        if let Some(v) = b.send_proxy {
            notes.push(format!("sends a PROXY {} header", v.as_str()));
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "  {}: {}", b.name, notes.join("; "));
        }
        if !b.healthy {
            let why = b.down_reason.as_deref().unwrap_or("no reason recorded");
            let _ = writeln!(
                out,
                "  {} down since {}: {why}",
                b.name,
                utc(b.health_since_ms / 1000)
            );
        }
    }
    out
}

/// One line per service: where it listens and how it chooses a backend.
pub fn services_lines(services: &[crate::api::ServiceView]) -> String {
    let mut out = String::new();
    for s in services {
        let mode = match &s.affinity {
            Some(a) => format!("{} (affinity {a})", s.balance),
            None => s.balance.clone(),
        };
        let primaries = s.backends.iter().filter(|b| !s.backups.contains(b));
        let _ = write!(
            out,
            "service {} on {}: {mode} over {}",
            s.name,
            s.listen,
            list(primaries)
        );
        if !s.backups.is_empty() {
            let _ = write!(out, "; backups {}", list(s.backups.iter()));
        }
        if let Some(t) = &s.accept_proxy {
            let _ = write!(out, "; PROXY header from clients within {t}");
        }
        let _ = writeln!(out);
    }
    out
}

/// `/stats` for a person: each counter with what it counts, the clients'
/// outcomes first (every accepted client ends in exactly one of them).
pub fn stats_table(s: &crate::api::StatsView) -> String {
    let rows: [(u64, &str, &str); 15] = [
        (
            s.active_connections as u64,
            "active_connections",
            "open now, over every backend",
        ),
        (s.accepted, "accepted", "clients accepted since start"),
        (s.established, "established", "connected to a backend"),
        (
            s.rejected_limit,
            "rejected_limit",
            "refused at once: max_connections reached",
        ),
        (
            s.rejected_proxy_header,
            "rejected_proxy_header",
            "PROXY header malformed, cut short or too slow",
        ),
        (
            s.rejected_no_backend,
            "rejected_no_backend",
            "no backend took or answered them",
        ),
        (
            s.rejected_backend_full,
            "rejected_backend_full",
            "every backend at its max_connections",
        ),
        (
            s.rejected_resources,
            "rejected_resources",
            "sluice itself short of file descriptors",
        ),
        (s.abandoned, "abandoned", "left before a backend answered"),
        (
            s.accept_errors,
            "accept_errors",
            "accepts that failed otherwise",
        ),
        (
            s.resource_shortages,
            "resource_shortages",
            "sluice's own shortages (never a backend's fault)",
        ),
        (
            s.admin_rejected,
            "admin_rejected",
            "admin connections over [admin] max_connections",
        ),
        (
            s.admin_unauthorized,
            "admin_unauthorized",
            "admin requests with a missing or wrong token",
        ),
        (
            s.state_file_failures,
            "state_file_failures",
            "writes of the state file that failed",
        ),
        (
            s.accepted.saturating_sub(
                s.established
                    + s.rejected_limit
                    + s.rejected_proxy_header
                    + s.rejected_no_backend
                    + s.rejected_backend_full
                    + s.rejected_resources
                    + s.abandoned,
            ),
            "connecting",
            "accepted, still choosing or connecting to a backend",
        ),
    ];
    let mut out = String::new();
    for (n, name, what) in rows {
        let _ = writeln!(out, "{name:<21} {n:>12}  {what}");
    }
    out
}

/// The live connections of backend `name`, with a count line at the end.
pub fn conns_table(list: &[ConnView], name: &str) -> String {
    let mut out = String::new();
    // As wide as the longest client: an IPv6 one is longer than 24.
    let wide = list
        .iter()
        .map(|c| c.client.len())
        .max()
        .unwrap_or(0)
        .max(24);
    let _ = writeln!(
        out,
        "{:<wide$} {:<10} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "CLIENT", "SERVICE", "AGE", "IDLE", "BYTES IN", "BYTES OUT", "PID"
    );
    for x in list {
        // After an upgrade the old process's connections show its pid.
        let _ = writeln!(
            out,
            "{:<wide$} {:<10} {:>10} {:>10} {:>12} {:>12} {:>8}",
            x.client,
            x.service,
            format!("{:.1}s", x.age_ms as f64 / 1000.0),
            format!("{:.1}s", x.idle_ms as f64 / 1000.0),
            x.bytes_in,
            x.bytes_out,
            x.pid
        );
    }
    let _ = writeln!(out, "{} live connection(s) on {name}", list.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, state: State, healthy: bool) -> BackendView {
        BackendView {
            name: name.into(),
            address: "127.0.0.1:8080".into(),
            state,
            healthy,
            health_checked: true,
            weight: 1,
            send_proxy: None,
            active_connections: 3,
            idle_connections: 1,
            total_connections: 42,
            connect_failures: 0,
            bytes_in: 0,
            bytes_out: 0,
            bytes_spliced: 0,
            state_since_ms: 0,
            health_since_ms: 0,
            last_ok_check_ms: 0,
            services: vec![],
            down_reason: None,
            closed: None,
            saved: None,
            instances: vec![],
            effective_weight: None,
            slow_start: None,
            max_connections: None,
            backup: false,
        }
    }

    #[test]
    fn balancing_settings_show_under_their_backend_and_services_in_lines() {
        let mut spare = backend("spare", State::Active, true);
        spare.backup = true;
        spare.max_connections = Some(100);
        let mut cold = backend("web2", State::Active, true);
        cold.weight = 4;
        cold.slow_start = Some("30s".into());
        cold.effective_weight = Some(1.5);
        let t = status_table(&[backend("web1", State::Active, true), cold, spare], false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines.len(),
            6,
            "one note line per backend with settings: {t}"
        );
        assert_eq!(
            lines[3],
            "  web2: slow-starting (30s): weight now 1.50 of 4"
        );
        assert_eq!(
            lines[5],
            "  spare: backup: serves only when no primary can; max_connections 100"
        );
        let s = crate::api::ServiceView {
            name: "web".into(),
            listen: "0.0.0.0:80".into(),
            balance: "source-hash".into(),
            affinity: Some("network".into()),
            backends: vec!["web1".into(), "web2".into(), "spare".into()],
            backups: vec!["spare".into()],
            accept_proxy: None,
            refused: Default::default(),
        };
        assert_eq!(
            services_lines(&[s]),
            "service web on 0.0.0.0:80: source-hash (affinity network) over web1, web2; backups spare\n"
        );
    }

    #[test]
    fn status_table_without_colour() {
        let mut down = backend("web1", State::Draining, false);
        down.services = vec!["web".into(), "tls".into()];
        down.down_reason = Some("3 health checks failed in a row, last: refused".into());
        down.health_since_ms = 3_723_000;
        let t = status_table(&[down, backend("web2", State::Active, true)], false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        for col in [
            "NAME", "ADDRESS", "STATE", "HEALTH", "LIVE", "TOTAL", "SERVICES",
        ] {
            assert!(lines[0].contains(col), "{t}");
        }
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "web1",
                "127.0.0.1:8080",
                "draining",
                "down",
                "3",
                "42",
                "web,tls"
            ]
        );
        assert_eq!(
            lines[2],
            "  web1 down since 01:02:03Z: 3 health checks failed in a row, last: refused"
        );
        assert!(lines[3].ends_with("  -"), "{t}");
        assert!(!t.contains('\x1b'), "{t}");
    }

    #[test]
    fn status_table_keeps_its_columns_with_a_long_ipv6_address() {
        let mut v6 = backend("web6", State::Active, true);
        v6.address = "[2001:db8:1234:5678::abcd]:8081".into();
        let t = status_table(&[backend("web1", State::Active, true), v6], false);
        let lines: Vec<&str> = t.lines().collect();
        let at = |l: &str| l.find("active").or_else(|| l.find("STATE")).unwrap();
        assert_eq!(at(lines[0]), at(lines[1]), "{t}");
        assert_eq!(at(lines[1]), at(lines[2]), "{t}");
        assert!(lines[2].contains("[2001:db8:1234:5678::abcd]:8081 "), "{t}");
    }

    #[test]
    fn status_table_colours_the_state() {
        let t = status_table(&[backend("web1", State::Active, true)], true);
        assert!(t.contains("\x1b[32mactive"), "{t}");
    }

    #[test]
    fn conns_table_rows_and_count() {
        let c = ConnView {
            id: 7,
            client: "10.0.0.1:5000".into(),
            service: "web".into(),
            age_ms: 1500,
            idle_ms: 300,
            bytes_in: 100,
            bytes_out: 2000,
            pid: 4242,
        };
        let t = conns_table(std::slice::from_ref(&c), "web1");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("CLIENT"), "{t}");
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "10.0.0.1:5000",
                "web",
                "1.5s",
                "0.3s",
                "100",
                "2000",
                "4242"
            ]
        );
        assert_eq!(lines[2], "1 live connection(s) on web1");
        assert_eq!(
            conns_table(&[], "web2").lines().last(),
            Some("0 live connection(s) on web2")
        );
        // A long IPv6 client keeps the columns apart.
        let v6 = ConnView {
            client: "[2001:db8:1234:5678:9abc:def0:1234:5678]:51234".into(),
            ..c
        };
        let t = conns_table(&[v6], "web1");
        let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[0], "[2001:db8:1234:5678:9abc:def0:1234:5678]:51234");
        assert_eq!(row[1], "web");
    }
}
