//! Faults on the data plane: what the mission promises under them is that
//! no client pays for a drain, a stop or sluice's own trouble, and that
//! every client lands in exactly one counter.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::net::TcpStream;

/// Connects `n` clients, `parallel` at a time, and returns how many were
/// refused (closed without a greeting).
async fn refusals(addr: SocketAddr, n: usize, parallel: usize) -> usize {
    let mut refused = 0;
    for _ in 0..n / parallel {
        let batch: Vec<_> = (0..parallel)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    within("greeting", read_line(&mut s)).await
                })
            })
            .collect();
        for t in batch {
            if t.await.unwrap().is_empty() {
                refused += 1;
            }
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_costs_no_client_a_refusal_under_concurrent_connects() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    // Two workers, and a schedule in which the drained backend holds 100
    // slots for the other's 1: picks that raced over the slots would find
    // nothing.
    let text = config(
        "workers = 2\nruntime = \"per-core\"",
        "",
        &[("a", a.addr), ("b", b.addr)],
    )
    .replacen(
        "health_check = \"none\"",
        "health_check = \"none\"\nweight = 100",
        1,
    );
    let lb = Sluice::from_toml(&text).await;
    let (status, _) = lb.post("/backends/a/drain").await;
    assert_eq!(status, 200);
    assert_eq!(refusals(lb.addr, 2000, 50).await, 0, "clients refused");
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["rejected_no_backend"], 0);
    assert_eq!(stats["established"], 2000);

    // Negative control: with both out of rotation the harness sees refusals.
    lb.post("/backends/b/drain").await;
    assert_eq!(refusals(lb.addr, 50, 50).await, 50);
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["rejected_no_backend"], 50);
    assert_eq!(settled(&stats), stats["accepted"].as_u64().unwrap());
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_pending_connect_sends_the_client_to_the_next_backend() {
    let (_sock, stuck, _fillers) = hanging_backend().await;
    let b = Echo::start("b").await;
    let lb = Sluice::start(
        "connect_timeout = \"1h\"",
        &[("stuck", stuck), ("b", b.addr)],
    )
    .await;
    // The first pick is `stuck`, whose connect hangs.
    let mut client = TcpStream::connect(lb.addr).await.unwrap();
    wait_for("pending connect counted", || async {
        lb.live("stuck").await == 1
    })
    .await;
    let (status, _) = lb.post("/backends/stuck/stop").await;
    assert_eq!(status, 200);
    assert_eq!(
        within("greeting", read_line(&mut client)).await,
        "b",
        "no byte had moved: the client goes to the next backend"
    );
    echo(&mut client, b"still here").await;
    assert_eq!(lb.live("stuck").await, 0);
    drop(client);

    // With nothing left to go to, the client is refused and counted.
    lb.post("/backends/stuck/start").await;
    lb.post("/backends/b/drain").await;
    wait_for("b drained", || async { lb.state("b").await == "drained" }).await;
    let mut client = TcpStream::connect(lb.addr).await.unwrap();
    wait_for("pending connect counted", || async {
        lb.live("stuck").await == 1
    })
    .await;
    lb.post("/backends/stuck/stop").await;
    assert!(closed_by_peer(&mut client).await);
    wait_for("every client settled", || async {
        let (_, stats) = lb.get("/stats").await;
        settled(&stats) == stats["accepted"].as_u64().unwrap()
    })
    .await;
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(
        (
            stats["established"].as_u64(),
            stats["rejected_no_backend"].as_u64()
        ),
        (Some(1), Some(1)),
        "{stats}"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_sluices_trouble_not_the_backends() {
    let a = Echo::start("a").await;
    // Active checks on, so that failures blamed on the backend would take
    // it down (fall = 1).
    let text = config(
        "[health]\ninterval = \"100ms\"\nfall = 1\nrise = 1",
        "",
        &[("a", a.addr)],
    )
    .replace("health_check = \"none\"\n", "");
    let (_dir, path) = write_config(&text);
    // A hard limit of 48 descriptors, which the clients below exhaust.
    let script = format!("ulimit -n 48 && exec {BIN} run --config {}", path.display());
    let mut p = Proc::spawn_command(std::process::Command::new("sh").args(["-c", &script]));
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    wait_for("a checked and up", || async {
        let (_, v) = http(admin, "GET", "/backends/a", None).await;
        v["health_checked"] == true && v["healthy"] == true
    })
    .await;

    // Idle clients until sluice cannot take more: some are served, the
    // rest meet EMFILE on accept or on the backend socket.
    let mut clients = Vec::new();
    for _ in 0..60 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
        {
            clients.push(s);
        }
    }
    p.wait_line("short of a resource");
    // Checks keep running meanwhile; a few rounds of them must not count
    // the shortage against the backend.
    let checks_before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    drop(clients);
    wait_for("serving again", || async {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return false;
        };
        within("greeting", read_line(&mut s)).await == "a"
    })
    .await;
    let (_, v) = http(admin, "GET", "/backends/a", None).await;
    assert_eq!(v["healthy"], true, "marked down for sluice's shortage: {v}");
    assert_eq!(v["connect_failures"], 0, "{v}");
    assert!(
        v["health_since_ms"].as_u64().unwrap() < checks_before,
        "{v}"
    );
    let (_, stats) = http(admin, "GET", "/stats", None).await;
    assert!(stats["resource_shortages"].as_u64().unwrap() > 0, "{stats}");
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
    let warnings = p
        .log
        .iter()
        .filter(|l| l.contains("short of a resource"))
        .count();
    assert_eq!(
        warnings,
        1,
        "one warning per episode:\n{}",
        p.log.join("\n")
    );
}

