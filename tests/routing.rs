//! Host and request matching, redirects, direct responses, rewrites, header operations,
//! weighted splits and upstream failures, against real HTTP upstreams.

mod support;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// A running gateway with one plain HTTP listener and its upstreams.
struct Setup {
    portico: Portico,
    http: u16,
    _echoes: Vec<Echo>,
    _tmp: tempfile::TempDir,
}

impl Setup {
    fn get(&self, host: &str, path: &str) -> Response {
        self.req("GET", host, path, &[])
    }

    fn req(&self, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        try_http_request(self.http, method, host, path, headers, b"").unwrap_or_else(|e| {
            panic!(
                "{method} http://{host}{path}: {e}\nlog:\n{}",
                self.portico.log()
            )
        })
    }

    /// Assert the request reached upstream `expected` (by `x-upstream`) with the path intact.
    fn expect_upstream(
        &self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        expected: &str,
    ) {
        let resp = self.req(method, host, path, headers);
        assert_eq!(
            resp.status, 200,
            "{method} {host}{path} {headers:?}: expected upstream {expected}, got status {} body {:?}",
            resp.status,
            resp.text()
        );
        assert_eq!(
            resp.upstream(),
            Some(expected),
            "{method} {host}{path} {headers:?}: served by the wrong route"
        );
        let json = resp.json();
        assert_eq!(
            json["path"], path,
            "{method} {host}{path}: path seen by the upstream"
        );
        assert_eq!(
            json["method"], method,
            "{method} {host}{path}: method seen by the upstream"
        );
    }

    fn expect_404(&self, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) {
        let resp = self.req(method, host, path, headers);
        assert_eq!(
            resp.status,
            404,
            "{method} {host}{path} {headers:?}: expected 404, got {} from {:?}: {:?}",
            resp.status,
            resp.upstream(),
            resp.text()
        );
        assert_eq!(
            resp.upstream(),
            None,
            "a 404 must not come from an upstream"
        );
    }
}

/// Start echo upstreams named `names` (each its own subset of `svc.internal`) plus any extra
/// `(subset, port)` endpoints, and a gateway whose config is `template` rendered with `MESH`,
/// `HTTP`, `HTTP2` (a second free port) and the upstream resources appended.
fn start(template: &str, names: &[&str], extra_endpoints: &[(&str, u16)]) -> (Setup, u16) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let echoes: Vec<Echo> = names.iter().map(|n| Echo::start(n)).collect();
    let mut upstreams: Vec<(&str, u16)> = echoes.iter().map(|e| (e.name(), e.port())).collect();
    upstreams.extend_from_slice(extra_endpoints);
    let admin = free_port();
    let http = free_port();
    let http2 = free_port();
    let mut config = render(
        template,
        &[
            ("MESH", mesh_config(admin)),
            ("HTTP", http.to_string()),
            ("HTTP2", http2.to_string()),
        ],
    );
    config.push_str(&upstreams_config(&upstreams));
    let portico = Portico::start(tmp.path(), &config);
    (
        Setup {
            portico,
            http,
            _echoes: echoes,
            _tmp: tmp,
        },
        http2,
    )
}

const GATEWAY: &str = r#"
@MESH@
[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]
"#;

const MATCHES: &str = r#"
[[virtualServices]]
name = "matches"
hosts = ["m.test"]
gateways = ["gw"]

[[virtualServices.http]]
name = "exact"
match = [{ uri = { exact = "/exact" } }]
@to(exact)@

[[virtualServices.http]]
name = "regex"
match = [{ uri = { regex = "/re/[0-9]+" } }]
@to(regex)@

[[virtualServices.http]]
name = "header-exact"
match = [{ uri = { prefix = "/h/" }, headers = { x-team = { exact = "blue" } } }]
@to(hdr-exact)@

[[virtualServices.http]]
name = "header-present"
match = [{ uri = { prefix = "/h/" }, headers = { x-canary = {} } }]
@to(hdr-present)@

[[virtualServices.http]]
name = "method"
match = [{ uri = { prefix = "/m/" }, method = { exact = "POST" } }]
@to(method-post)@

