//! `GET /events`: what is told and in which order, resuming with
//! `Last-Event-ID`, a slow client cut off while everyone else goes on,
//! reloads, refused clients, and the end of the stream at shutdown.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A client of `GET /events` that reads the chunked body by hand, so a
/// test sees exactly how the stream ends.
struct Events {
    r: BufReader<TcpStream>,
    pending: String,
}

/// Opens the stream at `/events{query}` with `headers` (each ending in
/// CRLF) and checks the reply's head.
async fn open(admin: SocketAddr, query: &str, headers: &str) -> Events {
    let s = TcpStream::connect(admin).await.unwrap();
    let mut r = BufReader::new(s);
    let req = format!("GET /events{query} HTTP/1.1\r\nHost: {admin}\r\n{headers}\r\n");
    r.get_mut().write_all(req.as_bytes()).await.unwrap();
    let head = within("the stream's head", read_head(&mut r)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lower = head.to_lowercase();
    assert!(lower.contains("content-type: text/event-stream"), "{head}");
    assert!(lower.contains("transfer-encoding: chunked"), "{head}");
    Events {
        r,
        pending: String::new(),
    }
}

async fn read_head(r: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
            return head;
        }
        head.push_str(&line);
    }
}

impl Events {
    /// The next event, or `None` once the stream has ended. Checks that
    /// its SSE `id:` and `event:` fields agree with its JSON.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..i + 2).collect();
                let (mut id, mut event, mut data) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse::<u64>().unwrap());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.to_string());
                    }
                }
                // A comment (keep-alive) or the `retry:` line.
                let Some(data) = data else { continue };
                let v: Value = serde_json::from_str(&data).unwrap();
                assert_eq!(v["id"].as_u64(), id, "{block}");
                assert_eq!(v["type"].as_str(), event.as_deref(), "{block}");
                assert!(v["time_ms"].as_u64().is_some(), "{block}");
                return Some(v);
            }
            let mut size = String::new();
            if self.r.read_line(&mut size).await.unwrap_or(0) == 0 {
                return None;
            }
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                return None;
            }
            let mut chunk = vec![0; n + 2];
            if self.r.read_exact(&mut chunk).await.is_err() {
                return None;
            }
            self.pending
                .push_str(std::str::from_utf8(&chunk[..n]).unwrap());
        }
    }

    async fn expect(&mut self) -> Value {
        within("an event", self.next())
            .await
            .expect("the stream ended")
    }

    /// The next `n` events.
    async fn take(&mut self, n: usize) -> Vec<Value> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.expect().await);
        }
        v
    }
}

fn id(e: &Value) -> u64 {
    e["id"].as_u64().unwrap()
}

fn kind(e: &Value) -> &str {
    e["type"].as_str().unwrap()
}

/// Admin calls on one keep-alive connection, to make many events fast.
struct Api {
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: String,
}

impl Api {
    async fn at(admin: SocketAddr) -> Api {
        let s = TcpStream::connect(admin).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        Api {
            send,
            host: admin.to_string(),
        }
    }

    async fn post(&mut self, path: &str) {
        let req = hyper::Request::post(path)
            .header("host", &self.host)
            .body(Empty::new())
            .unwrap();
        within("admin connection", self.send.ready()).await.unwrap();
        let r = within("admin call", self.send.send_request(req))
            .await
            .unwrap();
        let status = r.status();
        r.into_body().collect().await.unwrap();
        assert!(status.is_success(), "{path}: {status}");
    }

    /// Drains then starts an idle backend: four events (draining,
    /// drained, `drained`, active).
    async fn cycle(&mut self, name: &str) {
        self.post(&format!("/backends/{name}/drain")).await;
        self.post(&format!("/backends/{name}/start")).await;
    }
}

