//! Compile: the only place a string from the config becomes a type. Turns a loaded
//! Document into a Snapshot, collecting every error (with its location) rather than
//! stopping at the first. May read certificate files and resolve DNS names; never opens a
//! listening socket.

// The parts, as a compile flows through them (`compile_cached`, after the mesh settings
// below): what it may reuse, the gateways, the VirtualServices bound to them, their routes,
// the routes' clusters and the registry those are looked up in, then L4 routes and
// policies bound to the listeners.

/// What the last compile left that this one may reuse.
mod cache;

/// Gateways, their certificates and the listener tables.
mod gateways;

/// Certificates the gateways order over ACME.
mod acme;

/// VirtualServices bound to the gateways' listeners.
mod binding;

/// A VirtualService's HTTP routes.
mod routes;

/// A route destination's cluster.
mod clusters;

/// ServiceEntries and DestinationRules, where destinations are looked up.
mod registry;

/// The egress registry (the forward proxy's) from the ServiceEntries.
mod egress;

/// TLS and TCP routes.
mod l4;

/// Rate limits, access lists, request authentication.
mod policy;

/// AuthorizationPolicies.
mod authz;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use binding::{patched_tables, unbound_since, virtual_host, Bound, BoundState};
pub use cache::Cache;
use cache::{CachedCert, CachedGateways, CachedRoutes, ClientFile, Context, Reuse};
use gateways::WorkloadFiles;
use registry::Registry;

use super::error::ConfigError;
use super::load::{Document, Origin, Stamps};
use crate::l4::{L4Kind, L4Table};
use crate::routing::path::PathNormalization;
use crate::routing::{HostMatcher, RouteTable};
use crate::snapshot::{AccessLogSettings, Listener, Settings, Snapshot, Summary};
use crate::telemetry::access_log::{self, Format as AccessLogFormat};
use crate::tls::client_auth;
use crate::upstream::Cluster;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
/// Shorter admin tokens are a warning: guessable by trying.
const MIN_ADMIN_TOKEN: usize = 16;

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
    /// VirtualServices whose routes came from the `Cache` rather than being compiled.
    pub reused: usize,
    /// VirtualServices bound into the routing tables (all of them, unless the last
    /// compile's tables were patched: then the new and changed ones).
    pub rebound: usize,
}

pub fn compile(doc: &Document, opts: &Options) -> Result<Compiled, Vec<ConfigError>> {
    compile_cached(doc, opts, &mut Cache::default(), Stamps::default())
}

