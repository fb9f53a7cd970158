//! Leaving the pair: this instance gives up the floating address on
//! purpose (its `/healthz` answers 503, so keepalived moves the address to
//! the peer) and serves on until its connections have ended. The flag
//! is kept in the state file, so a host rebooted for its patch does not
//! take the address back before `join`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Shared;
use crate::health::unix_ms;

/// How long a leaving instance must see no new client, and carry no
/// connection, before it has left: longer than keepalived takes to move
/// the address (its check fails twice, a second apart), so a host that
/// says it has left is one the address has gone from.
pub const LEAVE_SETTLE: Duration = Duration::from_secs(5);

/// Whether this instance is leaving, and since when.
#[derive(Debug, Default)]
pub struct Leaving {
    on: AtomicBool,
    since_ms: AtomicU64,
    /// Bumped by every join, so a delayed `force_after` can tell whether
    /// the leave it was meant for still holds; a repeated leave keeps it,
    /// so the earliest deadline wins.
    generation: AtomicU64,
    /// The accepted count last seen, and since when it has not moved.
    quiet: Mutex<Option<(u64, Instant)>>,
}

impl Leaving {
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Unix ms of the leave in force.
    pub fn since_ms(&self) -> Option<u64> {
        self.is_on().then(|| self.since_ms.load(Ordering::SeqCst))
    }

    /// Restores the flag from the state file or a previous process.
    pub(super) fn restore(&self, on: bool) {
        if on {
            self.since_ms.store(unix_ms(), Ordering::SeqCst);
        }
        self.on.store(on, Ordering::SeqCst);
    }
}

impl Shared {
    /// Starts leaving (a repeated leave keeps its start time); after
    /// `force_after`, connections still open are closed. Returns whether
    /// this call changed the flag.
    pub fn leave(self: &Arc<Self>, force_after: Option<Duration>) -> bool {
        let l = &self.leaving;
        let changed = !l.on.swap(true, Ordering::SeqCst);
        if changed {
            l.since_ms.store(unix_ms(), Ordering::SeqCst);
            let accepted = self.stats.accepted.load(Ordering::SeqCst);
            *l.quiet.lock().expect("quiet lock") = Some((accepted, Instant::now()));
            let live = self.live_everywhere();
            tracing::warn!(
                live,
                "leaving: /healthz answers 503 so the peer takes the address; connections run on"
            );
            self.events.publish(crate::events::Kind::Leave { live });
        }
        let generation = l.generation.load(Ordering::SeqCst);
        if let Some(after) = force_after {
            let shared = self.clone();
            self.tasks.spawn(async move {
                tokio::time::sleep(after).await;
                let l = &shared.leaving;
                if l.is_on() && l.generation.load(Ordering::SeqCst) == generation {
                    let closed: usize = shared.backends().iter().map(|b| b.close_all()).sum();
                    tracing::warn!(
                        closed,
                        "leaving: force_after passed, closing the connections left"
                    );
                }
            });
        }
        self.state_changed.notify_one();
        changed
    }

    /// Back in the pair: `/healthz` answers 200 again. Returns whether
    /// this call changed the flag.
    pub fn join(&self) -> bool {
        let l = &self.leaving;
        l.generation.fetch_add(1, Ordering::SeqCst);
        let changed = l.on.swap(false, Ordering::SeqCst);
        if changed {
            tracing::info!("joined: /healthz answers 200 again, so this host may take the address");
            self.events.publish(crate::events::Kind::Join {});
        }
        self.state_changed.notify_one();
        changed
    }

    /// Whether this instance has left: leaving, no connection open, and
    /// no new client for [`LEAVE_SETTLE`].
    pub fn has_left(&self) -> bool {
        if !self.leaving.is_on() {
            return false;
        }
        let accepted = self.stats.accepted.load(Ordering::SeqCst);
        let mut quiet = self.leaving.quiet.lock().expect("quiet lock");
        let now = Instant::now();
        let since = match *quiet {
            Some((n, since)) if n == accepted => since,
            _ => {
                *quiet = Some((accepted, now));
                now
            }
        };
        drop(quiet);
        self.live_everywhere() == 0 && now.duration_since(since) >= LEAVE_SETTLE
    }

    /// Live connections over every backend, the previous process's too.
    pub fn live_everywhere(&self) -> usize {
        self.backends()
            .iter()
            .map(|b| b.live() + b.elsewhere())
            .sum()
    }

    /// Waits until this instance has left, or `limit` passes, or a join;
    /// returns whether it has left.
    pub async fn left(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.has_left() {
                return true;
            }
            if !self.leaving.is_on() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Counts change on many backends; a short poll is simpler than
            // waking on each, and this runs only while someone waits.
            let step = Duration::from_millis(50);
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + step)).await;
        }
    }
}
