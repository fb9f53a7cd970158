//! `sluice ctl` against a running sluice: output, exit codes, and rollout
//! stopping safely at the first failure.

mod support;

use std::process::{Output, Stdio};

use support::*;
use tokio::io::AsyncBufReadExt;

/// `sluice ctl --admin ADMIN ARGS`, without a token from the environment.
fn command(lb: &Sluice, args: &[&str]) -> tokio::process::Command {
    let admin = format!("http://{}", lb.admin);
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("ctl")
        .arg("--admin")
        .arg(&admin)
        .args(args)
        .env_remove("SLUICE_TOKEN");
    cmd
}

async fn ctl(lb: &Sluice, args: &[&str]) -> Output {
    within("sluice ctl", command(lb, args).output())
        .await
        .unwrap()
}

/// Starts ctl with its stdout a pipe whose reading end is closed at once,
/// before ctl can write anything, as `sluice ctl status | true` may do.
fn spawn_with_stdout_closed(lb: &Sluice, args: &[&str]) -> tokio::process::Child {
    let mut child = command(lb, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_plain_table_when_piped_and_json_on_request() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let (_on_a, _) = lb.connect().await;
    lb.post("/backends/b/drain").await;
    let out = ctl(&lb, &["status"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(!t.contains('\x1b'), "no colour codes when piped: {t:?}");
    let row_a = t.lines().find(|l| l.starts_with("a ")).unwrap();
    assert!(
        row_a.contains("active") && row_a.contains("up") && row_a.contains(" 1 "),
        "{row_a}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("b ") && l.contains("drained")),
        "{t}"
    );

    let out = ctl(&lb, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "a");
    assert_eq!(v[1]["state"], "drained");
    lb.shutdown().await;
}

/// An admin API that answers each path in `replies` with its status and
/// body, and 404 to any other, one request per connection.
async fn canned_admin(replies: Vec<(&'static str, u16, String)>) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let mut s = tokio::io::BufReader::new(s);
            let mut first = String::new();
            if s.read_line(&mut first).await.is_err() {
                continue;
            }
            // The rest of the head.
            let mut line = String::new();
            while s.read_line(&mut line).await.is_ok_and(|n| n > 2) {
                line.clear();
            }
            // The whole target if it is listed, else its path.
            let target = first.split(' ').nth(1).unwrap_or("");
            let path = target.split('?').next().unwrap_or("");
            let listed = |t: &str| replies.iter().find(|(p, _, _)| *p == t);
            let (status, body) = listed(target).or_else(|| listed(path)).map_or(
                (404, r#"{"error":"not found"}"#.to_string()),
                |(_, st, b)| (*st, b.clone()),
            );
            let reply = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.get_mut().write_all(reply.as_bytes()).await;
            let _ = s.get_mut().shutdown().await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_the_service_list_of_an_older_sluice_prints_the_rest() {
    // A sluice from before GET /services, as an upgrade may still run,
    // answers it 404: the backends and the process still show.
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (_, backends) = lb.get("/backends").await;
    let (_, healthz) = lb.get("/healthz").await;
    let old = canned_admin(vec![
        ("/backends", 200, backends.to_string()),
        ("/healthz", 200, healthz.to_string()),
    ])
    .await;
    let out = within(
        "sluice ctl",
        tokio::process::Command::new(BIN)
            .args(["ctl", "--admin", &format!("http://{old}"), "status"])
            .env_remove("SLUICE_TOKEN")
            .output(),
    )
    .await
    .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("a ")), "{t}");
    assert!(
        stdout.contains("sluice ") && !stdout.contains("service web"),
        "{t}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/services"),
        "the missing line is explained: {t}"
    );
    // Negative control: the same status from the sluice itself lists the
    // service.
    let out = ctl(&lb, &["status"]).await;
    assert!(text(&out).contains("service web on"), "{}", text(&out));
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_follows_the_count_down_and_exits_0() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let mut on_a = Vec::new();
    for _ in 0..3 {
        on_a.push(lb.connect().await.0);
        lb.connect().await; // one for b
    }
    assert_eq!(lb.live("a").await, 3);
    let admin = format!("http://{}", lb.admin);
    let mut drain = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &admin, "drain", "a"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(drain.stdout.take().unwrap()).lines();
    let mut t = String::new();
    // Close the connections one by one only once ctl has said how many
    // there were, so its first line cannot race the closing.
    while !t.contains("draining with") {
        let l = within("ctl's first line", lines.next_line()).await;
        t += &format!("{}\n", l.unwrap().expect("ctl printed its count"));
    }
    for s in on_a.drain(..) {
        drop(s);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    while let Some(l) = within("ctl's output", lines.next_line()).await.unwrap() {
        t += &format!("{l}\n");
    }
    let status = within("ctl drain", drain.wait()).await.unwrap();
    assert!(status.success(), "{t}");
    assert!(t.contains("draining with 3 live"), "{t}");
    assert!(t.contains("a: drained after"), "{t}");
    assert_eq!(lb.state("a").await, "drained");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_done_error_or_timed_out() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (_on_a, _) = lb.connect().await;

    let out = ctl(&lb, &["drain", "a", "--wait", "300ms"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("still draining"), "{}", text(&out));

    let out = ctl(&lb, &["drain", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no backend is named `nope`"),
        "{}",
        text(&out)
    );

    let out = ctl(&lb, &["drain", "a", "--wait", "soon"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a usage error is an error: {}",
        text(&out)
    );
    assert!(text(&out).contains("soon"), "{}", text(&out));

    let out = ctl(&lb, &["start", "a", "--wait-healthy", "1s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = ctl(&lb, &["stop", "a"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(lb.state("a").await, "stopped");
    wait_for("stop closed them", || async { lb.live("a").await == 0 }).await;
    let out = ctl(&lb, &["conns", "a"]).await;
    assert!(
        text(&out).contains("0 live connection(s) on a"),
        "{}",
        text(&out)
    );

    let (_held, dead) = dead_addr();
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &format!("http://{dead}"), "status"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("cannot reach the admin API"),
        "{}",
        text(&out)
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_sends_the_token_from_the_environment() {
    let a = Echo::start("a").await;
    let text_cfg = config("", "token = \"k3y\"", &[("a", a.addr)]);
    let lb = Sluice::from_toml(&text_cfg).await;
    let out = ctl(&lb, &["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("401"), "{}", text(&out));
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &format!("http://{}", lb.admin), "status"])
        .env("SLUICE_TOKEN", "k3y")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_stops_at_the_first_failure_and_leaves_that_backend_out() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr), ("c", c.addr)]).await;
    let out = ctl(
        &lb,
        &[
            "rollout",
            "--exec",
            "echo updating $SLUICE_BACKEND at $SLUICE_ADDRESS; test $SLUICE_BACKEND != b",
            "--settle",
            "200ms",
        ],
    )
    .await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("updating a at {}", a.addr)), "{t}");
    assert!(t.contains("b: FAILED"), "{t}");
    assert!(
        t.contains("it stays out of rotation (drained); `sluice ctl start b` puts it back"),
        "{t}"
    );
    assert!(t.contains("updated:     a"), "{t}");
    assert!(t.contains("not touched: c"), "{t}");
    assert_eq!(lb.state("a").await, "active");
    assert_eq!(
        lb.state("b").await,
        "drained",
        "the failing backend stays out of rotation"
    );
    assert_eq!(lb.state("c").await, "active");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_refuses_to_leave_too_few_backends() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    lb.post("/backends/b/stop").await;
    let out = ctl(&lb, &["rollout", "--exec", "true", "--backends", "a"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("refusing to take it out"), "{t}");
    assert!(
        t.contains("it is still in rotation (it was never taken out)") && !t.contains("stays out"),
        "the report says what is true: {t}"
    );
    assert_eq!(lb.state("a").await, "active", "nothing was drained");

    let out = ctl(&lb, &["rollout", "--exec", "true", "--backends", "a,zz"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no backend is named `zz`"),
        "{}",
        text(&out)
    );
    lb.shutdown().await;
}

/// `a` serves two services; `api` has no other backend. Counting every
/// backend would find `b` and let the rollout take `api`'s last one out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_counts_the_others_per_service() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let text_cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"a\", \"b\"]\n\
         [[service]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"a\"]\n\
         [[backend]]\nname = \"a\"\naddress = \"{}\"\nhealth_check = \"none\"\n\
         [[backend]]\nname = \"b\"\naddress = \"{}\"\nhealth_check = \"none\"\n",
        a.addr, b.addr
    );
    let lb = Sluice::from_toml(&text_cfg).await;
    let v = lb.backend("a").await;
    assert_eq!(v["services"], serde_json::json!(["web", "api"]));
    let out = ctl(&lb, &["rollout", "--exec", "true", "--backends", "a"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("service `api` would keep 0 active healthy backend(s)"),
        "{t}"
    );
    assert_eq!(lb.state("a").await, "active", "nothing was drained");

    // `b` serves only `web`, where `a` stays: it may go.
    let out = ctl(
        &lb,
        &[
            "rollout",
            "--exec",
            "true",
            "--backends",
            "b",
            "--settle",
            "200ms",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(lb.state("b").await, "active");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_leaves_a_stopped_backend_as_it_is() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr), ("c", c.addr)]).await;
    lb.post("/backends/b/stop").await;
    let out = ctl(
        &lb,
        &[
            "rollout",
            "--exec",
            "echo updating $SLUICE_BACKEND",
            "--settle",
            "200ms",
        ],
    )
    .await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("b: stopped, so skipped"), "{t}");
    assert!(!t.contains("updating b"), "{t}");
    assert_eq!(lb.state("b").await, "stopped");
    assert_eq!(lb.state("a").await, "active");
    assert_eq!(lb.state("c").await, "active");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_does_not_make_ctl_panic() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    for args in [&["status", "--json"][..], &["status"], &["conns", "a"]] {
        for _ in 0..5 {
            let child = spawn_with_stdout_closed(&lb, args);
            let out = within("ctl", child.wait_with_output()).await.unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "ctl {args:?}: {err}");
            assert!(!err.contains("panicked"), "ctl {args:?}: {err}");
        }
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_a_closed_stdout_goes_on_until_drained() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let (on_a, name) = lb.connect().await;
    assert_eq!(name, "a");
    let child = spawn_with_stdout_closed(&lb, &["drain", "a"]);
    wait_for("a draining", || async { lb.state("a").await == "draining" }).await;
    // ctl has said "draining with 1 live connection" into the closed pipe
    // by now or will soon; either way it must wait for the end.
    drop(on_a);
    let out = within("ctl drain", child.wait_with_output()).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(lb.state("a").await, "drained");
    lb.shutdown().await;
}

/// The `--exec` command writes to ctl's stdout too: it must not be killed
/// by SIGPIPE, and the round must reach its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_a_closed_stdout_goes_to_its_end() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let dir = tempfile::tempdir().unwrap();
    let exec = format!(
        "echo updating $SLUICE_BACKEND; echo on stderr >&2; touch {}/$SLUICE_BACKEND.done",
        dir.path().display()
    );
    let child = spawn_with_stdout_closed(&lb, &["rollout", "--exec", &exec, "--settle", "200ms"]);
    let out = within("ctl rollout", child.wait_with_output())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    for n in ["a", "b"] {
        assert!(dir.path().join(format!("{n}.done")).exists(), "{n}: {err}");
        assert_eq!(lb.state(n).await, "active");
    }
    lb.shutdown().await;
}

fn send_signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("ctl is running").to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Reads ctl's stdout until a line contains `needle`; returns what it read.
async fn read_until(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    needle: &str,
) -> String {
    let mut t = String::new();
    while !t.contains(needle) {
        match within("ctl's output", lines.next_line()).await.unwrap() {
            Some(l) => t += &format!("{l}\n"),
            None => panic!("ctl ended its output without `{needle}`:\n{t}"),
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_drain_says_what_it_leaves_and_how_to_undo_it() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr)]).await;
    let (_on_a, name) = lb.connect().await;
    assert_eq!(name, "a");
    let admin = format!("http://{}", lb.admin);
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let mut child = command(&lb, &["drain", "a"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // ctl waits: the connection on `a` stays open.
        read_until(&mut lines, "a: draining with 1 live connection").await;
        assert_eq!(lb.state("a").await, "draining");
        send_signal(&child, sig);
        let out = within("interrupted ctl", child.wait_with_output())
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{sig}: {err}");
        assert!(
            err.contains(&format!("interrupted by SIG{sig}")),
            "SIG{sig}: {err}"
        );
        assert!(
            err.contains("a is left draining (1 live connection(s))"),
            "SIG{sig}: {err}"
        );
        assert!(
            err.contains(&format!(
                "to put it back: sluice ctl start a --admin {admin}"
            )),
            "SIG{sig}: {err}"
        );
        assert_eq!(lb.state("a").await, "draining", "the drain stays");
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_leave_says_the_instance_stays_out_and_how_to_join() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (_session, _) = lb.connect().await;
    let admin = format!("http://{}", lb.admin);
    let mut child = command(&lb, &["leave"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    read_until(&mut lines, "leaving: /healthz answers 503").await;
    send_signal(&child, "INT");
    let out = within("interrupted ctl", child.wait_with_output())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("this instance is left leaving its pair")
            && err.contains(&format!("sluice ctl join --admin {admin}")),
        "{err}"
    );
    let (status, _) = lb.get("/healthz").await;
    assert_eq!(status, 503, "the leave stays");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rollout_says_what_was_done_and_what_it_leaves() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let lb = Sluice::start("", &[("a", a.addr), ("b", b.addr), ("c", c.addr)]).await;
    let (_on_a, name) = lb.connect().await;
    assert_eq!(name, "a");
    let args = [
        "rollout",
        "--exec",
        "true",
        "--backends",
        "b,a,c",
        "--settle",
        "200ms",
    ];
    let mut child = command(&lb, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // `b` is done; `a` waits for its connection to end.
    read_until(&mut lines, "a: draining with 1 live connection").await;
    send_signal(&child, "TERM");
    let out = within("interrupted ctl", child.wait_with_output())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("rollout stopped at a (1/5 drain)"), "{err}");
    assert!(err.contains("updated:     b"), "{err}");
    assert!(
        err.contains(
            "a is left draining (1 live connection(s)); to put it back: sluice ctl start a"
        ),
        "{err}"
    );
    assert!(err.contains("not touched: c"), "{err}");
    assert_eq!(lb.state("a").await, "draining");
    assert_eq!(lb.state("b").await, "active");
    assert_eq!(lb.state("c").await, "active");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reads_the_token_from_a_file() {
    let a = Echo::start("a").await;
    let lb = Sluice::from_toml(&config("", "token = \"k3y\"", &[("a", a.addr)])).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "k3y\n").unwrap();
    let path = file.to_str().unwrap();
    let out = ctl(&lb, &["--token-file", path, "status"]).await;
    assert!(out.status.success(), "{}", text(&out));
    // The file, given on the command line, wins over the environment.
    let out = within(
        "ctl",
        command(&lb, &["status", "--token-file", path])
            .env("SLUICE_TOKEN", "wrong")
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let missing = dir.path().join("missing");
    let out = ctl(&lb, &["--token-file", missing.to_str().unwrap(), "status"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("cannot read the token file {}", missing.display())),
        "{}",
        text(&out)
    );
    std::fs::write(&file, "").unwrap();
    let out = ctl(&lb, &["--token-file", path, "status"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("token file {path}: the file is empty")),
        "{}",
        text(&out)
    );

    let out = ctl(&lb, &["--token", "k3y", "--token-file", path, "status"]).await;
    assert_eq!(out.status.code(), Some(1), "a usage error: {}", text(&out));
    assert!(text(&out).contains("cannot be used with"), "{}", text(&out));
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_refuses_a_token_that_cannot_go_into_a_header() {
    let a = Echo::start("a").await;
    let lb = Sluice::from_toml(&config("", "token = \"k3y\"", &[("a", a.addr)])).await;
    let out = ctl(&lb, &["--token", "k3\ny", "status"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--token: the token has a line feed at byte 3"),
        "{}",
        text(&out)
    );
    let out = ctl(&lb, &["--token", "k\u{e4}y", "status"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("the token has a non-ASCII character"),
        "{}",
        text(&out)
    );
    lb.shutdown().await;
}

#[test]
fn ctl_help_warns_that_token_shows_in_ps() {
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--token-file"), "{help}");
    let token = help
        .lines()
        .find(|l| l.trim_start().starts_with("--token <"))
        .unwrap_or_else(|| panic!("{help}"));
    assert!(
        token.contains("`ps`") && token.contains("--token-file") && token.contains("SLUICE_TOKEN"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_address_may_be_given_without_a_scheme() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let bare = lb.admin.to_string();
    let by_flag = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &bare, "status"])
        .env_remove("SLUICE_TOKEN")
        .output();
    let by_env = tokio::process::Command::new(BIN)
        .args(["ctl", "status"])
        .env("SLUICE_ADMIN", &bare)
        .env_remove("SLUICE_TOKEN")
        .output();
    for out in [
        within("ctl", by_flag).await.unwrap(),
        within("ctl", by_env).await.unwrap(),
    ] {
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("a "),
            "{}",
            text(&out)
        );
    }
    // What is still no address says what one looks like.
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", "https://x:1", "status"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("such as 127.0.0.1:9000"),
        "{}",
        text(&out)
    );
    lb.shutdown().await;
}

/// `ctl status` says why a backend is down and which services use each;
/// `ctl stats` shows `/stats`; `ctl stop` says how many it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_why_a_backend_is_down_stats_counts_and_stop_says_what_it_closed() {
    let a = Echo::start("a").await;
    let (_guard, dead) = dead_addr();
    let text_cfg = format!(
        "[health]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"a\"\naddress = \"{}\"\nhealth_check = \"none\"\n\
         [[backend]]\nname = \"b\"\naddress = \"{dead}\"\n",
        a.addr
    );
    let lb = Sluice::from_toml(&text_cfg).await;
    wait_for("b is down", || async {
        lb.backend("b").await["healthy"] == false
    })
    .await;
    let out = ctl(&lb, &["status"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = shown.lines().collect();
    assert!(lines[0].ends_with("SERVICES"), "{shown}");
    let b = lines.iter().position(|l| l.starts_with("b ")).unwrap();
    assert!(lines[b].ends_with(" web"), "{shown}");
    assert!(
        lines[b + 1].starts_with("  b down since ")
            && lines[b + 1].contains("health check")
            && lines[b + 1].contains("refused"),
        "{shown}"
    );
    assert!(!shown.contains("a down"), "{shown}");

    // Two clients on a, then a stop that closes both.
    let (mut one, _) = lb.connect().await;
    let (mut two, _) = lb.connect().await;
    echo(&mut one, b"1").await;
    echo(&mut two, b"2").await;
    let out = ctl(&lb, &["stats"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let stats = String::from_utf8_lossy(&out.stdout).into_owned();
    let count = |name: &str| -> u64 {
        let line = stats
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {stats}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(count("active_connections"), 2, "{stats}");
    assert_eq!(count("established"), 2, "{stats}");
    let out = ctl(&lb, &["stop", "a"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("a: stopped, out of rotation; closed 2 connection(s)"),
        "{}",
        text(&out)
    );
    assert!(closed_by_peer(&mut one).await && closed_by_peer(&mut two).await);
    lb.shutdown().await;
}

/// A drain that waits on a quiet connection still says, every few seconds,
/// that it is alive and who holds it open; then it ends when that one goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_drain_prints_a_heartbeat_with_the_oldest_connection() {
    use tokio::io::AsyncBufReadExt;
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (mut held, _) = lb.connect().await;
    echo(&mut held, b"hi").await;
    let mut child = command(&lb, &["drain", "a"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let heartbeat = within("a heartbeat line", async {
        loop {
            let l = lines.next_line().await.unwrap().expect("ctl ended early");
            if l.contains("still draining after") {
                return l;
            }
        }
    })
    .await;
    assert!(
        heartbeat.contains("a: still draining after")
            && heartbeat.contains("1 live connection(s), ")
            && heartbeat.contains("the oldest open for"),
        "{heartbeat}"
    );
    drop(held);
    within("drained", async {
        loop {
            let l = lines.next_line().await.unwrap().expect("ctl ended early");
            if l.contains("a: drained after") {
                return;
            }
        }
    })
    .await;
    assert!(within("ctl exit", child.wait()).await.unwrap().success());
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conns_follows_the_pages_or_stops_at_its_limit() {
    // More than ctl's page of 1000, so that it must follow a Link.
    const N: usize = 1005;
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(lb.connect().await.0);
    }
    let ids = |out: &Output| -> Vec<u64> {
        assert!(out.status.success(), "{}", text(out));
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_u64().unwrap())
            .collect()
    };
    let all = ids(&ctl(&lb, &["conns", "a", "--json"]).await);
    assert_eq!(all.len(), N);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "ascending, none twice");
    let first = ids(&ctl(&lb, &["conns", "a", "--json", "--limit", "3"]).await);
    assert_eq!(first, all[..3]);
    let out = ctl(&lb, &["conns", "a", "--limit", "2"]).await;
    assert_eq!(
        text(&out)
            .lines()
            .filter(|l| l.contains("127.0.0.1:"))
            .count(),
        2,
        "{}",
        text(&out)
    );
    let out = ctl(&lb, &["conns", "a", "--limit", "0"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // A sluice from before pages refuses `limit` and lists them all.
    let (_, rows) = lb.get("/backends/a/connections?limit=3").await;
    let old = canned_admin(vec![
        (
            "/backends/a/connections?limit=1000",
            400,
            r#"{"error":"unknown parameter `limit` (accepted: none)"}"#.into(),
        ),
        ("/backends/a/connections", 200, rows.to_string()),
    ])
    .await;
    let out = within(
        "sluice ctl",
        tokio::process::Command::new(BIN)
            .args([
                "ctl",
                "--admin",
                &format!("http://{old}"),
                "conns",
                "a",
                "--json",
            ])
            .env_remove("SLUICE_TOKEN")
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(ids(&out), all[..3]);
    drop(clients);
    lb.shutdown().await;
}
