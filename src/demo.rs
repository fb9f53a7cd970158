//! `sluice demo` and `sluice web`: a small built-in web server that answers
//! with its own name, so the balancer can be tried with nothing else
//! installed. `GET` answers `hello from NAME`; `POST` echoes its body.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves `hello from NAME` over HTTP/1.1 on `listener` until the task ends.
pub async fn web_server(listener: TcpListener, name: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let name = name.clone();
                async move {
                    let post = req.method() == hyper::Method::POST;
                    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
                        Ok(b) if post => b.to_bytes(),
                        Ok(_) => Bytes::from(format!("hello from {name}\n")),
                        Err(_) => Bytes::from_static(b"request body over 1 MiB\n"),
                    };
                    let mut r = Response::new(Full::new(body));
                    *r.status_mut() = StatusCode::OK;
                    if let Ok(v) = hyper::header::HeaderValue::from_str(&name) {
                        r.headers_mut().insert("x-backend", v);
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The configuration `sluice demo` runs: `config/sluice.toml` with the
/// addresses it was given.
pub fn config(listen: SocketAddr, admin: SocketAddr, web: [SocketAddr; 2]) -> String {
    format!(
        "[admin]\nlisten = \"{admin}\"\n\n[[service]]\nname = \"web\"\nlisten = \"{listen}\"\n\n\
         [[backend]]\nname = \"web1\"\naddress = \"{}\"\nhealth_check = \"http\"\nhealth_path = \"/\"\n\n\
         [[backend]]\nname = \"web2\"\naddress = \"{}\"\nhealth_check = \"http\"\nhealth_path = \"/\"\n",
        web[0], web[1]
    )
}

/// What to try, printed once everything listens.
pub fn instructions(listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "sluice demo is running: clients -> http://{listen} -> web1, web2 (admin API on http://{admin})

Try, in another terminal:
  curl http://{listen}/                                   # hello from web1
  curl http://{listen}/                                   # hello from web2 (round-robin)
  curl http://{admin}/backends                            # states and live counts
  curl -X POST 'http://{admin}/backends/web1/drain?wait=30s'   # Drain Stop web1
  curl http://{listen}/                                   # only web2 answers now
  curl http://{admin}/backends/web1/connections           # the netstat step: who is still on web1
  curl -X POST http://{admin}/backends/web1/start         # back in rotation

Press Ctrl-C to stop.
"
    )
}