[[virtualServices.http]]
name = "query"
match = [{ uri = { prefix = "/q/" }, queryParams = { debug = { exact = "1" } } }]
@to(query)@

[[virtualServices.http]]
name = "order-broad"
match = [{ uri = { prefix = "/order/" } }]
@to(order-broad)@

[[virtualServices.http]]
name = "order-narrow"
match = [{ uri = { prefix = "/order/narrow/" } }]
@to(order-narrow)@

[[virtualServices.http]]
name = "either"
match = [{ uri = { prefix = "/one/" } }, { uri = { prefix = "/two/" } }, { headers = { x-either = { exact = "yes" } } }]
@to(either)@

[[virtualServices.http]]
name = "icase"
match = [{ uri = { prefix = "/CaseInsensitive/" }, ignoreUriCase = true }]
@to(icase)@

[[virtualServices.http]]
name = "csens"
match = [{ uri = { prefix = "/CaseSensitive/" } }]
@to(csens)@

[[virtualServices.http]]
name = "prefix"
match = [{ uri = { prefix = "/p/" } }]
@to(prefix)@

[[virtualServices]]
name = "wildcard-host"
hosts = ["*.example.com"]
gateways = ["gw"]
[[virtualServices.http]]
name = "wild"
@to(wild)@

[[virtualServices]]
name = "exact-host"
hosts = ["api.example.com"]
gateways = ["gw"]
[[virtualServices.http]]
name = "exact-host"
@to(exact-host)@
"#;

#[test]
fn request_matching() {
    let names = [
        "exact",
        "regex",
        "hdr-exact",
        "hdr-present",
        "method-post",
        "query",
        "order-broad",
        "order-narrow",
        "either",
        "icase",
        "csens",
        "prefix",
        "wild",
        "exact-host",
    ];
    let (s, _) = start(&format!("{GATEWAY}{MATCHES}"), &names, &[]);
    let h = "m.test";

    // uri exact
    s.expect_upstream("GET", h, "/exact", &[], "exact");
    s.expect_404("GET", h, "/exact/more", &[]);
    s.expect_404("GET", h, "/exac", &[]);
    // uri regex: a full match, not a search
    s.expect_upstream("GET", h, "/re/123", &[], "regex");
    s.expect_404("GET", h, "/re/123abc", &[]);
    s.expect_404("GET", h, "/x/re/123", &[]);
    // uri prefix (the query string is not part of the path match, and reaches the upstream)
    s.expect_upstream("GET", h, "/p/", &[], "prefix");
    s.expect_upstream("GET", h, "/p/a/b?c=d&e=f", &[], "prefix");
    s.expect_404("GET", h, "/px", &[]);

    // headers: exact value, then presence
    s.expect_upstream("GET", h, "/h/x", &[("x-team", "blue")], "hdr-exact");
    s.expect_upstream("GET", h, "/h/x", &[("X-Team", "blue")], "hdr-exact");
    s.expect_404("GET", h, "/h/x", &[("x-team", "red")]);
    s.expect_404("GET", h, "/h/x", &[]);
    s.expect_upstream("GET", h, "/h/x", &[("x-canary", "anything")], "hdr-present");
    s.expect_upstream(
        "GET",
        h,
        "/h/x",
        &[("x-team", "red"), ("x-canary", "1")],
        "hdr-present",
    );
    s.expect_upstream(
        "GET",
        h,
        "/h/x",
        &[("x-team", "blue"), ("x-canary", "1")],
        "hdr-exact",
    );

    // method
    s.expect_upstream("POST", h, "/m/thing", &[], "method-post");
    s.expect_404("GET", h, "/m/thing", &[]);
    s.expect_404("PUT", h, "/m/thing", &[]);

    // query parameters
    s.expect_upstream("GET", h, "/q/x?debug=1", &[], "query");
    s.expect_upstream("GET", h, "/q/x?a=b&debug=1", &[], "query");
    s.expect_404("GET", h, "/q/x?debug=2", &[]);
    s.expect_404("GET", h, "/q/x", &[]);

    // first match wins: the broader route is listed first
    s.expect_upstream("GET", h, "/order/narrow/x", &[], "order-broad");
    s.expect_upstream("GET", h, "/order/other", &[], "order-broad");

    // several match blocks are OR'ed
    s.expect_upstream("GET", h, "/one/a", &[], "either");
    s.expect_upstream("GET", h, "/two/b", &[], "either");
    s.expect_upstream("GET", h, "/three/c", &[("x-either", "yes")], "either");
    s.expect_404("GET", h, "/three/c", &[]);

    // ignoreUriCase
    s.expect_upstream("GET", h, "/caseinsensitive/x", &[], "icase");
    s.expect_upstream("GET", h, "/CASEINSENSITIVE/x", &[], "icase");
    s.expect_upstream("GET", h, "/CaseSensitive/x", &[], "csens");
    s.expect_404("GET", h, "/casesensitive/x", &[]);

    // no route matches → 404
    s.expect_404("GET", h, "/nothing/here", &[]);
}

