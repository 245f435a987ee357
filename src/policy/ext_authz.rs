//! External authorization over HTTP: Istio's `envoyExtAuthzHttp` extension provider (Envoy's
//! ext_authz filter with an HTTP service; what NGINX users know as `auth_request`), asked
//! for the requests an AuthorizationPolicy of action CUSTOM matches.
//!
//! The check is a request to the provider's service with the client request's method,
//! its path after `pathPrefix`, its `Host`, `Authorization` and the configured fields,
//! `content-length: 0` and no body (Envoy's HTTP service). The provider's answer decides:
//! 200 allows (its `headersToUpstreamOnAllow` fields go upstream, its
//! `headersToDownstreamOnAllow` fields to the client), a 5xx, a timeout or a failed
//! connection is an error (`statusOnError`, default 403, or allowed with `failOpen`), any
//! other status denies with the provider's status, body and fields.
//!
//! Compiled once per Snapshot; at request time a check is one pooled keep-alive HTTP/1.1
//! exchange with an endpoint the compile step resolved (a ServiceEntry's or a DNS name's
//! addresses, never resolved here), bounded by `timeout`. Nothing is locked while it waits.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::authz::StrPat;
use crate::admin::LogLimit;
use crate::routing::RequestView;
use crate::upstream::Cluster;

/// Istio's default `timeout` of a check.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest answer body Portico reads from an authorizer (a larger one is an error).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// An idle connection to an authorizer is kept this long.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per authorizer endpoint and worker thread.
const POOL_MAX_IDLE: usize = 32;

/// Fields never copied from an authorizer's answer to the client or the upstream
/// request: those about one hop or the message's framing, and `Host`.
fn framing_or_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "host",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Envoy's header that names fields to remove from the upstream request on an allow.
const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// Header name patterns (Istio's exact, `prefix*` and `*suffix`, ignoring case).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NamePatterns(Vec<StrPat>);

impl NamePatterns {
    /// From Istio's list; a lone `*` is refused (Istio: use a prefix or a suffix).
    pub fn parse(list: &[String]) -> Result<NamePatterns, (usize, String)> {
        let mut out = Vec::with_capacity(list.len());
        for (i, p) in list.iter().enumerate() {
            if p == "*" {
                return Err((
                    i,
                    "a lone \"*\" is not supported (Istio): write a prefix (\"x-*\") or a suffix (\"*-id\")".into(),
                ));
            }
            if p.is_empty() {
                return Err((i, "empty header name".into()));
            }
            out.push(StrPat::parse(p).lowercase());
        }
        Ok(NamePatterns(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches_ignore_case(name))
    }
}

/// A compiled `envoyExtAuthzHttp` provider.
pub struct Provider {
    pub name: String,
    /// The authorizer's endpoints.
    pub cluster: Arc<Cluster>,
    pub timeout: Duration,
    pub path_prefix: String,
    pub fail_open: bool,
    pub status_on_error: u16,
    /// `includeRequestHeadersInCheck` (besides `Authorization`, always sent).
    pub include: NamePatterns,
    /// `includeAdditionalHeadersInCheck`: set on every check, over the client's.
    pub additional: Vec<(HeaderName, HeaderValue)>,
    pub to_upstream_on_allow: NamePatterns,
    pub to_downstream_on_deny: NamePatterns,
    pub to_downstream_on_allow: NamePatterns,
    log: LogLimit,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("cluster", &self.cluster.name)
            .field("timeout", &self.timeout)
            .field("fail_open", &self.fail_open)
            .finish()
    }
}

/// What a check decided.
#[derive(Debug)]
pub enum Outcome {
    /// 200: the request goes on, with these edits.
    Allowed(Allowed),
    /// Another status below 500: the provider's answer goes to the client.
    Denied(Denied),
    /// No answer in time, no connection, a 5xx, or an answer Portico cannot read.
    Failed(String),
}

/// An allow's edits.
#[derive(Debug, Default)]
pub struct Allowed {
    /// Set on the upstream request (replacing the client's of the same names).
    pub upstream: Vec<(HeaderName, HeaderValue)>,
    /// Removed from the upstream request (`x-envoy-auth-headers-to-remove`).
    pub remove: Vec<HeaderName>,
    /// Set on the response to the client.
    pub downstream: Vec<(HeaderName, HeaderValue)>,
}

