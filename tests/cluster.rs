//! Cluster mode against a real etcd: three sluice processes share one
//! admin state. A drain sent to one drains the backend on all within about
//! a second, and is reported over only once the last connection on any of
//! them has closed; etcd's death drops no client and refuses changes; a
//! dead instance leaves the count when its lease ends; a restarted one
//! takes the cluster's state, not its stale file; racing admins end in one
//! state. Needs `etcd` (Debian's etcd-server), which scripts/test.sh
//! installs; built only with `--features cluster`.
#![cfg(feature = "cluster")]

mod support;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::netns::note;
use support::*;
use tokio::net::TcpStream;

/// etcd on two loopback ports, with its data in a temporary directory.
struct Etcd {
    proc: Option<Proc>,
    client: u16,
    peer: u16,
    dir: tempfile::TempDir,
}

/// A port free at the moment of asking.
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether etcd is here; outside CI, one line says why the test does not
/// run without it.
fn etcd_available() -> bool {
    if Path::new("/usr/bin/etcd").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "etcd is missing in CI: scripts/test.sh installs etcd-server"
    );
    eprintln!(
        "cluster tests: skipped, no /usr/bin/etcd (apt-get install etcd-server, or run scripts/test.sh)"
    );
    false
}

impl Etcd {
    async fn start() -> Etcd {
        let mut e = Etcd {
            proc: None,
            client: 0,
            peer: 0,
            dir: tempfile::tempdir().unwrap(),
        };
        // A port taken between the asking and etcd's bind: ask again.
        for _ in 0..5 {
            e.client = free_port();
            e.peer = free_port();
            if e.run().await {
                return e;
            }
        }
        panic!("etcd did not start");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// Starts etcd on its ports and data; whether it serves.
    async fn run(&mut self) -> bool {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let mut p = Proc::spawn_command(Command::new("/usr/bin/etcd").args([
            "--name",
            "t",
            "--data-dir",
            self.dir.path().join("data").to_str().unwrap(),
            "--listen-client-urls",
            &self.url(),
            "--advertise-client-urls",
            &self.url(),
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("t={peer}"),
        ]));
        let addr: SocketAddr = format!("127.0.0.1:{}", self.client).parse().unwrap();
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if p.child.try_wait().unwrap().is_some() {
                return false;
            }
            if TcpStream::connect(addr).await.is_ok() {
                let (status, v) = http(addr, "GET", "/health", None).await;
                if status == 200 && v["health"] == "true" {
                    self.proc = Some(p);
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal("KILL");
            p.wait_exit();
        }
    }

    async fn restart(&mut self) {
        assert!(self.run().await, "etcd came back on its ports");
    }
}

/// One sluice process of the cluster.
struct Instance {
    proc: Proc,
    name: String,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// The config of instance `name` of cluster `cluster`.
fn instance_config(
    etcd: &Etcd,
    cluster: &str,
    name: &str,
    state_file: &Path,
    backends: &[(&str, SocketAddr)],
) -> String {
    let top = format!(
        "shutdown_grace = \"1s\"\nstate_file = \"{}\"",
        state_file.display()
    );
    let mut text = config(&top, "", backends);
    text.push_str(&format!(
        "\n[cluster]\netcd = [\"{}\"]\nname = \"{cluster}\"\ninstance = \"{name}\"\nlease = \"2s\"\n",
        etcd.url()
    ));
    text
}

impl Instance {
    fn start(etcd: &Etcd, cluster: &str, name: &str, backends: &[(&str, SocketAddr)]) -> Instance {
        Self::start_with_lease(etcd, cluster, name, backends, "2s")
    }

    fn start_with_lease(
        etcd: &Etcd,
        cluster: &str,
        name: &str,
        backends: &[(&str, SocketAddr)],
        lease: &str,
    ) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let text = instance_config(etcd, cluster, name, &state, backends)
            .replace("lease = \"2s\"", &format!("lease = \"{lease}\""));
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, text).unwrap();
        Self::run(name, dir, path)
    }

    fn run(name: &str, dir: tempfile::TempDir, path: PathBuf) -> Instance {
        let mut proc = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
        let addr = addr_after(&proc.wait_line("service=web "), "listen=");
        let admin = addr_after(&proc.wait_line("admin API listening"), "listen=");
        Instance {
            proc,
            name: name.into(),
            addr,
            admin,
            _dir: dir,
            path,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        http(self.admin, "GET", path, None).await
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        http(self.admin, "POST", path, None).await
    }

    async fn backend(&self, name: &str) -> Value {
        let (status, v) = self.get(&format!("/backends/{name}")).await;
        assert_eq!(status, 200, "{}: {v}", self.name);
        v
    }

    async fn state(&self, name: &str) -> String {
        self.backend(name).await["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A client through this instance that landed on `backend`.
    async fn connect_to(&self, backend: &str) -> TcpStream {
        for _ in 0..50 {
            let mut s = TcpStream::connect(self.addr).await.unwrap();
            if within("greeting", read_line(&mut s)).await == backend {
                return s;
            }
        }
        panic!("{}: no client reached {backend}", self.name);
    }
}

/// Reads `GET /events?last_event_id=0` of `admin` (every event it kept)
/// until each of `needles` has come, in this order; returns the text.
async fn kept_events(admin: SocketAddr, needles: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within("the kept events", async {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let req = format!("GET /events?last_event_id=0 HTTP/1.1\r\nHost: {admin}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let mut at = 0;
            let all_in_order = needles.iter().all(|n| match text[at..].find(n) {
                Some(i) => {
                    at += i + n.len();
                    true
                }
                None => false,
            });
            if all_in_order {
                return text;
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended before {needles:?}: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
}

/// Waits until every instance is connected and sees all of `names`.
async fn converged(all: &[&Instance]) {
    let names: Vec<String> = all.iter().map(|i| i.name.clone()).collect();
    for i in all {
        wait_for(&format!("{} sees the whole cluster", i.name), || async {
            let (_, h) = i.get("/healthz").await;
            let seen: Vec<String> = h["cluster"]["instances"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            h["cluster"]["connected"] == true && names.iter().all(|n| seen.contains(n))
        })
        .await;
    }
}

/// Clients that connect, hear the greeting and close, as fast as they can
/// through every instance, until `stop`: what each backend served, and
/// every failure.
#[derive(Default)]
struct Load {
    web1: AtomicUsize,
    web2: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
}

impl Load {
    fn run(addrs: Vec<SocketAddr>) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
        let load = Arc::new(Load::default());
        let tasks = addrs
            .into_iter()
            .map(|addr| {
                let load = load.clone();
                tokio::spawn(async move {
                    while !load.stop.load(Ordering::SeqCst) {
                        let name = match TcpStream::connect(addr).await {
                            Ok(mut s) => {
                                tokio::time::timeout(Duration::from_secs(5), read_line(&mut s))
                                    .await
                                    .unwrap_or_default()
                            }
                            Err(_) => String::new(),
                        };
                        match name.as_str() {
                            "web1" => &load.web1,
                            "web2" => &load.web2,
                            _ => &load.failed,
                        }
                        .fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        (load, tasks)
    }

    async fn stop(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in tasks {
            within("load end", t).await.unwrap();
        }
    }

    /// Waits until `n` more clients were served.
    async fn more(&self, n: usize) {
        let start = self.web1.load(Ordering::SeqCst) + self.web2.load(Ordering::SeqCst);
        wait_for("clients served", || async {
            self.web1.load(Ordering::SeqCst) + self.web2.load(Ordering::SeqCst) >= start + n
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_on_one_instance_drains_all_and_ends_with_the_last_connection_anywhere() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start().await;
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let backends = [("web1", web1.addr), ("web2", web2.addr)];
    let a = Instance::start(&etcd, "drain", "a", &backends);
    let b = Instance::start(&etcd, "drain", "b", &backends);
    let c = Instance::start(&etcd, "drain", "c", &backends);
    converged(&[&a, &b, &c]).await;
    let held = c.connect_to("web1").await;
    let (load, tasks) = Load::run(vec![a.addr, b.addr, c.addr]);
    load.more(30).await;

    // Drain on a: every instance stops sending web1 clients at once.
    let asked = Instant::now();
    let (status, v) = a.post("/backends/web1/drain").await;
    assert_eq!(status, 202, "c holds a connection: {v}");
    for i in [&a, &b, &c] {
        wait_for(&format!("{} draining web1", i.name), || async {
            i.state("web1").await == "draining"
        })
        .await;
    }
    let took = asked.elapsed();
    note(&format!(
        "a drain on one instance reached all three in {} ms",
        took.as_millis()
    ));
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Clients that picked web1 before the drain finish first; from then
    // on, none reaches it.
    load.more(60).await;
    let web1_before = web1.accepted();
    load.more(60).await;
    assert_eq!(
        web1.accepted(),
        web1_before,
        "no instance sent web1 a new client"
    );

    // The cluster-wide count holds c's connection, with a breakdown, and
    // the drain is not over on any instance while it is open.
    wait_for("a counts c's connection", || async {
        a.backend("web1").await["active_connections"] == 1
    })
    .await;
    let v = a.backend("web1").await;
    let on_c = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance"] == "c")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(on_c["active_connections"], 1, "{v}");
    let (status, v) = b.post("/backends/web1/drain?wait=500ms").await;
    assert_eq!((status, &v["state"]), (202, &"draining".into()), "{v}");

    // ctl on b follows the count to 0 once c's client leaves.
    let ctl = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &format!("http://{}", b.admin)])
        .args(["drain", "web1", "--wait", "20s"])
        .output();
    let ctl = tokio::spawn(ctl);
    drop(held);
    let out = within("ctl drain", ctl).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("drained"), "{text}");
    // Each says so itself once the others' reports reach it.
    for i in [&a, &b, &c] {
        wait_for(&format!("{} says web1 is drained", i.name), || async {
            i.state("web1").await == "drained"
        })
        .await;
    }

    // Start on b: all three send to web1 again.
    let (status, _) = b.post("/backends/web1/start").await;
    assert_eq!(status, 200);
    for i in [&a, &b, &c] {
        wait_for(&format!("{} sends to web1 again", i.name), || async {
            i.state("web1").await == "active"
        })
        .await;
    }
    let web1_before = web1.accepted();
    wait_for("web1 serves again", || async {
        web1.accepted() > web1_before + 10
    })
    .await;
    load.stop(tasks).await;
    assert_eq!(load.failed.load(Ordering::SeqCst), 0, "no client failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_nothing_is_dropped_and_changes_are_refused_until_it_is_back() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::start().await;
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let backends = [("web1", web1.addr), ("web2", web2.addr)];
    let a = Instance::start(&etcd, "down", "a", &backends);
    let b = Instance::start(&etcd, "down", "b", &backends);
    converged(&[&a, &b]).await;
    let (load, tasks) = Load::run(vec![a.addr, b.addr]);
    load.more(30).await;

    etcd.kill();
    for i in [&a, &b] {
        wait_for(
            &format!("{} says the cluster is degraded", i.name),
            || async {
                let (status, h) = i.get("/healthz").await;
                status == 200 && h["status"] == "degraded" && h["cluster"]["connected"] == false
            },
        )
        .await;
    }
    let (_, h) = a.get("/healthz").await;
    let problem = h["problems"][0].as_str().unwrap().to_string();
    assert!(
        problem.contains("etcd") && problem.contains("cannot be reached"),
        "{problem}"
    );
    assert!(problem.len() < 400, "one readable line: {problem}");
    let (status, v) = a.post("/backends/web1/drain").await;
    assert_eq!(status, 503, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("etcd") && e.contains("applied on no instance"),
        "{e}"
    );
    let out = Command::new(BIN)
        .args([
            "ctl",
            "--admin",
            &format!("http://{}", b.admin),
            "stop",
            "web2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd"));
    let out = Command::new(BIN)
        .args(["ctl", "--admin", &format!("http://{}", a.admin), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("cluster down: this is instance a")
            && text.contains("DEGRADED"),
        "{text}"
    );
    // Reads still answer, and nothing changed anywhere.
    for i in [&a, &b] {
        assert_eq!(i.state("web1").await, "active");
        assert_eq!(i.state("web2").await, "active");
    }
    load.more(100).await;

    etcd.restart().await;
    converged(&[&a, &b]).await;
    let (status, v) = a.post("/backends/web1/drain?wait=10s").await;
    assert_eq!((status, &v["state"]), (200, &"drained".into()), "{v}");
    wait_for("b applied the drain", || async {
        b.state("web1").await == "drained"
    })
    .await;
    // b's events told the lost and restored connection, then the drain a
    // asked for, which entered b's state machine like its own.
    let told = kept_events(
        b.admin,
        &[
            r#""type":"cluster","connected":false"#,
            r#""type":"cluster","connected":true"#,
            r#""type":"state","backend":"web1","from":"active","to":"draining""#,
            r#""type":"drained","backend":"web1""#,
        ],
    )
    .await;
    assert!(
        told.contains("etcd"),
        "the lost connection says why: {told}"
    );
    b.post("/backends/web1/start").await;
    load.more(30).await;
    load.stop(tasks).await;
    assert_eq!(load.failed.load(Ordering::SeqCst), 0, "no client failed");
    let served = load.web1.load(Ordering::SeqCst) + load.web2.load(Ordering::SeqCst);
    note(&format!(
        "etcd down and back: {served} clients served, 0 failed"
    ));

    // Negative control: the same load sees a balancer that dies.
    let (load, tasks) = Load::run(vec![a.addr]);
    load.more(10).await;
    a.proc.signal("KILL");
    wait_for("the load sees the dead instance", || async {
        load.failed.load(Ordering::SeqCst) > 0
    })
    .await;
    load.stop(tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_leaves_the_count_and_a_restarted_one_takes_the_cluster_state() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start().await;
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let backends = [("web1", web1.addr), ("web2", web2.addr)];
    let a = Instance::start(&etcd, "dead", "a", &backends);
    let mut c = Instance::start(&etcd, "dead", "c", &backends);
    converged(&[&a, &c]).await;
    let _held = [c.connect_to("web1").await, c.connect_to("web1").await];
    wait_for("a counts c's two connections", || async {
        a.backend("web1").await["active_connections"] == 2
    })
    .await;
    let (status, _) = a.post("/backends/web1/drain").await;
    assert_eq!(status, 202);

    c.proc.signal("KILL");
    c.proc.wait_exit();
    let killed = Instant::now();
    let (status, v) = a.post("/backends/web1/drain?wait=20s").await;
    assert_eq!((status, &v["state"]), (200, &"drained".into()), "{v}");
    note(&format!(
        "a killed instance left the count {} ms after its death (lease 2s)",
        killed.elapsed().as_millis()
    ));
    let v = a.backend("web1").await;
    assert_eq!(v["active_connections"], 0, "{v}");
    assert_eq!(v["instances"].as_array().unwrap().len(), 1, "{v}");

    // c's state file says web1 is active and web2 stopped; the cluster
    // says web1 is drained and web2 active. c restarts with the cluster's.
    let file = c._dir.path().join("state.json");
    std::fs::write(
        &file,
        r#"{"backends": {"web1": "active", "web2": "stopped"}, "leaving": false}"#,
    )
    .unwrap();
    let dir = std::mem::replace(&mut c._dir, tempfile::tempdir().unwrap());
    let c = Instance::run("c", dir, c.path.clone());
    // Out of rotation from its first answer; drained once it has heard
    // that no instance holds a connection.
    let first = c.state("web1").await;
    assert!(first == "draining" || first == "drained", "{first}");
    wait_for("c sees web1 drained everywhere", || async {
        c.state("web1").await == "drained"
    })
    .await;
    assert_eq!(c.state("web2").await, "active");
    for _ in 0..10 {
        let mut s = TcpStream::connect(c.addr).await.unwrap();
        assert_eq!(within("greeting", read_line(&mut s)).await, "web2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_racing_on_different_instances_end_in_one_state() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start().await;
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let backends = [("web1", web1.addr), ("web2", web2.addr)];
    let all = [
        Instance::start(&etcd, "race", "a", &backends),
        Instance::start(&etcd, "race", "b", &backends),
        Instance::start(&etcd, "race", "c", &backends),
    ];
    converged(&all.iter().collect::<Vec<_>>()).await;
    let mut calls = Vec::new();
    for round in 0..10 {
        for (i, action) in ["drain", "stop", "start"].iter().enumerate() {
            let admin = all[(round + i) % 3].admin;
            calls.push(tokio::spawn(async move {
                http(admin, "POST", &format!("/backends/web1/{action}"), None)
                    .await
                    .0
            }));
        }
    }
    for call in calls {
        let status = within("a racing call", call).await.unwrap();
        assert!(status < 300, "every racing change was taken: {status}");
    }
    // Settled: every instance applies one state, and a new instance, which
    // reads etcd, finds the same.
    let mut states = Vec::new();
    for i in &all {
        wait_for("the instances agree", || async {
            let s = i.state("web1").await;
            let first = all[0].state("web1").await;
            s == first && s != "draining"
        })
        .await;
        states.push(i.state("web1").await);
    }
    assert!(states.iter().all(|s| *s == states[0]), "{states:?}");
    let d = Instance::start(&etcd, "race", "d", &backends);
    wait_for("a new instance finds the same state", || async {
        d.state("web1").await == states[0]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_against_one_instance_updates_each_backend_drained_on_all() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start().await;
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let backends = [("web1", web1.addr), ("web2", web2.addr)];
    let a = Instance::start(&etcd, "rollout", "a", &backends);
    let b = Instance::start(&etcd, "rollout", "b", &backends);
    converged(&[&a, &b]).await;
    let (load, tasks) = Load::run(vec![a.addr, b.addr]);
    load.more(20).await;
    // The update step checks, on the other instance, that the backend it
    // updates is out of rotation there too and holds no connection: that
    // instance's own entry (its view of a's lags a's report by a moment).
    let check = format!(
        "curl -sf http://{}/backends/$SLUICE_BACKEND | tr -d ' \\n' | grep -Eq '\"instance\":\"b\",\"state\":\"(draining|drained)\",\"active_connections\":0}}' && echo \"updated $SLUICE_BACKEND\"",
        b.admin
    );
    // A client on b holds web1: the drain asked of a waits for it.
    let held = b.connect_to("web1").await;
    let mut rollout = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &format!("http://{}", a.admin)])
        .args(["rollout", "--exec", &check])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        rollout.stdout.take().unwrap(),
    ));
    let mut text = String::new();
    while !text.contains("web1: draining with") {
        let l = within("rollout's drain line", lines.next_line()).await;
        text += &format!("{}\n", l.unwrap().expect("rollout said it drains web1"));
    }
    // Once only b's held client is left on web1, the drain still runs.
    wait_for("only the held client left on web1", || async {
        a.backend("web1").await["active_connections"] == 1
    })
    .await;
    assert_eq!(a.state("web1").await, "draining", "b's client counts");
    drop(held);
    while let Some(l) = within("rollout's output", lines.next_line()).await.unwrap() {
        text += &format!("{l}\n");
    }
    let out = within("ctl rollout", rollout.wait_with_output())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("updated web1") && text.contains("updated web2"),
        "{text}"
    );
    for i in [&a, &b] {
        for name in ["web1", "web2"] {
            wait_for(&format!("{} has {name} active", i.name), || async {
                i.state(name).await == "active"
            })
            .await;
        }
    }
    load.stop(tasks).await;
    assert_eq!(load.failed.load(Ordering::SeqCst), 0, "no client failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_is_not_over_while_an_instance_has_not_applied_it() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start().await;
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let backends = [("web1", web1.addr), ("web2", web2.addr)];
    // A long lease: the frozen instance stays a member while frozen.
    let a = Instance::start_with_lease(&etcd, "behind", "a", &backends, "30s");
    let c = Instance::start_with_lease(&etcd, "behind", "c", &backends, "30s");
    converged(&[&a, &c]).await;

    // c holds no connection, but cannot apply anything while frozen: it
    // could still accept web1's next client, so the drain is not over.
    c.proc.signal("STOP");
    let (status, v) = a.post("/backends/web1/drain?wait=1500ms").await;
    assert_eq!((status, &v["state"]), (202, &"draining".into()), "{v}");
    let us = v["instances"].as_array().unwrap();
    assert!(
        us.iter()
            .any(|i| i["instance"] == "c" && i["state"] == "active"),
        "{v}"
    );

    // Thawed, c applies the drain and reports it: now it is over.
    c.proc.signal("CONT");
    let (status, v) = a.post("/backends/web1/drain?wait=20s").await;
    assert_eq!((status, &v["state"]), (200, &"drained".into()), "{v}");
    wait_for("c says web1 is drained", || async {
        c.state("web1").await == "drained"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_cluster_state_and_the_count_of_a_removed_backend() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start().await;
    let (web1, web2, web3) = (
        Echo::start("web1").await,
        Echo::start("web2").await,
        Echo::start("web3").await,
    );
    let all = [
        ("web1", web1.addr),
        ("web2", web2.addr),
        ("web3", web3.addr),
    ];
    let a = Instance::start(&etcd, "reload", "a", &all);
    let b = Instance::start(&etcd, "reload", "b", &all[..2]);
    converged(&[&a, &b]).await;
    let (status, _) = a.post("/backends/web3/stop").await;
    assert_eq!(status, 200);

    // b's file gains web3: it comes in stopped, as agreed, not active.
    let text = std::fs::read_to_string(&b.path).unwrap();
    let web3_entry = format!(
        "\n[[backend]]\nname = \"web3\"\naddress = \"{}\"\nhealth_check = \"none\"\n",
        web3.addr
    );
    let with_web3 = text.replace("\n[cluster]", &format!("{web3_entry}\n[cluster]"));
    std::fs::write(&b.path, &with_web3).unwrap();
    b.proc.signal("HUP");
    wait_for("b has web3, stopped as agreed", || async {
        b.get("/backends/web3").await.0 == 200 && b.state("web3").await == "stopped"
    })
    .await;

    // b's file loses web1 while b holds a web1 client: a drain of web1 on
    // a is not over until that client leaves.
    let held = b.connect_to("web1").await;
    let web1_entry = format!(
        "\n[[backend]]\nname = \"web1\"\naddress = \"{}\"\nhealth_check = \"none\"\n",
        web1.addr
    );
    std::fs::write(&b.path, with_web3.replace(&web1_entry, "")).unwrap();
    b.proc.signal("HUP");
    wait_for("b's routes lose web1", || async {
        b.backend("web1").await["services"]
            .as_array()
            .is_some_and(Vec::is_empty)
    })
    .await;
    let (status, v) = a.post("/backends/web1/drain?wait=1s").await;
    assert_eq!((status, &v["state"]), (202, &"draining".into()), "{v}");
    drop(held);
    let (status, v) = a.post("/backends/web1/drain?wait=20s").await;
    assert_eq!((status, &v["state"]), (200, &"drained".into()), "{v}");
}

/// Kills a process by pid when dropped (the process an upgrade started).
struct KillOnDrop(u64);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_instance_stays_counted_with_its_old_process_connections() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start().await;
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let backends = [("web1", web1.addr), ("web2", web2.addr)];
    let a = Instance::start(&etcd, "upgrade", "a", &backends);
    let b = Instance::start(&etcd, "upgrade", "b", &backends);
    converged(&[&a, &b]).await;
    let mut held = a.connect_to("web1").await;

    // A drain from b runs, and waits, while a's process hands over.
    let (status, _) = b.post("/backends/web1/drain").await;
    assert_eq!(status, 202);
    let admin = b.admin;
    let waiting =
        tokio::spawn(
            async move { http(admin, "POST", "/backends/web1/drain?wait=60s", None).await },
        );
    let (status, report) = a.post("/upgrade").await;
    assert_eq!(status, 200, "{report}");
    let _new = KillOnDrop(report["new_pid"].as_u64().unwrap());
    assert_eq!(report["connections_left"], 1, "{report}");
    wait_for("the new process answers for a", || async {
        a.get("/healthz").await.1["pid"] == report["new_pid"]
    })
    .await;
    converged(&[&a, &b]).await;

    // The old process's client still counts, through the new one.
    wait_for("b counts a's old client", || async {
        let v = b.backend("web1").await;
        v["active_connections"] == 1 && v["state"] == "draining"
    })
    .await;
    assert!(
        !waiting.is_finished(),
        "the drain did not end at the hand-over"
    );
    echo(&mut held, b"still served").await;
    drop(held);
    let (status, v) = within("the drain's end", waiting).await.unwrap();
    assert_eq!((status, &v["state"]), (200, &"drained".into()), "{v}");
    wait_for("a says web1 is drained", || async {
        a.state("web1").await == "drained"
    })
    .await;
    let (status, _) = a.post("/backends/web1/start").await;
    assert_eq!(status, 200, "the new process takes changes");
    wait_for("b applies a's start", || async {
        b.state("web1").await == "active"
    })
    .await;
}
