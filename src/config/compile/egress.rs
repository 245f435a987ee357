//! Compiles the ServiceEntries (`registry`, already checked) and
//! `mesh.outboundTrafficPolicy` / `mesh.dnsServers` into the Snapshot's egress registry.
//! Never resolves a name: DNS names become shared handles the refresher keeps fresh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::registry::{EndpointAddress, Service};
use super::Cx;
use crate::config::load::Document;
use crate::egress::{
    dns, EgressRegistry, Endpoint, OutboundPolicy, RegisteredHost, RegisteredPort, Resolution,
    Upstream,
};
use crate::routing::HostMatcher;
use crate::upstream::{ClusterSettings, Limits};

impl Cx {
    /// The egress registry of the ServiceEntries compiled in `self.registry`.
    pub(super) fn egress(&mut self, doc: &Document) -> EgressRegistry {
        let mesh = &doc.mesh.spec;
        let policy = match mesh
            .outbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode.as_deref())
        {
            Some("ALLOW_ANY") => OutboundPolicy::AllowAny,
            // Other values were reported by `mesh()`.
            _ => OutboundPolicy::RegistryOnly,
        };
        let mut servers = Vec::new();
        for (i, s) in mesh.dns_servers.iter().enumerate() {
            let parsed = s
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Some(a) => servers.push(a),
                None => self.err(
                    &doc.mesh.origin,
                    &format!(".dnsServers[{i}]"),
                    format!("{s:?} is not an IP address or IP:port"),
                ),
            }
        }

        // Read here: `mesh()` compiles the settings after this.
        let connect_timeout = super::connect_timeout(mesh);
        let mut hosts = HostMatcher::default();
        let mut addresses = Vec::new();
        for service in &self.registry.services {
            let mut first = None;
            for pattern in &service.hosts {
                let pool = |port| self.egress_pool(pattern, port, connect_timeout);
                let entry = Arc::new(registered(service, pattern, pool));
                first.get_or_insert_with(|| entry.clone());
                // A host registered twice: the later ServiceEntry wins (warned by
                // build_registry).
                hosts.insert(pattern, entry);
            }
            if let Some(entry) = first {
                addresses.extend(service.addresses.iter().map(|n| (*n, entry.clone())));
            }
        }
        let mut registry =
            EgressRegistry::new(policy, hosts, Arc::new(dns::Resolver::new(servers)));
        registry.addresses = addresses;
        registry
    }
}

/// One host of `service` as the forward proxy finds it; `pool` gives a port's connection
/// settings and limits.
fn registered(
    service: &Service,
    pattern: &str,
    pool: impl Fn(u16) -> (ClusterSettings, Limits),
) -> RegisteredHost {
    let endpoint = |ep: &super::registry::ServiceEndpoint, port: u16| match &ep.address {
        EndpointAddress::Ip(ip) => Endpoint::Addr(SocketAddr::new(*ip, port)),
        EndpointAddress::Name(n) => Endpoint::Name(dns::name(n), port),
    };
    let ports = service
        .ports
        .iter()
        .map(|sp| {
            let upstream = match service.resolution {
                Resolution::None => Upstream::Requested(sp.target),
                Resolution::Dns | Resolution::DnsRoundRobin if service.endpoints.is_empty() => {
                    if pattern.starts_with('*') {
                        Upstream::Requested(sp.target)
                    } else {
                        Upstream::Endpoints(vec![Endpoint::Name(dns::name(pattern), sp.target)])
                    }
                }
                // STATIC endpoints are all IP addresses (checked by build_registry).
                Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin => {
                    Upstream::Endpoints(
                        service
                            .endpoints
                            .iter()
                            .map(|ep| endpoint(ep, sp.of(ep)))
                            .collect(),
                    )
                }
            };
            RegisteredPort::new(sp.number, sp.protocol, upstream, pattern)
                .with_pool(pool(sp.number))
        })
        .collect();
    RegisteredHost::new(
        pattern.to_string(),
        service.qualified.clone(),
        service.location,
        service.resolution,
        ports,
    )
}
