//! Request caps (`mesh.downstream.maxRequests`, `maxRequestsPerClient`; NGINX's
//! `limit_conn`, Envoy's overload manager): requests in flight, not connections, so h2
//! streams on one connection count one each. A real Portico, real clients (raw HTTP/1.1
//! sockets and an h2 client over TLS) and a real upstream that holds each `/hold` request
//! until the test opens its gate. Runs through whichever codec the environment chooses
//! (`PORTICO_NO_FAST_PATH=true` for pingora's cycle).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use support::*;

/// An HTTP/1.1 upstream: a path with `/hold` waits for the gate to open before its 200; anything
/// else is answered at once. Keep-alive, a thread per connection.
struct Gate {
    port: u16,
    state: Arc<(Mutex<GateState>, Condvar)>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    /// `/hold` requests waiting now.
    held: usize,
}

impl Gate {
    fn start() -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new((Mutex::new(GateState::default()), Condvar::new()));
        let st = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                thread::spawn(move || serve(conn, &st));
            }
        });
        Gate { port, state }
    }

    fn held(&self) -> usize {
        self.state.0.lock().unwrap().held
    }

    fn open(&self) {
        self.state.0.lock().unwrap().open = true;
        self.state.1.notify_all();
    }

    fn close(&self) {
        self.state.0.lock().unwrap().open = false;
    }
}

