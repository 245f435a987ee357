//! TLS origination: plain HTTP to the gateway leaves as TLS to the upstream, verified
//! against the configured CA and name (DestinationRule `trafficPolicy.tls`). The TLS
//! upstream is a second Portico terminating TLS with its own certificate.

mod support;

use std::time::Duration;

use support::*;

/// An HTTPS origin for `origin.test` answering "from origin"; returns (gateway, https port).
fn origin(dir: &std::path::Path) -> (Portico, u16) {
    https_origin(
        dir,
        &["origin.test"],
        "from origin",
        r#"headers = { response = { set = { x-origin-saw-tls = "yes" } } }"#,
    )
}

fn edge(dir: &std::path::Path, origin_port: u16, tls: &str) -> (Portico, u16) {
    let http = free_port();
    let config = format!(
        r#"{mesh}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "out"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{{ destination = {{ host = "origin.test", port = {{ number = 80 }} }} }}]
retries = {{ attempts = 0 }}

[[serviceEntries]]
name = "origin"
hosts = ["origin.test"]
location = "MESH_EXTERNAL"
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {origin_port} }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[destinationRules]]
name = "origin"
host = "origin.test"
trafficPolicy = {{ tls = {tls} }}
"#,
        mesh = mesh_config(free_port()),
    );
    (Portico::start(dir, &config), http)
}

#[test]
fn plain_http_leaves_as_verified_tls() {
    let origin_dir = tempfile::tempdir().unwrap();
    let (_origin, origin_port) = origin(origin_dir.path());
    let edge_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        origin_dir.path().join("origin.crt"),
        edge_dir.path().join("ca.crt"),
    )
    .unwrap();

    let (_edge, http) = edge(
        edge_dir.path(),
        origin_port,
        r#"{ mode = "SIMPLE", caCertificates = "ca.crt" }"#,
    );
    let resp = http_get(http, "client.test", "/");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "from origin");
    assert_eq!(resp.header("x-origin-saw-tls"), Some("yes"));
}

#[test]
fn an_untrusted_or_misnamed_upstream_is_refused() {
    let origin_dir = tempfile::tempdir().unwrap();
    let (_origin, origin_port) = origin(origin_dir.path());

    // System roots do not trust the self-signed origin.
    let dir = tempfile::tempdir().unwrap();
    let (edge1, http) = edge(dir.path(), origin_port, r#"{ mode = "SIMPLE" }"#);
    assert_eq!(http_get(http, "client.test", "/").status, 503);
    // The log line says why: the upstream's certificate is from an unknown issuer.
    let log = edge1.log();
    let line = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("status=503"))
        .unwrap_or_else(|| panic!("no log line for the 503:\n{log}"));
    assert!(
        line.contains("UnknownIssuer") && line.contains("upstream connect error"),
        "{line}"
    );

    // The right CA but the wrong name.
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::copy(
        origin_dir.path().join("origin.crt"),
        dir2.path().join("ca.crt"),
    )
    .unwrap();
    let (_edge2, http2) = edge(
        dir2.path(),
        origin_port,
        r#"{ mode = "SIMPLE", caCertificates = "ca.crt", sni = "elsewhere.test" }"#,
    );
    assert_eq!(http_get(http2, "client.test", "/").status, 503);

    // insecureSkipVerify takes what it gets.
    let dir3 = tempfile::tempdir().unwrap();
    let (_edge3, http3) = edge(
        dir3.path(),
        origin_port,
        r#"{ mode = "SIMPLE", insecureSkipVerify = true }"#,
    );
    assert_eq!(http_get(http3, "client.test", "/").text(), "from origin");
}

