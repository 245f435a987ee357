//! PROXY protocol v1 and v2 on listeners (HAProxy's `proxy-protocol.txt`; Envoy's
//! `envoy.filters.listener.proxy_protocol`; Istio's `gatewayTopology.proxyProtocol`): a
//! load balancer in front (AWS NLB, GCP, a Kubernetes `LoadBalancer`) opens each
//! connection with a header naming the client it carries.
//!
//! [`read`] runs first on every accepted connection of a listener that expects it, before
//! TLS or HTTP or an L4 route sees a byte, and replaces the connection's socket digest
//! with one whose peer (and local) address are the header's. Everything after reads the
//! peer from that digest (pingora's `client_addr`, `listener::peer_ip`, the access log's
//! `downstream_remote_address`), so authorization's `source.ip`, `X-Forwarded-For`, rate
//! limits, access lists, the per-client connection cap and the logs all see one address.
//!
//! The header is parsed by the `ppp` crate; this module bounds what it is given (v1: 107
//! bytes; v2: 16 + [`MAX_V2_PAYLOAD`]) and how long the client has to send it.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use tokio::io::AsyncReadExt;

/// A v1 header's largest size, CRLF included (the spec's 107).
pub const MAX_V1: usize = 107;
/// The largest v2 payload (addresses and TLVs) accepted: AWS's and GCP's TLVs are a few
/// dozen bytes; the protocol's own bound (64 KiB) would let any trusted peer make every
/// connection buffer that much.
pub const MAX_V2_PAYLOAD: usize = 4096;
const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;
/// The fixed part of a v2 header: signature, version/command, family, length.
const V2_FIXED: usize = 16;

/// A listener's PROXY protocol settings, compiled from
/// `mesh.defaultConfig.gatewayTopology.proxyProtocol`.
#[derive(Debug, Clone)]
pub struct ProxyProtocol {
    /// Sources that may (and must) send a header: the load balancers.
    pub trusted: Vec<ipnet::IpNet>,
    /// A trusted source may also connect without a header (Envoy's
    /// `allow_requests_without_proxy_protocol`).
    pub allow_without: bool,
    pub allow_v1: bool,
    pub allow_v2: bool,
    /// How long a connection has to send its header (Envoy's `listener_filters_timeout`).
    pub timeout: Duration,
    /// The listener ports it applies to; `None`: every listener.
    pub ports: Option<Vec<u16>>,
}

impl ProxyProtocol {
    pub fn applies_to(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|p| p.contains(&port))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// Why a connection was closed before anything else read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A PROXY header from a source not in `trustedCidrs`.
    Untrusted,
    /// A trusted source sent no header (and `allowRequestsWithoutProxyProtocol` is off).
    Missing,
    /// A header that does not parse, is too long, or has an unknown version or command.
    Invalid(String),
    /// A version `disallowedVersions` names.
    Disallowed(&'static str),
    /// The header was not complete within the timeout.
    Timeout,
    /// The client closed (or the read failed) before the header was complete.
    Closed,
}

impl Refused {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Untrusted => "untrusted",
            Refused::Missing => "missing",
            Refused::Invalid(_) => "invalid",
            Refused::Disallowed(_) => "disallowed_version",
            Refused::Timeout => "timeout",
            Refused::Closed => "closed",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Untrusted => write!(f, "PROXY header from a source not in trustedCidrs"),
            Refused::Missing => write!(f, "no PROXY header from a trusted source"),
            Refused::Invalid(e) => write!(f, "invalid PROXY header: {e}"),
            Refused::Disallowed(v) => write!(f, "PROXY protocol {v} is disallowed"),
            Refused::Timeout => write!(f, "PROXY header not complete within the timeout"),
            Refused::Closed => write!(f, "closed before the PROXY header was complete"),
        }
    }
}

/// What the start of a connection is, so far.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Could still become either signature.
    Undecided,
    V1,
    V2,
    /// Neither signature.
    Other,
}

fn start_of(buf: &[u8]) -> Start {
    let state = |sig: &[u8]| {
        if buf.len() >= sig.len() {
            Some(buf.starts_with(sig))
        } else if sig.starts_with(buf) {
            None
        } else {
            Some(false)
        }
    };
    match (state(V1_SIGNATURE), state(V2_SIGNATURE)) {
        (Some(true), _) => Start::V1,
        (_, Some(true)) => Start::V2,
        (None, _) | (_, None) => Start::Undecided,
        _ => Start::Other,
    }
}

