//! Compile: the only place a string from the config becomes a type. Turns a loaded
//! Document into a Snapshot, collecting every error (with its location) rather than
//! stopping at the first. May read certificate files and resolve DNS names; never opens a
//! listening socket.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use regex::Regex;

use super::error::ConfigError;
use super::load::{Document, Item, Origin};
use super::schema::{self, StringMatch};
use crate::routing::route::{RouteOrigin, WeightedDestination};
use crate::routing::{
    host, Action, DirectResponse, Forward, HeaderOps, HeaderRules, HostMatcher, Redirect,
    RequestMatch, Rewrite, Route, RouteTable, ServerPolicy, StrMatch, VirtualHost,
};
use crate::snapshot::{Listener, Settings, Snapshot, Summary};
use crate::tls::{self, CertStore, ServerCert};
use crate::upstream::{cluster_name, Cluster, ClusterSettings, Endpoint};

pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub generation: u64,
    /// With `mesh.selfSignedWhenMissing`, write self-signed certificates for missing
    /// credentials. `validate` leaves this off so it never writes files.
    pub generate_missing_certs: bool,
}

pub struct Compiled {
    pub snapshot: Snapshot,
    pub warnings: Vec<ConfigError>,
}

pub fn compile(doc: &Document, opts: &Options) -> Result<Compiled, Vec<ConfigError>> {
    let mut cx = Cx {
        errors: Vec::new(),
        warnings: Vec::new(),
        watched: doc
            .files
            .iter()
            .map(|f| f.path.clone())
            .chain(doc.include_dirs.iter().cloned())
            .collect(),
        clusters: BTreeMap::new(),
        registry: Registry::default(),
        settings: None,
        opts: opts.clone(),
    };
    let settings = cx.mesh(doc);
    cx.settings = Some(settings.clone());
    cx.registry = cx.build_registry(doc);
    let gateways = cx.gateways(doc);
    let mut listeners = cx.listeners(&gateways);
    let routes = cx.virtual_services(doc, &gateways, &mut listeners);

    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    let mut hosts = 0;
    let listeners: Vec<Listener> = listeners
        .into_values()
        .map(|b| {
            let mut vhosts = HostMatcher::default();
            for (domain, build) in b.vhosts {
                let mut routes = build.routes;
                if build.sources > 1 {
                    // Istio's SortVHostRoutes: merged catch-all routes go last.
                    routes.sort_by_key(|r| r.is_catch_all());
                }
                hosts += 1;
                vhosts.insert(
                    &domain,
                    Arc::new(VirtualHost {
                        domain: domain.clone(),
                        routes,
                    }),
                );
            }
            Listener {
                addr: b.addr,
                tls: b.tls,
                h2c: b.h2c,
                table: RouteTable {
                    servers: b.servers,
                    vhosts,
                },
                certs: b.tls.then_some(b.certs),
            }
        })
        .collect();
    let clusters: Vec<Arc<Cluster>> = cx.clusters.into_values().collect();
    let mut watched = cx.watched;
    watched.sort();
    watched.dedup();
    let summary = Summary {
        gateways: doc.gateways.len(),
        hosts,
        routes,
        clusters: clusters.len(),
    };
    Ok(Compiled {
        snapshot: Snapshot {
            generation: opts.generation,
            files: doc.files.iter().map(|f| f.path.clone()).collect(),
            watched,
            listeners,
            clusters,
            settings,
            summary,
        },
        warnings: cx.warnings,
    })
}

struct Cx {
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    watched: Vec<PathBuf>,
    clusters: BTreeMap<String, Arc<Cluster>>,
    registry: Registry,
    settings: Option<Settings>,
    opts: Options,
}

#[derive(Default)]
struct Registry {
    entries_exact: HashMap<String, usize>,
    entries_wild: HostMatcher<usize>,
    entries: Vec<Item<schema::ServiceEntry>>,
    rules: HashMap<String, Item<schema::DestinationRule>>,
}

struct GatewayInfo {
    servers: Vec<ServerInfo>,
}

struct ServerInfo {
    port: u16,
    bind: IpAddr,
    tls: bool,
    h2c: bool,
    hosts: Vec<String>,
    https_redirect: bool,
    cert: Option<Arc<ServerCert>>,
    default_cert: bool,
    origin: Origin,
    path: String,
}

struct ListenerBuild {
    addr: SocketAddr,
    tls: bool,
    h2c: bool,
    servers: HostMatcher<ServerPolicy>,
    certs: CertStore,
    default_from: Option<String>,
    vhosts: BTreeMap<String, VhostBuild>,
}

#[derive(Default)]
struct VhostBuild {
    routes: Vec<Arc<Route>>,
    sources: usize,
}

fn key(namespace: &Option<String>, name: &str) -> String {
    format!("{}/{}", namespace.as_deref().unwrap_or("default"), name)
}

impl Cx {
    fn err(&mut self, origin: &Origin, sub: &str, msg: impl Into<String>) {
        self.errors.push(origin.error(sub, msg));
    }

