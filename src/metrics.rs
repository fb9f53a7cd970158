//! `GET /metrics`: the balancer's counters in the Prometheus text format
//! (version 0.0.4), written by `prometheus-client`.
//!
//! Nothing here counts. A [`Collector`] reads, at scrape time, the atomics
//! the data plane keeps anyway (each backend's, each service's
//! [`ServiceCounts`](crate::state::ServiceCounts), the reload counts) and
//! the process's own figures from `/proc/self`. So a scrape costs the hot
//! path nothing, and a backend that a reload removed is gone from the
//! output once it is gone from the backend list (at once, or after its
//! last connection while it drains).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::backend::{ConnectFailure, State};
use crate::events::Reason;
use crate::state::Shared;

/// The reply's `Content-Type`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric as Prometheus text, read now.
pub fn render(shared: &Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(shared.clone())));
    let mut out = String::new();
    // Writing to a String does not fail, nor does reading an atomic.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot write the metrics");
    }
    out
}

/// Reads the balancer's counters when a scrape encodes it.
#[derive(Debug)]
struct Scrape(Arc<Shared>);

const STATES: [State; 4] = [
    State::Active,
    State::Draining,
    State::Drained,
    State::Stopped,
];

/// One backend as read at the start of a scrape, so that every family
/// shows the same list.
struct Row {
    name: String,
    /// (service, live connections), every service that routes to it and
    /// any other one its connections came in on.
    live: Vec<(String, u64)>,
    total: u64,
    failures: [u64; 4],
    /// Bytes from the backend, and to it.
    received: u64,
    sent: u64,
    up: bool,
    state: State,
    weight: u32,
    checks: [u64; 2],
    state_since_ms: u64,
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let rows = rows(&self.0);
        backends(&mut e, &rows)?;
        services(&mut e, &self.0, &rows)?;
        process(&mut e, &self.0)
    }
}

/// Every backend, removed ones still draining included, as read now.
fn rows(shared: &Shared) -> Vec<Row> {
    shared
        .backends()
        .iter()
        .map(|b| {
            let mut live: Vec<(String, u64)> =
                shared.services_of(b).into_iter().map(|s| (s, 0)).collect();
            for (service, n) in b.live_by_service() {
                match live.iter_mut().find(|(s, _)| **s == *service) {
                    Some((_, m)) => *m += n as u64,
                    None => live.push((service.to_string(), n as u64)),
                }
            }
            Row {
                name: b.name.clone(),
                live,
                total: b.total_connections.load(Relaxed),
                failures: ConnectFailure::ALL.map(|w| b.connect_failures_of(w)),
                received: b.bytes_out.load(Relaxed),
                sent: b.bytes_in.load(Relaxed),
                up: b.healthy(),
                state: b.state(),
                weight: b.weight(),
                checks: [b.checks_passed.load(Relaxed), b.checks_failed.load(Relaxed)],
                state_since_ms: b.state_since_ms(),
            }
        })
        .collect()
}

