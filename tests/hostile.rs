//! Hostile input: raw-socket clients and an upstream that misbehaves on command
//! (`support::scripted`), against both request paths: Portico's fast codecs and pingora's
//! request cycle (`--no-fast-path`). Each case asserts what the client gets, what the
//! upstream received, and what the next request (on the same and on another connection)
//! gets.

mod support;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::scripted::Scripted;
use support::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Codec {
    Fast,
    Pingora,
}

const BOTH: [Codec; 2] = [Codec::Fast, Codec::Pingora];

const CONFIG: &str = r#"
@MESH@
@EXTRA_MESH@

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
name = "admin"
match = [{ uri = { prefix = "/admin" } }]
directResponse = { status = 403, body = { string = "forbidden\n" } }
[[virtualServices.http]]
name = "retry-reset"
match = [{ uri = { prefix = "/rr/" } }]
rewrite = { uri = "/" }
retries = { attempts = 2, retryOn = "reset,5xx" }
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "default"
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]

@DESTINATION_RULE@

[[serviceEntries]]
name = "up"
hosts = ["up.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @UP@ } }]
"#;

struct Gw {
    portico: Portico,
    http: u16,
    https: u16,
    up: Scripted,
    _tmp: tempfile::TempDir,
}

/// Outlier detection that ejects the one endpoint after 2 gateway errors, for a minute.
const EJECT_AFTER_TWO: &str = r#"
[[destinationRules]]
name = "up"
host = "up.internal"
trafficPolicy = { outlierDetection = { consecutiveGatewayErrors = 2, consecutive5xxErrors = 2, baseEjectionTime = "60s", maxEjectionPercent = 100 } }
"#;

fn start_with(codec: Codec, extra_mesh: &str) -> Gw {
    start_full(codec, extra_mesh, "")
}

fn start_full(codec: Codec, extra_mesh: &str, destination_rule: &str) -> Gw {
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Scripted::start();
    let admin = free_port();
    let http = free_port();
    let https = free_port();
    write_cert(tmp.path(), "gw", &["gw.test"]);
    let config = render(
        CONFIG,
        &[
            ("MESH", mesh_config(admin)),
            ("EXTRA_MESH", extra_mesh.to_string()),
            ("DESTINATION_RULE", destination_rule.to_string()),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
            ("UP", up.port().to_string()),
        ],
    );
    // Each codec for sure, whatever PORTICO_NO_FAST_PATH the suite runs under.
    let env = match codec {
        Codec::Fast => ("PORTICO_NO_FAST_PATH", "false"),
        Codec::Pingora => ("PORTICO_NO_FAST_PATH", "true"),
    };
    let portico = Portico::start_with_env(tmp.path(), &config, &[env]);
    Gw {
        portico,
        http,
        https,
        up,
        _tmp: tmp,
    }
}

fn start(codec: Codec) -> Gw {
    start_with(codec, "")
}

/// A raw client connection to the plain-HTTP listener.
fn raw(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn get(host: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// Sends `request` on `s` and reads one response to `method`.
fn exchange(s: &mut TcpStream, request: &str, method: &str) -> std::io::Result<Response> {
    s.write_all(request.as_bytes())?;
    let mut r = BufReader::new(s.try_clone()?);
    read_response(&mut r, method)
}

/// Whether the peer closes `s` (EOF or reset) within `within`, reading and dropping
/// whatever else arrives first.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// The access log lines (JSON) written so far.
fn log_lines(gw: &Gw) -> Vec<serde_json::Value> {
    gw.portico
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The access log line of the request for `path`, once it is written.
fn log_for(gw: &Gw, path: &str) -> serde_json::Value {
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        found = log_lines(gw)
            .into_iter()
            .find(|l| l["path"].as_str() == Some(path));
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no access log line for {path}:\n{}", gw.portico.stdout()))
}

// ---------------------------------------------------------------------------------------------
// 1. One client must never receive another's response
// ---------------------------------------------------------------------------------------------

#[test]
fn stray_bytes_after_a_bodiless_response_never_reach_the_next_request_over_http1() {
    for codec in BOTH {
        let gw = start(codec);
        for (n, (method, first)) in [
            ("GET", "/stray204/a"),
            ("GET", "/stray304/a"),
            ("HEAD", "/headbody/a"),
        ]
        .into_iter()
        .enumerate()
        {
            let mut a = raw(gw.http);
            let req = format!("{method} {first} HTTP/1.1\r\nHost: t\r\n\r\n");
            let resp = exchange(&mut a, &req, method).expect("first answer");
            assert!(
                matches!(resp.status, 200 | 204 | 304),
                "{codec:?} {first}: {}",
                resp.status
            );
            // The upstream writes its stray bytes 100 ms after the answer.
            thread::sleep(Duration::from_millis(300));
            for (conn, path) in [
                ("same", format!("/ok/{n}-same")),
                ("other", format!("/ok/{n}-other")),
            ] {
                let resp = if conn == "same" {
                    exchange(&mut a, &get("t", &path), "GET")
                } else {
                    exchange(&mut raw(gw.http), &get("t", &path), "GET")
                }
                .unwrap_or_else(|e| panic!("{codec:?} after {first}, {conn} connection: {e}"));
                assert_eq!(resp.status, 200, "{codec:?} after {first}, {conn}");
                assert_eq!(
                    resp.text(),
                    path,
                    "{codec:?} after {first}: the {conn} connection got another response"
                );
            }
        }
    }
}

#[test]
fn stray_bytes_after_a_bodiless_response_never_reach_another_h2_client() {
    for codec in BOTH {
        let gw = start(codec);
        let mut a = H2Client::connect(gw.https, "gw.test").expect("h2 client a");
        let first = a.get("gw.test", "/stray204/h2").expect("answer");
        assert_eq!(first.status, 204, "{codec:?}");
        thread::sleep(Duration::from_millis(300));
        let mut b = H2Client::connect(gw.https, "gw.test").expect("h2 client b");
        for i in 0..4 {
            let path = format!("/ok/b{i}");
            let resp = b.get("gw.test", &path).expect("b's answer");
            assert_eq!(
                resp.text(),
                path,
                "{codec:?}: client b got another response"
            );
            let path = format!("/ok/a{i}");
            let resp = a.get("gw.test", &path).expect("a's answer");
            assert_eq!(
                resp.text(),
                path,
                "{codec:?}: client a got another response"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Nothing is sent again after a response started; POSTs only when asked for
// ---------------------------------------------------------------------------------------------

#[test]
fn a_response_cut_short_is_never_completed_by_a_retry() {
    for codec in BOTH {
        let gw = start(codec);
        // The default policy, and one that retries on reset and 5xx.
        for (method, path, upstream_path) in [
            ("POST", "/short/post", "/short/post"),
            ("GET", "/short/get", "/short/get"),
            ("POST", "/rr/short/rpost", "/short/rpost"),
            ("GET", "/rr/short/rget", "/short/rget"),
        ] {
            let mut s = raw(gw.http);
            let req =
                format!("{method} {path} HTTP/1.1\r\nHost: t\r\ncontent-length: 5\r\n\r\nhello");
            s.write_all(req.as_bytes()).unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200"), "{codec:?} {path}: {text}");
            let body_start = text.find("\r\n\r\n").map(|i| i + 4).unwrap_or(got.len());
            assert_eq!(
                &got[body_start..],
                b"0123456789",
                "{codec:?} {path}: the client gets the partial body and then a close, nothing else"
            );
            assert_eq!(
                gw.up.received_for(upstream_path).len(),
                1,
                "{codec:?} {path} reached the upstream more than once"
            );
        }
    }
}

#[test]
fn a_post_is_not_sent_twice_unless_the_route_asks_for_it() {
    for codec in BOTH {
        let gw = start(codec);
        let resp = exchange(
            &mut raw(gw.http),
            "POST /reset/p HTTP/1.1\r\nHost: t\r\ncontent-length: 2\r\n\r\nhi",
            "POST",
        )
        .expect("answer");
        assert_eq!(resp.status, 503, "{codec:?}");
        assert_eq!(
            gw.up.received_for("/reset/p").len(),
            1,
            "{codec:?}: default policy"
        );
        let resp = exchange(&mut raw(gw.http), &get("t", "/reset/g"), "GET").expect("answer");
        assert_eq!(resp.status, 503, "{codec:?}");
        assert_eq!(
            gw.up.received_for("/reset/g").len(),
            1,
            "{codec:?}: the default policy has no reset retries"
        );
        // retryOn reset: 1 + 2 attempts, POST included (the policy says so).
        let resp = exchange(
            &mut raw(gw.http),
            "POST /rr/reset/p2 HTTP/1.1\r\nHost: t\r\ncontent-length: 2\r\n\r\nhi",
            "POST",
        )
        .expect("answer");
        assert_eq!(resp.status, 503, "{codec:?}");
        assert_eq!(
            gw.up.received_for("/reset/p2").len(),
            3,
            "{codec:?}: retryOn reset"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A client's error is never held against an upstream
// ---------------------------------------------------------------------------------------------

#[test]
fn client_errors_get_400_or_a_close_and_never_eject_the_upstream() {
    for codec in BOTH {
        let gw = start_full(codec, "", EJECT_AFTER_TWO);
        for i in 0..3 {
            // A bad chunk size in the request body.
            let mut s = raw(gw.http);
            let req = format!(
                "POST /ok/badbody{i} HTTP/1.1\r\nHost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n"
            );
            s.write_all(req.as_bytes()).unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 400"),
                "{codec:?}: a bad request body gets 400 or a close, got {text:?}"
            );
            assert!(
                gw.up.received_for(&format!("/ok/badbody{i}")).len() <= 1,
                "{codec:?}: never sent again"
            );
            // A client that goes away mid-body.
            let mut s = raw(gw.http);
            let req = format!(
                "POST /ok/gone{i} HTTP/1.1\r\nHost: t\r\ncontent-length: 100\r\n\r\n0123456789"
            );
            s.write_all(req.as_bytes()).unwrap();
            thread::sleep(Duration::from_millis(50));
            drop(s);
        }
        thread::sleep(Duration::from_millis(200));
        let resp = exchange(&mut raw(gw.http), &get("t", "/ok/after"), "GET").expect("answer");
        assert_eq!(
            resp.status, 200,
            "{codec:?}: the endpoint was not ejected by clients' errors"
        );
        assert!(gw.up.received_for("/ok/gone").len() <= 3, "{codec:?}");
        let gone = log_for(&gw, "/ok/gone2");
        assert_eq!(gone["response_flags"], "DC", "{codec:?}: {gone}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Every wait has a timeout; a listener holds at most so many connections
// ---------------------------------------------------------------------------------------------

/// Short timeouts, so a test sees them fire.
const SHORT: &str = r#"
[mesh.downstream]
requestHeadersTimeout = "1s"
idleTimeout = "1s"
requestBodyTimeout = "1s"
streamIdleTimeout = "2s"
"#;

#[test]
fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    for codec in BOTH {
        let gw = start_with(codec, SHORT);
        // After a request the fast path serves, and after one lent to pingora (chunked).
        for req in [
            get("t", "/ok/idle"),
            "POST /ok/idle2 HTTP/1.1\r\nHost: t\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n".to_string(),
        ] {
            let mut s = raw(gw.http);
            let resp = exchange(&mut s, &req, "GET").expect("answer");
            assert_eq!(resp.status, 200, "{codec:?}");
            let t = Instant::now();
            assert!(
                closed_within(&mut s, Duration::from_secs(5)),
                "{codec:?}: an idle keep-alive connection was not closed"
            );
            assert!(t.elapsed() >= Duration::from_millis(500), "{codec:?}: closed too early");
        }
        // A connection that never sends a byte.
        let mut s = raw(gw.http);
        assert!(
            closed_within(&mut s, Duration::from_secs(5)),
            "{codec:?}: silent connection"
        );
    }
}

#[test]
fn idle_and_old_h2_connections_are_shut_down() {
    for codec in BOTH {
        let gw = start_with(codec, SHORT);
        let mut h2 = H2Client::connect(gw.https, "gw.test").expect("h2");
        assert_eq!(h2.get("gw.test", "/ok/h2idle").expect("answer").status, 200);
        let t = Instant::now();
        assert!(
            h2.ended_within(Duration::from_secs(5)),
            "{codec:?}: an idle h2 connection was not shut down"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{codec:?}: too early"
        );
        // One that never opens a stream.
        let mut quiet = H2Client::connect(gw.https, "gw.test").expect("h2");
        assert!(
            quiet.ended_within(Duration::from_secs(5)),
            "{codec:?}: silent h2"
        );
    }
    // A busy one past maxConnectionDuration (the fast path's h2; pingora's has no such
    // setting).
    let gw = start_with(
        Codec::Fast,
        "[mesh.downstream]\nmaxConnectionDuration = \"1s\"\n",
    );
    let mut h2 = H2Client::connect(gw.https, "gw.test").expect("h2");
    let t = Instant::now();
    let mut answered = 0;
    while t.elapsed() < Duration::from_secs(5) {
        match h2.get("gw.test", "/ok/busy") {
            Ok(r) if r.status == 200 => answered += 1,
            _ => break,
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(answered >= 3, "it served while young");
    assert!(
        h2.ended_within(Duration::from_secs(5)),
        "an old h2 connection goes away"
    );
}

#[test]
fn an_h2_stream_whose_client_stops_reading_is_reset_after_the_stream_idle_timeout() {
    for codec in BOTH {
        let gw = start_with(codec, SHORT);
        let mut h2 = H2Client::connect(gw.https, "gw.test").expect("h2");
        // A 4 MiB answer to a client that takes 64 KiB (its window) and stops reading:
        // the gateway waits for the window no longer than streamIdleTimeout (2 s).
        let stalled = h2
            .stop_reading("gw.test", "/large/stall", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{codec:?}: {e}\n{}", gw.portico.log()));
        assert_eq!(stalled.status, 200, "{codec:?}");
        assert!(
            stalled.end.is_err(),
            "{codec:?}: the stream was reset, not ended as if whole: {stalled:?}"
        );
        assert!(
            stalled.received <= 64 * 1024,
            "{codec:?}: no more than the window was sent: {stalled:?}"
        );
        assert!(
            stalled.after >= Duration::from_millis(1500),
            "{codec:?}: reset before the timeout: {stalled:?}"
        );
        // The connection's next stream is served.
        let next = h2.get("gw.test", "/ok/after-stall").expect("next stream");
        assert_eq!(
            (next.status, next.text().as_str()),
            (200, "/ok/after-stall")
        );
    }
}

#[test]
fn an_http1_connection_past_its_maximum_age_closes_after_its_request() {
    for codec in BOTH {
        let gw = start_with(codec, "[mesh.downstream]\nmaxConnectionDuration = \"1s\"\n");
        let mut s = raw(gw.http);
        let t = Instant::now();
        let mut last = None;
        while t.elapsed() < Duration::from_secs(5) {
            match exchange(&mut s, &get("t", "/ok/age"), "GET") {
                Ok(r) => {
                    assert_eq!(r.status, 200, "{codec:?}");
                    let close = r
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    last = Some((t.elapsed(), close));
                    if close {
                        break;
                    }
                }
                Err(e) => panic!("{codec:?}: a request got no answer: {e}"),
            }
            thread::sleep(Duration::from_millis(100));
        }
        let (at, close) = last.expect("answers");
        assert!(close, "{codec:?}: never told to close");
        assert!(
            at >= Duration::from_millis(900),
            "{codec:?}: closed at {at:?}"
        );
        assert!(closed_within(&mut s, Duration::from_secs(2)), "{codec:?}");
    }
}

#[test]
fn a_head_sent_slowly_is_cut_off_whatever_its_pace() {
    for codec in BOTH {
        let gw = start_with(codec, SHORT);
        let mut s = raw(gw.http);
        let head = b"GET /ok/slow HTTP/1.1\r\nHost: t\r\nx-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let started = Instant::now();
        let mut cut = false;
        // One byte every 100 ms: each read makes progress, the whole head would take 8 s.
        for b in head.iter() {
            if s.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            thread::sleep(Duration::from_millis(100));
            if started.elapsed() > Duration::from_secs(4) {
                break;
            }
        }
        let closed = cut || closed_within(&mut s, Duration::from_secs(3));
        assert!(closed, "{codec:?}: a slowloris head was never cut off");
        assert!(
            gw.up.received_for("/ok/slow").is_empty(),
            "{codec:?}: nothing reached the upstream"
        );
    }
}

#[test]
fn a_stalled_request_body_gets_408_and_a_silent_upstream_504() {
    for codec in BOTH {
        let gw = start_with(codec, SHORT);
        let mut s = raw(gw.http);
        s.write_all(b"POST /ok/stall HTTP/1.1\r\nHost: t\r\ncontent-length: 100\r\n\r\n0123456789")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let resp = read_response(&mut r, "POST");
        match resp {
            Ok(resp) => assert_eq!(resp.status, 408, "{codec:?}"),
            Err(e) => panic!("{codec:?}: no answer to a stalled body: {e}"),
        }
        let t = Instant::now();
        let resp = exchange(&mut raw(gw.http), &get("t", "/never/x"), "GET").expect("answer");
        assert_eq!(
            resp.status, 504,
            "{codec:?}: an upstream that never answers"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{codec:?}");
    }
}

#[test]
fn a_listener_holds_at_most_max_connections_and_its_held_ones_keep_working() {
    for codec in BOTH {
        let gw = start_with(codec, "[mesh.downstream]\nmaxConnections = 5\n");
        let mut held: Vec<TcpStream> = (0..5).map(|_| raw(gw.http)).collect();
        // Established connections work while the listener is full. (Each answered also
        // means each was accepted: with a socket per worker thread, a later connect may be
        // accepted before an earlier one, so the sixth is only made once all five are in.)
        for (i, s) in held.iter_mut().enumerate() {
            let resp = exchange(s, &get("t", &format!("/ok/held{i}")), "GET").expect("held");
            assert_eq!(resp.status, 200, "{codec:?}");
        }
        let mut extra = raw(gw.http);
        assert!(
            closed_within(&mut extra, Duration::from_secs(5)),
            "{codec:?}: a sixth connection was not closed"
        );
        let metrics = gw.portico.metrics();
        let refused =
            metric_sum(&metrics, "portico_listener_connections_refused_total", "").unwrap_or(0.0);
        assert!(
            refused >= 1.0,
            "{codec:?}: refused connections are counted:\n{metrics}"
        );
        assert!(
            gw.portico.log().contains("at its connection limit"),
            "{codec:?}: and logged"
        );
        // Once one closes, a new connection is taken.
        drop(held.pop());
        let mut fresh = None;
        wait_until(Duration::from_secs(5), || {
            let mut s = raw(gw.http);
            match exchange(&mut s, &get("t", "/ok/fresh"), "GET") {
                Ok(r) if r.status == 200 => {
                    fresh = Some(s);
                    true
                }
                _ => false,
            }
        });
        assert!(fresh.is_some(), "{codec:?}: a place freed is taken again");
        let resp = exchange(&mut held[1], &get("t", "/ok/again"), "GET").expect("held works");
        assert_eq!(resp.status, 200, "{codec:?}");
    }
}

#[test]
fn idle_half_open_and_slowloris_clients_do_not_stop_a_normal_request_and_all_time_out() {
    for codec in BOTH {
        let gw = start_with(codec, SHORT);
        // 500 connections that send nothing, 20 that send a head a byte at a time.
        let idle: Vec<TcpStream> = (0..500).map(|_| raw(gw.http)).collect();
        let slow: Vec<TcpStream> = (0..20)
            .map(|_| {
                let mut s = raw(gw.http);
                s.write_all(b"GET /ok/slowloris HTTP/1.1\r\nHo").unwrap();
                s
            })
            .collect();
        let resp = exchange(&mut raw(gw.http), &get("t", "/ok/normal"), "GET")
            .expect("a normal request is answered while they are open");
        assert_eq!(resp.text(), "/ok/normal", "{codec:?}");
        for (what, conns) in [("idle", idle), ("slow", slow)] {
            for (i, mut s) in conns.into_iter().enumerate() {
                assert!(
                    closed_within(&mut s, Duration::from_secs(10)),
                    "{codec:?}: {what} connection {i} was never closed"
                );
            }
        }
        assert!(gw.up.received_for("/ok/slowloris").is_empty(), "{codec:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Paths are normalized before routing
// ---------------------------------------------------------------------------------------------

#[test]
fn path_spellings_cannot_walk_around_a_route_and_upstreams_get_the_normal_path() {
    for codec in BOTH {
        let gw = start(codec);
        for p in [
            "/admin",
            "/x/../admin",
            "//admin",
            "/./admin",
            "/%61dmin",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/admin/.",
            "/x/..;/admin",
            "/x\\..\\admin",
        ] {
            let resp = exchange(&mut raw(gw.http), &get("t", p), "GET").expect("answer");
            assert_eq!(
                resp.status, 403,
                "{codec:?}: {p} walked around the /admin route"
            );
        }
        let mut h2 = H2Client::connect(gw.https, "gw.test").expect("h2");
        for p in ["/x/../admin", "/%61dmin", "//admin"] {
            let resp = h2.get("gw.test", p).expect("h2 answer");
            assert_eq!(resp.status, 403, "{codec:?}: h2 {p}");
        }
        for (sent, seen) in [
            ("/ok/a/../b", "/ok/b"),
            ("/ok/%7e%41/./c?x=/../y", "/ok/~A/c?x=/../y"),
            ("/ok//d", "/ok/d"),
            ("/ok/%2F", "/ok/%2F"),
        ] {
            let resp = exchange(&mut raw(gw.http), &get("t", sent), "GET").expect("answer");
            assert_eq!(resp.text(), seen, "{codec:?}: {sent}");
            let resp = h2.get("gw.test", sent).expect("h2 answer");
            assert_eq!(resp.text(), seen, "{codec:?}: h2 {sent}");
        }
        for bad in ["/ok/%zz", "/ok/a%00", "/ok/%"] {
            let resp = exchange(&mut raw(gw.http), &get("t", bad), "GET").expect("answer");
            assert_eq!(resp.status, 400, "{codec:?}: {bad}");
        }
        assert!(
            gw.up.received().iter().all(|r| !r.path.contains("admin")),
            "{codec:?}: nothing about admin reached the upstream"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Request hygiene
// ---------------------------------------------------------------------------------------------

fn status_of(port: u16, request: &str) -> u16 {
    let mut s = raw(port);
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    read_response(&mut r, "GET").map(|r| r.status).unwrap_or(0)
}

#[test]
fn a_request_without_one_valid_host_gets_400() {
    for codec in BOTH {
        let gw = start(codec);
        for req in [
            "GET /ok/h HTTP/1.1\r\n\r\n",
            "GET /ok/h HTTP/1.1\r\nHost:\r\n\r\n",
            "GET /ok/h HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET /ok/h HTTP/1.1\r\nHost: a/b\r\n\r\n",
            "GET /ok/h HTTP/1.1\r\nHost: a@b\r\n\r\n",
            "GET /ok/h HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET /ok/h HTTP/1.1\r\nHost: a:99999\r\n\r\n",
        ] {
            assert_eq!(status_of(gw.http, req), 400, "{codec:?}: {req:?}");
        }
        assert!(gw.up.received_for("/ok/h").is_empty(), "{codec:?}");
        let line = log_for(&gw, "/ok/h");
        assert_eq!(
            line["response_code"], 400,
            "{codec:?}: the refusal is logged: {line}"
        );
        assert_eq!(
            status_of(gw.http, "GET /ok/h10 HTTP/1.0\r\n\r\n"),
            200,
            "{codec:?}: HTTP/1.0 may omit Host"
        );
    }
}

#[test]
fn a_body_with_two_framings_is_refused_and_never_forwarded() {
    for codec in BOTH {
        let gw = start(codec);
        for (req, status) in [
            ("POST /ok/f HTTP/1.1\r\nHost: t\r\ncontent-length: 5, 5\r\n\r\nhello", 400),
            ("POST /ok/f HTTP/1.1\r\nHost: t\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello", 400),
            ("POST /ok/f HTTP/1.1\r\nHost: t\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!", 400),
            ("POST /ok/f HTTP/1.1\r\nHost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
            ("POST /ok/f HTTP/1.1\r\nHost: t\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 501),
            ("POST /ok/f HTTP/1.1\r\nHost: t\r\ncontent-length: -1\r\n\r\n", 400),
            // HTTP/1.0 has no transfer codings: a 1.0 hop reads no body here (found by the
            // h1_differential fuzz target).
            ("POST /ok/f HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
        ] {
            assert_eq!(status_of(gw.http, req), status, "{codec:?}: {req:?}");
        }
        assert!(gw.up.received_for("/ok/f").is_empty(), "{codec:?}");
    }
}

#[test]
fn every_x_forwarded_for_line_is_kept_in_order() {
    for codec in BOTH {
        let gw = start(codec);
        let req = "GET /echo/xff HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 1.1.1.1\r\nx-forwarded-for: 2.2.2.2, 3.3.3.3\r\n\r\n";
        let resp = exchange(&mut raw(gw.http), req, "GET").expect("answer");
        let got = gw.up.received_for("/echo/xff");
        assert_eq!(got.len(), 1, "{codec:?}");
        assert_eq!(
            got[0].header_all("x-forwarded-for"),
            ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"],
            "{codec:?}: {}",
            resp.text()
        );
    }
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    for codec in BOTH {
        let gw = start(codec);
        for first in [
            get("t", "/ok/p1"),
            // Lent to pingora (a chunked body), with more requests right behind it.
            "POST /ok/p1 HTTP/1.1\r\nHost: t\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n".to_string(),
            // A redirect pingora answers (no upstream).
            get("t", "/admin/p1"),
        ] {
            let mut s = raw(gw.http);
            let all = format!("{first}{}{}", get("t", "/ok/p2"), get("t", "/ok/p3"));
            s.write_all(all.as_bytes()).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let a = read_response(&mut r, "GET").expect("first");
            let b = read_response(&mut r, "GET").expect("second");
            let c = read_response(&mut r, "GET").expect("third");
            assert!(a.status == 200 || a.status == 403, "{codec:?}");
            assert_eq!(b.text(), "/ok/p2", "{codec:?} after {first:?}");
            assert_eq!(c.text(), "/ok/p3", "{codec:?} after {first:?}");
        }
    }
}

#[test]
fn heads_over_the_limits_get_431_or_414_and_responses_over_them_502() {
    for codec in BOTH {
        let gw = start(codec);
        let big = format!(
            "GET /ok/big HTTP/1.1\r\nHost: t\r\nx-big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        assert_eq!(status_of(gw.http, &big), 431, "{codec:?}");
        let many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
        assert_eq!(
            status_of(
                gw.http,
                &format!("GET /ok/many HTTP/1.1\r\nHost: t\r\n{many}\r\n")
            ),
            431,
            "{codec:?}"
        );
        let long = format!("GET /ok/{} HTTP/1.1\r\nHost: t\r\n\r\n", "u".repeat(9000));
        assert_eq!(status_of(gw.http, &long), 414, "{codec:?}");
        let huge_line = format!(
            "GET /ok/{} HTTP/1.1\r\nHost: t\r\n\r\n",
            "u".repeat(70 * 1024)
        );
        assert_eq!(status_of(gw.http, &huge_line), 414, "{codec:?}");
        for (path, status) in [("/hugehead/x", 502), ("/garbage/x", 502), ("/info/x", 200)] {
            let resp = exchange(&mut raw(gw.http), &get("t", path), "GET").expect("answer");
            assert_eq!(resp.status, status, "{codec:?}: {path}");
        }
        // Both framings (RFC 9112 6.3): the chunked one wins, the length is not passed on.
        let resp = exchange(&mut raw(gw.http), &get("t", "/clte/x"), "GET").expect("answer");
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, "abc"),
            "{codec:?}"
        );
        assert!(resp.header("content-length").is_none(), "{codec:?}");
        let line = log_for(&gw, "/garbage/x");
        assert_eq!(line["response_flags"], "UPE", "{codec:?}: {line}");
    }
}

#[test]
fn an_upstream_that_says_too_little_or_too_much_spoils_only_its_own_exchange() {
    for codec in BOTH {
        let gw = start(codec);
        let mut s = raw(gw.http);
        let resp = exchange(&mut s, &get("t", "/long/x"), "GET").expect("answer");
        assert_eq!(
            resp.text(),
            "hello",
            "{codec:?}: exactly the length it announced"
        );
        let resp = exchange(&mut s, &get("t", "/ok/next"), "GET").expect("next on the same");
        assert_eq!(resp.text(), "/ok/next", "{codec:?}");
        let resp = exchange(&mut raw(gw.http), &get("t", "/ok/other"), "GET").expect("other");
        assert_eq!(resp.text(), "/ok/other", "{codec:?}");
        // A broken chunked body: the client's connection ends with it.
        let mut s = raw(gw.http);
        s.write_all(get("t", "/badchunk/x").as_bytes()).unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)), "{codec:?}");
        let resp = exchange(&mut raw(gw.http), &get("t", "/ok/after"), "GET").expect("after");
        assert_eq!(resp.text(), "/ok/after", "{codec:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Upgrades (WebSocket)
// ---------------------------------------------------------------------------------------------

/// A response head read a byte at a time: whatever follows it (the tunnel's first bytes)
/// stays in the stream.
fn read_head_only(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "head cut short ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
        assert!(head.len() < 16 * 1024, "head too long");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Upgrades `s` to a WebSocket tunnel to the echo upstream, then sends bytes both ways
/// (a frame's worth and 256 KiB), then half-closes: the tunnel closes behind it.
fn websocket_round_trip(s: &mut (impl Read + Write), what: &str) {
    s.write_all(
        b"GET /upgrade/chat HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\n\
          Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let head = read_head_only(s);
    assert!(head.starts_with("HTTP/1.1 101"), "{what}: {head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("\r\nupgrade: websocket\r\n"),
        "{what}: {head}"
    );
    assert!(
        lower.contains("\r\nconnection: upgrade\r\n"),
        "{what}: {head}"
    );
    let big: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
    for msg in [&b"\x81\x04ping"[..], &big[..]] {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("{what}: echo of {} bytes: {e}", msg.len()));
        assert!(back == msg, "{what}: the echo differs");
    }
}

#[test]
fn a_websocket_upgrade_becomes_a_tunnel_both_ways_on_http_and_https() {
    for codec in BOTH {
        let gw = start(codec);
        let mut s = raw(gw.http);
        websocket_round_trip(&mut s, &format!("{codec:?} http"));
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(
            closed_within(&mut s, Duration::from_secs(5)),
            "{codec:?}: the tunnel closes after the client's close"
        );
        let tls = tls_connect(gw.https, Some("gw.test")).expect("TLS");
        let mut s = tls.into_stream();
        websocket_round_trip(&mut s, &format!("{codec:?} https"));
        drop(s);
        // The upstream saw an upgrade: `Upgrade` kept, `Connection` saying only that.
        let got = gw.up.received_for("/upgrade/");
        assert_eq!(got.len(), 2, "{codec:?}");
        for r in &got {
            assert_eq!(r.header_all("upgrade"), ["websocket"], "{codec:?}");
            assert_eq!(r.header_all("connection"), ["upgrade"], "{codec:?}");
        }
        // Each tunnel is logged when it ends (both have).
        let tunnels = || {
            log_lines(&gw)
                .into_iter()
                .filter(|l| l["path"].as_str() == Some("/upgrade/chat"))
                .collect::<Vec<_>>()
        };
        assert!(
            wait_until(Duration::from_secs(5), || tunnels().len() == 2),
            "{codec:?}: {}",
            gw.portico.stdout()
        );
        for line in tunnels() {
            assert_eq!(line["response_code"], 101, "{codec:?}: {line}");
            assert_eq!(line["method"], "GET", "{codec:?}: {line}");
            assert_eq!(line["authority"], "gw.test", "{codec:?}: {line}");
            // What went through the tunnel, each way (the frame and the 256 KiB).
            for field in ["bytes_sent", "bytes_received"] {
                let n = line[field].as_u64().unwrap_or(0);
                assert!(n >= 256 * 1024 + 6, "{codec:?}: {field} {n}: {line}");
            }
        }
        // Who carried the tunnels: Portico's codec (none handed over), or pingora's.
        let fast = metric_sum(
            &gw.portico.metrics(),
            "portico_fast_path_requests_total",
            "",
        )
        .unwrap_or(0.0);
        assert_eq!(
            fast,
            if codec == Codec::Fast { 2.0 } else { 0.0 },
            "{codec:?}"
        );
    }
}

#[test]
fn an_upgrade_the_upstream_declines_is_an_ordinary_exchange_and_the_connection_goes_on() {
    for codec in BOTH {
        let gw = start(codec);
        let mut s = raw(gw.http);
        let req = "GET /ok/no-upgrade HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let resp = exchange(&mut s, req, "GET").expect("answer");
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, "/ok/no-upgrade"),
            "{codec:?}"
        );
        let resp = exchange(&mut s, &get("t", "/ok/next"), "GET").expect("next on the same");
        assert_eq!(resp.text(), "/ok/next", "{codec:?}");
    }
}
