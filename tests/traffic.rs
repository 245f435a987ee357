//! Traffic management against real upstreams: retries, timeouts, circuit breaking, outlier
//! detection, fault injection, mirroring, consistent hashing, CORS and source matching.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// A gateway on one plain HTTP port with `routes` (TOML `[[virtualServices.http]]` blocks)
/// for host `app.test`, and a ServiceEntry `backend.internal` with one endpoint per port.
struct Setup {
    portico: Portico,
    http: u16,
    _tmp: tempfile::TempDir,
}

fn backend(ports: &[u16], traffic_policy: &str) -> String {
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("{{ address = \"127.0.0.1\", ports = {{ http = {p} }} }}"))
        .collect();
    format!(
        r#"
[[serviceEntries]]
name = "backend"
hosts = ["backend.internal"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{}]

[[destinationRules]]
name = "backend"
host = "backend.internal"
{traffic_policy}
"#,
        endpoints.join(", ")
    )
}

/// A STATIC ServiceEntry `NAME.internal` (port 80, HTTP) with one endpoint on 127.0.0.1.
fn entry(name: &str, port: u16) -> String {
    format!(
        r#"
[[serviceEntries]]
name = "{name}"
hosts = ["{name}.internal"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ http = {port} }} }}]
"#
    )
}

const TO_BACKEND: &str =
    r#"route = [{ destination = { host = "backend.internal", port = { number = 80 } } }]"#;

fn start(routes: &str, backend: &str) -> Setup {
    start_with(routes, backend, &[])
}

/// As [`start`], with `portico run` arguments.
fn start_with(routes: &str, backend: &str, args: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = format!(
        r#"{mesh}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "app"
hosts = ["app.test"]
gateways = ["edge"]
{routes}
{backend}
"#,
        mesh = mesh_config(free_port()),
    );
    let portico = Portico::start_with_args(tmp.path(), &config, args);
    Setup {
        portico,
        http,
        _tmp: tmp,
    }
}

impl Setup {
    fn get(&self, path: &str) -> Response {
        http_request(self.http, "GET", "app.test", path, &[], b"")
    }

    /// Waits for `n` access log lines (one per request) and returns them.
    fn log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let lines = || -> Vec<serde_json::Value> {
            self.portico
                .stdout()
                .lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
                .collect()
        };
        assert!(
            wait_until(Duration::from_secs(5), || lines().len() >= n),
            "{n} access log lines expected:\n{}",
            self.portico.stdout()
        );
        let lines = lines();
        assert_eq!(lines.len(), n, "one line per request");
        lines
    }
}

