//! Distributed tracing: W3C `traceparent`/`tracestate` and B3 propagation, a server span
//! per sampled request with Istio's (Envoy's) attribute names, exported as OTLP/HTTP JSON
//! to a collector. Export is batched on its own thread behind a bounded queue, off the
//! request path; spans that do not fit are dropped and counted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Where spans go and how many requests start a trace.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// Percent of requests without an incoming sampling decision that are traced.
    pub sampling: f64,
    pub collector: SocketAddr,
    /// Host header and path for the OTLP/HTTP POST.
    pub authority: String,
    pub path: String,
}

/// The trace context of one request.
#[derive(Debug, Clone)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub sampled: bool,
    pub tracestate: Option<String>,
    /// The client sent B3 headers, so B3 is propagated too.
    pub b3: bool,
}

fn random_nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

/// Reads the incoming context (W3C first, then B3) and starts this request's span.
pub fn start(headers: &HeaderMap, sampling: f64) -> SpanContext {
    start_with(|n| headers.get(n).and_then(|v| v.to_str().ok()), sampling)
}

/// `start`, reading the request's fields through `get` (a lower-case name in, the first
/// value out), so every codec starts spans the same way from its own header form.
pub fn start_with<'h>(get: impl Fn(&str) -> Option<&'h str>, sampling: f64) -> SpanContext {
    let span_id = random_nonzero_u64();
    if let Some((trace, parent, flags)) = get("traceparent").and_then(parse_traceparent) {
        return SpanContext {
            trace_id: trace,
            span_id,
            parent_id: Some(parent),
            sampled: flags & 1 == 1,
            tracestate: get("tracestate").map(str::to_string),
            b3: false,
        };
    }
    if let (Some(t), Some(s)) = (get("x-b3-traceid"), get("x-b3-spanid")) {
        if let (Ok(trace), Ok(parent)) = (u128::from_str_radix(t, 16), u64::from_str_radix(s, 16)) {
            let sampled = match get("x-b3-sampled") {
                Some("1") | Some("true") => true,
                Some(_) => false,
                None => crate::routing::chance(sampling),
            };
            return SpanContext {
                trace_id: trace,
                span_id,
                parent_id: Some(parent),
                sampled,
                tracestate: None,
                b3: true,
            };
        }
    }
    SpanContext {
        trace_id: fastrand::u128(1..),
        span_id,
        parent_id: None,
        sampled: crate::routing::chance(sampling),
        tracestate: None,
        b3: false,
    }
}

/// `00-<32 hex trace>-<16 hex parent>-<2 hex flags>`.
pub fn parse_traceparent(v: &str) -> Option<(u128, u64, u8)> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || parent.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let parent = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    Some((trace, parent, u8::from_str_radix(flags, 16).ok()?))
}

impl SpanContext {
    /// Whether the upstream request's field `name` is this span's to write (the client's
    /// and any route's value of it stay behind).
    pub fn replaces(&self, name: &[u8]) -> bool {
        name.eq_ignore_ascii_case(b"traceparent")
            || (self.tracestate.is_some() && name.eq_ignore_ascii_case(b"tracestate"))
            || (self.b3
                && [
                    &b"x-b3-traceid"[..],
                    b"x-b3-spanid",
                    b"x-b3-parentspanid",
                    b"x-b3-sampled",
                ]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n)))
    }

    /// The upstream request's propagation fields: this span becomes the parent.
    pub fn fields(&self, mut field: impl FnMut(&[u8], &[u8])) {
        let mut buf = [0u8; 55];
        let flags = if self.sampled { "01" } else { "00" };
        let tp = format_into(
            &mut buf,
            format_args!("00-{:032x}-{:016x}-{flags}", self.trace_id, self.span_id),
        );
        field(b"traceparent", tp);
        if let Some(ts) = &self.tracestate {
            field(b"tracestate", ts.as_bytes());
        }
        if self.b3 {
            let mut buf = [0u8; 32];
            field(
                b"x-b3-traceid",
                format_into(&mut buf, format_args!("{:032x}", self.trace_id)),
            );
            field(
                b"x-b3-spanid",
                format_into(&mut buf, format_args!("{:016x}", self.span_id)),
            );
            if let Some(p) = self.parent_id {
                field(
                    b"x-b3-parentspanid",
                    format_into(&mut buf, format_args!("{p:016x}")),
                );
            }
            field(b"x-b3-sampled", if self.sampled { b"1" } else { b"0" });
        }
    }
}

