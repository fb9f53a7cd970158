//! A pool of things kept for reuse (copy buffers, kernel pipes), bounded
//! by a cap that can change, and trimmed when idle: what was not taken
//! during a whole trim interval is freed, so a burst leaves nothing behind
//! for long.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Items kept for reuse.
#[derive(Debug)]
pub struct Pool<T> {
    inner: Mutex<Inner<T>>,
    cap: AtomicUsize,
}

#[derive(Debug)]
struct Inner<T> {
    items: Vec<T>,
    /// The fewest items the pool held since the last trim: that many were
    /// not needed in the whole interval.
    low: usize,
}

impl<T> Pool<T> {
    pub const fn new(cap: usize) -> Pool<T> {
        Pool {
            inner: Mutex::new(Inner {
                items: Vec::new(),
                low: 0,
            }),
            cap: AtomicUsize::new(cap),
        }
    }

    /// An item from the pool, if it has one.
    pub fn take(&self) -> Option<T> {
        let mut p = self.inner.lock().ok()?;
        let item = p.items.pop();
        p.low = p.low.min(p.items.len());
        item
    }

    /// Keeps `item` for reuse, or drops it when the pool is full.
    pub fn give(&self, item: T) {
        if let Ok(mut p) = self.inner.lock()
            && p.items.len() < self.cap.load(Ordering::Relaxed)
        {
            p.items.push(item);
        }
    }

    /// Sets the cap; what is over it goes at once.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
        if let Ok(mut p) = self.inner.lock() {
            p.items.truncate(cap);
            p.low = p.low.min(cap);
        }
    }

    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Items held now.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |p| p.items.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees the items nobody took since the last trim; returns how many.
    /// Dropped outside the lock (closing a pipe is a system call).
    pub fn trim(&self) -> usize {
        let idle: Vec<T> = match self.inner.lock() {
            Ok(mut p) => {
                let n = p.low.min(p.items.len());
                let idle = p.items.drain(..n).collect();
                p.low = p.items.len();
                idle
            }
            Err(_) => Vec::new(),
        };
        idle.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_freed_after_two_idle_trims_and_a_used_item_stays() {
        let p = Pool::new(10);
        for i in 0..5 {
            p.give(i);
        }
        // Items given since the last trim are not idle yet.
        assert_eq!(p.trim(), 0);
        assert_eq!(p.len(), 5);
        // One is taken and given back during this interval: four were idle.
        let x = p.take().unwrap();
        p.give(x);
        assert_eq!(p.trim(), 4);
        assert_eq!(p.len(), 1);
        assert_eq!(p.trim(), 1);
        assert!(p.is_empty());
    }

    #[test]
    fn the_cap_bounds_what_is_kept() {
        let p = Pool::new(2);
        for i in 0..5 {
            p.give(i);
        }
        assert_eq!(p.len(), 2);
        p.set_cap(1);
        assert_eq!(p.len(), 1);
        p.set_cap(0);
        p.give(9);
        assert!(p.is_empty());
    }
}
