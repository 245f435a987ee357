//! Parity: one corpus of requests through both codecs (Portico's fast path, and pingora's
//! request cycle with `--no-fast-path`), each gateway with its own recording upstream.
//! What the upstream receives (request line, header fields, body) and what the client gets
//! (status, header fields, body) must be the same, but for what is random or about the
//! connection: `Date`, the value of a generated `x-request-id`, and `Connection:
//! keep-alive` (which HTTP/1.1 implies).

mod support;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::scripted::{Received, Scripted};
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
tls = { mode = "SIMPLE", serverCertificate = "p.crt", privateKey = "p.key" }

[[virtualServices]]
name = "parity"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
name = "edits"
match = [{ uri = { prefix = "/edits/" } }]
headers = { request = { set = { x-set = "route", x-forwarded-proto = "set-by-route" }, add = { x-add = "route" }, remove = ["x-remove-me", "x-forwarded-for"] }, response = { set = { x-resp-set = "route" }, add = { x-resp-add = "route" }, remove = ["x-drop"] } }
route = [{ destination = { host = "up.internal", port = { number = 80 } }, headers = { request = { set = { x-dest = "d" } }, response = { add = { x-dest-resp = "d" } } } }]
[[virtualServices.http]]
name = "by-request-id"
match = [{ uri = { prefix = "/rid/" }, headers = { x-request-id = {} } }]
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
headers = { response = { set = { x-matched = "request-id" } } }
[[virtualServices.http]]
name = "direct"
match = [{ uri = { prefix = "/direct" } }]
directResponse = { status = 418, body = { string = "short and stout\n" } }
headers = { response = { set = { x-direct = "yes" } } }
[[virtualServices.http]]
name = "redirect"
match = [{ uri = { prefix = "/old" } }]
redirect = { uri = "/new", redirectCode = 308 }
[[virtualServices.http]]
name = "rewrite"
match = [{ uri = { prefix = "/rw/" } }]
rewrite = { uri = "/ok/rewritten/", authority = "rewritten.internal" }
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "abort"
match = [{ uri = { prefix = "/abort" } }]
fault = { abort = { httpStatus = 429, percentage = { value = 100 } } }
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "cors"
match = [{ uri = { prefix = "/cors/" } }]
corsPolicy = { allowOrigins = [{ exact = "https://app.example" }], allowMethods = ["GET", "POST"], allowHeaders = ["x-a"], exposeHeaders = ["x-e"], maxAge = "60s" }
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "down"
match = [{ uri = { prefix = "/down" } }]
route = [{ destination = { host = "down.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "limited"
match = [{ uri = { prefix = "/limited/" } }]
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "timeout"
match = [{ uri = { prefix = "/slow/" } }]
timeout = "200ms"
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "per-try"
match = [{ uri = { prefix = "/never/" } }]
timeout = "5s"
retries = { attempts = 1, perTryTimeout = "150ms", retryOn = "gateway-error" }
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "delay"
match = [{ uri = { prefix = "/delayed/" } }]
fault = { delay = { fixedDelay = "20ms", percentage = { value = 100 } } }
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "mirrored"
match = [{ uri = { prefix = "/mirrored/" } }]
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
mirror = { host = "up.internal", port = { number = 80 } }
mirrorPercentage = { value = 100 }
[[virtualServices.http]]
name = "retry-5xx"
match = [{ uri = { prefix = "/fail/" } }]
retries = { attempts = 2, retryOn = "5xx" }
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "once"
match = [{ uri = { prefix = "/once/" } }]
route = [{ destination = { host = "once.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "hash-header"
match = [{ uri = { prefix = "/ok/" }, headers = { x-user = {} } }]
route = [{ destination = { host = "hashed.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "hash-cookie"
match = [{ uri = { prefix = "/cookie/" } }]
route = [{ destination = { host = "cookied.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "default"
match = [{ uri = { prefix = "/" } }]
route = [{ destination = { host = "up.internal", port = { number = 80 } } }]

[[rateLimits]]
name = "parity"
targetRefs = [{ kind = "VirtualService", name = "parity", sectionName = "limited" }]
[[rateLimits.local.rules]]
limit = { requests = 1, unit = "Hour" }

[[accessLists]]
name = "blocked"
targetRefs = [{ kind = "VirtualService", name = "parity" }]
key = "request.headers[x-blocked]"
overrides = ["yes"]
denyResponse = { status = 403, body = "blocked\n" }

[[serviceEntries]]
name = "up"
hosts = ["up.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @UP@ } }]

[[serviceEntries]]
name = "down"
hosts = ["down.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @DOWN@ } }]

[[serviceEntries]]
name = "once"
hosts = ["once.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @UP@ } }]

[[destinationRules]]
name = "once"
host = "once.internal"
trafficPolicy = { connectionPool = { http = { maxRequestsPerConnection = 1 } } }

[[serviceEntries]]
name = "hashed"
hosts = ["hashed.internal", "cookied.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @UP@ } }]

[[destinationRules]]
name = "hashed"
host = "hashed.internal"
trafficPolicy = { loadBalancer = { consistentHash = { httpHeaderName = "x-user" } } }

[[destinationRules]]
name = "cookied"
host = "cookied.internal"
trafficPolicy = { loadBalancer = { consistentHash = { httpCookie = { name = "sticky", ttl = "60s" } } } }
"#;

struct Side {
    portico: Portico,
    http: u16,
    https: u16,
    up: Scripted,
    _tmp: tempfile::TempDir,
}

fn start(no_fast_path: bool) -> Side {
    start_with(no_fast_path, "")
}

/// A gateway on [`CONFIG`] followed by `extra`.
fn start_with(no_fast_path: bool, extra: &str) -> Side {
    start_with_mesh(no_fast_path, "", extra)
}

/// A gateway on [`CONFIG`] with `mesh` added to its `[mesh]` table, followed by `extra`.
fn start_with_mesh(no_fast_path: bool, mesh: &str, extra: &str) -> Side {
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Scripted::start();
    let admin = free_port();
    let http = free_port();
    let https = free_port();
    write_cert(tmp.path(), "p", &["parity.test", "sticky.test"]);
    // A port nothing listens on.
    let down = free_port();
    let config = render(
        &format!("{CONFIG}\n{extra}"),
        &[
            ("MESH", format!("{}{mesh}", mesh_config(admin))),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
            ("UP", up.port().to_string()),
            ("DOWN", down.to_string()),
        ],
    );
    let env = (
        "PORTICO_NO_FAST_PATH",
        if no_fast_path { "true" } else { "false" },
    );
    let portico = Portico::start_with_env(tmp.path(), &config, &[env]);
    Side {
        portico,
        http,
        https,
        up,
        _tmp: tmp,
    }
}

/// A response as compared: status, header fields (lower-case names, sorted, without those
/// that may differ), body.
type Seen = (u16, Vec<(String, String)>, Vec<u8>);

/// A request as the upstream received it, as compared: request line, fields, body.
type Upstream = (String, Vec<(String, String)>, Vec<u8>);

/// One request of the corpus: name, method, target, extra header fields, body.
type Case = (
    &'static str,
    &'static str,
    String,
    Vec<(&'static str, &'static str)>,
    &'static [u8],
);

fn response_of(side: &Side, request: &str, method: &str) -> Seen {
    let mut s = TcpStream::connect(("127.0.0.1", side.http)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r, method)
        .unwrap_or_else(|e| panic!("no answer to {request:?}: {e}\n{}", side.portico.log()));
    let mut headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .filter(|(n, v)| {
            n != "date" && !(n == "connection" && v.eq_ignore_ascii_case("keep-alive"))
        })
        .map(|(n, v)| {
            if n == "x-request-id" {
                (n, "<id>".to_string())
            } else {
                generated_cookie(n, v)
            }
        })
        .collect();
    headers.sort();
    (resp.status, headers, resp.body)
}

/// A `Set-Cookie` the gateway made for a consistent-hash cookie (`sticky`), with its random
/// value as `<generated>`; any other field as it is.
fn generated_cookie(name: String, value: String) -> (String, String) {
    if name == "set-cookie" {
        if let Some(rest) = value.strip_prefix("sticky=") {
            let attributes = rest.find(';').map_or("", |i| &rest[i..]);
            return (name, format!("sticky=<generated>{attributes}"));
        }
    }
    (name, value)
}

/// What the upstream received for `path_prefix`, as compared: the request line, the
/// header fields (lower-case names, sorted; a generated x-request-id by presence), body.
fn received_of(side: &Side, marker: &str, want: usize) -> Vec<Upstream> {
    let mut got: Vec<Received> = Vec::new();
    wait_until(Duration::from_millis(500 * want as u64), || {
        got = side
            .up
            .received()
            .into_iter()
            .filter(|r| r.path.contains(marker))
            .collect();
        got.len() >= want
    });
    let mut seen: Vec<Upstream> = got
        .into_iter()
        .map(|r| {
            let mut headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|(n, v)| {
                    let n = n.to_ascii_lowercase();
                    let v = if n == "x-request-id" && v.len() == 36 {
                        "<generated>".to_string()
                    } else {
                        v.clone()
                    };
                    (n, v)
                })
                .collect();
            headers.sort();
            (format!("{} {}", r.method, r.path), headers, r.body)
        })
        .collect();
    // A request and its mirror's copy arrive in either order.
    seen.sort();
    seen
}

/// The corpus: (name, method, target, extra header lines, body). Each target carries a
/// unique marker so the upstream's records can be told apart.
fn corpus() -> Vec<Case> {
    vec![
        ("plain get", "GET", "/ok/plain-m1?x=1".into(), vec![], b""),
        ("head", "HEAD", "/ok/head-m2".into(), vec![], b""),
        (
            "post with body",
            "POST",
            "/echo/post-m3".into(),
            vec![
                ("content-type", "text/plain"),
                ("x-request-id", "fixed-for-echo"),
            ],
            b"hello",
        ),
        ("delete", "DELETE", "/ok/delete-m4".into(), vec![], b""),
        (
            "client x-forwarded-for, two lines",
            "GET",
            "/ok/xff-m5".into(),
            vec![
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
            ],
            b"",
        ),
        (
            "client x-forwarded-proto",
            "GET",
            "/ok/xfp-m6".into(),
            vec![("x-forwarded-proto", "spoofed")],
            b"",
        ),
        (
            "client request id kept",
            "GET",
            "/ok/rid-m7".into(),
            vec![("x-request-id", "client-id-1")],
            b"",
        ),
        (
            "route header edits, XFF removed and XFP set by the route",
            "GET",
            "/edits/e-m8".into(),
            vec![
                ("x-remove-me", "1"),
                ("x-forwarded-for", "9.9.9.9"),
                ("x-set", "client"),
            ],
            b"",
        ),
        (
            "route matching on the generated request id",
            "GET",
            "/rid/m9".into(),
            vec![],
            b"",
        ),
        (
            "hop-by-hop and proxy fields not passed on",
            "GET",
            "/ok/hop-m10".into(),
            vec![
                ("connection", "keep-alive, x-private"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic eDp5"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers"),
                ("x-private", "1"),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ],
            b"",
        ),
        (
            "proxy fields alone",
            "GET",
            "/ok/proxy-m25".into(),
            vec![
                ("proxy-authorization", "Basic eDp5"),
                ("http2-settings", "AAMAAABk"),
                ("te", "trailers"),
            ],
            b"",
        ),
        ("direct response", "GET", "/direct-m11".into(), vec![], b""),
        (
            "direct response to HEAD",
            "HEAD",
            "/direct-m12".into(),
            vec![],
            b"",
        ),
        ("redirect", "GET", "/old-m13?q=1".into(), vec![], b""),
        ("rewrite", "GET", "/rw/m14?y=2".into(), vec![], b""),
        ("fault abort", "GET", "/abort-m15".into(), vec![], b""),
        ("no route host", "GET", "/ok/m16".into(), vec![], b""),
        (
            "cors preflight",
            "OPTIONS",
            "/cors/m17".into(),
            vec![
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
            ],
            b"",
        ),
        (
            "cors simple",
            "GET",
            "/cors/m18".into(),
            vec![("origin", "https://app.example")],
            b"",
        ),
        ("upstream down", "GET", "/down-m19".into(), vec![], b""),
        ("upstream 503", "GET", "/fail/m20".into(), vec![], b""),
        (
            "upstream garbage",
            "GET",
            "/garbage/m21".into(),
            vec![],
            b"",
        ),
        // A POST: a GET that went out on a pooled connection would be resent once, on
        // both codecs, as pooled connections happen to be there or not.
        ("upstream reset", "POST", "/reset/m22".into(), vec![], b"x"),
        (
            "path normalized",
            "GET",
            "/ok/a/../norm-m23".into(),
            vec![],
            b"",
        ),
        (
            "response with both framings",
            "GET",
            "/clte/m24".into(),
            vec![],
            b"",
        ),
        // One request an hour on this route: the first passes with the RateLimit
        // fields, the second is refused (429, RL) and reaches no upstream.
        (
            "rate limit allows",
            "GET",
            "/limited/m26".into(),
            vec![],
            b"",
        ),
        (
            "rate limit refuses",
            "GET",
            "/limited/m27".into(),
            vec![],
            b"",
        ),
        (
            "access list denies",
            "GET",
            "/ok/blocked-m28".into(),
            vec![("x-blocked", "yes")],
            b"",
        ),
        // The route's timeout runs out before the upstream answers: 504 `UT`.
        ("route timeout", "GET", "/slow/1000/m29".into(), vec![], b""),
        // Each try runs out of its time; one retry, then 504.
        ("per-try timeout", "GET", "/never/m30".into(), vec![], b""),
        // Every try answers 503 and `retryOn = 5xx`: three tries, the last 503 passed on,
        // flagged URX (the retries ran out).
        ("retry on 5xx", "GET", "/fail/m31".into(), vec![], b""),
        // A fault's delay, then the upstream's answer: flagged DI.
        ("fault delay", "GET", "/delayed/m32".into(), vec![], b""),
        // Copied to the mirror (the same upstream here, as `Host: ...-shadow`): the
        // upstream receives the request and the copy, with its body.
        (
            "mirrored post",
            "POST",
            "/mirrored/m33".into(),
            vec![("content-type", "text/plain")],
            b"copy me",
        ),
        // One request per upstream connection (`maxRequestsPerConnection = 1`): the
        // upstream is asked to close it.
        (
            "last request on a connection",
            "GET",
            "/once/m34".into(),
            vec![],
            b"",
        ),
        // A destination that hashes on a header (`consistentHash.httpHeaderName`).
        (
            "consistent hash by header",
            "GET",
            "/ok/hash-m35".into(),
            vec![("x-user", "alice")],
            b"",
        ),
        // By a cookie with a ttl, which the request does not have: the gateway makes
        // one and appends its Set-Cookie after the upstream's own.
        ("hash cookie made", "GET", "/cookie/m36".into(), vec![], b""),
        // The cookie sent: no new one.
        (
            "hash cookie sent",
            "GET",
            "/cookie/m37".into(),
            vec![("cookie", "a=1; sticky=0123456789abcdef")],
            b"",
        ),
    ]
}

/// The `Set-Cookie` fields a case's response must have (cases of a consistent-hash
/// cookie), so that parity is not two codecs agreeing on a missing cookie.
fn expected_cookies(name: &str, seen: &Seen) {
    let want: &[&str] = match name {
        "hash cookie made" => &[
            "sticky=<generated>; Path=/; Max-Age=60; HttpOnly",
            "upstream=1; Path=/",
        ],
        "hash cookie sent" => &["upstream=1; Path=/"],
        _ => return,
    };
    let got: Vec<&str> = seen
        .1
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(got, want, "{name}: {seen:?}");
}

/// Cases whose status is known, so that parity is not two codecs agreeing on nothing
/// happening: the policies' refusals.
fn expected_status(name: &str, status: u16) {
    let want = match name {
        "rate limit allows" => 200,
        "rate limit refuses" => 429,
        "access list denies" => 403,
        "retry on 5xx" => 503,
        _ => return,
    };
    assert_eq!(status, want, "{name}");
}

#[test]
fn both_codecs_send_the_same_upstream_and_answer_the_same() {
    let fast = start(false);
    let pingora = start(true);
    let mut differences = Vec::new();
    // The cases the fast path lent to pingora's cycle.
    let mut lent = Vec::new();
    for (name, method, target, headers, body) in corpus() {
        let marker = target
            .rsplit('-')
            .next()
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .to_string();
        let host = if name == "no route host" {
            "nowhere.invalid"
        } else {
            "parity.test"
        };
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
        for (n, v) in &headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut req = req.into_bytes();
        req.extend_from_slice(body);
        let req = String::from_utf8(req).unwrap();
        let before = handed_over(&fast);
        let a = response_of(&fast, &req, method);
        if handed_over(&fast) != before {
            lent.push(name);
        }
        let b = response_of(&pingora, &req, method);
        expected_status(name, a.0);
        expected_cookies(name, &a);
        if a != b {
            differences.push(format!(
                "{name}: client gets\n  fast:    {a:?}\n  pingora: {b:?}"
            ));
        }
        let want = if name == "mirrored post" { 2 } else { 1 };
        let ua = received_of(&fast, &marker, want);
        let ub = received_of(&pingora, &marker, want);
        if ua != ub {
            differences.push(format!(
                "{name}: upstream receives\n  fast:    {ua:?}\n  pingora: {ub:?}"
            ));
        }
    }
    // The access log lines carry the same fields too.
    let lines = |side: &Side| -> BTreeMap<String, serde_json::Value> {
        side.portico
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|mut v| {
                for k in [
                    "start_time",
                    "duration",
                    "upstream_service_time",
                    "request_id",
                    "downstream_remote_address",
                    "upstream_host",
                    "downstream_local_address",
                ] {
                    v[k] = serde_json::Value::Null;
                }
                let key = format!("{} {}", v["method"], v["path"]);
                (key, v)
            })
            .collect()
    };
    wait_until(Duration::from_secs(5), || {
        lines(&fast).len() >= corpus().len() && lines(&pingora).len() >= corpus().len()
    });
    let (la, lb) = (lines(&fast), lines(&pingora));
    for (key, a) in &la {
        match lb.get(key) {
            Some(b) if a == b => {}
            b => differences.push(format!(
                "access log for {key}:\n  fast:    {a}\n  pingora: {b:?}"
            )),
        }
    }
    let retried = &la[r#""GET" "/fail/m31""#];
    assert_eq!(retried["response_flags"], "URX", "{retried}");
    assert_eq!(retried["upstream_request_attempt_count"], 3, "{retried}");
    let delayed = &la[r#""GET" "/delayed/m32""#];
    assert_eq!(delayed["response_flags"], "DI", "{delayed}");
    // The gateway's own replies after failed tries take their details from the flag.
    let timed_out = &la[r#""GET" "/slow/1000/m29""#];
    assert_eq!(
        timed_out["response_code_details"], "response_timeout",
        "{timed_out}"
    );
    let reset = &la[r#""POST" "/reset/m22""#];
    assert!(
        reset["response_code_details"]
            .as_str()
            .is_some_and(|d| d.starts_with("upstream_reset_before_response_started{")),
        "{reset}"
    );
    assert!(
        differences.is_empty(),
        "{} differences between the codecs:\n\n{}",
        differences.len(),
        differences.join("\n\n")
    );
    // Everything a route decides itself (answers, redirects, faults, CORS, rewrites,
    // timeouts, retries on a response status) stays on the fast path.
    // (The fast gateway is started with the fast path on whatever the environment says.)
    assert!(
        lent.is_empty(),
        "cases the fast path lent to pingora: {lent:?}"
    );
}

/// Requests (or h2 streams) the fast path lent to pingora's request cycle so far.
fn handed_over(side: &Side) -> f64 {
    metric_sum(
        &side.portico.metrics(),
        "portico_fast_path_handoffs_total",
        "",
    )
    .unwrap_or(0.0)
}

/// Fields HTTP/2 does not carry (RFC 9113 8.2.2): cases with them are HTTP/1.1's alone.
const NOT_IN_H2: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
];

fn seen_h2(r: Response) -> Seen {
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(n, v)| generated_cookie(n.to_ascii_lowercase(), v.clone()))
        .filter(|(n, _)| n != "date")
        .collect();
    headers.sort();
    (r.status, headers, r.body)
}

#[test]
fn both_codecs_answer_h2_streams_the_same() {
    let fast = start(false);
    let pingora = start(true);
    let mut a = H2Client::connect(fast.https, "parity.test").expect("h2 to the fast path");
    let mut b = H2Client::connect(pingora.https, "parity.test").expect("h2 to pingora");
    let mut differences = Vec::new();
    for (name, method, target, headers, body) in corpus() {
        if headers.iter().any(|(n, _)| NOT_IN_H2.contains(n)) {
            continue;
        }
        let marker = target
            .rsplit('-')
            .next()
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .to_string();
        let host = if name == "no route host" {
            "nowhere.invalid"
        } else {
            "parity.test"
        };
        let req = [(method, host, target.as_str(), headers.clone(), body)];
        let ra = a.send_all(&req).pop().unwrap();
        let rb = b.send_all(&req).pop().unwrap();
        match (ra, rb) {
            (Ok(ra), Ok(rb)) => {
                let (sa, sb) = (seen_h2(ra), seen_h2(rb));
                expected_status(name, sa.0);
                expected_cookies(name, &sa);
                if sa != sb {
                    differences.push(format!(
                        "{name}: client gets\n  fast:    {sa:?}\n  pingora: {sb:?}"
                    ));
                }
            }
            (ra, rb) => {
                if ra.is_ok() != rb.is_ok() {
                    differences.push(format!("{name}: fast {ra:?}, pingora {rb:?}"));
                }
            }
        }
        let want = if name == "mirrored post" { 2 } else { 1 };
        let ua = received_of(&fast, &marker, want);
        let ub = received_of(&pingora, &marker, want);
        if ua != ub {
            differences.push(format!(
                "{name}: upstream receives\n  fast:    {ua:?}\n  pingora: {ub:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} differences between the codecs over h2:\n\n{}",
        differences.len(),
        differences.join("\n\n")
    );
}

/// An access-log format that shows response fields (`%RESP(...)%`) gets the same fields
/// of an h2 stream's answer from both codecs: the fast path keeps a copy of the written
/// head for such a format alone (otherwise the fields move into the h2 response).
#[test]
fn both_codecs_log_the_response_fields_of_an_h2_stream() {
    let mesh = "accessLogEncoding = \"TEXT\"\naccessLogFormat = \"%PROTOCOL% %RESPONSE_CODE% %REQ(:PATH)% [%RESP(X-RESP-SET)%] [%RESP(X-DEST-RESP)%] [%RESP(CONTENT-LENGTH)%]\\n\"\n";
    for no_fast_path in [false, true] {
        let side = start_with_mesh(no_fast_path, mesh, "");
        let mut client = H2Client::connect(side.https, "parity.test").expect("h2");
        let path = "/edits/logged-l1";
        let got = client
            .send_all(&[("GET", "parity.test", path, vec![], b"")])
            .pop()
            .unwrap()
            .expect("an answer");
        assert_eq!(got.status, 200, "no_fast_path = {no_fast_path}");
        let length = got.body.len();
        let mut out = String::new();
        assert!(
            wait_until(Duration::from_secs(5), || {
                out = side.portico.stdout();
                out.lines().any(|l| l.starts_with("HTTP/2 "))
            }),
            "no log line (no_fast_path = {no_fast_path}): {out}"
        );
        let line = out.lines().find(|l| l.starts_with("HTTP/2 ")).unwrap();
        assert_eq!(
            line,
            format!("HTTP/2 200 {path} [route] [d] [{length}]"),
            "no_fast_path = {no_fast_path}"
        );
    }
}

/// Destinations that hash to an endpoint, over three upstreams both gateways share (so
/// that both build the same ring and table from the same addresses).
const STICKY: &str = r#"
[[virtualServices]]
name = "sticky"
hosts = ["sticky.test"]
gateways = ["gw"]
[[virtualServices.http]]
name = "by-user"
match = [{ uri = { prefix = "/user/" } }]
route = [{ destination = { host = "by-user.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "by-query"
match = [{ uri = { prefix = "/q/" } }]
route = [{ destination = { host = "by-query.internal", port = { number = 80 } } }]
[[virtualServices.http]]
name = "by-session"
match = [{ uri = { prefix = "/session/" } }]
route = [{ destination = { host = "by-session.internal", port = { number = 80 } } }]

[[serviceEntries]]
name = "sticky"
hosts = ["by-user.internal", "by-query.internal", "by-session.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [
  { address = "127.0.0.1", ports = { http = @E1@ } },
  { address = "127.0.0.1", ports = { http = @E2@ } },
  { address = "127.0.0.1", ports = { http = @E3@ } },
]

[[destinationRules]]
name = "by-user"
host = "by-user.internal"
trafficPolicy = { loadBalancer = { consistentHash = { httpHeaderName = "x-user", ringHash = { minimumRingSize = 1024 } } } }

[[destinationRules]]
name = "by-query"
host = "by-query.internal"
trafficPolicy = { loadBalancer = { consistentHash = { httpQueryParameterName = "u" } } }

[[destinationRules]]
name = "by-session"
host = "by-session.internal"
trafficPolicy = { loadBalancer = { consistentHash = { httpCookie = { name = "sid", ttl = "60s" }, maglev = { tableSize = 65537 } } } }
"#;

/// The same key picks the same endpoint on every codec (HTTP/1.1 and h2, fast and
/// pingora's cycle): a header, a query parameter, a cookie the gateway made (set once,
/// with its attributes, then followed without a new one). The fast gateway lends none of
/// these requests to pingora's cycle.
#[test]
fn both_codecs_hash_a_key_to_the_same_endpoint() {
    let echoes = [Echo::start("a"), Echo::start("b"), Echo::start("c")];
    let extra = render(
        STICKY,
        &[
            ("E1", echoes[0].port().to_string()),
            ("E2", echoes[1].port().to_string()),
            ("E3", echoes[2].port().to_string()),
        ],
    );
    let fast = start_with(false, &extra);
    let pingora = start_with(true, &extra);
    let mut h2 = [
        H2Client::connect(fast.https, "sticky.test").expect("h2 to the fast path"),
        H2Client::connect(pingora.https, "sticky.test").expect("h2 to pingora"),
    ];
    // Each request on the four codecs: fast and pingora's, HTTP/1.1 then h2.
    let mut on_each = |path: &str, headers: &[(&str, &str)]| -> Vec<Response> {
        let mut all = Vec::new();
        for side in [&fast, &pingora] {
            all.push(http_request(
                side.http,
                "GET",
                "sticky.test",
                path,
                headers,
                b"",
            ));
        }
        for c in h2.iter_mut() {
            let req = [("GET", "sticky.test", path, headers.to_vec(), &b""[..])];
            all.push(c.send_all(&req).pop().unwrap().expect("an h2 answer"));
        }
        all
    };
    let endpoints = |rs: &[Response]| -> Vec<Option<String>> {
        rs.iter()
            .map(|r| r.upstream().map(str::to_string))
            .collect()
    };

    let mut used = std::collections::HashSet::new();
    for u in 0..24 {
        let user = format!("user-{u}");
        for _ in 0..2 {
            let by_header = endpoints(&on_each("/user/x", &[("x-user", &user)]));
            assert!(by_header[0].is_some(), "{by_header:?}");
            assert!(
                by_header.iter().all(|e| *e == by_header[0]),
                "{user}: {by_header:?} (fast h1, pingora h1, fast h2, pingora h2)"
            );
            used.insert(by_header[0].clone());
            let by_query = endpoints(&on_each(&format!("/q/x?v=1&u={user}"), &[]));
            assert!(by_query[0].is_some(), "{by_query:?}");
            assert!(
                by_query.iter().all(|e| *e == by_query[0]),
                "{user}: {by_query:?}"
            );
        }
    }
    assert!(used.len() >= 2, "keys spread over the endpoints: {used:?}");

    // No cookie: each gateway makes one (a value of its own) and picks by it.
    let made = on_each("/session/x", &[]);
    let mut cookie = None;
    for r in &made {
        let set = r.header_all("set-cookie");
        assert_eq!(set.len(), 1, "{:?}", r.headers);
        let (pair, attributes) = set[0].split_once(';').unwrap();
        assert!(pair.starts_with("sid=") && pair.len() == 20, "{}", set[0]);
        assert_eq!(attributes, " Path=/; Max-Age=60; HttpOnly", "{}", set[0]);
        cookie.get_or_insert((pair.to_string(), r.upstream().map(str::to_string)));
    }
    // The fast path's cookie sent back, on every codec (over h2 among other cookie
    // fields): the endpoint it picked, and no new cookie.
    let (pair, endpoint) = cookie.unwrap();
    assert!(endpoint.is_some());
    for _ in 0..3 {
        let sent = on_each("/session/x", &[("cookie", "a=1"), ("cookie", &pair)]);
        assert_eq!(endpoints(&sent), vec![endpoint.clone(); 4], "{pair}");
        for r in &sent {
            assert!(r.header("set-cookie").is_none(), "{:?}", r.headers);
        }
    }
    assert_eq!(handed_over(&fast), 0.0, "{}", fast.portico.metrics());
}
