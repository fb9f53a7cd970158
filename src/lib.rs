//! sluice: a layer-4 (TCP) load balancer whose backends drain, stop and
//! start over HTTP, so web servers can be updated one at a time without a
//! client noticing.
//!
//! Modules from the bottom up; each uses only those above it in this list:
//! - [`config`]: the TOML file, parsed then validated.
//! - [`shutdown`]: the signals that end the process, and the tracked set
//!   of background tasks.
//! - [`reuse`]: a capped pool of things kept for reuse, trimmed when idle.
//! - [`limits`]: the file descriptor limit, raised at start, and what it
//!   allows.
//! - [`net`]: sockets: targets, listeners, options, connect with a timeout.
//! - [`proxy_header`]: the PROXY protocol header, written for backends
//!   and read from a balancer in front.
//! - [`health`]: the health value (rise and fall) and the active checks.
//! - [`events`]: the event bus: what happened, kept for a while and
//!   offered to every listener without waiting for any.
//! - [`backend`]: a backend's state machine, live-connection guard and
//!   drain policy.
//! - [`pool`]: a service's backends and how one is chosen (round-robin,
//!   least-connections, source-hash), backups last, in fallback order.
//! - [`state`]: the shared state below both planes, the runtime settings
//!   swapped whole, reload, the limit, the state file.
//! - [`splice`]: moving bytes both ways with half-close.
//! - [`proxy`]: the hot path: accept, pick, connect, splice, account.
//! - [`api`]: the admin API's wire types, shared with `ctl`.
//! - [`handover`]: the wire between a running sluice and the process that
//!   replaces it: listening sockets and admin state, then messages.
//! - [`upgrade`]: updating sluice itself: hand the sockets to a new
//!   process, which counts this one's connections until it has gone.
//! - [`metrics`]: `GET /metrics`: the counters of `state` and of the
//!   process as Prometheus text, read at scrape time.
//! - [`admin`]: the HTTP admin API: routing, then the operation.
//! - [`server`]: the process lifecycle: bind, workers, SIGHUP, state file
//!   writer, graceful shutdown.
//! - [`ctl`]: `sluice ctl`, the admin client, and `rollout`.
//! - [`demo`]: built-in web servers for `sluice demo`.

pub mod admin;
pub mod api;
pub mod backend;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod events;
pub mod handover;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod proxy;
pub mod proxy_header;
pub mod reuse;
pub mod server;
pub mod shutdown;
pub mod splice;
pub mod state;
pub mod upgrade;

use std::future::Future;

pub use config::{Config, ConfigError};
pub use server::{Error, Sluice};

/// Binds everything `config` names and serves until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Sluice::bind(config).await?.run(shutdown).await
}
