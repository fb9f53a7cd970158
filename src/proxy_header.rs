//! The PROXY protocol header (HAProxy's, versions 1 and 2), which tells a
//! server the address of the client a proxy relays.
//!
//! [`encode`] writes the header sluice sends ahead of a client's stream
//! (`send_proxy`), into a stack buffer: no allocation per connection.
//! [`parse`] reads one that a balancer in front of sluice sent
//! (`accept_proxy`); it is a pure function of the bytes so far, fuzzed in
//! `fuzz/fuzz_targets/proxy_header.rs`. [`read`] takes exactly the header
//! off a client's socket and nothing after it: it peeks, and consumes
//! only bytes known to be the header's, so whatever the client sent next
//! stays in the socket for the splice to pass on.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyVersion;

/// The first 12 bytes of every version 2 header.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What every version 1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest version 1 header, CRLF included (the specification's).
pub const V1_MAX: usize = 107;
/// A version 2 header's fixed part: signature, version and command,
/// family and transport, length.
const V2_FIXED: usize = 16;
/// The longest v2 header taken, extensions included. The balancers that
/// send TLVs (AWS, Azure, GCP) send a few dozen bytes of them; a longer
/// header is refused as malformed, so a hostile client cannot make sluice
/// read and discard 64 KiB on every connection.
pub const V2_MAX: usize = 4096;
/// Room for any header sluice writes: v1 at most 107 bytes, v2 for IPv6
/// 52.
const ENCODED_MAX: usize = V1_MAX;

/// A header ready to send, held on the stack.
#[derive(Clone, Copy)]
pub struct Encoded {
    buf: [u8; ENCODED_MAX],
    len: u8,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_bytes())
    }
}

