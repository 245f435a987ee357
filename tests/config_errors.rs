//! `portico validate`: every error names FILE:LINE:COL and the field path; a valid file
//! prints an `ok:` summary.

mod support;

use std::path::Path;

use support::*;

/// A valid config. Each case below changes one thing.
const BASE: &str = r#"[mesh]
admin = "127.0.0.1:15000"

[[gateways]]
name = "public"
[[gateways.servers]]
port = { number = 8080, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["shop.example.com"]
gateways = ["public"]

[[virtualServices.http]]
name = "api"
match = [{ uri = { prefix = "/api/" } }]
route = [
  { destination = { host = "svc.internal", subset = "v1", port = { number = 80 } }, weight = 90 },
  { destination = { host = "svc.internal", subset = "v2", port = { number = 80 } }, weight = 10 },
]
timeout = "2s"

[[virtualServices.http]]
name = "home"
match = [{ uri = { exact = "/" } }]
directResponse = { status = 200, body = { string = "home" } }

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

const HTTP_SERVER: &str = r#"[[gateways.servers]]
port = { number = 8080, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]
"#;

const ROUTE_BLOCK: &str = r#"route = [
  { destination = { host = "svc.internal", subset = "v1", port = { number = 80 } }, weight = 90 },
  { destination = { host = "svc.internal", subset = "v2", port = { number = 80 } }, weight = 10 },
]
"#;

/// `text` with the only occurrence of `from` replaced by `to`.
fn mutate(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} must occur exactly once in the base config"
    );
    text.replacen(from, to, 1)
}

/// BASE plus an HTTPS server with the given tls table, after the HTTP server.
fn with_https_server(tls: &str) -> String {
    let server = format!(
        "{HTTP_SERVER}\n[[gateways.servers]]\nport = {{ number = 8443, name = \"https\", protocol = \"HTTPS\" }}\nbind = \"127.0.0.1\"\nhosts = [\"shop.example.com\"]\ntls = {tls}\n"
    );
    mutate(BASE, HTTP_SERVER, &server)
}

/// Write `text` as `<dir>/portico.toml` and run `portico validate -c` on it.
fn validate_in(dir: &Path, text: &str) -> (i32, String) {
    let path = dir.join("portico.toml");
    write_atomic(&path, text);
    run_cli(&["validate", "-c", path.to_str().unwrap()])
}

/// Validate `text` in a fresh directory and expect exit code 1.
fn validate_fails(text: &str) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    validate_fails_in(tmp.path(), text)
}

fn validate_fails_in(dir: &Path, text: &str) -> String {
    let (code, output) = validate_in(dir, text);
    assert_eq!(
        code, 1,
        "validate should exit 1; output:\n{output}\nconfig:\n{text}"
    );
    output
}

/// Assert that one output line has the form `...FILE:LINE:COL: ...` with `field` in it, and
/// that COL lies within that source line.
fn assert_error(output: &str, file: &str, text: &str, line: usize, field: &str) {
    let re = regex::Regex::new(&format!(r"{}:{}:(\d+):", regex::escape(file), line)).unwrap();
    let hit = output.lines().find(|l| re.is_match(l) && l.contains(field));
    let Some(hit) = hit else {
        panic!("expected an error line with `{file}:{line}:COL:` and `{field}`; output:\n{output}\nconfig:\n{text}");
    };
    let col: usize = re.captures(hit).unwrap()[1].parse().unwrap();
    let source_line = text.lines().nth(line - 1).unwrap_or("");
    assert!(
        col >= 1 && col <= source_line.len() + 1,
        "column {col} is outside line {line} {source_line:?}: {hit}"
    );
}

#[test]
fn unknown_field() {
    let text = mutate(
        BASE,
        "timeout = \"2s\"\n",
        "timeout = \"2s\"\nretires = { attempts = 3 }\n",
    );
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "retires"),
        "virtualServices[0].http[0]",
    );
    assert!(
        out.contains("retires"),
        "the unknown field is named:\n{out}"
    );
}

