//! Request paths normalized before routing, as Istio's `meshConfig.pathNormalization`
//! asks Envoy to (`normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`).
//! The normalized path is what routes match and what goes upstream, so a rule on
//! `/admin` cannot be walked around with `/x/../admin`, `/./admin`, `/%61dmin` or
//! `/%2e/admin` (and, with slash merging, `//admin`). Never touches sockets or config.
//!
//! Base normalization follows Envoy's `normalize_path` (RFC 3986 sections 6.2.2 and
//! 5.2.4 on the path, never the query): escapes of unreserved characters are decoded
//! (`%61` is `a`, `%2E` is `.`), other escapes stay as sent, `\` is a `/`, characters a
//! path cannot carry raw are escaped, and dot segments are removed (`..` at the root
//! stays at the root; `..;x` and `.;x` count as `..` and `.`, as in Envoy's fix for
//! CVE-2026-73551, since servers such as Tomcat read them so). Stricter than Envoy, as
//! NGINX is: an escape that is not `%` and two hex digits gets 400 rather than passing
//! through. `%00` and a fragment (`#`) get 400, as in Envoy. See
//! notes in `tests/hostile.rs` and the README (Hardening) for the vectors this follows.

use crate::protocol::h1::ByteSet;
use std::borrow::Cow;

/// Istio's `pathNormalization.normalization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// Paths are routed and forwarded as sent.
    None,
    /// RFC 3986 normalization (Istio's default).
    Base,
    /// `Base`, then runs of `/` merged into one (Portico's default).
    MergeSlashes,
    /// `MergeSlashes` after decoding `%2F` and `%5C` (to `/` and `\`).
    DecodeAndMergeSlashes,
}

/// What an escaped slash (`%2F`, `%5C`) in a path does (Envoy's
/// `path_with_escaped_slashes_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Left encoded (upper-cased): it is part of a segment, not a separator.
    Keep,
    /// The request gets 400.
    Reject,
    /// Decoded before the other steps, so it separates segments like `/`.
    Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathNormalization {
    pub normalization: Normalization,
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathNormalization {
    fn default() -> Self {
        PathNormalization {
            normalization: Normalization::MergeSlashes,
            escaped_slashes: EscapedSlashes::Keep,
        }
    }
}

/// Why a path cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path: it does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits, a NUL (raw or `%00`), or a fragment (`#`).
    BadEscape,
    /// An escaped slash under `REJECT_REQUEST`.
    EscapedSlash,
}

impl PathError {
    /// The `response_code_details` of the 400 it gets (Envoy's where it has one).
    pub const fn details(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "absolute_path_rejected",
            PathError::BadEscape => "path_normalization_failed",
            PathError::EscapedSlash => "escaped_slashes_rejected",
        }
    }
}

impl PathNormalization {
    /// The path requests are routed by and forwarded with. Borrowed when `path` (without
    /// its query) is already normal, which is the common case and costs one scan.
    pub fn apply<'a>(&self, path: &'a str) -> Result<Cow<'a, str>, PathError> {
        if self.normalization == Normalization::None {
            return Ok(Cow::Borrowed(path));
        }
        if !path.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        let merge = self.normalization != Normalization::Base;
        if is_normal(path.as_bytes(), merge) {
            return Ok(Cow::Borrowed(path));
        }
        let decode_slashes = self.escaped_slashes == EscapedSlashes::Decode
            || self.normalization == Normalization::DecodeAndMergeSlashes;
        let decoded = decode(path.as_bytes(), decode_slashes, self.escaped_slashes)?;
        let mut out = remove_dot_segments(&decoded);
        if merge {
            out.dedup_by(|a, b| *a == b'/' && *b == b'/');
        }
        // Every byte written is ASCII: raw bytes a path cannot carry were escaped.
        Ok(Cow::Owned(
            String::from_utf8(out).map_err(|_| PathError::BadEscape)?,
        ))
    }
}

/// Bytes a path may carry as they are (RFC 3986 pchar and `/`, plus the `%` of escapes);
/// anything else is escaped, or (NUL, `#`, `\`) handled on its own.
fn plain_byte(b: u8) -> bool {
    PLAIN.has(b)
}

