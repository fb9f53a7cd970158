//! The HTTP client of the admin API: the commands see typed replies and
//! [`CtlError`]s, never HTTP.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::CtlError;
use crate::api::{BackendView, ConnView};
use crate::config::format_duration;

/// The longest wait for one admin API reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the admin API.
pub struct Client {
    authority: String,
    url: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client, CtlError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| CtlError::BadUrl(url.to_string()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(CtlError::BadUrl(url.to_string()));
        }
        Ok(Client {
            authority: authority.to_string(),
            url: url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
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
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_once(method, path))
            .await
            .unwrap_or_else(|_| {
                Err(CtlError::Http {
                    url: self.url.clone(),
                    message: format!("no answer within {}", format_duration(REQUEST_TIMEOUT)),
                })
            })
    }

    async fn call_once(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), CtlError> {
        let unreachable = |e| CtlError::Unreachable {
            url: self.url.clone(),
            error: e,
        };
        let http = |e: hyper::Error| CtlError::Http {
            url: self.url.clone(),
            message: e.to_string(),
        };
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(unreachable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| CtlError::Http {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, body))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, T), CtlError> {
        let (status, body) = self.call(method, path).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(CtlError::Api {
                status: status.as_u16(),
                message,
            });
        }
        let v = serde_json::from_slice(&body).map_err(|e| CtlError::Http {
            url: self.url.clone(),
            message: format!("unexpected reply: {e}"),
        })?;
        Ok((status, v))
    }

    /// The server's clock, in Unix milliseconds.
    pub async fn server_time_ms(&self) -> Result<u64, CtlError> {
        let (_, v): (_, serde_json::Value) = self.json(Method::GET, "/healthz").await?;
        v["time_ms"].as_u64().ok_or_else(|| CtlError::Http {
            url: self.url.clone(),
            message: "GET /healthz gave no time_ms".into(),
        })
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

    pub async fn connections(&self, name: &str) -> Result<Vec<ConnView>, CtlError> {
        Ok(self
            .json(Method::GET, &format!("/backends/{name}/connections"))
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
        let q: Vec<String> = query
            .iter()
            .filter_map(|(k, v)| v.map(|d| format!("{k}={}", format_duration(d))))
            .collect();
        let path = if q.is_empty() {
            format!("/backends/{name}/{action}")
        } else {
            format!("/backends/{name}/{action}?{}", q.join("&"))
        };
        Ok(self.json(Method::POST, &path).await?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(Client::new("http://127.0.0.1:9000", None).is_ok());
        assert!(Client::new("http://127.0.0.1:9000/", None).is_ok());
        for bad in ["127.0.0.1:9000", "https://x:1", "http://", "http://a/b"] {
            assert!(Client::new(bad, None).is_err(), "{bad}");
        }
    }
}
