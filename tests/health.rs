//! Health checks: active HTTP and TCP checks, passive marking on failed
//! connects, and health as an axis separate from the admin state.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP server whose status the test sets; greets like `Echo` otherwise.
async fn http_server(status: Arc<AtomicU16>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let code = status.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply =
                    format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

fn config(backends: &[(&str, SocketAddr, &str)]) -> String {
    let mut t = String::from(
        "[health]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n",
    );
    for (name, addr, check) in backends {
        t.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n{check}\n"
        ));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_takes_a_failing_server_out_and_back() {
    let status = Arc::new(AtomicU16::new(200));
    let web = http_server(status.clone()).await;
    let b = Echo::start("b").await;
    let lb = Sluice::from_toml(&config(&[
        (
            "web",
            web,
            "health_check = \"http\"\nhealth_path = \"/health\"",
        ),
        ("b", b.addr, "health_check = \"none\""),
    ]))
    .await;
    wait_for("first check passed", || async {
        lb.backend("web").await["last_ok_check_ms"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(lb.backend("web").await["healthy"], true);

    status.store(503, Ordering::SeqCst);
    wait_for("down after 2 failed checks", || async {
        lb.backend("web").await["healthy"] == false
    })
    .await;
    let v = lb.backend("web").await;
    assert_eq!(
        v["state"], "active",
        "health does not change the admin state"
    );
    for _ in 0..4 {
        assert_eq!(
            lb.connect().await.1,
            "b",
            "a down backend takes no new connection"
        );
    }

    status.store(200, Ordering::SeqCst);
    wait_for("up after 2 passing checks", || async {
        lb.backend("web").await["healthy"] == true
    })
    .await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_that_comes_back_up_stays_drained() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let lb = Sluice::from_toml(&config(&[
        ("a", a.addr, ""),
        ("b", b.addr, "health_check = \"none\""),
    ]))
    .await;
    lb.post("/backends/a/drain").await;
    a.kill().await;
    wait_for("a down", || async {
        lb.backend("a").await["healthy"] == false
    })
    .await;
    let _a2 = Echo::restart("a", a.addr).await;
    wait_for("a up again", || async {
        lb.backend("a").await["healthy"] == true
    })
    .await;
    assert_eq!(lb.state("a").await, "drained");
    assert_eq!(lb.connect().await.1, "b");
    assert_eq!(lb.connect().await.1, "b");
    assert_eq!(
        lb.backend("a").await["total_connections"],
        0,
        "no client reached a"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connects_mark_a_backend_down_at_once() {
    let (_held, dead) = dead_addr();
    let b = Echo::start("b").await;
    // Checks so slow that only passive detection can act within the test.
    let text = config(&[("dead", dead, ""), ("b", b.addr, "health_check = \"none\"")])
        .replace("interval = \"50ms\"", "interval = \"1h\"")
        .replace("fall = 2", "fall = 1");
    let lb = Sluice::from_toml(&text).await;
    // The first check runs at start and fails; wait for it, then count.
    wait_for("marked down", || async {
        lb.backend("dead").await["healthy"] == false
    })
    .await;
    let before = lb.backend("dead").await["connect_failures"]
        .as_u64()
        .unwrap();
    for _ in 0..5 {
        assert_eq!(lb.connect().await.1, "b");
    }
    let after = lb.backend("dead").await["connect_failures"]
        .as_u64()
        .unwrap();
    assert_eq!(before, after, "a down backend is not even tried");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_take_it_down_between_checks() {
    let b = Echo::start("b").await;
    let a = Echo::start("a").await;
    let text = config(&[("a", a.addr, ""), ("b", b.addr, "health_check = \"none\"")])
        .replace("interval = \"50ms\"", "interval = \"1h\"")
        .replace("fall = 2", "fall = 1");
    let lb = Sluice::from_toml(&text).await;
    wait_for("first check passed", || async {
        lb.backend("a").await["last_ok_check_ms"].as_u64() > Some(0)
    })
    .await;
    a.kill().await;
    // The next client tries a, fails over to b, and a is marked down.
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(lb.connect().await.1);
    }
    assert!(names.iter().all(|n| n == "b"), "{names:?}");
    let v = lb.backend("a").await;
    assert_eq!(v["healthy"], false);
    assert_eq!(
        v["connect_failures"], 1,
        "marked down after the first failure"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_port_wins_over_the_address_port() {
    // The service answers nothing useful; the health endpoint is elsewhere.
    let status = Arc::new(AtomicU16::new(503));
    let health = http_server(status.clone()).await;
    let b = Echo::start("b").await;
    let check = format!("health_check = \"http\"\nhealth_port = {}", health.port());
    let lb = Sluice::from_toml(&config(&[("b", b.addr, &check)])).await;
    wait_for("down by the health port's 503", || async {
        lb.backend("b").await["healthy"] == false
    })
    .await;
    status.store(200, Ordering::SeqCst);
    wait_for("up by the health port's 200", || async {
        lb.backend("b").await["healthy"] == true
    })
    .await;
    lb.shutdown().await;
}