/// Writes `args` into `buf` (sized for it) and returns the bytes written.
fn format_into<'b>(buf: &'b mut [u8], args: std::fmt::Arguments<'_>) -> &'b [u8] {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = cursor.write_fmt(args);
    let n = cursor.position() as usize;
    &buf[..n]
}

/// What a server span records of a request, gathered by whichever codec served it.
pub struct ServerSpan<'a> {
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub request_size: usize,
    pub response_size: usize,
    pub flag: crate::telemetry::outcome::Flag,
    /// The destination's host, port and cluster name.
    pub cluster: Option<(&'a str, u16, &'a str)>,
    pub upstream: Option<SocketAddr>,
    pub client_ip: Option<std::net::IpAddr>,
    pub start: SystemTime,
    pub status: u16,
}

impl ServerSpan<'_> {
    /// Exports the span of a sampled request (Envoy's name and Istio's attributes).
    pub fn export(self, ctx: &SpanContext) {
        if EXPORTER.get().is_none() {
            return;
        }
        Exporter::send(self.to_json(ctx, SystemTime::now()));
    }

    /// The span as one OTLP/HTTP JSON span object, written straight into one buffer: the
    /// only allocation of a sampled request's export (the exporter thread joins them).
    fn to_json(&self, ctx: &SpanContext, end: SystemTime) -> Vec<u8> {
        use std::io::Write as _;
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        };
        let authority = if self.authority.is_empty() {
            "-"
        } else {
            self.authority
        };
        let mut j = Vec::with_capacity(1024);
        let _ = write!(
            j,
            r#"{{"traceId":"{:032x}","spanId":"{:016x}","parentSpanId":""#,
            ctx.trace_id, ctx.span_id
        );
        if let Some(p) = ctx.parent_id {
            let _ = write!(j, "{p:016x}");
        }
        j.extend_from_slice(br#"","name":""#);
        match self.cluster {
            Some((host, port, _)) => {
                escaped(&mut j, host);
                let _ = write!(j, ":{port}/*");
            }
            None => {
                escaped(&mut j, authority);
                j.extend_from_slice(b"/*");
            }
        }
        let _ = write!(
            j,
            r#"","kind":2,"startTimeUnixNano":"{}","endTimeUnixNano":"{}","attributes":["#,
            nanos(self.start),
            nanos(end)
        );
        let attribute = |j: &mut Vec<u8>, key: &str, parts: &[&str]| {
            j.extend_from_slice(br#"{"key":""#);
            j.extend_from_slice(key.as_bytes());
            j.extend_from_slice(br#"","value":{"stringValue":""#);
            for p in parts {
                escaped(j, p);
            }
            j.extend_from_slice(br#""}},"#);
        };
        let mut url = [self.scheme, "://", authority, self.path, "", ""];
        if let Some(q) = self.query {
            url[4] = "?";
            url[5] = q;
        }
        attribute(&mut j, "http.url", &url);
        attribute(&mut j, "http.method", &[self.method]);
        attribute(&mut j, "http.protocol", &[self.protocol]);
        attribute(&mut j, "user_agent", &[self.user_agent.unwrap_or("-")]);
        attribute(
            &mut j,
            "guid:x-request-id",
            &[self.request_id.unwrap_or("-")],
        );
        let mut n = itoa::Buffer::new();
        attribute(&mut j, "request_size", &[n.format(self.request_size)]);
        attribute(&mut j, "response_size", &[n.format(self.response_size)]);
        let flag = if self.flag.is_none() {
            "-"
        } else {
            self.flag.as_str()
        };
        attribute(&mut j, "response_flags", &[flag]);
        attribute(&mut j, "node_id", &["portico"]);
        attribute(&mut j, "component", &["proxy"]);
        attribute(&mut j, "istio.canonical_service", &["portico"]);
        if let Some((_, _, cluster)) = self.cluster {
            attribute(&mut j, "upstream_cluster", &[cluster]);
            attribute(&mut j, "upstream_cluster.name", &[cluster]);
        }
        if let Some(a) = self.upstream {
            j.extend_from_slice(br#"{"key":"upstream_address","value":{"stringValue":""#);
            let _ = write!(j, "{a}");
            j.extend_from_slice(br#""}},"#);
        }
        if let Some(ip) = self.client_ip {
            j.extend_from_slice(br#"{"key":"peer.address","value":{"stringValue":""#);
            let _ = write!(j, "{ip}");
            j.extend_from_slice(br#""}},"#);
        }
        // Envoy marks 5xx as errors.
        let code = if self.status >= 500 || self.status == 0 {
            2
        } else {
            0
        };
        let _ = write!(
            j,
            r#"{{"key":"http.status_code","value":{{"intValue":"{}"}}}}],"status":{{"code":{code}}}}}"#,
            self.status
        );
        j
    }
}

/// `s` as the inside of a JSON string: quote, backslash and control characters escaped
/// (the request's own fields — path, user agent, request id — are the client's bytes).
fn escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !matches!(b, b'"' | b'\\' | 0x00..=0x1f | 0x7f) {
            continue;
        }
        out.extend_from_slice(&bytes[from..i]);
        match b {
            b'"' => out.extend_from_slice(br#"\""#),
            b'\\' => out.extend_from_slice(br"\\"),
            _ => {
                let _ = std::io::Write::write_fmt(out, format_args!("\\u{b:04x}"));
            }
        }
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

pub struct Exporter {
    /// Each span as its OTLP JSON object (`ServerSpan::to_json`).
    tx: SyncSender<Vec<u8>>,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();
static TARGET: OnceLock<std::sync::Mutex<Option<TraceSettings>>> = OnceLock::new();

fn target() -> &'static std::sync::Mutex<Option<TraceSettings>> {
    TARGET.get_or_init(|| std::sync::Mutex::new(None))
}

impl Exporter {
    /// Points the exporter at the collector (starting its thread the first time). Called
    /// at start and after each reload.
    pub fn configure(settings: Option<&TraceSettings>) {
        *target().lock().unwrap_or_else(|p| p.into_inner()) = settings.cloned();
        if settings.is_some() {
            EXPORTER.get_or_init(|| {
                let (tx, rx) = sync_channel(QUEUE);
                let _ = std::thread::Builder::new()
                    .name("otlp-export".into())
                    .spawn(move || export_loop(rx));
                Exporter { tx }
            });
        }
    }

    pub fn send(span: Vec<u8>) {
        if let Some(e) = EXPORTER.get() {
            if e.tx.try_send(span).is_err() {
                super::Metrics::global().spans_dropped.inc();
            }
        }
    }
}

fn export_loop(rx: Receiver<Vec<u8>>) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut last = Instant::now();
    loop {
        match rx.recv_timeout(FLUSH_EVERY) {
            Ok(span) => batch.push(span),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if !batch.is_empty() && (batch.len() >= BATCH || last.elapsed() >= FLUSH_EVERY) {
            let settings = target().lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(s) = settings {
                if let Err(e) = post(&s, &batch) {
                    tracing::warn!(collector = %s.collector, error = %e, spans = batch.len(), "OTLP export failed; spans dropped");
                    super::Metrics::global()
                        .spans_dropped
                        .inc_by(batch.len() as u64);
                }
            }
            batch.clear();
            last = Instant::now();
        }
    }
}

fn post(s: &TraceSettings, spans: &[Vec<u8>]) -> std::io::Result<()> {
    let mut body = Vec::with_capacity(256 + spans.iter().map(|j| j.len() + 1).sum::<usize>());
    body.extend_from_slice(
        concat!(
            r#"{"resourceSpans":[{"resource":{"attributes":["#,
            r#"{"key":"service.name","value":{"stringValue":"portico"}},"#,
            r#"{"key":"service.version","value":{"stringValue":""#,
            env!("CARGO_PKG_VERSION"),
            r#""}}]},"scopeSpans":[{"scope":{"name":"portico"},"spans":["#
        )
        .as_bytes(),
    );
    for (i, span) in spans.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(span);
    }
    body.extend_from_slice(b"]}]}]}");
    let mut conn = TcpStream::connect_timeout(&s.collector, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        s.path,
        s.authority,
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(&body)?;
    let mut status = [0u8; 12];
    conn.read_exact(&mut status)?;
    let code = std::str::from_utf8(&status[9..12]).unwrap_or("000");
    if !code.starts_with('2') {
        return Err(std::io::Error::other(format!("collector answered {code}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let (t, p, f) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p, 0x00f067aa0ba902b7);
        assert_eq!(f, 1);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }

    #[test]
    fn a_span_is_one_json_object_with_the_clients_bytes_escaped() {
        let ctx = SpanContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            parent_id: Some(0xabc),
            sampled: true,
            tracestate: None,
            b3: false,
        };
        let span = ServerSpan {
            scheme: "https",
            authority: "shop.example.com",
            path: "/a\"b\\c",
            query: Some("q=1"),
            method: "GET",
            protocol: "HTTP/1.1",
            user_agent: Some("evil\"}],\u{1}\u{7f}ü"),
            request_id: None,
            request_size: 12,
            response_size: 1024,
            flag: crate::telemetry::outcome::Flag::UpstreamConnectFailure,
            cluster: Some(("reviews.default.svc", 9080, "outbound|9080||reviews")),
            upstream: Some("127.0.0.1:9080".parse().unwrap()),
            client_ip: Some("10.0.0.1".parse().unwrap()),
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            status: 503,
        };
        let end = SystemTime::UNIX_EPOCH + Duration::from_secs(2);
        let v: serde_json::Value = serde_json::from_slice(&span.to_json(&ctx, end)).unwrap();
        assert_eq!(v["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["spanId"], "00f067aa0ba902b7");
        assert_eq!(v["parentSpanId"], "0000000000000abc");
        assert_eq!(v["name"], "reviews.default.svc:9080/*");
        assert_eq!(v["startTimeUnixNano"], "1000000000");
        assert_eq!(v["endTimeUnixNano"], "2000000000");
        assert_eq!(v["status"]["code"], 2, "a 5xx is an error");
        let attr = |k: &str| {
            v["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
                .unwrap_or_else(|| panic!("no attribute {k}"))
        };
        assert_eq!(
            attr("http.url")["stringValue"],
            "https://shop.example.com/a\"b\\c?q=1"
        );
        assert_eq!(attr("user_agent")["stringValue"], "evil\"}],\u{1}\u{7f}ü");
        assert_eq!(attr("guid:x-request-id")["stringValue"], "-");
        assert_eq!(attr("response_flags")["stringValue"], "UF");
        assert_eq!(attr("response_size")["stringValue"], "1024");
        assert_eq!(
            attr("upstream_cluster")["stringValue"],
            "outbound|9080||reviews"
        );
        assert_eq!(attr("upstream_address")["stringValue"], "127.0.0.1:9080");
        assert_eq!(attr("peer.address")["stringValue"], "10.0.0.1");
        assert_eq!(attr("http.status_code")["intValue"], "503");
        let batch = [span.to_json(&ctx, end), span.to_json(&ctx, end)];
        let mut body = Vec::new();
        for (i, s) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(s);
        }
        let spans: serde_json::Value =
            serde_json::from_slice(&[b"[", &body[..], b"]"].concat()).unwrap();
        assert_eq!(spans.as_array().unwrap().len(), 2);
    }

    #[test]
    fn incoming_context_is_continued() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let c = start(&h, 0.0);
        assert_eq!(c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.parent_id, Some(0x00f067aa0ba902b7));
        assert!(c.sampled, "the caller's decision wins over sampling = 0");
        let mut fields = Vec::new();
        c.fields(|n, v| fields.push((n.to_vec(), String::from_utf8(v.to_vec()).unwrap())));
        assert_eq!(fields.len(), 1, "traceparent alone: no tracestate, no B3");
        assert_eq!(fields[0].0, b"traceparent");
        let tp = &fields[0].1;
        assert_eq!(tp.len(), 55);
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(tp.ends_with("-01"));
        assert!(
            !tp.contains("00f067aa0ba902b7"),
            "the parent is now this span"
        );
        assert!(c.replaces(b"TraceParent") && !c.replaces(b"tracestate"));
        assert!(!start(&HeaderMap::new(), 0.0).sampled);
        assert!(start(&HeaderMap::new(), 100.0).sampled);
    }
}
