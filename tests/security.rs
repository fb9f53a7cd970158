//! The admin plane against its users' mistakes and its attackers: floods,
//! other sites, DNS rebinding, tokens of two kinds, the unix socket, and
//! an audit line for every change.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts the sluice binary on `text` with a hard limit of `nofile` open
/// files; returns it with its service and admin addresses.
fn run_limited(text: &str, nofile: u32) -> (Proc, SocketAddr, SocketAddr, tempfile::TempDir) {
    let (dir, path) = write_config(text);
    let script = format!(
        "ulimit -n {nofile} && exec {BIN} run --config {}",
        path.display()
    );
    let mut p = Proc::spawn_command(std::process::Command::new("sh").args(["-c", &script]));
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    (p, addr, admin, dir)
}

/// Whether a new client is greeted within two seconds. The wait only ever
/// decides a negative control: a served client answers in milliseconds.
async fn served(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), read_line(&mut s)).await,
        Ok(name) if !name.is_empty()
    )
}

/// How many connections wait in the accept queue of the IPv4 listener
/// on `addr` (the kernel's `rx_queue` of a listening socket).
fn accept_queue(addr: SocketAddr) -> u64 {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{:04X}", addr.port());
    tcp.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[1].ends_with(&port) && f[3] == "0A")
        .map(|f| u64::from_str_radix(f[4].split(':').nth(1).unwrap(), 16).unwrap())
        .expect("the admin listener is in /proc/net/tcp")
}

