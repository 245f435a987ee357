//! TLS 1.3 session resumption with stateless tickets: a rustls client that keeps its
//! tickets resumes (no certificate, no signature) on an HTTPS port and on the HTTPS side of
//! a passthrough port, also after more handshakes than rustls' in-memory session cache (256
//! entries) could remember; a ticket is only good for the name it was issued for.

mod support;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, StreamOwned};
use support::*;

const A: &str = "a.example.com";
const B: &str = "b.example.com";

const TEMPLATE: &str = r#"
@MESH@
[[gateways]]
name = "edge"

[[gateways.servers]]
port = { number = @HTTPS@, name = "https-a", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["a.example.com"]
tls = { mode = "SIMPLE", serverCertificate = "a.crt", privateKey = "a.key" }

[[gateways.servers]]
port = { number = @HTTPS@, name = "https-b", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["b.example.com"]
tls = { mode = "SIMPLE", serverCertificate = "b.crt", privateKey = "b.key" }

[[virtualServices]]
name = "sites"
hosts = ["a.example.com", "b.example.com"]
gateways = ["edge"]
[[virtualServices.http]]
name = "hello"
directResponse = { status = 200, body = { string = "hello" } }
"#;

/// A client config; with `resume`, it keeps the tickets it receives (rustls' in-memory
/// store), so its next connection to the same name offers one.
fn client(resume: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(accept_any_cert(provider))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = if resume {
        Resumption::in_memory_sessions(16)
    } else {
        Resumption::disabled()
    };
    Arc::new(config)
}

/// Connects, sends one request and reads the answer (which is when the client takes in the
/// tickets the server sent after the handshake). Returns how the handshake went and the
/// response body.
fn get(config: &Arc<ClientConfig>, port: u16, sni: &str) -> (HandshakeKind, String) {
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let conn = ClientConnection::new(config.clone(), name).expect("client connection");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    sock.set_nodelay(true).ok();
    let mut tls = StreamOwned::new(conn, sock);
    let req = build_request("GET", sni, "/", &[], b"", false);
    tls.write_all(&req)
        .unwrap_or_else(|e| panic!("request to {sni}: {e}"));
    tls.flush().ok();
    let mut reader = BufReader::new(tls);
    let resp =
        read_response(&mut reader, "GET").unwrap_or_else(|e| panic!("response from {sni}: {e}"));
    assert_eq!(resp.status, 200, "GET https://{sni}/");
    let kind = reader
        .get_ref()
        .conn
        .handshake_kind()
        .expect("handshake finished");
    (kind, resp.text())
}

struct Setup {
    portico: Portico,
    https: u16,
    _tmp: tempfile::TempDir,
}

fn start(template: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    write_cert(dir, "a", &[A]);
    write_cert(dir, "b", &[B]);
    let https = free_port();
    let config = render(
        template,
        &[
            ("MESH", mesh_config(free_port())),
            ("HTTPS", https.to_string()),
        ],
    );
    let portico = Portico::start(dir, &config);
    Setup {
        portico,
        https,
        _tmp: tmp,
    }
}

#[test]
fn a_client_with_a_ticket_resumes() {
    let s = start(TEMPLATE);
    let c = client(true);
    let (first, body) = get(&c, s.https, A);
    assert_eq!(first, HandshakeKind::Full);
    assert_eq!(body, "hello");
    for i in 0..3 {
        let (kind, body) = get(&c, s.https, A);
        assert_eq!(
            kind,
            HandshakeKind::Resumed,
            "connection {} with a ticket was not resumed\nlog:\n{}",
            i + 2,
            s.portico.log()
        );
        assert_eq!(body, "hello");
    }
}

/// The tickets are sealed with a key, not kept in a server-side cache: rustls' default
/// cache holds 256 sessions (2 per handshake), so after 300 other handshakes it would have
/// forgotten the first client's ticket.
#[test]
fn tickets_outlive_many_other_handshakes() {
    let s = start(TEMPLATE);
    let kept = client(true);
    assert_eq!(get(&kept, s.https, A).0, HandshakeKind::Full);
    let started = Instant::now();
    for _ in 0..300 {
        let other = client(false);
        assert_eq!(get(&other, s.https, A).0, HandshakeKind::Full);
    }
    let (kind, _) = get(&kept, s.https, A);
    assert_eq!(
        kind,
        HandshakeKind::Resumed,
        "the ticket was not accepted after 300 other handshakes ({:?})",
        started.elapsed()
    );
}

/// RFC 6066: a session is resumed only for the name it was made for.
#[test]
fn a_ticket_is_only_good_for_its_own_name() {
    let s = start(TEMPLATE);
    let c = client(true);
    assert_eq!(get(&c, s.https, A).0, HandshakeKind::Full);
    assert_eq!(get(&c, s.https, A).0, HandshakeKind::Resumed);
    // rustls' client store is per name, so give the server A's ticket under name B by
    // hand: a client config whose store answers every name with the ticket it got for A.
    let shared = Arc::new(OneTicket::default());
    let mut cross = ClientConfig::clone(&c);
    cross.resumption = Resumption::store(shared.clone());
    let cross = Arc::new(cross);
    assert_eq!(get(&cross, s.https, A).0, HandshakeKind::Full);
    assert!(shared.has_ticket(), "no ticket was issued");
    let (kind, body) = get(&cross, s.https, B);
    assert_eq!(
        kind,
        HandshakeKind::Full,
        "a ticket issued for {A} resumed a session for {B}"
    );
    assert_eq!(body, "hello");
}

/// A client session store that hands out the last TLS 1.3 ticket it received for any name.
#[derive(Debug, Default)]
struct OneTicket {
    ticket: std::sync::Mutex<Option<rustls::client::Tls13ClientSessionValue>>,
}

impl OneTicket {
    fn has_ticket(&self) -> bool {
        self.ticket.lock().unwrap().is_some()
    }
}

impl rustls::client::ClientSessionStore for OneTicket {
    fn set_kx_hint(&self, _: ServerName<'static>, _: rustls::NamedGroup) {}

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }

    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        _: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        *self.ticket.lock().unwrap() = Some(value);
    }

    fn take_tls13_ticket(
        &self,
        _: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.ticket.lock().unwrap().take()
    }
}

const PASSTHROUGH: &str = r#"
@MESH@
[[gateways]]
name = "edge"

[[gateways.servers]]
port = { number = @HTTPS@, name = "tls", protocol = "TLS" }
bind = "127.0.0.1"
hosts = ["pass.example.com"]
tls = { mode = "PASSTHROUGH" }

[[gateways.servers]]
port = { number = @HTTPS@, name = "https-a", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["a.example.com"]
tls = { mode = "SIMPLE", serverCertificate = "a.crt", privateKey = "a.key" }

[[virtualServices]]
name = "pass"
hosts = ["pass.example.com"]
gateways = ["edge"]
[[virtualServices.tls]]
match = [{ sniHosts = ["pass.example.com"] }]
route = [{ destination = { host = "pass.example.com", port = { number = 443 } } }]

[[virtualServices]]
name = "sites"
hosts = ["a.example.com"]
gateways = ["edge"]
[[virtualServices.http]]
name = "hello"
directResponse = { status = 200, body = { string = "hello" } }

[[serviceEntries]]
name = "pass"
hosts = ["pass.example.com"]
location = "MESH_EXTERNAL"
resolution = "STATIC"
ports = [{ number = 443, name = "tls", protocol = "TLS" }]
endpoints = [{ address = "127.0.0.1", ports = { tls = 9 } }]
"#;

/// The HTTPS side of a port shared with passthrough routes uses the same TLS config.
#[test]
fn the_https_side_of_a_passthrough_port_resumes_too() {
    let s = start(PASSTHROUGH);
    let c = client(true);
    assert_eq!(get(&c, s.https, A).0, HandshakeKind::Full);
    let (kind, body) = get(&c, s.https, A);
    assert_eq!(
        kind,
        HandshakeKind::Resumed,
        "not resumed on the passthrough port\nlog:\n{}",
        s.portico.log()
    );
    assert_eq!(body, "hello");
}
