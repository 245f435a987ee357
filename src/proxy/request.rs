//! The request core: what a request becomes on its way upstream and what a local reply
//! says, decided once for every codec (Portico's HTTP/1.1 and h2 fast codecs, and
//! pingora's request cycle). Codecs only move bytes: each feeds the client's header fields
//! in and writes out what comes back, in its own form. Never touches sockets.

use std::net::IpAddr;

use crate::routing::HeaderOps;

/// Fields about one hop, never passed upstream: RFC 9110 7.6.1's (`Connection` and what it
/// names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`), the client's
/// credentials for this proxy (`Proxy-Authorization`), and h2c's `HTTP2-Settings`.
/// `Transfer-Encoding` is the codec's: it frames the body it writes.
const HOP_BY_HOP_REQUEST: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
];

/// Whether request field `name` is about the hop to this proxy (an upgrade keeps
/// `Upgrade` and `Connection`, which ask the upstream for it).
pub fn hop_by_hop_request(name: &str, upgrade: bool) -> bool {
    HOP_BY_HOP_REQUEST
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        && !(upgrade
            && (name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("connection")))
}

/// Where the upstream head's fields go: a codec's buffer or header map.
pub trait HeaderSink {
    fn field(&mut self, name: &[u8], value: &[u8]);
    /// `X-Forwarded-For`: the values `prev` (each a list), then `ip`, as one field.
    fn forwarded_for(&mut self, prev: &mut dyn Iterator<Item = &[u8]>, ip: IpAddr);
}

/// What the upstream head adds to the client's fields.
pub struct Forwarding<'a> {
    /// `http` or `https`: how the client reached the gateway.
    pub scheme: &'static [u8],
    pub client_ip: Option<IpAddr>,
    /// The id made for a request that came without one: a field of the request from then
    /// on (routes match on it), written as if the client had sent it last.
    pub request_id: Option<&'a [u8]>,
    /// The route's header operations, then the destination's (a later one wins).
    pub ops: [&'a HeaderOps; 2],
    /// The request asks for an upgrade: `Upgrade` and `Connection` go upstream.
    pub upgrade: bool,
}

impl Forwarding<'_> {
    /// Whether a `set` or `remove` in `ops[from..]` replaces field `name`.
    fn replaced_in(&self, from: usize, name: &[u8]) -> bool {
        self.ops[from..].iter().any(|o| {
            o.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
                || o.remove
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        })
    }

    /// Whether a `set` in the operations writes field `name`.
    fn set_by_ops(&self, name: &[u8]) -> bool {
        self.ops
            .iter()
            .any(|o| o.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)))
    }
}

/// Whether a `Connection` field of `client` names field `name` (RFC 9110 7.6.1: a proxy
/// removes the fields the client's `Connection` names).
fn named_by_connection<'h>(client: impl Iterator<Item = (&'h str, &'h [u8])>, name: &str) -> bool {
    client
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// The upstream request's header fields, after the request line: the client's fields
/// less those about the hop (and those its `Connection` names), less those the operations
/// replace; a generated request id; the operations' own fields (route's, then
/// destination's); then `X-Forwarded-Proto` (unless an operation sets it) and
/// `X-Forwarded-For`: the client's values that no operation removed, then the client's
/// address (unless an operation sets it). So a route's `remove: [x-forwarded-for]` drops
/// what a client claimed and keeps the address Portico saw, and a `set` of any of these
/// fields gives one field with the route's value.
///
/// `client` gives the client's fields afresh on each call (they are looked at more than
/// once: for what `Connection` names, and for `X-Forwarded-For`).
pub fn upstream_request_headers<'h, I>(
    client: impl Fn() -> I,
    f: &Forwarding<'_>,
    out: &mut impl HeaderSink,
) where
    I: Iterator<Item = (&'h str, &'h [u8])>,
{
    let has_connection = client().any(|(n, _)| n.eq_ignore_ascii_case("connection"));
    for (name, value) in client() {
        if hop_by_hop_request(name, f.upgrade)
            || name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || f.replaced_in(0, name.as_bytes())
            || (has_connection && named_by_connection(client(), name))
        {
            continue;
        }
        out.field(name.as_bytes(), value);
    }
    if let Some(id) = f.request_id {
        if !f.replaced_in(0, b"x-request-id") {
            out.field(b"x-request-id", id);
        }
    }
    for (i, o) in f.ops.iter().enumerate() {
        for (name, value) in o.set.iter().chain(&o.add) {
            if !f.replaced_in(i + 1, name) {
                out.field(name, value.as_bytes());
            }
        }
    }
    if !f.set_by_ops(b"x-forwarded-proto") {
        out.field(b"x-forwarded-proto", f.scheme);
    }
    if let Some(ip) = f.client_ip {
        if !f.set_by_ops(b"x-forwarded-for") {
            let kept = !f.replaced_in(0, b"x-forwarded-for");
            let mut prev = client()
                .filter(|(n, _)| kept && n.eq_ignore_ascii_case("x-forwarded-for"))
                .map(|(_, v)| v);
            out.forwarded_for(&mut prev, ip);
        }
    }
}