/// The header of `version` for a connection from `src` to `dst`, or,
/// without them, one that says the connection is sluice's own (a health
/// check): v2 `LOCAL`, v1 `UNKNOWN`.
///
/// Both addresses are written in one family: IPv4-mapped IPv6 addresses
/// (a v4 client on a `[::]` listener) as IPv4 when both are, and an IPv4
/// address as mapped IPv6 when the other is IPv6.
pub fn encode(version: ProxyVersion, addrs: Option<(SocketAddr, SocketAddr)>) -> Encoded {
    let mut out = Encoded {
        buf: [0; ENCODED_MAX],
        len: 0,
    };
    let addrs = addrs.map(|(s, d)| one_family(s, d));
    let len = match version {
        ProxyVersion::V1 => {
            let mut w = &mut out.buf[..];
            let room = w.len();
            // Cannot fail: the longest line (two full IPv6 addresses and
            // two 5-digit ports) is 104 bytes.
            let _ = match addrs {
                None => write!(w, "PROXY UNKNOWN\r\n"),
                Some((s, d)) => {
                    let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                    write!(
                        w,
                        "PROXY {family} {} {} {} {}\r\n",
                        s.ip(),
                        d.ip(),
                        s.port(),
                        d.port()
                    )
                }
            };
            room - w.len()
        }
        ProxyVersion::V2 => {
            let b = &mut out.buf;
            b[..12].copy_from_slice(&SIGNATURE);
            let Some((s, d)) = addrs else {
                // Version 2, LOCAL; family UNSPEC; no address.
                b[12] = 0x20;
                return Encoded { len: 16, ..out };
            };
            b[12] = 0x21;
            let mut at = V2_FIXED;
            let mut put = |bytes: &[u8]| {
                b[at..at + bytes.len()].copy_from_slice(bytes);
                at += bytes.len();
            };
            match (s.ip(), d.ip()) {
                (IpAddr::V4(si), IpAddr::V4(di)) => {
                    put(&si.octets());
                    put(&di.octets());
                }
                (si, di) => {
                    put(&v6(si).octets());
                    put(&v6(di).octets());
                }
            }
            put(&s.port().to_be_bytes());
            put(&d.port().to_be_bytes());
            let body = (at - V2_FIXED) as u16;
            // TCP over IPv4 or over IPv6.
            b[13] = if body == 12 { 0x11 } else { 0x21 };
            b[14..16].copy_from_slice(&body.to_be_bytes());
            at
        }
    };
    out.len = len as u8;
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// `s` and `d` in one family, IPv4 where both can be.
fn one_family(s: SocketAddr, d: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (sc, dc) = (s.ip().to_canonical(), d.ip().to_canonical());
    if sc.is_ipv4() && dc.is_ipv4() {
        (SocketAddr::new(sc, s.port()), SocketAddr::new(dc, d.port()))
    } else {
        (
            SocketAddr::new(IpAddr::V6(v6(s.ip())), s.port()),
            SocketAddr::new(IpAddr::V6(v6(d.ip())), d.port()),
        )
    }
}

/// What the bytes so far make of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed; every byte so far is the header's.
    Incomplete,
    /// A whole header of `len` bytes (a v2 header's extensions may lie
    /// beyond the bytes given), relaying a connection from the first
    /// address to the second; `None` for a connection the sender made
    /// itself (v2 `LOCAL`, v1 `UNKNOWN`) or of a family other than TCP
    /// over IP, where the connection's own addresses stand.
    Complete {
        len: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// Parses the start of a stream as a PROXY header of either version.
pub fn parse(b: &[u8]) -> Result<Parsed, Malformed> {
    let starts =
        |prefix: &[u8]| b[..b.len().min(prefix.len())] == prefix[..b.len().min(prefix.len())];
    if b.is_empty() {
        Ok(Parsed::Incomplete)
    } else if starts(&SIGNATURE) {
        parse_v2(b)
    } else if starts(V1_PREFIX) {
        parse_v1(b)
    } else {
        Err(Malformed("not a PROXY protocol header"))
    }
}

fn parse_v2(b: &[u8]) -> Result<Parsed, Malformed> {
    if b.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    if b[12] >> 4 != 2 {
        return Err(Malformed("v2 header of an unknown version"));
    }
    let local = match b[12] & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Malformed("v2 header with an unknown command")),
    };
    let body = u16::from_be_bytes([b[14], b[15]]) as usize;
    let len = V2_FIXED + body;
    if len > V2_MAX {
        return Err(Malformed("v2 header longer than 4096 bytes"));
    }
    // LOCAL: the specification has the receiver skip the address block
    // whatever its family says, and use the connection's own addresses.
    if local {
        return Ok(Parsed::Complete { len, addrs: None });
    }
    // Addresses, by family; the transport (stream, datagram) does not
    // change their layout.
    let (family, transport) = (b[13] >> 4, b[13] & 0x0f);
    if family > 3 || transport > 2 {
        return Err(Malformed("v2 header with an unknown family or transport"));
    }
    let need = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if body < need {
        return Err(Malformed("v2 header too short for its addresses"));
    }
    // UNSPEC, unix sockets and datagrams: the connection's own addresses
    // stand, so no need to wait for bytes that do not matter.
    if transport != 1 || !(1..=2).contains(&family) {
        return Ok(Parsed::Complete { len, addrs: None });
    }
    if b.len() < V2_FIXED + need {
        return Ok(Parsed::Incomplete);
    }
    let a = &b[V2_FIXED..V2_FIXED + need];
    let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
    let (src, dst): (IpAddr, IpAddr) = if family == 1 {
        let ip = |at: usize| Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]);
        (ip(0).into(), ip(4).into())
    } else {
        let ip = |at: usize| {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[at..at + 16]);
            Ipv6Addr::from(o)
        };
        (ip(0).into(), ip(16).into())
    };
    let ports = need - 4;
    Ok(Parsed::Complete {
        len,
        addrs: Some((
            SocketAddr::new(src, port(ports)),
            SocketAddr::new(dst, port(ports + 2)),
        )),
    })
}

