//! Several certificates on one HTTPS port, chosen by SNI; default certificate; unknown names;
//! ALPN; certificate rotation without restart.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const A: &str = "a.example.com";
const B: &str = "b.example.com";
const WILD: &str = "*.wild.example.org";

const TEMPLATE: &str = r#"
@MESH@
[[gateways]]
name = "edge"

[[gateways.servers]]
port = { number = @HTTPS@, name = "https-a", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["a.example.com"]
tls = { mode = "SIMPLE", serverCertificate = "a.crt", privateKey = "a.key"@DEFAULT@ }

[[gateways.servers]]
port = { number = @HTTPS@, name = "https-b", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["b.example.com"]
tls = { mode = "SIMPLE", credentialName = "b-cred" }

[[gateways.servers]]
port = { number = @HTTPS@, name = "https-wild", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["*.wild.example.org"]
tls = { mode = "SIMPLE", serverCertificate = "tls/wild.crt", privateKey = "tls/wild.key" }

[[virtualServices]]
name = "site-a"
hosts = ["a.example.com"]
gateways = ["edge"]
[[virtualServices.http]]
name = "hello-a"
directResponse = { status = 200, body = { string = "hello from a.example.com" } }

[[virtualServices]]
name = "site-b"
hosts = ["b.example.com"]
gateways = ["edge"]
[[virtualServices.http]]
name = "hello-b"
directResponse = { status = 200, body = { string = "hello from b.example.com" } }

[[virtualServices]]
name = "site-wild"
hosts = ["*.wild.example.org"]
gateways = ["edge"]
[[virtualServices.http]]
name = "hello-wild"
directResponse = { status = 200, body = { string = "hello from wild.example.org" } }
"#;

struct Setup {
    portico: Portico,
    https: u16,
    der_a: Vec<u8>,
    der_b: Vec<u8>,
    der_wild: Vec<u8>,
    // Dropped last: the gateway is killed before its directory goes away.
    _tmp: tempfile::TempDir,
}

impl Setup {
    /// Which of the generated certificates `der` is, for readable assertion messages.
    fn cert_name(&self, der: &[u8]) -> &'static str {
        if der == self.der_a.as_slice() {
            "a"
        } else if der == self.der_b.as_slice() {
            "b"
        } else if der == self.der_wild.as_slice() {
            "wild"
        } else {
            "unknown certificate"
        }
    }

    fn handshake(&self, sni: Option<&str>) -> TlsConn {
        tls_connect(self.https, sni).unwrap_or_else(|e| {
            panic!(
                "handshake with SNI {sni:?} failed: {e}\nlog:\n{}",
                self.portico.log()
            )
        })
    }
}

fn start(with_default: bool) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let der_a = write_cert(dir, "a", &[A]);
    // credentialName = "b-cred" reads certs/b-cred/tls.crt (credentialsDir defaults to
    // `certs` beside the config file).
    let der_b = write_credential(&dir.join("certs"), "b-cred", &[B]);
    let der_wild = write_cert(&dir.join("tls"), "wild", &[WILD]);
    let admin = free_port();
    let https = free_port();
    let config = render(
        TEMPLATE,
        &[
            ("MESH", mesh_config(admin)),
            ("HTTPS", https.to_string()),
            (
                "DEFAULT",
                if with_default {
                    ", defaultCertificate = true".to_string()
                } else {
                    String::new()
                },
            ),
        ],
    );
    let portico = Portico::start(dir, &config);
    Setup {
        portico,
        https,
        der_a,
        der_b,
        der_wild,
        _tmp: tmp,
    }
}

#[test]
fn each_sni_name_gets_its_own_certificate() {
    let s = start(true);
    let cases: [(Option<&str>, &str); 6] = [
        (Some("a.example.com"), "a"),
        (Some("b.example.com"), "b"),
        (Some("x.wild.example.org"), "wild"),
        (Some("deep.x.wild.example.org"), "wild"),
        // No SNI, and a name no server claims: the certificate marked defaultCertificate.
        (None, "a"),
        (Some("nobody.example.net"), "a"),
    ];
    for (sni, expected) in cases {
        let conn = s.handshake(sni);
        assert_eq!(
            s.cert_name(&conn.peer_cert),
            expected,
            "certificate served for SNI {sni:?}"
        );
    }
    // SNI is case-insensitive.
    let conn = s.handshake(Some("B.Example.COM"));
    assert_eq!(
        s.cert_name(&conn.peer_cert),
        "b",
        "certificate served for SNI B.Example.COM"
    );
}

#[test]
fn https_requests_are_routed_by_host() {
    let s = start(true);
    let port = s.https;
    let cases = [
        (
            "a.example.com",
            "a.example.com".to_string(),
            "hello from a.example.com",
        ),
        (
            "b.example.com",
            "b.example.com".to_string(),
            "hello from b.example.com",
        ),
        (
            "b.example.com",
            format!("b.example.com:{port}"),
            "hello from b.example.com",
        ),
        (
            "x.wild.example.org",
            "x.wild.example.org".to_string(),
            "hello from wild.example.org",
        ),
        (
            "deep.x.wild.example.org",
            "deep.x.wild.example.org".to_string(),
            "hello from wild.example.org",
        ),
    ];
    for (sni, host, body) in cases {
        let mut conn = s.handshake(Some(sni));
        assert_eq!(
            conn.alpn.as_deref(),
            Some("http/1.1"),
            "ALPN when only http/1.1 is offered"
        );
        let resp = conn
            .get(&host, "/")
            .unwrap_or_else(|e| panic!("GET https://{host}/: {e}\nlog:\n{}", s.portico.log()));
        assert_eq!(
            resp.status,
            200,
            "GET https://{host}/ (SNI {sni}): {}",
            resp.text()
        );
        assert_eq!(resp.text(), body, "GET https://{host}/ (SNI {sni})");
        // The connection stays usable for a second request.
        let again = conn
            .get(&host, "/again")
            .expect("second request on the same TLS connection");
        assert_eq!(again.text(), body);
    }
    // A host nothing routes on this port → 404, over a connection that got the default cert.
    let mut conn = s.handshake(None);
    let resp = conn
        .get("nobody.example.net", "/")
        .expect("request for an unknown host");
    assert_eq!(resp.status, 404, "unknown host over TLS: {}", resp.text());
}

#[test]
fn unknown_sni_without_default_fails_the_handshake() {
    let s = start(false);
    // Known names still work.
    let conn = s.handshake(Some(A));
    assert_eq!(s.cert_name(&conn.peer_cert), "a");
    let conn = s.handshake(Some("x.wild.example.org"));
    assert_eq!(s.cert_name(&conn.peer_cert), "wild");
    // `*.wild.example.org` does not cover `wild.example.org` itself.
    for name in ["nobody.example.net", "wild.example.org", "example.com"] {
        match tls_connect(s.https, Some(name)) {
            Err(_) => {}
            Ok(conn) => panic!(
                "handshake with unknown SNI {name:?} succeeded (served {}) although no default certificate is configured",
                s.cert_name(&conn.peer_cert)
            ),
        }
    }
    // The listener is still healthy afterwards.
    let conn = s.handshake(Some(B));
    assert_eq!(s.cert_name(&conn.peer_cert), "b");
}

fn curl_has_http2() -> bool {
    Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("HTTP2"))
        .unwrap_or(false)
}

