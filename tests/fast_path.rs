//! The HTTP/1.1 fast path: what it serves itself, how it hands a connection to pingora
//! mid-stream, the response framings it passes through, and `--no-fast-path`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const CONFIG: &str = r#"
@MESH@
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
tls = { mode = "SIMPLE", serverCertificate = "fast.crt", privateKey = "fast.key" }

[[virtualServices]]
name = "plain"
hosts = ["fast.test"]
gateways = ["gw"]
[[virtualServices.http]]
name = "echo"
match = [{ uri = { prefix = "/" } }]
headers = { request = { set = { x-route = "plain" } }, response = { add = { x-served = "gw" } } }
@ROUTE@

[[virtualServices]]
name = "both"
hosts = ["both.test"]
gateways = ["gw"]
[[virtualServices.http]]
route = [{ destination = { host = "svc.internal", port = { number = 80 } } }]

[[virtualServices]]
name = "idle"
hosts = ["idle.test"]
gateways = ["gw"]
[[virtualServices.http]]
route = [{ destination = { host = "idle.internal", port = { number = 80 } } }]

[[destinationRules]]
name = "idle"
host = "idle.internal"
trafficPolicy = { connectionPool = { http = { idleTimeout = "1s" } } }

[[serviceEntries]]
name = "idle"
hosts = ["idle.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @IDLE@ } }]

[[virtualServices]]
name = "down"
hosts = ["down.test"]
gateways = ["gw"]
[[virtualServices.http]]
route = [{ destination = { host = "down.internal", port = { number = 80 } } }]

[[serviceEntries]]
name = "down"
hosts = ["down.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @DOWN@ } }]

[[virtualServices]]
name = "raw"
hosts = ["raw.test"]
gateways = ["gw"]
[[virtualServices.http]]
route = [{ destination = { host = "raw.internal", port = { number = 80 } } }]

[[serviceEntries]]
name = "raw"
hosts = ["raw.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @RAW@ } }]
"#;

struct Setup {
    portico: Portico,
    http: u16,
    https: u16,
    echo: Echo,
    echo2: Echo,
    echo3: Echo,
    _tmp: tempfile::TempDir,
}

fn start(extra_args: &[(&str, &str)]) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let echo = Echo::start("v1");
    let echo2 = Echo::start("v2");
    let echo3 = Echo::start("idle");
    let raw = raw_upstream();
    let admin = free_port();
    let http = free_port();
    let https = free_port();
    write_cert(tmp.path(), "fast", &["fast.test"]);
    let mut config = render(
        CONFIG,
        &[
            ("MESH", mesh_config(admin)),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
            ("ROUTE", route_to("v1")),
            ("RAW", raw.to_string()),
            ("IDLE", echo3.port().to_string()),
            // Nothing listens there: connections are refused.
            ("DOWN", free_port().to_string()),
        ],
    );
    config.push_str(&upstreams_config(&[
        ("v1", echo.port()),
        ("v2", echo2.port()),
    ]));
    let portico = Portico::start_with_env(tmp.path(), &config, extra_args);
    Setup {
        portico,
        http,
        https,
        echo,
        echo2,
        echo3,
        _tmp: tmp,
    }
}

/// An upstream that answers by path with framings the echo does not use:
/// `/chunked` (chunked, with a trailer), `/close` (no length: the body ends with the
/// connection), `/http10` (an HTTP/1.0 answer), `/early` (103 first), `/once` (keep-alive
/// claimed, then the connection closed after the answer), `/short` (closed 5 bytes into a
/// 10-byte body), `/headers` (an empty value, a repeated name, names in mixed case).
fn raw_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw upstream");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread::spawn(move || raw_connection(conn));
        }
    });
    port
}

