//! AuthorizationPolicy CUSTOM with an HTTP external authorizer (`envoyExtAuthzHttp`) through
//! a real Portico process: a real authorizer written here (HTTP/1.1, keep-alive, on
//! loopback), a real upstream, and curl over HTTP/1.1 and h2. Runs through whichever codec
//! the environment chooses (`PORTICO_NO_FAST_PATH=true` for pingora's cycle).

mod support;

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// One check as the authorizer received it.
#[derive(Clone, Debug)]
struct Check {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Check {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The external authorizer: decides by the request it is asked about.
///
/// - path containing `/slow`: waits 2 s, then allows;
/// - path containing `/boom`: 500;
/// - path containing `/login`: 302 to `/login-page`, body `go login`, with
///   `x-deny-reason` and `x-private` (the provider passes on only `x-deny-*`);
/// - `x-user: alice`: 200 with `x-auth-user: alice`, `x-auth-groups`, `x-unlisted`,
///   `set-cookie` and `x-envoy-auth-headers-to-remove: x-drop-me`;
/// - anything else: 403, body `denied by authorizer`, `x-deny-reason: no-user`.
struct Authorizer {
    port: u16,
    checks: Arc<Mutex<Vec<Check>>>,
    connections: Arc<AtomicUsize>,
}

impl Authorizer {
    fn start() -> Authorizer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let checks = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (c, n) = (checks.clone(), connections.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                n.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                thread::spawn(move || serve(conn, &c));
            }
        });
        Authorizer {
            port,
            checks,
            connections,
        }
    }

    fn checks(&self) -> Vec<Check> {
        self.checks.lock().unwrap().clone()
    }

    /// Checks whose target starts with `prefix`.
    fn checks_for(&self, prefix: &str) -> Vec<Check> {
        self.checks()
            .into_iter()
            .filter(|c| c.target.starts_with(prefix))
            .collect()
    }
}

