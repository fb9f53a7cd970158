//! Balancing modes, slow start, per-backend limits and backups, through
//! real sockets: sluice runs in-process on ephemeral ports over echo
//! backends that greet each client with their name.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;
use support::*;
use tokio::net::{TcpSocket, TcpStream};

/// One service `web` over `backends`, with `service` lines added to the
/// service and `extra` lines to each backend named in it.
fn text(service: &str, backends: &[(&str, SocketAddr)], extra: &[(&str, &str)]) -> String {
    let mut t = config("", "", backends).replacen(
        "name = \"web\"\n",
        &format!("name = \"web\"\n{service}\n"),
        1,
    );
    for (name, lines) in extra {
        t = t.replacen(
            &format!("name = \"{name}\"\n"),
            &format!("name = \"{name}\"\n{lines}\n"),
            1,
        );
    }
    t
}

/// Connects from `from` (a loopback address; Linux routes all of
/// 127.0.0.0/8 to lo) and reads the greeting: the backend's name, or ""
/// when sluice closed the client without one.
async fn connect_from(lb: &Sluice, from: IpAddr) -> (TcpStream, String) {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = s.connect(lb.addr).await.unwrap();
    let name = within("greeting", read_line(&mut s)).await;
    (s, name)
}

/// Connects and reads the greeting; "" when refused.
async fn greeting(lb: &Sluice) -> (TcpStream, String) {
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let name = within("greeting", read_line(&mut s)).await;
    (s, name)
}

/// `n` clients one after the other, each closed once greeted: how many
/// each backend took.
async fn spread(lb: &Sluice, n: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let (_s, name) = greeting(lb).await;
        *out.entry(name).or_default() += 1;
    }
    out
}

