//! Configuration in two stages: [`FileConfig`] mirrors the TOML file and
//! refuses unknown fields; [`Config::parse`] turns it into the validated
//! runtime [`Config`]. Every error names the file, the line and the field.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration problem, located in its file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// Dotted path of the field, such as `backend[1].address`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The validated configuration sluice runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub admin: AdminConfig,
    pub services: Vec<ServiceConfig>,
    pub backends: Vec<BackendConfig>,
    /// Global cap on proxied connections; over it clients are closed at once.
    pub max_connections: usize,
    pub connect_timeout: Duration,
    /// A connection with no byte in either direction for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// How long live connections may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// Where backend admin states are kept across restarts.
    pub state_file: Option<PathBuf>,
    pub health: HealthConfig,
    /// Whether bulk flows move by splice(2) instead of copying (Linux).
    pub zero_copy: bool,
    /// Threads that serve connections.
    pub workers: usize,
    pub runtime: RuntimeLayout,
    /// `[cluster]`: the admin state shared through etcd by every instance.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: several sluice instances that share one admin state in
/// etcd, so a drain sent to any of them drains the backend on all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client URLs, such as `http://10.0.0.5:2379`.
    pub etcd: Vec<String>,
    /// The cluster's name: its keys live under `/sluice/{name}/`.
    pub name: String,
    /// This instance's name among them; the host name by default.
    pub instance: String,
    /// How long a dead instance's connection counts stay counted: the
    /// TTL of the lease they are published under.
    pub lease: Duration,
}

/// How the worker threads are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeLayout {
    /// One single-threaded runtime per worker, each with its own
    /// `SO_REUSEPORT` listener per service: no task moves between threads.
    PerCore,
    /// One work-stealing tokio runtime with `workers` threads.
    MultiThread,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
    /// Time an admin client has to send a request's head and body.
    pub request_timeout: Duration,
    /// Admin connections open at once; more are closed at once, so the
    /// admin plane can never take the data plane's descriptors.
    pub max_connections: usize,
    /// A second token that may read (GET) but never change anything.
    pub read_token: Option<String>,
    /// Host names, besides loopback names and the listen address, that
    /// requests may name in `Host` (a defence against DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// A unix socket that serves the API too; its file permissions are its
    /// access control.
    pub socket: Option<AdminSocket>,
    /// Whether `GET /metrics` is served without the token, for scrapers
    /// that cannot send one.
    pub open_metrics: bool,
    /// Whether `GET /healthz` is served without the token, for health
    /// checks that cannot send one.
    pub open_healthz: bool,
}

/// `[admin] socket` and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSocket {
    pub path: PathBuf,
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Group that owns the socket file; the running user's when `None`.
    pub group: Option<String>,
}

/// Admin connections at once when the file says nothing.
pub const ADMIN_MAX_CONNECTIONS: usize = 32;

/// Whether `t` can be a bearer token: what an HTTP header value carries
/// as text, visible ASCII without spaces.
pub fn valid_token(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic())
}

const TOKEN_RULE: &str = "a token must be 1 or more visible ASCII characters (letters, digits, punctuation; no spaces or accents), as an HTTP header carries them";

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Port used for backends whose address has no port.
    pub backend_port: u16,
    /// Names of the backends this service spreads clients over.
    pub backends: Vec<String>,
    /// How a backend is chosen for a new client.
    pub balance: Balance,
    /// Whether clients come through a balancer that sends a PROXY
    /// protocol header first, whose source address then stands for the
    /// client's.
    pub accept_proxy: bool,
    /// With `accept_proxy`: the time a client has to send the header.
    pub proxy_header_timeout: Duration,
}

/// `balance`: how a service chooses a backend for a new client. Every mode
/// yields a fallback order, skips backends that take no new connections,
/// and puts backups after every primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Smooth weighted round-robin (the default).
    #[default]
    RoundRobin,
    /// The fewest live connections relative to weight.
    LeastConnections,
    /// The same client (or client network) to the same backend while it
    /// is in rotation, by consistent hashing.
    SourceHash(Affinity),
}

/// `affinity`: what of a client's address `source-hash` keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// The whole address (NLB "Single").
    ClientIp,
    /// The client's /24 (IPv4) or /48 (IPv6) (NLB "Network").
    Network,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
            Balance::SourceHash(_) => "source-hash",
        }
    }

    /// The affinity of `source-hash`; `None` for the other modes.
    pub fn affinity(self) -> Option<Affinity> {
        match self {
            Balance::SourceHash(a) => Some(a),
            _ => None,
        }
    }
}

impl Affinity {
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::ClientIp => "client-ip",
            Affinity::Network => "network",
        }
    }
}

/// Most backends a service may list: a source-hash walk (`pool.rs`)
/// marks the members it has passed in a bitset of this many bits on the
/// stack, so it allocates nothing.
pub const MAX_MEMBERS: usize = 1024;

/// The time a client has to send its PROXY header when the file says
/// nothing.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A version of the PROXY protocol, which tells a backend the client's
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...`).
    V1,
    /// The binary header.
    V2,
}

impl ProxyVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub address: BackendAddress,
    pub weight: u32,
    /// Per-backend health check; `None` when checks are off for it.
    pub health: Option<HealthCheck>,
    /// How long its weight ramps up after it comes back (start, or health
    /// up): its own `slow_start`, else `[health] slow_start`.
    pub slow_start: Option<Duration>,
    /// Live connections it takes at most; `None` for no limit.
    pub max_connections: Option<usize>,
    /// Takes clients only when no primary of the service can.
    pub backup: bool,
    /// The PROXY header sent ahead of every client's stream (and of every
    /// health check), if the backend expects one.
    pub send_proxy: Option<ProxyVersion>,
}

/// A backend's address: an IP literal or a host name resolved at connect
/// time, with a port or without one (then the service's `backend_port`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddress {
    Ip(IpAddr, Option<u16>),
    Host(String, Option<u16>),
}

impl BackendAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("address is empty".into());
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!("`{s}` has port 0; give the backend's real port"));
            }
            return Ok(Self::Ip(sa.ip(), Some(sa.port())));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            if ip.is_ipv6() {
                // `::1:80` could be an address or an address and a port.
                return Err(format!(
                    "write IPv6 addresses in brackets: `[{s}]` or `[{s}]:PORT`"
                ));
            }
            return Ok(Self::Ip(ip, None));
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return inner
                .parse::<std::net::Ipv6Addr>()
                .map(|ip| Self::Ip(IpAddr::V6(ip), None))
                .map_err(|_| format!("`{s}` is not an IPv6 address"));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("`{p}` in `{s}` is not a port (1-65535)"))?;
                (h, Some(port))
            }
            None => (s, None),
        };
        if !is_host_name(host) {
            return Err(format!(
                "`{s}` is not `host:port` or `host` (a host is an IP address or a DNS name)"
            ));
        }
        Ok(Self::Host(host.to_string(), port))
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Ip(_, p) | Self::Host(_, p) => *p,
        }
    }
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip, Some(p)) => write!(f, "{}", SocketAddr::new(*ip, *p)),
            Self::Ip(IpAddr::V6(ip), None) => write!(f, "[{ip}]"),
            Self::Ip(ip, None) => write!(f, "{ip}"),
            Self::Host(h, Some(p)) => write!(f, "{h}:{p}"),
            Self::Host(h, None) => write!(f, "{h}"),
        }
    }
}

fn is_host_name(h: &str) -> bool {
    // An all-digit last label is a mistyped IP address, not a name.
    let numeric_tld = h
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    !numeric_tld
        && !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Health-check defaults shared by every backend.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
    /// Every backend's `slow_start` unless it sets its own.
    pub slow_start: Option<Duration>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            slow_start: None,
        }
    }
}

/// What a health check does against one backend.
#[derive(Debug, Clone, PartialEq)]
pub enum HealthCheck {
    /// A TCP connect to the backend's port.
    Tcp { port: Option<u16> },
    /// `GET path` over HTTP/1.1, expecting `status`.
    Http {
        port: Option<u16>,
        path: String,
        status: u16,
    },
}

/// Parses `1500ms`, `30s`, `5m`, `1h` (a whole number and a unit).
///
/// ```
/// use std::time::Duration;
/// use sluice::config::parse_duration;
///
/// assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
/// assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
/// assert!(parse_duration("5 minutes").is_err());
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("`{s}` is not a duration such as 1500ms, 30s, 5m or 1h");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if d > MAX_DURATION {
        return Err(format!("`{s}` is too long: at most 8760h (a year)"));
    }
    Ok(d)
}

/// The longest duration anything takes: a year.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

