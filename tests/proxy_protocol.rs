//! The PROXY protocol both ways, and IPv6: a real nginx with `listen ...
//! proxy_protocol` logs the address sluice sends it (v1 and v2, IPv4 and
//! IPv6 clients), health checks reach such a server, and a service with
//! `accept_proxy` takes the address a balancer in front sends, refusing
//! malformed, cut short and slow headers without a byte of them reaching a
//! backend.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::config::ProxyVersion;
use sluice::proxy_header::{self, encode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whether this machine has an IPv6 loopback; says once why a test skips.
fn ipv6(test: &str) -> bool {
    let ok = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !ok {
        eprintln!("{test}: skipped its IPv6 part: this machine has no IPv6 loopback (::1)");
    }
    ok
}

/// Real nginx whose servers expect a PROXY header, each logging
/// `$proxy_protocol_addr $proxy_protocol_port` to a file of its own.
struct Nginx {
    child: Child,
    dir: PathBuf,
    /// Where each server listens, in the order asked for.
    addrs: Vec<SocketAddr>,
}

impl Nginx {
    /// One server per address family asked for (`"127.0.0.1"`, `"::1"`).
    /// `None` when nginx is missing outside CI.
    fn start(hosts: &[&str]) -> Option<Nginx> {
        let bin = nginx_bin()?;
        let dir = tempfile::tempdir().unwrap().keep();
        let d = dir.display();
        let mut servers = String::new();
        let mut addrs = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            // A port the kernel just handed out, released for nginx.
            let addr = std::net::TcpListener::bind((*host, 0))
                .unwrap()
                .local_addr()
                .unwrap();
            addrs.push(addr);
            servers.push_str(&format!(
                "  server {{ listen {addr} proxy_protocol; access_log {d}/access{i}.log pp; \
                 location / {{ return 200 \"pp\\n\"; }} }}\n"
            ));
        }
        let conf = format!(
            "daemon off;\nmaster_process off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               log_format pp '$proxy_protocol_addr $proxy_protocol_port';\n{servers}}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .args(["-p", dir.to_str().unwrap(), "-c", "nginx.conf"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Some(Nginx { child, dir, addrs })
    }

    async fn listening(&self) {
        for &a in &self.addrs {
            wait_for("nginx listening", || async move {
                TcpStream::connect(a).await.is_ok()
            })
            .await;
        }
    }

    /// The access log lines of server `i`.
    fn log(&self, i: usize) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(format!("access{i}.log")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `GET /` on a new connection to `addr`, after `preface` (such as a
/// PROXY header a balancer in front would send); returns the client's own
/// address and the whole reply (empty when the server closed without one).
async fn get(addr: SocketAddr, preface: &[u8]) -> (SocketAddr, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let me = s.local_addr().unwrap();
    let mut req = preface.to_vec();
    req.extend(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut reply = Vec::new();
    let _ = within("reply", s.read_to_end(&mut reply)).await;
    (me, String::from_utf8_lossy(&reply).into_owned())
}

/// Waits for the `n`th line of server `i`'s access log.
async fn logged(nginx: &Nginx, i: usize, n: usize) -> String {
    wait_for("nginx access log line", || async { nginx.log(i).len() > n }).await;
    nginx.log(i)[n].clone()
}

/// One service `web` on `listen` over `backends` (name, address, extra
/// lines), checks off unless the lines say otherwise.
fn toml(listen: &str, service_extra: &str, backends: &[(&str, SocketAddr, &str)]) -> String {
    let mut t = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n\n\
         [[service]]\nname = \"web\"\nlisten = \"{listen}\"\n{service_extra}\n"
    );
    for (name, addr, extra) in backends {
        let checks = if extra.contains("health_") {
            ""
        } else {
            "health_check = \"none\"\n"
        };
        t.push_str(&format!(
            "\n[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n{checks}{extra}\n"
        ));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_logs_the_client_address_sluice_sends_in_v1_and_v2() {
    let v6 = ipv6("nginx_logs_the_client_address_sluice_sends_in_v1_and_v2");
    let hosts: &[&str] = if v6 {
        &["127.0.0.1", "::1"]
    } else {
        &["127.0.0.1"]
    };
    let Some(nginx) = Nginx::start(hosts) else {
        return;
    };
    nginx.listening().await;
    let web = nginx.addrs[0];
    for (version, zero_copy) in [("v1", true), ("v2", false)] {
        // One service on IPv4 and, where there is one, one on IPv6: the
        // header carries the family the client came with.
        let mut listens = vec!["127.0.0.1:0"];
        if v6 {
            listens.push("[::1]:0");
        }
        for listen in listens {
            let text = toml(
                listen,
                "",
                &[("web1", web, &format!("send_proxy = \"{version}\""))],
            );
            let lb = Sluice::from_toml(&format!("zero_copy = {zero_copy}\n{text}")).await;
            let n = nginx.log(0).len();
            let (me, reply) = get(lb.addr, b"").await;
            assert!(reply.ends_with("pp\n"), "{version} {listen}: {reply:?}");
            assert_eq!(
                logged(&nginx, 0, n).await,
                format!("{} {}", me.ip(), me.port()),
                "{version} from {listen}"
            );
            lb.shutdown().await;
        }
    }

    // An IPv6 backend (nginx on [::1]) behind an IPv4 service.
    if v6 {
        let text = toml(
            "127.0.0.1:0",
            "",
            &[("web6", nginx.addrs[1], "send_proxy = \"v2\"")],
        );
        let lb = Sluice::from_toml(&text).await;
        let (me, reply) = get(lb.addr, b"").await;
        assert!(reply.ends_with("pp\n"), "{reply:?}");
        assert_eq!(
            logged(&nginx, 1, 0).await,
            format!("{} {}", me.ip(), me.port())
        );
        let (_, b) = lb.get("/backends/web6").await;
        assert_eq!(b["address"], nginx.addrs[1].to_string());
        assert_eq!(b["send_proxy"], "v2");
        lb.shutdown().await;
    }

    // Negative control: without send_proxy the same nginx refuses the
    // request and logs no client address, so the checks above can fail.
    let lb = Sluice::from_toml(&toml("127.0.0.1:0", "", &[("web1", web, "")])).await;
    let n = nginx.log(0).len();
    let (_, reply) = get(lb.addr, b"").await;
    assert!(
        !reply.contains("200 OK"),
        "nginx answered without a header: {reply:?}"
    );
    let (_, b) = lb.get("/backends/web1").await;
    assert!(b.get("send_proxy").is_none(), "{b}");
    lb.shutdown().await;
    let lines = nginx.log(0);
    assert!(
        lines[n..].iter().all(|l| !l.starts_with("127.0.0.1")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_speak_the_proxy_protocol_to_such_a_server() {
    let Some(nginx) = Nginx::start(&["127.0.0.1"]) else {
        return;
    };
    nginx.listening().await;
    let web = nginx.addrs[0];
    let check = "health_check = \"http\"\nhealth_path = \"/\"";
    let text = toml(
        "127.0.0.1:0",
        "",
        &[
            ("v1", web, &format!("{check}\nsend_proxy = \"v1\"")),
            ("v2", web, &format!("{check}\nsend_proxy = \"v2\"")),
            // Negative control: the same check without the header fails.
            ("plain", web, check),
        ],
    );
    let lb = Sluice::from_toml(&text).await;
    wait_for("checks have run on every backend", || async {
        let (_, list) = lb.get("/backends").await;
        let list = list.as_array().unwrap().clone();
        list.iter()
            .all(|b| b["last_ok_check_ms"].as_u64() > Some(0) || b["healthy"] == Value::Bool(false))
    })
    .await;
    // A few more rounds, so a backend that would fall has fallen.
    let (_, before) = lb.get("/backends/v1").await;
    let since = before["last_ok_check_ms"].as_u64().unwrap();
    wait_for("three more passing checks", || async {
        let (_, b) = lb.get("/backends/v1").await;
        b["last_ok_check_ms"].as_u64().unwrap() > since + 250
    })
    .await;
    for name in ["v1", "v2"] {
        let b = lb.backend(name).await;
        assert_eq!(b["healthy"], true, "{b}");
        assert!(b["last_ok_check_ms"].as_u64() > Some(0), "{b}");
    }
    let plain = lb.backend("plain").await;
    assert_eq!(plain["healthy"], false, "{plain}");
    assert!(plain["last_ok_check_ms"] == 0, "{plain}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_client_of_a_dual_stack_service_reaches_nginx_as_plain_ipv4() {
    if !ipv6("an_ipv4_client_of_a_dual_stack_service_reaches_nginx_as_plain_ipv4") {
        return;
    }
    let Some(nginx) = Nginx::start(&["127.0.0.1"]) else {
        return;
    };
    nginx.listening().await;
    for version in ["v1", "v2"] {
        let text = toml(
            "[::]:0",
            "",
            &[(
                "web1",
                nginx.addrs[0],
                &format!("send_proxy = \"{version}\""),
            )],
        );
        let lb = Sluice::from_toml(&text).await;
        let n = nginx.log(0).len();
        // To the `[::]` listener over IPv4: accepted as ::ffff:127.0.0.1.
        let at: SocketAddr = format!("127.0.0.1:{}", lb.addr.port()).parse().unwrap();
        let (me, reply) = get(at, b"").await;
        assert!(reply.ends_with("pp\n"), "{version}: {reply:?}");
        // TCP4 with the plain address: a mapped one would log as
        // ::ffff:127.0.0.1.
        assert_eq!(
            logged(&nginx, 0, n).await,
            format!("{} {}", me.ip(), me.port()),
            "{version}"
        );
        lb.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_checks_send_a_header_such_a_server_takes() {
    let Some(nginx) = Nginx::start(&["127.0.0.1"]) else {
        return;
    };
    nginx.listening().await;
    let web = nginx.addrs[0];
    let text = toml(
        "127.0.0.1:0",
        "",
        &[
            ("v1", web, "health_check = \"tcp\"\nsend_proxy = \"v1\""),
            ("v2", web, "health_check = \"tcp\"\nsend_proxy = \"v2\""),
        ],
    );
    let lb = Sluice::from_toml(&text).await;
    let last_ok = |name: &'static str| {
        let lb = &lb;
        async move { lb.backend(name).await["last_ok_check_ms"].as_u64().unwrap() }
    };
    for name in ["v1", "v2"] {
        wait_for("a passing check", || async { last_ok(name).await > 0 }).await;
        // And one more, so nginx has had a whole check to read.
        let first = last_ok(name).await;
        wait_for("another passing check", || async {
            last_ok(name).await > first
        })
        .await;
        let b = lb.backend(name).await;
        assert_eq!(b["healthy"], true, "{b}");
    }
    lb.shutdown().await;
    // nginx took every header the checks sent.
    let errors = || std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
    assert!(!errors().contains("broken header"), "{}", errors());
    // Negative control: a connection without one is logged as broken.
    let _ = get(web, b"").await;
    wait_for("nginx logs the broken header", || async {
        errors().contains("broken header")
    })
    .await;
}

/// A backend that reads the PROXY header sluice sends with sluice's own
/// parser, answers with the addresses it names, then echoes every byte.
struct HeaderEcho {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HeaderEcho {
    async fn start(at: &str) -> HeaderEcho {
        let l = TcpListener::bind(at).await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let line = match proxy_header::read(&mut s).await {
                        Ok(Some((src, dst))) => format!("{src} {dst}\n"),
                        Ok(None) => "local\n".to_string(),
                        Err(e) => format!("error {e}\n"),
                    };
                    if s.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        HeaderEcho { addr, task }
    }
}

impl Drop for HeaderEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_comes_first_on_the_copy_and_the_splice_path() {
    let backend = HeaderEcho::start("127.0.0.1:0").await;
    for zero_copy in [true, false] {
        let text = toml(
            "127.0.0.1:0",
            "",
            &[("b", backend.addr, "send_proxy = \"v1\"")],
        );
        let lb = Sluice::from_toml(&format!("zero_copy = {zero_copy}\n{text}")).await;
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        let me = s.local_addr().unwrap();
        assert_eq!(
            within("header line", read_line(&mut s)).await,
            format!("{me} {}", lb.addr)
        );
        // A bulk flow, which the splice path takes when zero_copy is on.
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.into_split();
        let sent = big.clone();
        let writer = tokio::spawn(async move { w.write_all(&sent).await.unwrap() });
        let mut back = vec![0u8; big.len()];
        within("bulk echo", r.read_exact(&mut back)).await.unwrap();
        writer.await.unwrap();
        assert!(back == big, "the echo differs");
        let b = lb.backend("b").await;
        assert_eq!(
            b["bytes_spliced"].as_u64().unwrap() > 0,
            zero_copy,
            "zero_copy = {zero_copy}: {b}"
        );
        // Client bytes only: the header is not the client's.
        wait_for("bytes counted", || async {
            lb.backend("b").await["bytes_in"] == big.len() as u64
        })
        .await;
        lb.shutdown().await;
    }
}

/// The connections of backend `name` as the API lists them.
async fn clients(lb: &Sluice, name: &str) -> Vec<String> {
    let (_, list) = lb.get(&format!("/backends/{name}/connections")).await;
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_proxy_takes_the_address_a_balancer_in_front_sends() {
    let backend = HeaderEcho::start("127.0.0.1:0").await;
    let text = toml(
        "127.0.0.1:0",
        "accept_proxy = true",
        &[("b", backend.addr, "send_proxy = \"v2\"")],
    );
    let lb = Sluice::from_toml(&text).await;
    let src: SocketAddr = "203.0.113.7:4242".parse().unwrap();
    let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
    let src6: SocketAddr = "[2001:db8::7]:4243".parse().unwrap();
    let dst6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    for (version, s, d) in [
        (ProxyVersion::V1, src, dst),
        (ProxyVersion::V2, src, dst),
        (ProxyVersion::V1, src6, dst6),
        (ProxyVersion::V2, src6, dst6),
    ] {
        let mut c = TcpStream::connect(lb.addr).await.unwrap();
        // The header and the first bytes of the stream in one write: the
        // bytes after the header must reach the backend, and first.
        let mut first = encode(version, Some((s, d))).as_bytes().to_vec();
        first.extend(b"hello\n");
        c.write_all(&first).await.unwrap();
        // The backend hears the balancer's client and destination.
        assert_eq!(
            within("header line", read_line(&mut c)).await,
            format!("{s} {d}"),
            "{version:?}"
        );
        assert_eq!(within("echo", read_line(&mut c)).await, "hello");
        assert_eq!(clients(&lb, "b").await, [s.to_string()], "{version:?}");
        echo(&mut c, b"more").await;
        drop(c);
        wait_for("connection gone", || async { lb.live("b").await == 0 }).await;
    }
    // LOCAL and UNKNOWN: the connection's own addresses stand.
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let mut c = TcpStream::connect(lb.addr).await.unwrap();
        let me = c.local_addr().unwrap();
        c.write_all(encode(version, None).as_bytes()).await.unwrap();
        assert_eq!(
            within("header line", read_line(&mut c)).await,
            format!("{me} {}", lb.addr)
        );
        assert_eq!(clients(&lb, "b").await, [me.to_string()]);
        // Gone before the next is listed, as in the loop above.
        drop(c);
        wait_for("connection gone", || async { lb.live("b").await == 0 }).await;
    }
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["established"], 6, "{stats}");
    assert_eq!(stats["rejected_proxy_header"], 0, "{stats}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_proxy_passes_the_address_on_to_nginx() {
    let Some(nginx) = Nginx::start(&["127.0.0.1"]) else {
        return;
    };
    nginx.listening().await;
    let text = toml(
        "127.0.0.1:0",
        "accept_proxy = true",
        &[("web1", nginx.addrs[0], "send_proxy = \"v1\"")],
    );
    let lb = Sluice::from_toml(&text).await;
    let src: SocketAddr = "203.0.113.9:5151".parse().unwrap();
    let dst: SocketAddr = "198.51.100.1:80".parse().unwrap();
    for (n, version) in [ProxyVersion::V1, ProxyVersion::V2].into_iter().enumerate() {
        let (_, reply) = get(lb.addr, encode(version, Some((src, dst))).as_bytes()).await;
        assert!(reply.ends_with("pp\n"), "{reply:?}");
        assert_eq!(
            logged(&nginx, 0, n).await,
            "203.0.113.9 5151",
            "{version:?}"
        );
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_close_their_client_and_reach_no_backend() {
    let backend = Echo::start("b").await;
    let text = toml(
        "127.0.0.1:0",
        "accept_proxy = true\nproxy_header_timeout = \"1s\"",
        &[("b", backend.addr, "")],
    );
    let lb = Sluice::from_toml(&text).await;

    // Slow: half a header, then nothing. Several, all pending at once.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(lb.addr).await.unwrap();
        c.write_all(b"PROXY TCP4 192.0.2.1 ").await.unwrap();
        slow.push(c);
    }
    // Meanwhile the accept loop serves others, header first.
    let header = encode(
        ProxyVersion::V2,
        Some((
            "192.0.2.5:1000".parse().unwrap(),
            "192.0.2.6:80".parse().unwrap(),
        )),
    );
    for _ in 0..5 {
        let mut c = TcpStream::connect(lb.addr).await.unwrap();
        c.write_all(header.as_bytes()).await.unwrap();
        assert_eq!(within("greeting", read_line(&mut c)).await, "b");
        echo(&mut c, b"served while others stall").await;
    }
    // Malformed: no header at all, a request as a client would send it.
    let mut bad = TcpStream::connect(lb.addr).await.unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_by_peer(&mut bad).await, "malformed header left open");
    // Truncated: the client stops sending in the middle of a header.
    let mut cut = TcpStream::connect(lb.addr).await.unwrap();
    cut.write_all(&header.as_bytes()[..20]).await.unwrap();
    cut.shutdown().await.unwrap();
    assert!(closed_by_peer(&mut cut).await, "truncated header left open");
    for mut c in slow {
        assert!(closed_by_peer(&mut c).await, "slow header left open");
    }
    // A client that leaves without a byte (a balancer's port check) is
    // not an error.
    drop(TcpStream::connect(lb.addr).await.unwrap());

    wait_for("every client settled", || async {
        let (_, stats) = lb.get("/stats").await;
        stats["accepted"] == 11 && settled(&stats) == 11
    })
    .await;
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["rejected_proxy_header"], 5, "{stats}");
    assert_eq!(stats["established"], 5, "{stats}");
    assert_eq!(stats["abandoned"], 1, "{stats}");
    // Not a byte of them reached the backend: it saw the good ones only.
    assert_eq!(backend.accepted(), 5);
    let metrics = http_raw(lb.admin, "GET", "/metrics", "").await.2;
    assert!(
        metrics.contains(
            "sluice_service_clients_refused_total{service=\"web\",reason=\"proxy_header\"} 5"
        ),
        "{metrics}"
    );
    lb.shutdown().await;
}

/// A v2 header for `src` to `dst` with `tlvs` (type, value) after the
/// addresses.
fn v2_with_tlvs(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut h = encode(ProxyVersion::V2, Some((src, dst)))
        .as_bytes()
        .to_vec();
    for (t, v) in tlvs {
        h.push(*t);
        h.extend((v.len() as u16).to_be_bytes());
        h.extend(*v);
    }
    let body = (h.len() - 16) as u16;
    h[14..16].copy_from_slice(&body.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_extensions_are_skipped_and_an_oversized_header_refused() {
    let backend = Echo::start("b").await;
    let text = toml(
        "127.0.0.1:0",
        "accept_proxy = true",
        &[("b", backend.addr, "")],
    );
    let lb = Sluice::from_toml(&text).await;
    let src: SocketAddr = "203.0.113.7:4242".parse().unwrap();
    let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
    // As AWS and GCP balancers send them (authority, an endpoint id), and
    // one long enough to take more than the reader's stack buffer.
    let big = vec![b'x'; 3000];
    let header = v2_with_tlvs(
        src,
        dst,
        &[
            (0x02, b"example.com"),
            (0xea, b"\x01vpce-0123456789abcdef0"),
            (0xe0, &big),
        ],
    );
    assert!(header.len() <= proxy_header::V2_MAX, "{}", header.len());
    let mut c = TcpStream::connect(lb.addr).await.unwrap();
    c.write_all(&[header.as_slice(), b"hello"].concat())
        .await
        .unwrap();
    assert_eq!(within("greeting", read_line(&mut c)).await, "b");
    // The echo gives back what the backend got, in order: "hello" first
    // and alone, not a byte of the header before it.
    let mut first = [0u8; 5];
    within("echo", c.read_exact(&mut first)).await.unwrap();
    assert_eq!(&first, b"hello");
    echo(&mut c, b" and more").await;
    assert_eq!(clients(&lb, "b").await, [src.to_string()]);

    // One byte past the cap: refused and counted, the backend untouched.
    let huge = vec![b'x'; proxy_header::V2_MAX - 16 - 12 - 3 + 1];
    let header = v2_with_tlvs(src, dst, &[(0xe0, &huge)]);
    assert_eq!(header.len(), proxy_header::V2_MAX + 1);
    let mut bad = TcpStream::connect(lb.addr).await.unwrap();
    bad.write_all(&header).await.unwrap();
    assert!(closed_by_peer(&mut bad).await, "oversized header left open");
    wait_for("the oversized header counted", || async {
        lb.get("/stats").await.1["rejected_proxy_header"] == 1
    })
    .await;
    assert_eq!(backend.accepted(), 1);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_deadline_covers_the_whole_header_not_each_read() {
    let backend = Echo::start("b").await;
    let deadline = Duration::from_millis(400);
    let text = toml(
        "127.0.0.1:0",
        "accept_proxy = true\nproxy_header_timeout = \"400ms\"",
        &[("b", backend.addr, "")],
    );
    let lb = Sluice::from_toml(&text).await;
    let header = encode(
        ProxyVersion::V1,
        Some((
            "192.0.2.1:1000".parse().unwrap(),
            "192.0.2.2:80".parse().unwrap(),
        )),
    );
    let started = Instant::now();
    let (mut r, mut w) = TcpStream::connect(lb.addr).await.unwrap().into_split();
    // One byte every 100 ms: each gap well within the deadline, the
    // whole header (40 bytes, 4 s) far beyond it. The pace is what is
    // tested, not a wait for something to happen.
    let drip = async {
        for b in header.as_bytes() {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let closed = async {
        let mut b = [0u8; 16];
        matches!(r.read(&mut b).await, Ok(0) | Err(_))
    };
    tokio::select! {
        _ = drip => panic!("the whole header went out a byte at a time and was taken"),
        closed = closed => assert!(closed, "the client was served"),
    }
    let took = started.elapsed();
    assert!(took >= deadline, "closed after {took:?}");
    wait_for("the slow header counted", || async {
        lb.get("/stats").await.1["rejected_proxy_header"] == 1
    })
    .await;
    assert_eq!(backend.accepted(), 0);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_services_and_backends() {
    if !ipv6("ipv6_services_and_backends") {
        return;
    }
    let b6 = Echo::restart("b6", "[::1]:0".parse().unwrap()).await;
    let b4 = Echo::start("b4").await;
    // `[::]` takes IPv4 clients too, shown as plain IPv4.
    let text = toml(
        "[::]:0",
        "",
        &[
            ("b6", b6.addr, "weight = 1000"),
            ("b4", b4.addr, "weight = 0"),
        ],
    );
    let lb = Sluice::from_toml(&text).await;
    let port = lb.addr.port();
    for at in [format!("[::1]:{port}"), format!("127.0.0.1:{port}")] {
        let mut c = TcpStream::connect(at.as_str()).await.unwrap();
        let me = c.local_addr().unwrap();
        assert_eq!(within("greeting", read_line(&mut c)).await, "b6", "{at}");
        assert_eq!(clients(&lb, "b6").await, [me.to_string()], "{at}");
        echo(&mut c, b"over IPv6").await;
        drop(c);
        wait_for("connection gone", || async { lb.live("b6").await == 0 }).await;
    }
    let b = lb.backend("b6").await;
    assert_eq!(b["address"], b6.addr.to_string());
    assert_eq!(b["total_connections"], 2);
    lb.shutdown().await;

    // Health checks to an IPv6 backend, and the listing `ctl status` prints
    // from an admin API on IPv6.
    let text = toml("[::1]:0", "", &[("b6", b6.addr, "health_check = \"tcp\"")])
        .replace("listen = \"127.0.0.1:0\"", "listen = \"[::1]:0\"");
    let lb = Sluice::from_toml(&text).await;
    assert!(lb.admin.is_ipv6(), "{}", lb.admin);
    wait_for("a passing check", || async {
        lb.backend("b6").await["last_ok_check_ms"].as_u64() > Some(0)
    })
    .await;
    let out = Command::new(BIN)
        .args(["ctl", "--admin", &lb.admin.to_string(), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = text.lines().find(|l| l.starts_with("b6")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], b6.addr.to_string(), "{text}");
    assert_eq!(cols[3], "up", "{text}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_and_ipv6_services_share_a_port_and_mapped_addresses_bind() {
    if !ipv6("ipv4_and_ipv6_services_share_a_port_and_mapped_addresses_bind") {
        return;
    }
    let b4 = Echo::start("b4").await;
    let b6 = Echo::start("b6").await;
    // A port the kernel just handed out, released for sluice.
    let port = std::net::TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // `0.0.0.0` and `[::1]` on one port do not clash; a v4-mapped
    // address binds, and is its IPv4 address.
    let mut text = toml(
        "[::ffff:127.0.0.1]:0",
        "backends = [\"b4\"]",
        &[("b4", b4.addr, ""), ("b6", b6.addr, "")],
    );
    text.push_str(&format!(
        "\n[[service]]\nname = \"four\"\nlisten = \"0.0.0.0:{port}\"\nbackends = [\"b4\"]\n\
         \n[[service]]\nname = \"six\"\nlisten = \"[::1]:{port}\"\nbackends = [\"b6\"]\n"
    ));
    let lb = Sluice::from_toml(&text).await;
    for (at, want) in [
        (format!("127.0.0.1:{}", lb.addr.port()), "b4"),
        (format!("127.0.0.1:{port}"), "b4"),
        (format!("[::1]:{port}"), "b6"),
    ] {
        let mut c = TcpStream::connect(at.as_str()).await.unwrap();
        assert_eq!(within("greeting", read_line(&mut c)).await, want, "{at}");
        echo(&mut c, b"hi").await;
        if at.starts_with("127.0.0.1") {
            // A client of the v4-mapped listener shows as plain IPv4.
            let me = c.local_addr().unwrap();
            assert!(clients(&lb, "b4").await.contains(&me.to_string()), "{at}");
        }
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_header_that_never_comes() {
    let backend = Echo::start("b").await;
    // The longest header deadline there is; the grace period is 100 ms.
    let text = toml(
        "127.0.0.1:0",
        "accept_proxy = true\nproxy_header_timeout = \"5m\"",
        &[("b", backend.addr, "")],
    );
    // In-process with a handle on its counters, which outlive the admin API.
    let (shared, addr, _, stop, task) = bound(&format!("shutdown_grace = \"100ms\"\n{text}")).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"PROXY TCP4 ").await.unwrap();
    wait_for("the client accepted", || async {
        shared.stats.accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    let _ = stop.send(());
    // `within` fails the test if shutdown takes longer than the deadline.
    within("sluice shutdown", task).await.unwrap().unwrap();
    assert!(closed_by_peer(&mut slow).await);
    assert_eq!(backend.accepted(), 0);
    // Let go by shutdown, not refused: its header was not bad, only unfinished.
    assert_eq!(shared.stats.abandoned.load(Ordering::SeqCst), 1);
    assert_eq!(shared.stats.rejected_proxy_header.load(Ordering::SeqCst), 0);
}
