//! Who may do what, decided before any route is looked at:
//!
//! 1. A client on the unix socket is let in: the socket file's owner,
//!    group and mode are its access control.
//! 2. `Host` must be a name of this API: a loopback name, the address the
//!    connection came in on, or one of `[admin] allowed_hosts`. A page
//!    that rebinds its own DNS name to 127.0.0.1 sends its own name, and is
//!    refused.
//! 3. With `[admin] token` set, `Authorization: Bearer` must carry it, or
//!    the `read_token`, which may only read; `GET /metrics` and `GET
//!    /healthz` need none when `open_metrics` and `open_healthz` say so.
//! 4. A request that changes state must not come from another site: a
//!    browser says so in `Sec-Fetch-Site` and `Origin`, and a page
//!    anywhere could otherwise post a form to the loopback API.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use hyper::header::{self, HeaderMap};
use hyper::{Method, StatusCode};
use subtle::ConstantTimeEq;

use super::{Peer, Refusal};
use crate::config::AdminConfig;

/// Who a request comes from, once let in: what the audit log names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The admin token.
    Admin,
    /// The read-only token.
    Reader,
    /// No token is configured (loopback only).
    Anyone,
    /// The unix socket, with the peer's user id.
    Socket(u32),
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Admin => write!(f, "admin token"),
            Who::Reader => write!(f, "read-only token"),
            Who::Anyone => write!(f, "no token"),
            Who::Socket(uid) => write!(f, "unix socket uid {uid}"),
        }
    }
}

/// Decides whether a request may go on.
pub(super) fn admit(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    peer: &Peer,
    local: Option<SocketAddr>,
    admin: &AdminConfig,
) -> Result<Who, Refusal> {
    if let Peer::Unix { uid } = peer {
        return Ok(Who::Socket(*uid));
    }
    let host = headers.get(header::HOST).map(|h| h.as_bytes());
    if let Some(host) = host
        && !own_host(host, local, admin)
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "Host `{}` is not a name of this admin API; if it is yours, add it to [admin] allowed_hosts",
                String::from_utf8_lossy(host)
            ),
        ));
    }
    let who = match &admin.token {
        // The dashboard page holds no data, and a browser cannot send a
        // token to load it: the page asks for the token itself.
        _ if method == Method::GET && path == "/" => Who::Anyone,
        None => Who::Anyone,
        // Scrapers and health checks that cannot send a token, if the
        // config lets them in.
        Some(_) if open_read(method, path, admin) => Who::Anyone,
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .map_or(&b""[..], |v| bearer(v.as_bytes()));
            if bool::from(given.ct_eq(token.as_bytes())) {
                Who::Admin
            } else if admin
                .read_token
                .as_ref()
                .is_some_and(|t| bool::from(given.ct_eq(t.as_bytes())))
            {
                Who::Reader
            } else {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token: send Authorization: Bearer TOKEN",
                ));
            }
        }
    };
    // A read from another site gets nothing the browser would show it, but
    // a page that opens streams by the dozen could hold every admin slot.
    if let Some(site) = headers.get("sec-fetch-site")
        && matches!(site.as_bytes(), b"cross-site" | b"same-site")
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "cross-site request refused: Sec-Fetch-Site is `{}`; call the API directly (curl, sluice ctl)",
                String::from_utf8_lossy(site.as_bytes())
            ),
        ));
    }
    if changes_state(method) {
        if let Some(why) = cross_site(headers, host) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "cross-site request refused: {why}; call the API directly (curl, sluice ctl)"
                ),
            ));
        }
        if who == Who::Reader {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "the read-only token cannot change state; use the admin token",
            ));
        }
    }
    Ok(who)
}

/// Whether this request reads a path the config serves without a token.
/// The path as the router reads it: a trailing `/` is the same path.
fn open_read(method: &Method, path: &str, admin: &AdminConfig) -> bool {
    if method != Method::GET {
        return false;
    }
    match path.trim_end_matches('/') {
        "/metrics" => admin.open_metrics,
        "/healthz" => admin.open_healthz,
        _ => false,
    }
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Why a browser's request comes from another site, if it does.
fn cross_site(headers: &HeaderMap, host: Option<&[u8]>) -> Option<String> {
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Some(format!(
            "Sec-Fetch-Site is `{}`",
            String::from_utf8_lossy(site.as_bytes())
        ));
    }
    let origin = headers.get(header::ORIGIN)?.as_bytes();
    // The page's own origin is `scheme://host[:port]`, and its host must be
    // the one the request was sent to.
    let authority = origin
        .windows(3)
        .position(|w| w == b"://")
        .map(|i| &origin[i + 3..]);
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => None,
        _ => Some(format!(
            "Origin `{}` is not this API",
            String::from_utf8_lossy(origin)
        )),
    }
}

