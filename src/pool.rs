//! A service's backends and weighted round-robin selection.
//!
//! Selection yields a fallback order, not one backend: the proxy walks it
//! on connect failure, so a dead server costs the client nothing. The order
//! is a lazy iterator: nothing is allocated unless a fallback is needed,
//! and the shared cursor moves once per pick however many backends are out
//! of rotation.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::Backend;
use crate::net::Target;

/// A backend of a service, and where that service reaches it.
pub type Member = (Arc<Backend>, Target);

/// The backends of one service and its round-robin schedule.
#[derive(Debug)]
pub struct Route {
    members: Vec<Member>,
    /// Indices into `members`, each backend as often as its weight,
    /// interleaved (smooth weighted round-robin).
    schedule: Vec<usize>,
    cursor: AtomicUsize,
}

impl Route {
    pub fn new(members: Vec<Member>) -> Route {
        let weights: Vec<u32> = members.iter().map(|(b, _)| b.weight()).collect();
        Route {
            schedule: smooth_schedule(&weights),
            members,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The backends to try for a new connection, best first: the next in
    /// the schedule that takes new connections, then every other one that
    /// does, in member order after it. Empty when none takes new
    /// connections.
    ///
    /// The cursor moves past the chosen slot in one compare-and-swap, so
    /// slots of backends out of rotation are skipped by the pick that
    /// meets them, the rest keep their shares in proportion to their
    /// weights, and concurrent picks cannot use up every slot between them
    /// and come back empty while a backend takes connections.
    pub fn pick(&self) -> Candidates<'_> {
        let len = self.schedule.len();
        let mut first = None;
        if len > 0 {
            let _ = self
                .cursor
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    first = None;
                    let start = c % len;
                    let k = (0..len).find(|k| {
                        let m = &self.members[self.schedule[(start + k) % len]];
                        m.0.takes_new_connections()
                    })?;
                    first = Some(self.schedule[(start + k) % len]);
                    Some((start + k + 1) % len)
                });
        }
        Candidates {
            members: &self.members,
            first,
            step: 0,
        }
    }
}

/// A pick's fallback order; see [`Route::pick`].
#[derive(Debug)]
pub struct Candidates<'a> {
    members: &'a [Member],
    /// The chosen member's index; `None` when no backend takes connections.
    first: Option<usize>,
    /// Members looked at so far, from `first` on.
    step: usize,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Member;

    fn next(&mut self) -> Option<&'a Member> {
        let first = self.first?;
        let n = self.members.len();
        while self.step < n {
            let m = &self.members[(first + self.step) % n];
            self.step += 1;
            // The first was eligible when picked; the slot it takes
            // checks again.
            if self.step == 1 || m.0.takes_new_connections() {
                return Some(m);
            }
        }
        None
    }
}

/// Interleaves member indices by smooth weighted round-robin, so that a
/// backend of weight 3 next to one of weight 1 gets `a a b a`, not
/// `a a a b`. Members of weight 0 do not appear.
fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DrainPolicy, State};
    use crate::config::BackendAddress;
    use crate::shutdown::Background;

    fn route(weights: &[u32]) -> Route {
        let members = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = BackendAddress::parse(&format!("127.0.0.1:{}", 1000 + i)).unwrap();
                let b = Arc::new(Backend::new(
                    format!("b{i}"),
                    addr.clone(),
                    w,
                    State::Active,
                ));
                (b, Target::new(&addr, 80))
            })
            .collect();
        Route::new(members)
    }

    fn firsts(r: &Route, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| r.pick().next().unwrap().0.name.clone())
            .collect()
    }

    fn drain(b: &Arc<Backend>) {
        b.drain(DrainPolicy::default(), &Background::default());
    }

    #[test]
    fn schedule_is_smooth() {
        assert_eq!(smooth_schedule(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(smooth_schedule(&[2, 0, 1]), [0, 2, 0]);
    }

    #[test]
    fn round_robin_with_fallback_order() {
        let r = route(&[1, 1, 1]);
        assert_eq!(firsts(&r, 6), ["b0", "b1", "b2", "b0", "b1", "b2"]);
        let order: Vec<_> = r.pick().map(|m| m.0.name.clone()).collect();
        assert_eq!(order, ["b0", "b1", "b2"]);
        let order: Vec<_> = r.pick().map(|m| m.0.name.clone()).collect();
        assert_eq!(order, ["b1", "b2", "b0"], "fallbacks follow the first");
    }

    #[test]
    fn backends_out_of_rotation_keep_shares_fair() {
        let r = route(&[1, 1, 1]);
        drain(&r.members()[1].0);
        let picks = firsts(&r, 6);
        assert_eq!(picks.iter().filter(|n| *n == "b0").count(), 3);
        assert_eq!(picks.iter().filter(|n| *n == "b2").count(), 3);
        let order: Vec<_> = r.pick().map(|m| m.0.name.clone()).collect();
        assert_eq!(order, ["b0", "b2"], "no fallback to a drained backend");
        for m in r.members() {
            drain(&m.0);
        }
        assert_eq!(r.pick().count(), 0);
    }

    #[test]
    fn weights_decide_shares_and_fallbacks_appear_once() {
        let r = route(&[3, 1]);
        assert_eq!(firsts(&r, 4), ["b0", "b0", "b1", "b0"]);
        for _ in 0..4 {
            let order: Vec<_> = r.pick().map(|m| m.0.name.clone()).collect();
            assert_eq!(order.len(), 2, "each backend once: {order:?}");
        }
    }

    #[test]
    fn concurrent_picks_never_come_back_empty_while_one_backend_serves() {
        // One slot in 101 serves: picks that each step the shared cursor
        // once per slot they look at skip it when another pick steps at
        // the same time, and come back empty.
        let r = Arc::new(route(&[100, 1]));
        drain(&r.members()[0].0);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    (0..20_000).filter(|_| r.pick().next().is_none()).count()
                })
            })
            .collect();
        let empty: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(empty, 0, "picks that found no backend");
    }
}
