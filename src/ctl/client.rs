//! The HTTP client of the admin API: the commands see typed replies and
//! [`CtlError`]s, never HTTP.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::CtlError;
use crate::api::{BackendView, ConnView};
use crate::config::format_duration;

/// Rows asked for in each page of connections.
const PAGE: usize = 1000;

/// The longest wait for one admin API reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The admin token: `--token`, else the file of `--token-file` (one
/// trailing newline trimmed), else `SLUICE_TOKEN` in the environment; an
/// empty `--token` or `SLUICE_TOKEN` is no token. Errors name where the
/// token came from and what is wrong with it.
pub fn read_token(flag: Option<String>, file: Option<&Path>) -> Result<Option<String>, CtlError> {
    let (token, from) = if let Some(t) = flag {
        (t.into_bytes(), "--token".to_string())
    } else if let Some(path) = file {
        let bytes = std::fs::read(path).map_err(|error| CtlError::TokenFile {
            path: path.to_path_buf(),
            error,
        })?;
        let from = format!("token file {}", path.display());
        let t = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let t = t.strip_suffix(b"\r").unwrap_or(t);
        if t.is_empty() {
            return Err(CtlError::BadToken {
                from,
                problem: "the file is empty".into(),
            });
        }
        (t.to_vec(), from)
    } else {
        match std::env::var_os("SLUICE_TOKEN") {
            Some(t) => (
                std::os::unix::ffi::OsStringExt::into_vec(t),
                "SLUICE_TOKEN".to_string(),
            ),
            None => return Ok(None),
        }
    };
    if token.is_empty() {
        return Ok(None);
    }
    check_token(&token).map_err(|problem| CtlError::BadToken { from, problem })?;
    // Checked: every byte is printable ASCII.
    Ok(Some(String::from_utf8_lossy(&token).into_owned()))
}

/// Whether `token` can be sent as `Authorization: Bearer TOKEN` and match
/// a token the server accepts: printable ASCII without spaces. HTTP
/// refuses control characters in a header; it lets other bytes above 127
/// through, but the server reads the header as ASCII and would answer 401.
fn check_token(token: &[u8]) -> Result<(), String> {
    let Some(i) = token.iter().position(|b| !b.is_ascii_graphic()) else {
        return Ok(());
    };
    let what = match token[i] {
        b'\n' => "a line feed".to_string(),
        b'\r' => "a carriage return".to_string(),
        b'\t' => "a tab".to_string(),
        b' ' => "a space".to_string(),
        b if b.is_ascii() => format!("a control character (byte 0x{b:02x})"),
        _ => "a non-ASCII character".to_string(),
    };
    Err(format!(
        "the token has {what} at byte {} of {}; it goes into an HTTP header, so it must be printable ASCII without spaces",
        i + 1,
        token.len()
    ))
}

/// Where the admin API is.
enum Endpoint {
    /// `host:port`.
    Tcp(String),
    /// The path of its unix socket.
    Unix(std::path::PathBuf),
}

/// A client of the admin API.
pub struct Client {
    endpoint: Endpoint,
    url: String,
    /// `Bearer TOKEN`, marked sensitive.
    auth: Option<HeaderValue>,
}

