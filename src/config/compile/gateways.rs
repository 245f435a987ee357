//! Compiles the Gateways into the listener tables, before any VirtualService is bound:
//! each server's port, address, protocol and hosts, its certificate (files, credential
//! directory, `ISTIO_MUTUAL`'s workload files, ACME) and client-certificate policy, and the
//! per-port tables (SNI certificates, server policies) the listeners serve. Reads
//! certificate files (reusing the last compile's parse of unchanged ones); binds no routes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::binding::ServerHostIndex;
use super::cache::{pair_digest, CachedCert, ClientFile};
use super::{key, Cx};
use crate::config::load::{Document, Origin};
use crate::config::schema;
use crate::l4::{L4Kind, L4Route, SniRoute};
use crate::routing::{HostMatcher, Route, ServerPolicy};
use crate::tls::client_auth::{self, ClientAuth, ClientAuthStore};
use crate::tls::{self, CertStore, ServerCert};

/// `mesh.workloadCertificates` as absolute paths: the mesh identity `ISTIO_MUTUAL` uses
/// on both sides (a Gateway server's certificate and client CA; a DestinationRule's client
/// certificate and upstream CA). Istio's istiod issues these over SDS; here they are files,
/// rotated as any other certificate file is (watched, reloaded on change).
pub(super) struct WorkloadFiles {
    pub(super) chain: PathBuf,
    pub(super) key: PathBuf,
    pub(super) root: PathBuf,
}

impl WorkloadFiles {
    pub(super) fn of(doc: &Document) -> WorkloadFiles {
        let w = doc
            .mesh
            .spec
            .workload_certificates
            .clone()
            .unwrap_or_default();
        let at = |v: Option<String>, default: &str| match v {
            Some(p) => doc.main.resolve(&p),
            None => PathBuf::from(default),
        };
        WorkloadFiles {
            chain: at(w.cert_chain, "/etc/certs/cert-chain.pem"),
            key: at(w.private_key, "/etc/certs/key.pem"),
            root: at(w.root_cert, "/etc/certs/root-cert.pem"),
        }
    }

    /// The first of the three files that does not exist, with its field name.
    fn missing(&self) -> Option<(&'static str, &Path)> {
        [
            ("certChain", &self.chain),
            ("privateKey", &self.key),
            ("rootCert", &self.root),
        ]
        .into_iter()
        .find(|(_, p)| !p.exists())
        .map(|(f, p)| (f, p.as_path()))
    }

    pub(super) fn missing_error(&self) -> Option<String> {
        self.missing().map(|(field, path)| {
            format!(
                "ISTIO_MUTUAL uses the workload certificate files of mesh.workloadCertificates; {field} {} does not exist",
                path.display()
            )
        })
    }

    /// A Gateway server's `ISTIO_MUTUAL` as the `MUTUAL` it stands for: the workload
    /// certificate as the server's, the mesh root as the client CA. The server's own
    /// certificate fields are ignored (Istio ignores them too), with a warning.
    fn server_tls(&self, t: &schema::ServerTls) -> (schema::ServerTls, Vec<&'static str>) {
        let ignored = [
            ("credentialName", t.credential_name.is_some()),
            ("serverCertificate", t.server_certificate.is_some()),
            ("privateKey", t.private_key.is_some()),
            ("caCertificates", t.ca_certificates.is_some()),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(f, _)| f)
        .collect();
        let mut out = t.clone();
        out.mode = Some("MUTUAL".into());
        out.credential_name = None;
        out.server_certificate = Some(self.chain.to_string_lossy().into_owned());
        out.private_key = Some(self.key.to_string_lossy().into_owned());
        out.ca_certificates = Some(self.root.to_string_lossy().into_owned());
        (out, ignored)
    }
}

pub(super) struct GatewayInfo {
    pub(super) servers: Vec<ServerInfo>,
    /// Built when the first VirtualService binds to the gateway; cached with it.
    pub(super) index: std::sync::OnceLock<ServerHostIndex>,
}

