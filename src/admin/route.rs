//! Routing: a request's method, path and query turned into an [`Op`], or
//! into the refusal that names what is wrong. Pure, so it is unit-tested
//! without a server.

use std::time::Duration;

use hyper::{Method, StatusCode};
use percent_encoding::percent_decode_str;

use super::Refusal;
use crate::backend::DrainPolicy;
use crate::config::parse_duration;

/// Every route as (method, path template): the router's table. [`route`]
/// answers exactly these paths, and the match that turns each into its
/// [`Op`] is beside it. The OpenAPI document (`src/admin/openapi.json`)
/// must list exactly these, which `tests/openapi.rs` checks.
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/stats"),
    ("GET", "/services"),
    ("GET", "/backends"),
    ("GET", "/backends/{name}"),
    ("GET", "/backends/{name}/connections"),
    ("POST", "/backends/{name}/drain"),
    ("POST", "/backends/{name}/stop"),
    ("POST", "/backends/{name}/start"),
    ("GET", "/openapi.json"),
    ("POST", "/upgrade"),
    ("POST", "/reload"),
    ("POST", "/leave"),
    ("POST", "/join"),
    ("GET", "/metrics"),
    ("GET", "/events"),
];

/// The query parameters of `drain`, in the order their values are read.
const DRAIN_PARAMS: &[&str] = &["wait", "force_after", "close_idle"];

/// The query parameters of `leave`, in the order their values are read.
const LEAVE_PARAMS: &[&str] = &["wait", "force_after"];

/// The query parameters of the connection list.
const PAGE_PARAMS: &[&str] = &["limit", "after", "pid"];

/// Rows in a page of connections when `limit` is not given.
pub(crate) const DEFAULT_PAGE: usize = 1000;

/// The largest `limit`: a page's reply is built in one buffer.
pub(crate) const MAX_PAGE: usize = 10_000;

/// Which page of a backend's connections: rows after the cursor, in the
/// list's order (this process's by id, then a previous process's by pid
/// and id).
#[derive(Debug, PartialEq, Clone, Copy)]
pub(super) struct Page {
    pub limit: usize,
    /// The last row of the page before: its process (this one when
    /// `None`) and its id. `None` starts at the top.
    pub after: Option<(Option<u32>, u64)>,
}

impl Default for Page {
    fn default() -> Page {
        Page {
            limit: DEFAULT_PAGE,
            after: None,
        }
    }
}

/// What a request asks for, once routed and its parameters read.
#[derive(Debug, PartialEq)]
pub(super) enum Op {
    Healthz,
    /// The dashboard page.
    Dashboard,
    /// This API's OpenAPI document.
    OpenApi,
    Stats,
    Services,
    Backends,
    Backend(String),
    Connections {
        name: String,
        page: Page,
    },
    Drain {
        name: String,
        wait: Option<Duration>,
        policy: DrainPolicy,
    },
    Stop(String),
    Start(String),
    /// Hand over to a new process of `binary` (this process's own when
    /// `None`).
    Upgrade {
        binary: Option<std::path::PathBuf>,
    },
    /// Give up the floating address; close what is left after
    /// `force_after`.
    Leave {
        wait: Option<Duration>,
        force_after: Option<Duration>,
    },
    Join,
    /// Read the configuration file again and apply it, or refuse it.
    Reload,
    /// Prometheus text exposition of the counters.
    Metrics,
    /// The event stream, resumed after `last_event_id` if given (the
    /// `Last-Event-ID` header wins over the query).
    Events {
        last_event_id: Option<u64>,
    },
}

