//! Reload: a new validated configuration applied to the running balancer.
//!
//! Every field either applies or refuses the whole file with a
//! [`ReloadError`] that names each field needing a restart: the services'
//! names and addresses, the admin address, the state file, `workers` and
//! `runtime` (sockets and threads made at start). Everything else applies:
//! backends are matched by name (existing ones keep their state, counters
//! and live connections; new ones join `active`, slow-starting if they
//! have `slow_start`; removed ones drain and are dropped once empty),
//! each backend's weight, `slow_start`, `max_connections` and `backup`
//! are set (a ramp under way goes on with the new length; a lowered
//! `max_connections` cuts nothing and only holds new clients off until
//! the count is under it), routes are rebuilt with each service's
//! `balance` and `affinity` and swapped whole, health
//! checks restart, the limit is resized, and the new [`Runtime`] is
//! swapped in for the token, the timeouts, `zero_copy` and the grace
//! period. A backend's `send_proxy` and a service's `accept_proxy` and
//! `proxy_header_timeout` apply to the connections accepted after it (and
//! `send_proxy` to the restarted checks): a live connection keeps the
//! header it began with. Admin states are kept and no live connection is
//! cut.

use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use super::{Retired, Runtime, Shared};
use crate::backend::{Backend, DrainPolicy, State};
use crate::config::{BackendAddress, BackendConfig, Config, ConfigError, HealthCheck};
use crate::events::{Bus, Kind};
use crate::health::Probe;
use crate::net::Target;
use crate::pool::Route;

/// A field whose change needs a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsRestart {
    /// Dotted path, such as `admin.listen` or `service[0].name`.
    pub field: String,
    pub from: String,
    pub to: String,
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ReloadError(pub Vec<NeedsRestart>);

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<String> = self
            .0
            .iter()
            .map(|c| format!("{} ({} -> {})", c.field, c.from, c.to))
            .collect();
        write!(
            f,
            "{} changed, which needs a restart: {}",
            if fields.len() == 1 {
                "a field that sockets or threads were made from"
            } else {
                "fields that sockets or threads were made from"
            },
            fields.join(", ")
        )
    }
}

/// The changes from `old` to `new` that a running balancer cannot apply.
fn needs_restart(old: &Config, new: &Config) -> Vec<NeedsRestart> {
    let mut out = Vec::new();
    let mut differ = |field: String, from: String, to: String| {
        if from != to {
            out.push(NeedsRestart { field, from, to });
        }
    };
    differ(
        "admin.listen".into(),
        old.admin.listen.to_string(),
        new.admin.listen.to_string(),
    );
    let socket = |c: &Config| {
        c.admin.socket.as_ref().map_or("none".into(), |s| {
            format!("{} {:o} {:?}", s.path.display(), s.mode, s.group)
        })
    };
    differ("admin.socket".into(), socket(old), socket(new));
    let path = |c: &Config| {
        c.state_file
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string())
    };
    differ("state_file".into(), path(old), path(new));
    let cluster = |c: &Config| {
        c.cluster.as_ref().map_or("none".into(), |c| {
            format!(
                "{} {} [{}] {}",
                c.name,
                c.instance,
                c.etcd.join(", "),
                crate::config::format_duration(c.lease)
            )
        })
    };
    differ("cluster".into(), cluster(old), cluster(new));
    differ(
        "workers".into(),
        old.workers.to_string(),
        new.workers.to_string(),
    );
    differ(
        "runtime".into(),
        format!("{:?}", old.runtime),
        format!("{:?}", new.runtime),
    );
    let count = old.services.len().max(new.services.len());
    for i in 0..count {
        let (o, n) = (old.services.get(i), new.services.get(i));
        let name =
            |s: Option<&crate::config::ServiceConfig>| s.map_or("none".into(), |s| s.name.clone());
        let listen = |s: Option<&crate::config::ServiceConfig>| {
            s.map_or("none".into(), |s| s.listen.to_string())
        };
        differ(format!("service[{i}].name"), name(o), name(n));
        differ(format!("service[{i}].listen"), listen(o), listen(n));
    }
    out
}

/// What an applied reload changed in the backend list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Backends that joined, by name.
    pub added: Vec<String>,
    /// Backends that left the file and now drain, by name.
    pub removed: Vec<String>,
}

