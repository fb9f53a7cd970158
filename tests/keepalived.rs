//! A redundant pair of sluice hosts behind one floating address that
//! keepalived (VRRP) moves, set up with the files of deploy/keepalived as
//! shipped: only their example addresses and paths are replaced. Each test
//! builds a site of network namespaces joined by a bridge that lives in a
//! namespace of its own: a client, two balancers (sluice and keepalived on
//! each) and a backend host with two `sluice web` servers. Nothing is on
//! the host but an unreachable route for the range.
//!
//! What it shows: a balancer that leaves (`sluice ctl leave`) hands the
//! address over with no client refused and lets its sessions finish, on
//! each host in turn, also sessions from client ports the new holder has
//! used before; a balancer whose sluice is killed loses the address
//! within seconds; and, as negative controls, a balancer host that goes
//! dark loses its sessions (reset within seconds, not left hanging), and
//! without sluice-vip.nft a leave resets the leaving host's sessions.

mod support;

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::netns::{self, note};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every site's addresses. The host routes the range nowhere while a test
/// runs, so nothing of it can leave by the default route.
const RANGE: &str = "10.214.0.0/16";

const KEEPALIVED: &str = "/usr/sbin/keepalived";

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/keepalived");

/// The deploy files are written for host A (192.0.2.11) with host B
/// (192.0.2.12) as its peer and 192.0.2.100 as the floating address; a
/// site maps 192.0.2.X to 10.214.S.X, and gives host B host A as its peer.
const DOC_NET: &str = "192.0.2.";
const DOC_PEER: &str = "192.0.2.12";

/// Host numbers in a site's /24, as in the deploy files.
const CLIENT: u8 = 10;
const BALANCERS: [u8; 2] = [11, 12];
const BACKENDS: u8 = 20;
const VIP: u8 = 100;

/// How long a session's request may take: long enough that a session the
/// network left hanging shows as a timeout, not as a reset.
const SESSION_TIMEOUT: Duration = Duration::from_secs(20);

/// The read-only token of a site with tokens: what keepalived's check sends.
const READ_TOKEN: &str = "check-only-token";

/// How long a short request may take before it counts as failed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sites made by this process: names and subnets come from it.
static SITES: AtomicUsize = AtomicUsize::new(0);

/// Whether these tests can run: root, network namespaces, keepalived, and
/// what the deploy files use (curl, nft). In CI their absence fails the
/// test; elsewhere it is said once.
fn keepalived_available() -> bool {
    if !netns::available() {
        return false;
    }
    let missing: Vec<&str> = [
        (KEEPALIVED, "keepalived"),
        ("curl", "curl"),
        ("nft", "nftables"),
    ]
    .into_iter()
    .filter(|(prog, _)| Command::new(prog).arg("--version").output().is_err())
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "the keepalived tests need {} (apt-get install {})",
        missing.join(", "),
        missing.join(" ")
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "{why}; CI must run them (scripts/test.sh installs them)"
    );
    netns::skip(&why);
    false
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) -> String {
    netns::run("ip", args).unwrap_or_else(|e| panic!("{e}"))
}

/// A command's output, without holding up the runtime's thread.
async fn output(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(prog)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace, deleted on drop with whatever still runs in it.
struct Ns(String);

impl Ns {
    fn new(name: String) -> Ns {
        ip(&["netns", "add", &name]);
        Ns(name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        netns::kill_inside(&self.0);
        let _ = netns::run("ip", &["netns", "del", &self.0]);
    }
}

/// This process's use of [`RANGE`], given back on drop.
struct RangeHeld;

impl RangeHeld {
    fn new() -> RangeHeld {
        netns::hold_range(RANGE);
        RangeHeld
    }
}

impl Drop for RangeHeld {
    fn drop(&mut self) {
        netns::release_range(RANGE);
    }
}

/// Makes sockets inside a namespace. A socket belongs to the namespace of
/// the thread that made it, so one thread enters the namespace and makes
/// them; the test's runtime uses them from anywhere.
struct InNs {
    ask: std::sync::mpsc::Sender<oneshot::Sender<io::Result<TcpSocket>>>,
}

impl InNs {
    fn new(ns: &str) -> InNs {
        let file = fs::File::open(format!("/run/netns/{ns}")).unwrap();
        let (ask, asked) = std::sync::mpsc::channel::<oneshot::Sender<io::Result<TcpSocket>>>();
        let (entered, entering) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns changes only this thread's namespace, and the
            // descriptor is an open namespace file.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let _ = entered.send((r == 0).then_some(()).ok_or_else(io::Error::last_os_error));
            if r == 0 {
                for reply in asked {
                    let _ = reply.send(TcpSocket::new_v4());
                }
            }
        });
        entering
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
        InNs { ask }
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.connect_from(0, addr).await
    }

    /// Connects from local `port` (0: any).
    async fn connect_from(&self, port: u16, addr: SocketAddr) -> io::Result<TcpStream> {
        let (tx, rx) = oneshot::channel();
        self.ask
            .send(tx)
            .map_err(|_| io::Error::other("socket thread gone"))?;
        let socket = rx
            .await
            .map_err(|_| io::Error::other("socket thread gone"))??;
        if port != 0 {
            socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        }
        socket.connect(addr).await
    }
}

