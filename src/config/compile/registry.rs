//! The registry route destinations are looked up in: ServiceEntries by host (exact and
//! wildcard) and DestinationRules by host, each checked here once (hosts, resolution,
//! location, addresses, ports and their protocols, endpoints; subsets and traffic
//! policies). ServiceEntries are compiled here into `Service`s, which the egress registry
//! (`egress`), the clusters (`clusters`) and AUTO_PASSTHROUGH (`l4`) read: none of them
//! reads the ServiceEntry schema again. Builds no cluster and resolves no name.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;

use super::Cx;
use crate::config::load::{Document, Item, Origin};
use crate::config::schema;
use crate::egress::{Location, Protocol, Resolution};
use crate::routing::HostMatcher;

/// ServiceEntries (compiled) and DestinationRules, by host.
#[derive(Default)]
pub(super) struct Registry {
    /// In the order of the config; a host registered twice is the later one's.
    pub(super) services: Vec<Arc<Service>>,
    exact: HashMap<String, usize>,
    wild: HostMatcher<usize>,
    pub(super) rules: HashMap<String, Item<schema::DestinationRule>>,
}

impl Registry {
    /// The ServiceEntry that registers `host` (lower case): exact names first, then the
    /// longest wildcard.
    pub(super) fn service(&self, host: &str) -> Option<&Arc<Service>> {
        self.exact
            .get(host)
            .or_else(|| self.wild.lookup(host))
            .map(|i| &self.services[*i])
    }
}

/// One ServiceEntry, checked: only valid parts are kept (an invalid one is an error, so
/// a config holding one never serves).
#[derive(Debug)]
pub(super) struct Service {
    /// `name`, as error messages name the entry.
    pub(super) name: String,
    /// `<namespace>/<name>`, as the egress log names it.
    pub(super) qualified: String,
    /// Lower case, `*` left out (an error).
    pub(super) hosts: Vec<String>,
    pub(super) addresses: Vec<ipnet::IpNet>,
    pub(super) location: Location,
    pub(super) resolution: Resolution,
    pub(super) ports: Vec<ServicePort>,
    /// unix:// endpoints left out (an error).
    pub(super) endpoints: Vec<ServiceEndpoint>,
    /// The names an upstream certificate must carry one of, when a DestinationRule
    /// originating TLS to a host of this entry names none itself.
    pub(super) subject_alt_names: Vec<String>,
}

#[derive(Debug)]
pub(super) struct ServicePort {
    pub(super) number: u16,
    pub(super) name: Option<String>,
    /// As declared, else inferred from a `proto-suffix` port name (Istio), else HTTP.
    pub(super) protocol: Protocol,
    /// Declared HTTP2 or GRPC: clusters speak h2c to it.
    pub(super) h2c: bool,
    /// `targetPort`, else `number`.
    pub(super) target: u16,
}

impl ServicePort {
    /// The port of `ep` for this port: the endpoint's port of the same name, else the
    /// target port.
    pub(super) fn of(&self, ep: &ServiceEndpoint) -> u16 {
        self.name
            .as_ref()
            .and_then(|n| ep.ports.get(n))
            .copied()
            .unwrap_or(self.target)
    }
}

#[derive(Debug)]
pub(super) struct ServiceEndpoint {
    pub(super) address: EndpointAddress,
    pub(super) ports: BTreeMap<String, u16>,
    pub(super) labels: BTreeMap<String, String>,
}

#[derive(Debug)]
pub(super) enum EndpointAddress {
    Ip(IpAddr),
    /// Lower case, without a trailing dot (resolution DNS or DNS_ROUND_ROBIN).
    Name(String),
}

