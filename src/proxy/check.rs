//! Request hygiene: what a request head must be before anything routes it, decided once
//! for every codec (Portico's HTTP/1.1 front reads every HTTP/1.1 head, pingora's h2 and
//! Portico's h2 streams call it too). Never touches sockets.
//!
//! The rules are NGINX's and Envoy's defaults for an edge: an HTTP/1.1 request names
//! exactly one valid host; a body has one unambiguous framing (one `Content-Length`, or
//! `Transfer-Encoding: chunked` alone, never both, as request smuggling needs two readings
//! of one message); transfer codings other than `chunked` are not implemented (501), and
//! an HTTP/1.0 request has none.

use crate::protocol::h1::ByteSet;
use crate::telemetry::outcome::Details;

/// A request refused before routing: the local reply it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// Envoy's `response_code_details`.
    pub details: Details,
    /// The reply body (one line) and the log line's message.
    pub what: &'static str,
}

impl Refusal {
    pub const fn new(status: u16, details: Details, what: &'static str) -> Refusal {
        Refusal {
            status,
            details,
            what,
        }
    }
}

pub const NO_HOST: Refusal = Refusal::new(400, Details::MissingHostHeader, "missing Host header");
pub const BAD_HOST: Refusal = Refusal::new(400, Details::InvalidAuthority, "invalid Host header");
pub const TWO_HOSTS: Refusal = Refusal::new(
    400,
    Details::DuplicateHostHeader,
    "more than one Host header",
);
pub const BAD_LENGTH: Refusal =
    Refusal::new(400, Details::InvalidContentLength, "invalid Content-Length");
pub const TWO_LENGTHS: Refusal = Refusal::new(
    400,
    Details::DuplicateContentLength,
    "more than one Content-Length",
);
pub const LENGTH_AND_CHUNKED: Refusal = Refusal::new(
    400,
    Details::ContentLengthAndChunked,
    "both Content-Length and Transfer-Encoding",
);
pub const CODING: Refusal = Refusal::new(
    501,
    Details::UnsupportedTransferEncoding,
    "transfer coding not implemented",
);
/// `Transfer-Encoding` in an HTTP/1.0 request: RFC 9112 section 6.1 has the framing of such
/// a message treated as faulty (1.0 has no transfer codings, so a 1.0 hop reads the
/// `Content-Length` or no body at all); 400, as NGINX answers it.
pub const CODING_IN_HTTP_1_0: Refusal = Refusal::new(
    400,
    Details::TransferEncodingInHttp10,
    "Transfer-Encoding in an HTTP/1.0 request",
);
pub const HEAD_TOO_LARGE: Refusal = Refusal::new(
    431,
    Details::RequestHeadersTooLarge,
    "request header fields too large",
);
pub const URI_TOO_LONG: Refusal = Refusal::new(414, Details::UriTooLong, "request target too long");
pub const BAD_HEAD: Refusal = Refusal::new(400, Details::CodecError, "bad request");
pub const HEAD_TIMEOUT: Refusal = Refusal::new(
    408,
    Details::RequestHeaderTimeout,
    "request headers not received in time",
);
pub const BODY_TIMEOUT: Refusal = Refusal::new(
    408,
    Details::RequestBodyTimeout,
    "request body not received in time",
);

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no `Content-Length`, or 0, and not chunked).
    None,
    Length(u64),
    Chunked,
}

/// What the checks found out about a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked<'h> {
    /// The `Host` value (empty for an HTTP/1.0 request without one).
    pub host: &'h str,
    pub body: BodyFraming,
}

/// Checks an HTTP/1.x head (`minor` version 0 or 1) with headers `headers`. With
/// `absolute_form` (the target names its authority, as requests to a forward proxy do)
/// the Host header may be missing or empty: the target's authority is the one that counts
/// (RFC 9112 3.2.2).
pub fn check_h1<'h>(
    minor: u8,
    absolute_form: bool,
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
) -> Result<Checked<'h>, Refusal> {
    let mut host: Option<&'h str> = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(TWO_HOSTS);
            }
            let h = std::str::from_utf8(value).map_err(|_| BAD_HOST)?;
            let allowed = valid_authority(h) || (absolute_form && h.is_empty());
            if !allowed {
                return Err(if h.is_empty() { NO_HOST } else { BAD_HOST });
            }
            host = Some(h);
        } else if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(TWO_LENGTHS);
            }
            length = Some(parse_length(value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if minor == 0 {
                return Err(CODING_IN_HTTP_1_0);
            }
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(CODING);
            }
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err(LENGTH_AND_CHUNKED);
    }
    let host = match host {
        Some(h) => h,
        None if minor == 0 || absolute_form => "",
        None => return Err(NO_HOST),
    };
    let body = match (chunked, length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(n)) if n > 0 => BodyFraming::Length(n),
        _ => BodyFraming::None,
    };
    Ok(Checked { host, body })
}