#[tokio::test]
async fn a_drain_with_a_connection_open_is_told_in_order() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let mut ev = open(lb.admin, "", "").await;
    let (client, name) = lb.connect().await;
    assert_eq!(name, "a");
    lb.post("/backends/a/drain").await;
    let draining = ev.expect().await;
    assert_eq!(kind(&draining), "state", "{draining}");
    assert_eq!(draining["backend"], "a");
    assert_eq!(draining["from"], "active");
    assert_eq!(draining["to"], "draining");
    assert_eq!(draining["live"], 1);
    let progress = ev.expect().await;
    assert_eq!(kind(&progress), "progress", "{progress}");
    assert_eq!(progress["backend"], "a");
    assert_eq!(progress["live"], 1);
    assert_eq!(progress["idle"], 0);
    drop(client);
    let mut told = vec![draining, progress];
    while told.last().map(kind) != Some("drained") {
        told.push(ev.expect().await);
    }
    let n = told.len();
    let drained = &told[n - 2];
    assert_eq!(kind(drained), "state", "{drained}");
    assert_eq!(
        (&drained["from"], &drained["to"], &drained["live"]),
        (&"draining".into(), &"drained".into(), &0.into())
    );
    assert_eq!(told[n - 1]["backend"], "a");
    assert!(told[n - 1]["after_ms"].as_u64().is_some());
    // Between them only progress (a last count of 0 may slip in).
    for e in &told[1..n - 2] {
        assert_eq!(kind(e), "progress", "{e}");
    }
    for pair in told.windows(2) {
        assert!(id(&pair[0]) < id(&pair[1]), "{pair:?}");
    }
    lb.shutdown().await;
}

