//! Access log: one line per request, JSON (Istio's `accessLogEncoding = "JSON"` keys) or
//! text from an Envoy-style format string compiled once. Each worker thread formats its
//! lines straight into its own buffer; whole buffers go through a bounded channel to a
//! writer thread (one `write` each), so logging never blocks a request: when the channel
//! is full the buffer's lines are dropped and counted. Partly filled buffers are written
//! within a second, and all of them at shutdown. SIGUSR1 reopens the file (for logrotate).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderName;

use super::Metrics;
pub use crate::routing::Headers;

/// Istio's default text format.
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

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
    /// The client's verified certificate (mutual TLS).
    pub peer: Option<&'a crate::tls::client_auth::PeerCert>,
    pub route_name: Option<&'a str>,
    pub attempts: u32,
    /// The verified JWT's principal (`iss/sub`).
    pub request_principal: Option<&'a str>,
    /// Why the last try's TLS handshake with the upstream failed (Envoy's
    /// UPSTREAM_TRANSPORT_FAILURE_REASON).
    pub upstream_transport_failure: Option<&'a str>,
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
    DownstreamPeerUriSan,
    DownstreamPeerDnsSan,
    DownstreamPeerSubject,
    DownstreamPeerIssuer,
    DownstreamPeerFingerprint256,
    DownstreamPeerSerial,
    RouteName,
    UpstreamRequestAttemptCount,
    /// `%DYNAMIC_METADATA(istio_authn:request.auth.principal)%`: the JWT's `iss/sub`.
    RequestPrincipal,
    UpstreamTransportFailureReason,
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
        "DOWNSTREAM_PEER_URI_SAN" => Piece::DownstreamPeerUriSan,
        "DOWNSTREAM_PEER_DNS_SAN" => Piece::DownstreamPeerDnsSan,
        "DOWNSTREAM_PEER_SUBJECT" => Piece::DownstreamPeerSubject,
        "DOWNSTREAM_PEER_ISSUER" => Piece::DownstreamPeerIssuer,
        "DOWNSTREAM_PEER_FINGERPRINT_256" => Piece::DownstreamPeerFingerprint256,
        "DOWNSTREAM_PEER_SERIAL" => Piece::DownstreamPeerSerial,
        "ROUTE_NAME" => Piece::RouteName,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Piece::UpstreamRequestAttemptCount,
        "DYNAMIC_METADATA(istio_authn:request.auth.principal)" => Piece::RequestPrincipal,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Piece::UpstreamTransportFailureReason,
        "CONNECTION_TERMINATION_DETAILS" | "UPSTREAM_LOCAL_ADDRESS" => Piece::Dash,
        other => return Err(format!("unknown access log operator %{other}%")),
    })
}

fn or_dash(s: Option<&str>) -> &str {
    match s {
        Some(v) if !v.is_empty() => v,
        _ => "-",
    }
}

/// `t` as RFC 3339 in UTC with milliseconds, `2023-11-14T22:13:20.123Z`.
#[cfg(test)]
fn rfc3339(t: SystemTime) -> String {
    let mut out = Vec::new();
    push_rfc3339(&mut out, t);
    String::from_utf8(out).unwrap_or_default()
}

