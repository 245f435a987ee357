//! L4 listeners: TLS passthrough routed by SNI (VirtualService `tls` routes) and opaque TCP
//! (VirtualService `tcp` routes). A connection loads the current Snapshot once, at accept,
//! and keeps it to its end: a reload changes where *new* connections go, never an open one.
//! The compiled tables here are built by `config::compile`; this module only looks them up,
//! connects and splices bytes. It never parses config.

pub mod client_hello;
pub(crate) mod service;

use std::sync::Arc;

use crate::routing::HostMatcher;
use crate::upstream::Cluster;

pub use service::{L4Service, Terminate};

/// What an L4 listener does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4Kind {
    /// Peek the ClientHello, route by SNI, pass the TLS bytes through untouched.
    Passthrough,
    /// Forward the raw bytes.
    Tcp,
}

impl L4Kind {
    pub fn protocol(self) -> &'static str {
        match self {
            L4Kind::Passthrough => "TLS-PASSTHROUGH",
            L4Kind::Tcp => "TCP",
        }
    }
}

/// The compiled routes of one L4 listener.
#[derive(Debug)]
pub enum L4Table {
    /// SNI → route. The most specific name wins (exact, then the longest `*.suffix`, then
    /// `*`), as Envoy picks a filter chain by server name; between routes naming the same
    /// pattern, the first in config order wins.
    Passthrough(HostMatcher<SniRoute>),
    /// The first `tcp` route bound to this port, if any.
    Tcp(Option<Arc<L4Route>>),
}

impl L4Table {
    pub fn kind(&self) -> L4Kind {
        match self {
            L4Table::Passthrough(_) => L4Kind::Passthrough,
            L4Table::Tcp(_) => L4Kind::Tcp,
        }
    }

    /// For the admin API: each name (or the port) with its route and destinations.
    pub fn describe(&self) -> serde_json::Value {
        let entry = |name: String, action: &SniRoute| match action {
            SniRoute::Pass(r) => {
                serde_json::json!({ "sni": name, "route": r.origin, "destinations": r.describe() })
            }
            SniRoute::Terminate => serde_json::json!({ "sni": name, "terminate": true }),
            SniRoute::AutoUnknown => {
                serde_json::json!({ "sni": name, "autoPassthrough": "no such cluster: closed" })
            }
        };
        match self {
            L4Table::Passthrough(m) => {
                let mut list: Vec<(String, &SniRoute)> = m.entries().collect();
                list.sort_by(|a, b| a.0.cmp(&b.0));
                list.into_iter().map(|(n, a)| entry(n, a)).collect()
            }
            L4Table::Tcp(r) => r
                .iter()
                .map(|r| serde_json::json!({ "route": r.origin, "destinations": r.describe() }))
                .collect(),
        }
    }
}

/// What a passthrough port does with a name.
#[derive(Debug, Clone)]
pub enum SniRoute {
    /// Pass the TLS bytes through to this route's destination.
    Pass(Arc<L4Route>),
    /// An HTTPS server on the same port claims the name: terminate TLS and serve HTTP.
    Terminate,
    /// A host of an AUTO_PASSTHROUGH server: the names it routes are exact entries
    /// (`outbound_.<port>_.<subset>_.<host>`, one per known cluster, `Pass`); any other
    /// name it covers is a cluster that does not exist, and the connection is closed.
    AutoUnknown,
}

/// One `tls` or `tcp` route: weighted destinations.
#[derive(Debug)]
pub struct L4Route {
    /// `namespace/virtualService.tls[i]` or `.tcp[i]`, for logs and the admin API.
    pub origin: String,
    pub destinations: Vec<L4Destination>,
    pub total_weight: u32,
}

#[derive(Debug)]
pub struct L4Destination {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
}

impl L4Route {
    fn describe(&self) -> Vec<String> {
        self.destinations
            .iter()
            .map(|d| format!("{} ({}/{})", d.cluster.name, d.weight, self.total_weight))
            .collect()
    }

    /// Weighted choice: destination `i` with probability `weight_i / total`.
    pub fn pick(&self) -> &L4Destination {
        let mut draw = if self.destinations.len() > 1 {
            fastrand::u32(0..self.total_weight.max(1))
        } else {
            0
        };
        for d in &self.destinations {
            if draw < d.weight {
                return d;
            }
            draw -= d.weight;
        }
        // Compile guarantees at least one destination and a positive total.
        &self.destinations[self.destinations.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ClusterSettings;

    fn route(weights: &[u32]) -> L4Route {
        let destinations: Vec<L4Destination> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| L4Destination {
                cluster: Arc::new(Cluster::new(
                    &format!("d{i}.test"),
                    443,
                    None,
                    Vec::new(),
                    ClusterSettings::default(),
                )),
                weight: *w,
            })
            .collect();
        L4Route {
            origin: "default/vs.tcp[0]".into(),
            total_weight: weights.iter().sum(),
            destinations,
        }
    }

    #[test]
    fn weighted_pick_follows_the_weights() {
        let r = route(&[80, 20]);
        let mut first = 0;
        for _ in 0..10_000 {
            if r.pick().cluster.host == "d0.test" {
                first += 1;
            }
        }
        // Binomial(10 000, 0.8): standard deviation 40, and this is ±5 of them; 75/25 or
        // 85/15 would land 300 beyond it, 7 or more of their own standard deviations.
        assert!((7_800..=8_200).contains(&first), "{first}");
        let one = route(&[1]);
        assert_eq!(one.pick().cluster.host, "d0.test");
    }
}
