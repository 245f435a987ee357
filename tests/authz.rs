//! AuthorizationPolicy and the trusted client address through a real Portico process: real
//! clients (curl, over HTTP/1.1 and h2, from several loopback addresses, with and without
//! `X-Forwarded-For`) and a real upstream. Runs through whichever codec the environment
//! chooses (`PORTICO_NO_FAST_PATH=true` for pingora's cycle).

mod support;

use std::process::Command;

use support::*;

const CONFIG: &str = r#"
@MESH@
[mesh.defaultConfig.gatewayTopology]
numTrustedProxies = 1

[[gateways]]
name = "gw"
selector = { istio = "ingressgateway" }
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
match = [{ uri = { prefix = "/direct" } }]
directResponse = { status = 200, body = { string = "here\n" } }
[[virtualServices.http]]
name = "all"
@to(v1)@

# DENY: paths (a prefix and a template), a header condition.
[[authorizationPolicies]]
name = "deny-paths"
action = "DENY"
[[authorizationPolicies.rules]]
to = [{ operation = { paths = ["/admin/*", "/api/{*}/secret"] } }]
[[authorizationPolicies.rules]]
when = [{ key = "request.headers[x-block]", values = ["yes"] }]

# DENY by the client address the trusted proxy reported (remote.ip).
[[authorizationPolicies]]
name = "deny-remote"
action = "DENY"
rules = [{ from = [{ source = { remoteIpBlocks = ["198.51.100.0/24"] } }] }]

# DENY by the peer address (source.ip), whatever X-Forwarded-For says.
[[authorizationPolicies]]
name = "deny-peer"
action = "DENY"
rules = [{ from = [{ source = { ipBlocks = ["127.0.0.66"] } }] }]

# ALLOW: reads from 127.0.0.0/24 to shop.test; writes to /api/ with a token; anything to
# port HTTPS but DELETE. Everything else is refused (no ALLOW policy matches).
[[authorizationPolicies]]
name = "allow-main"
selector = { matchLabels = { istio = "ingressgateway" } }
[[authorizationPolicies.rules]]
from = [{ source = { ipBlocks = ["127.0.0.0/24"] } }]
to = [{ operation = { methods = ["GET", "HEAD"], hosts = ["shop.test", "shop.test:*"] } }]
[[authorizationPolicies.rules]]
to = [{ operation = { methods = ["POST"], paths = ["/api/*"] } }]
when = [{ key = "request.headers[x-token]", values = ["secret-*"] }]
[[authorizationPolicies.rules]]
to = [{ operation = { ports = ["@HTTPS@"], notMethods = ["DELETE"] } }]

# Applies everywhere from the root namespace.
[[authorizationPolicies]]
name = "root-deny"
namespace = "istio-system"
action = "DENY"
rules = [{ to = [{ operation = { paths = ["/root-denied"] } }] }]

# Not this gateway's: another workload's labels, another namespace.
[[authorizationPolicies]]
name = "other-workload"
action = "DENY"
selector = { matchLabels = { app = "other" } }
rules = [{}]
[[authorizationPolicies]]
name = "other-namespace"
namespace = "elsewhere"
action = "DENY"
rules = [{}]

# Dry run: would deny /direct/dry, is only counted.
[[authorizationPolicies]]
name = "dry-deny"
action = "DENY"
dryRun = true
rules = [{ to = [{ operation = { paths = ["/direct/dry"] } }] }]

[[authorizationPolicies]]
name = "audit-api"
action = "AUDIT"
rules = [{ to = [{ operation = { paths = ["/api/*"] } }] }]
"#;

/// A table row: what it shows, the client address, method, URL, request fields, curl's
/// extra arguments, and the status expected.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    String,
    Vec<&'a str>,
    &'a [&'a str],
    u16,
);

struct Gw {
    portico: Portico,
    http: u16,
    https: u16,
    _echo: Echo,
    _tmp: tempfile::TempDir,
}

