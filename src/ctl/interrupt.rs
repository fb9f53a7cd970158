//! SIGINT and SIGTERM during a command: ctl stops where it stands, says on
//! stderr what it leaves and the command that undoes it, and exits 130 or
//! 143. It does not undo anything itself: a drain the admin asked for
//! stays.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use super::output::{err, list};
use super::{Client, CtlError, DEFAULT_ADMIN, Outcome};
use crate::backend::State;
use crate::config::format_duration;

/// The longest wait for the backend's state when reporting.
const ASK_LIMIT: Duration = Duration::from_secs(5);

/// A signal that ends ctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Int,
    Term,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
        }
    }

    /// 128 + the signal's number, as a shell reports a process it killed.
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Int => 130,
            Signal::Term => 143,
        }
    }
}

/// SIGINT and SIGTERM, caught from the moment this is made: made before
/// ctl sends anything, so no signal meets the default action halfway.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::Int,
            _ = self.term.recv() => Signal::Term,
        }
    }
}

/// What a rollout is at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Drain,
    Run(String),
    Health,
    Smoke(String),
    Start,
    Settle,
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::Drain => "1/5 drain".into(),
            Step::Run(c) => format!("2/5 run: {c}"),
            Step::Health => "3/5 wait for a passing health check".into(),
            Step::Smoke(c) => format!("3/5 smoke test: {c}"),
            Step::Start => "4/5 start".into(),
            Step::Settle => "5/5 wait for new connections".into(),
        }
    }
}

/// Where a `drain` or `rollout` is, kept up to date as it goes, so that an
/// interrupt can say what it leaves.
#[derive(Debug, Default)]
pub struct Progress(Mutex<Steps>);

#[derive(Debug, Default, Clone)]
struct Steps {
    /// A rollout's backends in order; `None` for a single drain.
    rollout: Option<Vec<String>>,
    done: Vec<String>,
    skipped: Vec<String>,
    /// The backend being worked on, and the step.
    current: Option<(String, Step)>,
    /// Set once `leave` has made this instance leave its pair.
    leaving: bool,
}

