//! Faults of the network and of backends: a backend's link goes dark or
//! turns lossy (in a network namespace of its own), a backend is killed or
//! stuck, a client reads slowly. What sluice promises under them: a client that
//! arrives after a backend failed is served by another, bytes arrive
//! intact, and a slow client costs sluice bounded memory. Each test that
//! finds nothing lost also shows that its harness can see a loss.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::netns::{self, Impairment, Net};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::RwLock;
use tokio::task::JoinHandle;

/// How long one client request may take before it counts as failed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks that mark a dead backend down within about a second.
const FAST_CHECKS: &str = "interval = \"200ms\"\ntimeout = \"300ms\"\nfall = 2\nrise = 2";

/// A config with `top` keys, `[health]` lines (or no checks at all), and
/// one service `web` over `backends`.
fn config_with(top: &str, health: Option<&str>, backends: &[(&str, SocketAddr)]) -> String {
    let mut text = format!("{top}\n");
    if let Some(h) = health {
        text.push_str(&format!("[health]\n{h}\n"));
    }
    text.push_str(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n",
    );
    for (name, addr) in backends {
        text.push_str(&format!(
            "\n[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        ));
        if health.is_none() {
            text.push_str("health_check = \"none\"\n");
        }
    }
    text
}

/// Waits until every backend in `names` has passed a check.
async fn all_up(lb: &Sluice, names: &[&str]) {
    for name in names {
        wait_for(&format!("{name} checked and up"), || async {
            let v = lb.backend(name).await;
            v["health_checked"] == true && v["healthy"] == true
        })
        .await;
    }
}

/// The body of a complete `200` reply, or what is wrong with the reply.
fn body_of(reply: &[u8]) -> Result<&[u8], String> {
    if reply.is_empty() {
        return Err("closed without a reply".into());
    }
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("reply cut in its head after {} bytes", reply.len()))?;
    let head = String::from_utf8_lossy(&reply[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status:?}"));
    }
    let body = &reply[end + 4..];
    let announced = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match announced {
        Some(n) if n != body.len() => Err(format!("body of {} bytes, {n} announced", body.len())),
        _ => Ok(body),
    }
}

/// One HTTP/1.0 exchange on a new connection to `addr`: the reply's body.
async fn exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> Result<Vec<u8>, String> {
    let talk = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        body_of(&reply).map(<[u8]>::to_vec)
    };
    tokio::time::timeout(limit, talk)
        .await
        .unwrap_or_else(|_| Err(format!("no whole reply within {limit:?}")))
}

/// The backend name in a `sluice web` greeting.
fn who(body: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(body);
    text.strip_prefix("hello from ")
        .map(|n| n.trim_end().to_string())
        .ok_or_else(|| format!("unexpected body {text:?}"))
}

/// A GET through `addr`: the name of the backend that answered.
async fn get(addr: SocketAddr) -> Result<String, String> {
    who(&exchange(addr, b"GET / HTTP/1.0\r\nHost: t\r\n\r\n", CLIENT_TIMEOUT).await?)
}

/// One request of a load loop.
struct Sample {
    issued: Instant,
    took: Duration,
    answer: Result<String, String>,
}

impl Sample {
    fn by(&self, name: &str) -> bool {
        self.answer.as_deref() == Ok(name)
    }
}

/// Clients that each send GETs through sluice, one after another, until
/// stopped. Each request holds `gate` for reading, so a test can make a
/// fault at an instant when no request is in flight.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    gate: Arc<RwLock<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(RwLock::new(()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, samples, gate) = (stop.clone(), samples.clone(), gate.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let _held = gate.read().await;
                        let issued = Instant::now();
                        let answer = get(addr).await;
                        let took = issued.elapsed();
                        samples.lock().unwrap().push(Sample {
                            issued,
                            took,
                            answer,
                        });
                    }
                })
            })
            .collect();
        Load {
            stop,
            samples,
            gate,
            tasks,
        }
    }

    /// Finished requests for which `f` holds.
    fn count(&self, f: impl Fn(&Sample) -> bool) -> usize {
        self.samples.lock().unwrap().iter().filter(|s| f(s)).count()
    }

    async fn wait_both_serve(&self, a: &str, b: &str) {
        wait_for("both backends serve the load", || async {
            self.count(|s| s.by(a)) >= 20 && self.count(|s| s.by(b)) >= 20
        })
        .await;
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            within("load client ends", t).await.unwrap();
        }
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