/// Routes a request to its operation; `exists` tells which backends do.
/// Checked in this order: a parameter given twice, the path, the backend,
/// the method, unknown parameters, then the values in the order the path
/// lists them.
pub(super) fn route(
    method: &Method,
    path: &str,
    query: &str,
    exists: impl Fn(&str) -> bool,
) -> Result<Op, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    for (i, (k, _)) in params.iter().enumerate() {
        if params[..i].iter().any(|(n, _)| n == k) {
            return Err(bad(format!("parameter `{k}` is given twice")));
        }
    }
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let no_path = || Refusal::new(StatusCode::NOT_FOUND, format!("no such path: {path}"));
    // The path's template: a backend's name becomes `{name}`. The name may
    // be percent-encoded, as `.` and `..` must be: clients resolve them
    // away as dot segments.
    let mut backend = None;
    let template = match parts.as_slice() {
        ["backends", raw, rest @ ..] => {
            let name = percent_decode_str(raw).decode_utf8_lossy();
            if !exists(&name) {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!("no backend is named `{name}`"),
                ));
            }
            backend = Some(name.into_owned());
            ["/backends/{name}"]
                .into_iter()
                .chain(rest.iter().flat_map(|r| ["/", r]))
                .collect::<String>()
        }
        [] => "/".to_string(),
        _ => parts.iter().flat_map(|p| ["/", p]).collect(),
    };
    let Some(&(allowed, _)) = ROUTES.iter().find(|(_, t)| *t == template) else {
        return Err(no_path());
    };
    if method.as_str() != allowed {
        return Err(Refusal {
            allow: Some(allowed),
            ..Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}; use {allowed}"),
            )
        });
    }
    let timed = matches!(template.as_str(), "/backends/{name}/drain" | "/leave");
    let accepted: &[&str] = match template.as_str() {
        "/backends/{name}/drain" => DRAIN_PARAMS,
        "/leave" => LEAVE_PARAMS,
        "/upgrade" => &["binary"],
        "/events" => &["last_event_id"],
        "/backends/{name}/connections" => PAGE_PARAMS,
        _ => &[],
    };
    if let Some((k, _)) = params.iter().find(|(k, _)| !accepted.contains(&k.as_str())) {
        let known = if accepted.is_empty() {
            "none".to_string()
        } else {
            accepted.join(", ")
        };
        return Err(bad(format!("unknown parameter `{k}` (accepted: {known})")));
    }
    let mut given = [None; 3];
    for (slot, k) in given.iter_mut().zip(if timed { accepted } else { &[] }) {
        if let Some((_, v)) = params.iter().find(|(n, _)| n == k) {
            *slot = Some(parse_duration(v).map_err(|e| bad(format!("{k}: {e}")))?);
        }
    }
    let name = || backend.clone().unwrap_or_default();
    // One arm for each of ROUTES.
    Ok(match template.as_str() {
        "/" => Op::Dashboard,
        "/healthz" => Op::Healthz,
        "/openapi.json" => Op::OpenApi,
        "/stats" => Op::Stats,
        "/services" => Op::Services,
        "/backends" => Op::Backends,
        "/backends/{name}" => Op::Backend(name()),
        "/backends/{name}/connections" => Op::Connections {
            name: name(),
            page: parse_page(&params).map_err(bad)?,
        },
        "/backends/{name}/stop" => Op::Stop(name()),
        "/backends/{name}/start" => Op::Start(name()),
        "/upgrade" => {
            let binary = params.iter().find(|(k, _)| k == "binary").map(|(_, v)| v);
            if let Some(b) = binary
                && !b.starts_with('/')
            {
                return Err(bad(format!("binary: `{b}` must be an absolute path")));
            }
            Op::Upgrade {
                binary: binary.map(std::path::PathBuf::from),
            }
        }
        "/backends/{name}/drain" => Op::Drain {
            name: name(),
            wait: given[0],
            policy: DrainPolicy {
                force_after: given[1],
                close_idle: given[2],
            },
        },
        "/leave" => Op::Leave {
            wait: given[0],
            force_after: given[1],
        },
        "/join" => Op::Join,
        "/reload" => Op::Reload,
        "/metrics" => Op::Metrics,
        "/events" => {
            let last = params.iter().find(|(k, _)| k == "last_event_id");
            let last_event_id = last
                .map(|(_, v)| parse_event_id(v).map_err(|e| bad(format!("last_event_id: {e}"))))
                .transpose()?;
            Op::Events { last_event_id }
        }
        // A route listed without an arm; the unit tests catch it.
        _ => return Err(no_path()),
    })
}

/// `limit`, `after` and `pid` of the connection list, each named in its
/// error.
fn parse_page(params: &[(String, String)]) -> Result<Page, String> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.trim());
    let limit = match get("limit") {
        None => DEFAULT_PAGE,
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| format!("limit: `{v}` is not a whole number from 1 to {MAX_PAGE}"))?,
    };
    let after = get("after")
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| format!("after: `{v}` is not a connection id (a whole number)"))
        })
        .transpose()?;
    let pid = get("pid")
        .map(|v| {
            v.parse::<u32>()
                .map_err(|_| format!("pid: `{v}` is not a process id (a whole number)"))
        })
        .transpose()?;
    // A pid alone starts at that process's first row.
    let after = match (pid, after) {
        (None, None) => None,
        (pid, after) => Some((pid, after.unwrap_or(0))),
    };
    Ok(Page { limit, after })
}