/// One `Content-Length` value: digits only (a list, even of equal values, is refused, as
/// NGINX refuses a duplicate).
fn parse_length(v: &[u8]) -> Result<u64, Refusal> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(if v.contains(&b',') {
            TWO_LENGTHS
        } else {
            BAD_LENGTH
        });
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// RFC 3986 `authority` without userinfo, as a Host header carries it: a registered name
/// (letters, digits, `-._~`, and the sub-delims a name can hold), an IPv4 address, or a
/// bracketed IPv6 literal; then an optional `:port` of up to 5 digits.
pub fn valid_authority(a: &str) -> bool {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        let after = &rest[end + 1..];
        match after.strip_prefix(':') {
            Some(p) => ("x", Some(p)),
            None if after.is_empty() => ("x", None),
            None => return false,
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() || host.len() > 255 {
        return false;
    }
    static NAME: ByteSet = ByteSet::alphanumeric_and(b"-._~!$&'()*+,;=");
    let name_ok = host.bytes().all(|b| NAME.has(b));
    let port_ok = port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| n <= 65535)
    });
    name_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, &'a [u8])> {
        pairs.iter().map(|(n, v)| (*n, v.as_bytes())).collect()
    }

    #[test]
    fn one_valid_host_is_required_on_http_1_1() {
        assert_eq!(check_h1(1, false, h(&[])), Err(NO_HOST));
        assert_eq!(check_h1(1, false, h(&[("Host", "")])), Err(NO_HOST));
        assert_eq!(
            check_h1(1, false, h(&[("host", "a"), ("Host", "b")])),
            Err(TWO_HOSTS)
        );
        for bad in [
            "a b",
            "a/b",
            "a@b",
            "a:x",
            "a:123456",
            "[::1",
            "[zz]",
            "a:",
            "\u{e9}.com",
            "a\tb",
        ] {
            assert_eq!(
                check_h1(1, false, h(&[("Host", bad)])),
                Err(BAD_HOST),
                "{bad:?}"
            );
        }
        for good in [
            "a",
            "shop.example.com",
            "a:8080",
            "127.0.0.1:1",
            "[::1]:443",
            "[2001:db8::1]",
            "x_y-z.test",
        ] {
            assert_eq!(
                check_h1(1, false, h(&[("Host", good)])).map(|c| c.host),
                Ok(good),
                "{good}"
            );
        }
        assert_eq!(
            check_h1(0, false, h(&[])).map(|c| c.host),
            Ok(""),
            "HTTP/1.0 may omit it"
        );
        assert_eq!(
            check_h1(1, true, h(&[])).map(|c| c.host),
            Ok(""),
            "absolute-form may"
        );
        assert_eq!(
            check_h1(1, true, h(&[("Host", "")])).map(|c| c.host),
            Ok("")
        );
        assert_eq!(check_h1(1, true, h(&[("Host", "a b")])), Err(BAD_HOST));
    }

    #[test]
    fn a_body_has_one_unambiguous_framing() {
        let host = ("Host", "a");
        assert_eq!(
            check_h1(1, false, h(&[host])).unwrap().body,
            BodyFraming::None
        );
        assert_eq!(
            check_h1(1, false, h(&[host, ("Content-Length", "5")]))
                .unwrap()
                .body,
            BodyFraming::Length(5)
        );
        assert_eq!(
            check_h1(1, false, h(&[host, ("Content-Length", "0")]))
                .unwrap()
                .body,
            BodyFraming::None
        );
        assert_eq!(
            check_h1(1, false, h(&[host, ("Content-Length", "5, 5")])),
            Err(TWO_LENGTHS)
        );
        assert_eq!(
            check_h1(
                1,
                false,
                h(&[host, ("Content-Length", "5"), ("content-length", "5")])
            ),
            Err(TWO_LENGTHS)
        );
        for bad in ["-1", "5x", "", " ", "+5", "0x10", "1234567890123456789"] {
            assert_eq!(
                check_h1(1, false, h(&[host, ("Content-Length", bad)])),
                Err(BAD_LENGTH),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_h1(1, false, h(&[host, ("Transfer-Encoding", "Chunked")]))
                .unwrap()
                .body,
            BodyFraming::Chunked
        );
        assert_eq!(
            check_h1(
                1,
                false,
                h(&[
                    host,
                    ("Transfer-Encoding", "chunked"),
                    ("Content-Length", "3")
                ])
            ),
            Err(LENGTH_AND_CHUNKED)
        );
        for coding in ["gzip, chunked", "identity", "chunked, chunked", "gzip"] {
            assert_eq!(
                check_h1(1, false, h(&[host, ("Transfer-Encoding", coding)])),
                Err(CODING),
                "{coding}"
            );
        }
        assert_eq!(
            check_h1(
                1,
                false,
                h(&[
                    host,
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "chunked")
                ])
            ),
            Err(CODING)
        );
    }

    /// Found by the h1_differential fuzz target: an HTTP/1.0 request with
    /// `Transfer-Encoding: chunked` was framed as chunked, where RFC 9112 section 6.1 has
    /// the framing treated as faulty (a 1.0 hop knows no transfer codings).
    #[test]
    fn http_1_0_has_no_transfer_codings() {
        for coding in ["chunked", "gzip"] {
            assert_eq!(
                check_h1(0, false, h(&[("Transfer-Encoding", coding)])),
                Err(CODING_IN_HTTP_1_0),
                "{coding}"
            );
        }
        assert_eq!(
            check_h1(0, false, h(&[("Content-Length", "3")]))
                .unwrap()
                .body,
            BodyFraming::Length(3)
        );
    }
}
