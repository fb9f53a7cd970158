//! The OpenAPI document (`src/admin/openapi.json`) held to the real API:
//! its paths are the router's routes, it is what `GET /openapi.json`
//! serves, every operation answers a running sluice with a status the
//! document lists for it and a body its schema accepts, every status it
//! lists is one the operation really gives, and the wire types of
//! `sluice::api` match their schemas field for field.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FILE: &str = include_str!("../src/admin/openapi.json");

fn doc() -> Value {
    serde_json::from_str(FILE).expect("src/admin/openapi.json is JSON")
}

/// Follows a local `$ref` (`#/components/...`), if `v` is one.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("only local references");
            resolve(doc, doc.pointer(pointer).unwrap_or_else(|| panic!("{r}")))
        }
        None => v,
    }
}

/// (method, path template) as ROUTES spells them.
type Key = (String, String);

/// One documented operation.
struct Operation {
    /// Its parameters, the path item's and its own, resolved.
    params: Vec<Value>,
    responses: BTreeMap<u16, Value>,
}

impl Operation {
    fn statuses(&self) -> BTreeSet<u16> {
        self.responses.keys().copied().collect()
    }

    fn query_params(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The path with each parameter's documented example.
    fn example_path(&self, template: &str) -> String {
        let mut path = template.to_string();
        for p in self.params.iter().filter(|p| p["in"] == "path") {
            let name = p["name"].as_str().unwrap();
            let example = p["example"]
                .as_str()
                .expect("a path parameter has an example");
            path = path.replace(&format!("{{{name}}}"), example);
        }
        path
    }
}

fn operations(doc: &Value) -> BTreeMap<Key, Operation> {
    let mut ops = BTreeMap::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        let shared: Vec<Value> = item
            .get("parameters")
            .and_then(Value::as_array)
            .map_or(Vec::new(), |ps| {
                ps.iter().map(|p| resolve(doc, p).clone()).collect()
            });
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let mut params = shared.clone();
            if let Some(own) = op.get("parameters").and_then(Value::as_array) {
                params.extend(own.iter().map(|p| resolve(doc, p).clone()));
            }
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {template}: no responses"))
                .iter()
                .map(|(status, r)| {
                    let status = status.parse().expect("numeric statuses only");
                    (status, resolve(doc, r).clone())
                })
                .collect();
            ops.insert(
                (method.to_uppercase(), template.clone()),
                Operation { params, responses },
            );
        }
    }
    ops
}

/// A validator for `schema`, whose `#/components/...` references resolve
/// in the document. OpenAPI 3.1 schemas are JSON Schema 2020-12.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
    });
    for (k, v) in schema.as_object().expect("a schema object") {
        root[k] = v.clone();
    }
    jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("schema {schema}: {e}"))
}

fn assert_valid(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let validator = validator(doc, schema);
    let errors = validator.iter_errors(instance).into_errors();
    assert!(
        errors.is_empty(),
        "{what}: {instance}\ndoes not match {schema}:\n{errors}"
    );
}

/// A reply: status, headers (names lowercased) and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection. `Host` is the address dialled
/// unless `headers` gives one; `body_head` is sent after the head as is.
async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body_head: &str,
) -> Reply {
    within("admin request", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {addr}\r\n"));
        }
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body_head);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        // To the end, except an event stream, which has none: up to the
        // end of its first frame.
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
            if let Some((head, body)) = text.split_once("\r\n\r\n")
                && head.contains("content-type: text/event-stream")
                && body.contains("\n\n")
            {
                break;
            }
        }
        let raw = String::from_utf8(raw).expect("a text reply");
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{method} {target}: no reply head in {raw:?}"));
        let mut lines = head.lines();
        let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
        Reply {
            status: status.parse().unwrap(),
            headers: lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
            body: body.to_string(),
        }
    })
    .await
}

/// Holds each reply to the document, and remembers which statuses each
/// operation gave.
struct Checker {
    doc: Value,
    ops: BTreeMap<Key, Operation>,
    seen: BTreeMap<Key, BTreeSet<u16>>,
}

impl Checker {
    fn new() -> Checker {
        let doc = doc();
        let ops = operations(&doc);
        Checker {
            doc,
            ops,
            seen: BTreeMap::new(),
        }
    }

    fn keys(&self) -> Vec<Key> {
        self.ops.keys().cloned().collect()
    }

