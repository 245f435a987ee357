//! The command line: --version, routes (explain a request), validate on the shipped default
//! config, and run with a missing config file.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn version() {
    let (code, out) = run_cli(&["--version"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "portico 0.1.0");
}

const ROUTES_CONFIG: &str = r#"[mesh]
admin = "127.0.0.1:15000"

[[gateways]]
name = "public"
[[gateways.servers]]
port = { number = 8080, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["shop.example.com", "*.shop.example.com"]
gateways = ["public"]

[[virtualServices.http]]
name = "api-blue"
match = [{ uri = { prefix = "/api/" }, headers = { x-team = { exact = "blue" } } }]
route = [{ destination = { host = "svc.internal", subset = "v2", port = { number = 80 } } }]

[[virtualServices.http]]
name = "api-post"
match = [{ uri = { prefix = "/api/" }, method = { exact = "POST" } }]
route = [{ destination = { host = "svc.internal", subset = "v2", port = { number = 80 } } }]

[[virtualServices.http]]
name = "api"
match = [{ uri = { prefix = "/api/" } }]
route = [{ destination = { host = "svc.internal", subset = "v1", port = { number = 80 } } }]

[[virtualServices.http]]
match = [{ uri = { exact = "/health" } }]
directResponse = { status = 200, body = { string = "ok" } }

[[virtualServices]]
name = "blog"
hosts = ["blog.example.com"]
gateways = ["public"]

[[virtualServices.http]]
name = "blog-home"
match = [{ uri = { prefix = "/" } }]
directResponse = { status = 200, body = { string = "blog" } }

[[destinationRules]]
name = "svc"
host = "svc.internal"
subsets = [{ name = "v1", labels = { version = "v1" } }, { name = "v2", labels = { version = "v2" } }]

[[serviceEntries]]
name = "svc"
hosts = ["svc.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [
  { address = "127.0.0.1", ports = { http = 9001 }, labels = { version = "v1" } },
  { address = "127.0.0.1", ports = { http = 9002 }, labels = { version = "v2" } },
]
"#;

fn routes(config: &Path, args: &[&str]) -> (i32, String) {
    let mut all = vec!["routes", "-c", config.to_str().unwrap()];
    all.extend_from_slice(args);
    run_cli(&all)
}

/// `portico routes` names the VirtualService, the `http[i]` index, the route name (none for
/// an unnamed route) and the virtual host, on the one line that says which route serves.
fn assert_explains(out: &str, vs: &str, index: usize, route_name: Option<&str>, vhost: &str) {
    let name = route_name.map(|n| format!(" {n:?}")).unwrap_or_default();
    let want = format!(
        "listener HTTP 127.0.0.1:8080: route default/{vs}.http[{index}]{name} on virtual host {vhost}"
    );
    let routes: Vec<&str> = out.lines().filter(|l| l.contains(": route ")).collect();
    assert_eq!(routes, [want.as_str()], "in:\n{out}");
    assert!(
        !out.lines().any(|l| l == "no route"),
        "a match must not print `no route`:\n{out}"
    );
}

#[test]
fn routes_explains_the_match() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("portico.toml");
    write_atomic(&config, ROUTES_CONFIG);

    let (code, out) = routes(
        &config,
        &["--host", "shop.example.com", "--path", "/api/items"],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 2, Some("api"), "shop.example.com");

    let (code, out) = routes(
        &config,
        &[
            "--host",
            "shop.example.com",
            "--path",
            "/api/items",
            "--header",
            "x-team=blue",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 0, Some("api-blue"), "shop.example.com");

    let (code, out) = routes(
        &config,
        &[
            "--host",
            "shop.example.com",
            "--path",
            "/api/items",
            "--method",
            "POST",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 1, Some("api-post"), "shop.example.com");

    // An unnamed route is still identified by its index; wildcard host, port, upper case.
    let (code, out) = routes(
        &config,
        &["--host", "EU.Shop.Example.com:8080", "--path", "/health"],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 3, None, "*.shop.example.com");

    let (code, out) = routes(
        &config,
        &["--host", "blog.example.com", "--path", "/2024/post"],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "blog", 0, Some("blog-home"), "blog.example.com");
}

/// Without `--host`, every route with the codec that carries it, and the share: a route
/// whose destination speaks HTTP/2 (h2c) is lent to pingora's cycle; one whose destination
/// hashes to an endpoint (`consistentHash`) stays on the fast codecs.
#[test]
fn routes_lists_every_route_with_its_codec() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("portico.toml");
    let lent = ROUTES_CONFIG.replace(
        r#"{ name = "v2", labels = { version = "v2" } }"#,
        r#"{ name = "v2", labels = { version = "v2" }, trafficPolicy = { connectionPool = { http = { h2UpgradePolicy = "UPGRADE" } } } }"#,
    );
    let sticky = lent.replace(
        r#"{ name = "v1", labels = { version = "v1" } }"#,
        r#"{ name = "v1", labels = { version = "v1" }, trafficPolicy = { loadBalancer = { consistentHash = { httpHeaderName = "x-user" } } } }"#,
    );
    assert_ne!(lent, ROUTES_CONFIG);
    assert_ne!(sticky, lent);
    write_atomic(&config, &sticky);
    let (code, out) = run_cli(&["routes", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let line = |needle: &str| {
        out.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{out}"))
    };
    assert!(line("default/shop.http[0] \"api-blue\"")
        .ends_with("codec: pingora's request cycle (HTTP/2 to the upstream)"));
    assert!(line("default/shop.http[2] \"api\"").ends_with("codec: fast HTTP/1.1 and h2 codecs"));
    assert!(
        line("default/shop.http[3]: direct response 200").ends_with("fast HTTP/1.1 and h2 codecs")
    );
    assert!(line("default/blog.http[0]").contains("direct response 200"));
    // Each virtual host's routes once: shop.example.com and *.shop.example.com, and blog.
    assert!(
        out.contains("5 of 9 route(s) on the fast HTTP/1.1 and h2 codecs (56 %)"),
        "{out}"
    );
    assert!(
        out.contains("4 on pingora's request cycle: HTTP/2 to the upstream"),
        "{out}"
    );
    // One request's explanation says it too.
    let (code, out) = routes(
        &config,
        &[
            "--host",
            "shop.example.com",
            "--path",
            "/api/x",
            "--method",
            "POST",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("  codec: pingora's request cycle (HTTP/2 to the upstream)"),
        "{out}"
    );
    // The hashing destination's route, on the fast codecs.
    let (code, out) = routes(&config, &["--host", "shop.example.com", "--path", "/api/x"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("  codec: fast HTTP/1.1 and h2 codecs"),
        "{out}"
    );
}

#[test]
fn routes_reports_no_route() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("portico.toml");
    write_atomic(&config, ROUTES_CONFIG);

    // Unknown host.
    let (code, out) = routes(&config, &["--host", "nobody.example.com", "--path", "/"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "listener HTTP 127.0.0.1:8080: no route: no virtual host for nobody.example.com (404)",
            "no route"
        ],
        "{out}"
    );

    // Known host, no route matches the path.
    let (code, out) = routes(
        &config,
        &["--host", "shop.example.com", "--path", "/checkout"],
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "listener HTTP 127.0.0.1:8080: no route: virtual host shop.example.com has 4 route(s) and none matched (404)",
            "no route"
        ],
        "{out}"
    );
}

#[test]
fn validate_default_config() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/portico.toml");
    assert!(
        config.exists(),
        "{} should ship with the repository",
        config.display()
    );
    let (code, out) = run_cli(&["validate", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "validate {}:\n{out}", config.display());
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("ok:")),
        "ok: summary expected:\n{out}"
    );
}

#[test]
fn run_with_missing_config_fails() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("does-not-exist.toml");
    let mut child = Command::new(PORTICO)
        .arg("run")
        .arg("-c")
        .arg(&missing)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portico");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => break,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`portico run` with a missing config file kept running");
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    }
    let output = child.wait_with_output().expect("collect output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "exit status should be non-zero: {:?}\n{text}",
        output.status
    );
    assert!(
        text.contains("does-not-exist.toml"),
        "the message names the file:\n{text}"
    );
}

