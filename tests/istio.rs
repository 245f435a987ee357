//! Istio YAML manifests (tests/istio/*.yaml, one per traffic-management task) driven with
//! real traffic through the real gateway, checking what the Istio docs say each task shows.

mod support;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

fn manifest(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/istio")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Gw {
    portico: Portico,
    port: u16,
    dir: tempfile::TempDir,
}

/// Renders `tests/istio/NAME` into `<tmp>/manifests/` (with `@PORT@` the gateway port) and
/// starts Portico on a config that includes that folder.
fn start(name: &str, vars: &[(&str, String)]) -> Gw {
    start_in(tempfile::tempdir().unwrap(), name, vars)
}

fn start_in(dir: tempfile::TempDir, name: &str, vars: &[(&str, String)]) -> Gw {
    let port = free_port();
    write_manifest(dir.path(), name, port, vars);
    let config = format!("include = [\"manifests\"]\n{}", mesh_config(free_port()));
    Gw {
        portico: Portico::start(dir.path(), &config),
        port,
        dir,
    }
}

fn write_manifest(dir: &Path, name: &str, port: u16, vars: &[(&str, String)]) -> PathBuf {
    let mut vars = vars.to_vec();
    vars.push(("PORT", port.to_string()));
    let path = dir.join("manifests").join(name);
    write_atomic(&path, render(&manifest(name), &vars));
    path
}

fn get(port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    http_request(port, "GET", host, path, headers, b"")
}

/// The codec-share report for one task: of the task's `requests`, how many the fast codecs
/// served and how many they lent to pingora's request cycle, by reason (each of these
/// requests comes on its own connection or after the one before on the same one, so one
/// hand-over is one request). Waits until every request is counted (the fast codecs count
/// a request when its answer is finished), prints the share (`--nocapture` shows it) and
/// returns the hand-overs by reason. With the fast path off, nothing is counted at all, nor
/// on a listener the fast codecs do not serve (`requests` = 0: checks that).
fn codec_share(task: &str, p: &Portico, requests: usize) -> Vec<(String, u64)> {
    let counts = || {
        let metrics = p.metrics();
        let fast = metric_sum(&metrics, "portico_fast_path_requests_total", "").unwrap_or(0.0);
        let lent: Vec<(String, u64)> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("portico_fast_path_handoffs_total{reason=\""))
            .filter_map(|l| {
                let (reason, value) = l.split_once("\"}")?;
                let n = value.trim().parse::<f64>().ok()? as u64;
                (n > 0).then(|| (reason.to_string(), n))
            })
            .collect();
        (fast as u64, lent)
    };
    if !fast_path_on() || requests == 0 {
        let (fast, lent) = counts();
        assert_eq!((fast, lent.len()), (0, 0), "{task}: not on the fast codecs");
        eprintln!("codec share {task}: all on pingora's request cycle");
        return lent;
    }
    let counted =
        |(fast, lent): &(u64, Vec<(String, u64)>)| *fast + lent.iter().map(|(_, n)| n).sum::<u64>();
    let mut last = counts();
    assert!(
        wait_until(Duration::from_secs(5), || {
            last = counts();
            counted(&last) >= requests as u64
        }),
        "{task}: {requests} requests, counted {last:?}"
    );
    let (fast, lent) = last;
    assert_eq!(
        counted(&(fast, lent.clone())),
        requests as u64,
        "{task}: each request counted once: fast {fast}, lent {lent:?}"
    );
    eprintln!(
        "codec share {task}: {fast} of {requests} on the fast codecs ({:.0} %), lent {lent:?}",
        100.0 * fast as f64 / requests as f64
    );
    lent
}

