//! A count of events logged at most once per interval, so a flood of them
//! (wrong admin tokens, for one) cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::health::unix_ms;

#[derive(Debug, Default)]
pub struct LogThrottle {
    since_log: AtomicU64,
    last_log_ms: AtomicU64,
}

/// The least time between two log lines of one throttle.
const EVERY_MS: u64 = 10_000;

impl LogThrottle {
    /// Counts one event; returns how many to log now, if it is time.
    pub fn hit(&self) -> Option<u64> {
        let n = self.since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let now = unix_ms();
        let last = self.last_log_ms.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= EVERY_MS
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        due.then(|| {
            self.since_log.fetch_sub(n, Ordering::Relaxed);
            n
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_the_rest_wait() {
        let t = LogThrottle::default();
        assert_eq!(t.hit(), Some(1));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
    }
}