/// Every worked example in `conf/examples/` (the README's reference) is a valid config.
#[test]
fn every_example_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("conf/examples exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{}:\n{out}", path.display());
        assert!(out.contains("ok:"), "{}:\n{out}", path.display());
        assert!(
            !out.contains("warning"),
            "{} has warnings:\n{out}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 7, "found only {checked} examples");
}

/// The binary sets mimalloc's `arena_eager_commit` to 0 before the allocator reads its
/// options (idle RSS ~17 MiB instead of ~30), and the environment variable still wins.
/// mimalloc prints its options at start with MIMALLOC_VERBOSE=1.
#[test]
fn allocator_commits_lazily_unless_told_otherwise() {
    let option = |env: Option<&str>| {
        let mut cmd = Command::new(PORTICO);
        cmd.arg("--version").env("MIMALLOC_VERBOSE", "1");
        cmd.env_remove("MIMALLOC_ARENA_EAGER_COMMIT");
        if let Some(v) = env {
            cmd.env("MIMALLOC_ARENA_EAGER_COMMIT", v);
        }
        let out = cmd.output().expect("run portico");
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.lines()
            .find(|l| l.contains("option 'arena_eager_commit'"))
            .unwrap_or_else(|| panic!("no arena_eager_commit line in:\n{err}"))
            .trim()
            .to_string()
    };
    assert_eq!(option(None), "option 'arena_eager_commit': 0");
    assert_eq!(option(Some("2")), "option 'arena_eager_commit': 2");
}

