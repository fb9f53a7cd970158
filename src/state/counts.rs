//! A service's own counts, beside its backends': the clients it refused,
//! by reason, and how long its connections lasted. Plain atomics, written
//! where a client is refused or a connection ends and read at scrape time
//! by `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::events::Reason;

/// Upper bounds, in seconds, of the connection duration buckets: from a
/// quick request to an hour-long download or idle keep-alive.
pub const DURATION_BOUNDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// What a service counts of its own.
#[derive(Debug, Default)]
pub struct ServiceCounts {
    refused: [AtomicU64; Reason::COUNT],
    /// Connections per duration bucket, not cumulative (so that one ending
    /// costs one add), the last one over every bound.
    buckets: [AtomicU64; DURATION_BOUNDS.len() + 1],
    /// Sum of the durations, in microseconds.
    sum_us: AtomicU64,
}

/// A duration histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Durations {
    /// (upper bound in seconds, connections in that bucket alone), the
    /// last bound infinite.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl ServiceCounts {
    /// Counts a refused client.
    pub fn refused(&self, why: Reason) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Clients refused since start, by reason in [`Reason::ALL`]'s order.
    pub fn refused_all(&self) -> [u64; Reason::COUNT] {
        Reason::ALL.map(|r| self.refused_total(r))
    }

    /// Clients refused for `why` since start.
    pub fn refused_total(&self, why: Reason) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Counts a connection that lasted `d`: two relaxed adds.
    pub fn ended(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BOUNDS.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// The histogram now. The count is the sum of the buckets, so the two
    /// always agree; the sum may lag or lead them by a connection ending
    /// during the read.
    pub fn durations(&self) -> Durations {
        let buckets: Vec<(f64, u64)> = DURATION_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        Durations {
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_lands_in_the_first_bucket_that_holds_it() {
        let c = ServiceCounts::default();
        c.ended(Duration::from_millis(5));
        c.ended(Duration::from_millis(6));
        c.ended(Duration::from_secs(2 * 3600));
        let d = c.durations();
        assert_eq!(d.count, 3);
        assert_eq!(d.buckets[0], (0.005, 1), "a bound holds its own value");
        assert_eq!(d.buckets[1], (0.01, 1));
        assert_eq!(*d.buckets.last().unwrap(), (f64::INFINITY, 1));
        assert!((d.sum_seconds - 7200.011).abs() < 1e-9, "{}", d.sum_seconds);
    }

    #[test]
    fn refusals_count_by_reason() {
        let c = ServiceCounts::default();
        c.refused(Reason::NoBackend);
        c.refused(Reason::NoBackend);
        c.refused(Reason::Limit);
        let got: Vec<_> = Reason::ALL.iter().map(|&r| c.refused_total(r)).collect();
        assert_eq!(got, [1, 2, 0, 0, 0]);
    }
}