    /// Sends `target` for the operation `key` and checks the reply: a
    /// status the document lists for the operation, its content type (JSON
    /// but for `/metrics`), and a body that the schema of that status
    /// accepts.
    async fn call(
        &mut self,
        addr: SocketAddr,
        key: &Key,
        target: &str,
        headers: &[(&str, &str)],
        body_head: &str,
    ) -> Reply {
        let reply = send(addr, &key.0, target, headers, body_head).await;
        let what = format!("{} {target} ({} {})", key.0, key.0, key.1);
        let op = &self.ops[key];
        let response = op.responses.get(&reply.status).unwrap_or_else(|| {
            panic!(
                "{what}: status {} is not documented (documented: {:?}); body {}",
                reply.status,
                op.statuses(),
                reply.body
            )
        });
        self.check_body(response, &reply, &what);
        // A Link header must be documented, and look as documented.
        if let Some(link) = reply.header("link") {
            let schema = &response["headers"]["Link"]["schema"];
            assert!(schema.is_object(), "{what}: Link is not documented");
            let link = Value::String(link.to_string());
            assert_valid(&self.doc, schema, &link, &format!("{what} Link"));
        }
        self.seen
            .entry(key.clone())
            .or_default()
            .insert(reply.status);
        reply
    }

    fn check_body(&self, response: &Value, reply: &Reply, what: &str) {
        // The one reply that is not JSON: the dashboard's page.
        if response["content"].get("text/html").is_some() {
            assert_eq!(
                reply.header("content-type"),
                Some("text/html; charset=utf-8"),
                "{what}"
            );
            assert!(reply.body.contains("<title>sluice</title>"), "{what}");
            return;
        }
        // A text reply (`GET /metrics`): its media type, and a body its
        // schema accepts as a string.
        if let Some(text) = response["content"].get("text/plain") {
            let ct = reply.header("content-type").unwrap_or_default();
            assert!(ct.starts_with("text/plain;"), "{what}: {reply:?}");
            let body = Value::String(reply.body.clone());
            let what = format!("{what} {}", reply.status);
            assert_valid(&self.doc, &text["schema"], &body, &what);
            return;
        }
        if reply.header("content-type") == Some("text/event-stream") {
            assert!(
                response["content"]["text/event-stream"].is_object(),
                "{what}: an event stream where none is documented"
            );
            // The stream's first frame (after its chunk size).
            assert!(
                reply.body.contains(": sluice events\nretry: 1000\n\n"),
                "{what}: {reply:?}"
            );
            return;
        }
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{what}: {reply:?}"
        );
        let schema = &response["content"]["application/json"]["schema"];
        let body: Value = serde_json::from_str(&reply.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {}", reply.body));
        assert_valid(
            &self.doc,
            schema,
            &body,
            &format!("{what} {}", reply.status),
        );
    }

    fn key(&self, method: &str, template: &str) -> Key {
        let key = (method.to_string(), template.to_string());
        assert!(
            self.ops.contains_key(&key),
            "{method} {template} is not documented"
        );
        key
    }
}

#[test]
fn document_paths_are_the_routes() {
    let doc = doc();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "the document is OpenAPI 3.1, whose schemas are JSON Schema 2020-12"
    );
    assert_eq!(
        doc["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "info.version is the crate's version"
    );
    let documented: BTreeSet<Key> = operations(&doc).into_keys().collect();
    let routed: BTreeSet<Key> = sluice::admin::routes()
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, routed,
        "the document's operations (left) and the router's ROUTES (right)"
    );
    // Every reference in the document leads somewhere.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        assert!(doc.pointer(&r[1..]).is_some(), "dangling $ref {r}");
    }
}

