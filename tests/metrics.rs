//! `GET /metrics`: names, labels and values after known traffic, a drain,
//! a reload and refused clients; who may read it; and a real Prometheus
//! server that scrapes it and answers queries on what it stored.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use support::*;
use tokio::net::TcpStream;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// Whether Prometheus (and its promtool) is here; outside CI, one line
/// says why the test does not run without it.
fn prometheus_available() -> bool {
    if Path::new(PROMETHEUS).exists() && Path::new(PROMTOOL).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "prometheus is missing in CI: scripts/test.sh installs it"
    );
    eprintln!(
        "metrics tests: the Prometheus checks are skipped, no {PROMETHEUS} (apt-get install prometheus, or run scripts/test.sh)"
    );
    false
}

/// One sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// The samples of one scrape.
#[derive(Debug)]
struct Samples {
    text: String,
    all: Vec<Sample>,
}

impl Samples {
    /// Reads the text format; label values here hold no `,` or `"`.
    fn parse(text: &str) -> Samples {
        let mut all = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .strip_suffix('}')
                        .unwrap()
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            all.push((name.to_string(), labels, value));
        }
        Samples {
            text: text.to_string(),
            all,
        }
    }

    /// The value of `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.all
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// As [`Samples::get`], failing the test when it is not there.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }

    /// The admin state whose one-hot sample is 1, checking the others are 0.
    fn admin_state(&self, backend: &str) -> &'static str {
        let on: Vec<&'static str> = ["active", "draining", "drained", "stopped"]
            .into_iter()
            .filter(|s| {
                let v = self.value(
                    "sluice_backend_admin_state",
                    &[("backend", backend), ("state", s)],
                );
                assert!(v == 0.0 || v == 1.0, "{backend} {s}: {v}");
                v == 1.0
            })
            .collect();
        assert_eq!(on.len(), 1, "{backend}: one state at a time: {on:?}");
        on[0]
    }

    /// Whether any sample has the label `backend="name"`.
    fn names_backend(&self, name: &str) -> bool {
        self.all
            .iter()
            .any(|(_, l, _)| l.get("backend").is_some_and(|b| b == name))
    }
}

/// A scrape, without a token.
async fn metrics(admin: SocketAddr) -> Samples {
    metrics_with(admin, "").await
}