/// The backend families.
fn backends(e: &mut DescriptorEncoder, rows: &[Row]) -> fmt::Result {
    let mut m = e.encode_descriptor(
        "sluice_backend_connections",
        "Live connections to the backend in this process, connects in progress included, by the service they came in on.",
        None,
        MetricType::Gauge,
    )?;
    for r in rows {
        for (service, n) in &r.live {
            let labels = [("backend", r.name.as_str()), ("service", service.as_str())];
            gauge(&mut m, &labels, *n as i64)?;
        }
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_connections",
        "Connections made to the backend.",
        None,
        MetricType::Counter,
    )?;
    for r in rows {
        counter(&mut m, &[("backend", r.name.as_str())], r.total)?;
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_connect_errors",
        "Proxied connects to the backend that failed, by reason: refused, timeout, unreachable, other.",
        None,
        MetricType::Counter,
    )?;
    for r in rows {
        for (why, n) in ConnectFailure::ALL.iter().zip(r.failures) {
            let labels = [("backend", r.name.as_str()), ("reason", why.as_str())];
            counter(&mut m, &labels, n)?;
        }
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_received_bytes",
        "Bytes received from the backend (its replies, passed on to clients).",
        None,
        MetricType::Counter,
    )?;
    for r in rows {
        counter(&mut m, &[("backend", r.name.as_str())], r.received)?;
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_sent_bytes",
        "Bytes sent to the backend (what clients sent).",
        None,
        MetricType::Counter,
    )?;
    for r in rows {
        counter(&mut m, &[("backend", r.name.as_str())], r.sent)?;
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_up",
        "1 while the backend is healthy, 0 while health checks or failed connects have taken it down.",
        None,
        MetricType::Gauge,
    )?;
    for r in rows {
        gauge(&mut m, &[("backend", r.name.as_str())], i64::from(r.up))?;
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_admin_state",
        "The backend's admin state, one-hot: 1 for the state it is in, 0 for the others.",
        None,
        MetricType::Gauge,
    )?;
    for r in rows {
        for s in STATES {
            let labels = [("backend", r.name.as_str()), ("state", s.as_str())];
            gauge(&mut m, &labels, i64::from(r.state == s))?;
        }
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_weight",
        "The backend's weight in round-robin.",
        None,
        MetricType::Gauge,
    )?;
    for r in rows {
        gauge(&mut m, &[("backend", r.name.as_str())], i64::from(r.weight))?;
    }
    let mut m = e.encode_descriptor(
        "sluice_backend_health_checks",
        "Active health checks of the backend, by result: passed, failed.",
        None,
        MetricType::Counter,
    )?;
    for r in rows {
        for (result, n) in ["passed", "failed"].into_iter().zip(r.checks) {
            let labels = [("backend", r.name.as_str()), ("result", result)];
            counter(&mut m, &labels, n)?;
        }
    }
    // Present only while a drain runs, so that `time() - metric` is the
    // drain's age with no 0 to filter out.
    let mut m = e.encode_descriptor(
        "sluice_backend_drain_started_seconds",
        "Unix time at which the backend's current drain began; present only while it is draining.",
        None,
        MetricType::Gauge,
    )?;
    for r in rows.iter().filter(|r| r.state == State::Draining) {
        let at = r.state_since_ms as f64 / 1000.0;
        ConstGauge::new(at).encode(m.encode_family(&[("backend", r.name.as_str())])?)?;
    }
    Ok(())
}

/// The service families, each service's live count summed over the rows.
fn services(e: &mut DescriptorEncoder, shared: &Shared, rows: &[Row]) -> fmt::Result {
    let mut m = e.encode_descriptor(
        "sluice_service_connections",
        "Live connections of the service in this process, connects in progress included.",
        None,
        MetricType::Gauge,
    )?;
    for s in &shared.services {
        let n: u64 = rows
            .iter()
            .flat_map(|r| &r.live)
            .filter(|(name, _)| **name == *s.name)
            .map(|(_, n)| n)
            .sum();
        gauge(&mut m, &[("service", &*s.name)], n as i64)?;
    }
    let mut m = e.encode_descriptor(
        "sluice_service_clients_refused",
        "Clients the service closed without a backend, by reason: limit (max_connections), no_backend (none took or answered), resources (sluice short of file descriptors), backend_full (every backend that takes connections at its max_connections), proxy_header (a malformed, cut short or slow PROXY header, with accept_proxy).",
        None,
        MetricType::Counter,
    )?;
    for s in &shared.services {
        for why in Reason::ALL {
            let labels = [("service", &*s.name), ("reason", why.as_str())];
            counter(&mut m, &labels, s.counts.refused_total(why))?;
        }
    }
    let mut m = e.encode_descriptor(
        "sluice_service_connection_duration_seconds",
        "How long the service's proxied connections lasted, from the backend pick to the close.",
        None,
        MetricType::Histogram,
    )?;
    for s in &shared.services {
        let d = s.counts.durations();
        m.encode_family(&[("service", &*s.name)])?
            .encode_histogram::<NoLabelSet>(d.sum_seconds, d.count, &d.buckets, None)?;
    }
    Ok(())
}