fn serve(stream: TcpStream, checks: &Mutex<Vec<Check>>) {
    let _ = stream.set_nodelay(true);
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    while let Ok(Some((start, headers))) = read_head(&mut r) {
        let mut parts = start.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        if read_body(&mut r, &headers, false).is_err() {
            return;
        }
        let check = Check {
            method,
            target: target.clone(),
            headers,
        };
        checks.lock().unwrap().push(check.clone());
        let (status, fields, body): (u16, Vec<(&str, &str)>, &str) = if target.contains("/slow") {
            thread::sleep(Duration::from_secs(2));
            (200, vec![], "")
        } else if target.contains("/boom") {
            (500, vec![], "oops")
        } else if target.contains("/login") {
            (
                302,
                vec![
                    ("location", "/login-page"),
                    ("x-deny-reason", "not-logged-in"),
                    ("x-private", "secret"),
                ],
                "go login",
            )
        } else if check.header("x-user") == Some("alice") {
            (
                200,
                vec![
                    ("x-auth-user", "alice"),
                    ("x-auth-groups", "dev,ops"),
                    ("x-unlisted", "no"),
                    ("set-cookie", "session=1"),
                    ("x-envoy-auth-headers-to-remove", "x-drop-me"),
                ],
                "",
            )
        } else {
            (
                403,
                vec![("x-deny-reason", "no-user"), ("content-type", "text/html")],
                "denied by authorizer",
            )
        };
        let mut out = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
        for (n, v) in fields {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(body);
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

const CONFIG: &str = r#"
@MESH@
[[mesh.extensionProviders]]
name = "authz"
[mesh.extensionProviders.envoyExtAuthzHttp]
service = "authz.test"
port = @AUTHZ@
pathPrefix = "/check"
timeout = "5s"
includeRequestHeadersInCheck = ["x-user", "x-trace-*"]
includeAdditionalHeadersInCheck = { x-from-gateway = "portico" }
headersToUpstreamOnAllow = ["x-auth-*"]
headersToDownstreamOnDeny = ["x-deny-*"]
headersToDownstreamOnAllow = ["set-cookie"]

[[mesh.extensionProviders]]
name = "slow"
envoyExtAuthzHttp = { service = "authz.test", port = @AUTHZ@, timeout = "300ms" }

[[mesh.extensionProviders]]
name = "down"
envoyExtAuthzHttp = { service = "127.0.0.1", port = @CLOSED@ }

[[mesh.extensionProviders]]
name = "down-503"
envoyExtAuthzHttp = { service = "127.0.0.1", port = @CLOSED@, statusOnError = "503" }

[[mesh.extensionProviders]]
name = "down-open"
envoyExtAuthzHttp = { service = "127.0.0.1", port = @CLOSED@, failOpen = true }

[[mesh.extensionProviders]]
name = "boom-open"
envoyExtAuthzHttp = { service = "authz.test", port = @AUTHZ@, failOpen = true }

[[serviceEntries]]
name = "authz"
hosts = ["authz.test"]
resolution = "STATIC"
ports = [{ number = @AUTHZ@, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1" }]

[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = { number = @HTTPS@, name = "https", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["*"]
tls = { mode = "SIMPLE", serverCertificate = "p.crt", privateKey = "p.key" }

[[virtualServices]]
name = "shop"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
name = "direct"
match = [{ uri = { prefix = "/app/direct" } }]
directResponse = { status = 200, body = { string = "here\n" } }
[[virtualServices.http]]
name = "all"
@to(v1)@

[[authorizationPolicies]]
name = "ext"
action = "CUSTOM"
provider = { name = "authz" }
rules = [{ to = [{ operation = { paths = ["/app/*", "/login/*"] } }] }]

[[authorizationPolicies]]
name = "ext-slow"
action = "CUSTOM"
provider = { name = "slow" }
rules = [{ to = [{ operation = { paths = ["/slow/*"] } }] }]

[[authorizationPolicies]]
name = "ext-down"
action = "CUSTOM"
provider = { name = "down" }
rules = [{ to = [{ operation = { paths = ["/down/*"] } }] }]

[[authorizationPolicies]]
name = "ext-down-503"
action = "CUSTOM"
provider = { name = "down-503" }
rules = [{ to = [{ operation = { paths = ["/down503/*"] } }] }]

[[authorizationPolicies]]
name = "ext-open"
action = "CUSTOM"
provider = { name = "down-open" }
rules = [{ to = [{ operation = { paths = ["/open/*"] } }] }]

[[authorizationPolicies]]
name = "ext-boom"
action = "CUSTOM"
provider = { name = "boom-open" }
rules = [{ to = [{ operation = { paths = ["/boom/*"] } }] }]

# Dry run: the authorizer is asked, its answer only counted.
[[authorizationPolicies]]
name = "ext-dry"
action = "CUSTOM"
provider = { name = "authz" }
dryRun = true
rules = [{ to = [{ operation = { paths = ["/dry/*"] } }] }]

# After CUSTOM: DENY, then ALLOW (everything but /app/not-allowed).
[[authorizationPolicies]]
name = "deny-rbac"
action = "DENY"
rules = [{ to = [{ operation = { paths = ["/app/denied-by-rbac"] } }] }]

[[authorizationPolicies]]
name = "allow-most"
rules = [{ to = [{ operation = { notPaths = ["/app/not-allowed"] } }] }]
"#;

struct Gw {
    portico: Portico,
    http: u16,
    https: u16,
    authz: Authorizer,
    _echo: Echo,
    _tmp: tempfile::TempDir,
}

fn start() -> Gw {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let authz = Authorizer::start();
    let (admin, http, https, closed) = (free_port(), free_port(), free_port(), free_port());
    write_cert(tmp.path(), "p", &["shop.test"]);
    let config = render(
        &format!("{CONFIG}{}", upstreams_config(&[("v1", echo.port())])),
        &[
            ("MESH", mesh_config(admin)),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
            ("AUTHZ", authz.port.to_string()),
            ("CLOSED", closed.to_string()),
        ],
    );
    let portico = Portico::start(tmp.path(), &config);
    Gw {
        portico,
        http,
        https,
        authz,
        _echo: echo,
        _tmp: tmp,
    }
}

/// An answer as curl saw it: status, header fields (lower-case names), body.
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn upstream_saw(&self, name: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v["headers"][name].as_str().map(str::to_string)
    }
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    H1,
    H2,
}

impl Gw {
    fn authority(&self, proto: Proto) -> String {
        match proto {
            Proto::H1 => format!("shop.test:{}", self.http),
            Proto::H2 => format!("shop.test:{}", self.https),
        }
    }

    fn curl(&self, proto: Proto, method: &str, path: &str, headers: &[&str]) -> Got {
        let (scheme, port, extra) = match proto {
            Proto::H1 => ("http", self.http, "--http1.1"),
            Proto::H2 => ("https", self.https, "--http2"),
        };
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-k",
            "--max-time",
            "20",
            extra,
            "-D",
            "-",
            "-X",
            method,
        ])
        .args(["--resolve", &format!("shop.test:{port}:127.0.0.1")]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        cmd.arg(format!("{scheme}://shop.test:{port}{path}"));
        let out = cmd.output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Got {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn log_lines(&self) -> Vec<serde_json::Value> {
        self.portico
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[test]
fn an_allow_edits_the_upstream_request_and_the_response_over_both_protocols() {
    let g = start();
    for proto in [Proto::H1, Proto::H2] {
        let got = g.curl(
            proto,
            "POST",
            "/app/orders?id=7",
            &[
                "x-user: alice",
                "authorization: Bearer abc",
                "x-trace-id: t-1",
                "cookie: not-for-the-authorizer",
                "x-from-gateway: forged",
                "x-auth-user: mallory",
                "x-drop-me: 1",
            ],
        );
        assert_eq!(got.status, 200, "{proto:?}: {}", got.body);
        // The upstream: the authorizer's x-auth-* over the client's, x-drop-me removed, the
        // fields the provider does not pass on left out.
        assert_eq!(got.upstream_saw("x-auth-user").as_deref(), Some("alice"));
        assert_eq!(
            got.upstream_saw("x-auth-groups").as_deref(),
            Some("dev,ops")
        );
        assert_eq!(got.upstream_saw("x-unlisted"), None, "{proto:?}");
        assert_eq!(got.upstream_saw("x-drop-me"), None, "{proto:?}");
        assert_eq!(got.upstream_saw("x-user").as_deref(), Some("alice"));
        // The client: headersToDownstreamOnAllow.
        assert_eq!(got.header("set-cookie"), Some("session=1"), "{proto:?}");

        // The authorizer saw the method, the prefixed path with the query, Host as the
        // client sent it, Authorization, the included fields, the additional field over
        // the client's, and nothing else of the client's.
        let checks = g.authz.checks_for("/check/app/orders");
        let c = checks.last().expect("the authorizer was asked");
        assert_eq!(c.method, "POST");
        assert_eq!(c.target, "/check/app/orders?id=7");
        assert_eq!(c.header("host"), Some(g.authority(proto).as_str()));
        assert_eq!(c.header("authorization"), Some("Bearer abc"));
        assert_eq!(c.header("x-user"), Some("alice"));
        assert_eq!(c.header("x-trace-id"), Some("t-1"));
        assert_eq!(c.header("x-from-gateway"), Some("portico"));
        assert_eq!(c.header("content-length"), Some("0"));
        assert_eq!(c.header("cookie"), None);
        assert_eq!(c.header("x-drop-me"), None);
    }
    // A direct response is decided too, and gets the allow's response fields.
    let got = g.curl(Proto::H1, "GET", "/app/direct", &["x-user: alice"]);
    assert_eq!((got.status, got.body.as_str()), (200, "here\n"));
    assert_eq!(got.header("set-cookie"), Some("session=1"));
    assert_eq!(g.curl(Proto::H1, "GET", "/app/direct", &[]).status, 403);

    // Checks share keep-alive connections to the authorizer.
    let before = g.authz.checks().len();
    for _ in 0..12 {
        assert_eq!(
            g.curl(Proto::H1, "GET", "/app/x", &["x-user: alice"])
                .status,
            200
        );
    }
    let checks = g.authz.checks().len() - before;
    let conns = g.authz.connections.load(Ordering::SeqCst);
    assert_eq!(checks, 12);
    assert!(
        conns <= 6,
        "{conns} connections for {} checks",
        g.authz.checks().len()
    );

    let m = g.portico.metrics();
    assert!(
        metric_sum(
            &m,
            "portico_authz_decisions_total",
            "action=\"CUSTOM\",dry_run=\"false\",policy=\"default/ext\",result=\"allowed\""
        )
        .unwrap_or(0.0)
            >= 15.0,
        "{m}"
    );
}

#[test]
fn a_denial_is_the_authorizers_answer_and_unmatched_requests_skip_the_check() {
    let g = start();
    for proto in [Proto::H1, Proto::H2] {
        let got = g.curl(proto, "GET", "/app/x", &["x-user: bob"]);
        assert_eq!(got.status, 403, "{proto:?}");
        assert_eq!(got.body, "denied by authorizer");
        assert_eq!(got.header("x-deny-reason"), Some("no-user"));
        // Only the fields headersToDownstreamOnDeny names (and Location, WWW-Authenticate).
        assert_ne!(got.header("content-type"), Some("text/html"), "{proto:?}");

        let got = g.curl(proto, "GET", "/login/x", &[]);
        assert_eq!(got.status, 302, "{proto:?}");
        assert_eq!(got.body, "go login");
        assert_eq!(got.header("location"), Some("/login-page"));
        assert_eq!(got.header("x-deny-reason"), Some("not-logged-in"));
        assert_eq!(got.header("x-private"), None, "{proto:?}");

        // A path no CUSTOM policy matches is not checked.
        let before = g.authz.checks().len();
        let got = g.curl(proto, "GET", "/public/x", &[]);
        assert_eq!(got.status, 200, "{proto:?}");
        assert_eq!(g.authz.checks().len(), before, "{proto:?}: checked");
    }
    assert!(
        wait_until(Duration::from_secs(5), || g.log_lines().iter().any(|v| v
            ["response_code_details"]
            == "ext_authz_denied"
            && v["response_flags"] == "UAEX"
            && v["response_code"] == 403)),
        "{}",
        g.portico.stdout()
    );
    let m = g.portico.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "portico_authz_decisions_total",
            "action=\"CUSTOM\",dry_run=\"false\",policy=\"default/ext\",result=\"denied\""
        ),
        Some(4.0),
        "{m}"
    );
}

#[test]
fn custom_comes_before_deny_and_allow() {
    let g = start();
    for proto in [Proto::H1, Proto::H2] {
        // The authorizer refuses first: its answer, not RBAC's.
        let got = g.curl(proto, "GET", "/app/denied-by-rbac", &[]);
        assert_eq!(
            (got.status, got.body.as_str()),
            (403, "denied by authorizer")
        );
        // It allows; then DENY refuses.
        let n = g.authz.checks_for("/check/app/denied-by-rbac").len();
        let got = g.curl(proto, "GET", "/app/denied-by-rbac", &["x-user: alice"]);
        assert_eq!(
            (got.status, got.body.as_str()),
            (403, "RBAC: access denied")
        );
        assert_eq!(g.authz.checks_for("/check/app/denied-by-rbac").len(), n + 1);
        // It allows; then no ALLOW policy matches.
        let got = g.curl(proto, "GET", "/app/not-allowed", &["x-user: alice"]);
        assert_eq!(
            (got.status, got.body.as_str()),
            (403, "RBAC: access denied")
        );
        assert!(!g.authz.checks_for("/check/app/not-allowed").is_empty());
    }
}

#[test]
fn a_failed_check_refuses_unless_the_provider_fails_open() {
    let g = start();
    for proto in [Proto::H1, Proto::H2] {
        // Nobody listens: 403 with no body (Envoy's default), or statusOnError.
        let got = g.curl(proto, "GET", "/down/x", &[]);
        assert_eq!((got.status, got.body.as_str()), (403, ""), "{proto:?}");
        assert_eq!(g.curl(proto, "GET", "/down503/x", &[]).status, 503);
        // failOpen: allowed, forwarded.
        let got = g.curl(proto, "GET", "/open/x", &[]);
        assert_eq!(got.status, 200, "{proto:?}");
        assert!(got.body.contains("\"upstream\":\"v1\""), "{}", got.body);
        // A 5xx from the authorizer is a failure too: failOpen lets it through.
        assert_eq!(g.curl(proto, "GET", "/boom/x", &[]).status, 200);
        // Too slow: the check times out (300ms) rather than waiting for the answer (2s).
        let t = Instant::now();
        let got = g.curl(proto, "GET", "/slow/x", &[]);
        let took = t.elapsed();
        assert_eq!(got.status, 403, "{proto:?}");
        assert!(
            took < Duration::from_millis(1500),
            "{proto:?}: took {took:?}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || g.log_lines().iter().any(|v| v
            ["response_code_details"]
            == "ext_authz_error"
            && v["response_flags"] == "UAEX"
            && v["response_code"] == 503)),
        "{}",
        g.portico.stdout()
    );
    let m = g.portico.metrics();
    let n = |labels: &str| metric_sum(&m, "portico_authz_decisions_total", labels).unwrap_or(0.0);
    assert_eq!(
        n("policy=\"default/ext-down\",result=\"error\""),
        2.0,
        "{m}"
    );
    assert_eq!(
        n("policy=\"default/ext-slow\",result=\"error\""),
        2.0,
        "{m}"
    );
    assert_eq!(
        n("policy=\"default/ext-open\",result=\"failed_open\""),
        2.0,
        "{m}"
    );
    assert_eq!(
        n("policy=\"default/ext-boom\",result=\"failed_open\""),
        2.0,
        "{m}"
    );
    // The failures were logged (at most once a second per provider).
    let out = g.portico.log();
    assert!(out.contains("external authorization failed"), "{out}");
}

#[test]
fn a_dry_run_custom_policy_asks_the_authorizer_but_does_not_enforce() {
    let g = start();
    let got = g.curl(Proto::H1, "GET", "/dry/x", &[]);
    assert_eq!(got.status, 200);
    assert!(
        wait_until(Duration::from_secs(5), || !g
            .authz
            .checks_for("/check/dry/x")
            .is_empty()),
        "the authorizer was not asked"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        metric_sum(
            &g.portico.metrics(),
            "portico_authz_decisions_total",
            "action=\"CUSTOM\",dry_run=\"true\",policy=\"default/ext-dry\",result=\"denied\"",
        ) == Some(1.0)
    }));
}

#[test]
fn bad_providers_and_custom_policies_are_config_errors_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let gateway = "[[gateways]]\nname = \"gw\"\n[[gateways.servers]]\nport = { number = 8080, name = \"http\", protocol = \"HTTP\" }\nhosts = [\"*\"]\n";
    let provider = |fields: &str| {
        format!("[[mesh.extensionProviders]]\nname = \"a\"\nenvoyExtAuthzHttp = {{ service = \"127.0.0.1\", port = 9000{fields} }}\n")
    };
    let custom = "[[authorizationPolicies]]\nname = \"p\"\naction = \"CUSTOM\"\nprovider = { name = \"a\" }\nrules = [{}]\n";
    let cases = [
        (
            provider(""),
            "[[authorizationPolicies]]\nname = \"p\"\naction = \"CUSTOM\"\nrules = [{}]\n"
                .to_string(),
            "authorizationPolicies[0].provider",
        ),
        (
            provider(""),
            custom.replace("\"a\"", "\"nope\""),
            "authorizationPolicies[0].provider.name",
        ),
        (
            "[[mesh.extensionProviders]]\nname = \"a\"\nenvoyExtAuthzGrpc = { service = \"x\", port = 9000 }\n".to_string(),
            custom.to_string(),
            "authorizationPolicies[0].provider.name",
        ),
        (
            provider(", statusOnError = \"abc\""),
            custom.to_string(),
            "extensionProviders[0].envoyExtAuthzHttp.statusOnError",
        ),
        (
            provider(", headersToUpstreamOnAllow = [\"*\"]"),
            custom.to_string(),
            "extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnAllow[0]",
        ),
        (
            provider(", pathPrefix = \"check\""),
            custom.to_string(),
            "extensionProviders[0].envoyExtAuthzHttp.pathPrefix",
        ),
        (
            provider(", includeRequestBodyInCheck = { maxRequestBytes = 100 }"),
            custom.to_string(),
            "extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck",
        ),
        (
            "[[mesh.extensionProviders]]\nname = \"a\"\nenvoyExtAuthzHttp = { service = \"127.0.0.1\", port = 0 }\n".to_string(),
            custom.to_string(),
            "extensionProviders[0].envoyExtAuthzHttp.port",
        ),
    ];
    for (providers, policy, field) in cases {
        let text = format!("[mesh]\n{providers}\n{gateway}\n{policy}");
        let path = tmp.path().join("portico.toml");
        std::fs::write(&path, &text).unwrap();
        let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
        assert_ne!(code, 0, "{text}: {out}");
        assert!(out.contains(field), "{text}\nwanted {field} in {out}");
    }
    // And the good form validates.
    let text = format!("[mesh]\n{}\n{gateway}\n{custom}", provider(""));
    let path = tmp.path().join("portico.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}: {out}");
}

#[test]
fn an_istio_yaml_custom_policy_names_the_mesh_provider() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let authz = Authorizer::start();
    let (admin, http) = (free_port(), free_port());
    let config = render(
        &format!(
            "include = [\"policies.yaml\"]\n@MESH@\n[[mesh.extensionProviders]]\nname = \"ext-authz-http\"\nenvoyExtAuthzHttp = {{ service = \"127.0.0.1\", port = @AUTHZ@, includeRequestHeadersInCheck = [\"x-user\"] }}\n[[gateways]]\nname = \"gw\"\nnamespace = \"istio-system\"\nselector = {{ istio = \"ingressgateway\" }}\n[[gateways.servers]]\nport = {{ number = @HTTP@, name = \"http\", protocol = \"HTTP\" }}\nbind = \"127.0.0.1\"\nhosts = [\"*\"]\n\n[[virtualServices]]\nname = \"shop\"\nnamespace = \"istio-system\"\nhosts = [\"*\"]\ngateways = [\"gw\"]\n[[virtualServices.http]]\n@to(v1)@\n{}",
            upstreams_config(&[("v1", echo.port())])
        ),
        &[
            ("MESH", mesh_config(admin)),
            ("HTTP", http.to_string()),
            ("AUTHZ", authz.port.to_string()),
        ],
    );
    std::fs::write(
        tmp.path().join("policies.yaml"),
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext-authz
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: CUSTOM
  provider:
    name: ext-authz-http
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"#,
    )
    .unwrap();
    let _portico = Portico::start(tmp.path(), &config);
    let get = |path: &str, headers: &[(&str, &str)]| {
        http_request(http, "GET", "shop.test", path, headers, b"").status
    };
    assert_eq!(get("/headers", &[("x-user", "alice")]), 200);
    assert_eq!(get("/headers", &[("x-user", "bob")]), 403);
    assert_eq!(get("/ip", &[("x-user", "bob")]), 200);
    assert_eq!(authz.checks().len(), 2);
}
