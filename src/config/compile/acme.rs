//! Compiles ACME settings (`mesh.acmeIssuers`, a server's `tls.acme`) into the
//! certificates Portico orders itself (`tls::acme::ManagedCert`), and the server's
//! certificate while it does: the one issued before (read from the credentials layout),
//! or a stand-in, or none.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use base64::Engine;

use super::gateways::ListenerBuild;
use super::Cx;
use crate::config::load::{Document, Origin};
use crate::config::schema;
use crate::tls::acme::{
    AcmeHosts, ChallengeKind, Eab, Issuer, KeyType, ManagedCert, WhilePending, STATE_DIR,
};
use crate::tls::ServerCert;

/// A `mesh.acmeIssuers` entry with where it was written.
#[derive(Clone)]
pub(super) struct NamedIssuer {
    spec: schema::Acme,
    origin: Origin,
    at: String,
}

impl Cx {
    /// `mesh.acmeIssuers` by name, each checked on its own (so an unused one with an error
    /// is reported too).
    pub(super) fn acme_issuers(&mut self, doc: &Document) -> HashMap<String, NamedIssuer> {
        let o = &doc.mesh.origin;
        let mut out = HashMap::new();
        for (i, a) in doc.mesh.spec.acme_issuers.iter().enumerate() {
            let at = format!(".acmeIssuers[{i}]");
            let Some(name) = a.name.clone().filter(|n| !n.is_empty()) else {
                self.err(o, &format!("{at}.name"), "an ACME issuer needs a name");
                continue;
            };
            if a.issuer.is_some() {
                self.err(
                    o,
                    &format!("{at}.issuer"),
                    "issuer refers to a mesh.acmeIssuers entry from a server's tls.acme; an issuer cannot refer to another",
                );
            }
            let named = NamedIssuer {
                spec: a.clone(),
                origin: o.clone(),
                at: at.clone(),
            };
            self.acme_issuer(&name, None, &named, o, &at);
            if out.insert(name.clone(), named).is_some() {
                self.err(
                    o,
                    &format!("{at}.name"),
                    format!("ACME issuer {name} is defined twice"),
                );
            }
        }
        out
    }

