//! A service's backends and how one is chosen for a new client.
//!
//! Selection yields a fallback order, not one backend: the proxy walks it
//! on connect failure, so a dead server costs the client nothing. The order
//! is a lazy iterator: nothing is allocated, whatever the mode.
//!
//! Every mode ranks the primaries before the backups, so a backup takes a
//! client only when no primary can (out of rotation, down, full, or
//! refusing the connect). Every mode yields only backends that
//! [`Backend::takes_new_connections`]; one that is full is still yielded
//! after the first choice, so that `try_acquire` (exact, where this is a
//! hint) can say so, and a client refused because every backend is full
//! is told apart from one that found none.
//!
//! - **round-robin**: smooth weighted round-robin over a precomputed
//!   schedule; the shared cursor moves once per pick however many backends
//!   are out of rotation. A slow-starting backend's slot is taken with the
//!   probability of its ramp's fraction and skipped otherwise, which gives
//!   it its effective weight without rebuilding the schedule; a backend
//!   not ramping costs one atomic load more than before.
//! - **least-connections**: the fewest live connections, counting the new
//!   one, relative to effective weight; ties go round in turn.
//! - **source-hash**: weighted rendezvous hashing (highest random weight).
//!   Chosen over Maglev because it needs no lookup table to rebuild when a
//!   backend leaves, a weight changes, or a slow start ramps (the weight
//!   enters the score directly); because the ranking of every backend for
//!   a client is a stable fallback order for free, so a client of a
//!   drained backend always moves to the same second choice; and because
//!   it moves only the clients of a backend that leaves or joins. It costs
//!   one hash and one logarithm per backend per connection, nothing next
//!   to a TCP connect for the tens of backends a service has. Hashes are
//!   of the client's address and the backend's name, not randomized, so
//!   every instance of a pair, before and after a restart, sends a client
//!   to the same backend.

use std::cell::Cell;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::{Backend, now_ms};
use crate::config::{Affinity, Balance, MAX_MEMBERS};
use crate::net::Target;

/// A backend of a service, and where that service reaches it.
pub type Member = (Arc<Backend>, Target);

/// The backends of one service and how it chooses among them.
#[derive(Debug)]
pub struct Route {
    members: Vec<Member>,
    balance: Balance,
    /// The primaries, then the backups.
    tiers: [Tier; 2],
    /// Per member, what source-hash ranks it by.
    seeds: Vec<Seed>,
    /// Moved by every least-connections pick, so that ties take turns.
    ties: AtomicUsize,
    /// Moved by every round-robin or least-connections walk that goes on
    /// from the primaries to the backups, so that the backups take turns
    /// as the first met there, not backup 0 every time.
    spills: AtomicUsize,
}

/// What source-hash ranks a member by besides its ramp. Weight and
/// `backup` are taken when the route is built (a reload that changes
/// either builds a new one), so a reload during a walk cannot reorder it.
#[derive(Debug)]
struct Seed {
    /// A hash of its name.
    name: u64,
    weight: u32,
    backup: bool,
}

/// The primaries or the backups of a route.
#[derive(Debug)]
struct Tier {
    /// Indices into the route's members, in member order.
    members: Vec<usize>,
    /// Positions in `members`, each as often as its weight, interleaved
    /// (smooth weighted round-robin).
    schedule: Vec<usize>,
    cursor: AtomicUsize,
}

impl Tier {
    fn new(all: &[Member], members: Vec<usize>) -> Tier {
        let weights: Vec<u32> = members.iter().map(|&i| all[i].0.weight()).collect();
        Tier {
            schedule: smooth_schedule(&weights),
            members,
            cursor: AtomicUsize::new(0),
        }
    }
}

