//! Compiles a route destination into its cluster: the ServiceEntry's port and endpoints
//! (names resolved here, and followed afterwards), the DestinationRule's subset and traffic
//! policy merged as Istio merges them (load balancer, connection pool, outlier detection,
//! upstream TLS with its files read here). One cluster per name, shared by every route
//! that names it, and the last compile's kept while its inputs are the same.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::registry::EndpointAddress;
use super::Cx;
use crate::config::load::Origin;
use crate::config::schema;
use crate::egress::Resolution;
use crate::tls;
use crate::upstream::{
    cluster_name, Cluster, ClusterSettings, HashSource, HashTable, Limits, OutlierPolicy, Policy,
};

/// The traffic policy fields in force for one cluster: DestinationRule level, then its
/// port-level settings, then the subset's, then the subset's port-level settings; each of
/// loadBalancer, connectionPool and outlierDetection is replaced whole, as Istio merges.
#[derive(Default)]
struct Effective {
    load_balancer: Option<schema::LoadBalancerSettings>,
    connection_pool: Option<schema::ConnectionPool>,
    outlier_detection: Option<schema::OutlierDetection>,
    /// With the file the setting came from, to resolve its relative paths.
    tls: Option<schema::ClientTlsSettings>,
    /// DestinationRule level, then the subset's (Istio has no port-level form).
    proxy_protocol: Option<schema::UpstreamProxyProtocol>,
}

impl Effective {
    fn merge(policies: &[schema::TrafficPolicy], port: u16) -> Self {
        let mut e = Effective::default();
        for tp in policies {
            e.apply(
                tp.load_balancer.as_ref(),
                tp.connection_pool.as_ref(),
                tp.outlier_detection.as_ref(),
            );
            if let Some(t) = &tp.tls {
                e.tls = Some(t.clone());
            }
            if let Some(pp) = &tp.proxy_protocol {
                e.proxy_protocol = Some(pp.clone());
            }
            for pl in &tp.port_level_settings {
                if pl.port.as_ref().map(|p| p.number) == Some(u32::from(port)) {
                    e.apply(
                        pl.load_balancer.as_ref(),
                        pl.connection_pool.as_ref(),
                        pl.outlier_detection.as_ref(),
                    );
                    if let Some(t) = &pl.tls {
                        e.tls = Some(t.clone());
                    }
                }
            }
        }
        e
    }

    fn apply(
        &mut self,
        lb: Option<&schema::LoadBalancerSettings>,
        cp: Option<&schema::ConnectionPool>,
        od: Option<&schema::OutlierDetection>,
    ) {
        if let Some(lb) = lb {
            self.load_balancer = Some(lb.clone());
        }
        if let Some(cp) = cp {
            self.connection_pool = Some(cp.clone());
        }
        if let Some(od) = od {
            self.outlier_detection = Some(od.clone());
        }
    }
}

