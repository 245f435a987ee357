//! Mutual TLS on Gateway servers (`tls.mode = MUTUAL` / `OPTIONAL_MUTUAL`): real TLS
//! clients (rustls here, curl for h2) with certificates issued by CAs made in the test,
//! doing real handshakes with SNI against the real gateway; the upstream is an echo that
//! shows what `x-forwarded-client-cert` it received.

mod support;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use support::*;

/// A CA made for the test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    name: String,
}

/// A client certificate and its key.
struct Leaf {
    der: Vec<u8>,
    key_der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
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
        Ca {
            cert,
            key,
            name: name.to_string(),
        }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A client certificate: `dns` and `uris` as SANs, valid from `from` to `to` days
    /// around now, serial `serial`.
    fn issue(&self, cn: &str, dns: &[&str], uris: &[&str], serial: u64, days: (i64, i64)) -> Leaf {
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI(rcgen::Ia5String::try_from(*u).unwrap()));
        }
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Test Org");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.serial_number = Some(SerialNumber::from(serial));
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn good(&self, cn: &str, serial: u64) -> Leaf {
        self.issue(
            cn,
            &["client.test"],
            &["spiffe://cluster.local/ns/foo/sa/bar"],
            serial,
            (-1, 30),
        )
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
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
        };
        params
            .signed_by(&self.cert, &self.key)
            .unwrap()
            .pem()
            .unwrap()
    }
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One HTTP/1.1 request over a fresh TLS connection with SNI `sni`, presenting `client`
/// (or no certificate). `Err`: the handshake was refused — in TLS 1.3 the client's side of
/// the handshake ends before the server has checked the certificate, so a refusal can also
/// show as an alert where the response should be.
fn mtls_get(
    port: u16,
    sni: &str,
    client: Option<&Leaf>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(accept_any_cert(provider));
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(leaf.der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    let mut stream = BufReader::new(StreamOwned::new(conn, sock));
    let req = build_request("GET", sni, path, headers, b"", false);
    stream
        .get_mut()
        .write_all(&req)
        .map_err(|e| format!("write: {e}"))?;
    read_response(&mut stream, "GET").map_err(|e| format!("read: {e}"))
}

fn refused(r: Result<Response, String>, what: &str) {
    match r {
        Err(e) => assert!(
            e.contains("handshake") || e.contains("alert") || e.contains("read"),
            "{what}: {e}"
        ),
        Ok(r) => panic!("{what}: not refused, got {} {}", r.status, r.text()),
    }
}

fn ok(r: Result<Response, String>, what: &str) -> Response {
    let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    r
}

/// A gateway on one HTTPS port with the given servers (TOML), every host routed to `echo`.
fn gateway(dir: &Path, port: u16, servers: &str, echo: &Echo, mesh_extra: &str) -> Portico {
    std::fs::write(dir.join("access.log"), "").unwrap();
    let config = format!(
        r#"{mesh}accessLogFile = "access.log"
{mesh_extra}
[[gateways]]
name = "edge"
{servers}

[[virtualServices]]
name = "all"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{{ destination = {{ host = "svc.internal", subset = "v1", port = {{ number = 80 }} }} }}]
{upstreams}"#,
        mesh = mesh_config(free_port()),
        servers = servers.replace("@PORT@", &port.to_string()),
        upstreams = upstreams_config(&[("v1", echo.port())]),
    );
    Portico::start(dir, &config)
}

