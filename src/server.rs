//! The process lifecycle: bind every socket, run the workers, reload on
//! SIGHUP, keep the state file, and shut down gracefully. The state the
//! balancer runs on lives below, in `state`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, RuntimeLayout, format_duration};
use crate::handover::SocketKind;
use crate::state::{Service, Shared};
use crate::upgrade::{TakeOver, Upgrader};

/// What can stop sluice from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    // The cause is in the message and deliberately not a `source`: the
    // error chain would print it a second time.
    #[error("cannot listen on {addr} for the {what}: {error}")]
    Bind {
        what: String,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("state file {}: {message}", path.display())]
    StateFile { path: PathBuf, message: String },
    #[error("admin socket {}: {message}", path.display())]
    AdminSocket { path: PathBuf, message: String },
    #[error("pid file {}: {error}", path.display())]
    PidFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot take over from the running sluice: {0}")]
    TakeOver(String),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error(transparent)]
    Io(std::io::Error),
}

/// A bound, not yet running sluice.
pub struct Sluice {
    shared: Arc<Shared>,
    /// Per service, one listener per worker (one in all for multi-thread).
    listeners: Vec<(Arc<Service>, Vec<std::net::TcpListener>)>,
    admin: TcpListener,
    /// The admin API's unix socket, when configured.
    admin_socket: Option<tokio::net::UnixListener>,
    config_path: Option<PathBuf>,
    /// Where this process writes its pid once it serves (`--pidfile`).
    pidfile: Option<PathBuf>,
    /// Resolves when the rest must close at once (a second signal).
    hurry: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Set when this process takes over from a running one.
    takeover: Option<TakeOver>,
}

