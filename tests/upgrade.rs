//! Updating sluice itself under load: five upgrades in a row hand the
//! listening sockets from process to process, and no client notices.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the load saw.
#[derive(Default)]
struct Tally {
    served: AtomicUsize,
    failed: AtomicUsize,
}

/// Clients that each connect, hear the greeting, exchange one line and
/// close, as fast as they can, until `stop`.
fn fresh_clients(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let ok = async {
                        let mut s = TcpStream::connect(addr).await.ok()?;
                        let name = read_line(&mut s).await;
                        if name.is_empty() {
                            return None;
                        }
                        s.write_all(b"ping\n").await.ok()?;
                        let mut back = [0u8; 5];
                        s.read_exact(&mut back).await.ok()?;
                        (&back == b"ping\n").then_some(())
                    }
                    .await;
                    let counter = if ok.is_some() {
                        &tally.served
                    } else {
                        &tally.failed
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect()
}

/// A session that exchanges numbered lines until `stop`, then closes;
/// returns how many it exchanged, or why it broke.
async fn long_session(addr: SocketAddr, stop: Arc<AtomicBool>) -> Result<usize, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    if read_line(&mut s).await.is_empty() {
        return Err("no greeting".into());
    }
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) || n < 10 {
        let line = format!("message {n}\n");
        s.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("{n}: {e}"))?;
        let mut back = vec![0u8; line.len()];
        s.read_exact(&mut back)
            .await
            .map_err(|e| format!("{n}: {e}"))?;
        if back != line.as_bytes() {
            return Err(format!("{n}: got {:?}", String::from_utf8_lossy(&back)));
        }
        n += 1;
        tokio::task::yield_now().await;
    }
    Ok(n)
}

fn config(state: &Path, backends: &[(&str, SocketAddr)], lone: (&str, SocketAddr)) -> String {
    let mut t = format!(
        "shutdown_grace = \"5m\"\nstate_file = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [{}]\n\
         [[service]]\nname = \"lone\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        state.display(),
        backends
            .iter()
            .map(|(n, _)| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", "),
        lone.0
    );
    for (name, addr) in backends.iter().chain([&lone]) {
        t.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nhealth_check = \"none\"\n"
        ));
    }
    t
}

/// Starts the binary; returns it with its two services' and admin's addresses.
fn start(path: &Path) -> (Proc, SocketAddr, SocketAddr, SocketAddr) {
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let web = addr_after(&p.wait_line("service=web "), "listen=");
    let lone = addr_after(&p.wait_line("service=lone "), "listen=");
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    (p, web, lone, admin)
}

async fn pid_answering(admin: SocketAddr) -> u64 {
    http(admin, "GET", "/healthz", None).await.1["pid"]
        .as_u64()
        .unwrap()
}

