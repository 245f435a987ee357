//! Rate limits, access lists and per-client connection caps through real Portico
//! processes: real HTTP clients (curl, over HTTP/1.1 and h2, from several loopback
//! addresses), a real `redis-server` started here on a free port for global limits, and
//! two Portico processes sharing it. Runs through whichever codec the environment chooses
//! (`PORTICO_NO_FAST_PATH=true` for pingora's cycle), as every integration test does.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::redis_server::RedisServer;
use support::*;

/// One answer as curl saw it: status and the response fields asked for.
#[derive(Debug)]
struct Seen {
    status: u16,
    fields: Vec<String>,
}

/// Fields every `curl` call reports, in this order.
const FIELDS: [&str; 5] = [
    "x-envoy-ratelimited",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-policy",
    "x-upstream",
];

impl Seen {
    fn field(&self, name: &str) -> &str {
        let i = FIELDS
            .iter()
            .position(|f| *f == name)
            .expect("a field curl reports");
        &self.fields[i]
    }
}

/// GETs `urls` with curl from local address `from`, over one connection where it can
/// (`extra`: `--http2` and the like). Each answer's status and [`FIELDS`].
fn curl(from: &str, extra: &[&str], urls: &[String]) -> Vec<Seen> {
    let mut format = String::from("%{http_code}");
    for f in FIELDS {
        format.push_str(&format!("|%header{{{f}}}"));
    }
    format.push('\n');
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-k", "--max-time", "20", "--interface", from])
        .args(extra)
        .args(["-w", &format]);
    for u in urls {
        cmd.args(["-o", "/dev/null", u]);
    }
    let out = cmd.output().expect("curl runs (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let seen: Vec<Seen> = text
        .lines()
        .map(|l| {
            let mut parts = l.split('|');
            let status = parts.next().unwrap_or("0").parse().unwrap_or(0);
            Seen {
                status,
                fields: parts.map(str::to_string).collect(),
            }
        })
        .collect();
    assert_eq!(
        seen.len(),
        urls.len(),
        "curl from {from}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    seen
}

fn count(seen: &[Seen], status: u16) -> usize {
    seen.iter().filter(|s| s.status == status).count()
}

const LOCAL: &str = r#"
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
name = "shop"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
name = "limited"
match = [{ uri = { prefix = "/limited" } }]
@to(v1)@
[[virtualServices.http]]
name = "direct"
match = [{ uri = { prefix = "/direct" } }]
directResponse = { status = 200, body = { string = "here\n" } }
[[virtualServices.http]]
name = "free"
@to(v1)@

[[rateLimits]]
name = "per-client"
targetRefs = [
  { kind = "VirtualService", name = "shop", sectionName = "limited" },
  { kind = "VirtualService", name = "shop", sectionName = "direct" },
]
[[rateLimits.local.rules]]
name = "per-client"
clientSelectors = [{ sourceCIDR = { type = "Distinct", value = "0.0.0.0/0" } }]
limit = { requests = @N@, unit = "Second" }
overrides = [{ sourceCIDR = "127.0.0.3", limit = { requests = @M@, unit = "Second" } }]
"#;

const N: usize = 10;
const M: usize = 30;

struct Local {
    portico: Portico,
    http: u16,
    https: u16,
    _echo: Echo,
    _tmp: tempfile::TempDir,
}

fn start_local() -> Local {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http, https) = (free_port(), free_port(), free_port());
    write_cert(tmp.path(), "p", &["shop.test"]);
    let config = render(
        &format!("{LOCAL}{}", upstreams_config(&[("v1", echo.port())])),
        &[
            ("MESH", mesh_config(admin)),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
            ("N", N.to_string()),
            ("M", M.to_string()),
        ],
    );
    let portico = Portico::start(tmp.path(), &config);
    Local {
        portico,
        http,
        https,
        _echo: echo,
        _tmp: tmp,
    }
}

/// `3 * limit` requests from `from`: the limit allowed (the first `limit` at once, as the
/// bucket holds `limit`) and at most what came back while they were sent.
fn drive(from: &str, extra: &[&str], url: &str, limit: usize) -> Vec<Seen> {
    let urls: Vec<String> = (0..3 * limit).map(|_| url.to_string()).collect();
    let started = Instant::now();
    let seen = curl(from, extra, &urls);
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = count(&seen, 200);
    // One token comes back every 1/limit s.
    let refilled = (elapsed * limit as f64).ceil() as usize;
    assert!(
        allowed >= limit && allowed <= limit + refilled + 1,
        "{from} {url}: {allowed} of {} allowed in {elapsed:.2}s, limit {limit}/s",
        urls.len()
    );
    assert_eq!(count(&seen, 429), urls.len() - allowed, "{seen:?}");
    assert!(
        seen[..limit].iter().all(|s| s.status == 200),
        "the first {limit} pass: {seen:?}"
    );
    seen
}

#[test]
fn a_local_limit_gives_each_client_its_rate_and_overrides_apply() {
    let g = start_local();
    let url = format!("http://shop.test:{}/limited/x", g.http);
    let resolve = format!("shop.test:{}:127.0.0.1", g.http);
    let h1 = ["--resolve", resolve.as_str()];
    // Two clients at once: each gets N, the other's requests notwithstanding.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| drive("127.0.0.1", &h1, &url, N));
        let b = s.spawn(|| drive("127.0.0.2", &h1, &url, N));
        (a.join().unwrap(), b.join().unwrap())
    });
    // The override's address gets its own limit.
    drive("127.0.0.3", &h1, &url, M);

    let ok = &a[0];
    assert_eq!(ok.field("x-upstream"), "v1");
    assert_eq!(ok.field("ratelimit-limit"), N.to_string());
    assert_eq!(ok.field("ratelimit-remaining"), (N - 1).to_string());
    assert_eq!(ok.field("ratelimit-policy"), format!("{N};w=1"));
    assert_eq!(ok.field("x-envoy-ratelimited"), "");
    let limited = b.iter().find(|s| s.status == 429).unwrap();
    assert_eq!(limited.field("x-envoy-ratelimited"), "true");
    assert_eq!(limited.field("ratelimit-remaining"), "0");
    assert_eq!(limited.field("x-upstream"), "", "no upstream saw it");

    // The same for h2 streams of one connection, on a direct-response route too.
    let https = format!("shop.test:{}:127.0.0.1", g.https);
    let h2 = ["--http2", "--resolve", https.as_str()];
    drive(
        "127.0.0.4",
        &h2,
        &format!("https://shop.test:{}/limited/y", g.https),
        N,
    );
    drive(
        "127.0.0.4",
        &h2,
        &format!("https://shop.test:{}/direct", g.https),
        N,
    );
    // A route no policy targets is not limited.
    let free: Vec<String> = (0..3 * N)
        .map(|_| format!("http://shop.test:{}/free", g.http))
        .collect();
    assert_eq!(count(&curl("127.0.0.1", &h1, &free), 200), 3 * N);

    // The log line says RL; the metric counts each decision by rule.
    let metrics = g.portico.metrics();
    if std::env::var("PORTICO_NO_FAST_PATH").as_deref() != Ok("true") {
        // The fast codecs served (and refused) these, handing none to pingora.
        let served = metric_sum(&metrics, "portico_fast_path_requests_total", "");
        assert!(served.unwrap_or(0.0) >= (12 * N) as f64, "{metrics}");
        assert_eq!(
            metric_sum(&metrics, "portico_fast_path_handoffs_total", ""),
            None,
            "{metrics}"
        );
    }
    let limited_total = metric_sum(
        &metrics,
        "portico_ratelimit_decisions_total",
        "decision=\"limited\"",
    )
    .unwrap_or(0.0);
    assert!(limited_total >= (2 * N) as f64, "{metrics}");
    assert!(metrics.contains("rule=\"per-client\""), "{metrics}");
    let rl_lines = || {
        g.portico
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["response_flags"] == "RL")
            .collect::<Vec<_>>()
    };
    assert!(wait_until(Duration::from_secs(5), || rl_lines().len() >= 2 * N));
    let line = &rl_lines()[0];
    assert_eq!(line["response_code"], 429);
    assert_eq!(line["response_code_details"], "local_rate_limited");
}

