//! The event bus: what happened to the balancer (a backend's state or
//! health changed, a drain progressed or ended, a reload, refused clients,
//! leave and join, the cluster connection), told to whoever listens on
//! `GET /events`, and kept for a while so that a client that reconnects
//! gets what it missed.
//!
//! Low in the module order, so that `backend` publishes without knowing
//! `state` or `admin`. Publishing never waits: it takes one short lock,
//! appends to a bounded history and offers the event to each client's
//! bounded queue. A client whose queue is full has fallen behind: it is
//! cut off (its `cut` token fires and the admin API closes its
//! connection) and may come back with its last id; nothing waits for it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::health::unix_ms;

/// How many past events are kept for clients that resume.
pub const HISTORY: usize = 1024;

/// How many events may wait for one client before it counts as too slow.
/// Its socket buffers hold more; this is what waits beyond them.
pub const CLIENT_QUEUE: usize = 256;

/// One event as `GET /events` sends it, in the `data:` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing; never reused, even by the next process (see [`Bus::new`]).
    pub id: u64,
    /// Unix time in milliseconds at which it was published.
    pub time_ms: u64,
    #[serde(flatten)]
    pub kind: Kind,
}

/// What happened; `type` in the JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind {
    /// A backend's admin state changed; `live` is its live count then.
    State {
        backend: String,
        from: String,
        to: String,
        live: usize,
    },
    /// A backend went up or down.
    Health {
        backend: String,
        up: bool,
        why: String,
    },
    /// A drain's live count (and how many of those are idle), at most
    /// every [`PROGRESS_EVERY_MS`] while it runs and only when it moved.
    Progress {
        backend: String,
        live: usize,
        idle: usize,
    },
    /// A drain ended with no connection left, `after_ms` after it began.
    Drained { backend: String, after_ms: u64 },
    /// A backend a reload removed has drained and is gone from the list.
    Removed { backend: String },
    /// A reload: `applied` (with the backends it added and removed) or
    /// `refused` (with why; the running configuration stays).
    Reload {
        result: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        added: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        removed: Vec<String>,
    },
    /// Clients of `service` refused for `reason` since the last such
    /// event: at most one a second per service and reason.
    Refused {
        service: String,
        reason: String,
        count: u64,
    },
    /// This instance leaves its pair; `live` connections run on.
    Leave { live: usize },
    /// This instance is back in its pair.
    Join {},
    /// Cluster mode: etcd answers again, or no longer does and why.
    Cluster {
        connected: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// This process stops serving: `stop` (a signal) or `upgrade` (a new
    /// process took over). The stream ends soon after.
    Shutdown { reason: String },
    /// Sent to one client only: the events after `requested` are no
    /// longer all kept (or `requested` is not this process's), so what
    /// follows starts at `first`. Reread the state.
    Gap { requested: u64, first: u64 },
}

impl Kind {
    /// The name of its `type`, which is also the SSE `event:` field.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::State { .. } => "state",
            Kind::Health { .. } => "health",
            Kind::Progress { .. } => "progress",
            Kind::Drained { .. } => "drained",
            Kind::Removed { .. } => "removed",
            Kind::Reload { .. } => "reload",
            Kind::Refused { .. } => "refused",
            Kind::Leave { .. } => "leave",
            Kind::Join {} => "join",
            Kind::Cluster { .. } => "cluster",
            Kind::Shutdown { .. } => "shutdown",
            Kind::Gap { .. } => "gap",
        }
    }
}

/// The least time between two progress events of one backend's drain.
pub const PROGRESS_EVERY_MS: u64 = 250;

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `max_connections` was reached.
    Limit,
    /// No backend took or answered it.
    NoBackend,
    /// sluice was short of descriptors or buffers.
    Resources,
    /// Every backend that takes connections carries its
    /// `max_connections`.
    BackendFull,
    /// Its PROXY header (`accept_proxy`) was malformed, cut short or too
    /// slow.
    ProxyHeader,
}

impl Reason {
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::Limit,
        Reason::NoBackend,
        Reason::Resources,
        Reason::BackendFull,
        Reason::ProxyHeader,
    ];
    /// How many reasons there are, for arrays indexed by reason.
    pub const COUNT: usize = 5;

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Limit => "limit",
            Reason::NoBackend => "no_backend",
            Reason::Resources => "resources",
            Reason::BackendFull => "backend_full",
            Reason::ProxyHeader => "proxy_header",
        }
    }
}

/// How many of one service's refused clients the `refused` events have
/// told, by reason: the counting itself is the service's counts (which
/// `/metrics` reads too), so the refusing path adds once.
#[derive(Debug, Default)]
pub struct Refusals([AtomicU64; Reason::COUNT]);