// ---- stage one: the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    admin: Option<FileAdmin>,
    #[serde(default)]
    service: Vec<FileService>,
    #[serde(default)]
    backend: Vec<FileBackend>,
    max_connections: Option<Spanned<i64>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    state_file: Option<String>,
    zero_copy: Option<bool>,
    workers: Option<Spanned<i64>>,
    runtime: Option<Spanned<String>>,
    health: Option<FileHealth>,
    cluster: Option<FileCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    etcd: Spanned<Vec<Spanned<String>>>,
    name: Spanned<String>,
    instance: Option<Spanned<String>>,
    lease: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    read_token: Option<Spanned<String>>,
    allowed_hosts: Option<Vec<Spanned<String>>>,
    socket: Option<Spanned<String>>,
    socket_mode: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    open_metrics: Option<Spanned<toml::Value>>,
    open_healthz: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: Spanned<String>,
    listen: Spanned<String>,
    backend_port: Option<Spanned<i64>>,
    backends: Option<Spanned<Vec<Spanned<String>>>>,
    balance: Option<Spanned<String>>,
    affinity: Option<Spanned<String>>,
    accept_proxy: Option<Spanned<toml::Value>>,
    proxy_header_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    name: Spanned<String>,
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
    health_check: Option<Spanned<String>>,
    health_path: Option<Spanned<String>>,
    health_status: Option<Spanned<i64>>,
    health_port: Option<Spanned<i64>>,
    slow_start: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    backup: Option<Spanned<toml::Value>>,
    send_proxy: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    slow_start: Option<Spanned<String>>,
}

// ---- stage two: validation ----

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: std::ops::Range<usize>, field: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: Some(line_of(self.text, span.start)),
            field: Some(field.to_string()),
            message,
        }
    }

    fn whole(&self, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: None,
            field: None,
            message,
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        v.as_ref()
            .map(|s| parse_duration(s.get_ref()).map_err(|m| self.err(s.span(), field, m)))
            .transpose()
    }

    /// A switch; read as any value, so that a wrong one is refused naming
    /// its whole field.
    fn flag(
        &self,
        v: &Option<Spanned<toml::Value>>,
        field: &str,
    ) -> Result<Option<bool>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) => match s.get_ref() {
                toml::Value::Boolean(b) => Ok(Some(*b)),
                other => Err(self.err(
                    s.span(),
                    field,
                    format!("must be true or false, not {other}"),
                )),
            },
        }
    }

    fn int(
        &self,
        v: &Option<Spanned<i64>>,
        field: &str,
        min: i64,
        max: i64,
    ) -> Result<Option<i64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) if (min..=max).contains(s.get_ref()) => Ok(Some(*s.get_ref())),
            Some(s) => Err(self.err(
                s.span(),
                field,
                format!("{} is out of range ({min} to {max})", s.get_ref()),
            )),
        }
    }
}

/// Whether two listening addresses would fight over one port, as
/// `net::listen` binds them. `[::]` is dual-stack there, so it holds the
/// port on every address of both families; `0.0.0.0` holds it on every
/// IPv4 address, v4-mapped IPv6 ones included; any other address holds
/// only itself, a v4-mapped one being its IPv4 address.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let dual_stack = |ip: IpAddr| ip.is_ipv6() && ip.is_unspecified();
    if dual_stack(a.ip()) || dual_stack(b.ip()) {
        return true;
    }
    match (a.ip().to_canonical(), b.ip().to_canonical()) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (x, y) => x == y,
    }
}

/// The keys of the file's top level, which a `[table]` above them would
/// swallow.
const TOP_LEVEL_KEYS: &[&str] = &[
    "max_connections",
    "connect_timeout",
    "idle_timeout",
    "shutdown_grace",
    "state_file",
    "zero_copy",
    "workers",
    "runtime",
];

/// The keys whose value is a duration.
const DURATION_KEYS: &[&str] = &[
    "connect_timeout",
    "idle_timeout",
    "shutdown_grace",
    "request_timeout",
    "interval",
    "timeout",
    "lease",
    "slow_start",
    "proxy_header_timeout",
];

/// The table a line of the file belongs to: `[name]`, or the `index`th
/// `[[name]]`.
#[derive(Debug, PartialEq)]
struct Table {
    name: String,
    index: Option<usize>,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(_) => write!(f, "[[{}]]", self.name),
            None => write!(f, "[{}]", self.name),
        }
    }
}

/// The table that holds `offset`: the last header above it, if any.
fn table_at(text: &str, offset: usize) -> Option<Table> {
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    let mut last = None;
    for line in text[..offset.min(text.len())].lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let n = counts.entry(name.trim().to_string()).or_default();
            last = Some(Table {
                name: name.trim().to_string(),
                index: Some(*n),
            });
            *n += 1;
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            last = Some(Table {
                name: name.trim().to_string(),
                index: None,
            });
        }
    }
    last
}

/// The TOML parser's error turned into one that says what to do: the
/// field's full path, a top-level key caught under a table, and types
/// named as a person writes them (not `i64`).
fn teach(key: Option<String>, table: Option<Table>, message: &str) -> (Option<String>, String) {
    let path = |k: &str| match &table {
        None => k.to_string(),
        Some(Table {
            name,
            index: Some(i),
        }) => format!("{name}[{i}].{k}"),
        Some(Table { name, index: None }) => format!("{name}.{k}"),
    };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((name, _)) = rest.split_once('`')
        && TOP_LEVEL_KEYS.contains(&name)
        && let Some(t) = &table
    {
        return (
            Some(name.to_string()),
            format!(
                "`{name}` is a top-level key, but here it belongs to {t} above it: move it above the first [table] of the file"
            ),
        );
    }
    let field = key.as_deref().map(path);
    let Some((got, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    else {
        return (field, message.to_string());
    };
    let duration = key.as_deref().is_some_and(|k| DURATION_KEYS.contains(&k));
    let expected = match expected {
        "i64" => "a whole number, such as 3".to_string(),
        "a string" if duration => "a duration in quotes, such as \"3s\" or \"1500ms\"".to_string(),
        "a string" => "text in quotes".to_string(),
        "a boolean" => "true or false".to_string(),
        "a sequence" => "a list, such as [\"web1\", \"web2\"]".to_string(),
        other => other.to_string(),
    };
    let got = if let Some(v) = got.strip_prefix("string ") {
        format!("the text {v}")
    } else if let Some(v) = got
        .strip_prefix("integer ")
        .or_else(|| got.strip_prefix("floating point "))
    {
        format!("the number {}", v.trim_matches('`'))
    } else if let Some(v) = got.strip_prefix("boolean ") {
        v.trim_matches('`').to_string()
    } else {
        got.to_string()
    };
    (field, format!("expected {expected}, not {got}"))
}

/// The key of the `key = value` line holding `offset`, if there is one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    .then(|| key.to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn socket_addr(ctx: &Ctx, v: &Spanned<String>, field: &str) -> Result<SocketAddr, ConfigError> {
    v.get_ref().trim().parse::<SocketAddr>().map_err(|_| {
        ctx.err(
            v.span(),
            field,
            format!(
                "`{}` is not an IP:port address such as 127.0.0.1:8080",
                v.get_ref()
            ),
        )
    })
}

impl Config {
    /// Reads and validates a configuration file. When the file sets no
    /// `[admin] token`, a non-empty `SLUICE_TOKEN` in the environment is
    /// used instead, so a container can take it from its environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            field: None,
            message: format!("cannot read the file: {e}"),
        })?;
        let env_token = std::env::var("SLUICE_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        Self::parse_with_token(&file, &text, env_token)
    }

    /// Validates configuration text; `file` names it in errors.
    ///
    /// ```
    /// let text = "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
    ///             [[backend]]\nname = \"web1\"\naddress = \"10.0.0.11\"\n";
    /// let c = sluice::Config::parse("sluice.toml", text).unwrap();
    /// assert_eq!(c.services[0].backend_port, 8080);
    ///
    /// let err = sluice::Config::parse("sluice.toml", &text.replace("10.0.0.11", "10.0.0.11:0")).unwrap_err();
    /// assert_eq!(err.to_string(), "sluice.toml:6: backend[0].address: `10.0.0.11:0` has port 0; give the backend's real port");
    /// ```
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        Self::parse_with_token(file, text, None)
    }

    /// As [`Config::parse`], with a token to use if the file sets none.
    pub fn parse_with_token(
        file: &str,
        text: &str,
        fallback_token: Option<String>,
    ) -> Result<Config, ConfigError> {
        let ctx = Ctx { file, text };
        let raw: FileConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start);
            let (field, message) = teach(
                at.and_then(|o| key_at(text, o)),
                at.and_then(|o| table_at(text, o)),
                e.message().trim(),
            );
            ConfigError {
                file: file.to_string(),
                line: at.map(|o| line_of(text, o)),
                field,
                message,
            }
        })?;

        // Sections are checked in this order so that a file with several
        // mistakes is always refused with the same one.
        let admin = admin(&ctx, &raw.admin, fallback_token)?;
        let health = health(&ctx, &raw.health)?;
        let backends = backends(&ctx, &raw.backend, &health)?;
        let services = services(&ctx, &raw.service, &backends, admin.listen)?;
        let connect_timeout = connect_timeout(&ctx, &raw.connect_timeout)?;
        let idle_timeout = idle_timeout(&ctx, &raw.idle_timeout)?;
        let shutdown_grace = ctx
            .duration(&raw.shutdown_grace, "shutdown_grace")?
            .unwrap_or(Duration::from_secs(30));
        let max_connections = ctx
            .int(&raw.max_connections, "max_connections", 1, 10_000_000)?
            .unwrap_or(100_000) as usize;
        let workers = workers(&ctx, &raw.workers)?;
        let runtime = runtime(&ctx, &raw.runtime)?;
        let cluster = raw.cluster.as_ref().map(|c| cluster(&ctx, c)).transpose()?;

        Ok(Config {
            admin,
            services,
            backends,
            max_connections,
            connect_timeout,
            idle_timeout,
            shutdown_grace,
            state_file: raw.state_file.map(PathBuf::from),
            health,
            zero_copy: raw.zero_copy.unwrap_or(true),
            workers,
            runtime,
            cluster,
        })
    }
}

