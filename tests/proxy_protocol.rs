//! PROXY protocol v1 and v2 on listeners (`mesh.defaultConfig.gatewayTopology.proxyProtocol`):
//! real TCP clients write real headers before HTTP, before a TLS ClientHello, and before the
//! bytes of an L4 (TCP) route. The header's source address is the client for everything
//! after: the upstream's X-Forwarded-For, the access log, AuthorizationPolicy `ipBlocks`,
//! the per-client connection cap. Only `trustedCidrs` may send one; a trusted source must
//! send one (unless allowed not to); a half-sent header is closed after the timeout; LOCAL
//! keeps the real peer.
//!
//! Clients bind to 127.0.0.1 (trusted here) or 127.0.0.2 (not trusted).

mod support;

use std::io::{BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const TRUSTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const UNTRUSTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

struct Gw {
    _portico: Portico,
    _echo: Echo,
    http: u16,
    https: u16,
    tcp: u16,
    /// Not in `ports`: no header expected.
    plain: u16,
    log: std::path::PathBuf,
}

/// A TCP upstream that echoes every byte back (so a test sees exactly what reached it).
fn tcp_echo() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match sock.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if sock.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = sock.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

fn start(dir: &Path, extra: &str) -> Gw {
    let echo = Echo::start("v1");
    let tcp_up = tcp_echo();
    let (http, https, tcp, plain) = (free_port(), free_port(), free_port(), free_port());
    write_cert(dir, "site", &["shop.test"]);
    let log = dir.join("access.log");
    let config = format!(
        r#"{mesh}accessLogFile = "{log}"
[mesh.downstream]
maxConnectionsPerClient = 2
[mesh.defaultConfig.gatewayTopology.proxyProtocol]
trustedCidrs = ["127.0.0.1"]
timeout = "1s"
ports = [{http}, {https}, {tcp}]
{extra}

[[gateways]]
name = "gw"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = {{ number = {plain}, name = "http-plain", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["*"]
tls = {{ mode = "SIMPLE", serverCertificate = "site.crt", privateKey = "site.key" }}
[[gateways.servers]]
port = {{ number = {tcp}, name = "tcp", protocol = "TCP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
{route}
[[virtualServices.tcp]]
match = [{{ port = {tcp} }}]
route = [{{ destination = {{ host = "echo.internal", port = {{ number = 9000 }} }} }}]

[[serviceEntries]]
name = "echo"
hosts = ["echo.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 9000, name = "tcp", protocol = "TCP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ tcp = {tcp_up} }} }}]

# The header's address is the peer: source.ip.
[[authorizationPolicies]]
name = "deny-net"
action = "DENY"
rules = [{{ from = [{{ source = {{ ipBlocks = ["198.51.100.0/24"] }} }}] }}]
{upstreams}"#,
        mesh = mesh_config(free_port()),
        log = log.display(),
        route = route_to("v1"),
        upstreams = upstreams_config(&[("v1", echo.port())]),
    );
    let portico = Portico::start(dir, &config);
    Gw {
        _portico: portico,
        _echo: echo,
        http,
        https,
        tcp,
        plain,
        log,
    }
}

/// A TCP connection to 127.0.0.1:`port` from `from`.
fn connect_from(from: Ipv4Addr, port: u16) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    sock.connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into(),
        Duration::from_secs(5),
    )
    .unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn v1(src: &str, sport: u16) -> Vec<u8> {
    let family = if src.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if src.contains(':') { "::1" } else { "10.0.0.1" };
    format!("PROXY {family} {src} {dst} {sport} 443\r\n").into_bytes()
}

const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: PROXY (or LOCAL) over TCP/IPv4 from `src`:`sport`, with a NOOP TLV (as
/// load balancers add TLVs of their own).
fn v2(src: Ipv4Addr, sport: u16, local: bool) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.push(if local { 0x20 } else { 0x21 });
    h.push(0x11);
    let mut payload = Vec::new();
    payload.extend_from_slice(&src.octets());
    payload.extend_from_slice(&[10, 0, 0, 1]);
    payload.extend_from_slice(&sport.to_be_bytes());
    payload.extend_from_slice(&443u16.to_be_bytes());
    payload.extend_from_slice(&[0x04, 0, 2, 0, 0]);
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&payload);
    h
}

