//! The registry route destinations are looked up in: ServiceEntries by host (exact and
//! wildcard) and DestinationRules by host, each checked here once (hosts, resolution,
//! location, ports, STATIC addresses; subsets and traffic policies). Builds no cluster
//! (`clusters` does, from what this finds) and resolves no name.

use std::collections::HashMap;
use std::net::IpAddr;

use http::HeaderName;

use super::Cx;
use crate::config::load::{Document, Item, Origin};
use crate::config::schema;
use crate::routing::HostMatcher;

#[derive(Default)]
pub(super) struct Registry {
    pub(super) entries_exact: HashMap<String, usize>,
    pub(super) entries_wild: HostMatcher<usize>,
    pub(super) entries: Vec<Item<schema::ServiceEntry>>,
    pub(super) rules: HashMap<String, Item<schema::DestinationRule>>,
}

impl Cx {
    pub(super) fn build_registry(&mut self, doc: &Document) -> Registry {
        let mut r = Registry::default();
        for (i, se) in doc.service_entries.iter().enumerate() {
            let (s, o) = (&se.spec, &se.origin);
            if s.hosts.is_empty() {
                self.err(o, ".hosts", "a ServiceEntry needs at least one host");
            }
            match s.resolution.as_deref() {
                None | Some("NONE") | Some("STATIC") | Some("DNS") | Some("DNS_ROUND_ROBIN") => {}
                Some(other) => self.err(
                    o,
                    ".resolution",
                    format!("{other:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
                ),
            }
            match s.location.as_deref() {
                None | Some("MESH_EXTERNAL") | Some("MESH_INTERNAL") => {}
                Some(other) => self.err(
                    o,
                    ".location",
                    format!("{other:?} is not MESH_EXTERNAL or MESH_INTERNAL"),
                ),
            }
            for (j, p) in s.ports.iter().enumerate() {
                if p.number == 0 || p.number > 65535 {
                    self.err(o, &format!(".ports[{j}].number"), "port must be 1-65535");
                }
            }
            if s.resolution.as_deref() == Some("STATIC") {
                for (j, ep) in s.endpoints.iter().enumerate() {
                    if ep.address.parse::<IpAddr>().is_err() {
                        self.err(
                            o,
                            &format!(".endpoints[{j}].address"),
                            format!("{:?} is not an IP address (resolution STATIC)", ep.address),
                        );
                    }
                }
            }
            for (j, h) in s.hosts.iter().enumerate() {
                let h = h.to_ascii_lowercase();
                let dup = if h.starts_with('*') {
                    r.entries_wild.insert(&h, i).is_some()
                } else {
                    r.entries_exact.insert(h.clone(), i).is_some()
                };
                if dup {
                    self.warn(
                        o,
                        &format!(".hosts[{j}]"),
                        format!("host {h} is already registered by another ServiceEntry; the later one wins"),
                    );
                }
            }
            r.entries.push(se.clone());
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