/// `compile` that reuses what `cache` holds from the last compile where its inputs are
/// unchanged, and leaves this compile's results there. `stamps` were taken before the files
/// were read.
pub fn compile_cached(
    doc: &Document,
    opts: &Options,
    cache: &mut Cache,
    stamps: Stamps,
) -> Result<Compiled, Vec<ConfigError>> {
    // The epoch is read before anything resolves: an answer changing during this compile
    // makes the next one full.
    let mut context = Context::of(doc, opts, crate::egress::dns::answer_epoch());
    // `stamps` were taken before anything was read, so a file that changes while this
    // compile reads it counts as changed next time.
    let reuse = match &cache.context {
        Some(old) if old.same(&context, &stamps) => Some(Reuse {
            routes: std::mem::take(&mut cache.routes),
            clusters: std::mem::take(&mut cache.clusters),
        }),
        _ => {
            cache.context = None;
            cache.routes.clear();
            cache.clusters.clear();
            None
        }
    };
    let mut cx = Cx {
        stamps,
        pairs_used: Vec::new(),
        client_files: Vec::new(),
        hits: Vec::new(),
        dirty: None,
        rebound: 0,
        order: Vec::with_capacity(doc.virtual_services.len()),
        uncached: Default::default(),
        certs_prev: std::mem::take(&mut cache.certs),
        certs_next: HashMap::new(),
        reuse,
        next_routes: foldhash::HashMap::with_capacity_and_hasher(
            doc.virtual_services.len(),
            Default::default(),
        ),
        touched: Vec::new(),
        clusters_in: Default::default(),
        reused: 0,
        errors: Vec::new(),
        warnings: doc.warnings.clone(),
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
        credentials_dir: Cx::credentials_dir(doc),
        workload: WorkloadFiles::of(doc),
        dns_servers: Vec::new(),
        dns_names: Vec::new(),
        acme_named: HashMap::new(),
        acme: Vec::new(),
        acme_http01_servers: Vec::new(),
    };
    // ServiceEntries and DestinationRules, checked once; then `mesh.dnsServers` (with the
    // egress registry) before the mesh settings, which resolve the tracing collector's name.
    cx.registry = cx.build_registry(doc);
    let egress = cx.egress(doc);
    cx.dns_servers = egress.resolver.servers().to_vec();
    let settings = cx.mesh(doc);
    cx.settings = Some(settings.clone());
    cx.acme_named = cx.acme_issuers(doc);
    let started = std::time::Instant::now();
    let cached_gateways = cache.gateways.take().filter(|g| g.holds(doc, &cx));
    let gateways_reused = cached_gateways.is_some();
    let (gateways, mut listeners) = match cached_gateways {
        Some(g) => {
            for pair in &g.pairs {
                if let Some(c) = cx.certs_prev.remove(pair) {
                    cx.certs_next.insert(pair.clone(), c);
                }
            }
            cx.watched.extend(g.watched.iter().cloned());
            cx.acme = g.acme.clone();
            let out = (g.gateways.clone(), g.listeners.clone());
            cache.gateways = Some(g);
            out
        }
        None => {
            let (errors, warnings, watched) =
                (cx.errors.len(), cx.warnings.len(), cx.watched.len());
            let gateways = Arc::new(cx.gateways(doc));
            let listeners = cx.listeners(&gateways);
            if cx.errors.len() == errors && cx.warnings.len() == warnings {
                cache.gateways = Some(CachedGateways {
                    specs: doc.gateways.iter().map(|g| g.spec.clone()).collect(),
                    mesh: doc.mesh.spec.clone(),
                    credentials_dir: cx.credentials_dir.clone(),
                    generate_missing_certs: cx.opts.generate_missing_certs,
                    pairs: cx.pairs_used.clone(),
                    client_files: cx.client_files.clone(),
                    watched: cx.watched[watched..].to_vec(),
                    acme: cx.acme.clone(),
                    gateways: gateways.clone(),
                    listeners: listeners.clone(),
                });
            }
            (gateways, listeners)
        }
    };
    let acme_hosts = cx.acme_hosts(&listeners);
    let gateways_at = started.elapsed();
    // Caught here rather than at `portico run`, where the two would race for the port.
    if let Some(l) = listeners.get(&settings.admin.port()) {
        let (admin, gateway) = (settings.admin.ip(), l.addr.ip());
        if admin == gateway || admin.is_unspecified() || gateway.is_unspecified() {
            cx.err(
                &doc.mesh.origin,
                ".admin",
                format!(
                    "{} is also a gateway's address ({}); the admin API needs a port of its own",
                    settings.admin, l.addr
                ),
            );
        }
    }
    // The last compile's bound tables can be patched when the gateways (hence every
    // binding of an unchanged VirtualService) are the same.
    let patch = match (cache.bound.take(), &cx.reuse) {
        (Some(b), Some(reuse)) if gateways_reused => {
            unbound_since(doc, reuse, &b).map(|gone| (b, gone))
        }
        _ => None,
    };
    let (routes, finals) = match patch {
        Some((b, gone)) => {
            listeners = b.listeners;
            cx.dirty = Some(Vec::new());
            for (key, (v, bound)) in &gone {
                cx.unbind(*key, v, bound, &gateways, &mut listeners);
            }
            let routes = cx.virtual_services(doc, &gateways, &mut listeners, true);
            (routes, Some(b.vhosts))
        }
        None => {
            let routes = cx.virtual_services(doc, &gateways, &mut listeners, false);
            (routes, None)
        }
    };
    tracing::debug!(
        gateways_ms = gateways_at.as_millis() as u64,
        gateways_reused,
        virtual_services_ms = (started.elapsed() - gateways_at).as_millis() as u64,
        reused = cx.reused,
        rebound = cx.rebound,
        patched = finals.is_some(),
        "compile phases"
    );

    let auto = cx.auto_passthrough(&gateways);
    let policies = cx.policies(doc, &cache.policies);
    let authorization = cx.authorization(doc);
    // A PROXY protocol port no server listens on is a typo: the balancer's headers would
    // reach a listener that does not read them.
    if let Some(ports) = settings
        .proxy_protocol
        .as_ref()
        .and_then(|p| p.ports.as_ref())
    {
        for (i, port) in ports.iter().enumerate() {
            if !listeners.contains_key(port) {
                cx.err(
                    &doc.mesh.origin,
                    &format!(".defaultConfig.gatewayTopology.proxyProtocol.ports[{i}]"),
                    format!("no Gateway server listens on port {port}"),
                );
            }
        }
    }
    // Pairs are checked by content, whatever else changed: keep what this compile read.
    cache.certs = std::mem::take(&mut cx.certs_next);
    if !cx.errors.is_empty() {
        // The cache stays as the last good compile left it (but for the bound tables,
        // which this compile may have patched: the next one binds everything).
        if let Some(r) = cx.reuse.take() {
            cache.clusters = r.clusters;
            cache.routes = r.routes;
            cache.routes.extend(cx.next_routes.drain().filter(|(_, c)| {
                c.clusters.iter().all(|cl| {
                    cache
                        .clusters
                        .get(&cl.name)
                        .is_some_and(|x| Arc::ptr_eq(x, cl))
                })
            }));
        }
        // A DestinationRule shared by several destinations reports its problem once.
        let mut seen = std::collections::HashSet::new();
        cx.errors.retain(|e| seen.insert(e.to_string()));
        return Err(cx.errors);
    }
    let tables = match finals {
        Some(finals) => patched_tables(
            &mut listeners,
            finals,
            cx.dirty.take().unwrap_or_default(),
            &cx.order,
        ),
        None => listeners
            .iter()
            .map(|(&port, b)| {
                let mut vhosts = HostMatcher::with_capacity(b.vhosts.len());
                for (domain, build) in &b.vhosts {
                    vhosts.insert_owned(domain.clone(), virtual_host(domain, &build.parts));
                }
                (port, Arc::new(vhosts))
            })
            .collect(),
    };
    let hosts = tables.values().map(|t| t.len()).sum();
    let mut listeners_out: Vec<Listener> = listeners
        .iter()
        .map(|(port, b)| Listener {
            addr: b.addr,
            tls: b.tls,
            h2c: b.h2c,
            forward_proxy: b.forward_proxy,
            table: RouteTable {
                servers: b.servers.clone(),
                vhosts: tables[port].clone(),
            },
            certs: b.tls.then(|| b.certs.clone()),
            client_auth: (b.tls && b.mutual).then(|| b.client_auth.clone()),
            l4: b.l4.map(|kind| match kind {
                L4Kind::Passthrough => {
                    let mut sni = (*b.sni).clone();
                    for (name, route) in auto.get(port).into_iter().flatten() {
                        if sni.get_pattern(name).is_none() {
                            sni.insert(name, route.clone());
                        }
                    }
                    L4Table::Passthrough(sni)
                }
                L4Kind::Tcp => L4Table::Tcp(b.tcp.clone()),
            }),
            acme: acme_hosts.clone(),
            policies: Default::default(),
            authz: None,
            requests: None,
            authn: None,
        })
        .collect();
    cache.request_counts = request_caps(
        &settings.downstream,
        &mut listeners_out,
        std::mem::take(&mut cache.request_counts),
    );
    let (policies, carried) = policies.bind(doc, &mut listeners_out);
    authorization.bind(doc, &mut listeners_out);
    cache.policies = carried;
    let mut watched = cx.watched;
    watched.sort();
    watched.dedup();
    let config_files: std::collections::HashSet<&Path> = doc
        .files
        .iter()
        .map(|f| f.path.as_path())
        .chain(doc.include_dirs.iter().map(PathBuf::as_path))
        .collect();
    context.files = watched
        .iter()
        .filter(|p| !config_files.contains(p.as_path()))
        .map(|p| (p.clone(), cx.stamps.of(p)))
        .collect();
    cache.context = Some(context);
    cache.routes = cx.next_routes;
    cache.bound = Some(BoundState {
        listeners,
        vhosts: tables,
        order: cx.order,
        uncached: cx.uncached,
    });
    cache.clusters = cx.clusters.clone();
    let clusters: Vec<Arc<Cluster>> = cx.clusters.into_values().collect();
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
            listeners: listeners_out,
            clusters,
            egress,
            dns_names: cx.dns_names,
            acme: cx.acme,
            settings,
            summary,
            policies,
        },
        warnings: cx.warnings,
        reused: cx.reused,
        rebound: cx.rebound,
    })
}