fn first_errors(samples: &[&Sample]) -> Vec<String> {
    samples
        .iter()
        .filter_map(|s| s.answer.as_ref().err().cloned())
        .take(5)
        .collect()
}

/// `sluice web` in this process, on loopback.
struct LocalWeb {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LocalWeb {
    async fn start(name: &str) -> LocalWeb {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(sluice::demo::web_server(l, name.to_string()));
        LocalWeb { addr, task }
    }

    /// Stops listening, and waits until connects are refused.
    async fn kill(&self) {
        self.task.abort();
        let addr = self.addr;
        wait_for("killed web server refuses connects", || async move {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
    }
}

impl Drop for LocalWeb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `sluice web` as a process of its own on loopback, to be killed.
fn process_web(name: &str) -> (Proc, SocketAddr) {
    let mut p = Proc::spawn(&["web", "--listen", "127.0.0.1:0", "--name", name]);
    let addr = addr_after(&p.wait_line("listening on"), "listening on ");
    (p, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_backend_costs_clients_at_most_a_connect_timeout_and_no_request() {
    if !netns::available() {
        return;
    }
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    let net = Net::new();
    let (_web_a, a) = net.web("a");
    let b = LocalWeb::start("b").await;
    let lb = Sluice::from_toml(&config_with(
        &format!("connect_timeout = \"{}ms\"", CONNECT_TIMEOUT.as_millis()),
        Some(FAST_CHECKS),
        &[("a", a), ("b", b.addr)],
    ))
    .await;
    all_up(&lb, &["a", "b"]).await;
    let load = Load::start(lb.addr, 4);
    load.wait_both_serve("a", "b").await;

    // The fault falls between requests: one cut mid-reply is lost with
    // any balancer, and the kill test counts those. Load resumes at once.
    let gate = load.gate.write().await;
    let fault = Instant::now();
    net.blackhole();
    drop(gate);
    wait_for("a marked down", || async {
        lb.backend("a").await["healthy"] == false
    })
    .await;
    let down = Instant::now();
    wait_for("200 requests issued after a was marked down", || async {
        load.count(|s| s.issued >= down) >= 200
    })
    .await;
    let samples = load.stop().await;

    let all: Vec<&Sample> = samples.iter().collect();
    let failed = all.iter().filter(|s| s.answer.is_err()).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {:?}",
        all.len(),
        first_errors(&all)
    );
    let after: Vec<&Sample> = all.iter().copied().filter(|s| s.issued >= down).collect();
    assert!(
        after.iter().all(|s| s.by("b")),
        "a request after a was marked down went elsewhere than b"
    );
    // Requests that met the dark backend before it was marked down waited
    // for one connect timeout, then went to b.
    let window: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.issued >= fault && s.issued < down)
        .collect();
    let slowest = window.iter().map(|s| s.took).max().unwrap_or_default();
    assert!(
        slowest >= CONNECT_TIMEOUT,
        "no request met the dark backend ({} issued before it was marked down, slowest {slowest:?}): failover was not exercised",
        window.len()
    );
    assert!(
        slowest < CONNECT_TIMEOUT + Duration::from_secs(1),
        "a request took {slowest:?}, more than one connect timeout and a margin"
    );
    let view = lb.backend("a").await;
    assert!(
        view["connect_failures"].as_u64().unwrap() >= 1,
        "no client connect to a failed: {view}"
    );
    eprintln!(
        "blackhole: {} requests, {} issued while a was undetected (slowest {slowest:?}), detected after {:?}",
        all.len(),
        window.len(),
        down - fault
    );

    // Negative control: with b gone too, the harness sees every request fail.
    b.kill().await;
    let mut lost = 0;
    for _ in 0..10 {
        if get(lb.addr).await.is_err() {
            lost += 1;
        }
    }
    assert_eq!(lost, 10, "the harness did not see requests fail");
    lb.shutdown().await;
}

/// Bodies for the lossy link: distinct per request, so that a reply that
/// went to the wrong client or lost its order shows.
fn body_for(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a: a short name for a body in a failure message.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST / HTTP/1.0\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_backend_link_delivers_every_reply_intact_only_slower() {
    if !netns::available() {
        return;
    }
    const REQUESTS: usize = 200;
    const PARALLEL: usize = 40;
    const BODY: usize = 100 << 10;
    let net = Net::new();
    let (_web, lossy) = net.web("lossy");
    // One lost SYN-ACK costs a second and two cost three: room for several.
    let lb = Sluice::from_toml(&config_with(
        "connect_timeout = \"10s\"",
        None,
        &[("lossy", lossy)],
    ))
    .await;
    let how = match net.impair(20, 20) {
        Ok(how) => how,
        Err(e) if std::env::var_os("CI").is_some() => panic!(
            "{e}\nCI must run the lossy-link test: it needs the netem qdisc (tc from iproute2, module sch_netem) or nftables"
        ),
        Err(e) => {
            netns::skip(&format!("lossy link: {e}"));
            return;
        }
    };
    if how == Impairment::Nftables {
        netns::note(
            "lossy link: this kernel has no netem; 20% loss by nftables, without the 20 ms delay",
        );
    }
    let dropped_before = net.dropped(how);
    let started = Instant::now();

    // The backend echoes each POST's body, so both directions cross the link.
    let next = Arc::new(AtomicUsize::new(0));
    let addr = lb.addr;
    let workers: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut bad = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= REQUESTS {
                        return bad;
                    }
                    let body = body_for(i as u64 + 1, BODY);
                    match exchange(addr, &post(&body), DEADLINE).await {
                        Ok(back) if back == body => {}
                        Ok(back) => bad.push(format!(
                            "request {i}: {} bytes back, fnv {:x}, sent fnv {:x}",
                            back.len(),
                            fnv(&back),
                            fnv(&body)
                        )),
                        Err(e) => bad.push(format!("request {i}: {e}")),
                    }
                }
            })
        })
        .collect();
    let mut bad = Vec::new();
    for w in workers {
        bad.extend(within("lossy requests", w).await.unwrap());
    }
    let took = started.elapsed();
    let dropped = net.dropped(how) - dropped_before;
    assert!(
        bad.is_empty(),
        "{} of {REQUESTS} replies not intact: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(dropped > 0, "the link lost no packet: nothing was tested");
    eprintln!(
        "lossy link ({how:?}): {REQUESTS} echoes of {BODY} bytes intact in {took:?}, {dropped} packets dropped"
    );

    // Negative control: with every packet lost, the harness sees the failure.
    net.impair(100, 0).unwrap();
    let body = body_for(0, BODY);
    let r = exchange(lb.addr, &post(&body), Duration::from_secs(1)).await;
    assert!(r.is_err(), "a request crossed a link that loses everything");
    lb.shutdown().await;
}