#[test]
fn host_matching() {
    let names = [
        "exact",
        "regex",
        "hdr-exact",
        "hdr-present",
        "method-post",
        "query",
        "order-broad",
        "order-narrow",
        "either",
        "icase",
        "csens",
        "prefix",
        "wild",
        "exact-host",
    ];
    let (s, _) = start(&format!("{GATEWAY}{MATCHES}"), &names, &[]);
    let port = s.http;

    // An exact host beats a wildcard, even one declared earlier.
    s.expect_upstream("GET", "api.example.com", "/", &[], "exact-host");
    s.expect_upstream("GET", "x.example.com", "/", &[], "wild");
    // A wildcard covers several labels but not the bare domain.
    s.expect_upstream("GET", "a.b.example.com", "/", &[], "wild");
    s.expect_404("GET", "example.com", "/", &[]);
    s.expect_404("GET", "api.example.com.evil.test", "/", &[]);
    // Case-insensitive, port stripped.
    s.expect_upstream(
        "GET",
        &format!("API.Example.COM:{port}"),
        "/",
        &[],
        "exact-host",
    );
    s.expect_upstream("GET", "X.EXAMPLE.COM:1234", "/", &[], "wild");
    s.expect_upstream("GET", &format!("m.test:{port}"), "/exact", &[], "exact");
    s.expect_upstream("GET", "M.TEST", "/exact", &[], "exact");
    // Unknown host → 404.
    s.expect_404("GET", "unknown.test", "/", &[]);
    s.expect_404("GET", "unknown.test", "/exact", &[]);
}

