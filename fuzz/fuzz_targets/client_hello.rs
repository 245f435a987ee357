//! The ClientHello parser (`portico::l4::client_hello::parse`) on arbitrary bytes.
//!
//! From its docs: it never panics; it reads the bytes peeked so far and says how many it
//! needs when they are not enough, never more than `MAX_PEEK`. So:
//! - `NeedBytes(n)`: `buf.len() < n <= MAX_PEEK`, and nothing in between decides: every
//!   prefix of `buf` of at least `buf.len()` bytes and fewer than `n` needs `n` too;
//! - an answer on a prefix (a hello, or invalid) is the answer on the whole buffer: bytes
//!   after the ClientHello are not its concern;
//! - peeking as the listener does (grow the buffer to what `parse` asks for) ends with the
//!   answer the whole buffer gets;
//! - a server name is lower-case, 1 to 253 bytes of letters, digits, `-`, `_` and dots,
//!   no empty label and no trailing dot.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::l4::client_hello::{parse, Parsed, MAX_PEEK};

fuzz_target!(|buf: &[u8]| {
    let whole = parse(buf);
    match &whole {
        Parsed::NeedBytes(n) => {
            assert!(
                *n > buf.len() && *n <= MAX_PEEK,
                "needs {n} of {}",
                buf.len()
            );
        }
        Parsed::Hello { sni: Some(name) } => {
            assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'_' | b'.')),
                "{name:?}"
            );
            assert!(
                !name.starts_with('.') && !name.ends_with('.') && !name.contains(".."),
                "{name:?}"
            );
        }
        Parsed::Hello { sni: None } | Parsed::Invalid(_) => {}
    }

    // Peek as the listener does, from nothing up.
    let mut have = 0;
    let peeked = loop {
        match parse(&buf[..have]) {
            Parsed::NeedBytes(n) if n <= buf.len() => {
                assert!(n > have, "asked for {n} holding {have}");
                // The bytes just short of what it asked for decide nothing more.
                assert_eq!(parse(&buf[..n - 1]), Parsed::NeedBytes(n));
                have = n;
            }
            other => break other,
        }
    };
    assert_eq!(
        peeked,
        whole,
        "peeking stopped at {have} of {} bytes",
        buf.len()
    );
});
