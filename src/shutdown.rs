//! How things end: the signals that end the process, SIGTERM (what a
//! service manager sends) and SIGINT (Ctrl-C), the first asking for a
//! graceful stop and a second for an immediate one, and the tracked set
//! of background tasks that shutdown ends.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that
/// resolves on the first of them.
///
/// The handlers are in place when this returns, before any socket is bound
/// or announced, so a signal sent as soon as sluice says it listens is
/// never met by the default action (death without a graceful stop).
/// Must be called inside a tokio runtime.
pub fn signal_received() -> std::io::Result<impl Future<Output = ()>> {
    Ok(stop_signals()?.0)
}

/// As [`signal_received`], with a second future that resolves on the
/// next SIGTERM or SIGINT after the first: the admin's "now", which ends
/// the grace period (see `Sluice::hurry_on`).
///
/// The first future hands its handlers to the second when it resolves, so
/// a signal that arrives in between is pending for the second, not lost;
/// if the first is dropped unresolved, the second never resolves.
pub fn stop_signals() -> std::io::Result<(
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
)> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (handover, handed) = tokio::sync::oneshot::channel();
    let first = async move {
        let name = next(&mut term, &mut int).await;
        tracing::info!(signal = name, "shutdown requested");
        let _ = handover.send((term, int));
    };
    let second = async move {
        let Ok((mut term, mut int)) = handed.await else {
            return std::future::pending().await;
        };
        let name = next(&mut term, &mut int).await;
        tracing::warn!(
            signal = name,
            "second stop signal: closing what is left now"
        );
    };
    Ok((first, second))
}

/// The next SIGTERM or SIGINT, by name.
async fn next(term: &mut Signal, int: &mut Signal) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// For the commands without a configuration file to reload (`demo`,
/// `web`): SIGHUP, which would kill them by default, is logged and
/// otherwise ignored. Installed when this returns, so call it before the
/// command says it listens; the task lives as long as the runtime.
pub fn ignore_hangup(what: &'static str) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP ignored: {what} has no configuration file to reload");
        }
    });
    Ok(())
}

/// The set of background tasks (health checks, drain timers, removals
/// after a reload, the state file writer): each is tracked and ends when
/// the set is shut down, so none outlives the balancer.
#[derive(Debug, Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    /// Runs `task` until it ends or the set is shut down.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// A token cancelled at shutdown, for a task to hand to a child that
    /// may be stopped earlier on its own.
    pub fn child_token(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Ends every task and waits until they are gone.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