/// A client that keeps one connection open for several GETs.
struct KeepAlive(BufReader<TcpStream>);

impl KeepAlive {
    async fn connect(addr: SocketAddr) -> KeepAlive {
        KeepAlive(BufReader::new(TcpStream::connect(addr).await.unwrap()))
    }

    /// One GET on the kept connection: the name of the backend.
    async fn get(&mut self) -> Result<String, String> {
        let s = &mut self.0;
        let talk = async {
            s.get_mut()
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut head = Vec::new();
            loop {
                let mut line = Vec::new();
                let n = s
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(|e| format!("receive: {e}"))?;
                if n == 0 {
                    return Err("closed without a reply".to_string());
                }
                head.extend_from_slice(&line);
                if line == b"\r\n" {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&head);
            let length = text
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .ok_or("no content-length")?;
            let mut reply = head;
            let start = reply.len();
            reply.resize(start + length, 0);
            s.read_exact(&mut reply[start..])
                .await
                .map_err(|e| format!("receive: {e}"))?;
            who(body_of(&reply)?)
        };
        tokio::time::timeout(CLIENT_TIMEOUT, talk)
            .await
            .unwrap_or_else(|_| Err("no reply in time".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_refuses_no_client_that_comes_after() {
    let (mut web_a, a) = process_web("a");
    let (_web_b, b) = process_web("b");
    let lb = Sluice::from_toml(&config_with(
        "connect_timeout = \"1s\"",
        Some(FAST_CHECKS),
        &[("a", a), ("b", b)],
    ))
    .await;
    all_up(&lb, &["a", "b"]).await;
    // Kept connections on both: those on a are what the kill takes.
    let mut kept = Vec::new();
    for _ in 0..6 {
        let mut k = KeepAlive::connect(lb.addr).await;
        let name = k.get().await.unwrap();
        kept.push((k, name));
    }
    let kept_on_a = kept.iter().filter(|(_, n)| n == "a").count();
    assert!(
        kept_on_a > 0 && kept_on_a < kept.len(),
        "round-robin spreads the kept clients"
    );
    let load = Load::start(lb.addr, 4);
    load.wait_both_serve("a", "b").await;

    let kill = Instant::now();
    web_a.child.kill().unwrap();
    // Once reaped, its sockets are closed: connects to a are refused.
    tokio::task::block_in_place(|| web_a.child.wait()).unwrap();
    let dead = Instant::now();
    wait_for("200 requests issued after the kill", || async {
        load.count(|s| s.issued >= dead) >= 200
    })
    .await;
    let samples = load.stop().await;

    let after: Vec<&Sample> = samples.iter().filter(|s| s.issued >= dead).collect();
    let failed = after.iter().filter(|s| s.answer.is_err()).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} clients after the kill were not served: {:?}",
        after.len(),
        first_errors(&after)
    );
    assert!(after.iter().all(|s| s.by("b")));
    // Requests in flight on a when it died are lost, as with any balancer:
    // counted apart, not asserted.
    let before: Vec<&Sample> = samples.iter().filter(|s| s.issued < dead).collect();
    let lost_in_flight = before.iter().filter(|s| s.answer.is_err()).count();
    let view = lb.backend("a").await;
    assert!(
        view["connect_failures"].as_u64().unwrap() >= 1,
        "no client met the dead backend before its check did: failover was not exercised: {view}"
    );

    // Negative control: the kept clients on a lost their connection, and
    // the harness sees it; those on b go on.
    let mut lost_kept = 0;
    for (mut k, name) in kept {
        let r = k.get().await;
        if name == "a" {
            assert!(
                r.is_err(),
                "a kept client of the killed backend was answered"
            );
            lost_kept += 1;
        } else {
            assert_eq!(r, Ok("b".to_string()));
        }
    }
    assert_eq!(lost_kept, kept_on_a);
    eprintln!(
        "kill: {} requests after the kill all served; {lost_in_flight} of {} before it lost in flight {:?}; {lost_kept} kept connections lost; a reaped {:?} after SIGKILL",
        after.len(),
        before.len(),
        first_errors(&before),
        dead - kill
    );
    lb.shutdown().await;
}

/// A backend that accepts and then never answers, holding every
/// connection until the test ends.
async fn stuck_backend() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_backend_drains_at_force_after_while_the_other_serves() {
    let (stuck, stuck_task) = stuck_backend().await;
    let b = Echo::start("b").await;
    let lb = Sluice::start("", &[("stuck", stuck), ("b", b.addr)]).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(TcpStream::connect(lb.addr).await.unwrap());
    }
    wait_for("every client connected to a backend", || async {
        lb.live("stuck").await + lb.live("b").await == 6
    })
    .await;
    let (_, conns) = lb.get("/backends/stuck/connections").await;
    let on_stuck: HashSet<String> = conns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap().to_string())
        .collect();
    let (mut stuck_clients, mut b_clients): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .partition(|c| on_stuck.contains(&c.local_addr().unwrap().to_string()));
    assert!(!stuck_clients.is_empty() && !b_clients.is_empty());
    for c in &mut b_clients {
        assert_eq!(within("greeting", read_line(c)).await, "b");
    }

    // Negative control: left alone, the stuck backend's drain never ends.
    let (status, v) = lb.post("/backends/stuck/drain?wait=300ms").await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["state"], "draining", "{v}");
    assert_eq!(v["active_connections"], stuck_clients.len(), "{v}");