#[test]
fn every_event_matches_its_schema() {
    use sluice::events::{Event, Kind};
    let doc = doc();
    let schema = json!({ "$ref": "#/components/schemas/Event" });
    let s = |x: &str| x.to_string();
    // Each kind with every optional field, and without.
    let kinds = [
        Kind::State {
            backend: s("web1"),
            from: s("active"),
            to: s("draining"),
            live: 3,
        },
        Kind::Health {
            backend: s("web1"),
            up: false,
            why: s("3 health checks failed in a row"),
        },
        Kind::Progress {
            backend: s("web1"),
            live: 2,
            idle: 1,
        },
        Kind::Drained {
            backend: s("web1"),
            after_ms: 1500,
        },
        Kind::Removed { backend: s("web1") },
        Kind::Reload {
            result: s("applied"),
            error: None,
            added: vec![s("web3")],
            removed: vec![s("web2")],
        },
        Kind::Reload {
            result: s("applied"),
            error: None,
            added: Vec::new(),
            removed: Vec::new(),
        },
        Kind::Reload {
            result: s("refused"),
            error: Some(s("admin.listen changed")),
            added: Vec::new(),
            removed: Vec::new(),
        },
        Kind::Refused {
            service: s("web"),
            reason: s("no_backend"),
            count: 7,
        },
        Kind::Leave { live: 4 },
        Kind::Join {},
        Kind::Cluster {
            connected: false,
            error: Some(s("etcd does not answer")),
        },
        Kind::Cluster {
            connected: true,
            error: None,
        },
        Kind::Shutdown {
            reason: s("upgrade"),
        },
        Kind::Gap {
            requested: 7,
            first: 1_795_876_660_221_001,
        },
    ];
    let mut named = BTreeSet::new();
    for kind in kinds {
        named.insert(kind.name());
        let e = json!(Event {
            id: 1_795_876_660_221_005,
            time_ms: 1_795_876_660_222,
            kind,
        });
        assert_valid(&doc, &schema, &e, "Event");
        // What ctl reads back is what was sent.
        let back: Event = serde_json::from_value(e.clone()).unwrap();
        assert_eq!(json!(back), e);
    }
    // The document names exactly these kinds, each once.
    let documented: BTreeSet<&str> = doc["components"]["schemas"]["Event"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["properties"]["type"]["const"].as_str().unwrap())
        .collect();
    assert_eq!(documented, named);
    // A field it does not document is refused.
    let extra = json!({"id": 1, "type": "join", "time_ms": 2, "extra": 3});
    assert!(
        validator(&doc, &schema)
            .iter_errors(&extra)
            .next()
            .is_some()
    );
}

