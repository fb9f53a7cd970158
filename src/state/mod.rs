//! The shared state below both planes: the data plane (`proxy`) and the
//! admin plane (`admin`) read and change the balancer only through
//! [`Shared`], and neither imports the other.
//!
//! The configuration in force is one [`Runtime`] value, built from a
//! validated [`Config`] in one place ([`Runtime::new`]) and swapped whole
//! on reload (`reload.rs`), so no setting can be accepted and forgotten.

mod cluster;
mod counts;
mod file;
mod leave;
mod limit;
mod reload;
mod shortage;
mod throttle;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{ConnKey, ConnView, PreviousView};
use crate::backend::{Backend, State};
use crate::config::Config;
use crate::events::{Bus, Refusals};
use crate::health::Rules;
use crate::pool::Route;
use crate::shutdown::Background;

pub use cluster::{Agreed, ClusterState};
pub use counts::{DURATION_BOUNDS, Durations, ServiceCounts};
pub use file::{Saved, States, load as load_state_file};
pub use leave::{LEAVE_SETTLE, Leaving};
pub use limit::{Limit, Permit};
pub use reload::{Applied, NeedsRestart, Refused, ReloadError};
pub use shortage::Shortage;
pub use throttle::LogThrottle;

/// The configuration in force, and what is derived from it.
#[derive(Debug)]
pub struct Runtime {
    pub config: Config,
    /// What a connection reads when it starts.
    pub conn: ConnSettings,
}

/// Settings a connection reads when it starts: a reload applies them to
/// the connections that start after it.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Whether bulk flows may use splice(2).
    pub zero_copy: bool,
    /// Rise and fall, for failed connects.
    pub health: Rules,
}

impl Runtime {
    /// The one place a configuration becomes the runtime settings.
    pub fn new(config: Config) -> Runtime {
        let conn = ConnSettings {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            zero_copy: config.zero_copy,
            health: Rules::from(&config.health),
        };
        Runtime { config, conn }
    }
}

/// A listening socket whose clients are spread over its backends.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// The bound address (a port 0 in the file is resolved here).
    pub listen: SocketAddr,
    route: ArcSwap<Route>,
    /// Its refused clients and its connections' durations.
    pub counts: ServiceCounts,
    /// What of its refused clients the last `refused` events told.
    pub refusals: Refusals,
    /// With `accept_proxy`, the time a client has to send its PROXY header
    /// in milliseconds; 0 without. One atomic, read as a client arrives.
    proxy_header_ms: AtomicU64,
    /// Bad PROXY headers, for a rate-limited log line.
    pub header_errors: LogThrottle,
}

