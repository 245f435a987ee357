//! Compiles the L4 side of the config: Gateway servers that pass TLS through or forward TCP,
//! and the VirtualService `tls` and `tcp` routes bound to them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::gateways::{GatewayInfo, ListenerBuild, ServerInfo};
use super::{gateway_ref, Cx};
use crate::config::load::Origin;
use crate::config::schema;
use crate::l4::{L4Destination, L4Kind, L4Route, SniRoute};
use crate::routing::host;

impl Cx {
    /// Whether a server of `protocol` is an L4 one. Reports the combinations Portico does
    /// not serve; `None` for HTTP servers and for errors.
    pub(super) fn l4_kind(
        &mut self,
        o: &Origin,
        at: &str,
        protocol: &str,
        tls: Option<&schema::ServerTls>,
    ) -> Option<L4Kind> {
        let mode = tls
            .and_then(|t| t.mode.as_deref())
            .map(str::to_ascii_uppercase);
        let kind = match (protocol, mode.as_deref()) {
            ("TCP", _) => L4Kind::Tcp,
            // Istio's default mode is PASSTHROUGH: a TLS server without one routes by SNI.
            ("TLS", None | Some("PASSTHROUGH" | "AUTO_PASSTHROUGH"))
            | ("HTTPS", Some("PASSTHROUGH" | "AUTO_PASSTHROUGH")) => L4Kind::Passthrough,
            ("TLS", Some(other)) => {
                self.err(
                    o,
                    &format!("{at}.tls.mode"),
                    format!("protocol TLS with mode {other} (terminating TLS for TCP) is not supported yet; use PASSTHROUGH, or protocol HTTPS to terminate HTTP"),
                );
                return None;
            }
            ("MONGO", _) => {
                self.err(
                    o,
                    &format!("{at}.port.protocol"),
                    "protocol MONGO is not supported; use TCP",
                );
                return None;
            }
            _ => return None,
        };
        if let Some(t) = tls {
            let set: Vec<&str> = [
                ("serverCertificate", t.server_certificate.is_some()),
                ("privateKey", t.private_key.is_some()),
                ("caCertificates", t.ca_certificates.is_some()),
                ("credentialName", t.credential_name.is_some()),
                ("minProtocolVersion", t.min_protocol_version.is_some()),
                ("maxProtocolVersion", t.max_protocol_version.is_some()),
                ("httpsRedirect", t.https_redirect),
                ("defaultCertificate", t.default_certificate),
                ("acme", t.acme.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
            .collect();
            if kind == L4Kind::Tcp {
                self.err(
                    o,
                    &format!("{at}.tls"),
                    "a TCP server forwards raw bytes and takes no tls block",
                );
                return None;
            }
            if !set.is_empty() {
                self.err(
                    o,
                    &format!("{at}.tls"),
                    format!(
                        "mode {} does not terminate TLS, so {} would be unused; remove it",
                        mode.as_deref().unwrap_or("PASSTHROUGH"),
                        set.join(", ")
                    ),
                );
                return None;
            }
        }
        Some(kind)
    }

    /// The names AUTO_PASSTHROUGH servers route, by port: for every known cluster (each
    /// port of each ServiceEntry host, without and with each DestinationRule subset, and
    /// the clusters routes name) the exact name `outbound_.<port>_.<subset>_.<host>`
    /// (Istio's SNI-DNAT cluster names) when a host of the server covers it, passed
    /// through to that cluster; and the server's hosts themselves, where any other name
    /// is a cluster that does not exist (`SniRoute::AutoUnknown`). Built at load: a
    /// connection is one lookup in the port's SNI table.
    pub(super) fn auto_passthrough(
        &mut self,
        gateways: &HashMap<String, GatewayInfo>,
    ) -> BTreeMap<u16, Vec<(String, SniRoute)>> {
        let mut servers: Vec<(&String, &ServerInfo)> = gateways
            .iter()
            .flat_map(|(k, g)| g.servers.iter().map(move |s| (k, s)))
            .filter(|(_, s)| s.auto_passthrough)
            .collect();
        let mut out: BTreeMap<u16, Vec<(String, SniRoute)>> = BTreeMap::new();
        let Some(&(_, first)) = servers.first() else {
            return out;
        };
        servers.sort_by(|a, b| a.1.path.cmp(&b.1.path));
        let mut known: Vec<(String, u32, Option<String>)> = Vec::new();
        for se in &self.registry.services {
            for h in &se.hosts {
                if h.starts_with('*') {
                    continue;
                }
                let subsets: Vec<String> = self
                    .registry
                    .rules
                    .get(h)
                    .map(|r| r.spec.subsets.iter().map(|s| s.name.clone()).collect())
                    .unwrap_or_default();
                for p in &se.ports {
                    let number = u32::from(p.number);
                    known.push((h.clone(), number, None));
                    for s in &subsets {
                        known.push((h.clone(), number, Some(s.clone())));
                    }
                }
            }
        }
        // Clusters of services no route names: their warnings (no endpoints) are not news.
        let warnings = self.warnings.len();
        let origin = first.origin.clone();
        let at = first
            .path
            .strip_prefix(&origin.path)
            .unwrap_or("")
            .to_string();
        for (host, number, subset) in known {
            let d = schema::Destination {
                host,
                subset,
                port: Some(schema::PortSelector { number }),
            };
            self.cluster(&origin, &at, &d);
        }
        self.warnings.truncate(warnings);
        // One route per cluster, shared by the servers that route its name.
        let mut routes: HashMap<String, Arc<L4Route>> = HashMap::new();
        for (k, s) in servers {
            let entries = out.entry(s.port).or_default();
            for c in self.clusters.values() {
                let name = format!(
                    "outbound_.{}_.{}_.{}",
                    c.port,
                    c.subset.as_deref().unwrap_or(""),
                    c.host
                );
                if !s.hosts.iter().any(|h| host::covers(h, &name)) {
                    continue;
                }
                let route = routes
                    .entry(name.clone())
                    .or_insert_with(|| {
                        Arc::new(L4Route {
                            origin: format!("{k} AUTO_PASSTHROUGH {}", c.name),
                            destinations: vec![L4Destination {
                                cluster: c.clone(),
                                weight: 1,
                            }],
                            total_weight: 1,
                        })
                    })
                    .clone();
                entries.push((name, SniRoute::Pass(route)));
            }
            for h in &s.hosts {
                entries.push((h.clone(), SniRoute::AutoUnknown));
            }
        }
        out
    }

    /// Binds the `tls` and `tcp` routes of one VirtualService to the L4 listeners of its
    /// gateways (`bound`, or a match's own `gateways`).
    pub(super) fn l4_routes(
        &mut self,
        o: &Origin,
        vs_key: &str,
        v: &schema::VirtualService,
        bound: &[String],
        gateways: &HashMap<String, GatewayInfo>,
        listeners: &mut BTreeMap<u16, ListenerBuild>,
    ) {
        let ns = v.namespace.clone().unwrap_or_else(|| "default".into());
        let vs_hosts: Vec<String> = v.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        for (ri, r) in v.tls.iter().enumerate() {
            let at = format!(".tls[{ri}]");
            let errors_before = self.errors.len();
            if r.matches.is_empty() {
                self.err(
                    o,
                    &format!("{at}.match"),
                    "a tls route needs a match with sniHosts",
                );
            }
            let mut binds = Vec::new();
            for (mi, m) in r.matches.iter().enumerate() {
                let here = format!("{at}.match[{mi}]");
                self.no_selectors(
                    o,
                    &here,
                    &m.destination_subnets,
                    None,
                    &m.source_labels,
                    &m.source_namespace,
                );
                if m.sni_hosts.is_empty() {
                    self.err(o, &format!("{here}.sniHosts"), "sniHosts is required");
                }
                let mut snis = Vec::new();
                for (hi, h) in m.sni_hosts.iter().enumerate() {
                    let h = h.to_ascii_lowercase();
                    if !vs_hosts.iter().any(|vh| host::covers(vh, &h)) {
                        self.err(
                            o,
                            &format!("{here}.sniHosts[{hi}]"),
                            format!(
                                "{h} is not within the VirtualService hosts [{}]",
                                vs_hosts.join(", ")
                            ),
                        );
                        continue;
                    }
                    snis.push(h);
                }
                let port = self.match_port(o, &here, m.port);
                let gws = self.match_gateways(o, &here, &ns, &m.gateways, bound, gateways);
                binds.push((snis, port, gws));
            }
            let Some(route) = self.l4_route(o, &at, vs_key, &r.route, errors_before) else {
                continue;
            };
            let mut used = false;
            for (snis, port, gws) in binds {
                for s in gws
                    .iter()
                    .filter_map(|gk| gateways.get(gk))
                    .flat_map(|g| g.servers.iter())
                    .filter(|s| s.l4 == Some(L4Kind::Passthrough))
                    .filter(|s| port.is_none_or(|p| p == s.port))
                {
                    let Some(l) = listeners.get_mut(&s.port) else {
                        continue;
                    };
                    if l.l4 != Some(L4Kind::Passthrough) {
                        continue;
                    }
                    for sh in &s.hosts {
                        for sni in &snis {
                            let Some(name) = host::intersect(sh, sni) else {
                                continue;
                            };
                            used = true;
                            match l.sni.get_pattern(name) {
                                None => {
                                    Arc::make_mut(&mut l.sni)
                                        .insert(name, SniRoute::Pass(route.clone()));
                                }
                                Some(SniRoute::Pass(first)) if Arc::ptr_eq(first, &route) => {}
                                Some(SniRoute::Pass(first)) => {
                                    let first = first.origin.clone();
                                    self.warn(
                                        o,
                                        &at,
                                        format!("SNI {name} on port {} is already routed by {first}, which comes first; this route never sees it", s.port),
                                    );
                                }
                                // Only the Snapshot's tables hold these, not a build's.
                                Some(SniRoute::AutoUnknown) => {}
                                Some(SniRoute::Terminate) => self.err(
                                    o,
                                    &at,
                                    format!("SNI {name} on port {} is terminated by an HTTPS server there; it cannot also be passed through", s.port),
                                ),
                            }
                        }
                    }
                }
            }
            if !used {
                self.warn(
                    o,
                    &at,
                    "binds to no PASSTHROUGH server of its gateways (check gateways, port and sniHosts against the servers' hosts)",
                );
            }
        }
        for (ri, r) in v.tcp.iter().enumerate() {
            let at = format!(".tcp[{ri}]");
            let errors_before = self.errors.len();
            let mut binds = Vec::new();
            for (mi, m) in r.matches.iter().enumerate() {
                let here = format!("{at}.match[{mi}]");
                self.no_selectors(
                    o,
                    &here,
                    &m.destination_subnets,
                    m.source_subnet.as_deref(),
                    &m.source_labels,
                    &m.source_namespace,
                );
                let port = self.match_port(o, &here, m.port);
                let gws = self.match_gateways(o, &here, &ns, &m.gateways, bound, gateways);
                binds.push((port, gws));
            }
            if r.matches.is_empty() {
                binds.push((None, bound.to_vec()));
            }
            let Some(route) = self.l4_route(o, &at, vs_key, &r.route, errors_before) else {
                continue;
            };
            let mut used = false;
            for (port, gws) in binds {
                for s in gws
                    .iter()
                    .filter_map(|gk| gateways.get(gk))
                    .flat_map(|g| g.servers.iter())
                    .filter(|s| s.l4 == Some(L4Kind::Tcp))
                    .filter(|s| port.is_none_or(|p| p == s.port))
                {
                    let Some(l) = listeners.get_mut(&s.port) else {
                        continue;
                    };
                    if l.l4 != Some(L4Kind::Tcp) {
                        continue;
                    }
                    used = true;
                    match &l.tcp {
                        None => l.tcp = Some(route.clone()),
                        Some(first) if Arc::ptr_eq(first, &route) => {}
                        Some(first) => {
                            let first = first.origin.clone();
                            self.warn(
                                o,
                                &at,
                                format!("port {} is already routed by {first}, which comes first; this route never sees a connection", s.port),
                            );
                        }
                    }
                }
            }
            if !used {
                self.warn(
                    o,
                    &at,
                    "binds to no TCP server of its gateways (check gateways and port)",
                );
            }
        }
    }

    /// Match fields that select sidecars or match destinations Portico cannot see are
    /// errors, not silently ignored.
    fn no_selectors(
        &mut self,
        o: &Origin,
        at: &str,
        destination_subnets: &[String],
        source_subnet: Option<&str>,
        source_labels: &BTreeMap<String, String>,
        source_namespace: &Option<String>,
    ) {
        if !destination_subnets.is_empty() {
            self.err(
                o,
                &format!("{at}.destinationSubnets"),
                "destinationSubnets is not supported: a gateway listener's destination is itself",
            );
        }
        if source_subnet.is_some() {
            self.err(
                o,
                &format!("{at}.sourceSubnet"),
                "sourceSubnet is not supported",
            );
        }
        if !source_labels.is_empty() || source_namespace.is_some() {
            self.err(
                o,
                at,
                "sourceLabels and sourceNamespace select sidecars; they do not apply at a gateway",
            );
        }
    }

    fn match_port(&mut self, o: &Origin, at: &str, port: Option<u32>) -> Option<u16> {
        let p = port?;
        match u16::try_from(p) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.err(o, &format!("{at}.port"), "port must be 1-65535");
                None
            }
        }
    }