/// `[cluster]`.
fn cluster(ctx: &Ctx, c: &FileCluster) -> Result<ClusterConfig, ConfigError> {
    if !cfg!(feature = "cluster") {
        return Err(ctx.err(
            c.name.span(),
            "cluster",
            "this sluice was built without cluster support; build it with `cargo build --release --features cluster` (which needs protoc: apt-get install protobuf-compiler)".into(),
        ));
    }
    if c.etcd.get_ref().is_empty() {
        return Err(ctx.err(
            c.etcd.span(),
            "cluster.etcd",
            "give at least one etcd URL, such as \"http://10.0.0.5:2379\"".into(),
        ));
    }
    let mut etcd = Vec::new();
    for (i, u) in c.etcd.get_ref().iter().enumerate() {
        let url = u.get_ref().trim();
        let authority = url.strip_prefix("http://").unwrap_or("");
        let host_port = authority.trim_end_matches('/');
        let ok = !host_port.is_empty()
            && !host_port.contains('/')
            && host_port
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(ctx.err(
                u.span(),
                &format!("cluster.etcd[{i}]"),
                format!(
                    "`{}` is not an etcd URL such as \"http://10.0.0.5:2379\" (http, host and port)",
                    u.get_ref()
                ),
            ));
        }
        etcd.push(format!("http://{host_port}"));
    }
    let name = c.name.get_ref().trim();
    check_name(ctx, name, &c.name, "cluster.name")?;
    let instance = match &c.instance {
        Some(i) => {
            let name = i.get_ref().trim();
            check_name(ctx, name, i, "cluster.instance")?;
            name.to_string()
        }
        None => host_name().ok_or_else(|| {
            ctx.err(
                c.name.span(),
                "cluster.instance",
                "the host name is not a usable instance name: set cluster.instance".into(),
            )
        })?,
    };
    let lease = ctx
        .duration(&c.lease, "cluster.lease")?
        .unwrap_or(Duration::from_secs(5));
    if let Some(l) = &c.lease
        && !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&lease)
    {
        return Err(ctx.err(
            l.span(),
            "cluster.lease",
            "must be from 2s to 5m (etcd's shortest lease is about 2 s)".into(),
        ));
    }
    Ok(ClusterConfig {
        etcd,
        name: name.to_string(),
        instance,
        lease,
    })
}

/// This host's name, if it is a well-formed instance name.
fn host_name() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?.into_string().ok()?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(name)
}

/// `[admin]`, with `fallback_token` when the file sets no token.
fn admin(
    ctx: &Ctx,
    raw: &Option<FileAdmin>,
    fallback_token: Option<String>,
) -> Result<AdminConfig, ConfigError> {
    let mut admin = match raw {
        None => AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            token: None,
            request_timeout: Duration::from_secs(10),
            max_connections: ADMIN_MAX_CONNECTIONS,
            read_token: None,
            allowed_hosts: Vec::new(),
            socket: None,
            open_metrics: false,
            open_healthz: false,
        },
        Some(a) => {
            let listen = match &a.listen {
                Some(l) => socket_addr(ctx, l, "admin.listen")?,
                None => SocketAddr::from(([127, 0, 0, 1], 9000)),
            };
            let token = match &a.token {
                Some(t) if !valid_token(t.get_ref()) => {
                    return Err(ctx.err(t.span(), "admin.token", TOKEN_RULE.into()));
                }
                Some(t) => Some(t.get_ref().clone()),
                None => None,
            };
            let request_timeout = ctx
                .duration(&a.request_timeout, "admin.request_timeout")?
                .unwrap_or(Duration::from_secs(10));
            if let Some(t) = &a.request_timeout
                && request_timeout.is_zero()
            {
                return Err(ctx.err(
                    t.span(),
                    "admin.request_timeout",
                    "must be more than 0".into(),
                ));
            }
            let max_connections = ctx
                .int(&a.max_connections, "admin.max_connections", 1, 1024)?
                .map_or(ADMIN_MAX_CONNECTIONS, |n| n as usize);
            let read_token = match &a.read_token {
                Some(t) if !valid_token(t.get_ref()) => {
                    return Err(ctx.err(t.span(), "admin.read_token", TOKEN_RULE.into()));
                }
                Some(t) if token.as_deref() == Some(t.get_ref().as_str()) => {
                    return Err(ctx.err(
                        t.span(),
                        "admin.read_token",
                        "is the same as token: a read-only token must differ from the admin token"
                            .into(),
                    ));
                }
                Some(t) => Some(t.get_ref().clone()),
                None => None,
            };
            let mut allowed_hosts = Vec::new();
            for (i, h) in a.allowed_hosts.iter().flatten().enumerate() {
                let name = h.get_ref().trim().to_ascii_lowercase();
                if !is_host_name(&name) && name.parse::<IpAddr>().is_err() {
                    return Err(ctx.err(
                        h.span(),
                        &format!("admin.allowed_hosts[{i}]"),
                        format!(
                            "`{}` is not a host name or an IP address (give no port)",
                            h.get_ref()
                        ),
                    ));
                }
                allowed_hosts.push(name);
            }
            AdminConfig {
                listen,
                token,
                request_timeout,
                max_connections,
                read_token,
                allowed_hosts,
                socket: admin_socket(ctx, a)?,
                // Closed unless asked: what they show (backend names and
                // addresses, traffic, process ids) is for the token's holders.
                open_metrics: ctx
                    .flag(&a.open_metrics, "admin.open_metrics")?
                    .unwrap_or(false),
                open_healthz: ctx
                    .flag(&a.open_healthz, "admin.open_healthz")?
                    .unwrap_or(false),
            }
        }
    };
    if admin.token.is_none() {
        if let Some(t) = fallback_token.as_deref()
            && !valid_token(t)
        {
            return Err(ctx.whole(format!("SLUICE_TOKEN in the environment: {TOKEN_RULE}")));
        }
        admin.token = fallback_token;
    }
    if admin.token.is_none()
        && let Some(t) = raw.as_ref().and_then(|a| a.read_token.as_ref())
    {
        return Err(ctx.err(
            t.span(),
            "admin.read_token",
            "goes with admin.token (in the file, or SLUICE_TOKEN in the environment): without an admin token anyone may change state anyway".into(),
        ));
    }
    if !admin.listen.ip().is_loopback() && admin.token.is_none() {
        let line = raw
            .as_ref()
            .and_then(|a| a.listen.as_ref())
            .map(|l| line_of(ctx.text, l.span().start));
        return Err(ConfigError {
            file: ctx.file.to_string(),
            line,
            field: Some("admin.listen".into()),
            message: format!(
                "{} is not a loopback address; set [admin] token (or SLUICE_TOKEN in the environment) so that only holders of it can drain and stop backends",
                admin.listen
            ),
        });
    }
    Ok(admin)
}

/// `[admin] socket`, `socket_mode` and `socket_group`.
fn admin_socket(ctx: &Ctx, a: &FileAdmin) -> Result<Option<AdminSocket>, ConfigError> {
    let Some(path) = &a.socket else {
        for (v, f) in [
            (&a.socket_mode, "admin.socket_mode"),
            (&a.socket_group, "admin.socket_group"),
        ] {
            if let Some(v) = v {
                return Err(ctx.err(v.span(), f, "goes with admin.socket".into()));
            }
        }
        return Ok(None);
    };
    if !path.get_ref().starts_with('/') {
        return Err(ctx.err(
            path.span(),
            "admin.socket",
            format!("`{}` must be an absolute path", path.get_ref()),
        ));
    }
    let mode = match &a.socket_mode {
        None => 0o660,
        Some(m) => u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ctx.err(
                    m.span(),
                    "admin.socket_mode",
                    format!(
                        "`{}` is not permission bits in octal such as \"0660\"",
                        m.get_ref()
                    ),
                )
            })?,
    };
    let group = match &a.socket_group {
        Some(g) if !check_group(g.get_ref()) => {
            return Err(ctx.err(
                g.span(),
                "admin.socket_group",
                format!("`{}` is not a group name", g.get_ref()),
            ));
        }
        g => g.as_ref().map(|g| g.get_ref().clone()),
    };
    Ok(Some(AdminSocket {
        path: PathBuf::from(path.get_ref()),
        mode,
        group,
    }))
}