    fn warn(&mut self, origin: &Origin, sub: &str, msg: impl Into<String>) {
        self.warnings.push(origin.error(sub, msg));
    }

    fn mesh(&mut self, doc: &Document) -> Settings {
        let m = &doc.mesh.spec;
        let o = &doc.mesh.origin;
        let admin_text = m.admin.as_deref().unwrap_or(DEFAULT_ADMIN);
        let admin = match admin_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    o,
                    ".admin",
                    format!("{admin_text:?} is not an IP:port address"),
                );
                SocketAddr::from(([127, 0, 0, 1], 15000))
            }
        };
        if let Some(p) = &m.outbound_traffic_policy {
            match p.mode.as_deref() {
                None | Some("REGISTRY_ONLY") | Some("ALLOW_ANY") => {}
                Some(other) => self.err(
                    o,
                    ".outboundTrafficPolicy.mode",
                    format!("{other:?} is not REGISTRY_ONLY or ALLOW_ANY"),
                ),
            }
        }
        Settings {
            admin,
            connect_timeout: m
                .connect_timeout
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(10)),
            tls_handshake_timeout: m
                .tls_handshake_timeout
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(10)),
            reload_poll_interval: m
                .reload_poll_interval
                .map(|d| d.get().max(Duration::from_millis(10)))
                .unwrap_or(Duration::from_millis(500)),
            drain_duration: m
                .drain_duration
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(5)),
        }
    }

    fn credentials_dir(doc: &Document) -> PathBuf {
        match &doc.mesh.spec.credentials_dir {
            Some(d) => doc.main.resolve(d),
            None => doc.main.dir().join("certs"),
        }
    }

    fn build_registry(&mut self, doc: &Document) -> Registry {
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
        if let Some(h) = tp.connection_pool.as_ref().and_then(|c| c.http.as_ref()) {
            match h.h2_upgrade_policy.as_deref() {
                None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") | Some("UPGRADE") => {}
                Some(other) => self.err(
                    o,
                    &format!("{at}.connectionPool.http.h2UpgradePolicy"),
                    format!("{other:?} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                ),
            }
        }
    }

    fn gateways(&mut self, doc: &Document) -> HashMap<String, GatewayInfo> {
        let creds = Self::credentials_dir(doc);
        let self_signed = doc.mesh.spec.self_signed_when_missing.unwrap_or(false);
        let mut out = HashMap::new();
        for (gi, gw) in doc.gateways.iter().enumerate() {
            let (g, o) = (&gw.spec, &gw.origin);
            let k = key(&g.namespace, &g.name);
            if g.servers.is_empty() {
                self.err(o, ".servers", "a Gateway needs at least one server");
            }
            let mut servers = Vec::new();
            for (si, s) in g.servers.iter().enumerate() {
                let at = format!(".servers[{si}]");
                if let Some(info) = self.server(o, &at, s, &creds, self_signed) {
                    servers.push(info);
                }
            }
            if out.insert(k.clone(), GatewayInfo { servers }).is_some() {
                self.err(
                    o,
                    ".name",
                    format!("gateway {k} is defined twice (gateways[{gi}])"),
                );
            }
        }
        out
    }

    fn server(
        &mut self,
        o: &Origin,
        at: &str,
        s: &schema::Server,
        creds: &Path,
        self_signed: bool,
    ) -> Option<ServerInfo> {
        let port = match u16::try_from(s.port.number) {
            Ok(p) if p > 0 => p,
            _ => {
                self.err(o, &format!("{at}.port.number"), "port must be 1-65535");
                return None;
            }
        };
        let protocol = s
            .port
            .protocol
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_uppercase();
        let (tls, h2c) = match protocol.as_str() {
            "HTTP" | "GRPC-WEB" => (false, false),
            "HTTP2" | "GRPC" => (false, true),
            "HTTPS" => (true, false),
            "TCP" | "TLS" | "MONGO" => {
                self.err(
                    o,
                    &format!("{at}.port.protocol"),
                    format!("protocol {protocol} is not supported yet: Portico serves HTTP and HTTPS servers"),
                );
                return None;
            }
            other => {
                self.err(
                    o,
                    &format!("{at}.port.protocol"),
                    format!("unknown protocol {other:?}"),
                );
                return None;
            }
        };
        let bind = match &s.bind {
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(b) => match b.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    self.err(
                        o,
                        &format!("{at}.bind"),
                        format!("{b:?} is not an IP address"),
                    );
                    return None;
                }
            },
        };
        if s.hosts.is_empty() {
            self.err(
                o,
                &format!("{at}.hosts"),
                "a server needs at least one host",
            );
        }
        let hosts: Vec<String> = s
            .hosts
            .iter()
            .map(|h| {
                // `namespace/host`: Portico has no namespaces to scope by; the host counts.
                let h = h.rsplit('/').next().unwrap_or(h);
                h.to_ascii_lowercase()
            })
            .collect();
        let mut info = ServerInfo {
            port,
            bind,
            tls,
            h2c,
            hosts,
            https_redirect: false,
            cert: None,
            default_cert: false,
            origin: o.clone(),
            path: format!("{}{at}", o.path),
        };
        match (&s.tls, tls) {
            (None, true) => {
                self.err(o, at, "an HTTPS server needs a tls block");
                return None;
            }
            (None, false) => {}
            (Some(t), false) => {
                let only_redirect = t.mode.is_none()
                    && t.server_certificate.is_none()
                    && t.private_key.is_none()
                    && t.credential_name.is_none();
                if !only_redirect || !t.https_redirect {
                    self.err(
                        o,
                        &format!("{at}.tls"),
                        "a plain-text HTTP server cannot have TLS settings other than httpsRedirect",
                    );
                }
                info.https_redirect = t.https_redirect;
            }
            (Some(t), true) => {
                if t.https_redirect {
                    self.warn(
                        o,
                        &format!("{at}.tls.httpsRedirect"),
                        "ignored on an HTTPS server",
                    );
                }
                info.default_cert = t.default_certificate || info.hosts.iter().any(|h| h == "*");
                info.cert =
                    self.server_cert(o, &format!("{at}.tls"), t, &info.hosts, creds, self_signed);
            }
        }
        Some(info)
    }

    fn server_cert(
        &mut self,
        o: &Origin,
        at: &str,
        t: &schema::ServerTls,
        hosts: &[String],
        creds: &Path,
        self_signed: bool,
    ) -> Option<Arc<ServerCert>> {
        match t.mode.as_deref() {
            Some("SIMPLE") => {}
            None => {
                self.err(
                    o,
                    &format!("{at}.mode"),
                    "tls.mode defaults to PASSTHROUGH in Istio; set mode = \"SIMPLE\" to terminate TLS (PASSTHROUGH is not supported yet)",
                );
                return None;
            }
            Some(
                m @ ("PASSTHROUGH" | "MUTUAL" | "OPTIONAL_MUTUAL" | "ISTIO_MUTUAL"
                | "AUTO_PASSTHROUGH"),
            ) => {
                self.err(
                    o,
                    &format!("{at}.mode"),
                    format!("tls.mode {m} is not supported yet; use SIMPLE"),
                );
                return None;
            }
            Some(m) => {
                self.err(o, &format!("{at}.mode"), format!("unknown tls.mode {m:?}"));
                return None;
            }
        }
        let require_tls13 = match t.min_protocol_version.as_deref() {
            None | Some("TLS_AUTO") | Some("TLSV1_2") => false,
            Some("TLSV1_3") => true,
            Some(v @ ("TLSV1_0" | "TLSV1_1")) => {
                self.err(
                    o,
                    &format!("{at}.minProtocolVersion"),
                    format!("{v} is not supported: Portico speaks TLS 1.2 and 1.3 only"),
                );
                false
            }
            Some(v) => {
                self.err(
                    o,
                    &format!("{at}.minProtocolVersion"),
                    format!("unknown TLS version {v:?}"),
                );
                false
            }
        };
        match t.max_protocol_version.as_deref() {
            None | Some("TLS_AUTO") | Some("TLSV1_3") => {}
            Some(v) => self.err(
                o,
                &format!("{at}.maxProtocolVersion"),
                format!("{v} is not supported: the maximum is always TLS 1.3"),
            ),
        }
        if t.ca_certificates.is_some() {
            self.err(
                o,
                &format!("{at}.caCertificates"),
                "client certificates (MUTUAL) are not supported yet",
            );
        }
        let (cert_path, key_path, field) =
            match (&t.credential_name, &t.server_certificate, &t.private_key) {
                (Some(name), None, None) => {
                    let dir = creds.join(name);
                    (dir.join("tls.crt"), dir.join("tls.key"), ".credentialName")
                }
                (None, Some(c), Some(k)) => {
                    (o.file.resolve(c), o.file.resolve(k), ".serverCertificate")
                }
                (None, Some(_), None) => {
                    self.err(
                        o,
                        &format!("{at}.privateKey"),
                        "serverCertificate needs privateKey",
                    );
                    return None;
                }
                (None, None, Some(_)) => {
                    self.err(
                        o,
                        &format!("{at}.serverCertificate"),
                        "privateKey needs serverCertificate",
                    );
                    return None;
                }
                (None, None, None) => {
                    self.err(
                        o,
                        at,
                        "set credentialName, or serverCertificate and privateKey",
                    );
                    return None;
                }
                (Some(_), _, _) => {
                    self.err(
                        o,
                        &format!("{at}.credentialName"),
                        "set credentialName or serverCertificate/privateKey, not both",
                    );
                    return None;
                }
            };
        self.watched.push(cert_path.clone());
        self.watched.push(key_path.clone());
        let missing = !cert_path.exists() || !key_path.exists();
        if missing && self_signed {
            if self.opts.generate_missing_certs {
                match tls::generate_self_signed(&cert_path, &key_path, hosts) {
                    Ok(()) => tracing::warn!(
                        cert = %cert_path.display(),
                        "generated a self-signed certificate for a missing credential (mesh.selfSignedWhenMissing)"
                    ),
                    Err(e) => {
                        self.err(o, &format!("{at}{field}"), e);
                        return None;
                    }
                }
            } else {
                self.warn(
                    o,
                    &format!("{at}{field}"),
                    format!(
                        "{} is missing; `portico run` will generate a self-signed certificate",
                        cert_path.display()
                    ),
                );
                return None;
            }
        }
        match tls::load_pair(&cert_path, &key_path) {
            Ok((key, not_after, subject)) => Some(Arc::new(ServerCert {
                key: Arc::new(key),
                require_tls13,
                cert_path,
                not_after,
                subject,
            })),
            Err(e) => {
                self.err(o, &format!("{at}{field}"), e);
                None
            }
        }
    }

    fn listeners(
        &mut self,
        gateways: &HashMap<String, GatewayInfo>,
    ) -> BTreeMap<u16, ListenerBuild> {
        let mut out: BTreeMap<u16, ListenerBuild> = BTreeMap::new();
        let mut claimed: HashMap<(u16, String), String> = HashMap::new();
        let mut all: Vec<&ServerInfo> = gateways.values().flat_map(|g| g.servers.iter()).collect();
        all.sort_by(|a, b| a.path.cmp(&b.path));
        for s in all {
            let at = s
                .path
                .strip_prefix(&s.origin.path)
                .unwrap_or("")
                .to_string();
            let l = out.entry(s.port).or_insert_with(|| ListenerBuild {
                addr: SocketAddr::new(s.bind, s.port),
                tls: s.tls,
                h2c: s.h2c,
                servers: HostMatcher::default(),
                certs: CertStore::default(),
                default_from: None,
                vhosts: BTreeMap::new(),
            });
            if l.addr.ip() != s.bind {
                self.err(
                    &s.origin,
                    &format!("{at}.bind"),
                    format!(
                        "port {} is already bound to {} by another server",
                        s.port,
                        l.addr.ip()
                    ),
                );
                continue;
            }
            if l.tls != s.tls || l.h2c != s.h2c {
                self.err(
                    &s.origin,
                    &format!("{at}.port.protocol"),
                    format!(
                        "port {} already serves another protocol; one port serves one protocol",
                        s.port
                    ),
                );
                continue;
            }
            for (hi, h) in s.hosts.iter().enumerate() {
                if let Some(prev) = claimed.insert((s.port, h.clone()), s.path.clone()) {
                    self.err(
                        &s.origin,
                        &format!("{at}.hosts[{hi}]"),
                        format!("host {h} on port {} is already claimed by {prev}", s.port),
                    );
                    continue;
                }
                l.servers.insert(
                    h,
                    ServerPolicy {
                        https_redirect: s.https_redirect,
                        server: s.path.clone(),
                    },
                );
                if let Some(cert) = &s.cert {
                    l.certs.hosts.insert(h, cert.clone());
                }
            }
            if let (true, Some(cert)) = (s.default_cert, &s.cert) {
                if let Some(prev) = &l.default_from {
                    self.err(
                        &s.origin,
                        &format!("{at}.tls.defaultCertificate"),
                        format!(
                            "port {} already has a default certificate from {prev}",
                            s.port
                        ),
                    );
                } else {
                    l.default_from = Some(s.path.clone());
                    l.certs.default = Some(cert.clone());
                }
            }
        }
        out
    }

    /// Compiles every VirtualService and binds its routes to the listeners of its gateways.
    /// Returns the number of routes.
    fn virtual_services(
        &mut self,
        doc: &Document,
        gateways: &HashMap<String, GatewayInfo>,
        listeners: &mut BTreeMap<u16, ListenerBuild>,
    ) -> usize {
        let mut count = 0;
        for vs in &doc.virtual_services {
            let (v, o) = (&vs.spec, &vs.origin);
            let ns = v.namespace.clone().unwrap_or_else(|| "default".into());
            let vs_key = format!("{ns}/{}", v.name);
            if v.hosts.is_empty() {
                self.err(o, ".hosts", "a VirtualService needs at least one host");
            }
            let mut bound = Vec::new();
            for (gi, g) in v.gateways.iter().enumerate() {
                if g == "mesh" {
                    continue;
                }
                let gk = gateway_ref(g, &ns);
                if gateways.contains_key(&gk) {
                    bound.push(gk);
                } else {
                    self.err(
                        o,
                        &format!(".gateways[{gi}]"),
                        format!("gateway {gk} is not defined"),
                    );
                }
            }
            if v.gateways.is_empty() || (bound.is_empty() && v.gateways.iter().all(|g| g == "mesh"))
            {
                self.warn(
                    o,
                    ".gateways",
                    "bound only to `mesh` (no gateways listed): ignored at the gateway",
                );
            }
            let routes: Vec<Arc<Route>> = v
                .http
                .iter()
                .enumerate()
                .filter_map(|(ri, r)| self.route(o, &vs_key, &ns, ri, r).map(Arc::new))
                .collect();
            count += v.http.len();
            for gk in &bound {
                let routes_here: Vec<Arc<Route>> = routes
                    .iter()
                    .filter_map(|r| restrict_to_gateway(r, gk))
                    .collect();
                let Some(gw) = gateways.get(gk) else { continue };
                for s in &gw.servers {
                    let Some(l) = listeners.get_mut(&s.port) else {
                        continue;
                    };
                    for sh in &s.hosts {
                        for vh in &v.hosts {
                            let vh = vh.to_ascii_lowercase();
                            let Some(domain) = host::intersect(sh, &vh) else {
                                continue;
                            };
                            let b = l.vhosts.entry(domain.to_string()).or_default();
                            b.sources += 1;
                            b.routes.extend(routes_here.iter().cloned());
                        }
                    }
                }
            }
        }
        count
    }

    fn route(
        &mut self,
        o: &Origin,
        vs: &str,
        ns: &str,
        ri: usize,
        r: &schema::HttpRoute,
    ) -> Option<Route> {
        let at = format!(".http[{ri}]");
        let errors_before = self.errors.len();
        let matches: Vec<RequestMatch> = r
            .matches
            .iter()
            .enumerate()
            .filter_map(|(mi, m)| self.request_match(o, &format!("{at}.match[{mi}]"), ns, m))
            .collect();
        let headers = self.header_rules(o, &format!("{at}.headers"), r.headers.as_ref());
        let timeout = r.timeout.map(|d| d.get()).filter(|d| !d.is_zero());
        let action = match (&r.redirect, &r.direct_response, r.route.is_empty()) {
            (Some(red), None, true) => {
                if r.rewrite.is_some() {
                    self.err(
                        o,
                        &format!("{at}.rewrite"),
                        "a redirect route cannot also rewrite",
                    );
                }
                self.redirect(o, &format!("{at}.redirect"), red)
                    .map(Action::Redirect)
            }
            (None, Some(d), true) => self
                .direct(o, &format!("{at}.directResponse"), d)
                .map(Action::Direct),
            (None, None, false) => {
                let destinations = self.destinations(o, &at, &r.route);
                let rewrite = r.rewrite.as_ref().map(|rw| {
                    let authority = match &rw.authority {
                        Some(a) => match HeaderValue::from_str(a) {
                            Ok(v) => Some(v),
                            Err(_) => {
                                self.err(
                                    o,
                                    &format!("{at}.rewrite.authority"),
                                    "not a valid Host value",
                                );
                                None
                            }
                        },
                        None => None,
                    };
                    if let Some(u) = &rw.uri {
                        if !u.starts_with('/') {
                            self.err(o, &format!("{at}.rewrite.uri"), "must start with /");
                        }
                    }
                    Rewrite {
                        uri: rw.uri.clone(),
                        authority,
                    }
                });
                destinations.map(|(destinations, total_weight)| {
                    Action::Forward(Forward {
                        destinations,
                        total_weight,
                        rewrite,
                        timeout,
                    })
                })
            }
            (None, None, true) => {
                self.err(
                    o,
                    &at,
                    "a route needs one of route, redirect or directResponse",
                );
                None
            }
            _ => {
                self.err(
                    o,
                    &at,
                    "route, redirect and directResponse are mutually exclusive",
                );
                None
            }
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Route {
            name: r.name.clone(),
            origin: RouteOrigin {
                virtual_service: vs.to_string(),
                index: ri,
            },
            matches,
            action: action?,
            headers,
        })
    }

    fn string_match(
        &mut self,
        o: &Origin,
        at: &str,
        m: &StringMatch,
        allow_presence: bool,
    ) -> Option<StrMatch> {
        match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), None, None) => Some(StrMatch::Exact(e.clone())),
            (None, Some(p), None) => Some(StrMatch::Prefix(p.clone())),
            (None, None, Some(r)) if allow_presence && r == "*" => Some(StrMatch::Present),
            (None, None, Some(r)) => match Regex::new(&format!("^(?:{r})$")) {
                Ok(re) => Some(StrMatch::Regex(re)),
                Err(e) => {
                    self.err(o, &format!("{at}.regex"), format!("invalid regex: {e}"));
                    None
                }
            },
            (None, None, None) if allow_presence => Some(StrMatch::Present),
            (None, None, None) => {
                self.err(o, at, "set one of exact, prefix or regex");
                None
            }
            _ => {
                self.err(o, at, "exact, prefix and regex are mutually exclusive");
                None
            }
        }
    }

    fn request_match(
        &mut self,
        o: &Origin,
        at: &str,
        ns: &str,
        m: &schema::HttpMatchRequest,
    ) -> Option<RequestMatch> {
        let mut out = RequestMatch {
            name: m.name.clone(),
            ignore_uri_case: m.ignore_uri_case,
            ..Default::default()
        };
        if let Some(u) = &m.uri {
            out.uri = self.string_match(o, &format!("{at}.uri"), u, false);
            if let (true, Some(StrMatch::Regex(_))) = (m.ignore_uri_case, &out.uri) {
                self.warn(
                    o,
                    &format!("{at}.ignoreUriCase"),
                    "applies to exact and prefix only; write (?i) in the regex",
                );
            }
        }
        if let Some(x) = &m.method {
            out.method = self.string_match(o, &format!("{at}.method"), x, false);
        }
        if let Some(x) = &m.authority {
            out.authority = self.string_match(o, &format!("{at}.authority"), x, false);
        }
        if let Some(x) = &m.scheme {
            out.scheme = self.string_match(o, &format!("{at}.scheme"), x, false);
        }
        for (field, src, dst) in [
            ("headers", &m.headers, &mut out.headers),
            (
                "withoutHeaders",
                &m.without_headers,
                &mut out.without_headers,
            ),
        ] {
            for (k, v) in src {
                let here = format!("{at}.{field}.{k}");
                if matches!(k.as_str(), "uri" | "scheme" | "method" | "authority")
                    || k.starts_with(':')
                {
                    self.err(
                        o,
                        &here,
                        format!(
                            "{k:?} cannot be matched as a header; use the match field of that name"
                        ),
                    );
                    continue;
                }
                if k.bytes().any(|b| b.is_ascii_uppercase()) {
                    self.err(o, &here, "header names must be lower case");
                    continue;
                }
                let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
                    self.err(o, &here, format!("{k:?} is not a valid header name"));
                    continue;
                };
                if let Some(sm) = self.string_match(o, &here, v, true) {
                    dst.push((name, sm));
                }
            }
        }
        for (k, v) in &m.query_params {
            if let Some(sm) = self.string_match(o, &format!("{at}.queryParams.{k}"), v, true) {
                out.query.push((k.clone(), sm));
            }
        }
        if let Some(p) = m.port {
            match u16::try_from(p) {
                Ok(p) if p > 0 => out.port = Some(p),
                _ => self.err(o, &format!("{at}.port"), "port must be 1-65535"),
            }
        }
        out.gateways = m.gateways.iter().map(|g| gateway_ref(g, ns)).collect();
        Some(out)
    }

    fn header_rules(&mut self, o: &Origin, at: &str, h: Option<&schema::Headers>) -> HeaderRules {
        let Some(h) = h else {
            return HeaderRules::default();
        };
        HeaderRules {
            request: self.header_ops(o, &format!("{at}.request"), h.request.as_ref()),
            response: self.header_ops(o, &format!("{at}.response"), h.response.as_ref()),
        }
    }

    fn header_ops(
        &mut self,
        o: &Origin,
        at: &str,
        ops: Option<&schema::HeaderOperations>,
    ) -> HeaderOps {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let mut out = HeaderOps::default();
        for (field, src, dst) in [
            ("set", &ops.set, &mut out.set),
            ("add", &ops.add, &mut out.add),
        ] {
            for (k, v) in src {
                let here = format!("{at}.{field}.{k}");
                let name = match HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()) {
                    Ok(n) if !k.starts_with(':') => n,
                    _ => {
                        self.err(
                            o,
                            &here,
                            format!("{k:?} is not a header name Portico can set"),
                        );
                        continue;
                    }
                };
                match HeaderValue::from_str(v) {
                    Ok(val) => dst.push((name, val)),
                    Err(_) => self.err(o, &here, "not a valid header value"),
                }
            }
        }
        for (i, k) in ops.remove.iter().enumerate() {
            match HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()) {
                Ok(n) => out.remove.push(n),
                Err(_) => self.err(
                    o,
                    &format!("{at}.remove[{i}]"),
                    format!("{k:?} is not a header name"),
                ),
            }
        }
        out
    }

    fn redirect(&mut self, o: &Origin, at: &str, r: &schema::HttpRedirect) -> Option<Redirect> {
        let code = match r.redirect_code.unwrap_or(301) {
            c @ (301 | 302 | 303 | 307 | 308) => c as u16,
            0 => 301,
            other => {
                self.err(
                    o,
                    &format!("{at}.redirectCode"),
                    format!("{other} is not a redirect code (301, 302, 303, 307, 308)"),
                );
                return None;
            }
        };
        if let Some(s) = &r.scheme {
            if s != "http" && s != "https" {
                self.err(o, &format!("{at}.scheme"), "must be http or https");
            }
        }
        let port = match r.port {
            None => None,
            Some(p) => match u16::try_from(p) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    self.err(o, &format!("{at}.port"), "port must be 1-65535");
                    None
                }
            },
        };
        Some(Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            port,
            scheme: r.scheme.clone(),
            code,
        })
    }

    fn direct(
        &mut self,
        o: &Origin,
        at: &str,
        d: &schema::HttpDirectResponse,
    ) -> Option<DirectResponse> {
        if !(200..=599).contains(&d.status) {
            self.err(o, &format!("{at}.status"), "status must be 200-599");
            return None;
        }
        let body = match d.body.as_ref().map(|b| (&b.string, &b.bytes)) {
            None | Some((None, None)) => Bytes::new(),
            Some((Some(s), None)) => Bytes::from(s.clone()),
            Some((None, Some(b64))) => {
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        self.err(o, &format!("{at}.body.bytes"), format!("not base64: {e}"));
                        return None;
                    }
                }
            }
            Some((Some(_), Some(_))) => {
                self.err(
                    o,
                    &format!("{at}.body"),
                    "string and bytes are mutually exclusive",
                );
                return None;
            }
        };
        if body.len() > 1024 * 1024 {
            self.err(
                o,
                &format!("{at}.body"),
                "a direct response body may be at most 1 MiB",
            );
            return None;
        }
        Some(DirectResponse {
            status: d.status as u16,
            body,
        })
    }

    fn destinations(
        &mut self,
        o: &Origin,
        at: &str,
        route: &[schema::HttpRouteDestination],
    ) -> Option<(Vec<WeightedDestination>, u32)> {
        let several = route.len() > 1;
        let mut out = Vec::new();
        let mut ok = true;
        for (di, d) in route.iter().enumerate() {
            let here = format!("{at}.route[{di}]");
            let weight = match d.weight {
                Some(w) if w < 0 => {
                    self.err(
                        o,
                        &format!("{here}.weight"),
                        format!("weight {w} is negative"),
                    );
                    ok = false;
                    continue;
                }
                Some(w) if w > i64::from(u32::MAX / 2) => {
                    self.err(o, &format!("{here}.weight"), "weight is too large");
                    ok = false;
                    continue;
                }
                Some(w) => w as u32,
                None => 0,
            };
            let headers = self.header_rules(o, &format!("{here}.headers"), d.headers.as_ref());
            let Some(cluster) = self.cluster(o, &format!("{here}.destination"), &d.destination)
            else {
                ok = false;
                continue;
            };
            // Weights are relative; with several destinations, weight 0 (or none) gets nothing.
            if several && weight == 0 {
                continue;
            }
            out.push(WeightedDestination {
                cluster,
                weight: if several { weight } else { 1 },
                headers,
            });
        }
        if !ok {
            return None;
        }
        let total: u32 = out.iter().map(|d| d.weight).sum();
        if out.is_empty() || total == 0 {
            self.err(
                o,
                &format!("{at}.route"),
                "total destination weight is 0: with several destinations, give at least one a positive weight",
            );
            return None;
        }
        Some((out, total))
    }

    fn cluster(&mut self, o: &Origin, at: &str, d: &schema::Destination) -> Option<Arc<Cluster>> {
        let host = d.host.to_ascii_lowercase();
        let subset = d.subset.as_deref().filter(|s| !s.is_empty());
        let requested_port = match d.port.as_ref().map(|p| u16::try_from(p.number)) {
            None => None,
            Some(Ok(p)) if p > 0 => Some(p),
            Some(_) => {
                self.err(o, &format!("{at}.port.number"), "port must be 1-65535");
                return None;
            }
        };
        // Subset labels and traffic policy from the DestinationRule.
        let rule = self.registry.rules.get(&host).cloned();
        let (labels, policies) = match (subset, &rule) {
            (None, r) => (
                BTreeMap::new(),
                r.iter()
                    .filter_map(|r| r.spec.traffic_policy.clone())
                    .collect::<Vec<_>>(),
            ),
            (Some(name), Some(r)) => {
                match r.spec.subsets.iter().find(|s| s.name == name) {
                    Some(s) => {
                        let mut p: Vec<_> = r.spec.traffic_policy.iter().cloned().collect();
                        p.extend(s.traffic_policy.iter().cloned());
                        (s.labels.clone(), p)
                    }
                    None => {
                        self.err(o, &format!("{at}.subset"), format!("subset {name:?} is not defined by DestinationRule {} for host {host}", r.spec.name));
                        return None;
                    }
                }
            }
            (Some(name), None) => {
                self.err(
                    o,
                    &format!("{at}.subset"),
                    format!("subset {name:?}: no DestinationRule for host {host} defines subsets"),
                );
                return None;
            }
        };
        let entry_idx = self
            .registry
            .entries_exact
            .get(&host)
            .or_else(|| self.registry.entries_wild.lookup(&host))
            .copied();
        let (port, h2c_port, endpoints) = match entry_idx {
            Some(i) => {
                let se = self.registry.entries[i].clone();
                let s = &se.spec;
                let sp = match requested_port {
                    Some(p) => s.ports.iter().find(|sp| sp.number == u32::from(p)),
                    None if s.ports.len() == 1 => s.ports.first(),
                    None => {
                        self.err(
                            o,
                            &format!("{at}.port"),
                            format!(
                                "host {host} has several ports in ServiceEntry {}; name one",
                                s.name
                            ),
                        );
                        return None;
                    }
                };
                let Some(sp) = sp else {
                    self.err(
                        o,
                        &format!("{at}.port.number"),
                        format!(
                            "port {} is not a port of ServiceEntry {} for host {host}",
                            requested_port.unwrap_or(0),
                            s.name
                        ),
                    );
                    return None;
                };
                let port = sp.number as u16;
                let target = sp.target_port.map(|t| t as u16).unwrap_or(port);
                let h2c = matches!(
                    sp.protocol
                        .as_deref()
                        .map(str::to_ascii_uppercase)
                        .as_deref(),
                    Some("HTTP2" | "GRPC")
                );
                let mut eps = Vec::new();
                match s.resolution.as_deref() {
                    Some("STATIC") | Some("DNS") | Some("DNS_ROUND_ROBIN")
                        if !s.endpoints.is_empty() =>
                    {
                        for ep in &s.endpoints {
                            if !labels.iter().all(|(k, v)| ep.labels.get(k) == Some(v)) {
                                continue;
                            }
                            let ep_port = sp
                                .name
                                .as_ref()
                                .and_then(|n| ep.ports.get(n))
                                .map(|p| *p as u16)
                                .unwrap_or(target);
                            eps.extend(self.resolve(o, at, &ep.address, ep_port));
                        }
                    }
                    Some("STATIC") => {}
                    _ => {
                        if host.starts_with('*') {
                            self.warn(
                                o,
                                at,
                                format!(
                                    "wildcard host {host} cannot be resolved; it has no endpoints"
                                ),
                            );
                        } else if labels.is_empty() {
                            eps.extend(self.resolve(o, at, &host, target));
                        }
                    }
                }
                (port, h2c, eps)
            }
            None => {
                let Some(port) = requested_port else {
                    self.err(o, &format!("{at}.port"), format!("host {host} is not in a ServiceEntry: destination.port.number is required"));
                    return None;
                };
                let eps = if labels.is_empty() {
                    self.resolve(o, at, &host, port)
                } else {
                    Vec::new()
                };
                (port, false, eps)
            }
        };
        if endpoints.is_empty() {
            self.warn(
                o,
                at,
                format!(
                    "{} has no endpoints: requests to it get 503",
                    cluster_name(&host, port, subset)
                ),
            );
        }
        let name = cluster_name(&host, port, subset);
        if let Some(c) = self.clusters.get(&name) {
            return Some(c.clone());
        }
        let base = self
            .settings
            .as_ref()
            .map(|s| s.connect_timeout)
            .unwrap_or(Duration::from_secs(10));
        let mut settings = ClusterSettings {
            connect_timeout: base,
            idle_timeout: None,
            h2c: h2c_port,
        };
        for p in &policies {
            if let Some(cp) = &p.connection_pool {
                if let Some(t) = cp.tcp.as_ref().and_then(|t| t.connect_timeout) {
                    settings.connect_timeout = t.get();
                }
                if let Some(h) = &cp.http {
                    if let Some(t) = h.idle_timeout {
                        settings.idle_timeout = Some(t.get());
                    }
                    match h.h2_upgrade_policy.as_deref() {
                        Some("UPGRADE") => settings.h2c = true,
                        Some("DO_NOT_UPGRADE") => settings.h2c = false,
                        _ => {}
                    }
                }
            }
        }
        let cluster = Arc::new(Cluster::new(&host, port, subset, endpoints, settings));
        self.clusters.insert(name, cluster.clone());
        Some(cluster)
    }

    fn resolve(&mut self, o: &Origin, at: &str, address: &str, port: u16) -> Vec<Endpoint> {
        if let Ok(ip) = address.parse::<IpAddr>() {
            return vec![Endpoint {
                addr: SocketAddr::new(ip, port),
            }];
        }
        match (address, port).to_socket_addrs() {
            Ok(addrs) => {
                let mut v: Vec<Endpoint> = addrs.map(|addr| Endpoint { addr }).collect();
                v.sort_by_key(|e| e.addr);
                v.dedup_by_key(|e| e.addr);
                v
            }
            Err(e) => {
                self.warn(o, at, format!("cannot resolve {address}: {e}"));
                Vec::new()
            }
        }
    }
}