const ACTIONS: &str = r#"
[[gateways.servers]]
port = { number = @HTTP2@, name = "http-redirect", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["secure.test"]
tls = { httpsRedirect = true }

[[virtualServices]]
name = "actions"
hosts = ["r.test", "secure.test"]
gateways = ["gw"]

[[virtualServices.http]]
name = "moved"
match = [{ uri = { exact = "/old" } }]
redirect = { uri = "/new" }

[[virtualServices.http]]
name = "found"
match = [{ uri = { exact = "/elsewhere" } }]
redirect = { uri = "/there", authority = "other.test", redirectCode = 302 }

[[virtualServices.http]]
name = "permanent"
match = [{ uri = { prefix = "/keep/" } }]
redirect = { scheme = "https", authority = "secure.test", port = 8443, redirectCode = 308 }

[[virtualServices.http]]
name = "teapot"
match = [{ uri = { exact = "/teapot" } }]
directResponse = { status = 418, body = { string = "short and stout" } }

[[virtualServices.http]]
name = "ok"
match = [{ uri = { exact = "/ok" } }]
directResponse = { status = 200, body = { string = "direct ok" } }

[[virtualServices.http]]
name = "rewrite-prefix"
match = [{ uri = { prefix = "/api/" } }]
rewrite = { uri = "/v2/" }
@to(backend)@

[[virtualServices.http]]
name = "rewrite-exact"
match = [{ uri = { exact = "/legacy" } }]
rewrite = { uri = "/modern/path" }
@to(backend)@

[[virtualServices.http]]
name = "rewrite-authority"
match = [{ uri = { prefix = "/auth/" } }]
rewrite = { authority = "backend.internal" }
@to(backend)@

[[virtualServices.http]]
name = "headers"
match = [{ uri = { prefix = "/hdr/" } }]
headers = { request = { set = { x-set = "set-value", x-overwrite = "new", Cache-Control = "no-store" }, add = { x-added = "added-value" }, remove = ["x-remove-me"] }, response = { set = { x-resp-set = "resp-value" }, remove = ["x-upstream"] } }
@to(backend)@

[[virtualServices.http]]
name = "passthrough"
@to(backend)@
"#;

#[test]
fn redirects_and_direct_responses() {
    let (s, redirect_port) = start(&format!("{GATEWAY}{ACTIONS}"), &["backend"], &[]);

    // redirect with only uri: default 301, path replaced, host kept.
    let resp = s.get("r.test", "/old");
    assert_eq!(
        resp.status, 301,
        "redirect default code: {:?}",
        resp.headers
    );
    let location = resp
        .header("location")
        .expect("Location header")
        .to_string();
    let re = regex::Regex::new(r"^(http://r\.test(:\d+)?)?/new$").unwrap();
    assert!(
        re.is_match(&location),
        "Location for uri redirect: {location}"
    );

    // redirect with authority and 302.
    let resp = s.get("r.test", "/elsewhere");
    assert_eq!(resp.status, 302);
    let location = resp
        .header("location")
        .expect("Location header")
        .to_string();
    let re = regex::Regex::new(r"^http://other\.test(:\d+)?/there$").unwrap();
    assert!(
        re.is_match(&location),
        "Location for authority redirect: {location}"
    );

    // redirect with scheme, authority and port, 308; the path is kept.
    let resp = s.get("r.test", "/keep/this");
    assert_eq!(resp.status, 308);
    assert_eq!(
        resp.header("location"),
        Some("https://secure.test:8443/keep/this")
    );

    // directResponse: status and body.
    let resp = s.get("r.test", "/teapot");
    assert_eq!(resp.status, 418);
    assert_eq!(resp.text(), "short and stout");
    assert_eq!(resp.upstream(), None);
    let resp = s.get("r.test", "/ok");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "direct ok");

    // A server with tls.httpsRedirect answers every request with 301 to https, port dropped.
    let resp = http_get(
        redirect_port,
        &format!("secure.test:{redirect_port}"),
        "/a/b",
    );
    assert_eq!(
        resp.status,
        301,
        "httpsRedirect: {:?} {}",
        resp.headers,
        resp.text()
    );
    assert_eq!(resp.header("location"), Some("https://secure.test/a/b"));
    let resp = http_get(
        redirect_port,
        &format!("Secure.Test:{redirect_port}"),
        "/a/b?c=d",
    );
    assert_eq!(resp.status, 301);
    assert_eq!(
        resp.header("location")
            .map(|l| l.to_ascii_lowercase())
            .as_deref(),
        Some("https://secure.test/a/b?c=d"),
        "httpsRedirect keeps the query"
    );
    let resp = http_get(redirect_port, "secure.test", "/teapot");
    assert_eq!(resp.status, 301, "httpsRedirect comes before routing");
    assert_eq!(resp.header("location"), Some("https://secure.test/teapot"));
}