/// Whether `g` is shaped like a group name (whether it exists is for the
/// machine that runs sluice to say).
fn check_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 32
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `[health]`: the check defaults every backend shares.
fn health(ctx: &Ctx, raw: &Option<FileHealth>) -> Result<HealthConfig, ConfigError> {
    let d = HealthConfig::default();
    let Some(h) = raw else {
        return Ok(d);
    };
    let interval = ctx
        .duration(&h.interval, "health.interval")?
        .unwrap_or(d.interval);
    let timeout = ctx
        .duration(&h.timeout, "health.timeout")?
        .unwrap_or(d.timeout);
    for (v, f) in [
        (&h.interval, "health.interval"),
        (&h.timeout, "health.timeout"),
    ] {
        if let Some(s) = v
            && parse_duration(s.get_ref()).ok() == Some(Duration::ZERO)
        {
            return Err(ctx.err(s.span(), f, "must be more than 0".into()));
        }
    }
    Ok(HealthConfig {
        interval,
        timeout,
        rise: ctx
            .int(&h.rise, "health.rise", 1, 100)?
            .map_or(d.rise, |v| v as u32),
        fall: ctx
            .int(&h.fall, "health.fall", 1, 100)?
            .map_or(d.fall, |v| v as u32),
        slow_start: slow_start(ctx, &h.slow_start, "health.slow_start")?,
    })
}

/// A `slow_start` duration: more than 0 (leaving it out is how to say none).
fn slow_start(
    ctx: &Ctx,
    v: &Option<Spanned<String>>,
    field: &str,
) -> Result<Option<Duration>, ConfigError> {
    match ctx.duration(v, field)? {
        Some(d) if d.is_zero() => {
            let span = v.as_ref().map_or(0..0, |s| s.span());
            Err(ctx.err(
                span,
                field,
                "must be more than 0; leave it out for no slow start".into(),
            ))
        }
        other => Ok(other),
    }
}

/// Every `[[backend]]`, in file order.
fn backends(
    ctx: &Ctx,
    raw: &[FileBackend],
    health: &HealthConfig,
) -> Result<Vec<BackendConfig>, ConfigError> {
    let mut backends = Vec::with_capacity(raw.len());
    for (i, b) in raw.iter().enumerate() {
        let backend = backend(ctx, i, b, &backends, health)?;
        backends.push(backend);
    }
    Ok(backends)
}

/// `[[backend]]` number `i`; `earlier` are the ones before it in the file.
fn backend(
    ctx: &Ctx,
    i: usize,
    b: &FileBackend,
    earlier: &[BackendConfig],
    defaults: &HealthConfig,
) -> Result<BackendConfig, ConfigError> {
    let field = |f: &str| format!("backend[{i}].{f}");
    let name = unique_name(ctx, "backend", &b.name, &field("name"), |n| {
        earlier.iter().any(|e| e.name == n)
    })?;
    let address = BackendAddress::parse(b.address.get_ref())
        .map_err(|m| ctx.err(b.address.span(), &field("address"), m))?;
    let weight = ctx.int(&b.weight, &field("weight"), 0, 1000)?.unwrap_or(1) as u32;
    let health = health_check(ctx, i, b)?;
    // Its own wins over `[health]`'s.
    let slow_start = slow_start(ctx, &b.slow_start, &field("slow_start"))?.or(defaults.slow_start);
    let max_connections = match &b.max_connections {
        Some(m) if *m.get_ref() < 1 => {
            return Err(ctx.err(
                m.span(),
                &field("max_connections"),
                format!(
                    "{} would let it take no client; give 1 or more, or leave it out for no limit",
                    m.get_ref()
                ),
            ));
        }
        m => ctx
            .int(m, &field("max_connections"), 1, 10_000_000)?
            .map(|n| n as usize),
    };
    let send_proxy = match &b.send_proxy {
        None => None,
        Some(v) => match v.get_ref() {
            toml::Value::String(s) if s == "v1" => Some(ProxyVersion::V1),
            toml::Value::String(s) if s == "v2" => Some(ProxyVersion::V2),
            other => {
                return Err(ctx.err(
                    v.span(),
                    &field("send_proxy"),
                    format!(
                        "expected \"v1\" or \"v2\" (the PROXY protocol version the backend expects; leave the key out to send none), not {other}"
                    ),
                ));
            }
        },
    };
    Ok(BackendConfig {
        name: name.to_string(),
        address,
        weight,
        health,
        slow_start,
        max_connections,
        backup: ctx.flag(&b.backup, &field("backup"))?.unwrap_or(false),
        send_proxy,
    })
}

/// The health check of `[[backend]]` number `i`; `None` when it is off.
fn health_check(ctx: &Ctx, i: usize, b: &FileBackend) -> Result<Option<HealthCheck>, ConfigError> {
    let field = |f: &str| format!("backend[{i}].{f}");
    let port = ctx
        .int(&b.health_port, &field("health_port"), 1, 65535)?
        .map(|p| p as u16);
    let status = ctx.int(&b.health_status, &field("health_status"), 100, 599)?;
    let kind = b
        .health_check
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()));
    match kind {
        Some(("tcp", span)) if b.health_status.is_some() => Err(ctx.err(
            span,
            &field("health_check"),
            "health_status goes with health_check = \"http\"".into(),
        )),
        None | Some(("tcp", _)) if b.health_path.is_none() && b.health_status.is_none() => {
            Ok(Some(HealthCheck::Tcp { port }))
        }
        None | Some(("http", _)) => {
            let path = b
                .health_path
                .as_ref()
                .map_or("/".to_string(), |p| p.get_ref().clone());
            let refuse = |m: String| {
                let span = b.health_path.as_ref().map_or(0..0, |p| p.span());
                Err(ctx.err(span, &field("health_path"), m))
            };
            if !path.starts_with('/') {
                return refuse(format!("`{path}` must start with /"));
            }
            // The check sends it as the request target, which has no room
            // for spaces and the like.
            if path.parse::<hyper::Uri>().is_err() {
                return refuse(format!(
                    "`{path}` is not a request path: percent-encode spaces and other special characters"
                ));
            }
            Ok(Some(HealthCheck::Http {
                port,
                path,
                status: status.unwrap_or(200) as u16,
            }))
        }
        Some(("none", span)) => {
            if b.health_path.is_some() || b.health_status.is_some() || b.health_port.is_some() {
                return Err(ctx.err(
                    span,
                    &field("health_check"),
                    "health_path, health_status and health_port make no sense with \"none\"".into(),
                ));
            }
            Ok(None)
        }
        Some(("tcp", span)) => Err(ctx.err(
            span,
            &field("health_check"),
            "health_path goes with health_check = \"http\"".into(),
        )),
        Some((other, span)) => Err(ctx.err(
            span,
            &field("health_check"),
            format!("`{other}` is not a check; use \"tcp\", \"http\" or \"none\""),
        )),
    }
}

/// Every `[[service]]`, in file order, over the validated `backends`.
fn services(
    ctx: &Ctx,
    raw: &[FileService],
    backends: &[BackendConfig],
    admin_listen: SocketAddr,
) -> Result<Vec<ServiceConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ctx.whole(
            "no [[service]] is defined: sluice needs at least one listening service".into(),
        ));
    }
    let mut services = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let service = service(ctx, i, s, backends, admin_listen, &services)?;
        services.push(service);
    }
    Ok(services)
}