pub(super) struct ServerInfo {
    pub(super) port: u16,
    pub(super) bind: IpAddr,
    pub(super) tls: bool,
    pub(super) h2c: bool,
    pub(super) forward_proxy: bool,
    /// TLS passthrough or TCP: routed by `tls` / `tcp` routes, no HTTP.
    pub(super) l4: Option<L4Kind>,
    /// `tls.mode = AUTO_PASSTHROUGH`: names `outbound_.<port>_.<subset>_.<host>` are
    /// routed to that cluster without a VirtualService (`Cx::auto_passthrough`).
    pub(super) auto_passthrough: bool,
    pub(super) hosts: Vec<String>,
    pub(super) https_redirect: bool,
    pub(super) cert: Option<Arc<ServerCert>>,
    /// MUTUAL / OPTIONAL_MUTUAL: the client-certificate policy.
    pub(super) client_auth: Option<Arc<ClientAuth>>,
    pub(super) default_cert: bool,
    pub(super) origin: Origin,
    pub(super) path: String,
}

/// The tables are `Arc`s so that the gateway cache and the Snapshot share them; a change
/// (passthrough routes into `sni`) copies the cached one first.
#[derive(Clone)]
pub(super) struct ListenerBuild {
    pub(super) addr: SocketAddr,
    pub(super) tls: bool,
    pub(super) h2c: bool,
    pub(super) forward_proxy: bool,
    pub(super) l4: Option<L4Kind>,
    /// Passthrough routes by SNI, and the names HTTPS servers on the same port terminate.
    pub(super) sni: Arc<HostMatcher<SniRoute>>,
    pub(super) tcp: Option<Arc<L4Route>>,
    pub(super) servers: Arc<HostMatcher<ServerPolicy>>,
    pub(super) certs: Arc<CertStore>,
    /// Client-certificate policies by host, when a server on the port asks for one.
    pub(super) client_auth: Arc<ClientAuthStore>,
    pub(super) mutual: bool,
    pub(super) default_from: Option<String>,
    /// Hashed: a reload of a 10 000-host config inserts every domain again.
    pub(super) vhosts: foldhash::HashMap<String, VhostBuild>,
}

#[derive(Default, Clone)]
pub(super) struct VhostBuild {
    /// The routes each binding brought, with the key of the VirtualService that brought
    /// them, in binding order (one per VirtualService host that lands on this domain).
    pub(super) parts: Vec<(usize, Arc<[Arc<Route>]>)>,
}

impl Cx {
    pub(super) fn credentials_dir(doc: &Document) -> PathBuf {
        match &doc.mesh.spec.credentials_dir {
            Some(d) => doc.main.resolve(d),
            None => doc.main.dir().join("certs"),
        }
    }

