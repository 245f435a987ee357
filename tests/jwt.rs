//! RequestAuthentication through a real Portico process: tokens signed here (RS256 with
//! RSA keys made here, ES256 and EdDSA with ring), a JWKS server on loopback started by
//! the test (a std TCP server answering the set it is given, or refusing when "down"),
//! and the echo upstream showing what the upstream got. Runs through whichever codec the
//! environment chooses (`PORTICO_NO_FAST_PATH=true` for pingora's cycle); one test also
//! speaks h2.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair as _;
use serde_json::{json, Value};
use support::*;

const ISSUER: &str = "https://issuer.test";
const EC_ISSUER: &str = "https://ec.test";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signing key and its public JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.key).expect("sign")
    }
}

/// An RSA key (RS256). Made once per name: RSA key generation is slow.
fn rsa_key(kid: &str) -> &'static SigningKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    static KEYS: OnceLock<Mutex<Vec<&'static SigningKey>>> = OnceLock::new();
    let keys = KEYS.get_or_init(Default::default);
    let mut keys = keys.lock().unwrap();
    if let Some(k) = keys.iter().find(|k| k.kid == kid) {
        return k;
    }
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
    let der = private.to_pkcs1_der().expect("PKCS#1");
    let public = private.to_public_key();
    let key: &'static SigningKey = Box::leak(Box::new(SigningKey {
        kid: kid.to_string(),
        alg: Algorithm::RS256,
        key: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({
            "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
            "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be()),
        }),
    }));
    keys.push(key);
    key
}

fn ec_key(kid: &str) -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    SigningKey {
        kid: kid.to_string(),
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }),
    }
}

fn ed_key(kid: &str) -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    SigningKey {
        kid: kid.to_string(),
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key().as_ref()),
        }),
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

/// Claims for `sub` from `iss` for audience `portico`, valid from a minute ago for an hour.
fn claims(iss: &str, sub: &str) -> Value {
    json!({
        "iss": iss, "sub": sub, "aud": ["other", "portico"],
        "iat": now() - 60, "nbf": now() - 60, "exp": now() + 3600,
    })
}

