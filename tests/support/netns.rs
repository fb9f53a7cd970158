//! Network namespaces for fault tests: one namespace per test, joined to
//! the host by a veth pair on its own /30 of 10.213.0.0/16, so that a test
//! can take a backend's link down or make it lossy without touching any
//! other traffic. Everything made here is removed on drop, also when the
//! test fails.

use std::collections::HashSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{BIN, Proc, addr_after};

/// The test range. An unreachable route for all of it keeps an address
/// of a test whose veth is gone from leaving by the default route.
const RANGE: &str = "10.213.0.0/16";

/// /30s in [`RANGE`].
const SLOTS: usize = 1 << 14;

/// Namespaces this process made so far (names and slots come from it).
static MADE: AtomicUsize = AtomicUsize::new(0);

/// Users of each test range in this process: the last one to drop
/// removes the range's unreachable route.
static USERS: Mutex<Vec<(&str, usize)>> = Mutex::new(Vec::new());

/// Runs a command; its stdout, or its stderr as the error.
pub fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .output()
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

fn must(prog: &str, args: &[&str]) -> String {
    run(prog, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Says `line` once per process, on stderr past the test harness's
/// capture, so that it shows in a passing run.
pub fn note(line: &str) {
    static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.get_or_insert_default().insert(line.to_string()) {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

/// Says once that something was skipped and why.
pub fn skip(why: &str) {
    note(&format!("skipped: {why}"));
}

/// Whether network namespaces can be made here. CI runs as root, so there
/// their absence fails the test; elsewhere it is said once and skipped.
pub fn available() -> bool {
    static WHY_NOT: OnceLock<Option<String>> = OnceLock::new();
    let why_not = WHY_NOT.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            Some("network namespaces need root (sudo cargo test --test netns)".into())
        } else {
            // Making one is the only sure test (a container may forbid it).
            let probe = format!("sluice-t-{}-probe", std::process::id());
            let made = run("ip", &["netns", "add", &probe]);
            let _ = run("ip", &["netns", "del", &probe]);
            made.err()
                .map(|e| format!("network namespaces need a working `ip netns` (iproute2): {e}"))
        }
    });
    match why_not {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => panic!("{why}; CI must run these"),
        Some(why) => {
            skip(why);
            false
        }
    }
}

/// Removes namespaces left by test processes that died without dropping
/// them (a SIGKILLed run), and ends the processes that run on in them
/// (servers, keepalived), which would keep them alive; their veths and
/// routes go with them. Every namespace a test makes is named
/// `sluice-t-PID-...` after the test process.
pub fn sweep_dead() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let list = run("ip", &["netns", "list"]).unwrap_or_default();
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = name
                .strip_prefix("sluice-t-")
                .and_then(|r| r.split('-').next())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                kill_inside(name);
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    });
}

/// SIGKILLs every process in namespace `ns`, by pid.
pub fn kill_inside(ns: &str) {
    let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill has no memory preconditions; a pid gone meanwhile
        // only makes it fail.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// How packets leaving a namespace are lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impairment {
    /// The netem qdisc: loss and delay.
    Netem,
    /// An nftables egress rule: loss only, for kernels built without netem.
    Nftables,
}

/// A namespace joined to the host by a veth pair on its own /30.
pub struct Net {
    pub ns: String,
    pub host_if: String,
    pub ns_if: String,
    /// The host's end: what the namespace sees sluice come from.
    pub host_ip: Ipv4Addr,
    /// The namespace's end, where its backends listen.
    pub ns_ip: Ipv4Addr,
}