#[test]
fn rewrites_and_header_operations() {
    let (s, _) = start(&format!("{GATEWAY}{ACTIONS}"), &["backend"], &[]);

    // Prefix rewrite replaces the matched prefix; the query string survives.
    let resp = s.get("r.test", "/api/x?y=1");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["path"], "/v2/x?y=1");
    let resp = s.get("r.test", "/api/deeper/path");
    assert_eq!(resp.json()["path"], "/v2/deeper/path");
    // Exact match: the whole path is replaced.
    let resp = s.get("r.test", "/legacy");
    assert_eq!(resp.json()["path"], "/modern/path");

    // Authority rewrite: the upstream sees the new Host; the path is unchanged.
    let resp = s.get("r.test", "/auth/z");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.echoed_header("host").as_deref(),
        Some("backend.internal")
    );
    assert_eq!(resp.json()["path"], "/auth/z");
    // Without a rewrite the upstream sees the client's Host.
    let resp = s.get("r.test", "/plain");
    let host = resp.echoed_header("host").unwrap_or_default();
    assert!(
        host == "r.test" || host.starts_with("r.test:"),
        "Host at upstream: {host:?}"
    );
    // The client's address is appended to X-Forwarded-For, and the scheme passed on, as
    // Envoy does at an edge.
    assert_eq!(
        resp.echoed_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        resp.echoed_header("x-forwarded-proto").as_deref(),
        Some("http")
    );
    let resp = s.req(
        "GET",
        "r.test",
        "/plain",
        &[("x-forwarded-for", "203.0.113.7")],
    );
    assert_eq!(
        resp.echoed_header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );

    // Request header operations reach the upstream.
    let resp = s.req(
        "GET",
        "r.test",
        "/hdr/x",
        &[
            ("x-overwrite", "old"),
            ("x-remove-me", "bye"),
            ("x-added", "original"),
            ("x-keep", "kept"),
        ],
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.echoed_header("x-set").as_deref(), Some("set-value"));
    assert_eq!(resp.echoed_header("x-overwrite").as_deref(), Some("new"));
    assert_eq!(
        resp.echoed_header("x-remove-me"),
        None,
        "removed request header reached the upstream"
    );
    assert_eq!(resp.echoed_header("x-keep").as_deref(), Some("kept"));
    assert_eq!(
        resp.echoed_header("cache-control").as_deref(),
        Some("no-store"),
        "a standard header name, written in any case"
    );
    let added = resp.echoed_header("x-added").unwrap_or_default();
    assert!(
        added.contains("original") && added.contains("added-value"),
        "add appends to an existing header: {added:?}"
    );
    // Response header operations are visible to the client.
    assert_eq!(resp.header("x-resp-set"), Some("resp-value"));
    assert_eq!(resp.header("x-upstream"), None, "response header remove");
    assert_eq!(
        resp.json()["upstream"],
        "backend",
        "body still from the upstream"
    );

    // Upstream statuses pass through; POST bodies reach the upstream.
    let resp = s.get("r.test", "/status/201");
    assert_eq!(resp.status, 201);
    let resp = s.get("r.test", "/status/503");
    assert_eq!(resp.status, 503);
    assert_eq!(resp.upstream(), Some("backend"));
    let resp = try_http_request(s.http, "POST", "r.test", "/submit", &[], b"payload-123")
        .expect("POST with body");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["method"], "POST");
    assert_eq!(resp.json()["body"], "payload-123");
}

const WEIGHTS: &str = r#"
[[virtualServices]]
name = "weights"
hosts = ["w.test"]
gateways = ["gw"]

[[virtualServices.http]]
name = "ninety-ten"
match = [{ uri = { prefix = "/ninety/" } }]
route = [
  { destination = { host = "svc.internal", subset = "v1", port = { number = 80 } }, weight = 90 },
  { destination = { host = "svc.internal", subset = "v2", port = { number = 80 } }, weight = 10 },
]

[[virtualServices.http]]
name = "three-one"
match = [{ uri = { prefix = "/three/" } }]
route = [
  { destination = { host = "svc.internal", subset = "v1", port = { number = 80 } }, weight = 3 },
  { destination = { host = "svc.internal", subset = "v2", port = { number = 80 } }, weight = 1 },
]
"#;

/// Send `total` GETs to `path` over keep-alive connections from two threads and count the
/// responses by `x-upstream`.
fn split(s: &Setup, path: &str, total: usize) -> HashMap<String, usize> {
    let threads = 2;
    let per_thread = total / threads;
    let port = s.http;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let path = path.to_string();
            thread::spawn(move || -> Result<HashMap<String, usize>, String> {
                let mut client = HttpClient::new(port);
                let mut counts = HashMap::new();
                for i in 0..per_thread {
                    let resp = client
                        .get("w.test", &path)
                        .map_err(|e| format!("request {i} to {path}: {e}"))?;
                    if resp.status != 200 {
                        return Err(format!(
                            "request {i} to {path}: status {} {}",
                            resp.status,
                            resp.text()
                        ));
                    }
                    let upstream = resp.upstream().unwrap_or("none").to_string();
                    *counts.entry(upstream).or_insert(0) += 1;
                }
                Ok(counts)
            })
        })
        .collect();
    let mut counts = HashMap::new();
    for h in handles {
        let part = h
            .join()
            .expect("client thread panicked")
            .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", s.portico.log()));
        for (k, v) in part {
            *counts.entry(k).or_insert(0) += v;
        }
    }
    counts
}