impl Sluice {
    /// Restores saved admin states, binds every listening socket and
    /// builds the shared state, so that start-up errors surface before
    /// serving.
    pub async fn bind(config: Config) -> Result<Sluice, Error> {
        fd_budget(&config);
        let mut saved = match &config.state_file {
            Some(path) => {
                crate::state::load_state_file(path).map_err(|message| Error::StateFile {
                    path: path.clone(),
                    message,
                })?
            }
            None => crate::state::Saved::default(),
        };
        if let Some(c) = &config.cluster {
            // The cluster's states, not a file that may be stale; the
            // file only when etcd does not answer, as the last known.
            match crate::cluster::agreed_states(c).await {
                Ok(states) => {
                    info!(cluster = %c.name, instance = %c.instance, "admin states read from the cluster");
                    saved.backends = states;
                }
                Err(e) => warn!(
                    cluster = %c.name,
                    "etcd ({}) does not answer ({e}): starting from the state file's admin states, which may be stale, until it does",
                    c.etcd.join(", ")
                ),
            }
        }
        let per_core = config.runtime == RuntimeLayout::PerCore && config.workers > 1;
        let count = if per_core { config.workers } else { 1 };
        let mut sets = Vec::new();
        let mut bound = Vec::new();
        for s in &config.services {
            let bind_err = |e| Error::Bind {
                what: format!("service `{}`", s.name),
                addr: s.listen,
                error: e,
            };
            let first = crate::net::listen(s.listen, per_core).map_err(bind_err)?;
            // Port 0 picks a port once; the other workers share it.
            let addr = first.local_addr().map_err(Error::Io)?;
            let mut set = vec![first];
            for _ in 1..count {
                set.push(crate::net::listen(addr, true).map_err(bind_err)?);
            }
            sets.push(set);
            bound.push(addr);
        }
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|e| Error::Bind {
                what: "admin API".into(),
                addr: config.admin.listen,
                error: e,
            })?;
        let admin_socket = config
            .admin
            .socket
            .as_ref()
            .map(bind_admin_socket)
            .transpose()?;
        let shared = Shared::new(config, &bound, &saved);
        Ok(Sluice::assemble(shared, sets, admin, admin_socket))
    }

    /// Takes over from the running sluice that started this process with
    /// the hand-over socket `fd`: its listening sockets instead of new
    /// ones, and its admin states and health instead of the state file.
    /// Whatever does not fit is told to the old process, which goes on.
    pub async fn take_over(config: Config, fd: std::os::fd::RawFd) -> Result<Sluice, Error> {
        fd_budget(&config);
        let takeover = tokio::task::spawn_blocking(move || TakeOver::receive(fd))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
            .map_err(|e| Error::TakeOver(format!("cannot receive the hand-over: {e}")))?;
        match Self::from_offer(config, &takeover) {
            Ok(mut sluice) => {
                sluice.takeover = Some(takeover);
                Ok(sluice)
            }
            Err(why) => {
                takeover.fail(&why);
                Err(Error::TakeOver(why))
            }
        }
    }

    fn from_offer(config: Config, takeover: &TakeOver) -> Result<Sluice, String> {
        let mut sets = Vec::new();
        let mut bound = Vec::new();
        // Every handed socket is used: dropping one would reset the
        // clients in its accept queue.
        let handed = |name: &str| -> Result<Vec<std::net::TcpListener>, String> {
            let mut own: Vec<_> = takeover
                .sockets
                .iter()
                .filter_map(|(kind, fd)| match kind {
                    SocketKind::Service { name: n, worker } if n == name => Some((*worker, fd)),
                    _ => None,
                })
                .collect();
            own.sort_by_key(|(w, _)| *w);
            own.into_iter()
                .map(|(_, fd)| {
                    fd.try_clone()
                        .map(std::net::TcpListener::from)
                        .map_err(|e| format!("cannot keep a handed socket: {e}"))
                })
                .collect()
        };
        for s in &config.services {
            let set = handed(&s.name)?;
            let Some(first) = set.first() else {
                return Err(format!(
                    "service `{}` was not handed over: adding or renaming a service needs a restart",
                    s.name
                ));
            };
            let addr = first.local_addr().map_err(|e| e.to_string())?;
            if s.listen.port() != 0 && addr != s.listen {
                return Err(format!(
                    "service `{}` moved from {addr} to {}: that needs a restart",
                    s.name, s.listen
                ));
            }
            for l in &set {
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
            }
            sets.push(set);
            bound.push(addr);
        }
        let handed_services = takeover
            .offer
            .sockets
            .iter()
            .filter_map(|k| match k {
                SocketKind::Service { name, .. } => Some(name),
                _ => None,
            })
            .find(|n| !config.services.iter().any(|s| &s.name == *n));
        if let Some(name) = handed_services {
            return Err(format!(
                "service `{name}` is gone from the file: removing a service needs a restart"
            ));
        }
        let admin = takeover
            .sockets
            .iter()
            .find(|(k, _)| *k == SocketKind::Admin)
            .ok_or("the admin API's socket was not handed over")?
            .1
            .try_clone()
            .map(std::net::TcpListener::from)
            .map_err(|e| format!("cannot keep the admin socket: {e}"))?;
        let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
        if config.admin.listen.port() != 0 && admin_addr != config.admin.listen {
            return Err(format!(
                "[admin] listen moved from {admin_addr} to {}: that needs a restart",
                config.admin.listen
            ));
        }
        admin.set_nonblocking(true).map_err(|e| e.to_string())?;
        let admin = TcpListener::from_std(admin).map_err(|e| e.to_string())?;
        let handed_socket = takeover
            .sockets
            .iter()
            .find(|(k, _)| *k == SocketKind::AdminSocket)
            .map(|(_, fd)| fd.try_clone())
            .transpose()
            .map_err(|e| format!("cannot keep the admin unix socket: {e}"))?;
        let admin_socket = match (&config.admin.socket, handed_socket) {
            (Some(s), Some(fd)) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                let at = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()));
                if at.as_deref() != Some(s.path.as_path()) {
                    return Err(format!(
                        "[admin] socket moved to {}: that needs a restart",
                        s.path.display()
                    ));
                }
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Some(tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())?)
            }
            (Some(s), None) => Some(bind_admin_socket(s).map_err(|e| e.to_string())?),
            (None, _) => None,
        };
        let offer = &takeover.offer;
        let saved = crate::state::Saved {
            backends: offer.states.clone(),
            leaving: offer.leaving,
        };
        let shared = Shared::new(config, &bound, &saved);
        for b in shared.backends().iter() {
            if let Some(&state) = offer.states.get(&b.name) {
                let reported = b.state() == crate::backend::State::Draining;
                b.take_over(state, offer.health.get(&b.name).copied().unwrap_or(true));
                if !reported {
                    b.report_drain(&shared.tasks);
                }
            }
            // Until the old process's first report, it holds a connection
            // to every backend: no drain here, and none on another
            // instance of a cluster this process reports to, may end
            // before that is known.
            b.set_elsewhere(1);
        }
        Ok(Sluice::assemble(shared, sets, admin, admin_socket))
    }

    /// A sluice of `shared` with its listeners, per service in the
    /// config's order.
    fn assemble(
        shared: Arc<Shared>,
        sets: Vec<Vec<std::net::TcpListener>>,
        admin: TcpListener,
        admin_socket: Option<tokio::net::UnixListener>,
    ) -> Sluice {
        let listeners = shared.services.iter().cloned().zip(sets).collect();
        Sluice {
            shared,
            listeners,
            admin,
            admin_socket,
            config_path: None,
            pidfile: None,
            hurry: None,
            takeover: None,
        }
    }

    /// Reloads the configuration from `path` on SIGHUP.
    pub fn reload_from(mut self, path: PathBuf) -> Sluice {
        self.config_path = Some(path);
        self
    }

    /// Writes this process's pid to `path` once it serves, and removes the
    /// file at exit unless a new process (an upgrade) has rewritten it.
    pub fn pidfile(mut self, path: PathBuf) -> Sluice {
        self.pidfile = Some(path);
        self
    }

    /// Once shutdown has begun, `now` resolving (a second SIGTERM or
    /// SIGINT) ends the grace period: what is left is closed at once.
    pub fn hurry_on(mut self, now: impl Future<Output = ()> + Send + 'static) -> Sluice {
        self.hurry = Some(Box::pin(now));
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
        let Sluice {
            shared,
            listeners,
            admin,
            admin_socket,
            config_path,
            pidfile,
            hurry,
            takeover,
        } = self;
        // A token, since both the grace period and the wait for a previous
        // process end on it.
        let now = CancellationToken::new();
        let hurried = hurry.map(|h| {
            let now = now.clone();
            tokio::spawn(async move {
                h.await;
                now.cancel();
            })
        });
        let upgrader = Arc::new(
            Upgrader::new(
                shared.clone(),
                config_path.clone(),
                pidfile.clone(),
                handover_sockets(&listeners, &admin, admin_socket.as_ref()),
            )
            .map_err(Error::Io)?,
        );
        let state_file = shared.runtime().config.state_file.clone();
        if let Some(path) = state_file {
            // At start a file that cannot be written is an error: nothing
            // has been changed yet that refusing to start would lose.
            if shared.save_states() == Some(false) {
                let message = shared.problems().join("; ");
                return Err(Error::StateFile { path, message });
            }
            shared.tasks.spawn(keep_state_file(shared.clone()));
        }
        if let Some(path) = config_path.clone() {
            // Installed before anything is announced, so a SIGHUP sent right
            // after start-up reloads instead of killing the process.
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(hup) => {
                    shared
                        .tasks
                        .spawn(reload_on_sighup(shared.clone(), path, hup));
                }
                Err(e) => warn!(error = %e, "cannot listen for SIGHUP: reload is off"),
            }
        }
        shared.tasks.spawn(trim_pools());
        shared.tasks.spawn(idle_timeouts(shared.clone()));
        shared.tasks.spawn(flush_refusals(shared.clone()));
        // Before any client: the other instances count this one, and it
        // has the states they agreed on.
        let cluster = crate::cluster::Cluster::start(&shared)
            .await
            .map_err(Error::Cluster)?;
        // Before the first client and READY, so that a supervisor told so
        // finds the file, and a failure to write it stops the start
        // cleanly; an upgrade's new process rewrites it before the old one
        // stops accepting.
        if let Some(path) = &pidfile {
            write_pidfile(path).map_err(|e| Error::PidFile {
                path: path.clone(),
                error: e,
            })?;
        }
        // Accepting ends the moment a new process has taken over.
        let workers = Workers::start(&shared, listeners, upgrader.handed_over.child_token())?;
        let admin_stop = CancellationToken::new();
        info!(listen = %admin.local_addr().map_err(Error::Io)?, "admin API listening");
        let plane = Arc::new(crate::admin::Plane {
            shared: shared.clone(),
            upgrader: Some(upgrader.clone()),
            cluster: cluster.clone(),
            config_path,
        });
        // Its own token: after a hand-over the admin API stops accepting at
        // once (the new process answers), while its requests finish.
        let admin_accepting = upgrader.handed_over.child_token();
        let admin = tokio::spawn(crate::admin::serve(
            admin,
            plane.clone(),
            admin_accepting.clone(),
            admin_stop.clone(),
        ));
        let admin_socket = admin_socket.map(|l| {
            if let Some(s) = &shared.runtime().config.admin.socket {
                info!(socket = %s.path.display(), "admin API listening on its unix socket");
            }
            tokio::spawn(crate::admin::serve_unix(
                l,
                plane.clone(),
                admin_accepting.clone(),
                admin_stop.clone(),
            ))
        });

        if let Some(takeover) = takeover {
            takeover.ready(shared.clone()).map_err(Error::Io)?;
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::MainPid(std::process::id()),
                sd_notify::NotifyState::Ready,
            ]);
        } else {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }

        let handed_over = tokio::select! {
            _ = shutdown => false,
            _ = upgrader.handed_over.cancelled() => true,
        };
        // Its copies would keep the sockets listening after the loops stop.
        upgrader.release();
        shared.events.publish(crate::events::Kind::Shutdown {
            reason: if handed_over { "upgrade" } else { "stop" }.into(),
        });
        if handed_over {
            // The new process owns the state file and the socket file now,
            // and answers the admin API.
            shared.stop_saving();
            admin_accepting.cancel();
            // Its listeners reconnect, and reach the new process.
            shared.events.close();
        }
        shared.shutting_down.store(true, Ordering::SeqCst);
        let mut workers = workers;
        workers.stop_accepting().await;
        finish_connections(&shared, &workers.conns, &now).await;
        // A process that took over from another relays that one's count to
        // its own successor: it stays until the one before it has gone,
        // unless told to stop now.
        tokio::select! {
            _ = shared.previous_gone() => {}
            _ = now.cancelled() => {}
        }
        workers.join().await;
        admin_accepting.cancel();
        // The event streams end as the admin API stops answering.
        shared.events.close();
        admin_stop.cancel();
        let _ = admin.await;
        if let Some(task) = admin_socket {
            let _ = task.await;
            // An upgrade that finished while this process shut down counts.
            if let Some(s) = &shared.runtime().config.admin.socket
                && !handed_over
                && !upgrader.handed_over.is_cancelled()
            {
                let _ = std::fs::remove_file(&s.path);
            }
        }
        shared.tasks.shutdown().await;
        if let Some(c) = &cluster {
            c.stop().await;
        }
        shared.save_states();
        shared.finish_saving();
        if let Some(path) = &pidfile {
            remove_pidfile(path);
        }
        if let Some(h) = hurried {
            h.abort();
        }
        info!("stopped");
        Ok(())
    }
}