impl Client {
    /// A client of the admin API at `url` (`http://host:port`, or
    /// `unix:/path/of/admin.sock`); `host:port` without a scheme is
    /// taken as `http://`, as curl does. An empty token is no token.
    pub fn new(given: &str, token: Option<String>) -> Result<Client, CtlError> {
        let bad = || CtlError::BadUrl(given.to_string());
        // Written as the README's curl lines are, without a scheme.
        let url = if !given.contains("://") && !given.starts_with("unix:") {
            format!("http://{given}")
        } else {
            given.to_string()
        };
        let endpoint = if let Some(path) = url.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            Endpoint::Unix(path.into())
        } else {
            let rest = url.strip_prefix("http://").ok_or_else(bad)?;
            let authority = rest.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') {
                return Err(bad());
            }
            Endpoint::Tcp(authority.to_string())
        };
        let auth = match token.filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => {
                let bad = |problem| CtlError::BadToken {
                    from: "the admin token".into(),
                    problem,
                };
                check_token(t.as_bytes()).map_err(bad)?;
                let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|e| bad(e.to_string()))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(Client {
            endpoint,
            url: url.trim_end_matches('/').to_string(),
            auth,
        })
    }

    /// The admin API's URL, without a trailing `/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One request on its own connection; returns status and body. A
    /// silent server is given up on after [`REQUEST_TIMEOUT`], so that a
    /// wedged admin API cannot hang a rollout.
    async fn call(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), CtlError> {
        let (status, body, _) = self.call_linked(method, path).await?;
        Ok((status, body))
    }

    /// As [`Client::call`], with the target of the reply's `Link: <...>;
    /// rel="next"`, if it has one.
    async fn call_linked(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, Bytes, Option<String>), CtlError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_once(method, path))
            .await
            .unwrap_or_else(|_| {
                Err(CtlError::Http {
                    url: self.url.clone(),
                    message: format!("no answer within {}", format_duration(REQUEST_TIMEOUT)),
                })
            })
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, Bytes, Option<String>), CtlError> {
        let resp = self.send(method, path, None).await?;
        let status = resp.status();
        let next = resp
            .headers()
            .get_all(hyper::header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_link);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http_error(e))?
            .to_bytes();
        Ok((status, body, next))
    }

    fn http_error(&self, e: hyper::Error) -> CtlError {
        CtlError::Http {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    /// Sends one request on its own connection; the reply's body is read
    /// by the caller, as it comes.
    async fn send(
        &self,
        method: Method,
        path: &str,
        last_event_id: Option<u64>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CtlError> {
        let unreachable = |e| CtlError::Unreachable {
            url: self.url.clone(),
            error: e,
        };
        let http = |e: hyper::Error| CtlError::Http {
            url: self.url.clone(),
            message: e.to_string(),
        };
        let (mut sender, host) = match &self.endpoint {
            Endpoint::Tcp(authority) => {
                let stream = TcpStream::connect(authority).await.map_err(unreachable)?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(http)?;
                tokio::spawn(conn);
                (sender, authority.as_str())
            }
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(unreachable)?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(http)?;
                tokio::spawn(conn);
                (sender, "localhost")
            }
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if let Some(auth) = &self.auth {
            req = req.header(hyper::header::AUTHORIZATION, auth.clone());
        }
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| CtlError::Http {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        sender.send_request(req).await.map_err(http)
    }

    /// Opens `GET /events`, resuming after `last_event_id` if given. The
    /// wait for the reply's head is bounded; the stream itself is not.
    pub async fn events(&self, last_event_id: Option<u64>) -> Result<EventStream, CtlError> {
        let resp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.send(Method::GET, "/events", last_event_id),
        )
        .await
        .unwrap_or_else(|_| {
            Err(CtlError::Http {
                url: self.url.clone(),
                message: format!("no answer within {}", format_duration(REQUEST_TIMEOUT)),
            })
        })?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.http_error(e))?
                .to_bytes();
            return Err(self
                .decode::<serde_json::Value>(status, &body)
                .err()
                .unwrap_or_else(|| CtlError::Api {
                    status: status.as_u16(),
                    message: "not an event stream".into(),
                }));
        }
        Ok(EventStream {
            body: resp.into_body(),
            pending: Vec::new(),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, T), CtlError> {
        let (status, body) = self.call(method, path).await?;
        Ok((status, self.decode(status, &body)?))
    }

    /// A reply's JSON, or the error its status and body say.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        status: StatusCode,
        body: &[u8],
    ) -> Result<T, CtlError> {
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
            return Err(CtlError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(body).map_err(|e| CtlError::Http {
            url: self.url.clone(),
            message: format!("unexpected reply: {e}"),
        })
    }

    /// The server's clock, in Unix milliseconds.
    pub async fn server_time_ms(&self) -> Result<u64, CtlError> {
        self.healthz().await?.time_ms.ok_or_else(|| CtlError::Http {
            url: self.url.clone(),
            message: "GET /healthz gave no time_ms".into(),
        })
    }

    /// What keeps the balancer from being as configured (`/healthz`).
    pub async fn problems(&self) -> Result<Vec<String>, CtlError> {
        Ok(self.healthz().await?.problems)
    }

    /// `GET /stats`: what became of the clients.
    pub async fn stats(&self) -> Result<crate::api::StatsView, CtlError> {
        Ok(self.json(Method::GET, "/stats").await?.1)
    }

    /// `GET /services`: each service and how it chooses a backend.
    pub async fn services(&self) -> Result<Vec<crate::api::ServiceView>, CtlError> {
        Ok(self.json(Method::GET, "/services").await?.1)
    }

    pub async fn backends(&self) -> Result<Vec<BackendView>, CtlError> {
        Ok(self.json(Method::GET, "/backends").await?.1)
    }

    pub async fn backend(&self, name: &str) -> Result<BackendView, CtlError> {
        Ok(self
            .json(Method::GET, &format!("/backends/{name}"))
            .await?
            .1)
    }

    /// A backend's live connections, page after page as the `Link`
    /// headers lead, until the last page or `max` rows.
    pub async fn connections(
        &self,
        name: &str,
        max: Option<usize>,
    ) -> Result<Vec<ConnView>, CtlError> {
        let limit = max.map_or(PAGE, |m| m.clamp(1, PAGE));
        let whole = format!("/backends/{name}/connections");
        let mut path = format!("{whole}?limit={limit}");
        let mut all: Vec<ConnView> = Vec::new();
        loop {
            let (status, body, next) = self.call_linked(Method::GET, &path).await?;
            let page = match self.decode::<Vec<ConnView>>(status, &body) {
                // A sluice from before pages lists them all in one reply.
                Err(CtlError::Api {
                    status: 400,
                    message,
                }) if all.is_empty() && message.starts_with("unknown parameter `limit`") => {
                    path = whole.clone();
                    continue;
                }
                page => page?,
            };
            all.extend(page);
            if let Some(m) = max
                && all.len() >= m
            {
                all.truncate(m);
                return Ok(all);
            }
            match next {
                // A server naming the page it just gave would loop.
                Some(next) if next == path => {
                    return Err(CtlError::Http {
                        url: self.url.clone(),
                        message: format!("the next page is the same page: {next}"),
                    });
                }
                // Only a path on this API: the client knows no other host.
                Some(next) if next.starts_with('/') => path = next,
                Some(next) => {
                    return Err(CtlError::Http {
                        url: self.url.clone(),
                        message: format!("unexpected next page: {next}"),
                    });
                }
                None => return Ok(all),
            }
        }
    }

    /// Asks the running sluice to hand over to a new process of `binary`
    /// (its own binary when `None`).
    pub async fn upgrade(
        &self,
        binary: Option<&std::path::Path>,
    ) -> Result<crate::api::UpgradeView, CtlError> {
        let path = match binary {
            None => "/upgrade".to_string(),
            Some(b) => format!(
                "/upgrade?binary={}",
                form_urlencoded::byte_serialize(b.as_os_str().as_encoded_bytes())
                    .collect::<String>()
            ),
        };
        Ok(self.json(Method::POST, &path).await?.1)
    }

    /// The process answering, and the one it took over from. A 503 that
    /// says why (leaving, shutting down) is an answer too.
    pub async fn healthz(&self) -> Result<crate::api::HealthzView, CtlError> {
        self.answer_even_if(Method::GET, "/healthz", StatusCode::SERVICE_UNAVAILABLE)
            .await
    }

    /// The reply of `method path` as `T`, also when its status is `also`
    /// (an error status whose body still has that shape).
    async fn answer_even_if<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        also: StatusCode,
    ) -> Result<T, CtlError> {
        let (status, body) = self.call(method, path).await?;
        if status == also
            && let Ok(v) = serde_json::from_slice(&body)
        {
            return Ok(v);
        }
        self.decode(status, &body)
    }

    /// `POST /reload`: applied, or refused with why (a 422 is an answer
    /// too, with the fields at fault).
    pub async fn reload(&self) -> Result<crate::api::ReloadView, CtlError> {
        self.answer_even_if(Method::POST, "/reload", StatusCode::UNPROCESSABLE_ENTITY)
            .await
    }

    /// `POST /leave` or `POST /join`, with optional query.
    pub async fn leave_or_join(
        &self,
        action: &str,
        query: &[(&str, Option<Duration>)],
    ) -> Result<crate::api::LeaveView, CtlError> {
        Ok(self
            .json(Method::POST, &with_query(&format!("/{action}"), query))
            .await?
            .1)
    }

    /// POSTs an action (`drain`, `stop`, `start`) with optional query.
    pub async fn act(
        &self,
        name: &str,
        action: &str,
        query: &[(&str, Option<Duration>)],
    ) -> Result<BackendView, CtlError> {
        let path = with_query(&format!("/backends/{name}/{action}"), query);
        Ok(self.json(Method::POST, &path).await?.1)
    }
}

/// The events of `GET /events` as they come.
pub struct EventStream {
    body: hyper::body::Incoming,
    pending: Vec<u8>,
}

impl EventStream {
    /// The next event: its `data:` line (its JSON, as sent) and that JSON
    /// read, or `None` once the stream has ended (shutdown, an upgrade, or
    /// a broken connection).
    pub async fn next(&mut self) -> Option<(String, serde_json::Value)> {
        loop {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..i + 2).collect();
                let block = String::from_utf8_lossy(&block);
                // Comments and `retry:` carry no data.
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                if let Some(d) = data
                    && let Ok(v) = serde_json::from_str(d)
                {
                    return Some((d.to_string(), v));
                }
                continue;
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// The target of one `Link` header value's `rel="next"` link (RFC 8288),
/// if it has one.
fn next_link(value: &str) -> Option<String> {
    value.split(',').find_map(|link| {
        let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
        params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .any(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            })
            .then(|| target.to_string())
    })
}

/// `path` with the durations that are given as its query.
fn with_query(path: &str, query: &[(&str, Option<Duration>)]) -> String {
    let q: Vec<String> = query
        .iter()
        .filter_map(|(k, v)| v.map(|d| format!("{k}={}", format_duration(d))))
        .collect();
    if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        assert_eq!(
            next_link(r#"</backends/web1/connections?after=9&limit=2>; rel="next""#),
            Some("/backends/web1/connections?after=9&limit=2".into())
        );
        assert_eq!(
            next_link(r#"</a>; rel="prev", </b>; title="x"; rel="last next""#),
            Some("/b".into())
        );
        assert_eq!(next_link("</c>; rel=next"), Some("/c".into()));
        assert_eq!(next_link(r#"</a>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn urls() {
        assert!(Client::new("http://127.0.0.1:9000", None).is_ok());
        assert!(Client::new("http://127.0.0.1:9000/", None).is_ok());
        assert!(Client::new("unix:/run/sluice/admin.sock", None).is_ok());
        for bare in ["127.0.0.1:9000", "localhost:9000", "[::1]:9000/"] {
            let c = Client::new(bare, None).unwrap();
            assert_eq!(
                c.url(),
                format!("http://{}", bare.trim_end_matches('/')),
                "{bare}"
            );
        }
        for bad in [
            "",
            "/run/sluice/admin.sock",
            "https://x:1",
            "http://",
            "http://a/b",
            "unix:admin.sock",
        ] {
            assert!(Client::new(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_that_cannot_go_into_a_header_are_refused_by_name() {
        assert_eq!(check_token(b"k3y-._~+/="), Ok(()));
        for (token, what) in [
            (&b"ab\ncd"[..], "a line feed at byte 3 of 5"),
            (b"ab\r", "a carriage return at byte 3 of 3"),
            (b"a\tb", "a tab"),
            (b"a b", "a space"),
            (b"a\x7fb", "a control character (byte 0x7f)"),
            (b"a\x01b", "a control character (byte 0x01)"),
            ("p\u{e4}ss".as_bytes(), "a non-ASCII character at byte 2"),
        ] {
            let e = check_token(token).unwrap_err();
            assert!(e.contains(what), "{token:?}: {e}");
            assert!(e.contains("HTTP header"), "{e}");
        }
        let e = Client::new("http://127.0.0.1:9000", Some("a\nb".into()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("a line feed"), "{e}");
        assert!(Client::new("http://127.0.0.1:9000", Some(String::new())).is_ok());
    }

    #[test]
    fn a_token_file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        for (text, want) in [(&b"k3y\n"[..], "k3y"), (b"k3y", "k3y"), (b"k3y\r\n", "k3y")] {
            let p = file("t", text);
            assert_eq!(read_token(None, Some(&p)).unwrap().as_deref(), Some(want));
        }
        let two = file("two", b"k3y\n\n");
        let e = read_token(None, Some(&two)).unwrap_err().to_string();
        assert!(
            e.contains(&two.display().to_string()) && e.contains("a line feed at byte 4"),
            "{e}"
        );
        for text in [&b""[..], b"\n"] {
            let p = file("empty", text);
            let e = read_token(None, Some(&p)).unwrap_err().to_string();
            assert!(
                e.contains(&p.display().to_string()) && e.contains("empty"),
                "{e}"
            );
        }
        let missing = dir.path().join("missing");
        let e = read_token(None, Some(&missing)).unwrap_err().to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert_eq!(
            read_token(Some("flag".into()), None).unwrap().as_deref(),
            Some("flag")
        );
        let e = read_token(Some("a b".into()), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--token: the token has a space"), "{e}");
    }
}