/// One balancer host: its namespace's sluice and keepalived.
struct Lb {
    name: &'static str,
    ns: String,
    /// The admin token, if sluice has one.
    token: Option<&'static str>,
    /// Where its rendered deploy files, config and state file are.
    dir: PathBuf,
    admin: InNs,
    sluice: Proc,
    keepalived: Proc,
}

impl Lb {
    /// Starts sluice on its config, and waits until its admin API listens.
    fn start_sluice(ns: &str, dir: &Path) -> Proc {
        let config = dir.join("sluice.toml");
        let mut p = Proc::spawn_command(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            BIN,
            "run",
            "--config",
            config.to_str().unwrap(),
        ]));
        p.wait_line("admin API listening");
        p
    }

    async fn admin(&self, method: &str, path: &str) -> (u16, Value) {
        within("admin request", async {
            let mut s = self
                .admin
                .connect("127.0.0.1:9000".parse().unwrap())
                .await
                .unwrap();
            let auth = self
                .token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nConnection: close\r\n{auth}\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.unwrap();
            let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (status, serde_json::from_str(body).unwrap_or(Value::Null))
        })
        .await
    }

    async fn stat(&self, key: &str) -> u64 {
        let (status, v) = self.admin("GET", "/stats").await;
        assert_eq!(status, 200, "{v}");
        v[key].as_u64().unwrap()
    }

    /// The clients (`IP:port`) of the connections this sluice holds.
    async fn clients(&self) -> Vec<String> {
        let mut all = Vec::new();
        for backend in ["web1", "web2"] {
            let (status, v) = self
                .admin("GET", &format!("/backends/{backend}/connections"))
                .await;
            assert_eq!(status, 200, "{v}");
            all.extend(
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["client"].as_str().unwrap().to_string()),
            );
        }
        all
    }

    /// `sluice ctl ARGS` against this host's admin API, run in its namespace.
    fn ctl(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, BIN, "ctl", "--admin"])
            .arg("http://127.0.0.1:9000")
            .args(args)
            .env_remove("SLUICE_TOKEN")
            .env_remove("SLUICE_ADMIN")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(t) = self.token {
            cmd.env("SLUICE_TOKEN", t);
        }
        cmd
    }

    /// Whether keepalived put the floating address on its link.
    async fn holds(&self, vip: Ipv4Addr) -> bool {
        let addrs = output(
            "ip",
            &["-n", &self.ns, "-o", "-4", "addr", "show", "dev", "eth0"],
        )
        .await
        .unwrap_or_default();
        addrs.contains(&format!("inet {vip}/"))
    }

    /// Waits for keepalived to log that this host entered `state`; earlier
    /// lines are passed over.
    fn entered(&mut self, state: &str) {
        let keepalived = &mut self.keepalived;
        tokio::task::block_in_place(|| keepalived.wait_line(&format!("Entering {state} STATE")));
    }

    /// Stops sluice as a reboot would (SIGTERM) and starts it again: what
    /// patching the host does to it.
    fn restart_sluice(&mut self) {
        self.sluice.signal("TERM");
        let sluice = &mut self.sluice;
        let status = tokio::task::block_in_place(|| sluice.wait_exit());
        assert_eq!(status.code(), Some(0), "{}", self.sluice.log.join("\n"));
        self.sluice = Self::start_sluice(&self.ns, &self.dir);
    }
}

impl Drop for Lb {
    /// Stops keepalived with SIGTERM, so that it reaps its VRRP process
    /// and leaves no zombie; what is left is killed with the namespace.
    fn drop(&mut self) {
        let pid = self.keepalived.child.id() as i32;
        // SAFETY: kill has no memory preconditions; the pid is our child,
        // not reaped yet, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.keepalived.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The deploy file `name` as one host of site `net` uses it: addresses
/// mapped, its peer named, and paths into `dir`.
fn render(name: &str, net: &str, peer: Ipv4Addr, dir: &Path) -> String {
    let text = fs::read_to_string(Path::new(DEPLOY).join(name)).unwrap();
    // Only the lines marked as differing per host may name the peer.
    for line in text.lines().filter(|l| l.contains(DOC_PEER)) {
        assert!(
            line.trim_start().starts_with('#') || line.contains("PER HOST"),
            "{name}: a line names host B but is not marked PER HOST: {line}"
        );
    }
    let dir = format!("{}/", dir.display());
    text.replace(DOC_PEER, &peer.to_string())
        .replace(DOC_NET, net)
        .replace("/etc/keepalived/", &dir)
        .replace("/etc/sysctl.d/", &dir)
        // The test adds no user to the host; nobody is as unprivileged.
        .replace("script_user keepalived_script", "script_user nobody")
}

/// Whether keepalived is older than 2.2.8.
fn keepalived_before_2_2_8() -> bool {
    let out = Command::new(KEEPALIVED).arg("--version").output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let version: Vec<u32> = text
        .split_once("Keepalived v")
        .map(|(_, v)| v)
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap_or_default()
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(version.len() >= 2, "no version in: {text}");
    version < vec![2, 2, 8]
}

/// `keepalived -t` on `conf` inside `ns` (it checks the interfaces there):
/// Ok when keepalived accepts the file, else what it said.
fn config_test(ns: &str, conf: &Path) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, KEEPALIVED, "-t", "-l", "-f"])
        .arg(conf)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // keepalived before 2.2.8 (Debian 12 has 2.2.7) ends the test of a file
    // that sets script_user by killing itself with SIGTERM, whether the
    // file is good or not (keepalived issue 2617). It has printed every
    // problem by then, so there what it said is the answer.
    let its_bug = out.status.signal() == Some(libc::SIGTERM) && keepalived_before_2_2_8();
    if said.trim().is_empty() && (out.status.success() || its_bug) {
        Ok(())
    } else {
        Err(format!("keepalived -t: {}: {}", out.status, said.trim()))
    }
}

