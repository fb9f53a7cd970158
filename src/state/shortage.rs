//! sluice's own resource shortages (file descriptors, kernel buffers,
//! memory), told apart from backend failures and logged once per episode.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::health::unix_ms;

/// An episode ends once this long has passed without a shortage.
const QUIET: Duration = Duration::from_secs(1);

/// One kind of shortage, with the episode it is in.
#[derive(Debug, Default)]
pub struct Shortage {
    /// Every shortage met, over the process's life.
    pub total: AtomicU64,
    in_episode: AtomicBool,
    /// Shortages in the current episode.
    episode: AtomicU64,
    started_ms: AtomicU64,
    last_ms: AtomicU64,
}

impl Shortage {
    /// Records a shortage; the first of an episode is logged.
    pub fn hit(&self, what: &str, error: &std::io::Error) {
        let now = unix_ms();
        self.total.fetch_add(1, Ordering::Relaxed);
        self.episode.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(now, Ordering::Relaxed);
        if !self.in_episode.swap(true, Ordering::AcqRel) {
            self.started_ms.store(now, Ordering::Relaxed);
            tracing::warn!(
                error = %error,
                "{what} failed: sluice itself is short of a resource (not a backend fault); clients are refused and accepts back off until it has room again (logged once until then)"
            );
        }
    }

    /// Whether an episode is under way.
    pub fn active(&self) -> bool {
        self.in_episode.load(Ordering::Relaxed)
    }

    /// After a success: ends the episode once it has been quiet long
    /// enough, logging how it went. Returns whether an episode is still on.
    pub fn recovered(&self) -> bool {
        if !self.active() {
            return false;
        }
        let now = unix_ms();
        if now.saturating_sub(self.last_ms.load(Ordering::Relaxed)) < QUIET.as_millis() as u64 {
            return true;
        }
        if self.in_episode.swap(false, Ordering::AcqRel) {
            let n = self.episode.swap(0, Ordering::Relaxed);
            let secs = now.saturating_sub(self.started_ms.load(Ordering::Relaxed)) as f64 / 1000.0;
            tracing::info!(
                errors = n,
                "resources are back after {n} shortage(s) over {secs:.1}s"
            );
        }
        false
    }
}