impl Service {
    /// Whether its clients send a PROXY header first, and if so the time
    /// they have to send it.
    pub fn accept_proxy(&self) -> Option<Duration> {
        match self.proxy_header_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub(crate) fn set_accept_proxy(&self, timeout: Option<Duration>) {
        // At least 1 ms, so that "on" never reads as 0.
        let ms = timeout.map_or(0, |t| (t.as_millis() as u64).max(1));
        self.proxy_header_ms.store(ms, Ordering::Relaxed);
    }

    /// The current backends of this service; a reload swaps it whole, so
    /// a connection past its pick is untouched.
    pub fn route(&self) -> Arc<Route> {
        self.route.load_full()
    }
}

/// What became of the clients. Every accepted client lands in exactly one
/// of `established`, `rejected_limit`, `rejected_proxy_header`,
/// `rejected_no_backend`, `rejected_backend_full`, `rejected_resources`
/// and `abandoned` once its
/// connect phase is over.
#[derive(Debug, Default)]
pub struct Stats {
    /// Clients accepted.
    pub accepted: AtomicU64,
    /// Connected to a backend (each also counts in its backend's total).
    pub established: AtomicU64,
    /// Closed at once because of `max_connections`.
    pub rejected_limit: AtomicU64,
    /// Closed because its PROXY header (`accept_proxy`) was malformed,
    /// cut short or too slow; no byte of it reached a backend.
    pub rejected_proxy_header: AtomicU64,
    /// Closed because no backend took or answered the connection.
    pub rejected_no_backend: AtomicU64,
    /// Closed because every backend that takes connections carried its
    /// `max_connections`.
    pub rejected_backend_full: AtomicU64,
    /// Closed because sluice itself was short of file descriptors or
    /// buffers when it connected to a backend.
    pub rejected_resources: AtomicU64,
    /// Left, or closed by the end of shutdown, before a backend answered.
    pub abandoned: AtomicU64,
    /// Accepts that failed for another reason than a shortage.
    pub accept_errors: AtomicU64,
    /// Admin connections closed at once over `[admin] max_connections`.
    pub admin_rejected: AtomicU64,
    /// Admin requests refused for a missing or wrong token.
    pub admin_unauthorized: AtomicU64,
    /// sluice's own shortages, on accept and on connect.
    pub shortage: Shortage,
}

/// Configuration reloads (SIGHUP, `POST /reload`), by outcome.
#[derive(Debug, Default)]
pub struct Reloads {
    /// Applied whole.
    pub applied: AtomicU64,
    /// Refused whole: a file that did not load, or a change that needs a
    /// restart.
    pub refused: AtomicU64,
}

/// State shared by the accept loops, the connections, the admin API and
/// the background tasks.
#[derive(Debug)]
pub struct Shared {
    runtime: ArcSwap<Runtime>,
    /// Every backend, including removed ones still draining.
    backends: ArcSwap<Vec<Arc<Backend>>>,
    pub services: Vec<Arc<Service>>,
    pub limit: Limit,
    /// `[admin] max_connections`.
    pub admin_limit: Limit,
    pub stats: Stats,
    pub reloads: Reloads,
    /// Failed admin authentications, for a rate-limited log line.
    pub auth_failures: LogThrottle,
    /// Set when the shutdown grace period ends: every connection closes,
    /// and one that registers after that closes at once.
    pub closing_all: AtomicBool,
    /// Cancelled with `closing_all`: ends the clients no backend's close
    /// reaches, those still sending their PROXY header. Clients wait on
    /// their accept loop's child of it, never on it directly.
    pub closing: CancellationToken,
    /// Set once shutdown has begun.
    pub shutting_down: AtomicBool,
    /// Set while this instance leaves its pair (`POST /leave`).
    pub leaving: Leaving,
    /// In cluster mode: what this instance knows of the others.
    cluster: Option<ClusterState>,
    /// Health checks, drain policies, removals, the state file writer.
    pub tasks: Background,
    /// Cancels the health checks of the configuration in force.
    health_checks: Mutex<CancellationToken>,
    /// Serializes the writers of the backend list (reload, removal); held
    /// for no await.
    changes: Mutex<()>,
    /// Woken on every admin transition, for the state file.
    pub state_changed: Arc<Notify>,
    /// What happened, for `GET /events`.
    pub events: Arc<Bus>,
    /// Whether the state file holds the admin states.
    pub persist: Persist,
    /// The process this one took over from, and what it still holds.
    previous: Mutex<Option<Previous>>,
    /// Woken when the previous process exits.
    previous_changed: Notify,
    /// When this process started, Unix ms.
    pub started_ms: u64,
    /// Admin states of backends a reload removed, by name, so that one
    /// that comes back has the state it had.
    retired: Mutex<HashMap<String, Retired>>,
}

/// The process this one took over from by an upgrade.
#[derive(Debug)]
struct Previous {
    pid: u32,
    version: String,
    /// Its connections by backend name and identity, as its reports left
    /// them: a full report replaces them, a report of changes edits them.
    held: HashMap<String, BTreeMap<ConnKey, HeldRow>>,
    /// Reports taken, and its exit: 0 until it has reported, when what it
    /// holds is unknown and this process must not tell a successor of its
    /// own that it holds nothing there.
    reports: u64,
    exited_ms: Option<u64>,
}

/// One connection of the previous process, as reported, and when.
#[derive(Debug)]
struct HeldRow {
    view: ConnView,
    at: Instant,
}

impl HeldRow {
    /// The view with its age counted on since the report: a row is sent
    /// once, not every time another changes. Idle time and bytes are as
    /// reported, since they depend on traffic this process does not see.
    fn view(&self) -> ConnView {
        let mut v = self.view.clone();
        v.age_ms = v
            .age_ms
            .saturating_add(self.at.elapsed().as_millis() as u64);
        v
    }
}

impl Previous {
    /// Each backend's count of rows, for the drains.
    fn counts(&self) -> HashMap<String, usize> {
        self.held
            .iter()
            .map(|(b, rows)| (b.clone(), rows.len()))
            .collect()
    }
}

impl Shared {
    /// An upgrade made this process the successor of `pid`.
    pub fn previous_started(&self, pid: u32, version: String) {
        *self.previous.lock().expect("previous lock") = Some(Previous {
            pid,
            version,
            held: HashMap::new(),
            reports: 0,
            exited_ms: None,
        });
    }

