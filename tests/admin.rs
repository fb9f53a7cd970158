//! The admin API's answers to bad input, its token, and its limits.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn one() -> (Echo, Sluice) {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    (a, lb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_backends_and_health() {
    let (_a, lb) = one().await;
    let (status, v) = lb.get("/healthz").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    let (status, v) = lb.get("/backends").await;
    assert_eq!(status, 200);
    let b = &v.as_array().unwrap()[0];
    for field in [
        "name",
        "address",
        "state",
        "weight",
        "active_connections",
        "total_connections",
        "bytes_in",
        "bytes_out",
        "healthy",
    ] {
        assert!(b.get(field).is_some(), "missing {field}: {b}");
    }
    assert_eq!(b["state"], "active");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_bytes_each_way() {
    let (_a, lb) = one().await;
    let (mut s, _) = lb.connect().await;
    echo(&mut s, &[1u8; 1000]).await;
    // Bytes are counted just after they are written: the echo can arrive
    // a moment before its count does.
    wait_for("bytes counted", || async {
        let b = lb.backend("a").await;
        b["bytes_in"] == 1000 && b["bytes_out"] == 1002
    })
    .await;
    let b = lb.backend("a").await;
    assert_eq!(b["bytes_in"], 1000);
    assert_eq!(b["bytes_out"], 1002, "greeting plus echo");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_that_names_the_problem() {
    let (_a, lb) = one().await;
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/backends/nope", 404, "nope"),
        ("POST", "/backends/nope/drain", 404, "nope"),
        ("GET", "/nothing", 404, "/nothing"),
        ("GET", "/backends/a/bogus", 404, "/backends/a/bogus"),
        ("DELETE", "/backends", 405, "DELETE"),
        ("GET", "/backends/a/drain", 405, "POST"),
        ("POST", "/backends/a", 405, "GET"),
        ("POST", "/backends/a/drain?wait=soon", 400, "wait"),
        (
            "POST",
            "/backends/a/drain?force_after=-1s",
            400,
            "force_after",
        ),
        ("POST", "/backends/a/drain?close_idle=1d", 400, "close_idle"),
        ("POST", "/backends/a/drain?hurry=1", 400, "hurry"),
        (
            "POST",
            "/backends/a/drain?wait=18446744073709551615s",
            400,
            "too long",
        ),
        ("POST", "/backends/a/drain?wait=1s&wait=2s", 400, "twice"),
        ("POST", "/backends/a/stop?now=1", 400, "now"),
    ];
    for (method, path, want, mention) in cases {
        let (status, v) = http(lb.admin, method, path, None).await;
        assert_eq!(status, *want, "{method} {path}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no error field in {v}"));
        assert!(
            msg.contains(mention),
            "{method} {path}: `{msg}` should mention `{mention}`"
        );
    }
    let (_, head, _) = http_raw(lb.admin, "DELETE", "/backends/a", "").await;
    assert!(head.to_lowercase().contains("allow: get"), "{head}");
    assert_eq!(
        lb.state("a").await,
        "active",
        "no bad request changed anything"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_refused() {
    let (_a, lb) = one().await;
    let (status, _, body) = http_raw(
        lb.admin,
        "POST",
        "/backends/a/stop",
        "Content-Length: 100000\r\n",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(lb.state("a").await, "active");

    // A chunked body that grows past the limit is refused too.
    let mut s = TcpStream::connect(lb.admin).await.unwrap();
    let head = format!(
        "POST /backends/a/stop HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        lb.admin
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192));
    let _ = s.write_all(chunk.as_bytes()).await;
    let mut reply = String::new();
    let _ = within("413 reply", s.read_to_string(&mut reply)).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert_eq!(lb.state("a").await, "active");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_admin_clients_are_timed_out() {
    let a = Echo::start("a").await;
    let text = config("", "request_timeout = \"300ms\"", &[("a", a.addr)]);
    let lb = Sluice::from_toml(&text).await;
    let mut s = TcpStream::connect(lb.admin).await.unwrap();
    s.write_all(b"GET /backends HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "the server closed a client that never finished its request"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_when_set() {
    let a = Echo::start("a").await;
    let text = config("", "token = \"s3cret\"", &[("a", a.addr)]);
    let lb = Sluice::from_toml(&text).await;
    let (status, v) = http(lb.admin, "POST", "/backends/a/stop", None).await;
    assert_eq!(status, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("token"));
    let (status, _) = http(
        lb.admin,
        "POST",
        "/backends/a/stop",
        Some("Authorization: Bearer wrong\r\n"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http(
        lb.admin,
        "POST",
        "/backends/a/stop",
        Some("Authorization: Bearer s3cret2\r\n"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, v) = http(
        lb.admin,
        "GET",
        "/backends/a",
        Some("Authorization: Bearer s3cret\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["state"], "active", "the refused calls changed nothing");
    let (status, v) = http(
        lb.admin,
        "POST",
        "/backends/a/drain",
        Some("Authorization: Bearer s3cret\r\n"),
    )
    .await;
    assert_eq!((status, v["state"].as_str()), (200, Some("drained")));
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_shuts_its_side_after_the_request_still_gets_the_reply() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let mut s = TcpStream::connect(lb.admin).await.unwrap();
    let req = format!(
        "POST /backends/a/drain HTTP/1.1\r\nHost: {}\r\n\r\n",
        lb.admin
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    within("reply", s.read_to_string(&mut reply)).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(lb.state("a").await, "drained");
    lb.shutdown().await;
}

/// One page of `GET /backends/{name}/connections`: its rows as (id,
/// client), and the target of its `Link: <...>; rel="next"`.
async fn conns_page(lb: &Sluice, target: &str) -> (Vec<(u64, String)>, Option<String>) {
    let (status, head, body) = http_raw(lb.admin, "GET", target, "").await;
    assert_eq!(status, 200, "{target}: {head}{body}");
    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().unwrap(),
                c["client"].as_str().unwrap().into(),
            )
        })
        .collect();
    let next = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("link:"))
        .map(|l| {
            let (target, rel) = l["link:".len()..].trim().split_once('>').unwrap();
            assert_eq!(rel, "; rel=\"next\"", "{l}");
            target.trim_start_matches('<').to_string()
        });
    (rows, next)
}

/// The rows of a walk, checked as a client must be able to rely on:
/// each page no longer than `limit` and full unless it is the last, ids
/// ascending across pages, none twice. Returns the clients seen.
fn check_walk(
    pages: &[(Vec<(u64, String)>, bool)],
    limit: usize,
) -> Result<std::collections::BTreeSet<String>, String> {
    let mut last = None;
    let mut seen = std::collections::BTreeSet::new();
    for (i, (rows, more)) in pages.iter().enumerate() {
        if rows.len() > limit || (*more && rows.len() < limit) {
            return Err(format!(
                "page {i}: {} rows (limit {limit}, more: {more})",
                rows.len()
            ));
        }
        if *more != (i + 1 < pages.len()) {
            return Err(format!("page {i}: a next page is {more}, but it is not"));
        }
        for (id, client) in rows {
            if last.is_some_and(|l| *id <= l) {
                return Err(format!("page {i}: id {id} after {last:?}"));
            }
            last = Some(*id);
            if !seen.insert(client.clone()) {
                return Err(format!("page {i}: {client} listed twice"));
            }
        }
    }
    Ok(seen)
}

#[test]
fn the_walk_check_catches_broken_pages() {
    let row = |id: u64| (id, format!("127.0.0.1:{id}"));
    let good = [(vec![row(1), row(2)], true), (vec![row(5)], false)];
    assert_eq!(check_walk(&good, 2).unwrap().len(), 3);
    // The same row on two pages.
    let repeated = [(vec![row(1), row(2)], true), (vec![row(2)], false)];
    assert!(check_walk(&repeated, 2).is_err());
    // Out of order.
    let unordered = [(vec![row(2), row(1)], false)];
    assert!(check_walk(&unordered, 2).is_err());
    // A next page announced on the last one, or a short page that is not.
    assert!(check_walk(&[(vec![row(1), row(2)], true)], 2).is_err());
    assert!(check_walk(&[(vec![row(1)], true), (vec![row(2)], false)], 2).is_err());
    // Too many rows.
    assert!(check_walk(&[(vec![row(1), row(2), row(3)], false)], 2).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_list_comes_in_pages_that_cover_every_connection_once() {
    const N: usize = 2500;
    let (_a, lb) = one().await;
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        let (s, _) = lb.connect().await;
        clients.push(s);
    }
    let mut want: std::collections::BTreeSet<String> = clients
        .iter()
        .map(|s| s.local_addr().unwrap().to_string())
        .collect();
    assert_eq!(lb.live("a").await, N as u64);

    let mut pages = Vec::new();
    let (rows, next) = conns_page(&lb, "/backends/a/connections?limit=1000").await;
    let mut next = next.expect("a second page");
    pages.push((rows, true));
    // Between pages: one client already listed leaves, and so does the
    // last one opened, which has the highest id and is not listed yet.
    let listed = clients.remove(0);
    let unlisted = clients.pop().unwrap();
    want.remove(&unlisted.local_addr().unwrap().to_string());
    drop((listed, unlisted));
    wait_for("two connections closed", || async {
        lb.live("a").await == N as u64 - 2
    })
    .await;
    loop {
        assert!(next.contains("limit=1000"), "{next}");
        let (rows, following) = conns_page(&lb, &next).await;
        pages.push((rows, following.is_some()));
        match following {
            Some(f) => next = f,
            None => break,
        }
    }
    let seen = check_walk(&pages, 1000).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        seen, want,
        "every connection, listed or closed after its page, once"
    );
    let sizes: Vec<usize> = pages.iter().map(|p| p.0.len()).collect();
    assert_eq!(sizes, [1000, 1000, 499]);

    // The default page, and a page past the end.
    let (rows, next) = conns_page(&lb, "/backends/a/connections").await;
    assert_eq!((rows.len(), next.is_some()), (1000, true));
    let last = pages[2].0.last().unwrap().0;
    let (rows, next) = conns_page(&lb, &format!("/backends/a/connections?after={last}")).await;
    assert_eq!((rows.len(), next), (0, None));

    // Parameters out of range are refused, each by name.
    for (query, name) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=many", "limit"),
        ("after=-1", "after"),
        ("after=x", "after"),
        ("pid=x", "pid"),
    ] {
        let (status, v) = lb.get(&format!("/backends/a/connections?{query}")).await;
        let error = v["error"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{query}: {v}");
        assert!(error.starts_with(&format!("{name}: ")), "{query}: {error}");
    }
    drop(clients);
    lb.shutdown().await;
}
