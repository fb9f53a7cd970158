//! The running balancer: its shared state, its listeners, reload, the
//! state file, and its life from bind to graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::Error;
use crate::backend::{Backend, State};
use crate::config::{BackendAddress, BackendConfig, Config, HealthCheck, RuntimeLayout};
use crate::health::Probe;
use crate::pool::{Route, Target};

/// A listening socket whose clients are spread over its backends.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub listen: SocketAddr,
    route: RwLock<Arc<Route>>,
}

impl Service {
    /// The current backends of this service; a reload swaps it whole.
    pub fn route(&self) -> Arc<Route> {
        self.route.read().expect("route lock").clone()
    }
}

/// Settings a connection reads when it starts.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Failed connects in a row that mark a checked backend down.
    pub fall: u32,
    /// Whether bulk flows may use splice(2).
    pub zero_copy: bool,
}

/// Counters of clients sluice could not serve.
#[derive(Debug, Default)]
pub struct Stats {
    /// Closed at once because of `max_connections`.
    pub rejected_limit: AtomicU64,
    /// Closed at once because no backend took or answered the connection.
    pub rejected_no_backend: AtomicU64,
    pub accept_errors: AtomicU64,
}

/// State shared by the accept loops, the connections and the admin API.
#[derive(Debug)]
pub struct Shared {
    backends: RwLock<Vec<Arc<Backend>>>,
    pub services: Vec<Arc<Service>>,
    pub limit: Arc<Semaphore>,
    /// Permits still to take back after `max_connections` was lowered.
    limit_debt: AtomicUsize,
    pub stats: Stats,
    settings: RwLock<Settings>,
    /// Set when the shutdown grace period ends: every connection closes,
    /// and one that registers after that closes at once.
    pub closing_all: AtomicBool,
    /// Set once shutdown has begun.
    pub shutting_down: AtomicBool,
    admin_token: RwLock<Option<String>>,
    /// Time an admin client has to send its request.
    pub admin_timeout: Duration,
    /// The configuration in force, to compare a reload against.
    config: Mutex<Config>,
    /// One token per backend's health-check task.
    health_tasks: Mutex<Vec<CancellationToken>>,
    /// Woken on every admin transition, for the state file.
    state_changed: Arc<Notify>,
}

impl Shared {
    pub fn settings(&self) -> Settings {
        *self.settings.read().expect("settings lock")
    }

    pub fn admin_token(&self) -> Option<String> {
        self.admin_token.read().expect("token lock").clone()
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().expect("backends lock").clone()
    }

