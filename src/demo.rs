//! `sluice demo`: two small built-in web servers that answer with their own
//! name, so the balancer can be tried with nothing else installed.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
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
            let svc = service_fn(move |_req| {
                let body = format!("hello from {name}\n");
                async move {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = StatusCode::OK;
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
