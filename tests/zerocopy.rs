//! The data path under bulk load, with zero-copy splice and with the copy
//! fallback forced on: large transfers checked by hash both ways,
//! half-close, a slow reader, and a backend reset mid-transfer.

mod support;

use std::hash::Hasher;
use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

/// Deterministic bytes: block `i` of a stream seeded by `seed`.
fn block(seed: u64, i: usize) -> Vec<u8> {
    let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hasher() -> std::collections::hash_map::DefaultHasher {
    std::collections::hash_map::DefaultHasher::new()
}

/// Writes `len` bytes of stream `seed`, then half-closes; returns its hash.
async fn send(w: &mut (impl AsyncWriteExt + Unpin), seed: u64, len: usize) -> u64 {
    let mut h = hasher();
    let mut sent = 0;
    let mut i = 0;
    while sent < len {
        let b = block(seed, i);
        let n = b.len().min(len - sent);
        w.write_all(&b[..n]).await.unwrap();
        h.write(&b[..n]);
        sent += n;
        i += 1;
    }
    w.shutdown().await.unwrap();
    h.finish()
}

/// Reads to EOF; returns length and hash.
async fn receive(r: &mut (impl AsyncReadExt + Unpin)) -> (usize, u64) {
    let mut h = hasher();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return (total, h.finish());
        }
        h.write(&buf[..n]);
        total += n;
    }
}

/// A backend that receives a whole stream while sending its own, then
/// reports what it received.
async fn bulk_backend(
    seed: u64,
    len: usize,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<((usize, u64), u64)>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let (got, sent) = tokio::join!(receive(&mut r), send(&mut w, seed, len));
        let _ = tx.send((got, sent));
    });
    (addr, rx)
}

fn sluice_config(zero_copy: bool, addr: SocketAddr) -> String {
    config(&format!("zero_copy = {zero_copy}"), "", &[("b", addr)])
}

async fn both_ways_intact(zero_copy: bool) {
    let len = 24 * MIB + 12345;
    let (addr, report) = bulk_backend(2, len).await;
    let lb = Sluice::from_toml(&sluice_config(zero_copy, addr)).await;
    let s = TcpStream::connect(lb.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let (got, sent) = within("bulk both ways", async {
        tokio::join!(receive(&mut r), send(&mut w, 1, len))
    })
    .await;
    let (backend_got, backend_sent) = within("backend report", report).await.unwrap();
    assert_eq!(backend_got, (len, sent), "client to backend intact");
    assert_eq!(got, (len, backend_sent), "backend to client intact");
    wait_for("connection closed", || async { lb.live("b").await == 0 }).await;
    let v = lb.backend("b").await;
    assert_eq!(v["bytes_in"], len as u64);
    assert_eq!(v["bytes_out"], len as u64);
    let spliced = v["bytes_spliced"].as_u64().unwrap();
    if zero_copy {
        assert!(spliced > len as u64, "bulk moved by splice: {spliced}");
    } else {
        assert_eq!(spliced, 0, "the copy fallback was forced on");
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_both_ways_are_intact_with_splice() {
    both_ways_intact(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_both_ways_are_intact_with_the_copy_fallback() {
    both_ways_intact(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_after_a_spliced_bulk_flow_in_each_direction() {
    for zero_copy in [true, false] {
        // Client sends bulk and half-closes; the backend answers after EOF.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let got = receive(&mut s).await;
            s.write_all(format!("{}:{}", got.0, got.1).as_bytes())
                .await
                .unwrap();
            // Then it sends bulk of its own and closes.
            send(&mut s, 9, 8 * MIB).await;
        });
        let lb = Sluice::from_toml(&sluice_config(zero_copy, addr)).await;
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        let hash = within("send", send(&mut s, 3, 16 * MIB)).await;
        let expect = format!("{}:{}", 16 * MIB, hash);
        let mut head = vec![0u8; expect.len()];
        within("answer after our FIN", s.read_exact(&mut head))
            .await
            .unwrap();
        assert_eq!(String::from_utf8(head).unwrap(), expect);
        let (n, _) = within("backend bulk after our FIN", receive(&mut s)).await;
        assert_eq!(n, 8 * MIB);
        wait_for("closed", || async { lb.live("b").await == 0 }).await;
        lb.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_pushes_back_without_memory_growth() {
    for zero_copy in [true, false] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            // Reads nothing until told to.
            let _ = go_rx.await;
            let _ = done_tx.send(receive(&mut s).await);
        });
        let lb = Sluice::from_toml(&sluice_config(zero_copy, addr)).await;
        let s = TcpStream::connect(lb.addr).await.unwrap();
        let (_r, mut w) = s.into_split();
        // Write until the chain is full and writes stop completing.
        let mut h = hasher();
        let mut written = 0usize;
        let (mut i, mut off) = (0, 0);
        let mut b = block(5, i);
        loop {
            match tokio::time::timeout(Duration::from_millis(500), w.write(&b[off..])).await {
                Ok(r) => {
                    let n = r.unwrap();
                    h.write(&b[off..off + n]);
                    written += n;
                    off += n;
                    if off == b.len() {
                        i += 1;
                        off = 0;
                        b = block(5, i);
                    }
                }
                Err(_) => break,
            }
            assert!(
                written < 256 * MIB,
                "no backpressure: {written} bytes accepted"
            );
        }
        // Socket buffers and one pipe hold it; sluice buffers nothing more.
        assert!(written < 64 * MIB, "{written} bytes in flight");
        let in_flight = lb.backend("b").await["bytes_in"].as_u64().unwrap();
        assert!(in_flight as usize <= written);
        // The rest goes through once the reader reads.
        go_tx.send(()).unwrap();
        within("rest", w.write_all(&b[off..])).await.unwrap();
        h.write(&b[off..]);
        written += b.len() - off;
        w.shutdown().await.unwrap();
        let got = within("reader drains", done_rx).await.unwrap();
        assert_eq!(got, (written, h.finish()));
        lb.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_mid_transfer_ends_the_connection_cleanly() {
    for zero_copy in [true, false] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; MIB];
            let mut got = 0;
            while got < 4 * MIB {
                got += s.read(&mut buf).await.unwrap();
            }
            reset(s);
        });
        let lb = Sluice::from_toml(&sluice_config(zero_copy, addr)).await;
        let s = TcpStream::connect(lb.addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut i = 0;
            // Ends with an error once the reset comes back through sluice.
            while w.write_all(&block(7, i)).await.is_ok() && i < 4096 {
                i += 1;
            }
        });
        let mut buf = [0u8; 64];
        let end = within("client sees the end", r.read(&mut buf)).await;
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        within("writer stops", writer).await.unwrap();
        wait_for("count back to 0", || async { lb.live("b").await == 0 }).await;
        lb.shutdown().await;
    }
}
