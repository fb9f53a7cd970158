//! What each operation does to the balancer, and the views it answers
//! with. Every state change is logged as an audit line naming who asked.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::Full;
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};

use super::route::{Op, Page};
use super::{DASHBOARD, OPENAPI, Peer, Plane, Refusal, Reply, Who, json};
use crate::api::{
    BackendView, ConnView, HealthzView, InstanceCount, LeaveView, ReloadView, RestartView,
    ServiceView, StatsView,
};
use crate::backend::{Backend, ConnInfo, State};
use crate::cluster::Change;
use crate::health::unix_ms;
use crate::state::{Refused, Shared};

/// Who asked, for the audit log.
pub(super) struct Caller<'a> {
    pub who: Who,
    pub peer: &'a Peer,
}

impl Caller<'_> {
    /// One audit line per state change: what, on which backend, by whom.
    fn audit(&self, action: &str, backend: &str) {
        tracing::info!(target: "sluice::audit", action, backend, by = %self.who, peer = %self.peer, "admin: {action} {backend}");
    }
}

pub(super) async fn execute(op: Op, plane: &Plane, caller: Caller<'_>) -> Reply {
    let shared = &plane.shared;
    let changes = matches!(
        op,
        Op::Drain { .. } | Op::Stop(_) | Op::Start(_) | Op::Leave { .. } | Op::Join | Op::Reload
    );
    if changes && plane.upgrader.as_ref().is_some_and(|u| u.frozen()) {
        // A change here now would not reach the process that serves next.
        return Refusal::new(
            StatusCode::CONFLICT,
            "this process is handing over to a new one (an upgrade): send the change again in a moment, to the new process",
        )
        .reply();
    }
    // In cluster mode a change enters through etcd, applied in revision
    // order (`Shared::apply_agreed`); the local call below would apply it
    // a second time, out of that order.
    let agreed = match agree(&op, plane).await {
        Ok(agreed) => agreed,
        Err(refusal) => return refusal.reply(),
    };
    let backend = |name: &str| shared.backend(name);
    match op {
        Op::Dashboard => {
            let mut r = Reply::new(Full::new(Bytes::from_static(DASHBOARD.as_bytes())));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            // Its own inline script and style, calls to this API, and no
            // frame: another site cannot dress the buttons in its own page.
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
                ),
            );
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Op::OpenApi => {
            let mut r = Reply::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Op::Metrics => {
            let mut r = Reply::new(Full::new(Bytes::from(crate::metrics::render(shared))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        Op::Healthz => {
            if shared.shutting_down.load(Ordering::SeqCst) {
                let v = HealthzView {
                    status: "shutting down".into(),
                    problems: Vec::new(),
                    time_ms: None,
                    ..whoami(shared)
                };
                json(StatusCode::SERVICE_UNAVAILABLE, &v)
            } else {
                // Still 200 with problems: it serves, and a failover
                // would not mend a disk. Leaving is 503 on purpose: the
                // floating address's check fails and the peer takes it.
                let problems = shared.problems();
                let (code, status) = if shared.leaving.is_on() {
                    (StatusCode::SERVICE_UNAVAILABLE, "leaving")
                } else if problems.is_empty() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::OK, "degraded")
                };
                let v = HealthzView {
                    status: status.into(),
                    problems,
                    time_ms: Some(unix_ms()),
                    ..whoami(shared)
                };
                json(code, &v)
            }
        }
        Op::Stats => {
            let s = &shared.stats;
            let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            let v = StatsView {
                abandoned: n(&s.abandoned),
                accept_errors: n(&s.accept_errors),
                accepted: n(&s.accepted),
                active_connections: shared.live(),
                admin_rejected: n(&s.admin_rejected),
                admin_unauthorized: n(&s.admin_unauthorized),
                established: n(&s.established),
                rejected_limit: n(&s.rejected_limit),
                rejected_proxy_header: n(&s.rejected_proxy_header),
                rejected_no_backend: n(&s.rejected_no_backend),
                rejected_backend_full: n(&s.rejected_backend_full),
                rejected_resources: n(&s.rejected_resources),
                state_file_failures: n(&shared.persist.failures),
                resource_shortages: n(&s.shortage.total),
            };
            json(StatusCode::OK, &v)
        }
        Op::Services => {
            let views: Vec<_> = shared
                .services
                .iter()
                .map(|s| {
                    let route = s.route();
                    let balance = route.balance();
                    let names = |backup: Option<bool>| {
                        route
                            .members()
                            .iter()
                            .filter(|(b, _)| backup.is_none_or(|x| b.is_backup() == x))
                            .map(|(b, _)| b.name.clone())
                            .collect()
                    };
                    ServiceView {
                        name: s.name.to_string(),
                        listen: s.listen.to_string(),
                        balance: balance.as_str().into(),
                        affinity: balance.affinity().map(|a| a.as_str().into()),
                        backends: names(None),
                        backups: names(Some(true)),
                        accept_proxy: s.accept_proxy().map(crate::config::format_duration),
                        refused: crate::events::Reason::ALL
                            .iter()
                            .map(|&r| (r.as_str().to_string(), s.counts.refused_total(r)))
                            .collect(),
                    }
                })
                .collect();
            json(StatusCode::OK, &views)
        }
        Op::Backends => {
            let views: Vec<_> = shared
                .backends()
                .iter()
                .map(|b| backend_view(b, shared))
                .collect();
            json(StatusCode::OK, &views)
        }
        // A backend removed between routing and here is simply gone.
        Op::Backend(name) => with(backend(&name), &name, |b| {
            json(StatusCode::OK, &backend_view(&b, shared))
        }),
        Op::Connections { name, page } => with(backend(&name), &name, |b| {
            connections_page(&b, shared, page)
        }),
        Op::Drain { name, wait, policy } => {
            let Some(b) = backend(&name) else {
                return gone(&name);
            };
            caller.audit("drain", &name);
            if let Some(limit) = wait {
                // Also over when someone starts the backend again meanwhile.
                if agreed {
                    b.wait_until(limit, |b| b.is_drained() || b.state() == State::Active)
                        .await;
                } else {
                    b.drain(policy, &shared.tasks).wait(limit).await;
                }
            } else if !agreed {
                b.drain(policy, &shared.tasks);
            }
            let status = if b.is_drained() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            changed(&b, shared, status).await
        }
        Op::Stop(name) => {
            let Some(b) = backend(&name) else {
                return gone(&name);
            };
            caller.audit("stop", &name);
            // This process's and a previous one's, which a stop closes too.
            let before = b.live() + b.elsewhere();
            if !agreed {
                b.stop();
            }
            // Closing is asynchronous; give the connections a moment so
            // the reply shows the count they leave behind.
            b.wait_until(Duration::from_secs(1), |b| b.live() == 0)
                .await;
            let saved = save_in_background(shared).await.ok().flatten();
            let mut view = backend_view(&b, shared);
            view.saved = saved;
            view.closed = Some(before.saturating_sub(b.live() + b.elsewhere()));
            json(StatusCode::OK, &view)
        }
        Op::Start(name) => {
            let Some(b) = backend(&name) else {
                return gone(&name);
            };
            caller.audit("start", &name);
            if !agreed {
                b.start();
            }
            changed(&b, shared, StatusCode::OK).await
        }
        Op::Leave { wait, force_after } => {
            caller.audit("leave", "sluice");
            shared.leave(force_after);
            let spawn_save = save_in_background(shared);
            if let Some(limit) = wait {
                shared.left(limit).await;
            }
            let saved = spawn_save.await.ok().flatten();
            let v = leave_view(shared, saved);
            let code = if v.left {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            json(code, &v)
        }
        Op::Join => {
            caller.audit("join", "sluice");
            shared.join();
            let saved = save_in_background(shared).await.ok().flatten();
            json(StatusCode::OK, &leave_view(shared, saved))
        }
        Op::Reload => {
            let Some(path) = &plane.config_path else {
                return Refusal::new(
                    StatusCode::CONFLICT,
                    "this sluice was not started from a configuration file (`sluice run --config FILE`): there is nothing to read again",
                )
                .reply();
            };
            caller.audit("reload", "sluice");
            let file = path.display().to_string();
            match shared.reload_file(path) {
                Ok(applied) => json(
                    StatusCode::OK,
                    &ReloadView {
                        result: "applied".into(),
                        file,
                        added: applied.added,
                        removed: applied.removed,
                        error: None,
                        line: None,
                        field: None,
                        needs_restart: Vec::new(),
                    },
                ),
                Err(refused) => {
                    let (line, field, needs_restart) = match &refused {
                        Refused::Load(e) => (e.line, e.field.clone(), Vec::new()),
                        Refused::Restart(r) => (
                            None,
                            None,
                            r.0.iter()
                                .map(|c| RestartView {
                                    field: c.field.clone(),
                                    from: c.from.clone(),
                                    to: c.to.clone(),
                                })
                                .collect(),
                        ),
                    };
                    json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &ReloadView {
                            result: "refused".into(),
                            file,
                            added: Vec::new(),
                            removed: Vec::new(),
                            error: Some(refused.to_string()),
                            line,
                            field,
                            needs_restart,
                        },
                    )
                }
            }
        }
        // `handle` answers it with a stream; it never comes here.
        Op::Events { .. } => Refusal::new(StatusCode::NOT_FOUND, "no such path: /events").reply(),
        Op::Upgrade { binary } => {
            let Some(upgrader) = &plane.upgrader else {
                return Refusal::new(
                    StatusCode::CONFLICT,
                    "this sluice cannot upgrade itself (it was not started by `sluice run`)",
                )
                .reply();
            };
            caller.audit("upgrade", "sluice");
            match upgrader.upgrade(binary).await {
                Ok(report) => json(StatusCode::OK, &report),
                // Nothing changed: this process serves on.
                Err(why) => Refusal::new(StatusCode::CONFLICT, why).reply(),
            }
        }
    }
}

/// In cluster mode, a backend's change is agreed in etcd, and applied
/// here and everywhere from there: `Ok(true)`. `Ok(false)`: not a cluster
/// change, to apply here. Refused, and applied nowhere, when etcd cannot
/// take it.
async fn agree(op: &Op, plane: &Plane) -> Result<bool, Refusal> {
    let (name, change) = match op {
        Op::Drain { name, policy, .. } => (name, Change::Drain(*policy)),
        Op::Stop(name) => (name, Change::Stop),
        Op::Start(name) => (name, Change::Start),
        _ => return Ok(false),
    };
    // Not a cluster, or no such backend here (the reply is 404, and
    // nothing is written for a name that is a typo).
    if plane.shared.cluster().is_none() || plane.shared.backend(name).is_none() {
        return Ok(false);
    }
    let Some(cluster) = &plane.cluster else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster mode without a session to etcd: changes are refused",
        ));
    };
    match cluster.write(name, change).await {
        Ok(()) => Ok(true),
        Err(why) => Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, why)),
    }
}