fn raw_connection(conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        if let Some(answer) = large_answer(path) {
            if conn.write_all(&answer).is_err() {
                return;
            }
            continue;
        }
        let (answer, close): (&[u8], bool) = match path {
            "/chunked" => (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
                false,
            ),
            "/close" => (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end", true),
            "/http10" => (b"HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\nten ok", true),
            "/early" => (
                b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
                false,
            ),
            "/once" => (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce", true),
            "/short" => (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true),
            "/headers" => (
                b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Mixed-Case: Value,  with spaces\r\nETag: \"v1\"\r\nx-twice: 1\r\nx-twice: 2\r\ncontent-length: 2\r\n\r\nok",
                false,
            ),
            _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", false),
        };
        if conn.write_all(answer).is_err() {
            return;
        }
        if close {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// 300 KiB that no shift of a read boundary leaves unchanged.
fn large_body() -> Vec<u8> {
    (0..300 * 1024u32).map(|i| (i % 251) as u8).collect()
}

/// `/large` (the large body with a length) and `/large-chunked` (in 7 000-byte chunks).
fn large_answer(path: &str) -> Option<Vec<u8>> {
    if !path.starts_with("/large") {
        return None;
    }
    let body = large_body();
    let mut answer = Vec::new();
    match path {
        "/large" => {
            answer.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes(),
            );
            answer.extend_from_slice(&body);
        }
        "/large-chunked" => {
            answer.extend_from_slice(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
            for chunk in body.chunks(7000) {
                answer.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                answer.extend_from_slice(chunk);
                answer.extend_from_slice(b"\r\n");
            }
            answer.extend_from_slice(b"0\r\n\r\n");
        }
        _ => return None,
    }
    Some(answer)
}

const CHUNKED: &[(&str, &str)] = &[("Transfer-Encoding", "chunked")];

/// Once all `logged` requests so far have their access log line (written after the request
/// was counted, so no count for them is still to come), the fast path served exactly `n`.
fn expect_fast(p: &Portico, n: f64, logged: usize) {
    let lines = || p.stdout().lines().filter(|l| l.starts_with('{')).count();
    assert!(
        wait_until(Duration::from_secs(5), || lines() >= logged),
        "{} access log lines, expected {logged}\n{}",
        lines(),
        p.log()
    );
    assert_eq!(lines(), logged, "one line per request\n{}", p.stdout());
    let want = if fast_path_on() { n } else { 0.0 };
    assert_eq!(fast_requests(p), want, "fast path requests\n{}", p.log());
}

/// `n` handovers to pingora for `reason` so far (none when the fast path is off).
fn expect_handoffs(p: &Portico, reason: &str, n: f64) {
    let want = if fast_path_on() { n } else { 0.0 };
    assert_eq!(handoffs(p, reason), want, "handoffs for {reason}");
}

fn fast_requests(p: &Portico) -> f64 {
    metric_sum(&p.metrics(), "portico_fast_path_requests_total", "").unwrap_or(0.0)
}

fn handoffs(p: &Portico, reason: &str) -> f64 {
    metric_sum(
        &p.metrics(),
        "portico_fast_path_handoffs_total",
        &format!("reason=\"{reason}\""),
    )
    .unwrap_or(0.0)
}

#[test]
fn a_connection_starts_on_the_fast_path_and_moves_to_pingora_for_a_body() {
    let s = start(&[]);
    let mut client = HttpClient::new(s.http);
    let first = client.get("fast.test", "/a?x=1").expect("GET");
    assert_eq!(first.status, 200, "{}", s.portico.log());
    let seen = first.json();
    assert_eq!(seen["path"], "/a?x=1");
    assert_eq!(seen["headers"]["x-route"], "plain", "route's request set");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        seen["headers"]["x-request-id"].as_str().map(str::len),
        Some(36),
        "a request id is added: {seen}"
    );
    assert_eq!(first.header("x-served"), Some("gw"), "route's response add");
    expect_fast(&s.portico, 1.0, 1);

    // A chunked body is pingora's: the connection is handed over with the request intact.
    let post = client
        .request(
            "POST",
            "fast.test",
            "/b",
            CHUNKED,
            b"6\r\na body\r\n0\r\n\r\n",
        )
        .expect("POST");
    assert_eq!(post.status, 200);
    assert_eq!(post.json()["body"], "a body");
    assert_eq!(post.json()["headers"]["x-route"], "plain");
    expect_handoffs(&s.portico, "request", 1.0);

    // pingora read exactly that request and gave the connection back: the next request
    // on it takes the fast path again.
    let third = client
        .get("fast.test", "/c")
        .expect("GET after the handoff");
    assert_eq!(third.status, 200);
    assert_eq!(third.json()["path"], "/c");
    assert_eq!(client.connects, 1, "one client connection throughout");
    expect_fast(&s.portico, 2.0, 3);
    expect_handoffs(&s.portico, "request", 1.0);
    assert_eq!(s.echo.count(), 3);
}

#[test]
fn https_connections_that_keep_http11_take_the_fast_path() {
    let s = start(&[]);
    let mut tls = tls_connect(s.https, Some("fast.test")).expect("TLS handshake");
    assert_eq!(tls.alpn.as_deref(), Some("http/1.1"));
    for path in ["/t1", "/t2"] {
        let resp = tls.get("fast.test", path).expect("GET over TLS");
        assert_eq!(resp.status, 200, "{}", s.portico.log());
        assert_eq!(resp.json()["path"], path);
        assert_eq!(resp.json()["headers"]["x-forwarded-proto"], "https");
        assert_eq!(resp.header("x-served"), Some("gw"));
    }
    expect_fast(&s.portico, 2.0, 2);
    assert!(
        wait_until(Duration::from_secs(5), || s
            .portico
            .stdout()
            .contains(r#""requested_server_name":"fast.test""#)),
        "the access log names the SNI:\n{}",
        s.portico.stdout()
    );
    // A chunked body is lent to pingora with the TLS connection, which comes back after.
    let post = tls
        .request(
            "POST",
            "fast.test",
            "/t3",
            CHUNKED,
            b"8\r\nover tls\r\n0\r\n\r\n",
        )
        .expect("POST over TLS");
    assert_eq!(post.json()["body"], "over tls");
    let after = tls.get("fast.test", "/t4").expect("GET after the handoff");
    assert_eq!(after.json()["headers"]["x-forwarded-proto"], "https");
    expect_handoffs(&s.portico, "request", 1.0);
    expect_fast(&s.portico, 3.0, 4);
}

#[test]
fn pipelined_requests_are_answered_in_order_across_a_lent_request() {
    let s = start(&[]);
    let mut conn = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Three for the fast path (one with a body), one with a chunked body lent to pingora
    // from the bytes the front had already read (pingora reads exactly that request), and
    // one more after it, which the front reads again.
    let mut batch = build_request("GET", "fast.test", "/one", &[], b"", false);
    batch.extend(build_request("PUT", "fast.test", "/two", &[], b"2", false));
    batch.extend(build_request("GET", "fast.test", "/three", &[], b"", false));
    batch.extend(build_request(
        "PUT",
        "fast.test",
        "/four",
        CHUNKED,
        b"1\r\n4\r\n0\r\n\r\n",
        false,
    ));
    batch.extend(build_request("GET", "fast.test", "/five", &[], b"", false));
    conn.write_all(&batch).unwrap();
    let mut reader = BufReader::new(conn);
    for (path, body) in [
        ("/one", ""),
        ("/two", "2"),
        ("/three", ""),
        ("/four", "4"),
        ("/five", ""),
    ] {
        let resp = read_response(&mut reader, "GET")
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", s.portico.log()));
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.json()["path"], path);
        assert_eq!(resp.json()["body"], body);
    }
    expect_fast(&s.portico, 4.0, 5);
    expect_handoffs(&s.portico, "request", 1.0);
}

#[test]
fn each_endpoint_keeps_its_upstream_connection_for_the_client() {
    let s = start(&[]);
    let mut client = HttpClient::new(s.http);
    for i in 0..10 {
        let resp = client.get("both.test", "/spread").expect("GET");
        assert_eq!(resp.status, 200, "request {i}");
    }
    expect_fast(&s.portico, 10.0, 10);
    assert_eq!(s.echo.count() + s.echo2.count(), 10);
    // Pingora's cycle (fast path off): a client quick with its next request can find the
    // connection not yet back in pingora's pool, or still held by the pool's idle-poll
    // task (vendor/README.md, `reused_stream`); under load (`.ci/run`'s full test run
    // on two cores) that failed 2 of 5 runs, one of them with the patch there, so one
    // more connection is allowed on that path. The fast codecs put the connection
    // back before the response's last bytes go out: one, always.
    let most = if fast_path_on() { 1 } else { 2 };
    for e in [&s.echo, &s.echo2] {
        assert!(
            e.connections() <= most,
            "{}: {} connections for {} requests from one client connection",
            e.name(),
            e.connections(),
            e.count()
        );
    }
}

#[test]
fn an_upstream_connection_idle_past_the_idle_timeout_is_not_reused() {
    let s = start(&[]);
    let mut client = HttpClient::new(s.http);
    for _ in 0..2 {
        assert_eq!(client.get("idle.test", "/a").expect("GET").status, 200);
    }
    assert_eq!(
        s.echo3.connections(),
        1,
        "reused within the 1 s idle timeout"
    );
    // The upstream connection was last used before this answer arrived: idle from then on.
    // Time passing the timeout is what this test is about, so it waits for exactly that.
    let idle_since = Instant::now();
    let past_timeout = Duration::from_millis(1100);
    assert!(wait_until(past_timeout * 2, || idle_since.elapsed() >= past_timeout));
    assert_eq!(client.get("idle.test", "/b").expect("GET").status, 200);
    assert_eq!(client.connects, 1);
    assert_eq!(
        s.echo3.connections(),
        2,
        "a new upstream connection after more than the idle timeout"
    );
    expect_fast(&s.portico, 3.0, 3);
}

#[test]
fn upstream_framings_pass_through() {
    let s = start(&[]);
    let mut client = HttpClient::new(s.http);

    let chunked = client.get("raw.test", "/chunked").expect("chunked");
    assert_eq!(chunked.status, 200, "{}", s.portico.log());
    assert_eq!(chunked.text(), "hello, world");

    let early = client.get("raw.test", "/early").expect("103 then 200");
    assert_eq!(early.status, 200);
    assert_eq!(early.text(), "final");

    let head = client
        .request("HEAD", "raw.test", "/early", &[], b"")
        .expect("HEAD");
    assert_eq!(head.status, 200);
    assert_eq!(
        client.connects, 1,
        "kept alive through chunked, 103 and HEAD"
    );

    // No length: the body ends with the upstream's connection, so the fast path closes the
    // client's too (pingora frames such a body in chunks and keeps the connection).
    let close = client.get("raw.test", "/close").expect("close-delimited");
    assert_eq!(close.status, 200);
    assert_eq!(close.text(), "until the end");
    if fast_path_on() {
        assert_eq!(
            close.header("connection"),
            Some("close"),
            "the client is told the connection closes"
        );
    }

    let ten = client
        .get("raw.test", "/http10")
        .expect("HTTP/1.0 upstream");
    assert_eq!(ten.status, 200);
    assert_eq!(ten.text(), "ten ok");
    expect_fast(&s.portico, 5.0, 5);
}

#[test]
fn large_bodies_cross_whole_and_the_connection_goes_on() {
    // Bodies larger than the small read size take the large reads; the buffer they grew
    // is not kept, and the next (small) answer on the same connections is whole.
    let s = start(&[]);
    let mut client = HttpClient::new(s.http);
    for path in ["/large", "/large-chunked", "/large"] {
        let r = client.get("raw.test", path).expect(path);
        assert_eq!(r.status, 200, "{path}: {}", s.portico.log());
        assert!(
            r.body == large_body(),
            "{path}: {} bytes, not the upstream's",
            r.body.len()
        );
    }
    let small = client
        .get("raw.test", "/chunked")
        .expect("small after large");
    assert_eq!(small.text(), "hello, world");
    assert_eq!(client.connects, 1, "one client connection throughout");
    expect_fast(&s.portico, 4.0, 4);
}

#[test]
fn an_upstream_connection_closed_after_its_answer_is_not_reused_blindly() {
    let s = start(&[]);
    let mut client = HttpClient::new(s.http);
    for i in 0..3 {
        let resp = client.get("raw.test", "/once").expect("GET /once");
        assert_eq!(resp.status, 200, "request {i}: {}", s.portico.log());
        assert_eq!(resp.text(), "once");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(client.connects, 1);
    expect_fast(&s.portico, 3.0, 3);
}

#[test]
fn a_malformed_request_head_gets_400_from_the_front_with_a_log_line() {
    let s = start(&[]);
    let mut conn = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: fast.test\r\nbad header\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("connection: close"), "{answer:?}");
    expect_handoffs(&s.portico, "head", 0.0);
    assert_eq!(s.echo.count(), 0);
    let logged = wait_until(Duration::from_secs(5), || {
        s.portico.stdout().lines().any(|l| {
            l.contains("\"response_code\":400")
                && l.contains("\"response_code_details\":\"http1.codec_error\"")
        })
    });
    assert!(
        logged,
        "the refusal has an access log line:\n{}",
        s.portico.stdout()
    );
}

#[test]
fn no_fast_path_serves_everything_with_pingora() {
    let s = start(&[("PORTICO_NO_FAST_PATH", "true")]);
    let resp = http_get(s.http, "fast.test", "/x");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["headers"]["x-route"], "plain");
    assert!(
        wait_until(Duration::from_secs(5), || metric_sum(
            &s.portico.metrics(),
            "portico_requests_total",
            ""
        ) == Some(1.0)),
        "the request is counted"
    );
    assert_eq!(fast_requests(&s.portico), 0.0);
}

#[test]
fn h2_streams_take_the_fast_path_and_share_upstream_connections() {
    let s = start(&[]);
    let mut h2 = H2Client::connect(s.https, "fast.test").expect("h2 connection");
    let paths: Vec<String> = (0..20).map(|i| format!("/h2/{i}?q={i}")).collect();
    let requests: Vec<H2Request> = paths
        .iter()
        .map(|p| {
            let cookies = vec![("cookie", "a=1"), ("cookie", "b=2")];
            ("GET", "fast.test", p.as_str(), cookies, &b""[..])
        })
        .collect();
    for (path, answer) in paths.iter().zip(h2.send_all(&requests)) {
        let r = answer.unwrap_or_else(|e| panic!("{path}: {e}\n{}", s.portico.log()));
        assert_eq!(r.status, 200, "{path}");
        let j = r.json();
        assert_eq!(j["path"], path.as_str());
        assert_eq!(j["headers"]["host"], "fast.test", ":authority becomes Host");
        assert_eq!(j["headers"]["x-forwarded-proto"], "https");
        assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(
            j["headers"]["x-route"], "plain",
            "the route's request header"
        );
        assert_eq!(
            j["headers"]["cookie"], "a=1; b=2",
            "cookies joined on one line"
        );
        assert!(j["headers"]["x-request-id"]
            .as_str()
            .is_some_and(|v| v.len() >= 16));
        assert_eq!(
            r.header("x-served"),
            Some("gw"),
            "the route's response header"
        );
        assert_eq!(r.header("x-upstream"), Some("v1"));
    }
    expect_fast(&s.portico, 20.0, 20);
    expect_handoffs(&s.portico, "request", 0.0);
    // One after another, the streams reuse the upstream connections the burst opened.
    let opened = s.echo.connections();
    assert!((1..=20).contains(&opened), "{opened} upstream connections");
    for i in 0..5 {
        let r = h2.get("fast.test", "/again").expect("GET over h2");
        assert_eq!(r.status, 200, "request {i}");
    }
    if fast_path_on() {
        // The fast path's pool gives a connection back before the response's last frame
        // goes out; pingora's after it, and a stream that arrives in between
        // may open another (seen under load).
        assert_eq!(s.echo.connections(), opened, "no new upstream connection");
    }
    expect_fast(&s.portico, 25.0, 25);
    assert!(
        wait_until(Duration::from_secs(5), || s
            .portico
            .stdout()
            .contains(r#""protocol":"HTTP/2""#)),
        "the access log line says HTTP/2:\n{}",
        s.portico.stdout()
    );
}

/// An h2 connection with no stream in progress gives its codec's buffers and its stream
/// tables back (vendored h2 patch, vendor/README.md) and takes new ones for its next
/// frames: heads and bodies larger than those buffers (a 20 KiB field that HPACK
/// Huffman-codes, a 12 KiB body, answers of ~40 KiB) cross whole, one stream after another,
/// then many at once, then one at a time again after the burst's tables were given back.
#[test]
fn an_h2_connection_that_went_idle_carries_large_heads_and_bodies_again() {
    let s = start(&[]);
    let mut h2 = H2Client::connect(s.https, "fast.test").expect("h2 connection");
    let big = "abcdefghij".repeat(2048);
    let body = vec![b'b'; 12 * 1024];
    let length = body.len().to_string();
    let request = |i: usize| {
        let path = format!("/idle/{i}");
        (
            path,
            vec![("x-big", big.as_str()), ("content-length", length.as_str())],
        )
    };
    let check = |r: &Response, path: &str| {
        assert_eq!(r.status, 200, "{path}: {}", s.portico.log());
        let j = r.json();
        assert_eq!(j["path"], path);
        assert_eq!(j["headers"]["x-big"].as_str(), Some(big.as_str()), "{path}");
        assert_eq!(j["body"].as_str().map(str::len), Some(body.len()), "{path}");
    };
    let mut send = |range: std::ops::Range<usize>| {
        let batch: Vec<_> = range.map(request).collect();
        let requests: Vec<H2Request<'_>> = batch
            .iter()
            .map(|(path, headers)| {
                (
                    "POST",
                    "fast.test",
                    path.as_str(),
                    headers.clone(),
                    &body[..],
                )
            })
            .collect();
        for ((path, _), answer) in batch.iter().zip(h2.send_all(&requests)) {
            check(
                answer.as_ref().unwrap_or_else(|e| panic!("{path}: {e}")),
                path,
            );
        }
    };
    // One at a time: between two, the connection has no stream.
    for i in 0..3 {
        send(i..i + 1);
    }
    send(3..11);
    for i in 11..13 {
        send(i..i + 1);
    }
    send(13..21);
    expect_fast(&s.portico, 21.0, 21);
}

#[test]
fn an_h2_stream_with_a_body_goes_to_pingora_and_its_siblings_stay() {
    let s = start(&[]);
    let mut h2 = H2Client::connect(s.https, "fast.test").expect("h2 connection");
    // No content-length: a body of unknown length, pingora's.
    let answers = h2.send_all(&[
        ("POST", "fast.test", "/post", vec![], b"over h2"),
        ("GET", "fast.test", "/get", vec![], b""),
    ]);
    let post = answers[0].as_ref().expect("POST over h2");
    assert_eq!(post.status, 200, "{}", s.portico.log());
    assert_eq!(post.json()["body"], "over h2");
    assert_eq!(post.json()["headers"]["x-route"], "plain");
    let get = answers[1].as_ref().expect("GET over h2");
    assert_eq!(get.json()["path"], "/get");
    expect_handoffs(&s.portico, "request", 1.0);
    expect_fast(&s.portico, 1.0, 2);
    // The connection goes on after the handover.
    assert_eq!(h2.get("fast.test", "/after").expect("GET").status, 200);
    expect_fast(&s.portico, 2.0, 3);
}

#[test]
fn upstream_framings_become_h2_data() {
    let s = start(&[]);
    let mut h2 = H2Client::connect(s.https, "fast.test").expect("h2 connection");
    for (path, body) in [
        ("/chunked", "hello, world"),
        ("/close", "until the end"),
        ("/http10", "ten ok"),
        ("/early", "final"),
        ("/once", "once"),
        ("/once", "once"),
    ] {
        let r = h2
            .get("raw.test", path)
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", s.portico.log()));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.text(), body, "{path}");
        assert!(r.header("transfer-encoding").is_none(), "{path}");
    }
    // Header values as the upstream sent them (the fast path slices them out of one copy
    // of the head).
    let r = h2.get("raw.test", "/headers").expect("/headers");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(r.header("x-empty"), Some(""));
    assert_eq!(r.header("x-mixed-case"), Some("Value,  with spaces"));
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(r.header_all("x-twice"), ["1", "2"]);
    let head = h2.send_all(&[("HEAD", "raw.test", "/early", vec![], b"")]);
    let head = head[0].as_ref().expect("HEAD over h2");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("5"));
    assert!(head.body.is_empty());
    // Cut short by the upstream: the stream is reset, not ended as if whole.
    let short = h2.get("raw.test", "/short");
    assert!(short.is_err(), "{short:?}");
    assert_eq!(h2.get("fast.test", "/next").expect("GET after").status, 200);
    // Large bodies (the large reads), with a length and chunked, byte for byte.
    for path in ["/large", "/large-chunked"] {
        let r = h2.get("raw.test", path).expect(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body == large_body(), "{path}: {} bytes", r.body.len());
    }
    expect_fast(&s.portico, 12.0, 12);
}

#[test]
fn h2_clients_with_small_windows_get_large_bodies_whole() {
    // A stream reads its upstream only as far as the stream has room to send: with a
    // 1 000-byte window every read and every DATA frame is that small, and four such
    // streams at once share the connection's window.
    let s = start(&[]);
    let mut h2 = H2Client::connect_with_window(s.https, "fast.test", 1000).expect("h2");
    let requests: Vec<H2Request> = ["/large", "/large-chunked", "/large", "/large-chunked"]
        .iter()
        .map(|p| ("GET", "raw.test", *p, vec![], &b""[..]))
        .collect();
    for (r, path) in h2
        .send_all(&requests)
        .into_iter()
        .zip(["/large", "/large-chunked"].iter().cycle())
    {
        let r = r.unwrap_or_else(|e| panic!("{path}: {e}\n{}", s.portico.log()));
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body == large_body(), "{path}: {} bytes", r.body.len());
    }
    expect_fast(&s.portico, 4.0, 4);
}

#[test]
fn an_h2_stream_to_a_refusing_upstream_gets_503_and_the_connection_goes_on() {
    let s = start(&[]);
    let mut h2 = H2Client::connect(s.https, "fast.test").expect("h2 connection");
    let r = h2.get("down.test", "/").expect("an answer");
    assert_eq!(r.status, 503, "{}", s.portico.log());
    assert_eq!(r.text(), "upstream connect error\n");
    let ok = h2
        .get("fast.test", "/still")
        .expect("GET on the same connection");
    assert_eq!(ok.status, 200);
    expect_fast(&s.portico, 2.0, 2);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = s.portico.stdout();
            out.contains(r#""response_flags":"URX""#)
                && out.contains(r#""upstream_request_attempt_count":3"#)
        }),
        "the access log has URX (Istio's default two retries on connect failure):\n{}",
        s.portico.stdout()
    );
}

#[test]
fn a_short_body_is_forwarded_by_the_fast_path_a_long_one_by_pingora() {
    let s = start(&[]);
    let mut client = HttpClient::new(s.http);
    let post = client
        .request("POST", "fast.test", "/short", &[], b"{\"a\":1}")
        .expect("POST");
    assert_eq!(post.status, 200, "{}", s.portico.log());
    assert_eq!(post.json()["body"], "{\"a\":1}");
    assert_eq!(post.json()["method"], "POST");
    assert_eq!(post.json()["headers"]["x-route"], "plain");
    expect_fast(&s.portico, 1.0, 1);
    assert!(
        wait_until(Duration::from_secs(5), || s
            .portico
            .stdout()
            .contains(r#""bytes_received":7,"#)),
        "the access log counts the body:\n{}",
        s.portico.stdout()
    );

    // A body that arrives in pieces is waited for.
    let mut conn = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"PUT /slow HTTP/1.1\r\nHost: fast.test\r\nContent-Length: 10\r\n\r\nfirst")
        .unwrap();
    thread::sleep(Duration::from_millis(100));
    conn.write_all(b"-half").unwrap();
    let slow = read_response(&mut BufReader::new(conn), "PUT").expect("PUT answer");
    assert_eq!(slow.json()["body"], "first-half");
    expect_fast(&s.portico, 2.0, 2);

    // Longer than 16 KiB: pingora streams it.
    let long = vec![b'x'; 20_000];
    let big = client
        .request("PUT", "fast.test", "/long", &[], &long)
        .expect("PUT");
    assert_eq!(big.status, 200);
    assert_eq!(big.json()["body"].as_str().map(str::len), Some(20_000));
    expect_handoffs(&s.portico, "request", 1.0);
    expect_fast(&s.portico, 2.0, 3);
    assert_eq!(s.echo.count(), 3);
}

#[test]
fn h2_streams_with_a_short_body_stay_and_streams_the_fast_path_refuses_are_answered() {
    let s = start(&[]);
    let mut h2 = H2Client::connect(s.https, "fast.test").expect("h2 connection");
    let answers = h2.send_all(&[
        (
            "POST",
            "fast.test",
            "/with-length",
            vec![("content-length", "7")],
            b"h2 body",
        ),
        // Not the fast path's (gRPC): handed to pingora, which answers it.
        (
            "GET",
            "fast.test",
            "/grpc-ish",
            vec![("content-type", "application/grpc")],
            b"",
        ),
    ]);
    let post = answers[0].as_ref().expect("POST with a length");
    assert_eq!(post.status, 200, "{}", s.portico.log());
    assert_eq!(post.json()["body"], "h2 body");
    assert_eq!(post.json()["headers"]["content-length"], "7");
    let other = answers[1].as_ref().expect("the refused stream is answered");
    assert_eq!(other.status, 200);
    assert_eq!(other.json()["path"], "/grpc-ish");
    expect_fast(&s.portico, 1.0, 2);
    expect_handoffs(&s.portico, "request", 1.0);
    assert!(
        wait_until(Duration::from_secs(5), || s
            .portico
            .stdout()
            .contains(r#""bytes_received":7,"#)),
        "the access log counts the body:\n{}",
        s.portico.stdout()
    );
}