#[test]
fn bookinfo_routing_by_header_with_run_istio() {
    let v1 = Echo::start("v1");
    let v2 = Echo::start("v2");
    let v3 = Echo::start("v3");
    // `portico run --istio DIR` beside a TOML config that has only the mesh settings.
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    write_manifest(
        tmp.path(),
        "bookinfo-header-routing.yaml",
        port,
        &[
            ("V1", v1.port().to_string()),
            ("V2", v2.port().to_string()),
            ("V3", v3.port().to_string()),
        ],
    );
    let gw = Portico::start_with_args(
        tmp.path(),
        &mesh_config(free_port()),
        &["--istio", "manifests"],
    );
    let host = "bookinfo.example.com";
    for _ in 0..5 {
        let r = get(port, host, "/reviews/0", &[("end-user", "jason")]);
        assert_eq!((r.status, r.upstream()), (200, Some("v2")), "jason gets v2");
        let r = get(port, host, "/reviews/0", &[]);
        assert_eq!(
            (r.status, r.upstream()),
            (200, Some("v1")),
            "anonymous gets v1"
        );
        // Header values match case-sensitively, as in Istio.
        let r = get(port, host, "/reviews/0", &[("end-user", "Jason")]);
        assert_eq!(r.upstream(), Some("v1"));
    }
    assert_eq!(
        v3.count(),
        0,
        "the sidecar-only VirtualService is not applied"
    );
    assert!(
        gw.log().contains("applies only to `mesh`"),
        "the skipped manifest is noted:\n{}",
        gw.log()
    );
    let lent = codec_share("bookinfo header routing", &gw, 15);
    assert_eq!(lent, [], "every request on the fast codecs");
}

#[test]
fn traffic_shifting_sends_half_to_v3() {
    let v1 = Echo::start("v1");
    let v3 = Echo::start("v3");
    let gw = start(
        "traffic-shifting.yaml",
        &[("V1", v1.port().to_string()), ("V3", v3.port().to_string())],
    );
    let mut client = HttpClient::new(gw.port);
    // Enough to tell 50/50 from 60/40.
    let n = 2500;
    assert!(binomial_tells_apart(n, 0.5, 0.6));
    for _ in 0..n {
        let r = client
            .get("reviews.bookinfo.svc.cluster.local", "/")
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let (a, b) = (v1.count(), v3.count());
    assert_eq!(a + b, n);
    assert_binomial(a, n, 0.5, &format!("v1 (v3 {b})"));
    let lent = codec_share("traffic shifting", &gw.portico, n);
    assert_eq!(lent, [], "every request on the fast codecs");
}

#[test]
fn fault_injection_delays_jason_and_aborts() {
    let v1 = Echo::start("v1");
    let gw = start("fault-injection.yaml", &[("V1", v1.port().to_string())]);
    // Docs: 7 s delay for jason; the test manifest uses 1 s.
    let t = Instant::now();
    let r = get(
        gw.port,
        "ratings.example.com",
        "/ratings/0",
        &[("end-user", "jason")],
    );
    let jason = t.elapsed();
    assert_eq!(r.status, 200);
    assert!(jason >= Duration::from_millis(1000), "delayed: {jason:?}");
    let t = Instant::now();
    let r = get(
        gw.port,
        "ratings.example.com",
        "/ratings/0",
        &[("end-user", "bob")],
    );
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "others are not delayed"
    );
    let before = v1.count();
    let r = get(
        gw.port,
        "ratings.example.com",
        "/ratings/0",
        &[("end-user", "mallory")],
    );
    assert_eq!(r.status, 500, "abort");
    // details: "returns 555 for every request" (the first rule has no match: it catches all).
    for _ in 0..5 {
        assert_eq!(
            get(gw.port, "details.example.com", "/details/0", &[]).status,
            555
        );
    }
    assert_eq!(
        v1.count(),
        before,
        "aborted requests never reach the upstream"
    );
    let lent = codec_share("fault injection", &gw.portico, 8);
    assert_eq!(lent, [], "delays and aborts on the fast codecs");
}

#[test]
fn request_timeout_gives_504() {
    let v1 = Echo::start("v1");
    let gw = start("request-timeouts.yaml", &[("V1", v1.port().to_string())]);
    let t = Instant::now();
    let r = get(gw.port, "reviews.example.com", "/sleep/2000", &[]);
    let took = t.elapsed();
    assert_eq!(r.status, 504, "timeout 0.5s");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1800),
        "answered at the timeout, not when the upstream did: {took:?}"
    );
    assert_eq!(
        get(gw.port, "reviews.example.com", "/sleep/10", &[]).status,
        200
    );
    // ratings: the 2 s fault delay, then the answer.
    let t = Instant::now();
    assert_eq!(get(gw.port, "ratings.example.com", "/", &[]).status, 200);
    assert!(t.elapsed() >= Duration::from_secs(2));
    let lent = codec_share("request timeouts", &gw.portico, 3);
    assert_eq!(lent, [], "timeouts on the fast codecs");
}