/// `(response_code, response_flags)` of each line, sorted.
fn codes_and_flags(lines: &[serde_json::Value]) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = lines
        .iter()
        .map(|l| {
            (
                l["response_code"].as_u64().unwrap_or(0),
                l["response_flags"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn retries_until_the_upstream_recovers() {
    let echo = Echo::start("flaky");
    let routes = format!(
        "[[virtualServices.http]]\n{TO_BACKEND}\nretries = {{ attempts = 3, retryOn = \"5xx\" }}\n"
    );
    let s = start(&routes, &backend(&[echo.port()], ""));
    // Fails twice, then answers: the third try succeeds.
    let resp = s.get("/flaky/2/a");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(echo.count(), 3);
    // Fails four times: 1 try + 3 retries all fail, and the client gets the last 503.
    echo.reset_count();
    let resp = s.get("/flaky/4/b");
    assert_eq!(resp.status, 503);
    assert_eq!(echo.count(), 4, "exactly 1 + attempts tries");
}

#[test]
fn retry_on_only_retries_what_it_names() {
    let echo = Echo::start("e");
    let routes = format!(
        "[[virtualServices.http]]\n{TO_BACKEND}\nretries = {{ attempts = 3, retryOn = \"gateway-error,409\" }}\n"
    );
    let s = start(&routes, &backend(&[echo.port()], ""));
    assert_eq!(s.get("/status/500").status, 500);
    assert_eq!(echo.count(), 1, "500 is not a gateway error: no retry");
    echo.reset_count();
    assert_eq!(s.get("/status/502").status, 502);
    assert_eq!(echo.count(), 4, "502 is retried");
    echo.reset_count();
    assert_eq!(s.get("/status/409").status, 409);
    assert_eq!(echo.count(), 4, "a plain status code in retryOn is retried");
    // A POST with a body is retried too, its body replayed.
    echo.reset_count();
    let resp = http_request(s.http, "POST", "app.test", "/flaky/1/post", &[], b"payload");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["body"], "payload");
    assert_eq!(echo.count(), 2);
}

#[test]
fn without_retries_istio_default_retries_connect_failures_only() {
    let echo = Echo::start("e");
    let dead = free_port();
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\n"),
        &backend(
            &[dead, echo.port()],
            "trafficPolicy = { loadBalancer = { simple = \"ROUND_ROBIN\" } }",
        ),
    );
    for _ in 0..6 {
        // Half the tries hit the dead endpoint first; the default retry moves on.
        assert_eq!(s.get("/").status, 200);
    }
    echo.reset_count();
    assert_eq!(
        s.get("/status/503").status,
        503,
        "a 503 answer is not retried by default"
    );
    assert_eq!(echo.count(), 1);
}

#[test]
fn per_try_timeout_retries_a_slow_try() {
    let echo = Echo::start("e");
    let routes = format!(
        "[[virtualServices.http]]\n{TO_BACKEND}\nretries = {{ attempts = 2, perTryTimeout = \"300ms\", retryOn = \"5xx\" }}\n"
    );
    let s = start(&routes, &backend(&[echo.port()], ""));
    // The first try hangs for 5 s; the per-try timeout cuts it and the retry answers.
    let resp = s.get("/slowfirst/5000/k");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(echo.count(), 2);
}

#[test]
fn route_timeout_covers_retries_and_answers_504() {
    let echo = Echo::start("e");
    let routes = format!(
        "[[virtualServices.http]]\n{TO_BACKEND}\ntimeout = \"400ms\"\nretries = {{ attempts = 5, perTryTimeout = \"150ms\", retryOn = \"5xx\" }}\n"
    );
    let s = start(&routes, &backend(&[echo.port()], ""));
    let resp = s.get("/sleep/2000");
    assert_eq!(resp.status, 504, "{}", resp.text());
    let tries = echo.count();
    assert!(
        (2..=4).contains(&tries),
        "the route timeout ends the retries: {tries} tries"
    );
    let line = &s.log_lines(1)[0];
    assert_eq!(
        (
            line["response_code"].as_u64(),
            line["response_flags"].as_str()
        ),
        (Some(504), Some("UT")),
        "{line}"
    );
    let metrics = s.portico.metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_requests_total",
            "response_code=\"504\",response_flags=\"UT\""
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn circuit_breaker_rejects_the_overflow_fast() {
    let echo = Echo::start("e");
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\n"),
        &backend(
            &[echo.port()],
            "trafficPolicy = { connectionPool = { tcp = { maxConnections = 1 }, http = { http1MaxPendingRequests = 1 } } }",
        ),
    );
    let http = s.http;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            thread::spawn(move || http_request(http, "GET", "app.test", "/sleep/300", &[], b""))
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().unwrap().status)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let overflow = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + overflow, 20, "{statuses:?}");
    assert!(
        ok >= 2,
        "the admitted request and the pending one succeed: {statuses:?}"
    );
    assert!(overflow >= 10, "most of the burst overflows: {statuses:?}");
    assert_eq!(
        echo.max_concurrent(),
        1,
        "the upstream never sees more than the limit"
    );
    let flags = codes_and_flags(&s.log_lines(20));
    assert_eq!(
        flags
            .iter()
            .filter(|f| **f == (503, "UO".to_string()))
            .count(),
        overflow,
        "each overflow is logged with UO: {flags:?}"
    );
}

