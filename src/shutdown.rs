//! Signals that end the process: SIGTERM (what a service manager sends)
//! and SIGINT (Ctrl-C).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

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
