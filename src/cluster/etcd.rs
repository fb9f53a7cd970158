//! The etcd side of cluster mode. Keys, under `/sluice/{cluster}/`:
//!
//! - `backends/{name}`: the agreed admin state ([`Agreed`], JSON), written
//!   only by a compare-and-set on its revision;
//! - `instances/{instance}`: what each instance reports
//!   ([`InstanceReport`], JSON), under a lease that ends with it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use tokio::time::Instant;

use super::Change;
use crate::api::InstanceReport;
use crate::backend::State;
use crate::config::{ClusterConfig, format_duration};
use crate::health::unix_ms;
use crate::state::{Agreed, Shared};

/// The longest one etcd request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the counts are looked at, and published when they changed.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Count changes that no drain waits for are published at most this often.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How many times a write retries when another admin changed the same
/// backend between its read and its compare-and-set.
const WRITE_TRIES: usize = 50;
/// How long a start waits for its first session before serving on the
/// state it has, degraded.
const START_LIMIT: Duration = Duration::from_secs(5);

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
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
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

/// Whether `new` differs from `old` in what a drain somewhere waits for:
/// a state, an applied revision, or a count reaching or leaving 0.
fn significant(old: &InstanceReport, new: &InstanceReport) -> bool {
    old.backends.len() != new.backends.len()
        || new.backends.iter().any(|(name, n)| {
            old.backends.get(name).is_none_or(|o| {
                o.state != n.state || o.rev != n.rev || (o.live == 0) != (n.live == 0)
            })
        })
}