#[tokio::test]
async fn a_client_that_comes_back_gets_exactly_what_it_missed() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let mut ev = open(lb.admin, "", "").await;
    lb.post("/backends/a/drain").await;
    let seen = ev.take(3).await;
    let kinds: Vec<_> = seen.iter().map(kind).collect();
    assert_eq!(kinds, ["state", "state", "drained"]);
    let last = id(&seen[2]);
    drop(ev);
    // Missed: a's start, b's drain.
    lb.post("/backends/a/start").await;
    lb.post("/backends/b/drain").await;
    let mut ev = open(lb.admin, "", &format!("Last-Event-ID: {last}\r\n")).await;
    let missed = ev.take(4).await;
    let ids: Vec<u64> = missed.iter().map(id).collect();
    assert_eq!(ids, (last + 1..=last + 4).collect::<Vec<_>>());
    assert_eq!(
        (&missed[0]["backend"], &missed[0]["to"]),
        (&"a".into(), &"active".into())
    );
    assert_eq!(missed[3]["type"], "drained");
    assert_eq!(missed[3]["backend"], "b");
    // Then what happens now, and nothing twice.
    lb.post("/backends/b/start").await;
    let now = ev.expect().await;
    assert_eq!((id(&now), &now["to"]), (last + 5, &"active".into()));
    // The query does the same, for clients that cannot set a header; the
    // header wins over it, as a browser reconnects to its first URL.
    let mut q = open(lb.admin, &format!("?last_event_id={last}"), "").await;
    let ids: Vec<u64> = q.take(5).await.iter().map(id).collect();
    assert_eq!(ids, (last + 1..=last + 5).collect::<Vec<_>>());
    let both = format!("Last-Event-ID: {}\r\n", last + 4);
    let mut h = open(lb.admin, &format!("?last_event_id={last}"), &both).await;
    assert_eq!(id(&h.expect().await), last + 5);
    let (status, body) = http(lb.admin, "GET", "/events", Some("Last-Event-ID: soon\r\n")).await;
    assert_eq!(status, 400, "{body}");

    // Too old: the history keeps the last 1024 events.
    let mut api = Api::at(lb.admin).await;
    for _ in 0..260 {
        api.cycle("a").await;
    }
    let mut old = open(lb.admin, "", &format!("Last-Event-ID: {last}\r\n")).await;
    let gap = old.expect().await;
    assert_eq!(kind(&gap), "gap", "{gap}");
    assert_eq!(gap["requested"], last);
    let first = gap["first"].as_u64().unwrap();
    assert!(first > last + 1, "{gap}");
    assert_eq!(
        id(&gap),
        first - 1,
        "resuming after the gap starts at `first`"
    );
    assert_eq!(id(&old.expect().await), first);
    // An id of another process (a restart, an upgrade) is a gap too.
    let mut other = open(lb.admin, "", "Last-Event-ID: 7\r\n").await;
    let gap = other.expect().await;
    assert_eq!((kind(&gap), &gap["requested"]), ("gap", &7.into()));
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_nothing_waits_for_it() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let text = support::config(
        "shutdown_grace = \"100ms\"",
        "",
        &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
    );
    let (shared, addr, admin, stop, task) = bound(&text).await;

    // It asks for the stream with a small receive buffer, and never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock.connect(admin).await.unwrap();
    let req = format!("GET /events HTTP/1.1\r\nHost: {admin}\r\n\r\n");
    slow.write_all(req.as_bytes()).await.unwrap();
    let mut fast = open(admin, "", "").await;
    wait_for("both listen", || async { shared.events.listeners() == 2 }).await;

    // A client of the data plane keeps echoing through sluice meanwhile.
    let (mut conn, name) = {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let name = within("greeting", read_line(&mut s)).await;
        (s, name)
    };
    assert_eq!(name, "a");
    let done = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(AtomicUsize::new(0));
    let echoing = {
        let (done, trips) = (done.clone(), trips.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                echo(&mut conn, b"ping\n").await;
                trips.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // The fast client reads everything, until the join that ends the test.
    let reading = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            let e = fast.expect().await;
            let end = kind(&e) == "join";
            got.push(e);
            if end {
                return got;
            }
        }
    });

    let mut api = Api::at(admin).await;
    let mut cycles = 0;
    while shared.events.listeners() == 2 {
        assert!(cycles < 5000, "the slow client was never cut off");
        api.cycle("b").await;
        cycles += 1;
    }
    let trips_while_cut = trips.load(Ordering::SeqCst);
    // Every event still reaches the fast client, in order, none missed.
    api.post("/leave").await;
    api.post("/join").await;
    let got = within("the fast client's events", reading).await.unwrap();
    assert_eq!(got.len(), cycles * 4 + 2);
    for pair in got.windows(2) {
        assert_eq!(id(&pair[0]) + 1, id(&pair[1]));
    }
    // The data plane never waited: it kept echoing all along.
    let before = trips.load(Ordering::SeqCst);
    wait_for("more round trips", || async {
        trips.load(Ordering::SeqCst) > before
    })
    .await;
    assert!(trips_while_cut > 0, "no round trip while events flooded");
    done.store(true, Ordering::SeqCst);
    within("echo loop", echoing).await.unwrap();

    // The slow client finds its stream cut: what was sent, then the end,
    // without the chunked body's last chunk.
    let mut all = Vec::new();
    let _ = within("the cut stream's end", slow.read_to_end(&mut all)).await;
    assert!(!all.ends_with(b"\r\n0\r\n\r\n"), "ended cleanly, not cut");
    assert!(all.starts_with(b"HTTP/1.1 200"));
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

#[tokio::test]
async fn reloads_are_told_applied_or_refused_with_the_reason() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let only_a = support::config("", "", &[("a", a.addr)]);
    let (shared, _, admin, stop, task) = bound(&only_a).await;
    let mut ev = open(admin, "", "").await;
    let both = support::config("", "", &[("a", a.addr), ("b", b.addr)]);
    shared
        .reload(sluice::Config::parse("t.toml", &both).unwrap())
        .unwrap();
    let applied = ev.expect().await;
    assert_eq!(kind(&applied), "reload", "{applied}");
    assert_eq!(applied["result"], "applied");
    assert_eq!(applied["added"], serde_json::json!(["b"]));
    assert!(applied.get("error").is_none(), "{applied}");
    let moved = both.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1);
    assert_ne!(moved, both);
    let e = shared
        .reload(sluice::Config::parse("t.toml", &moved).unwrap())
        .unwrap_err();
    let refused = ev.expect().await;
    assert_eq!(refused["result"], "refused", "{refused}");
    assert_eq!(refused["error"], e.to_string());
    assert!(e.to_string().contains("admin.listen"), "{e}");
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