    /// Names of the services that send clients to `b`.
    pub fn services_of(&self, b: &Backend) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.route().members().iter().any(|(m, _)| m.name == b.name))
            .map(|s| s.name.to_string())
            .collect()
    }

    pub fn backend(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends
            .read()
            .expect("backends lock")
            .iter()
            .find(|b| b.name == name)
            .cloned()
    }

    /// Applies a new configuration to the running balancer: backends
    /// added, removed (drained, then dropped) or changed, routes, limits,
    /// timeouts, health checks and the token. Admin states are kept and no
    /// live connection is cut. Changes that need new sockets are refused.
    pub fn reload(self: &Arc<Self>, new: Config) -> Result<(), String> {
        {
            let old = self.config.lock().expect("config lock");
            if old.admin.listen != new.admin.listen {
                return Err(format!(
                    "[admin] listen changed from {} to {}: that needs a restart",
                    old.admin.listen, new.admin.listen
                ));
            }
            let listens = |c: &Config| {
                c.services
                    .iter()
                    .map(|s| (s.name.clone(), s.listen))
                    .collect::<Vec<_>>()
            };
            if listens(&old) != listens(&new) {
                return Err(
                    "services were added, removed, renamed or moved: that needs a restart".into(),
                );
            }
            if old.state_file != new.state_file {
                return Err("state_file changed: that needs a restart".into());
            }
        }
        let mut list = self.backends.write().expect("backends lock");
        for bc in &new.backends {
            match list.iter().find(|b| b.name == bc.name) {
                Some(b) => {
                    // Back in the file before its removal drain ended: it
                    // joins again, as an added backend would.
                    if b.removed.swap(false, Ordering::SeqCst) {
                        b.start();
                    }
                    b.set_weight(bc.weight);
                    b.set_address(bc.address.clone());
                }
                None => {
                    info!(backend = %bc.name, address = %bc.address, "backend added");
                    list.push(self.new_backend(bc, State::Active));
                }
            }
        }
        for b in list.iter() {
            if new.backends.iter().any(|c| c.name == b.name)
                || b.removed.swap(true, Ordering::SeqCst)
            {
                continue;
            }
            info!(backend = %b.name, live = b.live(), "backend removed from the configuration: draining it");
            b.drain();
            let (b, shared) = (b.clone(), Arc::downgrade(self));
            tokio::spawn(async move {
                while !b
                    .wait_until(Duration::from_secs(3600), |b| b.live() == 0)
                    .await
                {}
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                // Checked under the lock: a reload may have brought it back.
                let mut list = shared.backends.write().expect("backends lock");
                if b.removed.load(Ordering::SeqCst) {
                    list.retain(|x| !Arc::ptr_eq(x, &b));
                    info!(backend = %b.name, "removed backend drained and dropped");
                }
            });
        }
        for (service, sc) in self.services.iter().zip(&new.services) {
            let members = sc
                .backends
                .iter()
                .filter_map(|n| list.iter().find(|b| &b.name == n))
                .map(|b| (b.clone(), Target::new(&b.address(), sc.backend_port)))
                .collect();
            *service.route.write().expect("route lock") = Arc::new(Route::new(members));
        }
        self.restart_health_checks(&list, &new);
        drop(list);

        *self.settings.write().expect("settings lock") = Settings {
            connect_timeout: new.connect_timeout,
            idle_timeout: new.idle_timeout,
            fall: new.health.fall,
            zero_copy: new.zero_copy,
        };
        *self.admin_token.write().expect("token lock") = new.admin.token.clone();
        let mut old = self.config.lock().expect("config lock");
        self.resize_limit(old.max_connections, new.max_connections);
        *old = new;
        Ok(())
    }

    /// Moves the connection limit from `from` to `to`. Permits held by live
    /// connections cannot be taken back at once: they become a debt that
    /// connections pay as they end ([`Shared::release`]), and a later
    /// raise pays it first.
    fn resize_limit(&self, from: usize, to: usize) {
        if to > from {
            let mut raise = to - from;
            let _ = self
                .limit_debt
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                    let paid = d.min(to - from);
                    raise = to - from - paid;
                    Some(d - paid)
                });
            self.limit.add_permits(raise);
        } else if to < from {
            let gone = self.limit.forget_permits(from - to);
            if gone < from - to {
                self.limit_debt
                    .fetch_add(from - to - gone, Ordering::SeqCst);
                warn!(
                    max_connections = to,
                    "lowered while busy: the limit applies fully as live connections end"
                );
            }
        }
    }

    /// Gives a connection's permit back, or pays the limit's debt with it.
    pub fn release(&self, permit: tokio::sync::OwnedSemaphorePermit) {
        let paid = self
            .limit_debt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
            .is_ok();
        if paid {
            permit.forget();
        }
    }

    fn new_backend(&self, bc: &BackendConfig, state: State) -> Arc<Backend> {
        Arc::new(
            Backend::new(bc.name.clone(), bc.address.clone(), bc.weight, state)
                .notify_changes_to(self.state_changed.clone()),
        )
    }

    fn restart_health_checks(&self, list: &[Arc<Backend>], config: &Config) {
        let mut tasks = self.health_tasks.lock().expect("health lock");
        for t in tasks.drain(..) {
            t.cancel();
        }
        for b in list {
            let Some(bc) = config.backends.iter().find(|c| c.name == b.name) else {
                continue;
            };
            let Some(check) = &bc.health else {
                b.set_checked(false);
                continue;
            };
            let explicit = match check {
                HealthCheck::Tcp { port } | HealthCheck::Http { port, .. } => *port,
            };
            // The port to check: the check's own, the address's, or that of
            // the first service that uses the backend.
            let port = explicit.or(bc.address.port()).or_else(|| {
                config
                    .services
                    .iter()
                    .find(|s| s.backends.contains(&bc.name))
                    .map(|s| s.backend_port)
            });
            let Some(port) = port else {
                b.set_checked(false);
                continue;
            };
            // An explicit check port wins over the address's own.
            let address = match (explicit, &bc.address) {
                (Some(p), BackendAddress::Ip(ip, _)) => BackendAddress::Ip(*ip, Some(p)),
                (Some(p), BackendAddress::Host(h, _)) => BackendAddress::Host(h.clone(), Some(p)),
                (None, a) => a.clone(),
            };
            let probe = Probe {
                check: check.clone(),
                target: Target::new(&address, port),
            };
            let token = CancellationToken::new();
            tokio::spawn(crate::health::run(
                b.clone(),
                probe,
                config.health.clone(),
                token.clone(),
            ));
            tasks.push(token);
        }
    }

    /// Writes every backend's admin state to `path`, atomically.
    fn save_states(&self, path: &Path) -> std::io::Result<()> {
        let states: HashMap<String, State> = self
            .backends()
            .iter()
            .map(|b| (b.name.clone(), b.state()))
            .collect();
        let text = serde_json::to_string_pretty(&states).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all((text + "\n").as_bytes())?;
            // On disk before the rename, so a power cut leaves the old file
            // or the new one, never a torn one.
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }
}