/// An event id, as `Last-Event-ID` or `?last_event_id=` gives it.
pub(super) fn parse_event_id(v: &str) -> Result<u64, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("`{v}` is not an event id (a whole number)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(method: Method, target: &str) -> Result<Op, Refusal> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        route(&method, path, query, |n| n == "web1")
    }

    fn refused(r: Result<Op, Refusal>) -> (u16, String) {
        let r = r.unwrap_err();
        (r.status.as_u16(), r.message)
    }

    /// The route of each operation. A match without a wildcard, so a new
    /// [`Op`] does not compile until it is given its route here; `route`
    /// reaches it only through [`ROUTES`], and the test below wants each
    /// listed route to give the operation of that route.
    fn route_of(op: &Op) -> (&'static str, &'static str) {
        match op {
            Op::Dashboard => ("GET", "/"),
            Op::Healthz => ("GET", "/healthz"),
            Op::OpenApi => ("GET", "/openapi.json"),
            Op::Stats => ("GET", "/stats"),
            Op::Services => ("GET", "/services"),
            Op::Backends => ("GET", "/backends"),
            Op::Backend(_) => ("GET", "/backends/{name}"),
            Op::Connections { .. } => ("GET", "/backends/{name}/connections"),
            Op::Drain { .. } => ("POST", "/backends/{name}/drain"),
            Op::Stop(_) => ("POST", "/backends/{name}/stop"),
            Op::Start(_) => ("POST", "/backends/{name}/start"),
            Op::Upgrade { .. } => ("POST", "/upgrade"),
            Op::Leave { .. } => ("POST", "/leave"),
            Op::Join => ("POST", "/join"),
            Op::Reload => ("POST", "/reload"),
            Op::Metrics => ("GET", "/metrics"),
            Op::Events { .. } => ("GET", "/events"),
        }
    }

    #[test]
    fn every_listed_route_routes_to_its_own_op() {
        for &(method, template) in ROUTES {
            let path = template.replace("{name}", "web1");
            let method: Method = method.parse().unwrap();
            let op = at(method.clone(), &path)
                .unwrap_or_else(|r| panic!("{method} {path}: {} {}", r.status, r.message));
            assert_eq!(route_of(&op), (method.as_str(), template), "{op:?}");
            // Any other method is refused, naming the listed one.
            let other = if method == Method::GET {
                Method::POST
            } else {
                Method::GET
            };
            let r = at(other, &path).unwrap_err();
            assert_eq!(
                (r.status, r.allow),
                (StatusCode::METHOD_NOT_ALLOWED, Some(method.as_str())),
                "{path}"
            );
        }
        let mut listed = ROUTES.to_vec();
        listed.sort();
        listed.dedup();
        assert_eq!(listed.len(), ROUTES.len(), "a route listed twice");
    }

    #[test]
    fn reads_and_actions() {
        assert_eq!(at(Method::GET, "/healthz"), Ok(Op::Healthz));
        assert_eq!(at(Method::GET, "/openapi.json"), Ok(Op::OpenApi));
        assert_eq!(at(Method::GET, "/stats/"), Ok(Op::Stats));
        assert_eq!(at(Method::GET, "/backends"), Ok(Op::Backends));
        assert_eq!(
            at(Method::GET, "/backends/web1"),
            Ok(Op::Backend("web1".into()))
        );
        assert_eq!(
            at(Method::GET, "/backends/web1/connections"),
            Ok(Op::Connections {
                name: "web1".into(),
                page: Page::default(),
            })
        );
        assert_eq!(
            at(Method::POST, "/backends/web1/stop"),
            Ok(Op::Stop("web1".into()))
        );
        assert_eq!(
            at(Method::POST, "/backends/web1/start"),
            Ok(Op::Start("web1".into()))
        );
    }

    #[test]
    fn events_resume_after_an_id() {
        assert_eq!(
            at(Method::GET, "/events"),
            Ok(Op::Events {
                last_event_id: None
            })
        );
        assert_eq!(
            at(Method::GET, "/events?last_event_id=42"),
            Ok(Op::Events {
                last_event_id: Some(42)
            })
        );
        assert_eq!(
            refused(at(Method::GET, "/events?last_event_id=x")),
            (
                400,
                "last_event_id: `x` is not an event id (a whole number)".into()
            )
        );
    }

    #[test]
    fn connections_come_in_pages() {
        let page = |q: &str| match at(Method::GET, &format!("/backends/web1/connections?{q}")) {
            Ok(Op::Connections { page, .. }) => Ok(page),
            Ok(op) => panic!("{op:?}"),
            Err(r) => Err((r.status.as_u16(), r.message)),
        };
        assert_eq!(
            page("limit=5&after=42"),
            Ok(Page {
                limit: 5,
                after: Some((None, 42)),
            })
        );
        assert_eq!(
            page("after=7&limit=10000&pid=4121"),
            Ok(Page {
                limit: MAX_PAGE,
                after: Some((Some(4121), 7)),
            })
        );
        assert_eq!(
            page("pid=4121"),
            Ok(Page {
                limit: DEFAULT_PAGE,
                after: Some((Some(4121), 0)),
            })
        );
        let limit = "limit: `{}` is not a whole number from 1 to 10000";
        for bad in ["0", "10001", "-1", "ten", ""] {
            assert_eq!(
                page(&format!("limit={bad}")),
                Err((400, limit.replace("{}", bad))),
                "limit={bad}"
            );
        }
        assert_eq!(
            page("after=x"),
            Err((
                400,
                "after: `x` is not a connection id (a whole number)".into()
            ))
        );
        assert_eq!(
            page("after=-3"),
            Err((
                400,
                "after: `-3` is not a connection id (a whole number)".into()
            ))
        );
        assert_eq!(
            page("pid=me"),
            Err((400, "pid: `me` is not a process id (a whole number)".into()))
        );
        assert_eq!(
            page("offset=3"),
            Err((
                400,
                "unknown parameter `offset` (accepted: limit, after, pid)".into()
            ))
        );
        assert_eq!(
            page("limit=1&limit=2"),
            Err((400, "parameter `limit` is given twice".into()))
        );
    }

    #[test]
    fn backend_names_may_be_percent_encoded() {
        let route = |path| route(&Method::GET, path, "", |n| n == ".." || n == "web.1");
        // `..` must be sent encoded, or clients resolve it away: curl turns
        // `/backends/..` into `/`.
        assert_eq!(route("/backends/%2E%2E"), Ok(Op::Backend("..".into())));
        assert_eq!(route("/backends/%2e%2e"), Ok(Op::Backend("..".into())));
        assert_eq!(route("/backends/web%2E1"), Ok(Op::Backend("web.1".into())));
        assert_eq!(route("/backends/web.1"), Ok(Op::Backend("web.1".into())));
        assert_eq!(
            refused(route("/backends/web%2F1")),
            (404, "no backend is named `web/1`".into())
        );
        assert_eq!(
            refused(route("/backends/%FF")),
            (404, "no backend is named `\u{fffd}`".into()),
            "not UTF-8: no name matches"
        );
    }

    #[test]
    fn drain_reads_its_durations_percent_decoded() {
        let s = |x| Some(Duration::from_secs(x));
        assert_eq!(
            at(
                Method::POST,
                "/backends/web1/drain?wait=5s&force_after=1m&close_idle=%32s"
            ),
            Ok(Op::Drain {
                name: "web1".into(),
                wait: s(5),
                policy: DrainPolicy {
                    force_after: s(60),
                    close_idle: s(2),
                },
            })
        );
        assert_eq!(
            at(Method::POST, "/backends/web1/drain"),
            Ok(Op::Drain {
                name: "web1".into(),
                wait: None,
                policy: DrainPolicy::default(),
            })
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        assert_eq!(
            refused(at(Method::GET, "/nope")),
            (404, "no such path: /nope".into())
        );
        assert_eq!(
            refused(at(Method::POST, "/backends/web2/drain")),
            (404, "no backend is named `web2`".into()),
            "an unknown backend before the method"
        );
        assert_eq!(
            refused(at(Method::GET, "/backends/web1/bogus")),
            (404, "no such path: /backends/web1/bogus".into())
        );
        let r = at(Method::GET, "/backends/web1/drain").unwrap_err();
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.allow, Some("POST"));
        assert_eq!(
            refused(at(Method::POST, "/backends/web1/drain?wait=1s&wait=2s")),
            (400, "parameter `wait` is given twice".into())
        );
        assert_eq!(
            refused(at(Method::POST, "/backends/web1/drain?speed=1s")),
            (
                400,
                "unknown parameter `speed` (accepted: wait, force_after, close_idle)".into()
            )
        );
        assert_eq!(
            refused(at(Method::GET, "/backends?x=1")),
            (400, "unknown parameter `x` (accepted: none)".into())
        );
        assert_eq!(
            refused(at(Method::GET, "/nope?a=1&a=2")),
            (400, "parameter `a` is given twice".into()),
            "a repeated parameter before the path"
        );
        assert_eq!(
            refused(at(Method::POST, "/backends/web1/drain?wait=bad&speed=1s")),
            (
                400,
                "unknown parameter `speed` (accepted: wait, force_after, close_idle)".into()
            ),
            "unknown parameters before values"
        );
        let (_, message) = refused(at(Method::POST, "/backends/web1/drain?close_idle=x&wait=y"));
        assert!(
            message.starts_with("wait: "),
            "values in the path's order: {message}"
        );
        let (status, message) = refused(at(Method::POST, "/backends/web1/drain?wait=soon"));
        assert_eq!(status, 400);
        assert!(
            message.starts_with("wait: `soon` is not a duration"),
            "{message}"
        );
    }
}
