//! Client certificates (Gateway `tls.mode = MUTUAL` / `OPTIONAL_MUTUAL`): the verifier a
//! server's handshake uses, the identity a verified certificate gives the connection, and
//! how that identity travels upstream in `x-forwarded-client-cert` (Envoy's format).
//!
//! rustls has one client verifier per `ServerConfig` and asks it without the SNI, so each
//! mutual-TLS server gets its own `ServerConfig` (the same certificate resolver, ALPN and
//! ticket settings as the listener's, its own verifier and ticket key), built on its first
//! handshake; `listener::https` peeks the ClientHello's SNI to pick it. A ticket key per server
//! keeps a session resumed only where it was verified, and a new CA or CRL (a new
//! `ClientAuth`, from the reload the file change causes) starts with no resumable session.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

use crate::routing::HostMatcher;

/// Istio's `forwardClientCertDetails`: what becomes of the client's
/// `x-forwarded-client-cert` field and whether this hop adds its own element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardClientCert {
    /// Never send the field upstream.
    Sanitize,
    /// Pass the client's field only on a mutual-TLS connection.
    ForwardOnly,
    /// On a mutual-TLS connection, pass the client's field with this hop's element
    /// appended; else drop it.
    AppendForward,
    /// On a mutual-TLS connection, replace the field with this hop's element; else drop
    /// it. Istio's default for gateways.
    #[default]
    SanitizeSet,
    /// Pass the client's field whatever the connection.
    AlwaysForwardOnly,
}

impl ForwardClientCert {
    pub fn parse(s: &str) -> Option<ForwardClientCert> {
        Some(match s {
            "SANITIZE" => ForwardClientCert::Sanitize,
            "FORWARD_ONLY" => ForwardClientCert::ForwardOnly,
            "APPEND_FORWARD" => ForwardClientCert::AppendForward,
            "SANITIZE_SET" => ForwardClientCert::SanitizeSet,
            "ALWAYS_FORWARD_ONLY" => ForwardClientCert::AlwaysForwardOnly,
            _ => return None,
        })
    }

    /// Whether the client's own field goes upstream, for a connection with (`mtls`) or
    /// without a verified client certificate.
    pub fn keeps_client_field(self, mtls: bool) -> bool {
        match self {
            ForwardClientCert::Sanitize | ForwardClientCert::SanitizeSet => false,
            ForwardClientCert::ForwardOnly | ForwardClientCert::AppendForward => mtls,
            ForwardClientCert::AlwaysForwardOnly => true,
        }
    }

    /// Whether this hop writes its element for a connection with a verified certificate.
    pub fn adds_element(self) -> bool {
        matches!(
            self,
            ForwardClientCert::AppendForward | ForwardClientCert::SanitizeSet
        )
    }
}

/// The verified client certificate of a connection: what authorization, the access log
/// and `x-forwarded-client-cert` know of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    /// RFC 2253, as Envoy writes it (`CN=client,O=Example`).
    pub subject: String,
    pub issuer: String,
    /// Lower-case hex SHA-256 of the certificate (DER).
    pub hash: String,
    pub serial: String,
    /// This hop's `x-forwarded-client-cert` element for the connection.
    pub xfcc: String,
}

impl PeerCert {
    /// The identity of leaf certificate `der`; `by`: the URI SANs of the server's own
    /// certificate (XFCC's `By`).
    pub fn from_der(der: &[u8], by: &[String]) -> Option<PeerCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(u) => uri_sans.push(u.to_string()),
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        dns_sans.push(d.to_string())
                    }
                    _ => {}
                }
            }
        }
        let hash = hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        let subject = rfc2253(cert.subject());
        let mut peer = PeerCert {
            uri_sans,
            dns_sans,
            issuer: rfc2253(cert.issuer()),
            serial: cert.raw_serial_as_string().replace(':', ""),
            subject,
            hash,
            xfcc: String::new(),
        };
        peer.xfcc = peer.element(by);
        Some(peer)
    }

    /// Istio's `source.principal`: the first SPIFFE id without `spiffe://`
    /// (`cluster.local/ns/foo/sa/bar`).
    pub fn principal(&self) -> Option<&str> {
        self.uri_sans
            .iter()
            .find_map(|u| u.strip_prefix("spiffe://"))
    }

    /// Envoy's XFCC element: `By`, `Hash`, `Subject`, `URI`, `DNS` (Istio's gateways set
    /// Subject, URI and DNS), `;`-separated; values with `,` `;` `=` or `"` are quoted.
    fn element(&self, by: &[String]) -> String {
        let mut out = String::with_capacity(160);
        let mut push = |key: &str, value: &str, always_quote: bool| {
            if !out.is_empty() {
                out.push(';');
            }
            out.push_str(key);
            out.push('=');
            if always_quote || value.contains([',', ';', '=', '"']) {
                out.push('"');
                out.push_str(&value.replace('"', "\\\""));
                out.push('"');
            } else {
                out.push_str(value);
            }
        };
        for b in by {
            push("By", b, false);
        }
        push("Hash", &self.hash, false);
        push("Subject", &self.subject, true);
        for u in &self.uri_sans {
            push("URI", u, false);
        }
        for d in &self.dns_sans {
            push("DNS", d, false);
        }
        out
    }
}