    pub(super) fn gateways(&mut self, doc: &Document) -> HashMap<String, GatewayInfo> {
        let creds = self.credentials_dir.clone();
        let self_signed = doc.mesh.spec.self_signed_when_missing.unwrap_or(false);
        let mut out = HashMap::new();
        for (gi, gw) in doc.gateways.iter().enumerate() {
            let (g, o) = (&gw.spec, &gw.origin);
            let k = key(&g.namespace, &g.name);
            if g.servers.is_empty() {
                self.err(o, ".servers", "a Gateway needs at least one server");
            }
            // Istio's egress gateways are the Gateways that select `istio: egressgateway`;
            // their plain-HTTP servers are Portico's forward proxies.
            let egress = g.selector.get("istio").map(String::as_str) == Some("egressgateway");
            let mut servers = Vec::new();
            for (si, s) in g.servers.iter().enumerate() {
                let at = format!(".servers[{si}]");
                if let Some(mut info) = self.server(o, &at, s, &creds, self_signed) {
                    info.forward_proxy = egress && !info.tls && !info.h2c;
                    servers.push(info);
                }
            }
            if out
                .insert(
                    k.clone(),
                    GatewayInfo {
                        servers,
                        index: Default::default(),
                    },
                )
                .is_some()
            {
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
        let l4 = self.l4_kind(o, at, &protocol, s.tls.as_ref());
        let auto_passthrough = l4 == Some(L4Kind::Passthrough)
            && s.tls
                .as_ref()
                .and_then(|t| t.mode.as_deref())
                .is_some_and(|m| m.eq_ignore_ascii_case("AUTO_PASSTHROUGH"));
        let (tls, h2c) = match protocol.as_str() {
            _ if l4.is_some() => (false, false),
            "HTTP" | "GRPC-WEB" => (false, false),
            "HTTP2" | "GRPC" => (false, true),
            "HTTPS" => (true, false),
            "TCP" | "TLS" | "MONGO" => return None, // l4_kind said why
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
            forward_proxy: false,
            l4,
            auto_passthrough,
            hosts,
            https_redirect: false,
            cert: None,
            client_auth: None,
            default_cert: false,
            origin: o.clone(),
            path: format!("{}{at}", o.path),
        };
        if l4.is_some() {
            return Some(info);
        }
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
                    && t.credential_name.is_none()
                    && t.acme.is_none();
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
                let istio_mutual;
                let t = if t.mode.as_deref() == Some("ISTIO_MUTUAL") {
                    if let Some(e) = self.workload.missing_error() {
                        self.err(o, &format!("{at}.tls.mode"), e);
                        return None;
                    }
                    let (tls, ignored) = self.workload.server_tls(t);
                    for field in ignored {
                        self.warn(
                            o,
                            &format!("{at}.tls.{field}"),
                            "ignored with ISTIO_MUTUAL: the server presents the workload certificate (mesh.workloadCertificates)",
                        );
                    }
                    istio_mutual = tls;
                    &istio_mutual
                } else {
                    t
                };
                info.cert =
                    self.server_cert(o, &format!("{at}.tls"), t, &info.hosts, creds, self_signed);
                info.client_auth =
                    self.client_auth(o, &format!("{at}.tls"), t, creds, info.cert.as_deref());
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
            Some("SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") => {}
            None => {
                self.err(
                    o,
                    &format!("{at}.mode"),
                    "tls.mode defaults to PASSTHROUGH in Istio; set mode = \"SIMPLE\" to terminate TLS (PASSTHROUGH is not supported yet)",
                );
                return None;
            }
            Some(m @ ("PASSTHROUGH" | "AUTO_PASSTHROUGH")) => {
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
        if t.acme.is_some() {
            return self.acme_server_cert(o, at, t, hosts, creds, require_tls13);
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
        // The stamps say whether the files exist (no stamp: no file) without two more
        // system calls per server.
        let missing =
            || self.stamps.of(&cert_path).is_none() || self.stamps.of(&key_path).is_none();
        if self_signed && missing() {
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
        match self.load_pair(&cert_path, &key_path) {
            Ok((key, not_after, subject)) => Some(Arc::new(ServerCert {
                key,
                require_tls13,
                cert_path,
                not_after,
                subject,
                stand_in: false,
            })),
            Err(e) => {
                self.err(o, &format!("{at}{field}"), e);
                None
            }
        }
    }

    /// MUTUAL / OPTIONAL_MUTUAL: the client CA (`caCertificates`, else the CA credential's
    /// `ca.crt`: `caCertCredentialName`, `credentialName`'s own, or
    /// `<credentialName>-cacert`), the CRL (`caCrl`, else the credential's `ca.crl`), the
    /// names and pins. SIMPLE with client settings: a warning, they are not used.
    pub(super) fn client_auth(
        &mut self,
        o: &Origin,
        at: &str,
        t: &schema::ServerTls,
        creds: &Path,
        cert: Option<&ServerCert>,
    ) -> Option<Arc<ClientAuth>> {
        let mandatory = match t.mode.as_deref() {
            Some("MUTUAL") => true,
            Some("OPTIONAL_MUTUAL") => false,
            _ => {
                let set = [
                    ("caCertificates", t.ca_certificates.is_some()),
                    ("caCrl", t.ca_crl.is_some()),
                    ("caCertCredentialName", t.ca_cert_credential_name.is_some()),
                    ("subjectAltNames", !t.subject_alt_names.is_empty()),
                    (
                        "verifyCertificateSpki",
                        !t.verify_certificate_spki.is_empty(),
                    ),
                    (
                        "verifyCertificateHash",
                        !t.verify_certificate_hash.is_empty(),
                    ),
                ];
                for (field, _) in set.iter().filter(|(_, on)| *on) {
                    self.warn(
                        o,
                        &format!("{at}.{field}"),
                        "ignored: only tls.mode MUTUAL or OPTIONAL_MUTUAL asks for a client certificate",
                    );
                }
                return None;
            }
        };
        let mut checks = client_auth::Checks {
            sans: t.subject_alt_names.clone(),
            ..Default::default()
        };
        let mut bad = false;
        for (i, h) in t.verify_certificate_hash.iter().enumerate() {
            match client_auth::parse_hash(h) {
                Some(pin) => checks.hashes.push(pin),
                None => {
                    bad = true;
                    self.err(
                        o,
                        &format!("{at}.verifyCertificateHash[{i}]"),
                        "not a hex SHA-256 (64 hex digits, colons allowed)",
                    )
                }
            }
        }
        for (i, h) in t.verify_certificate_spki.iter().enumerate() {
            match client_auth::parse_spki(h) {
                Some(pin) => checks.spki.push(pin),
                None => {
                    bad = true;
                    self.err(
                        o,
                        &format!("{at}.verifyCertificateSpki[{i}]"),
                        "not a base64 SHA-256 of a SubjectPublicKeyInfo",
                    )
                }
            }
        }
        // Where the CA (and the CRL) come from, and the field to blame.
        let ca_credential = t
            .ca_cert_credential_name
            .as_ref()
            .map(|n| (creds.join(n), ".caCertCredentialName"))
            .or_else(|| {
                let name = t.credential_name.as_ref()?;
                let own = creds.join(name);
                let separate = creds.join(format!("{name}-cacert"));
                let own_stamp = self.stamps.of(&own.join("ca.crt"));
                self.client_files.push(ClientFile {
                    path: own.join("ca.crt"),
                    stamp: own_stamp,
                    read_at: std::time::SystemTime::now(),
                });
                self.watched.push(own.join("ca.crt"));
                Some(if own_stamp.is_some() {
                    (own, ".credentialName")
                } else {
                    (separate, ".credentialName")
                })
            });
        let (ca_path, ca_field) = match (&t.ca_certificates, &ca_credential) {
            (Some(ca), _) => (o.file.resolve(ca), ".caCertificates"),
            (None, Some((dir, field))) => {
                let ca = dir.join("ca.crt");
                if self.stamps.of(&ca).is_none() {
                    self.watched.push(ca.clone());
                    self.client_files.push(ClientFile {
                        path: ca.clone(),
                        stamp: None,
                        read_at: std::time::SystemTime::now(),
                    });
                    self.err(
                        o,
                        &format!("{at}{field}"),
                        format!(
                            "tls.mode {} needs the client CA: {} does not exist (set caCertificates, or put the CA there)",
                            t.mode.as_deref().unwrap_or(""),
                            ca.display()
                        ),
                    );
                    return None;
                }
                (ca, *field)
            }
            (None, None) => {
                self.err(
                    o,
                    &format!("{at}.mode"),
                    format!(
                        "tls.mode {} requires a client CA bundle: set caCertificates, or credentialName with a ca.crt",
                        t.mode.as_deref().unwrap_or("")
                    ),
                );
                return None;
            }
        };
        let (crl_path, crl_field) = match (&t.ca_crl, &ca_credential) {
            (Some(crl), _) => (Some(o.file.resolve(crl)), ".caCrl"),
            (None, Some((dir, field))) if t.ca_certificates.is_none() => {
                let p = dir.join("ca.crl");
                let stamp = self.stamps.of(&p);
                self.client_files.push(ClientFile {
                    path: p.clone(),
                    stamp,
                    read_at: std::time::SystemTime::now(),
                });
                self.watched.push(p.clone());
                (stamp.is_some().then_some(p), *field)
            }
            _ => (None, ".caCrl"),
        };
        for p in std::iter::once(&ca_path).chain(&crl_path) {
            let stamp = self.stamps.of(p);
            self.client_files.push(ClientFile {
                path: p.clone(),
                stamp,
                read_at: std::time::SystemTime::now(),
            });
            self.watched.push(p.clone());
        }
        if bad {
            return None;
        }
        let server_cert = cert.and_then(|c| c.key.cert.first());
        let empty = rustls_pki_types::CertificateDer::from(Vec::new());
        let built = client_auth::build(
            &ca_path,
            crl_path.as_deref(),
            checks,
            mandatory,
            server_cert.unwrap_or(&empty),
        );
        match built {
            Ok(auth) => Some(Arc::new(auth)),
            Err(e) => {
                let field = if e.contains("CRL") {
                    crl_field
                } else {
                    ca_field
                };
                self.err(o, &format!("{at}{field}"), e);
                None
            }
        }
    }

    /// Whether `load_pair` would take this pair from the last compile without reading it.
    pub(super) fn pair_unchanged(&self, cert_path: &Path, key_path: &Path) -> bool {
        let paths = (cert_path.to_path_buf(), key_path.to_path_buf());
        let stamps = (self.stamps.of(cert_path), self.stamps.of(key_path));
        self.certs_prev
            .get(&paths)
            .is_some_and(|c| c.unchanged(&stamps))
    }

    /// `tls::load_pair`, reusing the last compile's result for files with the same content.
    pub(super) fn load_pair(
        &mut self,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(Arc<rustls::sign::CertifiedKey>, i64, String), String> {
        let paths = (cert_path.to_path_buf(), key_path.to_path_buf());
        self.pairs_used.push(paths.clone());
        let stamps = (self.stamps.of(cert_path), self.stamps.of(key_path));
        let read_at = std::time::SystemTime::now();
        let mut cached = self
            .certs_prev
            .remove(&paths)
            .or_else(|| self.certs_next.remove(&paths));
        if let Some(c) = cached.take_if(|c| c.unchanged(&stamps)) {
            let out = (c.key.clone(), c.not_after, c.subject.clone());
            self.certs_next.insert(paths, c);
            return Ok(out);
        }
        let (cert_pem, key_pem) = tls::read_pair(cert_path, key_path)?;
        let digest = pair_digest(&cert_pem, &key_pem);
        let hit = cached.filter(|c| c.digest == digest).map(|c| CachedCert {
            stamps,
            read_at,
            ..c
        });
        let c = match hit {
            Some(c) => c,
            None => {
                let (key, not_after, subject) =
                    tls::pair_from_pem(cert_path, &cert_pem, key_path, &key_pem)?;
                CachedCert {
                    stamps,
                    read_at,
                    digest,
                    key: Arc::new(key),
                    not_after,
                    subject,
                }
            }
        };
        let out = (c.key.clone(), c.not_after, c.subject.clone());
        self.certs_next.insert(paths, c);
        Ok(out)
    }

    pub(super) fn listeners(
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
                forward_proxy: s.forward_proxy,
                l4: s.l4,
                sni: Arc::default(),
                tcp: None,
                servers: Arc::default(),
                certs: Arc::default(),
                client_auth: Arc::default(),
                mutual: false,
                default_from: None,
                vhosts: foldhash::HashMap::default(),
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
            // HTTPS and PASSTHROUGH servers share a port: the SNI decides, per connection,
            // whether TLS is terminated or passed through.
            let passthrough = Some(L4Kind::Passthrough);
            let tls_mix = (l.tls || l.l4 == passthrough) && (s.tls || s.l4 == passthrough);
            if tls_mix {
                l.tls |= s.tls;
                l.l4 = l.l4.or(s.l4);
            } else if l.tls != s.tls || l.h2c != s.h2c || l.l4 != s.l4 {
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
            if l.forward_proxy != s.forward_proxy {
                self.err(
                    &s.origin,
                    &format!("{at}.port.number"),
                    format!(
                        "port {} is shared by an egress gateway (selector istio = \"egressgateway\", a forward proxy) and another gateway; give them separate ports",
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
                Arc::make_mut(&mut l.servers).insert(
                    h,
                    ServerPolicy {
                        https_redirect: s.https_redirect,
                        server: s.path.clone(),
                    },
                );
                if let Some(cert) = &s.cert {
                    Arc::make_mut(&mut l.certs).hosts.insert(h, cert.clone());
                }
                if s.tls {
                    Arc::make_mut(&mut l.client_auth)
                        .hosts
                        .insert(h, s.client_auth.clone());
                    l.mutual |= s.client_auth.is_some();
                }
                if s.tls {
                    Arc::make_mut(&mut l.sni).insert(h, SniRoute::Terminate);
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
                    Arc::make_mut(&mut l.certs).default = Some(cert.clone());
                    Arc::make_mut(&mut l.client_auth).default = s.client_auth.clone();
                }
            }
        }
        out
    }
}
