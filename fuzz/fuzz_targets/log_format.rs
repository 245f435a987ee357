//! Envoy access log format strings (`portico::telemetry::access_log::Format::text`) from
//! arbitrary text: compiling never panics, and a format that compiles renders entries
//! without panicking: one line, ending in a newline, for an entry with every field set and
//! for one with none, with request and response headers taken from the input too. And
//! JSON lines (written by hand, not by serde_json) with the input in every string field
//! parse back, with serde_json, to the input: escaping is right for any text.

#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portico::telemetry::access_log::{Entry, Format, Headers};

fuzz_target!(|input: &[u8]| {
    json_round_trip(input);
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(format) = Format::text(text) else {
        return;
    };
    let _ = format.reads_response_headers();
    // Headers named by the input's words, so `%REQ(...)%` and `%RESP(...)%` find some.
    let mut headers = HeaderMap::new();
    for word in text.split(|c: char| "%()?:".contains(c)) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(word.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(word),
        ) {
            headers.append(name, value);
        }
    }
    let empty = HeaderMap::new();
    let raw = [httparse::Header {
        name: "x-request-id",
        value: text.as_bytes(),
    }];
    for entry in [
        full(&headers, Headers::Map(&headers)),
        full(&headers, Headers::Raw(&raw, &[("user-agent", input)])),
        bare(&empty),
    ] {
        let line = format.render(&entry);
        assert!(line.ends_with('\n'));
    }
});

fn full<'a>(response: &'a HeaderMap, request: Headers<'a>) -> Entry<'a> {
    let addr: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    Entry {
        start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        method: "POST",
        path: "/a/b",
        query: Some("x=1&y"),
        protocol: "HTTP/1.1",
        status: 503,
        flags: "UF,URX",
        details: "upstream_reset_before_response_started{connection_failure}",
        bytes_received: usize::MAX,
        bytes_sent: 19,
        duration: Duration::MAX,
        upstream_time: Some(Duration::from_millis(3)),
        request_headers: request,
        response_headers: Some(Headers::Map(response)),
        authority: "shop.example.com",
        upstream_host: Some("127.0.0.1:9000".parse().unwrap()),
        upstream_cluster: Some("outbound|80||svc"),
        upstream_transport_failure: Some("invalid peer certificate: Revoked \"x\""),
        downstream_local: Some(addr),
        downstream_remote: Some(addr),
        sni: Some("shop.example.com"),
        peer: None,
        request_principal: Some("https://issuer.example/alice"),
        route_name: Some("r1"),
        attempts: u32::MAX,
    }
}

fn bare(h: &HeaderMap) -> Entry<'_> {
    Entry {
        // Before the epoch, and far after it.
        start: SystemTime::UNIX_EPOCH - Duration::from_secs(1),
        method: "",
        path: "",
        query: None,
        protocol: "",
        status: 0,
        flags: "",
        details: "",
        bytes_received: 0,
        bytes_sent: 0,
        duration: Duration::ZERO,
        upstream_time: None,
        request_headers: Headers::Map(h),
        response_headers: None,
        authority: "",
        upstream_host: None,
        upstream_cluster: None,
        upstream_transport_failure: None,
        downstream_local: None,
        downstream_remote: None,
        sni: None,
        peer: None,
        request_principal: None,
        route_name: None,
        attempts: 0,
    }
}

fn json_round_trip(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let s: &str = &text;
    let head = [httparse::Header {
        name: "user-agent",
        value: input,
    }];
    let added: [(&str, &[u8]); 1] = [("x-request-id", s.as_bytes())];
    let empty = HeaderMap::new();
    let mut e = full(&empty, Headers::Raw(&head, &added));
    e.method = s;
    e.path = s;
    e.query = Some(s);
    e.protocol = s;
    e.flags = s;
    e.details = s;
    e.authority = s;
    e.upstream_cluster = Some(s);
    e.sni = Some(s);
    e.route_name = Some(s);
    e.request_principal = Some(s);
    let line = Format::Json.render(&e);
    assert!(line.ends_with("}\n"));
    assert!(!line[..line.len() - 1].contains('\n'), "one line: {line:?}");
    let v: serde_json::Value = serde_json::from_str(&line).expect("the line is JSON");
    for key in [
        "method",
        "protocol",
        "authority",
        "upstream_cluster",
        "requested_server_name",
        "route_name",
        "request_principal",
    ] {
        assert_eq!(v[key].as_str(), Some(s), "{key}: {line}");
    }
    let or_dash = if s.is_empty() { "-" } else { s };
    assert_eq!(v["response_flags"].as_str(), Some(or_dash));
    assert_eq!(v["response_code_details"].as_str(), Some(or_dash));
    assert_eq!(v["path"].as_str(), Some(format!("{s}?{s}").as_str()));
    // Header values are logged when they are text (visible ASCII and tab), else null.
    let visible = input.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    let want = |v: &str| {
        if visible {
            serde_json::Value::from(v)
        } else {
            serde_json::Value::Null
        }
    };
    assert_eq!(v["user_agent"], want(s));
    assert_eq!(v["request_id"], want(s));
    assert!(v["x_forwarded_for"].is_null());
}