fn server(host: &str, cert: &str, tls_extra: &str) -> String {
    format!(
        r#"
[[gateways.servers]]
port = {{ number = @PORT@, name = "https-{host}", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["{host}"]
tls = {{ serverCertificate = "{cert}.crt", privateKey = "{cert}.key", {tls_extra} }}
"#
    )
}

#[test]
fn mutual_admits_a_good_certificate_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Test CA");
    let other = Ca::new("Other CA");
    write_atomic(&dir.path().join("ca.crt"), ca.pem());
    write_atomic(&dir.path().join("ca.crl"), ca.crl(&[66]));
    write_cert(dir.path(), "m", &["m.test"]);
    let echo = Echo::start("v1");
    let port = free_port();
    let gw = gateway(
        dir.path(),
        port,
        &server(
            "m.test",
            "m",
            r#"mode = "MUTUAL", caCertificates = "ca.crt", caCrl = "ca.crl""#,
        ),
        &echo,
        "",
    );

    refused(mtls_get(port, "m.test", None, "/", &[]), "no certificate");
    let good = ca.good("alice", 1);
    // A client's own XFCC is never passed on: this hop's element replaces it.
    let r = ok(
        mtls_get(
            port,
            "m.test",
            Some(&good),
            "/",
            &[("x-forwarded-client-cert", "By=forged;Hash=00")],
        ),
        "good certificate",
    );
    let xfcc = r.echoed_header("x-forwarded-client-cert").unwrap();
    assert_eq!(
        xfcc,
        format!(
            "Hash={};Subject=\"CN=alice,O=Test Org\";URI=spiffe://cluster.local/ns/foo/sa/bar;DNS=client.test",
            sha256_hex(&good.der)
        )
    );
    refused(
        mtls_get(
            port,
            "m.test",
            Some(&ca.issue("old", &["client.test"], &[], 2, (-30, -1))),
            "/",
            &[],
        ),
        "expired",
    );
    refused(
        mtls_get(port, "m.test", Some(&other.good("mallory", 3)), "/", &[]),
        "another CA",
    );
    refused(
        mtls_get(port, "m.test", Some(&ca.good("revoked", 66)), "/", &[]),
        "revoked by the CRL",
    );
    // The access log has the client's identity.
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(dir.path().join("access.log"))
                .unwrap_or_default()
                .contains("spiffe://cluster.local/ns/foo/sa/bar")
        }),
        "access log: {}",
        std::fs::read_to_string(dir.path().join("access.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(
        line["downstream_peer_uri_san"],
        "spiffe://cluster.local/ns/foo/sa/bar"
    );
    assert_eq!(line["downstream_peer_subject"], "CN=alice,O=Test Org");
    assert_eq!(line["downstream_peer_dns_san"], "client.test");
    assert_eq!(
        line["downstream_peer_fingerprint_256"],
        sha256_hex(&good.der)
    );
    assert_eq!(line["requested_server_name"], "m.test");
    drop(gw);
}

#[test]
fn subject_alt_names_and_pins_narrow_what_the_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Test CA");
    write_atomic(&dir.path().join("ca.crt"), ca.pem());
    write_cert(dir.path(), "s", &["san.test", "pin.test"]);
    let pinned = ca.good("pinned", 10);
    let echo = Echo::start("v1");
    let port = free_port();
    let servers = server(
        "san.test",
        "s",
        r#"mode = "MUTUAL", caCertificates = "ca.crt", subjectAltNames = ["spiffe://cluster.local/ns/foo/sa/bar"]"#,
    ) + &server(
        "pin.test",
        "s",
        &format!(
            r#"mode = "MUTUAL", caCertificates = "ca.crt", verifyCertificateHash = ["{}"]"#,
            sha256_hex(&pinned.der)
        ),
    );
    let _gw = gateway(dir.path(), port, &servers, &echo, "");
    ok(
        mtls_get(port, "san.test", Some(&ca.good("a", 11)), "/", &[]),
        "SAN listed",
    );
    refused(
        mtls_get(
            port,
            "san.test",
            Some(&ca.issue(
                "b",
                &["client.test"],
                &["spiffe://cluster.local/ns/x/sa/y"],
                12,
                (-1, 30),
            )),
            "/",
            &[],
        ),
        "SAN mismatch",
    );
    ok(
        mtls_get(port, "pin.test", Some(&pinned), "/", &[]),
        "pinned certificate",
    );
    refused(
        mtls_get(port, "pin.test", Some(&ca.good("c", 13)), "/", &[]),
        "same CA, not pinned",
    );
}

