//! Leaving the pair: this instance gives up the floating address on
//! purpose (its `/healthz` answers 503, so keepalived moves the address to
//! the peer) and serves on until its connections have ended. The flag
//! is kept in the state file, so a host rebooted for its patch does not
//! take the address back before `join`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::Shared;
use crate::health::unix_ms;

/// Whether this instance is leaving, and since when.
#[derive(Debug, Default)]
pub struct Leaving {
    on: AtomicBool,
    since_ms: AtomicU64,
    /// Bumped by every leave and join, so a delayed `force_after` can tell
    /// whether the leave it was meant for still holds.
    generation: AtomicU64,
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
            tracing::warn!(
                live = self.live_everywhere(),
                "leaving: /healthz answers 503 so the peer takes the address; connections run on"
            );
        }
        let generation = l.generation.fetch_add(1, Ordering::SeqCst) + 1;
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
        }
        self.state_changed.notify_one();
        changed
    }

    /// Live connections over every backend, the previous process's too.
    pub fn live_everywhere(&self) -> usize {
        self.backends()
            .iter()
            .map(|b| b.live() + b.elsewhere())
            .sum()
    }

    /// Waits until no connection is left, or `limit` passes, or a join;
    /// returns whether none is left.
    pub async fn left(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.live_everywhere() == 0 {
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