impl Refusals {
    /// Publishes what `totals` (by reason, in [`Reason::ALL`]'s order)
    /// counted since the last flush.
    pub fn flush(&self, service: &str, totals: [u64; Reason::COUNT], bus: &Bus) {
        for reason in Reason::ALL {
            let total = totals[reason as usize];
            let told = self.0[reason as usize].swap(total, Ordering::Relaxed);
            let count = total.saturating_sub(told);
            if count > 0 {
                bus.publish(Kind::Refused {
                    service: service.to_string(),
                    reason: reason.as_str().to_string(),
                    count,
                });
            }
        }
    }
}

/// A published event, rendered once as its SSE frame.
#[derive(Debug)]
struct Kept {
    id: u64,
    frame: Bytes,
}

/// A listening client: its queue, and the token that cuts it off.
#[derive(Debug)]
struct Listener {
    queue: mpsc::Sender<Bytes>,
    cut: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    next: u64,
    history: VecDeque<Kept>,
    listeners: Vec<Listener>,
    /// Set once this process no longer serves events (shutdown, upgrade).
    closed: bool,
}

/// The bus: history and listeners under one lock, held for no await and
/// only to append, copy out or offer frames.
#[derive(Debug)]
pub struct Bus {
    /// The id before this process's first event.
    base: u64,
    inner: Mutex<Inner>,
}

/// What a new listener gets: the frames it missed (a `gap` first if some
/// are lost), then its queue, which ends when the bus closes or cuts the
/// listener off.
#[derive(Debug)]
pub struct Subscription {
    pub replay: Vec<Bytes>,
    pub queue: mpsc::Receiver<Bytes>,
}

impl Default for Bus {
    fn default() -> Bus {
        Bus::new()
    }
}