/// DestinationRule `tls.mode = MUTUAL`: the edge presents its client certificate to an
/// origin (a second Portico, Gateway `MUTUAL`) that refuses connections without one.
#[test]
fn mutual_tls_to_an_origin_that_requires_a_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let origin_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    // The client CA the origin trusts, and the edge's certificate from it.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    write_atomic(&origin_dir.path().join("client-ca.crt"), ca.pem());
    let edge_key = KeyPair::generate().unwrap();
    let edge_cert = CertificateParams::new(vec!["edge.test".to_string()])
        .unwrap()
        .signed_by(&edge_key, &ca, &ca_key)
        .unwrap();
    write_atomic(&edge_dir.path().join("edge.crt"), edge_cert.pem());
    write_atomic(&edge_dir.path().join("edge.key"), edge_key.serialize_pem());

    write_cert(origin_dir.path(), "origin", &["origin.test"]);
    let https = free_port();
    let origin_config = format!(
        r#"{mesh}
[[gateways]]
name = "origin"
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["*"]
tls = {{ mode = "MUTUAL", serverCertificate = "origin.crt", privateKey = "origin.key", caCertificates = "client-ca.crt" }}

[[virtualServices]]
name = "origin"
hosts = ["*"]
gateways = ["origin"]
[[virtualServices.http]]
directResponse = {{ status = 200, body = {{ string = "from origin" }} }}
headers = {{ response = {{ set = {{ x-origin-saw-tls = "yes" }} }} }}
"#,
        mesh = mesh_config(free_port()),
    );
    let _origin = Portico::start(origin_dir.path(), &origin_config);
    std::fs::copy(
        origin_dir.path().join("origin.crt"),
        edge_dir.path().join("ca.crt"),
    )
    .unwrap();
    let (_edge, http) = edge(
        edge_dir.path(),
        https,
        r#"{ mode = "MUTUAL", caCertificates = "ca.crt", clientCertificate = "edge.crt", privateKey = "edge.key" }"#,
    );
    let resp = http_get(http, "client.test", "/");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "from origin");

    // Without the client certificate the origin refuses the handshake: 503 at the edge.
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::copy(
        origin_dir.path().join("origin.crt"),
        dir2.path().join("ca.crt"),
    )
    .unwrap();
    let (_edge2, http2) = edge(
        dir2.path(),
        https,
        r#"{ mode = "SIMPLE", caCertificates = "ca.crt" }"#,
    );
    assert_eq!(http_get(http2, "client.test", "/").status, 503);
}

/// A mesh root and a workload certificate from it naming only a SPIFFE identity (no DNS
/// name), written where `mesh.workloadCertificates` points: `<dir>/mesh/`.
fn workload_identity(
    dir: &std::path::Path,
    root: &rcgen::Certificate,
    root_key: &rcgen::KeyPair,
    spiffe: &str,
) {
    use rcgen::{CertificateParams, KeyPair, SanType};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names
        .push(SanType::URI(rcgen::Ia5String::try_from(spiffe).unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, root, root_key).unwrap();
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    write_atomic(&mesh.join("cert-chain.pem"), cert.pem());
    write_atomic(&mesh.join("key.pem"), key.serialize_pem());
    write_atomic(&mesh.join("root-cert.pem"), root.pem());
}

fn mesh_root() -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    (p.self_signed(&key).unwrap(), key)
}

const WORKLOAD: &str = r#"workloadCertificates = { certChain = "mesh/cert-chain.pem", privateKey = "mesh/key.pem", rootCert = "mesh/root-cert.pem" }"#;

/// `ISTIO_MUTUAL` both ways, as between Istio sidecars: the edge's DestinationRule and the
/// origin's Gateway server both use their workload certificate (SPIFFE identity only) from
/// one mesh root. The origin sees the edge's identity as `source.principal` and Istio's
/// SNI `outbound_.<port>_.<subset>_.<host>`; a peer from another root is refused either way.
#[test]
fn istio_mutual_uses_the_workload_certificates_both_ways() {
    let (root, root_key) = mesh_root();
    let origin_dir = tempfile::tempdir().unwrap();
    workload_identity(
        origin_dir.path(),
        &root,
        &root_key,
        "spiffe://cluster.local/ns/shop/sa/origin",
    );
    let https = free_port();
    let origin_config = format!(
        r#"{mesh}{WORKLOAD}
[[gateways]]
name = "origin"
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["*"]
tls = {{ mode = "ISTIO_MUTUAL" }}

[[virtualServices]]
name = "origin"
hosts = ["*"]
gateways = ["origin"]
[[virtualServices.http]]
directResponse = {{ status = 200, body = {{ string = "from origin" }} }}

[[authorizationPolicies]]
name = "only-the-edge-by-mesh-sni"
[[authorizationPolicies.rules]]
from = [{{ source = {{ principals = ["cluster.local/ns/edge/sa/gateway"] }} }}]
when = [{{ key = "connection.sni", values = ["outbound_.80_.v1_.origin.test"] }}]
"#,
        mesh = mesh_config(free_port()),
    );
    let _origin = Portico::start(origin_dir.path(), &origin_config);

    let edge_config = |tls: &str| {
        format!(
            r#"{mesh}{WORKLOAD}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = @HTTP@, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "out"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{{ destination = {{ host = "origin.test", subset = "v1", port = {{ number = 80 }} }} }}]
retries = {{ attempts = 0 }}

[[serviceEntries]]
name = "origin"
hosts = ["origin.test"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {https} }}]
endpoints = [{{ address = "127.0.0.1", labels = {{ version = "v1" }} }}]

[[destinationRules]]
name = "origin"
host = "origin.test"
trafficPolicy = {{ tls = {tls} }}
subsets = [{{ name = "v1", labels = {{ version = "v1" }} }}]
"#,
            mesh = mesh_config(free_port()),
        )
    };
    let start_edge = |dir: &std::path::Path, tls: &str| {
        let http = free_port();
        let config = edge_config(tls).replace("@HTTP@", &http.to_string());
        (Portico::start(dir, &config), http)
    };

    // The edge's identity from the same root: through, and the origin's ALLOW rule saw
    // both the principal and the SNI.
    let edge_dir = tempfile::tempdir().unwrap();
    workload_identity(
        edge_dir.path(),
        &root,
        &root_key,
        "spiffe://cluster.local/ns/edge/sa/gateway",
    );
    let (_edge, http) = start_edge(edge_dir.path(), r#"{ mode = "ISTIO_MUTUAL" }"#);
    let resp = http_get(http, "client.test", "/");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "from origin");

    // Another identity from the same root: the handshake succeeds, the origin's policy
    // refuses it (the principal is the certificate's).
    let other_dir = tempfile::tempdir().unwrap();
    workload_identity(
        other_dir.path(),
        &root,
        &root_key,
        "spiffe://cluster.local/ns/edge/sa/someone-else",
    );
    let (_other, http2) = start_edge(other_dir.path(), r#"{ mode = "ISTIO_MUTUAL" }"#);
    let resp = http_get(http2, "client.test", "/");
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.text(), "RBAC: access denied");

    // A workload from another mesh root: neither side trusts the other, 503 at the edge.
    let (foreign_root, foreign_key) = mesh_root();
    let foreign_dir = tempfile::tempdir().unwrap();
    workload_identity(
        foreign_dir.path(),
        &foreign_root,
        &foreign_key,
        "spiffe://cluster.local/ns/edge/sa/gateway",
    );
    let (_foreign, http3) = start_edge(foreign_dir.path(), r#"{ mode = "ISTIO_MUTUAL" }"#);
    assert_eq!(http_get(http3, "client.test", "/").status, 503);
}