impl Route {
    pub fn new(members: Vec<Member>, balance: Balance) -> Route {
        assert!(
            members.len() <= MAX_MEMBERS,
            "config validation keeps a service to {MAX_MEMBERS} backends"
        );
        let (backups, primaries): (Vec<usize>, Vec<usize>) =
            (0..members.len()).partition(|&i| members[i].0.is_backup());
        Route {
            tiers: [Tier::new(&members, primaries), Tier::new(&members, backups)],
            seeds: members
                .iter()
                .map(|(b, _)| Seed {
                    name: name_seed(&b.name),
                    weight: b.weight(),
                    backup: b.is_backup(),
                })
                .collect(),
            members,
            balance,
            ties: AtomicUsize::new(0),
            spills: AtomicUsize::new(0),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// The backends to try for a new connection from `client`, best first;
    /// empty when none takes new connections. See the module's doc for how
    /// each mode orders them.
    pub fn pick(&self, client: IpAddr) -> Candidates<'_> {
        let order = match self.balance {
            Balance::SourceHash(affinity) => Order::Rank {
                key: client_key(client, affinity),
                now: if self.members.iter().any(|(b, _)| b.maybe_ramping()) {
                    now_ms()
                } else {
                    0
                },
                passed: Passed::default(),
            },
            Balance::RoundRobin => {
                let now = lazy_now();
                self.first(|t| self.round_robin(t, &now))
            }
            Balance::LeastConnections => {
                let now = lazy_now();
                self.first(|t| self.least_connections(t, &now))
            }
        };
        Candidates { route: self, order }
    }

    /// The walk from the first choice that `choose` makes in a tier: the
    /// primaries' first, else the backups'. When neither has a backend with
    /// room, the first that takes connections at all, so that the walk
    /// meets the full ones and the refusal says why.
    fn first(&self, choose: impl Fn(usize) -> Option<usize>) -> Order {
        let found = (0..2).find_map(|t| choose(t).map(|p| (t, p))).or_else(|| {
            (0..2).find_map(|t| {
                let tier = &self.tiers[t];
                let p = (0..tier.members.len())
                    .find(|&p| self.backend(tier.members[p]).takes_new_connections())?;
                Some((t, p))
            })
        });
        match found {
            Some((tier, start)) => Order::Walk {
                tier,
                start,
                step: 0,
                first: true,
            },
            None => Order::Done,
        }
    }

    fn backend(&self, i: usize) -> &Backend {
        &self.members[i].0
    }

    /// The position in tier `t` of the next schedule slot whose backend is
    /// available, the cursor moved past it in one compare-and-swap, so
    /// slots of backends out of rotation are skipped by the pick that
    /// meets them, the rest keep their shares in proportion to their
    /// weights, and concurrent picks cannot use up every slot between them
    /// and come back empty while a backend takes connections.
    fn round_robin(&self, t: usize, now: &LazyNow) -> Option<usize> {
        let tier = &self.tiers[t];
        let len = tier.schedule.len();
        if len == 0 {
            return None;
        }
        let slot_of = |p: usize| self.backend(tier.members[p]);
        let mut first = None;
        let _ = tier
            .cursor
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                first = None;
                let start = c % len;
                let at = |k: usize| tier.schedule[(start + k) % len];
                // A slow-starting backend's slot is taken with the chance
                // of its ramp; should every slot be turned down that way,
                // the first available one is taken all the same.
                let k = (0..len)
                    .find(|&k| {
                        let b = slot_of(at(k));
                        b.available() && (!b.maybe_ramping() || ramp_admits(b, clock(now)))
                    })
                    .or_else(|| (0..len).find(|&k| slot_of(at(k)).available()))?;
                first = Some(at(k));
                Some((start + k + 1) % len)
            });
        first
    }

    /// The position in tier `t` of the available backend with the fewest
    /// live connections, counting the new one, relative to its effective
    /// weight. The scan starts at a rotating position, so ties take turns.
    fn least_connections(&self, t: usize, now: &LazyNow) -> Option<usize> {
        let tier = &self.tiers[t];
        let len = tier.members.len();
        if len == 0 {
            return None;
        }
        let start = self.ties.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, f64)> = None;
        for k in 0..len {
            let p = (start + k) % len;
            let b = self.backend(tier.members[p]);
            if !b.available() {
                continue;
            }
            let load = (b.live() + 1) as f64 / effective_weight(b, now);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((p, load));
            }
        }
        best.map(|(p, _)| p)
    }

    /// Member `i`'s rank for a client's `key`: primaries above backups,
    /// then by weighted rendezvous score, then by member order. Its
    /// weight and `backup` are the route's; its ramp is read at `now`
    /// (0: not read).
    fn rank(&self, i: usize, key: u64, now: u64) -> Rank {
        let seed = &self.seeds[i];
        let mut w = seed.weight as f64;
        if now != 0 {
            w *= self.backend(i).ramp_fraction_at(now);
        }
        // A uniform draw in (0, 1) from the pair's hash; -w / ln(u) is
        // the weighted rendezvous score (the largest wins), which gives
        // each backend a share of clients in proportion to its weight.
        let u = unit_open(mix(key ^ seed.name));
        Rank(!seed.backup, w / -u.ln(), usize::MAX - i)
    }
}

