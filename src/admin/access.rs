//! Admin access control: whether the admin API answers a request at all. Decides from the
//! request head and the admin token only; never reads a body, a socket or a file, and never
//! logs the token.
//!
//! Three checks, in this order:
//! 1. **Host** (DNS rebinding): a web page whose name an attacker re-points at 127.0.0.1
//!    reaches a loopback admin API from the victim's browser, but its requests carry the
//!    attacker's name in `Host`. Only an IP literal or `localhost` is answered; the admin
//!    address itself (`mesh.admin` is always `IP:port`) is one of those.
//! 2. **Cross-site writes** (CSRF), for every method but GET and HEAD: a browser marks a
//!    request another page makes (`Origin`, `Sec-Fetch-Site`), and the only bodies it sends
//!    cross-site without asking first (a CORS preflight, which the admin API never grants)
//!    are the three types an HTML form can send.
//! 3. **Bearer token** (`mesh.adminTokenFile`), for everything but the probes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use http::{header, HeaderMap, Method};
use pingora_http::RequestHeader;
use subtle::ConstantTimeEq;

/// The admin API's bearer token, kept as its SHA-256 only: comparing digests takes the same
/// time whatever the length of the guess, and the Snapshot (which is `Debug`) never holds
/// the secret itself.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    pub fn new(token: &str) -> AdminToken {
        AdminToken {
            digest: sha256(token.as_bytes()),
        }
    }

    fn matches(&self, presented: &str) -> bool {
        bool::from(self.digest.ct_eq(&sha256(presented.as_bytes())))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Host` is missing, repeated, or neither an IP literal nor `localhost`.
    Host,
    /// A write from another origin: a foreign `Origin`, or `Sec-Fetch-Site` other than
    /// `same-origin` / `none`.
    CrossOrigin,
    /// A write whose body type an HTML form can send without a preflight.
    FormContentType,
    /// No bearer token, where one is configured.
    NoToken,
    /// A bearer token that is not the configured one.
    WrongToken,
}

impl Refusal {
    /// For the log line.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Host => "host",
            Refusal::CrossOrigin => "cross-origin",
            Refusal::FormContentType => "form-content-type",
            Refusal::NoToken => "no-token",
            Refusal::WrongToken => "wrong-token",
        }
    }
}

/// Whether `req` may be answered. `token`: the configured admin token, if any.
pub fn check(req: &RequestHeader, token: Option<&AdminToken>) -> Result<(), Refusal> {
    let host = request_host(req).ok_or(Refusal::Host)?;
    if !host_allowed(&host) {
        return Err(Refusal::Host);
    }
    if req.method != Method::GET && req.method != Method::HEAD {
        same_origin_write(&req.headers, &host)?;
    }
    if let Some(token) = token {
        if !is_probe(req) {
            bearer(&req.headers, token)?;
        }
    }
    Ok(())
}

/// The host the request names: the authority of its target when that is not a path
/// (absolute form, which wins over `Host`, or HTTP/2's `:authority`), else its one `Host`
/// header. None when there is none, or more than one, or the target and `Host` disagree.
fn request_host(req: &RequestHeader) -> Option<String> {
    let header = one(&req.headers, header::HOST)?;
    // pingora keeps an absolute-form target whole in `raw_path()`, and only its path in
    // the URI.
    let target = if crate::egress::forward::is_absolute_form(req) {
        let uri = http::Uri::try_from(req.raw_path()).ok()?;
        Some(uri.authority()?.as_str().to_string())
    } else {
        req.uri.authority().map(|a| a.as_str().to_string())
    };
    match (header, target) {
        (Some(h), Some(t)) if !h.eq_ignore_ascii_case(&t) => None,
        (h, t) => t.or(h.map(str::to_string)),
    }
}

/// The value of header `name` when it is sent at most once and is visible ASCII: Some(None)
/// when absent, None when repeated or unreadable.
fn one(headers: &HeaderMap, name: header::HeaderName) -> Option<Option<&str>> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Some(None),
        (Some(v), None) => v.to_str().ok().map(Some),
        (Some(_), Some(_)) => None,
    }
}

/// An IP literal (IPv4, or IPv6 in brackets) or `localhost`, with or without a port. A
/// rebinding attack needs a DNS name the attacker controls, and `localhost` is not one.
pub fn host_allowed(host: &str) -> bool {
    let (name_ok, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let (name, port) = host.split_at(host.find(':').unwrap_or(host.len()));
            let ip = name.parse::<std::net::Ipv4Addr>().is_ok();
            (ip || name.eq_ignore_ascii_case("localhost"), port)
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
        });
    name_ok && port_ok
}

/// GET /healthz and GET /ready answer without a token: the kubelet and load balancers probe
/// without one, and they say nothing but "up" and "ready".
fn is_probe(req: &RequestHeader) -> bool {
    req.method == Method::GET && matches!(req.uri.path(), "/healthz" | "/ready")
}

/// A write must come from the admin API's own pages (or from no page at all: curl).
fn same_origin_write(headers: &HeaderMap, host: &str) -> Result<(), Refusal> {
    match one(headers, header::HeaderName::from_static("sec-fetch-site")) {
        Some(None | Some("same-origin" | "none")) => {}
        _ => return Err(Refusal::CrossOrigin),
    }
    match one(headers, header::ORIGIN) {
        Some(None) => {}
        Some(Some(origin)) if same_origin(origin, host) => {}
        _ => return Err(Refusal::CrossOrigin),
    }
    match one(headers, header::CONTENT_TYPE) {
        Some(None) => Ok(()),
        Some(Some(ct)) if !form_content_type(ct) => Ok(()),
        _ => Err(Refusal::FormContentType),
    }
}

/// `origin` is `http://` + `host` (case-insensitive; port 80 written or not). `null`
/// (sandboxed frames, `file:` pages) is never the same origin.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some(authority) = origin
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &origin[7..])
    else {
        return false;
    };
    let strip = |a: &str| {
        let a = a.strip_suffix('/').unwrap_or(a);
        a.strip_suffix(":80").unwrap_or(a).to_ascii_lowercase()
    };
    strip(authority) == strip(host)
}

