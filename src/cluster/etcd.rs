//! The etcd side of cluster mode. Keys, under `/sluice/{cluster}/`:
//!
//! - `backends/{name}`: the agreed admin state ([`Agreed`], JSON), written
//!   only by a compare-and-set on its revision;
//! - `instances/{instance}`: what each instance reports
//!   ([`InstanceReport`], JSON), under a lease that ends with it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::time::Instant;

use super::Change;
use crate::api::InstanceReport;
use crate::backend::State;
use crate::config::{ClusterConfig, format_duration};
use crate::health::unix_ms;
use crate::state::{Agreed, Shared};

/// The longest one etcd request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the counts are looked at, and published when they changed.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// A report is put again at least this often, so that a key another
/// process of this instance wrote (an upgrade) is soon this one's again.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How many times a write retries when another admin changed the same
/// backend between its read and its compare-and-set.
const WRITE_TRIES: usize = 5;

/// This instance's session with etcd.
pub struct Cluster {
    shared: Arc<Shared>,
    client: Client,
    prefix: String,
    /// The lease this instance's report lives under; 0 before the first.
    lease: AtomicI64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// One etcd call with the request timeout.
async fn timed<T>(
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", short(&e))),
        Err(_) => Err(format!(
            "{what}: no answer within {}",
            format_duration(REQUEST_TIMEOUT)
        )),
    }
}

/// The cause an admin can act on (connection refused, a timeout, etcd's
/// own message), not the layers of the gRPC stack above it.
fn short(e: &etcd_client::Error) -> String {
    if let etcd_client::Error::GRpcStatus(s) = e {
        let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(s);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                return io.to_string();
            }
            cause = c.source();
        }
        return s.message().to_string();
    }
    e.to_string()
}

async fn connect(config: &ClusterConfig) -> Result<Client, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT)
        .with_keep_alive_while_idle(true);
    timed("connect", Client::connect(&config.etcd, Some(options))).await
}

fn prefix(config: &ClusterConfig) -> String {
    format!("/sluice/{}/", config.name)
}

