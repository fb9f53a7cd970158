//! A connection's place in its backend: what the admin API lists of it
//! ([`ConnInfo`]) and its slot in the live count ([`ConnGuard`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Set once the backend connect succeeded: only then can the idle
    /// timeout close it.
    connected: AtomicBool,
    /// Cancelled to close this connection (stop, force, idle close, idle
    /// timeout, shutdown).
    pub cancel: Closer,
}

/// The signal that closes one connection. Its only waiter is the
/// connection's own task, so an atomic waker serves: a cancellation token
/// would allocate a tree node per connection, and its wait would keep a
/// list node in every idle connection's future.
#[derive(Debug, Default)]
pub struct Closer {
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl Closer {
    /// Closes the connection; its task wakes to end it.
    pub fn cancel(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    pub fn is_cancelled(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
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

    /// Whether the idle timeout `limit` has run out: connected, and silent
    /// that long. A connect still pending is the connect timeout's.
    pub fn timed_out(&self, limit: Duration) -> bool {
        self.connected.load(Ordering::Relaxed) && self.idle() >= limit
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
            connected: AtomicBool::new(false),
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

    /// Counts the connection as made, once the backend connect succeeded.
    pub fn established(&self) {
        self.info.connected.store(true, Ordering::Relaxed);
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
