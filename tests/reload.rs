//! Atomic configuration reload: under load (routes and certificates), rejected configs,
//! SIGHUP, the admin endpoint, and include files.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use support::*;

const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// Generation `GEN` of the config: a direct response `gen-GEN` with `x-gen: GEN`, served on a
/// plain listener and on an HTTPS listener whose certificate files are new each generation.
/// `@BROKEN@` is either empty or a second http route with a negative weight.
const GEN_TEMPLATE: &str = r#"@MESH@
[[gateways]]
name = "gw"

[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[gateways.servers]]
port = { number = @HTTPS@, name = "https", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["reload.test"]
tls = { mode = "SIMPLE", serverCertificate = "certs/gen-@GEN@.crt", privateKey = "certs/gen-@GEN@.key", defaultCertificate = true }

[[virtualServices]]
name = "gen"
hosts = ["reload.test"]
gateways = ["gw"]

[[virtualServices.http]]
name = "gen-@GEN@"
directResponse = { status = 200, body = { string = "gen-@GEN@" } }
headers = { response = { set = { x-gen = "@GEN@" } } }
@BROKEN@
"#;

const BROKEN_ROUTE: &str = r#"
[[virtualServices.http]]
name = "broken"
match = [{ uri = { prefix = "/broken/" } }]
route = [
  { destination = { host = "svc.internal", subset = "v1", port = { number = 80 } }, weight = -1 },
]
"#;

struct GenConfig {
    admin: u16,
    http: u16,
    https: u16,
    upstream_port: u16,
}

impl GenConfig {
    fn render(&self, gen: u32, broken: bool) -> String {
        let mut text = render(
            GEN_TEMPLATE,
            &[
                ("MESH", mesh_config(self.admin)),
                ("HTTP", self.http.to_string()),
                ("HTTPS", self.https.to_string()),
                ("GEN", gen.to_string()),
                (
                    "BROKEN",
                    if broken {
                        BROKEN_ROUTE.to_string()
                    } else {
                        String::new()
                    },
                ),
            ],
        );
        text.push_str(&upstreams_config(&[("v1", self.upstream_port)]));
        text
    }
}

/// Parse `gen-K` + `x-gen: K` from a response; Err if they are missing or disagree.
fn generation_of(resp: &Response) -> Result<u32, String> {
    if resp.status != 200 {
        return Err(format!("status {} body {:?}", resp.status, resp.text()));
    }
    let body = resp.text();
    let from_body: u32 = body
        .strip_prefix("gen-")
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| format!("unexpected body {body:?}"))?;
    let from_header: u32 = resp
        .header("x-gen")
        .and_then(|k| k.trim().parse().ok())
        .ok_or_else(|| format!("missing or bad x-gen header; headers {:?}", resp.headers))?;
    if from_body != from_header {
        return Err(format!(
            "mixed generations: body gen-{from_body} but x-gen {from_header}"
        ));
    }
    Ok(from_body)
}

#[derive(Default)]
struct ClientReport {
    requests: usize,
    failures: Vec<String>,
    seen: Vec<u32>,
}

impl ClientReport {
    fn fail(&mut self, msg: String) {
        if self.failures.len() < 20 {
            self.failures.push(msg);
        } else if self.failures.len() == 20 {
            self.failures.push("... (more failures)".to_string());
        }
    }

    /// Record generation `k` and check it never goes backwards.
    fn observe(&mut self, what: &str, k: u32) {
        if let Some(&last) = self.seen.last() {
            if k < last {
                self.fail(format!("{what}: generation went back from {last} to {k}"));
            }
            if k != last {
                self.seen.push(k);
            }
        } else {
            self.seen.push(k);
        }
    }
}