    /// What the previous process reports it still holds, the whole of it:
    /// every backend's drain counts it.
    pub fn previous_holds(&self, held: HashMap<String, Vec<ConnView>>) {
        let at = Instant::now();
        let counts = {
            let mut p = self.previous.lock().expect("previous lock");
            let Some(p) = p.as_mut() else { return };
            p.held = held
                .into_iter()
                .map(|(b, views)| {
                    let rows = views
                        .into_iter()
                        .map(|mut view| {
                            // A sluice from before rows named their process
                            // sends no pid: its rows are shown as its own.
                            if view.pid == 0 {
                                view.pid = p.pid;
                            }
                            (view.key(), HeldRow { view, at })
                        })
                        .collect();
                    (b, rows)
                })
                .collect();
            p.reports += 1;
            p.counts()
        };
        self.set_elsewhere_from(&counts);
    }

    /// What changed in what the previous process holds since its last
    /// report: the rows `gone`, by identity, and the `new` ones, by
    /// backend. The result is what a full report would have said.
    pub fn previous_changes(
        &self,
        gone: HashMap<String, Vec<ConnKey>>,
        new: HashMap<String, Vec<ConnView>>,
    ) {
        let at = Instant::now();
        let counts = {
            let mut p = self.previous.lock().expect("previous lock");
            let Some(p) = p.as_mut() else { return };
            for (b, keys) in gone {
                if let Some(rows) = p.held.get_mut(&b) {
                    for k in keys {
                        rows.remove(&k);
                    }
                    if rows.is_empty() {
                        p.held.remove(&b);
                    }
                }
            }
            for (b, views) in new.into_iter().filter(|(_, v)| !v.is_empty()) {
                let rows = p.held.entry(b).or_default();
                for view in views {
                    rows.insert(view.key(), HeldRow { view, at });
                }
            }
            p.reports += 1;
            p.counts()
        };
        self.set_elsewhere_from(&counts);
    }

    /// Sets every backend's count of the previous process's connections;
    /// outside the lock, since a count of 0 may complete a drain.
    fn set_elsewhere_from(&self, counts: &HashMap<String, usize>) {
        for b in self.backends().iter() {
            b.set_elsewhere(counts.get(&b.name).copied().unwrap_or(0));
        }
    }

    /// How many times what the previous process holds has changed here
    /// (0 without one): it moves with every report. `None` while that is
    /// unknown: it has neither reported nor exited.
    pub fn previous_reports(&self) -> Option<u64> {
        let p = self.previous.lock().expect("previous lock");
        match &*p {
            None => Some(0),
            Some(p) => (p.reports > 0).then_some(p.reports),
        }
    }

    /// The previous process is gone, and so are its connections.
    pub fn previous_exited(&self) {
        for b in self.backends().iter() {
            b.set_elsewhere(0);
            b.close_elsewhere_with(None);
        }
        if let Some(p) = &mut *self.previous.lock().expect("previous lock") {
            p.held.clear();
            p.reports += 1;
            p.exited_ms = Some(crate::health::unix_ms());
            tracing::info!(pid = p.pid, "the previous sluice process has exited");
        }
        self.previous_changed.notify_waiters();
    }