    /// Compiles an issuer: `own` (a server's `tls.acme`, at `o` + `at`) over `base`'s
    /// fields, or `base` alone.
    fn acme_issuer(
        &mut self,
        name: &str,
        own: Option<&schema::Acme>,
        base: &NamedIssuer,
        o: &Origin,
        at: &str,
    ) -> Option<Issuer> {
        let errors = self.errors.len();
        // A field and where it was written: the server's own, else the issuer's.
        let pick = |f: fn(&schema::Acme) -> Option<&String>| {
            own.and_then(f)
                .map(|v| (v.clone(), o.clone(), at.to_string()))
                .or_else(|| {
                    f(&base.spec).map(|v| (v.clone(), base.origin.clone(), base.at.clone()))
                })
        };
        let directory = match pick(|a| a.directory.as_ref()) {
            Some((d, _, _)) if d.starts_with("https://") => d,
            Some((d, o2, at2)) => {
                self.err(
                    &o2,
                    &format!("{at2}.directory"),
                    format!("{d:?} is not an https URL (ACME servers speak HTTPS only)"),
                );
                String::new()
            }
            None => {
                self.err(
                    o,
                    &format!("{at}.directory"),
                    "set the CA's ACME directory URL (or issuer = \"NAME\" of a mesh.acmeIssuers entry)",
                );
                String::new()
            }
        };
        let agreed = own
            .and_then(|a| a.terms_of_service_agreed)
            .or(base.spec.terms_of_service_agreed);
        if agreed != Some(true) {
            self.err(
                o,
                &format!("{at}.termsOfServiceAgreed"),
                "the CA's terms of service must be agreed to before it issues anything: set termsOfServiceAgreed = true",
            );
        }
        let contact = match pick(|a| a.email.as_ref()) {
            None => Vec::new(),
            Some((e, _, _)) if e.contains('@') && !e.contains(char::is_whitespace) => {
                vec![format!("mailto:{}", e.trim_start_matches("mailto:"))]
            }
            Some((e, o2, at2)) => {
                self.err(
                    &o2,
                    &format!("{at2}.email"),
                    format!("{e:?} is not an email address"),
                );
                Vec::new()
            }
        };
        let key_type = match pick(|a| a.key_type.as_ref()) {
            None => KeyType::EcdsaP256,
            Some((k, o2, at2)) => match k.as_str() {
                "ECDSA_P256" => KeyType::EcdsaP256,
                "ECDSA_P384" => KeyType::EcdsaP384,
                "RSA_2048" => KeyType::Rsa2048,
                other => {
                    self.err(
                        &o2,
                        &format!("{at2}.keyType"),
                        format!("unknown keyType {other:?}; ECDSA_P256, ECDSA_P384 or RSA_2048"),
                    );
                    KeyType::EcdsaP256
                }
            },
        };
        let challenge = match pick(|a| a.challenge.as_ref()) {
            None => ChallengeKind::Http01,
            Some((c, o2, at2)) => match c.to_ascii_uppercase().as_str() {
                "HTTP-01" => ChallengeKind::Http01,
                "TLS-ALPN-01" => ChallengeKind::TlsAlpn01,
                "DNS-01" => {
                    self.err(
                        &o2,
                        &format!("{at2}.challenge"),
                        "DNS-01 is not supported; use HTTP-01 or TLS-ALPN-01",
                    );
                    ChallengeKind::Http01
                }
                other => {
                    self.err(
                        &o2,
                        &format!("{at2}.challenge"),
                        format!("unknown challenge {other:?}; HTTP-01 or TLS-ALPN-01"),
                    );
                    ChallengeKind::Http01
                }
            },
        };
        let while_pending = match pick(|a| a.while_pending.as_ref()) {
            None => WhilePending::SelfSigned,
            Some((w, o2, at2)) => match w.as_str() {
                "SELF_SIGNED" => WhilePending::SelfSigned,
                "REFUSE" => WhilePending::Refuse,
                other => {
                    self.err(
                        &o2,
                        &format!("{at2}.whilePending"),
                        format!("unknown whilePending {other:?}; SELF_SIGNED or REFUSE"),
                    );
                    WhilePending::SelfSigned
                }
            },
        };
        let ca_certificates = pick(|a| a.ca_certificates.as_ref()).and_then(|(c, o2, at2)| {
            let path = o2.file.resolve(&c);
            self.watched.push(path.clone());
            match crate::tls::pem_certs(&path) {
                Ok(_) => Some(path),
                Err(e) => {
                    self.err(&o2, &format!("{at2}.caCertificates"), e);
                    None
                }
            }
        });
        let eab_spec = match own.and_then(|a| a.external_account_binding.as_ref()) {
            Some(e) => Some((e.clone(), o.clone(), at.to_string())),
            None => base
                .spec
                .external_account_binding
                .as_ref()
                .map(|e| (e.clone(), base.origin.clone(), base.at.clone())),
        };
        let eab = eab_spec.and_then(|(e, o2, at2)| {
            let path = o2.file.resolve(&e.hmac_key_file);
            self.watched.push(path.clone());
            let field = format!("{at2}.externalAccountBinding.hmacKeyFile");
            match read_hmac(&path) {
                Ok(hmac_key) => Some(Eab {
                    key_id: e.key_id.clone(),
                    hmac_key,
                }),
                Err(msg) => {
                    self.err(&o2, &field, msg);
                    None
                }
            }
        });
        (self.errors.len() == errors).then(|| Issuer {
            name: name.to_string(),
            directory,
            contact,
            eab,
            key_type,
            challenge,
            ca_certificates,
            while_pending,
        })
    }