#[test]
fn reload_under_load_is_atomic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let echo = Echo::start("v1");
    let cfg = GenConfig {
        admin: free_port(),
        http: free_port(),
        https: free_port(),
        upstream_port: echo.port(),
    };

    // Certificates by generation; a certificate is registered before any config uses it.
    let certs: Arc<Mutex<HashMap<Vec<u8>, u32>>> = Arc::new(Mutex::new(HashMap::new()));
    let new_cert = |gen: u32| {
        let cert = gen_cert(&["reload.test"]);
        certs.lock().unwrap().insert(cert.der.clone(), gen);
        write_cert_files(&dir.join("certs"), &format!("gen-{gen}"), &cert);
    };

    new_cert(1);
    let portico = Portico::start(&dir, &cfg.render(1, false));
    let first = http_get(cfg.http, "reload.test", "/");
    assert_eq!(generation_of(&first), Ok(1), "initial config serves gen-1");

    let stop = Arc::new(AtomicBool::new(false));
    // The latest generation each client was served.
    let plain_latest = Arc::new(AtomicU32::new(0));
    let tls_latest = Arc::new(AtomicU32::new(0));

    // Client 1: keep-alive requests on the plain listener.
    let plain = {
        let stop = stop.clone();
        let latest = plain_latest.clone();
        let port = cfg.http;
        thread::spawn(move || {
            let mut report = ClientReport::default();
            let mut client = HttpClient::new(port);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                match client.get("reload.test", &format!("/load/{i}")) {
                    Ok(resp) => match generation_of(&resp) {
                        Ok(k) => {
                            report.observe("plain", k);
                            latest.fetch_max(k, Ordering::SeqCst);
                        }
                        Err(e) => report.fail(format!("plain request {i}: {e}")),
                    },
                    Err(e) => report.fail(format!("plain request {i}: {e}")),
                }
                report.requests += 1;
            }
            report
        })
    };

    // Client 2: a new TLS handshake per request on the HTTPS listener.
    let tls = {
        let stop = stop.clone();
        let latest = tls_latest.clone();
        let port = cfg.https;
        let certs = certs.clone();
        thread::spawn(move || {
            let mut report = ClientReport::default();
            let mut cert_gens = ClientReport::default();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                report.requests += 1;
                let mut conn = match tls_connect(port, Some("reload.test")) {
                    Ok(c) => c,
                    Err(e) => {
                        report.fail(format!("TLS handshake {i}: {e}"));
                        continue;
                    }
                };
                let cert_gen = certs.lock().unwrap().get(&conn.peer_cert).copied();
                let Some(cert_gen) = cert_gen else {
                    report.fail(format!(
                        "TLS handshake {i}: served a certificate that was never generated"
                    ));
                    continue;
                };
                cert_gens.observe("tls certificate", cert_gen);
                match conn.get("reload.test", &format!("/tls/{i}")) {
                    Ok(resp) => match generation_of(&resp) {
                        Ok(k) => {
                            if k < cert_gen {
                                report.fail(format!(
                                    "TLS request {i}: response gen-{k} older than the certificate of gen {cert_gen}"
                                ));
                            }
                            report.observe("tls", k);
                            latest.fetch_max(k, Ordering::SeqCst);
                        }
                        Err(e) => report.fail(format!("TLS request {i}: {e}")),
                    },
                    Err(e) => report.fail(format!("TLS request {i}: {e}")),
                }
            }
            report.failures.extend(cert_gens.failures);
            report
        })
    };

    let rewrites = 50u32;
    let broken_after = 25u32;
    let mut generation = portico.generation();
    let mut control = HttpClient::new(cfg.http);
    for gen in 2..=rewrites + 1 {
        if gen == broken_after + 1 {
            // A broken config: rejected, the previous generation keeps serving.
            let failures_before = portico.config_json()["reloads"]["failure"]
                .as_u64()
                .unwrap_or(0);
            let broken = cfg.render(gen - 1, true);
            let line = line_of(&broken, "weight = -1");
            portico.rewrite_config(&broken);
            let mut last_error = String::new();
            let reported = wait_until(RELOAD_WAIT, || {
                let json = portico.config_json();
                last_error = json["lastReloadError"].as_str().unwrap_or("").to_string();
                json["reloads"]["failure"].as_u64().unwrap_or(0) > failures_before
                    && !last_error.is_empty()
            });
            assert!(
                reported,
                "broken config not reported in /config: {}",
                portico.config_json()
            );
            let location = regex::Regex::new(&format!(r"portico\.toml:{line}:\d+")).unwrap();
            assert!(
                location.is_match(&last_error),
                "lastReloadError should name portico.toml:{line}:COL: {last_error}"
            );
            assert!(
                last_error.contains("virtualServices[0].http[1].route[0].weight"),
                "lastReloadError should name the field path: {last_error}"
            );
            assert_eq!(
                portico.generation(),
                generation,
                "a rejected config does not bump the generation"
            );
            let resp = control
                .get("reload.test", "/after-broken")
                .expect("request after a rejected reload");
            assert_eq!(
                generation_of(&resp),
                Ok(gen - 1),
                "old config keeps serving"
            );
            let metrics = portico.metrics();
            let failed = metric_sum(
                &metrics,
                "portico_config_reloads_total",
                "result=\"failure\"",
            );
            assert!(
                failed.unwrap_or(0.0) >= 1.0,
                "reload failure metric: {failed:?}\n{metrics}"
            );
            // Nothing changes while the broken file stays in place.
            thread::sleep(Duration::from_millis(200));
            assert_eq!(portico.generation(), generation);
        }
        new_cert(gen);
        portico.rewrite_config(&cfg.render(gen, false));
        generation = portico.wait_generation_above(generation, RELOAD_WAIT);
        let resp = control
            .get("reload.test", "/control")
            .expect("control request");
        assert_eq!(
            generation_of(&resp),
            Ok(gen),
            "after reload {gen} the new config serves"
        );
    }
    // Both clients get to the last generation before they stop.
    assert!(
        wait_until(RELOAD_WAIT, || {
            plain_latest.load(Ordering::SeqCst) == rewrites + 1
                && tls_latest.load(Ordering::SeqCst) == rewrites + 1
        }),
        "the clients were served the last generation (plain {}, tls {})",
        plain_latest.load(Ordering::SeqCst),
        tls_latest.load(Ordering::SeqCst)
    );
    stop.store(true, Ordering::SeqCst);
    let plain = plain.join().expect("plain client panicked");
    let tls = tls.join().expect("TLS client panicked");

    let final_json = portico.config_json();
    assert!(
        final_json["reloads"]["success"].as_u64().unwrap_or(0) >= rewrites as u64,
        "{final_json}"
    );
    assert!(
        final_json["sources"].to_string().contains("portico.toml"),
        "/config sources: {final_json}"
    );
    let metrics = portico.metrics();
    assert!(
        metric_sum(
            &metrics,
            "portico_config_reloads_total",
            "result=\"success\""
        )
        .unwrap_or(0.0)
            >= rewrites as f64,
        "reload success metric:\n{metrics}"
    );
    assert!(
        metric_sum(&metrics, "portico_config_generation", "").is_some(),
        "generation metric:\n{metrics}"
    );

    for (name, report) in [("plain", &plain), ("tls", &tls)] {
        assert!(
            report.failures.is_empty(),
            "{name} client: {} requests, failures:\n{}",
            report.requests,
            report.failures.join("\n")
        );
        assert!(report.requests > 0, "{name} client sent no requests");
        assert_eq!(
            report.seen.last().copied(),
            Some(rewrites + 1),
            "{name} client saw the last generation"
        );
        eprintln!(
            "{name} client: {} requests, {} distinct generations seen",
            report.requests,
            report.seen.len()
        );
    }
    drop(portico);
}