impl Cx {
    pub(super) fn build_registry(&mut self, doc: &Document) -> Registry {
        let mut r = Registry::default();
        for se in &doc.service_entries {
            let (s, o) = (&se.spec, &se.origin);
            let service = self.service(s, o);
            let i = r.services.len();
            for (j, h) in service.hosts.iter().enumerate() {
                let dup = if h.starts_with('*') {
                    r.wild.insert(h, i).is_some()
                } else {
                    r.exact.insert(h.clone(), i).is_some()
                };
                if dup {
                    self.warn(
                        o,
                        &format!(".hosts[{j}]"),
                        format!("host {h} is already registered by another ServiceEntry; the later one wins"),
                    );
                }
            }
            r.services.push(Arc::new(service));
        }
        for dr in &doc.destination_rules {
            let (s, o) = (&dr.spec, &dr.origin);
            if s.host.is_empty() {
                self.err(o, ".host", "a DestinationRule needs a host");
                continue;
            }
            let mut names = HashMap::new();
            for (j, sub) in s.subsets.iter().enumerate() {
                if names.insert(sub.name.clone(), j).is_some() {
                    self.err(
                        o,
                        &format!(".subsets[{j}].name"),
                        format!("duplicate subset {:?}", sub.name),
                    );
                }
            }
            if let Some(tp) = &s.traffic_policy {
                self.check_policy(o, ".trafficPolicy", tp);
            }
            for (j, sub) in s.subsets.iter().enumerate() {
                if let Some(tp) = &sub.traffic_policy {
                    self.check_policy(o, &format!(".subsets[{j}].trafficPolicy"), tp);
                }
            }
            let host = s.host.to_ascii_lowercase();
            if r.rules.insert(host.clone(), dr.clone()).is_some() {
                self.warn(
                    o,
                    ".host",
                    format!("another DestinationRule for {host} came first; this one replaces it"),
                );
            }
        }
        r
    }

    /// One ServiceEntry, checked and compiled.
    fn service(&mut self, s: &schema::ServiceEntry, o: &Origin) -> Service {
        if s.hosts.is_empty() {
            self.err(o, ".hosts", "a ServiceEntry needs at least one host");
        }
        let resolution = match s.resolution.as_deref() {
            None | Some("NONE") => Resolution::None,
            Some("STATIC") => Resolution::Static,
            Some("DNS") => Resolution::Dns,
            Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
            Some(other) => {
                self.err(
                    o,
                    ".resolution",
                    format!("{other:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
                );
                Resolution::None
            }
        };
        let location = match s.location.as_deref() {
            None | Some("MESH_EXTERNAL") => Location::MeshExternal,
            Some("MESH_INTERNAL") => Location::MeshInternal,
            Some(other) => {
                self.err(
                    o,
                    ".location",
                    format!("{other:?} is not MESH_EXTERNAL or MESH_INTERNAL"),
                );
                Location::MeshExternal
            }
        };
        let mut hosts = Vec::new();
        for (j, h) in s.hosts.iter().enumerate() {
            let h = h.to_ascii_lowercase();
            if h == "*" {
                self.err(
                    o,
                    &format!(".hosts[{j}]"),
                    "`*` is not a host: register names or *.suffix wildcards",
                );
                continue;
            }
            hosts.push(h);
        }
        let mut addresses = Vec::new();
        for (j, a) in s.addresses.iter().enumerate() {
            match a
                .parse::<ipnet::IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(net) => addresses.push(net),
                Err(_) => self.err(
                    o,
                    &format!(".addresses[{j}]"),
                    format!("{a:?} is not an IP address or CIDR"),
                ),
            }
        }
        let mut ports = Vec::new();
        for (k, sp) in s.ports.iter().enumerate() {
            let number = match u16::try_from(sp.number) {
                Ok(n) if n > 0 => n,
                _ => {
                    self.err(o, &format!(".ports[{k}].number"), "port must be 1-65535");
                    continue;
                }
            };
            let declared = match sp.protocol.as_deref() {
                Some(p) => match Protocol::parse(p) {
                    Some(p) => Some(p),
                    None => {
                        self.err(
                            o,
                            &format!(".ports[{k}].protocol"),
                            format!("{p:?} is not HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP or TLS"),
                        );
                        continue;
                    }
                },
                None => None,
            };
            // Istio infers the protocol from a `proto-suffix` port name.
            let protocol = declared.unwrap_or_else(|| {
                sp.name
                    .as_deref()
                    .and_then(|n| Protocol::parse(n.split('-').next().unwrap_or(n)))
                    .unwrap_or(Protocol::Http)
            });
            let target = match sp.target_port.map(u16::try_from) {
                None => number,
                Some(Ok(t)) if t > 0 => t,
                Some(_) => {
                    self.err(
                        o,
                        &format!(".ports[{k}].targetPort"),
                        "port must be 1-65535",
                    );
                    continue;
                }
            };
            ports.push(ServicePort {
                number,
                name: sp.name.clone(),
                protocol,
                h2c: matches!(declared, Some(Protocol::Http2 | Protocol::Grpc)),
                target,
            });
        }
        let mut endpoints = Vec::new();
        for (j, ep) in s.endpoints.iter().enumerate() {
            let at = format!(".endpoints[{j}]");
            let address = if ep.address.starts_with("unix://") {
                self.err(
                    o,
                    &format!("{at}.address"),
                    "unix:// endpoints are not supported",
                );
                continue;
            } else if let Ok(ip) = ep.address.parse::<IpAddr>() {
                EndpointAddress::Ip(ip)
            } else if resolution == Resolution::Static {
                self.err(
                    o,
                    &format!("{at}.address"),
                    format!("{:?} is not an IP address (resolution STATIC)", ep.address),
                );
                continue;
            } else {
                EndpointAddress::Name(ep.address.trim_end_matches('.').to_ascii_lowercase())
            };
            let mut ports = BTreeMap::new();
            for (name, p) in &ep.ports {
                match u16::try_from(*p) {
                    Ok(p) if p > 0 => {
                        ports.insert(name.clone(), p);
                    }
                    _ => self.err(o, &format!("{at}.ports.{name}"), "port must be 1-65535"),
                }
            }
            endpoints.push(ServiceEndpoint {
                address,
                ports,
                labels: ep.labels.clone(),
            });
        }
        for (j, n) in s.subject_alt_names.iter().enumerate() {
            if n.is_empty() {
                self.err(o, &format!(".subjectAltNames[{j}]"), "an empty name");
            }
        }
        Service {
            name: s.name.clone(),
            qualified: format!("{}/{}", s.namespace.as_deref().unwrap_or("default"), s.name),
            hosts,
            addresses,
            location,
            resolution,
            ports,
            endpoints,
            subject_alt_names: s.subject_alt_names.clone(),
        }
    }