impl Net {
    /// Makes a namespace and its link; call only when [`available`].
    pub fn new() -> Net {
        sweep_dead();
        let pid = std::process::id() as usize;
        let (n, slot) = loop {
            let n = MADE.fetch_add(1, Ordering::SeqCst);
            assert!(n < 64, "too many namespaces in one test process");
            // Apart from other test processes by pid, from this one's
            // other tests by n; a slot some other process holds is passed.
            let slot = ((pid % 2048) * 8 + n) % SLOTS;
            let net = Self::slot_net(slot);
            let used = run(
                "ip",
                &["-4", "-o", "addr", "show", "to", &format!("{net}/30")],
            )
            .map(|s| !s.trim().is_empty())
            .unwrap_or(true);
            if !used {
                break (n, slot);
            }
        };
        let base = u32::from(Self::slot_net(slot));
        let net = Net {
            ns: format!("sluice-t-{pid}-{n}"),
            host_if: format!("slt{pid}h{n}"),
            ns_if: format!("slt{pid}n{n}"),
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
        };
        // From here on, drop undoes whatever was made, also on a panic.
        hold_range(RANGE);
        must("ip", &["netns", "add", &net.ns]);
        must(
            "ip",
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &net.ns_if,
                "netns",
                &net.ns,
            ],
        );
        let host_cidr = format!("{}/30", net.host_ip);
        let ns_cidr = format!("{}/30", net.ns_ip);
        must("ip", &["addr", "add", &host_cidr, "dev", &net.host_if]);
        must("ip", &["link", "set", &net.host_if, "up"]);
        net.ip(&["addr", "add", &ns_cidr, "dev", &net.ns_if]);
        net.ip(&["link", "set", &net.ns_if, "up"]);
        net.ip(&["link", "set", "lo", "up"]);
        net
    }

    fn slot_net(slot: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, (slot / 64) as u8, ((slot % 64) * 4) as u8)
    }

    /// `args` run inside the namespace.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["netns", "exec", &self.ns, prog];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip ARGS` inside the namespace, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        self.exec("ip", args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `sluice web` inside the namespace on an ephemeral port;
    /// returns the process (killed on drop) and where it listens.
    pub fn web(&self, name: &str) -> (Proc, SocketAddr) {
        web_in(&self.ns, self.ns_ip, name)
    }

    /// Takes the namespace's end of the link down: what is sent to it from
    /// the host is dropped without an answer, as by a pulled cable.
    pub fn blackhole(&self) {
        self.ip(&["link", "set", &self.ns_if, "down"]);
    }

    /// Loses `loss` percent of the packets leaving the namespace and, with
    /// netem, delays them by `delay_ms`; replaces any earlier impairment.
    /// Falls back to nftables (loss only) where the kernel has no netem.
    pub fn impair(&self, loss: u32, delay_ms: u32) -> Result<Impairment, String> {
        let loss_arg = format!("{loss}%");
        let delay_arg = format!("{delay_ms}ms");
        let netem = self.exec(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                &self.ns_if,
                "root",
                "netem",
                "loss",
                &loss_arg,
                "delay",
                &delay_arg,
            ],
        );
        let netem_err = match netem {
            Ok(_) => return Ok(Impairment::Netem),
            Err(e) => e,
        };
        let _ = self.exec("nft", &["delete", "table", "netdev", "sluice_loss"]);
        let rule = if loss >= 100 {
            "counter drop".to_string()
        } else {
            format!("numgen random mod 100 < {loss} counter drop")
        };
        let script = format!(
            "table netdev sluice_loss {{\n chain egress {{\n  type filter hook egress device \"{}\" priority 0; policy accept;\n  {rule}\n }}\n}}\n",
            self.ns_if
        );
        let file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        std::fs::write(file.path(), script).map_err(|e| e.to_string())?;
        match self.exec("nft", &["-f", &file.path().to_string_lossy()]) {
            Ok(_) => Ok(Impairment::Nftables),
            Err(nft_err) => Err(format!(
                "no way to lose packets here: netem: {netem_err}; nftables: {nft_err}"
            )),
        }
    }

    /// Packets that the impairment dropped so far.
    pub fn dropped(&self, how: Impairment) -> u64 {
        let (text, key) = match how {
            Impairment::Netem => (
                self.exec("tc", &["-s", "qdisc", "show", "dev", &self.ns_if]),
                "dropped ",
            ),
            Impairment::Nftables => (
                self.exec("nft", &["list", "table", "netdev", "sluice_loss"]),
                "packets ",
            ),
        };
        let text = text.unwrap_or_else(|e| panic!("{e}"));
        text.find(key)
            .and_then(|i| {
                text[i + key.len()..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no `{key}` count in:\n{text}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Processes still inside would keep the namespace and its veth
        // alive; tests drop their backends before their Net.
        let _ = run("ip", &["netns", "del", &self.ns]);
        // The pair usually went with the namespace; this makes it certain
        // now, and the /30's route with it.
        let _ = run("ip", &["link", "del", &self.host_if]);
        release_range(RANGE);
    }
}

/// Starts `sluice web` in namespace `ns` on `ip` and an ephemeral port;
/// returns the process (killed on drop) and where it listens.
pub fn web_in(ns: &str, ip: Ipv4Addr, name: &str) -> (Proc, SocketAddr) {
    let listen = format!("{ip}:0");
    let mut p = Proc::spawn_command(Command::new("ip").args([
        "netns", "exec", ns, BIN, "web", "--listen", &listen, "--name", name,
    ]));
    let addr = addr_after(&p.wait_line("listening on"), "listening on ");
    (p, addr)
}

/// Routes `range` nowhere on the host (an unreachable route) while this
/// process uses it, so that a test's address can never leave by the
/// default route; pair each call with [`release_range`].
pub fn hold_range(range: &'static str) {
    let mut users = USERS.lock().unwrap_or_else(|e| e.into_inner());
    let n = match users.iter_mut().find(|(r, _)| *r == range) {
        Some((_, n)) => n,
        None => {
            users.push((range, 0));
            &mut users.last_mut().unwrap().1
        }
    };
    *n += 1;
    if *n == 1
        && let Err(e) = run("ip", &["route", "add", "unreachable", range])
        && !e.contains("File exists")
    {
        panic!("{e}");
    }
}

/// Ends one use of `range`; the last removes its unreachable route.
pub fn release_range(range: &'static str) {
    let mut users = USERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, n)) = users.iter_mut().find(|(r, _)| *r == range) {
        *n -= 1;
        if *n == 0 {
            let _ = run("ip", &["route", "del", "unreachable", range]);
        }
    }
}