/// Writes `header` then a GET on a new connection from `from`; the response, or `Err`
/// when the gateway closed the connection without one.
fn get_with(from: Ipv4Addr, port: u16, header: &[u8], path: &str) -> Result<Response, String> {
    let mut s = connect_from(from, port);
    s.write_all(header).map_err(|e| e.to_string())?;
    s.write_all(&build_request("GET", "shop.test", path, &[], b"", true))
        .map_err(|e| e.to_string())?;
    read_response(&mut BufReader::new(s), "GET").map_err(|e| e.to_string())
}

/// Whether the gateway closes `s` (EOF or reset) without sending a byte.
fn closed_silently(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_)) && !matches!(s.read(&mut buf), Ok(n) if n > 0)
}

/// The access log's JSON lines with `path` (waits for one).
fn log_line(log: &Path, needle: &str) -> serde_json::Value {
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        found = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(needle))
            .map(|l| serde_json::from_str(l).unwrap());
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no access log line with {needle:?}"))
}

/// A TLS client that writes `header` before its ClientHello (SNI `shop.test`).
fn tls_get_with(port: u16, header: &[u8], path: &str) -> Result<Response, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(accept_any_cert(provider))
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "shop.test".try_into().unwrap()).unwrap();
    let mut sock = connect_from(TRUSTED, port);
    sock.write_all(header).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(&build_request("GET", "shop.test", path, &[], b"", true))
        .map_err(|e| format!("TLS: {e}"))?;
    tls.flush().map_err(|e| format!("TLS: {e}"))?;
    read_response(&mut BufReader::new(tls), "GET").map_err(|e| e.to_string())
}

#[test]
fn v1_and_v2_headers_name_the_client_for_http_tls_and_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let g = start(tmp.path(), "");

    // Plain HTTP, v1: the upstream sees the header's client in X-Forwarded-For, the log too.
    let r = get_with(TRUSTED, g.http, &v1("192.0.2.7", 40001), "/v1-http").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("192.0.2.7")
    );
    let line = log_line(&g.log, "/v1-http");
    assert_eq!(line["downstream_remote_address"], "192.0.2.7:40001");
    assert_eq!(line["downstream_local_address"], "10.0.0.1:443");

    // v1 over IPv6.
    let r = get_with(TRUSTED, g.http, &v1("2001:db8::7", 40002), "/v1-ipv6").unwrap();
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("2001:db8::7")
    );

    // v2 with a TLV.
    let r = get_with(
        TRUSTED,
        g.http,
        &v2(Ipv4Addr::new(203, 0, 113, 9), 40003, false),
        "/v2-http",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("203.0.113.9")
    );
    assert_eq!(
        log_line(&g.log, "/v2-http")["downstream_remote_address"],
        "203.0.113.9:40003"
    );

    // TLS: the header, then a ClientHello with SNI.
    for (header, path, client) in [
        (v1("192.0.2.20", 40004), "/v1-tls", "192.0.2.20"),
        (
            v2(Ipv4Addr::new(192, 0, 2, 21), 40005, false),
            "/v2-tls",
            "192.0.2.21",
        ),
    ] {
        let r = tls_get_with(g.https, &header, path).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.echoed_header("x-forwarded-for").as_deref(), Some(client));
        assert_eq!(
            log_line(&g.log, path)["downstream_remote_address"],
            format!("{client}:{}", if path == "/v1-tls" { 40004 } else { 40005 })
        );
    }

    // h2 over TLS (ALPN h2) after a header.
    let mut h2 = H2Client::connect_after(
        g.https,
        "shop.test",
        &v2(Ipv4Addr::new(192, 0, 2, 22), 40008, false),
    )
    .unwrap();
    let r = h2.get("shop.test", "/v2-h2").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("192.0.2.22")
    );
    assert_eq!(
        log_line(&g.log, "/v2-h2")["downstream_remote_address"],
        "192.0.2.22:40008"
    );

    // TCP (L4) route: the header is consumed, the bytes after it reach the upstream as
    // they were, and the connection's log line names the header's client.
    for (header, client) in [
        (v1("192.0.2.30", 40006), "192.0.2.30:40006"),
        (
            v2(Ipv4Addr::new(192, 0, 2, 31), 40007, false),
            "192.0.2.31:40007",
        ),
    ] {
        let mut s = connect_from(TRUSTED, g.tcp);
        let mut first = header.clone();
        first.extend_from_slice(b"hello over tcp");
        s.write_all(&first).unwrap();
        let mut got = vec![0u8; 14];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, b"hello over tcp", "exactly the bytes after the header");
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
        log_line(&g.log, client);
    }

    // A listener not in `ports` reads no header: plain HTTP from the trusted source works.
    let r = get_with(TRUSTED, g.plain, b"", "/plain").unwrap();
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
}