#[test]
fn circuit_breaking_overflows_with_uo() {
    let v1 = Echo::start("httpbin");
    let gw = start("circuit-breaking.yaml", &[("V1", v1.port().to_string())]);
    let port = gw.port;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            thread::spawn(move || {
                http_request(port, "GET", "httpbin.example.com", "/sleep/300", &[], b"")
            })
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
        "one connection plus one pending request succeed: {statuses:?}"
    );
    assert!(overflow >= 10, "most of the burst overflows: {statuses:?}");
    assert_eq!(v1.max_concurrent(), 1, "maxConnections: 1");
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .portico
            .stdout()
            .contains("\"response_flags\":\"UO\"")),
        "503s are logged with UO:\n{}",
        gw.portico.stdout()
    );
    // A request that finds the connection pool full waits (or overflows) on pingora's
    // cycle: the fast codecs do not wait for a connection. (`maxRequestsPerConnection: 1`
    // is the fast codecs' too.)
    let lent = codec_share("circuit breaking", &gw.portico, 20);
    assert!(
        lent.iter().all(|(reason, _)| reason == "admission"),
        "only a full pool lends: {lent:?}"
    );
}

#[test]
fn mirroring_copies_to_v2() {
    let v1 = Echo::start("v1");
    let v2 = Echo::start("v2");
    let gw = start(
        "mirroring.yaml",
        &[("V1", v1.port().to_string()), ("V2", v2.port().to_string())],
    );
    for _ in 0..5 {
        let r = get(gw.port, "httpbin.example.com", "/headers", &[]);
        assert_eq!(
            (r.status, r.upstream()),
            (200, Some("v1")),
            "the client gets v1"
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || v2.count() == 5),
        "v2 receives a copy of each request: {}",
        v2.count()
    );
    assert!(v2
        .requests()
        .iter()
        .all(|(m, p, _)| m == "GET" && p == "/headers"));
    let lent = codec_share("mirroring", &gw.portico, 5);
    assert_eq!(lent, [], "mirrored routes on the fast codecs");
}

#[test]
fn secure_ingress_serves_each_host_its_certificate() {
    let httpbin = Echo::start("httpbin");
    let hello = Echo::start("helloworld");
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("certs");
    let httpbin_der = write_credential(&creds, "httpbin-credential", &["httpbin.example.com"]);
    let hello_der = write_credential(&creds, "helloworld-credential", &["helloworld.example.com"]);
    let gw = start_in(
        dir,
        "secure-ingress.yaml",
        &[
            ("V1", httpbin.port().to_string()),
            ("V2", hello.port().to_string()),
        ],
    );
    let mut c = tls_connect(gw.port, Some("httpbin.example.com")).unwrap();
    assert!(
        c.peer_cert == httpbin_der,
        "httpbin.example.com gets its certificate"
    );
    let r = c.get("httpbin.example.com", "/status/418").unwrap();
    assert_eq!((r.status, r.upstream()), (418, Some("httpbin")));
    let mut c = tls_connect(gw.port, Some("helloworld.example.com")).unwrap();
    assert!(
        c.peer_cert == hello_der,
        "helloworld.example.com gets its certificate"
    );
    let r = c.get("helloworld.example.com", "/hello").unwrap();
    assert_eq!((r.status, r.upstream()), (200, Some("helloworld")));
    let r = c.get("helloworld.example.com", "/other").unwrap();
    assert_eq!(r.status, 404, "only /hello is routed");
    let lent = codec_share("secure ingress", &gw.portico, 3);
    assert_eq!(lent, [], "TLS-terminated requests on the fast codecs");
}

#[test]
fn egress_gateway_routes_to_the_service_entry() {
    let cnn = Echo::start("cnn");
    let gw = start("egress-gateway.yaml", &[("V1", cnn.port().to_string())]);
    let r = get(gw.port, "edition.cnn.com", "/politics", &[]);
    assert_eq!((r.status, r.upstream()), (200, Some("cnn")));
    assert_eq!(
        cnn.requests(),
        vec![("GET".into(), "/politics".into(), "edition.cnn.com".into())]
    );
    assert_eq!(
        get(gw.port, "www.example.com", "/", &[]).status,
        404,
        "other hosts"
    );
    // An egress gateway's listener is a forward proxy (absolute-form requests, CONNECT):
    // pingora's cycle serves all of it, the fast codecs are not in front of it.
    let lent = codec_share("egress gateway", &gw.portico, 0);
    assert_eq!(lent, []);
}