fn push_rfc3339(out: &mut Vec<u8>, t: SystemTime) {
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
    if !(0..=9999).contains(&year) {
        // Past the year 9999: as wide as it takes, as `{year:04}` writes it.
        let _ = write!(
            out,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        );
        return;
    }
    let two = |n: i64| [b'0' + (n / 10) as u8, b'0' + (n % 10) as u8];
    let (y, h, m, s) = (year as u32, rem / 3600, rem % 3600 / 60, rem % 60);
    let [y0, y1, y2, y3] = [y / 1000, y / 100 % 10, y / 10 % 10, y % 10].map(|d| b'0' + d as u8);
    let [mo0, mo1] = two(month);
    let [d0, d1] = two(day);
    let [h0, h1] = two(h);
    let [mi0, mi1] = two(m);
    let [s0, s1] = two(s);
    let [ms0, ms1, ms2] = [ms / 100, ms / 10 % 10, ms % 10].map(|d| b'0' + d as u8);
    out.extend_from_slice(&[
        y0, y1, y2, y3, b'-', mo0, mo1, b'-', d0, d1, b'T', h0, h1, b':', mi0, mi1, b':', s0, s1,
        b'.', ms0, ms1, ms2, b'Z',
    ]);
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

fn push_num(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// An address as `Display` writes it (`1.2.3.4:80`, `[::1]:80`); IPv4 without the
/// formatting machinery.
fn push_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => push_ipv4(out, *v4.ip(), Some(v4.port())),
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => push_ipv4(out, v4, None),
        std::net::IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// `a.b.c.d`, and `:port` when given, composed on the stack and appended at once
/// (divisions by constants only).
fn push_ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr, port: Option<u16>) {
    let mut buf = [0u8; 21]; // 255.255.255.255:65535
    let mut n = 0;
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if o >= 100 {
            buf[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            buf[n] = b'0' + o / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + o % 10;
        n += 1;
    }
    if let Some(mut p) = port {
        buf[n] = b':';
        n += 1;
        let mut digits = [0u8; 5];
        let mut d = 5;
        loop {
            d -= 1;
            digits[d] = b'0' + (p % 10) as u8;
            p /= 10;
            if p == 0 {
                break;
            }
        }
        let len = 5 - d;
        buf[n..n + len].copy_from_slice(&digits[d..]);
        n += len;
    }
    out.extend_from_slice(&buf[..n]);
}

/// The path as logged: the path, and `?query` when the entry keeps it apart.
fn push_path(out: &mut Vec<u8>, e: &Entry<'_>) {
    out.extend_from_slice(e.path.as_bytes());
    if let Some(q) = e.query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
}

impl Format {
    /// One line, ending in a newline.
    pub fn render(&self, e: &Entry<'_>) -> String {
        let mut out = Vec::with_capacity(512);
        self.render_into(e, &mut out);
        // Every piece is a `&str`, so the line is UTF-8.
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }

    /// Appends one line, ending in a newline, to `out`.
    pub fn render_into(&self, e: &Entry<'_>, out: &mut Vec<u8>) {
        match self {
            Format::Json => render_json(e, out),
            Format::Text(pieces) => {
                let start = out.len();
                for p in pieces {
                    render_piece(out, p, e);
                }
                if out.len() == start || out.last() != Some(&b'\n') {
                    out.push(b'\n');
                }
            }
        }
    }
}

fn render_piece(out: &mut Vec<u8>, p: &Piece, e: &Entry<'_>) {
    let mut text = |s: &str| out.extend_from_slice(s.as_bytes());
    match p {
        Piece::Text(t) => text(t),
        Piece::StartTime => push_rfc3339(out, e.start),
        Piece::Method => text(e.method),
        Piece::Path => push_path(out, e),
        Piece::Protocol => text(e.protocol),
        Piece::ResponseCode => push_num(out, e.status),
        Piece::ResponseFlags => text(or_dash(Some(e.flags))),
        Piece::ResponseCodeDetails => text(or_dash(Some(e.details))),
        Piece::BytesReceived => push_num(out, e.bytes_received),
        Piece::BytesSent => push_num(out, e.bytes_sent),
        Piece::Duration => push_num(out, e.duration.as_millis()),
        Piece::UpstreamServiceTime => match e.upstream_time {
            Some(t) => push_num(out, t.as_millis()),
            None => text("-"),
        },
        Piece::Req(name, alt) => {
            let v = header_str(e.request_headers, name)
                .or_else(|| alt.as_ref().and_then(|a| header_str(e.request_headers, a)));
            text(or_dash(v))
        }
        Piece::Resp(name) => text(or_dash(
            e.response_headers.and_then(|h| header_str(h, name)),
        )),
        Piece::Authority => text(or_dash(Some(e.authority))),
        Piece::UpstreamHost => match e.upstream_host {
            Some(a) => push_addr(out, a),
            None => text("-"),
        },
        Piece::UpstreamCluster => text(or_dash(e.upstream_cluster)),
        Piece::DownstreamLocal => match e.downstream_local {
            Some(a) => push_addr(out, a),
            None => text("-"),
        },
        Piece::DownstreamRemote => match e.downstream_remote {
            Some(a) => push_addr(out, a),
            None => text("-"),
        },
        Piece::DownstreamRemoteNoPort => match e.downstream_remote {
            Some(a) => push_ip(out, a.ip()),
            None => text("-"),
        },
        Piece::RequestedServerName => text(or_dash(e.sni)),
        Piece::DownstreamPeerUriSan => {
            text(or_dash(e.peer.map(|p| p.uri_sans.join(",")).as_deref()))
        }
        Piece::DownstreamPeerDnsSan => {
            text(or_dash(e.peer.map(|p| p.dns_sans.join(",")).as_deref()))
        }
        Piece::DownstreamPeerSubject => text(or_dash(e.peer.map(|p| &*p.subject))),
        Piece::DownstreamPeerIssuer => text(or_dash(e.peer.map(|p| &*p.issuer))),
        Piece::DownstreamPeerFingerprint256 => text(or_dash(e.peer.map(|p| &*p.hash))),
        Piece::DownstreamPeerSerial => text(or_dash(e.peer.map(|p| &*p.serial))),
        Piece::RouteName => text(or_dash(e.route_name)),
        Piece::UpstreamRequestAttemptCount => push_num(out, e.attempts),
        Piece::RequestPrincipal => text(or_dash(e.request_principal)),
        Piece::UpstreamTransportFailureReason => text(or_dash(e.upstream_transport_failure)),
        Piece::Dash => text("-"),
    }
}

/// `items` joined by commas (a certificate's SANs).
fn push_joined(out: &mut Vec<u8>, items: &[String]) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item.as_bytes());
    }
}

