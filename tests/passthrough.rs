//! SNI passthrough: a Gateway server with `tls.mode = "PASSTHROUGH"` routes by the SNI of the
//! ClientHello through VirtualService `tls` routes and never terminates TLS. Two loopback
//! TLS upstreams hold their own certificates from a test CA; a client through Portico must
//! see each upstream's certificate byte for byte, verify it against that CA, and talk HTTP
//! to the upstream itself. Unknown names and clients without SNI are closed.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use support::*;

/// A test CA that signs leaf certificates.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Portico passthrough test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A leaf for `name` (CN and SAN): its DER and its key's PKCS#8 DER.
    fn leaf(&self, name: &str) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

/// A TLS upstream on 127.0.0.1 with its own certificate. Answers every HTTP/1.1 request
/// with `hello from NAME` (keep-alive) and remembers the SNI of each handshake.
struct TlsUpstream {
    port: u16,
    cert_der: Vec<u8>,
    snis: Arc<Mutex<Vec<Option<String>>>>,
}

impl TlsUpstream {
    fn start(ca: &TestCa, name: &str) -> TlsUpstream {
        let (cert_der, key_der) = ca.leaf(name);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![
                    CertificateDer::from(cert_der.clone()),
                    CertificateDer::from(ca.cert.der().to_vec()),
                ],
                PrivateKeyDer::Pkcs8(key_der.into()),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let snis = Arc::new(Mutex::new(Vec::new()));
        let (seen, name) = (snis.clone(), name.to_string());
        thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                let (config, seen, name) = (config.clone(), seen.clone(), name.clone());
                thread::spawn(move || serve_tls(sock, config, &seen, &name));
            }
        });
        TlsUpstream {
            port,
            cert_der,
            snis,
        }
    }

    fn snis(&self) -> Vec<Option<String>> {
        self.snis.lock().unwrap().clone()
    }
}

fn serve_tls(
    mut sock: TcpStream,
    config: Arc<ServerConfig>,
    seen: &Mutex<Vec<Option<String>>>,
    name: &str,
) {
    sock.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut conn = ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut sock).is_err() {
            return;
        }
    }
    seen.lock()
        .unwrap()
        .push(conn.server_name().map(str::to_string));
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, sock));
    loop {
        // Read one request head; the clients here send no bodies.
        let mut line = String::new();
        loop {
            line.clear();
            match tls.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        let body = format!("hello from {name}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-upstream: {name}\r\n\r\n{body}",
            body.len()
        );
        let s = tls.get_mut();
        if s.write_all(resp.as_bytes())
            .and_then(|_| s.flush())
            .is_err()
        {
            return;
        }
    }
}

/// A handshake that verifies the server against `ca` for `name`, as a real client does.
fn verified_handshake(port: u16, name: &str, ca: &TestCa) -> Result<Vec<u8>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert.der().to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let mut sock = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(conn.peer_certificates().unwrap()[0].to_vec())
}

fn service_entry(name: &str, port: u16) -> String {
    format!(
        r#"
[[serviceEntries]]
name = "{name}"
hosts = ["{name}"]
location = "MESH_EXTERNAL"
resolution = "STATIC"
ports = [{{ number = 443, name = "tls", protocol = "TLS" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ tls = {port} }} }}]
"#
    )
}

/// One PASSTHROUGH port; `a.test` → upstream a; `b.test` and `*.wild.test` → upstream b.
/// Without `with_a`, the route and the ServiceEntry for `a.test` are gone.
fn config(admin: u16, port: u16, a: &TlsUpstream, b: &TlsUpstream, with_a: bool) -> String {
    let mut text = format!(
        r#"{mesh}
[[gateways]]
name = "pt"
[[gateways.servers]]
port = {{ number = {port}, name = "tls", protocol = "TLS" }}
bind = "127.0.0.1"
hosts = ["a.test", "b.test", "*.wild.test"]
tls = {{ mode = "PASSTHROUGH" }}

[[virtualServices]]
name = "pt"
hosts = ["a.test", "b.test", "*.wild.test"]
gateways = ["pt"]
"#,
        mesh = mesh_config(admin),
    );
    if with_a {
        text.push_str(&format!(
            r#"
[[virtualServices.tls]]
match = [{{ sniHosts = ["a.test"], port = {port} }}]
route = [{{ destination = {{ host = "a.test", port = {{ number = 443 }} }} }}]
"#
        ));
    }
    text.push_str(
        r#"
[[virtualServices.tls]]
match = [{ sniHosts = ["b.test", "*.wild.test"] }]
route = [{ destination = { host = "b.test", port = { number = 443 } } }]
"#,
    );
    if with_a {
        text.push_str(&service_entry("a.test", a.port));
    }
    text.push_str(&service_entry("b.test", b.port));
    text
}

