//! Moving bytes both ways between a client and a backend.
//!
//! Each direction starts by copying through a small pooled buffer, which
//! suits requests and replies of a few kilobytes. Once a read fills the
//! buffer the flow is bulk, and on Linux that direction moves to
//! `splice(2)`: socket to pipe to socket, with no copy through user space.
//! Pipes come from a pool and go back empty; buffers likewise. Either is
//! borrowed only after the socket is readable and given back as soon as
//! what was read has been written, so an idle connection holds neither.
//!
//! Readiness: a `WouldBlock` clears tokio's readiness for the socket it is
//! reported on, so it must only ever come from that socket. A read starts
//! only with an empty pipe (splicing into it cannot block) and a write only
//! with data in the pipe (splicing out of it cannot block on the pipe). A
//! short copy read clears readiness at once (see `read_some`); a short
//! splice does not, since the pipe's slots may have run out first.
//!
//! A FIN in one direction is passed on as a write shutdown and never cuts
//! the other. When the peer's FIN is already in at a short copy read and
//! the read after it finds the end, the last bytes are held back with
//! `MSG_MORE` and leave with the FIN in one segment: one packet fewer each
//! way for every reply that ends a connection.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::backend::{Backend, ConnInfo};
use crate::reuse::Pool;

/// Buffer for requests and replies; a read that fills it marks a bulk flow.
const SMALL: usize = 16 * 1024;
/// Buffer for bulk flows on the copy path.
const LARGE: usize = 128 * 1024;
/// Buffers kept for reuse of each size; beyond this they are freed after
/// use. Pipes have a cap of their own, from the file descriptor budget.
const BUFS_KEPT: usize = 1024;

/// No SIGPIPE from a write to a closed peer: the error is enough.
#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;
/// Hold the bytes for what follows (here: the FIN).
#[cfg(target_os = "linux")]
const SEND_MORE: libc::c_int = libc::MSG_MORE;
#[cfg(not(target_os = "linux"))]
const SEND_MORE: libc::c_int = 0;

static SMALL_BUFS: Pool<Box<[u8]>> = Pool::new(BUFS_KEPT);
static LARGE_BUFS: Pool<Box<[u8]>> = Pool::new(BUFS_KEPT);

fn pool(size: usize) -> &'static Pool<Box<[u8]>> {
    if size == LARGE {
        &LARGE_BUFS
    } else {
        &SMALL_BUFS
    }
}

/// Frees the buffers and pipes that no connection took since the last
/// call; the server calls it on a timer, so a burst's leftovers go.
pub fn trim_pools() -> usize {
    SMALL_BUFS.trim() + LARGE_BUFS.trim() + pipe::trim()
}

pub use pipe::{pooled_pipes, set_pipe_cap};

/// A buffer borrowed from a pool for one read-then-write.
struct Buf(Option<Box<[u8]>>);

impl Buf {
    fn take(size: usize) -> Buf {
        let b = pool(size).take();
        Buf(Some(
            b.unwrap_or_else(|| vec![0u8; size].into_boxed_slice()),
        ))
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("buffer present until drop")
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            pool(b.len()).give(b);
        }
    }
}

/// Moves bytes both ways until both directions have ended. Returns the
/// first error of either direction, which ends the whole connection.
/// `zero_copy` allows bulk flows to move to `splice(2)`.
pub fn splice<'a>(
    client: &'a TcpStream,
    server: &'a TcpStream,
    info: &'a ConnInfo,
    backend: &'a Backend,
    zero_copy: bool,
) -> impl Future<Output = io::Result<()>> + 'a {
    let ends = Ends {
        info,
        backend,
        zero_copy: zero_copy && cfg!(target_os = "linux"),
        one_done: AtomicBool::new(false),
    };
    // Async blocks, not async fns, here and in `one_way`: an async fn
    // keeps a second copy of its arguments in every idle connection.
    async move {
        tokio::try_join!(
            one_way(client, server, &ends, true),
            one_way(server, client, &ends, false)
        )?;
        Ok(())
    }
}

/// What both directions of one connection share.
struct Ends<'a> {
    info: &'a ConnInfo,
    backend: &'a Backend,
    zero_copy: bool,
    /// Set by the first direction to reach end of stream.
    one_done: AtomicBool,
}

#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in the future"
)]
fn one_way<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    ends: &'a Ends<'a>,
    to_backend: bool,
) -> impl Future<Output = io::Result<()>> + 'a {
    async move {
        let mut zero_copy = false;
        let mut size = SMALL;
        loop {
            let fin_in = readable(from).await?;
            let spliced = zero_copy;
            let (moved, ended) = if zero_copy {
                match pipe::transfer(from, to).await? {
                    pipe::Moved::Bytes(n) => (n, false),
                    pipe::Moved::Unsupported => {
                        zero_copy = false;
                        continue;
                    }
                }
            } else {
                // Readiness from before the read: with the FIN already in, a
                // short read may have taken the stream's last bytes.
                let (n, ended) = copy_once(from, to, size, fin_in).await?;
                // A full small buffer means a bulk flow: splice from now on,
                // or copy through large buffers where splicing is off.
                if size == SMALL && n == Some(SMALL) {
                    zero_copy = ends.zero_copy;
                    size = LARGE;
                }
                (n, ended)
            };
            let Some(n) = moved else { continue };
            if n > 0 {
                ends.info.record(ends.backend, to_backend, n, spliced);
            }
            if n == 0 || ended {
                // The peer finished sending: pass the FIN on. When the
                // other direction has ended too, the close that follows
                // sends it, one syscall fewer.
                if ends.one_done.swap(true, Ordering::SeqCst) {
                    return Ok(());
                }
                // The other side may already be gone, which ends nothing here.
                match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Err(e),
                }
                return Ok(());
            }
        }
    }
}