/// A parsed header: its length and the addresses it carries (`None`: LOCAL, UNKNOWN, or
/// an address family without IP addresses, where the real peer stands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8], pp: &ProxyProtocol) -> Result<Option<Header>, Refused> {
    use ppp::PartialResult;
    match start_of(buf) {
        Start::Undecided => Ok(None),
        Start::Other => Err(Refused::Missing),
        Start::V1 => {
            if !pp.allow_v1 {
                return Err(Refused::Disallowed("V1"));
            }
            // The line is given to the parser only once it is whole: ppp takes a line cut
            // after a separator ("... 4000 ") for a complete one with an empty field.
            let Some(cr) = buf.iter().position(|&b| b == b'\r') else {
                return if buf.len() >= MAX_V1 {
                    Err(Refused::Invalid("a v1 header longer than 107 bytes".into()))
                } else {
                    Ok(None)
                };
            };
            if cr + 2 > MAX_V1 {
                return Err(Refused::Invalid("a v1 header longer than 107 bytes".into()));
            }
            let Some(line) = buf.get(..cr + 2) else {
                return Ok(None);
            };
            let h = ppp::v1::Header::try_from(line).map_err(|e| Refused::Invalid(e.to_string()))?;
            let addresses = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(Some(Header {
                len: h.header.len(),
                addresses,
            }))
        }
        Start::V2 => {
            if !pp.allow_v2 {
                return Err(Refused::Disallowed("V2"));
            }
            if buf.len() >= V2_FIXED {
                let payload = u16::from_be_bytes([buf[14], buf[15]]) as usize;
                if payload > MAX_V2_PAYLOAD {
                    return Err(Refused::Invalid(format!(
                        "a v2 header of {payload} bytes after its fixed part (at most {MAX_V2_PAYLOAD})"
                    )));
                }
            }
            let parsed = ppp::v2::Header::try_from(buf);
            if parsed.is_incomplete() {
                return Ok(None);
            }
            let h = parsed.map_err(|e| Refused::Invalid(e.to_string()))?;
            // LOCAL: the balancer's own connection (a health check); the real peer stands.
            let addresses = match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                // AF_UNSPEC or AF_UNIX: no IP client to name; the spec says to use the
                // connection's own addresses.
                (ppp::v2::Command::Proxy, _) => None,
            };
            Ok(Some(Header {
                len: h.header.len(),
                addresses,
            }))
        }
    }
}

/// Reads the PROXY header of a new connection, as `pp` says, and makes its addresses the
/// connection's: `Ok` with the stream to serve (its bytes after the header unread), or
/// why it is to be closed.
///
/// - From a trusted source: a header is required (unless `allow_without`, when a
///   connection whose first bytes are not a signature is served as it is).
/// - From any other source: a connection that opens with a signature is refused; others
///   are served with their real peer address.
///
/// Telling "no header" apart needs the client's first bytes: a connection that sends
/// nothing within the timeout is refused when a header is required, and otherwise served
/// as it is (a server-speaks-first protocol on an L4 listener waits that long).
pub async fn read(io: Stream, pp: &ProxyProtocol) -> Result<Stream, Refused> {
    let mut l4: Box<L4Stream> = io
        .into_any()
        .downcast()
        .map_err(|_| Refused::Invalid("not a TCP connection".into()))?;
    let peer = l4
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
    let trusted = peer.is_some_and(|ip| pp.trusts(ip));
    let required = trusted && !pp.allow_without;
    let deadline = tokio::time::Instant::now() + pp.timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(V2_FIXED);
    loop {
        // How much may be buffered at this point: enough to tell the signatures apart and
        // read v2's length, then the header's own bound.
        let limit = match start_of(&buf) {
            Start::Undecided => V2_FIXED,
            Start::Other => {
                l4.rewind(&buf);
                return if required {
                    Err(Refused::Missing)
                } else {
                    Ok(l4)
                };
            }
            _ if !trusted => return Err(Refused::Untrusted),
            start => {
                if let Some(h) = parse(&buf, pp)? {
                    l4.rewind(&buf[h.len..]);
                    if let Some((source, destination)) = h.addresses {
                        restore(&mut l4, source, destination);
                    }
                    return Ok(l4);
                }
                match start {
                    Start::V1 => MAX_V1,
                    _ => {
                        let payload = buf
                            .get(14..16)
                            .map_or(0, |l| u16::from_be_bytes([l[0], l[1]]) as usize);
                        V2_FIXED + payload
                    }
                }
            }
        };
        if buf.len() >= limit {
            return Err(Refused::Invalid("incomplete within its bound".into()));
        }
        let at = buf.len();
        buf.resize(limit, 0);
        let n = match tokio::time::timeout_at(deadline, l4.read(&mut buf[at..])).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Err(Refused::Closed),
            // Nothing at all came: a client that waits for the server to speak first.
            Err(_) if at == 0 && !required => return Ok(l4),
            Err(_) => return Err(Refused::Timeout),
        };
        buf.truncate(at + n);
        if n == 0 {
            return Err(Refused::Closed);
        }
    }
}