#[test]
fn each_sni_reaches_its_own_upstream_with_the_upstreams_certificate() {
    let ca = TestCa::new();
    let a = TlsUpstream::start(&ca, "a.test");
    let b = TlsUpstream::start(&ca, "b.test");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = free_port();
    let gw = Portico::start(dir.path(), &config(admin, port, &a, &b, true));

    for (sni, up, name) in [
        ("a.test", &a, "a.test"),
        ("b.test", &b, "b.test"),
        ("x.wild.test", &b, "b.test"),
    ] {
        let mut conn = tls_connect(port, Some(sni)).unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(
            conn.peer_cert, up.cert_der,
            "{sni}: the client must receive the upstream's certificate unchanged"
        );
        // Two requests on one connection: the session is the upstream's, kept open.
        for _ in 0..2 {
            let resp = conn.get(sni, "/").unwrap();
            assert_eq!(resp.status, 200);
            assert_eq!(resp.text(), format!("hello from {name}"));
        }
        assert!(
            up.snis().contains(&Some(sni.to_string())),
            "upstream saw SNIs {:?}",
            up.snis()
        );
    }
    // A real client verifying against the test CA accepts what it gets: Portico holds no
    // certificate for these names, so the chain can only have come from the upstreams.
    assert_eq!(verified_handshake(port, "a.test", &ca).unwrap(), a.cert_der);
    assert_eq!(verified_handshake(port, "b.test", &ca).unwrap(), b.cert_der);

    // curl, verifying against the test CA: the TLS session is the upstream's, end to end.
    let ca_pem = dir.path().join("test-ca.pem");
    std::fs::write(&ca_pem, ca.cert.pem()).unwrap();
    let curl = |name: &str| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca_pem)
            .arg("--resolve")
            .arg(format!("{name}:{port}:127.0.0.1"))
            .arg(format!("https://{name}:{port}/"))
            .output()
            .expect("run curl")
    };
    for name in ["a.test", "b.test"] {
        let out = curl(name);
        assert!(out.status.success(), "curl {name}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("hello from {name}")
        );
    }
    assert!(
        !curl("c.test").status.success(),
        "curl to an unknown SNI must fail"
    );

    // The access log has one line per connection, with the SNI and the cluster.
    assert!(wait_until(Duration::from_secs(5), || {
        let out = gw.stdout();
        out.contains("outbound|443||a.test") && out.contains("x.wild.test")
    }));
    // The admin API shows the SNI table.
    let listeners = gw.config_json()["listeners"].to_string();
    assert!(
        listeners.contains("\"sni\":\"a.test\"")
            && listeners.contains("outbound|443||b.test")
            && listeners.contains("TLS-PASSTHROUGH"),
        "{listeners}"
    );
    let metrics = gw.metrics();
    let opened = metric_sum(
        &metrics,
        "istio_tcp_connections_opened_total",
        "destination_service=\"a.test\"",
    );
    assert!(opened >= Some(2.0), "{opened:?}\n{metrics}");
}

#[test]
fn unknown_sni_and_no_sni_are_closed_and_logged() {
    let ca = TestCa::new();
    let a = TlsUpstream::start(&ca, "a.test");
    let b = TlsUpstream::start(&ca, "b.test");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gw = Portico::start(dir.path(), &config(free_port(), port, &a, &b, true));

    let err = tls_connect(port, Some("c.test")).err();
    assert!(err.is_some(), "an unknown SNI must not get a TLS session");
    assert!(tls_connect(port, None).is_err(), "no SNI must be closed");
    // Not TLS at all.
    let mut plain = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).ok();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    match std::io::Read::read(&mut plain, &mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "plain text on a passthrough port got a reply: {:?}",
            &buf[..n]
        ),
        // A reset is a close too; a timeout means the gateway left the connection open.
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "plain text on a passthrough port is closed: {e}"
        ),
    }

    assert!(
        wait_until(Duration::from_secs(5), || {
            let log = gw.log();
            log.contains("c.test")
                && log.contains("no tls route for this SNI")
                && log.contains("the ClientHello has no SNI")
                && log.contains("not a TLS handshake")
        }),
        "expected a log line naming each refusal:\n{}",
        gw.log()
    );
    // The upstreams never saw these connections.
    assert!(a.snis().is_empty() && b.snis().is_empty());
    let refused = metric_sum(
        &gw.metrics(),
        "istio_tcp_connections_closed_total",
        "response_flags=\"NR\"",
    );
    assert_eq!(refused, Some(3.0));
}