    fn check_policy(&mut self, o: &Origin, at: &str, tp: &schema::TrafficPolicy) {
        self.check_policy_parts(
            o,
            at,
            tp.load_balancer.as_ref(),
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
        );
        if let Some(pp) = &tp.proxy_protocol {
            match pp.version.as_deref() {
                None | Some("V1") | Some("V2") => {}
                Some(other) => self.err(
                    o,
                    &format!("{at}.proxyProtocol.version"),
                    format!("{other:?} is not V1 or V2"),
                ),
            }
        }
        for (i, pl) in tp.port_level_settings.iter().enumerate() {
            let here = format!("{at}.portLevelSettings[{i}]");
            if pl.port.is_none() {
                self.err(o, &format!("{here}.port"), "portLevelSettings needs a port");
            }
            self.check_policy_parts(
                o,
                &here,
                pl.load_balancer.as_ref(),
                pl.connection_pool.as_ref(),
                pl.outlier_detection.as_ref(),
            );
        }
    }

    fn check_policy_parts(
        &mut self,
        o: &Origin,
        at: &str,
        lb: Option<&schema::LoadBalancerSettings>,
        cp: Option<&schema::ConnectionPool>,
        od: Option<&schema::OutlierDetection>,
    ) {
        if let Some(lb) = lb {
            let here = format!("{at}.loadBalancer");
            match (lb.simple.as_deref(), &lb.consistent_hash) {
                (Some(_), Some(_)) => self.err(o, &here, "simple and consistentHash are mutually exclusive"),
                (Some("ROUND_ROBIN" | "LEAST_REQUEST" | "LEAST_CONN" | "RANDOM" | "UNSPECIFIED" | "PEAK_EWMA"), None) | (None, None) => {}
                (Some(other), None) => self.err(
                    o,
                    &format!("{here}.simple"),
                    format!("{other:?} is not ROUND_ROBIN, LEAST_REQUEST, RANDOM or PEAK_EWMA (Portico extension)"),
                ),
                (None, Some(ch)) => {
                    let here = format!("{here}.consistentHash");
                    let sources = [
                        ch.http_header_name.is_some(),
                        ch.http_cookie.is_some(),
                        ch.use_source_ip == Some(true),
                        ch.http_query_parameter_name.is_some(),
                    ]
                    .iter()
                    .filter(|b| **b)
                    .count();
                    if sources != 1 {
                        self.err(o, &here, "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName");
                    }
                    if let Some(h) = &ch.http_header_name {
                        if HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).is_err() {
                            self.err(o, &format!("{here}.httpHeaderName"), format!("{h:?} is not a header name"));
                        }
                    }
                    if let Some(c) = &ch.http_cookie {
                        // The gateway writes them into a Set-Cookie field (RFC 6265 4.1.1).
                        let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
                        if c.name.is_empty() || !c.name.bytes().all(token) {
                            self.err(o, &format!("{here}.httpCookie.name"), format!("{:?} is not a cookie name", c.name));
                        }
                        if let Some(p) = &c.path {
                            if !p.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';') {
                                self.err(o, &format!("{here}.httpCookie.path"), format!("{p:?} is not a cookie path (visible ASCII, no ';')"));
                            }
                        }
                    }
                    if ch.ring_hash.is_some() && ch.maglev.is_some() {
                        self.err(o, &here, "ringHash and maglev are mutually exclusive");
                    }
                    if ch.minimum_ring_size.is_some() {
                        self.warn(o, &format!("{here}.minimumRingSize"), "deprecated: use ringHash.minimumRingSize");
                    }
                }
            }
        }
        if let Some(cp) = cp {
            let here = format!("{at}.connectionPool");
            if let Some(h) = &cp.http {
                match h.h2_upgrade_policy.as_deref() {
                    None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") | Some("UPGRADE") => {}
                    Some(other) => self.err(
                        o,
                        &format!("{here}.http.h2UpgradePolicy"),
                        format!("{other:?} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                    ),
                }
                if h.use_client_protocol.is_some() {
                    self.warn(
                        o,
                        &format!("{here}.http.useClientProtocol"),
                        "ignored: set h2UpgradePolicy to choose the upstream protocol",
                    );
                }
                if h.max_concurrent_streams.is_some() {
                    self.warn(
                        o,
                        &format!("{here}.http.maxConcurrentStreams"),
                        "ignored: Portico opens at most 100 streams per upstream h2 connection",
                    );
                }
            }
            if let Some(t) = &cp.tcp {
                if t.max_connection_duration.is_some() {
                    self.warn(
                        o,
                        &format!("{here}.tcp.maxConnectionDuration"),
                        "not enforced yet",
                    );
                }
                if t.idle_timeout.is_some() {
                    self.warn(
                        o,
                        &format!("{here}.tcp.idleTimeout"),
                        "applies to TCP and TLS passthrough connections only; for HTTP use http.idleTimeout",
                    );
                }
            }
        }
        if let Some(od) = od {
            let here = format!("{at}.outlierDetection");
            if od.consecutive_errors.is_some() {
                self.warn(
                    o,
                    &format!("{here}.consecutiveErrors"),
                    "deprecated and ignored, as in Istio: consecutive5xxErrors (default 5) applies",
                );
            }
            if od.split_external_local_origin_errors.is_some()
                || od.consecutive_local_origin_failures.is_some()
            {
                self.warn(o, &here, "splitExternalLocalOriginErrors / consecutiveLocalOriginFailures are not supported: connection failures count as 5xx and gateway errors");
            }
            if od.max_ejection_percent.is_some_and(|p| p > 100) {
                self.err(o, &format!("{here}.maxEjectionPercent"), "must be 0-100");
            }
            if od.min_health_percent.is_some_and(|p| p > 100) {
                self.err(o, &format!("{here}.minHealthPercent"), "must be 0-100");
            }
        }
    }
}
