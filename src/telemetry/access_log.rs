//! Access log: one line per request, JSON (Istio's `accessLogEncoding = "JSON"` keys) or
//! text from an Envoy-style format string compiled once. Lines go through a bounded
//! channel to a writer thread, so logging never blocks a request: when the channel is full
//! the line is dropped and counted. SIGUSR1 reopens the file (for logrotate).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use http::HeaderName;

use super::Metrics;
pub use crate::routing::Headers;

/// Istio's default text format.
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

const QUEUE: usize = 8192;

/// What one request leaves for the log.
pub struct Entry<'a> {
    pub start: SystemTime,
    pub method: &'a str,
    /// The path routed and forwarded (normalized), and the query when apart from it.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub protocol: &'a str,
    pub status: u16,
    pub flags: &'a str,
    pub details: &'a str,
    pub bytes_received: usize,
    pub bytes_sent: usize,
    pub duration: Duration,
    pub upstream_time: Option<Duration>,
    pub request_headers: Headers<'a>,
    pub response_headers: Option<Headers<'a>>,
    pub authority: &'a str,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<&'a str>,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    pub sni: Option<&'a str>,
    pub route_name: Option<&'a str>,
    pub attempts: u32,
    /// The verified JWT's principal (`iss/sub`).
    pub request_principal: Option<&'a str>,
}

/// One piece of a compiled format string.
#[derive(Debug, Clone)]
pub enum Piece {
    Text(String),
    StartTime,
    Method,
    Path,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamServiceTime,
    Req(HeaderName, Option<HeaderName>),
    Resp(HeaderName),
    Authority,
    UpstreamHost,
    UpstreamCluster,
    DownstreamLocal,
    DownstreamRemote,
    DownstreamRemoteNoPort,
    RequestedServerName,
    RouteName,
    UpstreamRequestAttemptCount,
    /// `%DYNAMIC_METADATA(istio_authn:request.auth.principal)%`: the JWT's `iss/sub`.
    RequestPrincipal,
    /// Operators Portico knows but has no value for (written `-`).
    Dash,
}

/// How lines are written: JSON, or text from a compiled format.
#[derive(Debug, Clone)]
pub enum Format {
    Json,
    Text(Vec<Piece>),
}

impl Format {
    /// Whether a line shows a response header (`%RESP(...)%`), so that a caller holding
    /// only the written head parses it for this format alone.
    pub fn reads_response_headers(&self) -> bool {
        matches!(self, Format::Text(pieces) if pieces.iter().any(|p| matches!(p, Piece::Resp(_))))
    }

    /// Compiles an Envoy format string; unknown operators are errors.
    pub fn text(format: &str) -> Result<Format, String> {
        let mut pieces = Vec::new();
        let mut rest = format;
        let mut literal = String::new();
        while let Some(i) = rest.find('%') {
            literal.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(r) = rest.strip_prefix('%') {
                literal.push('%');
                rest = r;
                continue;
            }
            let end = rest.find('%').ok_or_else(|| {
                let quoted: String = rest.chars().take(20).collect();
                format!("unterminated operator at {quoted:?}")
            })?;
            let op = &rest[..end];
            rest = &rest[end + 1..];
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(operator(op)?);
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Format::Text(pieces))
    }
}

fn header(name: &str) -> Result<HeaderName, String> {
    let lower = name.to_ascii_lowercase();
    let lower = match lower.as_str() {
        ":authority" => "host",
        other => other,
    };
    HeaderName::from_bytes(lower.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))
}