/// `http2MaxRequests` bounds the requests in flight to a cluster on its own (here with no
/// `tcp.maxConnections`): the upstream never sees two at once, the overflow gets 503 `UO`.
#[test]
fn http2_max_requests_limits_requests_in_flight() {
    let echo = Echo::start("e");
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\n"),
        &backend(
            &[echo.port()],
            "trafficPolicy = { connectionPool = { http = { http2MaxRequests = 1, http1MaxPendingRequests = 1 } } }",
        ),
    );
    let http = s.http;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            thread::spawn(move || http_request(http, "GET", "app.test", "/sleep/300", &[], b""))
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().unwrap().status)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let overflow = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + overflow, 20, "{statuses:?}");
    assert!(
        ok >= 2,
        "the admitted and the pending request succeed: {statuses:?}"
    );
    assert!(overflow >= 10, "most of the burst overflows: {statuses:?}");
    assert_eq!(echo.max_concurrent(), 1, "one request in flight at a time");
    let flags = codes_and_flags(&s.log_lines(20));
    assert_eq!(
        flags
            .iter()
            .filter(|f| **f == (503, "UO".to_string()))
            .count(),
        overflow,
        "{flags:?}"
    );
}

const EJECT_ALL: &str = "trafficPolicy = { outlierDetection = { consecutive5xxErrors = 2, interval = \"1s\", baseEjectionTime = \"@EJECT@\", maxEjectionPercent = 100 } }";

/// With its only endpoint ejected a cluster answers 503 `UH` without trying it. A reload
/// that changes only a VirtualService's file keeps the cluster and its ejection; one that
/// changes the file with the DestinationRule compiles every cluster again, without it.
#[test]
fn every_endpoint_ejected_is_503_uh_and_a_reload_keeps_the_ejection() {
    let echo = Echo::start("bad");
    echo.set_fail_status(503);
    let tmp = tempfile::tempdir().unwrap();
    let http = free_port();
    let main = |eject: &str| {
        format!(
            r#"include = ["routes.toml"]
{mesh}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
{backend}"#,
            mesh = mesh_config(free_port()),
            backend = backend(&[echo.port()], &EJECT_ALL.replace("@EJECT@", eject)),
        )
    };
    let routes = |extra: &str| {
        format!(
            r#"[[virtualServices]]
name = "app"
hosts = ["app.test"]
gateways = ["edge"]
[[virtualServices.http]]
match = [{{ uri = {{ prefix = "/extra" }} }}]
directResponse = {{ status = 200, body = {{ string = "{extra}" }} }}
[[virtualServices.http]]
{TO_BACKEND}
retries = {{ attempts = 0 }}
"#
        )
    };
    let routes_file = tmp.path().join("routes.toml");
    write_atomic(&routes_file, routes("one"));
    let main_text = main("60s");
    let s = Setup {
        portico: Portico::start(tmp.path(), &main_text),
        http,
        _tmp: tmp,
    };
    for _ in 0..2 {
        assert_eq!(s.get("/").status, 503);
    }
    assert_eq!(echo.count(), 2);
    let resp = s.get("/");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(echo.count(), 2, "the ejected endpoint is not tried");
    let lines = s.log_lines(3);
    assert_eq!(
        codes_and_flags(&lines),
        [
            (503, "-".to_string()),
            (503, "-".to_string()),
            (503, "UH".to_string())
        ],
        "{lines:?}"
    );

    // A reload of the VirtualService's file only: the cluster, and its ejection, stay.
    let g0 = s.portico.generation();
    write_atomic(&routes_file, routes("two"));
    s.portico.wait_generation_above(g0, Duration::from_secs(10));
    assert_eq!(s.get("/extra").text(), "two", "the new config serves");
    assert_eq!(s.get("/").status, 503);
    assert_eq!(echo.count(), 2, "still ejected after the reload");

    // A changed DestinationRule: every cluster compiled again, nothing ejected.
    let g1 = s.portico.generation();
    s.portico.rewrite_config(
        &main_text.replace("baseEjectionTime = \"60s\"", "baseEjectionTime = \"61s\""),
    );
    s.portico.wait_generation_above(g1, Duration::from_secs(10));
    assert_eq!(s.get("/").status, 503);
    assert_eq!(echo.count(), 3, "tried again by the new cluster");
}

