//! A constant-rate HTTP/1.1 load generator for `benches/run.sh`'s latency
//! row: requests go out on a fixed schedule whatever the answers do, and
//! each latency is measured from the time the request was due, not from
//! when it was sent, so a stall shows in the percentiles instead of
//! slowing the load (closed-loop tools such as wrk hide it).
//!
//!   cargo run --release --example rate -- ADDR RATE SECONDS CONNS
//!
//! prints one line: `sent=N errors=E rate=R p50_ms=.. p99_ms=.. p999_ms=.. max_ms=..`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

struct Args {
    addr: SocketAddr,
    rate: f64,
    seconds: f64,
    conns: usize,
}

fn args() -> Result<Args, String> {
    let v: Vec<String> = std::env::args().skip(1).collect();
    let [addr, rate, seconds, conns] = v.as_slice() else {
        return Err("usage: rate ADDR RATE SECONDS CONNS".into());
    };
    let num = |s: &str, what: &str| {
        s.parse::<f64>()
            .map_err(|_| format!("{what}: {s} is not a number"))
    };
    Ok(Args {
        addr: addr
            .parse()
            .map_err(|_| format!("ADDR: {addr} is not IP:PORT"))?,
        rate: num(rate, "RATE")?,
        seconds: num(seconds, "SECONDS")?,
        conns: conns
            .parse()
            .map_err(|_| format!("CONNS: {conns} is not a whole number"))?,
    })
}

/// Reads one response off `s` into `buf` (what follows it stays there).
async fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let total = end + 4 + len;
            if buf.len() >= total {
                buf.drain(..total);
                return Ok(());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connection `k` of `n` sends requests k, k+n, k+2n, ... each at its
/// due time, and records each latency from that due time.
async fn worker(a: &Args, k: usize, start: Instant) -> (Histogram<u64>, u64, u64) {
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    let (mut sent, mut errors) = (0u64, 0u64);
    let total = (a.rate * a.seconds) as u64;
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(8192);
    let mut i = k as u64;
    while i < total {
        let due = start + Duration::from_secs_f64(i as f64 / a.rate);
        tokio::time::sleep_until(due.into()).await;
        if stream.is_none() {
            match TcpStream::connect(a.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                    buf.clear();
                }
                Err(_) => {
                    errors += 1;
                    i += a.conns as u64;
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected");
        let ok = s.write_all(REQUEST).await.is_ok() && response(s, &mut buf).await.is_ok();
        sent += 1;
        if ok {
            let us = due.elapsed().as_micros() as u64;
            let _ = h.record(us.max(1));
        } else {
            errors += 1;
            stream = None;
        }
        i += a.conns as u64;
    }
    (h, sent, errors)
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rate: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let a: &'static Args = Box::leak(Box::new(a));
    let began = Instant::now();
    let (h, sent, errors) = rt.block_on(async move {
        // A moment for every connection task to start before the first is due.
        let start = Instant::now() + Duration::from_millis(50);
        let tasks: Vec<_> = (0..a.conns)
            .map(|k| tokio::spawn(worker(a, k, start)))
            .collect();
        let mut all = Histogram::<u64>::new(3).expect("histogram");
        let (mut sent, mut errors) = (0, 0);
        for t in tasks {
            let (h, s, e) = t.await.expect("worker");
            all.add(h).expect("same bounds");
            sent += s;
            errors += e;
        }
        (all, sent, errors)
    });
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "sent={sent} errors={errors} rate={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}",
        sent as f64 / began.elapsed().as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
}
