//! The set of backends and weighted round-robin selection.
//!
//! Selection returns a fallback order, not one backend: the proxy walks it
//! on connect failure, so a dead server costs the client nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::Backend;
use crate::config::BackendAddress;

/// Where a service connects for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// A host name, resolved at connect time.
    Host(String, u16),
}

impl Target {
    pub fn new(address: &BackendAddress, default_port: u16) -> Target {
        match address {
            BackendAddress::Ip(ip, port) => {
                Target::Addr(SocketAddr::new(*ip, port.unwrap_or(default_port)))
            }
            BackendAddress::Host(h, port) => Target::Host(h.clone(), port.unwrap_or(default_port)),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// The backends of one service and its round-robin schedule.
#[derive(Debug)]
pub struct Route {
    members: Vec<(Arc<Backend>, Target)>,
    /// Indices into `members`, each backend as often as its weight,
    /// interleaved (smooth weighted round-robin).
    schedule: Vec<usize>,
    cursor: AtomicUsize,
}

impl Route {
    pub fn new(members: Vec<(Arc<Backend>, Target)>) -> Route {
        let weights: Vec<u32> = members.iter().map(|(b, _)| b.weight()).collect();
        Route {
            schedule: smooth_schedule(&weights),
            members,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn members(&self) -> &[(Arc<Backend>, Target)] {
        &self.members
    }

    /// The backends to try for a new connection, best first: the next in
    /// the schedule that takes new connections, then every other one that
    /// does, in schedule order. Empty when none takes new connections.
    pub fn pick(&self) -> Vec<&(Arc<Backend>, Target)> {
        let len = self.schedule.len();
        let mut order: Vec<&(Arc<Backend>, Target)> = Vec::new();
        if len == 0 {
            return order;
        }
        // Slots of backends out of rotation are consumed, so the rest keep
        // their share in proportion to their weights.
        let mut start = None;
        for _ in 0..len {
            let i = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
            if self.members[self.schedule[i]].0.takes_new_connections() {
                start = Some(i);
                break;
            }
        }
        let Some(start) = start else { return order };
        for k in 0..len {
            let m = &self.members[self.schedule[(start + k) % len]];
            if m.0.takes_new_connections() && !order.iter().any(|o| Arc::ptr_eq(&o.0, &m.0)) {
                order.push(m);
            }
        }
        order
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
    use crate::backend::State;

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
        (0..n).map(|_| r.pick()[0].0.name.clone()).collect()
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
        let order: Vec<_> = r.pick().iter().map(|m| m.0.name.clone()).collect();
        assert_eq!(order, ["b0", "b1", "b2"]);
    }

    #[test]
    fn backends_out_of_rotation_keep_shares_fair() {
        let r = route(&[1, 1, 1]);
        r.members()[1].0.drain();
        let picks = firsts(&r, 6);
        assert_eq!(picks.iter().filter(|n| *n == "b0").count(), 3);
        assert_eq!(picks.iter().filter(|n| *n == "b2").count(), 3);
        for m in r.members() {
            m.0.drain();
        }
        assert!(r.pick().is_empty());
    }
}