fn operator(op: &str) -> Result<Piece, String> {
    // Operators may carry a length limit, `%REQ(X):10%`; the limit is ignored.
    let op = match op.rsplit_once("):") {
        Some((head, len)) if len.bytes().all(|b| b.is_ascii_digit()) => format!("{head})"),
        _ => op.to_string(),
    };
    let arg = |prefix: &str| -> Option<String> {
        op.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(')'))
            .map(str::to_string)
    };
    if let Some(a) = arg("REQ(") {
        let (main, alt) = match a.split_once('?') {
            Some((m, alt)) => (m.to_string(), Some(alt.to_string())),
            None => (a, None),
        };
        return match main.to_ascii_uppercase().as_str() {
            ":METHOD" => Ok(Piece::Method),
            ":PATH" => Ok(Piece::Path),
            "X-ENVOY-ORIGINAL-PATH"
                if alt.as_deref().map(str::to_ascii_uppercase).as_deref() == Some(":PATH") =>
            {
                Ok(Piece::Path)
            }
            ":AUTHORITY" => Ok(Piece::Authority),
            _ => Ok(Piece::Req(
                header(&main)?,
                alt.map(|a| header(&a)).transpose()?,
            )),
        };
    }
    if let Some(a) = arg("RESP(") {
        return match a.to_ascii_uppercase().as_str() {
            "X-ENVOY-UPSTREAM-SERVICE-TIME" => Ok(Piece::UpstreamServiceTime),
            _ => Ok(Piece::Resp(header(&a)?)),
        };
    }
    if let Some(a) = arg("START_TIME(") {
        let _ = a; // custom strftime formats are written as RFC 3339
        return Ok(Piece::StartTime);
    }
    Ok(match op.as_str() {
        "START_TIME" => Piece::StartTime,
        "PROTOCOL" => Piece::Protocol,
        "RESPONSE_CODE" => Piece::ResponseCode,
        "RESPONSE_FLAGS" | "RESPONSE_FLAGS_LONG" => Piece::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Piece::ResponseCodeDetails,
        "BYTES_RECEIVED" => Piece::BytesReceived,
        "BYTES_SENT" => Piece::BytesSent,
        "DURATION" => Piece::Duration,
        "UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS" => Piece::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Piece::UpstreamCluster,
        "DOWNSTREAM_LOCAL_ADDRESS" => Piece::DownstreamLocal,
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => Piece::DownstreamRemote,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"
        | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => Piece::DownstreamRemoteNoPort,
        "REQUESTED_SERVER_NAME" => Piece::RequestedServerName,
        "ROUTE_NAME" => Piece::RouteName,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Piece::UpstreamRequestAttemptCount,
        "DYNAMIC_METADATA(istio_authn:request.auth.principal)" => Piece::RequestPrincipal,
        "CONNECTION_TERMINATION_DETAILS"
        | "UPSTREAM_TRANSPORT_FAILURE_REASON"
        | "UPSTREAM_LOCAL_ADDRESS" => Piece::Dash,
        other => return Err(format!("unknown access log operator %{other}%")),
    })
}

fn or_dash(s: Option<&str>) -> &str {
    match s {
        Some(v) if !v.is_empty() => v,
        _ => "-",
    }
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let ms = d.subsec_millis();
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The local and the remote address of a client connection, for `Entry`.
pub fn addresses(
    socket: Option<&pingora::protocols::SocketDigest>,
) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let inet = |a: Option<&pingora::protocols::l4::socket::SocketAddr>| a?.as_inet().copied();
    match socket {
        Some(s) => (inet(s.local_addr()), inet(s.peer_addr())),
        None => (None, None),
    }
}

fn header_str<'a>(h: Headers<'a>, name: &'a HeaderName) -> Option<&'a str> {
    h.get(name.as_str())
}

impl Format {
    pub fn render(&self, e: &Entry<'_>) -> String {
        match self {
            Format::Json => render_json(e),
            Format::Text(pieces) => {
                let mut out = String::with_capacity(256);
                for p in pieces {
                    render_piece(&mut out, p, e);
                }
                if !out.ends_with('\n') {
                    out.push('\n');
                }
                out
            }
        }
    }
}