/// The connection settings and pool limits of a traffic policy: the connect timeout
/// (`base`, the mesh's, unless the policy sets one), TCP keep-alive and idle timeout, HTTP
/// idle timeout and h2c, requests per connection, and the concurrency, pending and retry
/// limits. TLS and the PROXY header are the caller's (`Cx::cluster`).
fn pool(eff: &Effective, base: Duration, h2c_port: bool) -> (ClusterSettings, Limits) {
    let mut settings = ClusterSettings {
        connect_timeout: base,
        h2c: h2c_port,
        ..ClusterSettings::default()
    };
    let (mut max_conn, mut max_pending, mut max_req, mut max_retries) = (None, None, None, None);
    if let Some(cp) = &eff.connection_pool {
        if let Some(t) = &cp.tcp {
            if let Some(ct) = t.connect_timeout {
                settings.connect_timeout = ct.get();
            }
            max_conn = t.max_connections.filter(|n| *n > 0);
            if let Some(idle) = t.idle_timeout {
                // Istio: 0s turns the idle timeout off.
                settings.tcp_idle_timeout = Some(idle.get()).filter(|d| !d.is_zero());
            }
            if let Some(k) = &t.tcp_keepalive {
                settings.tcp_keepalive = Some(pingora::protocols::TcpKeepalive {
                    idle: k.time.map(|d| d.get()).unwrap_or(Duration::from_secs(7200)),
                    interval: k
                        .interval
                        .map(|d| d.get())
                        .unwrap_or(Duration::from_secs(75)),
                    count: k.probes.unwrap_or(9) as usize,
                    #[cfg(target_os = "linux")]
                    user_timeout: Duration::ZERO,
                });
            }
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
            max_pending = h.http1_max_pending_requests.filter(|n| *n > 0);
            max_req = h.http2_max_requests.filter(|n| *n > 0);
            max_retries = h.max_retries.filter(|n| *n > 0);
            settings.max_requests_per_connection = h.max_requests_per_connection.filter(|n| *n > 0);
        }
    }
    let concurrency = if settings.h2c {
        max_req
    } else {
        match (max_conn, max_req) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    (settings, Limits::new(concurrency, max_pending, max_retries))
}

/// The attributes of the cookie the gateway sets for `httpCookie` with a ttl: `Path` (`/`
/// unless set), `Max-Age` (none for a ttl of 0: a session cookie, as Envoy makes it), and
/// `HttpOnly`.
fn cookie_attributes(path: Option<&str>, ttl: std::time::Duration) -> Box<str> {
    let mut a = format!("; Path={}", path.unwrap_or("/"));
    if !ttl.is_zero() {
        a.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    a.push_str("; HttpOnly");
    a.into()
}

/// The balancer for a cluster; Istio's default is LEAST_REQUEST. Settings were validated
/// with the DestinationRule.
fn load_balancer(
    lb: Option<&schema::LoadBalancerSettings>,
    endpoints: &[crate::upstream::Endpoint],
) -> Policy {
    let Some(lb) = lb else {
        return Policy::LeastRequest;
    };
    if let Some(ch) = &lb.consistent_hash {
        let source = if let Some(h) = &ch.http_header_name {
            match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                Ok(name) => HashSource::Header(name),
                Err(_) => return Policy::LeastRequest,
            }
        } else if let Some(c) = &ch.http_cookie {
            HashSource::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c.ttl.map(|d| d.get()),
                set_attributes: c.ttl.map(|d| cookie_attributes(c.path.as_deref(), d.get())),
            }
        } else if ch.use_source_ip == Some(true) {
            HashSource::SourceIp
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashSource::Query(q.clone())
        } else {
            return Policy::LeastRequest;
        };
        let table = match &ch.maglev {
            Some(m) => HashTable::maglev(endpoints, m.table_size.unwrap_or(65537)),
            None => {
                let size = ch
                    .ring_hash
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    .unwrap_or(1024)
                    .clamp(1, 1 << 23);
                HashTable::ring(endpoints, size)
            }
        };
        return Policy::Hash { source, table };
    }
    match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => Policy::RoundRobin(std::sync::atomic::AtomicUsize::new(0)),
        Some("RANDOM") => Policy::Random,
        Some("PEAK_EWMA") => Policy::PeakEwma,
        _ => Policy::LeastRequest,
    }
}

