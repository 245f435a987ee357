//! `tls.mode = AUTO_PASSTHROUGH` (Istio's east-west gateway): a TLS server that routes a
//! connection by its SNI `outbound_.<port>_.<subset>_.<host>` to that cluster, with no
//! VirtualService, and never terminates TLS. Two loopback TLS upstreams (rustls, each
//! with its own certificate) are the endpoints of subsets v1 and v2 of one ServiceEntry
//! host; a rustls client through Portico must see each upstream's certificate and answer.
//! Names of no known host, port or subset are closed, logged with flag `NC`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};
use support::*;

const HOST: &str = "app.ns.svc.cluster.local";

/// A TLS upstream on 127.0.0.1 with a self-signed certificate of its own; answers every
/// HTTP/1.1 request with `hello from NAME`.
struct TlsUpstream {
    port: u16,
    cert_der: Vec<u8>,
}

impl TlsUpstream {
    fn start(name: &str) -> TlsUpstream {
        let certified = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).unwrap();
        let cert_der = certified.cert.der().to_vec();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert_der.clone())],
                PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into()),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let name = name.to_string();
        thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                let (config, name) = (config.clone(), name.clone());
                thread::spawn(move || serve(sock, config, &name));
            }
        });
        TlsUpstream { port, cert_der }
    }
}

fn serve(mut sock: TcpStream, config: Arc<ServerConfig>, name: &str) {
    sock.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut conn = ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut sock).is_err() {
            return;
        }
    }
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, sock));
    loop {
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
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
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

struct Setup {
    _tmp: tempfile::TempDir,
    _portico: Portico,
    port: u16,
    v1: TlsUpstream,
    v2: TlsUpstream,
    log: std::path::PathBuf,
}

/// An east-west gateway (Istio's sample `expose-services.yaml`: hosts `*.local`) on a
/// free port; `HOST` port 8443 has endpoints v1 and v2 (subsets of its DestinationRule);
/// `ext.example.com` is a service outside `*.local`.
fn start() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let (v1, v2) = (TlsUpstream::start("v1"), TlsUpstream::start("v2"));
    let port = free_port();
    let log = tmp.path().join("access.log");
    let config = format!(
        r#"{mesh}accessLogFile = "{log}"
accessLogEncoding = "TEXT"
accessLogFormat = "%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %REQUESTED_SERVER_NAME% %UPSTREAM_CLUSTER%\n"

[[gateways]]
name = "cross-network-gateway"
namespace = "istio-system"
selector = {{ istio = "eastwestgateway" }}
[[gateways.servers]]
port = {{ number = {port}, name = "tls", protocol = "TLS" }}
bind = "127.0.0.1"
hosts = ["*.local"]
tls = {{ mode = "AUTO_PASSTHROUGH" }}

[[serviceEntries]]
name = "app"
namespace = "ns"
hosts = ["{HOST}"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 8443, name = "tls", protocol = "TLS" }}]
endpoints = [
  {{ address = "127.0.0.1", ports = {{ tls = {p1} }}, labels = {{ version = "v1" }} }},
  {{ address = "127.0.0.1", ports = {{ tls = {p2} }}, labels = {{ version = "v2" }} }},
]

[[destinationRules]]
name = "app"
namespace = "ns"
host = "{HOST}"
subsets = [
  {{ name = "v1", labels = {{ version = "v1" }} }},
  {{ name = "v2", labels = {{ version = "v2" }} }},
]

[[serviceEntries]]
name = "ext"
hosts = ["ext.example.com"]
location = "MESH_EXTERNAL"
resolution = "STATIC"
ports = [{{ number = 443, name = "tls", protocol = "TLS" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ tls = {p1} }} }}]
"#,
        mesh = mesh_config(free_port()),
        log = log.display(),
        p1 = v1.port,
        p2 = v2.port,
    );
    let portico = Portico::start(tmp.path(), &config);
    Setup {
        _tmp: tmp,
        _portico: portico,
        port,
        v1,
        v2,
        log,
    }
}

fn assert_logged(s: &Setup, line: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&s.log)
                .unwrap_or_default()
                .lines()
                .any(|l| l == line)
        }),
        "{line:?} in:\n{}",
        std::fs::read_to_string(&s.log).unwrap_or_default()
    );
}

#[test]
fn sni_names_the_cluster_and_the_bytes_pass_through() {
    let s = start();
    for (subset, up) in [("v1", &s.v1), ("v2", &s.v2)] {
        let sni = format!("outbound_.8443_.{subset}_.{HOST}");
        for _ in 0..3 {
            let mut c = tls_connect(s.port, Some(&sni)).expect("handshake through the gateway");
            assert_eq!(
                c.peer_cert, up.cert_der,
                "{sni}: the upstream's own certificate (TLS not terminated)"
            );
            let r = c.get(HOST, "/").unwrap();
            assert_eq!(r.text(), format!("hello from {subset}"), "{sni}");
        }
        assert_logged(&s, &format!("- - {sni} outbound|8443|{subset}|{HOST}"));
    }
    // No subset: the service's every endpoint.
    let sni = format!("outbound_.8443_._.{HOST}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let mut c = tls_connect(s.port, Some(&sni)).expect("handshake");
        seen.insert(c.get(HOST, "/").unwrap().text());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["hello from v1", "hello from v2"],
        "{sni} balances over both endpoints"
    );
    assert_logged(&s, &format!("- - {sni} outbound|8443||{HOST}"));
}

#[test]
fn unknown_hosts_ports_and_subsets_are_closed() {
    let s = start();
    for sni in [
        format!("outbound_.9999_.v1_.{HOST}"),
        format!("outbound_.8443_.v3_.{HOST}"),
        "outbound_.8443_._.nope.ns.svc.cluster.local".to_string(),
        HOST.to_string(),
    ] {
        let r = tls_connect(s.port, Some(&sni));
        assert!(r.is_err(), "{sni}: closed, not passed through");
        assert_logged(&s, &format!("NC cluster_not_found {sni} -"));
    }
    // A service outside the server's hosts (`*.local`) is not exposed: no filter chain.
    let sni = "outbound_.443_._.ext.example.com";
    assert!(tls_connect(s.port, Some(sni)).is_err(), "{sni}");
    assert_logged(&s, &format!("NR filter_chain_not_found {sni} -"));
    // The known names still pass.
    let mut c = tls_connect(s.port, Some(&format!("outbound_.8443_.v2_.{HOST}"))).unwrap();
    assert_eq!(c.get(HOST, "/").unwrap().text(), "hello from v2");
}