/// A JWKS server on loopback: `GET /jwks` answers the set it holds; "down", it closes
/// every connection without answering.
struct JwksServer {
    port: u16,
    set: Arc<Mutex<String>>,
    down: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(set: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let set = Arc::new(Mutex::new(set));
        let down = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, d, f) = (set.clone(), down.clone(), fetches.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if d.load(Ordering::SeqCst) {
                    drop(conn);
                    continue;
                }
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                f.fetch_add(1, Ordering::SeqCst);
                let (status, body) = if line.starts_with("GET /jwks ") {
                    ("200 OK", s.lock().unwrap().clone())
                } else {
                    ("404 Not Found", String::new())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer {
            port,
            set,
            down,
            fetches,
        }
    }

    fn serve(&self, set: String) {
        *self.set.lock().unwrap() = set;
    }

    fn uri(&self) -> String {
        format!("http://127.0.0.1:{}/jwks", self.port)
    }
}

/// A gateway with a plain and a TLS port, the echo upstream behind `/`, a route limited by
/// the JWT `sub` claim (`/limited`) and one by the principal (`/per-principal`), and the
/// RequestAuthentication `rules` (TOML of `jwtRules` entries).
fn config(http: u16, https: u16, echo: u16, rules: &str, log: &std::path::Path) -> String {
    format!(
        r#"{mesh}accessLogFile = "{log}"
accessLogEncoding = "TEXT"
accessLogFormat = "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %REQ(:PATH)% %DYNAMIC_METADATA(istio_authn:request.auth.principal)%\n"

[[gateways]]
name = "gw"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["*"]
tls = {{ mode = "SIMPLE", serverCertificate = "gw.crt", privateKey = "gw.key" }}

[[virtualServices]]
name = "app"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
name = "limited"
match = [{{ uri = {{ prefix = "/limited" }} }}]
{to}
[[virtualServices.http]]
name = "per-principal"
match = [{{ uri = {{ prefix = "/per-principal" }} }}]
{to}
[[virtualServices.http]]
name = "all"
{to}

{upstreams}

[[rateLimits]]
name = "by-sub"
targetRefs = [{{ kind = "VirtualService", name = "app", sectionName = "limited" }}]
[[rateLimits.local.rules]]
clientSelectors = [{{ jwtClaims = [{{ name = "sub", type = "Distinct" }}] }}]
limit = {{ requests = 2, unit = "Minute" }}
[[rateLimits.local.rules.overrides]]
jwtClaims = {{ sub = "vip" }}
limit = {{ requests = 4, unit = "Minute" }}

[[rateLimits]]
name = "by-principal"
targetRefs = [{{ kind = "VirtualService", name = "app", sectionName = "per-principal" }}]
[[rateLimits.local.rules]]
clientSelectors = [{{ requestPrincipal = {{ type = "Distinct" }} }}]
limit = {{ requests = 1, unit = "Minute" }}

[[requestAuthentications]]
name = "jwt"
{rules}
"#,
        mesh = mesh_config(free_port()),
        log = log.display(),
        to = route_to("v1"),
        upstreams = upstreams_config(&[("v1", echo)]),
    )
}

struct Setup {
    _tmp: tempfile::TempDir,
    _echo: Echo,
    portico: Portico,
    http: u16,
    https: u16,
    log: std::path::PathBuf,
}

fn start(rules: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    write_cert(tmp.path(), "gw", &["jwt.test"]);
    let echo = Echo::start("v1");
    let (http, https) = (free_port(), free_port());
    let log = tmp.path().join("access.log");
    let portico = Portico::start(tmp.path(), &config(http, https, echo.port(), rules, &log));
    Setup {
        _tmp: tmp,
        _echo: echo,
        portico,
        http,
        https,
        log,
    }
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    http_request(port, "GET", "jwt.test", path, headers, b"")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The inline-keyed rule: ES256 and EdDSA keys, the token in `x-jwt` (kept upstream), and
/// the payload and two claims as headers.
fn inline_rule(keys: &[&SigningKey]) -> String {
    format!(
        r#"[[requestAuthentications.jwtRules]]
issuer = "{EC_ISSUER}"
jwks = '{}'
fromHeaders = [{{ name = "x-jwt", prefix = "" }}]
fromCookies = ["session"]
outputPayloadToHeader = "x-jwt-payload"
outputClaimToHeaders = [{{ header = "x-sub", claim = "sub" }}, {{ header = "x-team", claim = "org.team" }}, {{ header = "x-groups", claim = "groups" }}]
forwardOriginalToken = true
"#,
        jwks(keys)
    )
}

fn remote_rule(uri: &str) -> String {
    format!(
        r#"[[requestAuthentications.jwtRules]]
issuer = "{ISSUER}"
audiences = ["https://portico/"]
jwksUri = "{uri}"
"#
    )
}

fn assert_logged(s: &Setup, line: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&s.log)
                .unwrap_or_default()
                .lines()
                .any(|l| l == line)
        }),
        "{line:?} in:\n{}",
        std::fs::read_to_string(&s.log).unwrap_or_default()
    );
}

