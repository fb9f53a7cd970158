//! What this instance knows of its cluster (`[cluster]`): the admin
//! state every instance agreed on in etcd, and what the others report.
//!
//! The cluster adds no second state machine: an agreed change goes
//! through the same transitions as a local call ([`Shared::apply_agreed`]),
//! and the other instances' connections count in each backend's drain
//! ([`Backend::set_peers`]), so a drain is over only when it is over on
//! every instance alive. Talking to etcd is `cluster.rs`'s job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Shared;
use crate::api::{BackendReport, ClusterView, InstanceCount, InstanceReport};
use crate::backend::{Backend, DrainPolicy, State};
use crate::config::ClusterConfig;

/// A backend's admin state as the cluster keeps it in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreed {
    /// `active`, `draining` or `stopped`; `drained` is each instance's own
    /// conclusion once the counts reach 0.
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_idle_ms: Option<u64>,
    /// The instance whose API took the change, and when (Unix ms).
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub at_ms: u64,
}

impl Agreed {
    pub fn policy(&self) -> DrainPolicy {
        DrainPolicy {
            force_after: self.force_after_ms.map(Duration::from_millis),
            close_idle: self.close_idle_ms.map(Duration::from_millis),
        }
    }
}

/// This instance's view of its cluster.
#[derive(Debug)]
pub struct ClusterState {
    pub config: ClusterConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The other instances alive, by name.
    peers: HashMap<String, InstanceReport>,
    /// Instances alive whose report this version cannot read: each counts
    /// as behind on every backend, so no drain ends on a guess.
    unreadable: HashSet<String>,
    /// By backend: the revision of the agreed state applied here.
    applied: HashMap<String, i64>,
    /// By backend: the agreed state, for a backend a reload adds.
    agreed: HashMap<String, State>,
    /// The revision up to which this instance has seen every change.
    /// Below a backend's applied revision (a write of its own applied
    /// before its watch brought what came earlier), an instance that
    /// registered meanwhile may still be unknown: the drain waits.
    seen: i64,
    /// Why etcd cannot be reached; `None` while it answers.
    problem: Option<String>,
    /// Set once etcd answered.
    connected: bool,
}

impl ClusterState {
    pub fn new(config: ClusterConfig) -> ClusterState {
        let inner = Inner {
            problem: Some(format!(
                "cluster `{}`: not yet connected to etcd ({})",
                config.name,
                config.etcd.join(", ")
            )),
            ..Inner::default()
        };
        ClusterState {
            config,
            inner: Mutex::new(inner),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("cluster lock")
    }

    /// The revision of `backend`'s agreed state applied here.
    pub fn applied(&self, backend: &str) -> i64 {
        self.inner().applied.get(backend).copied().unwrap_or(0)
    }

    /// Why etcd cannot be reached, while it cannot.
    pub fn problem(&self) -> Option<String> {
        self.inner().problem.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.inner().connected
    }

    pub fn view(&self) -> ClusterView {
        let inner = self.inner();
        let mut others: Vec<String> = inner.peers.keys().cloned().collect();
        others.sort();
        ClusterView {
            name: self.config.name.clone(),
            instance: self.config.instance.clone(),
            connected: inner.connected,
            instances: std::iter::once(self.config.instance.clone())
                .chain(others)
                .collect(),
        }
    }

    /// The other instances' share of `b`, by instance name.
    pub fn counts(&self, b: &Backend) -> Vec<InstanceCount> {
        let inner = self.inner();
        let mut v: Vec<InstanceCount> = inner
            .peers
            .iter()
            .filter_map(|(name, r)| {
                r.backends.get(&b.name).map(|br| InstanceCount {
                    instance: name.clone(),
                    state: br.state,
                    active_connections: br.live,
                })
            })
            .collect();
        v.sort_by(|a, b| a.instance.cmp(&b.instance));
        v
    }
}

impl Shared {
    /// This instance's cluster, in cluster mode.
    pub fn cluster(&self) -> Option<&ClusterState> {
        self.cluster.as_ref()
    }

    /// Applies the admin state the cluster agreed on for `name` at `rev`
    /// (`None`: the key was deleted, which is `active`), through the same
    /// transitions as an admin's call here. An older revision than the
    /// one applied changes nothing. Returns whether it applied.
    ///
    /// Under the reload lock, so a backend a reload adds at this moment
    /// takes it, and under the cluster lock, so the revision this instance
    /// reports and its state move together.
    pub fn apply_agreed(&self, name: &str, agreed: Option<&Agreed>, rev: i64) -> bool {
        let Some(c) = &self.cluster else {
            return false;
        };
        let _no_reload = self.changes.lock().expect("changes lock");
        let mut inner = c.inner();
        let applied = inner.applied.entry(name.to_string()).or_insert(0);
        if rev <= *applied {
            return false;
        }
        *applied = rev;
        let state = agreed.map_or(State::Active, |a| a.state);
        inner.agreed.insert(name.to_string(), state);
        let Some(b) = self.backend(name) else {
            return true;
        };
        // The others are behind this revision until they report it, so the
        // drain below cannot count as over before they have applied it.
        self.count_peers(&inner);
        match state {
            State::Active => b.start(),
            State::Draining | State::Drained => {
                let policy = agreed.map(Agreed::policy).unwrap_or_default();
                b.drain(policy, &self.tasks);
            }
            State::Stopped => b.stop(),
        }
        true
    }