/// Reloads, the build, and the process's own figures.
fn process(e: &mut DescriptorEncoder, shared: &Shared) -> fmt::Result {
    let reloads = &shared.reloads;
    let mut m = e.encode_descriptor(
        "sluice_config_reloads",
        "Configuration reloads (SIGHUP or POST /reload), by result: applied (whole), refused (nothing applied).",
        None,
        MetricType::Counter,
    )?;
    for (result, n) in [("applied", &reloads.applied), ("refused", &reloads.refused)] {
        let n = n.load(Relaxed);
        counter(&mut m, &[("result", result)], n)?;
    }
    let mut m = e.encode_descriptor(
        "sluice_build_info",
        "Always 1; the version of the running sluice is its label.",
        None,
        MetricType::Gauge,
    )?;
    let version = crate::upgrade::version();
    gauge(&mut m, &[("version", version.as_str())], 1)?;

    if let Some(p) = Process::read() {
        p.encode(e)?;
    }
    Ok(())
}

/// One sample of the counter family `m`.
fn counter(
    m: &mut prometheus_client::encoding::MetricEncoder,
    labels: &impl EncodeLabelSet,
    v: u64,
) -> fmt::Result {
    ConstCounter::new(v).encode(m.encode_family(labels)?)
}

/// One sample of the gauge family `m`.
fn gauge(
    m: &mut prometheus_client::encoding::MetricEncoder,
    labels: &impl EncodeLabelSet,
    v: i64,
) -> fmt::Result {
    ConstGauge::new(v).encode(m.encode_family(labels)?)
}

/// The process's own figures, under the names every Prometheus client
/// library uses.
#[derive(Debug, Clone, PartialEq)]
struct Process {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: f64,
    open_fds: u64,
    max_fds: u64,
}

impl Process {
    /// Reads `/proc/self`; `None` where it cannot be read.
    fn read() -> Option<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf only reads its argument.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        Process::parse(&stat, &boot, &limits, open_fds, ticks as u64, page as u64)
    }

    /// The figures from the text of `/proc/self/stat`, `/proc/stat` and
    /// `/proc/self/limits` (see proc(5)).
    fn parse(
        stat: &str,
        boot: &str,
        limits: &str,
        open_fds: u64,
        ticks: u64,
        page: u64,
    ) -> Option<Process> {
        // The command name, in parentheses, may hold spaces and
        // parentheses: the fields are counted from the last `)`.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // proc(5) numbers the fields from 1, and the state is field 3.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let btime = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse::<u64>()
            .ok()?;
        let max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()?;
        let ticks_f = ticks as f64;
        Some(Process {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks_f,
            threads: field(20)?,
            start_time_seconds: btime as f64 + field(22)? as f64 / ticks_f,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds,
            max_fds,
        })
    }

    fn encode(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let m = e.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.cpu_seconds).encode(m)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                self.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                self.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                self.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                self.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                self.threads,
            ),
        ];
        for (name, help, v) in gauges {
            let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(m)?;
        }
        let m = e.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.start_time_seconds).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_by_field() {
        // A command name with a space and a parenthesis, as a process may
        // name itself.
        let stat = "4242 (sl (uice) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 150 0 0 20 0 7 0 \
                    5000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let p = Process::parse(stat, boot, limits, 12, 100, 4096).unwrap();
        assert_eq!(
            p,
            Process {
                cpu_seconds: 4.0,
                resident_bytes: 2048 * 4096,
                virtual_bytes: 123456789,
                threads: 7,
                start_time_seconds: 1700000050.0,
                open_fds: 12,
                max_fds: 1024,
            }
        );
    }

    #[test]
    fn this_process_can_be_read() {
        let p = Process::read().expect("/proc/self");
        assert!(p.open_fds > 0 && p.max_fds >= p.open_fds, "{p:?}");
        assert!(p.resident_bytes > 0 && p.threads > 0, "{p:?}");
    }
}
