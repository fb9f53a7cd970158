//! A backend: its address, its admin state machine, its health, and the
//! exact count of the connections it carries.
//!
//! The admin state and every transition live here, and so does the one rule
//! that decides whether a backend takes a new connection:
//! [`Backend::takes_new_connections`].
//!
//! ```text
//!             drain                  live count reaches 0
//!   active ───────────▶ draining ───────────────────────▶ drained
//!     ▲                    │ force_after / stop
//!     │ start (any state)  ▼
//!     └──────────────── stopped / drained
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::BackendAddress;

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

/// One live proxied connection, as the admin API lists it.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub client: SocketAddr,
    pub service: Arc<str>,
    pub started: Instant,
    /// Milliseconds after `started` at which the last byte moved.
    last_active_ms: AtomicU64,
    /// Whether the last bytes went to the backend: a request may be
    /// waiting for its reply, so the connection is not idle.
    awaiting_reply: AtomicBool,
    /// Bytes from the client to the backend.
    pub bytes_in: AtomicU64,
    /// Bytes from the backend to the client.
    pub bytes_out: AtomicU64,
    /// Cancelled to close this connection (stop, force, idle close, shutdown).
    pub cancel: CancellationToken,
}

impl ConnInfo {
    /// Records that `n` bytes moved now in the given direction, spliced
    /// (zero-copy) or copied.
    pub fn record(&self, backend: &Backend, to_backend: bool, n: usize, spliced: bool) {
        let n = n as u64;
        if spliced {
            backend.bytes_spliced.fetch_add(n, Ordering::Relaxed);
        }
        if to_backend {
            self.bytes_in.fetch_add(n, Ordering::Relaxed);
            backend.bytes_in.fetch_add(n, Ordering::Relaxed);
        } else {
            self.bytes_out.fetch_add(n, Ordering::Relaxed);
            backend.bytes_out.fetch_add(n, Ordering::Relaxed);
        }
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
        if self.awaiting_reply.load(Ordering::Relaxed) != to_backend {
            self.awaiting_reply.store(to_backend, Ordering::Relaxed);
        }
    }

    /// Whether `close_idle` may close it: silent for `d`, and not waiting
    /// for the backend to answer what the client last sent.
    pub fn closable_when_idle(&self, d: Duration) -> bool {
        self.idle() >= d && !self.awaiting_reply.load(Ordering::Relaxed)
    }

    /// How long no byte has moved in either direction.
    pub fn idle(&self) -> Duration {
        let age = self.started.elapsed();
        age.saturating_sub(Duration::from_millis(
            self.last_active_ms.load(Ordering::Relaxed),
        ))
    }
}