/// Why a reload of the configuration file was refused; the running
/// configuration stays either way.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The file does not load: it names the file, line and field.
    #[error(transparent)]
    Load(#[from] ConfigError),
    /// The file is valid but changes what only a restart can.
    #[error(transparent)]
    Restart(#[from] ReloadError),
}

pub(super) fn new_backend(
    bc: &BackendConfig,
    state_changed: &Arc<Notify>,
    events: &Arc<Bus>,
) -> Arc<Backend> {
    let b = Backend::new(
        bc.name.clone(),
        bc.address.clone(),
        bc.weight,
        State::Active,
    )
    .notify_changes_to(state_changed.clone())
    .publish_to(events.clone());
    b.set_balancing(bc.slow_start, bc.max_connections, bc.backup);
    b.set_send_proxy(bc.send_proxy);
    Arc::new(b)
}

impl Shared {
    /// Applies `new` to the running balancer, or refuses it whole; counted
    /// either way.
    pub fn reload(self: &Arc<Self>, new: Config) -> Result<Applied, ReloadError> {
        let r = self.apply(new);
        let outcome = match r {
            Ok(_) => &self.reloads.applied,
            Err(_) => &self.reloads.refused,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Reads `path` again and applies it, or refuses it whole: the one
    /// reload that SIGHUP and `POST /reload` share, logged and counted.
    pub fn reload_file(self: &Arc<Self>, path: &Path) -> Result<Applied, Refused> {
        let outcome = match Config::load(path) {
            Ok(c) => self.reload(c).map_err(Refused::from),
            Err(e) => {
                // Never reached `reload`, which counts and tells the others.
                self.reloads.refused.fetch_add(1, Ordering::Relaxed);
                self.events.publish(Kind::Reload {
                    result: "refused".into(),
                    error: Some(e.to_string()),
                    added: Vec::new(),
                    removed: Vec::new(),
                });
                Err(Refused::Load(e))
            }
        };
        match &outcome {
            Ok(a) => {
                tracing::info!(path = %path.display(), added = ?a.added, removed = ?a.removed, "configuration reloaded")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), "reload refused, the running configuration stays: {e}")
            }
        }
        outcome
    }

    fn apply(self: &Arc<Self>, new: Config) -> Result<Applied, ReloadError> {
        let _one_at_a_time = self.changes.lock().expect("changes lock");
        let old = self.runtime();
        let refused = needs_restart(&old.config, &new);
        if !refused.is_empty() {
            let e = ReloadError(refused);
            self.events.publish(Kind::Reload {
                result: "refused".into(),
                error: Some(e.to_string()),
                added: Vec::new(),
                removed: Vec::new(),
            });
            return Err(e);
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let mut list: Vec<Arc<Backend>> = self.backends().to_vec();
        for bc in &new.backends {
            match list.iter().find(|b| b.name == bc.name) {
                Some(b) => {
                    // Back in the file before its removal drain ended: it
                    // takes back the admin state it had, unless an admin
                    // acted on it meanwhile.
                    if b.removed.swap(false, Ordering::SeqCst) {
                        let retired = self.retired_remove(&b.name);
                        // In a cluster, the state it agreed on meanwhile.
                        match self.agreed_state(&b.name) {
                            Some(State::Active) => b.start(),
                            Some(State::Stopped) => b.stop(),
                            Some(_) => {}
                            None if retired.is_some_and(|r| {
                                r.state == State::Active && r.generation == b.generation()
                            }) =>
                            {
                                b.start()
                            }
                            None => {}
                        }
                    }
                    b.set_weight(bc.weight);
                    b.set_address(bc.address.clone());
                    b.set_balancing(bc.slow_start, bc.max_connections, bc.backup);
                    // For the connections that start after this; a live
                    // one began with the header it needed, or none.
                    b.set_send_proxy(bc.send_proxy);
                }
                None => {
                    added.push(bc.name.clone());
                    let b = new_backend(bc, &self.state_changed, &self.events);
                    // New to traffic, so cold: it slow-starts. One there
                    // at start-up does not: nothing sent it traffic yet.
                    b.begin_slow_start(crate::backend::now_ms());
                    let retired = self.retired_remove(&bc.name);
                    if let Some(state) = self.agreed_state(&bc.name) {
                        // The cluster's state over this instance's memory.
                        b.restore_agreed(state);
                        tracing::info!(backend = %bc.name, address = %bc.address, state = state.as_str(), "backend added, with its cluster's admin state");
                        list.push(b);
                        continue;
                    }
                    match retired {
                        // Its admin state outlives its absence from the file.
                        Some(r) => {
                            b.restore(r.state);
                            tracing::info!(backend = %bc.name, address = %bc.address, state = b.state().as_str(), "backend added back, with the admin state it had");
                        }
                        None => {
                            tracing::info!(backend = %bc.name, address = %bc.address, "backend added")
                        }
                    }
                    list.push(b);
                }
            }
        }
        for b in &list {
            if new.backends.iter().any(|c| c.name == b.name)
                || b.removed.swap(true, Ordering::SeqCst)
            {
                continue;
            }
            tracing::info!(backend = %b.name, live = b.live(), "backend removed from the configuration: draining it");
            removed.push(b.name.clone());
            let state = b.state();
            // Held across the drain: a state file written meanwhile must
            // not catch the removal's own drain as an admin's.
            let mut retired = self.retired.lock().expect("retired lock");
            b.drain(DrainPolicy::default(), &self.tasks);
            let generation = b.generation();
            retired.insert(b.name.clone(), Retired { state, generation });
            drop(retired);
            let (b, shared) = (b.clone(), Arc::downgrade(self));
            self.tasks.spawn(async move {
                // Its last connection, not the drain: an admin may start a
                // removed backend, and it must stay listed (and stoppable)
                // while it carries anything.
                while !b
                    .wait_until(crate::config::MAX_DURATION, |b| b.live() == 0)
                    .await
                {}
                drop_removed(&shared, &b);
            });
        }
        self.backends.store(Arc::new(list));
        let list = self.backends();
        self.set_routes(&list, &new);
        self.set_service_settings(&new);
        self.restart_health_checks(&list, &new);
        self.limit.resize(new.max_connections);
        self.admin_limit.resize(new.admin.max_connections);
        self.runtime.store(Arc::new(Runtime::new(new)));
        // Removed and returning backends change what the state file says.
        self.state_changed.notify_one();
        self.events.publish(Kind::Reload {
            result: "applied".into(),
            error: None,
            added: added.clone(),
            removed: removed.clone(),
        });
        Ok(Applied { added, removed })
    }

    /// Builds every service's route from `config` and swaps it in.
    pub(super) fn set_routes(&self, list: &[Arc<Backend>], config: &Config) {
        for (service, sc) in self.services.iter().zip(&config.services) {
            let members = sc
                .backends
                .iter()
                .filter_map(|n| list.iter().find(|b| &b.name == n))
                .map(|b| (b.clone(), Target::new(&b.address(), sc.backend_port)))
                .collect();
            service
                .route
                .store(Arc::new(Route::new(members, sc.balance)));
        }
    }

    /// Sets what each service reads of its own as a client arrives:
    /// whether a PROXY header comes first, and how long it may take. A
    /// client accepted before a reload keeps what it started with.
    pub(super) fn set_service_settings(&self, config: &Config) {
        for (service, sc) in self.services.iter().zip(&config.services) {
            service.set_accept_proxy(sc.accept_proxy.then_some(sc.proxy_header_timeout));
        }
    }

    /// Ends the running health checks and starts those `config` asks for.
    pub(super) fn restart_health_checks(&self, list: &[Arc<Backend>], config: &Config) {
        let token = self.tasks.child_token();
        std::mem::replace(
            &mut *self.health_checks.lock().expect("health lock"),
            token.clone(),
        )
        .cancel();
        let rules = crate::health::Rules::from(&config.health);
        for b in list {
            let Some(bc) = config.backends.iter().find(|c| c.name == b.name) else {
                continue;
            };
            let Some(probe) = probe(bc, config) else {
                b.record_health(crate::health::Event::ChecksOff, rules);
                continue;
            };
            let (b, stop) = (b.clone(), token.clone());
            let cfg = config.health.clone();
            self.tasks
                .spawn(crate::health::run(probe, cfg, stop, move |e| {
                    b.record_health(e, rules)
                }));
        }
    }
}

/// Drops a removed backend once its drain is over, unless a reload brought
/// it back meanwhile (checked under the lock that reloads hold).
fn drop_removed(shared: &Weak<Shared>, b: &Arc<Backend>) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let _one_at_a_time = shared.changes.lock().expect("changes lock");
    if b.removed.load(Ordering::SeqCst) {
        if let Some(r) = shared
            .retired
            .lock()
            .expect("retired lock")
            .get_mut(&b.name)
            && r.generation != b.generation()
        {
            // An admin acted on it after its removal: that is its state now.
            r.state = b.state();
        }
        let mut list = shared.backends().to_vec();
        list.retain(|x| !Arc::ptr_eq(x, b));
        shared.backends.store(Arc::new(list));
        tracing::info!(backend = %b.name, "removed backend drained and dropped");
        shared.events.publish(Kind::Removed {
            backend: b.name.clone(),
        });
        shared.state_changed.notify_one();
    }
}

/// What to check for a backend and where, or `None` without checks.
fn probe(bc: &BackendConfig, config: &Config) -> Option<Probe> {
    let check = bc.health.as_ref()?;
    let explicit = match check {
        HealthCheck::Tcp { port } | HealthCheck::Http { port, .. } => *port,
    };
    // The port to check: the check's own, the address's, or that of the
    // first service that uses the backend.
    let port = explicit.or(bc.address.port()).or_else(|| {
        config
            .services
            .iter()
            .find(|s| s.backends.contains(&bc.name))
            .map(|s| s.backend_port)
    })?;
    // An explicit check port wins over the address's own.
    let address = match (explicit, &bc.address) {
        (Some(p), BackendAddress::Ip(ip, _)) => BackendAddress::Ip(*ip, Some(p)),
        (Some(p), BackendAddress::Host(h, _)) => BackendAddress::Host(h.clone(), Some(p)),
        (None, a) => a.clone(),
    };
    Some(Probe {
        check: check.clone(),
        target: Target::new(&address, port),
        // As HAProxy does: a check on a port of its own (a status port)
        // speaks plain, one on the traffic port what the traffic speaks.
        send_proxy: bc.send_proxy.filter(|_| explicit.is_none()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(extra_top: &str, extra_admin: &str, backends: &[(&str, u32)]) -> String {
        let mut t = format!(
            "{extra_top}\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra_admin}\n\
             [[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackend_port = 80\n"
        );
        for (name, w) in backends {
            t += &format!(
                "[[backend]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nweight = {w}\nhealth_check = \"none\"\n"
            );
        }
        t
    }

    fn parse(t: &str) -> Config {
        Config::parse("t.toml", t).unwrap()
    }

    fn shared(t: &str) -> Arc<Shared> {
        let c = parse(t);
        let listens: Vec<_> = c.services.iter().map(|s| s.listen).collect();
        Shared::new(c, &listens, &Default::default())
    }

    /// Reloads `field = value` into a fresh balancer and returns the
    /// runtime after it.
    fn reloaded(top: &str, admin: &str) -> Arc<Runtime> {
        let s = shared(&text("", "", &[("a", 1)]));
        s.reload(parse(&text(top, admin, &[("a", 1)]))).unwrap();
        s.runtime()
    }

    #[tokio::test]
    async fn every_reloadable_top_level_field_applies() {
        let r = reloaded("connect_timeout = \"7s\"", "");
        assert_eq!(r.conn.connect_timeout, Duration::from_secs(7));
        let r = reloaded("idle_timeout = \"9s\"", "");
        assert_eq!(r.conn.idle_timeout, Some(Duration::from_secs(9)));
        let r = reloaded("zero_copy = false", "");
        assert!(!r.conn.zero_copy);
        let r = reloaded("shutdown_grace = \"3s\"", "");
        assert_eq!(r.config.shutdown_grace, Duration::from_secs(3));
        let r = reloaded(
            "[health]\nrise = 5\nfall = 6\ninterval = \"4s\"\ntimeout = \"3s\"",
            "",
        );
        assert_eq!(r.conn.health, crate::health::Rules { rise: 5, fall: 6 });
        assert_eq!(r.config.health.interval, Duration::from_secs(4));
        assert_eq!(r.config.health.timeout, Duration::from_secs(3));
    }

    #[tokio::test]
    async fn admin_token_and_request_timeout_apply() {
        let r = reloaded("", "token = \"s3cret\"\nrequest_timeout = \"2s\"");
        assert_eq!(r.config.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(r.config.admin.request_timeout, Duration::from_secs(2));
    }

    #[tokio::test]
    async fn max_connections_resizes_the_limit() {
        let s = shared(&text("max_connections = 4", "", &[("a", 1)]));
        assert_eq!(s.limit.max(), 4);
        s.reload(parse(&text("max_connections = 2", "", &[("a", 1)])))
            .unwrap();
        assert_eq!(s.limit.max(), 2);
        assert_eq!(s.limit.available(), 2);
    }

    #[tokio::test]
    async fn backends_join_change_and_leave_and_routes_follow() {
        let s = shared(&text("", "", &[("a", 1), ("b", 1)]));
        s.backend("b").unwrap().stop();
        s.reload(parse(&text("", "", &[("b", 3), ("c", 1)])))
            .unwrap();
        let b = s.backend("b").unwrap();
        assert_eq!(b.weight(), 3);
        assert_eq!(b.state(), State::Stopped, "admin states are kept");
        assert_eq!(s.backend("c").unwrap().state(), State::Active);
        let names: Vec<_> = s.services[0]
            .route()
            .members()
            .iter()
            .map(|(m, _)| m.name.clone())
            .collect();
        assert_eq!(names, ["b", "c"], "a removed backend leaves every route");
        // `a` carried nothing, so its drain ended at once and it is dropped.
        let a_gone = async {
            while s.backend("a").is_some() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), a_gone)
            .await
            .expect("a dropped");
    }

    #[tokio::test]
    async fn an_address_change_and_a_service_backends_list_apply() {
        let s = shared(&text("", "", &[("a", 1), ("b", 1)]));
        let t = text("", "", &[("a", 1), ("b", 1)])
            .replacen("address = \"127.0.0.1\"", "address = \"127.0.0.2:81\"", 1)
            .replace(
                "backend_port = 80\n",
                "backend_port = 80\nbackends = [\"a\"]\n",
            );
        s.reload(parse(&t)).unwrap();
        assert_eq!(
            s.backend("a").unwrap().address().to_string(),
            "127.0.0.2:81"
        );
        let route = s.services[0].route();
        let members: Vec<_> = route
            .members()
            .iter()
            .map(|(b, t)| format!("{} {t}", b.name))
            .collect();
        assert_eq!(members, ["a 127.0.0.2:81"]);
    }

    #[tokio::test]
    async fn a_service_backend_port_change_applies() {
        let s = shared(&text("", "", &[("a", 1)]));
        s.reload(parse(
            &text("", "", &[("a", 1)]).replace("backend_port = 80", "backend_port = 8080"),
        ))
        .unwrap();
        let route = s.services[0].route();
        assert_eq!(route.members()[0].1.to_string(), "127.0.0.1:8080");
    }

    #[tokio::test]
    async fn proxy_protocol_settings_apply_and_turn_off_again() {
        use crate::config::ProxyVersion;
        let plain = text("", "", &[("a", 1), ("b", 1)]);
        let s = shared(&plain);
        assert_eq!(s.services[0].accept_proxy(), None);
        let on = plain
            .replacen(
                "health_check = \"none\"\n",
                "health_check = \"none\"\nsend_proxy = \"v2\"\n",
                1,
            )
            .replace(
                "backend_port = 80\n",
                "backend_port = 80\naccept_proxy = true\nproxy_header_timeout = \"750ms\"\n",
            );
        s.reload(parse(&on)).unwrap();
        assert_eq!(s.backend("a").unwrap().send_proxy(), Some(ProxyVersion::V2));
        assert_eq!(s.backend("b").unwrap().send_proxy(), None);
        assert_eq!(
            s.services[0].accept_proxy(),
            Some(Duration::from_millis(750))
        );
        s.reload(parse(&plain)).unwrap();
        assert_eq!(s.backend("a").unwrap().send_proxy(), None);
        assert_eq!(s.services[0].accept_proxy(), None);
        // A backend that joins with it has it from its first connection.
        let d = text("", "", &[("d", 1)]).replacen(
            "health_check = \"none\"\n",
            "health_check = \"none\"\nsend_proxy = \"v1\"\n",
            1,
        );
        s.reload(parse(&d)).unwrap();
        assert_eq!(s.backend("d").unwrap().send_proxy(), Some(ProxyVersion::V1));
    }

    #[test]
    fn a_check_on_the_traffic_port_sends_the_header_and_one_on_its_own_port_does_not() {
        let t = text("", "", &[("a", 1)]).replacen(
            "health_check = \"none\"\n",
            "send_proxy = \"v1\"\n",
            1,
        );
        let c = parse(&t);
        let p = probe(&c.backends[0], &c).unwrap();
        assert_eq!(p.send_proxy, Some(crate::config::ProxyVersion::V1));
        let c = parse(&t.replacen("send_proxy", "health_port = 9\nsend_proxy", 1));
        assert_eq!(probe(&c.backends[0], &c).unwrap().send_proxy, None);
    }

    #[tokio::test]
    async fn fields_made_into_sockets_or_threads_are_refused_by_name() {
        let s = shared(&text("workers = 2", "", &[("a", 1)]));
        let before = s.runtime();
        let err = s
            .reload(parse(
                &text("workers = 4\nruntime = \"per-core\"\nstate_file = \"/tmp/x\"\nconnect_timeout = \"9s\"", "", &[("a", 1)])
                    .replace("name = \"web\"", "name = \"www\""),
            ))
            .unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            ["state_file", "workers", "runtime", "service[0].name"]
        );
        assert!(err.to_string().contains("workers (2 -> 4)"), "{err}");
        assert!(
            Arc::ptr_eq(&before, &s.runtime()),
            "nothing of a refused file applies"
        );
    }

    #[tokio::test]
    async fn a_removed_backend_stays_listed_while_it_carries_connections_even_if_started() {
        let s = shared(&text("", "", &[("a", 1), ("b", 1)]));
        let b = s.backend("b").unwrap();
        let conn = b
            .try_acquire("127.0.0.1:9".parse().unwrap(), "web".into())
            .ok()
            .unwrap();
        s.reload(parse(&text("", "", &[("a", 1)]))).unwrap();
        b.start();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            s.backend("b").is_some(),
            "listed while a connection is on it"
        );
        assert_eq!(s.live(), 1);
        drop(conn);
        let gone = async {
            while s.backend("b").is_some() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("b dropped once empty");
    }

    #[tokio::test]
    async fn balancing_settings_apply_and_a_backend_added_by_a_reload_slow_starts() {
        use crate::config::{Affinity, Balance};
        let s = shared(&text("", "", &[("a", 1), ("b", 1)]));
        assert_eq!(s.services[0].route().balance(), Balance::RoundRobin);
        let t = text("", "", &[("a", 1), ("b", 1), ("c", 1)])
            .replace(
                "backend_port = 80\n",
                "backend_port = 80\nbalance = \"source-hash\"\naffinity = \"network\"\n",
            )
            .replacen(
                "name = \"a\"\n",
                "name = \"a\"\nslow_start = \"1h\"\nmax_connections = 7\n",
                1,
            )
            .replacen("name = \"b\"\n", "name = \"b\"\nbackup = true\n", 1)
            .replace(
                "[[backend]]\nname = \"c\"",
                "[health]\nslow_start = \"1h\"\n[[backend]]\nname = \"c\"",
            );
        s.reload(parse(&t)).unwrap();
        assert_eq!(
            s.services[0].route().balance(),
            Balance::SourceHash(Affinity::Network)
        );
        let (a, b, c) = (
            s.backend("a").unwrap(),
            s.backend("b").unwrap(),
            s.backend("c").unwrap(),
        );
        assert_eq!(a.slow_start(), Some(Duration::from_secs(3600)));
        assert_eq!(a.max_connections(), Some(7));
        assert!(
            a.ramping_weight().is_none(),
            "a reload does not make a running backend cold"
        );
        assert!(
            b.is_backup() && b.slow_start().is_some(),
            "[health] slow_start for all"
        );
        assert!(
            c.ramping_weight().is_some(),
            "a backend new to traffic slow-starts"
        );
        // And back: every setting can be taken away by a reload too.
        s.reload(parse(&text("", "", &[("a", 1), ("b", 1)])))
            .unwrap();
        assert_eq!(s.services[0].route().balance(), Balance::RoundRobin);
        assert_eq!(
            (a.slow_start(), a.max_connections(), b.is_backup()),
            (None, None, false)
        );
    }
}