/// Writes this process's pid to `path` atomically (a reader never sees a
/// half-written file): written beside it, then renamed over it.
fn write_pidfile(path: &std::path::Path) -> std::io::Result<()> {
    let pid = std::process::id();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{pid}.tmp"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    info!(pidfile = %path.display(), pid, "pid file written");
    Ok(())
}

/// Removes the pid file if it still names this process: after an upgrade
/// it names the new one, which keeps it.
fn remove_pidfile(path: &std::path::Path) {
    let ours =
        std::fs::read_to_string(path).is_ok_and(|t| t.trim() == std::process::id().to_string());
    if ours && let Err(e) = std::fs::remove_file(path) {
        warn!(pidfile = %path.display(), error = %e, "cannot remove the pid file");
    }
}

/// Every listening socket, as a hand-over offers them.
fn handover_sockets(
    listeners: &[(Arc<Service>, Vec<std::net::TcpListener>)],
    admin: &TcpListener,
    admin_socket: Option<&tokio::net::UnixListener>,
) -> Vec<(SocketKind, std::os::fd::RawFd)> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    for (service, set) in listeners {
        for (worker, l) in set.iter().enumerate() {
            let kind = SocketKind::Service {
                name: service.name.to_string(),
                worker,
            };
            out.push((kind, l.as_raw_fd()));
        }
    }
    out.push((SocketKind::Admin, admin.as_raw_fd()));
    if let Some(s) = admin_socket {
        out.push((SocketKind::AdminSocket, s.as_raw_fd()));
    }
    out
}