#[test]
fn a_reload_stops_new_connections_to_a_removed_route_and_keeps_open_ones() {
    let ca = TestCa::new();
    let a = TlsUpstream::start(&ca, "a.test");
    let b = TlsUpstream::start(&ca, "b.test");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = free_port();
    let gw = Portico::start(dir.path(), &config(admin, port, &a, &b, true));

    let mut open = tls_connect(port, Some("a.test")).unwrap();
    assert_eq!(open.get("a.test", "/").unwrap().text(), "hello from a.test");

    let generation = gw.generation();
    gw.rewrite_config(&config(admin, port, &a, &b, false));
    gw.wait_generation_above(generation, Duration::from_secs(10));

    // New connections to the removed name are closed at once...
    assert!(tls_connect(port, Some("a.test")).is_err());
    // ...the others still pass...
    assert_eq!(
        tls_connect(port, Some("b.test"))
            .unwrap()
            .get("b.test", "/")
            .unwrap()
            .text(),
        "hello from b.test"
    );
    // ...and the tunnel opened before the reload keeps running until a side closes it.
    assert_eq!(open.get("a.test", "/").unwrap().text(), "hello from a.test");
}

/// `portico validate` on `text` written to a temp dir: (exit code, output).
fn validate(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portico.toml");
    std::fs::write(&path, text).unwrap();
    run_cli(&["validate", "-c", path.to_str().unwrap()])
}

fn assert_error_at(text: &str, needle: &str, field: &str, message: &str) {
    let (code, out) = validate(text);
    assert_ne!(code, 0, "expected a failure:\n{out}");
    let line = line_of(text, needle);
    assert!(
        out.contains(&format!("portico.toml:{line}:"))
            && out.contains(field)
            && out.contains(message),
        "expected an error at line {line} naming {field:?} and {message:?}:\n{out}"
    );
}

#[test]
fn config_errors_name_the_place() {
    let base = |servers: &str, routes: &str| {
        format!(
            r#"[mesh]
admin = "127.0.0.1:15000"

[[gateways]]
name = "pt"
{servers}

[[virtualServices]]
name = "pt"
hosts = ["a.test"]
gateways = ["pt"]
{routes}
{se}"#,
            se = service_entry("a.test", 9443)
        )
    };
    let pt = r#"[[gateways.servers]]
port = { number = 9443, name = "tls", protocol = "TLS" }
hosts = ["*"]
tls = { mode = "PASSTHROUGH" }"#;
    let route = r#"[[virtualServices.tls]]
match = [{ sniHosts = ["a.test"] }]
route = [{ destination = { host = "a.test", port = { number = 443 } } }]"#;
    let (code, out) = validate(&base(pt, route));
    assert_eq!(code, 0, "{out}");

    // A name both terminated by an HTTPS server and passed through on the same port.
    let creds = tempfile::tempdir().unwrap();
    write_credential(creds.path(), "a", &["a.test"]);
    let both = format!(
        "{pt}\n[[gateways.servers]]\nport = {{ number = 9443, name = \"https\", protocol = \"HTTPS\" }}\nhosts = [\"a.test\"]\ntls = {{ mode = \"SIMPLE\", credentialName = \"a\" }}"
    )
    .replace(
        "[mesh]\n",
        &format!("[mesh]\ncredentialsDir = {:?}\n", creds.path().to_str().unwrap()),
    );
    let (code, out) = validate(&base(&both, route));
    assert_ne!(code, 0);
    assert!(
        out.contains("SNI a.test on port 9443 is terminated by an HTTPS server there")
            && out.contains(".tls[0]"),
        "{out}"
    );

    // An SNI outside the VirtualService's hosts.
    let outside = route.replace("[\"a.test\"] }]", "[\"z.test\"] }] # outside");
    assert_error_at(
        &base(pt, &outside),
        "# outside",
        ".tls[0].match[0].sniHosts[0]",
        "not within the VirtualService hosts",
    );

    // Certificates on a passthrough server would be unused.
    let with_cert = pt.replace(
        "{ mode = \"PASSTHROUGH\" }",
        "{ mode = \"PASSTHROUGH\", credentialName = \"x\" } # cert",
    );
    assert_error_at(
        &base(&with_cert, route),
        "# cert",
        ".tls",
        "credentialName would be unused",
    );

    // A destination that is not a port of its ServiceEntry.
    let bad_port = route.replace("number = 443", "number = 8443");
    let (code, out) = validate(&base(pt, &bad_port));
    assert_ne!(code, 0);
    assert!(
        out.contains(".tls[0].route[0].destination.port.number"),
        "{out}"
    );

    // Fields Portico cannot honour at a gateway are errors, not ignored.
    let subnets = route.replace(
        "sniHosts = [\"a.test\"]",
        "sniHosts = [\"a.test\"], destinationSubnets = [\"10.0.0.0/8\"]",
    );
    let (code, out) = validate(&base(pt, &subnets));
    assert_ne!(code, 0);
    assert!(out.contains("destinationSubnets"), "{out}");

    // Unknown fields in a tls route.
    let typo = route.replace("sniHosts", "sniHost");
    let (code, out) = validate(&base(pt, &typo));
    assert_ne!(code, 0);
    assert!(out.contains("sniHost"), "{out}");
}