fn render_piece(out: &mut String, p: &Piece, e: &Entry<'_>) {
    let _ = match p {
        Piece::Text(t) => {
            out.push_str(t);
            Ok(())
        }
        Piece::StartTime => write!(out, "{}", rfc3339(e.start)),
        Piece::Method => write!(out, "{}", e.method),
        Piece::Path => match e.query {
            Some(q) => write!(out, "{}?{q}", e.path),
            None => write!(out, "{}", e.path),
        },
        Piece::Protocol => write!(out, "{}", e.protocol),
        Piece::ResponseCode => write!(out, "{}", e.status),
        Piece::ResponseFlags => write!(out, "{}", or_dash(Some(e.flags))),
        Piece::ResponseCodeDetails => write!(out, "{}", or_dash(Some(e.details))),
        Piece::BytesReceived => write!(out, "{}", e.bytes_received),
        Piece::BytesSent => write!(out, "{}", e.bytes_sent),
        Piece::Duration => write!(out, "{}", e.duration.as_millis()),
        Piece::UpstreamServiceTime => match e.upstream_time {
            Some(t) => write!(out, "{}", t.as_millis()),
            None => write!(out, "-"),
        },
        Piece::Req(name, alt) => {
            let v = header_str(e.request_headers, name)
                .or_else(|| alt.as_ref().and_then(|a| header_str(e.request_headers, a)));
            write!(out, "{}", or_dash(v))
        }
        Piece::Resp(name) => write!(
            out,
            "{}",
            or_dash(e.response_headers.and_then(|h| header_str(h, name)))
        ),
        Piece::Authority => write!(out, "{}", or_dash(Some(e.authority))),
        Piece::UpstreamHost => match e.upstream_host {
            Some(a) => write!(out, "{a}"),
            None => write!(out, "-"),
        },
        Piece::UpstreamCluster => write!(out, "{}", or_dash(e.upstream_cluster)),
        Piece::DownstreamLocal => match e.downstream_local {
            Some(a) => write!(out, "{a}"),
            None => write!(out, "-"),
        },
        Piece::DownstreamRemote => match e.downstream_remote {
            Some(a) => write!(out, "{a}"),
            None => write!(out, "-"),
        },
        Piece::DownstreamRemoteNoPort => match e.downstream_remote {
            Some(a) => write!(out, "{}", a.ip()),
            None => write!(out, "-"),
        },
        Piece::RequestedServerName => write!(out, "{}", or_dash(e.sni)),
        Piece::RouteName => write!(out, "{}", or_dash(e.route_name)),
        Piece::UpstreamRequestAttemptCount => write!(out, "{}", e.attempts),
        Piece::RequestPrincipal => write!(out, "{}", or_dash(e.request_principal)),
        Piece::Dash => write!(out, "-"),
    };
}

fn render_json(e: &Entry<'_>) -> String {
    let h = |n: &str| -> serde_json::Value {
        match e.request_headers.get(n) {
            Some(v) => v.into(),
            None => serde_json::Value::Null,
        }
    };
    let path = match e.query {
        Some(q) => format!("{}?{q}", e.path),
        None => e.path.to_string(),
    };
    let mut value = serde_json::json!({
        "start_time": rfc3339(e.start),
        "route_name": e.route_name,
        "method": e.method,
        "path": path,
        "protocol": e.protocol,
        "response_code": e.status,
        "response_flags": or_dash(Some(e.flags)),
        "response_code_details": or_dash(Some(e.details)),
        "bytes_received": e.bytes_received,
        "bytes_sent": e.bytes_sent,
        "duration": e.duration.as_millis() as u64,
        "upstream_service_time": e.upstream_time.map(|t| t.as_millis() as u64),
        "x_forwarded_for": h("x-forwarded-for"),
        "user_agent": h("user-agent"),
        "request_id": h("x-request-id"),
        "authority": e.authority,
        "upstream_host": e.upstream_host.map(|a| a.to_string()),
        "upstream_cluster": e.upstream_cluster,
        "downstream_local_address": e.downstream_local.map(|a| a.to_string()),
        "downstream_remote_address": e.downstream_remote.map(|a| a.to_string()),
        "requested_server_name": e.sni,
        "upstream_request_attempt_count": e.attempts,
    });
    if let (Some(p), Some(o)) = (e.request_principal, value.as_object_mut()) {
        o.insert("request_principal".into(), p.into());
    }
    let mut line = serde_json::to_string(&value).unwrap_or_default();
    line.push('\n');
    line
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Where lines go: a writer thread behind a bounded channel.
pub struct Sink {
    tx: SyncSender<String>,
    reopen: Arc<AtomicBool>,
    path: Arc<Mutex<PathBuf>>,
}

impl Sink {
    /// Points the process-wide sink at `path` (starting it the first time). Called at start
    /// and after each reload, never per request.
    pub fn configure(path: &std::path::Path) {
        let sink = SINK.get_or_init(|| Sink::start(path.to_path_buf()));
        sink.set_path(path);
    }

    pub fn get() -> Option<&'static Sink> {
        SINK.get()
    }

    fn start(path: PathBuf) -> Sink {
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let path = Arc::new(Mutex::new(path));
        let (r, p) = (reopen.clone(), path.clone());
        let _ = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, r, p));
        Sink { tx, reopen, path }
    }

    fn set_path(&self, path: &std::path::Path) {
        let mut current = self.path.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_path() != path {
            *current = path.to_path_buf();
            self.reopen.store(true, Ordering::Release);
        }
    }

    /// Reopens the file on the next line (SIGUSR1, after logrotate moved it away).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // Wake the writer so the reopen happens now, even with no traffic.
        let _ = self.tx.try_send(String::new());
    }

    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Metrics::global().access_log_dropped.inc();
            }
        }
    }
}