/// The request caps of each listener (none when neither `maxRequests` nor
/// `maxRequestsPerClient` is set), over the counts `prev` held for its address: requests
/// in flight across a reload that keeps a cap set stay counted. The counts to carry.
fn request_caps(
    d: &crate::snapshot::Downstream,
    listeners: &mut [Listener],
    mut prev: HashMap<SocketAddr, Arc<crate::listener::RequestCounts>>,
) -> HashMap<SocketAddr, Arc<crate::listener::RequestCounts>> {
    let mut kept = HashMap::new();
    if d.max_requests.is_none() && d.max_requests_per_client.is_none() {
        return kept;
    }
    for l in listeners.iter_mut().filter(|l| l.l4.is_none() || l.tls) {
        let counts = prev
            .remove(&l.addr)
            .unwrap_or_else(|| crate::listener::RequestCounts::new(l.shape().to_string()));
        kept.insert(l.addr, counts.clone());
        l.requests = Some(crate::listener::RequestCaps {
            max: d.max_requests,
            per_client: d.max_requests_per_client,
            counts,
        });
    }
    kept
}

struct Cx {
    /// Files' stamps from before the build read them.
    stamps: Stamps,
    /// Certificate pairs `load_pair` was asked for.
    pairs_used: Vec<(PathBuf, PathBuf)>,
    /// Client CA and CRL files read (or looked for).
    client_files: Vec<ClientFile>,
    /// Scratch space of `bind`, kept between VirtualServices.
    hits: Vec<(usize, usize, usize)>,
    /// When patching the last compile's tables: the (port, domain) pairs bindings changed.
    dirty: Option<Vec<(u16, String)>>,
    /// VirtualServices bound into the tables by this compile.
    rebound: usize,
    /// Every VirtualService's key in document order, and those bound without a cache
    /// entry: the next `BoundState`.
    order: Vec<usize>,
    uncached: foldhash::HashMap<usize, Bound>,
    certs_prev: HashMap<(PathBuf, PathBuf), CachedCert>,
    certs_next: HashMap<(PathBuf, PathBuf), CachedCert>,
    /// The last compile's routes and clusters, when its context is this one's.
    reuse: Option<Reuse>,
    next_routes: foldhash::HashMap<usize, CachedRoutes>,
    /// Clusters `cluster` returned since it was last cleared.
    touched: Vec<String>,
    /// Clusters reused VirtualServices brought in, by address.
    clusters_in: foldhash::HashSet<usize>,
    reused: usize,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    watched: Vec<PathBuf>,
    clusters: BTreeMap<String, Arc<Cluster>>,
    registry: Registry,
    settings: Option<Settings>,
    opts: Options,
    credentials_dir: PathBuf,
    /// `mesh.workloadCertificates`, resolved: what `ISTIO_MUTUAL` presents and trusts.
    workload: WorkloadFiles,
    /// `mesh.dnsServers`, for names resolved while compiling.
    dns_servers: Vec<SocketAddr>,
    /// The names clusters were compiled from; the Snapshot keeps them followed.
    dns_names: Vec<Arc<crate::egress::dns::DnsName>>,
    /// `mesh.acmeIssuers` by name.
    acme_named: HashMap<String, acme::NamedIssuer>,
    /// Certificates the servers order over ACME, and where those answering HTTP-01 were
    /// written (`.tls.acme.challenge`), for the error when no listener can answer it.
    acme: Vec<Arc<crate::tls::acme::ManagedCert>>,
    acme_http01_servers: Vec<(Origin, String)>,
}