#[tokio::test]
async fn refused_clients_are_told_at_most_once_a_second_with_a_count() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("max_connections = 1", &[("a", a.addr)]).await;
    let mut ev = open(lb.admin, "", "").await;
    let (_held, _) = lb.connect().await;
    const REFUSED: u64 = 40;
    for _ in 0..REFUSED {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        assert!(closed_by_peer(&mut s).await);
    }
    let mut told = Vec::new();
    let mut count = 0;
    while count < REFUSED {
        let e = ev.expect().await;
        assert_eq!(kind(&e), "refused", "{e}");
        assert_eq!(
            (&e["service"], &e["reason"]),
            (&"web".into(), &"limit".into())
        );
        count += e["count"].as_u64().unwrap();
        told.push(e);
    }
    assert_eq!(count, REFUSED);
    assert!(
        told.len() < 10,
        "{} events for {REFUSED} clients",
        told.len()
    );
    for pair in told.windows(2) {
        let apart = pair[1]["time_ms"].as_u64().unwrap() - pair[0]["time_ms"].as_u64().unwrap();
        assert!(apart >= 500, "two refused events {apart} ms apart");
    }
    let (_, stats) = lb.get("/stats").await;
    assert_eq!(stats["rejected_limit"], REFUSED);
    lb.shutdown().await;
}

#[tokio::test]
async fn the_stream_ends_when_sluice_shuts_down() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let mut ev = open(lb.admin, "", "").await;
    lb.shutdown().await;
    let bye = ev.expect().await;
    assert_eq!((kind(&bye), &bye["reason"]), ("shutdown", &"stop".into()));
    assert!(within("the end of the stream", ev.next()).await.is_none());
}