    let asked = Instant::now();
    let (status, v) = lb.post("/backends/stuck/drain?force_after=1s").await;
    assert_eq!(status, 202, "{v}");
    wait_for("stuck backend drained", || async {
        let v = lb.backend("stuck").await;
        v["state"] == "drained" && v["active_connections"] == 0
    })
    .await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "forced after {took:?}, before force_after"
    );
    assert!(took < Duration::from_secs(3), "forced only after {took:?}");
    for c in &mut stuck_clients {
        assert!(
            closed_by_peer(c).await,
            "a client of the stuck backend is still open"
        );
    }
    for c in &mut b_clients {
        echo(c, b"still served").await;
    }
    for _ in 0..10 {
        let (_, name) = lb.connect().await;
        assert_eq!(name, "b");
    }
    eprintln!(
        "stuck: {} clients closed {took:?} after drain?force_after=1s, {} on b served",
        stuck_clients.len(),
        b_clients.len()
    );
    lb.shutdown().await;
    stuck_task.abort();
}

/// Period of the slow reader's stream: not a power of two, so that a lost
/// or repeated chunk shifts what follows.
const PERIOD: usize = (1 << 20) + 7;

/// The slow reader's stream: byte `i` is `bytes[i % PERIOD]`; two periods
/// are kept so that any window of up to a period is one slice.
struct Pattern(Vec<u8>);