/// `minHealthPercent`: once the healthy share of a cluster falls below it, requests go to
/// every endpoint, ejected or not (Envoy's panic mode); above it, ejections hold.
#[test]
fn min_health_percent_routes_to_all_endpoints_below_it() {
    let good = Echo::start("good");
    let bad = Echo::start("bad");
    bad.set_fail_status(503);
    let policy = |min_health: u32| {
        format!("trafficPolicy = {{ loadBalancer = {{ simple = \"ROUND_ROBIN\" }}, outlierDetection = {{ consecutive5xxErrors = 1, interval = \"1s\", baseEjectionTime = \"60s\", maxEjectionPercent = 100, minHealthPercent = {min_health} }} }}")
    };
    let routes = format!("[[virtualServices.http]]\n{TO_BACKEND}\nretries = {{ attempts = 0 }}\n");
    // One of two ejected leaves 50 % healthy: below 60 %, panic; not below 40 %.
    for (min_health, panic) in [(60, true), (40, false)] {
        good.reset_count();
        bad.reset_count();
        let s = start(
            &routes,
            &backend(&[good.port(), bad.port()], &policy(min_health)),
        );
        for _ in 0..20 {
            s.get("/");
        }
        assert_eq!(good.count() + bad.count(), 20);
        if panic {
            assert!(
                bad.count() >= 5,
                "minHealthPercent {min_health}: the ejected endpoint still gets requests ({} of 20)",
                bad.count()
            );
        } else {
            assert_eq!(
                bad.count(),
                1,
                "minHealthPercent {min_health}: ejected after its first 503"
            );
        }
    }
}

#[test]
fn outlier_detection_ejects_and_brings_back() {
    let good1 = Echo::start("good1");
    let good2 = Echo::start("good2");
    let bad = Echo::start("bad");
    bad.set_fail_status(503);
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\nretries = {{ attempts = 0 }}\n"),
        &backend(
            &[good1.port(), good2.port(), bad.port()],
            "trafficPolicy = { loadBalancer = { simple = \"ROUND_ROBIN\" }, outlierDetection = { consecutive5xxErrors = 3, interval = \"1s\", baseEjectionTime = \"1s\", maxEjectionPercent = 100 } }",
        ),
    );
    for _ in 0..60 {
        s.get("/");
    }
    assert_eq!(bad.count(), 3, "ejected after 3 consecutive 503s");
    assert_eq!(good1.count() + good2.count(), 57);
    // After baseEjectionTime the endpoint is tried again (and, still failing, ejected again).
    thread::sleep(Duration::from_millis(1200));
    for _ in 0..30 {
        s.get("/");
    }
    assert!(bad.count() > 3, "tried again after the ejection time");
    assert!(bad.count() <= 6, "and ejected again: {}", bad.count());
}

#[test]
fn fault_abort_percentage_holds_and_delay_is_applied() {
    let echo = Echo::start("e");
    let routes = format!(
        "[[virtualServices.http]]\nmatch = [{{ uri = {{ prefix = \"/abort\" }} }}]\n{TO_BACKEND}\nfault = {{ abort = {{ httpStatus = 555, percentage = {{ value = 50.0 }} }} }}\n\
         [[virtualServices.http]]\nmatch = [{{ uri = {{ prefix = \"/delay\" }} }}]\n{TO_BACKEND}\nfault = {{ delay = {{ fixedDelay = \"300ms\", percentage = {{ value = 100.0 }} }} }}\n\
         [[virtualServices.http]]\nmatch = [{{ uri = {{ prefix = \"/nopct\" }} }}]\n{TO_BACKEND}\nfault = {{ abort = {{ httpStatus = 500 }} }}\n"
    );
    let s = start(&routes, &backend(&[echo.port()], ""));
    let mut client = HttpClient::new(s.http);
    let mut aborted = 0;
    // Enough to tell 50 % from 40 % or 60 %.
    let n = 2500;
    assert!(binomial_tells_apart(n, 0.5, 0.4));
    for _ in 0..n {
        let resp = client.get("app.test", "/abort").unwrap();
        match resp.status {
            555 => aborted += 1,
            200 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_binomial(aborted, n, 0.5, "aborted");
    assert_eq!(
        echo.count(),
        n - aborted,
        "aborted requests never reach the upstream"
    );

    let started = Instant::now();
    assert_eq!(client.get("app.test", "/delay").unwrap().status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "delayed by fixedDelay"
    );

    for _ in 0..50 {
        assert_eq!(
            client.get("app.test", "/nopct").unwrap().status,
            200,
            "no percentage injects nothing"
        );
    }
}

/// A server that accepts connections and reads requests but never answers.
fn black_hole() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let deadline = Instant::now() + Duration::from_secs(30);
                conn.set_read_timeout(Some(Duration::from_millis(500))).ok();
                while Instant::now() < deadline {
                    match conn.read(&mut buf) {
                        Ok(0) => return,
                        _ => continue,
                    }
                }
            });
        }
    });
    (port, accepted)
}

