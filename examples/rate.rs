//! A constant-rate HTTP/1.1 load generator for `benches/run.sh`'s latency
//! row: requests go out on a fixed schedule whatever the answers do, and
//! each latency is measured from the time the request was due, not from
//! when it was sent, so a stall shows in the percentiles instead of
//! slowing the load (closed-loop tools such as wrk hide it).
//!
//!   cargo run --release --example rate -- ADDR RATE SECONDS CONNS
//!
//! prints one line: `sent=N errors=E rate=R p50_ms=.. p99_ms=.. p999_ms=..
//! max_ms=.. late_p99_ms=..`, where `late` is how long after its due time
//! a request left (the generator's own delay, which the latencies
//! include). It exits 1 when more than 1% of the requests failed: a
//! failed request has no latency, and the percentiles of the rest would
//! read better than the run was.

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

/// How long one response may take before the request counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Reads one 2xx response with a Content-Length off `s` into `buf` (what
/// follows it stays there); anything else is an error, since a body of
/// unknown length would put the next response out of step.
async fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("head not UTF-8"))?;
            if !head.starts_with("HTTP/1.1 2") && !head.starts_with("HTTP/1.0 2") {
                return Err(bad("not a 2xx response"));
            }
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| bad("no Content-Length"))?;
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

/// Waits until `due`. tokio's timer has millisecond ticks and rounds a
/// deadline up, so it sleeps to a tick before and yields the rest of
/// the way: a request leaves within microseconds of its due time.
async fn until(due: Instant) {
    if let Some(early) = due.checked_sub(Duration::from_millis(2))
        && early > Instant::now()
    {
        tokio::time::sleep_until(early.into()).await;
    }
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

/// What one connection measured.
struct Measured {
    latency: Histogram<u64>,
    late: Histogram<u64>,
    sent: u64,
    errors: u64,
}

/// Connection `k` of `n` sends requests k, k+n, k+2n, ... each at its
/// due time, and records each latency from that due time. The connection
/// is made before the first is due, so no latency holds a handshake.
async fn worker(a: &Args, k: usize, start: Instant) -> Measured {
    let mut m = Measured {
        latency: Histogram::<u64>::new(3).expect("histogram"),
        late: Histogram::<u64>::new(3).expect("histogram"),
        sent: 0,
        errors: 0,
    };
    let total = (a.rate * a.seconds) as u64;
    let mut stream: Option<TcpStream> = TcpStream::connect(a.addr).await.ok();
    if let Some(s) = &stream {
        let _ = s.set_nodelay(true);
    }
    let mut buf = Vec::with_capacity(8192);
    let mut i = k as u64;
    while i < total {
        let due = start + Duration::from_secs_f64(i as f64 / a.rate);
        until(due).await;
        let _ = m.late.record((due.elapsed().as_micros() as u64).max(1));
        if stream.is_none() {
            match TcpStream::connect(a.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                    buf.clear();
                }
                Err(_) => {
                    m.sent += 1;
                    m.errors += 1;
                    i += a.conns as u64;
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected");
        let exchange =
            async { s.write_all(REQUEST).await.is_ok() && response(s, &mut buf).await.is_ok() };
        let ok = tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
            .await
            .unwrap_or(false);
        m.sent += 1;
        if ok {
            let us = due.elapsed().as_micros() as u64;
            let _ = m.latency.record(us.max(1));
        } else {
            m.errors += 1;
            stream = None;
        }
        i += a.conns as u64;
    }
    m
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
    let all = rt.block_on(async move {
        // Time for every connection to be made before the first is due.
        let start = Instant::now() + Duration::from_millis(500);
        let tasks: Vec<_> = (0..a.conns)
            .map(|k| tokio::spawn(worker(a, k, start)))
            .collect();
        let mut all = Measured {
            latency: Histogram::<u64>::new(3).expect("histogram"),
            late: Histogram::<u64>::new(3).expect("histogram"),
            sent: 0,
            errors: 0,
        };
        for t in tasks {
            let m = t.await.expect("worker");
            all.latency.add(m.latency).expect("same bounds");
            all.late.add(m.late).expect("same bounds");
            all.sent += m.sent;
            all.errors += m.errors;
        }
        all
    });
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let h = &all.latency;
    println!(
        "sent={} errors={} rate={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} late_p99_ms={:.3}",
        all.sent,
        all.errors,
        all.sent as f64 / (began.elapsed().as_secs_f64() - 0.5),
        ms(h, 0.5),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0,
        ms(&all.late, 0.99)
    );
    if all.sent == 0 || all.errors * 100 > all.sent {
        eprintln!(
            "rate: {} of {} requests failed: the percentiles above leave them out",
            all.errors, all.sent
        );
        std::process::exit(1);
    }
}