/// An ES256 key made here: its signer and its public JWKS.
fn es256_key() -> (jsonwebtoken::EncodingKey, String) {
    use base64::Engine as _;
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    (
        jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwks.to_string(),
    )
}

#[test]
fn routes_explains_request_authentication_and_authorization() {
    let (key, jwks) = es256_key();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |exp: u64| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        let claims =
            serde_json::json!({ "iss": "https://issuer.test", "sub": "frank", "exp": exp });
        format!(
            "authorization=Bearer {}",
            jsonwebtoken::encode(&h, &claims, &key).unwrap()
        )
    };
    let (good, expired) = (sign(now + 3600), sign(now - 3600));
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("portico.toml");
    write_atomic(
        &config,
        format!(
            r#"[mesh]
admin = "127.0.0.1:15000"

[[gateways]]
name = "gw"
namespace = "istio-system"
[[gateways.servers]]
port = {{ number = 8080, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "app"
namespace = "istio-system"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
match = [{{ uri = {{ prefix = "/api" }} }}]
directResponse = {{ status = 200 }}

[[requestAuthentications]]
name = "jwt"
namespace = "istio-system"
[[requestAuthentications.jwtRules]]
issuer = "https://issuer.test"
jwks = '{jwks}'

[[authorizationPolicies]]
name = "deny-ten"
namespace = "istio-system"
action = "DENY"
rules = [{{ from = [{{ source = {{ ipBlocks = ["10.0.0.0/8"] }} }}] }}]

[[authorizationPolicies]]
name = "require-jwt"
namespace = "istio-system"
action = "ALLOW"
rules = [{{ from = [{{ source = {{ notIpBlocks = ["203.0.113.0/24"] }} }}] }}, {{ from = [{{ source = {{ requestPrincipals = ["*"] }} }}] }}]

[[authorizationPolicies]]
name = "audit-api"
namespace = "istio-system"
action = "AUDIT"
rules = [{{ to = [{{ operation = {{ paths = ["/api/*"] }} }}] }}]
"#
        ),
    );
    let explain = |path: &str, source: &str, header: Option<&str>| {
        let mut args = vec!["--host", "a.test", "--path", path, "--source-ip", source];
        if let Some(h) = header {
            args.extend(["--header", h]);
        }
        routes(&config, &args)
    };
    let has = |out: &str, line: &str| {
        assert!(out.lines().any(|l| l == line), "{line:?} in:\n{out}");
    };
    let denied_none = "  answer: 403 (rbac_access_denied_matched_policy[none])";

    // No token, from outside the ALLOW's first rule: no principal, no ALLOW matches.
    let (code, out) = explain("/api/x", "203.0.113.9", None);
    assert_eq!(code, 0, "{out}");
    has(
        &out,
        "  request authentication: applies (issuers https://issuer.test)",
    );
    has(&out, "    no token: no identity (authorization decides)");
    has(&out, "    DENY istio-system/deny-ten: no match");
    has(&out, "    ALLOW istio-system/require-jwt: no match");
    has(&out, "    AUDIT istio-system/audit-api: matches (rules[0])");
    has(&out, "  authorization: denied");
    has(&out, denied_none);

    // The first ALLOW rule matches by address alone.
    let (_, out) = explain("/api/x", "192.0.2.1", None);
    has(
        &out,
        "    ALLOW istio-system/require-jwt: matches (rules[0])",
    );
    has(&out, "  authorization: allowed");

    // A valid token: the principal, and the second ALLOW rule.
    let (_, out) = explain("/api/x", "203.0.113.9", Some(&good));
    has(
        &out,
        "    token verified: principal https://issuer.test/frank",
    );
    has(
        &out,
        "    ALLOW istio-system/require-jwt: matches (rules[1])",
    );
    has(&out, "  authorization: allowed");

    // DENY first, whatever the token.
    let (_, out) = explain("/api/x", "10.1.2.3", Some(&good));
    has(&out, "    DENY istio-system/deny-ten: matches (rules[0])");
    has(
        &out,
        "  answer: 403 (rbac_access_denied_matched_policy[ns[istio-system]-policy[deny-ten]-rule[0]])",
    );

    // A bad token is refused before authorization.
    let (_, out) = explain("/api/x", "192.0.2.1", Some(&expired));
    has(
        &out,
        "    token refused: 401 \"Jwt is expired\"; authorization is not asked",
    );
    has(
        &out,
        "  answer: 401 (jwt_authn_access_denied{Jwt_is_expired})",
    );
    assert!(!out.contains("authorization policies:"), "{out}");

    // A path no route takes is still authenticated and authorized (the listener's).
    let (code, out) = explain("/nowhere", "203.0.113.9", Some(&good));
    assert_eq!(code, 1, "no route: {out}");
    has(
        &out,
        "    token verified: principal https://issuer.test/frank",
    );
    has(&out, "  authorization: allowed");
    let (_, out) = explain("/nowhere", "203.0.113.9", None);
    has(&out, denied_none);
}