/// Gives the connection a socket digest whose peer and local addresses are the header's
/// (as Envoy restores both): every later reader of the digest sees them.
fn restore(l4: &mut L4Stream, source: SocketAddr, destination: SocketAddr) {
    let digest = SocketDigest::from_raw_fd(l4.as_raw_fd());
    let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
    let _ = digest.local_addr.set(Some(PeerAddr::Inet(destination)));
    l4.set_socket_digest(digest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pp() -> ProxyProtocol {
        ProxyProtocol {
            trusted: vec!["127.0.0.0/8".parse().unwrap()],
            allow_without: false,
            allow_v1: true,
            allow_v2: true,
            timeout: Duration::from_secs(1),
            ports: None,
        }
    }

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 443\r\nGET /";
        let got = parse(h, &pp()).unwrap().unwrap();
        assert_eq!(got.len, h.len() - 5);
        assert_eq!(
            got.addresses,
            Some((
                "192.0.2.7:4000".parse().unwrap(),
                "198.51.100.1:443".parse().unwrap()
            ))
        );
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        let got = parse(h, &pp()).unwrap().unwrap();
        assert_eq!(
            got.addresses.unwrap().0,
            "[2001:db8::7]:4000".parse().unwrap()
        );
        let got = parse(b"PROXY UNKNOWN\r\n", &pp()).unwrap().unwrap();
        assert_eq!(got.addresses, None);
    }

    #[test]
    fn partial_headers_ask_for_more_and_overlong_ones_are_refused() {
        let full = b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 443\r\n";
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n], &pp()), Ok(None), "{n} bytes");
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 100]].concat();
        assert!(matches!(parse(&long, &pp()), Err(Refused::Invalid(_))));
        assert!(matches!(
            parse(b"PROXY TCP4 300.0.0.1 1.1.1.1 1 2\r\n", &pp()),
            Err(Refused::Invalid(_))
        ));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", &pp()), Err(Refused::Missing));
        assert_eq!(parse(b"\x16\x03\x01", &pp()), Err(Refused::Missing));
    }

    #[test]
    fn v2_proxy_local_unspec_and_bounds() {
        let mut a = vec![192, 0, 2, 7, 198, 51, 100, 1];
        a.extend_from_slice(&4000u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &a);
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n], &pp()), Ok(None), "{n} bytes");
        }
        let got = parse(&h, &pp()).unwrap().unwrap();
        assert_eq!(got.len, 28);
        assert_eq!(got.addresses.unwrap().0, "192.0.2.7:4000".parse().unwrap());
        // LOCAL (a health check) and AF_UNSPEC: the real peer.
        assert_eq!(
            parse(&v2(0, 0x11, &a), &pp()).unwrap().unwrap().addresses,
            None
        );
        assert_eq!(
            parse(&v2(1, 0x00, &[]), &pp()).unwrap().unwrap().addresses,
            None
        );
        // Unknown command, unknown version, a payload too short for its family.
        assert!(parse(&v2(2, 0x11, &a), &pp()).is_err());
        let mut bad = h.clone();
        bad[12] = 0x31;
        assert!(parse(&bad, &pp()).is_err());
        assert!(parse(&v2(1, 0x11, &a[..4]), &pp()).is_err());
        // A length past the bound is refused before the payload is waited for.
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&(MAX_V2_PAYLOAD as u16 + 1).to_be_bytes());
        assert!(matches!(parse(&huge, &pp()), Err(Refused::Invalid(_))));
    }

    #[test]
    fn disallowed_versions() {
        let only_v2 = ProxyProtocol {
            allow_v1: false,
            ..pp()
        };
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n", &only_v2),
            Err(Refused::Disallowed("V1"))
        );
        let only_v1 = ProxyProtocol {
            allow_v2: false,
            ..pp()
        };
        assert_eq!(
            parse(&v2(1, 0, &[]), &only_v1),
            Err(Refused::Disallowed("V2"))
        );
    }

    #[test]
    fn trusted_sources_match_v4_mapped_addresses() {
        assert!(pp().trusts("::ffff:127.0.0.9".parse().unwrap()));
        assert!(!pp().trusts("192.0.2.1".parse().unwrap()));
    }
}