/// An HTTP/1.1 head being written: each field as a line.
impl HeaderSink for Vec<u8> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        self.extend_from_slice(value);
        self.extend_from_slice(b"\r\n");
    }

    fn forwarded_for(&mut self, prev: &mut dyn Iterator<Item = &[u8]>, ip: IpAddr) {
        self.extend_from_slice(b"x-forwarded-for: ");
        super::write_forwarded_for(self, prev, ip);
        self.extend_from_slice(b"\r\n");
    }
}

/// A reply the gateway makes itself (a refusal, no route, a failure upstream): the same
/// status line, fields and body from every codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalReply<'a> {
    pub status: u16,
    /// One line of text (the body is it and a newline); empty for no body.
    pub what: &'a str,
    /// The client's connection closes after it (HTTP/1.1: `connection: close`).
    pub close: bool,
}

impl LocalReply<'_> {
    /// The body's length.
    pub fn body_len(&self) -> usize {
        if self.what.is_empty() {
            0
        } else {
            self.what.len() + 1
        }
    }

    /// The reply as HTTP/1.1 bytes into `out` (no body for a HEAD request).
    pub fn write_h1(&self, out: &mut Vec<u8>, head: bool) {
        use std::io::Write as _;
        let reason = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", self.status);
        let len = self.body_len();
        if len > 0 {
            out.extend_from_slice(b"content-type: text/plain\r\n");
        }
        let _ = write!(out, "content-length: {len}\r\n");
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if len > 0 && !head {
            out.extend_from_slice(self.what.as_bytes());
            out.push(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ops(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderOps {
        HeaderOps {
            set: set
                .iter()
                .map(|(n, v)| (Bytes::copy_from_slice(n.as_bytes()), v.parse().unwrap()))
                .collect(),
            add: add
                .iter()
                .map(|(n, v)| (Bytes::copy_from_slice(n.as_bytes()), v.parse().unwrap()))
                .collect(),
            remove: remove.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn run(
        client: &[(&str, &str)],
        route: &HeaderOps,
        dest: &HeaderOps,
        id: Option<&str>,
    ) -> String {
        let f = Forwarding {
            scheme: b"https",
            client_ip: Some("10.0.0.1".parse().unwrap()),
            request_id: id.map(str::as_bytes),
            ops: [route, dest],
            upgrade: false,
        };
        let mut out = Vec::new();
        upstream_request_headers(
            || client.iter().map(|(n, v)| (*n, v.as_bytes())),
            &f,
            &mut out,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn operations_replace_remove_and_add_in_route_then_destination_order() {
        let route = ops(
            &[("x-a", "route"), ("x-b", "route")],
            &[("x-c", "1")],
            &["x-gone"],
        );
        let dest = ops(&[("x-b", "dest")], &[], &["x-c"]);
        let got = run(
            &[
                ("Host", "h"),
                ("X-A", "client"),
                ("x-gone", "1"),
                ("Connection", "keep-alive"),
            ],
            &route,
            &dest,
            None,
        );
        assert_eq!(
            got,
            "Host: h\r\nx-a: route\r\nx-b: dest\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n"
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_stay_behind() {
        let none = HeaderOps::default();
        let got = run(
            &[
                ("Host", "h"),
                ("Connection", "keep-alive, X-Private"),
                ("x-private", "1"),
                ("Proxy-Authorization", "Basic eDp5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("HTTP2-Settings", "AAMA"),
                ("Keep-Alive", "timeout=5"),
                ("x-kept", "1"),
            ],
            &none,
            &none,
            None,
        );
        assert_eq!(
            got,
            "Host: h\r\nx-kept: 1\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n"
        );
    }

    #[test]
    fn forwarded_fields_the_request_id_and_what_routes_do_to_them() {
        let none = HeaderOps::default();
        let client = [
            ("Host", "h"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("X-Forwarded-Proto", "spoofed"),
        ];
        assert_eq!(
            run(&client, &none, &none, Some("id-1")),
            "Host: h\r\nx-request-id: id-1\r\nx-forwarded-proto: https\r\nx-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.1\r\n"
        );
        let remove = ops(&[], &[], &["x-forwarded-for", "x-request-id"]);
        assert_eq!(
            run(&client, &remove, &none, Some("id-1")),
            "Host: h\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n",
            "remove drops what the client claimed, not the address Portico saw"
        );
        let set = ops(
            &[
                ("x-forwarded-for", "set"),
                ("x-forwarded-proto", "p"),
                ("x-request-id", "r"),
            ],
            &[],
            &[],
        );
        assert_eq!(
            run(&client, &set, &none, Some("id-1")),
            "Host: h\r\nx-forwarded-for: set\r\nx-forwarded-proto: p\r\nx-request-id: r\r\n",
            "a set gives one field with the route's value"
        );
    }

    #[test]
    fn local_replies_read_the_same_everywhere() {
        let mut out = Vec::new();
        LocalReply {
            status: 503,
            what: "no healthy upstream",
            close: true,
        }
        .write_h1(&mut out, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 20\r\nconnection: close\r\n\r\nno healthy upstream\n"
        );
        let mut out = Vec::new();
        LocalReply {
            status: 404,
            what: "",
            close: false,
        }
        .write_h1(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
