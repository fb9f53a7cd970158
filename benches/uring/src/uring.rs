//! The io_uring engine: one ring on one thread does all the I/O.
//!
//! - Each listener has one multishot accept (`AcceptMulti`), re-armed
//!   whenever a completion comes without the MORE flag.
//! - A new connection: TCP_NODELAY and the backend's socket are plain
//!   system calls (as in the epoll engine), the connect goes through the
//!   ring.
//! - Each direction has one multishot receive (`RecvMulti`) that takes
//!   its buffer from a shared provided-buffer ring, so an idle connection
//!   holds no buffer at all. Received buffers queue per direction (linked
//!   through the buffers' own `next` slots, no allocation) and go out one
//!   `Send` at a time, a short send resending the rest.
//! - Backpressure: a direction holding `QUEUE_CAP` buffers has its receive
//!   cancelled, and re-armed once a send frees one; a receive that ran the
//!   ring dry (ENOBUFS) waits until buffers come back.
//! - EOF on one side becomes `shutdown(SHUT_WR)` on the other once its
//!   queue is sent: a system call by default, since the kernel hands every
//!   `IORING_OP_SHUTDOWN` to an io-wq worker thread (a switch to another
//!   thread per shutdown; `--shutdown ring` measures it). When both
//!   directions are shut, both sockets are closed through the ring. On an
//!   error, every request still in flight on the two sockets is cancelled
//!   and both are closed.
//! - Submission is batched: everything queued while handling a batch of
//!   completions goes to the kernel in the next loop's one
//!   `submit_and_wait`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use socket2::SockAddr;

use crate::Group;

/// The provided-buffer group every receive takes from.
const BGID: u16 = 0;
/// Received buffers a direction may hold unsent before its receive is
/// cancelled: the socket, not the proxy, should buffer for a slow reader.
const QUEUE_CAP: u16 = 8;
/// End of a buffer queue (buffer ids are below 32768).
const NONE: u16 = u16::MAX;
const SQ_ENTRIES: u32 = 2048;
const CQ_ENTRIES: u32 = 8192;

// user_data: the kind of request in the low 4 bits, the direction in bit
// 4, the connection's slot (or the listener's index) from bit 8.
const K_IGNORE: u64 = 0;
const K_ACCEPT: u64 = 1;
const K_CONNECT: u64 = 2;
const K_RECV: u64 = 3;
const K_SEND: u64 = 4;
const K_SHUTDOWN: u64 = 5;
const K_TIMER: u64 = 6;

fn ud(kind: u64, slot: usize, dir: usize) -> u64 {
    kind | (dir as u64) << 4 | (slot as u64) << 8
}

/// The provided buffers: a ring of entries shared with the kernel, the
/// buffers themselves, and per buffer the bytes it holds and the next
/// buffer in its direction's send queue.
struct Bufs {
    ring: *mut BufRingEntry,
    mask: u16,
    /// Our tail; the kernel sees it at `publish`.
    tail: u16,
    base: *mut u8,
    size: u32,
    count: u32,
    /// Buffers handed to us by completions and not yet given back.
    out: u32,
    len: Vec<u32>,
    next: Vec<u16>,
}