#[test]
fn per_sni_servers_on_one_port_ask_for_different_cas() {
    let dir = tempfile::tempdir().unwrap();
    let ca_a = Ca::new("CA A");
    let ca_b = Ca::new("CA B");
    write_atomic(&dir.path().join("a-ca.crt"), ca_a.pem());
    write_atomic(&dir.path().join("b-ca.crt"), ca_b.pem());
    write_cert(dir.path(), "srv", &["a.test", "b.test", "c.test", "o.test"]);
    let echo = Echo::start("v1");
    let port = free_port();
    let servers = server(
        "a.test",
        "srv",
        r#"mode = "MUTUAL", caCertificates = "a-ca.crt""#,
    ) + &server(
        "b.test",
        "srv",
        r#"mode = "MUTUAL", caCertificates = "b-ca.crt""#,
    ) + &server("c.test", "srv", r#"mode = "SIMPLE""#)
        + &server(
            "o.test",
            "srv",
            r#"mode = "OPTIONAL_MUTUAL", caCertificates = "a-ca.crt""#,
        );
    let _gw = gateway(dir.path(), port, &servers, &echo, "");
    let (a, b) = (ca_a.good("a", 1), ca_b.good("b", 1));
    ok(
        mtls_get(port, "a.test", Some(&a), "/", &[]),
        "A's cert on a",
    );
    refused(
        mtls_get(port, "a.test", Some(&b), "/", &[]),
        "B's cert on a",
    );
    ok(
        mtls_get(port, "b.test", Some(&b), "/", &[]),
        "B's cert on b",
    );
    refused(
        mtls_get(port, "b.test", Some(&a), "/", &[]),
        "A's cert on b",
    );
    refused(mtls_get(port, "b.test", None, "/", &[]), "no cert on b");
    // SIMPLE asks for nothing: a client without a certificate is served, and what it
    // claims in XFCC is dropped.
    let r = ok(
        mtls_get(
            port,
            "c.test",
            None,
            "/",
            &[("x-forwarded-client-cert", "Hash=forged")],
        ),
        "SIMPLE",
    );
    assert_eq!(r.echoed_header("x-forwarded-client-cert"), None);
    // OPTIONAL_MUTUAL: without a certificate, served; with one, verified.
    let r = ok(mtls_get(port, "o.test", None, "/", &[]), "optional, none");
    assert_eq!(r.echoed_header("x-forwarded-client-cert"), None);
    let r = ok(
        mtls_get(port, "o.test", Some(&a), "/", &[]),
        "optional, good",
    );
    assert!(r
        .echoed_header("x-forwarded-client-cert")
        .is_some_and(|x| x.contains(&sha256_hex(&a.der))));
    refused(
        mtls_get(port, "o.test", Some(&b), "/", &[]),
        "optional, wrong CA",
    );
}

/// `forwardClientCertDetails`, each mode, on a connection with and without a client
/// certificate, over HTTP/1.1 (rustls) and h2 (curl).
#[test]
fn forward_client_cert_details_modes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Test CA");
    write_atomic(&dir.path().join("ca.crt"), ca.pem());
    write_cert(dir.path(), "o", &["o.test"]);
    let leaf = ca.good("alice", 7);
    write_atomic(&dir.path().join("client.crt"), &leaf.cert_pem);
    write_atomic(&dir.path().join("client.key"), &leaf.key_pem);
    let own = format!(
        "Hash={};Subject=\"CN=alice,O=Test Org\";URI=spiffe://cluster.local/ns/foo/sa/bar;DNS=client.test",
        sha256_hex(&leaf.der)
    );
    let echo = Echo::start("v1");
    let port = free_port();
    let servers = server(
        "o.test",
        "o",
        r#"mode = "OPTIONAL_MUTUAL", caCertificates = "ca.crt""#,
    );
    let topology = |mode: &str| {
        format!("[mesh.defaultConfig.gatewayTopology]\nforwardClientCertDetails = \"{mode}\"\n")
    };
    let gw = gateway(dir.path(), port, &servers, &echo, &topology("SANITIZE"));
    let sent = "By=spiffe://front;Hash=abc";
    // (mode, seen with a certificate, seen without)
    let cases: [(&str, Option<String>, Option<String>); 5] = [
        ("SANITIZE", None, None),
        ("FORWARD_ONLY", Some(sent.to_string()), None),
        ("APPEND_FORWARD", Some(format!("{sent},{own}")), None),
        ("SANITIZE_SET", Some(own.clone()), None),
        (
            "ALWAYS_FORWARD_ONLY",
            Some(sent.to_string()),
            Some(sent.to_string()),
        ),
    ];
    for (i, (mode, with, without)) in cases.iter().enumerate() {
        if i > 0 {
            let before = gw.generation();
            let config = std::fs::read_to_string(&gw.config_path).unwrap();
            let prev = cases[i - 1].0;
            gw.rewrite_config(&config.replace(&format!("\"{prev}\""), &format!("\"{mode}\"")));
            gw.wait_generation_above(before, Duration::from_secs(10));
        }
        let h = [("x-forwarded-client-cert", sent)];
        let r = ok(mtls_get(port, "o.test", Some(&leaf), "/", &h), mode);
        assert_eq!(
            r.echoed_header("x-forwarded-client-cert").as_ref(),
            with.as_ref(),
            "{mode}, h1, cert"
        );
        let r = ok(mtls_get(port, "o.test", None, "/", &h), mode);
        assert_eq!(
            r.echoed_header("x-forwarded-client-cert").as_ref(),
            without.as_ref(),
            "{mode}, h1, none"
        );
        // h2 (Portico's h2 codec with the fast path, pingora's without).
        let seen = curl_h2_xfcc(dir.path(), port, true, sent);
        assert_eq!(seen.as_ref(), with.as_ref(), "{mode}, h2, cert");
        let seen = curl_h2_xfcc(dir.path(), port, false, sent);
        assert_eq!(seen.as_ref(), without.as_ref(), "{mode}, h2, none");
    }
}