async fn metrics_with(admin: SocketAddr, headers: &str) -> Samples {
    let (status, head, body) = http_raw(admin, "GET", "/metrics", headers).await;
    assert_eq!(status, 200, "{head}{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    Samples::parse(&body)
}

/// `promtool check metrics` on the text: the format and Prometheus's
/// naming rules (units, `_total` on counters).
fn promtool_check(text: &str) {
    let mut p = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Three clients through one backend, each sending `hello` and reading
/// it back: every backend and service metric has the value that traffic
/// gives, and the process's own are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_traffic_gives_known_values() {
    let web1 = Echo::start("web1").await;
    let lb = Sluice::start("", &[("web1", web1.addr)]).await;
    let b = [("backend", "web1")];
    let m = metrics(lb.admin).await;
    assert_eq!(m.value("sluice_backend_connections_total", &b), 0.0);
    assert_eq!(m.admin_state("web1"), "active");

    let mut held = Vec::new();
    for _ in 0..3 {
        let (mut s, name) = lb.connect().await;
        assert_eq!(name, "web1");
        echo(&mut s, b"hello").await;
        held.push(s);
    }
    let m = metrics(lb.admin).await;
    let live = [("backend", "web1"), ("service", "web")];
    assert_eq!(m.value("sluice_backend_connections", &live), 3.0);
    assert_eq!(
        m.value("sluice_service_connections", &[("service", "web")]),
        3.0
    );

    drop(held);
    let ended = "sluice_service_connection_duration_seconds_count";
    wait_for("the three connections to end", || async {
        metrics(lb.admin).await.get(ended, &[("service", "web")]) == Some(3.0)
    })
    .await;
    let m = metrics(lb.admin).await;
    assert_eq!(m.value("sluice_backend_connections", &live), 0.0);
    assert_eq!(
        m.value("sluice_service_connections", &[("service", "web")]),
        0.0
    );
    assert_eq!(m.value("sluice_backend_connections_total", &b), 3.0);
    // To the backend: `hello` from each client; from it: its greeting
    // `web1\n` and the echo.
    assert_eq!(m.value("sluice_backend_sent_bytes_total", &b), 15.0);
    assert_eq!(m.value("sluice_backend_received_bytes_total", &b), 30.0);
    for reason in ["refused", "timeout", "unreachable", "other"] {
        let l = [("backend", "web1"), ("reason", reason)];
        assert_eq!(m.value("sluice_backend_connect_errors_total", &l), 0.0);
    }
    for result in ["passed", "failed"] {
        let l = [("backend", "web1"), ("result", result)];
        assert_eq!(
            m.value("sluice_backend_health_checks_total", &l),
            0.0,
            "health_check = none"
        );
    }
    assert_eq!(m.value("sluice_backend_up", &b), 1.0);
    assert_eq!(m.value("sluice_backend_weight", &b), 1.0);
    assert_eq!(m.get("sluice_backend_drain_started_seconds", &b), None);
    for reason in ["limit", "no_backend", "resources", "proxy_header"] {
        let l = [("service", "web"), ("reason", reason)];
        assert_eq!(m.value("sluice_service_clients_refused_total", &l), 0.0);
    }
    let inf = [("service", "web"), ("le", "+Inf")];
    assert_eq!(
        m.value("sluice_service_connection_duration_seconds_bucket", &inf),
        3.0
    );
    let sum = m.value(
        "sluice_service_connection_duration_seconds_sum",
        &[("service", "web")],
    );
    assert!(sum > 0.0 && sum < 60.0, "{sum}");
    for result in ["applied", "refused"] {
        let l = [("result", result)];
        assert_eq!(m.value("sluice_config_reloads_total", &l), 0.0);
    }
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(m.value("sluice_build_info", &version), 1.0);

    // The process's own, as every client library names them.
    let open = m.value("process_open_fds", &[]);
    assert!(open > 0.0 && m.value("process_max_fds", &[]) >= open);
    assert!(m.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(m.value("process_virtual_memory_bytes", &[]) > 0.0);
    assert!(m.value("process_threads", &[]) >= 1.0);
    assert!(m.value("process_cpu_seconds_total", &[]) >= 0.0);
    let started = m.value("process_start_time_seconds", &[]);
    assert!(
        started <= unix_now() && started > unix_now() - 3600.0,
        "{started}"
    );

    if prometheus_available() {
        promtool_check(&m.text);
    }
    lb.shutdown().await;
}

/// A drain moves the one-hot admin state; its start time is there while
/// it runs, and gone once it is drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_the_admin_state_and_shows_when_it_began() {
    let web1 = Echo::start("web1").await;
    let lb = Sluice::start("", &[("web1", web1.addr)]).await;
    let b = [("backend", "web1")];
    let (client, _) = lb.connect().await;

    let asked = unix_now();
    let (status, v) = lb.post("/backends/web1/drain").await;
    assert_eq!(status, 202, "{v}");
    let m = metrics(lb.admin).await;
    assert_eq!(m.admin_state("web1"), "draining");
    let began = m.value("sluice_backend_drain_started_seconds", &b);
    // The state's time is kept in whole milliseconds.
    assert!(
        began >= asked - 0.001 && began <= unix_now(),
        "{asked} {began}"
    );

    drop(client);
    wait_for("web1 drained", || async {
        metrics(lb.admin).await.admin_state("web1") == "drained"
    })
    .await;
    let m = metrics(lb.admin).await;
    assert_eq!(m.get("sluice_backend_drain_started_seconds", &b), None);

    lb.post("/backends/web1/stop").await;
    assert_eq!(metrics(lb.admin).await.admin_state("web1"), "stopped");
    lb.post("/backends/web1/start").await;
    assert_eq!(metrics(lb.admin).await.admin_state("web1"), "active");
    lb.shutdown().await;
}

/// SIGHUP with a file that does not load, then with one that removes a
/// backend: each counted by result; the removed backend stays listed
/// while its last connection runs, draining, and then leaves the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_count_and_a_removed_backend_leaves_the_output() {
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let both = config("", "", &[("web1", web1.addr), ("web2", web2.addr)]);
    let (_dir, path) = write_config(&both);
    let mut p = Proc::spawn(&["run", "--config", path.to_str().unwrap()]);
    let addr = addr_after(&p.wait_line("service listening"), "listen=");
    let admin = addr_after(&p.wait_line("admin API listening"), "listen=");
    let reloads = |m: &Samples| {
        [
            m.value("sluice_config_reloads_total", &[("result", "applied")]),
            m.value("sluice_config_reloads_total", &[("result", "refused")]),
        ]
    };
    assert_eq!(reloads(&metrics(admin).await), [0.0, 0.0]);

    // A client on web2, kept open across the reload that removes it.
    let mut on_web2 = None;
    while on_web2.is_none() {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if within("greeting", read_line(&mut s)).await == "web2" {
            on_web2 = Some(s);
        }
    }

    std::fs::write(&path, "this is not [toml").unwrap();
    p.signal("HUP");
    p.wait_line("reload refused");
    assert_eq!(reloads(&metrics(admin).await), [0.0, 1.0]);

    let only_web1 = config("", "", &[("web1", web1.addr)]);
    std::fs::write(&path, only_web1).unwrap();
    p.signal("HUP");
    p.wait_line("configuration reloaded");
    let m = metrics(admin).await;
    assert_eq!(reloads(&m), [1.0, 1.0]);
    assert_eq!(m.admin_state("web2"), "draining", "{}", m.text);
    let live = [("backend", "web2"), ("service", "web")];
    assert_eq!(m.value("sluice_backend_connections", &live), 1.0);

    drop(on_web2);
    wait_for("web2 to leave the output", || async {
        !metrics(admin).await.names_backend("web2")
    })
    .await;
    let m = metrics(admin).await;
    assert_eq!(m.admin_state("web1"), "active");
    assert!(m.names_backend("web1"));
    p.signal("TERM");
    assert!(p.wait_exit().success());
}