/// The accept loops and the connections they start: the first worker's on
/// the calling runtime, every further worker's (per-core layout) on a
/// thread with its own single-threaded runtime.
struct Workers {
    stop: CancellationToken,
    conns: TaskTracker,
    /// The first worker's accept loops.
    loops: Vec<tokio::task::JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Each further worker says when its accept loops have ended, so that
    /// no client is accepted after the tracker closes.
    loops_done: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Workers {
    fn start(
        shared: &Arc<Shared>,
        listeners: Vec<(Arc<Service>, Vec<std::net::TcpListener>)>,
        stop: CancellationToken,
    ) -> Result<Workers, Error> {
        let layout = shared.runtime().config.runtime;
        let conns = TaskTracker::new();
        // Per worker, its listener of each service.
        let mut per_worker: Vec<Vec<(Arc<Service>, std::net::TcpListener)>> = Vec::new();
        for (service, set) in listeners {
            // The threads that serve, not the listeners: multi-thread has
            // one listener for all of its threads.
            let threads = shared.runtime().config.workers;
            info!(service = %service.name, listen = %service.listen, threads, listeners = set.len(), layout = ?layout, "service listening");
            for (k, l) in set.into_iter().enumerate() {
                if per_worker.len() <= k {
                    per_worker.push(Vec::new());
                }
                per_worker[k].push((service.clone(), l));
            }
        }
        let mut per_worker = per_worker.into_iter();
        let mut loops = Vec::new();
        for (service, l) in per_worker.next().unwrap_or_default() {
            let listener = TcpListener::from_std(l).map_err(Error::Io)?;
            loops.push(tokio::spawn(crate::proxy::accept_loop(
                listener,
                service,
                shared.clone(),
                stop.clone(),
                conns.clone(),
            )));
        }
        let (done, loops_done) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut threads = Vec::new();
        for (k, set) in per_worker.enumerate() {
            let (shared, stop, conns, done) =
                (shared.clone(), stop.clone(), conns.clone(), done.clone());
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
                        let _ = done.send(());
                        // Its connections run on this runtime: drive them to the end.
                        conns.wait().await;
                    });
                })
                .map_err(Error::Io)?;
            threads.push(thread);
        }
        Ok(Workers {
            stop,
            conns,
            loops,
            threads,
            loops_done,
        })
    }

    /// Ends every accept loop, and returns once none can accept again.
    async fn stop_accepting(&mut self) {
        self.stop.cancel();
        for l in self.loops.drain(..) {
            let _ = l.await;
        }
        for _ in 0..self.threads.len() {
            // None: every worker is gone, which is as good as done.
            if self.loops_done.recv().await.is_none() {
                break;
            }
        }
        self.conns.close();
    }

    /// Waits for the worker threads, once their connections are over.
    async fn join(self) {
        for t in self.threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Lets live connections finish within the grace period, then closes the
/// rest; `now` cancelled (a second signal) closes them at once. The grace
/// period is read now, so the one a reload set applies.
async fn finish_connections(shared: &Shared, conns: &TaskTracker, now: &CancellationToken) {
    let grace = shared.runtime().config.shutdown_grace;
    info!(live = conns.len(), grace = %format_duration(grace), "shutting down: no new connections; waiting for live ones (a second SIGTERM or Ctrl-C closes them now)");
    tokio::select! {
        r = tokio::time::timeout(grace, conns.wait()) => {
            if r.is_ok() {
                return;
            }
            info!(
                live = conns.len(),
                "grace period over: closing remaining connections"
            );
        }
        _ = now.cancelled() => {
            warn!(
                live = conns.len(),
                "told to stop now: closing remaining connections before the grace period ends"
            );
        }
    }
    shared.closing_all.store(true, Ordering::SeqCst);
    shared.closing.cancel();
    for b in shared.backends().iter() {
        b.close_all();
    }
    conns.wait().await;
}

/// What `sluice check` finds on this machine beyond the file itself.
#[derive(Debug, Default)]
pub struct Preflight {
    /// Things `run` would refuse.
    pub problems: Vec<String>,
    /// Things worth knowing that `run` would accept.
    pub notes: Vec<String>,
}

/// Checks what `run` needs of the machine: the state file can be read and
/// written where it is, and every listening address is free. An address
/// held by a sluice that answers on the admin address is the running one,
/// as before a reload, and only noted.
pub fn preflight(config: &Config) -> Preflight {
    let mut found = Preflight::default();
    if let Some(path) = &config.state_file {
        if let Err(message) = crate::state::load_state_file(path) {
            found
                .problems
                .push(format!("state file {}: {message}", path.display()));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let probe = dir.join(format!(".sluice-check-{}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(e) => found.problems.push(format!(
                "state file {}: cannot create files in {} ({e})",
                path.display(),
                dir.display()
            )),
        }
    }
    // Each bound as `run` binds it: a service through `net::listen`, whose
    // options (IPV6_V6ONLY off) decide what else the port clashes with.
    let mut wanted: Vec<(String, SocketAddr, bool)> = config
        .services
        .iter()
        .map(|s| (format!("service `{}`", s.name), s.listen, true))
        .collect();
    wanted.push(("admin API".into(), config.admin.listen, false));
    let mut in_use = Vec::new();
    for (what, addr, service) in wanted {
        let bound = if service {
            crate::net::listen(addr, false)
        } else {
            std::net::TcpListener::bind(addr)
        };
        match bound {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => in_use.push((what, addr)),
            Err(e) => found
                .problems
                .push(format!("cannot listen on {addr} for the {what}: {e}")),
        }
    }
    if !in_use.is_empty() {
        let list: Vec<String> = in_use.iter().map(|(w, a)| format!("{a} ({w})")).collect();
        if sluice_answers(config.admin.listen) {
            found.notes.push(format!(
                "{} in use by the sluice running with this admin address: fine for a reload, a second `run` would fail",
                list.join(", ")
            ));
        } else {
            found
                .problems
                .push(format!("already in use: {}", list.join(", ")));
        }
    }
    found
}

/// Whether a sluice answers `GET /healthz` at `admin`.
fn sluice_answers(admin: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(1);
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.take(64 * 1024).read_to_string(&mut reply);
    // Its health, or its refusal of a call without the token.
    reply.starts_with("HTTP/1.1 ")
        && (reply.contains("\"status\"") || reply.contains("WWW-Authenticate: Bearer"))
}

/// Binds the admin unix socket with its mode and group. A socket file
/// left by a sluice that died is replaced; one that answers belongs to a
/// running sluice and is an error.
fn bind_admin_socket(s: &crate::config::AdminSocket) -> Result<tokio::net::UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |message: String| Error::AdminSocket {
        path: s.path.clone(),
        message,
    };
    if s.path.exists() {
        if std::os::unix::net::UnixStream::connect(&s.path).is_ok() {
            return Err(fail(
                "another process is serving on it (a running sluice?)".into(),
            ));
        }
        std::fs::remove_file(&s.path)
            .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = tokio::net::UnixListener::bind(&s.path).map_err(|e| fail(e.to_string()))?;
    if let Some(group) = &s.group {
        let gid = group_id(group).ok_or_else(|| fail(format!("no group is named `{group}`")))?;
        std::os::unix::fs::chown(&s.path, None, Some(gid))
            .map_err(|e| fail(format!("cannot give it to group `{group}`: {e}")))?;
    }
    std::fs::set_permissions(&s.path, std::fs::Permissions::from_mode(s.mode))
        .map_err(|e| fail(format!("cannot set its mode: {e}")))?;
    Ok(listener)
}

/// The id of a group, by name.
fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut group = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and `buf` outlives the
    // one field read from the result.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            group.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    // SAFETY: a non-null `found` points at `group`, which getgrnam_r filled.
    (rc == 0 && !found.is_null()).then(|| unsafe { (*found).gr_gid })
}