/// What XFCC the echo saw for an h2 request by curl (with `client.crt` or without).
fn curl_h2_xfcc(dir: &Path, port: u16, cert: bool, sent: &str) -> Option<String> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sk", "--http2", "--max-time", "10"])
        .args(["--resolve", &format!("o.test:{port}:127.0.0.1")])
        .args(["-H", &format!("x-forwarded-client-cert: {sent}")]);
    if cert {
        cmd.arg("--cert")
            .arg(dir.join("client.crt"))
            .arg("--key")
            .arg(dir.join("client.key"));
    }
    cmd.args([
        "-w",
        "\n%{http_version}",
        &format!("https://o.test:{port}/"),
    ]);
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, version) = text.rsplit_once('\n').expect("curl output");
    assert_eq!(version, "2", "h2 was negotiated: {text}");
    let json: serde_json::Value = serde_json::from_str(body).expect(body);
    json["headers"]["x-forwarded-client-cert"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn client_ca_and_crl_rotate_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca_a = Ca::new("CA A");
    let ca_b = Ca::new("CA B");
    write_atomic(&dir.path().join("ca.crt"), ca_a.pem());
    write_atomic(&dir.path().join("ca.crl"), ca_a.crl(&[]));
    write_cert(dir.path(), "r", &["r.test"]);
    let echo = Echo::start("v1");
    let port = free_port();
    let gw = gateway(
        dir.path(),
        port,
        &server(
            "r.test",
            "r",
            r#"mode = "MUTUAL", caCertificates = "ca.crt", caCrl = "ca.crl""#,
        ),
        &echo,
        "",
    );
    let pid = gw.pid();
    let (a, b, b2) = (ca_a.good("a", 1), ca_b.good("b", 2), ca_b.good("b2", 3));
    ok(mtls_get(port, "r.test", Some(&a), "/", &[]), "A before");
    refused(mtls_get(port, "r.test", Some(&b), "/", &[]), "B before");

    // The new CA and its CRL (revoking b2) are written; the next handshakes use them.
    let before = gw.generation();
    write_atomic(&dir.path().join("ca.crl"), ca_b.crl(&[3]));
    write_atomic(&dir.path().join("ca.crt"), ca_b.pem());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now_b = mtls_get(port, "r.test", Some(&b), "/", &[]).is_ok_and(|r| r.status == 200);
        if now_b || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gw.generation() > before, "a reload happened");
    ok(mtls_get(port, "r.test", Some(&b), "/", &[]), "B after");
    refused(mtls_get(port, "r.test", Some(&a), "/", &[]), "A after");
    refused(
        mtls_get(port, "r.test", Some(&b2), "/", &[]),
        "B2 revoked after",
    );
    assert_eq!(gw.pid(), pid, "same process");
}

#[test]
fn bad_client_tls_settings_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), "e", &["e.test"]);
    std::fs::write(dir.path().join("junk.crt"), "not a certificate").unwrap();
    let port = free_port();
    let cases = [
        (
            r#"mode = "MUTUAL""#,
            "tls.mode",
            "requires a client CA bundle",
        ),
        (
            r#"mode = "MUTUAL", caCertificates = "missing.crt""#,
            "tls.caCertificates",
            "missing.crt",
        ),
        (
            r#"mode = "MUTUAL", caCertificates = "junk.crt""#,
            "tls.caCertificates",
            "junk.crt",
        ),
        (
            r#"mode = "MUTUAL", caCertificates = "e.crt", caCrl = "junk.crt""#,
            "tls.caCrl",
            "CRL",
        ),
        (
            r#"mode = "MUTUAL", caCertificates = "e.crt", verifyCertificateHash = ["xyz"]"#,
            "tls.verifyCertificateHash[0]",
            "hex SHA-256",
        ),
        (
            r#"mode = "ISTIO_MUTUAL""#,
            "tls.mode",
            "mesh.workloadCertificates",
        ),
    ];
    for (tls, field, message) in cases {
        let config = format!(
            "{}\n[[gateways]]\nname = \"edge\"\n{}",
            mesh_config(free_port()),
            server("e.test", "e", tls).replace("@PORT@", &port.to_string())
        );
        std::fs::write(dir.path().join("portico.toml"), config).unwrap();
        let (code, out) = run_cli(&[
            "validate",
            "-c",
            dir.path().join("portico.toml").to_str().unwrap(),
        ]);
        assert_ne!(code, 0, "{tls}: {out}");
        assert!(
            out.lines()
                .any(|l| l.contains(field) && l.contains(message)),
            "{tls}: want {field} / {message}:\n{out}"
        );
    }
}