/// A client over `max_connections`, and one that no backend answers, each
/// counted by its reason; the failed connect under its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_count_by_reason() {
    let refused = |m: &Samples, reason: &str| {
        let l = [("service", "web"), ("reason", reason)];
        m.value("sluice_service_clients_refused_total", &l)
    };

    // Over the limit: closed at accept.
    let web1 = Echo::start("web1").await;
    let lb = Sluice::start("max_connections = 1", &[("web1", web1.addr)]).await;
    let (held, _) = lb.connect().await;
    let mut over = TcpStream::connect(lb.addr).await.unwrap();
    assert!(closed_by_peer(&mut over).await);
    wait_for("a refusal over the limit", || async {
        refused(&metrics(lb.admin).await, "limit") == 1.0
    })
    .await;
    let m = metrics(lb.admin).await;
    assert_eq!(
        [refused(&m, "no_backend"), refused(&m, "resources")],
        [0.0, 0.0]
    );
    drop(held);
    lb.shutdown().await;

    // No backend answers: its connect refused, the client closed.
    let (_dead, dead) = dead_addr();
    let lb = Sluice::start("", &[("dead", dead)]).await;
    let mut client = TcpStream::connect(lb.addr).await.unwrap();
    assert!(closed_by_peer(&mut client).await);
    wait_for("a refusal for want of a backend", || async {
        refused(&metrics(lb.admin).await, "no_backend") == 1.0
    })
    .await;
    let m = metrics(lb.admin).await;
    assert_eq!([refused(&m, "limit"), refused(&m, "resources")], [0.0, 0.0]);
    let errors = |reason| {
        let l = [("backend", "dead"), ("reason", reason)];
        m.value("sluice_backend_connect_errors_total", &l)
    };
    assert_eq!(
        ["refused", "timeout", "unreachable", "other"].map(errors),
        [1.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(
        m.value("sluice_backend_connections_total", &[("backend", "dead")]),
        0.0
    );
    lb.shutdown().await;
}

/// With a token, `/metrics` and `/healthz` want it (the read-only one
/// will do) unless `open_metrics` and `open_healthz` open them, each on
/// its own; nothing else opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_need_the_token_unless_opened() {
    let web1 = Echo::start("web1").await;
    let backends = [("web1", web1.addr)];
    let tokens = "token = \"s3cret\"\nread_token = \"reader\"";
    let status = |admin: SocketAddr, path: &'static str, headers: &'static str| async move {
        http_raw(admin, "GET", path, headers).await.0
    };
    let reader = "Authorization: Bearer reader\r\n";

    let lb = Sluice::from_toml(&config("", tokens, &backends)).await;
    assert_eq!(status(lb.admin, "/metrics", "").await, 401);
    assert_eq!(status(lb.admin, "/healthz", "").await, 401);
    assert_eq!(status(lb.admin, "/metrics", reader).await, 200);
    lb.shutdown().await;

    let open = format!("{tokens}\nopen_metrics = true");
    let lb = Sluice::from_toml(&config("", &open, &backends)).await;
    assert_eq!(status(lb.admin, "/metrics", "").await, 200);
    assert_eq!(status(lb.admin, "/healthz", "").await, 401);
    assert_eq!(status(lb.admin, "/backends", "").await, 401);
    lb.shutdown().await;

    let open = format!("{tokens}\nopen_healthz = true");
    let lb = Sluice::from_toml(&config("", &open, &backends)).await;
    assert_eq!(status(lb.admin, "/healthz", "").await, 200);
    assert_eq!(status(lb.admin, "/metrics", "").await, 401);
    // The container image's HEALTHCHECK: `ctl health` with no token.
    let health = tokio::process::Command::new(BIN)
        .args(["ctl", "--admin", &lb.admin.to_string(), "health"])
        .env_remove("SLUICE_TOKEN")
        .output();
    let o = within("ctl health", health).await.unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(text.starts_with("ok: pid "), "{text}");
    lb.shutdown().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus server on a loopback port, with its config and data in a
/// temporary directory; stopped when dropped.
struct Prometheus {
    addr: SocketAddr,
    _proc: Proc,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second with the bearer
    /// token in `token_file`, as README's scrape config does.
    async fn start(dir: &Path, target: SocketAddr, token_file: &Path) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: sluice\n    authorization:\n      credentials_file: {}\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n",
                token_file.display()
            ),
        )
        .unwrap();
        // A port taken between the asking and Prometheus's bind: ask again.
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut p = Proc::spawn_command(Command::new(PROMETHEUS).args([
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={addr}"),
            ]));
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline && p.child.try_wait().unwrap().is_none() {
                if TcpStream::connect(addr).await.is_ok()
                    && http_raw(addr, "GET", "/-/ready", "").await.0 == 200
                {
                    return Prometheus { addr, _proc: p };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("prometheus did not start");
    }

    /// The result vector of an instant query.
    async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let (status, v) = http(self.addr, "GET", &format!("/api/v1/query?query={q}"), None).await;
        assert_eq!(status, 200, "{v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// A real Prometheus scrapes `/metrics` with the read-only token from a
/// file, and its query API returns the series with their labels and the
/// values the traffic gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_scrapes_and_stores_the_series() {
    if !prometheus_available() {
        return;
    }
    let web1 = Echo::start("web1").await;
    let tokens = "token = \"s3cret\"\nread_token = \"reader\"";
    let lb = Sluice::from_toml(&config("", tokens, &[("web1", web1.addr)])).await;
    for _ in 0..3 {
        let (mut s, _) = lb.connect().await;
        echo(&mut s, b"hello").await;
    }
    let reader = "Authorization: Bearer reader\r\n";
    let ended = "sluice_service_connection_duration_seconds_count";
    wait_for("the three connections to end", || async {
        metrics_with(lb.admin, reader)
            .await
            .get(ended, &[("service", "web")])
            == Some(3.0)
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("sluice-read-token");
    std::fs::write(&token_file, "reader\n").unwrap();
    let prom = Prometheus::start(dir.path(), lb.admin, &token_file).await;

    let deadline = Instant::now() + DEADLINE;
    let result = loop {
        let r = prom.query("sluice_backend_connections_total").await;
        if !r.is_empty() {
            break r;
        }
        let (_, targets) = http(prom.addr, "GET", "/api/v1/targets", None).await;
        assert!(
            Instant::now() < deadline,
            "Prometheus stored no scrape: {targets}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(result.len(), 1, "{result:?}");
    let series = &result[0];
    assert_eq!(series["metric"]["backend"], "web1", "{series}");
    assert_eq!(series["metric"]["job"], "sluice", "{series}");
    assert_eq!(
        series["metric"]["instance"],
        lb.admin.to_string(),
        "{series}"
    );
    assert_eq!(series["value"][1], "3", "{series}");

    // The scrape itself was whole: up, no error, and the histogram too.
    let up = prom.query("up").await;
    assert_eq!(up[0]["value"][1], "1", "{up:?}");
    let (_, targets) = http(prom.addr, "GET", "/api/v1/targets", None).await;
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
    let count = prom.query(ended).await;
    assert_eq!(count[0]["metric"]["service"], "web", "{count:?}");
    assert_eq!(count[0]["value"][1], "3", "{count:?}");
    lb.shutdown().await;
}