const SIMPLE_TEMPLATE: &str = r#"@INCLUDE@
[mesh]
admin = "127.0.0.1:@ADMIN@"
reloadPollInterval = "@POLL@"
drainDuration = "1s"

[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "main"
hosts = ["main.test"]
gateways = ["gw"]
[[virtualServices.http]]
name = "body"
directResponse = { status = 200, body = { string = "@BODY@" } }
"#;

fn simple_config(admin: u16, http: u16, poll: &str, body: &str, include: &str) -> String {
    render(
        SIMPLE_TEMPLATE,
        &[
            ("INCLUDE", include.to_string()),
            ("ADMIN", admin.to_string()),
            ("POLL", poll.to_string()),
            ("HTTP", http.to_string()),
            ("BODY", body.to_string()),
        ],
    )
}

#[test]
fn sighup_reloads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (admin, http) = (free_port(), free_port());
    // Polling is effectively off: only SIGHUP (or the admin API) reloads.
    let mut portico = Portico::start(tmp.path(), &simple_config(admin, http, "1h", "one", ""));
    assert_eq!(http_get(http, "main.test", "/").text(), "one");
    let g0 = portico.generation();

    portico.rewrite_config(&simple_config(admin, http, "1h", "two", ""));
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        portico.generation(),
        g0,
        "with reloadPollInterval = 1h the change is not picked up by itself"
    );
    assert_eq!(http_get(http, "main.test", "/").text(), "one");

    portico.send_signal_hup();
    let g1 = portico.wait_generation_above(g0, RELOAD_WAIT);
    assert!(portico.is_running(), "SIGHUP must not stop the gateway");
    assert_eq!(http_get(http, "main.test", "/").text(), "two");

    // Again, to show the handler stays installed.
    portico.rewrite_config(&simple_config(admin, http, "1h", "three", ""));
    portico.send_signal_hup();
    portico.wait_generation_above(g1, RELOAD_WAIT);
    assert_eq!(http_get(http, "main.test", "/").text(), "three");
    assert!(portico.is_running());
}

