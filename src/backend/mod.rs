//! A backend: its address, its admin state machine, its health, and the
//! exact count of the connections it carries.
//!
//! The admin state and every transition live here, and so does the one rule
//! that decides whether a backend takes a new connection:
//! [`Backend::takes_new_connections`]. A connection's slot is a
//! [`ConnGuard`] (`conn.rs`); how a drain ends besides its connections
//! finishing is the [`DrainPolicy`] (`drain.rs`).
//!
//! ```text
//!             drain                  live count reaches 0
//!   active ───────────▶ draining ───────────────────────▶ drained
//!     ▲                    │ force_after / stop
//!     │ start (any state)  ▼
//!     └──────────────── stopped / drained
//! ```

mod conn;
mod drain;
mod page;
mod ramp;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::config::{BackendAddress, ProxyVersion};
use crate::events::{Bus, Kind};
use crate::health::{Event, Health, Rules, unix_ms};

pub use conn::{ConnGuard, ConnInfo, Skip, idle_limits_in_use, ids_given};
pub use drain::{Drain, DrainPolicy};
pub use page::{Pager, page_of};
pub use ramp::now_ms;

/// How long a connection must move no byte to count as idle, in the API's
/// counts and in a drain's progress events.
pub const IDLE_AFTER: Duration = Duration::from_secs(10);

/// How a backend's connections in the previous process are closed: given
/// the backend's name and, for an idle close, the idle time.
pub struct CloseElsewhere(pub Box<CloseFn>);

/// Closes a backend's connections elsewhere: all, or those idle for long.
pub type CloseFn = dyn Fn(&str, Option<Duration>) + Send + Sync;

impl std::fmt::Debug for CloseElsewhere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CloseElsewhere")
    }
}

/// The admin state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// In rotation.
    Active,
    /// No new connections; existing ones run on until the count reaches 0.
    Draining,
    /// Out of rotation, with no connections.
    Drained,
    /// Out of rotation; its connections were closed.
    Stopped,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Active,
            1 => State::Draining,
            2 => State::Drained,
            _ => State::Stopped,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Draining => "draining",
            State::Drained => "drained",
            State::Stopped => "stopped",
        }
    }
}

/// Why a proxied connect to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens on the port (a reset to the SYN).
    Refused,
    /// No answer within `connect_timeout`.
    Timeout,
    /// No route to the host or its network.
    Unreachable,
    /// Anything else, such as a name that does not resolve.
    Other,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 4] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Unreachable,
        ConnectFailure::Other,
    ];

    /// The kind of a connect's error.
    pub fn of(e: &std::io::Error) -> ConnectFailure {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            ErrorKind::TimedOut => ConnectFailure::Timeout,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                ConnectFailure::Unreachable
            }
            _ => ConnectFailure::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Other => "other",
        }
    }
}

