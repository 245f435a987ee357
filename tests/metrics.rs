//! /metrics: Istio's standard metrics and Portico's own, in a format promtool accepts,
//! with counts that match the traffic sent.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// Runs `promtool check metrics` on `text`: (exit code, output).
fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn metrics_pass_promtool_and_count_the_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    write_cert(tmp.path(), "site", &["site.test"]);
    let echo = Echo::start("v1");
    let (http, https, dead) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"{mesh}
[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["site.test"]
tls = {{ mode = "SIMPLE", serverCertificate = "site.crt", privateKey = "site.key" }}

[[virtualServices]]
name = "app"
hosts = ["app.test"]
gateways = ["edge"]
[[virtualServices.http]]
match = [{{ uri = {{ prefix = "/dead" }} }}]
route = [{{ destination = {{ host = "dead.internal", port = {{ number = 80 }} }} }}]
retries = {{ attempts = 0 }}
[[virtualServices.http]]
@to(v1)@
{upstreams}
[[serviceEntries]]
name = "dead"
hosts = ["dead.internal"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ http = {dead} }} }}]
"#,
        mesh = mesh_config(free_port()),
        upstreams = upstreams_config(&[("v1", echo.port())]),
    );
    let portico = Portico::start(tmp.path(), &render(&config, &[]));
    let mut client = HttpClient::new(http);
    for _ in 0..7 {
        assert_eq!(client.get("app.test", "/ok").unwrap().status, 200);
    }
    for _ in 0..3 {
        assert_eq!(client.get("unknown.test", "/").unwrap().status, 404);
    }
    for _ in 0..2 {
        assert_eq!(http_get(http, "app.test", "/dead").status, 503);
    }
    // A gRPC request (by its content type).
    let grpc = http_request(
        http,
        "POST",
        "app.test",
        "/pkg.Svc/Call",
        &[("content-type", "application/grpc")],
        b"",
    );
    assert_eq!(grpc.status, 200);

    let mut text = String::new();
    // Each request's metrics are observed one after another: wait until every one of
    // them has counted the 13th request (a scrape may land between two of them).
    assert!(wait_until(Duration::from_secs(3), || {
        text = portico.metrics();
        [
            "istio_requests_total",
            "istio_request_duration_milliseconds_count",
            "istio_request_bytes_count",
            "istio_response_bytes_count",
        ]
        .iter()
        .all(|m| metric_sum(&text, m, "").unwrap_or(0.0) >= 13.0)
    }));
    let (code, out) = promtool(&text);
    // promtool's only complaint may be the unit in Istio's own metric name, kept as Istio
    // spells it so dashboards work; anything else (or a parse error, exit 1) fails.
    let other: Vec<&str> = out
        .lines()
        .filter(|l| {
            !l.trim().is_empty() && !l.contains("istio_request_duration_milliseconds use base unit")
        })
        .collect();
    assert!(
        code == 0 || (code == 3 && other.is_empty()),
        "promtool exit {code}:\n{out}"
    );

    let sum = |label: &str| metric_sum(&text, "istio_requests_total", label).unwrap_or(0.0);
    // Samples of istio_requests_total with all of `labels`.
    let sum_all = |labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter(|l| labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(sum("response_code=\"200\""), 8.0);
    assert_eq!(sum("response_code=\"404\""), 3.0);
    assert_eq!(sum("response_code=\"503\""), 2.0);
    assert_eq!(sum("response_flags=\"NR\""), 3.0);
    assert_eq!(sum("response_flags=\"UF\""), 2.0);
    assert_eq!(sum("destination_service=\"svc.internal\""), 8.0);
    assert_eq!(sum("destination_version=\"v1\""), 8.0);
    assert_eq!(sum("reporter=\"source\""), 13.0);
    // Portico reports as the gateway workload; the protocol is http or grpc.
    assert_eq!(sum("source_workload=\"portico\""), 13.0);
    assert_eq!(sum("request_protocol=\"http\""), 12.0);
    assert_eq!(
        sum_all(&["request_protocol=\"grpc\"", "response_code=\"200\""]),
        1.0,
        "{text}"
    );
    // The gateway's own replies (no route) have no destination version.
    assert_eq!(
        sum_all(&["destination_version=\"unknown\"", "response_code=\"404\""]),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "istio_request_duration_milliseconds_count", "").unwrap(),
        13.0
    );
    assert_eq!(
        metric_sum(&text, "istio_response_bytes_count", "").unwrap(),
        13.0
    );
    assert_eq!(
        metric_sum(&text, "portico_requests_total", "response_code=\"404\"").unwrap(),
        3.0
    );
    assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
    assert!(
        text.contains("le=\"0.5\"") && text.contains("le=\"3600000\""),
        "Envoy's buckets"
    );

    let expiry = metric_sum(
        &text,
        "portico_certificate_expiry_seconds",
        "host=\"site.test\"",
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(expiry > now, "the certificate's notAfter, in the future");
    assert_eq!(
        metric_sum(
            &text,
            "portico_upstream_endpoint_healthy",
            &format!("endpoint=\"127.0.0.1:{}\"", echo.port())
        ),
        Some(1.0)
    );
    assert!(metric_sum(&text, "portico_config_generation", "").unwrap() >= 1.0);
    check_grafana_dashboard(&text);
    // No unbounded labels: neither paths nor client addresses appear.
    assert!(!text.contains("/ok") && !text.contains("unknown.test") && !text.contains("pkg.Svc"));
}

/// Every metric the Grafana dashboard (packaging/grafana) queries is in `exported`.
fn check_grafana_dashboard(exported: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/grafana/portico-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let names = regex::Regex::new(r"\b((?:istio|portico)_[a-z_]+)").unwrap();
    let mut checked = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for m in names.captures_iter(expr) {
                let name = m[1].trim_end_matches("_bucket");
                assert!(
                    exported.contains(&format!("# TYPE {name} ")),
                    "panel {:?} queries {name}, which /metrics does not export",
                    p["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10);
}