#[test]
fn admin_reload_endpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (admin, http) = (free_port(), free_port());
    let portico = Portico::start(tmp.path(), &simple_config(admin, http, "1h", "one", ""));
    assert_eq!(portico.admin_get("/healthz").status, 200);
    let g0 = portico.generation();

    portico.rewrite_config(&simple_config(admin, http, "1h", "two", ""));
    let resp = portico.admin_post("/reload");
    assert_eq!(resp.status, 200, "POST /reload: {}", resp.text());
    let g1 = resp.json()["generation"]
        .as_u64()
        .expect("generation in POST /reload response");
    assert!(g1 > g0, "POST /reload generation {g1} should be above {g0}");
    assert_eq!(portico.generation(), g1);
    assert_eq!(http_get(http, "main.test", "/").text(), "two");

    // A bad config: 400 with the error, old config keeps serving.
    let bad = simple_config(admin, http, "1h", "three", "").replace(
        "name = \"body\"",
        "name = \"body\"\ntimeout = \"5 parsecs\"",
    );
    let line = line_of(&bad, "5 parsecs");
    portico.rewrite_config(&bad);
    let resp = portico.admin_post("/reload");
    assert_eq!(
        resp.status,
        400,
        "POST /reload with a bad config: {}",
        resp.text()
    );
    let location = regex::Regex::new(&format!(r"portico\.toml:{line}:\d+")).unwrap();
    assert!(
        location.is_match(&resp.text()),
        "error names portico.toml:{line}: {}",
        resp.text()
    );
    assert!(
        resp.text().contains("virtualServices[0].http[0].timeout"),
        "error names the field: {}",
        resp.text()
    );
    assert_eq!(portico.generation(), g1);
    assert_eq!(http_get(http, "main.test", "/").text(), "two");
    let json = portico.config_json();
    assert!(
        json["lastReloadError"]
            .as_str()
            .unwrap_or("")
            .contains("portico.toml"),
        "{json}"
    );
    assert!(
        json["reloads"]["failure"].as_u64().unwrap_or(0) >= 1,
        "{json}"
    );
}

const INCLUDED_ROUTES: &str = r#"
[[virtualServices]]
name = "included"
hosts = ["inc.test"]
gateways = ["gw"]
[[virtualServices.http]]
name = "inc"
directResponse = { status = 200, body = { string = "@BODY@" } }
"#;

fn included(body: &str) -> String {
    render(INCLUDED_ROUTES, &[("BODY", body.to_string())])
}

