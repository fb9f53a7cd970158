//! A connection's place in its backend: what the admin API lists of it
//! ([`ConnInfo`]) and its slot in the live count ([`ConnGuard`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

use super::Backend;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// How many connection ids this process has given out: it moves with
/// every new connection, which is how an upgrade's report tells, without
/// walking any table, that none began.
pub fn ids_given() -> u64 {
    NEXT_CONN_ID.load(Ordering::SeqCst)
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
    /// The idle timeout in force when the backend connect succeeded, in
    /// milliseconds; 0 for none, and until then (a connect still pending
    /// is the connect timeout's). Kept per connection, so that a reload
    /// closes no live connection.
    idle_limit_ms: AtomicU32,
    /// Cancelled to close this connection (stop, force, idle close, idle
    /// timeout, shutdown).
    pub cancel: Closer,
}

/// Whether any connection was ever given an idle timeout: until then the
/// sweep has nothing to look for.
static IDLE_LIMITS: AtomicBool = AtomicBool::new(false);

/// Whether the idle-timeout sweep may find anything.
pub fn idle_limits_in_use() -> bool {
    IDLE_LIMITS.load(Ordering::Relaxed)
}

/// The signal that closes one connection, and why. Its only waiter is
/// the connection's own task, so an atomic waker serves: a cancellation
/// token would allocate a tree node per connection, and its wait would
/// keep a list node in every idle connection's future.
#[derive(Debug, Default)]
pub struct Closer {
    /// `OPEN`, `CLOSED` or `TIMED_OUT`; the first close sets it.
    state: AtomicU8,
    waker: AtomicWaker,
}

const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const TIMED_OUT: u8 = 2;

impl Closer {
    /// Closes the connection (stop, force, idle close, shutdown); its task
    /// wakes to end it.
    pub fn cancel(&self) {
        self.close(CLOSED);
    }

    /// Closes the connection for its idle timeout.
    fn time_out(&self) {
        self.close(TIMED_OUT);
    }

    fn close(&self, why: u8) {
        let _ = self
            .state
            .compare_exchange(OPEN, why, Ordering::SeqCst, Ordering::SeqCst);
        self.waker.wake();
    }

    pub fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::SeqCst) != OPEN
    }

    /// Whether the idle timeout was what closed it.
    pub fn timed_out(&self) -> bool {
        self.state.load(Ordering::SeqCst) == TIMED_OUT
    }

    /// Resolves once `cancel` was called. Polled by one task only.
    pub fn cancelled(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_cancelled() {
                return std::task::Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Checked again: a cancel between the two saw no waker.
            if self.is_cancelled() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
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

    /// Closes it if its idle timeout ran out by `now`: connected, still
    /// open, and silent that long. Returns whether it did. One clock read
    /// serves a whole sweep.
    pub fn time_out_if_silent(&self, now: Instant) -> bool {
        let limit = self.idle_limit_ms.load(Ordering::Relaxed);
        if limit == 0 || self.cancel.is_cancelled() {
            return false;
        }
        let age = now.saturating_duration_since(self.started).as_millis() as u64;
        let silent = age.saturating_sub(self.last_active_ms.load(Ordering::Relaxed));
        if silent < u64::from(limit) {
            return false;
        }
        self.cancel.time_out();
        true
    }

    /// How long no byte has moved in either direction.
    pub fn idle(&self) -> Duration {
        let age = self.started.elapsed();
        age.saturating_sub(Duration::from_millis(
            self.last_active_ms.load(Ordering::Relaxed),
        ))
    }
}

/// Why a backend gave no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// It takes no new connections (admin state, health, weight 0).
    Out,
    /// It carries `max_connections` already.
    Full,
}

impl Backend {
    /// Takes a slot for a new connection, or says why not. The slot is
    /// reserved first, by a compare-and-swap that never takes the live
    /// count past `max_connections`, so the limit holds exactly however
    /// many clients race for the last slot. The rule is checked after, so
    /// that a concurrent drain or stop either sees this connection or this
    /// connection sees the new state: none slips past. A backend both
    /// full and out of rotation is out: `Full` says that a client was
    /// refused for want of room, which only one that takes connections
    /// can lack.
    pub fn try_acquire(
        self: &Arc<Self>,
        client: SocketAddr,
        service: Arc<str>,
    ) -> Result<ConnGuard, Skip> {
        let max = self.max_connections.load(Ordering::Relaxed);
        if max == usize::MAX {
            self.live.fetch_add(1, Ordering::SeqCst);
        } else {
            self.live
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                    (l < max).then_some(l + 1)
                })
                .map_err(|_| {
                    if self.takes_new_connections() {
                        Skip::Full
                    } else {
                        Skip::Out
                    }
                })?;
        }
        // The slot is held from here: the guard built below gives it back.
        let info = Arc::new(ConnInfo {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            client,
            service,
            started: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            awaiting_reply: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            idle_limit_ms: AtomicU32::new(0),
            cancel: Closer::default(),
        });
        self.conns.insert(info.id, info.clone());
        let guard = ConnGuard {
            backend: self.clone(),
            info,
        };
        if self.takes_new_connections() {
            Ok(guard)
        } else {
            Err(Skip::Out)
        }
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

    /// Counts the connection as made, once the backend connect succeeded,
    /// and gives it the idle timeout now in force.
    pub fn established(&self, idle_timeout: Option<Duration>) {
        if let Some(limit) = idle_timeout {
            let ms = limit.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
            self.info.idle_limit_ms.store(ms, Ordering::Relaxed);
            IDLE_LIMITS.store(true, Ordering::Relaxed);
        }
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
