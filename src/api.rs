//! The admin API's wire types: what the server sends and `sluice ctl`
//! reads. Plain data, so the client needs nothing of the server.

use serde::{Deserialize, Serialize};

use std::sync::atomic::Ordering;

use crate::backend::{ConnInfo, State};

/// One backend as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct BackendView {
    pub name: String,
    pub address: String,
    pub state: State,
    pub healthy: bool,
    /// Whether active health checks run for this backend.
    pub health_checked: bool,
    pub weight: u32,
    /// While it slow-starts: the weight it takes now, rising to `weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_weight: Option<f64>,
    /// How long its weight ramps up after it comes back, as in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<String>,
    /// The most live connections it takes; absent for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Takes clients only when no primary of its service can.
    #[serde(default)]
    pub backup: bool,
    /// The PROXY protocol header it is sent ahead of each client's
    /// stream and each health check: `v1` or `v2`; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_proxy: Option<crate::config::ProxyVersion>,
    pub active_connections: usize,
    /// Live connections that moved no byte in the last 10 s.
    pub idle_connections: usize,
    pub total_connections: u64,
    pub connect_failures: u64,
    /// Bytes from clients to the backend.
    pub bytes_in: u64,
    /// Bytes from the backend to clients.
    pub bytes_out: u64,
    /// Bytes, either way, moved by splice(2) without a copy.
    #[serde(default)]
    pub bytes_spliced: u64,
    /// Unix time (ms) of the last admin state change.
    pub state_since_ms: u64,
    /// Unix time (ms) of the last health change.
    pub health_since_ms: u64,
    /// Unix time (ms) at which the last passing health check began.
    pub last_ok_check_ms: u64,
    /// The services that send clients to this backend.
    #[serde(default)]
    pub services: Vec<String>,
    /// While it is down: why (such as the last health check's error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_reason: Option<String>,
    /// In the reply to a stop: the live connections it closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<usize>,
    /// In cluster mode: each live instance's count and state, this
    /// instance first; `active_connections` is their sum.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceCount>,
    /// Whether its admin state is saved in the state file (after a change:
    /// whether that change was saved); absent without a state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<bool>,
}

/// One service as the API shows it: where it listens and how it chooses
/// among its backends.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct ServiceView {
    pub name: String,
    pub listen: String,
    /// `round-robin`, `least-connections` or `source-hash`.
    pub balance: String,
    /// With `source-hash`: `client-ip` or `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// Its backends, primaries and backups, in the file's order.
    pub backends: Vec<String>,
    /// Those of its backends that are backups.
    #[serde(default)]
    pub backups: Vec<String>,
    /// With `accept_proxy`: the time a client has to send its PROXY
    /// header (`proxy_header_timeout`); absent when the service takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_proxy: Option<String>,
    /// Clients refused since start, by reason (`limit`, `no_backend`,
    /// `resources`, `backend_full`, `proxy_header`).
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
}

/// One live connection as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct ConnView {
    pub id: u64,
    pub client: String,
    pub service: String,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The sluice process that holds it: after an upgrade, the old one
    /// until its connections have ended.
    #[serde(default)]
    pub pid: u32,
}

/// What identifies a connection across processes: the pid of the sluice
/// that holds it and its id there. Ids are unique within a process, and
/// processes alive at the same time never share a pid, so the pair stays
/// unique over a chain of upgrades, each relaying the one before it.
pub type ConnKey = (u32, u64);

impl ConnView {
    /// Its identity ([`ConnKey`]).
    pub fn key(&self) -> ConnKey {
        (self.pid, self.id)
    }

    pub fn of(c: &ConnInfo, pid: u32) -> ConnView {
        ConnView {
            id: c.id,
            client: c.client.to_string(),
            service: c.service.to_string(),
            age_ms: c.started.elapsed().as_millis() as u64,
            idle_ms: c.idle().as_millis() as u64,
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            pid,
        }
    }
}

/// `POST /upgrade`: the hand-over, as the old process saw it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct UpgradeView {
    pub old_pid: u32,
    pub old_version: String,
    pub new_pid: u32,
    pub new_version: String,
    /// Connections still on the old process, which now lets them finish.
    pub connections_left: usize,
}

/// In `/healthz`: the process this one took over from.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct PreviousView {
    pub pid: u32,
    pub version: String,
    /// Connections it still holds.
    pub connections: usize,
    /// Unix time (ms) at which it exited, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_ms: Option<u64>,
}