fn exe_of(pid: u64) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_upgrades_under_load_drop_no_one_and_keep_the_drain_exact() {
    let (a, b, c, d) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
        Echo::start("d").await,
    );
    let dir = tempfile::tempdir().unwrap();
    // Two builds the test can tell apart by their file.
    let builds: Vec<PathBuf> = ["sluice-a", "sluice-b"]
        .iter()
        .map(|n| {
            let p = dir.path().join(n);
            std::fs::copy(BIN, &p).unwrap();
            p
        })
        .collect();
    let text = config(
        &dir.path().join("state.json"),
        &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
        ("d", d.addr),
    );
    let (_cfg_dir, path) = write_config(&text);
    let (first, web, lone, admin) = start(&path);
    let first_pid = first.child.id() as u64;

    // A backend drained for maintenance before the upgrades.
    assert_eq!(http(admin, "POST", "/backends/c/drain", None).await.0, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = fresh_clients(web, tally.clone(), stop.clone());
    let sessions: Vec<_> = (0..8)
        .map(|_| tokio::spawn(long_session(web, stop.clone())))
        .collect();
    wait_for("load under way", || async {
        tally.served.load(Ordering::SeqCst) > 50
    })
    .await;

    // A client of `lone`, held on the first process across the upgrades.
    let mut held = TcpStream::connect(lone).await.unwrap();
    assert_eq!(within("greeting", read_line(&mut held)).await, "d");

    // An admin connection the first process accepted, kept open across
    // the hand-over: a change sent on it must not apply to that process.
    let mut stale = TcpStream::connect(admin).await.unwrap();
    let probe = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\n\r\n");
    stale.write_all(probe.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = within("healthz", stale.read(&mut buf)).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let mut pid = first_pid;
    for round in 0..5 {
        let binary = &builds[round % 2];
        let target = format!("/upgrade?binary={}", binary.display());
        let (status, report) = http(admin, "POST", &target, None).await;
        assert_eq!(status, 200, "upgrade {round}: {report}");
        assert_eq!(report["old_pid"].as_u64(), Some(pid), "{report}");
        let new = report["new_pid"].as_u64().unwrap();
        assert_eq!(pid_answering(admin).await, new, "the new process answers");
        assert_eq!(&exe_of(new), binary, "the new build runs");
        pid = new;
        let before = tally.served.load(Ordering::SeqCst);
        wait_for("the new process serves", || async {
            tally.served.load(Ordering::SeqCst) > before + 20
        })
        .await;

        if round == 0 {
            // Kept alive by the client, but closed by the old process
            // after its reply, so the client's next request reaches the
            // new one.
            let change = format!("POST /backends/a/stop HTTP/1.1\r\nHost: {admin}\r\n\r\n");
            stale.write_all(change.as_bytes()).await.unwrap();
            let mut reply = String::new();
            within("reply, then the close", stale.read_to_string(&mut reply))
                .await
                .unwrap();
            assert!(reply.starts_with("HTTP/1.1 409"), "{reply}");
            assert!(
                reply.to_ascii_lowercase().contains("connection: close"),
                "{reply}"
            );
            let (_, v) = http(admin, "GET", "/backends/a", None).await;
            assert_eq!(v["state"], "active", "{v}");
        }
        if round == 2 {
            // A drain of `d` while the first process still holds a
            // connection to it: not drained until that one ends.
            let (status, v) = http(admin, "POST", "/backends/d/drain", None).await;
            assert_eq!(
                (status, v["state"].as_str()),
                (202, Some("draining")),
                "{v}"
            );
            assert_eq!(v["active_connections"], 1, "{v}");
            let (_, conns) = http(admin, "GET", "/backends/d/connections", None).await;
            assert_eq!(conns[0]["pid"].as_u64(), Some(first_pid), "{conns}");
            echo(&mut held, b"still here").await;
            // ctl status names the process answering, and the one draining.
            let url = format!("http://{admin}");
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new(BIN)
                    .args(["ctl", "--admin", &url, "status"])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&format!("pid {pid}, up since")), "{text}");
            assert!(text.contains("previous process pid"), "{text}");
            assert_eq!(
                http(admin, "POST", "/backends/d/drain?wait=200ms", None)
                    .await
                    .0,
                202
            );
        }
    }
    drop(held);
    wait_for("d drained once its last connection ended", || async {
        http(admin, "GET", "/backends/d", None).await.1["state"] == "drained"
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    for s in sessions {
        let n = s.await.unwrap().expect("a long session broke");
        assert!(n >= 10);
    }
    assert_eq!(
        tally.failed.load(Ordering::SeqCst),
        0,
        "clients refused or cut"
    );
    let (_, c_now) = http(admin, "GET", "/backends/c", None).await;
    assert_eq!(c_now["state"], "drained", "drained before, drained after");
    wait_for("every process before the last has gone", || async {
        let (_, v) = http(admin, "GET", "/backends", None).await;
        v.as_array()
            .unwrap()
            .iter()
            .all(|b| b["active_connections"] == 0)
    })
    .await;
    wait_for("the first process exited", || async {
        !Path::new(&format!("/proc/{first_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{first_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    })
    .await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_old_process_serving_and_a_restart_refuses_clients() {
    let (a, d) = (Echo::start("a").await, Echo::start("d").await);
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &dir.path().join("state.json"),
        &[("a", a.addr)],
        ("d", d.addr),
    );
    let (_cfg_dir, path) = write_config(&text);
    let (mut p, web, _, admin) = start(&path);
    let pid = p.child.id() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = fresh_clients(web, tally.clone(), stop.clone());

    // A binary that exits at once, one that is not there, and a file that
    // no longer parses: each refused, the old process serving throughout.
    for (target, says) in [
        ("/upgrade?binary=/bin/false", "ended before it was ready"),
        ("/upgrade?binary=/nonexistent/sluice", "No such file"),
    ] {
        let (status, v) = http(admin, "POST", target, None).await;
        assert_eq!(status, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{v}");
    }
    // A binary someone else could have written is not run.
    let loose = dir.path().join("sluice-loose");
    std::fs::copy(BIN, &loose).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (status, v) = http(
        admin,
        "POST",
        &format!("/upgrade?binary={}", loose.display()),
        None,
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("writable by its owner only"),
        "{v}"
    );
    std::fs::write(&path, format!("{text}bogus = 1\n")).unwrap();
    let (status, v) = http(admin, "POST", "/upgrade", None).await;
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("bogus"), "{v}");
    std::fs::write(&path, &text).unwrap();
    assert_eq!(pid_answering(admin).await, pid);
    let before = tally.served.load(Ordering::SeqCst);
    wait_for("still serving", || async {
        tally.served.load(Ordering::SeqCst) > before + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(tally.failed.load(Ordering::SeqCst), 0);

    // Negative control: a plain restart leaves a moment in which a client
    // is refused, and the harness's client sees it.
    p.signal("TERM");
    // Off the runtime: the backends' tasks run on it meanwhile.
    let exited = tokio::task::block_in_place(|| p.wait_exit());
    assert_eq!(exited.code(), Some(0));
    assert!(TcpStream::connect(web).await.is_err(), "refused while down");
    let restarted_text = text
        .replace("shutdown_grace = \"5m\"", "shutdown_grace = \"1s\"")
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{admin}\""),
            1,
        )
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{web}\""),
            1,
        );
    std::fs::write(&path, restarted_text).unwrap();
    let mut again = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    again.wait_line("admin API listening");
    let mut s = TcpStream::connect(web).await.unwrap();
    assert_eq!(
        within("greeting", read_line(&mut s)).await,
        "a",
        "served again"
    );
    again.signal("TERM");
    let exited = tokio::task::block_in_place(|| again.wait_exit());
    assert_eq!(exited.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_then_the_new_main_pid() {
    let (a, d) = (Echo::start("a").await, Echo::start("d").await);
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let text = config(
        &dir.path().join("state.json"),
        &[("a", a.addr)],
        ("d", d.addr),
    );
    let (_cfg_dir, path) = write_config(&text);
    let mut p = Proc::spawn_command(
        std::process::Command::new(BIN)
            .args(["run", "--config", path.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify),
    );
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    let message = |s: &std::os::unix::net::UnixDatagram| {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = tokio::task::block_in_place(|| message(&socket));
    assert!(ready.contains("READY=1"), "{ready}");

    // What `systemctl reload` runs: report the hand-over, do not wait.
    let url = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["ctl", "--admin", &url, "upgrade", "--wait", "0s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = pid_answering(admin).await;
    let took_over = tokio::task::block_in_place(|| message(&socket));
    assert!(took_over.contains(&format!("MAINPID={new}")), "{took_over}");
    assert!(took_over.contains("READY=1"), "{took_over}");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &new.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    drop(p);
}

/// Whether process `pid` has exited (gone, or a zombie its parent has not
/// reaped yet).
fn exited(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pid_file_names_the_process_that_serves_across_an_upgrade() {
    let (a, d) = (Echo::start("a").await, Echo::start("d").await);
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &dir.path().join("state.json"),
        &[("a", a.addr)],
        ("d", d.addr),
    );
    let (_cfg_dir, path) = write_config(&text);
    let pidfile = dir.path().join("sluice.pid");
    let mut p = Proc::spawn(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    let named = || -> u64 {
        let text = std::fs::read_to_string(&pidfile).unwrap();
        text.trim().parse().unwrap_or_else(|_| panic!("{text:?}"))
    };
    let first = p.child.id() as u64;
    assert_eq!(named(), first, "written once it listens");

    // What `systemctl reload` runs; the new process names itself.
    let url = format!("http://{admin}");
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &url, "upgrade", "--wait", "30s"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = pid_answering(admin).await;
    assert_ne!(new, first);
    wait_for("the first process exited", || async { exited(first) }).await;
    assert_eq!(
        named(),
        new,
        "the old process left the new one's file alone"
    );

    // The file is what signals one process: SIGHUP reloads the one named.
    std::fs::write(
        &path,
        text.replace(
            "[[backend]]\nname = \"d\"",
            "[[backend]]\nname = \"d\"\nweight = 3",
        ),
    )
    .unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &named().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    p.wait_line("configuration reloaded");
    assert_eq!(http(admin, "GET", "/backends/d", None).await.1["weight"], 3);

    let term = std::process::Command::new("kill")
        .args(["-TERM", &new.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    wait_for("the new process exited", || async { exited(new) }).await;
    assert!(!pidfile.exists(), "removed at exit");
    drop(p);
}
