//! The hot path, top to bottom: accept a client, pick backends in fallback
//! order, connect to the first that answers, splice bytes both ways, and
//! give the connection's slot back when it ends, however it ends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::backend::{ConnGuard, ConnectFailure, Skip};
use crate::events::Reason;
use crate::net;
use crate::proxy_header::{self, ReadError};
use crate::state::{ConnSettings, Permit, Service, Shared};

/// Accepts clients of one service until `stop` is cancelled. Accept errors
/// (EMFILE, ENFILE, ...) back off and are logged; they never end the loop.
/// The backoff lasts as long as the shortage: one accept that gets through
/// does not reset it, and the episode is logged once.
pub async fn accept_loop(
    listener: TcpListener,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(5);
    let mut backoff = FIRST_BACKOFF;
    // This loop's own child of `shared.closing`: its clients wait on it,
    // so polls take this loop's locks, not ones every core shares.
    let closing = shared.closing.child_token();
    loop {
        // Stop first: once shutdown begins, no client is taken in.
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (client, peer) = match accepted {
            Ok(a) => {
                if !shared.stats.shortage.recovered() {
                    backoff = FIRST_BACKOFF;
                }
                a
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                if net::is_shortage(&e) {
                    shared.stats.shortage.hit("accept", &e);
                } else {
                    shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(service = %service.name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // A v4 client of a dual-stack `[::]` listener as plain IPv4, in
        // every log line too.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let Some(permit) = shared.limit.try_acquire() else {
            shared.stats.rejected_limit.fetch_add(1, Ordering::Relaxed);
            service.counts.refused(Reason::Limit);
            warn!(service = %service.name, client = %peer, "connection limit reached; closing client");
            continue;
        };
        // Read once: a reload that turns it on or off applies to the next.
        let header = service.accept_proxy();
        let span = match header {
            // The client is the header's to say; `via` is who sent it.
            Some(_) => {
                info_span!("conn", service = %service.name, client = tracing::field::Empty, via = %peer, backend = tracing::field::Empty)
            }
            None => {
                info_span!("conn", service = %service.name, client = %peer, backend = tracing::field::Empty)
            }
        };
        let (service, shared, closing) = (service.clone(), shared.clone(), closing.clone());
        tracker.spawn(
            handle(
                client,
                peer,
                header.is_some(),
                closing,
                service,
                shared,
                permit,
            )
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

/// Why a client got no backend.
enum Refused {
    /// None took it or answered.
    NoBackend,
    /// Every backend that takes connections was at its `max_connections`.
    Full,
    /// sluice was short of descriptors or buffers to connect with.
    Shortage,
    /// Its PROXY header was malformed, cut short or too slow.
    ProxyHeader,
    /// The client left, or shutdown closed it, first.
    Abandoned,
}

/// Who a connection is from and to, as the logs, the API and a backend's
/// PROXY header tell it.
#[derive(Debug, Clone, Copy)]
struct Endpoints {
    /// The client: the peer, or the source a PROXY header named.
    client: SocketAddr,
    /// The address the client connected to, when a PROXY header named
    /// it; otherwise the accepted socket's, asked for only when a backend
    /// needs it.
    local: Option<SocketAddr>,
}

/// One client's life, the connection task's whole future. The permit is
/// held to the end, whatever the end is. The setup (the PROXY header, the
/// backend connect) runs boxed: its state is most of a kilobyte and lasts
/// a round trip, while an idle connection keeps this future for hours, and
/// unboxed every connection's task would be sized for the setup.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in the future"
)]
fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    header: bool,
    closing: CancellationToken,
    service: Arc<Service>,
    shared: Arc<Shared>,
    permit: Permit,
) -> impl Future<Output = ()> {
    // An async block, not an async fn: that would keep a second copy of
    // its arguments in the future.
    async move {
        let outcome = Box::pin(setup(
            &mut client,
            peer,
            header,
            &closing,
            &service,
            &shared,
        ))
        .await;
        let (counter, refusal) = match outcome {
            Ok((server, guard)) => {
                shared.stats.established.fetch_add(1, Ordering::Relaxed);
                relay(&client, &server, &guard, &shared).await;
                // The sockets close before the slots are given back, so a
                // drain that ends has nothing left open.
                drop((client, server));
                // Since the slot was taken, before the connect.
                let age = guard.info().started.elapsed();
                drop(guard);
                drop(permit);
                service.counts.ended(age);
                return;
            }
            Err(Refused::NoBackend) => {
                warn!("no backend took the connection; closing client");
                (&shared.stats.rejected_no_backend, Some(Reason::NoBackend))
            }
            Err(Refused::Full) => {
                // Not a warning: every backend full is a steady state under
                // load, and a line per client would flood the log. The count
                // and the once-a-second `refused` event tell it.
                debug!("every backend is at its max_connections; closing client");
                (
                    &shared.stats.rejected_backend_full,
                    Some(Reason::BackendFull),
                )
            }
            Err(Refused::Shortage) => (&shared.stats.rejected_resources, Some(Reason::Resources)),
            Err(Refused::ProxyHeader) => (
                &shared.stats.rejected_proxy_header,
                Some(Reason::ProxyHeader),
            ),
            Err(Refused::Abandoned) => (&shared.stats.abandoned, None),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = refusal {
            service.counts.refused(why);
        }
        drop(permit);
    }
}

/// Takes the client's PROXY header off first when `header` (the
/// service's `accept_proxy` when the client came) says so, within the
/// service's `proxy_header_timeout`, or until `closing` (the accept loop's
/// child of `shared.closing`) is cancelled; then connects to a backend.
async fn setup(
    client: &mut TcpStream,
    peer: SocketAddr,
    header: bool,
    closing: &CancellationToken,
    service: &Service,
    shared: &Shared,
) -> Result<(TcpStream, ConnGuard), Refused> {
    // The timeout as it is now: the accept loop decided whether.
    let limit = service
        .accept_proxy()
        .unwrap_or(crate::config::PROXY_HEADER_TIMEOUT);
    let ends = match header {
        false => Endpoints {
            client: peer,
            local: None,
        },
        true => tokio::select! {
            r = take_proxy_header(client, peer, limit, service) => r?,
            // The end of the shutdown grace period: no backend holds it yet.
            _ = closing.cancelled() => return Err(Refused::Abandoned),
        },
    };
    connect(client, ends, service, shared, shared.conn_settings()).await
}

/// Connects to the first backend in the pick's order that answers. Until
/// a backend answers no byte has moved, so a backend stopped or forced
/// closed meanwhile costs the client nothing: the next one is tried. A
/// backend at its `max_connections` is skipped too; when every one met
/// was, the refusal says so.
async fn connect(
    client: &TcpStream,
    mut ends: Endpoints,
    service: &Service,
    shared: &Shared,
    settings: ConnSettings,
) -> Result<(TcpStream, ConnGuard), Refused> {
    let route = service.route();
    // Whether every backend met was full: then the refusal says so.
    let mut all_full = None;
    for (backend, target) in route.pick(ends.client.ip()) {
        // The slot is held from before the connect, so a pending connect
        // counts and a drain waits for it.
        let guard = match backend.try_acquire(ends.client, service.name.clone()) {
            Ok(g) => g,
            Err(why) => {
                all_full = Some(all_full.unwrap_or(true) && why == Skip::Full);
                continue;
            }
        };
        all_full = Some(false);
        if shared.closing_all.load(Ordering::SeqCst) {
            return Err(Refused::Abandoned);
        }
        let header = match backend.send_proxy() {
            None => None,
            Some(version) => {
                let local = match ends.local {
                    Some(l) => l,
                    // One getsockname, for the first backend that needs it.
                    None => client.local_addr().map_err(|_| Refused::Abandoned)?,
                };
                ends.local = Some(local);
                Some(proxy_header::encode(version, Some((ends.client, local))))
            }
        };
        let connected = tokio::select! {
            r = open(target, header.as_ref(), settings.connect_timeout) => r,
            _ = client_gone(client) => {
                debug!(backend = %backend.name, "client left while the backend connect was pending");
                return Err(Refused::Abandoned);
            }
            _ = guard.info().cancel.cancelled() => {
                if shared.closing_all.load(Ordering::SeqCst) {
                    return Err(Refused::Abandoned);
                }
                debug!(backend = %backend.name, "backend taken out while the connect was pending; trying the next");
                continue;
            }
        };
        match connected {
            Ok(server) => {
                // Recorded once, for the backend it ended on: a span keeps
                // every value recorded, so one per attempt would list them all.
                tracing::Span::current().record("backend", backend.name.as_str());
                guard.established(settings.idle_timeout);
                debug!("connected");
                return Ok((server, guard));
            }
            Err(e) if net::is_shortage(e.error()) => {
                shared.stats.shortage.hit(e.step(), e.error());
                return Err(Refused::Shortage);
            }
            Err(e) => {
                backend.connect_failed(ConnectFailure::of(e.error()), settings.health);
                warn!(backend = %backend.name, address = %target, step = e.step(), error = %e.error(), "backend connect failed; trying the next");
            }
        }
    }
    if all_full == Some(true) {
        return Err(Refused::Full);
    }
    Err(Refused::NoBackend)
}

/// Why a backend connection could not be opened. The step is for the
/// log; the error is kept whole, since its OS error code is what tells
/// sluice's own shortage (ENOBUFS, ENOMEM) from the backend's fault.
#[derive(Debug)]
enum OpenError {
    Connect(io::Error),
    Header(io::Error),
}

impl OpenError {
    fn error(&self) -> &io::Error {
        match self {
            OpenError::Connect(e) | OpenError::Header(e) => e,
        }
    }

    fn step(&self) -> &'static str {
        match self {
            OpenError::Connect(_) => "connect to a backend",
            OpenError::Header(_) => "send the PROXY header to a backend",
        }
    }
}

/// Connects to `target` and sends `header` before any byte of the client's
/// can follow it, on either data path: the splice starts after this. A
/// header that cannot be sent fails the connect, and the next backend is
/// tried, since no byte of the client's has moved yet.
async fn open(
    target: &net::Target,
    header: Option<&proxy_header::Encoded>,
    timeout: Duration,
) -> Result<TcpStream, OpenError> {
    let mut server = net::connect(target, timeout)
        .await
        .map_err(OpenError::Connect)?;
    if let Some(h) = header {
        send_header(&mut server, h).await?;
    }
    Ok(server)
}

/// Writes `header` to a new backend connection, whose send buffer takes
/// these few bytes at once.
async fn send_header<W: AsyncWrite + Unpin>(
    server: &mut W,
    header: &proxy_header::Encoded,
) -> Result<(), OpenError> {
    server
        .write_all(header.as_bytes())
        .await
        .map_err(OpenError::Header)
}

/// Takes the PROXY header a balancer in front sent off `client`, within
/// `limit`, and says who the connection is from and to. Bytes the client
/// sent after the header stay in the socket for the splice. A client that
/// leaves without sending a byte (a balancer's port check) is abandoned,
/// not refused.
async fn take_proxy_header(
    client: &mut TcpStream,
    peer: SocketAddr,
    limit: Duration,
    service: &Service,
) -> Result<Endpoints, Refused> {
    let span = tracing::Span::current();
    let error = match tokio::time::timeout(limit, proxy_header::read(client)).await {
        Ok(Ok(Some((src, dst)))) => {
            let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let client = canonical(src);
            span.record("client", tracing::field::display(client));
            return Ok(Endpoints {
                client,
                local: Some(canonical(dst)),
            });
        }
        // v2 LOCAL or v1 UNKNOWN: the connection speaks for itself.
        Ok(Ok(None)) => {
            span.record("client", tracing::field::display(peer));
            return Ok(Endpoints {
                client: peer,
                local: None,
            });
        }
        Ok(Err(ReadError::Closed | ReadError::Io(_))) => {
            debug!("client left before its PROXY header");
            return Err(Refused::Abandoned);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "no whole PROXY header within {}",
            crate::config::format_duration(limit)
        ),
    };
    // Hostile input must not flood the log: one line per 10 s per service.
    match service.header_errors.hit() {
        Some(n) => {
            warn!(error = %error, refused_since_last_line = n, "bad PROXY header; closing client")
        }
        None => debug!(error = %error, "bad PROXY header; closing client"),
    }
    Err(Refused::ProxyHeader)
}

/// Splices until both sides are done, or the connection is closed by the
/// admin, the idle timeout's sweep or shutdown.
/// No timer of its own: an idle connection keeps only this future.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in the future"
)]
fn relay<'a>(
    client: &'a TcpStream,
    server: &'a TcpStream,
    guard: &'a ConnGuard,
    shared: &'a Shared,
) -> impl Future<Output = ()> + 'a {
    async move {
        let info = guard.info();
        let zero_copy = shared.conn_settings().zero_copy;
        tokio::select! {
            r = crate::splice::splice(client, server, info, guard.backend(), zero_copy) => match r {
                Ok(()) => debug!(bytes_in = info.bytes_in.load(Ordering::Relaxed), bytes_out = info.bytes_out.load(Ordering::Relaxed), "closed"),
                Err(e) => debug!(error = %e, "closed on error"),
            },
            _ = info.cancel.cancelled() => if info.cancel.timed_out() {
                debug!("closed after idle timeout")
            } else {
                debug!("closed by admin or shutdown")
            },
        }
    }
}