/// A JSON key with its punctuation, `,"name":`, made at compile time.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// The JSON line, written straight into the buffer. Keys are in alphabetical order (as
/// serde_json's sorted map wrote them before); to log a new field, add it to [`Entry`] and
/// one call here in its place, e.g. `j.opt_str(key!("principal"), e.principal);`.
fn render_json(e: &Entry<'_>, out: &mut Vec<u8>) {
    let [request_id, user_agent, x_forwarded_for] = logged_headers(e.request_headers);
    let mut j = JsonLine::new(out);
    j.str(key!("authority"), e.authority);
    j.num(key!("bytes_received"), e.bytes_received as u64);
    j.num(key!("bytes_sent"), e.bytes_sent as u64);
    j.addr(key!("downstream_local_address"), e.downstream_local);
    // A mutual-TLS client: Envoy's DOWNSTREAM_PEER_* values, under their snake-case names.
    if let Some(p) = e.peer {
        j.key(key!("downstream_peer_dns_san"));
        j.string_with(|o| push_joined(o, &p.dns_sans));
        j.str(key!("downstream_peer_fingerprint_256"), &p.hash);
        j.str(key!("downstream_peer_issuer"), &p.issuer);
        j.str(key!("downstream_peer_subject"), &p.subject);
        j.key(key!("downstream_peer_uri_san"));
        j.string_with(|o| push_joined(o, &p.uri_sans));
    }
    j.addr(key!("downstream_remote_address"), e.downstream_remote);
    j.num(key!("duration"), e.duration.as_millis() as u64);
    j.str(key!("method"), e.method);
    j.key(key!("path"));
    j.string_with(|o| push_path(o, e));
    j.str(key!("protocol"), e.protocol);
    j.opt_str(key!("request_id"), request_id);
    // Only when a verified JWT gave one (so other lines keep their keys).
    if let Some(p) = e.request_principal {
        j.str(key!("request_principal"), p);
    }
    j.opt_str(key!("requested_server_name"), e.sni);
    j.num(key!("response_code"), u64::from(e.status));
    j.str(key!("response_code_details"), or_dash(Some(e.details)));
    j.str(key!("response_flags"), or_dash(Some(e.flags)));
    j.opt_str(key!("route_name"), e.route_name);
    j.key(key!("start_time"));
    j.string_with(|o| push_rfc3339(o, e.start));
    j.opt_str(key!("upstream_cluster"), e.upstream_cluster);
    j.addr(key!("upstream_host"), e.upstream_host);
    // Only when a TLS handshake with the upstream failed (so other lines keep their keys).
    if let Some(r) = e.upstream_transport_failure {
        j.str(key!("upstream_transport_failure_reason"), r);
    }
    j.num(
        key!("upstream_request_attempt_count"),
        u64::from(e.attempts),
    );
    j.opt_num(
        key!("upstream_service_time"),
        e.upstream_time.map(|t| t.as_millis() as u64),
    );
    j.opt_str(key!("user_agent"), user_agent);
    j.opt_str(key!("x_forwarded_for"), x_forwarded_for);
    j.end();
}

/// The request headers the JSON line carries, `x-request-id`, `user-agent` and
/// `x-forwarded-for`, each as [`Headers::get`] gives it (the first value, when it is text),
/// found in one pass over a parsed head.
fn logged_headers(h: Headers<'_>) -> [Option<&str>; 3] {
    const NAMES: [&str; 3] = ["x-request-id", "user-agent", "x-forwarded-for"];
    match h {
        Headers::Map(m) => NAMES.map(|n| m.get(n).and_then(|v| v.to_str().ok())),
        Headers::Raw(head, added) => {
            let mut found: [Option<&[u8]>; 3] = [None; 3];
            let all = head
                .iter()
                .map(|h| (h.name, h.value))
                .chain(added.iter().copied());
            for (name, value) in all {
                let i = match name.len() {
                    12 => 0,
                    10 => 1,
                    15 => 2,
                    _ => continue,
                };
                if found[i].is_none() && name.eq_ignore_ascii_case(NAMES[i]) {
                    found[i] = Some(value);
                }
            }
            found.map(|v| v.and_then(crate::routing::matcher::visible))
        }
    }
}

