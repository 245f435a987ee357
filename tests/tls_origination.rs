//! TLS origination: plain HTTP to the gateway leaves as TLS to the upstream, verified
//! against the configured CA and name (DestinationRule `trafficPolicy.tls`). The TLS
//! upstream is a second Portico terminating TLS with its own certificate.

mod support;

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
