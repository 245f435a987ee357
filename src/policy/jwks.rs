//! JSON Web Key Sets for JWT verification: parsed once (inline `jwks`, or each answer of a
//! `jwksUri`) into ring public keys. A remote set is fetched off the request path — by
//! [`Refresher`] on its interval, or by a task a request with an unknown `kid` starts —
//! one fetch at a time, and a failed fetch keeps the last good set. A request never holds
//! a lock across a wait: it waits on a watch of completed fetches.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine as _;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::sync::watch;

/// A JWKS may be this large at most.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// An unknown `kid` fetches the set again at most this often.
pub const MIN_REFETCH: Duration = Duration::from_secs(1);
/// After a failed fetch, the refresher tries again this soon (Envoy's
/// `failed_refetch_duration` is 1s).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// The kind of a public key, and so the algorithms it verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind verifies signatures of `alg`.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::P256, ES256)
                | (KeyKind::P384, ES384)
                | (KeyKind::Ed25519, EdDSA)
        )
    }
}

/// One public key of a set.
pub struct Key {
    pub kid: Option<String>,
    /// The key's `alg`, when it names one: then only tokens of that algorithm.
    pub alg: Option<Algorithm>,
    pub kind: KeyKind,
    pub key: DecodingKey,
}

/// A parsed JSON Web Key Set: the keys Portico can verify with (RSA, EC P-256/P-384,
/// Ed25519); others (symmetric, encryption keys, other curves) are left out.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

fn b64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