#[test]
fn wire_types_match_their_schemas() {
    use sluice::api::*;
    use sluice::backend::State;
    let doc = doc();
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let backend = |state, saved: Option<bool>, instances| BackendView {
        name: "web1".into(),
        address: "127.0.0.1:8081".into(),
        state,
        healthy: true,
        health_checked: true,
        weight: u32::MAX,
        effective_weight: saved.map(|_| 0.25),
        slow_start: saved.map(|_| "30s".into()),
        max_connections: saved.map(|_| 100),
        backup: saved.is_some(),
        send_proxy: saved.map(|_| sluice::config::ProxyVersion::V2),
        active_connections: 3,
        idle_connections: 2,
        total_connections: u64::MAX,
        connect_failures: 0,
        bytes_in: 1,
        bytes_out: 2,
        bytes_spliced: 3,
        state_since_ms: 1_795_876_660_221,
        health_since_ms: 1_795_876_660_150,
        last_ok_check_ms: 0,
        services: vec!["web".into()],
        down_reason: saved.map(|_| "3 health checks failed in a row, last: refused".into()),
        closed: saved.map(|_| 2),
        saved,
        instances,
    };
    let counts = vec![
        InstanceCount {
            instance: "lb1".into(),
            state: State::Draining,
            active_connections: 1,
        },
        InstanceCount {
            instance: "lb2".into(),
            state: State::Drained,
            active_connections: 0,
        },
    ];
    let cluster = ClusterView {
        name: "shop".into(),
        instance: "lb1".into(),
        connected: false,
        instances: vec!["lb1".into(), "lb2".into()],
    };
    let healthz =
        |problems: Vec<String>, time_ms, previous, leaving_since_ms, cluster, left| HealthzView {
            status: "degraded".into(),
            problems,
            time_ms,
            pid: 42,
            version: "0.1.0".into(),
            commit: "6911a12e2ce0".into(),
            started_ms: 1_795_876_660_000,
            previous,
            active_connections: 3,
            leaving_since_ms,
            cluster,
            left,
        };
    let previous = |exited_ms| PreviousView {
        pid: 41,
        version: "0.1.0".into(),
        connections: 3,
        exited_ms,
    };
    // (schema, the value with every optional field, the value with none)
    let cases = [
        (
            "BackendView",
            json!(backend(State::Active, Some(true), counts.clone())),
            json!(backend(State::Active, None, Vec::new())),
        ),
        ("InstanceCount", json!(counts[0].clone()), Value::Null),
        ("ClusterView", json!(cluster.clone()), Value::Null),
        (
            "HealthzView",
            json!(healthz(
                vec!["state file".into()],
                Some(1),
                Some(previous(Some(2))),
                Some(1_795_876_660_100),
                Some(cluster.clone()),
                Some(false)
            )),
            json!(healthz(Vec::new(), None, None, None, None, None)),
        ),
        (
            "ServiceView",
            json!(ServiceView {
                name: "web".into(),
                listen: "0.0.0.0:80".into(),
                balance: "source-hash".into(),
                affinity: Some("network".into()),
                backends: vec!["web1".into(), "web2".into(), "spare".into()],
                backups: vec!["spare".into()],
                accept_proxy: Some("5s".into()),
                refused: [
                    ("limit", 1),
                    ("no_backend", 2),
                    ("resources", 3),
                    ("backend_full", 4),
                    ("proxy_header", 5)
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            }),
            json!(ServiceView {
                name: "web".into(),
                listen: "127.0.0.1:8080".into(),
                balance: "round-robin".into(),
                affinity: None,
                backends: vec!["web1".into()],
                backups: Vec::new(),
                accept_proxy: None,
                refused: [
                    ("limit", 0),
                    ("no_backend", 0),
                    ("resources", 0),
                    ("backend_full", 0),
                    ("proxy_header", 0)
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            }),
        ),
        (
            "LeaveView",
            json!(LeaveView {
                leaving: true,
                since_ms: Some(1_795_876_660_100),
                active_connections: 2,
                left: false,
            }),
            json!(LeaveView {
                leaving: false,
                since_ms: None,
                active_connections: 0,
                left: false,
            }),
        ),
        (
            "PreviousView",
            json!(previous(Some(2))),
            json!(previous(None)),
        ),
        (
            "UpgradeView",
            json!(UpgradeView {
                old_pid: 41,
                old_version: "0.1.0".into(),
                new_pid: 42,
                new_version: "0.1.0".into(),
                connections_left: 3,
            }),
            Value::Null,
        ),
        (
            "ConnView",
            json!(ConnView {
                id: 7,
                client: "127.0.0.1:50000".into(),
                service: "web".into(),
                age_ms: 10,
                idle_ms: 5,
                bytes_in: 1,
                bytes_out: 2,
                pid: 42,
            }),
            Value::Null,
        ),
        (
            "StatsView",
            json!(StatsView {
                abandoned: 0,
                accept_errors: 1,
                accepted: 2,
                active_connections: 3,
                admin_rejected: 4,
                admin_unauthorized: 5,
                established: 6,
                rejected_limit: 7,
                rejected_proxy_header: 12,
                rejected_no_backend: 8,
                rejected_backend_full: 12,
                rejected_resources: 9,
                state_file_failures: 10,
                resource_shortages: 11,
            }),
            Value::Null,
        ),
        (
            "ReloadView",
            json!(ReloadView {
                result: "refused".into(),
                file: "/etc/sluice/sluice.toml".into(),
                added: vec!["web3".into()],
                removed: vec!["web1".into()],
                error: Some("/etc/sluice/sluice.toml:9: backend[1].address: no port".into()),
                line: Some(9),
                field: Some("backend[1].address".into()),
                needs_restart: vec![RestartView {
                    field: "workers".into(),
                    from: "2".into(),
                    to: "4".into(),
                }],
            }),
            json!(ReloadView {
                result: "applied".into(),
                file: "sluice.toml".into(),
                added: Vec::new(),
                removed: Vec::new(),
                error: None,
                line: None,
                field: None,
                needs_restart: Vec::new(),
            }),
        ),
        (
            "ErrorView",
            json!(ErrorView { error: "no".into() }),
            Value::Null,
        ),
    ];
    for (name, full, least) in cases {
        let s = &doc["components"]["schemas"][name];
        let keys =
            |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
        let strings = |v: &Value| -> BTreeSet<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            keys(&s["properties"]),
            keys(&full),
            "{name}: documented properties (left), serialized fields (right)"
        );
        let least = if least.is_null() { &full } else { &least };
        assert_eq!(
            strings(&s["required"]),
            keys(least),
            "{name}: documented required fields (left), fields always serialized (right)"
        );
        assert_valid(&doc, &schema(name), &full, name);
        assert_valid(&doc, &schema(name), least, name);
    }
    for state in [
        State::Active,
        State::Draining,
        State::Drained,
        State::Stopped,
    ] {
        assert_valid(
            &doc,
            &schema("BackendView"),
            &json!(backend(state, None, Vec::new())),
            "each state",
        );
    }
    for status in ["ok", "degraded", "leaving", "shutting down"] {
        let v = json!(HealthzView {
            status: status.into(),
            problems: Vec::new(),
            time_ms: None,
            pid: 1,
            version: "0.1.0".into(),
            commit: "unknown".into(),
            started_ms: 0,
            previous: None,
            active_connections: 0,
            leaving_since_ms: None,
            cluster: None,
            left: None,
        });
        assert_valid(&doc, &schema("HealthzView"), &v, "each healthz status");
    }
    // The duration grammar is the config's: what the pattern takes parses.
    let duration = schema("Duration");
    for good in ["1500ms", "30s", "5m", "1h", "0s"] {
        assert_valid(&doc, &duration, &json!(good), "a duration");
        assert!(sluice::config::parse_duration(good).is_ok(), "{good}");
    }
    for bad in ["1d", "5", "s", "-1s", "1.5s", " 5s"] {
        assert!(
            !validator(&doc, &duration).is_valid(&json!(bad)),
            "{bad} is not a documented duration"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_is_the_file() {
    let a = Echo::start("web1").await;
    let lb = Sluice::start("", &[("web1", a.addr)]).await;
    let r = send(lb.admin, "GET", "/openapi.json", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(
        r.body == FILE,
        "GET /openapi.json is not src/admin/openapi.json"
    );
    lb.shutdown().await;
}

/// Every documented operation against a real sluice, in each way it can
/// answer; then the statuses seen must be exactly the documented ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented() {
    let mut c = Checker::new();
    let web1 = Echo::start("web1").await;
    let web2 = Echo::start("web2").await;
    let dir = tempfile::tempdir().unwrap();
    let top = format!(
        "shutdown_grace = \"10s\"\nstate_file = \"{}\"",
        dir.path().join("state.json").display()
    );
    // A short request timeout, to see 408 without waiting long.
    let text = config(
        &top,
        "request_timeout = \"300ms\"",
        &[("web1", web1.addr), ("web2", web2.addr)],
    );
    // From a file, so that `POST /reload` has one to read again.
    let (_file_dir, file) = write_config(&text);
    let lb = Sluice::from_file(&file).await;
    let admin = lb.admin;

    // Each operation as its examples give it: backend `web1`, every query
    // parameter. No client is connected yet, so a drain is over at once.
    for key in c.keys() {
        let op = &c.ops[&key];
        let path = op.example_path(&key.1);
        let query: Vec<String> = op
            .params
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| {
                format!(
                    "{}={}",
                    p["name"].as_str().unwrap(),
                    p["example"].as_str().unwrap()
                )
            })
            .collect();
        let target = if query.is_empty() {
            path
        } else {
            format!("{path}?{}", query.join("&"))
        };
        let r = c.call(admin, &key, &target, &[], "").await;
        if key == c.key("POST", "/upgrade") {
            // In-process, sluice was not started by `sluice run --config`:
            // it refuses, and serves on. tests/upgrade.rs hands over.
            assert_eq!(r.status, 409, "{r:?}");
            continue;
        }
        assert!(r.status < 300, "{key:?} as its examples give it: {r:?}");
    }
    let (status, _) = lb.post("/backends/web1/start").await;
    assert_eq!(status, 200);
    // The examples ran `leave` last (keys are in order); back in the pair.
    let join = c.key("POST", "/join");
    let r = c.call(admin, &join, "/join", &[], "").await;
    assert_eq!(r.status, 200, "{r:?}");

    // A client on web2, so that its connections are listed and a drain
    // without wait= is still under way (202).
    let (mut client, name) = loop {
        let (s, name) = lb.connect().await;
        if name == "web2" {
            break (s, name);
        }
    };
    echo(&mut client, b"hello").await;
    let conns = c.key("GET", "/backends/{name}/connections");
    let r = c
        .call(admin, &conns, "/backends/web2/connections", &[], "")
        .await;
    let listed: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{name}: {listed}");
    // A second client: a page of one names the next page, the last none.
    let mut second = loop {
        let (s, name) = lb.connect().await;
        if name == "web2" {
            break s;
        }
    };
    echo(&mut second, b"hello").await;
    let r = c
        .call(admin, &conns, "/backends/web2/connections?limit=1", &[], "")
        .await;
    let next = r.header("link").expect("a next page").to_string();
    let next = next[1..next.find('>').unwrap()].to_string();
    let r = c.call(admin, &conns, &next, &[], "").await;
    assert_eq!(r.header("link"), None, "{r:?}");
    let listed: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    drop(second);
    // Leaving with a client open: 202, and /healthz answers 503 `leaving`
    // until the join.
    let leave = c.key("POST", "/leave");
    let r = c.call(admin, &leave, "/leave", &[], "").await;
    assert_eq!(r.status, 202, "{r:?}");
    let healthz = c.key("GET", "/healthz");
    let r = c.call(admin, &healthz, "/healthz", &[], "").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("\"leaving\""), "{r:?}");
    let r = c.call(admin, &join, "/join", &[], "").await;
    assert_eq!(r.status, 200, "{r:?}");
    let drain = c.key("POST", "/backends/{name}/drain");
    let r = c.call(admin, &drain, "/backends/web2/drain", &[], "").await;
    assert_eq!(r.status, 202, "{r:?}");
    drop(client);
    let r = c
        .call(admin, &drain, "/backends/web2/drain?wait=20s", &[], "")
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let start = c.key("POST", "/backends/{name}/start");
    c.call(admin, &start, "/backends/web2/start", &[], "").await;

    // 422: a reload of a file that does not load, then of one that changes
    // what only a restart applies; the file as it was applies again.
    let reload = c.key("POST", "/reload");
    std::fs::write(&file, text.replace("[admin]", "[admin]\nbogus = 1")).unwrap();
    let r = c.call(admin, &reload, "/reload", &[], "").await;
    assert_eq!(r.status, 422, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (v["line"].as_u64(), v["field"].as_str()),
        (Some(4), Some("admin.bogus")),
        "{v}"
    );
    std::fs::write(
        &file,
        text.replace("shutdown_grace", "workers = 7\nshutdown_grace"),
    )
    .unwrap();
    let r = c.call(admin, &reload, "/reload", &[], "").await;
    assert_eq!(r.status, 422, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["needs_restart"][0]["field"], "workers", "{v}");
    std::fs::write(&file, &text).unwrap();
    let r = c.call(admin, &reload, "/reload", &[], "").await;
    assert_eq!(r.status, 200, "{r:?}");

    for key in c.keys() {
        let op = &c.ops[&key];
        let path = op.example_path(&key.1);
        let params = op.query_params();
        let post = key.0 == "POST";
        // 404: a backend that is not there.
        if key.1.contains("{name}") {
            let nope = key.1.replace("{name}", "nope");
            let r = c.call(admin, &key, &nope, &[], "").await;
            assert_eq!(r.status, 404, "{r:?}");
        }
        // 400: a parameter it does not take; the router names those it
        // does, which must be the documented ones.
        let r = c
            .call(admin, &key, &format!("{path}?bogus=1"), &[], "")
            .await;
        assert_eq!(r.status, 400, "{r:?}");
        let message: Value = serde_json::from_str(&r.body).unwrap();
        let (_, accepted) = message["error"]
            .as_str()
            .unwrap()
            .split_once("(accepted: ")
            .unwrap();
        let documented = if params.is_empty() {
            "none".to_string()
        } else {
            params.join(", ")
        };
        assert_eq!(
            accepted.trim_end_matches(')'),
            documented,
            "{key:?}: query parameters"
        );
        // 400: each documented parameter given a value that is no duration.
        for p in &params {
            let r = c
                .call(admin, &key, &format!("{path}?{p}=soon"), &[], "")
                .await;
            assert_eq!(r.status, 400, "{r:?}");
        }
        // 403: a Host that is not this API; for a change, another site.
        let r = c
            .call(admin, &key, &path, &[("Host", "evil.example")], "")
            .await;
        assert_eq!(r.status, 403, "{r:?}");
        if post {
            for h in [
                ("Sec-Fetch-Site", "cross-site"),
                ("Origin", "http://evil.example"),
            ] {
                let r = c.call(admin, &key, &path, &[h], "").await;
                assert_eq!(r.status, 403, "{h:?}: {r:?}");
            }
        }
        // 413: a body over the limit, refused by its length alone.
        let r = c
            .call(admin, &key, &path, &[("Content-Length", "5000")], "")
            .await;
        assert_eq!(r.status, 413, "{r:?}");
        // 408: a body that does not come within request_timeout.
        let r = c
            .call(admin, &key, &path, &[("Content-Length", "10")], "abc")
            .await;
        assert_eq!(r.status, 408, "{r:?}");
    }

    // 405: any other method on a documented path, with Allow naming the
    // documented one.
    let not_allowed = c.doc["components"]["responses"]["MethodNotAllowed"].clone();
    let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, p) in c.ops.keys() {
        by_path.entry(p.clone()).or_default().insert(m.clone());
    }
    for (template, methods) in &by_path {
        let path =
            c.ops[&(methods.first().unwrap().clone(), template.clone())].example_path(template);
        for m in ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"] {
            if methods.contains(m) {
                continue;
            }
            let r = send(admin, m, &path, &[], "").await;
            assert_eq!(r.status, 405, "{m} {path}: {r:?}");
            let allow: BTreeSet<String> = r
                .header("allow")
                .unwrap_or_else(|| panic!("{m} {path}: no Allow"))
                .split(',')
                .map(|s| s.trim().to_string())
                .collect();
            assert_eq!(&allow, methods, "{m} {path}: Allow");
            if m != "HEAD" {
                c.check_body(&not_allowed, &r, &format!("{m} {path}"));
            }
        }
    }

    // 503: /healthz once shutdown began, while a client holds it open.
    let (client, _) = lb.connect().await;
    let stopping = tokio::spawn(lb.shutdown());
    let healthz = c.key("GET", "/healthz");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = c.call(admin, &healthz, "/healthz", &[], "").await;
        if r.status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 503 from /healthz"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    stopping.await.unwrap();

    // 401 (and 403 for the read-only token's changes) with a token set.
    let lb = Sluice::from_toml(&config(
        "",
        "token = \"s3cret\"\nread_token = \"reader\"",
        &[("web1", web1.addr)],
    ))
    .await;
    for key in c.keys() {
        let path = c.ops[&key].example_path(&key.1);
        let r = c.call(lb.admin, &key, &path, &[], "").await;
        // An operation whose `security` is empty needs no token.
        let open = c.doc["paths"][&key.1][key.0.to_lowercase()]["security"]
            .as_array()
            .is_some_and(Vec::is_empty);
        if open {
            assert_eq!(r.status, 200, "{r:?}");
            continue;
        }
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = c
            .call(
                lb.admin,
                &key,
                &path,
                &[("Authorization", "Bearer reader")],
                "",
            )
            .await;
        if key.0 == "POST" {
            assert_eq!(r.status, 403, "{r:?}");
        } else {
            assert_eq!(r.status, 200, "{r:?}");
        }
    }
    // 409: a reload asked of a sluice that was not started from a file.
    let reload = c.key("POST", "/reload");
    let r = c
        .call(
            lb.admin,
            &reload,
            "/reload",
            &[("Authorization", "Bearer s3cret")],
            "",
        )
        .await;
    assert_eq!(r.status, 409, "{r:?}");
    lb.shutdown().await;

    // Every status the document lists, and only those, came back; a
    // successful upgrade, and a change refused during one, only where a
    // process can hand over (tests/upgrade.rs).
    for (key, op) in &c.ops {
        let mut documented = op.statuses();
        if *key == c.key("POST", "/upgrade") {
            documented.remove(&200);
        } else if key.0 == "POST" {
            // A change sent to a process that is handing over (for a
            // reload, also one not started from a file: seen above).
            if key.1 != "/reload" {
                documented.remove(&409);
            }
            // A change etcd cannot take, in cluster mode (tests/cluster.rs).
            documented.remove(&503);
        }
        assert_eq!(
            c.seen.get(key).cloned().unwrap_or_default(),
            documented,
            "{key:?}: statuses seen (left) and documented (right)"
        );
    }
}
