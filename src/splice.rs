//! Moving bytes both ways between a client and a backend.
//!
//! Each direction waits for readiness first and only then borrows a buffer
//! from a shared pool, so an idle connection holds no buffer. A FIN in one
//! direction is passed on as a write shutdown and never cuts the other.

use std::io;
use std::net::Shutdown;
use std::sync::Mutex;

use tokio::net::TcpStream;

use crate::backend::{Backend, ConnInfo};

const BUF_SIZE: usize = 16 * 1024;
/// Buffers kept for reuse; more than this in flight are freed after use.
const POOL_MAX: usize = 1024;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// A buffer borrowed from the pool for one read-then-write.
struct Buf(Option<Box<[u8]>>);

impl Buf {
    fn take() -> Buf {
        let b = POOL.lock().ok().and_then(|mut p| p.pop());
        Buf(Some(
            b.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice()),
        ))
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("buffer present until drop")
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let (Some(b), Ok(mut p)) = (self.0.take(), POOL.lock())
            && p.len() < POOL_MAX
        {
            p.push(b);
        }
    }
}

/// Copies bytes both ways until both directions have ended. Returns the
/// first error of either direction, which ends the whole connection.
pub async fn splice(
    client: &TcpStream,
    server: &TcpStream,
    info: &ConnInfo,
    backend: &Backend,
) -> io::Result<()> {
    tokio::try_join!(
        one_way(client, server, info, backend, true),
        one_way(server, client, info, backend, false),
    )?;
    Ok(())
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    info: &ConnInfo,
    backend: &Backend,
    to_backend: bool,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = Buf::take();
        let n = match from.try_read(buf.bytes()) {
            Ok(0) => {
                // The peer finished sending: pass the FIN on. The peer may
                // already be gone, which is no error for this direction.
                match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Err(e),
                }
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        info.record(backend, to_backend, n);
        let mut off = 0;
        while off < n {
            to.writable().await?;
            match to.try_write(&buf.bytes()[off..n]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