/// `[[service]]` number `i`; `earlier` are the ones before it in the file.
fn service(
    ctx: &Ctx,
    i: usize,
    s: &FileService,
    backends: &[BackendConfig],
    admin_listen: SocketAddr,
    earlier: &[ServiceConfig],
) -> Result<ServiceConfig, ConfigError> {
    let field = |f: &str| format!("service[{i}].{f}");
    let name = unique_name(ctx, "service", &s.name, &field("name"), |n| {
        earlier.iter().any(|e| e.name == n)
    })?;
    let listen = socket_addr(ctx, &s.listen, &field("listen"))?;
    if let Some(other) = earlier
        .iter()
        .map(|e| e.listen)
        .find(|o| overlaps(*o, listen))
    {
        return Err(ctx.err(
            s.listen.span(),
            &field("listen"),
            format!("{listen} overlaps {other}, where another service listens"),
        ));
    }
    if overlaps(listen, admin_listen) {
        return Err(ctx.err(
            s.listen.span(),
            &field("listen"),
            format!("{listen} overlaps the admin address {admin_listen}"),
        ));
    }
    let backend_port = ctx
        .int(&s.backend_port, &field("backend_port"), 1, 65535)?
        .map_or(listen.port(), |p| p as u16);
    let chosen: Vec<String> = match &s.backends {
        None => backends.iter().map(|b| b.name.clone()).collect(),
        Some(list) => {
            let mut seen = HashSet::new();
            for n in list.get_ref() {
                if !backends.iter().any(|b| b.name == *n.get_ref()) {
                    return Err(ctx.err(
                        n.span(),
                        &field("backends"),
                        format!("no [[backend]] is named `{}`", n.get_ref()),
                    ));
                }
                if !seen.insert(n.get_ref().clone()) {
                    return Err(ctx.err(
                        n.span(),
                        &field("backends"),
                        format!("`{}` is listed twice", n.get_ref()),
                    ));
                }
            }
            list.get_ref().iter().map(|n| n.get_ref().clone()).collect()
        }
    };
    if chosen.len() > MAX_MEMBERS {
        let span = s.backends.as_ref().map_or(s.name.span(), |b| b.span());
        return Err(ctx.err(
            span,
            &field("backends"),
            format!(
                "service `{name}` has {} backends; a service takes at most {}",
                chosen.len(),
                MAX_MEMBERS
            ),
        ));
    }
    let balance = balance(ctx, i, s)?;
    let members = || backends.iter().filter(|b| chosen.contains(&b.name));
    if !chosen.is_empty() && members().all(|b| b.backup) {
        let span = s.backends.as_ref().map_or(s.name.span(), |b| b.span());
        return Err(ctx.err(
            span,
            &field("backends"),
            format!(
                "every backend of service `{name}` is a backup: backups stand in for primaries, and it has none; set backup = false on at least one"
            ),
        ));
    }
    if !chosen.is_empty()
        && members().any(|b| b.weight > 0)
        && members().filter(|b| !b.backup).all(|b| b.weight == 0)
    {
        let span = s.backends.as_ref().map_or(s.name.span(), |b| b.span());
        return Err(ctx.err(
            span,
            &field("backends"),
            format!(
                "every primary (backup = false) backend of service `{name}` has weight 0, so its backups would serve all the time; give a primary a weight, or make the backup a primary"
            ),
        ));
    }
    if !chosen.is_empty() && members().all(|b| b.weight == 0) {
        let span = s.backends.as_ref().map_or(s.name.span(), |b| b.span());
        return Err(ctx.err(
            span,
            &field("backends"),
            format!("every backend of service `{name}` has weight 0, so it could serve no client"),
        ));
    }
    if chosen.is_empty() {
        let span = s.backends.as_ref().map_or(s.name.span(), |b| b.span());
        return Err(ctx.err(
            span,
            &field("backends"),
            format!("service `{name}` has no backend to forward to; add a [[backend]]"),
        ));
    }
    for b in backends.iter().filter(|b| chosen.contains(&b.name)) {
        if b.address.port().is_none() && backend_port == 0 {
            return Err(ctx.err(
                s.listen.span(),
                &field("backend_port"),
                format!(
                    "backend `{}` has no port and this service listens on port 0; set backend_port",
                    b.name
                ),
            ));
        }
    }
    let accept_proxy = ctx
        .flag(&s.accept_proxy, &field("accept_proxy"))?
        .unwrap_or(false);
    let proxy_header_timeout = match &s.proxy_header_timeout {
        None => PROXY_HEADER_TIMEOUT,
        Some(t) if !accept_proxy => {
            return Err(ctx.err(
                t.span(),
                &field("proxy_header_timeout"),
                "goes with accept_proxy = true: without it no client sends a PROXY header".into(),
            ));
        }
        Some(t) => {
            let d = parse_duration(t.get_ref())
                .map_err(|m| ctx.err(t.span(), &field("proxy_header_timeout"), m))?;
            if d.is_zero() || d > Duration::from_secs(300) {
                return Err(ctx.err(
                    t.span(),
                    &field("proxy_header_timeout"),
                    "must be more than 0 and at most 5m: a balancer sends the header at once"
                        .into(),
                ));
            }
            d
        }
    };
    Ok(ServiceConfig {
        name: name.to_string(),
        listen,
        backend_port,
        backends: chosen,
        balance,
        accept_proxy,
        proxy_header_timeout,
    })
}

/// `balance` and `affinity` of `[[service]]` number `i`.
fn balance(ctx: &Ctx, i: usize, s: &FileService) -> Result<Balance, ConfigError> {
    let field = |f: &str| format!("service[{i}].{f}");
    let affinity = match &s.affinity {
        None => None,
        Some(a) => Some(match a.get_ref().as_str() {
            "client-ip" => (Affinity::ClientIp, a),
            "network" => (Affinity::Network, a),
            other => {
                return Err(ctx.err(
                    a.span(),
                    &field("affinity"),
                    format!("`{other}` is not an affinity; use \"client-ip\" or \"network\""),
                ));
            }
        }),
    };
    let mode = match &s.balance {
        None => Balance::RoundRobin,
        Some(b) => match b.get_ref().as_str() {
            "round-robin" => Balance::RoundRobin,
            "least-connections" => Balance::LeastConnections,
            "source-hash" => Balance::SourceHash(affinity.map_or(Affinity::ClientIp, |a| a.0)),
            other => {
                return Err(ctx.err(
                    b.span(),
                    &field("balance"),
                    format!(
                        "`{other}` is not a balancing mode; use \"round-robin\", \"least-connections\" or \"source-hash\""
                    ),
                ));
            }
        },
    };
    if let Some((_, a)) = affinity
        && mode.affinity().is_none()
    {
        return Err(ctx.err(
            a.span(),
            &field("affinity"),
            format!(
                "goes with balance = \"source-hash\", not \"{}\": only source-hash keeps a client on one backend",
                mode.as_str()
            ),
        ));
    }
    Ok(mode)
}

fn connect_timeout(ctx: &Ctx, v: &Option<Spanned<String>>) -> Result<Duration, ConfigError> {
    let got = ctx
        .duration(v, "connect_timeout")?
        .unwrap_or(Duration::from_secs(3));
    if got.is_zero() {
        let span = v.as_ref().map(|s| s.span()).unwrap_or(0..0);
        return Err(ctx.err(span, "connect_timeout", "must be more than 0".into()));
    }
    Ok(got)
}

fn idle_timeout(ctx: &Ctx, v: &Option<Spanned<String>>) -> Result<Option<Duration>, ConfigError> {
    match ctx.duration(v, "idle_timeout")? {
        Some(d) if d.is_zero() => {
            let span = v.as_ref().map_or(0..0, |s| s.span());
            Err(ctx.err(
                span,
                "idle_timeout",
                "must be more than 0; leave it out for no idle timeout".into(),
            ))
        }
        other => Ok(other),
    }
}

fn workers(ctx: &Ctx, v: &Option<Spanned<i64>>) -> Result<usize, ConfigError> {
    Ok(ctx.int(v, "workers", 1, 256)?.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |w| w as usize,
    ))
}

fn runtime(ctx: &Ctx, v: &Option<Spanned<String>>) -> Result<RuntimeLayout, ConfigError> {
    match v {
        // Chosen by measurement: see README, Performance.
        None => Ok(RuntimeLayout::MultiThread),
        Some(r) => match r.get_ref().as_str() {
            "per-core" => Ok(RuntimeLayout::PerCore),
            "multi-thread" => Ok(RuntimeLayout::MultiThread),
            other => Err(ctx.err(
                r.span(),
                "runtime",
                format!("`{other}` is not a layout; use \"per-core\" or \"multi-thread\""),
            )),
        },
    }
}

/// A backend's or service's name: well formed, and not one an earlier
/// entry of the same `kind` took.
fn unique_name<'a>(
    ctx: &Ctx,
    kind: &str,
    v: &'a Spanned<String>,
    field: &str,
    taken: impl Fn(&str) -> bool,
) -> Result<&'a str, ConfigError> {
    let name = v.get_ref().trim();
    check_name(ctx, name, v, field)?;
    if taken(name) {
        return Err(ctx.err(
            v.span(),
            field,
            format!("{kind} name `{name}` is used twice"),
        ));
    }
    Ok(name)
}

