//! Where does the first request in these bytes end? The fast path's answer
//! (`portico::protocol::h1::request_end`, which the front lends pingora requests by)
//! against an independent reference built on httparse and RFC 9112.
//!
//! The reference (`reference` below):
//! - the head is whatever `httparse::Request::parse` reads (bare LF line endings and any
//!   number of headers accepted; no size limit);
//! - the body follows RFC 9112 section 6.3 for requests: `Transfer-Encoding` with
//!   `chunked` as the final coding (and nowhere else) is chunked; `Transfer-Encoding`
//!   whose final coding is not `chunked` is invalid (400); `Transfer-Encoding` in an
//!   HTTP/1.0 request is invalid (section 6.1: the framing is faulty); `Transfer-Encoding`
//!   together with `Content-Length` is invalid (two readings: a server MAY take the
//!   coding, a hop that takes the length frames another request); `Content-Length` is
//!   1*DIGIT, and several fields or list members that all name the same number are that
//!   number (RFC 9110 section 8.6 allows it), differing ones are invalid; none of these:
//!   no body;
//! - a chunked body: each size line is `httparse::parse_chunk_size` (at most 16 hex
//!   digits, optional whitespace, `;` and any extension bytes up to CRLF) with RFC 9112's
//!   `chunk-size = 1*HEXDIG` on top (httparse reads a line with no digits as size 0, the
//!   last chunk, where the RFC has no chunk at all); each chunk's data is followed by
//!   CRLF; after the last chunk the trailer section is `httparse::parse_headers` (field
//!   lines, then the empty line; bare LF accepted). When httparse refuses a field line
//!   there, the section is read by its lines alone (a line ends at LF; a bare CR is part
//!   of it, as RFC 9112 section 2.2 lets a recipient read it as a space) up to the first
//!   empty line: the message is malformed, but it has one end.
//!
//! A disagreement (the target panics) is, for the same bytes:
//! - D1: both frame a request, and the ends differ;
//! - D2: the front frames a request ending at `m`, the reference needs more bytes (it
//!   would read past `m`);
//! - D3: the front needs more bytes, the reference frames a request ending at `n` (the
//!   front would read past `n`);
//! - D4: the front frames a request the reference finds invalid or ambiguous (there is no
//!   end to agree on: another parser reads those bytes another way, or not at all). A
//!   malformed trailer field line is not such a case: the front may frame that request,
//!   at the end its lines give (D1 and D3 apply as to a complete one), since the front,
//!   like pingora, reads a trailer section by its lines and discards it;
//! - D5: both frame a chunked request at the same end but decode different body data.
//!
//! Not a disagreement: the front refusing (`Err`) whatever the reference says, and the
//! front needing more bytes where the reference already finds the bytes invalid. The
//! front is deliberately stricter than the reference: it refuses bare LF line endings
//! (400), more than 100 header fields or a head over its limit (431), a duplicate
//! `Content-Length` even with equal values, `Content-Length` over 18 digits, a
//! `Transfer-Encoding` other than exactly `chunked` (501), `Content-Length` with
//! `Transfer-Encoding`, and an HTTP/1.1 request without a valid Host (400): all refusals.
//! The invariant is never two different ends for the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::protocol::h1::{request_end, ChunkScan};

/// More than any input's head, so the front never refuses for size here (h1_request
/// covers the limit).
const MAX_HEAD: usize = 1 << 20;

#[derive(Debug, PartialEq)]
enum Verdict {
    /// The request ends after this many bytes; a chunked body's decoded data.
    Complete(usize, Option<Vec<u8>>),
    /// A trailer field line is malformed; the lines of the section end after this many
    /// bytes.
    Malformed(usize),
    Incomplete,
    Invalid(&'static str),
}

fuzz_target!(|buf: &[u8]| {
    let front = request_end(buf, MAX_HEAD);
    let reference = reference(buf);
    match (&front, &reference) {
        (Err(_), _) => {}
        (Ok(Some(m)), Verdict::Complete(n, data)) => {
            assert_eq!(
                m, n,
                "D1: the front ends the request at {m}, the reference at {n}"
            );
            if let Some(data) = data {
                assert_eq!(
                    &front_chunk_data(buf, *m),
                    data,
                    "D5: the same end, different chunk data"
                );
            }
        }
        (Ok(Some(m)), Verdict::Malformed(n)) => {
            assert_eq!(
                m, n,
                "D1: the front ends the request at {m}, its trailer lines at {n}"
            );
        }
        (Ok(Some(m)), Verdict::Incomplete) => {
            panic!("D2: the front ends the request at {m}; the reference reads on")
        }
        (Ok(Some(m)), Verdict::Invalid(why)) => {
            panic!("D4: the front ends the request at {m}; the reference finds it invalid: {why}")
        }
        (Ok(None), Verdict::Complete(n, _) | Verdict::Malformed(n)) => {
            panic!("D3: the front reads on; the reference ends the request at {n}")
        }
        (Ok(None), Verdict::Incomplete | Verdict::Invalid(_)) => {}
    }
});

/// The chunk data the front's scanner decodes from a request framed to end at `end`.
fn front_chunk_data(buf: &[u8], end: usize) -> Vec<u8> {
    let mut hs = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut hs);
    let Ok(httparse::Status::Complete(head)) = req.parse(buf) else {
        unreachable!("a framed request has a head")
    };
    let body = &buf[head..end];
    let mut data = Vec::new();
    ChunkScan::default().decode(body, |r| data.extend_from_slice(&body[r]));
    data
}