/// Writes the state file off the runtime; the task yields whether the
/// file holds the states (`None` without a state file).
fn save_in_background(shared: &Arc<Shared>) -> tokio::task::JoinHandle<Option<bool>> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || shared.save_states())
}

/// The reply to a state change: the backend as it is now, saved to the
/// state file first so the reply can say whether it was.
async fn changed(b: &Arc<Backend>, shared: &Arc<Shared>, status: StatusCode) -> Reply {
    let saved = save_in_background(shared).await.ok().flatten();
    let mut view = backend_view(b, shared);
    view.saved = saved;
    json(status, &view)
}

fn gone(name: &str) -> Reply {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("no backend is named `{name}`"),
    )
    .reply()
}

fn with(b: Option<Arc<Backend>>, name: &str, f: impl FnOnce(Arc<Backend>) -> Reply) -> Reply {
    b.map_or_else(|| gone(name), f)
}

/// One backend as the API shows it.
fn backend_view(b: &Backend, shared: &Shared) -> BackendView {
    let health = b.health();
    BackendView {
        services: shared.services_of(b),
        name: b.name.clone(),
        address: b.address().to_string(),
        state: b.state(),
        healthy: health.up,
        health_checked: health.checked,
        down_reason: if health.up {
            None
        } else {
            health.why_down.clone()
        },
        closed: None,
        weight: b.weight(),
        // Rounded, so that the view does not show float noise.
        effective_weight: b.ramping_weight().map(|w| (w * 100.0).round() / 100.0),
        slow_start: b.slow_start().map(crate::config::format_duration),
        max_connections: b.max_connections(),
        backup: b.is_backup(),
        send_proxy: b.send_proxy(),
        // After an upgrade, the previous process's too, until it has gone;
        // in cluster mode, every live instance's.
        active_connections: b.live() + b.elsewhere() + b.peers_live(),
        instances: shared.cluster().map_or_else(Vec::new, |c| {
            let here = InstanceCount {
                instance: c.config.instance.clone(),
                state: b.state(),
                active_connections: b.live() + b.elsewhere(),
            };
            std::iter::once(here).chain(c.counts(b)).collect()
        }),
        idle_connections: b.idle_count(crate::backend::IDLE_AFTER),
        total_connections: b.total_connections.load(Ordering::Relaxed),
        connect_failures: b.connect_failures(),
        bytes_in: b.bytes_in.load(Ordering::Relaxed),
        bytes_out: b.bytes_out.load(Ordering::Relaxed),
        bytes_spliced: b.bytes_spliced.load(Ordering::Relaxed),
        state_since_ms: b.state_since_ms(),
        health_since_ms: health.since_ms,
        last_ok_check_ms: health.last_ok_check_ms,
        saved: shared
            .runtime()
            .config
            .state_file
            .as_ref()
            .map(|_| !shared.persist.is_failing()),
    }
}