/// A backend server shared by every service that forwards to it.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    address: Mutex<BackendAddress>,
    weight: AtomicU32,
    /// Its slow start, read lock-free by picks.
    ramp: ramp::Ramp,
    /// Most live connections it takes (`usize::MAX`: no limit); a slot
    /// is reserved by compare-and-swap, so the limit is exact.
    max_connections: AtomicUsize,
    /// Takes clients only when no primary of the service can.
    backup: AtomicBool,
    /// The PROXY header version it expects (0: none, 1, 2); a reload
    /// changes it for the connections that start after.
    send_proxy: AtomicU8,
    state: AtomicU8,
    /// `health.up`, readable without the lock on the hot path.
    healthy: AtomicBool,
    health: Mutex<Health>,
    /// Set when a connect failed, so that a good connect takes the health
    /// lock only when it has a run of failures to reset.
    connect_failing: AtomicBool,
    /// Unix time in milliseconds of the last admin state change.
    state_since_ms: AtomicU64,
    /// Set while a reload has removed this backend and it drains to go.
    pub removed: AtomicBool,
    /// Told of every admin transition, for the state file.
    on_change: Option<Arc<Notify>>,
    /// Told of every state and health change and of a drain's progress.
    events: Option<Arc<Bus>>,
    /// Held while the state changes; never across an await.
    transitions: Mutex<()>,
    /// Bumped on every admin transition, so a delayed action (force_after)
    /// can tell whether the drain it was meant for is still the current one.
    generation: AtomicU64,
    /// The policy of the current drain; never held across an await.
    policy: Mutex<drain::Slot>,
    live: AtomicUsize,
    /// Connections of this backend that the sluice process this one took
    /// over from still holds: a drain is over only when they are gone too.
    elsewhere: AtomicUsize,
    /// Connections of this backend on the other instances of its cluster.
    peers_live: AtomicUsize,
    /// Other instances of its cluster that have not yet applied its latest
    /// admin state, or whose counts are unknown: a drain is not over until
    /// they have, and hold nothing.
    peers_behind: AtomicUsize,
    /// Closes those connections, for a stop, a forced drain or an idle
    /// close here (`None`: all; `Some(d)`: those idle for `d`).
    close_elsewhere: Mutex<Option<CloseElsewhere>>,
    pub total_connections: AtomicU64,
    /// Failed proxied connects, by [`ConnectFailure`]; their sum is the
    /// API's `connect_failures`.
    connect_failures: [AtomicU64; 4],
    /// Active health checks that passed and failed.
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Bytes, either way, that moved by splice(2) rather than a copy.
    pub bytes_spliced: AtomicU64,
    conns: DashMap<u64, Arc<ConnInfo>>,
    /// Woken on every state or health change, every passing check, a
    /// tightened drain policy, and whenever the live count falls to zero.
    changed: Notify,
}

impl Backend {
    pub fn new(name: String, address: BackendAddress, weight: u32, state: State) -> Backend {
        let now = unix_ms();
        Backend {
            name,
            address: Mutex::new(address),
            weight: AtomicU32::new(weight),
            ramp: ramp::Ramp::default(),
            max_connections: AtomicUsize::new(usize::MAX),
            backup: AtomicBool::new(false),
            send_proxy: AtomicU8::new(0),
            state: AtomicU8::new(state as u8),
            healthy: AtomicBool::new(true),
            health: Mutex::new(Health::new(now)),
            connect_failing: AtomicBool::new(false),
            state_since_ms: AtomicU64::new(now),
            removed: AtomicBool::new(false),
            on_change: None,
            events: None,
            transitions: Mutex::new(()),
            generation: AtomicU64::new(0),
            policy: Mutex::new(drain::Slot::default()),
            live: AtomicUsize::new(0),
            elsewhere: AtomicUsize::new(0),
            peers_live: AtomicUsize::new(0),
            peers_behind: AtomicUsize::new(0),
            close_elsewhere: Mutex::new(None),
            total_connections: AtomicU64::new(0),
            connect_failures: Default::default(),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_spliced: AtomicU64::new(0),
            conns: DashMap::new(),
            changed: Notify::new(),
        }
    }

    /// Tells `n` of every admin transition.
    pub fn notify_changes_to(mut self, n: Arc<Notify>) -> Backend {
        self.on_change = Some(n);
        self
    }

    /// Publishes its state and health changes, and its drains' progress,
    /// on `bus`.
    pub fn publish_to(mut self, bus: Arc<Bus>) -> Backend {
        self.events = Some(bus);
        self
    }

    fn publish(&self, kind: Kind) {
        if let Some(bus) = &self.events {
            bus.publish(kind);
        }
    }

    pub fn address(&self) -> BackendAddress {
        self.address.lock().expect("address lock").clone()
    }