impl Bufs {
    fn new(ring: &IoUring, count: u16, size: u32) -> io::Result<Self> {
        // Anonymous mappings: page-aligned as the buffer ring requires,
        // and the buffers' pages are only touched when data lands in them.
        let entries = map(count as usize * std::mem::size_of::<BufRingEntry>())?;
        let base = map(count as usize * size as usize)?;
        // SAFETY: both mappings live as long as the process.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, BGID, 0)?
        };
        let mut b = Bufs {
            ring: entries.cast(),
            mask: count - 1,
            tail: 0,
            base,
            size,
            count: count as u32,
            out: count as u32,
            len: vec![0; count as usize],
            next: vec![NONE; count as usize],
        };
        for bid in 0..count {
            b.give(bid);
        }
        b.publish();
        Ok(b)
    }

    fn take(&mut self) {
        self.out += 1;
    }

    /// Returns a buffer to the ring (seen by the kernel at `publish`).
    fn give(&mut self, bid: u16) {
        // SAFETY: the index is masked into the ring; entry 0's tail field
        // is not among the fields written here.
        let e = unsafe { &mut *self.ring.add((self.tail & self.mask) as usize) };
        e.set_addr(self.base as u64 + bid as u64 * self.size as u64);
        e.set_len(self.size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.out -= 1;
    }

    fn publish(&self) {
        // SAFETY: the tail is a u16 shared with the kernel, which reads it
        // with acquire ordering.
        unsafe {
            AtomicU16::from_ptr(BufRingEntry::tail(self.ring) as *mut u16)
                .store(self.tail, Ordering::Release)
        };
    }

    fn free(&self) -> u32 {
        self.count - self.out
    }

    fn ptr(&self, bid: u16, off: u32) -> *const u8 {
        // SAFETY: bid < count and off < size.
        unsafe {
            self.base
                .add(bid as usize * self.size as usize + off as usize)
        }
    }
}

