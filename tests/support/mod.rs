//! Helpers that start sluice and real backend servers on ephemeral ports,
//! and wait on conditions with deadlines.
#![allow(dead_code)]

pub mod netns;

use std::future::Future;
use std::io::{BufRead, BufReader as StdBufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `f` with [`DEADLINE`], failing the test if it takes longer.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A test backend: greets each connection with `NAME\n`, then echoes every
/// byte, and passes a client's FIN back as its own.
pub struct Echo {
    pub name: String,
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Echo {
    pub async fn start(name: &str) -> Echo {
        Self::on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts again on the address of a killed one.
    pub async fn restart(name: &str, addr: SocketAddr) -> Echo {
        Self::on(name, addr).await
    }

    async fn on(name: &str, addr: SocketAddr) -> Echo {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (n, count) = (name.to_string(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let greeting = format!("{n}\n");
                tokio::spawn(async move {
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo {
            name: name.to_string(),
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops listening, and waits until connects are refused.
    pub async fn kill(&self) {
        self.task.abort();
        let addr = self.addr;
        wait_for("killed backend refuses connects", || async move {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address on which nothing listens: connects to it are refused. The
/// socket stays bound but never listens while the returned guard lives, so
/// no other test can take the port meanwhile.
pub fn dead_addr() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&any.into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

/// A config on ephemeral ports: `top` lines, `admin` lines, and one service
/// `web` over `backends` (name, address) without health checks.
pub fn config(top: &str, admin: &str, backends: &[(&str, SocketAddr)]) -> String {
    let mut text = format!(
        "{top}\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n"
    );
    for (name, addr) in backends {
        text.push_str(&format!(
            "\n[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nhealth_check = \"none\"\n"
        ));
    }
    text
}

/// sluice running in-process on ephemeral ports.
pub struct Sluice {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), sluice::Error>>,
}

impl Sluice {
    /// Starts sluice with `extra` TOML (top-level keys) and one service
    /// `web` over `backends` (name, address).
    pub async fn start(extra: &str, backends: &[(&str, SocketAddr)]) -> Sluice {
        Self::from_toml(&config(extra, "", backends)).await
    }

    /// Starts sluice from a whole file; shutdown grace is short unless set.
    pub async fn from_toml(text: &str) -> Sluice {
        let mut text = text.to_string();
        if !text.contains("shutdown_grace") {
            text.insert_str(0, "shutdown_grace = \"100ms\"\n");
        }
        let config = sluice::Config::parse("test.toml", &text).unwrap_or_else(|e| panic!("{e}"));
        Self::serve(sluice::Sluice::bind(config).await.unwrap()).await
    }

    /// Starts sluice from the file at `path`, which `POST /reload` reads
    /// again, as `sluice run --config` does.
    pub async fn from_file(path: &std::path::Path) -> Sluice {
        let config = sluice::Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        let server = sluice::Sluice::bind(config).await.unwrap();
        Self::serve(server.reload_from(path.to_path_buf())).await
    }

    async fn serve(server: sluice::Sluice) -> Sluice {
        let addr = server.service_addr("web").expect("service web");
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Sluice {
            addr,
            admin,
            stop: Some(tx),
            task,
        }
    }

    /// Connects a client and reads the greeting: the backend's name.
    pub async fn connect(&self) -> (TcpStream, String) {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let name = within("backend greeting", read_line(&mut s)).await;
        (s, name)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http(self.admin, "GET", path, None).await
    }

    pub async fn post(&self, path: &str) -> (u16, Value) {
        http(self.admin, "POST", path, None).await
    }

    pub async fn backend(&self, name: &str) -> Value {
        let (status, v) = self.get(&format!("/backends/{name}")).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    pub async fn live(&self, name: &str) -> u64 {
        self.backend(name).await["active_connections"]
            .as_u64()
            .unwrap()
    }

    pub async fn state(&self, name: &str) -> String {
        self.backend(name).await["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Asks for shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        within("sluice shutdown", &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Reads one `\n`-terminated line, without the newline; empty at EOF.
pub async fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => out.push(b[0]),
        }
    }
    String::from_utf8(out).unwrap()
}

/// Sends `msg` and reads back its echo.
pub async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within("echo", s.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

/// Whether the peer has closed `s` (EOF or reset) within the deadline.
pub async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(DEADLINE, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// A plain HTTP/1.1 request; returns the status and the JSON body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: Option<&str>,
) -> (u16, Value) {
    let (status, _, body) = http_raw(addr, method, path, extra_headers.unwrap_or("")).await;
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, v)
}

/// A plain HTTP/1.1 request; returns status, head and body text.
pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
) -> (u16, String, String) {
    within("admin request", async {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut s = BufReader::new(s);
        // Host is the address dialled, as curl sends it.
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n");
        s.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body).await;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, head, body)
    })
    .await
}

/// Closes `s` with a reset instead of a FIN.
pub fn reset(s: TcpStream) {
    let s = s.into_std().unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// The sluice binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

pub fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A child process that is killed if the test fails.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_command(Command::new(BIN).args(args))
    }

    /// Runs `command` (such as a shell that sets limits, then runs sluice).
    pub fn spawn_command(command: &mut Command) -> Proc {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in StdBufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        Proc {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for an output line containing `needle` and returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with `{needle}`; output so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Every line to the end: the readers stop when the pipes close.
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                while let Ok(l) = self.lines.recv_timeout(left.max(Duration::from_secs(1))) {
                    self.log.push(l);
                }
                return s;
            }
            if std::time::Instant::now() >= deadline {
                while let Ok(l) = self.lines.try_recv() {
                    self.log.push(l);
                }
                panic!("process did not exit; output:\n{}", self.log.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn addr_after(line: &str, key: &str) -> SocketAddr {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches(|c| c == '"' || c == ')')
        .parse()
        .unwrap()
}

/// Runs `sluice run` on a file that must make it fail; returns stderr.
pub fn run_must_fail(path: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "sluice run should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A backend whose accept queue is full: connects to it hang.
pub async fn hanging_backend() -> (socket2::Socket, std::net::SocketAddr, Vec<TcpStream>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    (sock, addr, fillers)
}

/// sluice in-process with a handle on its shared state (to reload it or
/// count its tasks), its two addresses, and how to stop it.
pub async fn bound(
    text: &str,
) -> (
    std::sync::Arc<sluice::state::Shared>,
    SocketAddr,
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), sluice::Error>>,
) {
    let server = sluice::Sluice::bind(sluice::Config::parse("t.toml", text).unwrap())
        .await
        .unwrap();
    let shared = server.shared().clone();
    let (addr, admin) = (server.service_addr("web").unwrap(), server.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    (shared, addr, admin, stop, task)
}

/// Every accepted client is in exactly one of these once its connect
/// phase is over (`/stats`); their sum, for checks that none is lost.
pub fn settled(stats: &Value) -> u64 {
    [
        "established",
        "rejected_limit",
        "rejected_proxy_header",
        "rejected_no_backend",
        "rejected_backend_full",
        "rejected_resources",
        "abandoned",
    ]
    .iter()
    .map(|k| {
        stats[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {stats}"))
    })
    .sum()
}

/// The nginx binary; `None` when it is missing outside CI (the test then
/// says it skips), a failure in CI, whose script installs it.
pub fn nginx_bin() -> Option<&'static str> {
    let found = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nginx is not installed: `apt-get install nginx` (scripts/test.sh does this)"
        );
        eprintln!("skipped: nginx is not installed (apt-get install nginx)");
    }
    found
}
