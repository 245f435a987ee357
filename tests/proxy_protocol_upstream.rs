//! PROXY protocol to upstreams (DestinationRule `trafficPolicy.proxyProtocol.version`): a
//! real upstream on loopback reads the header each connection opens with (v1 text or v2
//! binary, parsed with `ppp`), before TLS when the cluster originates it, and answers every
//! request on the connection with what the header said and the connection's number. The
//! header names the downstream connection's client (the address a listener's own PROXY
//! header gave, else the TCP peer) and where it connected to; a connection that opened
//! with one client's header never carries another client's request.

mod support;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;

/// A test upstream: per connection, the PROXY header it opened with (or "none"), then
/// HTTP/1.1 keep-alive, each response's body `<header> conn=<n>`.
struct Upstream {
    port: u16,
    /// What each connection's header said, by connection number.
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let seen2 = seen.clone();
        thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(mut sock) = sock else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let (seen, tls) = (seen2.clone(), tls.clone());
                thread::spawn(move || {
                    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let header =
                        read_proxy_header(&mut sock).unwrap_or_else(|e| format!("bad {e}"));
                    seen.lock().unwrap().push(header.clone());
                    let body = format!("{header} conn={n}");
                    match tls {
                        None => serve(sock, &body),
                        Some(config) => {
                            let conn = rustls::ServerConnection::new(config).unwrap();
                            serve(rustls::StreamOwned::new(conn, sock), &body);
                        }
                    }
                });
            }
        });
        Upstream { port, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads exactly the PROXY header at the start of `sock` (nothing after it, which may be a
/// TLS ClientHello): "V1 <src> <dst>", "V1 UNKNOWN", "V2 <src> <dst>", "V2 LOCAL", or
/// "none" when the connection starts with anything else (an HTTP request here).
fn read_proxy_header(sock: &mut TcpStream) -> Result<String, String> {
    let mut first = [0u8; 1];
    if sock.peek(&mut first).map_err(|e| e.to_string())? == 0 {
        return Err("closed".into());
    }
    match first[0] {
        b'P' => {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\r\n") && line.len() < 108 {
                sock.read_exact(&mut b).map_err(|e| e.to_string())?;
                line.push(b[0]);
            }
            let h = ppp::v1::Header::try_from(line.as_slice()).map_err(|e| e.to_string())?;
            Ok(match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => format!(
                    "V1 {} {}",
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port))
                ),
                ppp::v1::Addresses::Tcp6(a) => format!(
                    "V1 {} {}",
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port))
                ),
                ppp::v1::Addresses::Unknown => "V1 UNKNOWN".into(),
            })
        }
        b'\r' => {
            let mut h = vec![0u8; 16];
            sock.read_exact(&mut h).map_err(|e| e.to_string())?;
            let len = u16::from_be_bytes([h[14], h[15]]) as usize;
            h.resize(16 + len, 0);
            sock.read_exact(&mut h[16..]).map_err(|e| e.to_string())?;
            let p = ppp::v2::Header::try_from(h.as_slice()).map_err(|e| e.to_string())?;
            Ok(match (p.command, p.addresses) {
                (ppp::v2::Command::Local, _) => "V2 LOCAL".into(),
                (_, ppp::v2::Addresses::IPv4(a)) => format!(
                    "V2 {} {}",
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port))
                ),
                (_, ppp::v2::Addresses::IPv6(a)) => format!(
                    "V2 {} {}",
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port))
                ),
                (_, other) => format!("V2 {other:?}"),
            })
        }
        _ => Ok("none".into()),
    }
}

/// HTTP/1.1 keep-alive: every request (no bodies here) gets 200 with `body`.
fn serve<S: Read + Write>(s: S, body: &str) {
    let mut r = BufReader::new(s);
    while let Ok(Some(_)) = read_head(&mut r) {
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).is_err() || r.get_mut().flush().is_err() {
            return;
        }
    }
}

/// A TLS server config for `up.internal` (the certificate written to `<dir>/up.crt`).
fn tls_config(dir: &Path) -> Arc<rustls::ServerConfig> {
    let c = rcgen::generate_simple_self_signed(vec!["up.internal".to_string()]).unwrap();
    write_atomic(&dir.join("up.crt"), c.cert.pem());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(c.cert.der().to_vec())], key)
        .unwrap();
    Arc::new(config)
}

struct Gw {
    _portico: Portico,
    up: Upstream,
    tls_up: Upstream,
    http: u16,
    tcp: u16,
}