impl Pattern {
    fn new() -> Pattern {
        let mut one = body_for(42, PERIOD);
        one.extend_from_within(..);
        Pattern(one)
    }

    /// `len` (at most a period) bytes of the stream from `at`.
    fn at(&self, at: usize, len: usize) -> &[u8] {
        let o = at % PERIOD;
        &self.0[o..o + len]
    }
}

/// A backend that writes `total` bytes of `pattern` to each client as
/// fast as it is let, counting what it has written.
async fn stream_backend(
    total: usize,
    pattern: Arc<Pattern>,
    written: Arc<AtomicU64>,
) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (pattern, written) = (pattern.clone(), written.clone());
            tokio::spawn(async move {
                let mut at = 0;
                while at < total {
                    let n = (total - at).min(256 << 10);
                    if s.write_all(pattern.at(at, n)).await.is_err() {
                        return;
                    }
                    at += n;
                    written.fetch_add(n as u64, Ordering::SeqCst);
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib << 10
}

/// A client reads 256 MiB through sluice (run as a process, so that its
/// memory is its own) at most 64 KiB a millisecond, while the backend
/// writes as fast as it may.
async fn slow_reader_costs_sluice_bounded_memory(zero_copy: bool) {
    const TOTAL: usize = 256 << 20;
    const CHUNK: usize = 64 << 10;
    const BOUND: u64 = 64 << 20;
    let pattern = Arc::new(Pattern::new());
    let written = Arc::new(AtomicU64::new(0));
    let (backend, backend_task) = stream_backend(TOTAL, pattern.clone(), written.clone()).await;
    let top = if zero_copy { "" } else { "zero_copy = false" };
    let (_dir, path) = write_config(&config(top, "", &[("a", backend)]));
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    let pid = p.child.id();
    let baseline = rss(pid);

    let mut s = TcpStream::connect(addr).await.unwrap();
    // Rate control, not synchronisation: the reader takes at most one
    // chunk a tick.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut buf = vec![0u8; CHUNK];
    let (mut peak, mut most_ahead) = (baseline, 0u64);
    let started = Instant::now();
    let mut read = 0;
    while read < TOTAL {
        tick.tick().await;
        within("a chunk", s.read_exact(&mut buf)).await.unwrap();
        assert!(
            buf == pattern.at(read, CHUNK),
            "bytes {read}.. differ from what the backend sent"
        );
        read += CHUNK;
        if (read / CHUNK).is_multiple_of(16) {
            peak = peak.max(rss(pid));
            most_ahead = most_ahead.max(written.load(Ordering::SeqCst) - read as u64);
        }
    }
    assert_eq!(
        within("end of stream", s.read(&mut buf)).await.unwrap(),
        0,
        "bytes past the end"
    );
    let took = started.elapsed();
    assert!(
        peak <= baseline + BOUND,
        "sluice grew from {} MiB to {} MiB for one slow reader",
        baseline >> 20,
        peak >> 20
    );
    // Negative controls: the check sees one byte lost, and the backend did
    // run ahead of the reader, so buffers were under pressure.
    assert!(pattern.at(1, CHUNK) != pattern.at(0, CHUNK));
    assert!(
        most_ahead >= 1 << 20,
        "the backend was never more than {most_ahead} bytes ahead: the reader was not slow"
    );
    eprintln!(
        "slow reader (zero_copy = {zero_copy}): {} MiB intact in {took:?}; RSS {} -> peak {} MiB; backend ahead by up to {} MiB",
        TOTAL >> 20,
        baseline >> 20,
        peak >> 20,
        most_ahead >> 20
    );
    // The client's half is still open; closing it ends the connection, so
    // shutdown has nothing to wait for.
    drop(s);
    p.signal("TERM");
    assert_eq!(p.wait_exit().code(), Some(0));
    backend_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_costs_bounded_memory_when_splicing() {
    slow_reader_costs_sluice_bounded_memory(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_costs_bounded_memory_when_copying() {
    slow_reader_costs_sluice_bounded_memory(false).await;
}