#[test]
fn mirroring_copies_requests_and_never_slows_the_client() {
    let primary = Echo::start("primary");
    let shadow = Echo::start("shadow");
    let (hole, hole_accepted) = black_hole();
    let routes = r#"
[[virtualServices.http]]
match = [{ uri = { prefix = "/copy" } }]
route = [{ destination = { host = "backend.internal", port = { number = 80 } } }]
mirror = { host = "shadow.internal", port = { number = 80 } }

[[virtualServices.http]]
match = [{ uri = { prefix = "/hang" } }]
route = [{ destination = { host = "backend.internal", port = { number = 80 } } }]
mirror = { host = "hole.internal", port = { number = 80 } }
mirrorPercentage = { value = 100.0 }
"#;
    let extra = entry("shadow", shadow.port()) + &entry("hole", hole);
    let s = start(routes, &(backend(&[primary.port()], "") + &extra));
    for i in 0..10 {
        let resp = s.get(&format!("/copy/{i}"));
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.upstream(),
            Some("primary"),
            "the client gets the primary's answer"
        );
    }
    let post = http_request(
        s.http,
        "POST",
        "app.test",
        "/copy/post",
        &[],
        b"mirrored body",
    );
    assert_eq!(post.status, 200);
    assert!(
        wait_until(Duration::from_secs(5), || shadow.count() == 11),
        "the mirror got every copy: {}",
        shadow.count()
    );
    let seen = shadow.requests();
    assert!(
        seen.iter().all(|(_, _, host)| host == "app.test-shadow"),
        "{seen:?}"
    );
    assert!(seen
        .iter()
        .any(|(m, p, _)| m == "POST" && p == "/copy/post"));

    // A mirror that never answers: every client request still completes, and promptly
    // enough that 20 in a row finish long before the mirror's own timeout.
    let started = Instant::now();
    for i in 0..20 {
        assert_eq!(s.get(&format!("/hang/{i}")).status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the hanging mirror is not waited for"
    );
    assert!(
        hole_accepted.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "copies were sent to it"
    );
}

