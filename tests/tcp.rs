//! TCP routes: a Gateway server of protocol TCP forwards raw bytes to its VirtualService
//! `tcp` route's destination, picks weighted destinations, counts the bytes in Istio's TCP
//! metrics, and stops sending new connections to a destination a reload removed while the
//! connections already open keep running.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use support::*;

/// A TCP upstream on 127.0.0.1: writes `greeting` (if any) on accept, then echoes every
/// byte until the client closes its side.
struct EchoTcp {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl EchoTcp {
    fn start(greeting: &str) -> EchoTcp {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (count, greeting) = (accepted.clone(), greeting.to_string());
        thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(mut sock) = sock else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                thread::spawn(move || {
                    if sock.write_all(greeting.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 8192];
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
        EchoTcp { port, accepted }
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s
}

/// Reads exactly `n` bytes (or what arrives before EOF).
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut out[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    out.truncate(got);
    out
}

/// A TCP port routed to `echo.internal:9000`, whose endpoints are `ups` with weights.
/// Without the ServiceEntry (`registered = false`) the destination has no endpoints.
fn config(admin: u16, port: u16, ups: &[(&EchoTcp, u32)], registered: bool) -> String {
    let mut routes = String::new();
    let mut entries = String::new();
    for (i, (up, weight)) in ups.iter().enumerate() {
        routes.push_str(&format!(
            "  {{ destination = {{ host = \"echo{i}.internal\", port = {{ number = 9000 }} }}, weight = {weight} }},\n"
        ));
        if registered {
            entries.push_str(&format!(
                r#"
[[serviceEntries]]
name = "echo{i}"
hosts = ["echo{i}.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 9000, name = "tcp", protocol = "TCP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ tcp = {p} }} }}]
"#,
                p = up.port
            ));
        }
    }
    format!(
        r#"{mesh}
[[gateways]]
name = "tcp"
[[gateways.servers]]
port = {{ number = {port}, name = "tcp", protocol = "TCP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "echo"
hosts = ["*"]
gateways = ["tcp"]
[[virtualServices.tcp]]
match = [{{ port = {port} }}]
route = [
{routes}]
{entries}"#,
        mesh = mesh_config(admin),
    )
}

#[test]
fn bytes_round_trip_and_match_the_istio_tcp_metrics() {
    let up = EchoTcp::start("");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gw = Portico::start(dir.path(), &config(free_port(), port, &[(&up, 1)], true));

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut s = connect(port);
    let writer = {
        let mut w = s.try_clone().unwrap();
        let payload = payload.clone();
        thread::spawn(move || {
            w.write_all(&payload).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    s.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "the bytes came back changed");
    drop(s);

    let dest = "destination_service=\"echo0.internal\"";
    let mut last = String::new();
    let counted = wait_until(Duration::from_secs(5), || {
        last = gw.metrics();
        metric_sum(&last, "istio_tcp_connections_closed_total", dest) == Some(1.0)
    });
    assert!(counted, "{last}");
    assert_eq!(
        metric_sum(&last, "istio_tcp_connections_opened_total", dest),
        Some(1.0)
    );
    assert_eq!(
        metric_sum(&last, "istio_tcp_received_bytes_total", dest),
        Some(payload.len() as f64)
    );
    assert_eq!(
        metric_sum(&last, "istio_tcp_sent_bytes_total", dest),
        Some(payload.len() as f64)
    );
    assert!(last.contains("request_protocol=\"tcp\""));
    // One access log line for the connection, with its byte counts and cluster.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = gw.stdout();
            out.lines().any(|l| {
                l.contains("outbound|9000||echo0.internal")
                    && l.contains("\"bytes_received\":100000")
                    && l.contains("\"bytes_sent\":100000")
            })
        }),
        "{}",
        gw.stdout()
    );
}

/// `connectionPool.tcp.tcpKeepalive` on a TCP route's upstream connection, as on HTTP
/// routes' (one connector, `upstream::connect`).
#[test]
fn tcp_keepalive_is_set_on_the_upstream_connection() {
    let up = EchoTcp::start("");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let rule = r#"
[[destinationRules]]
name = "echo0"
host = "echo0.internal"
trafficPolicy = { connectionPool = { tcp = { tcpKeepalive = { time = "600s", interval = "30s", probes = 3 } } } }
"#;
    let gw = Portico::start(
        dir.path(),
        &(config(free_port(), port, &[(&up, 1)], true) + rule),
    );
    let mut s = connect(port);
    s.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut s, 4), b"ping");
    // The gateway's end of its upstream connection is the socket whose remote port is the
    // upstream's (the upstream's own end has no keep-alive).
    let timers = keepalive_timers_to(up.port);
    assert_eq!(timers.len(), 1, "one upstream connection: {timers:?}");
    let t = timers[0].expect("a keep-alive timer runs on the upstream connection");
    assert!(
        t > Duration::from_secs(500) && t <= Duration::from_secs(600),
        "the first probe is due after the configured 600 s idle time: {t:?}"
    );
    drop(s);
    drop(gw);
}

