//! DestinationRule `tls.subjectAltNames` and `tls.caCrl`: the upstream's certificate must
//! carry one of the names (DNS with wildcards, or a URI such as a SPIFFE id) and must not be
//! revoked. The upstream is a second Portico terminating TLS (SIMPLE, or ISTIO_MUTUAL with
//! a workload certificate) with a certificate from a CA made in the test; every check is a
//! real handshake on loopback.

mod support;

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use support::*;

/// A CA made for the test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A certificate with DNS names `dns` and URIs `uris`, serial `serial`: (PEM, key PEM).
    fn issue(&self, dns: &[&str], uris: &[&str], serial: u64) -> (String, String) {
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI(rcgen::Ia5String::try_from(*u).unwrap()));
        }
        p.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        let now = time::OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - time::Duration::minutes(5),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// An HTTPS origin (Gateway `SIMPLE`) with the certificate `(cert, key)`, answering
/// "from origin". Returns (it, its port).
fn origin(dir: &Path, cert: &(String, String)) -> (Portico, u16) {
    write_atomic(&dir.join("origin.key"), &cert.1);
    write_atomic(&dir.join("origin.crt"), &cert.0);
    let https = free_port();
    let config = format!(
        r#"{mesh}
[[gateways]]
name = "origin"
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["*"]
tls = {{ mode = "SIMPLE", serverCertificate = "origin.crt", privateKey = "origin.key" }}

[[virtualServices]]
name = "origin"
hosts = ["*"]
gateways = ["origin"]
[[virtualServices.http]]
directResponse = {{ status = 200, body = {{ string = "from origin" }} }}
"#,
        mesh = mesh_config(free_port()),
    );
    (Portico::start(dir, &config), https)
}

/// An edge on a plain HTTP port whose requests for `<name>.test` go to the origin at
/// `origin_port` as host `<name>.origin`, with DestinationRule TLS `tls` — one
/// `(name, tls)` per case; `extra` is added to the config (e.g. the mesh's workload
/// certificates). Returns (it, its HTTP port).
fn edge(dir: &Path, origin_port: u16, cases: &[(&str, &str)], extra: &str) -> (Portico, u16) {
    let cases: Vec<(&str, &str, &str)> = cases.iter().map(|(n, t)| (*n, "", *t)).collect();
    edge_with_entries(dir, origin_port, &cases, "", extra)
}

/// `edge`, with fields added to each case's ServiceEntry (`(name, entry fields, tls)`)
/// and top-level keys `top` (e.g. `include`).
fn edge_with_entries(
    dir: &Path,
    origin_port: u16,
    cases: &[(&str, &str, &str)],
    top: &str,
    extra: &str,
) -> (Portico, u16) {
    let http = free_port();
    let mut config = format!(
        r#"{top}{mesh}{extra}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
"#,
        mesh = mesh_config(free_port()),
    );
    for (name, entry, tls) in cases {
        config.push_str(&format!(
            r#"
[[virtualServices]]
name = "{name}"
hosts = ["{name}.test"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{{ destination = {{ host = "{name}.origin", port = {{ number = 80 }} }} }}]
retries = {{ attempts = 0 }}

[[serviceEntries]]
name = "{name}"
hosts = ["{name}.origin"]
location = "MESH_EXTERNAL"
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {origin_port} }}]
endpoints = [{{ address = "127.0.0.1" }}]
{entry}
[[destinationRules]]
name = "{name}"
host = "{name}.origin"
trafficPolicy = {{ tls = {tls} }}
"#
        ));
    }
    (Portico::start(dir, &config), http)
}

/// The gateway's log line for a 503 on the route of case `name`: flag UF, and the reason.
fn refusal_line(gw: &Portico, name: &str) -> String {
    let log = gw.log();
    let route = format!("route=\"default/{name}.");
    log.lines()
        .find(|l| l.contains("WARN") && l.contains("status=503") && l.contains(&route))
        .unwrap_or_else(|| panic!("no log line for the 503 of {name}:\n{log}"))
        .to_string()
}

