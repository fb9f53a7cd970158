//! One page of a list in key order, picked in one pass over the list as
//! it is stored (a hash map), without collecting or sorting the whole of
//! it: a bounded max-heap keeps the smallest `limit + 1` keys above the
//! cursor. A page costs one walk of the list and `O(limit)` memory; the
//! hot path that adds and removes connections pays nothing for it.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Picks the page: offer every item, then [`Pager::finish`].
#[derive(Debug)]
pub struct Pager<K, T> {
    after: Option<K>,
    limit: usize,
    heap: BinaryHeap<Entry<K, T>>,
}

/// An item in the heap, ordered by its key alone.
#[derive(Debug)]
struct Entry<K, T>(K, T);

impl<K: Ord, T> PartialEq for Entry<K, T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<K: Ord, T> Eq for Entry<K, T> {}

impl<K: Ord, T> PartialOrd for Entry<K, T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K: Ord, T> Ord for Entry<K, T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

impl<K: Ord + Copy, T> Pager<K, T> {
    /// Items whose key is above `after` (all when `None`), at most `limit`.
    pub fn new(after: Option<K>, limit: usize) -> Pager<K, T> {
        Pager {
            after,
            limit,
            // One more than the page, to know whether another follows.
            heap: BinaryHeap::with_capacity(limit.saturating_add(1).min(16 * 1024)),
        }
    }

    /// Offers one item; `make` runs only for an item the page may keep,
    /// so that the others cost a comparison and no copy.
    pub fn offer(&mut self, key: K, make: impl FnOnce() -> T) {
        if self.after.is_some_and(|a| key <= a) {
            return;
        }
        if self.heap.len() > self.limit {
            match self.heap.peek() {
                Some(top) if key < top.0 => {
                    self.heap.pop();
                }
                _ => return,
            }
        }
        self.heap.push(Entry(key, make()));
    }

    /// The page in ascending key order, and whether more items follow it.
    pub fn finish(self) -> (Vec<T>, bool) {
        let mut sorted = self.heap.into_sorted_vec();
        let more = sorted.len() > self.limit;
        sorted.truncate(self.limit);
        (sorted.into_iter().map(|e| e.1).collect(), more)
    }
}

/// A whole list's page, for tests and small lists.
pub fn page_of<K: Ord + Copy, T>(
    items: impl IntoIterator<Item = (K, T)>,
    after: Option<K>,
    limit: usize,
) -> (Vec<T>, bool) {
    let mut p = Pager::new(after, limit);
    for (k, t) in items {
        p.offer(k, || t);
    }
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks every page as a client would and returns the keys it saw.
    fn walk(keys: &[u64], limit: usize) -> Vec<u64> {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = page_of(keys.iter().map(|&k| (k, k)), after, limit);
            assert!(page.len() <= limit);
            assert!(!more || page.len() == limit, "a short page says more");
            seen.extend(&page);
            if !more {
                return seen;
            }
            after = page.last().copied();
        }
    }

    #[test]
    fn pages_are_in_key_order_and_cover_every_key_once() {
        // Scrambled, as a hash map walks them.
        let keys: Vec<u64> = (1..=2500u64).map(|i| (i * 7919) % 2503 + 1).collect();
        let mut want = keys.clone();
        want.sort();
        for limit in [1, 7, 1000, 2500, 3000] {
            assert_eq!(walk(&keys, limit), want, "limit {limit}");
        }
    }

    #[test]
    fn the_last_page_says_no_more() {
        let keys = [5u64, 3, 9, 1];
        assert_eq!(page_of(keys.map(|k| (k, k)), None, 2), (vec![1, 3], true));
        assert_eq!(
            page_of(keys.map(|k| (k, k)), Some(3), 2),
            (vec![5, 9], false)
        );
        assert_eq!(page_of(keys.map(|k| (k, k)), Some(9), 2), (vec![], false));
        // Exactly a page left: no next page.
        assert!(!page_of(keys.map(|k| (k, k)), None, 4).1);
        // A page of none still tells whether any follow.
        assert_eq!(page_of(keys.map(|k| (k, k)), Some(5), 0), (vec![], true));
        assert_eq!(page_of(keys.map(|k| (k, k)), Some(9), 0), (vec![], false));
    }

    #[test]
    fn keys_may_be_pairs() {
        let rows = [(7u32, 2u64), (3, 9), (7, 1), (3, 1)];
        let (page, more) = page_of(rows.map(|r| (r, r)), Some((3, 1)), 2);
        assert_eq!((page, more), (vec![(3, 9), (7, 1)], true));
    }

    #[test]
    fn only_kept_items_are_made() {
        let mut made = 0;
        let mut p = Pager::new(Some(10u64), 2);
        for k in [1u64, 2, 11, 12, 30, 40, 50] {
            p.offer(k, || {
                made += 1;
                k
            });
        }
        assert_eq!(p.finish(), (vec![11, 12], true));
        assert_eq!(
            made, 3,
            "keys at or below the cursor, or above a full page, are skipped"
        );
    }
}