const GLOBAL: &str = r#"
@MESH@
[mesh.redis]
url = "@REDIS@"
passwordFile = "redis.password"
timeout = "200ms"
keyPrefix = "@PREFIX@"

[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "@BIND@"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
name = "window"
match = [{ uri = { prefix = "/window" } }]
@to(v1)@
[[virtualServices.http]]
name = "bucket"
match = [{ uri = { prefix = "/bucket" } }]
@to(v1)@
[[virtualServices.http]]
name = "closed"
match = [{ uri = { prefix = "/closed" } }]
@to(v1)@

[[rateLimits]]
name = "window"
targetRefs = [{ kind = "VirtualService", name = "shop", sectionName = "window" }]
[[rateLimits.global.rules]]
name = "window"
limit = { requests = 20, unit = "Hour" }

[[rateLimits]]
name = "bucket"
targetRefs = [{ kind = "VirtualService", name = "shop", sectionName = "bucket" }]
[[rateLimits.global.rules]]
name = "bucket"
clientSelectors = [{ headers = [{ name = "x-user", type = "Distinct" }] }]
limit = { requests = 10, unit = "Hour" }
rateLimitAlgorithm = "GCRA"

[[rateLimits]]
name = "closed"
targetRefs = [{ kind = "VirtualService", name = "shop", sectionName = "closed" }]
failOpen = false
statusOnError = 503
[[rateLimits.global.rules]]
name = "closed"
clientSelectors = [{ headers = [{ name = "x-user", type = "Distinct" }] }]
limit = { requests = 5, unit = "Hour" }
"#;

/// A Portico replica on `bind`:`port` counting in `redis`.
fn replica(
    redis: &RedisServer,
    bind: &str,
    port: u16,
    echo: &Echo,
    prefix: &str,
) -> (Portico, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("redis.password"), "s3cret\n").unwrap();
    let config = render(
        &format!("{GLOBAL}{}", upstreams_config(&[("v1", echo.port())])),
        &[
            ("MESH", mesh_config(free_port())),
            ("REDIS", redis.url()),
            ("PREFIX", prefix.to_string()),
            ("BIND", bind.to_string()),
            ("HTTP", port.to_string()),
        ],
    );
    (Portico::start(tmp.path(), &config), tmp)
}