/// Runs the `ExecStart=` commands of the rendered sluice-vip.service
/// inside `ns`: the sysctls, the address on lo, the nftables rules.
fn set_up_host_network(ns: &str, unit: &str) {
    for line in unit.lines().filter_map(|l| l.strip_prefix("ExecStart=")) {
        let mut args = vec!["netns", "exec", ns];
        args.extend(line.split_whitespace());
        ip(&args);
    }
}

/// A client, two balancers, a backend host, and their bridge.
struct Site {
    /// `10.214.S.`: the site's /24 without its host number.
    net: String,
    vip: Ipv4Addr,
    lbs: Vec<Lb>,
    client: Arc<InNs>,
    _webs: Vec<Proc>,
    _dir: tempfile::TempDir,
    // Dropped last: namespaces (with what runs in them), then the route.
    _nss: Vec<Ns>,
    _range: RangeHeld,
}

impl Site {
    /// Builds a site and waits until one balancer holds the address.
    async fn start() -> Site {
        Self::start_with(None).await
    }

    /// A site whose sluices have admin token `token`, and a read token that
    /// keepalived's check sends from sluice-check.header, as
    /// deploy/keepalived/README.md says.
    async fn start_with(token: Option<&'static str>) -> Site {
        netns::sweep_dead();
        let range = RangeHeld::new();
        let n = SITES.fetch_add(1, Ordering::SeqCst);
        assert!(n < 250, "too many sites in one test process");
        let net = format!("10.214.{n}.");
        let at = |h: u8| -> Ipv4Addr { format!("{net}{h}").parse().unwrap() };
        let prefix = format!("sluice-t-{}-k{n}", std::process::id());
        let mut nss = Vec::new();

        // The bridge lives in a namespace of its own; each host's eth0 is
        // one end of a veth pair whose other end is a port of it.
        let br = Ns::new(format!("{prefix}-br"));
        ip(&["-n", &br.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br.0, "link", "set", "br0", "up"]);
        let mut host = |role: &str, h: u8| -> String {
            let ns = Ns::new(format!("{prefix}-{role}"));
            // A bare `a` would be read as `address`.
            let port = format!("to-{role}");
            ip(&[
                "-n", &br.0, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns.0,
            ]);
            ip(&["-n", &br.0, "link", "set", &port, "master", "br0", "up"]);
            let cidr = format!("{}/24", at(h));
            ip(&["-n", &ns.0, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
            let name = ns.0.clone();
            nss.push(ns);
            name
        };
        let client_ns = host("client", CLIENT);
        let lb_ns = [host("a", BALANCERS[0]), host("b", BALANCERS[1])];
        let backend_ns = host("backends", BACKENDS);
        nss.push(br);

        let webs: Vec<(Proc, SocketAddr)> = ["web1", "web2"]
            .iter()
            .map(|name| netns::web_in(&backend_ns, at(BACKENDS), name))
            .collect();

        let dir = tempfile::tempdir().unwrap();
        // keepalived runs the check script as nobody, who must reach it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let vip = at(VIP);
        let mut lbs = Vec::new();
        for (i, ns) in lb_ns.iter().enumerate() {
            let name = ["a", "b"][i];
            let peer = at(BALANCERS[1 - i]);
            let home = dir.path().join(name);
            fs::create_dir(&home).unwrap();
            fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
            for file in [
                "keepalived.conf",
                "sluice-check",
                "sluice-vip.nft",
                "60-sluice-vip.conf",
            ] {
                fs::write(home.join(file), render(file, &net, peer, &home)).unwrap();
            }
            fs::set_permissions(home.join("sluice-check"), fs::Permissions::from_mode(0o755))
                .unwrap();
            let admin = match token {
                None => String::new(),
                Some(t) => {
                    let header = home.join("sluice-check.header");
                    fs::write(&header, format!("Authorization: Bearer {READ_TOKEN}\n")).unwrap();
                    // Readable by the check's user (nobody here) alone.
                    std::os::unix::fs::chown(&header, Some(65534), None).unwrap();
                    fs::set_permissions(&header, fs::Permissions::from_mode(0o400)).unwrap();
                    format!("token = \"{t}\"\nread_token = \"{READ_TOKEN}\"\n")
                }
            };
            set_up_host_network(ns, &render("sluice-vip.service", &net, peer, &home));

            fs::write(
                home.join("sluice.toml"),
                format!(
                    "shutdown_grace = \"5s\"\nstate_file = \"{}\"\n\n\
                     [health]\ninterval = \"200ms\"\ntimeout = \"300ms\"\n\n\
                     [admin]\nlisten = \"127.0.0.1:9000\"\n{admin}\n\
                     [[service]]\nname = \"web\"\nlisten = \"{vip}:80\"\n\n\
                     [[backend]]\nname = \"web1\"\naddress = \"{}\"\n\n\
                     [[backend]]\nname = \"web2\"\naddress = \"{}\"\n",
                    home.join("state.json").display(),
                    webs[0].1,
                    webs[1].1
                ),
            )
            .unwrap();
            let sluice = Lb::start_sluice(ns, &home);

            let conf = home.join("keepalived.conf");
            config_test(ns, &conf).unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
            // In the foreground (-n), logging to stderr (-l -D) and not to
            // syslog (-G), VRRP only (-P), with pid files of its own.
            let pid = |f: &str| home.join(f).to_str().unwrap().to_string();
            let keepalived = Proc::spawn_command(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                KEEPALIVED,
                "-n",
                "-l",
                "-D",
                "-G",
                "-P",
                "-f",
                conf.to_str().unwrap(),
                "-p",
                &pid("keepalived.pid"),
                "-r",
                &pid("vrrp.pid"),
                "-c",
                &pid("checkers.pid"),
            ]));
            lbs.push(Lb {
                name,
                ns: ns.clone(),
                token,
                dir: home,
                admin: InNs::new(ns),
                sluice,
                keepalived,
            });
        }
        let site = Site {
            net,
            vip,
            lbs,
            client: Arc::new(InNs::new(&client_ns)),
            _webs: webs.into_iter().map(|(p, _)| p).collect(),
            _dir: dir,
            _nss: nss,
            _range: range,
        };
        wait_for("one balancer holds the address", || async {
            site.holders().await.len() == 1
        })
        .await;
        site
    }

