//! Sockets: where a backend is ([`Target`]), the listening sockets, the
//! options every proxied socket carries, and a connect bounded by a
//! timeout. The proxy and the health checker both connect through here.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::{BackendAddress, format_duration};

/// Where a service connects for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// A host name, resolved at connect time.
    Host(String, u16),
}

impl Target {
    pub fn new(address: &BackendAddress, default_port: u16) -> Target {
        match address {
            BackendAddress::Ip(ip, port) => {
                Target::Addr(SocketAddr::new(*ip, port.unwrap_or(default_port)))
            }
            BackendAddress::Host(h, port) => Target::Host(h.clone(), port.unwrap_or(default_port)),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host(h, p) => write!(f, "{h}:{p}"),
        }
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
    // Whatever the host's default (net.ipv6.bindv6only): `[::]` takes
    // IPv4 clients too, since the config refuses `[::]:80` beside
    // `0.0.0.0:80` as overlapping, and a v4-mapped address can be bound
    // at all. `sluice check` binds through here too, so it agrees.
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    tune(&socket2::SockRef::from(&socket))?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Whether an error is sluice's own shortage of a resource (file
/// descriptors, kernel buffers, memory) rather than the peer's doing.
pub fn is_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One connect, with the socket options set before it. Written out rather
/// than tokio's `TcpSocket::connect` for two reasons: its wait keeps no
/// waiter in the connection's future (the connect state is part of every
/// connection's memory), and the connect's outcome is read from the
/// readiness epoll already gave, so a connect that succeeded costs no
/// `getsockopt(SO_ERROR)`.
async fn connect_to(a: SocketAddr) -> io::Result<TcpStream> {
    // Non-blocking from the start where the platform allows it (close on
    // exec socket2 sets by itself): one system call fewer per connect.
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(a),
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let socket = {
        let s = socket2::Socket::new(socket2::Domain::for_address(a), socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        s
    };
    // Fewer options than on the listener, each one a syscall per connect:
    // the kernel's probe interval and count stand for the backend side.
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)))?;
    match socket.connect(&a.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let failed = std::future::poll_fn(|cx| {
        std::task::ready!(stream.poll_write_ready(cx))?;
        // The bits are set, so this `ready()` is ready at its first poll.
        let bits = std::pin::pin!(stream.ready(Interest::WRITABLE | Interest::ERROR));
        std::task::Poll::Ready(io::Result::Ok(match bits.poll(cx) {
            std::task::Poll::Ready(r) => r.map_or(true, |r| r.is_error() || r.is_write_closed()),
            std::task::Poll::Pending => true,
        }))
    })
    .await?;
    // A failed connect raises EPOLLERR and EPOLLHUP; only then is its
    // error fetched. A socket shut both ways with no error to tell is no
    // connection either: the next backend is tried.
    if failed {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "the connect ended without a connection",
            )
        }));
    }
    Ok(stream)
}

/// Connects to a target within `timeout`, trying each resolved address.
pub async fn connect(target: &Target, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = async {
        match target {
            Target::Addr(a) => connect_to(*a).await,
            // Boxed: a name's lookup is a large future, and only backends
            // given by name pay for it.
            Target::Host(h, p) => Box::pin(connect_host(h, *p)).await,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}", format_duration(timeout)),
            ))
        })
}

/// Connects to each address `host` resolves to in turn.
async fn connect_host(h: &str, p: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{h} resolved to no address"),
    );
    for a in tokio::net::lookup_host((h, p)).await? {
        match connect_to(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A writer whose every write fails with the OS error it holds, to test
/// how a failed write is told apart.
#[cfg(test)]
pub(crate) struct FailingWriter(pub i32);

#[cfg(test)]
impl tokio::io::AsyncWrite for FailingWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(Err(io::Error::from_raw_os_error(self.0)))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connect's outcome is read from readiness: a refused connect is
    /// an error with its OS code, an accepted one a usable stream.
    #[tokio::test]
    async fn a_connect_tells_refused_from_accepted() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap();
        let s = connect_to(open).await.unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        s.try_write(b"x").unwrap();
        let mut got = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"x");
        drop(l);
        let e = connect_to(open).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }
}