    /// The state the cluster agreed on for `name`, if it has one.
    pub fn agreed_state(&self, name: &str) -> Option<State> {
        self.cluster.as_ref()?.inner().agreed.get(name).copied()
    }

    /// The reports of every other instance alive, replacing what was
    /// known; `unreadable` names those whose report could not be read.
    pub fn peers_are(&self, reports: HashMap<String, InstanceReport>, unreadable: HashSet<String>) {
        if let Some(c) = &self.cluster {
            let mut inner = c.inner();
            inner.peers = reports;
            inner.unreadable = unreadable;
            self.count_peers(&inner);
        }
    }

    /// One instance's new report (`None`: one this version cannot read).
    pub fn peer_reported(&self, instance: &str, report: Option<InstanceReport>) {
        if let Some(c) = &self.cluster {
            let mut inner = c.inner();
            match report {
                Some(r) => {
                    inner.unreadable.remove(instance);
                    inner.peers.insert(instance.to_string(), r);
                }
                None => {
                    inner.peers.remove(instance);
                    inner.unreadable.insert(instance.to_string());
                }
            }
            self.count_peers(&inner);
        }
    }

    /// An instance's lease ended: it is gone, and so are its connections.
    pub fn peer_gone(&self, instance: &str) {
        if let Some(c) = &self.cluster {
            let mut inner = c.inner();
            let known = inner.peers.remove(instance).is_some();
            if known | inner.unreadable.remove(instance) {
                tracing::warn!(instance, "cluster: an instance is gone (its lease ended)");
            }
            self.count_peers(&inner);
        }
    }

    /// Every change up to `rev` has been seen.
    pub fn cluster_seen(&self, rev: i64) {
        if let Some(c) = &self.cluster {
            let mut inner = c.inner();
            if rev > inner.seen {
                inner.seen = rev;
                self.count_peers(&inner);
            }
        }
    }

    /// Whether etcd answers; `problem` says why not.
    pub fn cluster_reachable(&self, problem: Option<String>) {
        let Some(c) = &self.cluster else {
            return;
        };
        let mut inner = c.inner();
        match &problem {
            None if inner.problem.is_some() => {
                tracing::info!(
                    cluster = %c.config.name,
                    instance = %c.config.instance,
                    "cluster: etcd answers; admin changes are accepted"
                );
            }
            Some(p) if inner.problem.as_ref() != Some(p) => {
                tracing::error!("{p}");
            }
            _ => {}
        }
        // A change of connection, not of its reason: a lost connection is
        // told once, however its error reads on each retry.
        if inner.connected != problem.is_none() {
            self.events.publish(crate::events::Kind::Cluster {
                connected: problem.is_none(),
                error: problem.clone(),
            });
        }
        inner.connected = problem.is_none();
        inner.problem = problem;
        self.count_peers(&inner);
    }

    /// Sets every backend's count of the other instances' connections,
    /// under the cluster lock so that no older count lands after a newer
    /// one. An instance still behind the revision applied here counts as
    /// holding connections, and so does everyone while etcd cannot be
    /// reached or this instance has not seen every change up to it.
    fn count_peers(&self, inner: &Inner) {
        let unknown = usize::from(!inner.connected) + inner.unreadable.len();
        for b in self.backends().iter() {
            let applied = inner.applied.get(&b.name).copied().unwrap_or(0);
            let mut live = 0;
            let mut behind = unknown + usize::from(inner.seen < applied);
            for r in inner.peers.values() {
                if let Some(br) = r.backends.get(&b.name) {
                    live += br.live;
                    if br.rev < applied {
                        behind += 1;
                    }
                }
            }
            b.set_peers(live, behind);
        }
    }

    /// What this instance publishes for the others, by backend: read
    /// under the cluster lock, so a revision goes out only with the state
    /// it brought. Removed backends too, while they drain.
    pub fn backend_reports(&self) -> BTreeMap<String, BackendReport> {
        let c = self.cluster.as_ref();
        let inner = c.map(|c| c.inner());
        self.backends()
            .iter()
            .map(|b| {
                let r = BackendReport {
                    state: b.state(),
                    live: b.live() + b.elsewhere(),
                    rev: inner
                        .as_ref()
                        .and_then(|i| i.applied.get(&b.name).copied())
                        .unwrap_or(0),
                };
                (b.name.clone(), r)
            })
            .collect()
    }
}