    /// A match's own `gateways` replace the VirtualService's.
    fn match_gateways(
        &mut self,
        o: &Origin,
        at: &str,
        ns: &str,
        own: &[String],
        bound: &[String],
        gateways: &HashMap<String, GatewayInfo>,
    ) -> Vec<String> {
        if own.is_empty() {
            return bound.to_vec();
        }
        let mut out = Vec::new();
        for (gi, g) in own.iter().enumerate() {
            if g == "mesh" {
                continue;
            }
            let gk = gateway_ref(g, ns);
            if gateways.contains_key(&gk) {
                out.push(gk);
            } else {
                self.err(
                    o,
                    &format!("{at}.gateways[{gi}]"),
                    format!("gateway {gk} is not defined"),
                );
            }
        }
        out
    }

    /// The compiled route of `tls[i]` / `tcp[i]` at `at`, or `None` when it (or anything
    /// reported since `errors_before`) is in error.
    fn l4_route(
        &mut self,
        o: &Origin,
        at: &str,
        vs_key: &str,
        route: &[schema::RouteDestination],
        errors_before: usize,
    ) -> Option<Arc<L4Route>> {
        let dests = self.l4_destinations(o, at, route);
        if self.errors.len() > errors_before {
            return None;
        }
        let (destinations, total_weight) = dests?;
        Some(Arc::new(L4Route {
            origin: format!("{vs_key}{at}"),
            destinations,
            total_weight,
        }))
    }

    /// Weighted L4 destinations; they resolve to the same clusters HTTP routes use.
    fn l4_destinations(
        &mut self,
        o: &Origin,
        at: &str,
        route: &[schema::RouteDestination],
    ) -> Option<(Vec<L4Destination>, u32)> {
        if route.is_empty() {
            self.err(
                o,
                &format!("{at}.route"),
                "a route needs at least one destination",
            );
            return None;
        }
        let several = route.len() > 1;
        let mut out = Vec::new();
        let mut ok = true;
        for (di, d) in route.iter().enumerate() {
            let here = format!("{at}.route[{di}]");
            let Some(weight) = self.weight(o, &here, d.weight) else {
                ok = false;
                continue;
            };
            let Some(cluster) = self.cluster(o, &format!("{here}.destination"), &d.destination)
            else {
                ok = false;
                continue;
            };
            if several && weight == 0 {
                continue;
            }
            out.push(L4Destination {
                cluster,
                weight: if several { weight } else { 1 },
            });
        }
        if !ok {
            return None;
        }
        let total = self.total_weight(o, at, out.iter().map(|d| d.weight))?;
        Some((out, total))
    }
}
