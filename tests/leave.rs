//! Leaving the pair: `POST /leave` and `sluice ctl leave` turn `/healthz`
//! to 503 so the floating address moves to the peer, while every
//! connection runs on; `join` undoes it; the flag outlives a restart.
//! tests/keepalived.rs moves a real floating address with it.

mod support;

use std::process::Stdio;

use support::*;
use tokio::io::AsyncBufReadExt;

/// `sluice ctl --admin ADMIN ARGS`.
fn ctl(lb: &Sluice, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("ctl")
        .arg("--admin")
        .arg(format!("http://{}", lb.admin))
        .args(args)
        .env_remove("SLUICE_TOKEN");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_serves_on_answers_503_and_outlives_a_restart_until_join() {
    let a = Echo::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let top = format!(
        "state_file = \"{}\"",
        dir.path().join("state.json").display()
    );
    let text = config(&top, "", &[("a", a.addr)]);
    let lb = Sluice::from_toml(&text).await;
    let (mut session, _) = lb.connect().await;

    let (status, v) = lb.post("/leave").await;
    assert_eq!(status, 202, "a session is open: {v}");
    assert_eq!(v["leaving"], true);
    assert_eq!(v["active_connections"], 1);
    assert_eq!(v["left"], false);
    let (status, h) = lb.get("/healthz").await;
    assert_eq!(
        (status, h["status"].as_str()),
        (503, Some("leaving")),
        "{h}"
    );
    assert_eq!(h["active_connections"], 1);
    // A container's health check fails too, and says why.
    let o = within("ctl health", ctl(&lb, &["health"]).output())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(err.contains("/healthz says leaving"), "{err}");

    // The session runs on, and a client that still arrives is served.
    echo(&mut session, b"still here").await;
    let (mut late, name) = lb.connect().await;
    assert_eq!(name, "a");
    echo(&mut late, b"late").await;
    drop(late);

    // ctl follows the count down and returns when none is left.
    let mut leave = ctl(&lb, &["leave"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(leave.stdout.take().unwrap()).lines();
    let mut out = String::new();
    while !out.contains("leaving:") {
        let l = within("ctl's first line", lines.next_line()).await;
        out += &format!("{}\n", l.unwrap().expect("ctl printed its count"));
    }
    echo(&mut session, b"after ctl leave").await;
    drop(session);
    while let Some(l) = within("ctl's output", lines.next_line()).await.unwrap() {
        out += &format!("{l}\n");
    }
    let status = within("ctl leave", leave.wait()).await.unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("left after"), "{out}");

    // A host rebooted for its patch does not take the address back.
    lb.shutdown().await;
    let lb = Sluice::from_toml(&text).await;
    let (status, h) = lb.get("/healthz").await;
    assert_eq!(
        (status, h["status"].as_str()),
        (503, Some("leaving")),
        "{h}"
    );
    let o = within("ctl status", ctl(&lb, &["status"]).output())
        .await
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && t.contains("leaving its pair"), "{t}");

    let o = within("ctl join", ctl(&lb, &["join"]).output())
        .await
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("joined"));
    let (status, h) = lb.get("/healthz").await;
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")), "{h}");
    let o = within("ctl health", ctl(&lb, &["health"]).output())
        .await
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    lb.shutdown().await;
    let lb = Sluice::from_toml(&text).await;
    let (status, _) = lb.get("/healthz").await;
    assert_eq!(status, 200, "the join was saved too");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_after_closes_what_is_left_and_wait_times_out_with_exit_2() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let (mut session, _) = lb.connect().await;

    let o = within(
        "ctl leave --wait",
        ctl(&lb, &["leave", "--wait", "300ms"]).output(),
    )
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("still leaving"));
    echo(&mut session, b"a timed-out wait closes nothing").await;

    let (status, v) = lb.post("/leave?force_after=200ms&wait=10s").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["left"], true);
    assert!(within("the forced close", closed_by_peer(&mut session)).await);

    // A repeated leave keeps an earlier force_after: the earliest closes.
    let (mut session, _) = lb.connect().await;
    lb.post("/join").await;
    let (status, _) = lb.post("/leave?force_after=200ms").await;
    assert_eq!(status, 202);
    let (status, _) = lb.post("/leave").await;
    assert_eq!(status, 202);
    assert!(within("the earlier deadline", closed_by_peer(&mut session)).await);

    // A join cancels a pending force_after: a session opened before it is
    // still open well after that deadline has passed.
    let (mut session, _) = lb.connect().await;
    lb.post("/join").await;
    let (status, _) = lb.post("/leave?force_after=300ms").await;
    assert_eq!(status, 202);
    let (status, v) = lb.post("/join").await;
    assert_eq!((status, v["leaving"].as_bool()), (200, Some(false)));
    let (status, v) = lb.post("/leave?wait=900ms").await;
    assert_eq!(status, 202, "a session is open: {v}");
    echo(&mut session, b"still open").await;
    lb.post("/join").await;
    lb.shutdown().await;
}
