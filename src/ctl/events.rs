//! `sluice ctl events`: the event stream, one line per event, for a
//! person (`[10:14:02Z] web1: draining -> drained (0 live)`) or, with
//! `--json`, the API's JSON objects one per line for scripts. A stream
//! that ends (shutdown, an upgrade, a cut) is opened again with the last
//! id seen, so nothing kept is missed, and a `gap` says when something was.

use std::time::Duration;

use serde_json::Value;

use super::output::{err, out, out_closed, utc};
use super::{Client, CtlError, Outcome};

/// How long to wait before opening a stream that ended again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Prints events until interrupted. Fails only if the first connect does.
pub async fn events(c: &Client, json: bool) -> Result<Outcome, CtlError> {
    let mut stream = c.events(None).await?;
    let mut last = None;
    loop {
        while let Some((raw, e)) = stream.next().await {
            last = e["id"].as_u64().or(last);
            if json {
                out(&format!("{raw}\n"));
            } else {
                let at = utc(e["time_ms"].as_u64().unwrap_or(0) / 1000);
                out(&format!("[{at}] {}\n", describe(&e)));
            }
            if out_closed() {
                return Ok(Outcome::Done);
            }
        }
        err("event stream ended; reconnecting\n");
        let mut told = false;
        stream = loop {
            tokio::time::sleep(RECONNECT_EVERY).await;
            match c.events(last).await {
                Ok(s) => break s,
                Err(e) if !told => {
                    err(&format!("{e}; retrying every second\n"));
                    told = true;
                }
                Err(_) => {}
            }
        };
        if told {
            err("reconnected\n");
        }
    }
}

/// One event as a person reads it; an unknown kind as its JSON.
pub fn describe(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("?");
    let n = |k: &str| e[k].as_u64().unwrap_or(0);
    let names = |k: &str| {
        e[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
            .unwrap_or_default()
            .join(", ")
    };
    match s("type") {
        "state" => format!(
            "{}: {} -> {} ({} live)",
            s("backend"),
            s("from"),
            s("to"),
            n("live")
        ),
        "health" => format!(
            "{}: {} ({})",
            s("backend"),
            if e["up"] == true { "up" } else { "DOWN" },
            s("why")
        ),
        "progress" => format!(
            "{}: {} live connection(s), {} idle",
            s("backend"),
            n("live"),
            n("idle")
        ),
        "drained" => format!(
            "{}: drained after {:.1}s",
            s("backend"),
            n("after_ms") as f64 / 1000.0
        ),
        "removed" => format!("{}: removed by a reload, drained and gone", s("backend")),
        "reload" if s("result") == "applied" => {
            let mut line = "configuration reloaded".to_string();
            for (k, what) in [("added", "added"), ("removed", "removed, draining")] {
                let list = names(k);
                if !list.is_empty() {
                    line.push_str(&format!("; {what}: {list}"));
                }
            }
            line
        }
        "reload" => format!(
            "reload refused, the running configuration stays: {}",
            s("error")
        ),
        "refused" => format!(
            "{}: {} client(s) refused: {}",
            s("service"),
            n("count"),
            match s("reason") {
                "limit" => "max_connections reached",
                "no_backend" => "no backend took them",
                "resources" => "sluice was short of file descriptors or buffers",
                "proxy_header" => "their PROXY header was malformed, cut short or too slow",
                other => other,
            }
        ),
        "leave" => format!("leaving the pair; {} live connection(s) run on", n("live")),
        "join" => "joined the pair".to_string(),
        "cluster" if e["connected"] == true => "cluster: etcd answers again".to_string(),
        "cluster" => format!("cluster: etcd lost: {}", s("error")),
        "shutdown" if s("reason") == "upgrade" => {
            "sluice handed over to a new process (an upgrade)".to_string()
        }
        "shutdown" => "sluice is shutting down".to_string(),
        "gap" => format!(
            "events after id {} were missed; reread the state (`sluice ctl status`)",
            n("requested")
        ),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_kind_reads_as_one_line() {
        let cases = [
            (
                json!({"type": "state", "backend": "web1", "from": "draining", "to": "drained", "live": 0}),
                "web1: draining -> drained (0 live)",
            ),
            (
                json!({"type": "health", "backend": "web1", "up": false, "why": "3 health checks failed in a row"}),
                "web1: DOWN (3 health checks failed in a row)",
            ),
            (
                json!({"type": "progress", "backend": "web1", "live": 3, "idle": 1}),
                "web1: 3 live connection(s), 1 idle",
            ),
            (
                json!({"type": "drained", "backend": "web1", "after_ms": 1500}),
                "web1: drained after 1.5s",
            ),
            (
                json!({"type": "reload", "result": "applied", "added": ["web3"]}),
                "configuration reloaded; added: web3",
            ),
            (
                json!({"type": "reload", "result": "refused", "error": "bad"}),
                "reload refused, the running configuration stays: bad",
            ),
            (
                json!({"type": "refused", "service": "web", "reason": "limit", "count": 7}),
                "web: 7 client(s) refused: max_connections reached",
            ),
            (
                json!({"type": "cluster", "connected": false, "error": "timeout"}),
                "cluster: etcd lost: timeout",
            ),
            (json!({"type": "new", "x": 1}), r#"{"type":"new","x":1}"#),
        ];
        for (e, want) in cases {
            assert_eq!(describe(&e), want);
        }
    }
}