impl Bus {
    /// Ids start above this process's start time in microseconds, so a
    /// later process (a restart, an upgrade) never reuses an earlier one's
    /// ids, and a client that resumes with an old process's id gets a
    /// `gap`. They stay below 2^53, exact in JavaScript, until about 2255.
    pub fn new() -> Bus {
        let base = unix_ms().saturating_mul(1000);
        Bus {
            base,
            inner: Mutex::new(Inner {
                next: base + 1,
                history: VecDeque::with_capacity(HISTORY),
                listeners: Vec::new(),
                closed: false,
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding it leaves nothing half-done that
        // matters more than the events: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `kind` now. Never waits for a listener: one that cannot
    /// take it is cut off.
    pub fn publish(&self, kind: Kind) {
        let mut cut = 0;
        {
            let mut inner = self.inner();
            let id = inner.next;
            inner.next += 1;
            let frame = render(&Event {
                id,
                time_ms: unix_ms(),
                kind,
            });
            if inner.history.len() == HISTORY {
                inner.history.pop_front();
            }
            inner.history.push_back(Kept {
                id,
                frame: frame.clone(),
            });
            inner
                .listeners
                .retain(|l| match l.queue.try_send(frame.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        l.cut.cancel();
                        cut += 1;
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
        }
        if cut > 0 {
            tracing::info!(
                clients = cut,
                "event stream client fell {CLIENT_QUEUE} events behind: disconnected (it may resume with Last-Event-ID)"
            );
        }
    }

    /// A new listener. `last` is the id of the last event it has (as
    /// `Last-Event-ID` says): it first gets every kept event after that,
    /// or a `gap` and every kept event when some after it are lost or the
    /// id is not this process's. `Some(0)` asks for every kept event,
    /// `None` for new events only. `cut` is cancelled if it falls behind.
    pub fn subscribe(&self, last: Option<u64>, cut: CancellationToken) -> Subscription {
        let (tx, queue) = mpsc::channel(CLIENT_QUEUE);
        let mut inner = self.inner();
        let replay = match last {
            None => Vec::new(),
            Some(requested) => {
                let first = inner.history.front().map_or(inner.next, |k| k.id);
                let from = if requested == 0 { self.base } else { requested };
                let mut replay = Vec::new();
                if from + 1 < first || from >= inner.next {
                    replay.push(render(&Event {
                        id: first - 1,
                        time_ms: unix_ms(),
                        kind: Kind::Gap { requested, first },
                    }));
                }
                let kept = inner
                    .history
                    .iter()
                    .filter(|k| k.id > from || from >= inner.next);
                replay.extend(kept.map(|k| k.frame.clone()));
                replay
            }
        };
        if !inner.closed {
            inner.listeners.push(Listener { queue: tx, cut });
        }
        Subscription { replay, queue }
    }

    /// Ends every listener's queue (after what it holds) and refuses new
    /// ones, when this process stops serving events.
    pub fn close(&self) {
        let mut inner = self.inner();
        inner.closed = true;
        inner.listeners.clear();
    }

    /// Listeners now.
    pub fn listeners(&self) -> usize {
        self.inner().listeners.len()
    }
}

/// An event as one SSE frame: `id:`, `event:` and the JSON in `data:`.
fn render(e: &Event) -> Bytes {
    let json = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {json}\n\n",
        e.id,
        e.kind.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> Kind {
        Kind::Join {}
    }

    fn ids(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|f| {
                let text = std::str::from_utf8(f).unwrap();
                let event = text.lines().nth(1).unwrap().trim_start_matches("event: ");
                let id = text.lines().next().unwrap().trim_start_matches("id: ");
                format!("{event}:{id}")
            })
            .collect()
    }

    #[test]
    fn an_event_is_one_frame_with_its_json() {
        let bus = Bus::new();
        let mut s = bus.subscribe(None, CancellationToken::new());
        bus.publish(Kind::Drained {
            backend: "web1".into(),
            after_ms: 5,
        });
        let frame = s.queue.try_recv().unwrap();
        let text = std::str::from_utf8(&frame).unwrap();
        let id = bus.base + 1;
        assert!(
            text.starts_with(&format!("id: {id}\nevent: drained\ndata: {{")),
            "{text}"
        );
        assert!(text.ends_with("}\n\n"), "{text}");
        let data = text.lines().nth(2).unwrap().trim_start_matches("data: ");
        let e: Event = serde_json::from_str(data).unwrap();
        assert_eq!(e.id, id);
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], "drained");
        assert_eq!(v["backend"], "web1");
        assert_eq!(v["after_ms"], 5);
    }

    #[test]
    fn resume_gets_what_was_missed_or_a_gap() {
        let bus = Bus::new();
        let b = bus.base;
        for _ in 0..3 {
            bus.publish(join());
        }
        let at = |last| ids(&bus.subscribe(last, CancellationToken::new()).replay);
        assert!(at(None).is_empty());
        assert_eq!(
            at(Some(b + 1)),
            [format!("join:{}", b + 2), format!("join:{}", b + 3)]
        );
        assert!(at(Some(b + 3)).is_empty(), "nothing after the newest");
        assert_eq!(at(Some(0)).len(), 3, "0: everything kept, no gap");
        let from_elsewhere = at(Some(b - 7));
        assert_eq!(from_elsewhere[0], format!("gap:{b}"));
        assert_eq!(from_elsewhere.len(), 4);
        assert_eq!(
            at(Some(b + 99))[0],
            format!("gap:{b}"),
            "an id from the future"
        );
        for _ in 0..HISTORY {
            bus.publish(join());
        }
        let first = b + 4;
        let old = at(Some(b + 1));
        assert_eq!(old[0], format!("gap:{}", first - 1));
        assert_eq!(old[1], format!("join:{first}"));
        assert_eq!(old.len(), HISTORY + 1);
        assert_eq!(at(Some(first - 1)).len(), HISTORY, "just in time: no gap");
    }

    #[test]
    fn a_listener_that_falls_behind_is_cut_off_and_the_others_go_on() {
        let bus = Bus::new();
        let (slow, fast_cut) = (CancellationToken::new(), CancellationToken::new());
        let _slow_sub = bus.subscribe(None, slow.clone());
        let mut fast = bus.subscribe(None, fast_cut.clone());
        for _ in 0..CLIENT_QUEUE * 2 {
            bus.publish(join());
            while fast.queue.try_recv().is_ok() {}
        }
        assert!(slow.is_cancelled());
        assert!(!fast_cut.is_cancelled());
        assert_eq!(bus.listeners(), 1);
    }

    #[test]
    fn close_ends_every_queue_after_what_it_holds() {
        let bus = Bus::new();
        let mut s = bus.subscribe(None, CancellationToken::new());
        bus.publish(join());
        bus.close();
        assert!(s.queue.try_recv().is_ok());
        assert!(matches!(
            s.queue.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        let mut late = bus.subscribe(Some(0), CancellationToken::new());
        assert_eq!(late.replay.len(), 1);
        assert!(late.queue.try_recv().is_err());
    }

    #[test]
    fn refusals_are_told_once_with_their_count() {
        let bus = Bus::new();
        let mut s = bus.subscribe(None, CancellationToken::new());
        let r = Refusals::default();
        // Totals by reason: 5 over the limit, 1 with no backend; then
        // nothing new, then 2 more over the limit.
        r.flush("web", [5, 1, 0, 0, 0], &bus);
        r.flush("web", [5, 1, 0, 0, 0], &bus);
        r.flush("web", [7, 1, 0, 0, 3], &bus);
        let mut got = Vec::new();
        while let Ok(f) = s.queue.try_recv() {
            let text = String::from_utf8(f.to_vec()).unwrap();
            let data = text.lines().nth(2).unwrap().trim_start_matches("data: ");
            got.push(serde_json::from_str::<Event>(data).unwrap().kind);
        }
        let refused = |reason: &str, count| Kind::Refused {
            service: "web".into(),
            reason: reason.into(),
            count,
        };
        assert_eq!(
            got,
            [
                refused("limit", 5),
                refused("no_backend", 1),
                refused("limit", 2),
                refused("proxy_header", 3)
            ]
        );
    }
}
