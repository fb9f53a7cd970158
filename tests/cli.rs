//! The real binary: `sluice check` on good and bad files, `sluice run` and
//! SIGTERM with open connections, and `sluice demo`.

mod support;

use std::process::Command;

use support::*;

/// `sluice check` of the file alone: tests run in parallel, and the
/// example's fixed ports are not theirs to probe.
fn check(text: &str) -> (bool, String, String) {
    check_with(text, &["--file-only"])
}

fn check_with(text: &str, extra: &[&str]) -> (bool, String, String) {
    let (_dir, path) = write_config(text);
    let out = Command::new(BIN)
        .arg("check")
        .args(extra)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = include_str!("../config/sluice.toml");

#[test]
fn check_accepts_the_example_and_prints_a_summary() {
    let (ok, out, err) = check(GOOD);
    assert!(ok, "{err}");
    assert!(
        out.contains("web1") && out.contains("web2") && out.contains("127.0.0.1:8080"),
        "{out}"
    );
    assert!(out.contains("OK"), "{out}");
    assert!(
        out.contains("open files: room for about") && out.contains("admin connections"),
        "what the descriptor limit allows: {out}"
    );
}

#[test]
fn check_warns_when_the_file_limit_cannot_carry_max_connections() {
    let (_dir, path) = write_config(&format!("max_connections = 10000000\n{GOOD}"));
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 1024 && exec {BIN} check --config {}",
            path.display()
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("limit 1024 open files"), "{out}");
    assert!(
        out.contains("warning        max_connections 10000000"),
        "{out}"
    );
}

#[test]
fn check_refuses_bad_files_naming_file_line_and_field() {
    let base = "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\n[[backend]]\nname = \"web1\"\naddress = \"127.0.0.1:8081\"\n";
    // (file text, line, words the error must contain)
    let cases: Vec<(String, usize, Vec<&str>)> = vec![
        (format!("{base}colour = \"red\"\n"), 8, vec!["colour"]),
        (
            format!("{base}\n[[backend]]\nname = \"web1\"\naddress = \"127.0.0.1:8082\"\n"),
            10,
            vec!["backend[1].name", "web1", "twice"],
        ),
        (
            base.replace("127.0.0.1:8081", "web one:80"),
            7,
            vec!["backend[0].address", "web one:80"],
        ),
        (
            base.replace("127.0.0.1:8081", "10.0.0.1:99999"),
            7,
            vec!["backend[0].address", "99999"],
        ),
        (
            base.replace("127.0.0.1:8080", "localhost:80"),
            3,
            vec!["service[0].listen", "localhost:80"],
        ),
        (
            "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n".into(),
            2,
            vec!["service[0].backends", "no backend"],
        ),
        (
            base.replace("8080\"\n", "8080\"\nbackends = [\"web9\"]\n"),
            4,
            vec!["service[0].backends", "web9"],
        ),
        (
            format!("{base}weight = -2\n"),
            8,
            vec!["backend[0].weight", "-2"],
        ),
        (
            format!("connect_timeout = \"soon\"\n{base}"),
            1,
            vec!["connect_timeout", "soon"],
        ),
        (
            format!("[admin]\nlisten = \"0.0.0.0:9000\"\n{base}"),
            2,
            vec!["admin.listen", "token"],
        ),
        (
            format!("{base}\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8443\"\n"),
            10,
            vec!["service[1].name", "twice"],
        ),
        (
            "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\n".into(),
            3,
            vec![],
        ),
        (
            base.replace("8080\"\n", "8080\"\naffinity = \"network\"\n"),
            4,
            vec!["service[0].affinity", "source-hash"],
        ),
        (
            base.replace("8080\"\n", "8080\"\nbalance = \"sticky\"\n"),
            4,
            vec!["service[0].balance", "sticky", "least-connections"],
        ),
        (
            format!("{base}backup = true\n"),
            2,
            vec!["service[0].backends", "backup"],
        ),
        (
            format!("{base}max_connections = 0\n"),
            8,
            vec!["backend[0].max_connections", "1 or more"],
        ),
        (
            format!("{base}slow_start = \"0s\"\n"),
            8,
            vec!["backend[0].slow_start", "more than 0"],
        ),
    ];
    for (text, line, words) in cases {
        let (ok, _, err) = check(&text);
        assert!(!ok, "accepted:\n{text}");
        assert!(
            err.contains(&format!("sluice.toml:{line}")),
            "wrong or no line {line} in `{err}` for:\n{text}"
        );
        for w in words {
            assert!(err.contains(w), "`{err}` should mention `{w}` for:\n{text}");
        }
    }
    let (ok, _, err) = check("");
    assert!(!ok);
    assert!(err.contains("no [[service]]"), "{err}");
}