/// A mirror's copies travel as the requests themselves do: a chunked body arrives whole
/// with its length, the mirror's answers are read to their end so its connections are
/// used again, and a connection its upstream spoiled (a response nobody asked for after a
/// 204) is never used again.
#[test]
fn mirror_copies_arrive_whole_on_reused_connections_and_never_on_a_spoiled_one() {
    let primary = Echo::start("primary");
    let shadow = support::scripted::Scripted::start();
    let routes = r#"
[[virtualServices.http]]
route = [{ destination = { host = "backend.internal", port = { number = 80 } } }]
mirror = { host = "shadow.internal", port = { number = 80 } }
mirrorPercentage = { value = 100.0 }
"#;
    let extra = entry("shadow", shadow.port());
    // One worker thread: one pool of idle upstream connections, so which connection a
    // copy takes is not left to which thread serves it.
    let s = start_with(
        routes,
        &(backend(&[primary.port()], "") + &extra),
        &["--threads", "1"],
    );
    let copies = |prefix: &str, n: usize| {
        assert!(
            wait_until(Duration::from_secs(5), || shadow.received_for(prefix).len()
                == n),
            "{n} copies of {prefix}: {:?}",
            shadow.received_for(prefix)
        );
        shadow.received_for(prefix)
    };

    // One at a time, with time for each copy's answer to be read before the next copy.
    for i in 0..6 {
        assert_eq!(s.get(&format!("/ok/{i}")).status, 200);
        copies(&format!("/ok/{i}"), 1);
        thread::sleep(Duration::from_millis(150));
    }
    let used: std::collections::BTreeSet<usize> =
        copies("/ok/", 6).iter().map(|r| r.connection).collect();
    assert!(
        used.len() < 6,
        "copies go on pooled connections, not a new one each: {used:?}"
    );

    // A chunked body: the copy carries it whole, with its length.
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    std::io::Write::write_all(
        &mut conn,
        b"POST /ok/chunked HTTP/1.1\r\nHost: app.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut conn, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let post = &copies("/ok/chunked", 1)[0];
    assert_eq!(post.body, b"hello world");
    assert_eq!(post.header_all("content-length"), ["11"]);
    assert!(post.header_all("transfer-encoding").is_empty(), "{post:?}");
    assert_eq!(post.header_all("host"), ["app.test-shadow"]);

    // A 204 and then, 100 ms later, a stray response: that connection is spoiled.
    assert_eq!(s.get("/stray204/x").status, 200);
    let spoiled = copies("/stray204/", 1)[0].connection;
    thread::sleep(Duration::from_millis(400));
    for i in 0..4 {
        assert_eq!(s.get(&format!("/ok/after/{i}")).status, 200);
        let copy = &copies(&format!("/ok/after/{i}"), 1)[0];
        assert_ne!(
            copy.connection, spoiled,
            "a copy went on the connection the stray response spoiled"
        );
    }
}

fn hash_config(ports: &[u16]) -> String {
    backend(
        ports,
        "trafficPolicy = { loadBalancer = { consistentHash = { httpHeaderName = \"x-user\", ringHash = { minimumRingSize = 1024 } } } }",
    )
}

#[test]
fn consistent_hash_is_sticky_and_moves_only_the_removed_endpoints_keys() {
    let echoes = [Echo::start("a"), Echo::start("b"), Echo::start("c")];
    let ports: Vec<u16> = echoes.iter().map(|e| e.port()).collect();
    let routes = format!("[[virtualServices.http]]\n{TO_BACKEND}\n");
    let s = start(&routes, &hash_config(&ports));
    let mut client = HttpClient::new(s.http);
    let mut owner = std::collections::HashMap::new();
    for user in 0..200 {
        let u = format!("user-{user}");
        let first = client
            .request("GET", "app.test", "/", &[("x-user", &u)], b"")
            .unwrap();
        for _ in 0..3 {
            let again = client
                .request("GET", "app.test", "/", &[("x-user", &u)], b"")
                .unwrap();
            assert_eq!(again.upstream(), first.upstream(), "{u} is sticky");
        }
        owner.insert(u, first.upstream().unwrap().to_string());
    }
    let used: std::collections::HashSet<&String> = owner.values().collect();
    assert_eq!(used.len(), 3, "keys spread over all endpoints");

    // Remove endpoint "c" by reloading the config without it.
    let g = s.portico.generation();
    let text = std::fs::read_to_string(&s.portico.config_path).unwrap();
    let without_c = text.replace(
        &format!(
            ", {{ address = \"127.0.0.1\", ports = {{ http = {} }} }}",
            ports[2]
        ),
        "",
    );
    assert_ne!(text, without_c);
    s.portico.rewrite_config(&without_c);
    s.portico.wait_generation_above(g, Duration::from_secs(10));
    let mut moved = 0;
    for (u, was) in &owner {
        let now = client
            .request("GET", "app.test", "/", &[("x-user", u)], b"")
            .unwrap();
        let now = now.upstream().unwrap().to_string();
        assert_ne!(now, "c");
        if was != "c" && &now != was {
            moved += 1;
        }
    }
    assert_eq!(
        moved, 0,
        "keys on the remaining endpoints stay where they were"
    );
}

/// A key whose endpoint is down: its connect failure is retried (Istio's default retry
/// policy) on another endpoint, the client gets the answer, and the key keeps going to
/// that same endpoint while its own is down.
#[test]
fn a_hashed_key_whose_endpoint_is_down_is_retried_on_another() {
    let echoes = [Echo::start("a"), Echo::start("b")];
    let dead = free_port();
    let ports = [echoes[0].port(), echoes[1].port(), dead];
    let routes = format!("[[virtualServices.http]]\n{TO_BACKEND}\n");
    let s = start(&routes, &hash_config(&ports));
    let mut client = HttpClient::new(s.http);
    let users = 60;
    for user in 0..users {
        let u = format!("user-{user}");
        let first = client
            .request("GET", "app.test", "/", &[("x-user", &u)], b"")
            .unwrap();
        assert_eq!(first.status, 200, "{u}: {}", first.text());
        let again = client
            .request("GET", "app.test", "/", &[("x-user", &u)], b"")
            .unwrap();
        assert_eq!(again.status, 200, "{u}: {}", again.text());
        assert_eq!(again.upstream(), first.upstream(), "{u} stays put");
    }
    let lines = s.log_lines(2 * users);
    let dead_addr = format!("127.0.0.1:{dead}");
    let retried: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["upstream_request_attempt_count"] == 2)
        .collect();
    assert!(
        !retried.is_empty(),
        "some keys hash to the dead endpoint (a third of the ring) and are retried"
    );
    for l in &lines {
        assert_eq!(l["response_code"], 200, "{l}");
        assert_eq!(l["response_flags"], "-", "{l}");
        assert_ne!(l["upstream_host"], dead_addr.as_str(), "{l}");
    }
}