    fn vip_addr(&self) -> SocketAddr {
        SocketAddr::from((self.vip, 80))
    }

    /// The balancers that hold the address.
    async fn holders(&self) -> Vec<usize> {
        let mut held = Vec::new();
        for (i, lb) in self.lbs.iter().enumerate() {
            if lb.holds(self.vip).await {
                held.push(i);
            }
        }
        held
    }

    /// Waits until balancer `i`, and it alone, holds the address.
    async fn wait_holder(&self, i: usize) -> Instant {
        wait_for(
            &format!("{} alone holds the address", self.lbs[i].name),
            || async { self.holders().await == vec![i] },
        )
        .await;
        Instant::now()
    }
}

/// The body of a complete `200` reply, or what is wrong with it.
fn body_of(reply: &[u8]) -> Result<String, String> {
    if reply.is_empty() {
        return Err("closed without a reply".into());
    }
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("reply cut in its head after {} bytes", reply.len()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status:?}"));
    }
    body.strip_prefix("hello from ")
        .map(|n| n.trim_end().to_string())
        .ok_or_else(|| format!("unexpected body {body:?}"))
}

/// One GET on a new connection to `addr`: the backend that answered. The
/// client's port goes to `port` once connected.
async fn get(client: &InNs, addr: SocketAddr, port: &mut u16) -> Result<String, String> {
    let talk = async {
        let mut s = client
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        *port = s.local_addr().map_or(0, |a| a.port());
        s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        body_of(&reply)
    };
    tokio::time::timeout(CLIENT_TIMEOUT, talk)
        .await
        .unwrap_or_else(|_| Err("no whole reply in time".into()))
}

/// One request of the load.
struct Sample {
    issued: Instant,
    done: Instant,
    /// The client's port, 0 if it never connected.
    port: u16,
    answer: Result<String, String>,
}