#[test]
fn check_names_a_missing_file() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/sluice.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/sluice.toml") && err.contains("cannot read"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_connections_finish_then_exits_0() {
    let a = Echo::start("a").await;
    let text = config(
        "shutdown_grace = \"1h\"",
        "token = \"tok-never-logged\"",
        &[("a", a.addr)],
    );
    let (_dir, path) = write_config(&text);
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    p.wait_line("admin API listening");

    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await, "a");
    p.signal("TERM");
    p.wait_line("shutting down");
    // New clients are refused; the open one runs on.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped accepting"
    );
    echo(&mut s, b"still served during the grace period").await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "waits for the live connection"
    );
    drop(s);
    let status = p.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", p.log.join("\n"));
    assert!(
        !p.log.join("\n").contains("tok-never-logged"),
        "token in logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_what_outlives_the_grace_period() {
    let a = Echo::start("a").await;
    let text = config("shutdown_grace = \"200ms\"", "", &[("a", a.addr)]);
    let (_dir, path) = write_config(&text);
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await, "a");
    p.signal("TERM");
    assert!(closed_by_peer(&mut s).await);
    assert_eq!(p.wait_exit().code(), Some(0));
}

/// Signals sent the moment sluice announces itself meet its handlers, not
/// the default action: TERM and INT stop it gracefully, HUP reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_right_after_start_are_handled() {
    let a = Echo::start("a").await;
    // Many per-core workers widen the time between the first line and the
    // end of start-up, where a lazily installed handler would be missing.
    let text = config("runtime = \"per-core\"\nworkers = 16", "", &[("a", a.addr)]);
    let (_dir, path) = write_config(&text);
    for sig in ["TERM", "INT", "HUP"].repeat(5) {
        let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
        p.wait_line("service listening");
        p.signal(sig);
        if sig == "HUP" {
            p.wait_line("configuration reloaded");
            assert!(p.child.try_wait().unwrap().is_none(), "alive after HUP");
            p.signal("TERM");
        }
        let status = p.wait_exit();
        let log = p.log.join("\n");
        assert_eq!(status.code(), Some(0), "after {sig}: {log}");
        assert!(log.contains("stopped"), "graceful stop after {sig}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_taken_port_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"web\"\nlisten = \"{}\"\n[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
        taken.local_addr().unwrap()
    );
    let (_dir, path) = write_config(&text);
    let err = run_must_fail(&path);
    assert!(
        err.contains("cannot listen on") && err.contains("service `web`"),
        "{err}"
    );
    assert_eq!(
        err.matches("Address already in use").count(),
        1,
        "the cause, once: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_round_robin_and_drains() {
    let mut p = Proc::spawn(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--web",
        "127.0.0.1:0,127.0.0.1:0",
    ]);
    let line = p.wait_line("sluice demo is running");
    let listen = addr_after(&line, "http://");
    let admin = addr_after(&line, "admin API on http://");
    let get = |addr| async move {
        let (_, _, body) = http_raw(addr, "GET", "/", "").await;
        body
    };
    let mut bodies = vec![get(listen).await, get(listen).await];
    bodies.sort();
    assert_eq!(bodies, ["hello from web1\n", "hello from web2\n"]);
    let (status, v) = http(admin, "POST", "/backends/web1/drain?wait=5s", None).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("drained")));
    for _ in 0..3 {
        assert_eq!(get(listen).await, "hello from web2\n");
    }
    http(admin, "POST", "/backends/web1/start", None).await;
    // SIGHUP no longer kills it: there is no file to reload, and it says so.
    p.signal("HUP");
    p.wait_line("SIGHUP ignored: sluice demo has no configuration file to reload");
    assert!(get(listen).await.starts_with("hello from web"));
    let (status, v) = http(admin, "POST", "/reload", None).await;
    assert_eq!(status, 409, "{v}");
    p.signal("INT");
    assert_eq!(p.wait_exit().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_logs_and_ignores_sighup() {
    let mut p = Proc::spawn(&["web", "--listen", "127.0.0.1:0", "--name", "w"]);
    let addr = addr_after(&p.wait_line("listening on"), "listening on ");
    p.signal("HUP");
    p.wait_line("SIGHUP ignored: sluice web has no configuration file to reload");
    let (_, _, body) = http_raw(addr, "GET", "/", "").await;
    assert_eq!(body, "hello from w\n");
}

/// A second SIGTERM or SIGINT during the grace period means now: what is
/// left is closed at once, and the process exits 0 long before the grace
/// period would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_closes_what_is_left_now() {
    let a = Echo::start("a").await;
    for (first, second) in [("TERM", "TERM"), ("INT", "TERM"), ("TERM", "INT")] {
        let text = config("shutdown_grace = \"10m\"", "", &[("a", a.addr)]);
        let (_dir, path) = write_config(&text);
        let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
        let addr = addr_after(&p.wait_line("service listening"), "listen=");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_line(&mut s).await, "a");
        p.signal(first);
        p.wait_line("shutting down: no new connections");
        echo(&mut s, b"the first signal cut nothing").await;
        p.signal(second);
        p.wait_line("closing remaining connections before the grace period ends");
        assert!(closed_by_peer(&mut s).await, "{first} then {second}");
        let code = tokio::task::block_in_place(|| p.wait_exit()).code();
        assert_eq!(code, Some(0), "{}", p.log.join("\n"));
        assert!(
            p.log.iter().any(|l| l.contains("second stop signal")),
            "{}",
            p.log.join("\n")
        );
    }
}