fn assert_share(
    counts: &HashMap<String, usize>,
    total: usize,
    upstream: &str,
    expected_percent: f64,
) {
    let got = *counts.get(upstream).unwrap_or(&0);
    assert_binomial(
        got,
        total,
        expected_percent / 100.0,
        &format!("{upstream} (counts {counts:?})"),
    );
}

#[test]
fn weighted_split() {
    let (s, _) = start(&format!("{GATEWAY}{WEIGHTS}"), &["v1", "v2"], &[]);
    let total = 10_000;
    // Enough to tell 90/10 from 85/15 and 75/25 from 70/30.
    assert!(binomial_tells_apart(total, 0.90, 0.85));
    assert!(binomial_tells_apart(total, 0.75, 0.70));
    let started = Instant::now();

    let counts = split(&s, "/ninety/x", total);
    assert_eq!(counts.values().sum::<usize>(), total);
    assert_eq!(counts.len(), 2, "only v1 and v2 serve: {counts:?}");
    assert_share(&counts, total, "v1", 90.0);
    assert_share(&counts, total, "v2", 10.0);

    // Weights are relative: 3 and 1 → 75/25.
    let counts = split(&s, "/three/x", total);
    assert_eq!(counts.values().sum::<usize>(), total);
    assert_share(&counts, total, "v1", 75.0);
    assert_share(&counts, total, "v2", 25.0);
    eprintln!(
        "weighted_split: {} requests in {:?}",
        2 * total,
        started.elapsed()
    );
}

const FAILURES: &str = r#"
[[virtualServices]]
name = "failures"
hosts = ["err.test"]
gateways = ["gw"]

[[virtualServices.http]]
name = "refused"
match = [{ uri = { prefix = "/refused/" } }]
@to(dead)@

[[virtualServices.http]]
name = "slow"
match = [{ uri = { prefix = "/sleep/" } }]
timeout = "200ms"
@to(slowpoke)@

[[virtualServices.http]]
name = "fine"
@to(slowpoke)@
"#;

#[test]
fn upstream_failures() {
    // Nothing listens on `dead_port`.
    let dead_port = free_port();
    let (s, _) = start(
        &format!("{GATEWAY}{FAILURES}"),
        &["slowpoke"],
        &[("dead", dead_port)],
    );

    let resp = s.get("err.test", "/refused/x");
    assert_eq!(resp.status, 503, "refused upstream: {}", resp.text());

    let started = Instant::now();
    let resp = s.get("err.test", "/sleep/2000");
    let elapsed = started.elapsed();
    assert_eq!(
        resp.status,
        504,
        "upstream slower than the route timeout: {}",
        resp.text()
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "504 should come after ~200ms, took {elapsed:?}"
    );

    // A fast request on the same route is fine, and the gateway is healthy afterwards.
    let resp = s.get("err.test", "/sleep/10");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.upstream(), Some("slowpoke"));
    let resp = s.get("err.test", "/other");
    assert_eq!(resp.status, 200);

    // The request counter saw the traffic (it may be bumped just after the response is sent).
    let mut metrics = String::new();
    let counted = wait_until(Duration::from_secs(2), || {
        metrics = s.portico.metrics();
        let ok =
            metric_sum(&metrics, "portico_requests_total", "response_code=\"200\"").unwrap_or(0.0);
        let refused =
            metric_sum(&metrics, "portico_requests_total", "response_code=\"503\"").unwrap_or(0.0);
        let timed_out =
            metric_sum(&metrics, "portico_requests_total", "response_code=\"504\"").unwrap_or(0.0);
        ok >= 2.0 && refused >= 1.0 && timed_out >= 1.0
    });
    assert!(
        counted,
        "portico_requests_total by response_code:\n{metrics}"
    );
}

