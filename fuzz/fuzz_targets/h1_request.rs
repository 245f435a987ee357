//! The fast path's HTTP/1.1 request framing on arbitrary bytes.
//!
//! Input: two bytes that pick a split point and a head limit, then the bytes a client sent.
//!
//! `request_end(buf, max_head)`:
//! - never panics;
//! - `Ok(Some(n))`: `n <= buf.len()`; the head in `buf[..n]` ends where `head_end` says and
//!   httparse parses exactly that head; `buf[..n]` alone frames to `n` too (a request's end
//!   never depends on what follows it) and `buf[..n - 1]` is still incomplete;
//! - a prefix of `buf` is incomplete, or gets the answer `buf` gets: a request framed on a
//!   prefix is framed the same with more bytes, and a refused prefix stays refused (the
//!   refusal may differ: past the head limit a later bare LF makes it 400 instead of 431).
//!
//! `ChunkScan` over the same bytes, whole, split at the chosen point, and one byte at a
//! time: the same end, the same `bad`, and `decode` hands out the same chunk data.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::protocol::h1::{head_end, request_end, ChunkScan};

fuzz_target!(|input: &[u8]| {
    let Some((&[a, b], buf)) = input.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([a, b])) % (buf.len() + 1);
    // Mostly a limit the input cannot reach; sometimes one it can, for the 431 path.
    let max_head = if a & 0x80 == 0 {
        64 * 1024
    } else {
        usize::from(b) * 4
    };
    check_request_end(buf, split, max_head);
    check_chunk_scan(buf, split);
});

fn check_request_end(buf: &[u8], split: usize, max_head: usize) {
    let whole = request_end(buf, max_head);
    match whole {
        Ok(Some(n)) => {
            assert!(n <= buf.len(), "end {n} past the {} bytes", buf.len());
            let head = match head_end(buf, 0) {
                Some(Ok(h)) => h,
                other => panic!("a request ending at {n} without a head: {other:?}"),
            };
            assert!(head <= n && head <= max_head, "head {head}, end {n}");
            let mut hs = [httparse::EMPTY_HEADER; 100];
            let mut req = httparse::Request::new(&mut hs);
            assert_eq!(
                req.parse(&buf[..head]),
                Ok(httparse::Status::Complete(head)),
                "the head does not re-parse"
            );
            assert_eq!(
                request_end(&buf[..n], max_head),
                Ok(Some(n)),
                "the end depends on the bytes after it"
            );
            if n > 0 {
                assert_eq!(
                    request_end(&buf[..n - 1], max_head),
                    Ok(None),
                    "a request ending at {n} is already framed a byte earlier"
                );
            }
        }
        Ok(None) => assert!(buf.len() <= max_head || head_end(buf, 0).is_some()),
        Err(_) => {}
    }
    // What a prefix gets is "incomplete" or what the whole buffer gets: bytes that arrive
    // later never change an answer given earlier.
    let prefix = request_end(&buf[..split], max_head);
    match (&prefix, &whole) {
        (Ok(None), _) | (Err(_), Err(_)) => {}
        (p, w) => assert_eq!(p, w, "prefix of {split} bytes"),
    }
}

/// Scans `buf` in the pieces given; the end (within `buf`), whether it is bad, and the
/// chunk data decoded.
fn scan_in_pieces(buf: &[u8], cuts: &[usize]) -> (Option<usize>, bool, Vec<u8>) {
    let mut s = ChunkScan::default();
    let mut data = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain([&buf.len()]) {
        let piece = &buf[start..cut];
        let found = s.decode(piece, |r| data.extend_from_slice(&piece[r]));
        if let Some(e) = found {
            assert!(s.done, "an end without done");
            assert!(e <= piece.len());
            return (Some(start + e), s.bad, data);
        }
        assert!(!s.done && !s.bad, "done without an end");
        start = cut;
    }
    (None, false, data)
}

fn check_chunk_scan(buf: &[u8], split: usize) {
    let whole = scan_in_pieces(buf, &[]);
    if let (Some(e), bad) = (whole.0, whole.1) {
        // A bad byte is a byte of the input; a good end is after the last byte read.
        assert!(if bad {
            e < buf.len()
        } else {
            e <= buf.len() && e > 0
        });
    }
    assert_eq!(whole, scan_in_pieces(buf, &[split]), "split at {split}");
    let every: Vec<usize> = (1..buf.len()).collect();
    assert_eq!(whole, scan_in_pieces(buf, &every), "one byte at a time");
}