/// `n` GETs of `path` alternating between the replicas at `a` and `b`, with `headers`.
fn alternate(a: &str, b: &str, path: &str, n: usize, user: &str) -> Vec<Seen> {
    let header = format!("x-user: {user}");
    let mut seen = Vec::new();
    for i in 0..n {
        let base = if i % 2 == 0 { a } else { b };
        seen.extend(curl(
            "127.0.0.1",
            &["-H", header.as_str()],
            &[format!("http://{base}{path}")],
        ));
    }
    seen
}

#[test]
fn a_global_limit_is_shared_by_two_processes_and_redis_down_fails_open_or_closed() {
    let mut redis = RedisServer::start(Some("s3cret"));
    let echo = Echo::start("v1");
    // Two replicas with one config but their bind address: the same port, as replicas on
    // two machines have, so they count a route in the same keys.
    let port = loop {
        let p = free_port();
        if std::net::TcpListener::bind(("127.0.0.2", p)).is_ok() {
            break p;
        }
    };
    let prefix = format!("t{}", redis.port);
    let (ra, _ta) = replica(&redis, "127.0.0.1", port, &echo, &prefix);
    let (rb, _tb) = replica(&redis, "127.0.0.2", port, &echo, &prefix);
    let (a, b) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));

    // Fixed window, 20 an hour for everyone: 60 requests through both, 20 allowed.
    let seen = alternate(&a, &b, "/window", 60, "alice");
    assert_eq!(count(&seen, 200), 20, "{seen:?}");
    assert_eq!(count(&seen, 429), 40);
    assert_eq!(seen[0].field("ratelimit-limit"), "20");
    assert_eq!(seen[0].field("ratelimit-policy"), "20;w=3600");
    assert!(
        seen.iter()
            .filter(|s| s.status == 200)
            .all(|s| s.field("x-upstream") == "v1")
            && seen
                .iter()
                .filter(|s| s.status == 429)
                .all(|s| s.field("x-envoy-ratelimited") == "true")
    );
    // Both replicas allowed some: the count is one.
    let allowed_by = |r: &Portico| {
        metric_sum(
            &r.metrics(),
            "portico_ratelimit_decisions_total",
            "decision=\"allowed\"",
        )
        .unwrap_or(0.0) as usize
    };
    assert_eq!(allowed_by(&ra) + allowed_by(&rb), 20);
    assert!(allowed_by(&ra) > 0 && allowed_by(&rb) > 0);

    // GCRA per user: 10 an hour each.
    let seen = alternate(&a, &b, "/bucket", 30, "alice");
    assert_eq!(count(&seen, 200), 10, "{seen:?}");
    let seen = alternate(&a, &b, "/bucket", 12, "bob");
    assert_eq!(count(&seen, 200), 10, "bob has his own bucket: {seen:?}");

    // Before Redis stops: fail-closed route counts.
    let seen = alternate(&a, &b, "/closed", 2, "carol");
    assert_eq!(count(&seen, 200), 2);

    redis.stop();
    // Fail open (the default): traffic goes through, and the replica says so.
    let seen = alternate(&a, &b, "/window", 10, "alice");
    assert_eq!(count(&seen, 200), 10, "fail open: {seen:?}");
    // Fail closed: statusOnError, flag RLSE.
    let seen = alternate(&a, &b, "/closed", 4, "carol");
    assert_eq!(count(&seen, 503), 4, "fail closed: {seen:?}");
    for r in [&ra, &rb] {
        let m = r.metrics();
        assert!(
            metric_sum(
                &m,
                "portico_ratelimit_decisions_total",
                "decision=\"failed_open\""
            )
            .unwrap_or(0.0)
                >= 5.0,
            "{m}"
        );
        assert!(
            metric_sum(
                &m,
                "portico_ratelimit_decisions_total",
                "decision=\"failed_closed\""
            )
            .unwrap_or(0.0)
                >= 2.0,
            "{m}"
        );
        assert!(metric_sum(&m, "portico_ratelimit_redis_errors_total", "").unwrap_or(0.0) > 0.0);
        let log = r.log();
        assert!(
            log.contains("rate limit check in Redis failed"),
            "the failure is logged: {log}"
        );
        // At most a line a second (the test took a few seconds at most).
        let lines = log.matches("rate limit check in Redis failed").count();
        assert!(lines <= 10, "{lines} lines: {log}");
    }

    // Redis back (empty: nothing persisted): limits resume.
    redis.restart();
    let mut probe = 0;
    let back = wait_until(Duration::from_secs(10), || {
        probe += 1;
        let user = format!("probe-{probe}");
        let seen = alternate(&a, &b, "/closed", 2, &user);
        count(&seen, 200) == 2
    });
    assert!(back, "global checks resume once Redis is back");
    let seen = alternate(&a, &b, "/closed", 10, "dave");
    assert_eq!(count(&seen, 200), 5, "5 an hour: {seen:?}");
    assert_eq!(count(&seen, 429), 5);
}