impl Cx {
    pub(super) fn cluster(
        &mut self,
        o: &Origin,
        at: &str,
        d: &schema::Destination,
    ) -> Option<Arc<Cluster>> {
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
        let service = self.registry.service(&host).cloned();
        let (port, h2c_port, endpoints) = match &service {
            Some(se) => {
                let sp = match requested_port {
                    Some(p) => se.ports.iter().find(|sp| sp.number == p),
                    None if se.ports.len() == 1 => se.ports.first(),
                    None => {
                        self.err(
                            o,
                            &format!("{at}.port"),
                            format!(
                                "host {host} has several ports in ServiceEntry {}; name one",
                                se.name
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
                            se.name
                        ),
                    );
                    return None;
                };
                let mut eps = Vec::new();
                match se.resolution {
                    Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin
                        if !se.endpoints.is_empty() =>
                    {
                        for ep in &se.endpoints {
                            if !labels.iter().all(|(k, v)| ep.labels.get(k) == Some(v)) {
                                continue;
                            }
                            match &ep.address {
                                EndpointAddress::Ip(ip) => {
                                    eps.push(SocketAddr::new(*ip, sp.of(ep)))
                                }
                                EndpointAddress::Name(n) => {
                                    eps.extend(self.resolve(o, at, n, sp.of(ep)))
                                }
                            }
                        }
                    }
                    Resolution::Static => {}
                    Resolution::None | Resolution::Dns | Resolution::DnsRoundRobin => {
                        if host.starts_with('*') {
                            self.warn(
                                o,
                                at,
                                format!(
                                    "wildcard host {host} cannot be resolved; it has no endpoints"
                                ),
                            );
                        } else if labels.is_empty() {
                            eps.extend(self.resolve(o, at, &host, sp.target));
                        }
                    }
                }
                (sp.number, sp.h2c, eps)
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
        self.touched.push(name.clone());
        if let Some(c) = self.clusters.get(&name) {
            return Some(c.clone());
        }
        // Compiled last time from the same rules and answers: keep it (and its state, such
        // as requests in flight and ejections) rather than build a twin.
        if let Some(c) = self.reuse.as_ref().and_then(|r| r.clusters.get(&name)) {
            let c = c.clone();
            // Its certificate files stay watched, or a later rotation would go unseen.
            if let Some(t) = &c.settings.tls {
                self.watched.extend(t.files.iter().cloned());
            }
            self.clusters.insert(name, c.clone());
            return Some(c);
        }
        let eff = Effective::merge(&policies, port);
        let base = self
            .settings
            .as_ref()
            .map(|s| s.connect_timeout)
            .unwrap_or(Duration::from_secs(10));
        let (mut settings, limits) = pool(&eff, base, h2c_port);
        if let (Some(t), Some(r)) = (&eff.tls, &rule) {
            // The ServiceEntry's subjectAltNames when the DestinationRule names none (and
            // verifies at all).
            let mut t = t.clone();
            if t.subject_alt_names.is_empty() && t.insecure_skip_verify != Some(true) {
                if let Some(se) = &service {
                    t.subject_alt_names = se.subject_alt_names.clone();
                }
            }
            match self.upstream_tls(&r.origin, &t, &host, port, subset) {
                Ok(tls) => settings.tls = tls.map(Arc::new),
                Err(e) => {
                    match e.strip_prefix("caCrl: ") {
                        Some(why) => self.err(&r.origin, ".trafficPolicy.tls.caCrl", why),
                        None => self.err(&r.origin, ".trafficPolicy.tls", e),
                    }
                    return None;
                }
            }
        }
        // Validated with the DestinationRule (`check_policy`); Istio's default is V1.
        settings.proxy_protocol =
            eff.proxy_protocol
                .as_ref()
                .map(|pp| match pp.version.as_deref() {
                    Some("V2") => crate::upstream::proxy_protocol::Version::V2,
                    _ => crate::upstream::proxy_protocol::Version::V1,
                });
        let outlier = eff.outlier_detection.as_ref().map(|od| OutlierPolicy {
            consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: od.consecutive_gateway_errors.unwrap_or(0),
            base_ejection: od
                .base_ejection_time
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: od.max_ejection_percent.unwrap_or(10).min(100),
            min_health_percent: od.min_health_percent.unwrap_or(0).min(100),
        });
        let mut cluster = Cluster::new(&host, port, subset, endpoints, settings);
        cluster.policy = load_balancer(eff.load_balancer.as_ref(), &cluster.endpoints);
        cluster.limits = limits;
        cluster.outlier = outlier;
        let cluster = Arc::new(cluster);
        self.clusters.insert(name, cluster.clone());
        Some(cluster)
    }

    /// What the DestinationRule of `host` (if any) sets for forward-proxied traffic to its
    /// `port` (`egress::forward`): the connection settings and limits of [`pool`], with
    /// `base` (the mesh's) as the connect timeout unless the rule sets one.
    pub(super) fn egress_pool(
        &self,
        host: &str,
        port: u16,
        base: Duration,
    ) -> (ClusterSettings, Limits) {
        let policies: Vec<_> = self
            .registry
            .rules
            .get(host)
            .and_then(|r| r.spec.traffic_policy.clone())
            .into_iter()
            .collect();
        pool(&Effective::merge(&policies, port), base, false)
    }

    /// DestinationRule `tls` → the settings pingora's connector needs; files are read here.
    fn upstream_tls(
        &mut self,
        o: &Origin,
        t: &schema::ClientTlsSettings,
        host: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Result<Option<crate::upstream::UpstreamTls>, String> {
        let mutual = match t.mode.as_deref() {
            None | Some("DISABLE") => return Ok(None),
            Some("SIMPLE") => false,
            Some("MUTUAL") => true,
            Some("ISTIO_MUTUAL") => return self.istio_mutual_upstream(o, t, host, port, subset),
            Some(other) => {
                return Err(format!(
                    "unknown mode {other:?} (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"
                ))
            }
        };
        let cred_dir = t
            .credential_name
            .as_ref()
            .map(|n| self.credentials_dir.join(n));
        let ca_path = match (&t.ca_certificates, &cred_dir) {
            (Some(ca), _) => Some(o.file.resolve(ca)),
            (None, Some(dir)) if dir.join("ca.crt").exists() => Some(dir.join("ca.crt")),
            _ => None,
        };
        // `caCrl`, else the credential's `ca.crl` (Istio's `ca.crl` secret key).
        let crl_path = match (&t.ca_crl, &cred_dir) {
            (Some(crl), _) => Some(o.file.resolve(crl)),
            (None, Some(dir)) if dir.join("ca.crl").exists() => Some(dir.join("ca.crl")),
            _ => None,
        };
        let mut files = Vec::new();
        let client = if mutual {
            let (cert, key) = match (&t.client_certificate, &t.private_key, &cred_dir) {
                (Some(c), Some(k), _) => (o.file.resolve(c), o.file.resolve(k)),
                (None, None, Some(dir)) => (dir.join("tls.crt"), dir.join("tls.key")),
                _ => {
                    return Err(
                        "MUTUAL needs clientCertificate and privateKey, or credentialName".into(),
                    )
                }
            };
            files.push(cert.clone());
            files.push(key.clone());
            self.watched.extend([cert.clone(), key.clone()]);
            Some(tls::load_client_cert(&cert, &key)?)
        } else {
            None
        };
        let sni = t.sni.clone().unwrap_or_else(|| host.to_string());
        let verify = !t.insecure_skip_verify.unwrap_or(false);
        if !verify {
            for (field, on) in [
                ("subjectAltNames", !t.subject_alt_names.is_empty()),
                ("caCrl", t.ca_crl.is_some()),
            ] {
                if on {
                    self.warn(
                        o,
                        &format!(".trafficPolicy.tls.{field}"),
                        "ignored: insecureSkipVerify = true verifies nothing",
                    );
                }
            }
        }
        let checked = self.upstream_verifier(
            ca_path.as_deref(),
            crl_path.as_deref(),
            &t.subject_alt_names,
            verify,
            true,
            &mut files,
        )?;
        let group_key = crate::upstream::balancer::hash_bytes(
            format!(
                "{}|{sni}|{}",
                checked.key,
                t.client_certificate.as_deref().unwrap_or("")
            )
            .as_bytes(),
        );
        Ok(Some(crate::upstream::UpstreamTls {
            sni,
            verifier: checked.verifier,
            client,
            group_key,
            files,
        }))
    }

    /// The verifier of a TLS cluster's upstream certificates from its CA (the system's
    /// roots when `None`), CRL and names (`verify` false: none, `insecureSkipVerify`), and
    /// what tells it apart from another cluster's (its part of the pool key: the files'
    /// contents, so a rotated CA or CRL starts new connections). Read files are watched.
    fn upstream_verifier(
        &mut self,
        ca_path: Option<&Path>,
        crl_path: Option<&Path>,
        sans: &[String],
        verify: bool,
        check_sni: bool,
        files: &mut Vec<PathBuf>,
    ) -> Result<CheckedUpstream, String> {
        let mut key = format!("verify={verify}|sni={check_sni}|sans={sans:?}");
        let ca = match ca_path {
            Some(p) => {
                files.push(p.to_path_buf());
                self.watched.push(p.to_path_buf());
                let certs = tls::pem_certs(p)?;
                key.push_str(&format!(
                    "|ca={}",
                    digest_ders(certs.iter().map(|c| c.as_ref()))
                ));
                Some(certs)
            }
            None => None,
        };
        let crls = match crl_path {
            Some(p) => {
                files.push(p.to_path_buf());
                self.watched.push(p.to_path_buf());
                let crls = crate::tls::client_auth::crls(p).map_err(|e| format!("caCrl: {e}"))?;
                key.push_str(&format!(
                    "|crl={}",
                    digest_ders(crls.iter().map(|c| c.as_ref()))
                ));
                crls
            }
            None => Vec::new(),
        };
        let verifier = if verify {
            Some(
                crate::tls::upstream::verifier(ca.as_deref(), crls, sans.to_vec(), check_sni)
                    .map_err(|e| match ca_path {
                        Some(p) => format!("caCertificates {}: {e}", p.display()),
                        None => e,
                    })?,
            )
        } else {
            None
        };
        Ok(CheckedUpstream { verifier, key })
    }

    /// DestinationRule `ISTIO_MUTUAL`: mutual TLS with the mesh identity
    /// (`mesh.workloadCertificates`), the SNI Istio sends between sidecars
    /// (`outbound_.<port>_.<subset>_.<host>`, unless `sni` is set), and the upstream's chain
    /// verified against the mesh root, and against `caCrl` when set. Its name is not
    /// checked against the SNI: a workload certificate names a SPIFFE identity, not a host.
    /// `subjectAltNames` lists the identities that may serve the host (the
    /// DestinationRule's, else the ServiceEntry's, as Istio takes a service's accounts;
    /// without istiod, only these): the certificate must carry one; without them the
    /// chain alone is checked.
    fn istio_mutual_upstream(
        &mut self,
        o: &Origin,
        t: &schema::ClientTlsSettings,
        host: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Result<Option<crate::upstream::UpstreamTls>, String> {
        let set = [
            ("clientCertificate", t.client_certificate.is_some()),
            ("privateKey", t.private_key.is_some()),
            ("caCertificates", t.ca_certificates.is_some()),
            ("credentialName", t.credential_name.is_some()),
            ("insecureSkipVerify", t.insecure_skip_verify.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, on)| *on) {
            return Err(format!(
                "{field} cannot be set with ISTIO_MUTUAL, which uses the workload certificate (mesh.workloadCertificates)"
            ));
        }
        if let Some(e) = self.workload.missing_error() {
            return Err(e);
        }
        let (chain, key, root) = (
            self.workload.chain.clone(),
            self.workload.key.clone(),
            self.workload.root.clone(),
        );
        let mut files = vec![chain.clone(), key.clone()];
        self.watched.extend(files.iter().cloned());
        let client = tls::load_client_cert(&chain, &key)?;
        let crl = t.ca_crl.as_ref().map(|c| o.file.resolve(c));
        let checked = self.upstream_verifier(
            Some(&root),
            crl.as_deref(),
            &t.subject_alt_names,
            true,
            false,
            &mut files,
        )?;
        let sni = t
            .sni
            .clone()
            .unwrap_or_else(|| format!("outbound_.{port}_.{}_.{host}", subset.unwrap_or("")));
        let group_key = crate::upstream::balancer::hash_bytes(
            format!("istio-mutual|{}|{sni}|{}", chain.display(), checked.key).as_bytes(),
        );
        Ok(Some(crate::upstream::UpstreamTls {
            sni,
            verifier: checked.verifier,
            client: Some(client),
            group_key,
            files,
        }))
    }

    pub(super) fn resolve(
        &mut self,
        o: &Origin,
        at: &str,
        address: &str,
        port: u16,
    ) -> Vec<SocketAddr> {
        if let Ok(ip) = address.parse::<IpAddr>() {
            return vec![SocketAddr::new(ip, port)];
        }
        // The answer the refresher keeps for this name when there is one (so a reload
        // after the answer changed compiles the new addresses), else a lookup now, which
        // then seeds it. A followed name's new answer recompiles (reload::Watcher).
        let lower = address.trim_end_matches('.').to_ascii_lowercase();
        let name = crate::egress::dns::name(&lower);
        let ips = match name.answer() {
            Some(a) => Ok(a.addrs.clone()),
            None => crate::egress::dns::lookup_blocking(&self.dns_servers, &lower).inspect(|ips| {
                if !ips.is_empty() {
                    name.seed(ips.clone());
                }
            }),
        };
        match ips {
            Ok(ips) => {
                name.follow_for_clusters();
                self.dns_names.push(name);
                let mut v: Vec<SocketAddr> = ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect();
                v.sort();
                v.dedup();
                v
            }
            Err(e) => {
                self.warn(o, at, format!("cannot resolve {address}: {e}"));
                Vec::new()
            }
        }
    }
}

/// A TLS cluster's verifier and its part of the connection pool key.
struct CheckedUpstream {
    verifier: Option<Arc<crate::tls::upstream::UpstreamVerifier>>,
    key: String,
}

/// A short digest of DER blobs (certificates, CRLs), for pool keys.
fn digest_ders<'a>(ders: impl Iterator<Item = &'a [u8]>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for d in ders {
        ctx.update(&(d.len() as u64).to_be_bytes());
        ctx.update(d);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}