#[test]
fn tokens_are_verified_as_envoy_verifies_them() {
    let k1 = rsa_key("k1");
    let server = JwksServer::start(jwks(&[k1]));
    let (ec, ed) = (ec_key("ec1"), ed_key("ed1"));
    let s = start(&format!(
        "{}{}",
        remote_rule(&server.uri()),
        inline_rule(&[&ec, &ed])
    ));

    // A good RS256 token in `Authorization`: through, without its header.
    let good = k1.sign(&claims(ISSUER, "alice"));
    let r = get(s.http, "/get", &[("authorization", &bearer(&good))]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.echoed_header("authorization"),
        None,
        "the token stays behind"
    );
    // In the query (`access_token`, the default's second place).
    let r = get(s.http, &format!("/get?access_token={good}"), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    // No token: through, without identity.
    let r = get(
        s.http,
        "/get",
        &[("x-jwt-payload", "spoofed"), ("x-sub", "admin")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echoed_header("x-jwt-payload"),
        None,
        "a client's output headers go"
    );
    assert_eq!(r.echoed_header("x-sub"), None);

    let refused = |token: &str, status: u16, text: &str| {
        let r = get(s.http, "/get?x=1", &[("authorization", &bearer(token))]);
        assert_eq!((r.status, r.text().as_str()), (status, text));
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"http://jwt.test/get?x=1\", error=\"invalid_token\"")
        );
        assert_eq!(r.upstream(), None, "refused at the gateway");
    };
    let mut c = claims(ISSUER, "alice");
    c["exp"] = json!(now() - 120);
    refused(&k1.sign(&c), 401, "Jwt is expired");
    let mut c = claims(ISSUER, "alice");
    c["exp"] = json!(now() - 30);
    let r = get(s.http, "/get", &[("authorization", &bearer(&k1.sign(&c)))]);
    assert_eq!(r.status, 200, "within the 60 s clock skew");
    let mut c = claims(ISSUER, "alice");
    c["nbf"] = json!(now() + 600);
    refused(&k1.sign(&c), 401, "Jwt not yet valid");
    let mut c = claims(ISSUER, "alice");
    c["aud"] = json!("someone-else");
    refused(&k1.sign(&c), 403, "Audiences in Jwt are not allowed");
    refused(
        &k1.sign(&claims("https://elsewhere.test", "alice")),
        401,
        "Jwt issuer is not configured",
    );
    // Signed by another key under the same kid.
    let impostor = SigningKey {
        kid: "k1".into(),
        alg: Algorithm::RS256,
        key: rsa_key("other").key.clone(),
        jwk: Value::Null,
    };
    refused(
        &impostor.sign(&claims(ISSUER, "alice")),
        401,
        "Jwt verification fails",
    );
    let (h, p, _) = {
        let mut it = good.split('.');
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    refused(
        &format!("{h}.{p}"),
        401,
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
    );
    let tampered = format!(
        "{h}.{}.{}",
        b64(br#"{"iss":"https://issuer.test","sub":"root","aud":"portico"}"#),
        good.rsplit('.').next().unwrap()
    );
    refused(&tampered, 401, "Jwt verification fails");

    // ES256 in `x-jwt`: kept upstream (forwardOriginalToken), with the outputs.
    let mut c = claims(EC_ISSUER, "bob");
    c["org"] = json!({ "team": "edge" });
    c["groups"] = json!(["dev", "ops"]);
    let token = ec.sign(&c);
    let r = get(s.http, "/get", &[("x-jwt", &token), ("x-team", "spoofed")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed_header("x-jwt").as_deref(), Some(token.as_str()));
    assert_eq!(
        r.echoed_header("x-jwt-payload").as_deref(),
        token.split('.').nth(1)
    );
    assert_eq!(r.echoed_header("x-sub").as_deref(), Some("bob"));
    assert_eq!(r.echoed_header("x-team").as_deref(), Some("edge"));
    assert_eq!(r.echoed_header("x-groups").as_deref(), Some("dev,ops"));
    // EdDSA, from a cookie.
    let token = ed.sign(&claims(EC_ISSUER, "carol"));
    let r = get(
        s.http,
        "/get",
        &[("cookie", &format!("a=b; session={token}"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed_header("x-sub").as_deref(), Some("carol"));
    // An RS256 token in `x-jwt`: that place is the EC issuer's only.
    let r = get(s.http, "/get", &[("x-jwt", &good)]);
    assert_eq!(
        (r.status, r.text().as_str()),
        (401, "Jwt issuer is not configured")
    );

    // The log says why, in Envoy's words, and who a verified token is.
    assert_logged(&s, "401 jwt_authn_access_denied{Jwt_is_expired} /get?x=1 -");
    assert_logged(&s, "200 via_upstream /get https://issuer.test/alice");
    assert_logged(&s, "200 via_upstream /get https://ec.test/carol");
    let metrics = http_get(s.portico.admin_port, "localhost", "/metrics").text();
    assert!(
        metric_sum(&metrics, "portico_jwt_requests_total", "result=\"denied\"").unwrap() >= 8.0
    );
    assert!(
        metric_sum(
            &metrics,
            "portico_jwt_requests_total",
            "result=\"verified\""
        )
        .unwrap()
            >= 5.0
    );
}

#[test]
fn keys_rotate_and_a_jwks_server_down_leaves_the_last_good_set() {
    let (k1, k2) = (rsa_key("k1"), rsa_key("k2"));
    let server = JwksServer::start(jwks(&[k1]));
    let rule = format!(
        "{}jwksRefreshInterval = \"1s\"\n",
        remote_rule(&server.uri())
    );
    let s = start(&rule);
    let ok = |key: &SigningKey| {
        get(
            s.http,
            "/get",
            &[("authorization", &bearer(&key.sign(&claims(ISSUER, "a"))))],
        )
    };
    assert_eq!(ok(k1).status, 200);
    // Rotation: the server now has k2 only. A k2 token is unknown to the cached set: the
    // set is fetched again (once), and the token verifies.
    server.serve(jwks(&[k2]));
    std::thread::sleep(Duration::from_millis(1100));
    let r = ok(k2);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        server.fetches.load(Ordering::SeqCst) >= 2,
        "fetched again for the new key"
    );
    // A kid no set has: fetched again, still unknown: 401.
    std::thread::sleep(Duration::from_millis(1100));
    let unknown = SigningKey {
        kid: "k9".into(),
        alg: Algorithm::RS256,
        key: k2.key.clone(),
        jwk: Value::Null,
    };
    // (Whether this request fetched or the 1 s refresher just had is a race: the answer
    // is the same.)
    let r = ok(&unknown);
    assert_eq!(
        (r.status, r.text().as_str()),
        (401, "Jwks doesn't have key to match kid or alg from Jwt")
    );
    // The server goes down: refreshes (every second) fail, the last good set stays.
    server.down.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(ok(k2).status, 200, "the last good set is kept");
    assert_eq!(ok(&unknown).status, 401);
    assert_eq!(ok(k1).status, 401, "k1 left with the rotation");
    let metrics = http_get(s.portico.admin_port, "localhost", "/metrics").text();
    assert!(
        metric_sum(&metrics, "portico_jwks_fetches_total", "result=\"failure\"").unwrap() >= 1.0
    );
    // Back up with k1 again: the timer picks it up.
    server.serve(jwks(&[k1, k2]));
    server.down.store(false, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(10), || ok(k1).status == 200));
}

#[test]
fn a_jwks_server_down_from_the_start_refuses_tokens_and_passes_the_rest() {
    let server = JwksServer::start(String::new());
    server.down.store(true, Ordering::SeqCst);
    let s = start(&remote_rule(&server.uri()));
    let token = rsa_key("k1").sign(&claims(ISSUER, "a"));
    let r = get(s.http, "/get", &[("authorization", &bearer(&token))]);
    assert_eq!(
        (r.status, r.text().as_str()),
        (401, "Jwks remote fetch is failed")
    );
    assert_eq!(get(s.http, "/get", &[]).status, 200, "no token: through");
}

#[test]
fn rate_limits_count_by_claim_and_by_principal() {
    let k1 = rsa_key("k1");
    let server = JwksServer::start(jwks(&[k1]));
    let s = start(&remote_rule(&server.uri()));
    let token = |sub: &str| bearer(&k1.sign(&claims(ISSUER, sub)));
    let statuses = |path: &str, sub: Option<&str>, n: usize| -> Vec<u16> {
        let t = sub.map(token);
        let headers: Vec<(&str, &str)> = t.iter().map(|t| ("authorization", t.as_str())).collect();
        (0..n).map(|_| get(s.http, path, &headers).status).collect()
    };
    assert_eq!(statuses("/limited", Some("alice"), 3), [200, 200, 429]);
    assert_eq!(
        statuses("/limited", Some("bob"), 3),
        [200, 200, 429],
        "each sub apart"
    );
    assert_eq!(
        statuses("/limited", Some("vip"), 5),
        [200, 200, 200, 200, 429],
        "the override"
    );
    assert_eq!(
        statuses("/limited", None, 4),
        [200; 4],
        "no token, no claim: the rule does not count it"
    );
    let r = get(s.http, "/limited", &[("authorization", &token("alice"))]);
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(statuses("/per-principal", Some("alice"), 2), [200, 429]);
    assert_eq!(statuses("/per-principal", Some("bob"), 2), [200, 429]);
}

#[test]
fn h2_requests_are_verified_by_the_same_core() {
    let (ec, ed) = (ec_key("ec1"), ed_key("ed1"));
    let s = start(&inline_rule(&[&ec, &ed]));
    let mut h2 = H2Client::connect(s.https, "jwt.test").expect("h2 connection");
    let good = ec.sign(&claims(EC_ISSUER, "dana"));
    let mut expired = claims(EC_ISSUER, "dana");
    expired["exp"] = json!(now() - 3600);
    let expired = ed.sign(&expired);
    let answers = h2.send_all(&[
        (
            "GET",
            "jwt.test",
            "/get",
            vec![("x-jwt", good.as_str())],
            b"",
        ),
        (
            "GET",
            "jwt.test",
            "/get",
            vec![("x-jwt", expired.as_str())],
            b"",
        ),
        ("GET", "jwt.test", "/get", vec![], b""),
    ]);
    let good_r = answers[0].as_ref().unwrap();
    assert_eq!(good_r.status, 200, "{}", good_r.text());
    assert_eq!(good_r.echoed_header("x-sub").as_deref(), Some("dana"));
    let bad = answers[1].as_ref().unwrap();
    assert_eq!((bad.status, bad.text().as_str()), (401, "Jwt is expired"));
    assert_eq!(
        bad.header("www-authenticate"),
        Some("Bearer realm=\"https://jwt.test/get\", error=\"invalid_token\"")
    );
    assert_eq!(answers[2].as_ref().unwrap().status, 200);
    assert_logged(&s, "200 via_upstream /get https://ec.test/dana");
    assert_logged(&s, "401 jwt_authn_access_denied{Jwt_is_expired} /get -");
}

#[test]
fn istio_manifests_load_and_bad_rules_are_config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ec = ec_key("ec1");
    let echo = Echo::start("v1");
    let http = free_port();
    let manifests = format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: gw, namespace: istio-system }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {http}, name: http, protocol: HTTP }}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: app, namespace: istio-system }}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route:
    - destination: {{ host: svc.internal, subset: v1, port: {{ number: 80 }} }}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{ name: jwt-on-ingress, namespace: istio-system }}