/// A JSON object on one line, written field by field. Keys come from `key!` (plain ASCII
/// names, written as they are); values are escaped as serde_json escapes them.
struct JsonLine<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> JsonLine<'o> {
    fn new(out: &'o mut Vec<u8>) -> Self {
        JsonLine { out, first: true }
    }

    /// `key` is `,"name":` (from `key!`); the first one opens the object instead.
    fn key(&mut self, key: &'static str) {
        debug_assert!(key.starts_with(",\"") && key.ends_with("\":"));
        if self.first {
            self.first = false;
            self.out.push(b'{');
            self.out.extend_from_slice(&key.as_bytes()[1..]);
        } else {
            self.out.extend_from_slice(key.as_bytes());
        }
    }

    fn str(&mut self, key: &'static str, v: &str) {
        self.key(key);
        json_string(self.out, v);
    }

    /// A string, or `null`.
    fn opt_str(&mut self, key: &'static str, v: Option<&str>) {
        match v {
            Some(v) => self.str(key, v),
            None => self.null(key),
        }
    }

    fn num(&mut self, key: &'static str, v: u64) {
        self.key(key);
        push_num(self.out, v);
    }

    fn opt_num(&mut self, key: &'static str, v: Option<u64>) {
        match v {
            Some(v) => self.num(key, v),
            None => self.null(key),
        }
    }

    /// An address as a string (nothing in it needs escaping), or `null`.
    fn addr(&mut self, key: &'static str, v: Option<SocketAddr>) {
        match v {
            Some(a) => {
                self.key(key);
                self.out.push(b'"');
                push_addr(self.out, a);
                self.out.push(b'"');
            }
            None => self.null(key),
        }
    }

    fn null(&mut self, key: &'static str) {
        self.key(key);
        self.out.extend_from_slice(b"null");
    }

    /// A string value written by `f` from `&str`s: quoted, and escaped when it needs it.
    fn string_with(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        self.out.push(b'"');
        let start = self.out.len();
        f(self.out);
        if needs_escape(&self.out[start..]) {
            let raw = self.out.split_off(start);
            self.out.pop();
            json_string_bytes(self.out, &raw);
        } else {
            self.out.push(b'"');
        }
    }

    fn end(self) {
        self.out
            .extend_from_slice(if self.first { b"{}\n" } else { b"}\n" });
    }
}

/// serde_json's escapes: `"` and `\` and the control characters below 0x20 (`\b \t \n \f
/// \r` by name, the rest as `\u00XX` in lowercase hex); everything else, DEL and non-ASCII
/// included, as it is.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// `s` as a JSON string, quoted.
pub fn json_string(out: &mut Vec<u8>, s: &str) {
    json_string_bytes(out, s.as_bytes());
}

/// Whether one of the 8 bytes of `w` is below 0x20, `"` or `\`: the usual "has a zero
/// byte" test, exact as a yes/no answer (its false positives only sit above a true one).
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))) != 0
}

fn needs_escape(s: &[u8]) -> bool {
    let mut words = s.chunks_exact(8);
    for w in words.by_ref() {
        if word_needs_escape(u64::from_le_bytes(w.try_into().unwrap_or_default())) {
            return true;
        }
    }
    words.remainder().iter().any(|&b| ESCAPE[b as usize] != 0)
}

fn json_string_bytes(out: &mut Vec<u8>, s: &[u8]) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut from = 0;
    let mut i = 0;
    while i < s.len() {
        // Eight bytes at a time while none needs escaping.
        if let Some(w) = s.get(i..i + 8) {
            if !word_needs_escape(u64::from_le_bytes(w.try_into().unwrap_or_default())) {
                i += 8;
                continue;
            }
        }
        let b = s[i];
        let esc = ESCAPE[b as usize];
        if esc != 0 {
            out.extend_from_slice(&s[from..i]);
            from = i + 1;
            if esc == b'u' {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xf) as usize],
                ]);
            } else {
                out.extend_from_slice(&[b'\\', esc]);
            }
        }
        i += 1;
    }
    out.extend_from_slice(&s[from..]);
    out.push(b'"');
}

// ------------------------------------------------------------------------------ the sink

/// A worker hands its buffer over once it holds this much.
const BUFFER: usize = 64 * 1024;
/// Full buffers waiting for the writer, at most: with the buffers in the workers, the
/// memory the log may hold (about 4 MiB here). Past it lines are dropped and counted.
const QUEUE: usize = 64;
/// Emptied buffers kept for reuse.
const POOL: usize = 8;
/// How long a line may wait in a worker's buffer (NGINX's `flush=`).
const FLUSH: Duration = Duration::from_secs(1);

static SINK: OnceLock<Sink> = OnceLock::new();

/// Where lines go. Each thread formats its lines into its own buffer (a mutex only the
/// writer ever contends, once a sweep); a buffer is handed to the writer thread when it is
/// full (through a bounded channel: when full, the lines are dropped and counted, so
/// logging never blocks a request), and the writer sweeps the partly filled ones every
/// [`FLUSH`], when woken from idle (so the first line after a quiet spell is written at
/// once), before reopening the file, and at shutdown ([`Sink::flush`]). An idle gateway's
/// writer sleeps until a line comes. SIGUSR1 reopens the file (for logrotate).
pub struct Sink {
    tx: SyncSender<Msg>,
    rx: Mutex<Option<Receiver<Msg>>>,
    path: Mutex<PathBuf>,
    /// The per-thread buffers, for the writer's sweeps.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// The writer sleeps without a timer: the next line must wake it.
    idle: AtomicBool,
    /// The file is to be reopened (after the buffers are written to the current one).
    reopen: AtomicBool,
    pool: Mutex<Vec<Vec<u8>>>,
}

