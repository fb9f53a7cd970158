//! The PROXY header parser on arbitrary bytes, as a balancer in front (or
//! anyone who reaches an `accept_proxy` port) may send them: it never
//! panics; a whole header never claims more than the bytes it was read
//! from unless it is v2 (whose extensions may follow); a header found in a
//! prefix is found alike in the whole; and what parses as addresses
//! encodes back into a header that parses to the same addresses.
//!
//! And the prefix property `read` depends on, since it consumes the bytes
//! of an incomplete header: for every prefix, an error stays an error, a
//! whole header stays the same header, and an incomplete one never turns
//! out to have ended within the bytes already taken.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::ProxyVersion;
use sluice::proxy_header::{Parsed, encode, parse};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    for k in 0..=data.len() {
        match parse(&data[..k]) {
            Err(e) => assert!(whole.is_err(), "{e} at {k}, whole {whole:?}"),
            Ok(Parsed::Complete { len, addrs }) => {
                assert_eq!(whole, Ok(Parsed::Complete { len, addrs }), "at {k}")
            }
            Ok(Parsed::Incomplete) => assert!(
                !matches!(whole, Ok(Parsed::Complete { len, .. }) if len < k),
                "incomplete at {k}, whole {whole:?}"
            ),
        }
    }
    let Ok(Parsed::Complete { len, addrs }) = whole else {
        return;
    };
    let v2 = data.first() == Some(&b'\r');
    assert!(v2 || len <= data.len(), "a v1 header longer than its bytes");
    if len <= data.len() {
        assert_eq!(parse(&data[..len]), Ok(Parsed::Complete { len, addrs }));
    }
    if let Some((src, dst)) = addrs {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let e = encode(v, Some((src, dst)));
            let Ok(Parsed::Complete { addrs: Some((s, d)), .. }) = parse(e.as_bytes()) else {
                panic!("{v:?} of {src} {dst} does not parse");
            };
            // Mapped addresses may come back as IPv4: compare canonically.
            let c = |a: std::net::SocketAddr| (a.ip().to_canonical(), a.port());
            assert_eq!((c(s), c(d)), (c(src), c(dst)));
        }
    }
});