#[test]
fn alpn_offers_h2_and_http11() {
    let s = start(true);
    let conn = tls_connect_alpn(s.https, Some(A), &["h2", "http/1.1"]).expect("handshake");
    assert_eq!(
        conn.alpn.as_deref(),
        Some("h2"),
        "h2 preferred when offered"
    );
    let conn = tls_connect_alpn(s.https, Some(A), &["http/1.1"]).expect("handshake");
    assert_eq!(conn.alpn.as_deref(), Some("http/1.1"));

    assert!(
        curl_has_http2(),
        "curl with HTTP2 in `curl --version` is installed (Debian package curl; .ci/run installs it)"
    );
    let port = s.https;
    let out = Command::new("curl")
        .args(["-sk", "--http2", "--noproxy", "*", "--max-time", "10"])
        .arg("--resolve")
        .arg(format!("a.example.com:{port}:127.0.0.1"))
        .arg(format!("https://a.example.com:{port}/h2-check"))
        .args(["-o", "-", "-w", "\n%{http_version} %{http_code}"])
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines: Vec<&str> = stdout.lines().collect();
    let summary = lines.pop().unwrap_or("");
    assert_eq!(
        summary,
        "2 200",
        "curl --http2: expected HTTP/2 and 200; stdout {stdout:?} stderr {:?}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.portico.log()
    );
    assert_eq!(lines.join("\n"), "hello from a.example.com", "body over h2");
}