#[test]
fn docker_config_needs_a_token_and_takes_it_from_the_environment() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/docker.toml");
    let out = Command::new(BIN)
        .args(["check", "--file-only", "--config", path])
        .env_remove("SLUICE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLUICE_TOKEN"));
    let out = Command::new(BIN)
        .args(["check", "--file-only", "--config", path])
        .env("SLUICE_TOKEN", "t0ken")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("token required") && !summary.contains("t0ken"),
        "{summary}"
    );
}

/// The container image's HEALTHCHECK, as the Dockerfile writes it, against
/// sluice running `config/docker.toml`: it needs no token, and it fails
/// once sluice takes no clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_healthcheck_passes_without_the_token() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let check = dockerfile
        .replace("\\\n", " ")
        .lines()
        .find_map(|l| {
            l.strip_prefix("HEALTHCHECK ")?
                .split_once("CMD ")
                .map(|(_, c)| c.to_string())
        })
        .expect("the Dockerfile has a HEALTHCHECK ... CMD [...]");
    let argv: Vec<String> = serde_json::from_str(&check).expect("CMD in exec form");
    assert_eq!(argv[0], "/sluice", "{argv:?}");

    // The image's config, on ephemeral loopback ports and a real backend.
    let web = Echo::start("web1").await;
    let text = std::fs::read_to_string(format!("{root}/config/docker.toml"))
        .unwrap()
        .replace("0.0.0.0:9000", "127.0.0.1:0")
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace(
            "\"web1\"\naddress = \"web1\"",
            &format!("\"web1\"\naddress = \"{}\"", web.addr),
        )
        .replace(
            "\"web2\"\naddress = \"web2\"",
            &format!("\"web2\"\naddress = \"{}\"", web.addr),
        );
    let (_dir, path) = write_config(&text);
    let mut p = Proc::spawn_command(
        Command::new(BIN)
            .args(["run", "--config", path.to_str().unwrap()])
            .env("SLUICE_TOKEN", "t0ken"),
    );
    let service = addr_after(&p.wait_line("service listening"), "listen=");
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=").to_string();
    let run_check = || {
        let args: Vec<String> = argv[1..]
            .iter()
            .map(|a| {
                if a == "127.0.0.1:9000" {
                    admin.clone()
                } else {
                    a.clone()
                }
            })
            .collect();
        Command::new(BIN)
            .args(&args)
            .env_remove("SLUICE_TOKEN")
            .output()
            .unwrap()
    };
    let o = tokio::task::block_in_place(run_check);
    assert!(o.status.success(), "{o:?}");
    let o = Command::new(BIN)
        .args(["ctl", "--admin", &admin, "status"])
        .env_remove("SLUICE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "the rest still wants the token");

    // Shutting down: the check fails (the grace period holds it open while
    // a client is connected).
    let mut client = tokio::net::TcpStream::connect(service).await.unwrap();
    assert_eq!(within("greeting", read_line(&mut client)).await, "web1");
    echo(&mut client, b"hello").await;
    p.signal("TERM");
    p.wait_line("shutting down");
    let o = tokio::task::block_in_place(run_check);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("shutting down"),
        "{o:?}"
    );
    drop(client);
    assert!(tokio::task::block_in_place(|| p.wait_exit()).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_with_either_runtime_layout() {
    // (layout, threads that serve, the name of the serving threads besides
    // the main one, and at least how many there are: tokio's blocking pool
    // shares its name)
    for (layout, threads, name, named) in [
        (
            "runtime = \"multi-thread\"\nworkers = 2",
            2,
            "tokio-rt-worker",
            2,
        ),
        (
            "runtime = \"per-core\"\nworkers = 3",
            3,
            "sluice-worker-",
            2,
        ),
    ] {
        let a = Echo::start("a").await;
        let text = config(layout, "", &[("a", a.addr)]);
        let (_dir, path) = write_config(&text);
        let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
        let line = p.wait_line("service listening");
        let addr = addr_after(&line, "listen=");
        for _ in 0..10 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            assert_eq!(read_line(&mut s).await, "a");
            echo(&mut s, layout.as_bytes()).await;
        }
        // The log's count is the threads that really serve.
        assert!(line.contains(&format!(" threads={threads} ")), "{line}");
        let tasks = std::fs::read_dir(format!("/proc/{}/task", p.child.id())).unwrap();
        let serving = tasks
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.starts_with(name))
            .count();
        assert!(serving >= named, "{layout}: {serving} threads named {name}");
        p.signal("TERM");
        assert_eq!(p.wait_exit().code(), Some(0), "{}", p.log.join("\n"));
    }
}

