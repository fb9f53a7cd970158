//! The running balancer: its shared state, its listeners, and its life
//! from bind to graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::Error;
use crate::backend::{Backend, State};
use crate::config::Config;
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
    pub stats: Stats,
    settings: RwLock<Settings>,
    /// Parent of every connection's token: cancelled when the shutdown
    /// grace period ends.
    pub conn_root: CancellationToken,
    /// Set once shutdown has begun.
    pub shutting_down: AtomicBool,
    pub admin_token: Option<String>,
    /// Time an admin client has to send its request.
    pub admin_timeout: Duration,
}

impl Shared {
    pub fn settings(&self) -> Settings {
        *self.settings.read().expect("settings lock")
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().expect("backends lock").clone()
    }

    pub fn backend(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends
            .read()
            .expect("backends lock")
            .iter()
            .find(|b| b.name == name)
            .cloned()
    }
}

/// A bound, not yet running sluice.
pub struct Sluice {
    shared: Arc<Shared>,
    listeners: Vec<(Arc<Service>, TcpListener)>,
    admin: TcpListener,
    grace: Duration,
}

impl Sluice {
    /// Builds the backends and services of `config` and binds every
    /// listening socket, so that start-up errors surface before serving.
    pub async fn bind(config: Config) -> Result<Sluice, Error> {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                Arc::new(Backend::new(
                    b.name.clone(),
                    b.address.clone(),
                    b.weight,
                    State::Active,
                ))
            })
            .collect();
        let by_name: HashMap<&str, &Arc<Backend>> =
            backends.iter().map(|b| (b.name.as_str(), b)).collect();

        let mut listeners = Vec::new();
        for s in &config.services {
            let members = s
                .backends
                .iter()
                .map(|n| {
                    let b = by_name[n.as_str()].clone();
                    let target = Target::new(&b.address, s.backend_port);
                    (b, target)
                })
                .collect();
            let listener = TcpListener::bind(s.listen).await.map_err(|e| Error::Bind {
                what: format!("service `{}`", s.name),
                addr: s.listen,
                source: e,
            })?;
            let service = Arc::new(Service {
                name: s.name.as_str().into(),
                listen: listener.local_addr().map_err(Error::Io)?,
                route: RwLock::new(Arc::new(Route::new(members))),
            });
            listeners.push((service, listener));
        }
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|e| Error::Bind {
                what: "admin API".into(),
                addr: config.admin.listen,
                source: e,
            })?;

        let shared = Arc::new(Shared {
            backends: RwLock::new(backends),
            services: listeners.iter().map(|(s, _)| s.clone()).collect(),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            stats: Stats::default(),
            settings: RwLock::new(Settings {
                connect_timeout: config.connect_timeout,
                idle_timeout: config.idle_timeout,
            }),
            conn_root: CancellationToken::new(),
            shutting_down: AtomicBool::new(false),
            admin_token: config.admin.token.clone(),
            admin_timeout: config.admin.request_timeout,
        });
        Ok(Sluice {
            shared,
            listeners,
            admin,
            grace: config.shutdown_grace,
        })
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
        let stop_accepting = CancellationToken::new();
        let conns = TaskTracker::new();
        let mut loops = Vec::new();
        for (service, listener) in self.listeners {
            info!(service = %service.name, listen = %service.listen, "service listening");
            loops.push(tokio::spawn(crate::proxy::accept_loop(
                listener,
                service,
                shared.clone(),
                stop_accepting.clone(),
                conns.clone(),
            )));
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
            shared.conn_root.cancel();
            conns.wait().await;
        }
        admin_stop.cancel();
        let _ = admin.await;
        info!("stopped");
        Ok(())
    }
}