impl KeySet {
    /// Parses a JWKS; an error names what is wrong with it in Envoy's words.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("Jwks is an invalid JSON: {e}"))?;
        let keys = match v.get("keys") {
            None => return Err("Jwks does not have [keys] field".into()),
            Some(Value::Array(k)) => k,
            Some(_) => return Err("[keys] in Jwks is not an array".into()),
        };
        let mut out = Vec::new();
        for k in keys {
            if let Some(key) = Self::key(k) {
                out.push(key);
            }
        }
        if out.is_empty() {
            return Err("Jwks doesn't have any valid public key".into());
        }
        Ok(KeySet { keys: out })
    }

    fn key(k: &Value) -> Option<Key> {
        let s = |name: &str| k.get(name).and_then(Value::as_str);
        if s("use").is_some_and(|u| u != "sig") {
            return None;
        }
        let alg = match s("alg") {
            None => None,
            Some(a) => Some(a.parse::<Algorithm>().ok()?),
        };
        let (kind, key) = match s("kty")? {
            "RSA" => {
                let (n, e) = (s("n")?, s("e")?);
                (KeyKind::Rsa, DecodingKey::from_rsa_components(n, e).ok()?)
            }
            "EC" => {
                let (kind, len) = match s("crv")? {
                    "P-256" => (KeyKind::P256, 32),
                    "P-384" => (KeyKind::P384, 48),
                    _ => return None,
                };
                let (x, y) = (b64(s("x")?)?, b64(s("y")?)?);
                if x.len() != len || y.len() != len {
                    return None;
                }
                (
                    kind,
                    DecodingKey::from_ec_components(s("x")?, s("y")?).ok()?,
                )
            }
            "OKP" => {
                if s("crv")? != "Ed25519" || b64(s("x")?)?.len() != 32 {
                    return None;
                }
                (
                    KeyKind::Ed25519,
                    DecodingKey::from_ed_components(s("x")?).ok()?,
                )
            }
            _ => return None,
        };
        if alg.is_some_and(|a| !kind.fits(a)) {
            return None;
        }
        Some(Key {
            kid: s("kid").map(str::to_string),
            alg,
            kind,
            key,
        })
    }

    /// The keys that may have signed a token of `alg` with `kid` (as Envoy picks them: a
    /// key's `kid` and `alg`, when it has them, must be the token's).
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| {
            k.kind.fits(alg)
                && k.alg.is_none_or(|a| a == alg)
                && match (kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Where a rule's keys come from.
#[derive(Clone)]
pub enum Jwks {
    Inline(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

/// A `jwksUri`, split for the fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    /// To connect to (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` field.
    pub authority: String,
    /// Path and query.
    pub path: String,
}

impl Target {
    pub fn parse(uri: &str) -> Result<Target, String> {
        let u: http::Uri = uri
            .parse()
            .map_err(|e| format!("{uri:?} is not a URL: {e}"))?;
        let https = match u.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{uri:?}: the scheme must be http or https")),
        };
        let authority = u
            .authority()
            .ok_or_else(|| format!("{uri:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(format!("{uri:?} has no host"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = u
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        Ok(Target {
            https,
            host,
            port,
            authority: authority.as_str().to_string(),
            path,
        })
    }
}

#[derive(Default)]
struct FetchState {
    fetching: bool,
    /// When the last fetch ended, and whether it failed.
    last_end: Option<Instant>,
    last_failed: bool,
    last_success: Option<Instant>,
}

/// A `jwksUri`'s key set: the last good answer, fetched again on an interval and when a
/// token names a `kid` the set lacks. Kept across reloads while its settings stay.
pub struct RemoteJwks {
    pub uri: String,
    target: Target,
    /// How long one fetch may take.
    pub timeout: Duration,
    /// How often the set is fetched again.
    pub refresh: Duration,
    keys: ArcSwapOption<KeySet>,
    state: Mutex<FetchState>,
    /// Counts completed fetches (good or not): requests wait on it.
    done: watch::Sender<u64>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteJwks({})", self.uri)
    }
}

impl RemoteJwks {
    pub fn new(uri: String, target: Target, timeout: Duration, refresh: Duration) -> RemoteJwks {
        RemoteJwks {
            uri,
            target,
            timeout,
            refresh,
            keys: ArcSwapOption::empty(),
            state: Mutex::new(FetchState::default()),
            done: watch::Sender::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last good set, if a fetch ever succeeded.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// Whether the refresher should fetch now: never fetched, the last fetch failed a
    /// while ago, or the set is older than `refresh`.
    pub fn due(&self) -> bool {
        let st = self.state();
        if st.fetching {
            return false;
        }
        match (st.last_end, st.last_failed, st.last_success) {
            (None, _, _) => true,
            (Some(end), true, _) => end.elapsed() >= RETRY_AFTER_FAILURE.min(self.refresh),
            (_, false, Some(ok)) => ok.elapsed() >= self.refresh,
            (Some(_), false, None) => true,
        }
    }

    /// Starts a fetch in a task of its own unless one is under way.
    pub fn start_fetch(self: &Arc<Self>) {
        {
            let mut st = self.state();
            if st.fetching {
                return;
            }
            st.fetching = true;
        }
        let me = self.clone();
        tokio::spawn(async move { me.fetch().await });
    }

    async fn fetch(&self) {
        let got = match tokio::time::timeout(self.timeout, get(&self.target)).await {
            Ok(Ok(body)) => std::str::from_utf8(&body)
                .map_err(|_| "the answer is not UTF-8".to_string())
                .and_then(KeySet::parse),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        let m = crate::telemetry::Metrics::global();
        let ok = got.is_ok();
        match got {
            Ok(set) => {
                tracing::debug!(uri = %self.uri, keys = set.len(), "JWKS fetched");
                self.keys.store(Some(Arc::new(set)));
            }
            Err(e) => {
                let kept = self.keys.load().is_some();
                tracing::warn!(uri = %self.uri, error = %e, last_good_kept = kept, "JWKS fetch failed");
            }
        }
        m.jwks_fetches
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        {
            let mut st = self.state();
            st.fetching = false;
            st.last_end = Some(Instant::now());
            st.last_failed = !ok;
            if ok {
                st.last_success = st.last_end;
            }
        }
        self.done.send_modify(|n| *n += 1);
    }

    /// For a token whose key the set lacks (or before any set): fetches again — joining a
    /// fetch under way, and starting one at most every [`MIN_REFETCH`] — and waits for it
    /// up to the fetch timeout. The set after, if any.
    pub async fn refetch(self: &Arc<Self>) -> Option<Arc<KeySet>> {
        let mut rx = self.done.subscribe();
        let seen = *rx.borrow_and_update();
        {
            let st = self.state();
            let recent = st.last_end.is_some_and(|t| t.elapsed() < MIN_REFETCH);
            if !st.fetching && recent {
                return self.current();
            }
        }
        self.start_fetch();
        let wait = self.timeout + Duration::from_millis(100);
        let _ = tokio::time::timeout(wait, rx.wait_for(|n| *n > seen)).await;
        self.current()
    }
}

/// The client TLS settings for https `jwksUri`s: the system's roots.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system root certificates for https".into());
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// GET the target: the body of a 200 answer.
async fn get(t: &Target) -> Result<Bytes, String> {
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", t.authority))?;
    let _ = tcp.set_nodelay(true);
    if t.https {
        let connector = tokio_rustls::TlsConnector::from(tls_config()?);
        let name = rustls_pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| format!("{:?} is not a server name: {e}", t.host))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", t.authority))?;
        exchange(hyper_util::rt::TokioIo::new(tls), t).await
    } else {
        exchange(hyper_util::rt::TokioIo::new(tcp), t).await
    }
}

async fn exchange<I>(io: I, t: &Target) -> Result<Bytes, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::BodyExt as _;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP with {}: {e}", t.authority))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(t.path.as_str())
        .header(http::header::HOST, t.authority.as_str())
        .header(
            http::header::USER_AGENT,
            concat!("portico/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP with {}: {e}", t.authority))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("the server answered {}", resp.status().as_u16()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok(body.to_bytes())
    }
    .await;
    driver.abort();
    result
}

/// The background task that keeps every `jwksUri` of the Snapshot in force fetched:
/// each second it starts the fetches that are due.
pub struct Refresher {
    pub snapshots: Arc<ArcSwap<crate::snapshot::Snapshot>>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Refresher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            {
                let snapshot = self.snapshots.load_full();
                for jwks in snapshot.policies.jwks.iter().filter(|j| j.due()) {
                    jwks.start_fetch();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_keep_the_keys_they_can_use() {
        let set = KeySet::parse(
            r#"{"keys":[
                {"kty":"oct","k":"c2VjcmV0","kid":"hmac"},
                {"kty":"EC","crv":"P-256","kid":"short","x":"AA","y":"AA"},
                {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.candidates(Some("ed"), Algorithm::EdDSA).count(), 1);
        assert_eq!(set.candidates(Some("other"), Algorithm::EdDSA).count(), 0);
        assert_eq!(set.candidates(None, Algorithm::EdDSA).count(), 1);
        assert_eq!(set.candidates(Some("ed"), Algorithm::ES256).count(), 0);
        assert_eq!(
            KeySet::parse(r#"{"keys":[]}"#).unwrap_err(),
            "Jwks doesn't have any valid public key"
        );
        assert_eq!(
            KeySet::parse(r#"{}"#).unwrap_err(),
            "Jwks does not have [keys] field"
        );
        assert!(KeySet::parse("not json").is_err());
    }

    #[test]
    fn targets() {
        let t = Target::parse("https://idp.example.com/.well-known/jwks.json").unwrap();
        assert_eq!(
            (t.https, t.port, t.path.as_str()),
            (true, 443, "/.well-known/jwks.json")
        );
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8080, "/")
        );
        assert_eq!(t.authority, "[::1]:8080");
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("/relative").is_err());
    }
}