#[test]
fn weights_split_connections() {
    let a = EchoTcp::start("A\n");
    let b = EchoTcp::start("B\n");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _gw = Portico::start(
        dir.path(),
        &config(free_port(), port, &[(&a, 75), (&b, 25)], true),
    );
    // Enough to tell 75/25 from 70/30 or 80/20.
    let n = 8000;
    assert!(binomial_tells_apart(n, 0.75, 0.70) && binomial_tells_apart(n, 0.75, 0.80));
    let mut to_a = 0;
    for _ in 0..n {
        let mut s = connect(port);
        match read_n(&mut s, 2).as_slice() {
            b"A\n" => to_a += 1,
            b"B\n" => {}
            other => panic!("unexpected greeting {other:?}"),
        }
    }
    assert_binomial(to_a, n, 0.75, "connections to the 75 % side");
    assert_eq!(
        a.accepted.load(Ordering::SeqCst) + b.accepted.load(Ordering::SeqCst),
        n
    );
}

#[test]
fn a_removed_service_entry_stops_new_connections_and_open_ones_keep_running() {
    let up = EchoTcp::start("");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = free_port();
    let gw = Portico::start(dir.path(), &config(admin, port, &[(&up, 1)], true));

    let mut open = connect(port);
    open.write_all(b"before").unwrap();
    assert_eq!(read_n(&mut open, 6), b"before");
    // Bytes are counted as they flow, not only when the connection closes.
    let dest = "destination_service=\"echo0.internal\"";
    assert!(wait_until(Duration::from_secs(5), || {
        metric_sum(&gw.metrics(), "istio_tcp_received_bytes_total", dest) == Some(6.0)
    }));

    let generation = gw.generation();
    gw.rewrite_config(&config(admin, port, &[(&up, 1)], false));
    gw.wait_generation_above(generation, Duration::from_secs(10));

    let accepted = up.accepted.load(Ordering::SeqCst);
    let mut fresh = connect(port);
    let _ = fresh.write_all(b"after");
    assert_eq!(
        read_n(&mut fresh, 5),
        b"",
        "a new connection must be closed once its destination is gone"
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), accepted);
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .log()
            .contains("no healthy endpoints")),
        "{}",
        gw.log()
    );

    // The connection opened under the old config still forwards.
    open.write_all(b"still here").unwrap();
    assert_eq!(read_n(&mut open, 10), b"still here");
}

