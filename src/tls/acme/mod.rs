//! ACME (RFC 8555): certificates Portico orders, stores and renews itself for the Gateway
//! servers whose `tls.acme` asks for it. This module owns what the rest of Portico reads
//! while that happens: the compiled issuer settings ([`Issuer`], [`ManagedCert`]), the
//! challenge answers ([`Challenges`]: HTTP-01 key authorizations, TLS-ALPN-01
//! certificates), the stand-in certificate served while the first one is pending, and the
//! state of each managed certificate for `/config` and the dashboard ([`status`]).
//!
//! The order itself is `order`, the files (atomic writes, the account, the replica lock)
//! are `store`, the schedule (renewal at 2/3 of the lifetime, back-off, renew-now) is
//! `manager`. Issued certificates reach handshakes the way every certificate does: they
//! are written to `<credentialsDir>/<credentialName>/tls.crt|tls.key` and the config is
//! reloaded, so the SNI resolver serves them from the next handshake. Never logs key
//! material.

pub mod manager;
pub mod order;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Where HTTP-01 validation requests ask (RFC 8555 8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";
/// The folder of the credentials directory that holds ACME's own state: accounts, the
/// replica lock, challenge answers shared between replicas.
pub const STATE_DIR: &str = ".acme";

/// The key of an ordered certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ECDSA_P256",
            KeyType::EcdsaP384 => "ECDSA_P384",
            KeyType::Rsa2048 => "RSA_2048",
        }
    }
}

/// How the CA checks that Portico answers for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// A plain-HTTP request to port 80 for `/.well-known/acme-challenge/TOKEN`.
    Http01,
    /// A TLS handshake to port 443 with ALPN `acme-tls/1` (RFC 8737).
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "HTTP-01",
            ChallengeKind::TlsAlpn01 => "TLS-ALPN-01",
        }
    }
}

/// What clients get for a host whose first certificate is not issued yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhilePending {
    /// A self-signed stand-in (clients see an untrusted certificate).
    SelfSigned,
    /// No certificate: handshakes for the host fail.
    Refuse,
}

impl WhilePending {
    pub fn name(self) -> &'static str {
        match self {
            WhilePending::SelfSigned => "SELF_SIGNED",
            WhilePending::Refuse => "REFUSE",
        }
    }
}

/// External account binding: the key id and HMAC key a CA handed out.
#[derive(Clone, PartialEq, Eq)]
pub struct Eab {
    pub key_id: String,
    pub hmac_key: Vec<u8>,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// An ACME CA account and how to use it, compiled from `mesh.acmeIssuers` and/or a
/// server's `tls.acme`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuer {
    /// The `mesh.acmeIssuers` name, or where the server wrote it inline.
    pub name: String,
    pub directory: String,
    /// `mailto:` URIs.
    pub contact: Vec<String>,
    pub eab: Option<Eab>,
    pub key_type: KeyType,
    pub challenge: ChallengeKind,
    /// Roots for the ACME server's own HTTPS certificate; the system's when `None`.
    pub ca_certificates: Option<PathBuf>,
    pub while_pending: WhilePending,
}

/// One certificate Portico keeps issued: the hosts of one Gateway server, as one SAN
/// certificate stored under the server's `credentialName`.
#[derive(Debug, PartialEq, Eq)]
pub struct ManagedCert {
    /// The `credentialName`.
    pub name: String,
    /// Lower-case DNS names, in the server's order, without duplicates.
    pub hosts: Vec<String>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// `<credentialsDir>/.acme`.
    pub state_dir: PathBuf,
    pub issuer: Issuer,
    /// Where the server was written (`gateways[0].servers[1]`), for messages.
    pub server: String,
}

/// The names ACME challenges are answered for on a listener, and where challenge answers
/// another replica published are found.
#[derive(Debug, Default)]
pub struct AcmeHosts {
    pub http01: HashSet<String>,
    pub tls_alpn01: HashSet<String>,
    pub state_dir: PathBuf,
}

impl AcmeHosts {
    /// For a request on a plain-HTTP listener: `None` when it is not an HTTP-01 validation
    /// request for a host Portico orders certificates for (then it is routed as usual);
    /// else the key authorization to answer with, or `Some(None)` for an unknown token.
    pub fn http01_answer(&self, host: &str, path: &str) -> Option<Option<String>> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        if !self.http01.contains(host) {
            return None;
        }
        Some(challenges().http01(token, &self.state_dir))
    }

    /// The TLS-ALPN-01 certificate for `sni`, if a validation for it is under way.
    pub fn tls_alpn01_cert(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let sni = sni.to_ascii_lowercase();
        if !self.tls_alpn01.contains(&sni) {
            return None;
        }
        challenges().tls_alpn01(&sni, &self.state_dir)
    }
}