fn map(bytes: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping, never unmapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Connecting,
    Relaying,
    /// Closed or being closed; the slot is freed once no request in
    /// flight names it.
    Closing,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shut {
    No,
    Sent,
    Done,
}

/// One direction: received from `fd[d]`, sent to `fd[1 - d]`.
#[derive(Clone, Copy)]
struct Dir {
    head: u16,
    tail: u16,
    queued: u16,
    /// Bytes of the head buffer already sent.
    off: u32,
    sending: bool,
    /// A multishot receive is in flight.
    armed: bool,
    cancelling: bool,
    eof: bool,
    shut: Shut,
}

const DIR: Dir = Dir {
    head: NONE,
    tail: NONE,
    queued: 0,
    off: 0,
    sending: false,
    armed: false,
    cancelling: false,
    eof: false,
    shut: Shut::No,
};

#[derive(Clone, Copy)]
struct Conn {
    /// Client, backend.
    fd: [RawFd; 2],
    state: State,
    /// Requests in flight that name this slot.
    ops: u16,
    dir: [Dir; 2],
}

const FREE: Conn = Conn {
    fd: [-1, -1],
    state: State::Free,
    ops: 0,
    dir: [DIR, DIR],
};

struct Listener {
    fd: RawFd,
    backends: Vec<SockAddr>,
    next: usize,
}

struct Proxy {
    ring: IoUring,
    bufs: Bufs,
    conns: Vec<Conn>,
    free: Vec<usize>,
    listeners: Vec<Listener>,
    /// Completions taken from the ring, not yet handled.
    cqes: VecDeque<(u64, i32, u32)>,
    /// Directions whose receive found no buffer.
    starved: Vec<(usize, usize)>,
    /// Listeners whose accept stopped for want of descriptors or memory.
    paused: Vec<usize>,
    timer_armed: bool,
    /// The retry delay for paused accepts; boxed so its address holds.
    retry: Box<Timespec>,
    /// Shutdown through the ring rather than as a system call: the kernel
    /// always hands IORING_OP_SHUTDOWN to an io-wq worker thread.
    ring_shutdown: bool,
}

pub fn run(groups: &[Group], buf_size: u32, buffers: u16, ring_shutdown: bool) -> io::Result<()> {
    // One thread submits, and completions are only wanted when it asks
    // for them: let the kernel run their work in that thread's wait.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES)
        .or_else(|_| {
            IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .build(SQ_ENTRIES)
        })?;
    let bufs = Bufs::new(&ring, buffers, buf_size)?;
    let mut listeners = Vec::new();
    for g in groups {
        listeners.push(Listener {
            fd: crate::listener(g.listen)?.into_raw_fd(),
            backends: g.backends.iter().map(|&a| a.into()).collect(),
            next: 0,
        });
    }
    let mut p = Proxy {
        ring,
        bufs,
        conns: Vec::new(),
        free: Vec::new(),
        listeners,
        cqes: VecDeque::new(),
        starved: Vec::new(),
        paused: Vec::new(),
        timer_armed: false,
        retry: Box::new(Timespec::new().sec(1)),
        ring_shutdown,
    };
    for li in 0..p.listeners.len() {
        p.arm_accept(li);
    }
    loop {
        p.bufs.publish();
        if let Err(e) = p.ring.submit_and_wait(1) {
            match e.raw_os_error() {
                // Interrupted, or completions to reap first.
                Some(libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                _ => return Err(e),
            }
        }
        p.reap();
        while let Some((ud, res, flags)) = p.cqes.pop_front() {
            p.complete(ud, res, flags);
        }
        p.rearm_starved();
    }
}

impl Proxy {
    fn reap(&mut self) {
        for c in self.ring.completion() {
            self.cqes.push_back((c.user_data(), c.result(), c.flags()));
        }
    }

    fn push(&mut self, e: squeue::Entry) {
        // SAFETY (every push): the pointers in the entries point at the
        // buffer mappings, the listeners' backend addresses or the boxed
        // timespec, all of which outlive the requests.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            // The queue is full: hand it to the kernel now.
            self.bufs.publish();
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    self.reap()
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("io_uring submit: {e}"),
            }
        }
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let slot = (ud >> 8) as usize;
        let d = ((ud >> 4) & 1) as usize;
        match ud & 0xf {
            K_ACCEPT => self.on_accept(slot, res, flags),
            K_CONNECT => self.on_connect(slot, res),
            K_RECV => self.on_recv(slot, d, res, flags),
            K_SEND => self.on_send(slot, d, res),
            K_SHUTDOWN => self.on_shutdown(slot, d, res),
            K_TIMER => {
                self.timer_armed = false;
                for li in std::mem::take(&mut self.paused) {
                    self.arm_accept(li);
                }
            }
            _ => {} // K_IGNORE: cancels and closes
        }
    }

    fn arm_accept(&mut self, li: usize) {
        let fd = self.listeners[li].fd;
        self.push(
            opcode::AcceptMulti::new(Fd(fd))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(ud(K_ACCEPT, li, 0)),
        );
    }

    fn on_accept(&mut self, li: usize, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            if matches!(
                -res,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
            ) {
                // Retrying now would fail again at once: wait a second.
                self.paused.push(li);
                if !self.timer_armed {
                    self.timer_armed = true;
                    let ts: *const Timespec = &*self.retry;
                    self.push(opcode::Timeout::new(ts).build().user_data(K_TIMER));
                }
            } else {
                self.arm_accept(li);
            }
        }
        if res < 0 {
            eprintln!("accept: {}", io::Error::from_raw_os_error(-res));
            return;
        }
        self.open(li, res);
    }

    fn open(&mut self, li: usize, cfd: RawFd) {
        nodelay(cfd);
        let l = &mut self.listeners[li];
        let addr = &l.backends[l.next % l.backends.len()];
        l.next += 1;
        let (family, sa, sa_len) = (addr.family(), addr.as_ptr().cast(), addr.len());
        // SAFETY: plain system call.
        let bfd = unsafe {
            libc::socket(
                family as libc::c_int,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if bfd < 0 {
            eprintln!("socket: {}", io::Error::last_os_error());
            self.push(opcode::Close::new(Fd(cfd)).build().user_data(K_IGNORE));
            return;
        }
        nodelay(bfd);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(FREE);
                self.conns.len() - 1
            }
        };
        self.conns[slot] = Conn {
            fd: [cfd, bfd],
            state: State::Connecting,
            ops: 1,
            dir: [DIR, DIR],
        };
        self.push(
            opcode::Connect::new(Fd(bfd), sa, sa_len)
                .build()
                .user_data(ud(K_CONNECT, slot, 0)),
        );
    }

    fn on_connect(&mut self, slot: usize, res: i32) {
        let c = &mut self.conns[slot];
        c.ops -= 1;
        if c.state != State::Connecting {
            self.release_if_done(slot);
            return;
        }
        if res < 0 {
            // Refused or unreachable: closing the client tells it so.
            self.close(slot, false);
            return;
        }
        c.state = State::Relaying;
        self.arm_recv(slot, 0);
        self.arm_recv(slot, 1);
    }

    fn arm_recv(&mut self, slot: usize, d: usize) {
        let c = &mut self.conns[slot];
        let dr = &mut c.dir[d];
        if c.state != State::Relaying || dr.armed || dr.eof || dr.queued >= QUEUE_CAP {
            return;
        }
        dr.armed = true;
        dr.cancelling = false;
        c.ops += 1;
        let fd = c.fd[d];
        self.push(
            opcode::RecvMulti::new(Fd(fd), BGID)
                .build()
                .user_data(ud(K_RECV, slot, d)),
        );
    }

    fn on_recv(&mut self, slot: usize, d: usize, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if bid.is_some() {
            self.bufs.take();
        }
        let c = &mut self.conns[slot];
        if !more {
            c.ops -= 1;
            c.dir[d].armed = false;
        }
        if c.state != State::Relaying {
            if let Some(b) = bid {
                self.bufs.give(b);
            }
            self.release_if_done(slot);
            return;
        }
        if res > 0 {
            let Some(bid) = bid else {
                self.close(slot, true);
                return;
            };
            self.enqueue(slot, d, bid, res as u32);
            self.send_next(slot, d);
            let dr = &mut self.conns[slot].dir[d];
            if dr.armed && !dr.cancelling && dr.queued >= QUEUE_CAP {
                // The reader is slower than the writer: stop receiving
                // until the queue drains.
                dr.cancelling = true;
                self.push(
                    opcode::AsyncCancel::new(ud(K_RECV, slot, d))
                        .build()
                        .user_data(K_IGNORE),
                );
            } else if !dr.armed {
                // The kernel ended the multishot (CQ overflow, say).
                self.arm_recv(slot, d);
            }
            return;
        }
        if let Some(b) = bid {
            self.bufs.give(b);
        }
        match -res {
            0 => {
                c.dir[d].eof = true;
                self.send_next(slot, d);
            }
            // Out of buffers: re-armed once some come back.
            libc::ENOBUFS => self.starved.push((slot, d)),
            // Our backpressure cancel: re-armed if the queue has drained.
            libc::ECANCELED => self.arm_recv(slot, d),
            _ => self.close(slot, true),
        }
    }

    fn enqueue(&mut self, slot: usize, d: usize, bid: u16, n: u32) {
        self.bufs.len[bid as usize] = n;
        self.bufs.next[bid as usize] = NONE;
        let dr = &mut self.conns[slot].dir[d];
        if dr.head == NONE {
            dr.head = bid;
        } else {
            self.bufs.next[dr.tail as usize] = bid;
        }
        dr.tail = bid;
        dr.queued += 1;
    }

    /// Sends the head of a direction's queue unless a send is in flight;
    /// with nothing left and the source at EOF, shuts the other side.
    fn send_next(&mut self, slot: usize, d: usize) {
        let c = &mut self.conns[slot];
        let to = c.fd[1 - d];
        let dr = &mut c.dir[d];
        if dr.sending {
            return;
        }
        if dr.head == NONE {
            if dr.eof && dr.shut == Shut::No {
                dr.shut = Shut::Sent;
                if self.ring_shutdown {
                    c.ops += 1;
                    self.push(
                        opcode::Shutdown::new(Fd(to), libc::SHUT_WR)
                            .build()
                            .user_data(ud(K_SHUTDOWN, slot, d)),
                    );
                } else {
                    // SAFETY: plain system call on a descriptor we own.
                    let res = match unsafe { libc::shutdown(to, libc::SHUT_WR) } {
                        0 => 0,
                        _ => -io::Error::last_os_error()
                            .raw_os_error()
                            .unwrap_or(libc::EIO),
                    };
                    self.shut_done(slot, d, res);
                }
            }
            return;
        }
        let (bid, off) = (dr.head, dr.off);
        dr.sending = true;
        c.ops += 1;
        let len = self.bufs.len[bid as usize] - off;
        let ptr = self.bufs.ptr(bid, off);
        self.push(
            opcode::Send::new(Fd(to), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(ud(K_SEND, slot, d)),
        );
    }

    fn on_send(&mut self, slot: usize, d: usize, res: i32) {
        let c = &mut self.conns[slot];
        c.ops -= 1;
        c.dir[d].sending = false;
        if c.state != State::Relaying {
            self.release_if_done(slot);
            return;
        }
        if res <= 0 {
            self.close(slot, true);
            return;
        }
        let dr = &mut c.dir[d];
        dr.off += res as u32;
        let bid = dr.head;
        if dr.off >= self.bufs.len[bid as usize] {
            dr.head = self.bufs.next[bid as usize];
            if dr.head == NONE {
                dr.tail = NONE;
            }
            dr.queued -= 1;
            dr.off = 0;
            self.bufs.give(bid);
            self.arm_recv(slot, d);
        }
        // The rest of a short send, or the next buffer.
        self.send_next(slot, d);
    }

    fn on_shutdown(&mut self, slot: usize, d: usize, res: i32) {
        self.conns[slot].ops -= 1;
        self.shut_done(slot, d, res);
    }

    fn shut_done(&mut self, slot: usize, d: usize, res: i32) {
        let c = &mut self.conns[slot];
        if c.state != State::Relaying {
            self.release_if_done(slot);
            return;
        }
        if res < 0 {
            self.close(slot, true);
            return;
        }
        c.dir[d].shut = Shut::Done;
        if c.dir.iter().all(|dr| dr.shut == Shut::Done) {
            // Both directions ended and nothing is in flight.
            self.close(slot, false);
        }
    }

    /// Closes both sockets through the ring; `cancel` first cancels every
    /// request still in flight on them, since an armed receive holds its
    /// socket open past the close.
    fn close(&mut self, slot: usize, cancel: bool) {
        let c = &mut self.conns[slot];
        if matches!(c.state, State::Closing | State::Free) {
            return;
        }
        c.state = State::Closing;
        let fds = std::mem::replace(&mut c.fd, [-1, -1]);
        for fd in fds {
            if cancel {
                self.push(
                    opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all())
                        .build()
                        .user_data(K_IGNORE),
                );
            }
            self.push(opcode::Close::new(Fd(fd)).build().user_data(K_IGNORE));
        }
        self.release_if_done(slot);
    }

    /// Frees a closed connection's slot and buffers once no request in
    /// flight refers to them.
    fn release_if_done(&mut self, slot: usize) {
        let c = self.conns[slot];
        if c.state != State::Closing || c.ops != 0 {
            return;
        }
        for dr in c.dir {
            let mut b = dr.head;
            while b != NONE {
                let n = self.bufs.next[b as usize];
                self.bufs.give(b);
                b = n;
            }
        }
        self.conns[slot] = FREE;
        self.free.push(slot);
    }

    /// Re-arms receives that found the ring empty, as many as there are
    /// buffers back in it.
    fn rearm_starved(&mut self) {
        let mut n = self.bufs.free();
        while n > 0 {
            let Some((slot, d)) = self.starved.pop() else {
                break;
            };
            self.arm_recv(slot, d);
            n -= 1;
        }
    }
}

fn nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: plain system call on a descriptor we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