#[test]
fn authorization_and_the_per_client_cap_use_the_header_address() {
    let tmp = tempfile::tempdir().unwrap();
    let g = start(tmp.path(), "");
    let denied = Ipv4Addr::new(198, 51, 100, 9);
    let allowed = Ipv4Addr::new(192, 0, 2, 9);
    for (header, status) in [
        (v1("198.51.100.9", 1000), 403),
        (v2(denied, 1001, false), 403),
        (v1("192.0.2.9", 1002), 200),
        (v2(allowed, 1003, false), 200),
    ] {
        let r = get_with(TRUSTED, g.http, &header, "/authz").unwrap();
        assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&header));
        if status == 403 {
            assert_eq!(r.text(), "RBAC: access denied");
        }
        // The same over TLS.
        let r = tls_get_with(g.https, &header, "/authz").unwrap();
        assert_eq!(
            r.status,
            status,
            "TLS {:?}",
            String::from_utf8_lossy(&header)
        );
    }

    // maxConnectionsPerClient = 2 counts the header's client, not the balancer's address
    // (every connection here comes from 127.0.0.1).
    // Each held connection has had a response (so it is admitted) and stays open.
    let hold = |ip: Ipv4Addr, port: u16| {
        let mut s = connect_from(TRUSTED, g.http);
        s.write_all(&v2(ip, port, false)).unwrap();
        s.write_all(&build_request("GET", "shop.test", "/hold", &[], b"", false))
            .unwrap();
        let r = read_response(&mut BufReader::new(s.try_clone().unwrap()), "GET").unwrap();
        assert_eq!(r.status, 200);
        s
    };
    let a = Ipv4Addr::new(192, 0, 2, 50);
    let _held = [hold(a, 1), hold(a, 2)];
    let mut third = connect_from(TRUSTED, g.http);
    third.write_all(&v2(a, 3, false)).unwrap();
    assert!(
        closed_silently(third),
        "a third connection of 192.0.2.50 is closed"
    );
    let r = get_with(
        TRUSTED,
        g.http,
        &v2(Ipv4Addr::new(192, 0, 2, 51), 4, false),
        "/other",
    )
    .unwrap();
    assert_eq!(
        r.status, 200,
        "another client of the same balancer is served"
    );
}