/// Portico with an HTTP and a TCP listener (both expecting a PROXY header from
/// 127.0.0.1 when `listener_pp`), and these routes:
/// - `/` → up.internal: proxyProtocol V1 (DestinationRule level)
/// - `/two` → its subset `two`: V2 (the subset's own trafficPolicy)
/// - `/none` → none.internal: the same endpoint, no DestinationRule (no header)
/// - `/tls` → tls.internal: V2, then TLS (SIMPLE) to the upstream
/// - the TCP listener → up.internal subset `two` (V2)
fn start(dir: &Path, listener_pp: bool) -> Gw {
    let up = Upstream::start(None);
    let tls_up = Upstream::start(Some(tls_config(dir)));
    let (http, tcp) = (free_port(), free_port());
    let pp = if listener_pp {
        format!(
            "[mesh.defaultConfig.gatewayTopology.proxyProtocol]\ntrustedCidrs = [\"127.0.0.1\"]\nports = [{http}, {tcp}]\n"
        )
    } else {
        String::new()
    };
    let config = format!(
        r#"{mesh}{pp}
[[gateways]]
name = "gw"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = {{ number = {tcp}, name = "tcp", protocol = "TCP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "vs"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
match = [{{ uri = {{ prefix = "/two" }} }}]
route = [{{ destination = {{ host = "up.internal", subset = "two", port = {{ number = 80 }} }} }}]
[[virtualServices.http]]
match = [{{ uri = {{ prefix = "/none" }} }}]
route = [{{ destination = {{ host = "none.internal", port = {{ number = 80 }} }} }}]
[[virtualServices.http]]
match = [{{ uri = {{ prefix = "/tls" }} }}]
route = [{{ destination = {{ host = "tls.internal", port = {{ number = 443 }} }} }}]
[[virtualServices.http]]
route = [{{ destination = {{ host = "up.internal", port = {{ number = 80 }} }} }}]
[[virtualServices.tcp]]
match = [{{ port = {tcp} }}]
route = [{{ destination = {{ host = "up.internal", subset = "two", port = {{ number = 80 }} }} }}]

[[destinationRules]]
name = "up"
host = "up.internal"
trafficPolicy = {{ proxyProtocol = {{ version = "V1" }} }}
subsets = [{{ name = "two", trafficPolicy = {{ proxyProtocol = {{ version = "V2" }} }} }}]

[[destinationRules]]
name = "tls"
host = "tls.internal"
[destinationRules.trafficPolicy]
proxyProtocol = {{ version = "V2" }}
tls = {{ mode = "SIMPLE", caCertificates = "up.crt", sni = "up.internal" }}

[[serviceEntries]]
name = "up"
hosts = ["up.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ http = {up} }} }}]

[[serviceEntries]]
name = "none"
hosts = ["none.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ http = {up} }} }}]

[[serviceEntries]]
name = "tls"
hosts = ["tls.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 443, name = "https", protocol = "HTTPS" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ https = {tls_up} }} }}]
"#,
        mesh = mesh_config(free_port()),
        up = up.port,
        tls_up = tls_up.port,
    );
    let portico = Portico::start(dir, &config);
    Gw {
        _portico: portico,
        up,
        tls_up,
        http,
        tcp,
    }
}

/// A keep-alive client connection to the gateway; `first` is written before anything
/// else (a PROXY header of its own).
struct Client {
    r: BufReader<TcpStream>,
    port: u16,
}

impl Client {
    fn connect(port: u16, first: &[u8]) -> Client {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        s.write_all(first).unwrap();
        let port = s.local_addr().unwrap().port();
        Client {
            r: BufReader::new(s),
            port,
        }
    }

    /// GET `path`: the upstream's body.
    fn get(&mut self, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nhost: shop.test\r\n\r\n");
        self.r.get_mut().write_all(req.as_bytes()).unwrap();
        let resp = read_response(&mut self.r, "GET").unwrap();
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        resp.text()
    }
}

/// The header part and the connection number of an upstream body.
fn split(body: &str) -> (&str, usize) {
    let (h, n) = body.rsplit_once(" conn=").expect(body);
    (h, n.parse().unwrap())
}

#[test]
fn each_client_is_named_and_never_shares_an_upstream_connection() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), false);
    let mut a = Client::connect(gw.http, b"");
    let mut b = Client::connect(gw.http, b"");
    let v1 = |c: &Client| format!("V1 127.0.0.1:{} 127.0.0.1:{}", c.port, gw.http);
    let (mut conns_a, mut conns_b) = (Vec::new(), Vec::new());
    // Interleaved on two kept-alive client connections: a pool keyed by endpoint alone
    // would hand one client's idle upstream connection to the other.
    for round in 0..6 {
        for (c, conns) in [(&mut a, &mut conns_a), (&mut b, &mut conns_b)] {
            let body = c.get("/");
            let (h, n) = split(&body);
            assert_eq!(h, v1(c), "round {round}: {body}");
            conns.push(n);
        }
    }
    assert!(
        conns_a.iter().all(|n| !conns_b.contains(n)),
        "no upstream connection carried both clients: {conns_a:?} {conns_b:?}"
    );
    // Per connection, one header, each naming one of the two clients.
    let seen = gw.up.seen();
    for n in conns_a.iter().chain(&conns_b) {
        assert!(seen[*n] == v1(&a) || seen[*n] == v1(&b), "{seen:?}");
    }

    // The subset's own setting (V2), and no header at all for a cluster without one, on
    // the same endpoint: none of those connections is the other's.
    let body = a.get("/two");
    assert_eq!(
        split(&body).0,
        format!("V2 127.0.0.1:{} 127.0.0.1:{}", a.port, gw.http)
    );
    let body = a.get("/none");
    let (h, n) = split(&body);
    assert_eq!(h, "none");
    assert!(!conns_a.contains(&n) && !conns_b.contains(&n));
    let body = b.get("/none");
    assert_eq!(
        split(&body).0,
        "none",
        "a header-less connection serves any client"
    );

    // Another client connection later: its own address, never an earlier connection.
    let mut c = Client::connect(gw.http, b"");
    let body = c.get("/");
    let (h, n) = split(&body);
    assert_eq!(h, v1(&c));
    assert!(!conns_a.contains(&n) && !conns_b.contains(&n), "{body}");
}

#[test]
fn v2_goes_before_the_tls_client_hello() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), false);
    let mut a = Client::connect(gw.http, b"");
    let mut b = Client::connect(gw.http, b"");
    for _ in 0..3 {
        for c in [&mut a, &mut b] {
            let body = c.get("/tls");
            assert_eq!(
                split(&body).0,
                format!("V2 127.0.0.1:{} 127.0.0.1:{}", c.port, gw.http),
                "the upstream read the header, then completed TLS: {body}"
            );
        }
    }
    assert!(gw
        .tls_up
        .seen()
        .iter()
        .all(|h| h.starts_with("V2 127.0.0.1:")));
}