#[test]
fn bad_duration() {
    let text = mutate(BASE, "timeout = \"2s\"", "timeout = \"5 parsecs\"");
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "parsecs"),
        "virtualServices[0].http[0].timeout",
    );
}

#[test]
fn missing_gateway() {
    let text = mutate(BASE, "gateways = [\"public\"]", "gateways = [\"nope\"]");
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "\"nope\""),
        "virtualServices[0].gateways",
    );
    assert!(out.contains("nope"), "the missing gateway is named:\n{out}");
}

#[test]
fn unknown_subset() {
    let text = mutate(BASE, "subset = \"v2\", port", "subset = \"v9\", port");
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "\"v9\""),
        "virtualServices[0].http[0].route[1].destination",
    );
    assert!(out.contains("v9"), "the unknown subset is named:\n{out}");
}

#[test]
fn negative_weight() {
    let text = mutate(BASE, "weight = 10 }", "weight = -1 }");
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "weight = -1"),
        "virtualServices[0].http[0].route[1].weight",
    );
}

#[test]
fn all_zero_weights() {
    let one_line = "route = [{ destination = { host = \"svc.internal\", subset = \"v1\", port = { number = 80 } }, weight = 0 }, { destination = { host = \"svc.internal\", subset = \"v2\", port = { number = 80 } }, weight = 0 }]\n";
    let text = mutate(BASE, ROUTE_BLOCK, one_line);
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "weight = 0 }, {"),
        "virtualServices[0].http[0].route",
    );
}

#[test]
fn duplicate_host_on_one_port() {
    let servers = r#"[[gateways.servers]]
port = { number = 8080, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["dup.example.com", "shop.example.com"]

[[gateways.servers]]
port = { number = 8080, name = "http-again", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["dup.example.com", "other.example.com"]
"#;
    let text = mutate(BASE, HTTP_SERVER, servers);
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "other.example.com"),
        "gateways[0].servers[1].hosts",
    );
    assert!(
        out.contains("dup.example.com"),
        "the duplicated host is named:\n{out}"
    );
}

/// The admin API on a gateway's port (here the wildcard of one and the loopback of the
/// other) would fail at `portico run` as a race between two listeners; it is refused here.
#[test]
fn admin_on_a_gateway_port() {
    let text = mutate(
        BASE,
        "admin = \"127.0.0.1:15000\"",
        "admin = \"0.0.0.0:8080\"",
    );
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "admin ="),
        "mesh.admin",
    );
    assert!(
        out.contains("127.0.0.1:8080"),
        "the gateway address is named:\n{out}"
    );
    // Another address on the same port is fine.
    let ok = mutate(
        BASE,
        "admin = \"127.0.0.1:15000\"",
        "admin = \"127.0.0.2:8080\"",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, out) = validate_in(tmp.path(), &ok);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn unreadable_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cert(tmp.path(), "a", &["shop.example.com"]);
    let text = with_https_server(
        "{ mode = \"SIMPLE\", serverCertificate = \"missing.crt\", privateKey = \"a.key\" }",
    );
    let out = validate_fails_in(tmp.path(), &text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "missing.crt"),
        "gateways[0].servers[1].tls",
    );
    assert!(
        out.contains("missing.crt"),
        "the unreadable file is named:\n{out}"
    );
}

#[test]
fn key_does_not_match_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cert(tmp.path(), "a", &["shop.example.com"]);
    write_cert(tmp.path(), "b", &["shop.example.com"]);
    let text = with_https_server(
        "{ mode = \"SIMPLE\", serverCertificate = \"a.crt\", privateKey = \"b.key\" }",
    );
    let out = validate_fails_in(tmp.path(), &text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "b.key"),
        "gateways[0].servers[1].tls",
    );
}

#[test]
fn error_in_included_file_names_that_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let included = r#"[[virtualServices]]
name = "extra"
hosts = ["extra.example.com"]
gateways = ["public"]

