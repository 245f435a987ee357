//! Compiles ServiceEntries and `mesh.outboundTrafficPolicy` / `mesh.dnsServers` into the
//! Snapshot's egress registry. The fields `compile::build_registry` already checks (hosts,
//! resolution, location, port numbers, STATIC addresses) are not reported twice here.
//! Never resolves a name: DNS names become shared handles the refresher keeps fresh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::error::ConfigError;
use super::load::Document;
use crate::egress::{
    dns, EgressRegistry, Endpoint, Location, OutboundPolicy, Protocol, RegisteredHost,
    RegisteredPort, Resolution, Upstream,
};
use crate::routing::HostMatcher;

pub(super) fn registry(doc: &Document, errors: &mut Vec<ConfigError>) -> EgressRegistry {
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
            None => errors.push(doc.mesh.origin.error(
                &format!(".dnsServers[{i}]"),
                format!("{s:?} is not an IP address or IP:port"),
            )),
        }
    }

    let mut hosts = HostMatcher::default();
    let mut addresses = Vec::new();
    for se in &doc.service_entries {
        let (s, o) = (&se.spec, &se.origin);
        let name = format!("{}/{}", s.namespace.as_deref().unwrap_or("default"), s.name);
        let resolution = match s.resolution.as_deref() {
            Some("STATIC") => Resolution::Static,
            Some("DNS") => Resolution::Dns,
            Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
            _ => Resolution::None,
        };
        let location = match s.location.as_deref() {
            Some("MESH_INTERNAL") => Location::MeshInternal,
            _ => Location::MeshExternal,
        };
        for (j, ep) in s.endpoints.iter().enumerate() {
            if ep.address.starts_with("unix://") {
                errors.push(o.error(
                    &format!(".endpoints[{j}].address"),
                    "unix:// endpoints are not supported",
                ));
            }
        }
        let mut nets = Vec::new();
        for (j, a) in s.addresses.iter().enumerate() {
            match a
                .parse::<ipnet::IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(net) => nets.push(net),
                Err(_) => errors.push(o.error(
                    &format!(".addresses[{j}]"),
                    format!("{a:?} is not an IP address or CIDR"),
                )),
            }
        }
        let mut first = None;
        for (j, h) in s.hosts.iter().enumerate() {
            let pattern = h.to_ascii_lowercase();
            if pattern == "*" {
                errors.push(o.error(
                    &format!(".hosts[{j}]"),
                    "`*` is not a host: register names or *.suffix wildcards",
                ));
                continue;
            }
            let mut ports = Vec::new();
            for (k, sp) in s.ports.iter().enumerate() {
                let Ok(number) = u16::try_from(sp.number) else {
                    continue; // reported by build_registry
                };
                if number == 0 {
                    continue;
                }
                let protocol = match sp.protocol.as_deref() {
                    Some(p) => match Protocol::parse(p) {
                        Some(p) => p,
                        None => {
                            errors.push(o.error(
                                &format!(".ports[{k}].protocol"),
                                format!("{p:?} is not HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP or TLS"),
                            ));
                            continue;
                        }
                    },
                    // Istio infers the protocol from a `proto-suffix` port name.
                    None => sp
                        .name
                        .as_deref()
                        .and_then(|n| Protocol::parse(n.split('-').next().unwrap_or(n)))
                        .unwrap_or(Protocol::Http),
                };
                let target = match sp.target_port.map(u16::try_from) {
                    None => number,
                    Some(Ok(t)) if t > 0 => t,
                    Some(_) => {
                        errors.push(
                            o.error(&format!(".ports[{k}].targetPort"), "port must be 1-65535"),
                        );
                        continue;
                    }
                };
                let endpoint_port = |ep: &super::schema::WorkloadEntry| {
                    sp.name
                        .as_ref()
                        .and_then(|n| ep.ports.get(n))
                        .and_then(|p| u16::try_from(*p).ok())
                        .unwrap_or(target)
                };
                let upstream = match resolution {
                    Resolution::None => Upstream::Requested(target),
                    Resolution::Static => Upstream::Endpoints(
                        s.endpoints
                            .iter()
                            .filter_map(|ep| {
                                let ip = ep.address.parse::<IpAddr>().ok()?;
                                Some(Endpoint::Addr(SocketAddr::new(ip, endpoint_port(ep))))
                            })
                            .collect(),
                    ),
                    Resolution::Dns | Resolution::DnsRoundRobin if s.endpoints.is_empty() => {
                        if pattern.starts_with('*') {
                            Upstream::Requested(target)
                        } else {
                            Upstream::Endpoints(vec![Endpoint::Name(dns::name(&pattern), target)])
                        }
                    }
                    Resolution::Dns | Resolution::DnsRoundRobin => Upstream::Endpoints(
                        s.endpoints
                            .iter()
                            .filter(|ep| !ep.address.starts_with("unix://"))
                            .map(|ep| match ep.address.parse::<IpAddr>() {
                                Ok(ip) => Endpoint::Addr(SocketAddr::new(ip, endpoint_port(ep))),
                                Err(_) => Endpoint::Name(
                                    dns::name(
                                        ep.address
                                            .trim_end_matches('.')
                                            .to_ascii_lowercase()
                                            .as_str(),
                                    ),
                                    endpoint_port(ep),
                                ),
                            })
                            .collect(),
                    ),
                };
                ports.push(RegisteredPort::new(number, protocol, upstream, &pattern));
            }
            let entry = Arc::new(RegisteredHost::new(
                pattern.clone(),
                name.clone(),
                location,
                resolution,
                ports,
            ));
            first.get_or_insert_with(|| entry.clone());
            // A host registered twice: the later ServiceEntry wins (warned by build_registry).
            hosts.insert(&pattern, entry);
        }
        if let Some(entry) = first {
            addresses.extend(nets.into_iter().map(|n| (n, entry.clone())));
        }
    }
    let mut registry = EgressRegistry::new(policy, hosts, Arc::new(dns::Resolver::new(servers)));
    registry.addresses = addresses;
    registry
}
