//! The policy engine on its own: config compiled as `portico run` compiles it, the route
//! found as the request core finds it, and the engine's checks called as the core calls
//! them, against a real `redis-server` (two compiles of the same config stand for two
//! replicas). The same behaviours through real Portico processes and real HTTP clients
//! are in `tests/ratelimit.rs`.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use portico::policy::{Decision, Outcome, RequestKeys};
use portico::routing::{Decision as Routed, Headers, RequestView};
use portico::snapshot::Snapshot;
use support::redis_server::RedisServer;

fn config(dir: &Path, redis: Option<&RedisServer>, policies: &str) -> String {
    let redis = match redis {
        Some(r) => {
            std::fs::write(dir.join("redis.password"), "s3cret\n").unwrap();
            format!(
                "[mesh.redis]\nurl = \"{}\"\npasswordFile = \"redis.password\"\ntimeout = \"200ms\"\nkeyPrefix = \"t{}\"\n",
                r.url(),
                r.port
            )
        }
        None => String::new(),
    };
    format!(
        r#"
[mesh]
admin = "127.0.0.1:1"
{redis}
[[gateways]]
name = "public"
[[gateways.servers]]
port = {{ number = 8080, name = "http", protocol = "HTTP" }}
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["shop.example.com"]
gateways = ["public"]
[[virtualServices.http]]
name = "open"
match = [{{ uri = {{ prefix = "/open" }} }}]
directResponse = {{ status = 200 }}
[[virtualServices.http]]
name = "closed"
match = [{{ uri = {{ prefix = "/closed" }} }}]
directResponse = {{ status = 200 }}
[[virtualServices.http]]
name = "other"
directResponse = {{ status = 200 }}
{policies}
"#
    )
}

fn compile(dir: &Path, text: &str) -> Snapshot {
    let path = dir.join("portico.toml");
    std::fs::write(&path, text).unwrap();
    match portico::config::build(&path, &portico::config::Options::default()) {
        Ok(c) => c.snapshot,
        Err(e) => panic!("{}", portico::config::ConfigErrors(e)),
    }
}

/// The policies of the route `path` on shop.example.com, as the request core would find
/// them after routing.
fn route_policy<'s>(s: &'s Snapshot, path: &str) -> &'s portico::policy::RoutePolicy {
    let view = RequestView {
        method: "GET",
        path,
        query: None,
        authority: "shop.example.com",
        scheme: "http",
        headers: Headers::Raw(&[], &[]),
        port: 8080,
        client_ip: None,
        peer_ip: None,
        sni: None,
        peer_principal: None,
    };
    match s.listeners[0].table.decide("shop.example.com", &view) {
        Routed::Route { vhost, route, .. } => s.listeners[0]
            .policies
            .route(vhost, route)
            .expect("a policy"),
        _ => panic!("no route for {path}"),
    }
}

fn keys(ip: &str, path: &'static str) -> RequestKeys<'static> {
    RequestKeys {
        client_ip: ip.parse::<IpAddr>().ok(),
        peer_ip: ip.parse::<IpAddr>().ok(),
        headers: Headers::Raw(&[], &[]),
        path,
        method: "GET",
        authority: "shop.example.com",
        port: 8080,
        sni: None,
        peer_principal: None,
        principal: None,
        claims: None,
    }
}

async fn global<'s>(s: &'s Snapshot, path: &'static str, ip: &str) -> Decision<'s> {
    route_policy(s, path)
        .global()
        .expect("global rules")
        .check(&keys(ip, path))
        .await
}

const SHARED_LIMITS: &str = r#"
[[rateLimits]]
name = "per-client"
targetRefs = [{ kind = "VirtualService", name = "shop", sectionName = "open" }]
[[rateLimits.global.rules]]
name = "window"
clientSelectors = [{ sourceCIDR = { type = "Distinct", value = "0.0.0.0/0" } }]
limit = { requests = 20, unit = "Hour" }

[[rateLimits]]
name = "bucket"
targetRefs = [{ kind = "VirtualService", name = "shop", sectionName = "closed" }]
[[rateLimits.global.rules]]
name = "gcra"
clientSelectors = [{ sourceCIDR = { type = "Distinct", value = "0.0.0.0/0" } }]
limit = { requests = 10, unit = "Hour" }
rateLimitAlgorithm = "GCRA"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_global_limit() {
    let redis = RedisServer::start(Some("s3cret"));
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), Some(&redis), SHARED_LIMITS);
    let (a, b) = (compile(dir.path(), &text), compile(dir.path(), &text));
    for (path, limit) in [("/open", 20), ("/closed", 10)] {
        let mut allowed = 0;
        for i in 0..3 * limit {
            let replica = if i % 2 == 0 { &a } else { &b };
            let d = global(replica, path, "192.0.2.1").await;
            assert!(
                matches!(d.outcome, Outcome::Allowed | Outcome::GlobalLimited),
                "{path}: {d:?}"
            );
            allowed += usize::from(d.allowed());
        }
        assert_eq!(
            allowed, limit,
            "{path}: both replicas together stay within the limit"
        );
        // Another client has its own count.
        let d = global(&a, path, "192.0.2.2").await;
        assert_eq!(d.outcome, Outcome::Allowed, "{path}");
        let h = d.headers.expect("RateLimit fields");
        assert_eq!(
            (h.limit, h.remaining, h.window),
            (limit as u32, limit as u32 - 1, 3600)
        );
        let limited = global(&b, path, "192.0.2.1").await;
        assert_eq!(
            (limited.status, limited.rule),
            (429, if path == "/open" { "window" } else { "gcra" })
        );
    }
}

