//! `sluice ctl`: the admin API from the command line, and `rollout`, the
//! whole rolling update as one command.
//!
//! Every command returns an [`Outcome`]; the binary turns it into the exit
//! code: 0 done, 1 error, 2 timed out; run by [`until_interrupted`], 130 or
//! 143 when SIGINT or SIGTERM stopped it.
//!
//! This file holds the single commands; [`Client`] speaks HTTP, `output`
//! formats for a person and writes, `rollout` is the update policy built on
//! them, and `interrupt` reports what a signal left behind.

mod client;
mod events;
mod interrupt;
mod output;
mod rollout;

use std::time::{Duration, Instant};

use crate::backend::State;
use crate::config::format_duration;
use output::{colour, err, out, print_json, say};

pub use client::{Client, EventStream, read_token};
pub use events::{describe, events};
pub use interrupt::{Ended, Progress, Signal, Signals, until_interrupted};
pub use output::{conns_table, stats_table, status_table};
pub use rollout::{RolloutOpts, rollout};

/// The admin API when neither `--admin` nor `SLUICE_ADMIN` says otherwise.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9000";

/// How a command ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    TimedOut,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "{0} is not an admin address such as 127.0.0.1:9000, http://127.0.0.1:9000 or unix:/run/sluice/admin.sock"
    )]
    BadUrl(String),
    #[error("cannot reach the admin API at {url}: {error}")]
    Unreachable { url: String, error: std::io::Error },
    #[error("admin API at {url}: {message}")]
    Http { url: String, message: String },
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Rollout(String),
    #[error("cannot read the token file {}: {error}", path.display())]
    TokenFile {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{from}: {problem}")]
    BadToken { from: String, problem: String },
    /// A reload the running sluice refused, with everything it said.
    #[error("{0}")]
    Refused(String),
}

pub async fn status(c: &Client, json: bool) -> Result<Outcome, CtlError> {
    let bs = c.backends().await?;
    let h = c.healthz().await?;
    if json {
        print_json(&bs);
    } else {
        out(&status_table(&bs, colour()));
        // Best effort: a sluice from before GET /services (the old process
        // of an upgrade) answers it 404, and the rest still stands.
        match c.services().await {
            Ok(services) => out(&output::services_lines(&services)),
            Err(e) => err(&format!("warning: no service lines: GET /services: {e}\n")),
        }
        out(&process_line(&h));
    }
    // On stderr, so the table and the JSON stay what scripts read.
    for p in &h.problems {
        err(&format!("warning: {p}\n"));
    }
    Ok(Outcome::Done)
}

/// The process answering, and the one it took over from while that one
/// still drains.
fn process_line(h: &crate::api::HealthzView) -> String {
    let mut line = format!(
        "sluice {} pid {}, up since {}\n",
        h.version,
        h.pid,
        output::utc(h.started_ms / 1000)
    );
    if let Some(c) = &h.cluster {
        line.push_str(&format!(
            "cluster {}: this is instance {}; alive: {}{}\n",
            c.name,
            c.instance,
            c.instances.join(", "),
            if c.connected {
                ""
            } else {
                "; DEGRADED: etcd cannot be reached, changes are refused"
            }
        ));
    }
    if let Some(since) = h.leaving_since_ms {
        line.push_str(&format!(
            "leaving its pair since {} with {} live connection(s); `sluice ctl join` takes it back\n",
            output::utc(since / 1000),
            h.active_connections
        ));
    }
    if let Some(p) = h.previous.as_ref().filter(|p| p.exited_ms.is_none()) {
        line.push_str(&format!(
            "previous process pid {} (version {}) still holds {} connection(s)\n",
            p.pid, p.version, p.connections
        ));
    }
    line
}

/// `/healthz` in one line: fails unless this sluice takes clients, so a
/// container's HEALTHCHECK needs nothing but the binary.
pub async fn health(c: &Client, json: bool) -> Result<Outcome, CtlError> {
    let h = c.healthz().await?;
    if json {
        print_json(&h);
    } else {
        let mut line = format!(
            "{}: pid {}, version {} (commit {})",
            h.status, h.pid, h.version, h.commit
        );
        for p in &h.problems {
            line.push_str(&format!("; {p}"));
        }
        out(&format!("{line}\n"));
    }
    match h.status.as_str() {
        "ok" | "degraded" => Ok(Outcome::Done),
        other => Err(CtlError::Http {
            url: c.url().to_string(),
            message: format!("/healthz says {other}: this sluice takes no new clients"),
        }),
    }
}