/// A member's place in a source-hash order; higher is better.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
struct Rank(bool, f64, usize);

/// Where a pick's fallback order stands.
#[derive(Debug)]
enum Order {
    /// Round-robin and least-connections: the first choice, at `start` in
    /// `tier`, then the rest of that tier in member order after it, then
    /// (from the primaries) every backup, in member order from one that
    /// turns with each walk that gets there.
    Walk {
        tier: usize,
        start: usize,
        /// Members of `tier` looked at so far.
        step: usize,
        /// Whether the next is the first choice, which was eligible when
        /// picked (the slot it takes checks again).
        first: bool,
    },
    /// Source-hash: every member by descending rank for the client's key.
    /// Each step takes the best of the members not yet passed, so a rank
    /// that changes between steps (a ramp that begins or ends while a
    /// connect is pending) can neither skip a member nor repeat one.
    Rank {
        key: u64,
        /// The clock for effective weights, read at the pick; 0 when none
        /// ramped then.
        now: u64,
        passed: Passed,
    },
    Done,
}

/// The members a source-hash walk has passed, one bit each.
#[derive(Debug, Default)]
struct Passed([u64; MAX_MEMBERS / 64]);

impl Passed {
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn add(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
}

/// A pick's fallback order; see [`Route::pick`].
#[derive(Debug)]
pub struct Candidates<'a> {
    route: &'a Route,
    order: Order,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Member;

    fn next(&mut self) -> Option<&'a Member> {
        let r = self.route;
        match &mut self.order {
            Order::Walk {
                tier,
                start,
                step,
                first,
            } => loop {
                let members = &r.tiers[*tier].members;
                if *step == members.len() {
                    // From the primaries on to the backups, in order from
                    // one that turns.
                    let backups = r.tiers[1].members.len();
                    if *tier == 1 || backups == 0 {
                        return None;
                    }
                    let turn = r.spills.fetch_add(1, Ordering::Relaxed);
                    (*tier, *start, *step) = (1, turn % backups, 0);
                    continue;
                }
                let m = &r.members[members[(*start + *step) % members.len()]];
                *step += 1;
                if std::mem::take(first) || m.0.takes_new_connections() {
                    return Some(m);
                }
            },
            Order::Rank { key, now, passed } => loop {
                let (i, _) = (0..r.members.len())
                    .filter(|&i| !passed.has(i))
                    .map(|i| (i, r.rank(i, *key, *now)))
                    .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))?;
                passed.add(i);
                let m = &r.members[i];
                if m.0.takes_new_connections() {
                    return Some(m);
                }
            },
            Order::Done => None,
        }
    }
}

/// The clock of one pick: read the first time a ramping backend is met,
/// and never if none is. Every ramp of the pick is weighed at that one
/// moment, however many slots it looks at and however many times its
/// compare-and-swap retries.
type LazyNow = Cell<Option<u64>>;

fn lazy_now() -> LazyNow {
    Cell::new(None)
}

