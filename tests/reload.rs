//! State that survives restarts and reloads: the state file, and SIGHUP.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;

use support::*;

fn config(state_file: &str, backends: &[(&str, SocketAddr, u32)]) -> String {
    let mut t = format!(
        "{state_file}\n[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n"
    );
    for (name, addr, weight) in backends {
        t.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\nhealth_check = \"none\"\n"
        ));
    }
    t
}

fn start(path: &std::path::Path) -> (Proc, SocketAddr, SocketAddr) {
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    (p, addr, admin)
}

async fn greeting(addr: SocketAddr) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = within("greeting", read_line(&mut s)).await;
    (s, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_stays_drained_across_a_restart() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let text = config(
        &format!("state_file = \"{}\"", state.display()),
        &[("a", a.addr, 1), ("b", b.addr, 1)],
    );
    let (_d, path) = write_config(&text);

    let (mut p, _, admin) = start(&path);
    let (status, v) = http(admin, "POST", "/backends/b/drain", None).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("drained")));
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));

    let (mut p, addr, admin) = start(&path);
    let (_, v) = http(admin, "GET", "/backends/b", None).await;
    assert_eq!(v["state"], "drained", "restored from {}", state.display());
    for _ in 0..4 {
        assert_eq!(greeting(addr).await.1, "a");
    }
    http(admin, "POST", "/backends/b/start", None).await;
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains("\"b\": \"active\""), "{saved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_state_file_stops_the_start_with_its_name() {
    let a = Echo::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, "{ not json").unwrap();
    let text = config(
        &format!("state_file = \"{}\"", state.display()),
        &[("a", a.addr, 1)],
    );
    let (_d, path) = write_config(&text);
    let err = run_must_fail(&path);
    assert!(
        err.contains("state.json") && err.contains("delete it"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_backend_changes_without_cutting_connections() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let (_d, path) = write_config(&config("", &[("a", a.addr, 1), ("b", b.addr, 1)]));
    let (mut p, addr, admin) = start(&path);

    let (_on_a, first) = greeting(addr).await;
    let (mut on_b, second) = greeting(addr).await;
    assert_eq!((first.as_str(), second.as_str()), ("a", "b"));
    http(admin, "POST", "/backends/a/stop", None).await;

    // b removed, c added, a's weight doubled.
    std::fs::write(&path, config("", &[("a", a.addr, 2), ("c", c.addr, 1)])).unwrap();
    p.signal("HUP");
    p.wait_line("configuration reloaded");

    let (_, v) = http(admin, "GET", "/backends", None).await;
    let states: HashMap<String, String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().into(),
                b["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(states["a"], "stopped", "admin states survive a reload");
    assert_eq!(states["b"], "draining", "a removed backend drains first");
    assert_eq!(states["c"], "active");
    echo(&mut on_b, b"the reload cut nothing").await;

    http(admin, "POST", "/backends/a/start", None).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..6 {
        *counts.entry(greeting(addr).await.1).or_default() += 1;
    }
    assert_eq!(counts.get("a"), Some(&4), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&2), "{counts:?}");

    drop(on_b);
    wait_for("b dropped once drained", || async {
        let (_, v) = http(admin, "GET", "/backends", None).await;
        v.as_array().unwrap().iter().all(|b| b["name"] != "b")
    })
    .await;
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_on_reload_is_refused_and_the_old_one_stays() {
    let a = Echo::start("a").await;
    let (_d, path) = write_config(&config("", &[("a", a.addr, 1)]));
    let (mut p, addr, admin) = start(&path);
    std::fs::write(
        &path,
        "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbogus = 1\n",
    )
    .unwrap();
    p.signal("HUP");
    let line = p.wait_line("reload refused");
    assert!(line.contains("bogus"), "{line}");
    assert_eq!(greeting(addr).await.1, "a");
    let (status, _) = http(admin, "GET", "/backends/a", None).await;
    assert_eq!(status, 200);

    // A change that needs new sockets is refused too.
    std::fs::write(
        &path,
        config("", &[("a", a.addr, 1)]).replace("name = \"web\"", "name = \"www\""),
    )
    .unwrap();
    p.signal("HUP");
    p.wait_line("needs a restart");
    assert_eq!(greeting(addr).await.1, "a");
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
}

/// Whether a new client is served (greeted) or closed at once.
async fn served(addr: SocketAddr) -> Option<tokio::net::TcpStream> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = within("greeting or close", read_line(&mut s)).await;
    (!name.is_empty()).then_some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_lowered_while_busy_applies_as_connections_end_and_can_rise_again() {
    let a = Echo::start("a").await;
    let cfg = |max: usize| {
        sluice::Config::parse(
            "t.toml",
            &support::config(&format!("max_connections = {max}"), "", &[("a", a.addr)]),
        )
        .unwrap()
    };
    let server = sluice::Sluice::bind(cfg(2)).await.unwrap();
    let shared = server.shared().clone();
    let addr = server.service_addr("web").unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let first = served(addr).await.expect("first served");
    let second = served(addr).await.expect("second served");
    shared.reload(cfg(1)).unwrap();
    assert!(served(addr).await.is_none(), "over the old limit");
    drop(second);
    wait_for("second gone", || async {
        shared.backend("a").unwrap().live() == 1
    })
    .await;
    assert!(
        served(addr).await.is_none(),
        "the freed slot paid the debt: one live is the new limit"
    );

    shared.reload(cfg(3)).unwrap();
    let third = served(addr).await.expect("room again after the raise");
    let fourth = served(addr).await.expect("limit 3: three live");
    assert!(served(addr).await.is_none(), "limit 3 holds");
    drop((first, third, fourth));
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_admin_request_timeout_applies_to_the_next_admin_connection() {
    let a = Echo::start("a").await;
    let cfg = |t: &str| {
        support::config(
            "shutdown_grace = \"100ms\"",
            &format!("request_timeout = \"{t}\""),
            &[("a", a.addr)],
        )
    };
    let (shared, _, admin, stop, task) = bound(&cfg("1h")).await;
    shared
        .reload(sluice::Config::parse("t.toml", &cfg("200ms")).unwrap())
        .unwrap();
    // A request that never finishes its head: closed after the new timeout,
    // well before the old hour.
    let mut slow = tokio::net::TcpStream::connect(admin).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /backends HTTP/1.1\r\n")
        .await
        .unwrap();
    assert!(closed_by_peer(&mut slow).await, "still open after 200ms");
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_shutdown_grace_applies_at_the_next_shutdown() {
    let a = Echo::start("a").await;
    let cfg = |g: &str| support::config(&format!("shutdown_grace = \"{g}\""), "", &[("a", a.addr)]);
    let (shared, addr, _, stop, task) = bound(&cfg("1h")).await;
    shared
        .reload(sluice::Config::parse("t.toml", &cfg("100ms")).unwrap())
        .unwrap();
    let (mut held, name) = greeting(addr).await;
    assert_eq!(name, "a");
    let _ = stop.send(());
    // The held connection keeps shutdown waiting for the grace period:
    // the reloaded 100ms, not the hour sluice started with.
    within("shutdown after the reloaded grace", task)
        .await
        .unwrap()
        .unwrap();
    assert!(closed_by_peer(&mut held).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_workers_is_refused_by_name() {
    let a = Echo::start("a").await;
    let cfg = |w: u32| {
        support::config(
            &format!("workers = {w}\nshutdown_grace = \"100ms\""),
            "",
            &[("a", a.addr)],
        )
    };
    let (shared, addr, _, stop, task) = bound(&cfg(1)).await;
    let err = shared
        .reload(sluice::Config::parse("t.toml", &cfg(2)).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("workers (1 -> 2)"), "{err}");
    assert_eq!(
        greeting(addr).await.1,
        "a",
        "the running configuration stays"
    );
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_and_added_back_keeps_its_admin_state() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let top = format!(
        "state_file = \"{}\"\nshutdown_grace = \"100ms\"",
        state.display()
    );
    let both = support::config(&top, "", &[("a", a.addr), ("b", b.addr)]);
    let only_a = support::config(&top, "", &[("a", a.addr)]);
    let parse = |t: &str| sluice::Config::parse("t.toml", t).unwrap();
    let (shared, addr, admin, stop, task) = bound(&both).await;
    let state_of = |name: &'static str| async move {
        let (status, v) = http(admin, "GET", &format!("/backends/{name}"), None).await;
        (status == 200).then(|| v["state"].as_str().unwrap().to_string())
    };
    // Either format: the start may not have rewritten an older file yet.
    let saved = || -> HashMap<String, String> {
        let saved = sluice::state::load_state_file(&state).unwrap();
        saved
            .backends
            .into_iter()
            .map(|(n, s)| (n, s.as_str().to_string()))
            .collect()
    };

    // Drained by an admin, removed, dropped, added back: still drained.
    http(admin, "POST", "/backends/b/drain", None).await;
    shared.reload(parse(&only_a)).unwrap();
    wait_for("b dropped", || async { state_of("b").await.is_none() }).await;
    wait_for("the state file keeps b", || async {
        saved().get("b").map(String::as_str) == Some("drained")
    })
    .await;
    shared.reload(parse(&both)).unwrap();
    assert_eq!(state_of("b").await.as_deref(), Some("drained"));
    for _ in 0..4 {
        assert_eq!(greeting(addr).await.1, "a", "b takes no client");
    }

    // Draining with a client on it, removed and added back before the
    // client leaves: still draining, not active.
    http(admin, "POST", "/backends/b/start", None).await;
    http(admin, "POST", "/backends/a/drain", None).await;
    let (on_b, name) = greeting(addr).await;
    assert_eq!(name, "b");
    http(admin, "POST", "/backends/a/start", None).await;
    http(admin, "POST", "/backends/b/drain", None).await;
    shared.reload(parse(&only_a)).unwrap();
    shared.reload(parse(&both)).unwrap();
    assert_eq!(state_of("b").await.as_deref(), Some("draining"));
    drop(on_b);
    wait_for("b drained", || async {
        state_of("b").await.as_deref() == Some("drained")
    })
    .await;

    // Active before its removal: active again when it comes back, whether
    // its removal drain had ended or not.
    http(admin, "POST", "/backends/b/start", None).await;
    shared.reload(parse(&only_a)).unwrap();
    wait_for("b dropped", || async { state_of("b").await.is_none() }).await;
    // The writer runs on its own: the file holds b as it was before its
    // removal's own drain once that write lands.
    wait_for("the state file keeps b active", || async {
        saved().get("b").map(String::as_str) == Some("active")
    })
    .await;
    shared.reload(parse(&both)).unwrap();
    assert_eq!(state_of("b").await.as_deref(), Some("active"));
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();

    // A restart with b out of the file keeps its saved state for later.
    std::fs::write(&state, r#"{"a": "active", "b": "stopped"}"#).unwrap();
    let (shared, _, admin, stop, task) = bound(&only_a).await;
    assert_eq!(saved()["b"], "stopped", "written at start, b kept");
    shared.reload(parse(&both)).unwrap();
    let (_, v) = http(admin, "GET", "/backends/b", None).await;
    assert_eq!(v["state"], "stopped");
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

/// `sluice ctl` against the admin API at `admin`.
async fn ctl(admin: SocketAddr, args: &[&str]) -> (Option<i32>, String, String) {
    let out = within(
        "sluice ctl",
        tokio::process::Command::new(BIN)
            .args(["ctl", "--admin", &format!("http://{admin}")])
            .args(args)
            .env_remove("SLUICE_ADMIN")
            .env_remove("SLUICE_TOKEN")
            .output(),
    )
    .await
    .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), s(&out.stdout), s(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reload_applies_the_file_or_says_where_it_is_wrong() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let (_d, path) = write_config(&config("", &[("a", a.addr, 1)]));
    let (mut p, addr, admin) = start(&path);

    // Applied: the reply names the file and the backend it added.
    std::fs::write(&path, config("", &[("a", a.addr, 1), ("b", b.addr, 1)])).unwrap();
    let (code, out, err) = ctl(admin, &["reload"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let file = path.display().to_string();
    assert!(
        out.contains(&format!("reloaded {file}: applied; added b")),
        "{out}"
    );
    assert_eq!(http(admin, "GET", "/backends/b", None).await.0, 200);

    // A file that does not load: refused with its file, line and field,
    // exit 1, and the running configuration stays.
    let broken = config("", &[("a", a.addr, 1), ("b", b.addr, 1)]).replace(
        &format!("address = \"{}\"", b.addr),
        "address = \"nowhere:x\"",
    );
    std::fs::write(&path, &broken).unwrap();
    let line = broken.lines().position(|l| l.contains("nowhere")).unwrap() + 1;
    let (code, out, err) = ctl(admin, &["reload"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("reload refused, the running configuration stays")
            && err.contains(&format!("{file}:{line}: backend[1].address")),
        "{err}"
    );
    let (status, v) = http(admin, "POST", "/reload", None).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(
        (
            v["result"].as_str(),
            v["line"].as_u64(),
            v["field"].as_str()
        ),
        (
            Some("refused"),
            Some(line as u64),
            Some("backend[1].address")
        )
    );
    assert_eq!(http(admin, "GET", "/backends/b", None).await.0, 200);

    // A change only a restart applies: each such field, from and to.
    std::fs::write(
        &path,
        config("workers = 7", &[("a", a.addr, 1)]).replace("name = \"web\"", "name = \"www\""),
    )
    .unwrap();
    let (code, out, err) = ctl(admin, &["reload"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("apply only when sluice restarts")
            && err.contains("\n  service[0].name: web -> www")
            && err.contains("\n  workers: "),
        "{err}"
    );
    let (_, v) = http(admin, "POST", "/reload", None).await;
    let fields: Vec<&str> = v["needs_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["workers", "service[0].name"], "{v}");
    let served = greeting(addr).await.1;
    assert!(served == "a" || served == "b", "it serves on: {served}");
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
}