fn gateway_ref(g: &str, ns: &str) -> String {
    if g.contains('/') {
        g.to_string()
    } else {
        format!("{ns}/{g}")
    }
}

/// A route as it applies on gateway `gk`: match blocks restricted to other gateways are
/// dropped; a route left with none does not apply.
fn restrict_to_gateway(r: &Arc<Route>, gk: &str) -> Option<Arc<Route>> {
    if r.matches.iter().all(|m| m.gateways.is_empty()) {
        return Some(r.clone());
    }
    let kept: Vec<RequestMatch> = r
        .matches
        .iter()
        .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == gk))
        .cloned()
        .collect();
    if kept.is_empty() {
        return None;
    }
    let action = match &r.action {
        Action::Forward(f) => Action::Forward(Forward {
            destinations: f
                .destinations
                .iter()
                .map(|d| WeightedDestination {
                    cluster: d.cluster.clone(),
                    weight: d.weight,
                    headers: d.headers.clone(),
                })
                .collect(),
            total_weight: f.total_weight,
            rewrite: f.rewrite.clone(),
            timeout: f.timeout,
        }),
        Action::Redirect(x) => Action::Redirect(x.clone()),
        Action::Direct(x) => Action::Direct(x.clone()),
    };
    Some(Arc::new(Route {
        name: r.name.clone(),
        origin: r.origin.clone(),
        matches: kept,
        action,
        headers: r.headers.clone(),
    }))
}