#[test]
fn a_tcp_server_takes_no_tls_block_and_a_port_serves_one_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portico.toml");
    let up = EchoTcp::start("");
    let good = config(15000, 9100, &[(&up, 1)], true);
    std::fs::write(&path, &good).unwrap();
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");

    let with_tls = good.replace(
        "hosts = [\"*\"]\n\n[[virtualServices]]",
        "hosts = [\"*\"]\ntls = { mode = \"SIMPLE\" }\n\n[[virtualServices]]",
    );
    std::fs::write(&path, &with_tls).unwrap();
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    let line = line_of(&with_tls, "tls = { mode");
    assert!(
        out.contains(&format!(":{line}:")) && out.contains("takes no tls block"),
        "{out}"
    );

    let mixed = good.replace(
        "[[virtualServices]]",
        "[[gateways.servers]]\nport = { number = 9100, name = \"http\", protocol = \"HTTP\" }\nbind = \"127.0.0.1\"\nhosts = [\"web.test\"]\n\n[[virtualServices]]",
    );
    std::fs::write(&path, &mixed).unwrap();
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(out.contains("already serves another protocol"), "{out}");
}

#[test]
fn a_new_tcp_port_on_reload_is_refused_and_the_old_config_keeps_serving() {
    let up = EchoTcp::start("");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = free_port();
    let gw = Portico::start(dir.path(), &config(admin, port, &[(&up, 1)], true));
    let generation = gw.generation();

    let extra = free_port();
    let bigger = config(admin, port, &[(&up, 1)], true).replace(
        "[[virtualServices]]",
        &format!(
            "[[gateways.servers]]\nport = {{ number = {extra}, name = \"tcp2\", protocol = \"TCP\" }}\nbind = \"127.0.0.1\"\nhosts = [\"*\"]\n\n[[virtualServices]]"
        ),
    );
    gw.rewrite_config(&bigger);
    let mut last_error = String::new();
    let refused = wait_until(Duration::from_secs(10), || {
        last_error = gw.config_json()["lastReloadError"]
            .as_str()
            .unwrap_or("")
            .to_string();
        last_error.contains("listeners changed")
    });
    assert!(refused, "{last_error}");
    assert!(
        last_error.contains(&format!("TCP 127.0.0.1:{extra}")),
        "{last_error}"
    );
    assert_eq!(gw.generation(), generation);
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, extra)).is_err());
    let mut s = connect(port);
    s.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut s, 4), b"ping");
}

#[test]
fn sigterm_lets_open_connections_run_for_the_drain_duration_then_closes_them() {
    let up = EchoTcp::start("");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // mesh_config sets drainDuration = "1s".
    let mut gw = Portico::start(dir.path(), &config(free_port(), port, &[(&up, 1)], true));
    let mut open = connect(port);
    open.write_all(b"before").unwrap();
    assert_eq!(read_n(&mut open, 6), b"before");

    gw.send_signal("TERM");
    thread::sleep(Duration::from_millis(300));
    open.write_all(b"while draining").unwrap();
    assert_eq!(read_n(&mut open, 14), b"while draining");

    let status = gw
        .wait_exit(Duration::from_secs(15))
        .expect("portico exits after the drain");
    assert!(status.success(), "{status}");
    let _ = open.write_all(b"after");
    assert_eq!(
        read_n(&mut open, 5),
        b"",
        "the connection ends with the process"
    );
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
    let up = EchoTcp::start("");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config(free_port(), port, &[(&up, 1)], true)
        + r#"
[[destinationRules]]
name = "echo0"
host = "echo0.internal"
trafficPolicy = { connectionPool = { tcp = { idleTimeout = "1s" } } }
"#;
    let _gw = Portico::start(dir.path(), &config);

    let mut idle = connect(port);
    let mut busy = connect(port);
    for s in [&mut idle, &mut busy] {
        s.write_all(b"hi").unwrap();
        assert_eq!(read_n(s, 2), b"hi");
    }
    // The busy one talks every 100 ms for 2.5 s: two and a half idle timeouts' worth.
    for _ in 0..25 {
        thread::sleep(Duration::from_millis(100));
        busy.write_all(b"x").unwrap();
        assert_eq!(read_n(&mut busy, 1), b"x", "a busy connection stays open");
    }
    let _ = idle.write_all(b"late");
    assert_eq!(read_n(&mut idle, 4), b"", "the idle connection was closed");
}