/// One page of a backend's connections: this process's in id order, then
/// those a previous process still holds, in pid and id order. A `Link`
/// header names the next page; the last page has none.
fn connections_page(b: &Backend, shared: &Shared, page: Page) -> Reply {
    let me = std::process::id();
    // Where the cursor points: into this process's rows (no pid, or this
    // pid) or into the previous process's.
    let (mine, previous) = match page.after {
        None => (Some(None), None),
        Some((Some(pid), id)) if pid != me => (None, Some((pid, id))),
        Some((_, id)) => (Some(Some(id)), None),
    };
    let mut rows = Vec::new();
    let mut more = false;
    if let Some(after) = mine {
        let (conns, m) = b.connections_page(after, page.limit);
        rows.extend(conns.iter().map(|c| conn_view(c)));
        more = m;
    }
    if !more {
        // With no room left this still says whether any follow.
        let room = page.limit - rows.len();
        let (held, m) = shared.previous_connections_page(&b.name, previous, room);
        rows.extend(held);
        more = m;
    }
    let mut r = json(StatusCode::OK, &rows);
    if let Some(last) = rows.last().filter(|_| more) {
        // Always with the row's pid: after an upgrade the cursor reaches
        // the new process, which must not read it as one of its own ids.
        let next = format!(
            "</backends/{}/connections?after={}&pid={}&limit={}>; rel=\"next\"",
            path_segment(&b.name),
            last.id,
            last.pid,
            page.limit
        );
        if let Ok(v) = HeaderValue::from_str(&next) {
            r.headers_mut().insert(header::LINK, v);
        }
    }
    r
}