/// What the handshake of a TLS connection leaves for its requests (the extension of
/// pingora's `SslDigest`).
#[derive(Debug, Default)]
pub struct TlsConn {
    pub sni: Option<String>,
    pub peer: Option<Arc<PeerCert>>,
}

impl TlsConn {
    /// What a connection's TLS digest carries, if anything.
    pub fn of(ssl: Option<&pingora::protocols::tls::SslDigest>) -> Option<&TlsConn> {
        ssl.and_then(|t| t.extension.get::<TlsConn>())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A distinguished name in RFC 2253's form: last RDN first, `,` between, specials escaped.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for rdn in rdns.iter().rev() {
        for (i, attr) in rdn.iter().enumerate() {
            if !out.is_empty() {
                out.push(if i == 0 { ',' } else { '+' });
            }
            let oid = attr.attr_type();
            match x509_parser::objects::oid2abbrev(oid, registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&oid.to_id_string()),
            }
            out.push('=');
            let value = attr.as_str().unwrap_or("");
            for (j, c) in value.chars().enumerate() {
                let edge = (j == 0 && (c == ' ' || c == '#')) || (j + 1 == value.len() && c == ' ');
                if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
    }
    out
}

/// The pins and names a verified client certificate must also satisfy.
#[derive(Debug, Default, Clone)]
pub struct Checks {
    /// `subjectAltNames`: one of the certificate's SANs must be one of these.
    pub sans: Vec<String>,
    /// `verifyCertificateSpki` (SHA-256 of the SubjectPublicKeyInfo).
    pub spki: Vec<[u8; 32]>,
    /// `verifyCertificateHash` (SHA-256 of the certificate).
    pub hashes: Vec<[u8; 32]>,
}

impl Checks {
    /// Why `der` fails the checks, if it does. The pins: matching either list is enough
    /// (as Envoy); the names are checked besides.
    fn refuse(&self, der: &[u8]) -> Option<&'static str> {
        if !self.hashes.is_empty() || !self.spki.is_empty() {
            let hash = ring::digest::digest(&ring::digest::SHA256, der);
            let by_hash = self.hashes.iter().any(|h| h[..] == *hash.as_ref());
            let by_spki = !self.spki.is_empty()
                && x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| {
                    let spki = ring::digest::digest(&ring::digest::SHA256, c.public_key().raw);
                    self.spki.iter().any(|p| p[..] == *spki.as_ref())
                });
            if !by_hash && !by_spki {
                return Some("the client certificate matches no verifyCertificateHash/Spki pin");
            }
        }
        if !self.sans.is_empty() {
            let Some(names) = crate::tls::upstream::sans(der) else {
                return Some("the client certificate cannot be parsed");
            };
            if !names
                .iter()
                .any(|n| self.sans.iter().any(|s| s == n.text()))
            {
                return Some("the client certificate has none of the subjectAltNames allowed");
            }
        }
        None
    }
}

/// webpki's chain (and CRL) verification, then the server's pins and names.
struct Verifier {
    inner: Arc<dyn ClientCertVerifier>,
    checks: Checks,
    mandatory: bool,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("checks", &self.checks)
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for Verifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::info!(error = %e, "client certificate refused"))?;
        if let Some(why) = self.checks.refuse(end_entity) {
            tracing::info!(reason = why, "client certificate refused");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client-certificate policy of one mutual-TLS server.
pub struct ClientAuth {
    /// `MUTUAL`: a connection without a certificate is refused in the handshake.
    /// `OPTIONAL_MUTUAL`: asked for, verified when sent.
    pub mandatory: bool,
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// The URI SANs of the server's certificate (XFCC's `By`).
    pub by: Arc<[String]>,
    /// The files it came from, for messages.
    pub ca_path: std::path::PathBuf,
    /// The server's acceptor, built on its first handshake (`listener::https`).
    pub acceptor: OnceLock<pingora::listeners::tls::Acceptor>,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("mandatory", &self.mandatory)
            .field("ca_path", &self.ca_path)
            .finish_non_exhaustive()
    }
}