fn serve(conn: TcpStream, st: &(Mutex<GateState>, Condvar)) {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                if n.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if path.contains("/hold") {
            let (m, cv) = st;
            let mut g = m.lock().unwrap();
            g.held += 1;
            while !g.open {
                g = cv.wait(g).unwrap();
            }
            g.held -= 1;
        }
        let text = format!("done {path}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

const CONFIG: &str = r#"
@MESH@
[mesh.downstream]
@CAPS@
[mesh.defaultConfig.gatewayTopology]
numTrustedProxies = 1

[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = { number = @HTTPS@, name = "https", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["*"]
tls = { mode = "SIMPLE", serverCertificate = "gw.crt", privateKey = "gw.key" }

[[virtualServices]]
name = "all"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
# The tests send gRPC requests here (`Gw::get`, `Gw::hold`), which the fast codecs lend
# to pingora's cycle.
name = "lent"
match = [{ uri = { prefix = "/lent/" } }]
route = [{ destination = { host = "lent.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "up"
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]

[[serviceEntries]]
name = "up"
hosts = ["up.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @UP@ } }]

[[serviceEntries]]
name = "lent"
hosts = ["lent.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @UP@ } }]
"#;

struct Gw {
    portico: Portico,
    http: u16,
    https: u16,
    gate: Gate,
    /// The config as written, for a reload to change.
    config: String,
    _tmp: tempfile::TempDir,
}

fn start(caps: &str) -> Gw {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gate = Gate::start();
    let (admin, http, https) = (free_port(), free_port(), free_port());
    write_cert(tmp.path(), "gw", &["gw.test"]);
    let config = render(
        CONFIG,
        &[
            ("MESH", mesh_config(admin)),
            ("CAPS", caps.to_string()),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
            ("UP", gate.port.to_string()),
        ],
    );
    let portico = Portico::start(tmp.path(), &config);
    Gw {
        portico,
        http,
        https,
        gate,
        config,
        _tmp: tmp,
    }
}

impl Gw {
    /// Rewrites the `[mesh.downstream]` line `from` as `to` and waits for the reload.
    fn reload(&self, from: &str, to: &str) {
        let generation = self.portico.generation();
        let config = self.config.replace(from, to);
        assert_ne!(config, self.config);
        write_atomic(&self.portico.config_path, config);
        self.portico
            .wait_generation_above(generation, Duration::from_secs(10));
    }

    fn refused(&self, scope: &str) -> f64 {
        metric_sum(
            &self.portico.metrics(),
            "portico_listener_requests_refused_total",
            &format!("scope=\"{scope}\""),
        )
        .unwrap_or(0.0)
    }

    /// Requests in flight on the plain-HTTP listener, as the gauge says.
    fn active(&self) -> f64 {
        self.active_on(&format!("HTTP 127.0.0.1:{}", self.http))
    }

    fn active_on(&self, listener: &str) -> f64 {
        metric_sum(
            &self.portico.metrics(),
            "portico_listener_requests_active",
            &format!("listener=\"{listener}\""),
        )
        .unwrap_or(0.0)
    }

    /// The access log's lines with response flag `OM`.
    fn om_lines(&self) -> Vec<serde_json::Value> {
        self.portico
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["response_flags"] == "OM")
            .collect()
    }

    /// A GET on a connection of its own, from client `xff` (the trusted proxy's entry).
    fn get(&self, path: &str, xff: &str) -> Response {
        http_request(self.http, "GET", "caps.test", path, &fields(path, xff), b"")
    }

    /// `n` GETs of `path` from client `xff`, each on its own connection, waiting in the
    /// upstream until the gate opens; their answers once it has.
    fn hold(&self, n: usize, path: &str, xff: &str) -> Vec<thread::JoinHandle<u16>> {
        (0..n)
            .map(|_| {
                let (port, path, xff) = (self.http, path.to_string(), xff.to_string());
                thread::spawn(move || {
                    http_request(port, "GET", "caps.test", &path, &fields(&path, &xff), b"").status
                })
            })
            .collect()
    }

    fn wait_held(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(10), || self.gate.held() == n),
            "the upstream holds {} requests, not {n}; log:\n{}",
            self.gate.held(),
            self.portico.log()
        );
    }

    fn wait_idle(&self) {
        assert!(
            wait_until(Duration::from_secs(10), || self.active() == 0.0),
            "requests still counted in flight: {}\n{}",
            self.active(),
            self.portico.metrics()
        );
    }
}

/// A request's fields: the trusted proxy's `x-forwarded-for`; under `/lent/` a gRPC
/// content type too, which the fast codecs lend to pingora's cycle.
fn fields<'a>(path: &str, xff: &'a str) -> Vec<(&'static str, &'a str)> {
    let mut f = vec![("x-forwarded-for", xff)];
    if path.starts_with("/lent/") {
        f.push(("content-type", "application/grpc"));
    }
    f
}

fn statuses(held: Vec<thread::JoinHandle<u16>>) -> Vec<u16> {
    held.into_iter().map(|h| h.join().unwrap()).collect()
}

const N: usize = 3;

#[test]
fn the_listener_cap_refuses_the_request_over_it_and_every_ending_gives_its_place_back() {
    let g = start(&format!("maxRequests = {N}"));
    let held = g.hold(N, "/hold/a", "198.51.100.1");
    g.wait_held(N);
    assert_eq!(g.active(), N as f64);

    // The one over the cap: 503 OM, whoever sends it, and the upstream never sees it.
    let over = g.get("/x", "198.51.100.9");
    assert_eq!(over.status, 503, "{}", over.text());
    assert_eq!(over.text(), "too many requests in flight\n");
    assert_eq!(g.refused("listener"), 1.0, "{}", g.portico.metrics());
    assert_eq!(g.refused("client"), 0.0);
    assert!(wait_until(Duration::from_secs(5), || !g
        .om_lines()
        .is_empty()));
    let line = &g.om_lines()[0];
    assert_eq!(line["response_code"], 503, "{line}");
    assert_eq!(line["response_code_details"], "overload", "{line}");
    assert!(g
        .portico
        .log()
        .contains("listener at its limit of requests in flight"));

    // The held ones finish: their places come back.
    g.gate.open();
    assert_eq!(statuses(held), [200; N]);
    g.wait_idle();
    assert_eq!(g.get("/x", "198.51.100.9").status, 200);
    g.gate.close();

    // Clients that go away: one mid-body (before its body is whole), the others while
    // the upstream holds their request.
    let mut mid_body = TcpStream::connect(("127.0.0.1", g.http)).unwrap();
    mid_body
        .write_all(
            b"POST /hold/body HTTP/1.1\r\nHost: caps.test\r\nx-forwarded-for: 198.51.100.1\r\ncontent-length: 1000\r\n\r\n0123456789",
        )
        .unwrap();
    let waiting: Vec<TcpStream> = (0..N - 1)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", g.http)).unwrap();
            s.write_all(b"GET /hold/gone HTTP/1.1\r\nHost: caps.test\r\nx-forwarded-for: 198.51.100.1\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    g.wait_held(N - 1);
    thread::sleep(Duration::from_millis(100));
    drop(mid_body);
    drop(waiting);
    // The upstream answers the abandoned requests; no place stays taken.
    g.gate.open();
    g.wait_idle();
    g.gate.close();

    // Exactly N places again: none leaked, none counted twice.
    let held = g.hold(N, "/hold/b", "198.51.100.1");
    g.wait_held(N);
    assert_eq!(g.get("/x", "198.51.100.9").status, 503);
    g.gate.open();
    assert_eq!(statuses(held), [200; N]);
    g.wait_idle();
    assert_eq!(g.get("/x", "198.51.100.9").status, 200);
}

#[test]
fn each_client_address_has_its_own_cap() {
    const PER: usize = 2;
    let g = start(&format!("maxRequestsPerClient = {PER}"));
    let a = g.hold(PER, "/hold/a", "198.51.100.1");
    g.wait_held(PER);
    let over = g.get("/x", "198.51.100.1");
    assert_eq!(over.status, 503, "a's third: {}", over.text());
    // Another address is not held back by a's requests, and has as many of its own.
    assert_eq!(g.get("/x", "198.51.100.2").status, 200);
    // Its place is given back when the gateway is done with it, just after the client has
    // read the answer: wait for that before b fills its cap.
    assert!(
        wait_until(Duration::from_secs(10), || g.active() == PER as f64),
        "in flight: {}",
        g.active()
    );
    let b = g.hold(PER, "/hold/b", "198.51.100.2");
    g.wait_held(2 * PER);
    assert_eq!(g.get("/x", "198.51.100.2").status, 503, "b's third");
    assert_eq!(g.refused("client"), 2.0, "{}", g.portico.metrics());
    assert_eq!(g.refused("listener"), 0.0);
    // The address is the trusted client address, not the peer (all come from 127.0.0.1).
    assert_eq!(g.get("/x", "198.51.100.3").status, 200);
    assert!(g
        .portico
        .log()
        .contains("client at its limit of requests in flight"));
    g.gate.open();
    assert_eq!(statuses(a), [200; PER]);
    assert_eq!(statuses(b), [200; PER]);
    g.wait_idle();
    assert_eq!(g.get("/x", "198.51.100.1").status, 200);
}

#[test]
fn h2_streams_on_one_connection_count_one_request_each() {
    let g = start(&format!("maxRequests = {N}"));
    let mut h2 = H2Client::connect(g.https, "gw.test").expect("h2 connection");
    // N+1 streams at once on the one connection, all held by the upstream but the one
    // over the cap; the gate opens once the cap has refused it.
    let opener = {
        let state = g.gate.state.clone();
        let admin = g.portico.admin_port;
        thread::spawn(move || {
            let refused = || {
                try_http_request(admin, "GET", "127.0.0.1", "/metrics", &[], b"")
                    .ok()
                    .and_then(|r| {
                        metric_sum(&r.text(), "portico_listener_requests_refused_total", "")
                    })
                    .unwrap_or(0.0)
            };
            let ok = wait_until(Duration::from_secs(8), || {
                state.0.lock().unwrap().held == N && refused() >= 1.0
            });
            state.0.lock().unwrap().open = true;
            state.1.notify_all();
            ok
        })
    };
    let requests: Vec<H2Request<'_>> = (0..=N)
        .map(|_| ("GET", "gw.test", "/hold/h2", vec![], &b""[..]))
        .collect();
    let answers = h2.send_all(&requests);
    assert!(
        opener.join().unwrap(),
        "the upstream held {N} streams and one was refused; log:\n{}",
        g.portico.log()
    );
    let mut statuses: Vec<u16> = answers
        .iter()
        .map(|a| a.as_ref().map_or(0, |r| r.status))
        .collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503], "{answers:?}");
    let refused = answers.iter().flatten().find(|r| r.status == 503).unwrap();
    assert_eq!(refused.text(), "too many requests in flight\n");
    assert!(wait_until(Duration::from_secs(5), || g
        .om_lines()
        .iter()
        .any(|l| l["protocol"] == "HTTP/2")));
    // The places come back: N streams again, all served.
    let answers = h2.send_all(&vec![("GET", "gw.test", "/x", vec![], &b""[..]); N]);
    assert!(answers
        .iter()
        .all(|a| a.as_ref().is_ok_and(|r| r.status == 200)));

    // Streams the client resets: one mid-body, one while the upstream holds it. Each
    // holds its place until then, and gives it back.
    g.gate.close();
    let https = format!("HTTPS 127.0.0.1:{}", g.https);
    let body = [b'x'; 1000];
    let gone = [
        ("POST", "gw.test", "/hold/body", vec![], &body[..]),
        ("GET", "gw.test", "/hold/gone", vec![], &b""[..]),
    ];
    let both_in_flight = h2.abandon(&gone, 10, || {
        g.gate.held() == 1 && g.active_on(&https) == 2.0
    });
    assert!(
        both_in_flight,
        "held {}, in flight {}",
        g.gate.held(),
        g.active_on(&https)
    );
    g.gate.open();
    assert!(
        wait_until(Duration::from_secs(10), || g.active_on(&https) == 0.0),
        "reset streams still counted: {}",
        g.active_on(&https)
    );
    let answers = h2.send_all(&vec![("GET", "gw.test", "/x", vec![], &b""[..]); N]);
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|r| r.status == 200)),
        "{answers:?}"
    );
}

