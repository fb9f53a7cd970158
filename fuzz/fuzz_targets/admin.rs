//! The whole admin request path, from raw bytes on the connection to the
//! reply: hyper's HTTP/1.1 parsing, the body limit, routing, parameters,
//! and the operations on a real (unbound) balancer state.
//!
//! Each input is written to one end of an in-memory pipe whose other end
//! `sluice::admin::serve_connection` serves; once the server is idle the
//! write side is shut, and the reply is read until EOF. Time is tokio's paused clock, so a drain
//! with `wait=` or a slow request costs no real time: the reply is
//! abandoned after `REPLY_TIMEOUT` of virtual time. Checks: no panic, a
//! reply is HTTP, and no response in it is a 5xx.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice::Config;
use sluice::admin::{Peer, Plane, serve_connection};
use sluice::state::Shared;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Two backends on ports nothing listens on, no health checks, nothing
/// bound: the admin only reads and changes the state.
const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"
request_timeout = "2s"

[[service]]
name = "web"
listen = "127.0.0.1:0"

[[backend]]
name = "web1"
address = "127.0.0.1:1"
health_check = "none"

[[backend]]
name = "web2"
address = "127.0.0.1:2"
health_check = "none"
"#;

const BACKENDS: [&str; 2] = ["web1", "web2"];

/// Virtual time after which a reply is abandoned; longer than the admin's
/// request timeout, so only a drain's `wait=` runs into it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Virtual time between writing the input and shutting the write side;
/// shorter than the admin's request timeout.
const SETTLE: Duration = Duration::from_millis(100);

struct World {
    rt: Runtime,
    shared: Arc<Shared>,
    /// `SLUICE_FUZZ_SHOW=1` prints each reply, to look at a case.
    show: bool,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime");
        let config = Config::parse("fuzz.toml", CONFIG).expect("the fuzz config is valid");
        let listens: Vec<_> = config.services.iter().map(|s| s.listen).collect();
        let shared = rt.block_on(async { Shared::new(config, &listens, &Default::default()) });
        let show = std::env::var_os("SLUICE_FUZZ_SHOW").is_some();
        World { rt, shared, show }
    })
}

/// Sends `request` on a fresh connection; returns what came back before
/// EOF or the timeout.
async fn exchange(shared: &Arc<Shared>, request: &[u8]) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = Peer::Tcp("127.0.0.1:1".parse().unwrap());
    let conn = tokio::spawn(serve_connection(
        server,
        peer,
        None,
        Plane::of(shared.clone()),
        CancellationToken::new(),
    ));
    let (mut rd, mut wr) = tokio::io::split(client);
    let mut reply = Vec::new();
    // Written and read at once: a large request or reply must not fill
    // the pipe while the other side waits.
    let write = async {
        let _ = wr.write_all(request).await;
        // Hyper drops the request in progress when it reads EOF (no
        // half-close), so the write side is shut only once the server is
        // idle: paused time advances only when every task waits.
        tokio::time::sleep(SETTLE).await;
        let _ = wr.shutdown().await;
    };
    let read = rd.read_to_end(&mut reply);
    let _ = tokio::time::timeout(REPLY_TIMEOUT, async { tokio::join!(write, read) }).await;
    conn.abort();
    if let Err(e) = conn.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    reply
}

/// Every response in `reply` (a line that begins `HTTP/1.`) has a
/// three-digit status that is not 5xx.
fn check(reply: &[u8]) {
    if reply.is_empty() {
        return;
    }
    assert!(
        reply.starts_with(b"HTTP/1."),
        "a reply that is not HTTP: {:?}",
        String::from_utf8_lossy(reply)
    );
    let mut at = 0;
    while at < reply.len() {
        let end = reply[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(reply.len(), |i| at + i);
        let line = &reply[at..end];
        if line.starts_with(b"HTTP/1.") && (end < reply.len() || line.len() >= 13) {
            let text = String::from_utf8_lossy(line);
            assert!(
                line.len() >= 12
                    && line[9..12].iter().all(u8::is_ascii_digit)
                    && line.get(12).is_none_or(|&b| b == b' ' || b == b'\r'),
                "not a status line: {text:?}"
            );
            assert_ne!(line[9], b'5', "a server error: {text:?}");
        }
        at = end + 1;
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let reply = w.rt.block_on(exchange(&w.shared, data));
    // Whatever the input did to the backends, the next one starts from
    // both active.
    for name in BACKENDS {
        w.shared
            .backend(name)
            .expect("a configured backend")
            .start();
    }
    if w.show {
        eprintln!("{}", String::from_utf8_lossy(&reply));
    }
    check(&reply);
});