/// The client-certificate policy of each TLS host of a listener with a mutual-TLS server:
/// `None` for a host that asks for no certificate. Looked up like the certificates
/// (`CertStore`), so a name falls back to the same default server.
#[derive(Debug, Default, Clone)]
pub struct ClientAuthStore {
    pub hosts: HostMatcher<Option<Arc<ClientAuth>>>,
    pub default: Option<Arc<ClientAuth>>,
}

impl ClientAuthStore {
    pub fn resolve(&self, sni: Option<&str>) -> Option<&Arc<ClientAuth>> {
        match sni {
            Some(name) => match self.hosts.lookup(&name.to_ascii_lowercase()) {
                Some(found) => found.as_ref(),
                None => self.default.as_ref(),
            },
            None => self.default.as_ref(),
        }
    }
}

/// The CA bundle at `path` as trust anchors.
fn roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let certs = super::pem_certs(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("cannot use CA certificate in {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The CRLs at `path`: PEM (`X509 CRL` blocks), or one DER CRL.
pub(crate) fn crls(
    path: &std::path::Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read CRL {}: {e}", path.display()))?;
    let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse CRL {}: {e}", path.display()))?;
    let list = if pem.is_empty() {
        vec![CertificateRevocationListDer::from(bytes)]
    } else {
        pem
    };
    for crl in &list {
        x509_parser::parse_x509_crl(crl)
            .map_err(|e| format!("cannot parse CRL {}: {e}", path.display()))?;
    }
    Ok(list)
}

/// Builds a server's client-certificate policy from its files.
pub fn build(
    ca_path: &std::path::Path,
    crl_path: Option<&std::path::Path>,
    checks: Checks,
    mandatory: bool,
    server_cert: &CertificateDer<'_>,
) -> Result<ClientAuth, String> {
    let roots = roots(ca_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if let Some(p) = crl_path {
        // The leaf's status must be known (its issuer's CRL given), as Envoy with a CRL;
        // intermediates are not checked.
        builder = builder
            .with_crls(crls(p)?)
            .only_check_end_entity_revocation();
    }
    if !mandatory {
        builder = builder.allow_unauthenticated();
    }
    let inner = builder.build().map_err(|e| {
        format!(
            "cannot verify client certificates with {}: {e}",
            ca_path.display()
        )
    })?;
    let by: Vec<String> = match x509_parser::parse_x509_certificate(server_cert) {
        Ok((_, c)) => match c.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        },
        Err(_) => Vec::new(),
    };
    Ok(ClientAuth {
        mandatory,
        verifier: Arc::new(Verifier {
            inner,
            checks,
            mandatory,
        }),
        by: by.into(),
        ca_path: ca_path.to_path_buf(),
        acceptor: OnceLock::new(),
    })
}

/// `verifyCertificateHash` entries: hex SHA-256, colons allowed.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// `verifyCertificateSpki` entries: base64 SHA-256.
pub fn parse_spki(s: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    <[u8; 32]>::try_from(bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_modes_follow_envoy() {
        use ForwardClientCert::*;
        let table = [
            (Sanitize, false, false, false),
            (ForwardOnly, false, true, false),
            (AppendForward, false, true, true),
            (SanitizeSet, false, false, true),
            (AlwaysForwardOnly, true, true, false),
        ];
        for (mode, plain, mtls, adds) in table {
            assert_eq!(mode.keeps_client_field(false), plain, "{mode:?} plain");
            assert_eq!(mode.keeps_client_field(true), mtls, "{mode:?} mtls");
            assert_eq!(mode.adds_element(), adds, "{mode:?} adds");
        }
    }

    #[test]
    fn identity_and_xfcc_element_of_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from("spiffe://cluster.local/ns/foo/sa/bar").unwrap(),
        ));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example, Inc");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let by = vec!["spiffe://cluster.local/ns/istio-system/sa/gw".to_string()];
        let peer = PeerCert::from_der(cert.der(), &by).unwrap();
        assert_eq!(peer.principal(), Some("cluster.local/ns/foo/sa/bar"));
        assert_eq!(peer.dns_sans, ["client.test"]);
        assert_eq!(peer.subject, "CN=client,O=Example\\, Inc");
        assert_eq!(peer.hash.len(), 64);
        assert_eq!(
            peer.xfcc,
            format!(
                "By=spiffe://cluster.local/ns/istio-system/sa/gw;Hash={};Subject=\"CN=client,O=Example\\, Inc\";URI=spiffe://cluster.local/ns/foo/sa/bar;DNS=client.test",
                peer.hash
            )
        );
    }

    #[test]
    fn pins_parse() {
        let hex = "AB:".repeat(31) + "AB";
        assert_eq!(parse_hash(&hex), Some([0xab; 32]));
        assert_eq!(parse_hash("abc"), None);
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_spki(&b64), Some([7; 32]));
        assert_eq!(parse_spki("AAAA"), None);
    }
}