#[tokio::test]
async fn the_stream_takes_the_read_token_like_any_read() {
    let a = Echo::start("a").await;
    let text = support::config(
        "",
        "token = \"s3cret\"\nread_token = \"reader\"",
        &[("a", a.addr)],
    );
    let lb = Sluice::from_toml(&text).await;
    let (status, _) = http(lb.admin, "GET", "/events", None).await;
    assert_eq!(status, 401);
    let mut ev = open(lb.admin, "", "Authorization: Bearer reader\r\n").await;
    let (status, _) = http(
        lb.admin,
        "POST",
        "/backends/a/drain",
        Some("Authorization: Bearer s3cret\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ev.expect().await["to"], "draining");
    lb.shutdown().await;
}

/// Reads `ctl`'s stdout until a line contains `needle`; returns the lines.
async fn lines_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    needle: &str,
) -> Vec<String> {
    let mut got = Vec::new();
    while !got.last().is_some_and(|l: &String| l.contains(needle)) {
        match within("ctl's output", lines.next_line()).await.unwrap() {
            Some(l) => got.push(l),
            None => panic!("ctl ended its output without `{needle}`: {got:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_events_prints_lines_or_json_and_comes_back_after_a_restart() {
    let a = Echo::start("a").await;
    let text = support::config("shutdown_grace = \"100ms\"", "", &[("a", a.addr)]);
    let (shared, _, admin, stop, task) = bound(&text).await;
    let spawn = |json: bool| {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(["ctl", "--admin", &format!("http://{admin}"), "events"]);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .env_remove("SLUICE_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    let (human, mut human_out) = spawn(false);
    let (json, mut json_out) = spawn(true);
    wait_for("both ctl listen", || async {
        shared.events.listeners() == 2
    })
    .await;
    http(admin, "POST", "/backends/a/drain", None).await;

    let got = lines_until(&mut human_out, "drained after").await;
    let stamp = |l: &str| {
        let b = l.as_bytes();
        b.len() > 12 && b[0] == b'[' && &l[9..11] == "Z]" && b[3] == b':' && b[6] == b':'
    };
    assert!(got.iter().all(|l| stamp(l)), "{got:?}");
    let said: Vec<&str> = got.iter().map(|l| &l[12..]).collect();
    assert_eq!(
        said,
        [
            "a: active -> draining (0 live)",
            "a: draining -> drained (0 live)",
            "a: drained after 0.0s"
        ]
    );
    let got = lines_until(&mut json_out, "\"type\":\"drained\"").await;
    assert!(got[0].starts_with("{\"id\":"), "the JSON as sent: {got:?}");
    let events: Vec<Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<_> = events.iter().map(kind).collect();
    assert_eq!(kinds, ["state", "state", "drained"]);
    let last = id(&events[2]);

    // sluice restarts on the same admin address: ctl comes back on its
    // own, and is told that what it had is not this process's.
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
    let got = lines_until(&mut json_out, "\"shutdown\"").await;
    let bye: Value = serde_json::from_str(got.last().unwrap()).unwrap();
    assert_eq!(id(&bye), last + 1);
    let again = text.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{admin}\""),
        1,
    );
    assert_ne!(again, text);
    let (shared, _, _, stop, task) = bound(&again).await;
    let got = lines_until(&mut json_out, "\"gap\"").await;
    let gap: Value = serde_json::from_str(got.last().unwrap()).unwrap();
    assert_eq!(gap["requested"], last + 1);
    lines_until(&mut human_out, "were missed").await;
    wait_for("both ctl back", || async { shared.events.listeners() == 2 }).await;
    // Without a state file the new process starts `a` active.
    http(admin, "POST", "/backends/a/drain", None).await;
    let got = lines_until(&mut human_out, "a: active -> draining").await;
    assert_eq!(got.len(), 1, "{got:?}");

    // Ctrl-C ends it, and that is a success.
    for child in [human, json] {
        let pid = child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let out = within("ctl exits", child.wait_with_output()).await.unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

#[tokio::test]
async fn ctl_events_fails_when_nothing_answers() {
    let (_guard, dead) = dead_addr();
    let out = within(
        "ctl",
        tokio::process::Command::new(BIN)
            .args(["ctl", "--admin", &format!("http://{dead}"), "events"])
            .env_remove("SLUICE_TOKEN")
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_ends_the_old_process_stream_and_the_new_one_answers() {
    let a = Echo::start("a").await;
    let text = support::config("shutdown_grace = \"5m\"", "", &[("a", a.addr)]);
    let (_dir, path) = write_config(&text);
    let mut old = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let web = addr_after(&old.wait_line("service=web "), "listen=");
    let admin = addr_after(&old.wait_line("admin API listening"), "listen=");
    // A client that keeps the old process alive after the hand-over.
    let mut held = TcpStream::connect(web).await.unwrap();
    assert_eq!(within("greeting", read_line(&mut held)).await, "a");
    let mut ev = open(admin, "", "").await;
    let (status, report) = http(admin, "POST", "/upgrade", None).await;
    assert_eq!(status, 200, "{report}");
    let new_pid = report["new_pid"].as_u64().unwrap();
    let bye = ev.expect().await;
    assert_eq!(
        (kind(&bye), &bye["reason"]),
        ("shutdown", &"upgrade".into())
    );
    assert!(within("the end of the stream", ev.next()).await.is_none());
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the stream ended at the hand-over, not at the old process's exit"
    );
    // The same address now reaches the new process, which says that the
    // old one's ids are not its own.
    let mut again = open(admin, "", &format!("Last-Event-ID: {}\r\n", id(&bye))).await;
    let gap = again.expect().await;
    assert_eq!((kind(&gap), &gap["requested"]), ("gap", &bye["id"]));
    let (_, health) = http(admin, "GET", "/healthz", None).await;
    assert_eq!(health["pid"].as_u64(), Some(new_pid));
    drop(held);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &new_pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}