#[test]
fn check_catches_what_run_would_refuse_on_this_machine() {
    // A state file in a directory that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone/state.json");
    let on_ephemeral_ports = GOOD.replace(":8080", ":0").replace(":9000", ":0");
    let text = format!("state_file = \"{}\"\n{on_ephemeral_ports}", gone.display());
    let (ok, _, err) = check_with(&text, &[]);
    assert!(!ok);
    assert!(
        err.contains("cannot create files in") && err.contains("gone"),
        "{err}"
    );

    // A port another program holds.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let text = GOOD
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace(":9000", ":0");
    let (ok, _, err) = check_with(&text, &[]);
    assert!(!ok);
    assert!(
        err.contains("already in use") && err.contains(&port.to_string()),
        "{err}"
    );
    // The same port, as `run` would bind it: v4-mapped, and dual-stack.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        for listen in [format!("[::ffff:127.0.0.1]:{port}"), format!("[::]:{port}")] {
            let text = GOOD
                .replace("127.0.0.1:8080", &listen)
                .replace(":9000", ":0");
            let (ok, _, err) = check_with(&text, &[]);
            assert!(!ok, "{listen}");
            assert!(err.contains("already in use"), "{listen}: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_notes_the_ports_of_the_running_sluice_before_a_reload() {
    let a = Echo::start("a").await;
    let lb = Sluice::start("", &[("a", a.addr)]).await;
    let text = config("", "", &[("a", a.addr)])
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", lb.admin),
            1,
        )
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", lb.addr),
            1,
        );
    let (ok, out, err) = check_with(&text, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("fine for a reload"), "{out}");
    lb.shutdown().await;
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let (_dir, path) = write_config(GOOD);
    let hard = Command::new("sh")
        .args(["-c", "ulimit -H -n"])
        .output()
        .unwrap();
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_string();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -S -n 256 && exec {BIN} check --file-only --config {}",
            path.display()
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let want = if hard == "unlimited" {
        String::new()
    } else {
        format!("limit {hard} open files")
    };
    assert!(
        out.contains(&want) && !out.contains("limit 256 open"),
        "hard {hard}: {out}"
    );
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Ok(found) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing in CI (scripts/test.sh installs systemd)"
        );
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(found.status.success());
    // The unit as shipped, with this build's binary where it names
    // /usr/bin/sluice, since verify checks that the commands exist.
    let unit = include_str!("../deploy/systemd/sluice.service").replace("/usr/bin/sluice", BIN);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn a_pid_file_that_cannot_be_written_stops_the_start_with_its_path() {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = config("", "", &[("a", a.local_addr().unwrap())]);
    let (dir, path) = write_config(&text);
    let pidfile = dir.path().join("no-such-dir").join("sluice.pid");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .arg("--pidfile")
        .arg(&pidfile)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("pid file {}", pidfile.display())),
        "{err}"
    );
}

/// Completions and man pages come from the clap definition that parses
/// the command line, so every command is in them.
#[test]
fn completions_and_man_pages_cover_every_command() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for word in ["reload", "drain", "rollout", "pidfile", "token-file"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    // The bash script parses as bash.
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("sluice.bash");
    std::fs::write(&bash, run(&["completions", "bash"])).unwrap();
    let parsed = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
    assert!(parsed.success());

    let page = run(&["man"]);
    assert!(page.contains(".TH sluice 1"), "{page}");
    assert!(page.contains("sluice\\-ctl(1)"), "{page}");
    let pages = dir.path().join("man1");
    std::fs::create_dir(&pages).unwrap();
    run(&["man", "--dir", pages.to_str().unwrap()]);
    for name in [
        "sluice.1",
        "sluice-run.1",
        "sluice-ctl-reload.1",
        "sluice-ctl-drain.1",
    ] {
        let text = std::fs::read_to_string(pages.join(name)).unwrap();
        assert!(text.contains(".TH"), "{name}");
    }
    let run_page = std::fs::read_to_string(pages.join("sluice-run.1")).unwrap();
    assert!(run_page.contains("pidfile"), "{run_page}");
}