/// `ISTIO_MUTUAL` without its files, or with fields it replaces, is a config error that
/// names the field.
#[test]
fn istio_mutual_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |text: String| {
        let path = dir.path().join("portico.toml");
        std::fs::write(&path, text).unwrap();
        let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
        (code == 0, out)
    };
    let config = |mesh_extra: &str, tls: &str| {
        format!(
            r#"{mesh}{mesh_extra}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {port}, name = "http", protocol = "HTTP" }}
hosts = ["*"]

[[virtualServices]]
name = "out"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{{ destination = {{ host = "origin.test", port = {{ number = 80 }} }} }}]

[[serviceEntries]]
name = "origin"
hosts = ["origin.test"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[destinationRules]]
name = "origin"
host = "origin.test"
trafficPolicy = {{ tls = {tls} }}
"#,
            mesh = mesh_config(free_port()),
            port = free_port(),
        )
    };
    let missing = validate(config(
        r#"workloadCertificates = { certChain = "nowhere/chain.pem", privateKey = "k.pem", rootCert = "r.pem" }"#,
        r#"{ mode = "ISTIO_MUTUAL" }"#,
    ));
    assert!(
        !missing.0,
        "a missing workload certificate must not validate"
    );
    assert!(
        missing.1.contains("trafficPolicy.tls") && missing.1.contains("certChain"),
        "{}",
        missing.1
    );
    let (root, key) = mesh_root();
    workload_identity(dir.path(), &root, &key, "spiffe://cluster.local/ns/a/sa/b");
    let both = validate(config(
        WORKLOAD,
        r#"{ mode = "ISTIO_MUTUAL", clientCertificate = "mesh/cert-chain.pem" }"#,
    ));
    assert!(!both.0);
    assert!(both.1.contains("clientCertificate"), "{}", both.1);
    let good = validate(config(WORKLOAD, r#"{ mode = "ISTIO_MUTUAL" }"#));
    assert!(good.0, "{}", good.1);
}

/// A reload that keeps a TLS cluster as it was (here: only an included VirtualService
/// changed, so the compile reuses the cluster) still watches the cluster's certificate
/// files, so a later rotation of the workload certificate is reloaded too.
#[test]
fn a_kept_tls_cluster_still_watches_its_certificate_files() {
    let (root, root_key) = mesh_root();
    let dir = tempfile::tempdir().unwrap();
    workload_identity(
        dir.path(),
        &root,
        &root_key,
        "spiffe://cluster.local/ns/a/sa/b",
    );
    let http = free_port();
    let vs = |version: &str| {
        format!(
            r#"[[virtualServices]]
name = "out"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
match = [{{ uri = {{ exact = "/version" }} }}]
directResponse = {{ status = 200, body = {{ string = "{version}" }} }}
[[virtualServices.http]]
route = [{{ destination = {{ host = "origin.test", port = {{ number = 80 }} }} }}]
"#
        )
    };
    write_atomic(&dir.path().join("vs.toml"), vs("one"));
    let config = format!(
        r#"include = ["vs.toml"]
{mesh}{WORKLOAD}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[serviceEntries]]
name = "origin"
hosts = ["origin.test"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {closed} }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[destinationRules]]
name = "origin"
host = "origin.test"
trafficPolicy = {{ tls = {{ mode = "ISTIO_MUTUAL" }} }}
"#,
        mesh = mesh_config(free_port()),
        closed = free_port(),
    );
    let gw = Portico::start(dir.path(), &config);
    let g0 = gw.generation();
    write_atomic(&dir.path().join("vs.toml"), vs("two"));
    let g1 = gw.wait_generation_above(g0, Duration::from_secs(10));
    assert_eq!(http_get(http, "client.test", "/version").text(), "two");
    workload_identity(
        dir.path(),
        &root,
        &root_key,
        "spiffe://cluster.local/ns/a/sa/c",
    );
    gw.wait_generation_above(g1, Duration::from_secs(10));
}

