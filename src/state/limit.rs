//! The global connection limit, `max_connections`, resizable while busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// Permits for proxied connections. Lowering the limit below what live
/// connections hold leaves a debt, paid by connections as they end; a
/// later raise pays it first.
#[derive(Debug, Clone)]
pub struct Limit(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    permits: Semaphore,
    /// Permits still to take back after the limit was lowered.
    debt: AtomicUsize,
    /// The limit in force.
    max: AtomicUsize,
}

impl Limit {
    pub fn new(max: usize) -> Limit {
        Limit(Arc::new(Inner {
            permits: Semaphore::new(max),
            debt: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }))
    }

    /// A permit for one connection, or `None` at the limit.
    pub fn try_acquire(&self) -> Option<Permit> {
        self.0.permits.try_acquire().ok()?.forget();
        Some(Permit(self.0.clone()))
    }

    /// The limit in force.
    pub fn max(&self) -> usize {
        self.0.max.load(Ordering::SeqCst)
    }

    /// Permits free now.
    pub fn available(&self) -> usize {
        self.0.permits.available_permits()
    }

    /// Moves the limit to `to`. Callers serialize resizes (reload does).
    pub fn resize(&self, to: usize) {
        let from = self.0.max.swap(to, Ordering::SeqCst);
        if to > from {
            let mut raise = to - from;
            let _ = self
                .0
                .debt
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                    let paid = d.min(to - from);
                    raise = to - from - paid;
                    Some(d - paid)
                });
            self.0.permits.add_permits(raise);
        } else if to < from {
            let gone = self.0.permits.forget_permits(from - to);
            if gone < from - to {
                self.0.debt.fetch_add(from - to - gone, Ordering::SeqCst);
                tracing::warn!(
                    max_connections = to,
                    "lowered while busy: the limit applies fully as live connections end"
                );
            }
        }
    }
}

/// One connection's permit: given back when dropped, on any path, or kept
/// to pay the limit's debt.
#[derive(Debug)]
pub struct Permit(Arc<Inner>);

impl Drop for Permit {
    fn drop(&mut self) {
        let paid = self
            .0
            .debt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
            .is_ok();
        if !paid {
            self.0.permits.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(l: &Limit, n: usize) -> Vec<Permit> {
        (0..n).map_while(|_| l.try_acquire()).collect()
    }

    #[test]
    fn at_the_limit_nothing_more() {
        let l = Limit::new(2);
        let held = take(&l, 5);
        assert_eq!(held.len(), 2);
        drop(held);
        assert_eq!(l.available(), 2);
    }

    #[test]
    fn lowered_while_busy_applies_as_connections_end() {
        let l = Limit::new(3);
        let mut held = take(&l, 3);
        l.resize(1);
        assert!(l.try_acquire().is_none());
        held.pop();
        assert!(l.try_acquire().is_none(), "the first end pays the debt");
        held.pop();
        assert!(l.try_acquire().is_none(), "so does the second");
        held.pop();
        assert_eq!(l.available(), 1, "then the new limit holds");
    }

    #[test]
    fn a_raise_pays_the_debt_first() {
        let l = Limit::new(4);
        let held = take(&l, 4);
        l.resize(1);
        l.resize(2);
        assert!(l.try_acquire().is_none(), "a debt of 2 is left");
        drop(held);
        assert_eq!(l.available(), 2);
        assert_eq!(l.max(), 2);
    }

    #[test]
    fn lowered_while_idle_takes_effect_at_once() {
        let l = Limit::new(3);
        let held = take(&l, 1);
        l.resize(2);
        assert_eq!(take(&l, 5).len(), 1);
        drop(held);
        assert_eq!(l.available(), 2);
    }
}