/// Clients that each make short connections to the floating address, one
/// after another, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(client: &Arc<InNs>, addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, samples, client) = (stop.clone(), samples.clone(), client.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let issued = Instant::now();
                        let mut port = 0;
                        let answer = get(&client, addr, &mut port).await;
                        let failed = answer.is_err();
                        samples.lock().unwrap().push(Sample {
                            issued,
                            done: Instant::now(),
                            port,
                            answer,
                        });
                        if failed {
                            // Pacing, as a client backs off: a refused
                            // connect returns at once, and tens of
                            // thousands of them would only load the machine.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            samples,
            tasks,
        }
    }

    fn count(&self, f: impl Fn(&Sample) -> bool) -> usize {
        self.samples.lock().unwrap().iter().filter(|s| f(s)).count()
    }

    /// When the first request issued after `t` was answered.
    fn first_served_after(&self, t: Instant) -> Option<Instant> {
        let samples = self.samples.lock().unwrap();
        samples
            .iter()
            .filter(|s| s.issued >= t && s.answer.is_ok())
            .map(|s| s.done)
            .min()
    }

    /// The ports of the last `n` clients served before `t`.
    fn ports_served_before(&self, t: Instant, n: usize) -> Vec<u16> {
        let samples = self.samples.lock().unwrap();
        let mut served: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.done < t && s.answer.is_ok())
            .collect();
        served.sort_by_key(|s| s.done);
        served.iter().rev().take(n).map(|s| s.port).collect()
    }

    /// Waits until a request issued after `t` is answered; returns when.
    async fn wait_served_after(&self, t: Instant) -> Instant {
        wait_for("a client served", || async {
            self.first_served_after(t).is_some()
        })
        .await;
        self.first_served_after(t).unwrap()
    }

    /// Waits until `n` requests issued after `t` have ended.
    async fn wait_after(&self, t: Instant, n: usize) {
        wait_for(&format!("{n} requests after a point"), || async {
            self.count(|s| s.issued >= t) >= n
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

fn failures<'a>(samples: impl Iterator<Item = &'a Sample>) -> Vec<String> {
    samples.filter_map(|s| s.answer.clone().err()).collect()
}

/// How one long session ended.
#[derive(Debug)]
struct SessionEnd {
    /// Requests answered.
    answered: usize,
    /// Requests answered after the test said "count from here".
    answered_after_mark: usize,
    /// The first failure, and when it happened.
    failed: Option<(String, Instant)>,
}

/// Long client sessions: keep-alive connections that each send a GET every
/// 50 ms until stopped, then close.
struct Sessions {
    /// The sessions' own addresses, as the balancer sees its clients.
    locals: Vec<String>,
    stop: Arc<AtomicBool>,
    mark: Arc<AtomicBool>,
    /// Answers to all sessions since the mark.
    since_mark: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<SessionEnd>>,
}

impl Sessions {
    /// Opens a session from each of `ports` (0: any), each answered once
    /// before this returns.
    async fn open(client: &InNs, addr: SocketAddr, ports: &[u16]) -> Sessions {
        let stop = Arc::new(AtomicBool::new(false));
        let mark = Arc::new(AtomicBool::new(false));
        let since_mark = Arc::new(AtomicUsize::new(0));
        let mut locals = Vec::new();
        let mut tasks = Vec::new();
        for &port in ports {
            let s = client.connect_from(port, addr).await.unwrap();
            locals.push(s.local_addr().unwrap().to_string());
            let mut s = BufReader::new(s);
            keep_alive_get(&mut s).await.unwrap();
            let (stop, mark, since_mark) = (stop.clone(), mark.clone(), since_mark.clone());
            tasks.push(tokio::spawn(async move {
                let mut end = SessionEnd {
                    answered: 1,
                    answered_after_mark: 0,
                    failed: None,
                };
                while !stop.load(Ordering::SeqCst) {
                    // Pacing, not synchronisation: a session that talks
                    // now and then, as a browser's does.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let marked = mark.load(Ordering::SeqCst);
                    match keep_alive_get(&mut s).await {
                        Ok(_) => {
                            end.answered += 1;
                            if marked {
                                end.answered_after_mark += 1;
                                since_mark.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(e) => {
                            end.failed = Some((e, Instant::now()));
                            return end;
                        }
                    }
                }
                // Closed here, as a client ends its session.
                let _ = s.get_mut().shutdown().await;
                end
            }));
        }
        Sessions {
            locals,
            stop,
            mark,
            since_mark,
            tasks,
        }
    }

    /// Counts answers from here on apart.
    fn mark(&self) {
        self.mark.store(true, Ordering::SeqCst);
    }

    fn finished(&self) -> usize {
        self.tasks.iter().filter(|t| t.is_finished()).count()
    }

    async fn end(self) -> Vec<SessionEnd> {
        self.stop.store(true, Ordering::SeqCst);
        let mut ends = Vec::new();
        for t in self.tasks {
            ends.push(within("session ends", t).await.unwrap());
        }
        ends
    }
}

/// One GET on a kept connection: the backend that answered.
async fn keep_alive_get(s: &mut BufReader<TcpStream>) -> Result<String, String> {
    let talk = async {
        s.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = s
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                return Err("closed without a reply".to_string());
            }
            reply.extend_from_slice(&line);
            if line == b"\r\n" {
                break;
            }
        }
        let head = String::from_utf8_lossy(&reply).into_owned();
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .ok_or("no content-length")?;
        let start = reply.len();
        reply.resize(start + length, 0);
        s.read_exact(&mut reply[start..])
            .await
            .map_err(|e| format!("receive: {e}"))?;
        body_of(&reply)
    };
    tokio::time::timeout(SESSION_TIMEOUT, talk)
        .await
        .unwrap_or_else(|_| Err("no reply in time".into()))
}

/// A running `sluice ctl` whose output lines are kept as they come.
struct Running {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Running {
    fn spawn(mut cmd: tokio::process::Command) -> Running {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let kept = lines.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                kept.lock().unwrap().push(l);
            }
        });
        Running {
            child,
            lines,
            reader,
        }
    }

    fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = within("sluice ctl ends", self.child.wait()).await.unwrap();
        within("ctl output", self.reader).await.unwrap();
        let out = self.lines.lock().unwrap().join("\n");
        (status, out)
    }
}