enum Msg {
    /// A full buffer.
    Lines(Vec<u8>),
    /// Lines are waiting in a buffer: sweep now, then every `FLUSH` while lines come.
    Wake,
    /// `reopen` is set: sweep, write, then open the (new) path.
    Reopen,
    /// Sweep and write everything, then answer.
    Flush(SyncSender<()>),
}

#[derive(Default)]
struct Slot {
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
}

/// This thread's buffer; registered with the sink on first use. When the thread ends its
/// lines stay in the slot for the writer's next sweep.
struct Local(Arc<Slot>);

thread_local! {
    static LOCAL: Local = Local::register();
}

impl Local {
    fn register() -> Local {
        let slot = Arc::new(Slot::default());
        if let Some(sink) = SINK.get() {
            lock(&sink.slots).push(slot.clone());
        }
        Local(slot)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sink {
    /// Points the process-wide sink at `path` (starting it the first time). Called at start
    /// and after each reload, never per request.
    pub fn configure(path: &std::path::Path) {
        let sink = SINK.get_or_init(|| Sink::new(path.to_path_buf()));
        if let Some(rx) = lock(&sink.rx).take() {
            let _ = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || writer(sink, rx));
        }
        sink.set_path(path);
    }

    pub fn get() -> Option<&'static Sink> {
        SINK.get()
    }

    fn new(path: PathBuf) -> Sink {
        let (tx, rx) = sync_channel(QUEUE);
        Sink {
            tx,
            rx: Mutex::new(Some(rx)),
            path: Mutex::new(path),
            slots: Mutex::new(Vec::new()),
            idle: AtomicBool::new(true),
            reopen: AtomicBool::new(false),
            pool: Mutex::new(Vec::new()),
        }
    }

    fn set_path(&self, path: &std::path::Path) {
        let mut current = lock(&self.path);
        if current.as_path() != path {
            *current = path.to_path_buf();
            drop(current);
            self.reopen();
        }
    }

    /// Writes what the buffers hold to the current file, then reopens it (SIGUSR1, after
    /// logrotate moved it away; a reload that changed the path).
    pub fn reopen(&self) {
        // Never blocks (the caller is an async task): when the queue is full, the writer
        // sees the flag after the message it is on.
        self.reopen.store(true, Ordering::SeqCst);
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Writes every line logged so far and waits (up to `timeout`) until it is in the file.
    /// Called at shutdown, once the workers have stopped.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (ack, done) = sync_channel(1);
        let mut msg = Msg::Flush(ack);
        // A writer stuck on its file (a pipe nobody reads) must not hold the exit forever.
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    /// Logs one request: its line is formatted into this thread's buffer.
    pub fn log(&self, format: &Format, e: &Entry<'_>) {
        let queued = LOCAL.try_with(|local| {
            let mut p = lock(&local.0.pending);
            if p.bytes.capacity() == 0 {
                p.bytes = self.fresh();
            }
            format.render_into(e, &mut p.bytes);
            p.lines += 1;
            if p.bytes.len() >= BUFFER {
                let full = std::mem::take(&mut *p);
                drop(p);
                self.hand_over(full);
            }
        });
        if queued.is_err() {
            // The thread is ending and its buffer is gone: the line goes on its own.
            let mut bytes = Vec::new();
            format.render_into(e, &mut bytes);
            self.hand_over(Pending { bytes, lines: 1 });
        }
        self.wake();
    }

    /// Logs a line formatted elsewhere (one line, ending in a newline).
    pub fn write(&self, line: String) {
        let queued = LOCAL.try_with(|local| {
            let mut p = lock(&local.0.pending);
            p.bytes.extend_from_slice(line.as_bytes());
            p.lines += 1;
            if p.bytes.len() >= BUFFER {
                let full = std::mem::take(&mut *p);
                drop(p);
                self.hand_over(full);
            }
        });
        if queued.is_err() {
            self.hand_over(Pending {
                bytes: line.into_bytes(),
                lines: 1,
            });
        }
        self.wake();
    }

    /// When the writer sleeps without a timer, wakes it (once; the writer clears `idle`
    /// only after a sweep that found nothing, see `writer`).
    fn wake(&self) {
        if self.idle.load(Ordering::SeqCst) && self.idle.swap(false, Ordering::SeqCst) {
            let _ = self.tx.try_send(Msg::Wake);
        }
    }

    fn hand_over(&self, p: Pending) {
        match self.tx.try_send(Msg::Lines(p.bytes)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Metrics::global().access_log_dropped.inc_by(p.lines);
            }
        }
    }