/// Whether a `Host` value names this API.
fn own_host(host: &[u8], local: Option<SocketAddr>, admin: &AdminConfig) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = strip_port(host).to_ascii_lowercase();
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip.is_loopback() || ip == admin.listen.ip() || local.is_some_and(|l| l.ip() == ip);
    }
    admin.allowed_hosts.iter().any(|h| h == name)
}

/// `name:port`, `[v6]:port` or a bare name, without the port.
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The token of an `Authorization: Bearer TOKEN` value, as bytes (a value
/// that is not text compares unequal, it does not fail); empty if none.
fn bearer(value: &[u8]) -> &[u8] {
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return b"";
    };
    let (scheme, token) = value.split_at(space);
    if scheme.eq_ignore_ascii_case(b"bearer") {
        token.trim_ascii()
    } else {
        b""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn admin(token: Option<&str>) -> AdminConfig {
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:9000\"\n{}allowed_hosts = [\"lb.example.com\"]\n\
             [[service]]\nname = \"w\"\nlisten = \"127.0.0.1:80\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:81\"\n",
            token.map_or(String::new(), |t| format!(
                "token = \"{t}\"\nread_token = \"reader\"\n"
            ))
        );
        crate::config::Config::parse("t", &text).unwrap().admin
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn tcp() -> Peer {
        Peer::Tcp("127.0.0.1:5000".parse().unwrap())
    }

    fn status(r: Result<Who, Refusal>) -> Result<Who, u16> {
        r.map_err(|e| e.status.as_u16())
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer s3cret"), b"s3cret");
        assert_eq!(bearer(b"bearer  s3cret "), b"s3cret");
        assert_eq!(bearer(b"Basic s3cret"), b"");
        assert_eq!(bearer(b"s3cret"), b"");
        assert_eq!(bearer("Bearer s\u{e9}".as_bytes()), "s\u{e9}".as_bytes());
    }

    #[test]
    fn hosts_of_this_api_only() {
        let a = admin(None);
        let local = Some("127.0.0.1:9000".parse().unwrap());
        for ok in [
            "127.0.0.1:9000",
            "localhost:9000",
            "LOCALHOST",
            "[::1]:9000",
            "lb.example.com:9000",
        ] {
            let h = headers(&[("host", ok)]);
            assert_eq!(
                status(admit(&Method::GET, "/backends", &h, &tcp(), local, &a)),
                Ok(Who::Anyone),
                "{ok}"
            );
        }
        for bad in [
            "evil.example:9000",
            "evil.example",
            "10.1.2.3:9000",
            "127.0.0.1.evil.example",
        ] {
            let h = headers(&[("host", bad)]);
            assert_eq!(
                status(admit(&Method::GET, "/backends", &h, &tcp(), local, &a)),
                Err(403),
                "{bad}"
            );
        }
        // Listening on every address: the address a client reached is ours.
        let h = headers(&[("host", "10.1.2.3:9000")]);
        let local = Some("10.1.2.3:9000".parse().unwrap());
        assert_eq!(
            status(admit(&Method::GET, "/backends", &h, &tcp(), local, &a)),
            Ok(Who::Anyone)
        );
    }

    #[test]
    fn the_dashboard_page_needs_no_token_but_its_host_is_checked() {
        let a = admin(Some("s3cret"));
        let page = |host: &str| {
            status(admit(
                &Method::GET,
                "/",
                &headers(&[("host", host)]),
                &tcp(),
                None,
                &a,
            ))
        };
        assert_eq!(page("127.0.0.1:9000"), Ok(Who::Anyone));
        assert_eq!(page("evil.example"), Err(403));
        let data = admit(
            &Method::GET,
            "/backends",
            &headers(&[("host", "127.0.0.1:9000")]),
            &tcp(),
            None,
            &a,
        );
        assert_eq!(status(data), Err(401));
    }

    #[test]
    fn tokens_and_what_they_may_do() {
        let a = admin(Some("s3cret"));
        let with = |t: &str| headers(&[("host", "127.0.0.1:9000"), ("authorization", t)]);
        let get = |h: &HeaderMap| status(admit(&Method::GET, "/backends", h, &tcp(), None, &a));
        let post = |h: &HeaderMap| {
            status(admit(
                &Method::POST,
                "/backends/a/stop",
                h,
                &tcp(),
                None,
                &a,
            ))
        };
        assert_eq!(get(&with("Bearer s3cret")), Ok(Who::Admin));
        assert_eq!(post(&with("Bearer s3cret")), Ok(Who::Admin));
        assert_eq!(get(&with("Bearer reader")), Ok(Who::Reader));
        assert_eq!(post(&with("Bearer reader")), Err(403));
        assert_eq!(get(&with("Bearer nope")), Err(401));
        assert_eq!(get(&headers(&[("host", "127.0.0.1:9000")])), Err(401));
        let unix = Peer::Unix { uid: 0 };
        assert_eq!(
            status(admit(
                &Method::POST,
                "/backends/a/stop",
                &HeaderMap::new(),
                &unix,
                None,
                &a
            )),
            Ok(Who::Socket(0))
        );
    }

    #[test]
    fn metrics_and_healthz_open_only_as_configured() {
        let mut a = admin(Some("s3cret"));
        let h = headers(&[("host", "127.0.0.1:9000")]);
        let get =
            |path: &str, a: &AdminConfig| status(admit(&Method::GET, path, &h, &tcp(), None, a));
        assert_eq!(get("/metrics", &a), Err(401), "closed by default");
        assert_eq!(get("/healthz", &a), Err(401), "closed by default");
        a.open_metrics = true;
        assert_eq!(get("/metrics", &a), Ok(Who::Anyone));
        assert_eq!(get("/metrics/", &a), Ok(Who::Anyone));
        assert_eq!(get("/healthz", &a), Err(401), "each has its own switch");
        a.open_healthz = true;
        assert_eq!(get("/healthz", &a), Ok(Who::Anyone));
        assert_eq!(get("/backends", &a), Err(401), "nothing else opens");
        assert_eq!(get("/metricsx", &a), Err(401));
        let post = admit(&Method::POST, "/metrics", &h, &tcp(), None, &a);
        assert_eq!(status(post), Err(401), "only reads");
        let evil = headers(&[("host", "evil.example")]);
        let r = admit(&Method::GET, "/metrics", &evil, &tcp(), None, &a);
        assert_eq!(status(r), Err(403), "still only for this API's names");
    }

    #[test]
    fn state_changes_from_other_sites_are_refused() {
        let a = admin(None);
        let post = |pairs: &[(&'static str, &str)]| {
            let mut all = vec![("host", "127.0.0.1:9000")];
            all.extend_from_slice(pairs);
            status(admit(
                &Method::POST,
                "/backends/a/stop",
                &headers(&all),
                &tcp(),
                None,
                &a,
            ))
        };
        assert_eq!(post(&[]), Ok(Who::Anyone), "curl sends neither header");
        assert_eq!(post(&[("sec-fetch-site", "cross-site")]), Err(403));
        assert_eq!(post(&[("sec-fetch-site", "same-site")]), Err(403));
        assert_eq!(post(&[("sec-fetch-site", "same-origin")]), Ok(Who::Anyone));
        assert_eq!(post(&[("origin", "http://evil.example")]), Err(403));
        assert_eq!(post(&[("origin", "null")]), Err(403));
        assert_eq!(
            post(&[("origin", "http://127.0.0.1:9000")]),
            Ok(Who::Anyone)
        );
        // Reads from another site too: a page could hold every admin slot
        // with streams it cannot even read.
        let h = headers(&[("host", "127.0.0.1:9000"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(
            status(admit(&Method::GET, "/events", &h, &tcp(), None, &a)),
            Err(403)
        );
        let h = headers(&[
            ("host", "127.0.0.1:9000"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(
            status(admit(&Method::GET, "/events", &h, &tcp(), None, &a)),
            Ok(Who::Anyone)
        );
    }

    #[test]
    fn ports_come_off_host_names() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
