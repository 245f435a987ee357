//! Clusters: where a destination's requests go. Endpoints are resolved before a Snapshot is
//! published; picking an endpoint is an atomic increment. Never parses config.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;

/// One upstream endpoint with its labels already applied (subset selection happened at
/// compile time).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
}

/// A set of endpoints for one `host`, `port` and `subset`, named as Envoy names clusters:
/// `outbound|8080|v1|api.internal`.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    pub endpoints: Vec<Endpoint>,
    pub settings: ClusterSettings,
    next: AtomicUsize,
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Speak HTTP/2 with prior knowledge (h2c) to this cluster.
    pub h2c: bool,
}

impl Cluster {
    pub fn new(
        host: &str,
        port: u16,
        subset: Option<&str>,
        endpoints: Vec<Endpoint>,
        settings: ClusterSettings,
    ) -> Self {
        Cluster {
            name: cluster_name(host, port, subset),
            host: host.to_string(),
            port,
            subset: subset.map(str::to_string),
            endpoints,
            settings,
            next: AtomicUsize::new(0),
        }
    }

    /// Round robin: the starting position for a new request.
    pub fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The endpoint for try `attempt` (0 = first) of a request that started at `start`:
    /// a retry moves to the following endpoint, so it lands elsewhere where it can.
    pub fn endpoint(&self, start: usize, attempt: usize) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        self.endpoints
            .get(start.wrapping_add(attempt) % self.endpoints.len())
    }

    /// The pingora peer for one endpoint. The address is already an IP: `HttpPeer::new`
    /// must never resolve names on the request path.
    pub fn peer(&self, endpoint: &Endpoint, read_timeout: Option<Duration>) -> HttpPeer {
        let mut peer = HttpPeer::new(endpoint.addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.settings.connect_timeout);
        o.total_connection_timeout = Some(self.settings.connect_timeout);
        o.idle_timeout = self.settings.idle_timeout.or(Some(Duration::from_secs(60)));
        o.read_timeout = read_timeout;
        o.write_timeout = read_timeout;
        if self.settings.h2c {
            o.set_http_version(2, 2);
            o.max_h2_streams = 100;
        }
        peer
    }
}

pub fn cluster_name(host: &str, port: u16, subset: Option<&str>) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: u16) -> Cluster {
        let endpoints = (0..n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
            })
            .collect();
        Cluster::new(
            "svc",
            80,
            None,
            endpoints,
            ClusterSettings {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: None,
                h2c: false,
            },
        )
    }

    #[test]
    fn round_robin_visits_every_endpoint() {
        let c = cluster(3);
        let ports: Vec<u16> = (0..6)
            .map(|_| c.endpoint(c.next_index(), 0).unwrap().addr.port())
            .collect();
        assert_eq!(ports, vec![9000, 9001, 9002, 9000, 9001, 9002]);
    }

    #[test]
    fn retry_goes_elsewhere() {
        let c = cluster(2);
        let start = c.next_index();
        let first = c.endpoint(start, 0).unwrap().addr;
        let retry = c.endpoint(start, 1).unwrap().addr;
        assert_ne!(first, retry);
        assert!(cluster(0).endpoint(0, 0).is_none());
    }
}