static PLAIN: ByteSet = ByteSet::alphanumeric_and(b"-._~!$&'()*+,;=:@/%[]");

/// True when nothing in `path` would change: no escape, no byte to escape or convert, no
/// dot segment, no `//` to merge.
fn is_normal(path: &[u8], merge: bool) -> bool {
    let mut prev = 0u8;
    for (i, &b) in path.iter().enumerate() {
        if b == b'%' || !plain_byte(b) {
            return false;
        }
        if b == b'/' && merge && prev == b'/' {
            return false;
        }
        if b == b'.' && prev == b'/' {
            // `/.` starts a dot segment when followed by the end, `/`, `;`, or a second
            // dot and then one of those.
            let rest = &path[i + 1..];
            let after = if rest.first() == Some(&b'.') {
                &rest[1..]
            } else {
                rest
            };
            if matches!(after.first(), None | Some(b'/' | b';')) {
                return false;
            }
        }
        prev = b;
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986's unreserved characters: an escape of one means the character itself.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Escapes decoded where they stand for unreserved characters (and, when
/// `decode_slashes`, `/` and `\`), others kept as sent; `\` made `/`; bytes a path
/// cannot carry raw escaped.
fn decode(
    path: &[u8],
    decode_slashes: bool,
    slashes: EscapedSlashes,
) -> Result<Vec<u8>, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(path.len() + 8);
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        match b {
            b'%' => {}
            b'\\' => {
                out.push(b'/');
                i += 1;
                continue;
            }
            0 | b'#' => return Err(PathError::BadEscape),
            _ if plain_byte(b) => {
                out.push(b);
                i += 1;
                continue;
            }
            _ => {
                out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
                i += 1;
                continue;
            }
        }
        let (Some(h), Some(l)) = (
            path.get(i + 1).copied().and_then(hex),
            path.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = h << 4 | l;
        if c == 0 {
            return Err(PathError::BadEscape);
        }
        if c == b'/' || c == b'\\' {
            if slashes == EscapedSlashes::Reject {
                return Err(PathError::EscapedSlash);
            }
            if decode_slashes {
                out.push(b'/');
            } else {
                out.extend_from_slice(&path[i..i + 3]);
            }
        } else if unreserved(c) {
            out.push(c);
        } else {
            out.extend_from_slice(&path[i..i + 3]);
        }
        i += 3;
    }
    Ok(out)
}

/// The dot segment a segment stands for: `.` and `..`, and with parameters (`..;x`).
fn dot_segment(seg: &[u8]) -> Option<bool> {
    let name = seg.split(|&b| b == b';').next().unwrap_or(seg);
    match name {
        b"." => Some(false),
        b".." => Some(true),
        _ => None,
    }
}

/// RFC 3986 5.2.4 on an absolute path: `.` segments removed, `..` removes the segment
/// before it (none at the root). A path that ended in a dot segment keeps its trailing
/// slash (`/a/b/..` is `/a/`).
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    let count = path[1..].split(|&b| b == b'/').count();
    for (n, seg) in path[1..].split(|&b| b == b'/').enumerate() {
        let last = n + 1 == count;
        match dot_segment(seg) {
            Some(up) => {
                if up {
                    // Drop the last segment written (and its leading '/').
                    let k = out.iter().rposition(|&b| b == b'/').unwrap_or(0);
                    out.truncate(k);
                }
                if last {
                    out.push(b'/');
                }
            }
            None => {
                out.push(b'/');
                out.extend_from_slice(seg);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(mode: Normalization, slashes: EscapedSlashes, path: &str) -> Result<String, PathError> {
        PathNormalization {
            normalization: mode,
            escaped_slashes: slashes,
        }
        .apply(path)
        .map(Cow::into_owned)
    }

    fn base(path: &str) -> Result<String, PathError> {
        norm(Normalization::Base, EscapedSlashes::Keep, path)
    }

    fn merge(path: &str) -> Result<String, PathError> {
        norm(Normalization::MergeSlashes, EscapedSlashes::Keep, path)
    }

    fn decode_merge(path: &str) -> Result<String, PathError> {
        norm(
            Normalization::DecodeAndMergeSlashes,
            EscapedSlashes::Decode,
            path,
        )
    }

    #[test]
    fn spellings_of_admin_all_become_admin() {
        for p in [
            "/x/../admin",
            "/./admin",
            "/%61dmin",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/a/b/../../admin",
            "/..;/admin",
            "/x/..;jsessionid=1/admin",
            "/.;x/admin",
            "//admin",
            "/x\\..\\admin",
        ] {
            assert_eq!(merge(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(merge("/admin/.").unwrap(), "/admin/");
        assert_eq!(base("//admin").unwrap(), "//admin", "BASE does not merge");
    }

    /// Envoy's and Istio's own vectors (see the README's Hardening section for where they
    /// come from); `None` is a 400.
    #[test]
    fn envoy_base_vectors() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/xyz", Some("/xyz")),
            ("/a/b/../c", Some("/a/c")),
            ("/a/b/./c", Some("/a/b/c")),
            ("/a/b/../../../../c", Some("/c")),
            ("/a/..\\c", Some("/c")),
            ("/%c0%af", Some("/%c0%af")),
            ("/%5c%25", Some("/%5c%25")),
            ("/a/b/%2E%2E/c", Some("/a/c")),
            ("/a/b/%2e%2e/c", Some("/a/c")),
            ("/A/B/C", Some("/A/B/C")),
            ("/a/%2F%2f/c", Some("/a/%2F%2f/c")),
            ("/xyz/.%00../abc", None),
            ("/xyz/%00.%00./abc", None),
            ("/a/b/%2E./c", Some("/a/c")),
            ("/a/b/%2E/c", Some("/a/b/c")),
            ("/../a/b", Some("/a/b")),
            ("/./a/b", Some("/a/b")),
            ("/xyz/..;foo=bar/abc", Some("/abc")),
            ("/xyz/.;foo=bar", Some("/xyz/")),
            ("/xyz///abc", Some("/xyz///abc")),
            ("/foo/bar/../%23boom", Some("/foo/%23boom")),
            ("/private/../public", Some("/public")),
            ("/private/..%2Fpublic%5C", Some("/private/..%2Fpublic%5C")),
            ("/xyz%30..//abc", Some("/xyz0..//abc")),
            ("/app/%2E./admin", Some("/admin")),
            ("/app\\admin", Some("/app/admin")),
            ("/app/\\/\\/\\admin", Some("/app//////admin")),
            ("/app//../admin", Some("/app/admin")),
            ("/app//../../admin", Some("/admin")),
            ("/app//", Some("/app//")),
            ("/%252e%252e/admin", Some("/%252e%252e/admin")),
            ("/%61bc", Some("/abc")),
            ("/%7E/x", Some("/~/x")),
            ("/%41%42", Some("/AB")),
            ("/%2Fa", Some("/%2Fa")),
            ("/%3f", Some("/%3f")),
            ("/%2541", Some("/%2541")),
            ("/a/b/", Some("/a/b/")),
            ("/a/b/.", Some("/a/b/")),
            ("/a/b/..", Some("/a/")),
            ("/..", Some("/")),
            ("/../..", Some("/")),
            ("/%2E", Some("/")),
            ("/.%2e/x", Some("/x")),
            ("/a%2e", Some("/a.")),
            ("/a/.../b", Some("/a/.../b")),
            ("/a/%2e%2e%2f", Some("/a/..%2f")),
            ("/\\evil.com/x", Some("//evil.com/x")),
            ("/a<b>", Some("/a%3Cb%3E")),
            ("/a\"b", Some("/a%22b")),
            ("/a^b", Some("/a%5Eb")),
            ("/a`b", Some("/a%60b")),
            ("/a{b}", Some("/a%7Bb%7D")),
            ("/a|b", Some("/a%7Cb")),
            ("/a\x7fb", Some("/a%7Fb")),
            ("/\u{e9}", Some("/%C3%A9")),
            ("/%c3%A9", Some("/%c3%A9")),
            ("/%00", None),
            ("/a\0b", None),
            ("/foo/bar#boom", None),
            ("/%2d%2E%5f%7E", Some("/-._~")),
            ("/a;b/../c", Some("/c")),
            ("/%3B/../x", Some("/x")),
            ("/a/b%2F..%2Fc", Some("/a/b%2F..%2Fc")),
            // Stricter than Envoy (which passes these through), as NGINX: 400.
            ("/%zz", None),
            ("/%", None),
            ("/a/%", None),
            ("/%4", None),
            ("/%4g", None),
            ("/%%41", None),
        ];
        for (input, want) in cases {
            assert_eq!(base(input).ok().as_deref(), *want, "{input:?}");
        }
    }

    #[test]
    fn envoy_merge_and_decode_vectors() {
        let merged: &[(&str, &str)] = &[
            ("//a/b/c", "/a/b/c"),
            ("/a/b/c//", "/a/b/c/"),
            ("/a////b/c", "/a/b/c"),
            ("/xyz///abc", "/xyz/abc"),
            ("/xyz%30..//abc", "/xyz0../abc"),
            ("/app/\\/\\/\\admin", "/app/admin"),
            ("/app//", "/app/"),
            ("/app/%2f", "/app/%2f"),
            ("/\\evil.com/x", "/evil.com/x"),
            ("/a//", "/a/"),
        ];
        for (input, want) in merged {
            assert_eq!(merge(input).unwrap(), *want, "{input:?}");
        }
        let decoded: &[(&str, &str)] = &[
            ("/xyz%2f..%5c/%2Fabc", "/abc"),
            ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/app/admin/abc"),
            ("/app/%2f", "/app/"),
            ("/%c0%2e%c0%2e/admin", "/%c0.%c0./admin"),
            ("/%c0%2fadmin", "/%c0/admin"),
            ("/admin;a=b/xyz", "/admin;a=b/xyz"),
            ("/ADMIN", "/ADMIN"),
            ("/admin%61", "/admina"),
            ("/admin%2f", "/admin/"),
            ("/admin%5c", "/admin/"),
            ("/admin%3f", "/admin%3f"),
            ("/admin%25", "/admin%25"),
            ("/admin%e9", "/admin%e9"),
            ("/a/%2e%2e%2f", "/"),
            ("/a/b%2F..%2Fc", "/a/c"),
        ];
        for (input, want) in decoded {
            assert_eq!(decode_merge(input).unwrap(), *want, "{input:?}");
        }
        assert_eq!(decode_merge("/admin%00"), Err(PathError::BadEscape));
    }

    #[test]
    fn escaped_slashes_kept_rejected_or_decoded() {
        for p in [
            "/xyz%2F..//abc",
            "/xyz%5c..//abc",
            "/private%2f../public",
            "/a/b%2F..%2Fc",
        ] {
            assert_eq!(
                norm(Normalization::MergeSlashes, EscapedSlashes::Reject, p),
                Err(PathError::EscapedSlash),
                "{p}"
            );
        }
        assert_eq!(
            norm(
                Normalization::MergeSlashes,
                EscapedSlashes::Reject,
                "/xyz%EA/abc"
            )
            .unwrap(),
            "/xyz%EA/abc"
        );
        assert_eq!(
            norm(
                Normalization::MergeSlashes,
                EscapedSlashes::Decode,
                "/admin%2F..%2Fsecret"
            )
            .unwrap(),
            "/secret"
        );
        assert_eq!(base("x/y"), Err(PathError::NotAbsolute));
        assert_eq!(base("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn normal_paths_are_borrowed_and_none_changes_nothing() {
        let n = PathNormalization::default();
        for p in [
            "/",
            "/api/v1/items",
            "/a.b/c..d/.e",
            "/x-y_z~",
            "/.well-known/acme",
            "/a/..b/.c",
        ] {
            assert!(matches!(n.apply(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in [
            "/a/./b", "/a/../b", "/a/.", "/a/..", "/a/.;x/b", "/%41", "/a\\b", "//a",
        ] {
            assert!(matches!(n.apply(p), Ok(Cow::Owned(_))), "{p}");
        }
        let none = PathNormalization {
            normalization: Normalization::None,
            escaped_slashes: EscapedSlashes::Keep,
        };
        assert_eq!(none.apply("//x/../%61").unwrap(), "//x/../%61");
    }
}