/// What a key under the prefix is.
enum Key<'a> {
    Backend(&'a str),
    Instance(&'a str),
    Other,
}

/// A put in flight.
type Pending = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A session with etcd: this instance's lease, the watch from the
/// revision its snapshot was read at, and what it published last.
struct Session {
    client: Client,
    lease: i64,
    ttl: Duration,
    keeper: LeaseKeeper,
    renewals: LeaseKeepAliveStream,
    watch: WatchStream,
    published: InstanceReport,
}

impl Cluster {
    /// Starts the session of `shared`'s cluster, if it has one. Before it
    /// returns, and so before this instance accepts a client, it has told
    /// the others it exists (as behind on every backend) and applied the
    /// state as of now, or tried for [`START_LIMIT`]. Then the session runs
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
        let first = match tokio::time::timeout(START_LIMIT, c.open()).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(why)) => {
                shared.cluster_reachable(Some(c.problem(&why)));
                None
            }
            Err(_) => {
                let why = format!("no session within {}", format_duration(START_LIMIT));
                shared.cluster_reachable(Some(c.problem(&why)));
                None
            }
        };
        shared.tasks.spawn(c.clone().run(first));
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
    async fn run(self: Arc<Self>, mut session: Option<Session>) {
        let mut pause = Duration::from_millis(100);
        loop {
            // The new process reports for this instance from now.
            if self.shared.handed_over() {
                return;
            }
            let result = match session.take() {
                Some(s) => self.serve(s).await,
                None => match self.open().await {
                    Ok(s) => {
                        pause = Duration::from_millis(100);
                        self.serve(s).await
                    }
                    Err(why) => Err(why),
                },
            };
            match result {
                Ok(()) => return,
                Err(why) => self.shared.cluster_reachable(Some(self.problem(&why))),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Opens a session: a lease and a first report under it, so that the
    /// others count this instance before it acts; then the state as of
    /// now, and a watch from there, so nothing that changes meanwhile is
    /// missed.
    async fn open(&self) -> Result<Session, String> {
        let mut c = self.client.clone();
        let ttl = self.config().lease.as_secs().max(2) as i64;
        let lease = timed("grant a lease", c.lease_grant(ttl, None)).await?.id();
        self.lease.store(lease, Ordering::SeqCst);
        let (keeper, renewals) = timed("keep the lease alive", c.lease_keep_alive(lease)).await?;
        self.put(&mut c, lease, &self.report()).await?;
        let snapshot = timed(
            "read the cluster's state",
            c.get(self.prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let rev = snapshot.header().map_or(0, |h| h.revision());
        let me = self.config().instance.clone();
        let mut peers = HashMap::new();
        let mut unreadable = HashSet::new();
        for kv in snapshot.kvs() {
            match self.key(kv.key()) {
                Key::Backend(name) => self.apply(name, Some(kv.value()), kv.mod_revision()),
                Key::Instance(name) if name != me => {
                    match serde_json::from_slice::<InstanceReport>(kv.value()) {
                        Ok(r) => {
                            peers.insert(name.to_string(), r);
                        }
                        Err(_) => {
                            unreadable.insert(name.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        self.shared.peers_are(peers, unreadable);
        self.shared.cluster_seen(rev);
        let published = self.report();
        self.put(&mut c, lease, &published).await?;
        let watch = timed(
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
        Ok(Session {
            client: c,
            lease,
            ttl: Duration::from_secs(ttl as u64),
            keeper,
            renewals,
            watch,
            published,
        })
    }

    /// Follows the watch, renews the lease and publishes this instance's
    /// counts until etcd fails (`Err`) or the process hands over (`Ok`).
    async fn serve(&self, mut s: Session) -> Result<(), String> {
        let me = self.config().instance.clone();
        let mut renew = tokio::time::interval(s.ttl / 3);
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        let mut renewed = Instant::now();
        let mut last_put = Instant::now();
        // A put in flight: awaited beside the watch and the renewals, so a
        // slow etcd never holds up the lease.
        let mut putting: Option<Pending> = None;
        loop {
            tokio::select! {
                m = s.watch.message() => {
                    let m = m
                        .map_err(|e| format!("watch: {}", short(&e)))?
                        .ok_or("the watch ended")?;
                    if m.canceled() {
                        return Err(format!("the watch was cancelled: {}", m.cancel_reason()));
                    }
                    let mut seen = 0;
                    for ev in m.events() {
                        let Some(kv) = ev.kv() else { continue };
                        seen = seen.max(kv.mod_revision());
                        let put = ev.event_type() == EventType::Put;
                        match self.key(kv.key()) {
                            Key::Backend(name) => {
                                self.apply(name, put.then(|| kv.value()), kv.mod_revision());
                            }
                            Key::Instance(name) if name != me => {
                                if put {
                                    let r = serde_json::from_slice::<InstanceReport>(kv.value()).ok();
                                    self.shared.peer_reported(name, r);
                                } else {
                                    self.shared.peer_gone(name);
                                }
                            }
                            // This instance's key, deleted or put under
                            // another lease (a late put of an earlier
                            // session or of the process before an
                            // upgrade): put it back under this session's
                            // lease at the next tick.
                            Key::Instance(_) if !put || kv.lease() != s.lease => {
                                s.published = InstanceReport::default();
                            }
                            _ => {}
                        }
                    }
                    self.shared.cluster_seen(seen);
                }
                _ = renew.tick() => {
                    if renewed.elapsed() > s.ttl {
                        return Err("the lease was not renewed in time".into());
                    }
                    timed("renew the lease", s.keeper.keep_alive()).await?;
                }
                r = s.renewals.message() => {
                    let r = r
                        .map_err(|e| format!("lease renewal: {}", short(&e)))?
                        .ok_or("the lease renewals ended")?;
                    if r.ttl() <= 0 {
                        return Err("the lease expired".into());
                    }
                    renewed = Instant::now();
                }
                r = async { putting.as_mut().expect("a put in flight").await }, if putting.is_some() => {
                    putting = None;
                    r?;
                }
                _ = tick.tick(), if putting.is_none() => {
                    if self.shared.handed_over() {
                        return Ok(());
                    }
                    let report = self.report();
                    // At once when something a drain waits for changed;
                    // other count changes at most once a second, so a busy
                    // balancer does not fill etcd's history.
                    let due = if significant(&s.published, &report) {
                        true
                    } else {
                        report != s.published && last_put.elapsed() >= REFRESH_EVERY
                    };
                    if due {
                        let (mut c, lease) = (s.client.clone(), s.lease);
                        let me = self.config().instance.clone();
                        let key = format!("{}instances/{me}", self.prefix);
                        let value = serde_json::to_vec(&report).map_err(|e| e.to_string())?;
                        putting = Some(Box::pin(async move {
                            timed(
                                "publish this instance's counts",
                                c.put(key, value, Some(PutOptions::new().with_lease(lease))),
                            )
                            .await
                            .map(drop)
                        }));
                        s.published = report;
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
                Some(kv) => match serde_json::from_slice::<Agreed>(kv.value()) {
                    Ok(a) => (Some(a), kv.mod_revision()),
                    // As the watch does: an unreadable value is no state
                    // to decide on.
                    Err(e) => {
                        return Err(refused(format!(
                            "the state in etcd at {key} is not sluice's ({e}); fix or delete that key"
                        )));
                    }
                },
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
            let r = timed("write", c.txn(txn)).await.map_err(|why| {
                // Sent, but unanswered: etcd may have taken it, and then
                // every instance applies it through its watch.
                let c = self.config();
                format!(
                    "cluster `{}`: etcd ({}) did not confirm the change ({why}); it may still have been taken, in which case every instance applies it: GET /backends shows what applies",
                    c.name,
                    c.etcd.join(", ")
                )
            })?;
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