fn clock(now: &LazyNow) -> u64 {
    now.get().unwrap_or_else(|| {
        let t = now_ms();
        now.set(Some(t));
        t
    })
}

fn effective_weight(b: &Backend, now: &LazyNow) -> f64 {
    if !b.maybe_ramping() {
        return b.weight() as f64;
    }
    b.effective_weight_at(clock(now))
}

/// Whether a round-robin slot of a slow-starting backend is taken at
/// `now`: with the chance of its ramp's fraction.
fn ramp_admits(b: &Backend, now: u64) -> bool {
    let fraction = b.ramp_fraction_at(now);
    fraction >= 1.0 || unit_random() < fraction
}

/// A draw in [0, 1) from a per-thread xorshift: cheap, lock-free, and good
/// enough to thin a schedule's slots.
fn unit_random() -> f64 {
    static THREADS: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // Each thread its own sequence; never 0, where xorshift sticks.
        static STATE: Cell<u64> =
            Cell::new(mix(now_ms() ^ THREADS.fetch_add(1, Ordering::Relaxed) as u64) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// A hash as a draw in (0, 1), both ends excluded: 52 bits and a half,
/// exact in an f64. 53 bits and a half would round the top draw to 1,
/// whose logarithm is 0, and give that pair an infinite score.
fn unit_open(h: u64) -> f64 {
    ((h >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// What source-hash keys on: the client's address, or its /24 (IPv4) or
/// /48 (IPv6). An IPv4 client seen on an IPv6 socket (`::ffff:a.b.c.d`)
/// counts as the IPv4 address it is.
fn client_key(ip: IpAddr, affinity: Affinity) -> u64 {
    let network = affinity == Affinity::Network;
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let mut v = u32::from(a);
            if network {
                v &= 0xffff_ff00;
            }
            mix(u64::from(v) | 4 << 32)
        }
        IpAddr::V6(a) => {
            let mut v = u128::from(a);
            if network {
                v &= !0u128 << 80;
            }
            mix(mix(v as u64) ^ (v >> 64) as u64 ^ 6 << 32)
        }
    }
}

/// A backend's name as a 64-bit seed (FNV-1a, then mixed), the same in
/// every process.
fn name_seed(name: &str) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(h)
}

/// splitmix64's finalizer: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
    use std::collections::HashMap;
    use std::time::Duration;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));

    fn backend(name: &str, w: u32) -> Member {
        let addr = BackendAddress::parse("127.0.0.1:1000").unwrap();
        let b = Arc::new(Backend::new(name.into(), addr.clone(), w, State::Active));
        (b, Target::new(&addr, 80))
    }

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| backend(&format!("b{i}"), w))
            .collect()
    }

    fn route(weights: &[u32]) -> Route {
        Route::new(members(weights), Balance::RoundRobin)
    }

    fn firsts(r: &Route, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| r.pick(CLIENT).next().unwrap().0.name.clone())
            .collect()
    }

    fn order(r: &Route, client: IpAddr) -> Vec<String> {
        r.pick(client).map(|m| m.0.name.clone()).collect()
    }

    /// The backend a client lands on: the first in the order that gives
    /// a slot, as the proxy walks it.
    fn served(r: &Route, client: IpAddr) -> String {
        r.pick(client)
            .find(|m| {
                m.0.try_acquire("127.0.0.1:9".parse().unwrap(), "s".into())
                    .is_ok()
            })
            .unwrap()
            .0
            .name
            .clone()
    }

    fn drain(b: &Arc<Backend>) {
        b.drain(DrainPolicy::default(), &Background::default());
    }

    /// How many of `picks` went to each backend.
    fn shares(picks: impl Iterator<Item = String>) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for p in picks {
            *out.entry(p).or_default() += 1;
        }
        out
    }

    #[test]
    fn a_hash_draw_is_never_0_or_1() {
        for h in [0, 1, 4095, u64::MAX - 4095, u64::MAX] {
            let u = unit_open(h);
            assert!(u > 0.0 && u < 1.0, "{h}: {u}");
            assert!(-u.ln() > 0.0, "{h}: a score needs a positive divisor");
        }
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
        assert_eq!(order(&r, CLIENT), ["b0", "b1", "b2"]);
        assert_eq!(
            order(&r, CLIENT),
            ["b1", "b2", "b0"],
            "fallbacks follow the first"
        );
    }

    #[test]
    fn backends_out_of_rotation_keep_shares_fair() {
        let r = route(&[1, 1, 1]);
        drain(&r.members()[1].0);
        let picks = firsts(&r, 6);
        assert_eq!(picks.iter().filter(|n| *n == "b0").count(), 3);
        assert_eq!(picks.iter().filter(|n| *n == "b2").count(), 3);
        assert_eq!(
            order(&r, CLIENT),
            ["b0", "b2"],
            "no fallback to a drained backend"
        );
        for m in r.members() {
            drain(&m.0);
        }
        assert_eq!(r.pick(CLIENT).count(), 0);
    }

    #[test]
    fn weights_decide_shares_and_fallbacks_appear_once() {
        let r = route(&[3, 1]);
        assert_eq!(firsts(&r, 4), ["b0", "b0", "b1", "b0"]);
        for _ in 0..4 {
            assert_eq!(order(&r, CLIENT).len(), 2, "each backend once");
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
                    (0..20_000)
                        .filter(|_| r.pick(CLIENT).next().is_none())
                        .count()
                })
            })
            .collect();
        let empty: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(empty, 0, "picks that found no backend");
    }

    #[test]
    fn a_full_backend_is_skipped_first_but_still_met_in_the_fallbacks() {
        let r = route(&[1, 1]);
        let b0 = &r.members()[0].0;
        b0.set_balancing(None, Some(1), false);
        let _held = b0
            .try_acquire("127.0.0.1:9".parse().unwrap(), "s".into())
            .unwrap();
        assert_eq!(firsts(&r, 4), ["b1", "b1", "b1", "b1"]);
        assert_eq!(
            order(&r, CLIENT),
            ["b1", "b0"],
            "try_acquire says it is full"
        );
        let b1 = &r.members()[1].0;
        b1.set_balancing(None, Some(1), false);
        let _held1 = b1
            .try_acquire("127.0.0.1:9".parse().unwrap(), "s".into())
            .unwrap();
        assert_eq!(
            order(&r, CLIENT).len(),
            2,
            "all full: both met, so the refusal says full"
        );
    }

    #[test]
    fn backups_serve_only_when_no_primary_can() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::SourceHash(Affinity::ClientIp),
        ] {
            let m = members(&[1, 1, 1]);
            m[2].0.set_balancing(None, None, true);
            let r = Route::new(m, balance);
            for _ in 0..20 {
                let o = order(&r, CLIENT);
                assert_ne!(o[0], "b2", "{balance:?}: a backup chosen first");
                assert_eq!(
                    o.last().unwrap(),
                    "b2",
                    "{balance:?}: the backup is the last fallback"
                );
            }
            drain(&r.members()[0].0);
            let b1 = &r.members()[1].0;
            b1.set_balancing(None, Some(1), false);
            let held = b1
                .try_acquire("127.0.0.1:9".parse().unwrap(), "s".into())
                .unwrap();
            // The only primary in rotation is full: the client goes to the
            // backup.
            assert_eq!(served(&r, CLIENT), "b2", "{balance:?}");
            drop(held);
            assert_eq!(order(&r, CLIENT), ["b1", "b2"], "{balance:?}");
        }
    }

    #[test]
    fn backups_take_turns_when_walks_go_on_past_the_primaries() {
        for balance in [Balance::RoundRobin, Balance::LeastConnections] {
            let m = members(&[1, 1, 1, 1]);
            m[2].0.set_balancing(None, None, true);
            m[3].0.set_balancing(None, None, true);
            let r = Route::new(m, balance);
            // Every primary refused the connect: the walk goes on to the
            // backups, the first of which the client lands on.
            let first_backup = shares((0..20).map(|_| order(&r, CLIENT)[2].clone()));
            assert_eq!(first_backup.get("b2"), Some(&10), "{balance:?}");
            assert_eq!(first_backup.get("b3"), Some(&10), "{balance:?}");
        }
    }

    #[test]
    fn least_connections_picks_the_least_loaded_relative_to_weight() {
        let r = Route::new(members(&[1, 2, 1]), Balance::LeastConnections);
        let hold = |i: usize, n: usize| -> Vec<_> {
            (0..n)
                .map(|_| {
                    r.members()[i]
                        .0
                        .try_acquire("127.0.0.1:9".parse().unwrap(), "s".into())
                        .unwrap()
                })
                .collect()
        };
        // (live + 1) / weight: b0 3/1, b1 4/2, b2 2/1: b1 and b2 tie at 2.
        let _a = hold(0, 2);
        let _b = hold(1, 3);
        let _c = hold(2, 1);
        let picks = shares((0..100).map(|_| r.pick(CLIENT).next().unwrap().0.name.clone()));
        assert_eq!(picks.get("b0"), None, "{picks:?}");
        assert!(
            picks["b1"] >= 25 && picks["b2"] >= 25,
            "ties take turns: {picks:?}"
        );
        let _more = hold(2, 1);
        // b2 now 3/1 against b1's 2: b1 every time.
        assert_eq!(
            shares((0..10).map(|_| r.pick(CLIENT).next().unwrap().0.name.clone()))["b1"],
            10
        );
        // Picks that hold their connection spread the load by weight.
        let r = Route::new(members(&[1, 3]), Balance::LeastConnections);
        let mut held = Vec::new();
        for _ in 0..40 {
            let m = r.pick(CLIENT).next().unwrap();
            held.push(
                m.0.try_acquire("127.0.0.1:9".parse().unwrap(), "s".into())
                    .unwrap(),
            );
        }
        assert_eq!((r.members()[0].0.live(), r.members()[1].0.live()), (10, 30));
    }

    /// 10,000 client addresses: 10.x.y.z.
    fn clients() -> Vec<IpAddr> {
        (0..10_000u32)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i * 7919)))
            .collect()
    }

    fn mapping(r: &Route, clients: &[IpAddr]) -> Vec<String> {
        clients
            .iter()
            .map(|&c| r.pick(c).next().unwrap().0.name.clone())
            .collect()
    }

    #[test]
    fn source_hash_moves_only_the_clients_of_a_backend_that_leaves_or_joins() {
        let r = Route::new(
            members(&[1, 1, 1, 1, 1]),
            Balance::SourceHash(Affinity::ClientIp),
        );
        let clients = clients();
        let before = mapping(&r, &clients);
        let counts = shares(before.iter().cloned());
        for n in counts.values() {
            // Each a fifth (2,000), give or take hashing's spread.
            assert!((1700..=2300).contains(n), "uneven shares: {counts:?}");
        }
        drain(&r.members()[2].0);
        let drained = mapping(&r, &clients);
        let moved: Vec<usize> = (0..clients.len())
            .filter(|&i| before[i] != drained[i])
            .collect();
        assert!(
            moved.len() <= 2000 + 300,
            "{} moved, more than b2's share",
            moved.len()
        );
        assert!(
            moved.iter().all(|&i| before[i] == "b2"),
            "a client of another backend moved"
        );
        assert_eq!(moved.len(), counts["b2"], "every client of b2 moved");
        // They spread over the other four, not onto one.
        let to = shares(moved.iter().map(|&i| drained[i].clone()));
        assert_eq!(to.len(), 4, "{to:?}");
        r.members()[2].0.start();
        assert_eq!(mapping(&r, &clients), before, "back: every client returns");

        // A sixth backend joins: only the clients it takes move, to it.
        let mut six = members(&[1, 1, 1, 1, 1]);
        six.push(backend("b5", 1));
        let grown = mapping(
            &Route::new(six, Balance::SourceHash(Affinity::ClientIp)),
            &clients,
        );
        let moved: Vec<usize> = (0..clients.len())
            .filter(|&i| before[i] != grown[i])
            .collect();
        assert!(moved.iter().all(|&i| grown[i] == "b5"));
        assert!(
            (1400..=1950).contains(&moved.len()),
            "a sixth should move: {}",
            moved.len()
        );

        // Negative control: the same measure fails a hash that is not
        // consistent (the key modulo the number of backends).
        let modulo = |n: u64| -> Vec<u64> {
            clients
                .iter()
                .map(|&c| client_key(c, Affinity::ClientIp) % n)
                .collect()
        };
        let (five, four) = (modulo(5), modulo(4));
        assert!((0..clients.len()).filter(|&i| five[i] != four[i]).count() > 2300);
    }

    #[test]
    fn source_hash_weights_shares_and_keeps_a_stable_fallback_order() {
        let r = Route::new(members(&[1, 3]), Balance::SourceHash(Affinity::ClientIp));
        let clients = clients();
        let counts = shares(mapping(&r, &clients).into_iter());
        assert!((2200..=2800).contains(&counts["b0"]), "{counts:?}");

        let r = Route::new(
            members(&[1, 1, 1, 1, 1]),
            Balance::SourceHash(Affinity::ClientIp),
        );
        for &c in &clients[..200] {
            let full = order(&r, c);
            assert_eq!(full.len(), 5);
            assert_eq!(order(&r, c), full, "the same order every time");
            let first = r.members().iter().find(|m| m.0.name == full[0]).unwrap();
            drain(&first.0);
            assert_eq!(
                order(&r, c),
                full[1..],
                "its own first out: the same second choice"
            );
            first.0.start();
        }
    }

    #[test]
    fn a_source_hash_walk_meets_each_backend_once_whatever_changes_mid_walk() {
        // The proxy walks the order across its connects' awaits: a ramp
        // that begins or ends, or a reload, may land between two steps.
        let hour = Duration::from_secs(3600);
        let r = Route::new(
            members(&[1, 1, 1, 1, 1]),
            Balance::SourceHash(Affinity::ClientIp),
        );
        let all: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
        for (n, &c) in clients()[..300].iter().enumerate() {
            for m in r.members() {
                m.0.set_weight(1);
                m.0.set_balancing(None, None, false);
            }
            // One ramps half-way, so that the walk reads ramps.
            ramp(&r.members()[n % 5].0, hour, 0.5);
            let walk = r.pick(c);
            let mut got = Vec::new();
            for m in walk {
                got.push(m.0.name.clone());
                for m in r.members() {
                    if got.contains(&m.0.name) {
                        // Those met start a ramp: their rank falls.
                        ramp(&m.0, hour, 0.0);
                    } else {
                        // The rest end theirs, and a reload weighs them
                        // up: their rank rises.
                        m.0.set_balancing(None, None, false);
                        m.0.set_weight(1000);
                    }
                }
            }
            got.sort();
            assert_eq!(got, all, "client {c}: each backend once");
        }

        // With no ramp, a reload mid-walk leaves the order as it was: the
        // walk ranks by the route's weights.
        for m in r.members() {
            m.0.set_weight(1);
            m.0.set_balancing(None, None, false);
        }
        for &c in &clients()[..100] {
            let before = order(&r, c);
            let mut walk = r.pick(c);
            let first = walk.next().unwrap().0.name.clone();
            for m in r.members() {
                m.0.set_weight(if m.0.name == before[4] { 1000 } else { 1 });
            }
            let rest: Vec<String> = walk.map(|m| m.0.name.clone()).collect();
            assert_eq!((first, rest), (before[0].clone(), before[1..].to_vec()));
            for m in r.members() {
                m.0.set_weight(1);
            }
        }
    }

    #[test]
    fn network_affinity_keeps_a_network_on_one_backend() {
        let r = Route::new(
            members(&[1, 1, 1, 1, 1]),
            Balance::SourceHash(Affinity::Network),
        );
        let one = |s: &str| r.pick(s.parse().unwrap()).next().unwrap().0.name.clone();
        for net in 0..50u8 {
            let a = one(&format!("192.0.{net}.1"));
            for host in [2, 77, 254] {
                assert_eq!(
                    one(&format!("192.0.{net}.{host}")),
                    a,
                    "a /24 on one backend"
                );
            }
            assert_eq!(one(&format!("::ffff:192.0.{net}.9")), a, "mapped IPv4 too");
            let v6 = one(&format!("2001:db8:{net:x}::1"));
            assert_eq!(
                one(&format!("2001:db8:{net:x}:ffff::2")),
                v6,
                "a /48 on one backend"
            );
        }
        // Different networks spread, and client-ip keys on the whole address.
        let nets = shares((0..200u8).map(|n| one(&format!("198.51.{n}.1"))));
        assert_eq!(nets.len(), 5, "{nets:?}");
        let r = Route::new(
            members(&[1, 1, 1, 1, 1]),
            Balance::SourceHash(Affinity::ClientIp),
        );
        let hosts = shares((1..=200u8).map(|h| {
            r.pick(format!("192.0.2.{h}").parse().unwrap())
                .next()
                .unwrap()
                .0
                .name
                .clone()
        }));
        assert_eq!(hosts.len(), 5, "{hosts:?}");
    }

    /// Starts a slow start of `len` on `b` that is `done` (0 to 1) over.
    fn ramp(b: &Backend, len: Duration, done: f64) {
        b.set_balancing(Some(len), None, false);
        b.slow_start_done(len.mul_f64(done));
    }

    #[test]
    fn a_slow_starting_backend_takes_its_effective_weight_in_every_mode() {
        let hour = Duration::from_secs(3600);
        // Round-robin: b0 at a quarter of weight 1 next to b1 at 1 takes
        // 0.25 / 1.25 = a fifth.
        let r = route(&[1, 1]);
        ramp(&r.members()[0].0, hour, 0.25);
        let n = shares((0..20_000).map(|_| r.pick(CLIENT).next().unwrap().0.name.clone()))["b0"];
        assert!(
            (3400..=4600).contains(&n),
            "round-robin gave b0 {n} of 20000"
        );
        // Alone in rotation, it takes everything all the same.
        drain(&r.members()[1].0);
        assert_eq!(firsts(&r, 10), vec!["b0"; 10]);

        // Source-hash: the ramping backend's share grows with its ramp, and
        // the clients it takes come only from the others.
        let clients = clients();
        let r = Route::new(
            members(&[1, 1, 1, 1, 1]),
            Balance::SourceHash(Affinity::ClientIp),
        );
        let whole = mapping(&r, &clients);
        let mut last = 0;
        for done in [0.0, 0.1, 0.5, 0.9] {
            ramp(&r.members()[0].0, hour, done);
            let now = mapping(&r, &clients);
            let n = now.iter().filter(|n| *n == "b0").count();
            assert!(n >= last, "{done}: {n} < {last}");
            assert!(
                (0..clients.len()).all(|i| now[i] != "b0" || whole[i] == "b0"),
                "a ramping backend takes only clients that are its own"
            );
            last = n;
        }
        assert!(last > 1500, "at 90% it takes most of its share: {last}");

        // Least-connections: with none live, a backend at a tenth of its
        // weight is chosen only once the others carry ten times as many.
        let r = Route::new(members(&[1, 1]), Balance::LeastConnections);
        ramp(&r.members()[0].0, hour, 0.1);
        let mut held = Vec::new();
        for _ in 0..22 {
            let m = r.pick(CLIENT).next().unwrap();
            held.push(
                m.0.try_acquire("127.0.0.1:9".parse().unwrap(), "s".into())
                    .unwrap(),
            );
        }
        let (slow, warm) = (r.members()[0].0.live(), r.members()[1].0.live());
        assert!((1..=2).contains(&slow) && warm >= 20, "{slow} and {warm}");
    }
}