/// What became of the clients (`GET /stats`), one counter a line.
pub async fn stats(c: &Client, json: bool) -> Result<Outcome, CtlError> {
    let s = c.stats().await?;
    if json {
        print_json(&s);
    } else {
        out(&output::stats_table(&s));
    }
    Ok(Outcome::Done)
}

/// A backend's live connections: every page, or the first `limit` rows.
pub async fn conns(
    c: &Client,
    name: &str,
    json: bool,
    limit: Option<usize>,
) -> Result<Outcome, CtlError> {
    let list = c.connections(name, limit).await?;
    if json {
        print_json(&list);
    } else {
        out(&conns_table(&list, name));
        if limit.is_some_and(|l| list.len() >= l) {
            // The count line above is the rows shown; say what was left out.
            let all = c.backend(name).await?.active_connections;
            out(&format!(
                "the first {} by id (--limit); {all} live in all\n",
                list.len()
            ));
        }
    }
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
pub async fn drain(
    c: &Client,
    name: &str,
    opts: DrainOpts,
    progress: &Progress,
) -> Result<Outcome, CtlError> {
    progress.at(name, interrupt::Step::Drain);
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
    let mut heard = Instant::now();
    let mut status = StatusLine::new();
    loop {
        let b = c.backend(name).await?;
        if matches!(b.state, State::Drained | State::Stopped) && b.active_connections == 0 {
            status.clear();
            say(&format!(
                "{name}: {} after {:.1}s, 0 live connections",
                b.state.as_str(),
                started.elapsed().as_secs_f64()
            ));
            return Ok(Outcome::Done);
        }
        if b.state == State::Active {
            status.clear();
            return Err(CtlError::Rollout(format!(
                "{name} was started again while draining"
            )));
        }
        if b.active_connections != last {
            status.clear();
            say(&format!(
                "{name}: {} live connection(s), {} idle",
                b.active_connections, b.idle_connections
            ));
            last = b.active_connections;
            heard = Instant::now();
        } else if status.on_terminal() {
            // One line that updates in place, so a long drain shows it
            // is alive without scrolling.
            status.show(&format!(
                "{name}: {} live connection(s), {} idle, draining for {:.0}s",
                b.active_connections,
                b.idle_connections,
                started.elapsed().as_secs_f64()
            ));
        } else if heard.elapsed() >= HEARTBEAT {
            // In a log, a line every few seconds that says who holds the
            // drain open.
            // The first row is the oldest this process holds (ids grow
            // with time), so one row answers without walking every page.
            let oldest = c
                .connections(name, Some(1))
                .await
                .ok()
                .and_then(|l| l.iter().map(|x| x.age_ms).max())
                .map_or(String::new(), |ms| {
                    format!(
                        ", the oldest open for {}",
                        format_duration(Duration::from_secs(ms / 1000))
                    )
                });
            say(&format!(
                "{name}: still draining after {:.0}s: {} live connection(s), {} idle{oldest}",
                started.elapsed().as_secs_f64(),
                b.active_connections,
                b.idle_connections
            ));
            heard = Instant::now();
        }
        if let Some(w) = opts.wait
            && started.elapsed() >= w
        {
            status.clear();
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

/// How long a drain may go without a line when nothing changes.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A line rewritten in place on a terminal (nothing elsewhere).
struct StatusLine {
    terminal: bool,
    /// What the line shows now, if anything.
    shown: Option<String>,
}

impl StatusLine {
    fn new() -> StatusLine {
        use std::io::IsTerminal;
        StatusLine {
            terminal: std::io::stdout().is_terminal(),
            shown: None,
        }
    }

    fn on_terminal(&self) -> bool {
        self.terminal
    }

    fn show(&mut self, text: &str) {
        if self.shown.as_deref() != Some(text) {
            out(&format!("\r\x1b[K{text}"));
            self.shown = Some(text.to_string());
        }
    }

    /// Wipes the line, so that the next one starts at the margin.
    fn clear(&mut self) {
        if self.shown.take().is_some() {
            out("\r\x1b[K");
        }
    }
}

/// Hands the running sluice over to a new process and reports it: who
/// handed over to whom, how many connections stayed on the old process,
/// and when it exited (waiting at most `wait` for that).
pub async fn upgrade(
    c: &Client,
    binary: Option<&std::path::Path>,
    wait: Duration,
) -> Result<Outcome, CtlError> {
    let r = c.upgrade(binary).await?;
    say(&format!(
        "upgraded: pid {} (version {}) handed over to pid {} (version {})",
        r.old_pid, r.old_version, r.new_pid, r.new_version
    ));
    say(&format!(
        "{} connection(s) stayed on pid {}, which lets them finish and exits",
        r.connections_left, r.old_pid
    ));
    // Zero: report the hand-over, and leave the old process to drain.
    if wait.is_zero() {
        return Ok(Outcome::Done);
    }
    let started = Instant::now();
    let mut last = r.connections_left;
    loop {
        let h = c.healthz().await?;
        match h.previous.filter(|p| p.pid == r.old_pid) {
            Some(p) if p.exited_ms.is_some() => {
                say(&format!(
                    "pid {} exited; pid {} serves alone",
                    r.old_pid, h.pid
                ));
                return Ok(Outcome::Done);
            }
            Some(p) if p.connections != last => {
                say(&format!(
                    "pid {}: {} connection(s) left",
                    r.old_pid, p.connections
                ));
                last = p.connections;
            }
            _ => {}
        }
        if started.elapsed() >= wait {
            say(&format!(
                "pid {} has not exited after {} ({last} connection(s) left); it will within its shutdown_grace",
                r.old_pid,
                format_duration(wait)
            ));
            return Ok(Outcome::TimedOut);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Makes this instance leave its pair and shows its live count falling
/// until none is left (or `wait` passes: exit 2).
pub async fn leave(
    c: &Client,
    wait: Option<Duration>,
    force_after: Option<Duration>,
    progress: &Progress,
) -> Result<Outcome, CtlError> {
    let started = Instant::now();
    let v = c
        .leave_or_join("leave", &[("force_after", force_after)])
        .await?;
    progress.leaving();
    say(&format!(
        "leaving: /healthz answers 503, so the peer takes the floating address; {} live connection(s) run on",
        v.active_connections
    ));
    let mut last = v.active_connections;
    loop {
        let h = c.healthz().await?;
        if h.leaving_since_ms.is_none() {
            return Err(CtlError::Rollout(
                "this instance joined again while leaving".into(),
            ));
        }
        if h.left == Some(true) {
            say(&format!(
                "left after {:.1}s: 0 live connections, and no new client for {}s; patch or reboot this host, then `sluice ctl join`",
                started.elapsed().as_secs_f64(),
                crate::state::LEAVE_SETTLE.as_secs()
            ));
            return Ok(Outcome::Done);
        }
        if h.active_connections != last {
            say(&format!("{} live connection(s)", h.active_connections));
            last = h.active_connections;
        }
        if let Some(w) = wait
            && started.elapsed() >= w
        {
            say(&format!(
                "still leaving after {} with {last} live connection(s)",
                format_duration(w)
            ));
            return Ok(Outcome::TimedOut);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Has the running sluice read its configuration file again, and says
/// what it applied, or why it refused (exit 1; nothing changed).
pub async fn reload(c: &Client, json: bool) -> Result<Outcome, CtlError> {
    let v = c.reload().await?;
    if json {
        print_json(&v);
    }
    if v.result != "applied" {
        let mut why = format!(
            "reload refused, the running configuration stays: {}",
            v.error.as_deref().unwrap_or("no reason given")
        );
        if !v.needs_restart.is_empty() {
            why.push_str("\nthese fields apply only when sluice restarts (a new `sluice run`):");
            for f in &v.needs_restart {
                why.push_str(&format!("\n  {}: {} -> {}", f.field, f.from, f.to));
            }
        }
        return Err(CtlError::Refused(why));
    }
    if !json {
        let mut line = format!("reloaded {}: applied", v.file);
        if !v.added.is_empty() {
            line.push_str(&format!("; added {}", v.added.join(", ")));
        }
        if !v.removed.is_empty() {
            line.push_str(&format!(
                "; removed {} (draining until their last connection ends)",
                v.removed.join(", ")
            ));
        }
        say(&line);
    }
    Ok(Outcome::Done)
}

/// Takes this instance back into its pair.
pub async fn join(c: &Client) -> Result<Outcome, CtlError> {
    c.leave_or_join("join", &[]).await?;
    say("joined: /healthz answers 200, so this host may take the floating address again");
    Ok(Outcome::Done)
}

pub async fn stop(c: &Client, name: &str) -> Result<Outcome, CtlError> {
    let b = c.act(name, "stop", &[]).await?;
    let mut line = format!(
        "{name}: stopped, out of rotation; closed {} connection(s)",
        b.closed.unwrap_or(0)
    );
    if b.active_connections > 0 {
        line.push_str(&format!(", {} still closing", b.active_connections));
    }
    say(&line);
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
/// A backend without active checks counts as healthy at once. Here, not in
/// `rollout`, because `start --wait-healthy` waits the same way.
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