/// Waits until `s` is readable, and says whether the peer's FIN is in.
/// The wait keeps no waiter in the connection's future, as tokio's
/// `ready()` would (a list node of 136 bytes, held by every idle
/// connection): `poll_read_ready` wakes through the socket's one reader
/// slot, which this direction alone uses. The bits are then read by a
/// `ready()` polled once in place, which is ready at once.
fn readable(s: &TcpStream) -> impl Future<Output = io::Result<bool>> + '_ {
    std::future::poll_fn(move |cx| {
        std::task::ready!(s.poll_read_ready(cx))?;
        let bits = std::pin::pin!(s.ready(Interest::READABLE));
        Poll::Ready(match bits.poll(cx) {
            Poll::Ready(r) => r.map(|r| r.is_read_closed()),
            // Cleared meanwhile: the FIN, if in, is found by the next read.
            Poll::Pending => Ok(false),
        })
    })
}

/// Waits until `s` is writable, through its one writer slot (see
/// `readable`): the other direction is the only writer.
fn writable(s: &TcpStream) -> impl Future<Output = io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| s.poll_write_ready(cx))
}

/// One read into a pooled buffer and the write of all of it. `None` when
/// the readiness was spurious, `Some(0)` at end of stream.
///
/// With `fin_in` (the peer's FIN had arrived before the read), a short
/// read is followed at once by the read the next round would make. If it
/// finds the end of the stream, the bytes are written with `MSG_MORE`, so
/// they wait in the socket for the FIN the caller sends next and leave
/// with it in one segment; the returned flag says the stream has ended.
/// If it finds more bytes (a short read can stop at an urgent mark) they
/// join the write, and if it finds an error (a reset also raises the
/// FIN's readiness) the bytes already read are written before it is
/// returned, as they would have been without the look ahead.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in the future"
)]
fn copy_once<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    size: usize,
    fin_in: bool,
) -> impl Future<Output = io::Result<(Option<usize>, bool)>> + 'a {
    async move {
        let mut buf = Buf::take(size);
        let mut n = match read_some(from, buf.bytes())? {
            Some(n) => n,
            None => return Ok((None, false)),
        };
        let mut ended = false;
        let mut failed = None;
        if fin_in && n > 0 && n < size {
            // A plain recv, outside tokio's readiness: whatever it returns, the
            // stream is past its FIN, and the next round's readiness is still
            // set by it.
            match recv(from, &mut buf.bytes()[n..]) {
                Ok(0) => ended = true,
                Ok(m) => n += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => failed = Some(e),
            }
        }
        let flags = SEND_FLAGS | if ended { SEND_MORE } else { 0 };
        let mut off = 0;
        while off < n {
            writable(to).await?;
            let chunk = &buf.bytes()[off..n];
            match to.try_io(Interest::WRITABLE, || send(to, chunk, flags)) {
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((Some(n), ended))
    }
}

/// One read; `None` when there was nothing to read. A short read leaves a
/// TCP receive queue empty, so it also clears the socket's readiness,
/// which saves the read that would only return EAGAIN. The read runs
/// inside `try_io`, whose readiness snapshot is taken before it: an event
/// that arrives during or after the read has a newer tick and survives the
/// clear, so no wakeup is lost.
fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut short = 0;
    let r = from.try_io(Interest::READABLE, || {
        let n = recv(from, buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((short > 0).then_some(short)),
        Err(e) => Err(e),
    }
}

/// One `recv(2)` on the socket, bypassing tokio's readiness.
fn recv(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `send(2)` with `flags`, bypassing tokio's readiness.
fn send(s: &TcpStream, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    let n = unsafe { libc::send(s.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(target_os = "linux")]
mod pipe {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::{Interest, TcpStream};
    use crate::reuse::Pool;

    /// A kernel pipe used as the buffer between two sockets.
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// Its capacity in bytes, as the kernel granted it.
        size: usize,
    }

    /// Idle pipes, two descriptors each: their cap comes from the file
    /// descriptor budget (`set_pipe_cap`).
    static PIPES: Pool<Pipe> = Pool::new(256);

    /// Caps how many idle pipes are kept.
    pub fn set_pipe_cap(n: usize) {
        PIPES.set_cap(n);
    }

    /// Idle pipes kept now.
    pub fn pooled_pipes() -> usize {
        PIPES.len()
    }

    pub(super) fn trim() -> usize {
        PIPES.trim()
    }

    impl Pipe {
        fn new() -> io::Result<Pipe> {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both descriptors are open and ours.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // The kernel may grant less than asked past the per-user page
            // budget; use what it reports.
            // SAFETY: fcntl on a descriptor we own, with integer arguments.
            let size = unsafe {
                libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 256 * 1024);
                libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
            };
            Ok(Pipe {
                read,
                write,
                size: if size > 0 { size as usize } else { 4096 },
            })
        }

        fn take() -> io::Result<Pipe> {
            match PIPES.take() {
                Some(p) => Ok(p),
                None => Pipe::new(),
            }
        }

        /// Returns an empty pipe to the pool.
        fn give_back(self) {
            PIPES.give(self);
        }
    }

    fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
        // SAFETY: plain descriptors and null offsets (both ends are a socket
        // or a pipe, which have no offset).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// What one transfer did.
    pub enum Moved {
        /// As `copy_once`: `None` for spurious readiness, `Some(0)` at end
        /// of stream, else the bytes moved.
        Bytes(Option<usize>),
        /// Splicing does not work for this socket, or no pipe could be
        /// made: nothing was read, copy.
        Unsupported,
    }

    /// Moves what `from` has, up to a pipe's worth, to `to`.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second copy of its arguments in the future"
    )]
    pub fn transfer<'a>(
        from: &'a TcpStream,
        to: &'a TcpStream,
    ) -> impl Future<Output = io::Result<Moved>> + 'a {
        async move {
            // Out of descriptors for a pipe: copy instead of failing the connection.
            let Ok(pipe) = Pipe::take() else {
                return Ok(Moved::Unsupported);
            };
            // The pipe is empty, so only the socket can make this block.
            let n = match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipe.give_back();
                    return Ok(Moved::Bytes(None));
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                    ) =>
                {
                    pipe.give_back();
                    return Ok(Moved::Unsupported);
                }
                Err(e) => {
                    pipe.give_back();
                    return Err(e);
                }
            };
            // No readiness shortcut here: a short splice does not mean the
            // socket is empty (each packet takes a pipe slot, and the slots can
            // run out first), so the next round finds out with EAGAIN.
            let mut left = n;
            while left > 0 {
                super::writable(to).await?;
                // The pipe holds data, so only the socket can make this block.
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
                }) {
                    Ok(w) => left -= w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A pipe with data left in it is dropped, not pooled.
                    Err(e) => return Err(e),
                }
            }
            pipe.give_back();
            Ok(Moved::Bytes(Some(n)))
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod pipe {
    use std::io;

    use super::TcpStream;

    pub enum Moved {
        Bytes(Option<usize>),
        Unsupported,
    }

    pub async fn transfer(_: &TcpStream, _: &TcpStream) -> io::Result<Moved> {
        Ok(Moved::Unsupported)
    }

    pub fn set_pipe_cap(_: usize) {}

    pub fn pooled_pipes() -> usize {
        0
    }

    pub(super) fn trim() -> usize {
        0
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use tokio::io::AsyncReadExt;

    use super::*;

    /// Both ends of a loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    /// Waits until the kernel has put `s` in TCP state `state`.
    async fn reach_state(s: &TcpStream, state: u8) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: tcp_info is plain data; getsockopt fills at most `len` bytes.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            if info.tcpi_state == state {
                return;
            }
            assert!(Instant::now() < deadline, "state {} never came", state);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;

    #[tokio::test]
    async fn the_last_bytes_before_a_fin_end_the_stream() {
        let (from, peer) = pair().await;
        let (to, mut sink) = pair().await;
        peer.try_write(b"last").unwrap();
        socket2::SockRef::from(&peer)
            .shutdown(Shutdown::Write)
            .unwrap();
        reach_state(&from, TCP_CLOSE_WAIT).await;
        let ready = from.ready(Interest::READABLE).await.unwrap();
        assert!(ready.is_read_closed());
        let r = copy_once(&from, &to, SMALL, true).await.unwrap();
        assert_eq!(r, (Some(4), true), "the stream ended with those bytes");
        // Corked until the FIN the caller sends.
        socket2::SockRef::from(&to)
            .shutdown(Shutdown::Write)
            .unwrap();
        let mut got = Vec::new();
        sink.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
    }

    /// A reset also raises the readiness a FIN raises; it must end the
    /// connection as an error, after the bytes that came before it.
    #[tokio::test]
    async fn a_reset_after_the_last_bytes_is_an_error_not_an_end() {
        let (from, peer) = pair().await;
        let (to, mut sink) = pair().await;
        peer.try_write(b"last").unwrap();
        let peer = peer.into_std().unwrap();
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(peer);
        reach_state(&from, TCP_CLOSE).await;
        let ready = from.ready(Interest::READABLE).await.unwrap();
        assert!(ready.is_read_closed());
        let r = copy_once(&from, &to, SMALL, true).await;
        assert_eq!(
            r.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset,
            "a reset is no clean end"
        );
        let mut got = [0u8; 4];
        sink.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"last", "the bytes before the reset went on");
    }
}