const AUTHORITY_AND_SCHEME: &str = r#"
@MESH@
[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = { number = @HTTP2@, name = "https", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["*"]
tls = { mode = "SIMPLE", serverCertificate = "@CERT@", privateKey = "@KEY@" }

[[virtualServices]]
name = "by-request"
hosts = ["*.am.test"]
gateways = ["gw"]
[[virtualServices.http]]
name = "authority"
match = [{ authority = { prefix = "api." } }]
@to(api)@
[[virtualServices.http]]
name = "scheme"
match = [{ scheme = { exact = "https" } }]
@to(secure)@
[[virtualServices.http]]
name = "rest"
@to(plain)@
"#;

/// `authority` matches the Host / `:authority` and `scheme` the listener's scheme, over
/// HTTP/1.1 in clear and over TLS, and over h2.
#[test]
fn authority_and_scheme_matches() {
    let certs = tempfile::tempdir().unwrap();
    write_cert(certs.path(), "am", &["www.am.test", "api.am.test"]);
    let template = AUTHORITY_AND_SCHEME
        .replace("@CERT@", certs.path().join("am.crt").to_str().unwrap())
        .replace("@KEY@", certs.path().join("am.key").to_str().unwrap());
    let (s, https) = start(&template, &["api", "secure", "plain"], &[]);

    s.expect_upstream("GET", "api.am.test", "/x", &[], "api");
    s.expect_upstream("GET", "www.am.test", "/x", &[], "plain");
    let mut tls = tls_connect(https, Some("www.am.test")).expect("TLS handshake");
    for (host, want) in [("www.am.test", "secure"), ("api.am.test", "api")] {
        let resp = tls.get(host, "/y").expect("GET over TLS");
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
        assert_eq!(resp.upstream(), Some(want), "{host} over TLS");
    }
    let mut h2 = H2Client::connect(https, "www.am.test").expect("h2 connection");
    for (host, want) in [("www.am.test", "secure"), ("api.am.test", "api")] {
        let resp = h2.get(host, "/z").expect("GET over h2");
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
        assert_eq!(resp.upstream(), Some(want), "{host} over h2");
    }
}

const SHARED_HOST: &str = r#"
@MESH@
[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "first"
hosts = ["shared.test"]
gateways = ["gw"]
[[virtualServices.http]]
name = "first-a"
match = [{ uri = { prefix = "/a" } }]
@to(first-a)@
[[virtualServices.http]]
name = "first-all"
match = [{ uri = { prefix = "/" } }]
@to(first-all)@

[[virtualServices]]
name = "second"
hosts = ["shared.test"]
gateways = ["gw"]
[[virtualServices.http]]
name = "second-ab"
match = [{ uri = { prefix = "/a/b" } }]
@to(second-ab)@
[[virtualServices.http]]
name = "second-special"
match = [{ uri = { prefix = "/special" } }]
@to(second-special)@
[[virtualServices.http]]
name = "second-all"
@to(second-all)@
"#;

/// VirtualServices that share a host have their routes concatenated in file order, with
/// the catch-all routes (no match, or `prefix = "/"`) moved last, as Istio merges them.
#[test]
fn virtual_services_sharing_a_host_merge_in_file_order_with_catch_alls_last() {
    let (s, _) = start(
        SHARED_HOST,
        &[
            "first-a",
            "first-all",
            "second-ab",
            "second-special",
            "second-all",
        ],
        &[],
    );
    // File order: the first VirtualService's /a comes before the second's /a/b.
    s.expect_upstream("GET", "shared.test", "/a/b", &[], "first-a");
    // The first's catch-all moved after the second's routes.
    s.expect_upstream("GET", "shared.test", "/special/1", &[], "second-special");
    // Catch-alls keep file order among themselves.
    s.expect_upstream("GET", "shared.test", "/other", &[], "first-all");
}