spec:
  selector:
    matchLabels: {{ istio: ingressgateway }}
  jwtRules:
  - issuer: {EC_ISSUER}
    jwks: '{}'
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{ name: for-a-sidecar, namespace: default }}
spec:
  selector:
    matchLabels: {{ app: httpbin }}
  jwtRules:
  - issuer: https://never.test
    jwks: '{{"keys": []}}'
"#,
        jwks(&[&ec])
    );
    std::fs::write(tmp.path().join("istio.yaml"), manifests).unwrap();
    let toml = format!(
        "{}{}",
        mesh_config(free_port()),
        upstreams_config(&[("v1", echo.port())])
    );
    let istio = tmp.path().join("istio.yaml");
    let portico =
        Portico::start_with_args(tmp.path(), &toml, &["--istio", istio.to_str().unwrap()]);
    let good = ec.sign(&claims(EC_ISSUER, "erin"));
    let r = get(http, "/", &[("authorization", &bearer(&good))]);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut expired = claims(EC_ISSUER, "erin");
    expired["exp"] = json!(now() - 3600);
    let r = get(http, "/", &[("authorization", &bearer(&ec.sign(&expired)))]);
    assert_eq!(r.status, 401);
    drop(portico);

    // Config errors name the field.
    let bad = format!(
        r#"{}
[[gateways]]
name = "gw"
[[gateways.servers]]
port = {{ number = {}, name = "http", protocol = "HTTP" }}
hosts = ["*"]

[[requestAuthentications]]
name = "bad"
[[requestAuthentications.jwtRules]]
issuer = "https://x.test"
jwks = '{{"keys": "no"}}'
[[requestAuthentications.jwtRules]]
issuer = "https://y.test"
jwksUri = "ftp://keys.test/jwks"
[[requestAuthentications.jwtRules]]
issuer = ""
"#,
        mesh_config(free_port()),
        free_port()
    );
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    for want in [
        "requestAuthentications[0].jwtRules[0].jwks: [keys] in Jwks is not an array",
        "requestAuthentications[0].jwtRules[1].jwksUri",
        "the scheme must be http or https",
        "requestAuthentications[0].jwtRules[2].issuer: is required",
        "requestAuthentications[0].jwtRules[2]: needs jwks or jwksUri",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
}

