//! The PROXY protocol header parser (`portico::listener::proxy_protocol::parse`) on
//! arbitrary bytes, as the first bytes of a connection from a trusted source.
//!
//! From its docs: it never panics, and says `Ok(None)` while the header may still come. So:
//! - `Ok(None)` only below the bounds: fewer than 107 bytes for v1, fewer than
//!   16 + `MAX_V2_PAYLOAD` for v2 (a reader that grows its buffer ends);
//! - an accepted header is at most its bound long, within the buffer, and is the same
//!   header when parsed alone (the bytes after it are the next protocol's); every proper
//!   prefix of it is `Ok(None)` (a header read piecemeal is read the same);
//! - a refusal on a prefix is a refusal on the whole buffer (more bytes never turn a bad
//!   header into a good one).

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use portico::listener::proxy_protocol::{parse, ProxyProtocol, MAX_V1, MAX_V2_PAYLOAD};

fuzz_target!(|buf: &[u8]| {
    let pp = ProxyProtocol {
        trusted: Vec::new(),
        allow_without: false,
        allow_v1: true,
        allow_v2: true,
        timeout: Duration::from_secs(1),
        ports: None,
    };
    let v1 = buf.starts_with(b"PROXY ");
    let bound = if v1 { MAX_V1 } else { 16 + MAX_V2_PAYLOAD };
    let whole = parse(buf, &pp);
    match &whole {
        Ok(None) => assert!(buf.len() < bound, "incomplete at {} bytes", buf.len()),
        Ok(Some(h)) => {
            assert!(h.len <= buf.len() && h.len <= bound, "header of {}", h.len);
            assert_eq!(parse(&buf[..h.len], &pp).as_ref(), Ok(&Some(h.clone())));
            for k in 0..h.len {
                assert_eq!(parse(&buf[..k], &pp), Ok(None), "prefix of {k}");
            }
        }
        Err(_) => {}
    }
    for k in 0..buf.len().min(300) {
        if parse(&buf[..k], &pp).is_err() {
            assert!(
                whole.is_err(),
                "refused at {k} bytes, not on all {}",
                buf.len()
            );
            break;
        }
    }
});