    /// The certificate of an HTTPS server whose `tls.acme` is set (`at` is its `.tls`):
    /// registers the certificate to order, and returns what to serve now.
    pub(super) fn acme_server_cert(
        &mut self,
        o: &Origin,
        at: &str,
        t: &schema::ServerTls,
        hosts: &[String],
        creds: &Path,
        require_tls13: bool,
    ) -> Option<Arc<ServerCert>> {
        let a = t.acme.as_ref()?;
        let acme_at = format!("{at}.acme");
        let Some(name) = t.credential_name.clone() else {
            self.err(
                o,
                &format!("{at}.credentialName"),
                "tls.acme stores the certificate it orders as a credential: set credentialName",
            );
            return None;
        };
        if t.server_certificate.is_some() || t.private_key.is_some() {
            self.err(
                o,
                &format!("{at}.serverCertificate"),
                "tls.acme stores its certificate under credentialName; remove serverCertificate/privateKey",
            );
            return None;
        }
        if a.name.is_some() {
            self.err(
                o,
                &format!("{acme_at}.name"),
                "name is for mesh.acmeIssuers entries; a server refers to one with issuer = \"NAME\"",
            );
        }
        let mut ordered: Vec<String> = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            if h.contains('*') {
                self.err(
                    o,
                    &acme_at,
                    format!(
                        "host {h} (hosts[{i}]) is a wildcard: a CA issues wildcard certificates only over DNS-01, which Portico does not do; list the names instead, or give this server a certificate from elsewhere (credentialName without acme)"
                    ),
                );
            } else if h.parse::<std::net::IpAddr>().is_ok() {
                self.err(
                    o,
                    &acme_at,
                    format!("host {h} (hosts[{i}]) is an IP address; ACME here orders certificates for DNS names only"),
                );
            } else if !ordered.contains(h) {
                ordered.push(h.clone());
            }
        }
        let issuer = match &a.issuer {
            Some(issuer_name) => {
                let Some(base) = self.acme_named.get(issuer_name).cloned() else {
                    self.err(
                        o,
                        &format!("{acme_at}.issuer"),
                        format!("no mesh.acmeIssuers entry is named {issuer_name:?}"),
                    );
                    return None;
                };
                self.acme_issuer(issuer_name, Some(a), &base, o, &acme_at)
            }
            None => {
                let inline = NamedIssuer {
                    spec: a.clone(),
                    origin: o.clone(),
                    at: acme_at.clone(),
                };
                self.acme_issuer(&format!("{}{acme_at}", o.path), None, &inline, o, &acme_at)
            }
        }?;
        if ordered.is_empty() {
            return None;
        }
        let dir = creds.join(&name);
        let managed = Arc::new(ManagedCert {
            name: name.clone(),
            hosts: ordered.clone(),
            cert_path: dir.join("tls.crt"),
            key_path: dir.join("tls.key"),
            state_dir: creds.join(STATE_DIR),
            issuer,
            server: format!("{}{at}", o.path),
        });
        match self.acme.iter().find(|m| m.name == name) {
            Some(m) if m.hosts == managed.hosts && m.issuer == managed.issuer => {}
            Some(m) => {
                let other = m.server.clone();
                self.err(
                    o,
                    &format!("{at}.credentialName"),
                    format!(
                        "credential {name} is ordered over ACME by {other} with other hosts or another issuer; give each server its own credentialName"
                    ),
                );
                return None;
            }
            None => {
                if managed.issuer.challenge == ChallengeKind::Http01 {
                    self.acme_http01_servers
                        .push((o.clone(), format!("{acme_at}.challenge")));
                }
                self.acme.push(managed.clone());
            }
        }
        let (cert_path, key_path) = (managed.cert_path.clone(), managed.key_path.clone());
        self.watched.push(cert_path.clone());
        self.watched.push(key_path.clone());
        let present = self.stamps.of(&cert_path).is_some() && self.stamps.of(&key_path).is_some();
        if present {
            match self.load_pair(&cert_path, &key_path) {
                Ok((key, not_after, subject)) => {
                    return Some(Arc::new(ServerCert {
                        key,
                        require_tls13,
                        cert_path,
                        not_after,
                        subject,
                        stand_in: false,
                    }))
                }
                Err(e) => self.warn(
                    o,
                    &format!("{at}.credentialName"),
                    format!("{e}; ACME will order the certificate again"),
                ),
            }
        } else {
            // Not loaded, but the gateway tables must be rebuilt once the files appear.
            self.pairs_used.push((cert_path.clone(), key_path.clone()));
        }
        match managed.issuer.while_pending {
            WhilePending::Refuse => None,
            WhilePending::SelfSigned => match crate::tls::acme::stand_in(&name, &ordered) {
                Ok((key, not_after, subject)) => Some(Arc::new(ServerCert {
                    key,
                    require_tls13,
                    cert_path,
                    not_after,
                    subject,
                    stand_in: true,
                })),
                Err(e) => {
                    self.err(o, &acme_at, e);
                    None
                }
            },
        }
    }

    /// The names each listener answers ACME challenges for. HTTP-01 needs a plain-HTTP
    /// listener: without one it is an error at the certificate's server.
    pub(super) fn acme_hosts(
        &mut self,
        listeners: &std::collections::BTreeMap<u16, ListenerBuild>,
    ) -> Option<Arc<AcmeHosts>> {
        if self.acme.is_empty() {
            return None;
        }
        let mut hosts = AcmeHosts {
            state_dir: self.credentials_dir.join(STATE_DIR),
            ..AcmeHosts::default()
        };
        for m in &self.acme {
            let set: &mut HashSet<String> = match m.issuer.challenge {
                ChallengeKind::Http01 => &mut hosts.http01,
                ChallengeKind::TlsAlpn01 => &mut hosts.tls_alpn01,
            };
            set.extend(m.hosts.iter().cloned());
        }
        let plain = listeners.values().any(|l| !l.tls && l.l4.is_none());
        if !plain {
            for (o, at) in std::mem::take(&mut self.acme_http01_servers) {
                self.err(
                    &o,
                    &at,
                    "HTTP-01 is answered on a plain-HTTP server's port and this config has none: add a server with protocol HTTP (the CA asks on port 80), or set challenge = \"TLS-ALPN-01\"",
                );
            }
        }
        Some(Arc::new(hosts))
    }
}

/// An EAB HMAC key file: base64url (padding and surrounding whitespace allowed).
fn read_hmac(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = text.trim().trim_end_matches('=');
    if text.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| format!("{} is not base64url: {e}", path.display()))
}