/// `GET /stats`: what became of the clients, and the live total. Once a
/// client's connect phase is over it is in exactly one of `established`,
/// `rejected_limit`, `rejected_proxy_header`, `rejected_no_backend`,
/// `rejected_backend_full`,
/// `rejected_resources` and `abandoned`.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct StatsView {
    pub abandoned: u64,
    pub accept_errors: u64,
    pub accepted: u64,
    pub active_connections: usize,
    /// Admin connections closed at once over `[admin] max_connections`.
    pub admin_rejected: u64,
    /// Admin requests refused for a missing or wrong token.
    pub admin_unauthorized: u64,
    pub established: u64,
    pub rejected_limit: u64,
    /// Clients of an `accept_proxy` service whose PROXY header was
    /// malformed, cut short or too slow.
    #[serde(default)]
    pub rejected_proxy_header: u64,
    pub rejected_no_backend: u64,
    /// Refused because every backend that takes connections was at its
    /// `max_connections`.
    #[serde(default)]
    pub rejected_backend_full: u64,
    pub rejected_resources: u64,
    /// Writes of the state file that failed.
    #[serde(default)]
    pub state_file_failures: u64,
    /// sluice's own shortages of file descriptors or buffers (accept and
    /// connect), never counted against a backend.
    pub resource_shortages: u64,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct HealthzView {
    /// `ok`; `degraded` while serving with `problems`; `leaving` after
    /// `POST /leave`; `shutting down`.
    pub status: String,
    /// What keeps sluice from being as configured, such as a state file
    /// it cannot write; it still serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The server's clock in Unix milliseconds, so that clients on other
    /// hosts compare check times without trusting their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    /// The process answering, its version and when it started (Unix ms).
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub version: String,
    /// The commit it was built from, as `sluice --version` names it.
    #[serde(default)]
    pub commit: String,
    #[serde(default)]
    pub started_ms: u64,
    /// The process this one took over from, by an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousView>,
    /// Live connections over every backend (the previous process's too).
    #[serde(default)]
    pub active_connections: usize,
    /// Unix time (ms) at which this instance began leaving its pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving_since_ms: Option<u64>,
    /// While leaving: whether it has left (no connection open, and no new
    /// client for a few seconds, so the address has moved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<bool>,
    /// In cluster mode: the cluster and whether etcd answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// One instance's share of a backend, in cluster mode.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct InstanceCount {
    pub instance: String,
    /// The admin state that instance applies.
    pub state: State,
    pub active_connections: usize,
}

/// The cluster this instance belongs to, as `/healthz` shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct ClusterView {
    pub name: String,
    /// This instance's name.
    pub instance: String,
    /// Whether etcd answers; without it, the last known state applies and
    /// admin changes are refused.
    pub connected: bool,
    /// The instances alive (their lease held), this one first.
    pub instances: Vec<String>,
}

/// What each instance publishes in etcd, under its lease.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Default)]
pub struct InstanceReport {
    pub pid: u32,
    pub version: String,
    /// By backend name.
    pub backends: std::collections::BTreeMap<String, BackendReport>,
}

/// One backend on one instance.
#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq)]
pub struct BackendReport {
    pub state: State,
    /// Its live connections there (a previous process's included).
    pub live: usize,
    /// The etcd revision of the backend's admin state it has applied.
    pub rev: i64,
}

/// The answer to `POST /leave` and `POST /join`.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct LeaveView {
    /// Whether this instance is leaving its pair.
    pub leaving: bool,
    /// Unix time (ms) at which it began leaving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Live connections still open through this instance.
    pub active_connections: usize,
    /// Whether it has left: leaving, no connection open, and no new client
    /// for a few seconds (so the floating address has moved).
    pub left: bool,
}

/// The answer to `POST /reload`: the configuration file read again and
/// applied whole, or refused whole with why.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct ReloadView {
    /// `applied`, or `refused` (the running configuration stays).
    pub result: String,
    /// The file read: the one the process was started with.
    pub file: String,
    /// Backends the reload added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
    /// Backends the reload removed, which now drain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// Why it was refused, as `file:line: field: message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the file is wrong, when it does not load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Fields it changes that only a restart can apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs_restart: Vec<RestartView>,
}

/// A field whose change needs a restart, with its value in force and its
/// value in the file.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct RestartView {
    pub field: String,
    pub from: String,
    pub to: String,
}

/// Every error reply: `{"error": "..."}`.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct ErrorView {
    pub error: String,
}