#[test]
fn wildcard_egress_sends_every_subdomain_to_one_endpoint() {
    let www = Echo::start("www");
    let gw = start("wildcard-egress.yaml", &[("V1", www.port().to_string())]);
    for host in ["en.wikipedia.org", "de.wikipedia.org"] {
        let r = get(gw.port, host, "/wiki/Main_Page", &[]);
        assert_eq!((r.status, r.upstream()), (200, Some("www")), "{host}");
    }
    assert_eq!(www.count(), 2);
    assert_eq!(get(gw.port, "wikipedia.org", "/", &[]).status, 404);
    assert_eq!(get(gw.port, "en.wikipedia.com", "/", &[]).status, 404);
    let lent = codec_share("wildcard egress", &gw.portico, 4);
    assert_eq!(lent, [], "every request on the fast codecs");
}

#[test]
fn tls_origination_from_a_destination_rule() {
    // The origin: an HTTPS server for edition.cnn.com (another Portico, answering itself).
    let origin_dir = tempfile::tempdir().unwrap();
    let (_origin, https) = https_origin(
        origin_dir.path(),
        &["edition.cnn.com"],
        "from the TLS origin",
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
    std::fs::copy(
        origin_dir.path().join("origin.crt"),
        dir.path().join("manifests/ca.crt"),
    )
    .unwrap();
    let gw = start_in(dir, "tls-origination.yaml", &[("V1", https.to_string())]);
    let r = get(gw.port, "edition.cnn.com", "/politics", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "from the TLS origin");
    // TLS to the upstream is pingora's connector's: the route is lent (`portico routes`
    // says why).
    let lent = codec_share("TLS origination", &gw.portico, 1);
    if fast_path_on() {
        assert_eq!(lent, [("route".to_string(), 1)]);
    }
}

/// A bad edit to a watched YAML manifest keeps the old config serving; a good one applies.
#[test]
fn reload_watches_yaml_manifests() {
    let v1 = Echo::start("v1");
    let v3 = Echo::start("v3");
    let vars = [("V1", v1.port().to_string()), ("V3", v3.port().to_string())];
    let gw = start("traffic-shifting.yaml", &vars);
    let host = "reviews.bookinfo.svc.cluster.local";
    let path = gw.dir.path().join("manifests/traffic-shifting.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    let generation = gw.portico.generation();
    let failures = |json: &serde_json::Value| json["reloads"]["failure"].as_u64().unwrap_or(0);
    let failures_before = failures(&gw.portico.config_json());
    // In with one rename from outside the folder: a temporary inside it would change the
    // folder twice, and a reload between the two (of the unchanged config) would move the
    // generation on.
    let broken = gw.dir.path().join("broken.yaml.tmp");
    std::fs::write(&broken, good.replace("weight: 50", "weight: [50")).unwrap();
    std::fs::rename(&broken, &path).unwrap();
    let mut json = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            json = gw.portico.config_json();
            failures(&json) > failures_before
        }),
        "the broken edit is reported as a failed reload: {json}"
    );
    assert_eq!(
        json["generation"].as_u64(),
        Some(generation),
        "the broken edit is refused"
    );
    let error = json["lastReloadError"].as_str().unwrap_or_default();
    assert!(
        regex::Regex::new(r"traffic-shifting\.yaml:\d+:\d+: ")
            .unwrap()
            .is_match(error),
        "the error names the file, line and column: {error}"
    );
    assert_eq!(
        get(gw.port, host, "/", &[]).status,
        200,
        "the old config serves"
    );
    // All to v3: a new Snapshot.
    write_atomic(
        &path,
        good.replacen("weight: 50", "weight: 0", 1)
            .replacen("weight: 50", "weight: 100", 1),
    );
    gw.portico
        .wait_generation_above(generation, Duration::from_secs(10));
    v3.reset_count();
    for _ in 0..10 {
        assert_eq!(get(gw.port, host, "/", &[]).upstream(), Some("v3"));
    }
    // A new file in the folder is picked up too.
    let extra = gw.dir.path().join("manifests/extra.yaml");
    write_atomic(
        &extra,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: extra\n  namespace: bookinfo\nspec:\n  hosts: [extra.example.com]\n  gateways: [bookinfo-gateway]\n  http:\n  - directResponse:\n      status: 204\n",
    );
    // Waited for by what it serves, not by the generation: writing the file (a temporary
    // then a rename) changes the folder twice, and a reload started between the two sees
    // the folder without it and still moves the generation on.
    let extra_status = || get(gw.port, "extra.example.com", "/", &[]).status;
    assert!(
        wait_until(Duration::from_secs(10), || extra_status() == 204),
        "the new manifest is served (last: {})",
        extra_status()
    );
}