/// Challenge answers being validated now. This process's own are in memory; those of
/// another replica sharing the credentials directory are read from `.acme/` (see `store`).
#[derive(Default)]
pub struct Challenges {
    http01: Mutex<HashMap<String, String>>,
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

/// The process's challenge answers.
pub fn challenges() -> &'static Challenges {
    static CHALLENGES: OnceLock<Challenges> = OnceLock::new();
    CHALLENGES.get_or_init(Challenges::default)
}

/// An ACME token: base64url (RFC 8555 8.1), so never a path.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A DNS name as a file name: letters, digits, `-` and `.` (no `..`).
fn is_host_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('.')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Challenges {
    /// The key authorization for HTTP-01 `token`.
    pub fn http01(&self, token: &str, state_dir: &Path) -> Option<String> {
        if !is_token(token) {
            return None;
        }
        if let Some(k) = lock(&self.http01).get(token) {
            return Some(k.clone());
        }
        // Another replica's order: a small file, read only for validation requests.
        let text = std::fs::read_to_string(store::http01_path(state_dir, token)).ok()?;
        Some(text.trim().to_string())
    }

    /// The TLS-ALPN-01 certificate for `host`.
    pub fn tls_alpn01(&self, host: &str, state_dir: &Path) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = lock(&self.tls_alpn01).get(host) {
            return Some(k.clone());
        }
        if !is_host_file_name(host) {
            return None;
        }
        let pem = std::fs::read(store::tls_alpn01_path(state_dir, host)).ok()?;
        challenge_key(&pem).ok().map(Arc::new)
    }

    pub(crate) fn put_http01(&self, token: &str, key_authorization: &str) {
        lock(&self.http01).insert(token.to_string(), key_authorization.to_string());
    }

    pub(crate) fn remove_http01(&self, token: &str) {
        lock(&self.http01).remove(token);
    }

    pub(crate) fn put_tls_alpn01(&self, host: &str, key: Arc<CertifiedKey>) {
        lock(&self.tls_alpn01).insert(host.to_string(), key);
    }

    pub(crate) fn remove_tls_alpn01(&self, host: &str) {
        lock(&self.tls_alpn01).remove(host);
    }
}

/// The certificate and key of a TLS-ALPN-01 answer from one PEM text. Not checked with
/// `keys_match` as served certificates are: webpki refuses to parse a certificate with an
/// unknown critical extension, and the acmeIdentifier one is exactly that.
pub fn challenge_key(pem: &[u8]) -> Result<CertifiedKey, String> {
    use rustls_pki_types::pem::PemObject;
    let cert = rustls_pki_types::CertificateDer::from_pem_slice(pem)
        .map_err(|e| format!("cannot read the TLS-ALPN-01 certificate: {e}"))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("cannot read the TLS-ALPN-01 key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported TLS-ALPN-01 key: {e}"))?;
    Ok(CertifiedKey::new(vec![cert], signing))
}

/// A self-signed certificate served for `hosts` until the first one is issued: the same
/// one for the life of the process (renewed a day before it runs out), so reloads do not
/// change it.
pub fn stand_in(name: &str, hosts: &[String]) -> Result<(Arc<CertifiedKey>, i64, String), String> {
    type Key = (String, Vec<String>);
    type StandIn = (Arc<CertifiedKey>, i64, String);
    static STAND_INS: OnceLock<Mutex<HashMap<Key, StandIn>>> = OnceLock::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut cache = lock(STAND_INS.get_or_init(Default::default));
    let wanted = (name.to_string(), hosts.to_vec());
    if let Some(c) = cache.get(&wanted) {
        if c.1 - now > 86_400 {
            return Ok(c.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(hosts.to_vec())
        .map_err(|e| format!("cannot make a stand-in certificate: {e}"))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("Portico stand-in for {name} (ACME pending)"),
    );
    let start = time::OffsetDateTime::now_utc();
    params.not_before = start - time::Duration::hours(1);
    params.not_after = start + time::Duration::days(7);
    let key_pair =
        rcgen::KeyPair::generate().map_err(|e| format!("cannot make a stand-in key: {e}"))?;
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| format!("cannot make a stand-in certificate: {e}"))?;
    let path = Path::new("(stand-in)");
    let (key, not_after, subject) = crate::tls::pair_from_pem(
        path,
        cert.pem().as_bytes(),
        path,
        key_pair.serialize_pem().as_bytes(),
    )?;
    let out = (Arc::new(key), not_after, subject);
    cache.insert(wanted, out.clone());
    Ok(out)
}

/// Where a managed certificate stands, for `/config` and the dashboard.
#[derive(Debug, Clone, Default)]
pub struct CertState {
    /// `pending` (no certificate yet), `valid`, `ordering`, `renewing`, `retrying` (the
    /// last order failed; another is scheduled), `waiting` (another replica holds the lock).
    pub state: &'static str,
    pub hosts: Vec<String>,
    pub issuer: String,
    pub challenge: &'static str,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    /// When the next order is due (renewal time, or the next retry).
    pub next_order: Option<i64>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// When this process last had a certificate issued for it.
    pub last_issued: Option<i64>,
}

fn states() -> &'static Mutex<BTreeMap<String, CertState>> {
    static STATES: OnceLock<Mutex<BTreeMap<String, CertState>>> = OnceLock::new();
    STATES.get_or_init(Default::default)
}