const FAIL_MODES: &str = r#"
[[rateLimits]]
name = "open"
targetRefs = [{ kind = "VirtualService", name = "shop", sectionName = "open" }]
[[rateLimits.global.rules]]
limit = { requests = 5, unit = "Hour" }

[[rateLimits]]
name = "closed"
targetRefs = [{ kind = "VirtualService", name = "shop", sectionName = "closed" }]
failOpen = false
statusOnError = 429
[[rateLimits.global.rules]]
limit = { requests = 5, unit = "Hour" }
"#;

fn errors_total() -> u64 {
    let text = String::from_utf8(portico::telemetry::Metrics::global().render(None)).unwrap();
    support::metric_sum(&text, "portico_ratelimit_redis_errors_total", "").unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_open_or_closed_and_limits_resume_when_it_is_back() {
    let mut redis = RedisServer::start(Some("s3cret"));
    let dir = tempfile::tempdir().unwrap();
    let s = compile(dir.path(), &config(dir.path(), Some(&redis), FAIL_MODES));
    assert_eq!(
        global(&s, "/open", "192.0.2.1").await.outcome,
        Outcome::Allowed
    );
    assert_eq!(
        global(&s, "/closed", "192.0.2.1").await.outcome,
        Outcome::Allowed
    );

    redis.stop();
    let errors = errors_total();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let open = global(&s, "/open", "192.0.2.1").await;
        assert_eq!(open.outcome, Outcome::FailedOpen);
        assert!(open.allowed());
        let closed = global(&s, "/closed", "192.0.2.1").await;
        assert_eq!(
            (closed.outcome, closed.status),
            (Outcome::FailedClosed, 429)
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(40 * 200 / 1000),
        "each check waits at most the timeout"
    );
    assert!(errors_total() > errors, "the errors are counted");

    redis.restart();
    // Back (connections are made again after a short pause): counting starts afresh, and
    // the limit holds again.
    let mut back = false;
    for _ in 0..100 {
        if global(&s, "/closed", "192.0.2.9").await.outcome == Outcome::Allowed {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "global checks resume when Redis is back");
    let mut allowed = 1;
    for _ in 0..10 {
        allowed += usize::from(global(&s, "/closed", "192.0.2.9").await.allowed());
    }
    assert_eq!(allowed, 5);
    let d = global(&s, "/open", "192.0.2.9").await;
    assert_eq!(d.outcome, Outcome::Allowed);
}

#[test]
fn local_limits_count_each_client_and_survive_an_unrelated_reload() {
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
[[rateLimits]]
name = "local"
targetRefs = [{ kind = "Gateway", name = "public" }]
[[rateLimits.local.rules]]
clientSelectors = [{ sourceCIDR = { type = "Distinct", value = "0.0.0.0/0" } }]
limit = { requests = 10, unit = "Minute" }
overrides = [{ sourceCIDR = "198.51.100.0/24", limit = { requests = 30, unit = "Minute" } }]
"#;
    let path = dir.path().join("portico.toml");
    std::fs::write(&path, config(dir.path(), None, policy)).unwrap();
    let sources = portico::config::Sources::config(&path);
    let mut cache = portico::config::Cache::default();
    let opts = portico::config::Options::default();
    let build = |cache: &mut portico::config::Cache| {
        portico::config::build_cached(&sources, &opts, cache, &Default::default())
            .map_err(portico::config::ConfigErrors)
            .unwrap()
    };
    let first = build(&mut cache);
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    let s = first.snapshot;
    let count = |s: &Snapshot, ip: &str, path: &'static str, n: usize| {
        let p = route_policy(s, path);
        (0..n)
            .filter(|_| p.local(&keys(ip, path)).allowed())
            .count()
    };
    // 3N requests from each of two clients: each gets N; the override's range gets more.
    assert_eq!(count(&s, "192.0.2.1", "/open", 30), 10);
    assert_eq!(count(&s, "192.0.2.2", "/open", 30), 10);
    assert_eq!(count(&s, "198.51.100.7", "/open", 90), 30);
    // A gateway-wide rule counts each route apart (Envoy Gateway's default).
    assert_eq!(count(&s, "192.0.2.1", "/closed", 30), 10);

    // A reload that changes something else keeps the buckets: still limited.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n# touched: the file is parsed again\n"),
    )
    .unwrap();
    let again = build(&mut cache).snapshot;
    assert_eq!(
        count(&again, "192.0.2.1", "/open", 5),
        0,
        "the bucket was carried over"
    );
    // Changing the rule starts it afresh.
    std::fs::write(
        &path,
        config(
            dir.path(),
            None,
            &policy.replace("requests = 10", "requests = 12"),
        ),
    )
    .unwrap();
    let changed = build(&mut cache).snapshot;
    assert_eq!(count(&changed, "192.0.2.1", "/open", 30), 12);
}
