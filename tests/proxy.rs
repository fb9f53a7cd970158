//! The data path: round-robin, weights, fallback, half-close, limits, and
//! exact live counts after every way a connection can end.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_three_backends() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr), ("c", c.addr)]).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (mut s, name) = lb.connect().await;
        echo(&mut s, b"ping").await;
        seen.push(name);
    }
    assert_eq!(seen, ["a", "b", "c", "a", "b", "c"]);
    for name in ["a", "b", "c"] {
        assert_eq!(lb.backend(name).await["total_connections"], 2);
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_share_connections_in_proportion() {
    let (a, b, z) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("z").await,
    );
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"a\"\naddress = \"{}\"\nweight = 3\nhealth_check = \"none\"\n\
         [[backend]]\nname = \"b\"\naddress = \"{}\"\nhealth_check = \"none\"\n\
         [[backend]]\nname = \"z\"\naddress = \"{}\"\nweight = 0\nhealth_check = \"none\"\n",
        a.addr, b.addr, z.addr
    );
    let lb = Sluice::from_toml(&text).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let (_s, name) = lb.connect().await;
        *counts.entry(name).or_default() += 1;
    }
    assert_eq!(counts.get("a"), Some(&30));
    assert_eq!(counts.get("b"), Some(&10));
    assert_eq!(counts.get("z"), None, "weight 0 takes no new connections");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_is_skipped_without_the_client_noticing() {
    let a = Echo::start("a").await;
    let (_held, dead) = dead_addr();
    let c = Echo::start("c").await;
    let lb = Sluice::start("", &[("a", a.addr), ("dead", dead), ("c", c.addr)]).await;
    for _ in 0..9 {
        let (mut s, name) = lb.connect().await;
        assert_ne!(name, "", "every client reached a live backend");
        echo(&mut s, b"hello").await;
    }
    assert_eq!(a.accepted() + c.accepted(), 9);
    let d = lb.backend("dead").await;
    assert_eq!(d["total_connections"], 0);
    assert!(d["connect_failures"].as_u64().unwrap() >= 3, "{d}");
    assert_eq!(d["active_connections"], 0);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_available_closes_the_client_promptly() {
    let (_held, dead) = dead_addr();
    let lb = Sluice::start("", &[("dead", dead)]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    assert!(
        closed_by_peer(&mut s).await,
        "client closed when every backend fails"
    );

    let a = Echo::start("a").await;
    let lb2 = Sluice::start("", &[("a", a.addr)]).await;
    lb2.post("/backends/a/drain").await;
    let mut s = TcpStream::connect(lb2.addr).await.unwrap();
    assert!(
        closed_by_peer(&mut s).await,
        "client closed when no backend is in rotation"
    );
    let (_, stats) = lb2.get("/stats").await;
    assert_eq!(stats["rejected_no_backend"], 1);
    assert_eq!(a.accepted(), 0);
    lb.shutdown().await;
    lb2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_the_client_is_closed_at_once() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("max_connections = 1", &[("a", a.addr)]).await;
    let (mut first, _) = lb.connect().await;
    let mut second = TcpStream::connect(lb.addr).await.unwrap();
    assert!(closed_by_peer(&mut second).await);
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["rejected_limit"], 1);
    echo(&mut first, b"still fine").await;
    drop(first);
    wait_for("backend count 0", || async { lb.live("a").await == 0 }).await;
    // The limit's slot comes back just after the backend's count, once
    // the sockets are closed: a client in between may still be turned away.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut third = loop {
        let (s, name) = lb.connect().await;
        if name == "a" {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    echo(&mut third, b"after").await;
    lb.shutdown().await;
}

/// Segments a socket has received, from the kernel's TCP_INFO.
fn segments_in(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; getsockopt fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_segs_in
}

/// A backend whose last bytes and FIN arrive together: sluice passes them
/// on as one segment too, so the client has one packet to take and to
/// acknowledge, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_bytes_and_fin_reach_the_client_in_one_segment() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (go, went) = tokio::sync::oneshot::channel::<()>();
    let backend = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        went.await.unwrap();
        // Held back by MSG_MORE, the bytes leave with the FIN.
        let sock = socket2::SockRef::from(&s);
        sock.send_with_flags(b"last words", libc::MSG_MORE).unwrap();
        sock.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
    });
    let lb = Sluice::start("", &[("b", addr)]).await;
    let mut c = TcpStream::connect(lb.addr).await.unwrap();
    wait_for("backend connected", || async {
        let (_, v) = lb.get("/backends/b/connections").await;
        v.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let before = segments_in(&c);
    go.send(()).unwrap();
    let mut got = Vec::new();
    within("answer and EOF", c.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"last words");
    assert_eq!(
        segments_in(&c) - before,
        1,
        "the bytes and the FIN came in one segment"
    );
    drop(c);
    within("backend done", backend).await.unwrap();
    wait_for("count 0", || async { lb.live("b").await == 0 }).await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_keeps_the_backend_direction_open() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (mut s, _) = lb.connect().await;
    let payload = vec![7u8; 256 * 1024];
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    // The echo keeps sending after our FIN, then closes its side.
    let mut back = Vec::new();
    within("echo after half-close", s.read_to_end(&mut back))
        .await
        .unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload);
    wait_for("count back to 0", || async { lb.live("a").await == 0 }).await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_keeps_the_client_direction_open() {
    // The backend says its piece, closes its side, and keeps reading.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"bye\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        let _ = got_tx.send(rest);
    });
    let lb = Sluice::start("", &[("a", addr)]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut first = Vec::new();
    within("backend FIN reaches the client", s.read_to_end(&mut first))
        .await
        .unwrap();
    assert_eq!(first, b"bye\n");
    let payload = vec![9u8; 128 * 1024];
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let rest = within("backend reads everything", got_rx).await.unwrap();
    assert!(rest == payload);
    wait_for("count back to 0", || async { lb.live("a").await == 0 }).await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_count_is_exact_after_client_reset() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let mut conns = Vec::new();
    for _ in 0..5 {
        let (mut s, _) = lb.connect().await;
        echo(&mut s, b"x").await;
        conns.push(s);
    }
    assert_eq!(lb.live("a").await, 5);
    for s in conns.drain(..3) {
        reset(s);
    }
    wait_for("3 resets counted", || async { lb.live("a").await == 2 }).await;
    drop(conns);
    wait_for("all closed", || async { lb.live("a").await == 0 }).await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_count_is_exact_after_backend_reset() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = tx.send(s);
        }
    });
    let lb = Sluice::start("", &[("a", addr)]).await;
    let mut client = TcpStream::connect(lb.addr).await.unwrap();
    let server = within("backend accepts", rx.recv()).await.unwrap();
    wait_for("connection counted", || async { lb.live("a").await == 1 }).await;
    reset(server);
    assert!(
        closed_by_peer(&mut client).await,
        "client sees the connection end"
    );
    wait_for("count back to 0", || async { lb.live("a").await == 0 }).await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_count_is_exact_when_the_client_leaves_during_a_pending_connect() {
    let (_sock, addr, _fillers) = hanging_backend().await;
    let lb = Sluice::start("connect_timeout = \"1h\"", &[("slow", addr)]).await;
    let client = TcpStream::connect(lb.addr).await.unwrap();
    wait_for("pending connect counted", || async {
        lb.live("slow").await == 1
    })
    .await;
    reset(client);
    wait_for(
        "count back to 0 long before the connect timeout",
        || async { lb.live("slow").await == 0 },
    )
    .await;
    assert_eq!(lb.backend("slow").await["total_connections"], 0);

    // A client that closes with a FIN may only be half-closing: the connect
    // goes on, and the count is exact once it gives up.
    let lb2 = Sluice::start("connect_timeout = \"300ms\"", &[("slow", addr)]).await;
    let mut client = TcpStream::connect(lb2.addr).await.unwrap();
    wait_for("pending connect counted", || async {
        lb2.live("slow").await == 1
    })
    .await;
    client.shutdown().await.unwrap();
    assert!(
        closed_by_peer(&mut client).await,
        "closed when the connect timed out"
    );
    wait_for("count back to 0", || async { lb2.live("slow").await == 0 }).await;
    lb.shutdown().await;
    lb2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_at_once_still_hears_a_server_that_speaks_first() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = s.write_all(b"220 banner\r\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    let lb = Sluice::start("", &[("smtp", addr)]).await;
    for _ in 0..5 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        within("banner", s.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"220 banner\r\n");
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_silent_connections() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("idle_timeout = \"300ms\"", &[("a", a.addr)]).await;
    let (mut s, _) = lb.connect().await;
    assert!(closed_by_peer(&mut s).await);
    wait_for("count back to 0", || async { lb.live("a").await == 0 }).await;
    lb.shutdown().await;
}

/// The idle timeout is one sweep over the connection tables: it closes
/// the silent connection and spares one that talks more often than the
/// timeout. Each connection keeps the timeout it started with, so a
/// reload that sets one cuts no live connection, even one silent for
/// longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_spares_talkers_and_connections_from_before_a_reload() {
    let a = Echo::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let grace = "shutdown_grace = \"100ms\"\n";
    std::fs::write(&path, config(grace, "", &[("a", a.addr)])).unwrap();
    let lb = Sluice::from_file(&path).await;
    let (mut before, _) = lb.connect().await;
    let timeout = format!("{grace}idle_timeout = \"400ms\"");
    std::fs::write(&path, config(&timeout, "", &[("a", a.addr)])).unwrap();
    assert_eq!(lb.post("/reload").await.0, 200);
    let (mut silent, _) = lb.connect().await;
    let (mut talker, _) = lb.connect().await;
    // The talker speaks every 50 ms until the silent one is closed.
    let closed = closed_by_peer(&mut silent);
    tokio::pin!(closed);
    loop {
        tokio::select! {
            c = &mut closed => {
                assert!(c, "the silent connection was closed within the deadline");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => echo(&mut talker, b"x").await,
        }
    }
    echo(&mut talker, b"still here").await;
    // Silent for longer than the silent one, and still open.
    echo(&mut before, b"from before the reload").await;
    assert_eq!(
        lb.live("a").await,
        2,
        "the talker and the first are counted"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_runtime_layouts_serve_and_count_exactly() {
    for layout in [
        "workers = 3\nruntime = \"per-core\"",
        "workers = 2\nruntime = \"multi-thread\"",
    ] {
        let (a, b) = (Echo::start("a").await, Echo::start("b").await);
        let lb = Sluice::start(layout, &[("a", a.addr), ("b", b.addr)]).await;
        let mut conns = Vec::new();
        let mut names = Vec::new();
        for i in 0..30 {
            let (mut s, name) = lb.connect().await;
            echo(&mut s, format!("{layout} {i}").as_bytes()).await;
            names.push(name);
            conns.push(s);
        }
        assert_eq!(names.iter().filter(|n| *n == "a").count(), 15, "{layout}");
        assert_eq!(lb.live("a").await + lb.live("b").await, 30);
        drop(conns);
        wait_for("all closed", || async {
            lb.live("a").await + lb.live("b").await == 0
        })
        .await;
        lb.shutdown().await;
    }
}
