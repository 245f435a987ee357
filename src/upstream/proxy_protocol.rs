//! PROXY protocol to upstreams (DestinationRule `trafficPolicy.proxyProtocol`; Envoy's
//! `envoy.transport_sockets.upstream_proxy_protocol`): every new connection to a cluster
//! that asks for it opens with a v1 or v2 header naming the downstream connection's client
//! and the address it reached Portico on, before TLS or any request byte.
//!
//! The addresses are the downstream connection's socket digest: the client a listener's
//! PROXY header named when it accepted one (`listener::proxy_protocol` restores both), else
//! the TCP peer and local address. `X-Forwarded-For` plays no part, as in Envoy.
//!
//! Whether a cluster sends one is compiled config ([`crate::upstream::ClusterSettings`]
//! `proxy_protocol`), asked through [`crate::upstream::Cluster::proxy_header`] by every
//! connector (pingora's, the fast codecs', L4 and the mirror). The header is encoded by the
//! `ppp` crate, the one the listeners parse with.

use std::net::{IpAddr, SocketAddr};

use pingora::protocols::SocketDigest;

/// `proxyProtocol.version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

/// The addresses of a downstream connection: its client and where it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnAddrs {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

impl ConnAddrs {
    /// From a downstream connection's socket digest; `None` when either address is not an
    /// IP one (a Unix socket) or unknown.
    pub fn of(digest: Option<&SocketDigest>) -> Option<ConnAddrs> {
        let d = digest?;
        let source = *d.peer_addr()?.as_inet()?;
        let destination = *d.local_addr()?.as_inet()?;
        Some(ConnAddrs::new(source, destination))
    }

    /// Both addresses in one family, as a header carries them: IPv4-mapped IPv6 addresses
    /// (a dual-stack listener's IPv4 clients) are written as IPv4 when both are, and an
    /// IPv4 address next to an IPv6 one is mapped into IPv6.
    pub fn new(source: SocketAddr, destination: SocketAddr) -> ConnAddrs {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let (s, d) = (canon(source), canon(destination));
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
            IpAddr::V6(_) => a,
        };
        if s.is_ipv4() == d.is_ipv4() {
            ConnAddrs {
                source: s,
                destination: d,
            }
        } else {
            ConnAddrs {
                source: v6(s),
                destination: v6(d),
            }
        }
    }
}

/// The header one connection opens with: also what tells its pooled connections apart
/// from other clients' (a connection is reused only for the same header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    pub version: Version,
    /// `None`: the downstream addresses are unknown (v1 `UNKNOWN`, v2 `LOCAL`).
    pub addrs: Option<ConnAddrs>,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        match self.version {
            Version::V1 => {
                let addresses = match self.addrs {
                    Some(a) => ppp::v1::Addresses::from((a.source, a.destination)),
                    None => ppp::v1::Addresses::Unknown,
                };
                addresses.to_string().into_bytes()
            }
            Version::V2 => {
                use ppp::v2::{Builder, Command, Protocol, Version};
                let built = match self.addrs {
                    Some(a) => Builder::with_addresses(
                        Version::Two | Command::Proxy,
                        Protocol::Stream,
                        (a.source, a.destination),
                    )
                    .build(),
                    None => Builder::with_addresses(
                        Version::Two | Command::Local,
                        Protocol::Unspecified,
                        ppp::v2::Addresses::Unspecified,
                    )
                    .build(),
                };
                // Only a payload over 64 KiB fails to build; addresses are at most 36 bytes.
                built.unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(s: &str, d: &str) -> Option<ConnAddrs> {
        Some(ConnAddrs::new(s.parse().unwrap(), d.parse().unwrap()))
    }

    #[test]
    fn v1_headers() {
        let h = Header {
            version: Version::V1,
            addrs: addrs("192.0.2.7:4000", "198.51.100.1:443"),
        };
        assert_eq!(
            h.encode(),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 443\r\n"
        );
        let h = Header {
            version: Version::V1,
            addrs: addrs("[2001:db8::7]:4000", "[2001:db8::1]:443"),
        };
        assert_eq!(
            h.encode(),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n"
        );
        let h = Header {
            version: Version::V1,
            addrs: None,
        };
        assert_eq!(h.encode(), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_headers_parse_back() {
        let h = Header {
            version: Version::V2,
            addrs: addrs("192.0.2.7:4000", "198.51.100.1:443"),
        }
        .encode();
        assert_eq!(h.len(), 28);
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::from((
                "192.0.2.7:4000".parse::<SocketAddr>().unwrap(),
                "198.51.100.1:443".parse::<SocketAddr>().unwrap()
            ))
        );
        let local = Header {
            version: Version::V2,
            addrs: None,
        }
        .encode();
        let parsed = ppp::v2::Header::try_from(local.as_slice()).unwrap();
        assert_eq!(parsed.command, ppp::v2::Command::Local);
        assert_eq!(local.len(), 16);
    }

    #[test]
    fn families_are_made_one() {
        // A dual-stack listener's IPv4 client: IPv4 both.
        let a = ConnAddrs::new(
            "[::ffff:192.0.2.7]:4000".parse().unwrap(),
            "[::ffff:198.51.100.1]:443".parse().unwrap(),
        );
        assert_eq!(a.source, "192.0.2.7:4000".parse().unwrap());
        assert_eq!(a.destination, "198.51.100.1:443".parse().unwrap());
        // Mixed: IPv6 both.
        let a = ConnAddrs::new(
            "192.0.2.7:4000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        );
        assert_eq!(a.source, "[::ffff:192.0.2.7]:4000".parse().unwrap());
        let h = Header {
            version: Version::V1,
            addrs: Some(a),
        };
        assert!(h
            .encode()
            .starts_with(b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 "));
    }
}