impl Progress {
    fn update(&self, f: impl FnOnce(&mut Steps)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn snapshot(&self) -> Steps {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn rollout(&self, order: &[String]) {
        self.update(|s| s.rollout = Some(order.to_vec()));
    }

    pub(super) fn at(&self, name: &str, step: Step) {
        self.update(|s| s.current = Some((name.to_string(), step)));
    }

    pub(super) fn done(&self, name: &str) {
        self.update(|s| {
            s.current = None;
            s.done.push(name.to_string());
        });
    }

    pub(super) fn leaving(&self) {
        self.update(|s| s.leaving = true);
    }

    pub(super) fn skipped(&self, name: &str) {
        self.update(|s| s.skipped.push(name.to_string()));
    }
}

/// How a command run by [`until_interrupted`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Finished(Outcome),
    Interrupted(Signal),
}

/// Runs `command` until it ends or a signal comes. On a signal the command
/// is dropped where it stands, and what it leaves (asked of the balancer)
/// and how to undo it go to stderr; nothing is undone.
pub async fn until_interrupted(
    c: &Client,
    progress: &Progress,
    signals: &mut Signals,
    command: impl Future<Output = Result<Outcome, CtlError>>,
) -> Result<Ended, CtlError> {
    let sig = tokio::select! {
        r = command => return r.map(Ended::Finished),
        s = signals.recv() => s,
    };
    let steps = progress.snapshot();
    let now = match &steps.current {
        None => None,
        // A second signal, or a balancer that does not answer, ends the
        // asking: the report then says the state is unknown.
        Some((name, _)) => Some(tokio::select! {
            r = tokio::time::timeout(ASK_LIMIT, c.backend(name)) => match r {
                Ok(Ok(b)) => Ok((b.state, b.active_connections)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {}", format_duration(ASK_LIMIT))),
            },
            s = signals.recv() => Err(format!("{} came before the answer", s.name())),
        }),
    };
    err(&report(sig, &steps, now, c.url()));
    Ok(Ended::Interrupted(sig))
}

/// The command that puts `name` back in rotation.
fn undo(name: &str, admin: &str) -> String {
    if admin == DEFAULT_ADMIN {
        format!("sluice ctl start {name}")
    } else {
        format!("sluice ctl start {name} --admin {admin}")
    }
}

/// The report of an interrupt; `now` is the current backend's state and
/// live count as the balancer gave them, if there is a current backend.
fn report(
    sig: Signal,
    steps: &Steps,
    now: Option<Result<(State, usize), String>>,
    admin: &str,
) -> String {
    let head = format!("interrupted by {}", sig.name());
    let left = steps.current.as_ref().map(|(name, step)| {
        let mut s = match &now {
            Some(Ok((State::Active, _))) => format!("{name} is active, in rotation; nothing to undo"),
            Some(Ok((state, live))) => format!(
                "{name} is left {} ({live} live connection(s)); to put it back: {}",
                state.as_str(),
                undo(name, admin)
            ),
            Some(Err(e)) => format!(
                "{name} may be left out of rotation (its state is unknown: {e}); to put it back: {}",
                undo(name, admin)
            ),
            None => format!(
                "{name} may be left out of rotation; to put it back: {}",
                undo(name, admin)
            ),
        };
        if matches!(step, Step::Run(_) | Step::Smoke(_)) {
            s.push_str("; its command was still running, and ctl did not stop it");
        }
        s
    });
    if steps.leaving {
        let join = if admin == DEFAULT_ADMIN {
            "sluice ctl join".to_string()
        } else {
            format!("sluice ctl join --admin {admin}")
        };
        return format!(
            "{head}: this instance is left leaving its pair (its connections run on; the peer holds the address); to take it back: {join}\n"
        );
    }
    let Some(order) = &steps.rollout else {
        return match left {
            Some(l) => format!("{head}: {l}\n"),
            None => format!("{head}\n"),
        };
    };
    let current = steps.current.as_ref().map(|(n, _)| n);
    let untouched = order
        .iter()
        .filter(|n| !steps.done.contains(n) && !steps.skipped.contains(n) && Some(*n) != current);
    let mut s = match &steps.current {
        Some((name, step)) => format!("{head}: rollout stopped at {name} ({})\n", step.describe()),
        None => format!("{head}: rollout stopped between backends\n"),
    };
    s.push_str(&format!("  updated:     {}\n", list(steps.done.iter())));
    if let Some(l) = left {
        s.push_str(&format!("  in progress: {l}\n"));
    }
    s.push_str(&format!("  not touched: {}\n", list(untouched)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(rollout: Option<&[&str]>, done: &[&str], current: Option<(&str, Step)>) -> Steps {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Steps {
            rollout: rollout.map(names),
            done: names(done),
            skipped: vec![],
            current: current.map(|(n, s)| (n.to_string(), s)),
            leaving: false,
        }
    }

    #[test]
    fn a_drain_says_the_state_it_leaves_and_the_undo() {
        let s = steps(None, &[], Some(("web1", Step::Drain)));
        assert_eq!(
            report(
                Signal::Int,
                &s,
                Some(Ok((State::Draining, 3))),
                DEFAULT_ADMIN
            ),
            "interrupted by SIGINT: web1 is left draining (3 live connection(s)); \
             to put it back: sluice ctl start web1\n"
        );
        assert_eq!(
            report(
                Signal::Term,
                &s,
                Some(Ok((State::Active, 0))),
                "http://10.0.0.1:9000"
            ),
            "interrupted by SIGTERM: web1 is active, in rotation; nothing to undo\n"
        );
        let unknown = report(
            Signal::Int,
            &s,
            Some(Err("no answer within 5s".into())),
            "http://10.0.0.1:9000",
        );
        assert!(
            unknown.contains("state is unknown: no answer within 5s")
                && unknown.contains("sluice ctl start web1 --admin http://10.0.0.1:9000"),
            "{unknown}"
        );
        assert_eq!(
            report(Signal::Int, &Steps::default(), None, DEFAULT_ADMIN),
            "interrupted by SIGINT\n"
        );
    }

    #[test]
    fn a_rollout_says_what_was_done_and_what_was_not() {
        let mut s = steps(
            Some(&["web1", "web2", "web3", "web4"]),
            &["web1"],
            Some(("web3", Step::Run("make deploy".into()))),
        );
        s.skipped.push("web2".into());
        let r = report(
            Signal::Int,
            &s,
            Some(Ok((State::Drained, 0))),
            DEFAULT_ADMIN,
        );
        assert_eq!(
            r,
            "interrupted by SIGINT: rollout stopped at web3 (2/5 run: make deploy)\n\
             \x20 updated:     web1\n\
             \x20 in progress: web3 is left drained (0 live connection(s)); to put it back: \
             sluice ctl start web3; its command was still running, and ctl did not stop it\n\
             \x20 not touched: web4\n"
        );
        let between = steps(Some(&["web1", "web2"]), &["web1"], None);
        assert_eq!(
            report(Signal::Term, &between, None, DEFAULT_ADMIN),
            "interrupted by SIGTERM: rollout stopped between backends\n\
             \x20 updated:     web1\n\
             \x20 not touched: web2\n"
        );
    }
}