/// `sluice ctl ARGS` on `lb` to its end: it must succeed.
async fn ctl_ok(lb: &Lb, args: &[&str]) -> String {
    let out = within("sluice ctl", lb.ctl(args).output()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ctl {args:?} on {}: {}\n{text}{}",
        lb.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Opens a session from each of `ports` (0: any) and checks that balancer
/// `i` holds every one.
async fn sessions_on(site: &Site, client: &InNs, i: usize, ports: &[u16]) -> Sessions {
    let sessions = Sessions::open(client, site.vip_addr(), ports).await;
    let held = site.lbs[i].clients().await;
    for local in &sessions.locals {
        assert!(
            held.contains(local),
            "session {local} is not on {} ({held:?})",
            site.lbs[i].name
        );
    }
    sessions
}

/// The maintenance of balancer `i` while the load runs: `ctl leave` moves
/// the address to the peer and returns once its own sessions have ended;
/// then a restart (the patch), still out of the pair, and `ctl join`,
/// after which it waits as backup. Its sessions come from `ports` (0:
/// any). Returns when the leave was asked for.
async fn leave_patch_join(
    site: &mut Site,
    client: &InNs,
    load: &Load,
    i: usize,
    ports: &[u16],
) -> Instant {
    let peer = 1 - i;
    let (me, other) = (site.lbs[i].name, site.lbs[peer].name);
    let sessions = sessions_on(site, client, i, ports).await;

    let asked = Instant::now();
    let mut leave = Running::spawn(site.lbs[i].ctl(&["leave", "--wait", "30s"]));
    let moved = site.wait_holder(peer).await;
    let (status, h) = site.lbs[i].admin("GET", "/healthz").await;
    assert_eq!(
        (status, h["status"].as_str()),
        (503, Some("leaving")),
        "{h}"
    );
    site.lbs[i].entered("FAULT");
    let status = ctl_ok(&site.lbs[i], &["status"]).await;
    assert!(status.contains("leaving its pair"), "{status}");

    // New clients reach the peer, and the leaving host takes no more.
    sessions.mark();
    let peer_before = site.lbs[peer].stat("accepted").await;
    wait_for(&format!("clients reach {other}"), || async {
        site.lbs[peer].stat("accepted").await >= peer_before + 20
    })
    .await;
    let mine = site.lbs[i].stat("accepted").await;
    load.wait_after(Instant::now(), 100).await;
    assert_eq!(
        site.lbs[i].stat("accepted").await,
        mine,
        "{me} still takes new clients after the address moved"
    );

    // The sessions on the leaving host go on through the peer: ten
    // answers a session on average, at least five each (checked below).
    let want = 10 * sessions.locals.len();
    wait_for("the sessions answered after the move", || async {
        sessions.finished() > 0 || sessions.since_mark.load(Ordering::SeqCst) >= want
    })
    .await;
    let held = site.lbs[i].clients().await;
    for local in &sessions.locals {
        assert!(held.contains(local), "{me} lost session {local}");
    }
    assert!(
        !leave.has_exited(),
        "ctl leave returned while sessions were open:\n{}",
        leave.output()
    );
    let ends = sessions.end().await;
    let closed = Instant::now();
    for end in &ends {
        assert!(
            end.failed.is_none() && end.answered_after_mark >= 5,
            "a session on {me} did not run on after the move: {end:?}"
        );
    }
    let (status, out) = leave.finish().await;
    assert_eq!(status.code(), Some(0), "ctl leave on {me}:\n{out}");
    assert!(out.contains("left after"), "{out}");
    let returned = Instant::now();
    let (_, h) = site.lbs[i].admin("GET", "/healthz").await;
    assert_eq!(h["active_connections"], 0, "{h}");

    // The patch: sluice restarts and still stays out of the pair.
    site.lbs[i].restart_sluice();
    let (status, h) = site.lbs[i].admin("GET", "/healthz").await;
    assert_eq!(
        (status, h["status"].as_str()),
        (503, Some("leaving")),
        "a restart forgot the leave: {h}"
    );
    assert_eq!(site.holders().await, vec![peer]);

    // Back in the pair: it waits as backup and leaves the peer its clients.
    ctl_ok(&site.lbs[i], &["join"]).await;
    let (status, h) = site.lbs[i].admin("GET", "/healthz").await;
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")), "{h}");
    site.lbs[i].entered("BACKUP");
    assert_eq!(
        site.holders().await,
        vec![peer],
        "{me} took the address back when it joined"
    );
    let answered: usize = ends.iter().map(|e| e.answered).sum();
    note(&format!(
        "keepalived: {me} left: the address moved to {other} {:.1}s after ctl leave; its {} sessions ran on ({answered} requests) and ctl leave returned {:.2}s after the last closed",
        (moved - asked).as_secs_f64(),
        ends.len(),
        returned.duration_since(closed).as_secs_f64()
    ));
    asked
}

/// Whether `lb` keeps a TIME_WAIT socket of its client on `port`.
async fn time_wait(site: &Site, lb: usize, port: u16) -> bool {
    let src = format!("{}:80", site.vip);
    let dst = format!("{}{CLIENT}:{port}", site.net);
    let out = output(
        "ip",
        &[
            "netns",
            "exec",
            &site.lbs[lb].ns,
            "ss",
            "-Htn",
            "state",
            "time-wait",
            "src",
            &src,
            "dst",
            &dst,
        ],
    )
    .await
    .unwrap();
    !out.trim().is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_balancer_in_turn_leaves_for_its_patch_and_no_client_is_dropped() {
    if !keepalived_available() {
        return;
    }
    let mut site = Site::start().await;
    let client = site.client.clone();
    let first = site.holders().await[0];
    let load = Load::start(&client, site.vip_addr(), 4);
    load.wait_after(Instant::now(), 50).await;

    let asked = leave_patch_join(&mut site, &client, &load, first, &[0; 4]).await;
    // Two of the second round's sessions come from client ports whose
    // last connections the first host served and closed: it still holds
    // their TIME_WAIT when it takes the address over, and must pass their
    // packets on all the same.
    let mut ports = load.ports_served_before(asked, 2);
    for &port in &ports {
        assert!(
            time_wait(&site, first, port).await,
            "{} keeps no TIME_WAIT of port {port}: the reused ports test nothing",
            site.lbs[first].name
        );
    }
    ports.extend([0, 0]);
    leave_patch_join(&mut site, &client, &load, 1 - first, &ports).await;

    let samples = load.stop().await;
    let failed = failures(samples.iter());
    assert!(
        failed.is_empty(),
        "{} of {} client connections failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    note(&format!(
        "keepalived: both balancers left and joined in turn under {} client connections, none failed",
        samples.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_sluice_loses_the_address_within_seconds_and_new_clients_are_served() {
    if !keepalived_available() {
        return;
    }
    // With an admin token, so the check passes only with the read token it
    // sends from sluice-check.header.
    let mut site = Site::start_with(Some("admin-token")).await;
    let bare = output(
        "ip",
        &[
            "netns",
            "exec",
            &site.lbs[0].ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:9000/healthz",
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        bare, "401",
        "/healthz asks no token: the header was not tested"
    );
    let client = site.client.clone();
    let active = site.holders().await[0];
    let peer = 1 - active;
    let load = Load::start(&client, site.vip_addr(), 4);
    load.wait_after(Instant::now(), 50).await;
    let sessions = sessions_on(&site, &client, active, &[0; 4]).await;

    let killed = Instant::now();
    site.lbs[active].sluice.child.kill().unwrap();
    let sluice = &mut site.lbs[active].sluice.child;
    tokio::task::block_in_place(|| sluice.wait()).unwrap();
    let moved = site.wait_holder(peer).await;
    let served = load.wait_served_after(killed).await;
    load.wait_after(served, 200).await;
    let ends = sessions.end().await;
    let samples = load.stop().await;

    // Every client that came after the first one served was served.
    let after: Vec<&Sample> = samples.iter().filter(|s| s.issued >= served).collect();
    let failed = failures(after.iter().copied());
    assert!(
        failed.is_empty(),
        "{} of {} clients after the failover failed: {:?}",
        failed.len(),
        after.len(),
        &failed[..failed.len().min(5)]
    );
    let took = moved - killed;
    assert!(
        took < Duration::from_secs(6),
        "the address moved only {took:?} after sluice was killed"
    );
    // Negative control: the killed sluice's sessions are lost, and the
    // clients that came before the address moved were refused; the
    // harness sees both.
    let lost = ends.iter().filter(|e| e.failed.is_some()).count();
    assert_eq!(
        lost,
        ends.len(),
        "sessions survived a killed sluice: {ends:?}"
    );
    let refused = failures(
        samples
            .iter()
            .filter(|s| s.issued >= killed && s.issued < served),
    );
    assert!(!refused.is_empty(), "no client met the dead sluice");
    note(&format!(
        "keepalived: failover after SIGKILL of the active sluice: address moved in {:.1}s, first new client served after {:.1}s; {} clients refused meanwhile, {lost} sessions lost, {} clients after it all served",
        took.as_secs_f64(),
        (served - killed).as_secs_f64(),
        refused.len(),
        after.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_balancer_host_that_goes_dark_loses_its_sessions_and_they_are_reset() {
    if !keepalived_available() {
        return;
    }
    let site = Site::start().await;
    let client = site.client.clone();
    let active = site.holders().await[0];
    let peer = 1 - active;
    let load = Load::start(&client, site.vip_addr(), 4);
    load.wait_after(Instant::now(), 50).await;
    let sessions = sessions_on(&site, &client, active, &[0; 4]).await;

    // Its link goes down on its own side, as when the host loses power.
    let dark = Instant::now();
    ip(&["-n", &site.lbs[active].ns, "link", "set", "eth0", "down"]);
    let moved = site.wait_holder(peer).await;
    wait_for("every session on the dark host failed", || async {
        sessions.finished() == sessions.locals.len()
    })
    .await;
    let served = load.wait_served_after(moved).await;
    load.wait_after(served, 200).await;
    let ends = sessions.end().await;
    let samples = load.stop().await;

    let after: Vec<&Sample> = samples.iter().filter(|s| s.issued >= served).collect();
    let failed = failures(after.iter().copied());
    assert!(
        failed.is_empty(),
        "{} of {} clients after the failover failed: {:?}",
        failed.len(),
        after.len(),
        &failed[..failed.len().min(5)]
    );
    // Negative control: with no leave, the dark host's sessions are lost,
    // and the harness sees it. The peer resets them once it stops hearing
    // from the dark host, instead of passing their packets into the void,
    // so they end within seconds, not at a timeout.
    for end in &ends {
        let (why, when) = end.failed.as_ref().expect("a session outlived its host");
        assert!(
            !why.contains("in time"),
            "a session was left hanging instead of reset: {why}"
        );
        assert!(
            *when - dark < Duration::from_secs(15),
            "a session ended only {:?} after its host went dark",
            *when - dark
        );
    }
    let slowest = ends
        .iter()
        .filter_map(|e| e.failed.as_ref().map(|(_, t)| *t - dark))
        .max()
        .unwrap();
    note(&format!(
        "keepalived: a balancer host gone dark: address moved in {:.1}s, first new client served after {:.1}s, its {} sessions reset within {:.1}s",
        (moved - dark).as_secs_f64(),
        (served - dark).as_secs_f64(),
        ends.len(),
        slowest.as_secs_f64()
    ));
}

#[test]
fn keepalived_accepts_the_deploy_files_and_the_check_refuses_a_broken_one() {
    if !keepalived_available() {
        return;
    }
    netns::sweep_dead();
    // keepalived -t checks the interfaces it is given, so an eth0 is there.
    let ns = Ns::new(format!("sluice-t-{}-kcheck", std::process::id()));
    ip(&[
        "-n", &ns.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let peer: Ipv4Addr = "10.214.255.12".parse().unwrap();
    let check = dir.path().join("sluice-check");
    fs::write(
        &check,
        render("sluice-check", "10.214.255.", peer, dir.path()),
    )
    .unwrap();
    fs::set_permissions(&check, fs::Permissions::from_mode(0o755)).unwrap();
    let conf = render("keepalived.conf", "10.214.255.", peer, dir.path());
    let good = dir.path().join("good.conf");
    fs::write(&good, &conf).unwrap();
    config_test(&ns.0, &good).unwrap();

    // Negative control: a file with an error does not pass.
    let bad = dir.path().join("bad.conf");
    fs::write(
        &bad,
        conf.replace("virtual_router_id 51", "virtual_router_id 256"),
    )
    .unwrap();
    let err = config_test(&ns.0, &bad).unwrap_err();
    assert!(err.contains("256"), "{err}");

    // The rules parse as written (nft -c loads nothing).
    let nft = dir.path().join("sluice-vip.nft");
    fs::write(
        &nft,
        render("sluice-vip.nft", "10.214.255.", peer, dir.path()),
    )
    .unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-c", "-f"])
        .arg(&nft)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_nft_rules_a_leave_resets_the_sessions_of_the_leaving_host() {
    if !keepalived_available() {
        return;
    }
    // Negative control of the leave: keepalived alone moves the address,
    // and the peer, which knows none of the leaving host's connections,
    // resets them. sluice-vip.nft is what lets them run on.
    let site = Site::start().await;
    for lb in &site.lbs {
        ip(&[
            "netns",
            "exec",
            &lb.ns,
            "nft",
            "delete",
            "table",
            "ip",
            "sluice_vip",
        ]);
    }
    let client = site.client.clone();
    let active = site.holders().await[0];
    let sessions = sessions_on(&site, &client, active, &[0; 4]).await;
    let asked = Instant::now();
    // Not awaited: the leaving sluice still counts the reset sessions until
    // TCP keepalive gives up on them.
    let _leave = Running::spawn(site.lbs[active].ctl(&["leave"]));
    site.wait_holder(1 - active).await;
    wait_for("every session of the leaving host failed", || async {
        sessions.finished() == sessions.locals.len()
    })
    .await;
    let ends = sessions.end().await;
    for end in &ends {
        let (why, _) = end.failed.as_ref().unwrap();
        assert!(why.contains("reset"), "{why}");
    }
    let slowest = ends
        .iter()
        .filter_map(|e| e.failed.as_ref().map(|(_, t)| *t - asked))
        .max()
        .unwrap();
    note(&format!(
        "keepalived: without sluice-vip.nft a leave reset all {} sessions of the leaving host, the last {:.1}s after ctl leave",
        ends.len(),
        slowest.as_secs_f64()
    ));
}