/// Open pipe descriptors of a process.
fn pipes_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipes_left_by_bulk_flows_are_freed_when_idle() {
    let a = Echo::start("a").await;
    let (_dir, path) = write_config(&config("", "", &[("a", a.addr)]));
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let budget = p.wait_line("open files: room for about");
    assert!(budget.contains("idle pipes kept for reuse"), "{budget}");
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    let pid = p.child.id();
    // Its own stdout and stderr, and the like.
    let baseline = pipes_of(pid);

    // Bulk flows at once, spliced both ways through pooled pipes.
    let flows: Vec<_> = (0..16)
        .map(|_| {
            tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let mut greeting = String::new();
                tokio::io::AsyncBufReadExt::read_line(&mut r, &mut greeting)
                    .await
                    .unwrap();
                let send = tokio::spawn(async move {
                    tokio::io::AsyncWriteExt::write_all(&mut w, &vec![7u8; 4 << 20])
                        .await
                        .unwrap();
                    w
                });
                let mut back = vec![0u8; 4 << 20];
                within(
                    "echo",
                    tokio::io::AsyncReadExt::read_exact(&mut r, &mut back),
                )
                .await
                .unwrap();
                drop(send.await.unwrap());
            })
        })
        .collect();
    for f in flows {
        f.await.unwrap();
    }
    wait_for("connections closed", || async {
        let (_, v) = http(admin, "GET", "/stats", None).await;
        v["active_connections"] == 0
    })
    .await;
    // The harness sees pooled pipes: the flows are gone, their pipes stay.
    let kept = pipes_of(pid);
    assert!(
        kept >= baseline + 2,
        "no pipe kept after bulk flows: {baseline} -> {kept}"
    );
    wait_for("idle pipes freed", || async { pipes_of(pid) == baseline }).await;
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_state_file_cannot_hold_applies_and_says_so_until_it_is_saved() {
    let a = Echo::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("state");
    std::fs::create_dir(&sub).unwrap();
    let file = sub.join("state.json");
    let lb = Sluice::start(
        &format!("state_file = \"{}\"", file.display()),
        &[("a", a.addr)],
    )
    .await;
    assert_eq!(lb.backend("a").await["saved"], true);
    let (_, health) = lb.get("/healthz").await;
    assert_eq!(health["status"], "ok");

    // The directory goes away: the drain applies, and every place that an
    // admin looks says it is not saved.
    std::fs::remove_dir_all(&sub).unwrap();
    let (status, v) = lb.post("/backends/a/drain").await;
    assert_eq!(
        (status, &v["state"], &v["saved"]),
        (200, &"drained".into(), &false.into()),
        "{v}"
    );
    let (status, health) = lb.get("/healthz").await;
    assert_eq!(status, 200, "it still serves");
    assert_eq!(health["status"], "degraded");
    assert!(
        health["problems"][0]
            .as_str()
            .unwrap()
            .contains("not saved"),
        "{health}"
    );
    let (_, stats) = lb.get("/stats").await;
    assert!(
        stats["state_file_failures"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--admin", &format!("http://{}", lb.admin), "status"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("warning: state file"),
        "{err}"
    );

    // Back again: sluice's retries save the drain without anyone asking.
    std::fs::create_dir(&sub).unwrap();
    wait_for("the state saved again", || async {
        lb.get("/healthz").await.1["status"] == "ok"
    })
    .await;
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(saved["backends"]["a"], "drained");
    assert_eq!(lb.backend("a").await["saved"], true);
    lb.shutdown().await;
}