/// The media types a browser sends cross-site without a CORS preflight (the Fetch
/// standard's safelist): what an HTML form can post.
fn form_content_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "text/plain",
    ]
    .iter()
    .any(|t| essence.eq_ignore_ascii_case(t))
}

fn bearer(headers: &HeaderMap, token: &AdminToken) -> Result<(), Refusal> {
    let value = match one(headers, header::AUTHORIZATION) {
        Some(Some(v)) => v,
        Some(None) => return Err(Refusal::NoToken),
        None => return Err(Refusal::WrongToken),
    };
    let presented = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty());
    match presented {
        Some(t) if token.matches(t) => Ok(()),
        Some(_) => Err(Refusal::WrongToken),
        None => Err(Refusal::NoToken),
    }
}

/// At most one log line per second for refused requests, so that a scanner cannot flood
/// the log; the line says how many were refused without one since the last.
pub struct LogLimit {
    epoch: OnceLock<Instant>,
    /// Seconds since `epoch` of the last line, plus one (0: none yet).
    last: AtomicU64,
    skipped: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new()
    }
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            epoch: OnceLock::new(),
            last: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Some(lines skipped since the last one) when a line may be written at `now`.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(|| now);
        let second = now.saturating_duration_since(epoch).as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        if second > last
            && self
                .last
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:15000",
            "10.1.2.3:80",
            "localhost",
            "LocalHost:8080",
            "[::1]",
            "[::1]:15000",
            "[fe80::1]:1",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:15000",
            "localhost.",
            "localhost.evil.example",
            "a.localhost",
            "127.0.0.1.nip.io",
            "127.0.0.1.",
            "127.1",
            "2130706433",
            "::1",
            "[::1",
            "[evil.example]",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:+80",
            "localhost:80:80",
            "[::1]x",
            "[::1]:80:80",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn host_check() {
        let h = |headers: &[(&str, &str)]| check(&req("GET", "/config", headers), None);
        assert_eq!(h(&[("host", "127.0.0.1:15000")]), Ok(()));
        assert_eq!(h(&[]), Err(Refusal::Host));
        assert_eq!(h(&[("host", "evil.example")]), Err(Refusal::Host));
        assert_eq!(
            h(&[("host", "127.0.0.1"), ("host", "evil.example")]),
            Err(Refusal::Host)
        );
        let absolute = |host| {
            check(
                &req("GET", "http://evil.example/config", &[("host", host)]),
                None,
            )
        };
        assert_eq!(absolute("127.0.0.1"), Err(Refusal::Host));
        assert_eq!(absolute("evil.example"), Err(Refusal::Host));
        assert_eq!(
            check(&req("GET", "http://localhost:1/config", &[]), None),
            Ok(())
        );
    }

    #[test]
    fn writes_from_other_origins() {
        let post = |headers: &[(&str, &str)]| {
            let mut all = vec![("host", "127.0.0.1:15000")];
            all.extend_from_slice(headers);
            check(&req("POST", "/reload", &all), None)
        };
        assert_eq!(post(&[]), Ok(()));
        assert_eq!(post(&[("origin", "http://127.0.0.1:15000")]), Ok(()));
        assert_eq!(post(&[("origin", "HTTP://127.0.0.1:15000")]), Ok(()));
        assert_eq!(post(&[("sec-fetch-site", "same-origin")]), Ok(()));
        assert_eq!(post(&[("content-type", "application/json")]), Ok(()));
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:3000",
            "http://localhost:15000",
            "https://127.0.0.1:15000",
            "null",
            "",
        ] {
            assert_eq!(
                post(&[("origin", origin)]),
                Err(Refusal::CrossOrigin),
                "{origin}"
            );
        }
        for site in ["cross-site", "same-site", "bogus"] {
            assert_eq!(
                post(&[("sec-fetch-site", site)]),
                Err(Refusal::CrossOrigin),
                "{site}"
            );
        }
        for ct in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain;charset=UTF-8",
            " Text/Plain ",
        ] {
            assert_eq!(
                post(&[("content-type", ct)]),
                Err(Refusal::FormContentType),
                "{ct}"
            );
        }
        // GET is never a write: an Origin on it is not refused.
        assert_eq!(
            check(
                &req(
                    "GET",
                    "/config",
                    &[("host", "localhost"), ("origin", "http://evil.example")]
                ),
                None
            ),
            Ok(())
        );
        // Port 80 may be written or not.
        assert!(same_origin("http://localhost", "localhost:80"));
        assert!(same_origin("http://localhost:80", "localhost"));
    }

    #[test]
    fn bearer_token() {
        let token = AdminToken::new("s3cret-token");
        let get = |path: &str, auth: Option<&str>| {
            let mut headers = vec![("host", "127.0.0.1")];
            headers.extend(auth.map(|a| ("authorization", a)));
            check(&req("GET", path, &headers), Some(&token))
        };
        assert_eq!(get("/config", Some("Bearer s3cret-token")), Ok(()));
        assert_eq!(get("/config", Some("bearer  s3cret-token")), Ok(()));
        assert_eq!(get("/config", None), Err(Refusal::NoToken));
        assert_eq!(
            get("/config", Some("Basic czNjcmV0")),
            Err(Refusal::NoToken)
        );
        assert_eq!(get("/config", Some("Bearer")), Err(Refusal::NoToken));
        assert_eq!(
            get("/config", Some("Bearer s3cret-tokenX")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(get("/config", Some("Bearer ")), Err(Refusal::NoToken));
        assert_eq!(get("/healthz", None), Ok(()));
        assert_eq!(get("/ready", None), Ok(()));
        assert_eq!(get("/metrics", None), Err(Refusal::NoToken));
        assert_eq!(
            check(
                &req("POST", "/healthz", &[("host", "127.0.0.1")]),
                Some(&token)
            ),
            Err(Refusal::NoToken)
        );
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn log_limit_admits_one_line_a_second() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        assert_eq!(limit.admit(t0), Some(0));
        assert_eq!(limit.admit(t0), None);
        assert_eq!(limit.admit(t0 + std::time::Duration::from_millis(10)), None);
        let later = t0 + std::time::Duration::from_secs(2);
        assert_eq!(limit.admit(later), Some(2));
        assert_eq!(limit.admit(later), None);
    }
}
