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
    pub fn export(self, ctx: SpanContext) {
        let authority = if self.authority.is_empty() {
            "-"
        } else {
            self.authority
        };
        let name = match self.cluster {
            Some((host, port, _)) => format!("{host}:{port}/*"),
            None => format!("{authority}/*"),
        };
        let url = match self.query {
            Some(q) => format!("{}://{authority}{}?{q}", self.scheme, self.path),
            None => format!("{}://{authority}{}", self.scheme, self.path),
        };
        let mut attributes = vec![
            ("http.url", url),
            ("http.method", self.method.to_string()),
            ("http.protocol", self.protocol.to_string()),
            ("user_agent", self.user_agent.unwrap_or("-").to_string()),
            (
                "guid:x-request-id",
                self.request_id.unwrap_or("-").to_string(),
            ),
            ("request_size", self.request_size.to_string()),
            ("response_size", self.response_size.to_string()),
            ("response_flags", self.flag.to_string()),
            ("node_id", "portico".to_string()),
            ("component", "proxy".to_string()),
            ("istio.canonical_service", "portico".to_string()),
        ];
        if let Some((_, _, cluster)) = self.cluster {
            attributes.push(("upstream_cluster", cluster.to_string()));
            attributes.push(("upstream_cluster.name", cluster.to_string()));
        }
        if let Some(a) = self.upstream {
            attributes.push(("upstream_address", a.to_string()));
        }
        if let Some(ip) = self.client_ip {
            attributes.push(("peer.address", ip.to_string()));
        }
        Exporter::send(Span {
            ctx,
            name,
            start: self.start,
            end: SystemTime::now(),
            status: self.status,
            attributes,
        });
    }
}

/// A finished server span.
pub struct Span {
    pub ctx: SpanContext,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub status: u16,
    pub attributes: Vec<(&'static str, String)>,
}

impl Span {
    fn to_json(&self) -> serde_json::Value {
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_string()
        };
        let mut attrs: Vec<serde_json::Value> = self
            .attributes
            .iter()
            .map(|(k, v)| serde_json::json!({ "key": k, "value": { "stringValue": v } }))
            .collect();
        attrs.push(serde_json::json!({ "key": "http.status_code", "value": { "intValue": self.status.to_string() } }));
        serde_json::json!({
            "traceId": format!("{:032x}", self.ctx.trace_id),
            "spanId": format!("{:016x}", self.ctx.span_id),
            "parentSpanId": self.ctx.parent_id.map(|p| format!("{p:016x}")).unwrap_or_default(),
            "name": self.name,
            "kind": 2,
            "startTimeUnixNano": nanos(self.start),
            "endTimeUnixNano": nanos(self.end),
            "attributes": attrs,
            // Envoy marks 5xx as errors.
            "status": { "code": if self.status >= 500 || self.status == 0 { 2 } else { 0 } },
        })
    }
}

pub struct Exporter {
    tx: SyncSender<Span>,
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

    pub fn send(span: Span) {
        if let Some(e) = EXPORTER.get() {
            if e.tx.try_send(span).is_err() {
                super::Metrics::global().spans_dropped.inc();
            }
        }
    }
}

fn export_loop(rx: Receiver<Span>) {
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
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

fn post(s: &TraceSettings, spans: &[Span]) -> std::io::Result<()> {
    let body = serde_json::to_vec(&serde_json::json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": "portico" } },
                { "key": "service.version", "value": { "stringValue": env!("CARGO_PKG_VERSION") } },
            ]},
            "scopeSpans": [{
                "scope": { "name": "portico" },
                "spans": spans.iter().map(Span::to_json).collect::<Vec<_>>(),
            }],
        }],
    }))?;
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