fn parse_v1(b: &[u8]) -> Result<Parsed, Malformed> {
    // The first line break decides, so that the verdict on a line feed
    // before the CR does not depend on whether the CR has arrived yet.
    let Some(cr) = b.iter().position(|&c| c == b'\r' || c == b'\n') else {
        if b.len() >= V1_MAX {
            return Err(Malformed("v1 header longer than 107 bytes"));
        }
        return Ok(Parsed::Incomplete);
    };
    if b[cr] == b'\n' {
        return Err(Malformed("v1 header with a bare line feed"));
    }
    let len = cr + 2;
    if len > V1_MAX {
        return Err(Malformed("v1 header longer than 107 bytes"));
    }
    match b.get(cr + 1) {
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(Malformed("v1 header with a bare carriage return")),
    }
    // US-ASCII, as the specification says: valid UTF-8 is not enough.
    let line = match std::str::from_utf8(&b[V1_PREFIX.len()..cr]) {
        Ok(line) if line.is_ascii() => line,
        _ => return Err(Malformed("v1 header that is not ASCII text")),
    };
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The sender could not tell; whatever follows is to be ignored.
        return Ok(Parsed::Complete { len, addrs: None });
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(Malformed("v1 header of an unknown family")),
    };
    let mut next = || {
        fields
            .next()
            .ok_or(Malformed("v1 header with too few fields"))
    };
    let ip = |s: &str| -> Result<IpAddr, Malformed> {
        let ip: IpAddr = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        }
        .map_err(|_| Malformed("v1 header with an address not of its family"))?;
        Ok(ip)
    };
    let port = |s: &str| -> Result<u16, Malformed> {
        let ok = !s.is_empty()
            && s.len() <= 5
            && s.bytes().all(|c| c.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        ok.then(|| s.parse().ok())
            .flatten()
            .ok_or(Malformed("v1 header with a bad port"))
    };
    let (src, dst) = (ip(next()?)?, ip(next()?)?);
    let (sp, dp) = (port(next()?)?, port(next()?)?);
    if fields.next().is_some() {
        return Err(Malformed("v1 header with too many fields"));
    }
    Ok(Parsed::Complete {
        len,
        addrs: Some((SocketAddr::new(src, sp), SocketAddr::new(dst, dp))),
    })
}

