//! Request path normalization (`portico::routing::path::PathNormalization::apply`) in every
//! mode, on arbitrary paths. For every mode:
//! - it never panics;
//! - `NONE` returns the path as sent;
//! - otherwise a normalized path starts with `/`, is ASCII, has no `.` or `..` segment
//!   (nor `.;x` / `..;x`, which count as them), holds no `\`, every `%` in it starts an
//!   escape of two hex digits (never `%00`, never an unreserved character, which is
//!   decoded), and normalizing it again changes nothing (idempotent);
//! - with slash merging (`MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`) it has no `//`;
//! - a path is borrowed only when nothing changed.

#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use portico::routing::path::{EscapedSlashes, Normalization, PathNormalization};

const MODES: [Normalization; 4] = [
    Normalization::None,
    Normalization::Base,
    Normalization::MergeSlashes,
    Normalization::DecodeAndMergeSlashes,
];
const SLASHES: [EscapedSlashes; 3] = [
    EscapedSlashes::Keep,
    EscapedSlashes::Reject,
    EscapedSlashes::Decode,
];

fuzz_target!(|input: &[u8]| {
    let path = String::from_utf8_lossy(input);
    for normalization in MODES {
        for escaped_slashes in SLASHES {
            let n = PathNormalization {
                normalization,
                escaped_slashes,
            };
            check(n, &path);
        }
    }
});

fn hex(b: u8) -> u8 {
    (b as char).to_digit(16).unwrap_or(0) as u8
}

fn check(n: PathNormalization, path: &str) {
    let Ok(out) = n.apply(path) else {
        assert!(n.normalization != Normalization::None);
        return;
    };
    if let Cow::Borrowed(b) = out {
        assert_eq!(b, path, "{n:?}: borrowed, yet changed");
    }
    if n.normalization == Normalization::None {
        assert_eq!(out, path);
        return;
    }
    let at = |what: &str| format!("{n:?}: {path:?} became {out:?}: {what}");
    assert!(out.starts_with('/'), "{}", at("not absolute"));
    assert!(out.is_ascii(), "{}", at("not ASCII"));
    assert!(!out.contains('\\'), "{}", at("a backslash"));
    for seg in out.split('/') {
        let name = seg.split(';').next().unwrap_or(seg);
        assert!(name != "." && name != "..", "{}", at("a dot segment"));
    }
    let bytes = out.as_bytes();
    for (i, _) in out.match_indices('%') {
        assert!(
            bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit(),
            "{}",
            at("a bad escape")
        );
        let c = hex(bytes[i + 1]) << 4 | hex(bytes[i + 2]);
        let unreserved = c.is_ascii_alphanumeric() || b"-._~".contains(&c);
        assert!(
            c != 0 && !unreserved,
            "{}",
            at("an escape left that means itself")
        );
    }
    if n.normalization != Normalization::Base {
        assert!(!out.contains("//"), "{}", at("`//` left"));
    }
    let again = n.apply(&out);
    assert_eq!(
        again.as_deref().ok(),
        Some(out.as_ref()),
        "{}",
        at(&format!("not idempotent: {again:?}"))
    );
}