[[virtualServices.http]]
name = "slow"
timeout = "5 parsecs"
directResponse = { status = 200, body = { string = "extra" } }
"#;
    write_atomic(&tmp.path().join("conf.d/bad.toml"), included);
    let text = format!("include = [\"conf.d/*.toml\"]\n{BASE}");
    let out = validate_fails_in(tmp.path(), &text);
    assert_error(
        &out,
        "bad.toml",
        included,
        line_of(included, "parsecs"),
        "virtualServices[0].http[0].timeout",
    );
}

#[test]
fn several_errors_are_all_reported() {
    let text = mutate(BASE, "gateways = [\"public\"]", "gateways = [\"nope\"]");
    let text = mutate(&text, "subset = \"v1\", port", "subset = \"v9\", port");
    let text = mutate(&text, "weight = 10 }", "weight = -1 }");
    let out = validate_fails(&text);
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "\"nope\""),
        "virtualServices[0].gateways",
    );
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "\"v9\""),
        "virtualServices[0].http[0].route[0].destination",
    );
    assert_error(
        &out,
        "portico.toml",
        &text,
        line_of(&text, "weight = -1"),
        "virtualServices[0].http[0].route[1].weight",
    );
    let located = regex::Regex::new(r"portico\.toml:\d+:\d+:").unwrap();
    let count = out.lines().filter(|l| located.is_match(l)).count();
    assert!(count >= 3, "one line per error, {count} found:\n{out}");
}

#[test]
fn valid_file_prints_ok() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, out) = validate_in(tmp.path(), BASE);
    assert_eq!(code, 0, "valid config rejected:\n{out}");
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("ok:")),
        "ok: summary expected:\n{out}"
    );

    // With an HTTPS server whose certificate files exist and match.
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cert(tmp.path(), "a", &["shop.example.com"]);
    let text = with_https_server(
        "{ mode = \"SIMPLE\", serverCertificate = \"a.crt\", privateKey = \"a.key\" }",
    );
    let (code, out) = validate_in(tmp.path(), &text);
    assert_eq!(
        code, 0,
        "valid HTTPS config rejected:\n{out}\nconfig:\n{text}"
    );
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("ok:")),
        "ok: summary expected:\n{out}"
    );
}

#[test]
fn proxy_protocol_settings() {
    let with = |table: &str| {
        mutate(
            BASE,
            "admin = \"127.0.0.1:15000\"\n",
            &format!("admin = \"127.0.0.1:15000\"\n[mesh.defaultConfig.gatewayTopology.proxyProtocol]\n{table}\n"),
        )
    };
    let field = "mesh.defaultConfig.gatewayTopology.proxyProtocol";
    let text = with("timeout = \"1s\"");
    let out = validate_fails(&text);
    assert!(
        out.contains(&format!("{field}.trustedCidrs")) && out.contains("is required"),
        "{out}"
    );
    let text = with("trustedCidrs = [\"10.0.0.0/8\", \"10.0.0.300\"]");
    let out = validate_fails(&text);
    assert!(out.contains(&format!("{field}.trustedCidrs[1]")), "{out}");
    let text = with("trustedCidrs = [\"10.0.0.0/8\"]\ndisallowedVersions = [\"V3\"]");
    let out = validate_fails(&text);
    assert!(
        out.contains(&format!("{field}.disallowedVersions[0]")) && out.contains("V3"),
        "{out}"
    );
    let text = with("trustedCidrs = [\"10.0.0.0/8\"]\nports = [8080, 9999]");
    let out = validate_fails(&text);
    assert!(
        out.contains(&format!("{field}.ports[1]")) && out.contains("9999"),
        "{out}"
    );
    let ok = with("trustedCidrs = [\"10.0.0.0/8\", \"2001:db8::/32\"]\nports = [8080]");
    let tmp = tempfile::tempdir().unwrap();
    let (code, out) = validate_in(tmp.path(), &ok);
    assert_eq!(code, 0, "{out}");
}