/// A backend's name as one segment of a path: `.` stays as it is unless
/// the name is only dots, which clients would resolve away.
fn path_segment(name: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');
    const KEEP_DOTS: &AsciiSet = &KEEP.remove(b'.');
    let set = if name.chars().all(|c| c == '.') {
        KEEP
    } else {
        KEEP_DOTS
    };
    utf8_percent_encode(name, set).to_string()
}

/// One live connection as the API shows it.
fn conn_view(c: &ConnInfo) -> ConnView {
    ConnView::of(c, std::process::id())
}

/// Whether this instance leaves its pair, and what it still carries.
fn leave_view(shared: &Shared, saved: Option<bool>) -> LeaveView {
    if saved == Some(false) {
        tracing::warn!("the leaving flag is not saved: a restart now would forget it");
    }
    let active_connections = shared.live_everywhere();
    let leaving = shared.leaving.is_on();
    LeaveView {
        leaving,
        since_ms: shared.leaving.since_ms(),
        active_connections,
        left: shared.has_left(),
    }
}

/// The process answering: who it is and the one it took over from.
fn whoami(shared: &Shared) -> HealthzView {
    HealthzView {
        status: String::new(),
        problems: Vec::new(),
        time_ms: None,
        pid: std::process::id(),
        version: crate::upgrade::version(),
        commit: crate::upgrade::commit().to_string(),
        started_ms: shared.started_ms,
        previous: shared.previous(),
        active_connections: shared.live_everywhere(),
        leaving_since_ms: shared.leaving.since_ms(),
        left: shared.leaving.is_on().then(|| shared.has_left()),
        cluster: shared.cluster().map(|c| c.view()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::{BackendAddress, Config};

    /// Walks every page from the first, following each `Link` through the
    /// router as a client's next request would go; returns each page's
    /// rows as (pid, id).
    fn walk(b: &Backend, shared: &Shared, limit: usize) -> Vec<Vec<(u32, u64)>> {
        let mut pages = Vec::new();
        let mut target = format!("/backends/a/connections?limit={limit}");
        loop {
            let (path, query) = target.split_once('?').unwrap();
            let page =
                match super::super::route::route(&hyper::Method::GET, path, query, |n| n == "a") {
                    Ok(Op::Connections { page, .. }) => page,
                    other => panic!("{target}: {other:?}"),
                };
            let r = connections_page(b, shared, page);
            let next = r.headers().get(header::LINK).map(|v| {
                let v = v.to_str().unwrap();
                v[1..v.find('>').unwrap()].to_string()
            });
            let body = body_of(r);
            let rows: Vec<ConnView> = serde_json::from_slice(&body).unwrap();
            pages.push(rows.iter().map(|c| (c.pid, c.id)).collect());
            match next {
                Some(n) => target = n,
                None => return pages,
            }
        }
    }

    /// A reply's whole body; it is one buffer.
    fn body_of(r: Reply) -> Bytes {
        use hyper::body::Body;
        let mut body = r.into_body();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let frame = std::pin::Pin::new(&mut body).poll_frame(&mut cx);
        match frame {
            std::task::Poll::Ready(Some(Ok(f))) => f.into_data().unwrap(),
            _ => Bytes::new(),
        }
    }

    #[test]
    fn a_previous_process_s_connections_follow_this_process_s_by_pid_and_id() {
        let text = "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
                    [[backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nhealth_check = \"none\"\n";
        let config = Config::parse("t.toml", text).unwrap();
        let listens: Vec<_> = config.services.iter().map(|s| s.listen).collect();
        let shared = Shared::new(config, &listens, &Default::default());
        let b = shared.backend("a").unwrap();
        let client = "127.0.0.1:2".parse().unwrap();
        let guards: Vec<_> = (0..3)
            .map(|_| b.try_acquire(client, "web".into()).unwrap())
            .collect();
        let me = std::process::id();
        let mine: Vec<_> = guards.iter().map(|g| (me, g.info().id)).collect();
        // Two earlier processes (one took over from the other), whose ids
        // are this process's too.
        let held = |pid: u32, id: u64| ConnView {
            id,
            pid,
            client: "127.0.0.1:3".into(),
            service: "web".into(),
            age_ms: 0,
            idle_ms: 0,
            bytes_in: 0,
            bytes_out: 0,
        };
        let (p1, p2) = (1, 2);
        assert!(me > p2);
        let rows = vec![held(p2, 1), held(p1, 9), held(p2, mine[2].1), held(p1, 1)];
        shared.previous_started(p1, "0.0.0".into());
        shared.previous_holds([("a".to_string(), rows)].into());

        let mut want = mine.clone();
        want.extend([(p1, 1), (p1, 9), (p2, 1), (p2, mine[2].1)]);
        want[3..].sort();
        for limit in [1, 2, 3, 4, 7, 8] {
            let pages = walk(&b, &shared, limit);
            let all: Vec<_> = pages.concat();
            assert_eq!(all, want, "limit {limit}: {pages:?}");
            assert!(pages.iter().all(|p| p.len() <= limit));
            assert!(pages[..pages.len() - 1].iter().all(|p| p.len() == limit));
        }
    }

    /// What one page costs with 100,000 live connections: picking it from
    /// the table, the views and the JSON. A measurement, so run it in a
    /// release build:
    /// `cargo test --release --lib -- --ignored --nocapture a_page_of_100k`.
    #[test]
    #[ignore = "a measurement, for a release build"]
    fn a_page_of_100k_connections() {
        const N: u64 = 100_000;
        let b = Arc::new(Backend::new(
            "b".into(),
            BackendAddress::parse("127.0.0.1:1").unwrap(),
            1,
            State::Active,
        ));
        let client = "127.0.0.1:2".parse().unwrap();
        let guards: Vec<_> = (0..N)
            .map(|_| b.try_acquire(client, "s".into()).unwrap())
            .collect();
        let first = guards[0].info().id;
        // For comparison: the whole list in one reply, as before pages.
        let t = Instant::now();
        let views: Vec<_> = b.connections().iter().map(|c| conn_view(c)).collect();
        let body = json(StatusCode::OK, &views);
        let bytes = hyper::body::Body::size_hint(body.body()).exact();
        eprintln!("the whole list: {:?}, {bytes:?} bytes", t.elapsed());
        for (what, after) in [
            ("first", None),
            ("middle", Some(first + N / 2)),
            ("last", Some(first + N - 500)),
        ] {
            for limit in [1000, crate::admin::route::MAX_PAGE] {
                let t = Instant::now();
                let (page, more) = b.connections_page(after, limit);
                let picked = t.elapsed();
                let views: Vec<_> = page.iter().map(|c| conn_view(c)).collect();
                let body = json(StatusCode::OK, &views);
                let all = t.elapsed();
                let bytes = hyper::body::Body::size_hint(body.body()).exact();
                eprintln!(
                    "{what} page, limit {limit}: {} rows (more: {more}), picked in {picked:?}, with views and JSON {all:?}, {bytes:?} bytes",
                    page.len(),
                );
            }
        }
    }
}