#[test]
fn an_allow_policy_for_any_request_principal_requires_a_token() {
    // Istio's "require a JWT" pattern: RequestAuthentication plus an ALLOW policy for
    // `requestPrincipals: ["*"]`; and a DENY on a list claim (any element matches).
    let (ec, ed) = (ec_key("ec1"), ed_key("ed1"));
    let policies = r#"
[[authorizationPolicies]]
name = "require-jwt"
namespace = "istio-system"
action = "ALLOW"
rules = [{ from = [{ source = { requestPrincipals = ["*"] } }] }]

[[authorizationPolicies]]
name = "no-banned"
namespace = "istio-system"
action = "DENY"
rules = [{ when = [{ key = "request.auth.claims[groups]", values = ["banned"] }] }]
"#;
    let s = start(&format!("{}{policies}", inline_rule(&[&ec, &ed])));
    let r = get(s.http, "/get", &[]);
    assert_eq!((r.status, r.text().as_str()), (403, "RBAC: access denied"));
    let good = ec.sign(&claims(EC_ISSUER, "frank"));
    let r = get(s.http, "/get", &[("x-jwt", &good)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed_header("x-sub").as_deref(), Some("frank"));
    let mut expired = claims(EC_ISSUER, "frank");
    expired["exp"] = json!(now() - 3600);
    let r = get(s.http, "/get", &[("x-jwt", &ec.sign(&expired))]);
    assert_eq!(
        (r.status, r.text().as_str()),
        (401, "Jwt is expired"),
        "authentication answers before authorization"
    );
    let mut banned = claims(EC_ISSUER, "gina");
    banned["groups"] = json!(["dev", "banned"]);
    let r = get(s.http, "/get", &[("x-jwt", &ed.sign(&banned))]);
    assert_eq!((r.status, r.text().as_str()), (403, "RBAC: access denied"));
    let mut fine = claims(EC_ISSUER, "gina");
    fine["groups"] = json!(["dev"]);
    assert_eq!(
        get(s.http, "/get", &[("x-jwt", &ed.sign(&fine))]).status,
        200
    );
}

#[test]
fn tokens_are_checked_on_the_listener_routed_or_not() {
    // Istio's "require a JWT" pattern on a gateway whose one VirtualService routes `/api`
    // only. Envoy's jwt_authn filter runs for every request on the listener, before RBAC
    // and before routing's answer: a valid token to a path no route takes is a 404 (not
    // RBAC's 403), no token is RBAC's 403, and a bad token is 401 wherever it goes.
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let http = free_port();
    let ec = ec_key("ec1");
    let log = tmp.path().join("access.log");
    let config = format!(
        r#"{mesh}accessLogFile = "{log}"
accessLogEncoding = "TEXT"
accessLogFormat = "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %REQ(:PATH)% %DYNAMIC_METADATA(istio_authn:request.auth.principal)%\n"

[[gateways]]
name = "gw"
namespace = "istio-system"
selector = {{ istio = "ingressgateway" }}
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "app"
namespace = "istio-system"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
match = [{{ uri = {{ prefix = "/api" }} }}]
{to}

{upstreams}

[[requestAuthentications]]
name = "jwt"
namespace = "istio-system"
selector = {{ matchLabels = {{ istio = "ingressgateway" }} }}
[[requestAuthentications.jwtRules]]
issuer = "{EC_ISSUER}"
jwks = '{set}'

[[authorizationPolicies]]
name = "require-jwt"
namespace = "istio-system"
selector = {{ matchLabels = {{ istio = "ingressgateway" }} }}
action = "ALLOW"
rules = [{{ from = [{{ source = {{ requestPrincipals = ["*"] }} }}] }}]
"#,
        mesh = mesh_config(free_port()),
        log = log.display(),
        to = route_to("v1"),
        upstreams = upstreams_config(&[("v1", echo.port())]),
        set = jwks(&[&ec]),
    );
    let _portico = Portico::start(tmp.path(), &config);
    let good = bearer(&ec.sign(&claims(EC_ISSUER, "frank")));
    let mut expired = claims(EC_ISSUER, "frank");
    expired["exp"] = json!(now() - 3600);
    let bad = bearer(&ec.sign(&expired));
    let auth = |v: &str| vec![("authorization", v.to_string())];
    let req = |path: &str, h: &[(&str, String)]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
        get(http, path, &h)
    };

    let r = req("/api/x", &auth(&good));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = req("/nowhere", &auth(&good));
    assert_eq!(
        r.status,
        404,
        "a valid token to an unrouted path: the token was checked, so authorization lets it reach routing: {}",
        r.text()
    );
    for path in ["/api/x", "/nowhere"] {
        let r = req(path, &[]);
        assert_eq!(
            (r.status, r.text().as_str()),
            (403, "RBAC: access denied"),
            "{path}"
        );
        let r = req(path, &auth(&bad));
        assert_eq!(
            (r.status, r.text().as_str()),
            (401, "Jwt is expired"),
            "{path}"
        );
        assert!(
            r.header("www-authenticate")
                .is_some_and(|w| w.contains("invalid_token")),
            "{path}: {:?}",
            r.header("www-authenticate")
        );
        let r = req(path, &auth("Bearer not.a-token"));
        assert_eq!(r.status, 401, "{path}: {}", r.text());
    }
    let wait_line = |line: &str| {
        assert!(
            wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| l == line)),
            "{line:?} in:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    wait_line(&format!("404 route_not_found /nowhere {EC_ISSUER}/frank"));
    wait_line("401 jwt_authn_access_denied{Jwt_is_expired} /nowhere -");
}