fn start() -> Gw {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http, https) = (free_port(), free_port(), free_port());
    write_cert(tmp.path(), "p", &["shop.test"]);
    let config = render(
        &format!("{CONFIG}{}", upstreams_config(&[("v1", echo.port())])),
        &[
            ("MESH", mesh_config(admin)),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
        ],
    );
    let portico = Portico::start(tmp.path(), &config);
    Gw {
        portico,
        http,
        https,
        _echo: echo,
        _tmp: tmp,
    }
}

/// One request with curl from local address `from`: status and body.
fn curl(from: &str, method: &str, url: &str, headers: &[&str], extra: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-k", "--max-time", "20", "--interface", from])
        .args(["-X", method, "-o", "-", "-w", "\n%{http_code}"])
        .args(extra);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let out = cmd.output().expect("curl runs (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn authorization_table_over_both_protocols_and_addresses() {
    let g = start();
    let http = |path: &str| format!("http://shop.test:{}{path}", g.http);
    let https = |path: &str| format!("https://shop.test:{}{path}", g.https);
    let r_http = format!("shop.test:{}:127.0.0.1", g.http);
    let r_https = format!("shop.test:{}:127.0.0.1", g.https);
    let h1: &[&str] = &["--resolve", &r_http];
    let h2: &[&str] = &["--http2", "--resolve", &r_https];
    let r_other = format!("other.test:{}:127.0.0.1", g.http);
    let other: &[&str] = &["--resolve", &r_other];
    let r_nohost = format!("nohost.test:{}:127.0.0.1", g.http);
    let nohost: &[&str] = &["--resolve", &r_nohost];
    let denied = "RBAC: access denied";
    // (case, from, method, url, headers, curl args, status)
    let cases: Vec<Case> = vec![
        (
            "GET allowed by ipBlocks+host",
            "127.0.0.1",
            "GET",
            http("/x"),
            vec![],
            h1,
            200,
        ),
        (
            "HEAD allowed",
            "127.0.0.1",
            "HEAD",
            http("/x"),
            vec![],
            h1,
            200,
        ),
        (
            "direct response allowed",
            "127.0.0.1",
            "GET",
            http("/direct"),
            vec![],
            h1,
            200,
        ),
        (
            "POST without token: no ALLOW matches",
            "127.0.0.1",
            "POST",
            http("/api/x"),
            vec![],
            h1,
            403,
        ),
        (
            "POST with token",
            "127.0.0.1",
            "POST",
            http("/api/x"),
            vec!["x-token: secret-1"],
            h1,
            200,
        ),
        (
            "POST with wrong token",
            "127.0.0.1",
            "POST",
            http("/api/x"),
            vec!["x-token: nope"],
            h1,
            403,
        ),
        (
            "outside ipBlocks",
            "127.0.1.5",
            "GET",
            http("/x"),
            vec![],
            h1,
            403,
        ),
        (
            "wrong host",
            "127.0.0.1",
            "GET",
            format!("http://other.test:{}/x", g.http),
            vec![],
            other,
            403,
        ),
        (
            "DENY path prefix wins over ALLOW",
            "127.0.0.1",
            "GET",
            http("/admin/panel"),
            vec![],
            h1,
            403,
        ),
        (
            "DENY path template",
            "127.0.0.1",
            "GET",
            http("/api/v1/secret"),
            vec![],
            h1,
            403,
        ),
        (
            "template is one segment",
            "127.0.0.1",
            "GET",
            http("/api/v1/x/secret"),
            vec![],
            h1,
            200,
        ),
        (
            "DENY header condition",
            "127.0.0.1",
            "GET",
            http("/x"),
            vec!["x-block: yes"],
            h1,
            403,
        ),
        (
            "DENY peer ipBlocks despite XFF",
            "127.0.0.66",
            "GET",
            http("/x"),
            vec!["x-forwarded-for: 10.1.1.1"],
            h1,
            403,
        ),
        (
            "DENY remoteIpBlocks via trusted XFF",
            "127.0.0.1",
            "GET",
            http("/x"),
            vec!["x-forwarded-for: 198.51.100.9"],
            h1,
            403,
        ),
        (
            "XFF entry before the trusted one is not the client",
            "127.0.0.1",
            "GET",
            http("/x"),
            vec!["x-forwarded-for: 198.51.100.9, 203.0.113.5"],
            h1,
            200,
        ),
        (
            "root namespace policy applies",
            "127.0.0.1",
            "GET",
            http("/root-denied"),
            vec![],
            h1,
            403,
        ),
        (
            "dry run does not enforce",
            "127.0.0.1",
            "GET",
            http("/direct/dry"),
            vec![],
            h1,
            200,
        ),
        (
            "no route still denied first",
            "127.0.1.5",
            "GET",
            format!("http://nohost.test:{}/x", g.http),
            vec![],
            nohost,
            403,
        ),
        (
            "h2: HTTPS port rule allows POST from anywhere",
            "127.0.1.5",
            "POST",
            https("/x"),
            vec![],
            h2,
            200,
        ),
        (
            "h2: but not DELETE",
            "127.0.1.5",
            "DELETE",
            https("/x"),
            vec![],
            h2,
            403,
        ),
        (
            "h2: DENY wins on HTTPS too",
            "127.0.0.1",
            "GET",
            https("/admin/x"),
            vec![],
            h2,
            403,
        ),
        (
            "h2: remote ip deny",
            "127.0.0.1",
            "GET",
            https("/x"),
            vec!["x-forwarded-for: 198.51.100.200"],
            h2,
            403,
        ),
    ];
    let mut failures = Vec::new();
    for (case, from, method, url, headers, extra, want) in &cases {
        let (status, body) = curl(from, method, url, headers, extra);
        if status != *want {
            failures.push(format!(
                "{case}: {method} {url} from {from}: {status} (want {want}) {body}"
            ));
        } else if *want == 403 && *method != "HEAD" && body != denied {
            failures.push(format!("{case}: body {body:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The upstream sees X-Forwarded-For with the peer appended, as Envoy appends it.
    let (status, body) = curl(
        "127.0.0.1",
        "GET",
        &http("/echo"),
        &["x-forwarded-for: 198.51.100.9, 203.0.113.5"],
        h1,
    );
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        seen["headers"]["x-forwarded-for"], "198.51.100.9, 203.0.113.5, 127.0.0.1",
        "{seen}"
    );

    // Logs: a refusal's details name the policy and rule (or `none`).
    let lines = || -> Vec<serde_json::Value> {
        g.portico
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), || {
            let l = lines();
            l.iter().any(|v| {
                v["response_code_details"]
                    == "rbac_access_denied_matched_policy[ns[default]-policy[deny-paths]-rule[0]]"
                    && v["response_code"] == 403
            }) && l.iter().any(|v| {
                v["response_code_details"]
                    == "rbac_access_denied_matched_policy[ns[default]-policy[deny-remote]-rule[0]]"
            }) && l
                .iter()
                .any(|v| v["response_code_details"] == "rbac_access_denied_matched_policy[none]")
        }),
        "{}",
        g.portico.stdout()
    );

    // Metrics: each policy's decisions, the dry run's apart; Istio's request counter.
    let m = g.portico.metrics();
    let shown = authz_lines(&m);
    let n = |labels: &str| metric_sum(&m, "portico_authz_decisions_total", labels).unwrap_or(0.0);
    assert_eq!(n("policy=\"default/deny-paths\""), 4.0, "{shown}");
    assert_eq!(
        n("action=\"DENY\",dry_run=\"true\",policy=\"default/dry-deny\",result=\"denied\""),
        1.0,
        "{shown}"
    );
    assert_eq!(
        n("action=\"AUDIT\",dry_run=\"false\",policy=\"default/audit-api\",result=\"audited\""),
        5.0,
        "{shown}"
    );
    assert_eq!(
        n("action=\"ALLOW\",dry_run=\"false\",policy=\"none\",result=\"denied\""),
        6.0,
        "{shown}"
    );
    assert_eq!(n("policy=\"default/other-workload\""), 0.0, "{shown}");
    assert_eq!(n("policy=\"elsewhere/other-namespace\""), 0.0, "{shown}");
    let forbidden = metric_sum(&m, "istio_requests_total", "response_code=\"403\"").unwrap_or(0.0);
    assert!(forbidden >= 13.0, "{m}");
}

#[test]
fn bad_policies_are_config_errors_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "rules = [{ when = [{ key = \"request.header[x]\", values = [\"a\"] }] }]",
            "authorizationPolicies[0].rules[0].when[0]",
        ),
        (
            "rules = [{ from = [{ source = { ipBlocks = [\"10.0.0.300\"] } }] }]",
            "authorizationPolicies[0].rules[0].from[0].source.ipBlocks[0]",
        ),
        (
            "rules = [{ to = [{ operation = { paths = [\"/a/{**}/b\"] } }] }]",
            "authorizationPolicies[0].rules[0].to[0].operation.paths[0]",
        ),
        ("action = \"MAYBE\"", "authorizationPolicies[0].action"),
        (
            "rules = [{ from = [{ source = {} }] }]",
            "authorizationPolicies[0].rules[0].from[0].source",
        ),
    ];
    for (policy, field) in cases {
        let text = format!(
            "[[gateways]]\nname = \"gw\"\n[[gateways.servers]]\nport = {{ number = 8080, name = \"http\", protocol = \"HTTP\" }}\nhosts = [\"*\"]\n\n[[authorizationPolicies]]\nname = \"p\"\n{policy}\n"
        );
        let path = tmp.path().join("portico.toml");
        std::fs::write(&path, &text).unwrap();
        let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
        assert_ne!(code, 0, "{policy}: {out}");
        assert!(out.contains(field), "{policy}: wanted {field} in {out}");
    }
}

