//! What this instance knows of its cluster (`[cluster]`): the admin
//! state every instance agreed on in etcd, and what the others report.
//!
//! The cluster adds no second state machine: an agreed change goes
//! through the same transitions as a local call ([`Shared::apply_agreed`]),
//! and the other instances' connections count in each backend's drain
//! ([`Backend::set_peers`]), so a drain is over only when it is over on
//! every instance alive. Talking to etcd is `cluster.rs`'s job.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
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
    /// By backend: the revision of the agreed state applied here.
    applied: HashMap<String, i64>,
    /// By backend: the agreed state, for a backend a reload adds.
    agreed: HashMap<String, State>,
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
    pub fn apply_agreed(&self, name: &str, agreed: Option<&Agreed>, rev: i64) -> bool {
        let Some(c) = &self.cluster else {
            return false;
        };
        {
            let mut inner = c.inner();
            let applied = inner.applied.entry(name.to_string()).or_insert(0);
            if rev <= *applied {
                return false;
            }
            *applied = rev;
            let state = agreed.map_or(State::Active, |a| a.state);
            inner.agreed.insert(name.to_string(), state);
        }
        let Some(b) = self.backend(name) else {
            return true;
        };
        // The others are behind this revision until they report it, so the
        // drain below cannot count as over before they have applied it.
        self.count_peers();
        match agreed {
            None => b.start(),
            Some(a) => match a.state {
                State::Active => b.start(),
                State::Draining | State::Drained => {
                    b.drain(a.policy(), &self.tasks);
                }
                State::Stopped => b.stop(),
            },
        }
        true
    }

    /// The state the cluster agreed on for `name`, if it has one.
    pub fn agreed_state(&self, name: &str) -> Option<State> {
        self.cluster.as_ref()?.inner().agreed.get(name).copied()
    }

    /// The reports of every other instance alive, replacing what was known.
    pub fn peers_are(&self, reports: HashMap<String, InstanceReport>) {
        if let Some(c) = &self.cluster {
            c.inner().peers = reports;
            self.count_peers();
        }
    }

    /// One instance's new report.
    pub fn peer_reported(&self, instance: &str, report: InstanceReport) {
        if let Some(c) = &self.cluster {
            c.inner().peers.insert(instance.to_string(), report);
            self.count_peers();
        }
    }

    /// An instance's lease ended: it is gone, and so are its connections.
    pub fn peer_gone(&self, instance: &str) {
        if let Some(c) = &self.cluster {
            if c.inner().peers.remove(instance).is_some() {
                tracing::warn!(instance, "cluster: an instance is gone (its lease ended)");
            }
            self.count_peers();
        }
    }

    /// Whether etcd answers; `problem` says why not.
    pub fn cluster_reachable(&self, problem: Option<String>) {
        let Some(c) = &self.cluster else {
            return;
        };
        {
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
            inner.connected = problem.is_none();
            inner.problem = problem;
        }
        self.count_peers();
    }

    /// Sets every backend's count of the other instances' connections. An
    /// instance still behind the revision applied here counts as holding
    /// connections, and so does everyone while etcd cannot be reached.
    fn count_peers(&self) {
        let Some(c) = &self.cluster else {
            return;
        };
        let counts: Vec<(std::sync::Arc<Backend>, usize, usize)> = {
            let inner = c.inner();
            let unknown = usize::from(!inner.connected);
            self.backends()
                .iter()
                .map(|b| {
                    let applied = inner.applied.get(&b.name).copied().unwrap_or(0);
                    let mut live = 0;
                    let mut behind = unknown;
                    for r in inner.peers.values() {
                        if let Some(br) = r.backends.get(&b.name) {
                            live += br.live;
                            if br.rev < applied {
                                behind += 1;
                            }
                        }
                    }
                    (b.clone(), live, behind)
                })
                .collect()
        };
        // Outside the lock: completing a drain takes other locks.
        for (b, live, behind) in counts {
            b.set_peers(live, behind);
        }
    }

    /// What this instance publishes for the others, by backend.
    pub fn backend_reports(&self) -> BTreeMap<String, BackendReport> {
        let c = self.cluster.as_ref();
        self.backends()
            .iter()
            .filter(|b| !b.removed.load(Ordering::SeqCst))
            .map(|b| {
                let r = BackendReport {
                    state: b.state(),
                    live: b.live() + b.elsewhere(),
                    rev: c.map_or(0, |c| c.applied(&b.name)),
                };
                (b.name.clone(), r)
            })
            .collect()
    }
}