#[test]
fn an_l4_route_sends_it_before_the_clients_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), false);
    for _ in 0..2 {
        let mut c = Client::connect(gw.tcp, b"");
        let body = c.get("/");
        assert_eq!(
            split(&body).0,
            format!("V2 127.0.0.1:{} 127.0.0.1:{}", c.port, gw.tcp)
        );
    }
}

#[test]
fn the_address_a_listener_header_gave_is_the_one_sent_on() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), true);
    let mut c = Client::connect(gw.http, b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 8443\r\n");
    assert_eq!(split(&c.get("/")).0, "V1 203.0.113.9:5555 192.0.2.1:8443");
    assert_eq!(
        split(&c.get("/two")).0,
        "V2 203.0.113.9:5555 192.0.2.1:8443"
    );
    assert_eq!(
        split(&c.get("/tls")).0,
        "V2 203.0.113.9:5555 192.0.2.1:8443"
    );
    // IPv6 in the client's header, and another client claiming another address.
    let mut d = Client::connect(gw.http, b"PROXY TCP6 2001:db8::9 2001:db8::1 6000 443\r\n");
    assert_eq!(
        split(&d.get("/")).0,
        "V1 [2001:db8::9]:6000 [2001:db8::1]:443"
    );
    assert_eq!(split(&c.get("/")).0, "V1 203.0.113.9:5555 192.0.2.1:8443");
    // The L4 route.
    let mut t = Client::connect(gw.tcp, b"PROXY TCP4 198.51.100.7 192.0.2.1 7777 9000\r\n");
    assert_eq!(split(&t.get("/")).0, "V2 198.51.100.7:7777 192.0.2.1:9000");
}

#[test]
fn istio_yaml_sets_it_and_an_unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(None);
    let http = free_port();
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  servers:
  - port:
      number: {http}
      name: http
      protocol: HTTP
    bind: 127.0.0.1
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: vs
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: up.internal
        port:
          number: 80
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: up
spec:
  hosts: ["up.internal"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  endpoints:
  - address: 127.0.0.1
    ports:
      http: {port}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: up
spec:
  host: up.internal
  trafficPolicy:
    proxyProtocol:
      version: V2
"#,
        port = up.port
    );
    write_atomic(&dir.path().join("manifests/up.yaml"), &yaml);
    let config = format!("include = [\"manifests\"]\n{}", mesh_config(free_port()));
    let _p = Portico::start(dir.path(), &config);
    let mut c = Client::connect(http, b"");
    assert_eq!(
        split(&c.get("/")).0,
        format!("V2 127.0.0.1:{} 127.0.0.1:{http}", c.port)
    );

    // TOML, a version that is neither: the field is named.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let text = format!(
        r#"{mesh}
[[destinationRules]]
name = "up"
host = "up.internal"
subsets = [{{ name = "s", trafficPolicy = {{ proxyProtocol = {{ version = "V3" }} }} }}]
"#,
        mesh = mesh_config(free_port())
    );
    let path = bad.join("portico.toml");
    write_atomic(&path, &text);
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("subsets[0].trafficPolicy.proxyProtocol.version") && out.contains("V3"),
        "{out}"
    );
}