    /// The previous process, as `/healthz` shows it.
    pub fn previous(&self) -> Option<PreviousView> {
        let p = self.previous.lock().expect("previous lock");
        p.as_ref().map(|p| PreviousView {
            pid: p.pid,
            version: p.version.clone(),
            connections: p.held.values().map(BTreeMap::len).sum(),
            exited_ms: p.exited_ms,
        })
    }

    /// Waits until the previous process, if any, has exited, or this
    /// process's shutdown grace period has passed since it was asked.
    pub async fn previous_gone(&self) {
        let grace = self.runtime().config.shutdown_grace;
        let gone = async {
            loop {
                let notified = self.previous_changed.notified();
                tokio::pin!(notified);
                // Enabled before the check, so an exit in between wakes it.
                notified.as_mut().enable();
                let running = self
                    .previous
                    .lock()
                    .expect("previous lock")
                    .as_ref()
                    .is_some_and(|p| p.exited_ms.is_none());
                if !running {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(grace, gone).await;
    }

    /// One page of the previous process's connections of `backend`, in
    /// the order of their pid and id (a process it took over from may
    /// hold some too, and ids of two processes can be equal): those after
    /// `after`, at most `limit`, and whether more follow.
    pub fn previous_connections_page(
        &self,
        backend: &str,
        after: Option<ConnKey>,
        limit: usize,
    ) -> (Vec<ConnView>, bool) {
        use std::ops::Bound::{Excluded, Unbounded};
        let p = self.previous.lock().expect("previous lock");
        let Some(rows) = p.as_ref().and_then(|p| p.held.get(backend)) else {
            return (Vec::new(), false);
        };
        let mut from = match after {
            Some(a) => rows.range((Excluded(a), Unbounded)),
            None => rows.range(..),
        };
        let page = from.by_ref().take(limit).map(|(_, r)| r.view()).collect();
        (page, from.next().is_some())
    }

    /// Appends the identities of the previous process's connections of
    /// `backend` to `out`, in order: what this process relays to its own
    /// successor, compared tick to tick without a view.
    pub fn previous_keys(&self, backend: &str, out: &mut Vec<ConnKey>) {
        let p = self.previous.lock().expect("previous lock");
        if let Some(rows) = p.as_ref().and_then(|p| p.held.get(backend)) {
            out.extend(rows.keys().copied());
        }
    }

    /// The views of those of `keys` the previous process still holds on
    /// `backend`.
    pub fn previous_views(&self, backend: &str, keys: &[ConnKey]) -> Vec<ConnView> {
        let p = self.previous.lock().expect("previous lock");
        let Some(rows) = p.as_ref().and_then(|p| p.held.get(backend)) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|k| rows.get(k).map(HeldRow::view))
            .collect()
    }
}

/// The rule when the state file cannot be written (its directory gone,
/// the disk full, no permission): an admin change still applies, since
/// refusing a drain during maintenance helps no one, but the reply says
/// it was not saved, `/healthz` says why, `/stats` counts the failures,
/// and the writer retries until the file holds the states again.
#[derive(Debug, Default)]
pub struct Persist {
    /// One writer at a time: the admin API's and the background one's.
    writing: Mutex<()>,
    /// The last write's problem, while writes fail.
    failing: Mutex<Option<String>>,
    /// Failed writes, over the process's life.
    pub failures: AtomicU64,
    /// Set once a new process took over: the file is its to write.
    handed_over: AtomicBool,
    /// Set after the last write at shutdown.
    finished: AtomicBool,
}

impl Persist {
    /// Whether the last write failed.
    pub fn is_failing(&self) -> bool {
        self.failing.lock().expect("persist lock").is_some()
    }
}

/// A removed backend's admin state, and the generation its removal drain
/// left it at (a later one means an admin acted on it since).
#[derive(Debug, Clone, Copy)]
struct Retired {
    state: State,
    generation: u64,
}

impl Shared {
    /// The balancer for `config`, its services bound at `listens` (in the
    /// config's order), admin states restored from `saved` before anything
    /// accepts, and health checks started.
    pub fn new(config: Config, listens: &[SocketAddr], saved: &Saved) -> Arc<Shared> {
        let services = config
            .services
            .iter()
            .zip(listens)
            .map(|(s, &listen)| {
                Arc::new(Service {
                    name: s.name.as_str().into(),
                    listen,
                    route: ArcSwap::from_pointee(Route::new(Vec::new(), s.balance)),
                    counts: ServiceCounts::default(),
                    refusals: Refusals::default(),
                    proxy_header_ms: AtomicU64::new(0),
                    header_errors: LogThrottle::default(),
                })
            })
            .collect();
        let state_changed = Arc::new(Notify::new());
        let events = Arc::new(Bus::new());
        // Saved states of backends the file no longer names wait for them.
        let retired = saved
            .backends
            .iter()
            .filter(|(name, _)| !config.backends.iter().any(|b| &b.name == *name))
            .map(|(name, &state)| {
                let r = Retired {
                    state,
                    generation: 0,
                };
                (name.clone(), r)
            })
            .collect();
        let backends: Vec<_> = config
            .backends
            .iter()
            .map(|bc| {
                let b = reload::new_backend(bc, &state_changed, &events);
                if let Some(&state) = saved.backends.get(&bc.name) {
                    // Saved states first, so a backend drained for
                    // maintenance never takes a connection because sluice
                    // restarted. The cluster's, exactly: its drain may
                    // still run elsewhere.
                    if config.cluster.is_some() {
                        b.restore_agreed(state);
                    } else {
                        b.restore(state);
                    }
                    if state != State::Active {
                        tracing::info!(backend = %bc.name, state = b.state().as_str(), "admin state restored from the state file");
                    }
                }
                b
            })
            .collect();
        let cluster = config.cluster.clone().map(ClusterState::new);
        let shared = Arc::new(Shared {
            limit: Limit::new(config.max_connections),
            admin_limit: Limit::new(config.admin.max_connections),
            auth_failures: LogThrottle::default(),
            runtime: ArcSwap::from_pointee(Runtime::new(config)),
            backends: ArcSwap::from_pointee(backends),
            services,
            stats: Stats::default(),
            reloads: Reloads::default(),
            closing_all: AtomicBool::new(false),
            closing: CancellationToken::new(),
            shutting_down: AtomicBool::new(false),
            leaving: Leaving::default(),
            cluster,
            tasks: Background::default(),
            health_checks: Mutex::new(CancellationToken::new()),
            changes: Mutex::new(()),
            state_changed,
            events,
            retired: Mutex::new(retired),
            persist: Persist::default(),
            previous: Mutex::new(None),
            previous_changed: Notify::new(),
            started_ms: crate::health::unix_ms(),
        });
        shared.leaving.restore(saved.leaving);
        if saved.leaving {
            tracing::warn!(
                "leaving, as the state file says: /healthz answers 503 until `sluice ctl join`"
            );
        }
        let runtime = shared.runtime();
        let list = shared.backends();
        shared.set_routes(&list, &runtime.config);
        shared.set_service_settings(&runtime.config);
        shared.restart_health_checks(&list, &runtime.config);
        // A drain the cluster agreed on runs on here: its progress too.
        for b in list.iter() {
            b.report_drain(&shared.tasks);
        }
        shared
    }

    /// Publishes the clients refused since the last call, one event per
    /// service and reason; called every second.
    pub fn flush_refusals(&self) {
        for s in &self.services {
            s.refusals
                .flush(&s.name, s.counts.refused_all(), &self.events);
        }
    }

    /// The configuration in force.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// What a new connection reads, without touching a reference count.
    pub fn conn_settings(&self) -> ConnSettings {
        self.runtime.load().conn
    }

    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    pub fn backend(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends
            .load()
            .iter()
            .find(|b| b.name == name)
            .cloned()
    }

    /// Names of the services that send clients to `b`.
    pub fn services_of(&self, b: &Backend) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.route().members().iter().any(|(m, _)| m.name == b.name))
            .map(|s| s.name.to_string())
            .collect()
    }