const LISTS: &str = r#"
@MESH@

[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
@to(v1)@

[[accessLists]]
name = "blocked-addresses"
targetRefs = [{ kind = "Gateway", name = "gw" }]
file = "blocked.txt"
denyResponse = { status = 403, body = "blocked here\n" }

[[accessLists]]
name = "revoked-keys"
targetRefs = [{ kind = "Gateway", name = "gw" }]
key = "request.headers[x-api-key]"
providerUrl = "http://127.0.0.1:@LISTS@/revoked.txt"
refreshInterval = "1s"
"#;

/// Serves `body` at any path until dropped.
struct ListServer {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ListServer {
    fn start(body: &'static str) -> ListServer {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let mut buf = [0u8; 2048];
                        let _ = c.read(&mut buf);
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ListServer {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ListServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn access_lists_follow_their_file_and_url_without_a_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let lists = ListServer::start("# revoked\nold-key\n");
    let (admin, http) = (free_port(), free_port());
    support::write_atomic(&tmp.path().join("blocked.txt"), "127.0.0.2\n");
    let config = render(
        &format!("{LISTS}{}", upstreams_config(&[("v1", echo.port())])),
        &[
            ("MESH", mesh_config(admin)),
            ("HTTP", http.to_string()),
            ("LISTS", lists.port.to_string()),
        ],
    );
    let g = Portico::start(tmp.path(), &config);
    let generation = g.generation();
    let url = format!("http://127.0.0.1:{http}/x");
    let get = |from: &str, key: &str| {
        let h = format!("x-api-key: {key}");
        curl(from, &["-H", h.as_str()], std::slice::from_ref(&url))
            .remove(0)
            .status
    };
    let body_for = |from: &str| {
        let out = Command::new("curl")
            .args(["-s", "--interface", from, &url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(get("127.0.0.1", "good"), 200);
    assert_eq!(get("127.0.0.2", "good"), 403);
    assert_eq!(body_for("127.0.0.2"), "blocked here\n");

    // The file changes on disk: in force within the refresher's second, no reload.
    support::write_atomic(
        &tmp.path().join("blocked.txt"),
        "# now the other\n127.0.0.1/32\n",
    );
    assert!(
        wait_until(Duration::from_secs(5), || get("127.0.0.1", "good") == 403),
        "{}",
        g.log()
    );
    assert_eq!(get("127.0.0.2", "good"), 200);
    assert_eq!(g.generation(), generation, "no reload happened");

    // The URL's list: fetched in the background.
    assert!(
        wait_until(Duration::from_secs(5), || get("127.0.0.3", "old-key")
            == 403),
        "{}",
        g.log()
    );
    assert_eq!(get("127.0.0.3", "new-key"), 200);
    // The list server goes away: the last good list stays.
    drop(lists);
    let failures = || {
        metric_sum(
            &g.metrics(),
            "portico_access_list_refreshes_total",
            "result=\"failure\"",
        )
        .unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(6), || failures() >= 2.0),
        "refreshes fail: {}",
        g.metrics()
    );
    assert_eq!(get("127.0.0.3", "old-key"), 403, "the last good list stays");
    assert_eq!(get("127.0.0.3", "new-key"), 200);
    assert!(g.log().contains("access list not refreshed"));
    assert_eq!(g.generation(), generation);
}

#[test]
fn a_client_holds_at_most_its_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let config = render(
        &format!(
            "{}\n[mesh.downstream]\nmaxConnectionsPerClient = 2\n{}{}",
            mesh_config(admin),
            r#"
[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
@to(v1)@
"#,
            upstreams_config(&[("v1", echo.port())])
        ),
        &[("HTTP", http.to_string())],
    );
    let g = Portico::start(tmp.path(), &config);
    let url = format!("http://127.0.0.1:{http}/x");
    // Two connections held open by 127.0.0.2 (each has had a request answered).
    let mut held: Vec<BufReader<TcpStream>> = (0..2)
        .map(|_| BufReader::new(connect_from("127.0.0.2", http)))
        .collect();
    for c in held.iter_mut() {
        assert_eq!(get_on(c).unwrap().status, 200);
    }
    // Its third is closed at once; another address is served.
    let mut third = BufReader::new(connect_from("127.0.0.2", http));
    assert!(get_on(&mut third).is_err(), "the third is closed");
    assert_eq!(
        count(&curl("127.0.0.3", &[], std::slice::from_ref(&url)), 200),
        1
    );
    let refused = metric_sum(
        &g.metrics(),
        "portico_listener_client_connections_refused_total",
        "",
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "{}", g.metrics());
    // One closed: its place comes back.
    held.pop();
    assert!(wait_until(Duration::from_secs(5), || {
        get_on(&mut BufReader::new(connect_from("127.0.0.2", http))).is_ok_and(|r| r.status == 200)
    }));
    // The one still held still works.
    assert_eq!(get_on(&mut held[0]).unwrap().status, 200);
}

/// A GET on connection `c`.
fn get_on(c: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    c.get_mut()
        .write_all(&build_request("GET", "shop.test", "/x", &[], b"", false))?;
    read_response(c, "GET")
}

/// A TCP connection to 127.0.0.1:`port` from local address `from`.
fn connect_from(from: &str, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let c = s
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let c = c.into_std()?;
        // From tokio the stream is non-blocking: the test's client blocks.
        c.set_nonblocking(false)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(c)
    })
    .unwrap_or_else(|e: std::io::Error| panic!("connect from {from}: {e}"))
}

/// A CA and a certificate it signed for `names`, as PEM: (ca cert, leaf cert, leaf key).
fn signed_by_new_ca(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "portico test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

const GLOBAL_TLS: &str = r#"
@MESH@
[mesh.redis]
url = "@REDIS@"
passwordFile = "redis.password"
timeout = "500ms"
tls = { caCertificates = "@CA@", clientCertificate = "client.crt", privateKey = "client.key" }

[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
@to(v1)@

[[rateLimits]]
name = "all"
targetRefs = [{ kind = "Gateway", name = "gw" }]
failOpen = false
statusOnError = 503
[[rateLimits.global.rules]]
name = "all"
limit = { requests = 5, unit = "Hour" }
"#;

#[test]
fn a_global_limit_counts_in_redis_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Redis' server certificate from one CA, Portico's client certificate from another.
    let (server_ca, server_cert, server_key) = signed_by_new_ca(&["127.0.0.1"]);
    let (client_ca, client_cert, client_key) = signed_by_new_ca(&["portico.test"]);
    let (other_ca, _, _) = signed_by_new_ca(&["127.0.0.1"]);
    for (name, pem) in [
        ("server-ca.crt", &server_ca),
        ("server.crt", &server_cert),
        ("server.key", &server_key),
        ("client-ca.crt", &client_ca),
        ("client.crt", &client_cert),
        ("client.key", &client_key),
        ("other-ca.crt", &other_ca),
    ] {
        std::fs::write(d.join(name), pem).unwrap();
    }
    std::fs::write(d.join("redis.password"), "s3cret\n").unwrap();
    let redis = RedisServer::start_tls(
        Some("s3cret"),
        support::redis_server::RedisTls {
            cert: d.join("server.crt"),
            key: d.join("server.key"),
            client_ca: d.join("client-ca.crt"),
        },
    );
    let echo = Echo::start("v1");
    let start = |ca: &str| {
        let port = free_port();
        let config = render(
            &format!("{GLOBAL_TLS}{}", upstreams_config(&[("v1", echo.port())])),
            &[
                ("MESH", mesh_config(free_port())),
                ("REDIS", redis.url()),
                ("CA", d.join(ca).display().to_string()),
                ("HTTP", port.to_string()),
            ],
        );
        (Portico::start(d, &config), port)
    };

    // Trusting Redis' CA: the handshake verifies, AUTH passes, and Redis counts (5 of 8;
    // a failed check would answer 503, as this rule fails closed).
    let (trusting, port) = start("server-ca.crt");
    let seen = curl(
        "127.0.0.1",
        &[],
        &vec![format!("http://127.0.0.1:{port}/"); 8],
    );
    assert_eq!(count(&seen, 200), 5, "{seen:?}");
    assert_eq!(count(&seen, 429), 3, "{seen:?}");
    drop(trusting);

    // Trusting another CA: Redis' certificate is refused, so every check fails (closed).
    let (doubting, port) = start("other-ca.crt");
    let seen = curl(
        "127.0.0.1",
        &[],
        &vec![format!("http://127.0.0.1:{port}/"); 3],
    );
    assert_eq!(count(&seen, 503), 3, "{seen:?}");
    let m = doubting.metrics();
    assert!(
        metric_sum(
            &m,
            "portico_ratelimit_decisions_total",
            "decision=\"failed_closed\""
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{m}"
    );
}
