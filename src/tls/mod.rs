//! Certificates: loading PEM pairs, the per-listener certificate store, and the rustls
//! resolver that picks a certificate by SNI from the current Snapshot on every handshake.
//! Never logs key material.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::routing::HostMatcher;

pub mod acme;
pub mod client_auth;
pub mod upstream;
use crate::snapshot::Snapshot;

/// A loaded server certificate with what the handshake needs to know about it.
pub struct ServerCert {
    pub key: Arc<CertifiedKey>,
    /// `minProtocolVersion = "TLSV1_3"`: clients that offer no TLS 1.3 suite get no
    /// certificate and so a handshake failure.
    pub require_tls13: bool,
    pub cert_path: PathBuf,
    /// Expiry of the leaf, seconds since the Unix epoch.
    pub not_after: i64,
    pub subject: String,
    /// A self-signed stand-in served while ACME orders the real certificate.
    pub stand_in: bool,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_path", &self.cert_path)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("stand_in", &self.stand_in)
            .finish_non_exhaustive()
    }
}

/// The certificates of one HTTPS listener.
#[derive(Debug, Default, Clone)]
pub struct CertStore {
    pub hosts: HostMatcher<Arc<ServerCert>>,
    /// For clients without SNI, or with a name no server claims.
    pub default: Option<Arc<ServerCert>>,
}

impl CertStore {
    pub fn resolve(&self, sni: Option<&str>, offers_tls13: bool) -> Option<Arc<CertifiedKey>> {
        let cert = match sni {
            Some(name) => {
                let name = lower(name);
                self.hosts.lookup(&name).or(self.default.as_ref())
            }
            None => self.default.as_ref(),
        }?;
        if cert.require_tls13 && !offers_tls13 {
            return None;
        }
        Some(cert.key.clone())
    }
}

fn lower(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// rustls asks this on every handshake; it reads the listener's store from whatever
/// Snapshot is current, so new and rotated certificates apply to the next handshake.
pub struct SniResolver {
    pub listener: usize,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("listener", &self.listener)
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snapshot = self.snapshots.load();
        let listener = snapshot.listeners.get(self.listener)?;
        // A CA's TLS-ALPN-01 validation (RFC 8737): only the challenge certificate will do.
        if hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == acme::ACME_TLS_ALPN))
        {
            let sni = hello.server_name()?;
            let key = listener.acme.as_ref()?.tls_alpn01_cert(sni);
            if key.is_none() {
                tracing::info!(
                    sni,
                    "TLS-ALPN-01 handshake refused: no ACME validation under way for this name"
                );
            }
            return key;
        }
        let store = listener.certs.as_ref()?;
        let offers_tls13 = hello.cipher_suites().iter().any(|s| {
            matches!(
                s,
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                    | rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            )
        });
        let key = store.resolve(hello.server_name(), offers_tls13);
        if key.is_none() {
            tracing::info!(
                sni = hello.server_name().unwrap_or("-"),
                "TLS handshake refused: no certificate for this name"
            );
        }
        key
    }
}

/// Loads a certificate chain and its private key, checking that they belong together.
pub fn load_pair(cert_path: &Path, key_path: &Path) -> Result<(CertifiedKey, i64, String), String> {
    let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
    pair_from_pem(cert_path, &cert_pem, key_path, &key_pem)
}

/// The two files of a certificate pair, as they are now.
pub fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let cert = std::fs::read(cert_path)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert_path.display()))?;
    let key = std::fs::read(key_path)
        .map_err(|e| format!("cannot read private key {}: {e}", key_path.display()))?;
    Ok((cert, key))
}

/// `load_pair` from the files' contents (the paths are for messages).
pub fn pair_from_pem(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<(CertifiedKey, i64, String), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse certificate {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no PEM certificate found in {}",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("cannot read private key {}: {e}", key_path.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key {}: {e}", key_path.display()))?;
    let (not_after, subject) = match x509_parser::parse_x509_certificate(&certs[0]) {
        Ok((_, leaf)) => (
            leaf.validity().not_after.timestamp(),
            leaf.subject().to_string(),
        ),
        Err(e) => {
            return Err(format!(
                "cannot parse certificate {}: {e}",
                cert_path.display()
            ))
        }
    };
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|_| {
        format!(
            "private key {} does not match certificate {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok((certified, not_after, subject))
}

pub(crate) fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificate {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no PEM certificate found in {}", path.display()));
    }
    for c in &certs {
        // pingora's certificate wrapper panics on bad DER; refuse it here instead.
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("cannot parse certificate {}: {e}", path.display()))?;
    }
    Ok(certs)
}