#[test]
fn istio_yaml_policies_load_with_the_dry_run_annotation() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let config = render(
        &format!(
            "include = [\"policies.yaml\"]\n@MESH@\n[[gateways]]\nname = \"gw\"\nnamespace = \"istio-system\"\nselector = {{ istio = \"ingressgateway\" }}\n[[gateways.servers]]\nport = {{ number = @HTTP@, name = \"http\", protocol = \"HTTP\" }}\nbind = \"127.0.0.1\"\nhosts = [\"*\"]\n\n[[virtualServices]]\nname = \"shop\"\nnamespace = \"istio-system\"\nhosts = [\"*\"]\ngateways = [\"gw\"]\n[[virtualServices.http]]\n@to(v1)@\n{}",
            upstreams_config(&[("v1", echo.port())])
        ),
        &[("MESH", mesh_config(admin)), ("HTTP", http.to_string())],
    );
    std::fs::write(
        tmp.path().join("policies.yaml"),
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ingress-policy
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: DENY
  rules:
  - from:
    - source:
        remoteIpBlocks: ["127.0.0.9"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: would-deny-all
  namespace: istio-system
  annotations:
    istio.io/dry-run: "true"
spec:
  action: DENY
  rules:
  - {}
"#,
    )
    .unwrap();
    let portico = Portico::start(tmp.path(), &config);
    let url = format!("http://127.0.0.1:{http}/x");
    assert_eq!(curl("127.0.0.9", "GET", &url, &[], &[]).0, 403);
    assert_eq!(curl("127.0.0.8", "GET", &url, &[], &[]).0, 200);
    let m = portico.metrics();
    let shown = authz_lines(&m);
    assert_eq!(
        metric_sum(
            &m,
            "portico_authz_decisions_total",
            "action=\"DENY\",dry_run=\"true\",policy=\"istio-system/would-deny-all\",result=\"denied\""
        ),
        Some(2.0),
        "{shown}"
    );
}

fn authz_lines(m: &str) -> String {
    m.lines()
        .filter(|l| l.starts_with("portico_authz"))
        .collect::<Vec<_>>()
        .join("\n")
}