async fn service(lb: &Sluice) -> Value {
    let (status, v) = lb.get("/services").await;
    assert_eq!(status, 200, "{v}");
    v[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_new_clients_to_the_least_loaded_for_its_weight() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::from_toml(&text(
        "balance = \"least-connections\"",
        &[("a", a.addr), ("b", b.addr)],
        &[("b", "weight = 2")],
    ))
    .await;
    assert_eq!(service(&lb).await["balance"], "least-connections");
    // Held connections: b, of weight 2, ends with twice a's.
    let mut held: Vec<(TcpStream, String)> = Vec::new();
    for _ in 0..6 {
        held.push(greeting(&lb).await);
    }
    let on = |held: &[(TcpStream, String)], n: &str| held.iter().filter(|(_, x)| x == n).count();
    assert_eq!((on(&held, "a"), on(&held, "b")), (2, 4));
    // b's clients leave: the next four all go to b, the least loaded.
    held.retain(|(_, n)| n == "a");
    wait_for("b's connections closed", || async {
        lb.live("b").await == 0
    })
    .await;
    for _ in 0..4 {
        held.push(greeting(&lb).await);
    }
    assert_eq!((on(&held, "a"), on(&held, "b")), (2, 4), "b refilled first");

    // Negative control: round-robin over the same held load does not look
    // at it, and the harness sees the difference.
    let lb2 = Sluice::from_toml(&text("", &[("a", a.addr), ("b", b.addr)], &[])).await;
    let mut rr: Vec<(TcpStream, String)> = Vec::new();
    for _ in 0..4 {
        rr.push(greeting(&lb2).await);
    }
    rr.retain(|(_, n)| n == "a");
    for _ in 0..2 {
        rr.push(greeting(&lb2).await);
    }
    assert_eq!(on(&rr, "a"), 3, "round-robin alternates whatever the load");
    lb.shutdown().await;
    lb2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_keeps_a_client_on_one_backend_and_a_drained_one_gets_nobody() {
    let backends = [
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    ];
    let list: Vec<(&str, SocketAddr)> =
        backends.iter().map(|e| (e.name.as_str(), e.addr)).collect();
    let lb = Sluice::from_toml(&text(
        "balance = \"source-hash\"\naffinity = \"client-ip\"",
        &list,
        &[],
    ))
    .await;
    let s = service(&lb).await;
    assert_eq!(
        (s["balance"].as_str(), s["affinity"].as_str()),
        (Some("source-hash"), Some("client-ip"))
    );

    // 30 clients, five connects each: one backend per client.
    let clients: Vec<IpAddr> = (1..=30)
        .map(|i| format!("127.0.1.{i}").parse().unwrap())
        .collect();
    let mut home = HashMap::new();
    for &c in &clients {
        let (_s, first) = connect_from(&lb, c).await;
        for _ in 0..4 {
            assert_eq!(connect_from(&lb, c).await.1, first, "{c} moved");
        }
        home.insert(c, first);
    }
    let used: std::collections::HashSet<_> = home.values().collect();
    assert_eq!(
        used.len(),
        3,
        "30 clients spread over every backend: {home:?}"
    );

    // Drain b: its clients move, each to one backend, every time; nobody
    // else moves, and b accepts nothing new.
    let b_before = backends[1].accepted();
    let (status, _) = lb.post("/backends/b/drain").await;
    assert_eq!(status, 200);
    for &c in &clients {
        let (_s, now) = connect_from(&lb, c).await;
        if home[&c] == "b" {
            assert_ne!(now, "b");
            assert_eq!(
                connect_from(&lb, c).await.1,
                now,
                "{c}: the same second choice"
            );
        } else {
            assert_eq!(now, home[&c], "{c} was not b's, yet moved");
        }
    }
    assert_eq!(
        backends[1].accepted(),
        b_before,
        "a drained backend got a connection"
    );
    // Back in rotation, its clients come back.
    lb.post("/backends/b/start").await;
    for &c in &clients {
        assert_eq!(connect_from(&lb, c).await.1, home[&c]);
    }
    // Negative control: the count above does see b's new connections.
    assert!(backends[1].accepted() > b_before);
    lb.shutdown().await;

    // Network affinity: every 127.0.1.x is one /24, so one backend.
    let lb = Sluice::from_toml(&text(
        "balance = \"source-hash\"\naffinity = \"network\"",
        &list,
        &[],
    ))
    .await;
    let mut seen = std::collections::HashSet::new();
    for &c in &clients {
        seen.insert(connect_from(&lb, c).await.1);
    }
    assert_eq!(seen.len(), 1, "one /24 on one backend: {seen:?}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_sends_clients_on_and_refuses_and_counts_when_all_are_full() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::from_toml(&text(
        "",
        &[("a", a.addr), ("b", b.addr)],
        &[("a", "max_connections = 2"), ("b", "max_connections = 1")],
    ))
    .await;
    assert_eq!(lb.backend("a").await["max_connections"], 2);
    // Three held clients fill both; the last slot goes to whichever has it.
    let mut held = Vec::new();
    for _ in 0..3 {
        let (s, name) = greeting(&lb).await;
        assert!(!name.is_empty(), "refused while a slot was free");
        held.push((s, name));
    }
    let on = |n: &str| held.iter().filter(|(_, x)| x == n).count();
    assert_eq!((on("a"), on("b")), (2, 1));
    // Every slot taken: the next clients are refused, and counted.
    for _ in 0..3 {
        let (_s, name) = greeting(&lb).await;
        assert_eq!(name, "", "a client got in over max_connections");
    }
    wait_for("every client settled", || async {
        let (_, stats) = lb.get("/stats").await;
        settled(&stats) == stats["accepted"].as_u64().unwrap()
    })
    .await;
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["rejected_backend_full"], 3, "{stats}");
    assert_eq!(stats["rejected_no_backend"], 0, "{stats}");
    assert_eq!(service(&lb).await["refused"]["backend_full"], 3);
    assert_eq!((lb.live("a").await, lb.live("b").await), (2, 1));
    // A slot freed on a: the next client takes it.
    let i = held.iter().position(|(_, n)| n == "a").unwrap();
    held.remove(i);
    wait_for("a has a free slot", || async { lb.live("a").await == 1 }).await;
    let again = greeting(&lb).await;
    assert_eq!(again.1, "a");
    held.push(again);
    // b out of rotation and a full: still full, since a is the one
    // backend that takes connections.
    lb.post("/backends/b/drain").await;
    held.retain(|(_, n)| n == "a");
    assert_eq!(greeting(&lb).await.1, "");
    // Negative control: with none in rotation, the refusal is counted as
    // no backend: the counters tell the two apart.
    lb.post("/backends/a/drain").await;
    assert_eq!(greeting(&lb).await.1, "");
    wait_for("every client settled", || async {
        let (_, stats) = lb.get("/stats").await;
        settled(&stats) == stats["accepted"].as_u64().unwrap()
    })
    .await;
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["rejected_backend_full"], 4, "{stats}");
    assert_eq!(stats["rejected_no_backend"], 1, "{stats}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_serves_only_while_no_primary_can() {
    let (a, b, spare) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("spare").await,
    );
    let lb = Sluice::from_toml(&text(
        "",
        &[("a", a.addr), ("b", b.addr), ("spare", spare.addr)],
        &[("spare", "backup = true"), ("b", "max_connections = 1")],
    ))
    .await;
    assert_eq!(lb.backend("spare").await["backup"], true);
    assert_eq!(service(&lb).await["backups"], serde_json::json!(["spare"]));
    let s = spread(&lb, 20).await;
    assert_eq!(
        s.get("spare"),
        None,
        "a backup served while primaries could: {s:?}"
    );
    // a out of rotation, b full: the backup takes the client.
    lb.post("/backends/a/drain").await;
    let (_on_b, name) = greeting(&lb).await;
    assert_eq!(name, "b");
    assert_eq!(greeting(&lb).await.1, "spare", "b is full, a drained");
    // A primary back: the backup gets no new client.
    lb.post("/backends/a/start").await;
    let s = spread(&lb, 10).await;
    assert_eq!(s.get("a"), Some(&10), "{s:?}");
    // A primary whose connect fails sends the client on to the backup too.
    a.kill().await;
    let s = spread(&lb, 5).await;
    assert_eq!(s.get("spare"), Some(&5), "{s:?}");
    lb.shutdown().await;
}