/// Istio's "Secure Gateways" task, mutual TLS (`../shared/istio-samples/26-*`): the
/// manifest as published (its port remapped, the `httpbin` Service as a ServiceEntry to a
/// loopback echo), the CA in the credential's `ca.crt`. With a client certificate,
/// `/status/418` answers 418; without one, the handshake is refused.
#[test]
fn istio_sample_26_secure_ingress_mutual() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/istio-samples/26-docs-secure-ingress-mutual.yaml");
    let text = std::fs::read_to_string(&sample).unwrap();
    let port = free_port();
    let text = text.replace("number: 443", &format!("number: {port}"));
    assert!(text.contains(&format!("number: {port}")));
    let dir = tempfile::tempdir().unwrap();
    let echo = Echo::start("httpbin");
    write_atomic(&dir.path().join("manifests/26.yaml"), text);
    write_atomic(
        &dir.path().join("manifests/httpbin.yaml"),
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
spec:
  hosts: [httpbin.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 8000, name: http, protocol: HTTP, targetPort: {}}}
  endpoints:
  - address: 127.0.0.1
"#,
            echo.port()
        ),
    );
    let ca = Ca::new("example.com");
    let creds = dir.path().join("certs/httpbin-credential");
    let server = ca.issue(
        "httpbin.example.com",
        &["httpbin.example.com"],
        &[],
        100,
        (-1, 30),
    );
    write_atomic(&creds.join("tls.crt"), &server.cert_pem);
    write_atomic(&creds.join("tls.key"), &server.key_pem);
    write_atomic(&creds.join("ca.crt"), ca.pem());
    let config = format!(
        "include = [\"manifests\"]\n{}credentialsDir = \"certs\"\n",
        mesh_config(free_port())
    );
    let _gw = Portico::start(dir.path(), &config);
    let client = ca.issue(
        "client.example.com",
        &["client.example.com"],
        &[],
        101,
        (-1, 30),
    );
    let r = mtls_get(
        port,
        "httpbin.example.com",
        Some(&client),
        "/status/418",
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 418, "{}", r.text());
    refused(
        mtls_get(port, "httpbin.example.com", None, "/status/418", &[]),
        "no client certificate",
    );
    let _ = ca.name;
}

/// AuthorizationPolicy `principals` and `source.principal` read the verified client
/// certificate's SPIFFE id (without `spiffe://`), as Istio does.
#[test]
fn authorization_policy_principals_come_from_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Test CA");
    write_atomic(&dir.path().join("ca.crt"), ca.pem());
    write_cert(dir.path(), "z", &["z.test"]);
    let echo = Echo::start("v1");
    let port = free_port();
    let policies = r#"
[[authorizationPolicies]]
name = "allow-foo"
[[authorizationPolicies.rules]]
from = [{ source = { principals = ["cluster.local/ns/foo/sa/*"] } }]
[[authorizationPolicies.rules]]
to = [{ operation = { paths = ["/public"] } }]

[[authorizationPolicies]]
name = "deny-evil"
action = "DENY"
rules = [{ when = [{ key = "source.principal", values = ["cluster.local/ns/foo/sa/evil"] }] }]
"#;
    let _gw = gateway(
        dir.path(),
        port,
        &server(
            "z.test",
            "z",
            r#"mode = "OPTIONAL_MUTUAL", caCertificates = "ca.crt""#,
        ),
        &echo,
        policies,
    );
    let with_uri = |uri: &str, serial| ca.issue("c", &["client.test"], &[uri], serial, (-1, 30));
    let bar = with_uri("spiffe://cluster.local/ns/foo/sa/bar", 1);
    let evil = with_uri("spiffe://cluster.local/ns/foo/sa/evil", 2);
    let other = with_uri("spiffe://cluster.local/ns/other/sa/bar", 3);
    ok(
        mtls_get(port, "z.test", Some(&bar), "/", &[]),
        "foo/sa/bar allowed",
    );
    for (what, client, path) in [
        ("foo/sa/evil denied", Some(&evil), "/"),
        ("another namespace matches no ALLOW rule", Some(&other), "/"),
        ("no certificate, no principal", None, "/"),
    ] {
        let r = mtls_get(port, "z.test", client, path, &[]).unwrap();
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        assert_eq!(r.text(), "RBAC: access denied", "{what}");
    }
    ok(
        mtls_get(port, "z.test", None, "/public", &[]),
        "public path, no certificate",
    );
}