/// A denial: what the client gets.
#[derive(Debug)]
pub struct Denied {
    pub status: u16,
    pub body: Bytes,
    pub fields: Vec<(HeaderName, HeaderValue)>,
}

/// A check request ready to send, to endpoint `endpoint` of the provider's cluster.
pub struct Prepared {
    endpoint: usize,
    req: http::Request<Empty<Bytes>>,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

thread_local! {
    /// Each worker thread's clients (by connect timeout): their keep-alive connections
    /// are driven by tasks of the thread's own runtime, as the upstream pool's are.
    static CLIENTS: RefCell<Vec<(Duration, HttpClient)>> = const { RefCell::new(Vec::new()) };
}

/// This thread's client for connect timeout `connect`. The URIs it is given name IP
/// addresses, so its connector never resolves a name.
fn client(connect: Duration) -> HttpClient {
    CLIENTS.with_borrow_mut(|all| {
        if let Some((_, c)) = all.iter().find(|(t, _)| *t == connect) {
            return c.clone();
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect));
        http.set_nodelay(true);
        let c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .pool_timer(TokioTimer::new())
            .set_host(false)
            .build(http);
        all.push((connect, c.clone()));
        c
    })
}

/// An error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl Provider {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        cluster: Arc<Cluster>,
        timeout: Duration,
        path_prefix: String,
        fail_open: bool,
        status_on_error: u16,
        include: NamePatterns,
        additional: Vec<(HeaderName, HeaderValue)>,
        to_upstream_on_allow: NamePatterns,
        to_downstream_on_deny: NamePatterns,
        to_downstream_on_allow: NamePatterns,
    ) -> Provider {
        Provider {
            name,
            cluster,
            timeout,
            path_prefix,
            fail_open,
            status_on_error,
            include,
            additional,
            to_upstream_on_allow,
            to_downstream_on_deny,
            to_downstream_on_allow,
            log: LogLimit::new(),
        }
    }

    /// Asks the provider about the request.
    pub async fn check(&self, view: &RequestView<'_>) -> Outcome {
        match self.prepare(view) {
            Ok(p) => self.send(p).await,
            Err(e) => Outcome::Failed(e),
        }
    }

    /// The check request for `view` (Envoy's HTTP service): the client's method, the path
    /// after `pathPrefix` (with the query), `Host` as the client sent it,
    /// `content-length: 0`, `Authorization` and the fields `includeRequestHeadersInCheck`
    /// names (each value the client sent; `x-forwarded-for` and `x-forwarded-proto` as
    /// the upstream gets them), then `includeAdditionalHeadersInCheck` over those.
    pub fn prepare(&self, view: &RequestView<'_>) -> Result<Prepared, String> {
        let endpoint = self
            .cluster
            .select(None, &[])
            .ok_or_else(|| format!("{} has no endpoint", self.cluster.name))?;
        let addr = self.cluster.endpoints[endpoint].addr;
        let mut uri = String::with_capacity(
            32 + self.path_prefix.len() + view.path.len() + view.query.map_or(0, str::len),
        );
        use std::fmt::Write as _;
        let _ = write!(uri, "http://{addr}{}{}", self.path_prefix, view.path);
        if let Some(q) = view.query {
            uri.push('?');
            uri.push_str(q);
        }
        let method = http::Method::from_bytes(view.method.as_bytes())
            .map_err(|_| format!("{:?} is not a method", view.method))?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("the check request: {e}"))?;
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(view.authority) {
            h.insert(http::header::HOST, v);
        }
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let mut xff: Option<Vec<u8>> = None;
        view.headers.each(|name, value| {
            if framing_or_hop(name) || name.eq_ignore_ascii_case("x-forwarded-proto") {
                return;
            }
            let wanted = name.eq_ignore_ascii_case("authorization") || self.include.matches(name);
            if !wanted {
                return;
            }
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                let x = xff.get_or_insert_with(Vec::new);
                if !x.is_empty() {
                    x.extend_from_slice(b", ");
                }
                x.extend_from_slice(value);
                return;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                h.append(n, v);
            }
        });
        if self.include.matches("x-forwarded-for") {
            if let Some(peer) = view.peer_ip {
                let x = xff.get_or_insert_with(Vec::new);
                if !x.is_empty() {
                    x.extend_from_slice(b", ");
                }
                x.extend_from_slice(peer.to_canonical().to_string().as_bytes());
            }
        }
        if let Some(v) = xff.and_then(|x| HeaderValue::from_bytes(&x).ok()) {
            h.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        if self.include.matches("x-forwarded-proto") {
            if let Ok(v) = HeaderValue::from_str(view.scheme) {
                h.insert(HeaderName::from_static("x-forwarded-proto"), v);
            }
        }
        for (n, v) in &self.additional {
            h.insert(n.clone(), v.clone());
        }
        Ok(Prepared { endpoint, req })
    }

    /// Sends a prepared check and reads the answer, within `timeout`.
    pub async fn send(&self, p: Prepared) -> Outcome {
        let started = Instant::now();
        let client = client(self.cluster.settings.connect_timeout);
        let exchange = async {
            let resp = client.request(p.req).await.map_err(|e| error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.cluster.record(p.endpoint, None, None);
                return Outcome::Failed(e);
            }
            Err(_) => {
                self.cluster.record(p.endpoint, None, None);
                return Outcome::Failed(format!("no answer within {:?}", self.timeout));
            }
        };
        let status = parts.status.as_u16();
        self.cluster
            .record(p.endpoint, Some(status), Some(started.elapsed()));
        self.decide(status, &parts.headers, body)
    }

    /// Envoy's reading of an answer.
    fn decide(&self, status: u16, headers: &http::HeaderMap, body: Bytes) -> Outcome {
        // A 1xx cannot be a final answer to the client: an error, as a 5xx is.
        if !(200..500).contains(&status) {
            return Outcome::Failed(format!("the authorizer answered {status}"));
        }
        let copy = |pats: &NamePatterns, always: &[&str]| -> Vec<(HeaderName, HeaderValue)> {
            headers
                .iter()
                .filter(|(n, _)| {
                    !framing_or_hop(n.as_str())
                        && (pats.matches(n.as_str()) || always.contains(&n.as_str()))
                })
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        if status == 200 {
            let mut remove = Vec::new();
            for v in headers.get_all(HEADERS_TO_REMOVE) {
                for name in v.to_str().unwrap_or("").split(',') {
                    let name = name.trim();
                    if name.is_empty() || framing_or_hop(name) {
                        continue;
                    }
                    if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                        remove.push(n);
                    }
                }
            }
            let upstream = copy(&self.to_upstream_on_allow, &[])
                .into_iter()
                .filter(|(n, _)| n != HEADERS_TO_REMOVE)
                .collect();
            return Outcome::Allowed(Allowed {
                upstream,
                remove,
                downstream: copy(&self.to_downstream_on_allow, &[]),
            });
        }
        // Envoy: without `headersToDownstreamOnDeny`, every field of the answer but Host;
        // with it, those it names and `WWW-Authenticate` and `Location`.
        let fields = if self.to_downstream_on_deny.is_empty() {
            headers
                .iter()
                .filter(|(n, _)| !framing_or_hop(n.as_str()))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        } else {
            copy(
                &self.to_downstream_on_deny,
                &["www-authenticate", "location"],
            )
        };
        Outcome::Denied(Denied {
            status,
            body,
            fields,
        })
    }

    /// Logs a failed check, at most once a second per provider.
    pub fn log_failure(&self, error: &str, path: &str) {
        if let Some(skipped) = self.log.admit(Instant::now()) {
            tracing::warn!(
                provider = %self.name,
                error,
                path,
                fail_open = self.fail_open,
                skipped,
                "external authorization failed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(deny: &[&str]) -> Provider {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Provider::new(
            "p".into(),
            Arc::new(Cluster::new(
                "authz.test",
                9000,
                None,
                vec!["127.0.0.1:9".parse().unwrap()],
                Default::default(),
            )),
            DEFAULT_TIMEOUT,
            "/check".into(),
            false,
            403,
            NamePatterns::parse(&s(&["x-user", "x-trace-*"])).unwrap(),
            vec![(
                HeaderName::from_static("x-gateway"),
                HeaderValue::from_static("portico"),
            )],
            NamePatterns::parse(&s(&["x-auth-*", "*-id"])).unwrap(),
            NamePatterns::parse(&s(deny)).unwrap(),
            NamePatterns::parse(&s(&["set-cookie"])).unwrap(),
        )
    }

    #[test]
    fn patterns_are_exact_prefix_or_suffix_and_ignore_case() {
        let p = NamePatterns::parse(&["X-Auth-*".into(), "*-ID".into(), "cookie".into()]).unwrap();
        assert!(p.matches("x-auth-user"));
        assert!(p.matches("x-request-id"));
        assert!(p.matches("Cookie"));
        assert!(!p.matches("cookies"));
        assert!(NamePatterns::parse(&["*".into()]).is_err());
    }

    #[test]
    fn the_check_carries_the_method_prefixed_path_and_chosen_fields() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer t".parse().unwrap());
        h.insert("x-user", "alice".parse().unwrap());
        h.insert("x-trace-id", "1".parse().unwrap());
        h.insert("x-gateway", "client".parse().unwrap());
        h.insert("cookie", "secret".parse().unwrap());
        h.insert("content-length", "5".parse().unwrap());
        let view = RequestView {
            method: "POST",
            path: "/admin/x",
            query: Some("a=1"),
            authority: "shop.test",
            scheme: "https",
            headers: crate::routing::Headers::Map(&h),
            port: 443,
            client_ip: None,
            peer: None,
            peer_ip: None,
            sni: None,
            peer_principal: None,
        };
        let p = provider(&[]).prepare(&view).unwrap();
        assert_eq!(p.req.method(), "POST");
        assert_eq!(
            p.req.uri().to_string(),
            "http://127.0.0.1:9/check/admin/x?a=1"
        );
        let got = p.req.headers();
        assert_eq!(got["host"], "shop.test");
        assert_eq!(got["content-length"], "0");
        assert_eq!(got["authorization"], "Bearer t");
        assert_eq!(got["x-user"], "alice");
        assert_eq!(got["x-trace-id"], "1");
        assert_eq!(got["x-gateway"], "portico", "additional fields win");
        assert!(got.get("cookie").is_none());
    }

    #[test]
    fn answers_allow_deny_or_fail_as_envoy_reads_them() {
        let p = provider(&[]);
        let mut h = http::HeaderMap::new();
        h.insert("x-auth-user", "alice".parse().unwrap());
        h.insert("x-request-id", "r".parse().unwrap());
        h.insert("set-cookie", "s=1".parse().unwrap());
        h.insert("content-length", "0".parse().unwrap());
        h.insert(HEADERS_TO_REMOVE, "cookie, host".parse().unwrap());
        match p.decide(200, &h, Bytes::new()) {
            Outcome::Allowed(a) => {
                let names: Vec<&str> = a.upstream.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, ["x-auth-user", "x-request-id"]);
                assert_eq!(a.remove, [HeaderName::from_static("cookie")]);
                assert_eq!(a.downstream.len(), 1);
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            p.decide(204, &h, Bytes::new()),
            Outcome::Denied(_)
        ));
        assert!(matches!(
            p.decide(503, &h, Bytes::new()),
            Outcome::Failed(_)
        ));
        let mut h = http::HeaderMap::new();
        h.insert("location", "/login".parse().unwrap());
        h.insert("x-reason", "no".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        match p.decide(302, &h, Bytes::from_static(b"go")) {
            Outcome::Denied(d) => {
                assert_eq!((d.status, &d.body[..]), (302, &b"go"[..]));
                assert_eq!(d.fields.len(), 2, "all but framing: {:?}", d.fields);
            }
            o => panic!("{o:?}"),
        }
        match provider(&["x-other"]).decide(302, &h, Bytes::new()) {
            Outcome::Denied(d) => {
                let names: Vec<&str> = d.fields.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, ["location"], "named ones, Location always");
            }
            o => panic!("{o:?}"),
        }
    }
}