/// The share `name` took of `s`.
fn share(s: &HashMap<String, usize>, name: &str) -> f64 {
    let total: usize = s.values().sum();
    *s.get(name).unwrap_or(&0) as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_starting_backend_takes_a_rising_share() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::from_toml(&text(
        "",
        &[("a", a.addr), ("b", b.addr)],
        &[("a", "slow_start = \"6s\"")],
    ))
    .await;
    assert_eq!(lb.backend("a").await["slow_start"], "6s");
    // a's weight is 1, so its effective weight is its ramp's fraction.
    let fraction = || async { lb.backend("a").await["effective_weight"].as_f64() };
    assert_eq!(
        fraction().await,
        None,
        "a backend there at start-up is warm"
    );
    // Negative control: warm, it takes half, and the measure sees it.
    let warm = spread(&lb, 100).await;
    assert!((0.4..=0.6).contains(&share(&warm, "a")), "{warm:?}");

    // Batches of clients, each filed by the fraction sluice reports before
    // and after it: early when both are under 0.2, late when both are 0.8
    // or more; a batch across a bound counts in neither. The phases come
    // from what sluice reports, not from the wall clock, and a phase that
    // ends before it has enough clients is met again in a new ramp (a stop
    // and a start), so a slow machine takes longer rather than failing.
    const EARLY: f64 = 0.2;
    const LATE: f64 = 0.8;
    const WANT: usize = 200;
    const EARLY_PHASE: usize = 0;
    const LATE_PHASE: usize = 1;
    let restart = || async {
        assert_eq!(lb.post("/backends/a/stop").await.0, 200);
        assert_eq!(lb.post("/backends/a/start").await.0, 200);
    };
    let phase_of = |f: Option<f64>| match f {
        Some(f) if f < EARLY => Some(EARLY_PHASE),
        Some(f) if f >= LATE => Some(LATE_PHASE),
        _ => None,
    };
    // (clients on a, clients) in each phase.
    let mut tally = [(0usize, 0usize); 2];
    let wanted = |tally: &[(usize, usize); 2], p: usize| tally[p].1 < WANT;
    let mut ramps = 1;
    restart().await;
    while wanted(&tally, EARLY_PHASE) || wanted(&tally, LATE_PHASE) {
        let before = fraction().await;
        match phase_of(before) {
            Some(p) if wanted(&tally, p) => {
                let batch = spread(&lb, 10).await;
                if phase_of(fraction().await) == Some(p) {
                    tally[p].0 += batch.get("a").copied().unwrap_or(0);
                    tally[p].1 += batch.values().sum::<usize>();
                }
            }
            // Early clients done and the ramp not yet late: wait for it.
            _ if before.is_some_and(|f| f < LATE) && !wanted(&tally, EARLY_PHASE) => {
                wait_for("the late phase", || async {
                    fraction().await.is_none_or(|f| f >= LATE)
                })
                .await;
            }
            // Past the phase still short of clients, or over: a new ramp.
            _ => {
                ramps += 1;
                // Ten clients that never fit in a fifth of the ramp
                // (1.2 s): fail rather than loop.
                assert!(ramps <= 10, "no batch fits in a phase: {tally:?}");
                restart().await;
            }
        }
    }
    let share_in = |p: usize| tally[p].0 as f64 / tally[p].1 as f64;
    eprintln!("clients on a (early, late): {tally:?}, over {ramps} ramp(s)");
    // At fraction f of its weight it takes f / (1 + f): at most 1/6 early,
    // at least 4/9 late; warm, or with no slow start, 1/2. The bound
    // between is four standard deviations or more from either.
    assert!(share_in(EARLY_PHASE) < 0.3, "early: {tally:?}");
    assert!(share_in(LATE_PHASE) > 0.3, "late: {tally:?}");
    // Once the ramp is over it takes its whole share again.
    wait_for("the ramp's end", || async { fraction().await.is_none() }).await;
    let after = spread(&lb, 100).await;
    assert!((0.4..=0.6).contains(&share(&after, "a")), "{after:?}");
    lb.shutdown().await;
}
