//! The hot path, top to bottom: accept a client, pick backends in fallback
//! order, connect to the first that answers, splice bytes both ways, and
//! give the connection's slot back when it ends, however it ends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::backend::ConnGuard;
use crate::pool::Target;
use crate::server::{Service, Settings, Shared};

/// Accepts clients of one service until `stop` is cancelled. Accept errors
/// (EMFILE, ENFILE, ...) back off and are logged; they never end the loop.
pub async fn accept_loop(
    listener: TcpListener,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        // Stop first: once shutdown begins, no client is taken in.
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (client, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                warn!(service = %service.name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
            shared.stats.rejected_limit.fetch_add(1, Ordering::Relaxed);
            warn!(service = %service.name, client = %peer, "connection limit reached; closing client");
            continue;
        };
        let span = info_span!("conn", service = %service.name, client = %peer, backend = tracing::field::Empty);
        let (service, shared) = (service.clone(), shared.clone());
        tracker.spawn(
            async move {
                handle(client, peer, &service, &shared).await;
                shared.release(permit);
            }
            .instrument(span),
        );
    }
}

/// Errors that concern one connection only: accept the next.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// One client's life.
async fn handle(client: TcpStream, peer: SocketAddr, service: &Service, shared: &Shared) {
    let route = service.route();
    let settings = shared.settings();
    for (backend, target) in route.pick() {
        // The slot is held from before the connect, so a pending connect
        // counts and a drain waits for it.
        let Some(guard) = backend.try_acquire(peer, service.name.clone()) else {
            continue;
        };
        if shared.closing_all.load(Ordering::SeqCst) {
            return;
        }
        tracing::Span::current().record("backend", backend.name.as_str());
        let connected = tokio::select! {
            r = connect(target, settings.connect_timeout) => r,
            _ = client_gone(&client) => {
                debug!("client left while the backend connect was pending");
                return;
            }
            _ = guard.info().cancel.cancelled() => return,
        };
        match connected {
            Ok(server) => {
                guard.established();
                debug!("connected");
                relay(client, server, guard, settings).await;
                return;
            }
            Err(e) => {
                backend.connect_failed(settings.fall);
                warn!(backend = %backend.name, address = %target, error = %e, "backend connect failed; trying the next");
            }
        }
    }
    shared
        .stats
        .rejected_no_backend
        .fetch_add(1, Ordering::Relaxed);
    warn!("no backend took the connection; closing client");
}

/// Splices until both sides are done, the connection is closed by the admin
/// or shutdown, or it stays idle too long. The guard drops at the end.
async fn relay(client: TcpStream, server: TcpStream, guard: ConnGuard, settings: Settings) {
    let info = guard.info();
    tokio::select! {
        r = crate::splice::splice(&client, &server, info, guard.backend(), settings.zero_copy) => match r {
            Ok(()) => debug!(bytes_in = info.bytes_in.load(Ordering::Relaxed), bytes_out = info.bytes_out.load(Ordering::Relaxed), "closed"),
            Err(e) => debug!(error = %e, "closed on error"),
        },
        _ = info.cancel.cancelled() => debug!("closed by admin or shutdown"),
        _ = idle_expired(info, settings.idle_timeout) => debug!("closed after idle timeout"),
    }
}

/// Socket options of every proxied socket: TCP_NODELAY, so small writes go
/// out at once, and keepalive, so a peer that vanished without FIN or RST
/// is noticed and cannot hold a drain open forever. Set on the listener,
/// accepted sockets inherit them, which saves syscalls per connection.
pub fn tune(s: &socket2::SockRef<'_>) -> io::Result<()> {
    s.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    s.set_tcp_keepalive(&keepalive)
}

/// A listening socket for a service: options for its clients set once,
/// and a long accept queue so that bursts of new clients are not dropped.
/// With `reuseport`, several workers can each listen on the same address.
pub fn listen(addr: SocketAddr, reuseport: bool) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    tune(&socket2::SockRef::from(&socket))?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Resolves when the connection has moved no byte for `limit`.
async fn idle_expired(info: &crate::backend::ConnInfo, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let idle = info.idle();
        if idle >= limit {
            return;
        }
        tokio::time::sleep(limit - idle).await;
    }
}

/// Resolves if the client resets while the backend connect is pending. A
/// FIN is no reason to give up: it may be a half-close from a client that
/// waits for the server to speak first, and the splice passes it on. Error
/// readiness comes from epoll, so this costs no syscall.
async fn client_gone(client: &TcpStream) {
    let _ = client.ready(tokio::io::Interest::ERROR).await;
}

/// One connect, with the socket options set before it.
async fn connect_to(a: SocketAddr) -> io::Result<TcpStream> {
    let socket = match a {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // Fewer options than on the listener, each one a syscall per connect:
    // the kernel's probe interval and count stand for the backend side.
    socket.set_nodelay(true)?;
    socket2::SockRef::from(&socket)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)))?;
    socket.connect(a).await
}

/// Connects to a target within `timeout`, trying each resolved address.
pub(crate) async fn connect(target: &Target, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = async {
        match target {
            Target::Addr(a) => connect_to(*a).await,
            Target::Host(h, p) => {
                let mut last = io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{h} resolved to no address"),
                );
                for a in tokio::net::lookup_host((h.as_str(), *p)).await? {
                    match connect_to(a).await {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer within {}",
                    crate::config::format_duration(timeout)
                ),
            ))
        })
}

#[cfg(test)]
mod tests {
    /// Every idle connection holds its task's future: keep it small, since
    /// it is most of sluice's memory per connection.
    #[test]
    fn a_connection_task_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            let c = tokio::net::TcpStream::connect(a).await.unwrap();
            let text = format!(
                "[[service]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [[backend]]\nname = \"b\"\naddress = \"{a}\"\n"
            );
            let s = crate::Sluice::bind(crate::Config::parse("t", &text).unwrap()).await.unwrap();
            let shared = s.shared().clone();
            let f = super::handle(c, a, &shared.services[0], &shared);
            let size = std::mem::size_of_val(&f);
            assert!(size <= 2048, "a connection's future is {size} bytes");
        });
    }
}