/// The cluster's agreed admin states, read before this instance serves,
/// so that it starts from them and not from a stale state file.
pub async fn agreed_states(config: &ClusterConfig) -> Result<HashMap<String, State>, String> {
    let mut client = connect(config).await?;
    let key = format!("{}backends/", prefix(config));
    let r = timed(
        "read the admin states",
        client.get(key.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    Ok(r.kvs()
        .iter()
        .filter_map(|kv| {
            let name = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&key)?;
            let agreed: Agreed = serde_json::from_slice(kv.value()).ok()?;
            Some((name.to_string(), agreed.state))
        })
        .collect())
}

/// What a key under the prefix is.
enum Key<'a> {
    Backend(&'a str),
    Instance(&'a str),
    Other,
}

impl Cluster {
    /// Starts the session of `shared`'s cluster, if it has one: it runs
    /// until shutdown, reconnecting whenever etcd stops answering.
    pub async fn start(shared: &Arc<Shared>) -> Result<Option<Arc<Cluster>>, String> {
        let Some(cluster) = shared.cluster() else {
            return Ok(None);
        };
        let config = cluster.config.clone();
        // The channel connects on first use, and again after etcd is back.
        let client = connect(&config).await?;
        let c = Arc::new(Cluster {
            shared: shared.clone(),
            client,
            prefix: prefix(&config),
            lease: AtomicI64::new(0),
        });
        shared.tasks.spawn(c.clone().run());
        Ok(Some(c))
    }

    fn config(&self) -> &ClusterConfig {
        &self.shared.cluster().expect("cluster mode").config
    }

    fn key<'a>(&self, key: &'a [u8]) -> Key<'a> {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
        else {
            return Key::Other;
        };
        if let Some(name) = rest.strip_prefix("backends/") {
            Key::Backend(name)
        } else if let Some(name) = rest.strip_prefix("instances/") {
            Key::Instance(name)
        } else {
            Key::Other
        }
    }

    /// What `/healthz` says while etcd does not answer.
    fn problem(&self, why: &str) -> String {
        let c = self.config();
        format!(
            "cluster `{}`: etcd ({}) cannot be reached ({why}); the last known admin state applies, and admin changes are refused until it answers",
            c.name,
            c.etcd.join(", ")
        )
    }

    /// Sessions, one after another, until shutdown or a hand-over.
    async fn run(self: Arc<Self>) {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.session(&mut pause).await {
                Ok(()) => return,
                Err(why) => self.shared.cluster_reachable(Some(self.problem(&why))),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// One session: a lease, the state as of now, then the watch from
    /// there, so nothing that changed meanwhile is missed.
    async fn session(&self, pause: &mut Duration) -> Result<(), String> {
        let mut c = self.client.clone();
        let ttl = self.config().lease.as_secs().max(2) as i64;
        let lease = timed("grant a lease", c.lease_grant(ttl, None)).await?.id();
        self.lease.store(lease, Ordering::SeqCst);
        let (mut keeper, mut renewals) =
            timed("keep the lease alive", c.lease_keep_alive(lease)).await?;
        let snapshot = timed(
            "read the cluster's state",
            c.get(self.prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let rev = snapshot.header().map_or(0, |h| h.revision());
        let me = self.config().instance.clone();
        let mut peers = HashMap::new();
        for kv in snapshot.kvs() {
            match self.key(kv.key()) {
                Key::Backend(name) => self.apply(name, Some(kv.value()), kv.mod_revision()),
                Key::Instance(name) if name != me => {
                    if let Ok(r) = serde_json::from_slice::<InstanceReport>(kv.value()) {
                        peers.insert(name.to_string(), r);
                    }
                }
                _ => {}
            }
        }
        self.shared.peers_are(peers);
        let mut published = self.publish(&mut c, lease).await?;
        let mut last_put = Instant::now();
        let mut watch = timed(
            "watch the cluster's state",
            c.watch(
                self.prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            ),
        )
        .await?;
        self.shared.cluster_reachable(None);
        *pause = Duration::from_millis(100);

        let ttl = Duration::from_secs(ttl as u64);
        let mut renew = tokio::time::interval(ttl / 3);
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                m = watch.message() => {
                    let m = m
                        .map_err(|e| format!("watch: {e}"))?
                        .ok_or("the watch ended")?;
                    if m.canceled() {
                        return Err(format!("the watch was cancelled: {}", m.cancel_reason()));
                    }
                    for ev in m.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let put = ev.event_type() == EventType::Put;
                        match self.key(kv.key()) {
                            Key::Backend(name) => {
                                self.apply(name, put.then(|| kv.value()), kv.mod_revision());
                            }
                            Key::Instance(name) if name != me => {
                                match put.then(|| serde_json::from_slice::<InstanceReport>(kv.value())) {
                                    Some(Ok(r)) => self.shared.peer_reported(name, r),
                                    Some(Err(_)) => {}
                                    None => self.shared.peer_gone(name),
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ = renew.tick() => {
                    if renewed.elapsed() > ttl {
                        return Err("the lease was not renewed in time".into());
                    }
                    timed("renew the lease", keeper.keep_alive()).await?;
                }
                r = renewals.message() => {
                    let r = r
                        .map_err(|e| format!("lease renewal: {e}"))?
                        .ok_or("the lease renewals ended")?;
                    if r.ttl() <= 0 {
                        return Err("the lease expired".into());
                    }
                    renewed = Instant::now();
                }
                _ = tick.tick() => {
                    // The new process reports for this instance from now.
                    if self.shared.handed_over() {
                        return Ok(());
                    }
                    let report = self.report();
                    if report != published || last_put.elapsed() >= REFRESH_EVERY {
                        self.put(&mut c, lease, &report).await?;
                        published = report;
                        last_put = Instant::now();
                    }
                }
            }
        }
    }

    fn report(&self) -> InstanceReport {
        InstanceReport {
            pid: std::process::id(),
            version: crate::upgrade::version(),
            backends: self.shared.backend_reports(),
        }
    }

    async fn publish(&self, c: &mut Client, lease: i64) -> Result<InstanceReport, String> {
        let report = self.report();
        self.put(c, lease, &report).await?;
        Ok(report)
    }

    async fn put(&self, c: &mut Client, lease: i64, report: &InstanceReport) -> Result<(), String> {
        let key = format!("{}instances/{}", self.prefix, self.config().instance);
        let value = serde_json::to_vec(report).map_err(|e| e.to_string())?;
        timed(
            "publish this instance's counts",
            c.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    /// Applies one backend key's value at `rev` (`None`: deleted).
    fn apply(&self, name: &str, value: Option<&[u8]>, rev: i64) {
        let agreed = match value.map(serde_json::from_slice::<Agreed>) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                tracing::error!(backend = name, error = %e, "cluster: an admin state in etcd is not valid JSON of sluice's; ignored");
                return;
            }
        };
        if self.shared.apply_agreed(name, agreed.as_ref(), rev)
            && let Some(a) = &agreed
            && a.by != self.config().instance
        {
            tracing::info!(backend = name, state = a.state.as_str(), by = %a.by, "cluster: applied an admin change made on another instance");
        }
        self.shared.state_changed.notify_one();
    }

    /// Writes `change` of backend `name` to etcd with a compare-and-set,
    /// then applies it here at once (the others through their watch).
    /// Err says why nothing was applied anywhere.
    pub async fn write(&self, name: &str, change: Change) -> Result<(), String> {
        let refused = |why: String| {
            let c = self.config();
            format!(
                "cluster `{}`: cannot write the change to etcd ({}): {why}; it was applied on no instance, send it again once etcd answers",
                c.name,
                c.etcd.join(", ")
            )
        };
        let mut c = self.client.clone();
        let key = format!("{}backends/{name}", self.prefix);
        let me = self.config().instance.clone();
        for _ in 0..WRITE_TRIES {
            let r = timed("read", c.get(key.clone(), None))
                .await
                .map_err(refused)?;
            let (current, rev) = match r.kvs().first() {
                Some(kv) => (
                    serde_json::from_slice::<Agreed>(kv.value()).ok(),
                    kv.mod_revision(),
                ),
                None => (None, 0),
            };
            let Some(next) = change.next(current.as_ref(), &me, unix_ms()) else {
                // Nothing to write; what is agreed applies here too, in
                // case the watch has not brought it yet.
                self.apply_value(name, current.as_ref(), rev);
                return Ok(());
            };
            let value = serde_json::to_vec(&next).map_err(|e| refused(e.to_string()))?;
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.clone(), value, None)]);
            let r = timed("write", c.txn(txn)).await.map_err(refused)?;
            if r.succeeded() {
                let rev = r.header().map_or(0, |h| h.revision());
                self.apply_value(name, Some(&next), rev);
                return Ok(());
            }
            // Another admin changed it first: decide again on theirs.
        }
        Err(refused(format!(
            "the backend's state changed {WRITE_TRIES} times during this write"
        )))
    }

    fn apply_value(&self, name: &str, agreed: Option<&Agreed>, rev: i64) {
        if rev > 0 {
            self.shared.apply_agreed(name, agreed, rev);
            self.shared.state_changed.notify_one();
        }
    }

    /// At the end of shutdown: ends the lease, so the others forget this
    /// instance at once rather than when the lease runs out.
    pub async fn stop(&self) {
        let lease = self.lease.load(Ordering::SeqCst);
        if lease != 0 && !self.shared.handed_over() {
            let mut c = self.client.clone();
            let _ = timed("end the lease", c.lease_revoke(lease)).await;
        }
    }
}