/// Why no header was taken off a client.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client closed before sending anything: no header was begun,
    /// as when a balancer in front checks that the port is open.
    #[error("closed before sending a byte")]
    Closed,
    /// The client closed in the middle of a header.
    #[error("closed in the middle of the PROXY header")]
    Truncated,
    #[error("{0}")]
    Malformed(#[from] Malformed),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Takes a PROXY header off `client`, and not one byte more: whatever the
/// client sent after it stays in the socket. Returns the addresses it
/// relays (`None`: the connection's own stand). The caller bounds it with
/// a deadline.
pub async fn read(client: &mut TcpStream) -> Result<Option<(SocketAddr, SocketAddr)>, ReadError> {
    // Big enough for any v1 header and for the part of a v2 header that
    // `parse` needs (52 bytes for IPv6); a v2 header's extensions are
    // read and dropped.
    let mut buf = [0u8; V1_MAX];
    let mut have = 0;
    loop {
        let n = client.peek(&mut buf[have..]).await?;
        if n == 0 {
            return Err(if have == 0 {
                ReadError::Closed
            } else {
                ReadError::Truncated
            });
        }
        match parse(&buf[..have + n])? {
            // Every byte peeked is the header's: take them, and wait for
            // more (the next peek finds the socket empty and waits).
            Parsed::Incomplete => {
                client.read_exact(&mut buf[have..have + n]).await?;
                have += n;
            }
            Parsed::Complete { len, addrs } => {
                let left = len - have;
                // Extensions beyond the stack buffer go to the heap in one
                // read: at most V2_MAX bytes, and not held by every idle
                // connection's future as a bigger stack buffer would be.
                let read = if left <= buf.len() {
                    client.read_exact(&mut buf[..left]).await
                } else {
                    client.read_exact(&mut vec![0; left]).await
                };
                return match read {
                    Ok(_) => Ok(addrs),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        Err(ReadError::Truncated)
                    }
                    Err(e) => Err(e.into()),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn round_trip(v: ProxyVersion, s: &str, d: &str) -> Parsed {
        let e = encode(v, Some((a(s), a(d))));
        let p = parse(e.as_bytes()).unwrap();
        assert_eq!(
            p,
            Parsed::Complete {
                len: e.as_bytes().len(),
                addrs: Some((a(s), a(d)))
            }
        );
        p
    }

    #[test]
    fn v1_for_each_family() {
        let e = encode(
            ProxyVersion::V1,
            Some((a("192.0.2.1:56324"), a("10.0.0.1:443"))),
        );
        assert_eq!(e.as_bytes(), b"PROXY TCP4 192.0.2.1 10.0.0.1 56324 443\r\n");
        let e = encode(
            ProxyVersion::V1,
            Some((a("[2001:db8::1]:56324"), a("[::1]:80"))),
        );
        assert_eq!(e.as_bytes(), b"PROXY TCP6 2001:db8::1 ::1 56324 80\r\n");
        assert_eq!(
            encode(ProxyVersion::V1, None).as_bytes(),
            b"PROXY UNKNOWN\r\n"
        );
        round_trip(ProxyVersion::V1, "192.0.2.1:1", "10.0.0.1:65535");
        round_trip(ProxyVersion::V1, "[2001:db8::1]:0", "[::1]:80");
    }

    #[test]
    fn v1_longest_fits() {
        let full = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let e = encode(ProxyVersion::V1, Some((a(full), a(full))));
        assert_eq!(e.as_bytes().len(), 104);
        round_trip(ProxyVersion::V1, full, full);
    }

    #[test]
    fn v2_for_each_family() {
        let e = encode(
            ProxyVersion::V2,
            Some((a("192.0.2.1:56324"), a("10.0.0.1:443"))),
        );
        let mut want = SIGNATURE.to_vec();
        want.extend([0x21, 0x11, 0, 12, 192, 0, 2, 1, 10, 0, 0, 1]);
        want.extend(56324u16.to_be_bytes());
        want.extend(443u16.to_be_bytes());
        assert_eq!(e.as_bytes(), want);

        let e = encode(
            ProxyVersion::V2,
            Some((a("[2001:db8::1]:5"), a("[::1]:80"))),
        );
        assert_eq!(e.as_bytes().len(), 52);
        assert_eq!(&e.as_bytes()[12..16], &[0x21, 0x21, 0, 36]);
        round_trip(ProxyVersion::V2, "[2001:db8::1]:5", "[::1]:80");
        round_trip(ProxyVersion::V2, "192.0.2.1:1", "10.0.0.1:2");

        let local = encode(ProxyVersion::V2, None);
        let mut want = SIGNATURE.to_vec();
        want.extend([0x20, 0x00, 0, 0]);
        assert_eq!(local.as_bytes(), want);
        assert_eq!(
            parse(local.as_bytes()),
            Ok(Parsed::Complete {
                len: 16,
                addrs: None
            })
        );
    }

    #[test]
    fn mapped_addresses_are_written_as_ipv4_and_mixed_ones_as_ipv6() {
        let mapped = |p| SocketAddr::new(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().into(), p);
        let e = encode(ProxyVersion::V1, Some((mapped(5), mapped(80))));
        assert_eq!(e.as_bytes(), b"PROXY TCP4 127.0.0.1 127.0.0.1 5 80\r\n");
        let e = encode(ProxyVersion::V1, Some((a("127.0.0.1:5"), a("[::1]:80"))));
        assert_eq!(e.as_bytes(), b"PROXY TCP6 ::ffff:127.0.0.1 ::1 5 80\r\n");
        let e = encode(ProxyVersion::V2, Some((a("127.0.0.1:5"), a("[::1]:80"))));
        assert_eq!(e.as_bytes()[13], 0x21);
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        for e in [
            encode(ProxyVersion::V1, Some((a("192.0.2.1:1"), a("10.0.0.1:2")))),
            encode(ProxyVersion::V1, Some((a("[::1]:1"), a("[::1]:2")))),
            encode(ProxyVersion::V1, None),
            encode(ProxyVersion::V2, Some((a("192.0.2.1:1"), a("10.0.0.1:2")))),
            encode(ProxyVersion::V2, Some((a("[::1]:1"), a("[::1]:2")))),
            encode(ProxyVersion::V2, None),
        ] {
            let b = e.as_bytes();
            for n in 0..b.len() {
                assert_eq!(parse(&b[..n]), Ok(Parsed::Incomplete), "{:?}", &b[..n]);
            }
            // What follows the header is not part of it.
            let mut more = b.to_vec();
            more.extend(b"GET / HTTP/1.1\r\n");
            assert!(matches!(parse(&more), Ok(Parsed::Complete { len, .. }) if len == b.len()));
        }
    }

    #[test]
    fn v2_extensions_and_other_families() {
        let mut h = encode(ProxyVersion::V2, Some((a("192.0.2.1:1"), a("10.0.0.1:2"))))
            .as_bytes()
            .to_vec();
        // Room for 100 bytes of TLVs: the header is longer than its
        // addresses, which are known before the rest arrives.
        h[15] = 112;
        assert_eq!(
            parse(&h),
            Ok(Parsed::Complete {
                len: 128,
                addrs: Some((a("192.0.2.1:1"), a("10.0.0.1:2")))
            })
        );
        // A unix socket's 216 bytes of addresses: the connection's stand.
        let mut unix = SIGNATURE.to_vec();
        unix.extend([0x21, 0x31, 0, 216]);
        assert_eq!(
            parse(&unix),
            Ok(Parsed::Complete {
                len: 232,
                addrs: None
            })
        );
        // UDP over IPv4.
        let mut udp = SIGNATURE.to_vec();
        udp.extend([0x21, 0x12, 0, 12]);
        assert!(matches!(
            parse(&udp),
            Ok(Parsed::Complete { addrs: None, .. })
        ));
        // UNSPEC with PROXY.
        let mut unspec = SIGNATURE.to_vec();
        unspec.extend([0x21, 0x00, 0, 0]);
        assert!(matches!(
            parse(&unspec),
            Ok(Parsed::Complete {
                len: 16,
                addrs: None
            })
        ));
    }

    #[test]
    fn v2_local_skips_its_block_whatever_the_family_says() {
        // (family and transport, length): unknown family and transport,
        // TCP4 with no room for addresses, TCP6 with them.
        for (ft, body) in [(0x41u8, 0u8), (0x13, 3), (0x11, 0), (0x11, 5), (0x21, 36)] {
            let mut h = SIGNATURE.to_vec();
            h.extend([0x20, ft, 0, body]);
            assert_eq!(
                parse(&h),
                Ok(Parsed::Complete {
                    len: 16 + body as usize,
                    addrs: None
                }),
                "{ft:#x} {body}"
            );
        }
        // The version and the command still count.
        let mut h = SIGNATURE.to_vec();
        h.extend([0x10, 0x11, 0, 0]);
        assert!(parse(&h).is_err());
    }

    #[test]
    fn a_v2_header_longer_than_the_cap_is_refused() {
        // PROXY and LOCAL alike.
        for command in [0x21, 0x20] {
            let mut h = SIGNATURE.to_vec();
            let body = (V2_MAX - V2_FIXED) as u16;
            h.extend([command, 0x11]);
            h.extend(body.to_be_bytes());
            h.extend([0u8; 12]);
            assert!(
                matches!(parse(&h), Ok(Parsed::Complete { len: V2_MAX, .. })),
                "{command:#x}"
            );
            h[14..16].copy_from_slice(&(body + 1).to_be_bytes());
            assert_eq!(
                parse(&h),
                Err(Malformed("v2 header longer than 4096 bytes")),
                "{command:#x}"
            );
            h[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
            assert!(parse(&h).is_err(), "{command:#x}");
        }
    }

    #[tokio::test]
    async fn read_takes_extensions_longer_than_its_buffer() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut h = encode(ProxyVersion::V2, Some((a("192.0.2.1:1"), a("10.0.0.1:2"))))
            .as_bytes()
            .to_vec();
        // One 1000-byte TLV of type 0xE0 (custom) after the addresses.
        h[14..16].copy_from_slice(&(12u16 + 3 + 1000).to_be_bytes());
        h.extend([0xe0, 0x03, 0xe8]);
        h.extend([7u8; 1000]);
        h.extend(b"hello");
        c.write_all(&h).await.unwrap();
        assert_eq!(
            read(&mut s).await.unwrap(),
            Some((a("192.0.2.1:1"), a("10.0.0.1:2")))
        );
        let mut after = [0u8; 5];
        s.read_exact(&mut after).await.unwrap();
        assert_eq!(&after, b"hello");
    }

    #[test]
    fn malformed_headers_are_refused() {
        let v2 = |b12: u8, b13: u8, len: u8| {
            let mut h = SIGNATURE.to_vec();
            h.extend([b12, b13, 0, len]);
            h.extend([0u8; 40]);
            h
        };
        for bad in [
            b"GET / HTTP/1.1\r\n".to_vec(),
            b"\x16\x03\x01".to_vec(),
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n".to_vec(),
            b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n".to_vec(),
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rx".to_vec(),
            b"PROXY \xff\r\n".to_vec(),
            "PROXY UNKNOWN \u{e9}\r\n".as_bytes().to_vec(),
            b"PROXY UNKNOWN \n\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n\r\n".to_vec(),
            [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat(),
            v2(0x11, 0x11, 12),
            v2(0x22, 0x11, 12),
            v2(0x21, 0x41, 12),
            v2(0x21, 0x13, 12),
            v2(0x21, 0x11, 11),
            v2(0x21, 0x21, 35),
        ] {
            assert!(parse(&bad).is_err(), "{:?}", String::from_utf8_lossy(&bad));
        }
    }

    /// What `read` relies on, as it takes bytes off the socket on
    /// `Incomplete`: more bytes never change a verdict already reached,
    /// and an incomplete header never turns out to have ended earlier.
    fn prefixes_agree(d: &[u8]) {
        let whole = parse(d);
        for k in 0..=d.len() {
            let part = parse(&d[..k]);
            let ok = match part {
                Err(_) => whole.is_err(),
                Ok(Parsed::Complete { .. }) => whole == part,
                Ok(Parsed::Incomplete) => {
                    !matches!(whole, Ok(Parsed::Complete { len, .. }) if len < k)
                }
            };
            assert!(
                ok,
                "{:?} at {k}: {part:?}, whole: {whole:?}",
                String::from_utf8_lossy(d)
            );
        }
    }

    #[test]
    fn a_verdict_does_not_depend_on_how_the_bytes_are_split() {
        let mut inputs: Vec<Vec<u8>> = vec![
            b"PROXY UNKNOWN \n\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nGET".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rx\n".to_vec(),
            b"PROXY TCP4 1.2.3.4\n 1.2.3.4 1 2\r\n".to_vec(),
            "PROXY UNKNOWN \u{e9}\r\n".as_bytes().to_vec(),
            [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100], b"\r\n"].concat(),
            [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 91], b"\r\n"].concat(),
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n".to_vec(),
            b"PROXY TCP6 ::1 ::2 1 2\r\n\r\n".to_vec(),
            b"PROXY\r\n".to_vec(),
            b"GET / HTTP/1.1\r\n".to_vec(),
            [&SIGNATURE[..11], b"\r\n"].concat(),
        ];
        for e in [
            encode(ProxyVersion::V1, Some((a("192.0.2.1:1"), a("10.0.0.1:2")))),
            encode(ProxyVersion::V2, Some((a("192.0.2.1:1"), a("10.0.0.1:2")))),
            encode(ProxyVersion::V2, Some((a("[::1]:1"), a("[::1]:2")))),
            encode(ProxyVersion::V2, None),
        ] {
            inputs.push(e.as_bytes().to_vec());
            // With extensions beyond the addresses, given or not.
            let mut h = e.as_bytes().to_vec();
            h[15] = h[15].wrapping_add(20);
            inputs.push(h.clone());
            h.extend([0u8; 20]);
            inputs.push(h);
        }
        for bad in [[0x11, 0x11], [0x22, 0x11], [0x21, 0x41], [0x21, 0x13]] {
            let mut h = SIGNATURE.to_vec();
            h.extend(bad);
            h.extend([0, 12]);
            h.extend([0u8; 12]);
            inputs.push(h);
        }
        for d in &inputs {
            prefixes_agree(d);
            prefixes_agree(&[d.as_slice(), b"GET / HTTP/1.1\r\n\r\n"].concat());
        }
    }

    #[test]
    fn unknown_ignores_the_rest_of_its_line() {
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nGET"),
            Ok(Parsed::Complete {
                len: 35,
                addrs: None
            })
        );
    }

    #[tokio::test]
    async fn read_takes_the_header_and_leaves_what_follows() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let h = encode(
            ProxyVersion::V2,
            Some((a("[2001:db8::7]:9"), a("[::1]:80"))),
        );
        // In pieces: the signature split, then the rest with data after it.
        c.write_all(&h.as_bytes()[..5]).await.unwrap();
        let reader = tokio::spawn(async move {
            let got = read(&mut s).await.unwrap();
            (got, s)
        });
        tokio::task::yield_now().await;
        let mut rest = h.as_bytes()[5..].to_vec();
        rest.extend(b"hello");
        c.write_all(&rest).await.unwrap();
        let (got, mut s) = reader.await.unwrap();
        assert_eq!(got, Some((a("[2001:db8::7]:9"), a("[::1]:80"))));
        let mut after = [0u8; 5];
        s.read_exact(&mut after).await.unwrap();
        assert_eq!(&after, b"hello");
    }

    #[tokio::test]
    async fn read_tells_closed_from_truncated() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        drop(c);
        assert!(matches!(read(&mut s).await, Err(ReadError::Closed)));
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        c.write_all(b"PROXY TCP4 1.2").await.unwrap();
        drop(c);
        assert!(matches!(read(&mut s).await, Err(ReadError::Truncated)));
    }
}