/// The access log line (JSON, the gateway's stdout) of the first request for `authority`.
fn access_line(gw: &Portico, authority: &str) -> serde_json::Value {
    let needle = format!("\"authority\":\"{authority}\"");
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        found = gw
            .stdout()
            .lines()
            .find(|l| l.contains(&needle))
            .map(str::to_string);
        found.is_some()
    });
    let line = found.unwrap_or_else(|| panic!("no access log line for {authority}:\n{}", gw.log()));
    serde_json::from_str(&line).expect(&line)
}

fn get(port: u16, host: &str) -> Response {
    http_get(port, host, "/")
}

#[test]
fn subject_alt_names_name_the_upstream_instead_of_the_sni() {
    let ca = Ca::new("Origin CA");
    let origin_dir = tempfile::tempdir().unwrap();
    let (origin, origin_port) = origin(
        origin_dir.path(),
        &ca.issue(&["api.internal", "*.svc.internal"], &[], 10),
    );
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("ca.crt"), ca.cert.pem());
    let simple = |sans: &str| format!(r#"{{ mode = "SIMPLE", caCertificates = "ca.crt"{sans} }}"#);
    let (gw, http) = edge(
        dir.path(),
        origin_port,
        &[
            // The SNI (`<name>.origin`) is not in the certificate: without
            // subjectAltNames the name check fails, with one that is, it passes.
            ("nosans", &simple("")),
            (
                "exact",
                &simple(r#", subjectAltNames = ["other.test", "api.internal"]"#),
            ),
            (
                "wildcard",
                &simple(r#", subjectAltNames = ["x.svc.internal"]"#),
            ),
            (
                "deep",
                &simple(r#", subjectAltNames = ["a.b.svc.internal"]"#),
            ),
            ("wrong", &simple(r#", subjectAltNames = ["nope.internal"]"#)),
            (
                "sni",
                r#"{ mode = "SIMPLE", caCertificates = "ca.crt", sni = "api.internal" }"#,
            ),
            // h2 offered by ALPN (h2UpgradePolicy) over the verified connection.
            (
                "h2",
                r#"{ mode = "SIMPLE", caCertificates = "ca.crt", subjectAltNames = ["api.internal"] }, connectionPool = { http = { h2UpgradePolicy = "UPGRADE" } }"#,
            ),
        ],
        "",
    );

    for host in ["exact.test", "wildcard.test", "sni.test"] {
        let resp = get(http, host);
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
        assert_eq!(resp.text(), "from origin", "{host}");
    }
    let resp = get(http, "h2.test");
    assert_eq!(resp.status, 200, "{}", resp.text());
    // The origin's access log (JSON lines, written shortly after each request).
    let line_of = |authority: &str| {
        let mut found = None;
        wait_until(Duration::from_secs(5), || {
            found = origin
                .stdout()
                .lines()
                .find(|l| l.contains(&format!("\"authority\":\"{authority}\"")))
                .map(str::to_string);
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no origin log line for {authority}:\n{}", origin.log()))
    };
    assert!(
        line_of("h2.test").contains("\"protocol\":\"HTTP/2\""),
        "the origin was reached over h2: {}",
        line_of("h2.test")
    );
    assert!(line_of("exact.test").contains("\"protocol\":\"HTTP/1.1\""));
    let resp = get(http, "nosans.test");
    assert_eq!(
        resp.status, 503,
        "the SNI is checked without subjectAltNames"
    );
    // A wildcard covers one label only.
    assert_eq!(get(http, "deep.test").status, 503);

    let resp = get(http, "wrong.test");
    assert_eq!(resp.status, 503, "{}", resp.text());
    let line = refusal_line(&gw, "wrong");
    assert!(line.contains("flag=UF"), "{line}");
    assert!(
        line.contains("certificate SAN mismatch") && line.contains("nope.internal"),
        "the log says why: {line}"
    );
    let logged = access_line(&gw, "wrong.test");
    assert_eq!(logged["response_flags"], "UF", "{logged}");
    let reason = logged["upstream_transport_failure_reason"]
        .as_str()
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(
        reason.starts_with("TLS_error: ") && reason.contains("certificate SAN mismatch"),
        "{reason}"
    );
    assert!(
        access_line(&gw, "exact.test")
            .get("upstream_transport_failure_reason")
            .is_none(),
        "only failed handshakes have a reason"
    );
    // The same again: a refused handshake leaves nothing in the pool to reuse.
    assert_eq!(get(http, "wrong.test").status, 503);
    assert_eq!(get(http, "exact.test").status, 200);
}

/// ServiceEntry `subjectAltNames`: with a DestinationRule originating TLS (SIMPLE) that
/// names none, the upstream's certificate must carry one of the entry's names (refused
/// with the reason logged otherwise); the DestinationRule's own list replaces the entry's.
/// The entry may come from Istio YAML too.
#[test]
fn service_entry_subject_alt_names_apply_unless_the_destination_rule_names_its_own() {
    let ca = Ca::new("Origin CA");
    let origin_dir = tempfile::tempdir().unwrap();
    let (_origin, origin_port) = origin(origin_dir.path(), &ca.issue(&["api.internal"], &[], 40));
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("ca.crt"), ca.cert.pem());
    let simple = |sans: &str| format!(r#"{{ mode = "SIMPLE", caCertificates = "ca.crt"{sans} }}"#);
    let entry = |sans: &str| format!("subjectAltNames = {sans}\n");
    // The same entry and rule in Istio YAML, in an included folder.
    write_atomic(
        &dir.path().join("manifests/yaml.yaml"),
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: yaml
spec:
  hosts: [yaml.internal]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: @PORT@}
  endpoints:
  - address: 127.0.0.1
  subjectAltNames: [nope.internal]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: yaml
spec:
  host: yaml.internal
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: ../ca.crt}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: yaml
spec:
  hosts: [yaml.test]
  gateways: [edge]
  http:
  - route:
    - destination: {host: yaml.internal, port: {number: 80}}
    retries: {attempts: 0}
"#
        .replace("@PORT@", &origin_port.to_string()),
    );
    let (gw, http) = edge_with_entries(
        dir.path(),
        origin_port,
        &[
            // The SNI (`<name>.origin`) is not in the certificate: the entry's name is.
            (
                "matches",
                &entry(r#"["other.internal", "api.internal"]"#),
                &simple(""),
            ),
            ("mismatch", &entry(r#"["nope.internal"]"#), &simple("")),
            // The rule's list wins, whichever way.
            (
                "rulepasses",
                &entry(r#"["nope.internal"]"#),
                &simple(r#", subjectAltNames = ["api.internal"]"#),
            ),
            (
                "rulerefuses",
                &entry(r#"["api.internal"]"#),
                &simple(r#", subjectAltNames = ["rule.internal"]"#),
            ),
            // Without the entry's names, the SNI is checked: refused.
            ("none", "", &simple("")),
        ],
        "include = [\"manifests\"]\n",
        "",
    );
    for host in ["matches.test", "rulepasses.test"] {
        let resp = get(http, host);
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
        assert_eq!(resp.text(), "from origin", "{host}");
    }
    let resp = get(http, "mismatch.test");
    assert_eq!(resp.status, 503, "{}", resp.text());
    let line = refusal_line(&gw, "mismatch");
    assert!(line.contains("flag=UF"), "{line}");
    assert!(
        line.contains("certificate SAN mismatch")
            && line.contains("nope.internal")
            && line.contains("api.internal"),
        "the log says why: {line}"
    );
    let logged = access_line(&gw, "mismatch.test");
    assert_eq!(logged["response_flags"], "UF", "{logged}");
    let reason = logged["upstream_transport_failure_reason"]
        .as_str()
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(
        reason.starts_with("TLS_error: ") && reason.contains("nope.internal"),
        "{reason}"
    );

    assert_eq!(get(http, "rulerefuses.test").status, 503);
    let line = refusal_line(&gw, "rulerefuses");
    assert!(
        line.contains("certificate SAN mismatch") && line.contains("rule.internal"),
        "the rule's names, not the entry's: {line}"
    );
    assert_eq!(get(http, "none.test").status, 503);

    // From YAML: the entry's name is checked (it is not the certificate's).
    assert_eq!(get(http, "yaml.test").status, 503);
    let line = refusal_line(&gw, "yaml");
    assert!(
        line.contains("certificate SAN mismatch") && line.contains("nope.internal"),
        "{line}"
    );
    assert!(
        !gw.log().contains("subjectAltNames is not supported"),
        "subjectAltNames is a known field: {}",
        gw.log()
    );
}

/// A mesh root and a workload certificate from it naming only `spiffe`, written where
/// `mesh.workloadCertificates` points: `<dir>/mesh/`.
fn workload_identity(dir: &Path, root: &Ca, spiffe: &str, serial: u64) {
    let (cert, key) = root.issue(&[], &[spiffe], serial);
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    write_atomic(&mesh.join("cert-chain.pem"), cert);
    write_atomic(&mesh.join("key.pem"), key);
    write_atomic(&mesh.join("root-cert.pem"), root.cert.pem());
}

const WORKLOAD: &str = r#"workloadCertificates = { certChain = "mesh/cert-chain.pem", privateKey = "mesh/key.pem", rootCert = "mesh/root-cert.pem" }"#;

/// `ISTIO_MUTUAL` with `subjectAltNames`: the upstream's workload certificate must name
/// one of the SPIFFE identities (the chain alone is checked without them); with `caCrl`,
/// it must not be revoked by the mesh root.
#[test]
fn istio_mutual_checks_the_spiffe_identity_and_the_crl() {
    let root = Ca::new("mesh root");
    let origin_dir = tempfile::tempdir().unwrap();
    workload_identity(
        origin_dir.path(),
        &root,
        "spiffe://cluster.local/ns/shop/sa/origin",
        20,
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
"#,
        mesh = mesh_config(free_port()),
    );
    let _origin = Portico::start(origin_dir.path(), &origin_config);

    let dir = tempfile::tempdir().unwrap();
    workload_identity(
        dir.path(),
        &root,
        "spiffe://cluster.local/ns/edge/sa/gateway",
        21,
    );
    write_atomic(&dir.path().join("revokes-origin.crl"), root.crl(&[20]));
    write_atomic(&dir.path().join("revokes-other.crl"), root.crl(&[99]));
    let (gw, http) = edge(
        dir.path(),
        https,
        &[
            ("chain", r#"{ mode = "ISTIO_MUTUAL" }"#),
            (
                "right",
                r#"{ mode = "ISTIO_MUTUAL", subjectAltNames = ["spiffe://cluster.local/ns/shop/sa/other", "spiffe://cluster.local/ns/shop/sa/origin"] }"#,
            ),
            (
                "wrong",
                r#"{ mode = "ISTIO_MUTUAL", subjectAltNames = ["spiffe://cluster.local/ns/shop/sa/other"] }"#,
            ),
            (
                "revoked",
                r#"{ mode = "ISTIO_MUTUAL", caCrl = "revokes-origin.crl" }"#,
            ),
            (
                "notrevoked",
                r#"{ mode = "ISTIO_MUTUAL", caCrl = "revokes-other.crl", subjectAltNames = ["spiffe://cluster.local/ns/shop/sa/origin"] }"#,
            ),
        ],
        WORKLOAD,
    );
    for host in ["chain.test", "right.test", "notrevoked.test"] {
        let resp = get(http, host);
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
        assert_eq!(resp.text(), "from origin");
    }
    assert_eq!(get(http, "wrong.test").status, 503);
    let line = refusal_line(&gw, "wrong");
    assert!(
        line.contains("flag=UF") && line.contains("certificate SAN mismatch"),
        "{line}"
    );
    assert!(
        line.contains("spiffe://cluster.local/ns/shop/sa/origin"),
        "the names the certificate has are in the reason: {line}"
    );
    assert_eq!(get(http, "revoked.test").status, 503);
    let line = refusal_line(&gw, "revoked");
    assert!(
        line.contains("flag=UF") && line.contains("Revoked"),
        "{line}"
    );
}

/// `caCrl` on SIMPLE: a CRL revoking the upstream's certificate refuses it, one that does
/// not lets it through; the CRL file is watched, so a rewritten CRL applies without a
/// restart (new connections only: the pool of the old verification is not reused), and
/// a file that is no CRL is a config error that names the field while the last good
/// config keeps serving.
#[test]
fn ca_crl_refuses_a_revoked_upstream_and_rotates_without_restart() {
    let ca = Ca::new("Origin CA");
    let origin_dir = tempfile::tempdir().unwrap();
    let (_origin, origin_port) =
        origin(origin_dir.path(), &ca.issue(&["origin.internal"], &[], 30));
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("ca.crt"), ca.cert.pem());
    write_atomic(&dir.path().join("revoked.crl"), ca.crl(&[30]));
    write_atomic(&dir.path().join("rotating.crl"), ca.crl(&[31, 32]));
    // A CRL from another CA says nothing of the upstream's certificate: refused, as
    // Envoy refuses a certificate whose issuer has no CRL once CRLs are given.
    let other = Ca::new("Other CA");
    write_atomic(&dir.path().join("other.crl"), other.crl(&[]));
    let tls = |crl: &str| {
        format!(
            r#"{{ mode = "SIMPLE", caCertificates = "ca.crt", sni = "origin.internal", caCrl = "{crl}" }}"#
        )
    };
    let (gw, http) = edge(
        dir.path(),
        origin_port,
        &[
            ("revoked", &tls("revoked.crl")),
            ("rotating", &tls("rotating.crl")),
            ("unknown", &tls("other.crl")),
        ],
        "",
    );
    let pid = gw.pid();
    let resp = get(http, "rotating.test");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(get(http, "revoked.test").status, 503);
    let line = refusal_line(&gw, "revoked");
    assert!(
        line.contains("flag=UF") && line.contains("Revoked"),
        "{line}"
    );
    assert_eq!(get(http, "unknown.test").status, 503);
    assert_eq!(
        access_line(&gw, "revoked.test")["upstream_transport_failure_reason"],
        "TLS_error: invalid peer certificate: Revoked"
    );

    // Not a CRL: the reload fails naming the field and the file; the last config serves.
    let g0 = gw.generation();
    write_atomic(&dir.path().join("rotating.crl"), "not a CRL");
    let said = wait_until(Duration::from_secs(10), || {
        gw.log().contains("tls.caCrl") && gw.log().contains("rotating.crl")
    });
    assert!(said, "the bad CRL is reported:\n{}", gw.log());
    assert_eq!(gw.generation(), g0, "the bad config is not loaded");
    assert_eq!(get(http, "rotating.test").status, 200);

    // Now it revokes the upstream's certificate: refused without a restart.
    write_atomic(&dir.path().join("rotating.crl"), ca.crl(&[30]));
    gw.wait_generation_above(g0, Duration::from_secs(10));
    let resp = get(http, "rotating.test");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(gw.pid(), pid, "same process");
}

#[test]
fn bad_upstream_crl_is_a_config_error_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    write_atomic(&dir.path().join("ca.crt"), ca.cert.pem());
    std::fs::write(dir.path().join("junk.crl"), "not a CRL").unwrap();
    let config = |crl: &str| {
        format!(
            r#"{mesh}
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
trafficPolicy = {{ tls = {{ mode = "SIMPLE", caCertificates = "ca.crt", caCrl = "{crl}" }} }}
"#,
            mesh = mesh_config(free_port()),
            port = free_port(),
        )
    };
    let path = dir.path().join("portico.toml");
    for (crl, wanted) in [("junk.crl", "junk.crl"), ("missing.crl", "missing.crl")] {
        std::fs::write(&path, config(crl)).unwrap();
        let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
        assert_ne!(code, 0, "{crl} must not validate: {out}");
        assert!(
            out.contains("trafficPolicy.tls.caCrl") && out.contains(wanted),
            "{out}"
        );
    }
    write_atomic(&dir.path().join("good.crl"), ca.crl(&[]));
    std::fs::write(&path, config("good.crl")).unwrap();
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}