fn key(namespace: &Option<String>, name: &str) -> String {
    format!("{}/{}", namespace.as_deref().unwrap_or("default"), name)
}

/// `mesh.connectTimeout`, Istio's 10 s when unset: the connect timeout of every cluster
/// and egress destination whose DestinationRule sets none.
fn connect_timeout(m: &super::schema::Mesh) -> Duration {
    m.connect_timeout
        .map(|d| d.get())
        .unwrap_or(Duration::from_secs(10))
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
        let access_log = match m.access_log_file.as_deref() {
            Some("") => None,
            file => {
                let path = match file {
                    None | Some("/dev/stdout") => PathBuf::from("/dev/stdout"),
                    Some(f) => doc.main.resolve(f),
                };
                let format = match (
                    m.access_log_encoding.as_deref(),
                    m.access_log_format.as_deref(),
                ) {
                    (None | Some("JSON"), None) => Some(AccessLogFormat::Json),
                    (None | Some("JSON"), Some(_)) => {
                        self.err(
                            o,
                            ".accessLogFormat",
                            "a format string needs accessLogEncoding = \"TEXT\"",
                        );
                        None
                    }
                    (Some("TEXT"), f) => {
                        match AccessLogFormat::text(f.unwrap_or(access_log::ISTIO_TEXT_FORMAT)) {
                            Ok(f) => Some(f),
                            Err(e) => {
                                self.err(o, ".accessLogFormat", e);
                                None
                            }
                        }
                    }
                    (Some(other), _) => {
                        self.err(
                            o,
                            ".accessLogEncoding",
                            format!("{other:?} is not JSON or TEXT"),
                        );
                        None
                    }
                };
                format.map(|format| AccessLogSettings {
                    path,
                    format: Arc::new(format),
                })
            }
        };
        let tracing = self.tracing(doc);
        let path_normalization = self.path_normalization(doc);
        let downstream = self.downstream(doc);
        let admin_token = self.admin_token(doc);
        let forward_client_cert = self.forward_client_cert(doc);
        let num_trusted_proxies = m
            .default_config
            .as_ref()
            .and_then(|d| d.gateway_topology.as_ref())
            .and_then(|t| t.num_trusted_proxies)
            .unwrap_or(0);
        let proxy_protocol = self.proxy_protocol(doc);
        Settings {
            forward_client_cert,
            num_trusted_proxies,
            proxy_protocol,
            path_normalization,
            downstream,
            upgrade_socket: match &m.upgrade_socket {
                Some(p) => doc.main.resolve(p),
                None => std::env::temp_dir().join("portico-upgrade.sock"),
            },
            access_log,
            tracing,
            admin,
            admin_token,
            connect_timeout: connect_timeout(m),
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

    /// `defaultConfig.gatewayTopology.proxyProtocol`.
    fn proxy_protocol(
        &mut self,
        doc: &Document,
    ) -> Option<Arc<crate::listener::proxy_protocol::ProxyProtocol>> {
        let p = doc
            .mesh
            .spec
            .default_config
            .as_ref()
            .and_then(|d| d.gateway_topology.as_ref())
            .and_then(|g| g.proxy_protocol.as_ref())?;
        let o = &doc.mesh.origin;
        let at = ".defaultConfig.gatewayTopology.proxyProtocol";
        let mut trusted = Vec::new();
        for (i, c) in p.trusted_cidrs.iter().enumerate() {
            match crate::policy::authz::parse_net(c) {
                Ok(n) => trusted.push(n),
                Err(e) => self.err(o, &format!("{at}.trustedCidrs[{i}]"), e),
            }
        }
        if p.trusted_cidrs.is_empty() {
            self.err(
                o,
                &format!("{at}.trustedCidrs"),
                "is required: the load balancers' addresses (0.0.0.0/0 and ::/0 trust every source, so any client could claim any address)",
            );
        }
        let (mut allow_v1, mut allow_v2) = (true, true);
        for (i, v) in p.disallowed_versions.iter().enumerate() {
            match v.as_str() {
                "V1" => allow_v1 = false,
                "V2" => allow_v2 = false,
                other => self.err(
                    o,
                    &format!("{at}.disallowedVersions[{i}]"),
                    format!("{other:?} is not V1 or V2"),
                ),
            }
        }
        if !allow_v1 && !allow_v2 {
            self.err(
                o,
                &format!("{at}.disallowedVersions"),
                "disallows both V1 and V2",
            );
        }
        let timeout = match p.timeout.map(|t| t.get()) {
            Some(t) if t.is_zero() => {
                self.err(o, &format!("{at}.timeout"), "must be more than 0s");
                Duration::from_secs(5)
            }
            Some(t) => t,
            None => Duration::from_secs(5),
        };
        let ports = p.ports.as_ref().map(|ports| {
            let mut out = Vec::new();
            for (i, &n) in ports.iter().enumerate() {
                match u16::try_from(n) {
                    Ok(n) if n > 0 => out.push(n),
                    _ => self.err(
                        o,
                        &format!("{at}.ports[{i}]"),
                        format!("{n} is not a port number"),
                    ),
                }
            }
            out
        });
        Some(Arc::new(crate::listener::proxy_protocol::ProxyProtocol {
            trusted,
            allow_without: p.allow_requests_without_proxy_protocol.unwrap_or(false),
            allow_v1,
            allow_v2,
            timeout,
            ports,
        }))
    }

    /// `defaultConfig.gatewayTopology.forwardClientCertDetails` (default SANITIZE_SET, as
    /// for Istio's gateways).
    fn forward_client_cert(&mut self, doc: &Document) -> client_auth::ForwardClientCert {
        let set = doc
            .mesh
            .spec
            .default_config
            .as_ref()
            .and_then(|d| d.gateway_topology.as_ref())
            .and_then(|g| g.forward_client_cert_details.as_deref());
        match set {
            None => client_auth::ForwardClientCert::default(),
            Some(s) => client_auth::ForwardClientCert::parse(s).unwrap_or_else(|| {
                self.err(
                    &doc.mesh.origin,
                    ".defaultConfig.gatewayTopology.forwardClientCertDetails",
                    format!("{s:?} is not SANITIZE, FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET or ALWAYS_FORWARD_ONLY"),
                );
                client_auth::ForwardClientCert::default()
            }),
        }
    }

    fn path_normalization(&mut self, doc: &Document) -> PathNormalization {
        use crate::routing::path::{EscapedSlashes, Normalization};
        let o = &doc.mesh.origin;
        let mut out = PathNormalization::default();
        let Some(p) = &doc.mesh.spec.path_normalization else {
            return out;
        };
        match p.normalization.as_deref() {
            None => {}
            Some("NONE") => out.normalization = Normalization::None,
            Some("BASE" | "DEFAULT") => out.normalization = Normalization::Base,
            Some("MERGE_SLASHES") => out.normalization = Normalization::MergeSlashes,
            Some("DECODE_AND_MERGE_SLASHES") => {
                out.normalization = Normalization::DecodeAndMergeSlashes;
                out.escaped_slashes = EscapedSlashes::Decode;
            }
            Some(other) => self.err(
                o,
                ".pathNormalization.normalization",
                format!("{other:?} is not NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES"),
            ),
        }
        match p.escaped_slashes.as_deref() {
            None => {}
            Some("KEEP_UNCHANGED") => out.escaped_slashes = EscapedSlashes::Keep,
            Some("REJECT_REQUEST") => out.escaped_slashes = EscapedSlashes::Reject,
            Some("UNESCAPE_AND_FORWARD") => out.escaped_slashes = EscapedSlashes::Decode,
            Some(other) => self.err(
                o,
                ".pathNormalization.escapedSlashes",
                format!("{other:?} is not KEEP_UNCHANGED, REJECT_REQUEST or UNESCAPE_AND_FORWARD"),
            ),
        }
        if out.normalization == Normalization::None && out.escaped_slashes != EscapedSlashes::Keep {
            self.err(
                o,
                ".pathNormalization.escapedSlashes",
                "needs a normalization other than NONE",
            );
        }
        out
    }

    fn downstream(&mut self, doc: &Document) -> crate::snapshot::Downstream {
        let o = &doc.mesh.origin;
        let mut out = crate::snapshot::Downstream {
            global_max_connections: crate::listener::memory_cap().map(|m| m.connections),
            ..Default::default()
        };
        let Some(d) = &doc.mesh.spec.downstream else {
            return out;
        };
        let mut positive =
            |field: &str, value: Option<crate::config::duration::Duration>, slot: &mut Duration| {
                if let Some(v) = value {
                    if v.get().is_zero() {
                        self.err(o, &format!(".downstream.{field}"), "must be more than 0s");
                    } else {
                        *slot = v.get();
                    }
                }
            };
        positive(
            "requestHeadersTimeout",
            d.request_headers_timeout,
            &mut out.request_headers_timeout,
        );
        positive("idleTimeout", d.idle_timeout, &mut out.idle_timeout);
        positive(
            "requestBodyTimeout",
            d.request_body_timeout,
            &mut out.request_body_timeout,
        );
        positive(
            "streamIdleTimeout",
            d.stream_idle_timeout,
            &mut out.stream_idle_timeout,
        );
        out.max_connection_duration = d
            .max_connection_duration
            .map(|v| v.get())
            .filter(|v| !v.is_zero());
        out.max_connections = d.max_connections.filter(|&n| n > 0).map(|n| n as usize);
        out.max_connections_per_client = d
            .max_connections_per_client
            .filter(|&n| n > 0)
            .map(|n| n as usize);
        out.max_requests = d.max_requests.filter(|&n| n > 0).map(|n| n as usize);
        out.max_requests_per_client = d
            .max_requests_per_client
            .filter(|&n| n > 0)
            .map(|n| n as usize);
        out.global_max_connections = match d.global_max_connections {
            Some(0) => None,
            Some(n) => Some(n as usize),
            None => out.global_max_connections,
        };
        if let Some(kb) = d.max_request_headers_kb {
            if !(1..=8192).contains(&kb) {
                self.err(o, ".downstream.maxRequestHeadersKb", "must be 1-8192");
            } else {
                out.max_request_headers = kb as usize * 1024;
            }
        }
        if let Some(n) = d.max_uri_length {
            if n < 16 || n as usize > out.max_request_headers {
                self.err(
                    o,
                    ".downstream.maxUriLength",
                    "must be at least 16 and at most maxRequestHeadersKb",
                );
            } else {
                out.max_uri_length = n as usize;
            }
        }
        out
    }

    /// `mesh.adminTokenFile`, read and trimmed. The file is watched: writing a new token
    /// reloads, and the next admin request needs it. Messages never quote the file.
    fn admin_token(&mut self, doc: &Document) -> Option<crate::admin::AdminToken> {
        let written = doc.mesh.spec.admin_token_file.as_deref()?;
        let o = &doc.mesh.origin;
        let path = doc.main.resolve(written);
        self.watched.push(path.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                self.err(
                    o,
                    ".adminTokenFile",
                    format!("cannot read {}: {e}", path.display()),
                );
                return None;
            }
        };
        let token = text.trim();
        if token.is_empty() {
            self.err(o, ".adminTokenFile", format!("{} is empty", path.display()));
            return None;
        }
        // What a client can send after `Authorization: Bearer `.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            self.err(
                o,
                ".adminTokenFile",
                format!(
                    "the token in {} has spaces, control or non-ASCII characters",
                    path.display()
                ),
            );
            return None;
        }
        if token.len() < MIN_ADMIN_TOKEN {
            self.warn(
                o,
                ".adminTokenFile",
                format!(
                    "the token in {} is shorter than {MIN_ADMIN_TOKEN} characters: use a long random one (openssl rand -hex 32)",
                    path.display()
                ),
            );
        }
        Some(crate::admin::AdminToken::new(token))
    }

    fn tracing(&mut self, doc: &Document) -> Option<crate::telemetry::trace::TraceSettings> {
        let m = &doc.mesh.spec;
        let o = &doc.mesh.origin;
        let sampling = m
            .default_config
            .as_ref()
            .and_then(|d| d.tracing.as_ref())
            .and_then(|t| t.sampling);
        if let Some(s) = sampling {
            if !(0.0..=100.0).contains(&s) {
                self.err(
                    o,
                    ".defaultConfig.tracing.sampling",
                    format!("{s} is not a percentage (0-100)"),
                );
            }
        }
        let (i, provider) = m
            .extension_providers
            .iter()
            .enumerate()
            .find_map(|(i, p)| p.opentelemetry.as_ref().map(|ot| (i, ot)))?;
        let at = format!(".extensionProviders[{i}].opentelemetry");
        let Some(http) = &provider.http else {
            self.err(
                o,
                &at,
                "OTLP/gRPC is not supported: set opentelemetry.http (OTLP/HTTP, port 4318)",
            );
            return None;
        };
        let Ok(port) = u16::try_from(provider.port) else {
            self.err(o, &format!("{at}.port"), "port must be 1-65535");
            return None;
        };
        let Some(collector) = self
            .resolve(o, &format!("{at}.service"), &provider.service, port)
            .into_iter()
            .next()
        else {
            self.err(
                o,
                &format!("{at}.service"),
                format!("cannot resolve {}", provider.service),
            );
            return None;
        };
        Some(crate::telemetry::trace::TraceSettings {
            sampling: sampling.unwrap_or(1.0),
            collector,
            authority: format!("{}:{port}", provider.service),
            path: http.path.clone().unwrap_or_else(|| "/v1/traces".into()),
        })
    }
}