fn ows(b: &u8) -> bool {
    *b == b' ' || *b == b'\t'
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !ows(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &v[start..end]
}

/// Where the first request in `buf` ends, by httparse and RFC 9112 (see the module docs).
fn reference(buf: &[u8]) -> Verdict {
    // Each header line takes at least three bytes: never too many headers.
    let mut hs = vec![httparse::EMPTY_HEADER; buf.len() / 3 + 2];
    let mut req = httparse::Request::new(&mut hs);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Verdict::Incomplete,
        Err(_) => return Verdict::Invalid("httparse refuses the head"),
    };
    let minor = req.version.expect("a complete head has a version");

    let mut codings: Option<Vec<Vec<u8>>> = None;
    let mut length: Option<u64> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let list = codings.get_or_insert_with(Vec::new);
            for member in h.value.split(|&b| b == b',') {
                let coding = trim(member.split(|&b| b == b';').next().unwrap_or(member));
                if !coding.is_empty() || member.contains(&b';') {
                    list.push(coding.to_ascii_lowercase());
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for member in h.value.split(|&b| b == b',') {
                let digits = trim(member);
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                    return Verdict::Invalid("Content-Length is not a number");
                }
                let Some(n) = digits.iter().try_fold(0u64, |n, d| {
                    n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                }) else {
                    return Verdict::Invalid("Content-Length overflows");
                };
                match length {
                    Some(l) if l != n => return Verdict::Invalid("two different Content-Lengths"),
                    _ => length = Some(n),
                }
            }
        }
    }

    if let Some(codings) = codings {
        if minor == 0 {
            return Verdict::Invalid("Transfer-Encoding in HTTP/1.0");
        }
        if length.is_some() {
            return Verdict::Invalid("Content-Length and Transfer-Encoding");
        }
        match codings.iter().position(|c| c == b"chunked") {
            Some(i) if i + 1 == codings.len() => {}
            _ => return Verdict::Invalid("chunked is not the final coding, or not only there"),
        }
        return chunked(buf, head);
    }
    match length {
        Some(n) if (buf.len() - head) as u64 >= n => Verdict::Complete(head + n as usize, None),
        Some(_) => Verdict::Incomplete,
        None => Verdict::Complete(head, None),
    }
}

/// A trailer section from `buf[at..]` on, by its lines alone.
fn trailer_lines(buf: &[u8], mut at: usize) -> Verdict {
    while let Some(lf) = buf[at..].iter().position(|&b| b == b'\n') {
        let line = &buf[at..at + lf];
        at += lf + 1;
        if line.is_empty() || line == b"\r" {
            return Verdict::Malformed(at);
        }
    }
    Verdict::Incomplete
}

/// A chunked body from `buf[at..]` on.
fn chunked(buf: &[u8], mut at: usize) -> Verdict {
    let mut data = Vec::new();
    loop {
        let rest = &buf[at..];
        match rest.first() {
            None => return Verdict::Incomplete,
            Some(b) if !b.is_ascii_hexdigit() => {
                return Verdict::Invalid("a chunk size line without a size")
            }
            Some(_) => {}
        }
        let (line, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(c)) => c,
            Ok(httparse::Status::Partial) => return Verdict::Incomplete,
            Err(_) => return Verdict::Invalid("httparse refuses the chunk size line"),
        };
        at += line;
        if size == 0 {
            let mut hs = vec![httparse::EMPTY_HEADER; (buf.len() - at) / 3 + 2];
            return match httparse::parse_headers(&buf[at..], &mut hs) {
                Ok(httparse::Status::Complete((n, _))) => Verdict::Complete(at + n, Some(data)),
                Ok(httparse::Status::Partial) => Verdict::Incomplete,
                Err(_) => trailer_lines(buf, at),
            };
        }
        if ((buf.len() - at) as u64) < size {
            return Verdict::Incomplete;
        }
        data.extend_from_slice(&buf[at..at + size as usize]);
        at += size as usize;
        match &buf[at..] {
            [b'\r', b'\n', ..] => at += 2,
            [] | [b'\r'] => return Verdict::Incomplete,
            _ => return Verdict::Invalid("chunk data not followed by CRLF"),
        }
    }
}