/// A request the front plans but cannot carry out (its destination needs TLS) goes to
/// pingora's cycle with the plan made for it, on HTTP/1.1 and h2 alike: the policies are
/// asked once, by the front, which answers a refusal itself (no hand-over); a forwarded
/// request leaves with the request id the front made, which both gateways log.
#[test]
fn a_planned_request_is_handed_over_with_its_plan() {
    let origin_dir = tempfile::tempdir().unwrap();
    let (origin, origin_port) = origin(origin_dir.path());
    let edge_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        origin_dir.path().join("origin.crt"),
        edge_dir.path().join("ca.crt"),
    )
    .unwrap();
    write_cert(edge_dir.path(), "edge", &["client.test"]);
    let (http, https) = (free_port(), free_port());
    let config = format!(
        r#"{mesh}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["*"]
tls = {{ mode = "SIMPLE", serverCertificate = "edge.crt", privateKey = "edge.key" }}

[[virtualServices]]
name = "out"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{{ destination = {{ host = "origin.test", port = {{ number = 80 }} }} }}]

[[authorizationPolicies]]
name = "deny"
action = "DENY"
rules = [{{ to = [{{ operation = {{ paths = ["/denied"] }} }}] }}]

[[serviceEntries]]
name = "origin"
hosts = ["origin.test"]
location = "MESH_EXTERNAL"
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {origin_port} }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[destinationRules]]
name = "origin"
host = "origin.test"
trafficPolicy = {{ tls = {{ mode = "SIMPLE", caCertificates = "ca.crt" }} }}
"#,
        mesh = mesh_config(free_port()),
    );
    let edge = Portico::start(edge_dir.path(), &config);

    let ok = http_get(http, "client.test", "/ok");
    assert_eq!((ok.status, ok.text().as_str()), (200, "from origin"));
    let denied = http_get(http, "client.test", "/denied");
    assert_eq!(denied.status, 403, "{}", denied.text());
    let mut h2 = H2Client::connect(https, "client.test").expect("h2 connection");
    let ok = h2.get("client.test", "/ok").expect("h2 GET");
    assert_eq!((ok.status, ok.text().as_str()), (200, "from origin"));
    let denied = h2.get("client.test", "/denied").expect("h2 GET");
    assert_eq!(denied.status, 403, "{}", denied.text());

    // Both refusals were the front's; only the two forwards were handed over.
    let metrics = edge.metrics();
    let count = |name: &str, label: &str| metric_sum(&metrics, name, label).unwrap_or(0.0);
    let want = if fast_path_on() { 2.0 } else { 0.0 };
    assert_eq!(
        count("portico_fast_path_handoffs_total", "reason=\"route\""),
        want,
        "{metrics}"
    );
    assert_eq!(
        count("portico_fast_path_requests_total", ""),
        want,
        "{metrics}"
    );

    // One line per request; each forward's id is the one the origin received.
    let lines = |p: &Portico| -> Vec<serde_json::Value> {
        p.stdout()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("JSON log line"))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || lines(&edge).len() == 4
            && lines(&origin).len() == 2),
        "edge:\n{}\norigin:\n{}",
        edge.stdout(),
        origin.stdout()
    );
    let ids = |p: &Portico, status: u64| -> Vec<String> {
        lines(p)
            .iter()
            .filter(|l| l["response_code"] == status)
            .map(|l| l["request_id"].as_str().expect("request_id").to_string())
            .collect()
    };
    let forwarded = ids(&edge, 200);
    assert_eq!(forwarded.len(), 2, "{}", edge.stdout());
    assert!(forwarded.iter().all(|id| id.len() == 36), "{forwarded:?}");
    assert_eq!(ids(&origin, 200), forwarded, "{}", origin.stdout());
    assert_eq!(ids(&edge, 403).len(), 2, "{}", edge.stdout());
}