    /// Live connections over every backend.
    pub fn live(&self) -> usize {
        self.backends.load().iter().map(|b| b.live()).sum()
    }

    /// Every backend's admin state by name, removed ones included: what
    /// the state file keeps. A removed backend counts with the state it had
    /// before its removal drain, unless an admin acted on it since.
    pub fn admin_states(&self) -> States {
        let retired = self.retired.lock().expect("retired lock");
        let mut states: States = retired.iter().map(|(n, r)| (n.clone(), r.state)).collect();
        for b in self.backends().iter() {
            let state = match retired.get(&b.name) {
                Some(r) if b.removed.load(Ordering::SeqCst) && r.generation == b.generation() => {
                    r.state
                }
                _ => b.state(),
            };
            states.insert(b.name.clone(), state);
        }
        states
    }

    /// Takes the retired entry of a backend that comes back.
    fn retired_remove(&self, name: &str) -> Option<Retired> {
        self.retired.lock().expect("retired lock").remove(name)
    }

    /// Writes every backend's admin state to the state file, if there is
    /// one, atomically; one writer at a time. A failure is logged, counted
    /// and kept until a write succeeds again: the change it failed to save
    /// still applies (see [`Persist`]). Returns whether the file now holds
    /// the states, or `None` without a state file. Blocks on the disk.
    pub fn save_states(&self) -> Option<bool> {
        let path = self.runtime().config.state_file.clone()?;
        let _one_writer = self.persist.writing.lock().expect("persist lock");
        // Under the lock: once `stop_saving` returns, no write of this
        // process can land on the new one's file.
        if self.persist.handed_over.load(Ordering::SeqCst)
            || self.persist.finished.load(Ordering::SeqCst)
        {
            return None;
        }
        let saved = Saved {
            backends: self.admin_states(),
            leaving: self.leaving.is_on(),
        };
        let result = file::save(&path, &saved);
        let mut failing = self.persist.failing.lock().expect("persist lock");
        match result {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!(path = %path.display(), "state file written again: admin states are saved");
                }
                Some(true)
            }
            Err(e) => {
                self.persist.failures.fetch_add(1, Ordering::Relaxed);
                let problem = format!(
                    "state file {}: cannot write it ({e}); admin changes apply but are not saved, and a restart would lose them; sluice retries",
                    path.display()
                );
                if failing.as_deref() != Some(problem.as_str()) {
                    tracing::error!("{problem}");
                }
                *failing = Some(problem);
                Some(false)
            }
        }
    }

    /// After an upgrade: the new process writes the state file from now.
    pub fn stop_saving(&self) {
        let _one_writer = self.persist.writing.lock().expect("persist lock");
        self.persist.handed_over.store(true, Ordering::SeqCst);
    }

    /// What keeps the balancer from being as configured, for `/healthz`.
    pub fn problems(&self) -> Vec<String> {
        let failing = self.persist.failing.lock().expect("persist lock");
        let cluster = self.cluster.as_ref().and_then(ClusterState::problem);
        failing.iter().cloned().chain(cluster).collect()
    }

    /// After the last write at shutdown: a write the writer had queued in
    /// the blocking pool must not land after the process is done, on a
    /// file the next process (or an admin) may own by then.
    pub fn finish_saving(&self) {
        let _one_writer = self.persist.writing.lock().expect("persist lock");
        self.persist.finished.store(true, Ordering::SeqCst);
    }

    /// Whether a new process took over (an upgrade) and serves now.
    pub fn handed_over(&self) -> bool {
        self.persist.handed_over.load(Ordering::SeqCst)
    }

    /// Stops every health check, at shutdown.
    pub fn stop_health_checks(&self) {
        self.health_checks.lock().expect("health lock").cancel();
    }
}
