//! Slow start: a backend that comes back (a `start`, or health up) takes a
//! weight that rises from near 0 to its own over `slow_start`, so a cold
//! server is not flooded.
//!
//! The hot path reads it without a lock: the backend keeps, in atomics,
//! the ramp's length and the instant it began, and a pick derives the
//! fraction from the time since. A reload that changes the length during
//! a ramp puts it where the new length says: the time since it began over
//! the new length. A backend not ramping costs one load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The smallest fraction of its weight a ramping backend takes, so that it
/// still serves when it is the only one in rotation, and a pick is never
/// a division by zero.
pub const FLOOR: f64 = 0.001;

/// Where [`now_ms`] starts: far from 0 (about 35 years), which means "not
/// ramping" in [`Ramp`], so that a ramp can begin in the past (a test's
/// ramp part-way) and still never be 0.
const ORIGIN_MS: u64 = 1 << 40;

/// Milliseconds on a monotonic clock of this process, from [`ORIGIN_MS`].
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + ORIGIN_MS
}

/// A backend's slow start: its length, and when the current ramp began.
#[derive(Debug, Default)]
pub struct Ramp {
    /// `slow_start` in ms; 0 when it has none.
    length_ms: AtomicU64,
    /// [`now_ms`] at which the ramp began; 0 when none runs.
    begun_ms: AtomicU64,
}

impl Ramp {
    pub fn set_length(&self, d: Option<Duration>) {
        let ms = d.map_or(0, |d| d.as_millis().max(1) as u64);
        self.length_ms.store(ms, Ordering::Relaxed);
        if ms == 0 {
            self.begun_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn length(&self) -> Option<Duration> {
        match self.length_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The backend came back at `now`: a ramp starts, if it has a length.
    /// Returns what [`Ramp::undo`] needs to take it back.
    pub fn begin(&self, now: u64) -> Option<Begun> {
        self.begin_done(now, 0)
    }

    /// As [`Ramp::begin`], as if it began `done_ms` before `now`.
    pub fn begin_done(&self, now: u64, done_ms: u64) -> Option<Begun> {
        let len = self.length_ms.load(Ordering::Relaxed);
        if len == 0 {
            return None;
        }
        let set = now.saturating_sub(done_ms).max(1);
        let was = self.begun_ms.swap(set, Ordering::Relaxed);
        Some(Begun { was, set })
    }

    /// Takes back a ramp that began for a start that did not happen,
    /// unless another has begun or ended since.
    pub fn undo(&self, b: Begun) {
        let _ = self
            .begun_ms
            .compare_exchange(b.set, b.was, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The fraction of its weight it takes at `now`: `None` when no ramp
    /// runs (its whole weight), else from [`FLOOR`] to below 1.
    pub fn fraction_at(&self, now: u64) -> Option<f64> {
        let begun = self.begun_ms.load(Ordering::Relaxed);
        if begun == 0 {
            return None;
        }
        let len = self.length_ms.load(Ordering::Relaxed);
        // A `now` read before a concurrent begin counts as its first
        // moment.
        let since = now.saturating_sub(begun);
        if since >= len {
            // Over: later picks skip the clock. A begin racing this store
            // is at most one ramp lost, never a wrong weight for long.
            let _ = self
                .begun_ms
                .compare_exchange(begun, 0, Ordering::Relaxed, Ordering::Relaxed);
            return None;
        }
        Some((since as f64 / len as f64).max(FLOOR))
    }

    /// Whether a ramp may run: one load, so that picks of a service with
    /// no ramping backend never read the clock.
    pub fn maybe_ramping(&self) -> bool {
        self.begun_ms.load(Ordering::Relaxed) != 0
    }
}

/// A ramp that [`Ramp::begin`] started, and the one it replaced.
#[derive(Debug, Clone, Copy)]
pub struct Begun {
    was: u64,
    set: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fraction_rises_over_the_ramp_and_ends_whole() {
        let r = Ramp::default();
        r.begin(1000);
        assert_eq!(r.fraction_at(1000), None, "no length: no ramp");
        r.set_length(Some(Duration::from_secs(10)));
        r.begin(1000);
        assert!(r.maybe_ramping());
        assert_eq!(r.fraction_at(1000), Some(FLOOR), "near 0 as it comes back");
        let quarter = r.fraction_at(3500).unwrap();
        assert!((quarter - 0.25).abs() < 1e-9, "{quarter}");
        let most = r.fraction_at(10_000).unwrap();
        assert!((most - 0.9).abs() < 1e-9, "{most}");
        assert_eq!(r.fraction_at(11_000), None, "whole at the end");
        assert!(!r.maybe_ramping(), "and the clock is no longer read");
        // Coming back again starts a new ramp from near 0.
        r.begin(20_000);
        assert_eq!(r.fraction_at(20_000), Some(FLOOR));
        // A reload that takes slow_start away ends the ramp at once.
        r.set_length(None);
        assert_eq!(r.fraction_at(20_001), None);
    }

    #[test]
    fn an_undone_begin_leaves_the_ramp_as_it_was() {
        let r = Ramp::default();
        r.set_length(Some(Duration::from_secs(10)));
        let b = r.begin(1000).unwrap();
        r.undo(b);
        assert!(!r.maybe_ramping(), "none ran before");
        r.begin(1000);
        let b = r.begin(6000).unwrap();
        r.undo(b);
        assert_eq!(r.fraction_at(6000), Some(0.5), "the earlier one goes on");
        // One that began since is not undone.
        let b = r.begin(7000).unwrap();
        r.begin(8000);
        r.undo(b);
        assert_eq!(r.fraction_at(8000), Some(FLOOR));
    }

    #[test]
    fn a_length_changed_during_a_ramp_counts_from_when_it_began() {
        let r = Ramp::default();
        r.set_length(Some(Duration::from_secs(10)));
        r.begin(1000);
        assert_eq!(r.fraction_at(6000), Some(0.5));
        // Longer: further to go from the same start, not a jump up.
        r.set_length(Some(Duration::from_secs(20)));
        assert_eq!(r.fraction_at(6000), Some(0.25));
        // Shorter: further along, not pinned at the floor.
        r.set_length(Some(Duration::from_secs(8)));
        assert_eq!(r.fraction_at(6000), Some(0.625));
        // Shorter than the time since it began: over.
        r.set_length(Some(Duration::from_secs(5)));
        assert_eq!(r.fraction_at(6000), None);
        assert!(!r.maybe_ramping());
        // A clock read before the begin it races counts as its start.
        r.begin(9000);
        assert_eq!(r.fraction_at(8999), Some(FLOOR));
    }
}