fn check_name(ctx: &Ctx, name: &str, v: &Spanned<String>, field: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ctx.err(
            v.span(),
            field,
            format!("`{name}` is not a name: use 1-64 letters, digits, '-', '_' or '.'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "5 m",
            "5d",
            "18446744073709551615s",
            "8761h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    }

    #[test]
    fn addresses() {
        use BackendAddress::*;
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            BackendAddress::parse("10.0.0.1:80"),
            Ok(Ip(v4("10.0.0.1"), Some(80)))
        );
        assert_eq!(
            BackendAddress::parse("10.0.0.1"),
            Ok(Ip(v4("10.0.0.1"), None))
        );
        assert_eq!(
            BackendAddress::parse("[::1]:80"),
            Ok(Ip(v4("::1"), Some(80)))
        );
        assert_eq!(BackendAddress::parse("[::1]"), Ok(Ip(v4("::1"), None)));
        assert_eq!(
            BackendAddress::parse("web1.lan:8080"),
            Ok(Host("web1.lan".into(), Some(8080)))
        );
        assert_eq!(BackendAddress::parse("web1"), Ok(Host("web1".into(), None)));
        for bad in [
            "",
            "web1:0",
            "web1:99999",
            "web 1",
            "http://x",
            "a..b",
            ":80",
        ] {
            assert!(BackendAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../config/sluice.toml");
        let c = Config::parse("sluice.toml", text).unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.services[0].backends, ["web1", "web2"]);
    }

    /// One service on 127.0.0.1:8080 over backends web1 and web2.
    const BASE: &str = "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
                        [[backend]]\nname = \"web1\"\naddress = \"10.0.0.11\"\n\
                        [[backend]]\nname = \"web2\"\naddress = \"10.0.0.12\"\n";

    /// The error `text` is refused with, as the user sees it.
    fn refused(text: &str) -> String {
        Config::parse("sluice.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_line() {
        let text = format!("{BASE}wieght = 2\n");
        assert_eq!(
            refused(&text),
            "sluice.toml:10: backend[1].wieght: unknown field `wieght`, expected one of `name`, \
             `address`, `weight`, `health_check`, `health_path`, `health_status`, `health_port`, \
             `slow_start`, `max_connections`, `backup`, `send_proxy`"
        );
    }

    #[test]
    fn a_top_level_key_under_a_table_is_told_to_move_up() {
        for key in [
            "state_file = \"/var/lib/sluice/state.json\"",
            "shutdown_grace = \"5s\"",
        ] {
            let name = key.split(' ').next().unwrap();
            let text = format!("{BASE}{key}\n");
            assert_eq!(
                refused(&text),
                format!(
                    "sluice.toml:10: {name}: `{name}` is a top-level key, but here it belongs to \
                     [[backend]] above it: move it above the first [table] of the file"
                )
            );
        }
        let text = format!("{BASE}[health]\nworkers = 2\n");
        assert!(refused(&text).contains("belongs to [health] above it"));
    }

    #[test]
    fn type_errors_name_types_as_a_person_writes_them() {
        for (added, want) in [
            (
                "weight = \"3\"",
                "sluice.toml:10: backend[1].weight: expected a whole number, such as 3, not the text \"3\"",
            ),
            (
                "weight = 1.5",
                "sluice.toml:10: backend[1].weight: expected a whole number, such as 3, not the number 1.5",
            ),
            (
                "[health]\ninterval = 3",
                "sluice.toml:11: health.interval: expected a duration in quotes, such as \"3s\" or \"1500ms\", not the number 3",
            ),
            (
                "[health]\nrise = \"2\"",
                "sluice.toml:11: health.rise: expected a whole number, such as 3, not the text \"2\"",
            ),
        ] {
            assert_eq!(refused(&format!("{BASE}{added}\n")), want);
        }
        for (added, want) in [
            (
                "shutdown_grace = 30",
                "sluice.toml:1: shutdown_grace: expected a duration in quotes, such as \"3s\" or \"1500ms\", not the number 30",
            ),
            (
                "zero_copy = 1",
                "sluice.toml:1: zero_copy: expected true or false, not the number 1",
            ),
            (
                "state_file = 1",
                "sluice.toml:1: state_file: expected text in quotes, not the number 1",
            ),
        ] {
            assert_eq!(refused(&format!("{added}\n{BASE}")), want);
        }
        let e = refused(&BASE.replace("[[service]]", "[[service]]\nbackends = \"web1\""));
        assert!(
            e.contains("expected a list, such as [\"web1\", \"web2\"]"),
            "{e}"
        );
        assert!(!e.contains("i64") && !e.contains("sequence"), "{e}");
    }

    #[test]
    fn a_backend_name_used_twice_is_refused() {
        let text = BASE.replace("web2", "web1");
        assert_eq!(
            refused(&text),
            "sluice.toml:8: backend[1].name: backend name `web1` is used twice"
        );
    }

    #[test]
    fn a_service_naming_an_unknown_backend_is_refused() {
        let text = BASE.replace(
            "listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:8080\"\nbackends = [\"web1\", \"web3\"]\n",
        );
        assert_eq!(
            refused(&text),
            "sluice.toml:4: service[0].backends: no [[backend]] is named `web3`"
        );
    }

    #[test]
    fn health_rise_out_of_range_is_refused() {
        let text = format!("{BASE}[health]\nrise = 0\n");
        assert_eq!(
            refused(&text),
            "sluice.toml:11: health.rise: 0 is out of range (1 to 100)"
        );
    }

    #[test]
    fn an_unknown_runtime_is_refused() {
        let text = format!("runtime = \"bogus\"\n{BASE}");
        assert_eq!(
            refused(&text),
            "sluice.toml:1: runtime: `bogus` is not a layout; use \"per-core\" or \"multi-thread\""
        );
    }

    #[test]
    fn the_first_section_in_check_order_names_the_error() {
        // Each case adds a mistake to the one before it, in a section
        // checked earlier, so the error must move to the new mistake.
        let mut text = BASE.to_string();
        let steps = [
            (
                "runtime = \"bogus\"\n",
                "sluice.toml:1: runtime: `bogus` is not a layout; use \"per-core\" or \"multi-thread\"",
            ),
            (
                "workers = 0\n",
                "sluice.toml:1: workers: 0 is out of range (1 to 256)",
            ),
            (
                "max_connections = 0\n",
                "sluice.toml:1: max_connections: 0 is out of range (1 to 10000000)",
            ),
            (
                "shutdown_grace = \"soon\"\n",
                "sluice.toml:1: shutdown_grace: `soon` is not a duration such as 1500ms, 30s, 5m or 1h",
            ),
            (
                "idle_timeout = \"0s\"\n",
                "sluice.toml:1: idle_timeout: must be more than 0; leave it out for no idle timeout",
            ),
            (
                "connect_timeout = \"0s\"\n",
                "sluice.toml:1: connect_timeout: must be more than 0",
            ),
        ];
        for (line, want) in steps {
            text.insert_str(0, line);
            assert_eq!(refused(&text), want);
        }
        let services = text.replace("127.0.0.1:8080", "127.0.0.1:9000");
        assert_eq!(
            refused(&services),
            "sluice.toml:9: service[0].listen: 127.0.0.1:9000 overlaps the admin address 127.0.0.1:9000"
        );
        let text = services.replace("10.0.0.12", "10.0.0.12:0");
        assert_eq!(
            refused(&text),
            "sluice.toml:15: backend[1].address: `10.0.0.12:0` has port 0; give the backend's real port"
        );
        let text = format!("{text}[health]\nfall = 101\n");
        assert_eq!(
            refused(&text),
            "sluice.toml:17: health.fall: 101 is out of range (1 to 100)"
        );
        let text = format!("{text}[admin]\nlisten = \"0.0.0.0:9000\"\n");
        assert_eq!(
            refused(&text),
            "sluice.toml:19: admin.listen: 0.0.0.0:9000 is not a loopback address; set [admin] token \
             (or SLUICE_TOKEN in the environment) so that only holders of it can drain and stop backends"
        );
    }

    #[test]
    fn errors_in_backends_and_services() {
        let cases = [
            (
                BASE.replace(
                    "10.0.0.11\"\n",
                    "10.0.0.11\"\nhealth_check = \"tcp\"\nhealth_status = 204\n",
                ),
                "sluice.toml:7: backend[0].health_check: health_status goes with health_check = \"http\"",
            ),
            (
                BASE.replace(
                    "10.0.0.11\"\n",
                    "10.0.0.11\"\nhealth_check = \"tcp\"\nhealth_path = \"/up\"\n",
                ),
                "sluice.toml:7: backend[0].health_check: health_path goes with health_check = \"http\"",
            ),
            (
                BASE.replace("10.0.0.11\"\n", "10.0.0.11\"\nhealth_path = \"up\"\n"),
                "sluice.toml:7: backend[0].health_path: `up` must start with /",
            ),
            (
                BASE.replace("10.0.0.11\"\n", "10.0.0.11\"\nhealth_path = \"/is up\"\n"),
                "sluice.toml:7: backend[0].health_path: `/is up` is not a request path: percent-encode spaces and other special characters",
            ),
            (
                BASE.replace(
                    "10.0.0.11\"\n",
                    "10.0.0.11\"\nhealth_check = \"none\"\nhealth_port = 81\n",
                ),
                "sluice.toml:7: backend[0].health_check: health_path, health_status and health_port make no sense with \"none\"",
            ),
            (
                BASE.replace("10.0.0.11\"\n", "10.0.0.11\"\nhealth_check = \"ping\"\n"),
                "sluice.toml:7: backend[0].health_check: `ping` is not a check; use \"tcp\", \"http\" or \"none\"",
            ),
            (
                BASE.replace("10.0.0.11\"\n", "10.0.0.11\"\nweight = 0\n")
                    .replace("10.0.0.12\"\n", "10.0.0.12\"\nweight = 0\n"),
                "sluice.toml:2: service[0].backends: every backend of service `web` has weight 0, so it could serve no client",
            ),
            (
                BASE.replace("127.0.0.1:8080", "127.0.0.1:0"),
                "sluice.toml:3: service[0].backend_port: backend `web1` has no port and this service listens on port 0; set backend_port",
            ),
            (
                format!("{BASE}[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8081\"\n"),
                "sluice.toml:11: service[1].name: service name `web` is used twice",
            ),
            (
                format!("{BASE}[[service]]\nname = \"api\"\nlisten = \"0.0.0.0:8080\"\n"),
                "sluice.toml:12: service[1].listen: 0.0.0.0:8080 overlaps 127.0.0.1:8080, where another service listens",
            ),
            (
                BASE.split("[[backend]]")
                    .skip(1)
                    .map(|b| format!("[[backend]]{b}"))
                    .collect(),
                "sluice.toml: no [[service]] is defined: sluice needs at least one listening service",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(refused(&text), want, "{text}");
        }
    }

    #[test]
    fn open_metrics_and_healthz_are_true_or_false() {
        let c = Config::parse(
            "sluice.toml",
            &format!("{BASE}[admin]\nopen_metrics = true\n"),
        )
        .unwrap();
        assert!(c.admin.open_metrics && !c.admin.open_healthz);
        for (line, field, value) in [
            ("open_metrics = \"yes\"", "admin.open_metrics", "\"yes\""),
            ("open_healthz = 1", "admin.open_healthz", "1"),
        ] {
            let text = format!("{BASE}[admin]\n{line}\n");
            let line_no = text.lines().count();
            assert_eq!(
                Config::parse("sluice.toml", &text).unwrap_err().to_string(),
                format!("sluice.toml:{line_no}: {field}: must be true or false, not {value}")
            );
        }
    }

    #[test]
    fn an_admin_token_from_outside_is_used_only_when_the_file_sets_none() {
        let open = format!("{BASE}[admin]\nlisten = \"0.0.0.0:9000\"\n");
        let c = Config::parse_with_token("sluice.toml", &open, Some("outside".into())).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("outside"));
        let own = format!("{open}token = \"inside\"\n");
        let c = Config::parse_with_token("sluice.toml", &own, Some("outside".into())).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("inside"));
        let spaced = format!("{open}token = \"in side\"\n");
        assert_eq!(
            Config::parse_with_token("sluice.toml", &spaced, Some("outside".into()))
                .unwrap_err()
                .to_string(),
            format!("sluice.toml:12: admin.token: {TOKEN_RULE}")
        );
        // What `check` passed and then locked everyone out with: a token no
        // HTTP header can carry as text.
        let accented = format!("{open}token = \"s\u{e9}same\"\n");
        assert!(Config::parse("sluice.toml", &accented).is_err());
        assert_eq!(
            Config::parse_with_token("sluice.toml", &open, Some("s\u{e9}same".into()))
                .unwrap_err()
                .to_string(),
            format!("sluice.toml: SLUICE_TOKEN in the environment: {TOKEN_RULE}")
        );
    }

    #[test]
    fn defaults_and_explicit_values() {
        let c = Config::parse("sluice.toml", BASE).unwrap();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            c,
            Config {
                admin: AdminConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
                    token: None,
                    request_timeout: Duration::from_secs(10),
                    max_connections: ADMIN_MAX_CONNECTIONS,
                    read_token: None,
                    allowed_hosts: Vec::new(),
                    socket: None,
                    open_metrics: false,
                    open_healthz: false,
                },
                services: vec![ServiceConfig {
                    name: "web".into(),
                    listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                    backend_port: 8080,
                    backends: vec!["web1".into(), "web2".into()],
                    balance: Balance::RoundRobin,
                    accept_proxy: false,
                    proxy_header_timeout: PROXY_HEADER_TIMEOUT,
                }],
                backends: ["web1", "web2"]
                    .iter()
                    .zip(["10.0.0.11", "10.0.0.12"])
                    .map(|(n, a)| BackendConfig {
                        name: n.to_string(),
                        address: BackendAddress::parse(a).unwrap(),
                        weight: 1,
                        health: Some(HealthCheck::Tcp { port: None }),
                        slow_start: None,
                        max_connections: None,
                        backup: false,
                        send_proxy: None,
                    })
                    .collect(),
                max_connections: 100_000,
                connect_timeout: Duration::from_secs(3),
                idle_timeout: None,
                shutdown_grace: Duration::from_secs(30),
                state_file: None,
                health: HealthConfig::default(),
                zero_copy: true,
                workers,
                runtime: RuntimeLayout::MultiThread,
                cluster: None,
            }
        );

        let text = "max_connections = 50\nconnect_timeout = \"2s\"\nidle_timeout = \"5m\"\n\
                    shutdown_grace = \"1h\"\nstate_file = \"/var/lib/sluice/state.json\"\n\
                    zero_copy = false\nworkers = 3\nruntime = \"per-core\"\n\
                    [admin]\nlisten = \"127.0.0.1:9100\"\ntoken = \"s3cret\"\nrequest_timeout = \"4s\"\nmax_connections = 8\n\
                    read_token = \"l00k\"\nallowed_hosts = [\"LB.example.com\", \"10.0.0.5\"]\n\
                    socket = \"/run/sluice/admin.sock\"\nsocket_mode = \"0640\"\nsocket_group = \"sluice\"\n\
                    open_metrics = true\nopen_healthz = true\n\
                    [health]\ninterval = \"500ms\"\ntimeout = \"250ms\"\nrise = 4\nfall = 5\nslow_start = \"30s\"\n\
                    [[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackend_port = 81\nbackends = [\"b\"]\n\
                    balance = \"source-hash\"\naffinity = \"network\"\n\
                    accept_proxy = true\nproxy_header_timeout = \"2s\"\n\
                    [[backend]]\nname = \"a\"\naddress = \"a.lan:80\"\nhealth_check = \"none\"\nbackup = true\nsend_proxy = \"v1\"\n\
                    [[backend]]\nname = \"b\"\naddress = \"b.lan\"\nweight = 7\n\
                    health_path = \"/up\"\nhealth_status = 204\nhealth_port = 82\n\
                    slow_start = \"5s\"\nmax_connections = 50\nsend_proxy = \"v2\"\n";
        let c = Config::parse("sluice.toml", text).unwrap();
        assert_eq!(
            c.admin,
            AdminConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
                token: Some("s3cret".into()),
                request_timeout: Duration::from_secs(4),
                max_connections: 8,
                read_token: Some("l00k".into()),
                allowed_hosts: vec!["lb.example.com".into(), "10.0.0.5".into()],
                socket: Some(AdminSocket {
                    path: "/run/sluice/admin.sock".into(),
                    mode: 0o640,
                    group: Some("sluice".into()),
                }),
                open_metrics: true,
                open_healthz: true,
            }
        );
        assert_eq!(
            c.health,
            HealthConfig {
                interval: Duration::from_millis(500),
                timeout: Duration::from_millis(250),
                rise: 4,
                fall: 5,
                slow_start: Some(Duration::from_secs(30)),
            }
        );
        assert_eq!(c.services[0].backend_port, 81);
        assert_eq!(c.services[0].backends, ["b"]);
        assert_eq!(
            c.services[0].balance,
            Balance::SourceHash(Affinity::Network)
        );
        assert!(c.services[0].accept_proxy);
        assert_eq!(c.services[0].proxy_header_timeout, Duration::from_secs(2));
        assert_eq!(c.backends[0].health, None);
        assert_eq!(c.backends[0].send_proxy, Some(ProxyVersion::V1));
        assert_eq!(
            (
                c.backends[0].slow_start,
                c.backends[0].max_connections,
                c.backends[0].backup
            ),
            (Some(Duration::from_secs(30)), None, true),
            "[health] slow_start for a backend without its own"
        );
        assert_eq!(
            c.backends[1],
            BackendConfig {
                name: "b".into(),
                address: BackendAddress::Host("b.lan".into(), None),
                weight: 7,
                health: Some(HealthCheck::Http {
                    port: Some(82),
                    path: "/up".into(),
                    status: 204,
                }),
                slow_start: Some(Duration::from_secs(5)),
                max_connections: Some(50),
                backup: false,
                send_proxy: Some(ProxyVersion::V2),
            }
        );
        assert_eq!(
            (
                c.max_connections,
                c.connect_timeout,
                c.idle_timeout,
                c.shutdown_grace,
                c.state_file.as_deref(),
                c.zero_copy,
                c.workers,
                c.runtime,
            ),
            (
                50,
                Duration::from_secs(2),
                Some(Duration::from_secs(300)),
                Duration::from_secs(3600),
                Some(Path::new("/var/lib/sluice/state.json")),
                false,
                3,
                RuntimeLayout::PerCore,
            )
        );
    }

    #[test]
    fn proxy_protocol_keys_are_checked() {
        let base = "[[service]]\nname = \"web\"\nlisten = \"[::1]:8080\"\n\
                    [[backend]]\nname = \"web1\"\naddress = \"[::1]:8081\"\n";
        let c = Config::parse("sluice.toml", base).unwrap();
        assert_eq!(c.services[0].listen, "[::1]:8080".parse().unwrap());
        assert_eq!(
            c.backends[0].address,
            BackendAddress::Ip("::1".parse().unwrap(), Some(8081))
        );
        assert!(!c.services[0].accept_proxy);
        assert_eq!(c.backends[0].send_proxy, None);
        for (extra, want) in [
            (
                "send_proxy = \"v3\"",
                "sluice.toml:7: backend[0].send_proxy: expected \"v1\" or \"v2\" (the PROXY protocol version the backend expects; leave the key out to send none), not \"v3\"",
            ),
            (
                "send_proxy = true",
                "sluice.toml:7: backend[0].send_proxy: expected \"v1\" or \"v2\" (the PROXY protocol version the backend expects; leave the key out to send none), not true",
            ),
        ] {
            assert_eq!(refused(&format!("{base}{extra}\n")), want);
        }
        let service =
            |extra: &str| base.replacen("[[backend]]", &format!("{extra}\n[[backend]]"), 1);
        for (extra, want) in [
            (
                "proxy_header_timeout = \"2s\"",
                "sluice.toml:4: service[0].proxy_header_timeout: goes with accept_proxy = true: without it no client sends a PROXY header",
            ),
            (
                "accept_proxy = \"yes\"",
                "sluice.toml:4: service[0].accept_proxy: must be true or false, not \"yes\"",
            ),
            (
                "accept_proxy = true\nproxy_header_timeout = \"0s\"",
                "sluice.toml:5: service[0].proxy_header_timeout: must be more than 0 and at most 5m: a balancer sends the header at once",
            ),
            (
                "accept_proxy = true\nproxy_header_timeout = 3",
                "sluice.toml:5: service[0].proxy_header_timeout: expected a duration in quotes, such as \"3s\" or \"1500ms\", not the number 3",
            ),
        ] {
            assert_eq!(refused(&service(extra)), want, "{extra}");
        }
        let c = Config::parse("sluice.toml", &service("accept_proxy = true")).unwrap();
        assert!(c.services[0].accept_proxy);
        assert_eq!(c.services[0].proxy_header_timeout, PROXY_HEADER_TIMEOUT);
    }

    const ONE_BACKEND: &str = "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n[[backend]]\nname = \"web1\"\naddress = \"10.0.0.11\"\n";

    #[cfg(not(feature = "cluster"))]
    #[test]
    fn a_cluster_section_needs_the_cluster_build() {
        let text = format!(
            "{ONE_BACKEND}[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nname = \"shop\"\n"
        );
        let e = Config::parse("s.toml", &text).unwrap_err().to_string();
        assert!(e.contains("--features cluster"), "{e}");
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn the_cluster_section_is_checked_field_by_field() {
        let with =
            |lines: &str| Config::parse("s.toml", &format!("{ONE_BACKEND}[cluster]\n{lines}\n"));
        let c = with("etcd = [\"http://10.0.0.5:2379/\"]\nname = \"shop\"\ninstance = \"lb1\"")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.etcd, ["http://10.0.0.5:2379"]);
        assert_eq!((c.name.as_str(), c.instance.as_str()), ("shop", "lb1"));
        assert_eq!(c.lease, Duration::from_secs(5));
        for (lines, says) in [
            (
                "etcd = []\nname = \"shop\"",
                "cluster.etcd: give at least one",
            ),
            (
                "etcd = [\"10.0.0.5:2379\"]\nname = \"shop\"",
                "cluster.etcd[0]: `10.0.0.5:2379` is not an etcd URL",
            ),
            (
                "etcd = [\"https://e:2379\"]\nname = \"shop\"",
                "cluster.etcd[0]",
            ),
            (
                "etcd = [\"http://e:2379\"]\nname = \"a b\"",
                "cluster.name: `a b` is not a name",
            ),
            (
                "etcd = [\"http://e:2379\"]\nname = \"s\"\ninstance = \"\"",
                "cluster.instance",
            ),
            (
                "etcd = [\"http://e:2379\"]\nname = \"s\"\nlease = \"1s\"",
                "cluster.lease: must be from 2s",
            ),
            ("etcd = [\"http://e:2379\"]", "missing field `name`"),
        ] {
            let e = with(lines).unwrap_err().to_string();
            assert!(e.contains(says), "{lines}: {e}");
        }
    }

    #[test]
    fn balancing_settings_are_checked_field_by_field() {
        let on_service = |lines: &str| {
            BASE.replace(
                "listen = \"127.0.0.1:8080\"\n",
                &format!("listen = \"127.0.0.1:8080\"\n{lines}\n"),
            )
        };
        let on_web1 =
            |lines: &str| BASE.replace("10.0.0.11\"\n", &format!("10.0.0.11\"\n{lines}\n"));
        let ok = |t: String| Config::parse("sluice.toml", &t).unwrap();
        assert_eq!(
            ok(on_service("balance = \"least-connections\"")).services[0].balance,
            Balance::LeastConnections
        );
        assert_eq!(
            ok(on_service("balance = \"source-hash\"")).services[0].balance,
            Balance::SourceHash(Affinity::ClientIp),
            "client-ip is source-hash's default"
        );
        assert_eq!(
            ok(on_service(
                "affinity = \"network\"\nbalance = \"source-hash\""
            ))
            .services[0]
                .balance,
            Balance::SourceHash(Affinity::Network)
        );
        for (text, want) in [
            (
                on_service("balance = \"random\""),
                "sluice.toml:4: service[0].balance: `random` is not a balancing mode; use \"round-robin\", \"least-connections\" or \"source-hash\"",
            ),
            (
                on_service("balance = \"source-hash\"\naffinity = \"session\""),
                "sluice.toml:5: service[0].affinity: `session` is not an affinity; use \"client-ip\" or \"network\"",
            ),
            (
                on_service("affinity = \"client-ip\""),
                "sluice.toml:4: service[0].affinity: goes with balance = \"source-hash\", not \"round-robin\": only source-hash keeps a client on one backend",
            ),
            (
                on_service("balance = \"least-connections\"\naffinity = \"network\""),
                "sluice.toml:5: service[0].affinity: goes with balance = \"source-hash\", not \"least-connections\": only source-hash keeps a client on one backend",
            ),
            (
                on_web1("max_connections = 0"),
                "sluice.toml:7: backend[0].max_connections: 0 would let it take no client; give 1 or more, or leave it out for no limit",
            ),
            (
                on_web1("max_connections = 20000000"),
                "sluice.toml:7: backend[0].max_connections: 20000000 is out of range (1 to 10000000)",
            ),
            (
                on_web1("slow_start = \"0s\""),
                "sluice.toml:7: backend[0].slow_start: must be more than 0; leave it out for no slow start",
            ),
            (
                on_web1("slow_start = 30"),
                "sluice.toml:7: backend[0].slow_start: expected a duration in quotes, such as \"3s\" or \"1500ms\", not the number 30",
            ),
            (
                format!("{BASE}[health]\nslow_start = \"0ms\"\n"),
                "sluice.toml:11: health.slow_start: must be more than 0; leave it out for no slow start",
            ),
            (
                on_web1("backup = \"yes\""),
                "sluice.toml:7: backend[0].backup: must be true or false, not \"yes\"",
            ),
            (
                on_web1("backup = true").replace("10.0.0.12\"\n", "10.0.0.12\"\nbackup = true\n"),
                "sluice.toml:2: service[0].backends: every backend of service `web` is a backup: backups stand in for primaries, and it has none; set backup = false on at least one",
            ),
            (
                on_web1("weight = 0").replace("10.0.0.12\"\n", "10.0.0.12\"\nbackup = true\n"),
                "sluice.toml:2: service[0].backends: every primary (backup = false) backend of service `web` has weight 0, so its backups would serve all the time; give a primary a weight, or make the backup a primary",
            ),
        ] {
            assert_eq!(refused(&text), want, "{text}");
        }
        // A service's backends fit the fixed bitset a source-hash walk
        // marks them in.
        let many = |n: usize| {
            let mut t = BASE.to_string();
            for k in 3..=n {
                t.push_str(&format!(
                    "[[backend]]\nname = \"web{k}\"\naddress = \"10.0.{}.{}\"\n",
                    k / 250,
                    k % 250 + 1
                ));
            }
            t
        };
        assert_eq!(ok(many(1024)).services[0].backends.len(), 1024);
        assert_eq!(
            refused(&many(1025)),
            "sluice.toml:2: service[0].backends: service `web` has 1025 backends; a service takes at most 1024"
        );
        // A backup that serves only some services is fine where others
        // have a primary.
        let t = on_web1("backup = true").replace(
            "listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:8080\"\nbackends = [\"web1\", \"web2\"]\n",
        );
        assert!(ok(t).backends[0].backup);
    }

    #[test]
    fn listen_addresses_overlap_by_family() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (x, y, clash) in [
            // Each family's wildcard holds its own family only...
            ("0.0.0.0:80", "[::1]:80", false),
            ("0.0.0.0:80", "[2001:db8::1]:80", false),
            ("0.0.0.0:80", "127.0.0.1:80", true),
            // ...v4-mapped addresses being IPv4 ones.
            ("0.0.0.0:80", "[::ffff:127.0.0.1]:80", true),
            ("[::ffff:127.0.0.1]:80", "127.0.0.1:80", true),
            ("[::ffff:127.0.0.1]:80", "127.0.0.2:80", false),
            ("[::ffff:0.0.0.0]:80", "127.0.0.1:80", true),
            // ...but `[::]` is dual-stack: it holds the port everywhere.
            ("[::]:80", "0.0.0.0:80", true),
            ("[::]:80", "127.0.0.1:80", true),
            ("[::]:80", "[::1]:80", true),
            ("[::]:80", "[::ffff:10.0.0.1]:80", true),
            // Specific addresses clash only with themselves.
            ("127.0.0.1:80", "127.0.0.2:80", false),
            ("[::1]:80", "[::1]:80", true),
            ("[::1]:80", "[2001:db8::1]:80", false),
            ("[::1]:80", "127.0.0.1:80", false),
            // Other ports, and port 0 (each picks its own), never.
            ("[::]:80", "0.0.0.0:81", false),
            ("0.0.0.0:0", "0.0.0.0:0", false),
        ] {
            assert_eq!(overlaps(a(x), a(y)), clash, "{x} {y}");
            assert_eq!(overlaps(a(y), a(x)), clash, "{y} {x}");
        }
    }
}