    pub fn set_address(&self, a: BackendAddress) {
        *self.address.lock().expect("address lock") = a;
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::SeqCst))
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, w: u32) {
        self.weight.store(w, Ordering::Relaxed);
    }

    /// Sets what balancing reads of it besides its weight: `slow_start`,
    /// `max_connections` and `backup`. A ramp under way goes on with the
    /// new length.
    pub fn set_balancing(&self, slow_start: Option<Duration>, max: Option<usize>, backup: bool) {
        self.ramp.set_length(slow_start);
        self.max_connections
            .store(max.unwrap_or(usize::MAX), Ordering::Relaxed);
        self.backup.store(backup, Ordering::Relaxed);
    }

    pub fn slow_start(&self) -> Option<Duration> {
        self.ramp.length()
    }

    pub fn max_connections(&self) -> Option<usize> {
        match self.max_connections.load(Ordering::Relaxed) {
            usize::MAX => None,
            n => Some(n),
        }
    }

    pub fn is_backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    /// Whether it has a free slot under `max_connections`, as of now: a
    /// hint for picks, which `try_acquire` makes exact.
    pub fn has_room(&self) -> bool {
        self.live() < self.max_connections.load(Ordering::Relaxed)
    }

    /// Whether a pick may choose it first: it takes new connections and
    /// has room.
    pub fn available(&self) -> bool {
        self.takes_new_connections() && self.has_room()
    }

    /// Whether a slow start may be under way: one load, no clock.
    pub fn maybe_ramping(&self) -> bool {
        self.ramp.maybe_ramping()
    }

    /// Its weight at `now` (see [`now_ms`]): lower while it slow-starts.
    pub fn effective_weight_at(&self, now: u64) -> f64 {
        self.weight() as f64 * self.ramp_fraction_at(now)
    }

    /// The fraction of its weight it takes at `now`: below 1 while it
    /// slow-starts.
    pub fn ramp_fraction_at(&self, now: u64) -> f64 {
        self.ramp.fraction_at(now).unwrap_or(1.0)
    }

    /// Its weight now while it slow-starts; `None` once it takes its own.
    pub fn ramping_weight(&self) -> Option<f64> {
        if !self.maybe_ramping() {
            return None;
        }
        let f = self.ramp.fraction_at(now_ms())?;
        Some(self.weight() as f64 * f)
    }

    /// Starts a slow start at `now`, as if it had just come back.
    pub fn begin_slow_start(&self, now: u64) {
        self.ramp.begin(now);
    }

    /// A slow start that began `done` ago, for tests of what picks make
    /// of a ramp part-way.
    #[cfg(test)]
    pub fn slow_start_done(&self, done: Duration) {
        self.ramp.begin_done(now_ms(), done.as_millis() as u64);
    }

    /// The PROXY header a new connection to it starts with, if any.
    pub fn send_proxy(&self) -> Option<ProxyVersion> {
        match self.send_proxy.load(Ordering::Relaxed) {
            1 => Some(ProxyVersion::V1),
            2 => Some(ProxyVersion::V2),
            _ => None,
        }
    }

    pub fn set_send_proxy(&self, v: Option<ProxyVersion>) {
        let n = match v {
            None => 0,
            Some(ProxyVersion::V1) => 1,
            Some(ProxyVersion::V2) => 2,
        };
        self.send_proxy.store(n, Ordering::Relaxed);
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// What is known of its health, as of now.
    pub fn health(&self) -> Health {
        self.health.lock().expect("health lock").clone()
    }

    /// Bumped on every admin transition.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn state_since_ms(&self) -> u64 {
        self.state_since_ms.load(Ordering::Relaxed)
    }

    /// The live-connection count: open proxied connections plus pending
    /// connects to this backend.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// The live count as the API shows it: this process's, a previous
    /// process's and the other instances'.
    pub fn live_everywhere(&self) -> usize {
        self.live() + self.elsewhere() + self.peers_live()
    }

    /// Connections the previous process holds (after an upgrade).
    pub fn elsewhere(&self) -> usize {
        self.elsewhere.load(Ordering::SeqCst)
    }

    /// What the previous process reports it holds; 0 once it is gone,
    /// which may complete a drain.
    pub fn set_elsewhere(&self, n: usize) {
        let was = self.elsewhere.swap(n, Ordering::SeqCst);
        if n == 0 {
            self.complete_drain_if_empty();
        }
        if was != n {
            self.changed.notify_waiters();
        }
    }

    /// Connections on the other instances of its cluster.
    pub fn peers_live(&self) -> usize {
        self.peers_live.load(Ordering::SeqCst)
    }

    /// What the other instances of its cluster report: their connections,
    /// and how many of them have not yet applied its latest admin state.
    /// Both 0 may complete a drain.
    pub fn set_peers(&self, live: usize, behind: usize) {
        let was = (
            self.peers_live.swap(live, Ordering::SeqCst),
            self.peers_behind.swap(behind, Ordering::SeqCst),
        );
        if live == 0 && behind == 0 {
            self.complete_drain_if_empty();
        }
        if was != (live, behind) {
            self.changed.notify_waiters();
        }
    }

    /// Nothing left here, in a previous process, or on another instance.
    fn empty_everywhere(&self) -> bool {
        self.live() == 0
            && self.elsewhere() == 0
            && self.peers_live() == 0
            && self.peers_behind.load(Ordering::SeqCst) == 0
    }

    /// Sets how the previous process's connections are closed.
    pub fn close_elsewhere_with(&self, close: Option<CloseElsewhere>) {
        *self.close_elsewhere.lock().expect("close lock") = close;
    }

    fn close_elsewhere(&self, idle: Option<Duration>) {
        if self.elsewhere() == 0 {
            return;
        }
        if let Some(close) = &*self.close_elsewhere.lock().expect("close lock") {
            (close.0)(&self.name, idle);
        }
    }

    /// The one rule for new connections.
    pub fn takes_new_connections(&self) -> bool {
        self.state() == State::Active && self.healthy() && self.weight() > 0
    }

    /// Snapshot of the live connections.
    pub fn connections(&self) -> Vec<Arc<ConnInfo>> {
        let mut v: Vec<_> = self.conns.iter().map(|e| e.value().clone()).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// The ids of the live connections, in no order: what an upgrade's
    /// report compares from one tick to the next, without a view or a
    /// copy of any connection.
    pub fn connection_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.conns.iter().map(|e| *e.key())
    }

    /// How many connections its table holds: what
    /// [`Backend::connection_ids`] would yield, without the walk.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The live connection `id`, if it is still live.
    pub fn connection(&self, id: u64) -> Option<Arc<ConnInfo>> {
        self.conns.get(&id).map(|e| e.value().clone())
    }

    /// One page of the live connections: those with an id above `after`,
    /// at most `limit` in ascending id order, and whether more follow.
    /// One walk of the table with `O(limit)` memory; nothing is sorted
    /// but the page.
    pub fn connections_page(&self, after: Option<u64>, limit: usize) -> (Vec<Arc<ConnInfo>>, bool) {
        let mut pager = Pager::new(after, limit);
        for e in self.conns.iter() {
            pager.offer(*e.key(), || e.value().clone());
        }
        pager.finish()
    }

    /// Live connections that have been idle for at least `d`.
    pub fn idle_count(&self, d: Duration) -> usize {
        self.conns.iter().filter(|c| c.idle() >= d).count()
    }

    /// Moves from one of `from` to `to`; returns whether it moved.
    fn transition(&self, from: &[State], to: State) -> bool {
        let _one_at_a_time = self.transitions.lock().expect("transition lock");
        self.transition_locked(from, to)
    }

    fn transition_locked(&self, from: &[State], to: State) -> bool {
        let mut cur = self.state.load(Ordering::SeqCst);
        loop {
            let s = State::from_u8(cur);
            if !from.contains(&s) || s == to {
                return false;
            }
            // Back in rotation after carrying nothing: cold, so it
            // slow-starts. The ramp begins before the state is stored, so
            // no pick that sees it active sees it at full weight. A drain
            // called off was never cold.
            let ramp = if to == State::Active && s != State::Draining {
                self.ramp.begin(now_ms())
            } else {
                None
            };
            match self
                .state
                .compare_exchange(cur, to as u8, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    let now = unix_ms();
                    let since = self.state_since_ms.swap(now, Ordering::Relaxed);
                    tracing::info!(
                        backend = %self.name,
                        from = s.as_str(),
                        to = to.as_str(),
                        live = self.live(),
                        "backend state changed"
                    );
                    // Under the transition lock, so events leave in the
                    // order the states changed.
                    self.publish(Kind::State {
                        backend: self.name.clone(),
                        from: s.as_str().into(),
                        to: to.as_str().into(),
                        live: self.live_everywhere(),
                    });
                    if (s, to) == (State::Draining, State::Drained) {
                        self.publish(Kind::Drained {
                            backend: self.name.clone(),
                            after_ms: now.saturating_sub(since),
                        });
                    }
                    self.changed.notify_waiters();
                    if let Some(n) = &self.on_change {
                        n.notify_one();
                    }
                    return true;
                }
                Err(actual) => {
                    // Not moved: the ramp is taken back, so a later start
                    // that calls off a drain finds the backend warm.
                    if let Some(r) = ramp {
                        self.ramp.undo(r);
                    }
                    cur = actual;
                }
            }
        }
    }

    /// Checks the count and moves under the transition lock, so no start
    /// and new connection can slip between the check and the move.
    fn complete_drain_if_empty(&self) {
        let _one_at_a_time = self.transitions.lock().expect("transition lock");
        self.complete_drain_locked();
    }

    fn complete_drain_locked(&self) {
        if self.empty_everywhere() {
            self.transition_locked(&[State::Draining], State::Drained);
        }
    }

    /// Out of rotation, closing every connection now.
    pub fn stop(&self) {
        self.transition(
            &[State::Active, State::Draining, State::Drained],
            State::Stopped,
        );
        self.close_all();
    }

    /// Back into rotation from any state.
    pub fn start(&self) {
        self.transition(
            &[State::Draining, State::Drained, State::Stopped],
            State::Active,
        );
    }

    /// Restores a saved state at start-up without logging it as a change.
    /// A drain did not survive the restart, and neither did its
    /// connections, so `draining` comes back `drained`.
    pub fn restore(&self, s: State) {
        let s = if s == State::Draining {
            State::Drained
        } else {
            s
        };
        self.state.store(s as u8, Ordering::SeqCst);
    }

    /// Restores the state its cluster agreed on at start-up, exactly: a
    /// drain may still run on other instances, so `draining` stays
    /// `draining` until they report none left.
    pub fn restore_agreed(&self, s: State) {
        self.state.store(s as u8, Ordering::SeqCst);
    }

    /// Takes the admin state and health a previous process handed over,
    /// exactly: a drain still runs there, so `draining` stays `draining`
    /// and ends when the connections of both processes have.
    pub fn take_over(&self, s: State, up: bool) {
        self.state.store(s as u8, Ordering::SeqCst);
        let mut health = self.health.lock().expect("health lock");
        health.up = up;
        self.healthy.store(up, Ordering::SeqCst);
    }

    /// Closes the connections whose idle timeout ran out by `now`;
    /// returns how many. The server sweeps every backend with it, so an
    /// idle connection keeps no timer of its own.
    pub fn close_timed_out(&self, now: std::time::Instant) -> usize {
        self.conns
            .iter()
            .filter(|c| c.time_out_if_silent(now))
            .count()
    }

    /// Closes every connection of this backend, the previous process's
    /// too; returns how many of this process's.
    pub fn close_all(&self) -> usize {
        self.close_elsewhere(None);
        let mut n = 0;
        for c in self.conns.iter() {
            c.cancel.cancel();
            n += 1;
        }
        n
    }

    /// Feeds one health event through the rise and fall `rules`, and
    /// publishes a flip for the hot path.
    pub fn record_health(&self, event: Event, rules: Rules) {
        let passed = matches!(event, Event::CheckPassed { .. });
        match event {
            Event::CheckPassed { .. } => self.checks_passed.fetch_add(1, Ordering::Relaxed),
            Event::CheckFailed(_) => self.checks_failed.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let mut health = self.health.lock().expect("health lock");
        if let Event::CheckFailed(e) = &event {
            tracing::debug!(backend = %self.name, error = %e, "health check failed");
        }
        let flip = health.record(&event, rules, unix_ms());
        // Under the lock, so the hint never disagrees with the value.
        self.connect_failing
            .store(health.connects_failing(), Ordering::Relaxed);
        if let Some(flip) = flip {
            if flip.up {
                // Before it is seen up, so no pick meets it at full weight.
                self.ramp.begin(now_ms());
            }
            // Stored under the lock, so flips are published in order.
            self.healthy.store(flip.up, Ordering::SeqCst);
            // Under the lock too, so the events keep the flips' order.
            self.publish(Kind::Health {
                backend: self.name.clone(),
                up: flip.up,
                why: flip.why.clone(),
            });
            drop(health);
            let state = self.state().as_str();
            if flip.up {
                tracing::info!(backend = %self.name, state, "backend is up: {}", flip.why);
            } else {
                tracing::warn!(backend = %self.name, state, "backend is down: {}", flip.why);
            }
            self.changed.notify_waiters();
        } else if passed {
            drop(health);
            // Someone may wait for a check that began after some moment.
            self.changed.notify_waiters();
        }
    }

    /// Whether active health checks run for this backend.
    pub fn is_checked(&self) -> bool {
        self.health.lock().expect("health lock").checked
    }

    /// A proxied connect failed: counted, and a passive health event.
    pub fn connect_failed(&self, why: ConnectFailure, rules: Rules) {
        self.connect_failures[why as usize].fetch_add(1, Ordering::Relaxed);
        self.record_health(Event::ConnectFailed, rules);
    }

    /// Failed proxied connects of one kind, since it was created.
    pub fn connect_failures_of(&self, why: ConnectFailure) -> u64 {
        self.connect_failures[why as usize].load(Ordering::Relaxed)
    }

    /// Failed proxied connects, since it was created.
    pub fn connect_failures(&self) -> u64 {
        ConnectFailure::ALL
            .iter()
            .map(|&w| self.connect_failures_of(w))
            .sum()
    }

    /// Live connections (pending connects too) by the service they came
    /// in on, read at the moment.
    pub fn live_by_service(&self) -> Vec<(Arc<str>, usize)> {
        let mut out: Vec<(Arc<str>, usize)> = Vec::new();
        for c in self.conns.iter() {
            match out.iter_mut().find(|(s, _)| *s == c.service) {
                Some((_, n)) => *n += 1,
                None => out.push((c.service.clone(), 1)),
            }
        }
        out
    }

    /// A proxied connect succeeded; it ends a run of failed connects.
    fn connect_succeeded(&self) {
        // A read, not a write, on the hot path.
        if self.connect_failing.load(Ordering::Relaxed) {
            // The rules do not matter for a success.
            self.record_health(Event::ConnectSucceeded, Rules { rise: 1, fall: 1 });
        }
    }

    /// Waits until `done` holds or `limit` passes; returns whether it held.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&Backend) -> bool) -> bool {
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(limit)
            .unwrap_or(now + Duration::from_secs(86400 * 365));
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(self);
            }
        }
    }

    /// Whether the backend is out of rotation and carries nothing, in this
    /// process or the one it took over from.
    pub fn is_drained(&self) -> bool {
        matches!(self.state(), State::Drained | State::Stopped) && self.empty_everywhere()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::Background;

    pub(super) fn backend() -> Arc<Backend> {
        Arc::new(Backend::new(
            "b".into(),
            BackendAddress::parse("127.0.0.1:1").unwrap(),
            1,
            State::Active,
        ))
    }

    pub(super) fn acquire(b: &Arc<Backend>) -> Option<ConnGuard> {
        b.try_acquire("127.0.0.1:2".parse().unwrap(), "s".into())
            .ok()
    }

    fn drain(b: &Arc<Backend>) -> Drain {
        b.drain(DrainPolicy::default(), &Background::default())
    }

    #[test]
    fn drain_completes_when_last_connection_closes() {
        let b = backend();
        let g1 = acquire(&b).unwrap();
        let g2 = acquire(&b).unwrap();
        drain(&b);
        assert_eq!(b.state(), State::Draining);
        assert!(
            acquire(&b).is_none(),
            "a draining backend takes nothing new"
        );
        assert_eq!(b.live(), 2, "the refused attempt gave its slot back");
        drop(g1);
        assert_eq!(b.state(), State::Draining);
        drop(g2);
        assert_eq!(b.state(), State::Drained);
        assert_eq!(b.live(), 0);
    }

    /// The idle timeout's sweep closes a connection that is connected and
    /// silent past its own timeout, once, and never one whose backend
    /// connect is still pending (that one is the connect timeout's) or
    /// one that started without a timeout.
    #[test]
    fn the_idle_sweep_closes_only_the_connected_and_silent() {
        let b = backend();
        let pending = acquire(&b).unwrap();
        let untimed = acquire(&b).unwrap();
        untimed.established(None);
        let open = acquire(&b).unwrap();
        open.established(Some(Duration::from_millis(50)));
        let later = std::time::Instant::now() + Duration::from_secs(1);
        assert_eq!(
            b.close_timed_out(std::time::Instant::now()),
            0,
            "not silent long enough yet"
        );
        assert_eq!(b.close_timed_out(later), 1);
        assert!(open.info().cancel.timed_out());
        assert!(!pending.info().cancel.is_cancelled());
        assert!(!untimed.info().cancel.is_cancelled());
        assert_eq!(b.close_timed_out(later), 0, "closed once, counted once");
        // An admin's close first is not an idle timeout.
        let stopped = acquire(&b).unwrap();
        stopped.established(Some(Duration::from_millis(50)));
        stopped.info().cancel.cancel();
        assert_eq!(b.close_timed_out(later), 0);
        assert!(!stopped.info().cancel.timed_out());
    }

    /// A close reaches a connection's task whether it waits already or
    /// polls after the close.
    #[tokio::test]
    async fn a_close_wakes_its_connection() {
        let b = backend();
        let g = acquire(&b).unwrap();
        let info = g.info().clone();
        let waiter = tokio::spawn(async move { info.cancel.cancelled().await });
        tokio::task::yield_now().await;
        g.info().cancel.cancel();
        waiter.await.unwrap();
        g.info().cancel.cancelled().await;
    }

    #[test]
    fn drain_of_idle_backend_is_immediate_and_repeatable() {
        let b = backend();
        drain(&b);
        assert_eq!(b.state(), State::Drained);
        drain(&b);
        assert_eq!(b.state(), State::Drained);
        b.start();
        assert_eq!(b.state(), State::Active);
    }

    #[test]
    fn stop_cancels_connections_and_start_restores() {
        let b = backend();
        let g = acquire(&b).unwrap();
        b.stop();
        assert!(g.info().cancel.is_cancelled());
        assert_eq!(b.state(), State::Stopped);
        drop(g);
        assert_eq!(b.live(), 0);
        b.start();
        assert!(acquire(&b).is_some());
    }

    #[test]
    fn unhealthy_or_zero_weight_takes_nothing() {
        let b = backend();
        let rules = Rules { rise: 1, fall: 1 };
        b.record_health(Event::ChecksOn, rules);
        b.record_health(Event::CheckFailed("test".into()), rules);
        assert!(!b.healthy());
        assert!(acquire(&b).is_none());
        b.record_health(Event::CheckPassed { started_ms: 1 }, rules);
        b.set_weight(0);
        assert!(acquire(&b).is_none());
        assert_eq!(b.live(), 0);
    }

    #[test]
    fn passive_failures_count_and_flip_only_a_checked_backend() {
        let b = backend();
        let rules = Rules { rise: 2, fall: 2 };
        b.connect_failed(ConnectFailure::Refused, rules);
        b.connect_failed(ConnectFailure::Timeout, rules);
        assert!(b.healthy(), "no active checks: nothing would bring it back");
        b.record_health(Event::ChecksOn, rules);
        b.connect_failed(ConnectFailure::Refused, rules);
        assert!(!b.healthy());
        assert_eq!(b.state(), State::Active, "health is a separate axis");
        assert_eq!(b.connect_failures(), 3);
        assert_eq!(b.connect_failures_of(ConnectFailure::Refused), 2);
        assert_eq!(b.connect_failures_of(ConnectFailure::Timeout), 1);
        b.record_health(Event::CheckPassed { started_ms: 5 }, rules);
        assert!(b.healthy());
        assert_eq!(b.health().last_ok_check_ms, 5);
    }

    #[test]
    fn max_connections_is_exact_under_concurrent_acquires() {
        let b = backend();
        b.set_balancing(None, Some(5), false);
        let got = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        if let Ok(g) = b.try_acquire("127.0.0.1:2".parse().unwrap(), "s".into()) {
                            got.lock().unwrap().push(g);
                        }
                    }
                });
            }
        });
        assert_eq!(got.lock().unwrap().len(), 5, "slots handed out");
        assert_eq!(b.live(), 5);
        assert_eq!(
            b.try_acquire("127.0.0.1:2".parse().unwrap(), "s".into())
                .err(),
            Some(Skip::Full)
        );
        assert!(!b.has_room() && !b.available());
        got.lock().unwrap().pop();
        assert!(b.has_room());
        assert!(acquire(&b).is_some(), "a freed slot is taken again");
        drain(&b);
        assert_eq!(
            b.try_acquire("127.0.0.1:2".parse().unwrap(), "s".into())
                .err(),
            Some(Skip::Out)
        );
        assert_eq!(b.live(), 4, "the refused attempts gave their slots back");
        // Full and out of rotation: out, so the refusal is not counted
        // as every backend full.
        b.set_balancing(None, Some(4), false);
        assert_eq!(
            b.try_acquire("127.0.0.1:2".parse().unwrap(), "s".into())
                .err(),
            Some(Skip::Out)
        );
    }

    #[test]
    fn a_start_is_never_seen_before_its_slow_start() {
        // A pick that sees the backend active must see its ramp too, or
        // least-connections floods it at full weight for that moment.
        let b = backend();
        b.stop();
        let done = AtomicBool::new(false);
        let seen_warm = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    // The generation, unmoved, says the ramp read is the
                    // one of the start the state read saw.
                    let g = b.generation();
                    let warm = b.state() == State::Active && !b.maybe_ramping();
                    n += usize::from(warm && b.generation() == g);
                }
                n
            });
            for _ in 0..100_000 {
                // Stopped: no ramp, then a length for the next start.
                b.set_balancing(None, None, false);
                b.set_balancing(Some(Duration::from_secs(3600)), None, false);
                b.start();
                b.stop();
            }
            done.store(true, Ordering::Relaxed);
            watcher.join().unwrap()
        });
        assert_eq!(seen_warm, 0, "times seen active with no ramp");
    }

    #[test]
    fn start_and_health_up_begin_a_slow_start() {
        let b = backend();
        b.set_weight(4);
        assert_eq!(b.ramping_weight(), None, "a backend as it starts is warm");
        b.stop();
        b.start();
        assert_eq!(b.ramping_weight(), None, "no slow_start: whole at once");
        b.set_balancing(Some(Duration::from_secs(3600)), None, false);
        b.stop();
        b.start();
        let w = b.ramping_weight().expect("ramping after start");
        assert!(w > 0.0 && w < 0.1, "{w}");
        assert!(b.effective_weight_at(now_ms() + 1_800_000) > 1.9);
        assert_eq!(b.effective_weight_at(now_ms() + 3_600_001), 4.0);
        b.set_balancing(None, None, false);
        assert_eq!(b.ramping_weight(), None);
        b.set_balancing(Some(Duration::from_secs(3600)), None, false);
        let g = acquire(&b).unwrap();
        drain(&b);
        b.start();
        assert_eq!(b.ramping_weight(), None, "a drain called off: still warm");
        drop(g);
        b.set_balancing(None, None, false);
        b.set_balancing(Some(Duration::from_secs(3600)), None, false);
        let rules = Rules { rise: 1, fall: 1 };
        b.record_health(Event::ChecksOn, rules);
        b.record_health(Event::CheckFailed("x".into()), rules);
        assert_eq!(b.ramping_weight(), None, "down is not a ramp");
        b.record_health(Event::CheckPassed { started_ms: 1 }, rules);
        assert!(b.ramping_weight().is_some(), "ramping after health up");
    }
}