/// Reads a state file written by [`Shared::save_states`]; none yet is empty.
fn load_states(path: &Path) -> Result<HashMap<String, State>, Error> {
    let bad = |m: String| Error::StateFile {
        path: path.to_path_buf(),
        message: m,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "{e}; fix it, or delete it to start with every backend active"
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// A bound, not yet running sluice.
pub struct Sluice {
    shared: Arc<Shared>,
    /// Per service, one listener per worker (one in all for multi-thread).
    listeners: Vec<(Arc<Service>, Vec<std::net::TcpListener>)>,
    layout: RuntimeLayout,
    admin: TcpListener,
    grace: Duration,
    state_file: Option<PathBuf>,
    config_path: Option<PathBuf>,
}

impl Sluice {
    /// Builds the backends and services of `config`, restores saved admin
    /// states, and binds every listening socket, so that start-up errors
    /// surface before serving.
    pub async fn bind(config: Config) -> Result<Sluice, Error> {
        let saved = match &config.state_file {
            Some(p) => load_states(p)?,
            None => HashMap::new(),
        };
        let per_core = config.runtime == RuntimeLayout::PerCore && config.workers > 1;
        let count = if per_core { config.workers } else { 1 };
        let mut listeners = Vec::new();
        for s in &config.services {
            let bind_err = |e| Error::Bind {
                what: format!("service `{}`", s.name),
                addr: s.listen,
                source: e,
            };
            let first = crate::proxy::listen(s.listen, per_core).map_err(bind_err)?;
            // Port 0 picks a port once; the other workers share it.
            let bound = first.local_addr().map_err(Error::Io)?;
            let mut set = vec![first];
            for _ in 1..count {
                set.push(crate::proxy::listen(bound, true).map_err(bind_err)?);
            }
            let service = Arc::new(Service {
                name: s.name.as_str().into(),
                listen: bound,
                route: RwLock::new(Arc::new(Route::new(Vec::new()))),
            });
            listeners.push((service, set));
        }
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|e| Error::Bind {
                what: "admin API".into(),
                addr: config.admin.listen,
                source: e,
            })?;

        let mut empty = config.clone();
        empty.backends.clear();
        empty.services.iter_mut().for_each(|s| s.backends.clear());
        empty.max_connections = 0;
        let shared = Arc::new(Shared {
            backends: RwLock::new(Vec::new()),
            services: listeners.iter().map(|(s, _)| s.clone()).collect(),
            limit: Arc::new(Semaphore::new(0)),
            limit_debt: AtomicUsize::new(0),
            stats: Stats::default(),
            settings: RwLock::new(Settings {
                connect_timeout: config.connect_timeout,
                idle_timeout: config.idle_timeout,
                fall: config.health.fall,
                zero_copy: config.zero_copy,
            }),
            closing_all: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            admin_token: RwLock::new(None),
            admin_timeout: config.admin.request_timeout,
            config: Mutex::new(empty),
            health_tasks: Mutex::new(Vec::new()),
            state_changed: Arc::new(Notify::new()),
        });
        // Saved states first, so a backend drained for maintenance never
        // takes a connection because sluice restarted.
        {
            let mut list = shared.backends.write().expect("backends lock");
            for bc in &config.backends {
                let state = saved.get(&bc.name).copied().unwrap_or(State::Active);
                let b = shared.new_backend(bc, State::Active);
                b.restore(state);
                if state != State::Active {
                    info!(backend = %bc.name, state = b.state().as_str(), "admin state restored from the state file");
                }
                list.push(b);
            }
        }
        let state_file = config.state_file.clone();
        let grace = config.shutdown_grace;
        let layout = config.runtime;
        shared
            .reload(config)
            .map_err(|m| Error::Io(std::io::Error::other(m)))?;
        Ok(Sluice {
            shared,
            listeners,
            layout,
            admin,
            grace,
            state_file,
            config_path: None,
        })
    }

    /// Reloads the configuration from `path` on SIGHUP.
    pub fn reload_from(mut self, path: PathBuf) -> Sluice {
        self.config_path = Some(path);
        self
    }

    /// The bound address of a service, by name.
    pub fn service_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .services
            .iter()
            .find(|s| &*s.name == name)
            .map(|s| s.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound admin listener has an address")
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets live
    /// connections finish within the grace period and closes the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let shared = self.shared;
        let background = CancellationToken::new();
        if let Some(path) = self.state_file.clone() {
            if let Err(e) = shared.save_states(&path) {
                return Err(Error::StateFile {
                    path,
                    message: format!("cannot write it: {e}"),
                });
            }
            tokio::spawn(keep_state_file(shared.clone(), path, background.clone()));
        }
        if let Some(path) = self.config_path.clone() {
            // Installed before anything is announced, so a SIGHUP sent right
            // after start-up reloads instead of killing the process.
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(hup) => {
                    tokio::spawn(reload_on_sighup(
                        shared.clone(),
                        path,
                        hup,
                        background.clone(),
                    ));
                }
                Err(e) => warn!(error = %e, "cannot listen for SIGHUP: reload is off"),
            }
        }
        let stop_accepting = CancellationToken::new();
        let conns = TaskTracker::new();
        let mut loops = Vec::new();
        // Per worker, its listener of each service.
        let mut per_worker: Vec<Vec<(Arc<Service>, std::net::TcpListener)>> = Vec::new();
        for (service, set) in self.listeners {
            info!(service = %service.name, listen = %service.listen, workers = set.len(), layout = ?self.layout, "service listening");
            for (k, l) in set.into_iter().enumerate() {
                if per_worker.len() <= k {
                    per_worker.push(Vec::new());
                }
                per_worker[k].push((service.clone(), l));
            }
        }
        let mut workers = per_worker.into_iter();
        for (service, l) in workers.next().unwrap_or_default() {
            let listener = TcpListener::from_std(l).map_err(Error::Io)?;
            loops.push(tokio::spawn(crate::proxy::accept_loop(
                listener,
                service,
                shared.clone(),
                stop_accepting.clone(),
                conns.clone(),
            )));
        }
        // Every further worker: a thread with its own single-threaded
        // runtime, serving the connections its listeners accept.
        let mut threads = Vec::new();
        // Each worker says when its accept loops have ended, so that no
        // client is accepted after the tracker closes.
        let (loops_done, mut all_loops_done) = tokio::sync::mpsc::unbounded_channel::<()>();
        for (k, set) in workers.enumerate() {
            let (shared, stop, conns) = (shared.clone(), stop_accepting.clone(), conns.clone());
            let loops_done = loops_done.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::Io)?;
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{}", k + 1))
                .spawn(move || {
                    rt.block_on(async move {
                        let mut loops = Vec::new();
                        for (service, l) in set {
                            match TcpListener::from_std(l) {
                                Ok(listener) => {
                                    loops.push(tokio::spawn(crate::proxy::accept_loop(
                                        listener,
                                        service,
                                        shared.clone(),
                                        stop.clone(),
                                        conns.clone(),
                                    )))
                                }
                                Err(e) => error!(error = %e, "worker cannot use its listener"),
                            }
                        }
                        for l in loops {
                            let _ = l.await;
                        }
                        let _ = loops_done.send(());
                        // Its connections run on this runtime: drive them to the end.
                        conns.wait().await;
                    });
                })
                .map_err(Error::Io)?;
            threads.push(thread);
        }
        let admin_stop = CancellationToken::new();
        info!(listen = %self.admin.local_addr().map_err(Error::Io)?, "admin API listening");
        let admin = tokio::spawn(crate::admin::serve(
            self.admin,
            shared.clone(),
            admin_stop.clone(),
        ));

        shutdown.await;
        shared.shutting_down.store(true, Ordering::SeqCst);
        stop_accepting.cancel();
        for l in loops {
            let _ = l.await;
        }
        drop(loops_done);
        for _ in 0..threads.len() {
            // None: every worker is gone, which is as good as done.
            if all_loops_done.recv().await.is_none() {
                break;
            }
        }
        conns.close();
        let live = conns.len();
        info!(live, grace = %crate::config::format_duration(self.grace), "shutting down: no new connections; waiting for live ones");
        if tokio::time::timeout(self.grace, conns.wait())
            .await
            .is_err()
        {
            info!(
                live = conns.len(),
                "grace period over: closing remaining connections"
            );
            shared.closing_all.store(true, Ordering::SeqCst);
            for b in shared.backends() {
                b.close_all();
            }
            conns.wait().await;
        }
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        admin_stop.cancel();
        let _ = admin.await;
        background.cancel();
        for t in shared.health_tasks.lock().expect("health lock").drain(..) {
            t.cancel();
        }
        if let Some(path) = &self.state_file
            && let Err(e) = shared.save_states(path)
        {
            error!(path = %path.display(), error = %e, "cannot write the state file");
        }
        info!("stopped");
        Ok(())
    }
}

/// Rewrites the state file after every admin transition.
async fn keep_state_file(shared: Arc<Shared>, path: PathBuf, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.state_changed.notified() => {}
        }
        if let Err(e) = shared.save_states(&path) {
            error!(path = %path.display(), error = %e, "cannot write the state file");
        }
    }
}

/// Reloads the configuration file on every SIGHUP; a bad file is refused
/// and the running configuration stays.
async fn reload_on_sighup(
    shared: Arc<Shared>,
    path: PathBuf,
    mut hup: tokio::signal::unix::Signal,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hup.recv() => {}
        }
        info!(path = %path.display(), "SIGHUP: reloading the configuration");
        match Config::load(&path) {
            Ok(c) => match shared.reload(c) {
                Ok(()) => info!("configuration reloaded"),
                Err(e) => error!("reload refused, the running configuration stays: {e}"),
            },
            Err(e) => error!("reload refused, the running configuration stays: {e}"),
        }
    }
}