pub(crate) fn set_state(name: &str, state: CertState) {
    lock(states()).insert(name.to_string(), state);
}

pub(crate) fn retain_states(names: &HashSet<&str>) {
    lock(states()).retain(|n, _| names.contains(n.as_str()));
}

/// The state of every certificate in `managed` (the config in force), by credential
/// name; one the schedule has not looked at yet is `pending`.
pub fn status(managed: &[Arc<ManagedCert>]) -> serde_json::Value {
    let states = lock(states());
    let mut names: Vec<&str> = managed.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let list: Vec<serde_json::Value> = names
        .into_iter()
        .filter_map(|name| {
            let m = managed.iter().find(|m| m.name == name)?;
            let s = states.get(name).cloned().unwrap_or_else(|| CertState {
                state: "pending",
                hosts: m.hosts.clone(),
                issuer: m.issuer.name.clone(),
                challenge: m.issuer.challenge.name(),
                ..CertState::default()
            });
            Some((name, s))
        })
        .map(|(name, s)| {
            serde_json::json!({
                "name": name,
                "hosts": s.hosts,
                "issuer": s.issuer,
                "challenge": s.challenge,
                "state": s.state,
                "notBefore": s.not_before,
                "notAfter": s.not_after,
                "nextOrder": s.next_order,
                "failures": s.failures,
                "lastError": s.last_error,
                "lastIssued": s.last_issued,
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_host_names_never_make_paths() {
        assert!(is_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!is_token("../etc/passwd"));
        assert!(!is_token("a/b"));
        assert!(!is_token(""));
        assert!(is_host_file_name("shop.example.com"));
        assert!(!is_host_file_name("../x"));
        assert!(!is_host_file_name("a/b"));
        assert!(!is_host_file_name(".hidden"));
    }

    #[test]
    fn http01_answers_only_managed_hosts_and_challenge_paths() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = AcmeHosts {
            http01: ["a.test".to_string()].into_iter().collect(),
            tls_alpn01: HashSet::new(),
            state_dir: dir.path().to_path_buf(),
        };
        challenges().put_http01("tok1", "tok1.thumb");
        let path = format!("{HTTP01_PREFIX}tok1");
        assert_eq!(
            hosts.http01_answer("a.test", &path),
            Some(Some("tok1.thumb".into()))
        );
        assert_eq!(hosts.http01_answer("b.test", &path), None, "not managed");
        assert_eq!(hosts.http01_answer("a.test", "/other"), None);
        assert_eq!(
            hosts.http01_answer("a.test", &format!("{HTTP01_PREFIX}nope")),
            Some(None)
        );
        // Another replica's answer, from the shared folder.
        let file = store::http01_path(dir.path(), "tok2");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "tok2.thumb").unwrap();
        assert_eq!(
            hosts.http01_answer("a.test", &format!("{HTTP01_PREFIX}tok2")),
            Some(Some("tok2.thumb".into()))
        );
        challenges().remove_http01("tok1");
    }

    #[test]
    fn stand_in_is_stable_and_names_the_hosts() {
        let hosts = vec!["a.test".to_string(), "b.test".to_string()];
        let (k1, not_after, subject) = stand_in("x", &hosts).unwrap();
        let (k2, _, _) = stand_in("x", &hosts).unwrap();
        assert!(Arc::ptr_eq(&k1, &k2));
        assert!(subject.contains("stand-in"), "{subject}");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(not_after > now + 6 * 86_400);
    }
}