fn open(path: &std::path::Path) -> Option<BufWriter<File>> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(BufWriter::with_capacity(64 * 1024, f)),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot open the access log");
            None
        }
    }
}

fn writer(rx: Receiver<String>, reopen: Arc<AtomicBool>, path: Arc<Mutex<PathBuf>>) {
    let current = || path.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut out = open(&current());
    while let Ok(line) = rx.recv() {
        if reopen.swap(false, Ordering::AcqRel) {
            tracing::info!(path = %current().display(), "access log reopened");
            if let Some(mut o) = out.take() {
                let _ = o.flush();
            }
            out = open(&current());
        }
        if let Some(o) = out.as_mut() {
            let _ = o.write_all(line.as_bytes());
            // Flush when the queue is drained, so lines appear promptly but are written in
            // batches under load.
            let mut more = rx.try_iter().take(QUEUE);
            for l in more.by_ref() {
                let _ = o.write_all(l.as_bytes());
            }
            let _ = o.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn entry(h: &HeaderMap) -> Entry<'_> {
        Entry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            method: "GET",
            path: "/a?b=1",
            query: None,
            protocol: "HTTP/1.1",
            status: 503,
            flags: "UF",
            details: "upstream_reset_before_response_started",
            bytes_received: 0,
            bytes_sent: 19,
            duration: Duration::from_millis(12),
            upstream_time: None,
            request_headers: Headers::Map(h),
            response_headers: None,
            authority: "shop.example.com",
            upstream_host: Some("127.0.0.1:9000".parse().unwrap()),
            upstream_cluster: Some("outbound|80||svc"),
            downstream_local: None,
            downstream_remote: Some("127.0.0.1:5555".parse().unwrap()),
            sni: None,
            route_name: Some("r1"),
            attempts: 3,
            request_principal: None,
        }
    }

    #[test]
    fn start_time_is_rfc3339() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            "2023-11-14T22:13:20.123Z"
        );
    }

    #[test]
    fn envoy_default_format() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("user-agent", "curl/8".parse().unwrap());
        let f = Format::text("[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_REQUEST_ATTEMPT_COUNT% 100%%\n").unwrap();
        assert_eq!(
            f.render(&entry(&h)),
            "[2023-11-14T22:13:20.123Z] \"GET /a?b=1 HTTP/1.1\" 503 UF 0 19 12 - \"-\" \"curl/8\" \"abc\" \"shop.example.com\" \"127.0.0.1:9000\" 3 100%\n"
        );
        assert!(Format::text(ISTIO_TEXT_FORMAT).is_ok());
        assert!(Format::text("%NOPE%").unwrap_err().contains("NOPE"));
        assert!(Format::text("%START_TIME").is_err());
    }

    /// Found by the log_format fuzz target: the message about an unterminated operator
    /// quoted its first 20 bytes, and panicked when byte 20 was inside a character.
    #[test]
    fn an_unterminated_operator_is_quoted_by_characters() {
        let err = Format::text("\u{5}REQ(X-A?ME%P ROETE_AD*DRESS_WI\u{283}").unwrap_err();
        assert!(err.contains("P ROETE_AD*DRESS_WI\u{283}"), "{err}");
        let err = Format::text(&format!("%{}", "\u{e9}".repeat(30))).unwrap_err();
        assert!(err.contains(&"\u{e9}".repeat(20)), "{err}");
    }

    #[test]
    fn json_has_istio_keys() {
        let h = HeaderMap::new();
        let v: serde_json::Value = serde_json::from_str(&Format::Json.render(&entry(&h))).unwrap();
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["response_flags"], "UF");
        assert_eq!(v["upstream_host"], "127.0.0.1:9000");
        assert_eq!(v["route_name"], "r1");
        assert!(v["request_id"].is_null());
    }
}