#[test]
fn cookie_hash_sets_a_cookie_and_follows_it() {
    let echoes = [Echo::start("a"), Echo::start("b"), Echo::start("c")];
    let ports: Vec<u16> = echoes.iter().map(|e| e.port()).collect();
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\n"),
        &backend(
            &ports,
            "trafficPolicy = { loadBalancer = { consistentHash = { httpCookie = { name = \"sticky\", ttl = \"60s\" }, maglev = { tableSize = 65537 } } } }",
        ),
    );
    let first = s.get("/");
    let set = first
        .header("set-cookie")
        .expect("a cookie is set")
        .to_string();
    assert!(
        set.starts_with("sticky=") && set.contains("Max-Age=60"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    for _ in 0..10 {
        let r = http_request(s.http, "GET", "app.test", "/", &[("cookie", &cookie)], b"");
        assert_eq!(r.upstream(), first.upstream());
        assert!(
            r.header("set-cookie").is_none(),
            "no new cookie when one is sent"
        );
    }
}

#[test]
fn cors_preflight_is_answered_by_the_gateway() {
    let echo = Echo::start("e");
    let routes = format!(
        "[[virtualServices.http]]\n{TO_BACKEND}\ncorsPolicy = {{ allowOrigins = [{{ exact = \"http://foo.example\" }}, {{ regex = \"https://.*\\\\.trusted\\\\.test\" }}], allowMethods = [\"POST\", \"GET\", \"OPTIONS\"], allowHeaders = [\"content-type\"], exposeHeaders = [\"x-upstream\"], maxAge = \"300s\", allowCredentials = true }}\n"
    );
    let s = start(&routes, &backend(&[echo.port()], ""));
    let pre = http_request(
        s.http,
        "OPTIONS",
        "app.test",
        "/x",
        &[
            ("origin", "http://foo.example"),
            ("access-control-request-method", "POST"),
        ],
        b"",
    );
    assert_eq!(pre.status, 200);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("http://foo.example")
    );
    assert_eq!(
        pre.header("access-control-allow-methods"),
        Some("POST,GET,OPTIONS")
    );
    assert_eq!(
        pre.header("access-control-allow-headers"),
        Some("content-type")
    );
    assert_eq!(pre.header("access-control-max-age"), Some("300"));
    assert_eq!(pre.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(echo.count(), 0, "the gateway answered the preflight");

    let simple = http_request(
        s.http,
        "GET",
        "app.test",
        "/x",
        &[("origin", "https://app.trusted.test")],
        b"",
    );
    assert_eq!(
        simple.header("access-control-allow-origin"),
        Some("https://app.trusted.test")
    );
    assert_eq!(
        simple.header("access-control-expose-headers"),
        Some("x-upstream")
    );

    let other = http_request(
        s.http,
        "OPTIONS",
        "app.test",
        "/x",
        &[
            ("origin", "http://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        b"",
    );
    assert!(other.header("access-control-allow-origin").is_none());
    assert_eq!(echo.count(), 2, "an unmatched preflight is forwarded");
}

#[test]
fn source_ip_matches_the_client_address() {
    let echo = Echo::start("e");
    let routes = format!(
        "[[virtualServices.http]]\nmatch = [{{ sourceIp = [\"10.0.0.0/8\"] }}]\ndirectResponse = {{ status = 403, body = {{ string = \"internal only\" }} }}\n\
         [[virtualServices.http]]\nmatch = [{{ uri = {{ prefix = \"/\" }}, sourceIp = [\"127.0.0.0/8\", \"::1\"] }}]\n{TO_BACKEND}\n"
    );
    let s = start(&routes, &backend(&[echo.port()], ""));
    assert_eq!(s.get("/").status, 200, "127.0.0.1 matches the second route");
    assert_eq!(echo.count(), 1);
}

/// `connectionPool.tcp.tcpKeepalive`: the gateway's upstream connection has TCP
/// keep-alive with the configured idle time (the kernel's default is 2 hours), on either
/// codec.
#[test]
fn tcp_keepalive_is_set_on_upstream_connections() {
    let echo = Echo::start("e");
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\n"),
        &backend(
            &[echo.port()],
            r#"trafficPolicy = { connectionPool = { tcp = { tcpKeepalive = { time = "600s", interval = "30s", probes = 3 } } } }"#,
        ),
    );
    assert_eq!(s.get("/").status, 200);
    // The connection stays pooled; the gateway's end is the one whose remote port is the
    // upstream's (the upstream's own end has no keep-alive).
    let timers = keepalive_timers_to(echo.port());
    assert!(!timers.is_empty(), "a pooled upstream connection is open");
    for t in timers {
        let t = t.expect("a keep-alive timer runs on the upstream connection");
        assert!(
            t > Duration::from_secs(500) && t <= Duration::from_secs(600),
            "the first probe is due after the configured 600 s idle time: {t:?}"
        );
    }
    // Without it, no timer.
    let plain = Echo::start("p");
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\n"),
        &backend(&[plain.port()], ""),
    );
    assert_eq!(s.get("/").status, 200);
    let timers = keepalive_timers_to(plain.port());
    assert!(!timers.is_empty(), "a pooled upstream connection is open");
    assert!(timers.iter().all(Option::is_none), "{timers:?}");
}

#[test]
fn max_requests_per_connection_recycles_upstream_connections() {
    let echo = Echo::start("e");
    let s = start(
        &format!("[[virtualServices.http]]\n{TO_BACKEND}\n"),
        &backend(
            &[echo.port()],
            "trafficPolicy = { connectionPool = { http = { maxRequestsPerConnection = 3 } } }",
        ),
    );
    let mut client = HttpClient::new(s.http);
    for _ in 0..9 {
        assert_eq!(client.get("app.test", "/").unwrap().status, 200);
    }
    assert_eq!(echo.count(), 9);
    // 9 requests at 3 per connection need 3 connections. Rarely one more: pingora's pool
    // gives up a pooled connection when its idle watcher, on another worker thread, has
    // not yet dropped its handle (`Arc::try_unwrap` in `reused_stream`), and connects anew.
    let n = echo.connections();
    assert!(
        (3..=4).contains(&n),
        "each upstream connection served at most 3 requests: {n} connections"
    );
}
