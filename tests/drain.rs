//! Drain, stop and start: what NLB calls Drain Stop, Stop and Start.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_open_connections_run_and_sends_new_ones_elsewhere() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let (mut on_a, name) = lb.connect().await;
    assert_eq!(name, "a");

    let (status, v) = lb.post("/backends/a/drain").await;
    assert_eq!(status, 202, "still draining: {v}");
    assert_eq!(v["state"], "draining");
    assert_eq!(v["active_connections"], 1);

    for _ in 0..4 {
        let (mut s, name) = lb.connect().await;
        assert_eq!(name, "b", "a draining backend takes no new connection");
        echo(&mut s, b"new").await;
    }
    // The connection already on `a` keeps exchanging bytes.
    for i in 0..20 {
        echo(&mut on_a, format!("message {i}").as_bytes()).await;
    }
    assert_eq!(lb.state("a").await, "draining");
    let (_, conns) = lb.get("/backends/a/connections").await;
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["client"], on_a.local_addr().unwrap().to_string());
    assert_eq!(conns[0]["service"], "web");
    assert!(conns[0]["bytes_in"].as_u64().unwrap() > 0);
    assert!(conns[0]["age_ms"].is_u64() && conns[0]["idle_ms"].is_u64());

    drop(on_a);
    wait_for("a becomes drained by itself", || async {
        lb.state("a").await == "drained"
    })
    .await;
    assert_eq!(lb.live("a").await, 0);

    // Repeating a drain is harmless.
    let (status, v) = lb.post("/backends/a/drain").await;
    assert_eq!((status, v["state"].as_str()), (200, Some("drained")));

    let (status, v) = lb.post("/backends/a/start").await;
    assert_eq!((status, v["state"].as_str()), (200, Some("active")));
    let mut names = Vec::new();
    for _ in 0..2 {
        names.push(lb.connect().await.1);
    }
    names.sort();
    assert_eq!(names, ["a", "b"], "start puts a back in rotation");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_returns_as_soon_as_the_backend_is_drained() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let (on_a, _) = lb.connect().await;
    let admin = lb.admin;
    let started = tokio::time::Instant::now();
    let waiter =
        tokio::spawn(async move { http(admin, "POST", "/backends/a/drain?wait=1h", None).await });
    wait_for("draining", || async { lb.state("a").await == "draining" }).await;
    assert!(
        !waiter.is_finished(),
        "the reply waits while a connection is open"
    );
    drop(on_a);
    let (status, v) = within("wait returns once drained", waiter).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["state"], "drained");
    assert_eq!(v["active_connections"], 0);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "did not wait out the hour"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_times_out_with_202() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (mut on_a, _) = lb.connect().await;
    let (status, v) = lb.post("/backends/a/drain?wait=200ms").await;
    assert_eq!(status, 202);
    assert_eq!(v["state"], "draining");
    echo(&mut on_a, b"untouched").await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_returns_when_the_backend_is_started_again() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (_on_a, _) = lb.connect().await;
    let admin = lb.admin;
    let waiter =
        tokio::spawn(async move { http(admin, "POST", "/backends/a/drain?wait=1h", None).await });
    wait_for("draining", || async { lb.state("a").await == "draining" }).await;
    lb.post("/backends/a/start").await;
    let (status, v) = within("wait ends on start", waiter).await.unwrap();
    assert_eq!((status, v["state"].as_str()), (202, Some("active")));
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_after_closes_what_is_left() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let (mut on_a, _) = lb.connect().await;
    let (mut on_b, _) = lb.connect().await;
    let (status, v) = lb
        .post("/backends/a/drain?force_after=300ms&wait=10s")
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "drained");
    assert!(closed_by_peer(&mut on_a).await);
    echo(&mut on_b, b"b is untouched").await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_idle_closes_only_idle_connections() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (mut idle, _) = lb.connect().await;
    let (mut busy, _) = lb.connect().await;
    // The limit is far above the 50 ms between `busy`'s echoes, so a
    // stalled test thread on a loaded machine cannot make `busy` idle too.
    let (status, _) = lb.post("/backends/a/drain?close_idle=2s").await;
    assert_eq!(status, 202);
    // Keep `busy` moving data faster than the idle limit while `idle` ages.
    let mut rounds = 0;
    let idle_closed = loop {
        echo(&mut busy, b"tick").await;
        let mut b = [0u8; 1];
        match tokio::time::timeout(
            Duration::from_millis(50),
            tokio::io::AsyncReadExt::read(&mut idle, &mut b),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            _ => {}
        }
        rounds += 1;
        if rounds > 600 {
            break false;
        }
    };
    assert!(idle_closed, "the idle connection was closed");
    echo(&mut busy, b"still here").await;
    assert_eq!(lb.live("a").await, 1);
    drop(busy);
    wait_for("drained", || async { lb.state("a").await == "drained" }).await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_idle_spares_a_connection_waiting_for_its_reply() {
    // A backend that reads a request and takes its time to answer.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut b)
            .await
            .unwrap();
        let _ = go_rx.await;
        tokio::io::AsyncWriteExt::write_all(&mut s, b"done")
            .await
            .unwrap();
    });
    let lb = Sluice::start("", &[("slow", addr)]).await;
    let mut s = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"work")
        .await
        .unwrap();
    wait_for("request passed", || async {
        lb.backend("slow").await["bytes_in"] == 4
    })
    .await;
    lb.post("/backends/slow/drain?close_idle=100ms").await;
    // Well past the idle limit, the connection is still there.
    wait_for("idle a while", || async {
        let (_, c) = lb.get("/backends/slow/connections").await;
        c[0]["idle_ms"].as_u64().unwrap() > 600
    })
    .await;
    assert_eq!(lb.live("slow").await, 1);
    go_tx.send(()).unwrap();
    let mut reply = [0u8; 4];
    within(
        "reply",
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut reply),
    )
    .await
    .unwrap();
    assert_eq!(&reply, b"done");
    // Now it is idle with nothing pending, and goes.
    assert!(closed_by_peer(&mut s).await);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_existing_connections_and_start_restores() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let (mut on_a, _) = lb.connect().await;
    let (mut on_b, _) = lb.connect().await;
    let (status, v) = lb.post("/backends/a/stop").await;
    assert_eq!(status, 200);
    assert_eq!(v["state"], "stopped");
    assert!(
        closed_by_peer(&mut on_a).await,
        "stop closes a's connections"
    );
    wait_for("count 0", || async { lb.live("a").await == 0 }).await;
    echo(&mut on_b, b"b unaffected").await;
    assert_eq!(lb.connect().await.1, "b");
    assert_eq!(lb.connect().await.1, "b");

    let (status, _) = lb.post("/backends/a/stop").await;
    assert_eq!(status, 200, "repeating stop is harmless");
    let (status, v) = lb.post("/backends/a/start").await;
    assert_eq!((status, v["state"].as_str()), (200, Some("active")));
    let (status, _) = lb.post("/backends/a/start").await;
    assert_eq!(status, 200, "repeating start is harmless");
    let names = [lb.connect().await.1, lb.connect().await.1];
    assert!(names.contains(&"a".to_string()), "{names:?}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_a_drain_two_thousand_times_leaves_one_policy_task() {
    let a = Echo::start("a").await;
    let text = config("shutdown_grace = \"100ms\"", "", &[("a", a.addr)]);
    let (shared, addr, admin, stop, task) = bound(&text).await;
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(within("greeting", read_line(&mut held)).await, "a");
    let before = shared.tasks.len();
    for i in 0..2000 {
        let path = format!(
            "/backends/a/drain?force_after={}s&close_idle={}s",
            3600 - i,
            7200 - i
        );
        let (status, _) = http(admin, "POST", &path, None).await;
        assert_eq!(status, 202);
    }
    assert_eq!(
        shared.tasks.len(),
        before + 2,
        "one policy task for the drain, and one that tells its progress"
    );
    http(admin, "POST", "/backends/a/start", None).await;
    wait_for("the policy task ended with the drain", || async {
        shared.tasks.len() == before
    })
    .await;
    echo(&mut held, b"never cut").await;
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}
