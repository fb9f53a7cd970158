//! sluice: a layer-4 (TCP) load balancer whose backends drain, stop and
//! start over HTTP, so web servers can be updated one at a time without a
//! client noticing.
//!
//! Modules in reading order:
//! - [`config`]: the TOML file, parsed then validated.
//! - [`server`]: the running balancer: shared state, bind, graceful shutdown.
//! - [`proxy`]: the hot path: accept, pick, connect, splice, account.
//! - [`splice`]: moving bytes both ways with half-close.
//! - [`pool`]: round-robin selection in fallback order.
//! - [`backend`]: a backend's state machine and live-connection guard.
//! - [`health`]: active health checks.
//! - [`api`]: the admin API's wire types, shared with `ctl`.
//! - [`admin`]: the HTTP admin API.
//! - [`ctl`]: `sluice ctl`, the admin client, and `rollout`.
//! - [`shutdown`]: the signals that end the process.
//! - [`demo`]: built-in web servers for `sluice demo`.

pub mod admin;
pub mod api;
pub mod backend;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod health;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod splice;

use std::future::Future;
use std::net::SocketAddr;

pub use config::{Config, ConfigError};
pub use server::Sluice;

/// What can stop sluice from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("state file {}: {message}", path.display())]
    StateFile {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Io(std::io::Error),
}

/// Binds everything `config` names and serves until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Sluice::bind(config).await?.run(shutdown).await
}
