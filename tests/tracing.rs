//! Tracing: W3C and B3 context is propagated upstream, and spans reach an OTLP/HTTP
//! receiver on loopback with the client's trace id.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use support::*;

/// A minimal OTLP/HTTP receiver: stores every JSON body POSTed to it.
fn receiver() -> (u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let store = store.clone();
            thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                let mut first = true;
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if first {
                        assert!(line.starts_with("POST /v1/traces "), "{line}");
                        first = false;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                store
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                let mut conn = conn;
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            });
        }
    });
    (port, got)
}

fn spans(got: &Mutex<Vec<serde_json::Value>>) -> Vec<serde_json::Value> {
    got.lock()
        .unwrap()
        .iter()
        .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|rs| rs["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn start(sampling: f64, otlp: u16, echo: u16) -> (Portico, u16, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = format!(
        r#"{mesh}
defaultConfig = {{ tracing = {{ sampling = {sampling:.1} }} }}
extensionProviders = [{{ name = "otel", opentelemetry = {{ service = "127.0.0.1", port = {otlp}, http = {{ path = "/v1/traces" }} }} }}]

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
[[virtualServices.http]]
@to(v1)@
{upstreams}"#,
        mesh = mesh_config(free_port()),
        upstreams = upstreams_config(&[("v1", echo)]),
    );
    let portico = Portico::start(tmp.path(), &render(&config, &[]));
    (portico, http, tmp)
}

#[test]
fn w3c_context_is_continued_and_exported() {
    let (otlp, got) = receiver();
    let echo = Echo::start("v1");
    let (portico, http, _tmp) = start(0.0, otlp, echo.port());
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let resp = http_request(
        http,
        "GET",
        "app.test",
        "/traced",
        &[
            ("traceparent", &format!("00-{trace}-{parent}-01")),
            ("tracestate", "vendor=1"),
        ],
        b"",
    );
    assert_eq!(resp.status, 200);
    let upstream_tp = resp
        .echoed_header("traceparent")
        .expect("traceparent propagated");
    assert!(
        upstream_tp.starts_with(&format!("00-{trace}-")),
        "{upstream_tp}"
    );
    assert!(
        !upstream_tp.contains(parent),
        "the gateway's span is the upstream's parent"
    );
    assert_eq!(
        resp.echoed_header("tracestate").as_deref(),
        Some("vendor=1")
    );
    let gateway_span_id = upstream_tp.split('-').nth(2).unwrap().to_string();

    // Sampling is 0 %, so only the caller's sampled request produces a span.
    assert_eq!(http_get(http, "app.test", "/unsampled").status, 200);
    assert!(
        wait_until(Duration::from_secs(10), || !spans(&got).is_empty()),
        "a span arrives"
    );
    thread::sleep(Duration::from_millis(800));
    let all = spans(&got);
    assert_eq!(all.len(), 1, "{all:?}");
    let span = &all[0];
    assert_eq!(span["traceId"], trace);
    assert_eq!(span["parentSpanId"], parent);
    assert_eq!(span["spanId"], gateway_span_id.as_str());
    assert_eq!(span["kind"], 2);
    let attr = |k: &str| {
        span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == k)
            .map(|a| a["value"].clone())
    };
    assert_eq!(attr("http.method").unwrap()["stringValue"], "GET");
    assert_eq!(attr("http.status_code").unwrap()["intValue"], "200");
    assert!(attr("http.url").unwrap()["stringValue"]
        .as_str()
        .unwrap()
        .ends_with("app.test/traced"));
    assert_eq!(
        attr("upstream_cluster").unwrap()["stringValue"],
        "outbound|80|v1|svc.internal"
    );
    assert_eq!(attr("http.protocol").unwrap()["stringValue"], "HTTP/1.1");
    assert_eq!(attr("response_flags").unwrap()["stringValue"], "-");
    assert!(attr("guid:x-request-id").is_some());
    // Tracing costs no hand-over: both requests were served by the fast path (unless the
    // suite runs with it off).
    let metrics = portico.metrics();
    let fast = metric_sum(&metrics, "portico_fast_path_requests_total", "").unwrap_or(0.0);
    let lent = metric_sum(&metrics, "portico_fast_path_handoffs_total", "").unwrap_or(0.0);
    let want = if fast_path_on() { 2.0 } else { 0.0 };
    assert_eq!((fast, lent), (want, 0.0), "fast path requests, hand-overs");
}

#[test]
fn b3_is_propagated_and_sampling_starts_new_traces() {
    let (otlp, got) = receiver();
    let echo = Echo::start("v1");
    let (_portico, http, _tmp) = start(100.0, otlp, echo.port());
    let resp = http_request(
        http,
        "GET",
        "app.test",
        "/b3",
        &[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ],
        b"",
    );
    assert_eq!(
        resp.echoed_header("x-b3-traceid").as_deref(),
        Some("463ac35c9f6413ad48485a3953bb6124")
    );
    assert_eq!(
        resp.echoed_header("x-b3-parentspanid").as_deref(),
        Some("0020000000000001")
    );
    assert_eq!(resp.echoed_header("x-b3-sampled").as_deref(), Some("1"));
    for _ in 0..5 {
        let r = http_get(http, "app.test", "/new");
        assert!(
            r.echoed_header("traceparent").is_some(),
            "a new trace is started"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || spans(&got).len() >= 6),
        "every request traced at 100 %"
    );
    let all = spans(&got);
    assert!(all
        .iter()
        .any(|s| s["traceId"] == "463ac35c9f6413ad48485a3953bb6124"));
}
