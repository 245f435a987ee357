//! The verifier of an upstream's certificate (DestinationRule `trafficPolicy.tls`): the
//! chain against the cluster's CA (or the system's roots), the leaf against the CRLs
//! (`caCrl`), then the name: one of `subjectAltNames` when they are set (the
//! DestinationRule's, else those of the host's ServiceEntry; Istio and Envoy: any one of
//! them suffices, the SNI is then not checked), else the SNI (not for
//! `ISTIO_MUTUAL`, whose workload certificates name a SPIFFE identity, not a host).
//!
//! Built once per cluster at compile time and given to pingora with each peer
//! (`PeerOptions::server_cert_verifier`, vendor/README.md), so a handshake only verifies.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

/// Why a certificate that chains to a trusted root is still refused (in the error pingora
/// logs, and so in the gateway's log line for the 503).
struct SanMismatch {
    wanted: Vec<String>,
    presented: Vec<String>,
}

impl fmt::Debug for SanMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate SAN mismatch: subjectAltNames {:?}, the certificate has {:?}",
            self.wanted, self.presented
        )
    }
}

impl fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for SanMismatch {}

/// A certificate's subject alternative name, as a string: a DNS name, or a URI, e-mail
/// address or IP address.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum San {
    Dns(String),
    Other(String),
}

impl San {
    pub(crate) fn text(&self) -> &str {
        match self {
            San::Dns(s) | San::Other(s) => s,
        }
    }
}

/// The subject alternative names of certificate `der` (also the client certificate's
/// `subjectAltNames` check); `None`: the certificate does not parse.
pub(crate) fn sans(der: &[u8]) -> Option<Vec<San>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Some(Vec::new());
    };
    use x509_parser::extensions::GeneralName::*;
    Some(
        ext.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                DNSName(s) => Some(San::Dns(s.to_string())),
                URI(s) | RFC822Name(s) => Some(San::Other(s.to_string())),
                IPAddress(b) => match b.len() {
                    4 => <[u8; 4]>::try_from(*b)
                        .ok()
                        .map(|a| San::Other(std::net::Ipv4Addr::from(a).to_string())),
                    16 => <[u8; 16]>::try_from(*b)
                        .ok()
                        .map(|a| San::Other(std::net::Ipv6Addr::from(a).to_string())),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
    )
}

/// Whether a configured name is one of the certificate's: a DNS SAN equal to it (ASCII
/// case ignored), or a wildcard DNS SAN (`*.example.com`) covering it by exactly one
/// label, as Envoy's DNS SAN matching does; any other SAN (URI, e.g. a SPIFFE id, IP,
/// e-mail) exactly.
fn covers(san: &San, wanted: &str) -> bool {
    match san {
        San::Other(s) => s == wanted,
        San::Dns(s) => {
            if s.eq_ignore_ascii_case(wanted) {
                return true;
            }
            match s.strip_prefix("*.") {
                Some(rest) if !rest.is_empty() => match wanted.split_once('.') {
                    Some((label, tail)) => !label.is_empty() && tail.eq_ignore_ascii_case(rest),
                    None => false,
                },
                _ => false,
            }
        }
    }
}

/// The verifier of one cluster's upstream certificates.
pub struct UpstreamVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// `subjectAltNames`; empty: the name checked is the SNI (when `check_sni`).
    sans: Vec<String>,
    check_sni: bool,
}

impl fmt::Debug for UpstreamVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamVerifier")
            .field("sans", &self.sans)
            .field("check_sni", &self.check_sni)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain and the CRLs first and the name last, so a name error
        // means everything else passed.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.sans.is_empty() || !self.check_sni => {}
            Err(e) => return Err(e),
        }
        if !self.sans.is_empty() {
            let presented = sans(end_entity).unwrap_or_default();
            let ok = self
                .sans
                .iter()
                .any(|w| presented.iter().any(|s| covers(s, w)));
            if !ok {
                let err = SanMismatch {
                    wanted: self.sans.clone(),
                    presented: presented.iter().map(|s| s.text().to_string()).collect(),
                };
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(err)),
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
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

/// The system's roots, read once (as pingora's connector does for peers without a CA).
fn system_roots() -> Result<Arc<rustls::RootCertStore>, String> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    if let Some(r) = ROOTS.get() {
        return Ok(r.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        if let Some(e) = found.errors.first() {
            return Err(format!("cannot read the system's CA certificates: {e}"));
        }
    }
    Ok(ROOTS.get_or_init(|| Arc::new(roots)).clone())
}

/// Builds a cluster's verifier: `ca` (DER certificates) or the system's roots, the CRLs,
/// the names. A CRL must be from the CA that issued the upstream's certificate: with a CRL
/// set, a leaf whose issuer has none is refused (as Envoy does); intermediates are not
/// checked against it.
pub fn verifier(
    ca: Option<&[CertificateDer<'static>]>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    sans: Vec<String>,
    check_sni: bool,
) -> Result<Arc<UpstreamVerifier>, String> {
    let roots = match ca {
        Some(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("cannot use CA certificate: {e}"))?;
            }
            Arc::new(roots)
        }
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut builder = WebPkiServerVerifier::builder_with_provider(roots, provider);
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    let inner = builder
        .build()
        .map_err(|e| format!("cannot verify upstream certificates: {e}"))?;
    Ok(Arc::new(UpstreamVerifier {
        inner,
        sans,
        check_sni,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_as_envoy_matches_them() {
        let dns = |s: &str| San::Dns(s.to_string());
        assert!(covers(&dns("api.example.com"), "API.example.com"));
        assert!(covers(&dns("*.example.com"), "api.example.com"));
        assert!(!covers(&dns("*.example.com"), "a.b.example.com"));
        assert!(!covers(&dns("*.example.com"), "example.com"));
        assert!(!covers(&dns("api.example.com"), "*.example.com"));
        assert!(!covers(&dns("example.com"), "api.example.com"));
        let uri = San::Other("spiffe://cluster.local/ns/default/sa/foo".into());
        assert!(covers(&uri, "spiffe://cluster.local/ns/default/sa/foo"));
        assert!(!covers(&uri, "spiffe://cluster.local/ns/default/sa/fo"));
        assert!(!covers(&uri, "SPIFFE://cluster.local/ns/default/sa/foo"));
    }
}