/// A backend server shared by every service that forwards to it.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    address: Mutex<BackendAddress>,
    weight: AtomicU32,
    state: AtomicU8,
    healthy: AtomicBool,
    /// Unix time in milliseconds of the last admin state change.
    state_since_ms: AtomicU64,
    /// Unix time in milliseconds of the last health change.
    health_since_ms: AtomicU64,
    /// Unix time in milliseconds at which the last passing check began.
    last_ok_check_ms: AtomicU64,
    /// Whether active checks run, so that a backend marked down can come back.
    checked: AtomicBool,
    checks_ok_in_row: AtomicU32,
    checks_failed_in_row: AtomicU32,
    connects_failed_in_row: AtomicU32,
    /// Set while a reload has removed this backend and it drains to go.
    pub removed: AtomicBool,
    /// Told of every admin transition, for the state file.
    on_change: Option<Arc<Notify>>,
    /// Held while the state changes; never across an await.
    transitions: Mutex<()>,
    /// Bumped on every admin transition, so a delayed action (force_after)
    /// can tell whether the drain it was meant for is still the current one.
    generation: AtomicU64,
    live: AtomicUsize,
    pub total_connections: AtomicU64,
    pub connect_failures: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Bytes, either way, that moved by splice(2) rather than a copy.
    pub bytes_spliced: AtomicU64,
    conns: DashMap<u64, Arc<ConnInfo>>,
    /// Woken on every state or health change and whenever the live count
    /// falls to zero.
    changed: Notify,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Backend {
    pub fn new(name: String, address: BackendAddress, weight: u32, state: State) -> Backend {
        let now = now_ms();
        Backend {
            name,
            address: Mutex::new(address),
            weight: AtomicU32::new(weight),
            state: AtomicU8::new(state as u8),
            healthy: AtomicBool::new(true),
            state_since_ms: AtomicU64::new(now),
            health_since_ms: AtomicU64::new(now),
            last_ok_check_ms: AtomicU64::new(0),
            checked: AtomicBool::new(false),
            checks_ok_in_row: AtomicU32::new(0),
            checks_failed_in_row: AtomicU32::new(0),
            connects_failed_in_row: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            on_change: None,
            transitions: Mutex::new(()),
            generation: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            total_connections: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
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

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Bumped on every admin transition.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn state_since_ms(&self) -> u64 {
        self.state_since_ms.load(Ordering::Relaxed)
    }

    pub fn health_since_ms(&self) -> u64 {
        self.health_since_ms.load(Ordering::Relaxed)
    }

    /// The live-connection count: open proxied connections plus pending
    /// connects to this backend.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
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

    /// Live connections that have been idle for at least `d`.
    pub fn idle_count(&self, d: Duration) -> usize {
        self.conns.iter().filter(|c| c.idle() >= d).count()
    }

    /// Takes a slot for a new connection, or `None` when the backend does
    /// not take new connections. The slot is taken first and the rule is
    /// checked after, so that a concurrent drain or stop either sees this
    /// connection or this connection sees the new state: none slips past.
    pub fn try_acquire(
        self: &Arc<Self>,
        client: SocketAddr,
        service: Arc<str>,
    ) -> Option<ConnGuard> {
        let info = Arc::new(ConnInfo {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            client,
            service,
            started: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            awaiting_reply: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            cancel: CancellationToken::new(),
        });
        self.live.fetch_add(1, Ordering::SeqCst);
        self.conns.insert(info.id, info.clone());
        let guard = ConnGuard {
            backend: self.clone(),
            info,
        };
        if self.takes_new_connections() {
            Some(guard)
        } else {
            None
        }
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
            match self
                .state
                .compare_exchange(cur, to as u8, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    self.state_since_ms.store(now_ms(), Ordering::Relaxed);
                    tracing::info!(
                        backend = %self.name,
                        from = s.as_str(),
                        to = to.as_str(),
                        live = self.live(),
                        "backend state changed"
                    );
                    self.changed.notify_waiters();
                    if let Some(n) = &self.on_change {
                        n.notify_one();
                    }
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes the backend out of rotation, letting its connections finish.
    /// Returns the drain's generation, for [`Backend::force_close_if`].
    /// The generation is read under the transition lock, so a start that
    /// races the drain cannot lend it a generation that is not a drain's.
    pub fn drain(&self) -> u64 {
        let _one_at_a_time = self.transitions.lock().expect("transition lock");
        self.transition_locked(&[State::Active], State::Draining);
        self.complete_drain_locked();
        self.generation.load(Ordering::SeqCst)
    }

    /// Checks the count and moves under the transition lock, so no start
    /// and new connection can slip between the check and the move.
    fn complete_drain_if_empty(&self) {
        let _one_at_a_time = self.transitions.lock().expect("transition lock");
        self.complete_drain_locked();
    }

    fn complete_drain_locked(&self) {
        if self.live() == 0 {
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
    pub fn restore(&self, s: State) {
        let s = if s == State::Draining {
            State::Drained
        } else {
            s
        };
        self.state.store(s as u8, Ordering::SeqCst);
    }

    /// Closes the remaining connections of a drain that is still the one
    /// started at `generation`; the backend then becomes drained.
    pub fn force_close_if(&self, generation: u64) -> usize {
        if self.state() != State::Draining || self.generation.load(Ordering::SeqCst) != generation {
            return 0;
        }
        tracing::info!(backend = %self.name, live = self.live(), "drain time limit reached: closing remaining connections");
        self.close_all()
    }

    /// Closes connections idle for at least `idle`, except those waiting
    /// for a reply from the backend; returns how many.
    pub fn close_idle(&self, idle: Duration) -> usize {
        let mut n = 0;
        for c in self.conns.iter().filter(|c| c.closable_when_idle(idle)) {
            c.cancel.cancel();
            n += 1;
        }
        n
    }

    /// Closes every connection of this backend; returns how many.
    pub fn close_all(&self) -> usize {
        let mut n = 0;
        for c in self.conns.iter() {
            c.cancel.cancel();
            n += 1;
        }
        n
    }

    pub fn set_healthy(&self, up: bool, why: &str) {
        if self.healthy.swap(up, Ordering::SeqCst) != up {
            self.health_since_ms.store(now_ms(), Ordering::Relaxed);
            if up {
                tracing::info!(backend = %self.name, state = self.state().as_str(), "backend is up: {why}");
            } else {
                tracing::warn!(backend = %self.name, state = self.state().as_str(), "backend is down: {why}");
            }
            self.changed.notify_waiters();
        }
    }

    /// Unix time (ms) at which the last passing health check began; 0 if
    /// none has passed yet.
    pub fn last_ok_check_ms(&self) -> u64 {
        self.last_ok_check_ms.load(Ordering::SeqCst)
    }

    /// Whether active health checks run for this backend.
    pub fn is_checked(&self) -> bool {
        self.checked.load(Ordering::SeqCst)
    }

    /// Turns active health checks on or off for this backend.
    pub fn set_checked(&self, on: bool) {
        self.checked.store(on, Ordering::SeqCst);
        if !on {
            self.set_healthy(true, "health checks are off");
        }
    }

    /// An active check that began at `started_ms` passed. `rise` passes in
    /// a row bring a backend up; one is enough after passive failures.
    pub fn check_passed(&self, started_ms: u64, rise: u32) {
        self.checks_failed_in_row.store(0, Ordering::Relaxed);
        let run = self.checks_ok_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        let passive = self.connects_failed_in_row.swap(0, Ordering::Relaxed) > 0;
        self.last_ok_check_ms.store(started_ms, Ordering::SeqCst);
        if !self.healthy() && (run >= rise || passive) {
            self.set_healthy(true, "health check passed");
        }
        self.changed.notify_waiters();
    }

    /// An active check failed; `fall` failures in a row take it down.
    pub fn check_failed(&self, fall: u32, error: &str) {
        self.checks_ok_in_row.store(0, Ordering::Relaxed);
        let run = self.checks_failed_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(backend = %self.name, error, "health check failed");
        if run >= fall && self.healthy() {
            self.set_healthy(
                false,
                &format!("{run} health checks failed in a row, last: {error}"),
            );
        }
    }

    /// A proxied connect failed. With active checks on, `fall` failures in
    /// a row take the backend down at once, until a check passes again.
    pub fn connect_failed(&self, fall: u32) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        let run = self.connects_failed_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        if run >= fall && self.checked.load(Ordering::SeqCst) && self.healthy() {
            self.checks_ok_in_row.store(0, Ordering::Relaxed);
            self.set_healthy(false, &format!("{run} connects failed in a row"));
        }
    }

    /// A proxied connect succeeded.
    pub fn connect_succeeded(&self) {
        if self.connects_failed_in_row.load(Ordering::Relaxed) != 0 {
            self.connects_failed_in_row.store(0, Ordering::Relaxed);
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

    /// Whether the backend is out of rotation and carries nothing.
    pub fn is_drained(&self) -> bool {
        matches!(self.state(), State::Drained | State::Stopped) && self.live() == 0
    }
}

/// A connection's slot in its backend's live count. Dropping it, on any
/// path (close, error, panic, cancellation), gives the slot back and may
/// complete a drain.
#[derive(Debug)]
pub struct ConnGuard {
    backend: Arc<Backend>,
    info: Arc<ConnInfo>,
}

impl ConnGuard {
    pub fn info(&self) -> &Arc<ConnInfo> {
        &self.info
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Counts the connection as made, once the backend connect succeeded.
    pub fn established(&self) {
        self.backend
            .total_connections
            .fetch_add(1, Ordering::Relaxed);
        self.backend.connect_succeeded();
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.backend.conns.remove(&self.info.id);
        if self.backend.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.backend.complete_drain_if_empty();
            self.backend.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Arc<Backend> {
        Arc::new(Backend::new(
            "b".into(),
            BackendAddress::parse("127.0.0.1:1").unwrap(),
            1,
            State::Active,
        ))
    }

    fn acquire(b: &Arc<Backend>) -> Option<ConnGuard> {
        b.try_acquire("127.0.0.1:2".parse().unwrap(), "s".into())
    }

    #[test]
    fn drain_completes_when_last_connection_closes() {
        let b = backend();
        let g1 = acquire(&b).unwrap();
        let g2 = acquire(&b).unwrap();
        b.drain();
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

    #[test]
    fn drain_of_idle_backend_is_immediate_and_repeatable() {
        let b = backend();
        b.drain();
        assert_eq!(b.state(), State::Drained);
        b.drain();
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
    fn force_close_applies_only_to_its_own_drain() {
        let b = backend();
        let g = acquire(&b).unwrap();
        let gen1 = b.drain();
        b.start();
        let _gen2 = b.drain();
        assert_eq!(b.force_close_if(gen1), 0);
        assert!(!g.info().cancel.is_cancelled());
    }

    #[test]
    fn unhealthy_or_zero_weight_takes_nothing() {
        let b = backend();
        b.set_healthy(false, "test");
        assert!(acquire(&b).is_none());
        b.set_healthy(true, "test");
        b.set_weight(0);
        assert!(acquire(&b).is_none());
        assert_eq!(b.live(), 0);
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;

    fn backend() -> Backend {
        Backend::new(
            "b".into(),
            BackendAddress::parse("127.0.0.1:1").unwrap(),
            1,
            State::Active,
        )
    }

    #[test]
    fn rise_and_fall() {
        let b = backend();
        b.set_checked(true);
        b.check_failed(2, "x");
        assert!(b.healthy());
        b.check_failed(2, "x");
        assert!(!b.healthy());
        b.check_passed(1, 2);
        assert!(!b.healthy());
        b.check_passed(2, 2);
        assert!(b.healthy());
        assert_eq!(b.last_ok_check_ms(), 2);
    }

    #[test]
    fn passive_failures_take_it_down_until_one_check_passes() {
        let b = backend();
        b.connect_failed(2);
        b.connect_failed(2);
        assert!(
            b.healthy(),
            "no active checks: passive failures alone do not mark it down"
        );
        b.set_checked(true);
        b.connect_failed(2);
        assert!(!b.healthy());
        assert_eq!(b.state(), State::Active, "health is a separate axis");
        b.check_passed(5, 3);
        assert!(b.healthy());
    }
}