#[test]
fn requests_in_flight_stay_counted_across_reloads() {
    let g = start(&format!("maxRequests = {N}"));
    let held = g.hold(N, "/hold/a", "198.51.100.1");
    g.wait_held(N);
    // A reload that changes something else: the N in flight still hold the cap.
    g.reload(
        &format!("maxRequests = {N}"),
        &format!("maxRequests = {N}\nidleTimeout = \"61s\""),
    );
    assert_eq!(g.get("/x", "198.51.100.9").status, 503);
    // A higher cap: one more, counted with the N from before the reloads.
    g.reload(
        &format!("maxRequests = {N}"),
        &format!("maxRequests = {}", N + 1),
    );
    let more = g.hold(1, "/hold/b", "198.51.100.1");
    g.wait_held(N + 1);
    assert_eq!(g.get("/x", "198.51.100.9").status, 503);
    assert_eq!(g.active(), (N + 1) as f64);
    // The caps off: nothing refused, and the requests from before still free their places
    // (the gauge comes back to 0, never below).
    g.reload(&format!("maxRequests = {N}"), "");
    assert_eq!(g.get("/x", "198.51.100.9").status, 200);
    g.gate.open();
    assert_eq!(statuses(held), [200; N]);
    assert_eq!(statuses(more), [200]);
    g.wait_idle();
    assert_eq!(g.refused("listener"), 2.0);
}

#[test]
fn a_request_the_fast_codec_lends_to_pingora_is_counted_once() {
    let g = start(&format!("maxRequests = {N}"));
    let held = g.hold(N, "/lent/hold", "198.51.100.1");
    g.wait_held(N);
    assert_eq!(g.active(), N as f64);
    assert_eq!(g.get("/lent/x", "198.51.100.9").status, 503);
    if std::env::var("PORTICO_NO_FAST_PATH").as_deref() != Ok("true") {
        let lent = metric_sum(&g.portico.metrics(), "portico_fast_path_handoffs_total", "");
        assert!(lent.unwrap_or(0.0) >= N as f64, "{}", g.portico.metrics());
    }
    g.gate.open();
    assert_eq!(statuses(held), [200; N]);
    g.wait_idle();
    assert_eq!(g.get("/lent/x", "198.51.100.9").status, 200);
}