fn wait_for_body(portico: &Portico, http: u16, host: &str, expected: &str) {
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        match try_http_request(http, "GET", host, "/", &[], b"") {
            Ok(resp) => {
                last = format!("{} {:?}", resp.status, resp.text());
                resp.status == 200 && resp.text() == expected
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(
        ok,
        "{host}: expected body {expected:?} within 10 s, last response {last}; /config: {}\nlog:\n{}",
        portico.config_json(),
        portico.log()
    );
}

#[test]
fn include_file_changes_are_picked_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: &Path = tmp.path();
    let (admin, http) = (free_port(), free_port());
    write_atomic(&dir.join("conf.d/routes.toml"), included("included-v1"));
    let portico = Portico::start(
        dir,
        &simple_config(admin, http, "50ms", "main", "include = [\"conf.d/*.toml\"]"),
    );
    assert_eq!(http_get(http, "main.test", "/").text(), "main");
    assert_eq!(http_get(http, "inc.test", "/").text(), "included-v1");
    let sources = portico.config_json()["sources"].to_string();
    assert!(
        sources.contains("routes.toml"),
        "/config sources lists the include: {sources}"
    );

    // The included file changes.
    let g0 = portico.generation();
    write_atomic(&dir.join("conf.d/routes.toml"), included("included-v2"));
    wait_for_body(&portico, http, "inc.test", "included-v2");
    assert!(portico.generation() > g0);
    assert_eq!(http_get(http, "main.test", "/").text(), "main");
}

/// Beyond "an included file changes": a new file that matches the include glob (the way a
/// ConfigMap or a package drops a file into conf.d) is picked up without touching the main
/// file.
#[test]
fn include_glob_picks_up_new_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: &Path = tmp.path();
    let (admin, http) = (free_port(), free_port());
    write_atomic(&dir.join("conf.d/routes.toml"), included("included-v1"));
    let portico = Portico::start(
        dir,
        &simple_config(admin, http, "50ms", "main", "include = [\"conf.d/*.toml\"]"),
    );
    assert_eq!(http_get(http, "inc.test", "/").text(), "included-v1");
    let more = INCLUDED_ROUTES
        .replace("\"included\"", "\"more\"")
        .replace("inc.test", "more.test")
        .replace("@BODY@", "more-v1");
    write_atomic(&dir.join("conf.d/more.toml"), more);
    wait_for_body(&portico, http, "more.test", "more-v1");
    assert_eq!(http_get(http, "inc.test", "/").text(), "included-v1");
}

const IN_FLIGHT_TEMPLATE: &str = r#"
@MESH@
[[gateways]]
name = "gw"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "main"
hosts = ["main.test"]
gateways = ["gw"]
[[virtualServices.http]]
headers = { response = { set = { x-gen = "@GEN@" } } }
@to(v1)@
"#;

/// A request in flight across a reload finishes on the config it started with: its
/// response gets the old route's response headers, the next request the new ones.
#[test]
fn a_request_in_flight_keeps_its_config_across_a_reload() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let config = |generation: &str| {
        let mut c = render(
            IN_FLIGHT_TEMPLATE,
            &[
                ("MESH", mesh_config(admin)),
                ("HTTP", http.to_string()),
                ("GEN", generation.to_string()),
            ],
        );
        c.push_str(&upstreams_config(&[("v1", echo.port())]));
        c
    };
    let portico = Portico::start(tmp.path(), &config("old"));
    let g0 = portico.generation();
    let in_flight =
        thread::spawn(move || try_http_request(http, "GET", "main.test", "/sleep/1500", &[], b""));
    assert!(
        wait_until(Duration::from_secs(5), || echo.count() == 1),
        "the request reached the upstream"
    );
    portico.rewrite_config(&config("new"));
    let resp = portico.admin_post("/reload");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(portico.generation() > g0);
    assert_eq!(
        http_get(http, "main.test", "/").header("x-gen"),
        Some("new"),
        "a request after the reload gets the new config"
    );
    let resp = in_flight
        .join()
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("x-gen"),
        Some("old"),
        "the request in flight keeps the config it started with"
    );
}