/// Poll fresh handshakes with `sni` for up to 10 s until `new` is served. Every handshake in
/// between must succeed and serve either `old` or `new` (a half-written pair never shows).
fn wait_for_cert(s: &Setup, sni: &str, old: &[u8], new: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut handshakes = 0;
    loop {
        let conn = s.handshake(Some(sni));
        handshakes += 1;
        if conn.peer_cert == new {
            return;
        }
        assert!(
            conn.peer_cert == old,
            "SNI {sni}: served a certificate that is neither the old nor the new one"
        );
        if Instant::now() >= deadline {
            panic!(
                "SNI {sni}: rotated certificate not served within 10 s ({handshakes} handshakes); /config: {}\nlog:\n{}",
                s.portico.config_json(),
                s.portico.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn rotate_credential(creds_dir: &Path, credential: &str, cert: &TestCert) {
    let dir = creds_dir.join(credential);
    write_atomic(&dir.join("tls.key"), &cert.key_pem);
    write_atomic(&dir.join("tls.crt"), &cert.cert_pem);
}

#[test]
fn rotated_certificate_is_served_on_next_handshake() {
    let s = start(true);
    let dir = s.portico.dir.clone();
    assert_eq!(s.cert_name(&s.handshake(Some(A)).peer_cert), "a");
    assert_eq!(s.cert_name(&s.handshake(Some(B)).peer_cert), "b");

    // A certificate given by file paths, replaced in place.
    let new_a = gen_cert(&[A]);
    write_cert_files(&dir, "a", &new_a);
    wait_for_cert(&s, A, &s.der_a, &new_a.der);

    // A credentialName certificate (certs/b-cred/tls.crt), replaced in place, one file at a
    // time: with only the new key in place the pair does not match, so that reload is
    // rejected and the old certificate keeps serving; once the new certificate lands too,
    // it is served.
    let new_b = gen_cert(&[B]);
    let failures_before = s.portico.config_json()["reloads"]["failure"]
        .as_u64()
        .unwrap_or(0);
    write_atomic(&dir.join("certs/b-cred/tls.key"), &new_b.key_pem);
    let rejected = wait_until(Duration::from_secs(10), || {
        s.portico.config_json()["reloads"]["failure"]
            .as_u64()
            .unwrap_or(0)
            > failures_before
    });
    assert!(
        rejected,
        "a key that does not match its certificate must be rejected: {}",
        s.portico.config_json()
    );
    let last_error = s.portico.config_json()["lastReloadError"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        last_error.contains("b-cred"),
        "lastReloadError names the credential files: {last_error}"
    );
    assert_eq!(
        s.cert_name(&s.handshake(Some(B)).peer_cert),
        "b",
        "old pair keeps serving"
    );
    write_atomic(&dir.join("certs/b-cred/tls.crt"), &new_b.cert_pem);
    wait_for_cert(&s, B, &s.der_b, &new_b.der);

    // And the whole credential replaced again, both files back to back.
    let newer_b = gen_cert(&[B]);
    rotate_credential(&dir.join("certs"), "b-cred", &newer_b);
    wait_for_cert(&s, B, &new_b.der, &newer_b.der);

    // The new certificates stay; untouched ones are unchanged; requests still route.
    let mut conn = s.handshake(Some(A));
    assert!(
        conn.peer_cert == new_a.der,
        "rotated certificate for a is kept"
    );
    let resp = conn.get(A, "/").expect("request after rotation");
    assert_eq!(resp.text(), "hello from a.example.com");
    assert_eq!(
        s.cert_name(&s.handshake(Some("x.wild.example.org")).peer_cert),
        "wild"
    );
    assert!(
        s.handshake(None).peer_cert == new_a.der,
        "default certificate follows the rotation"
    );
}

/// A TLS handshake that does not finish within `mesh.tlsHandshakeTimeout` is closed: a
/// client that sends nothing, and one that stops half-way through its ClientHello. A
/// connection whose handshake finished is not bound by it.
#[test]
fn a_handshake_that_does_not_finish_in_time_is_closed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cert(tmp.path(), "a", &[A]);
    let https = free_port();
    let config = format!(
        r#"{mesh}tlsHandshakeTimeout = "1s"

[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["{A}"]
tls = {{ mode = "SIMPLE", serverCertificate = "a.crt", privateKey = "a.key" }}

[[virtualServices]]
name = "site-a"
hosts = ["{A}"]
gateways = ["edge"]
[[virtualServices.http]]
directResponse = {{ status = 200, body = {{ string = "hello" }} }}
"#,
        mesh = mesh_config(free_port()),
    );
    let portico = Portico::start(tmp.path(), &config);

    // The first bytes of a TLS record that announces a 512-byte ClientHello.
    let partial: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    for (what, bytes) in [("nothing", &[][..]), ("half a ClientHello", partial)] {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", https)).unwrap();
        // Longer than the 1 s timeout, shorter than the 10 s default.
        conn.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        conn.write_all(bytes).unwrap();
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut conn, &mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: the server sent {:?}", &buf[..n]),
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{what}: the gateway closes the connection (not the client's 8 s timeout): {e}\n{}",
                portico.log()
            ),
        }
    }

    // A finished handshake: idle past the timeout, the connection still serves.
    let mut tls = tls_connect(https, Some(A)).expect("handshake");
    let done = Instant::now();
    assert!(wait_until(Duration::from_secs(5), || done.elapsed()
        > Duration::from_millis(1500)));
    let resp = tls.get(A, "/").expect("a request after the idle time");
    assert_eq!(resp.text(), "hello");
}