/// Resolves if the client resets while the backend connect is pending. A
/// FIN is no reason to give up: it may be a half-close from a client that
/// waits for the server to speak first, and the splice passes it on. Error
/// readiness comes from epoll, so this costs no syscall.
async fn client_gone(client: &TcpStream) {
    let _ = client.ready(tokio::io::Interest::ERROR).await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let config = crate::config::Config::parse("t", &text).unwrap();
            let shared = Shared::new(config, &[a], &Default::default());
            let permit = shared.limit.try_acquire().unwrap();
            let header = true;
            let closing = shared.closing.child_token();
            let service = shared.services[0].clone();
            // As the accept loop spawns it.
            let f = TaskTracker::new().track_future(
                handle(c, a, header, closing, service, shared.clone(), permit)
                    .instrument(tracing::Span::none()),
            );
            let size = std::mem::size_of_val(&f);
            // tokio's task cell (104 bytes besides the future) is aligned
            // to 128 bytes: up to 664 bytes the cell is 768.
            assert!(
                size <= 664,
                "a connection's future is {size} bytes, its task cell past 768"
            );
        });
    }

    /// A client still sending its header is let go when the token its
    /// accept loop gave it is cancelled, as shutdown cancels the parent.
    #[tokio::test]
    async fn the_header_phase_ends_with_the_loops_token() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let text = format!(
            "[[service]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\naccept_proxy = true\n\
             proxy_header_timeout = \"300s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[[backend]]\nname = \"b\"\naddress = \"{a}\"\n"
        );
        let config = crate::config::Config::parse("t", &text).unwrap();
        let shared = Shared::new(config, &[a], &Default::default());
        let _c = TcpStream::connect(a).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        let permit = shared.limit.try_acquire().unwrap();
        let closing = shared.closing.child_token();
        let header = true;
        let service = shared.services[0].clone();
        let conn = tokio::spawn(handle(
            s,
            peer,
            header,
            closing,
            service,
            shared.clone(),
            permit,
        ));
        shared.closing.cancel();
        conn.await.unwrap();
        assert_eq!(shared.stats.abandoned.load(Ordering::Relaxed), 1);
    }

    /// A header write that fails for want of kernel buffers is sluice's
    /// shortage, not the backend's fault: its OS error must survive.
    #[tokio::test]
    async fn a_failed_header_write_keeps_its_os_error() {
        let header = proxy_header::encode(crate::config::ProxyVersion::V1, None);
        for (code, shortage) in [
            (libc::ENOBUFS, true),
            (libc::ENOMEM, true),
            (libc::EPIPE, false),
        ] {
            let mut w = net::FailingWriter(code);
            let e = send_header(&mut w, &header).await.unwrap_err();
            assert!(matches!(e, OpenError::Header(_)), "{e:?}");
            assert_eq!(e.error().raw_os_error(), Some(code));
            assert_eq!(net::is_shortage(e.error()), shortage, "{e:?}");
        }
    }
}
