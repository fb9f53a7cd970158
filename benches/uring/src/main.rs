//! uring-probe: a minimal layer-4 proxy with two interchangeable I/O
//! engines of the same shape, io_uring and epoll (tokio), so that a
//! benchmark of one against the other measures the I/O model and nothing
//! else. It exists to find io_uring's ceiling before wiring io_uring into
//! sluice (see benches/README.md).
//!
//!   uring-probe --mode uring|epoll [--buf-size BYTES] [--buffers N] [--shutdown syscall|ring]
//!       --listen ADDR --backend ADDR [--backend ADDR ...]
//!       [--listen ADDR --backend ADDR ...]
//!
//! Each `--listen` starts a group; the `--backend`s after it are that
//! listener's backends, picked round-robin. One thread serves every group,
//! so a CPU cap on the process holds all of it.

mod epoll;
mod uring;

use std::net::SocketAddr;
use std::process::ExitCode;

use socket2::{Domain, Socket, Type};

/// A listener and the backends it balances over.
pub struct Group {
    pub listen: SocketAddr,
    pub backends: Vec<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Uring,
    Epoll,
}

struct Args {
    mode: Mode,
    groups: Vec<Group>,
    /// Bytes per read in both engines: the provided buffers' size for
    /// io_uring, each direction's copy buffer for epoll.
    buf_size: usize,
    /// Provided buffers in the io_uring buffer ring (a power of two).
    buffers: u16,
    /// io_uring: shutdown through the ring, not as a system call.
    ring_shutdown: bool,
}

const USAGE: &str = "usage: uring-probe --mode uring|epoll [--buf-size BYTES] [--buffers N] [--shutdown syscall|ring] \
--listen ADDR --backend ADDR [--backend ADDR ...] [--listen ADDR --backend ADDR ...]";

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut mode = None;
    let mut groups: Vec<Group> = Vec::new();
    let mut buf_size = 16 * 1024;
    let mut buffers: u16 = 1024;
    let mut ring_shutdown = false;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => {
                mode = Some(match value()?.as_str() {
                    "uring" => Mode::Uring,
                    "epoll" => Mode::Epoll,
                    other => return Err(format!("--mode {other}: not uring or epoll")),
                })
            }
            "--listen" => groups.push(Group {
                listen: addr(&value()?)?,
                backends: Vec::new(),
            }),
            "--backend" => {
                let a = addr(&value()?)?;
                groups
                    .last_mut()
                    .ok_or("--backend before any --listen")?
                    .backends
                    .push(a);
            }
            "--buf-size" => {
                buf_size = value()?
                    .parse()
                    .ok()
                    .filter(|n| (512..=1 << 20).contains(n))
                    .ok_or("--buf-size: 512 to 1048576 bytes")?
            }
            "--buffers" => {
                buffers = value()?
                    .parse()
                    .ok()
                    .filter(|n: &u16| n.is_power_of_two() && *n <= 32768)
                    .ok_or("--buffers: a power of two up to 32768")?
            }
            "--shutdown" => {
                ring_shutdown = match value()?.as_str() {
                    "ring" => true,
                    "syscall" => false,
                    other => return Err(format!("--shutdown {other}: not ring or syscall")),
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let mode = mode.ok_or("--mode is required")?;
    if groups.is_empty() {
        return Err("at least one --listen is required".into());
    }
    if let Some(g) = groups.iter().find(|g| g.backends.is_empty()) {
        return Err(format!("--listen {} has no --backend", g.listen));
    }
    Ok(Args {
        mode,
        groups,
        buf_size,
        buffers,
        ring_shutdown,
    })
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

/// The listening socket, made the same way for both engines so that only
/// the I/O model differs.
pub fn listener(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("uring-probe: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.mode {
        Mode::Uring => uring::run(
            &args.groups,
            args.buf_size as u32,
            args.buffers,
            args.ring_shutdown,
        ),
        Mode::Epoll => epoll::run(args.groups, args.buf_size),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uring-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