#[test]
fn check_prints_every_setting_that_differs_from_its_default() {
    let (ok, plain, err) = check(GOOD);
    assert!(ok, "{err}");
    for name in [
        "state file",
        "health ",
        "zero copy",
        "workers",
        "admin  ",
        "balance",
        "backup",
        "slow start",
        ", max ",
    ] {
        assert!(!plain.contains(name), "{name} is at its default: {plain}");
    }
    let text = format!(
        "state_file = \"/var/lib/sluice/state.json\"\nzero_copy = false\n\
         [health]\ninterval = \"5s\"\nrise = 4\n{}",
        GOOD.replace(
            "listen = \"127.0.0.1:9000\"",
            "listen = \"127.0.0.1:9000\"\ntoken = \"t0ken\"\nread_token = \"r3ad\"\nopen_healthz = true"
        )
    );
    let (ok, out, err) = check(&text);
    assert!(ok, "{err}");
    for want in [
        "state file     /var/lib/sluice/state.json",
        "health         every 5s, timeout 1s, up after 4 pass(es)",
        "zero copy      off",
        "admin          a read-only token, /healthz without the token",
    ] {
        assert!(out.contains(want), "no `{want}` in:\n{out}");
    }
}

/// Every example under config/examples/ is a file `sluice check` accepts,
/// and the summary shows what the example is about.
#[test]
fn every_example_config_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let out = Command::new(BIN)
            .args(["check", "--file-only", "--config"])
            .arg(&path)
            .env("SLUICE_TOKEN", "t0ken")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        seen.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            text,
        ));
    }
    seen.sort();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "admin-with-token.toml",
            "affinity-limits-backup.toml",
            "client-address.toml",
            "health-checked-pool.toml",
            "web-80-443.toml",
            "weights.toml"
        ]
    );
    let summary = |name: &str| &seen.iter().find(|(n, _)| n == name).unwrap().1;
    assert!(summary("admin-with-token.toml").contains("10.0.9.5:9000 (token required)"));
    assert!(summary("health-checked-pool.toml").contains("http check GET /healthz -> 200"));
    let balancing = summary("affinity-limits-backup.toml");
    for want in [
        "balance source-hash, affinity network",
        "balance least-connections",
        "max 500 connections, slow start 2m",
        "spare",
    ] {
        assert!(balancing.contains(want), "no `{want}` in:\n{balancing}");
    }
    assert!(
        balancing
            .lines()
            .any(|l| l.starts_with("backend spare") && l.ends_with("backup, slow start 30s")),
        "{balancing}"
    );
    assert!(summary("web-80-443.toml").contains("service https"));
    assert!(summary("weights.toml").contains("weight 0"));
    let proxied = summary("client-address.toml");
    for want in [
        "service web      [::]:80 -> web1, web2 (backend port 80; accepts a PROXY header within 3s)",
        ", sends a PROXY v2 header",
        "[2001:db8::12]",
        ", sends a PROXY v1 header",
    ] {
        assert!(proxied.contains(want), "no `{want}` in:\n{proxied}");
    }

    // The token example says where its token comes from when it is missing.
    let out = Command::new(BIN)
        .args(["check", "--file-only", "--config"])
        .arg(format!("{dir}/admin-with-token.toml"))
        .env_remove("SLUICE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLUICE_TOKEN"));
}

/// A connection retried on the next backend names, in its span, only the
/// backend it ended on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_connection_names_the_backend_it_ended_on_once() {
    let (_guard, dead) = dead_addr();
    let b = Echo::start("b").await;
    let text = config("", "", &[("dead", dead), ("b", b.addr)]);
    let (_dir, path) = write_config(&text);
    let mut p = Proc::spawn_command(
        Command::new("env")
            .args(["RUST_LOG=sluice=debug", BIN, "run", "--config"])
            .arg(&path),
    );
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    // Round-robin: one of the first two clients is sent to `dead` first.
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_line(&mut s).await, "b");
    }
    p.wait_line("backend connect failed; trying the next");
    let connected = p.wait_line("connected");
    assert_eq!(connected.matches("backend=").count(), 1, "{connected}");
    assert!(
        connected.contains("backend=b") || connected.contains("backend=\"b\""),
        "{connected}"
    );
}