/// One port, two kinds of server: PASSTHROUGH for `a.test`, HTTPS (Portico's own
/// certificate) for `web.test`. The SNI decides per connection.
#[test]
fn one_port_passes_some_names_through_and_terminates_others() {
    let ca = TestCa::new();
    let a = TlsUpstream::start(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let web_der = write_cert(dir.path(), "web", &["web.test"]);
    let port = free_port();
    let config = format!(
        r#"{mesh}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {port}, name = "tls", protocol = "TLS" }}
bind = "127.0.0.1"
hosts = ["a.test"]
tls = {{ mode = "PASSTHROUGH" }}
[[gateways.servers]]
port = {{ number = {port}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["web.test"]
tls = {{ mode = "SIMPLE", serverCertificate = "web.crt", privateKey = "web.key" }}

[[virtualServices]]
name = "a"
hosts = ["a.test"]
gateways = ["edge"]
[[virtualServices.tls]]
match = [{{ sniHosts = ["a.test"] }}]
route = [{{ destination = {{ host = "a.test", port = {{ number = 443 }} }} }}]

[[virtualServices]]
name = "web"
hosts = ["web.test"]
gateways = ["edge"]
[[virtualServices.http]]
directResponse = {{ status = 200, body = {{ string = "terminated by portico" }} }}
{se}"#,
        mesh = mesh_config(free_port()),
        se = service_entry("a.test", a.port),
    );
    let gw = Portico::start(dir.path(), &config);

    let mut pass = tls_connect(port, Some("a.test")).unwrap();
    assert_eq!(pass.peer_cert, a.cert_der);
    assert_eq!(pass.get("a.test", "/").unwrap().text(), "hello from a.test");

    for alpn in [&["http/1.1"][..], &["h2", "http/1.1"][..]] {
        let mut term = tls_connect_alpn(port, Some("web.test"), alpn).unwrap();
        assert_eq!(
            term.peer_cert, web_der,
            "Portico's own certificate for web.test"
        );
        if term.alpn.as_deref() == Some("h2") {
            continue; // the HTTP/1.1 client below cannot speak h2; the ALPN shows it is served
        }
        for _ in 0..2 {
            let resp = term.get("web.test", "/").unwrap();
            assert_eq!(resp.status, 200);
            assert_eq!(resp.text(), "terminated by portico");
        }
    }
    // HTTP/2 on the terminated side, through curl.
    let out = std::process::Command::new("curl")
        .args([
            "-sSk",
            "--http2",
            "--max-time",
            "10",
            "-w",
            " %{http_version}",
        ])
        .arg("--resolve")
        .arg(format!("web.test:{port}:127.0.0.1"))
        .arg(format!("https://web.test:{port}/"))
        .output()
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "terminated by portico 2",
        "{out:?}"
    );
    // Neither kind claims this name and the port has no default certificate.
    assert!(tls_connect(port, Some("other.test")).is_err());
    assert_eq!(a.snis(), vec![Some("a.test".to_string())]);
    assert!(gw.log().contains("HTTPS+TLS-PASSTHROUGH"));
}