/// Opens `n` admin connections that send half a request and wait.
async fn flood(admin: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(admin)).await
        {
            let _ = s.write_all(b"GET /backends HTTP/1.1\r\n").await;
            held.push(s);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_flood_cannot_starve_the_data_plane() {
    sluice::limits::raise_nofile().unwrap();
    let a = Echo::start("a").await;
    let slow = "request_timeout = \"1h\"";

    // Negative control: with room for as many admin connections as the
    // file limit, a flood takes every descriptor and clients are not served.
    let open = config(
        "",
        &format!("{slow}\nmax_connections = 1024"),
        &[("a", a.addr)],
    );
    let (p, addr, admin, _d) = run_limited(&open, 256);
    let held = flood(admin, 300).await;
    // The kernel completes the flood's handshakes before sluice accepts
    // them; on a busy machine its accepts lag, so wait until they have
    // taken the descriptors, with a deadline.
    wait_for("the harness sees a starved data plane", || async {
        !served(addr).await
    })
    .await;
    drop((held, p));

    // The default cap keeps the flood to a few descriptors.
    let capped = config("", slow, &[("a", a.addr)]);
    let (mut p, addr, admin, _d) = run_limited(&capped, 256);
    let held = flood(admin, 300).await;
    // Every connection of the flood has reached sluice before clients
    // come, so they meet the flood, not a queue it still sits in.
    wait_for("sluice has accepted the flood", || async {
        accept_queue(admin) == 0
    })
    .await;
    for _ in 0..20 {
        assert!(
            served(addr).await,
            "a client was not served during the flood"
        );
    }
    drop(held);
    wait_for("admin answers again", || async {
        http(admin, "GET", "/stats", None).await.0 == 200
    })
    .await;
    let (_, stats) = http(admin, "GET", "/stats", None).await;
    assert!(stats["admin_rejected"].as_u64().unwrap() >= 200, "{stats}");
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_sites_cannot_change_or_read_state() {
    let a = Echo::start("a").await;
    let lb = Sluice::from_toml(&config(
        "",
        "allowed_hosts = [\"lb.example.com\"]",
        &[("a", a.addr)],
    ))
    .await;
    // A form posted from a page anywhere: the browser says where it came from.
    for header in [
        "Origin: http://evil.example\r\n",
        "Origin: null\r\n",
        "Sec-Fetch-Site: cross-site\r\n",
    ] {
        let (status, v) = http(lb.admin, "POST", "/backends/a/stop", Some(header)).await;
        assert_eq!(status, 403, "{header}: {v}");
        assert!(v["error"].as_str().unwrap().contains("cross-site"), "{v}");
    }
    assert_eq!(lb.state("a").await, "active");
    // The same call from the API's own origin, or from curl, goes through.
    let own = format!(
        "Origin: http://{}\r\nSec-Fetch-Site: same-origin\r\n",
        lb.admin
    );
    assert_eq!(
        http(lb.admin, "POST", "/backends/a/drain", Some(&own))
            .await
            .0,
        200
    );
    assert_eq!(lb.post("/backends/a/start").await.0, 200);

    // A page that rebinds its own name to 127.0.0.1 sends that name.
    let (status, _, body) = raw(lb.admin, "GET /backends HTTP/1.1\r\nHost: evil.example\r\n").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("allowed_hosts"), "{body}");
    let (status, _, _) = raw(
        lb.admin,
        "GET /backends HTTP/1.1\r\nHost: lb.example.com:9000\r\n",
    )
    .await;
    assert_eq!(status, 200, "a name in allowed_hosts");
    lb.shutdown().await;
}

/// One request with the given head; returns status, head and body.
async fn raw(addr: SocketAddr, head: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    within("reply", s.read_to_string(&mut reply)).await.unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_reads_and_a_wrong_one_is_shown_the_door() {
    let a = Echo::start("a").await;
    let lb = Sluice::from_toml(&config(
        "",
        "token = \"s3cret\"\nread_token = \"l00k\"",
        &[("a", a.addr)],
    ))
    .await;
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    let (status, _) = http(lb.admin, "GET", "/backends", Some(&bearer("l00k"))).await;
    assert_eq!(status, 200);
    let (status, v) = http(lb.admin, "POST", "/backends/a/stop", Some(&bearer("l00k"))).await;
    assert_eq!(status, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("read-only"), "{v}");
    let (status, _) = http(
        lb.admin,
        "POST",
        "/backends/a/drain",
        Some(&bearer("s3cret")),
    )
    .await;
    assert_eq!(status, 200);

    // A wrong token: 401, and the connection is closed after it, even for
    // a client that asked to keep it open.
    let mut s = TcpStream::connect(lb.admin).await.unwrap();
    let head = format!(
        "GET /backends HTTP/1.1\r\nHost: {}\r\n{}\r\n",
        lb.admin,
        bearer("guess")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut reply = String::new();
    within("401 and a close", s.read_to_string(&mut reply))
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    let (_, stats) = http(lb.admin, "GET", "/stats", Some(&bearer("l00k"))).await;
    assert_eq!(stats["admin_unauthorized"], 1, "{stats}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_serves_ctl_and_every_change_leaves_an_audit_line() {
    let a = Echo::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let text = config(
        "",
        &format!(
            "token = \"s3cret\"\nsocket = \"{}\"\nsocket_mode = \"0600\"",
            socket.display()
        ),
        &[("a", a.addr)],
    );
    let (_d, path) = write_config(&text);
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    p.wait_line("admin API listening on its unix socket");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The socket's permissions are its access control: no token needed.
    let url = format!("unix:{}", socket.display());
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--admin", &url, "drain", "a"])
        .env_remove("SLUICE_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = p.wait_line("admin: drain a");
    assert!(line.contains("unix socket uid"), "{line}");

    // Over TCP the token is needed, and the audit line says which one.
    let (status, _) = http(
        admin,
        "POST",
        "/backends/a/start",
        Some("Authorization: Bearer s3cret\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    let line = p.wait_line("admin: start a");
    assert!(
        line.contains("admin token") && line.contains("127.0.0.1:"),
        "{line}"
    );

    // Failed logins are logged, but not one line each.
    for _ in 0..5 {
        assert_eq!(http(admin, "GET", "/backends", None).await.0, 401);
    }
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
    let warned = p
        .log
        .iter()
        .filter(|l| l.contains("missing or wrong token"))
        .count();
    assert_eq!(warned, 1, "{}", p.log.join("\n"));
    assert!(!socket.exists(), "the socket file is removed at exit");
}
