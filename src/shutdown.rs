//! How things end: the signals that end the process, SIGTERM (what a
//! service manager sends) and SIGINT (Ctrl-C), and the tracked set of
//! background tasks that shutdown ends.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
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
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
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