fn gateway_ref(g: &str, ns: &str) -> String {
    if g.contains('/') {
        g.to_string()
    } else {
        format!("{ns}/{g}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A nameserver on loopback that answers every query NXDOMAIN, and counts them.
    fn stub_nameserver() -> (SocketAddr, Arc<AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                if n < 12 {
                    continue;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80; // a response
                reply[3] = 0x80 | 3; // NXDOMAIN
                let _ = socket.send_to(&reply, from);
            }
        });
        (addr, queries)
    }

    /// Found while making the config fuzz target hermetic: the tracing collector's name was
    /// resolved while the mesh settings compiled, before `mesh.dnsServers` was read, so
    /// through the system resolver; the configured nameserver was never asked.
    #[test]
    fn the_tracing_collector_is_resolved_with_the_mesh_dns_servers() {
        let (dns, queries) = stub_nameserver();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portico.toml");
        std::fs::write(
            &path,
            format!(
                r#"[mesh]
dnsServers = ["{dns}"]
extensionProviders = [{{ name = "otel", opentelemetry = {{ service = "otel.example.net", port = 4318, http = {{ path = "/v1/traces" }} }} }}]
"#
            ),
        )
        .unwrap();
        let opts = Options {
            generation: 1,
            generate_missing_certs: false,
        };
        let Err(errors) = crate::config::build(&path, &opts) else {
            panic!("otel.example.net was resolved, though the nameserver knows no name");
        };
        assert!(
            queries.load(Ordering::SeqCst) > 0,
            "the nameserver was not asked"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.message == "cannot resolve otel.example.net"),
            "{errors:?}"
        );
    }
}