/// A client certificate and key for `MUTUAL` TLS to an upstream.
pub fn load_client_cert(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<pingora::utils::tls::CertKey>, String> {
    // Checks the pair (and that the key parses) the same way as for server certificates.
    load_pair(cert_path, key_path)?;
    let certs = pem_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("cannot read private key {}: {e}", key_path.display()))?;
    Ok(Arc::new(pingora::utils::tls::CertKey::new(
        certs.into_iter().map(|c| c.to_vec()).collect(),
        key.secret_der().to_vec(),
    )))
}

/// Writes a self-signed certificate for `hosts` (demo and first-run use). The key file is
/// created readable by its owner only.
pub fn generate_self_signed(
    cert_path: &Path,
    key_path: &Path,
    hosts: &[String],
) -> Result<(), String> {
    let mut names: Vec<String> = hosts
        .iter()
        .filter(|h| h.as_str() != "*")
        .cloned()
        .collect();
    if names.is_empty() {
        names.push("localhost".into());
    }
    let mut params = rcgen::CertificateParams::new(names.clone())
        .map_err(|e| format!("cannot generate a certificate: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0].clone());
    // A year, like the certificates an operator would buy; rcgen's default runs to 4096.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    let key_pair = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| format!("cannot generate a certificate: {e}"))?;
    for dir in [cert_path.parent(), key_path.parent()]
        .into_iter()
        .flatten()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    write_private(key_path, key_pair.serialize_pem().as_bytes())?;
    std::fs::write(cert_path, cert.pem())
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(data)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        generate_self_signed(&c, &k, &[name.to_string()]).unwrap();
        (c, k)
    }

    #[test]
    fn loads_pairs_and_rejects_mismatched_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (a_crt, a_key) = cert(dir.path(), "a.test");
        let (_, b_key) = cert(dir.path(), "b.test");
        let (_, not_after, subject) = load_pair(&a_crt, &a_key).unwrap();
        // generate_self_signed names the first host and runs for a year from now.
        assert_eq!(subject, "CN=a.test");
        let year = time::OffsetDateTime::now_utc() + time::Duration::days(365);
        assert!(
            (not_after - year.unix_timestamp()).abs() < 3600,
            "notAfter {not_after}, a year from now {}",
            year.unix_timestamp()
        );
        let err = load_pair(&a_crt, &b_key).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        let err = load_pair(&dir.path().join("missing.crt"), &a_key).unwrap_err();
        assert!(err.contains("cannot read certificate"), "{err}");
    }

    #[test]
    fn store_picks_exact_wildcard_default() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, tls13: bool| {
            let (c, k) = cert(dir.path(), name);
            let (key, not_after, subject) = load_pair(&c, &k).unwrap();
            Arc::new(ServerCert {
                key: Arc::new(key),
                require_tls13: tls13,
                cert_path: c,
                not_after,
                subject,
                stand_in: false,
            })
        };
        let a = mk("a.test", false);
        let w = mk("w.test", true);
        let mut store = CertStore::default();
        store.hosts.insert("a.test", a.clone());
        store.hosts.insert("*.w.test", w.clone());
        fn got(
            store: &CertStore,
            sni: Option<&str>,
            tls13: bool,
        ) -> Option<CertificateDer<'static>> {
            store.resolve(sni, tls13).map(|k| k.cert[0].clone())
        }
        assert_eq!(
            got(&store, Some("A.TEST"), true),
            Some(a.key.cert[0].clone())
        );
        assert_eq!(
            got(&store, Some("x.w.test"), true),
            Some(w.key.cert[0].clone())
        );
        assert_eq!(
            got(&store, Some("x.w.test"), false),
            None,
            "TLS 1.3 required"
        );
        assert_eq!(got(&store, None, true), None);
        assert_eq!(got(&store, Some("other.test"), true), None);
        store.default = Some(a.clone());
        assert_eq!(got(&store, None, true), Some(a.key.cert[0].clone()));
        assert_eq!(
            got(&store, Some("other.test"), true),
            Some(a.key.cert[0].clone())
        );
    }
}