    fn fresh(&self) -> Vec<u8> {
        lock(&self.pool)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUFFER + BUFFER / 8))
    }

    fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() < BUFFER || buf.capacity() > 2 * BUFFER {
            return;
        }
        buf.clear();
        let mut pool = lock(&self.pool);
        if pool.len() < POOL {
            pool.push(buf);
        }
    }

    /// Takes every thread's partly filled buffer (dropping the slots of threads that
    /// ended) and passes them to `write`; the number of lines taken.
    fn sweep(&self, mut write: impl FnMut(Vec<u8>)) -> u64 {
        let slots: Vec<Arc<Slot>> = {
            let mut slots = lock(&self.slots);
            let all = slots.clone();
            // A slot only the registry holds belongs to a thread that ended: this sweep
            // takes its last lines, then it goes.
            slots.retain(|s| Arc::strong_count(s) > 2);
            all
        };
        let mut lines = 0;
        for slot in slots {
            let p = std::mem::take(&mut *lock(&slot.pending));
            if p.lines > 0 {
                lines += p.lines;
                write(p.bytes);
            }
        }
        lines
    }
}

fn open(path: &std::path::Path) -> Option<File> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot open the access log");
            None
        }
    }
}

fn writer(sink: &'static Sink, rx: Receiver<Msg>) {
    let current = || lock(&sink.path).clone();
    let mut out = open(&current());
    let write = |out: &mut Option<File>, buf: Vec<u8>| {
        if let Some(f) = out.as_mut() {
            // One write per buffer; an error (disk full) loses that buffer, as it would
            // lose a line.
            let _ = f.write_all(&buf);
        }
        sink.recycle(buf);
    };
    // While lines come the writer sweeps every FLUSH; after a sweep that found nothing
    // it sleeps until woken.
    let mut next_sweep: Option<Instant> = None;
    loop {
        let msg = match next_sweep {
            None => match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        match msg {
            Some(Msg::Lines(buf)) => {
                write(&mut out, buf);
                next_sweep.get_or_insert_with(|| Instant::now() + FLUSH);
            }
            Some(Msg::Wake) => {
                sink.sweep(|b| write(&mut out, b));
                next_sweep = Some(Instant::now() + FLUSH);
            }
            Some(Msg::Reopen) => {}
            Some(Msg::Flush(ack)) => {
                sink.sweep(|b| write(&mut out, b));
                let _ = ack.try_send(());
            }
            None if sink.sweep(|b| write(&mut out, b)) > 0 => {
                next_sweep = Some(Instant::now() + FLUSH);
            }
            None => {
                // Nothing came for FLUSH: sleep until a line wakes us. A line logged
                // after the sweep above but before `idle` was set saw `idle` false and
                // sent no wake, so sweep once more after setting it.
                sink.idle.store(true, Ordering::SeqCst);
                if sink.sweep(|b| write(&mut out, b)) > 0 {
                    if sink.idle.swap(false, Ordering::SeqCst) {
                        next_sweep = Some(Instant::now() + FLUSH);
                    } else {
                        // A worker took `idle` and sent a wake: it will arrive.
                        next_sweep = None;
                    }
                } else {
                    next_sweep = None;
                }
            }
        }
        if sink.reopen.swap(false, Ordering::SeqCst) {
            sink.sweep(|b| write(&mut out, b));
            tracing::info!(path = %current().display(), "access log reopened");
            out = open(&current());
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
            peer: None,
            route_name: Some("r1"),
            attempts: 3,
            request_principal: None,
            upstream_transport_failure: None,
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
    /// The renderer this module had before lines were written straight into buffers (a
    /// `serde_json::Value` per line, `write!` per piece): the new one must match it byte
    /// for byte.
    mod reference {
        use super::super::*;
        use std::fmt::Write as _;

        pub fn render(f: &Format, e: &Entry<'_>) -> String {
            match f {
                Format::Json => old_render_json(e),
                Format::Text(pieces) => {
                    let mut out = String::with_capacity(256);
                    for p in pieces {
                        old_render_piece(&mut out, p, e);
                    }
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                    out
                }
            }
        }

        fn old_rfc3339(t: SystemTime) -> String {
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

        fn old_render_piece(out: &mut String, p: &Piece, e: &Entry<'_>) {
            let _ = match p {
                Piece::Text(t) => {
                    out.push_str(t);
                    Ok(())
                }
                Piece::StartTime => write!(out, "{}", old_rfc3339(e.start)),
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
                Piece::DownstreamPeerUriSan => write!(
                    out,
                    "{}",
                    or_dash(e.peer.map(|p| p.uri_sans.join(",")).as_deref())
                ),
                Piece::DownstreamPeerDnsSan => write!(
                    out,
                    "{}",
                    or_dash(e.peer.map(|p| p.dns_sans.join(",")).as_deref())
                ),
                Piece::DownstreamPeerSubject => {
                    write!(out, "{}", or_dash(e.peer.map(|p| &*p.subject)))
                }
                Piece::DownstreamPeerIssuer => {
                    write!(out, "{}", or_dash(e.peer.map(|p| &*p.issuer)))
                }
                Piece::DownstreamPeerFingerprint256 => {
                    write!(out, "{}", or_dash(e.peer.map(|p| &*p.hash)))
                }
                Piece::DownstreamPeerSerial => {
                    write!(out, "{}", or_dash(e.peer.map(|p| &*p.serial)))
                }
                Piece::RequestPrincipal => write!(out, "{}", or_dash(e.request_principal)),
                Piece::UpstreamTransportFailureReason => {
                    write!(out, "{}", or_dash(e.upstream_transport_failure))
                }
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
                Piece::Dash => write!(out, "-"),
            };
        }

        fn old_render_json(e: &Entry<'_>) -> String {
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
            let mut line = serde_json::to_string(&serde_json::json!({
                "start_time": old_rfc3339(e.start),
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
            }))
            .unwrap_or_default();
            line.push('\n');
            line
        }
    }

    /// Strings a line may carry: quotes, backslashes, every control character, DEL,
    /// non-ASCII text, a lone surrogate's replacement, an empty string.
    fn tricky() -> Vec<String> {
        let mut all: String = (0u8..0x20).map(char::from).collect();
        all.push('\u{7f}');
        vec![
            "plain".into(),
            String::new(),
            "quote \" and backslash \\ and slash /".into(),
            "\"\"\\\\\"".into(),
            all,
            "tab\there\r\nnew line\u{8}\u{c}".into(),
            "caf\u{e9} \u{65e5}\u{672c} \u{1f600} \u{2028}\u{2029} \u{fffd}".into(),
            "</script><!-- &amp; %s %%".into(),
            "\\u0000".into(),
        ]
    }

    fn tricky_entry<'a>(s: &'a str, headers: Headers<'a>, v6: bool) -> Entry<'a> {
        let addr: SocketAddr = if v6 {
            "[2001:db8::1]:443".parse().unwrap()
        } else {
            "10.0.255.7:65535".parse().unwrap()
        };
        Entry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_007),
            method: s,
            path: s,
            query: Some(s),
            protocol: s,
            status: 599,
            flags: s,
            details: s,
            bytes_received: usize::MAX,
            bytes_sent: 0,
            duration: Duration::MAX,
            upstream_time: Some(Duration::from_micros(1500)),
            request_headers: headers,
            response_headers: Some(headers),
            authority: s,
            upstream_host: Some(addr),
            upstream_cluster: Some(s),
            downstream_local: Some(addr),
            downstream_remote: Some(addr),
            sni: Some(s),
            peer: None,
            route_name: Some(s),
            request_principal: None,
            upstream_transport_failure: None,
            attempts: u32::MAX,
        }
    }

    #[test]
    fn lines_are_byte_identical_to_the_serde_json_renderer() {
        let text = Format::text(ISTIO_TEXT_FORMAT).unwrap();
        let every = Format::text(
            "%START_TIME% %REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% \
             %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
             %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %REQ(USER-AGENT)% %REQ(X-A?USER-AGENT)% \
             %RESP(USER-AGENT)% %REQ(:AUTHORITY)% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% \
             %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
             %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %REQUESTED_SERVER_NAME% %ROUTE_NAME% \
             %UPSTREAM_REQUEST_ATTEMPT_COUNT% %UPSTREAM_LOCAL_ADDRESS% 100%%",
        )
        .unwrap();
        let empty_text = Format::text("").unwrap();
        let mut map = HeaderMap::new();
        map.insert("user-agent", "curl/8 \"quoted\" \\".parse().unwrap());
        map.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        // Bytes HeaderValue takes but that are not text: logged as null / `-`.
        map.insert(
            "x-request-id",
            http::HeaderValue::from_bytes(b"id-\xff\xfe-\x80").unwrap(),
        );
        let raw_head = [
            httparse::Header {
                name: "User-Agent",
                value: b"raw \xc3\xa9 agent",
            },
            httparse::Header {
                name: "x-forwarded-for",
                value: b"198.51.100.1\t",
            },
        ];
        let raw_added: [(&str, &[u8]); 1] = [("x-request-id", b"abc\"def\\")];
        let empty = HeaderMap::new();
        let mut cases = 0;
        for s in tricky() {
            for headers in [
                Headers::Map(&map),
                Headers::Raw(&raw_head, &raw_added),
                Headers::Map(&empty),
            ] {
                for v6 in [false, true] {
                    let mut e = tricky_entry(&s, headers, v6);
                    for f in [&Format::Json, &text, &every, &empty_text] {
                        assert_eq!(f.render(&e), reference::render(f, &e), "{f:?} {s:?}");
                        cases += 1;
                    }
                    // And with every optional field absent, and times at their edges.
                    e.query = None;
                    e.upstream_time = None;
                    e.upstream_host = None;
                    e.upstream_cluster = None;
                    e.downstream_local = None;
                    e.downstream_remote = None;
                    e.sni = None;
                    e.route_name = None;
                    e.response_headers = None;
                    e.duration = Duration::ZERO;
                    for start in [
                        SystemTime::UNIX_EPOCH - Duration::from_secs(1),
                        SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799),
                        SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800),
                        SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_999),
                    ] {
                        e.start = start;
                        for f in [&Format::Json, &text, &every] {
                            assert_eq!(f.render(&e), reference::render(f, &e), "{f:?} {s:?}");
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 300);
    }

    /// The eight-bytes-at-a-time test agrees with the table for every byte at every place,
    /// among fillers that need no escape (ASCII, DEL, high bytes) and next to each other.
    #[test]
    fn word_test_agrees_with_the_escape_table() {
        for filler in [b'a', b' ', 0x7f, 0x80, 0xc3, 0xff, b'!', b'#', b'[', b']'] {
            for b in 0..=255u8 {
                for at in 0..8 {
                    let mut w = [filler; 8];
                    w[at] = b;
                    assert_eq!(
                        word_needs_escape(u64::from_le_bytes(w)),
                        ESCAPE[b as usize] != 0,
                        "{w:?}"
                    );
                    let mut long = vec![filler; 19];
                    long[at * 2 + 1] = b;
                    assert_eq!(needs_escape(&long), ESCAPE[b as usize] != 0, "{long:?}");
                }
            }
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "1.2.3.4:5",
            "9.10.99.100:9",
            "100.199.200.255:10",
            "255.255.255.255:65535",
            "127.0.0.1:1000",
            "10.20.30.40:10000",
            "[::1]:443",
            "[2001:db8::1]:80",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            push_addr(&mut out, a);
            assert_eq!(String::from_utf8(out).unwrap(), a.to_string());
            let mut out = Vec::new();
            push_ip(&mut out, a.ip());
            assert_eq!(String::from_utf8(out).unwrap(), a.ip().to_string());
        }
    }

    #[test]
    fn json_strings_round_trip_through_serde_json() {
        let empty = HeaderMap::new();
        for s in tricky() {
            let e = tricky_entry(&s, Headers::Map(&empty), false);
            let line = Format::Json.render(&e);
            assert!(line.ends_with("}\n") && !line[..line.len() - 1].contains('\n'));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            for key in [
                "method",
                "protocol",
                "authority",
                "upstream_cluster",
                "requested_server_name",
                "route_name",
            ] {
                assert_eq!(v[key], s.as_str(), "{key} of {line}");
            }
            assert_eq!(v["path"], format!("{s}?{s}"));
            let mut bytes = Vec::new();
            json_string(&mut bytes, &s);
            let back: String = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(back, s);
            assert_eq!(bytes, serde_json::to_vec(&s).unwrap());
        }
        // Header values that are not visible ASCII are not text: null, as before.
        let head = [httparse::Header {
            name: "user-agent",
            value: b"\xff\xfe bytes",
        }];
        let e = tricky_entry("x", Headers::Raw(&head, &[]), false);
        let v: serde_json::Value = serde_json::from_str(&Format::Json.render(&e)).unwrap();
        assert!(v["user_agent"].is_null(), "{v}");
    }

    /// Lines logged from many threads, some of which end before the flush, all reach the
    /// file, each whole, once; a single line after a quiet spell is written without waiting
    /// for the flush interval.
    #[test]
    fn the_sink_writes_every_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        Sink::configure(&path);
        let sink = Sink::get().unwrap();
        let h = HeaderMap::new();
        let lines = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        };
        // Idle writer: the first line is written at once (well within the 1 s interval).
        sink.log(&Format::Json, &entry(&h));
        let t = Instant::now();
        while lines(&path).is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(lines(&path).len(), 1);

        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let h = HeaderMap::new();
                    let route = format!("t{t}");
                    for i in 0..3000 {
                        let path = format!("/{i}");
                        let mut e = entry(&h);
                        e.path = &path;
                        e.route_name = Some(&route);
                        Sink::get().unwrap().log(&Format::Json, &e);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // This thread's lines too, in a text format.
        let f = Format::text("%ROUTE_NAME% %REQ(:PATH)%").unwrap();
        for _ in 0..10 {
            sink.log(&f, &entry(&h));
        }
        assert!(sink.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().filter(|l| *l == "r1 /a?b=1").count(), 10);
        let json: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(json.len(), 1 + 4 * 3000);
        for t in 0..4 {
            let mut seen: Vec<u64> = json
                .iter()
                .filter(|v| v["route_name"] == format!("t{t}").as_str())
                .map(|v| v["path"].as_str().unwrap()[1..].parse().unwrap())
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..3000).collect::<Vec<u64>>(), "thread {t}");
        }
        // The ended threads' slots are gone after the sweep.
        assert!(lock(&sink.slots).len() <= 2, "{}", lock(&sink.slots).len());
    }
}