/// Raises the descriptor limit, says what it allows, and caps the idle
/// pipe pool to fit it.
fn fd_budget(config: &Config) {
    match crate::limits::raise_nofile() {
        Ok(n) => {
            let budget = crate::limits::Budget::of(n.now, config.admin.max_connections);
            crate::splice::set_pipe_cap(budget.pipes);
            info!(raised_from = n.was, "{budget}");
            if config.max_connections as u64 > budget.clients {
                warn!(
                    max_connections = config.max_connections,
                    "the open-file limit allows about {} proxied clients, fewer than max_connections: raise the limit (LimitNOFILE= under systemd, ulimit -n) or lower max_connections",
                    budget.clients
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// How often buffers and pipes no connection used are freed.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Frees, every [`TRIM_EVERY`], the pooled buffers and pipes that went
/// unused for a whole interval, so a burst's leftovers do not keep memory
/// and descriptors.
async fn trim_pools() {
    let mut every = tokio::time::interval(TRIM_EVERY);
    loop {
        every.tick().await;
        let freed = crate::splice::trim_pools();
        if freed > 0 {
            tracing::debug!(freed, "idle buffers and pipes freed");
        }
    }
}

/// Closes the connections whose idle timeout ran out: one sweep over the
/// connection tables instead of a timer in every connection. It runs
/// every quarter of the timeout in force (10 ms to 5 s apart; every
/// second while none is, so a reload's soon applies), on a blocking
/// thread so that no runtime that carries connections stalls for a walk
/// over 100,000 of them, and only once some connection was given a
/// timeout. Each connection keeps the timeout it started with, so a
/// reload cuts none.
async fn idle_timeouts(shared: Arc<Shared>) {
    const MOST: std::time::Duration = std::time::Duration::from_secs(5);
    const LEAST: std::time::Duration = std::time::Duration::from_millis(10);
    const UNSET: std::time::Duration = std::time::Duration::from_secs(1);
    loop {
        let every = shared
            .conn_settings()
            .idle_timeout
            .map_or(UNSET, |l| (l / 4).clamp(LEAST, MOST));
        tokio::time::sleep(every).await;
        if !crate::backend::idle_limits_in_use() {
            continue;
        }
        let backends = shared.backends();
        let closed = tokio::task::spawn_blocking(move || {
            let now = std::time::Instant::now();
            backends
                .iter()
                .map(|b| b.close_timed_out(now))
                .sum::<usize>()
        })
        .await
        .unwrap_or(0);
        if closed > 0 {
            tracing::debug!(closed, "connections closed after the idle timeout");
        }
    }
}

/// Publishes the clients refused in the last second, per service and
/// reason, so a flood of them is one event a second, not a flood.
async fn flush_refusals(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        shared.flush_refusals();
    }
}

/// How often a state file that could not be written is tried again.
const STATE_FILE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Rewrites the state file after every admin transition, and while writes
/// fail, every [`STATE_FILE_RETRY`] until one succeeds.
async fn keep_state_file(shared: Arc<Shared>) {
    loop {
        if shared.persist.is_failing() {
            tokio::select! {
                _ = shared.state_changed.notified() => {}
                _ = tokio::time::sleep(STATE_FILE_RETRY) => {}
            }
        } else {
            shared.state_changed.notified().await;
        }
        let shared = shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.save_states()).await;
    }
}

/// Reloads the configuration file on every SIGHUP; a bad file is refused
/// and the running configuration stays.
async fn reload_on_sighup(
    shared: Arc<Shared>,
    path: PathBuf,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        info!(path = %path.display(), "SIGHUP: reloading the configuration");
        // It logs, counts and tells the outcome itself.
        let _ = shared.reload_file(&path);
    }
}