#[test]
fn only_trusted_sources_send_a_header_and_they_must() {
    let tmp = tempfile::tempdir().unwrap();
    let g = start(tmp.path(), "");

    // An untrusted source that sends a header (either version) is closed, on every kind of
    // listener.
    for port in [g.http, g.https, g.tcp] {
        for header in [
            v1("192.0.2.7", 1),
            v2(Ipv4Addr::new(192, 0, 2, 7), 1, false),
        ] {
            let mut s = connect_from(UNTRUSTED, port);
            s.write_all(&header).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: shop.test\r\n\r\n")
                .ok();
            assert!(closed_silently(s), "untrusted header on port {port}");
        }
    }
    // Without one it is served, as itself.
    let r = get_with(UNTRUSTED, g.http, b"", "/untrusted-plain").unwrap();
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("127.0.0.2")
    );

    // A trusted source without a header is closed.
    let mut s = connect_from(TRUSTED, g.http);
    s.write_all(b"GET / HTTP/1.1\r\nhost: shop.test\r\n\r\n")
        .unwrap();
    assert!(closed_silently(s), "trusted source without a header");
    assert!(tls_get_with(g.https, b"", "/").is_err());

    // LOCAL (a balancer's health check): the real peer stands.
    let r = get_with(
        TRUSTED,
        g.http,
        &v2(Ipv4Addr::new(192, 0, 2, 7), 1, true),
        "/local",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    // v1 UNKNOWN too.
    let r = get_with(TRUSTED, g.http, b"PROXY UNKNOWN\r\n", "/unknown").unwrap();
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );

    // Malformed headers are closed: a bad address, an unknown v2 command, a v1 line past
    // 107 bytes.
    let mut bad_cmd = v2(Ipv4Addr::new(192, 0, 2, 7), 1, false);
    bad_cmd[12] = 0x2F;
    let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120], b"\r\n"].concat();
    for header in [
        b"PROXY TCP4 300.1.1.1 10.0.0.1 1 2\r\n".to_vec(),
        bad_cmd,
        long,
    ] {
        let mut s = connect_from(TRUSTED, g.http);
        s.write_all(&header).unwrap();
        assert!(closed_silently(s), "{:?}", String::from_utf8_lossy(&header));
    }

    // Half a header, then nothing: closed after the 1 s timeout, not before.
    for half in [
        b"PROXY TCP4 192.0".to_vec(),
        v2(Ipv4Addr::new(192, 0, 2, 7), 1, false)[..20].to_vec(),
    ] {
        let mut s = connect_from(TRUSTED, g.http);
        s.write_all(&half).unwrap();
        let t = Instant::now();
        assert!(closed_silently(s));
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
            "closed after {waited:?}"
        );
    }
    let metrics = http_get(g._portico.admin_port, "127.0.0.1", "/metrics").text();
    for reason in ["untrusted", "missing", "invalid", "timeout"] {
        assert!(
            metric_sum(
                &metrics,
                "portico_proxy_protocol_refused_total",
                &format!("reason=\"{reason}\"")
            )
            .is_some_and(|n| n >= 1.0),
            "{reason} counted"
        );
    }
}

#[test]
fn allow_requests_without_proxy_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    let g = start(tmp.path(), "allowRequestsWithoutProxyProtocol = true");
    let r = get_with(TRUSTED, g.http, b"", "/none").unwrap();
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    let r = tls_get_with(g.https, b"", "/none-tls").unwrap();
    assert_eq!(r.status, 200);
    let r = get_with(TRUSTED, g.http, &v1("192.0.2.8", 1), "/with").unwrap();
    assert_eq!(
        r.echoed_header("x-forwarded-for").as_deref(),
        Some("192.0.2.8")
    );
    // A server-speaks-first client that sends nothing is served after the timeout.
    let mut s = connect_from(TRUSTED, g.tcp);
    thread::sleep(Duration::from_millis(1300));
    s.write_all(b"late").unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"late");
}

/// A connection pingora's cycle served a request on and hands back for the next one
/// (here: an upgrade request the upstream does not upgrade, which the fast codec lends for
/// the connection's rest) is the same connection: its PROXY header is not expected again,
/// and the next request keeps the header's client address.
#[test]
fn a_connection_handed_back_keeps_its_header() {
    let tmp = tempfile::tempdir().unwrap();
    let g = start(tmp.path(), "");
    let s = connect_from(TRUSTED, g.http);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(&v1("192.0.2.77", 1)).unwrap();
    let upgrade = [("Upgrade", "websocket"), ("Connection", "Upgrade")];
    w.write_all(&build_request(
        "GET",
        "shop.test",
        "/up",
        &upgrade,
        b"",
        false,
    ))
    .unwrap();
    let first = read_response(&mut r, "GET").unwrap();
    assert_eq!(first.status, 200, "not upgraded: an ordinary answer");
    for path in ["/next", "/again"] {
        w.write_all(&build_request("GET", "shop.test", path, &[], b"", false))
            .unwrap();
        let next = read_response(&mut r, "GET").unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(next.status, 200, "{path}");
        assert_eq!(
            next.echoed_header("x-forwarded-for").as_deref(),
            Some("192.0.2.77"),
            "{path}: the header's client still"
        );
    }
}
