//! The request's phases: the request core (`request`: what a request gets, decided once
//! for every codec), request hygiene (`check`), mirroring, and the pingora `ProxyHttp`
//! implementation that runs them on pingora's request cycle (`RequestCycle`). Portico's own
//! codecs, which call the same core, are in `protocol::fast`. None holds policy of its own:
//! routing decides the route, the route's compiled policy says what to retry, upstream
//! picks endpoints and keeps their health.

pub mod check;
pub mod mirror;
pub mod request;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue};
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::egress::{self, forward as egress_forward};
use crate::protocol::h1;
use crate::routing::{normalize_host, Action, Forward, HeaderOps, RequestView, Route};
use crate::snapshot::Snapshot;
use crate::telemetry::outcome::{Details, Flag};
use crate::telemetry::record::{Codec, Outcome};
use crate::telemetry::{access_log, trace, Metrics};
use crate::upstream::retry::{self, Again, TryFailure};
use crate::upstream::{Admission, InFlight, RetryPermit};
use mirror::{MirrorClient, MAX_MIRROR_BODY};

/// Pingora's request cycle (`ProxyHttp`) for one listener: the codec for what the fast
/// codecs lend it (streamed bodies, upgrades, TLS and h2c upstreams, HTTP/1.0) and, with
/// `--no-fast-path`, for everything. Like the fast codecs it asks the request core
/// (`request::plan`) and only carries the decision.
pub struct RequestCycle {
    pub listener: usize,
    pub tls: bool,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub mirror: Arc<MirrorClient>,
    /// An egress listener: absolute-form requests are decided by the egress registry.
    pub forward_proxy: bool,
}

impl RequestCycle {
    pub fn new(listener: usize, tls: bool, snapshots: Arc<ArcSwap<Snapshot>>) -> Self {
        RequestCycle {
            listener,
            tls,
            snapshots,
            mirror: MirrorClient::global().clone(),
            forward_proxy: false,
        }
    }
}

/// Per-request state. The Snapshot is loaded once, in the first phase, and kept to the end.
pub struct RequestCtx {
    /// Why the last try's TLS handshake with the upstream failed, for the log.
    transport_failure: Option<Box<str>>,
    started: Instant,
    /// Envoy's RESPONSE_CODE_DETAILS for the log.
    details: Details,
    upstream_time: Option<Duration>,
    upstream_host: Option<std::net::SocketAddr>,
    snapshot: Option<Arc<Snapshot>>,
    route: Option<Arc<Route>>,
    match_index: usize,
    destination: usize,
    /// Retries made so far (tries = retries + 1).
    retries: u32,
    /// Endpoints tried, so a retry goes elsewhere where it can.
    tried: Vec<usize>,
    in_flight: Option<InFlight>,
    admission: Option<Admission>,
    retry_permit: Option<RetryPermit>,
    deadline: Option<Instant>,
    /// The request core's consistent-hash key (`request::Forwarded::hash`).
    hash: Option<u64>,
    /// CORS and policy fields for the response (`request::Forwarded::response_additions`).
    response_additions: Option<request::ResponseAdditions>,
    /// Request authentication's edits of the upstream request (`request::Forwarding::auth`).
    auth: Option<Box<crate::policy::jwt::UpstreamEdits>>,
    /// The verified JWT's principal, for the log.
    principal: Option<Box<str>>,
    /// The request's place under the listener's request caps (`request::Forwarded::slot`),
    /// freed when the request's context is dropped, whichever way it ended.
    request_slot: Option<crate::listener::RequestSlot>,
    /// The response was refused for a retry by `upstream_response_filter`.
    retry_on_status: bool,
    /// An upstream response head was taken (and is being passed on): from here on no
    /// failure is tried again.
    upstream_responded: bool,
    /// A request that went out on a pooled connection the upstream had closed was sent
    /// again (at most once).
    resent: bool,
    /// The next `upstream_peer` resends to the endpoint just tried, on a new connection.
    resend: bool,
    /// This request is the last its upstream connection serves (maxRequestsPerConnection).
    close_upstream: bool,
    span: Option<trace::SpanContext>,
    mirror_pending: Option<(Vec<Arc<crate::upstream::Cluster>>, RequestHeader, BytesMut)>,
    /// Where a forward-proxied (absolute-form) request goes; no route is used then.
    egress: Option<egress::Target>,
    /// Envoy-style response flag for logs: NR, UH, UF, UO, UT, URX, DI, FI, DC, UC.
    pub flag: Flag,
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx {
            transport_failure: None,
            started: Instant::now(),
            details: Details::None,
            upstream_time: None,
            upstream_host: None,
            snapshot: None,
            route: None,
            match_index: 0,
            destination: 0,
            retries: 0,
            tried: Vec::new(),
            in_flight: None,
            admission: None,
            retry_permit: None,
            deadline: None,
            hash: None,
            response_additions: None,
            auth: None,
            principal: None,
            request_slot: None,
            retry_on_status: false,
            upstream_responded: false,
            resent: false,
            resend: false,
            close_upstream: false,
            span: None,
            mirror_pending: None,
            egress: None,
            flag: Flag::None,
        }
    }
}

impl RequestCtx {
    fn forward(&self) -> Option<&Forward> {
        self.route.as_deref().and_then(forward_of)
    }

    fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// The verified client certificate of the session's connection (mutual TLS).
fn peer_cert(session: &Session) -> Option<&crate::tls::client_auth::PeerCert> {
    let ssl = session.digest()?.ssl_digest.as_deref();
    crate::tls::client_auth::TlsConn::of(ssl)?.peer.as_deref()
}

/// The downstream connection's client and local address (after a listener's PROXY
/// header), for a PROXY header to the upstream.
fn conn_addrs(session: &Session) -> Option<crate::upstream::proxy_protocol::ConnAddrs> {
    let digest = session.digest().and_then(|d| d.socket_digest.as_deref());
    crate::upstream::proxy_protocol::ConnAddrs::of(digest)
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

impl RequestCycle {
    /// The peer for endpoint `i` of `cluster`, with the time this try may take: the
    /// per-try timeout, what is left of the route's, else the stream idle timeout (no wait
    /// on an upstream is unbounded).
    fn peer_for(
        &self,
        ctx: &mut RequestCtx,
        cluster: &Arc<crate::upstream::Cluster>,
        forward: &Forward,
        i: usize,
        proxy: Option<crate::upstream::proxy_protocol::Header>,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream_host = Some(cluster.endpoints[i].addr);
        ctx.in_flight = Some(InFlight::new(cluster.clone(), i));
        let idle = ctx.snapshot.as_ref().map_or(Duration::from_secs(300), |s| {
            s.settings.downstream.stream_idle_timeout
        });
        // Checked before the endpoint was chosen; a deadline passed since gets the least.
        let wait = retry::try_wait(forward.retries.per_try_timeout, ctx.deadline, idle)
            .unwrap_or(Duration::from_millis(1));
        Ok(Box::new(cluster.peer(i, Some(wait), proxy)))
    }

    /// The checks every request passes before routing (`proxy::check`; an HTTP/1.1 head
    /// passed them in Portico's front already, h2 streams and absolute-form targets get
    /// them here), and the path normalized as routing and the upstream will see it.
    fn check(&self, snapshot: &Snapshot, session: &mut Session) -> Result<(), check::Refusal> {
        let req = session.req_header();
        let host = authority(req);
        // HTTP/1.0 may omit a Host; an absolute-form target names its own authority.
        let optional = req.version == http::Version::HTTP_10 || req.uri.authority().is_some();
        let allowed = check::valid_authority(host) || (host.is_empty() && optional);
        if !allowed {
            return Err(if host.is_empty() {
                check::NO_HOST
            } else {
                check::BAD_HOST
            });
        }
        let normalized = match snapshot.settings.path_normalization.apply(req.uri.path()) {
            Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
            Ok(std::borrow::Cow::Owned(p)) => p,
            // `*` (OPTIONS) and absolute-form targets route by their path as it is.
            Err(crate::routing::path::PathError::NotAbsolute) => return Ok(()),
            Err(e) => {
                return Err(check::Refusal::new(
                    400,
                    Details::Path(e),
                    "bad request path",
                ))
            }
        };
        let target = match req.uri.query() {
            Some(q) => format!("{normalized}?{q}"),
            None => normalized,
        };
        // The scheme and authority an h2 request's URI carries stay.
        let mut parts = req.uri.clone().into_parts();
        let uri = target.parse().ok().and_then(|pq| {
            parts.path_and_query = Some(pq);
            http::Uri::from_parts(parts).ok()
        });
        match uri {
            Some(uri) => {
                session.req_header_mut().set_uri(uri);
                Ok(())
            }
            None => Err(check::Refusal::new(
                400,
                Details::Path(crate::routing::path::PathError::BadEscape),
                "bad request path",
            )),
        }
    }

    /// A retry may start: attempts left, time left, and the cluster's retry budget.
    fn may_retry(&self, ctx: &mut RequestCtx) -> bool {
        let Some(f) = ctx.forward() else { return false };
        if ctx.retries >= f.retries.attempts || ctx.remaining().is_some_and(|r| r.is_zero()) {
            return false;
        }
        let cluster = f.destinations[ctx.destination].cluster.clone();
        match cluster.start_retry() {
            Some(p) => {
                ctx.retry_permit = Some(p);
                ctx.retries += 1;
                true
            }
            None => false,
        }
    }

    /// After a failed try: records it against the endpoint when it counts, and says
    /// whether pingora is to try again (the shared rule, `upstream::retry`). A request
    /// body larger than pingora's retry buffer cannot be sent again.
    fn after_failure(
        &self,
        ctx: &mut RequestCtx,
        fail: TryFailure,
        method: &http::Method,
        truncated: bool,
    ) -> bool {
        if fail.counts_against_endpoint() {
            self.record(ctx, None);
        }
        let Some(on) = ctx.forward().map(|f| f.retries.on.clone()) else {
            return false;
        };
        if truncated {
            return false;
        }
        match fail.again(&on, retry::idempotent(method.as_str()), ctx.resent) {
            Again::Resend => {
                ctx.resent = true;
                ctx.resend = true;
                true
            }
            Again::Retry => self.may_retry(ctx),
            Again::No => false,
        }
    }

    /// Records the outcome of the current try with the endpoint's outlier detection.
    fn record(&self, ctx: &RequestCtx, status: Option<u16>) {
        if let (Some(f), Some(inf)) = (ctx.forward(), ctx.in_flight.as_ref()) {
            f.destinations[ctx.destination].cluster.record(
                inf.index(),
                status,
                status.map(|_| inf.started.elapsed()),
            );
        }
    }
}

/// The Host header, or the `:authority` of an HTTP/2 request; empty when neither is sent.
pub(crate) fn authority(req: &RequestHeader) -> &str {
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

fn forward_of(route: &Route) -> Option<&Forward> {
    match &route.action {
        Action::Forward(f) => Some(f),
        _ => None,
    }
}

async fn respond(
    session: &mut Session,
    status: u16,
    body: Bytes,
    location: Option<String>,
    ops: Option<&HeaderOps>,
    extra: &[(header::HeaderName, HeaderValue)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    if !body.is_empty() {
        resp.insert_header(header::CONTENT_TYPE, "text/plain")?;
    }
    if let Some(l) = location {
        resp.insert_header(header::LOCATION, l)?;
    }
    for (k, v) in extra {
        resp.insert_header(k.clone(), v.clone())?;
    }
    if let Some(ops) = ops {
        ops.apply_response(&mut resp);
    }
    let head_only = body.is_empty() || session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A response head being built field by field from the request core's.
pub(crate) struct ResponseFields(pub ResponseHeader);

impl request::HeaderSink for ResponseFields {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            let _ = self.0.append_header(Bytes::copy_from_slice(name), v);
        }
    }
    fn forwarded_for(&mut self, _: &mut dyn Iterator<Item = &[u8]>, _: IpAddr) {}
}

/// A response head whose fields the request core's replace (`insert`, not `append`); an
/// `appended` one is added after the upstream's of its name.
pub(crate) struct ReplaceFields<'a>(pub &'a mut ResponseHeader);

impl request::HeaderSink for ReplaceFields<'_> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            let _ = self.0.insert_header(Bytes::copy_from_slice(name), v);
        }
    }
    fn appended(&mut self, name: &[u8], value: &[u8]) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            let _ = self.0.append_header(Bytes::copy_from_slice(name), v);
        }
    }
    fn forwarded_for(&mut self, _: &mut dyn Iterator<Item = &[u8]>, _: IpAddr) {}
}

/// Writes answer `a` (the request core's, `request::answer_fields`).
async fn answer(session: &mut Session, a: &request::Answer) -> Result<()> {
    let mut head = ResponseFields(ResponseHeader::build(a.status, Some(6))?);
    request::answer_fields(a, &mut head);
    let head_only = a.body.is_empty() || session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(head.0), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(a.body.clone()), true)
            .await?;
    }
    Ok(())
}

fn request_has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::TRANSFER_ENCODING)
        || req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

#[async_trait]
impl ProxyHttp for RequestCycle {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::default()
    }

    /// None. pingora's default adds a response-compression module at level 0 (disabled);
    /// Portico does not compress, and the module still cost every request its context and
    /// two boxed filter calls.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// A request the front lent past the connection's maximum age closes it (pingora
    /// reads the client's keep-alive wish with the head, after the front's setting).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        let close = session
            .as_downstream()
            .stream()
            .and_then(crate::protocol::lend::Lent::of)
            .is_some_and(|l| l.close_after);
        if close {
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // A request a fast codec planned comes with its plan: carried out as decided
        // there, under that snapshot, with the id and span made there.
        let handover = crate::protocol::lend::take_handover().map(|h| *h);
        let (snapshot, carried) = match handover {
            Some(h) => {
                if let Some(id) = h.request_id {
                    session
                        .req_header_mut()
                        .insert_header("x-request-id", &id[..])?;
                }
                ctx.started = h.started;
                ctx.span = h.span;
                (h.snapshot, Some(h.plan))
            }
            None => {
                if !session.req_header().headers.contains_key(&X_REQUEST_ID) {
                    let id = request_id();
                    session
                        .req_header_mut()
                        .insert_header("x-request-id", &id[..])?;
                }
                let snapshot = self.snapshots.load_full();
                if let Some(t) = &snapshot.settings.tracing {
                    ctx.span = Some(trace::start(&session.req_header().headers, t.sampling));
                }
                (snapshot, None)
            }
        };
        // Every wait to write to the client has a limit, on each codec: a client that
        // stops reading (an h2 stream's window never given back) holds the stream no
        // longer than streamIdleTimeout. pingora's own sessions wait without one.
        session
            .as_downstream_mut()
            .set_write_timeout(Some(snapshot.settings.downstream.stream_idle_timeout));
        if self.forward_proxy
            && carried.is_none()
            && !session.is_http2()
            && egress_forward::is_absolute_form(session.req_header())
        {
            ctx.snapshot = Some(snapshot);
            return self.egress_request(session, ctx).await;
        }
        // Run for a carried plan too: the path pingora parsed is normalized here, as the
        // front normalized it to plan.
        if let Err(r) = self.check(&snapshot, session) {
            ctx.snapshot = Some(snapshot);
            ctx.flag = Flag::DownstreamProtocolError;
            ctx.details = r.details;
            tracing::debug!(
                status = r.status,
                details = r.details.as_str(),
                "request refused: {}",
                r.what
            );
            let body = Bytes::from(format!("{}\n", r.what));
            respond(session, r.status, body, None, None, &[]).await?;
            return Ok(true);
        }
        let plan = match carried {
            Some(plan) => plan,
            None => match snapshot.listeners.get(self.listener) {
                Some(listener) => {
                    let req = session.req_header();
                    let authority = authority(req);
                    let host = normalize_host(authority);
                    let headers = crate::routing::Headers::Map(&req.headers);
                    let peer = client_ip(session);
                    let view = RequestView {
                        method: req.method.as_str(),
                        path: req.uri.path(),
                        query: req.uri.query(),
                        authority,
                        scheme: if self.tls { "https" } else { "http" },
                        headers,
                        port: listener.addr.port(),
                        client_ip: request::remote_address(
                            snapshot.settings.num_trusted_proxies,
                            peer,
                            headers,
                        ),
                        peer_ip: peer,
                        sni: crate::tls::client_auth::TlsConn::of(
                            session.digest().and_then(|d| d.ssl_digest.as_deref()),
                        )
                        .and_then(|t| t.sni.as_deref()),
                        peer_principal: peer_cert(session).and_then(|p| p.principal()),
                        peer: peer_cert(session),
                    };
                    request::plan(listener, &host, &view)
                        .police(&view)
                        .await
                        .into()
                }
                None => request::OwnedPlan::Answer(Box::new(request::not_found())),
            },
        };
        let f = match plan {
            request::OwnedPlan::Answer(mut a) => {
                if let Some(d) = a.delay {
                    tokio::time::sleep(d).await;
                }
                ctx.flag = a.flag;
                ctx.details = a.details;
                ctx.route = a.route.clone();
                ctx.principal = a.principal.clone();
                ctx.request_slot = a.slot.take();
                answer(session, &a).await?;
                ctx.snapshot = Some(snapshot);
                return Ok(true);
            }
            request::OwnedPlan::Forward(f) => *f,
        };
        if let Some(d) = f.delay {
            ctx.flag = Flag::DelayInjected;
            tokio::time::sleep(d).await;
        }
        let added = f.additions;
        ctx.response_additions = (!added.is_empty()).then_some(added);
        ctx.hash = f.hash;
        ctx.auth = f.auth;
        ctx.principal = f.principal;
        ctx.request_slot = f.slot;
        ctx.snapshot = Some(snapshot);
        let (route, destination, match_index, mirrors) =
            (f.route, f.destination, f.match_index, f.mirrors);
        let forward = forward_of(&route).expect("a forwarded plan's route forwards");
        if !mirrors.is_empty() {
            let req = session.req_header().clone();
            if request_has_body(&req) {
                ctx.mirror_pending = Some((mirrors, req, BytesMut::new()));
            } else {
                for cluster in mirrors {
                    let proxy = cluster.proxy_header(|| conn_addrs(session));
                    self.mirror.send(cluster, req.clone(), None, proxy);
                }
            }
        }
        if forward.retries.attempts > 0 {
            // Bodies up to pingora's retry buffer are replayed on a retry; a larger body
            // makes the request not retryable.
            session.enable_retry_buffering();
        }
        ctx.deadline = forward.timeout.map(|t| Instant::now() + t);
        ctx.match_index = match_index;
        ctx.destination = destination;
        ctx.route = Some(route);
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some((_, _, buf)) = ctx.mirror_pending.as_mut() {
            if let Some(chunk) = body.as_ref() {
                if buf.len() + chunk.len() > MAX_MIRROR_BODY {
                    ctx.mirror_pending = None;
                    return Ok(());
                }
                buf.extend_from_slice(chunk);
            }
            if end_of_stream {
                if let Some((clusters, req, buf)) = ctx.mirror_pending.take() {
                    let body = buf.freeze();
                    for cluster in clusters {
                        let proxy = cluster.proxy_header(|| conn_addrs(session));
                        self.mirror
                            .send(cluster, req.clone(), Some(body.clone()), proxy);
                    }
                }
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        if ctx.egress.is_some() {
            return self.egress_peer(ctx).await;
        }
        let route = ctx
            .route
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route chosen"))?;
        let forward = forward_of(&route)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route does not forward"))?;
        let cluster = forward.destinations[ctx.destination].cluster.clone();
        if ctx.admission.is_none() {
            let wait = ctx.remaining().unwrap_or(cluster.settings.connect_timeout);
            match cluster.admit(wait).await {
                Some(a) => ctx.admission = Some(a),
                None => {
                    ctx.flag = Flag::UpstreamOverflow;
                    Metrics::global()
                        .upstream_overflow
                        .with_label_values(&[cluster.name.as_str()])
                        .inc();
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(503),
                        format!(
                            "upstream overflow: {} is at its connection pool limit",
                            cluster.name
                        ),
                    ));
                }
            }
        } else if std::mem::take(&mut ctx.resend) {
            // The same endpoint again, at once, on a new connection (pingora discarded the
            // one that had been closed).
            if let Some(&i) = ctx.tried.last() {
                let proxy = cluster.proxy_header(|| conn_addrs(session));
                return self.peer_for(ctx, &cluster, forward, i, proxy);
            }
        } else if ctx.retries > 0 {
            let pause = forward.retries.backoff_for(ctx.retries);
            tokio::time::sleep(ctx.remaining().map_or(pause, |r| r.min(pause))).await;
        }
        if ctx.remaining().is_some_and(|r| r.is_zero()) {
            ctx.flag = Flag::UpstreamRequestTimeout;
            return Err(Error::explain(
                ErrorType::HTTPStatus(504),
                "upstream request timeout",
            ));
        }
        let Some(i) = cluster.select(ctx.hash, &ctx.tried) else {
            ctx.flag = Flag::NoHealthyUpstream;
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                format!("no healthy upstream for {}", cluster.name),
            ));
        };
        ctx.tried.push(i);
        let proxy = cluster.proxy_header(|| conn_addrs(session));
        self.peer_for(ctx, &cluster, forward, i, proxy)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.egress.is_some() {
            return egress_forward::to_origin_form(upstream);
        }
        let Some(route) = ctx.route.as_ref() else {
            return Ok(());
        };
        if upstream.headers.get(header::HOST).is_none() {
            // HTTP/2 clients send :authority only; an HTTP/1.1 upstream needs Host.
            if let Some(a) = upstream.uri.authority().map(|a| a.as_str().to_string()) {
                upstream.insert_header(header::HOST, a)?;
            }
        }
        if session.is_http2()
            && upstream
                .headers
                .get_all(header::COOKIE)
                .iter()
                .nth(1)
                .is_some()
        {
            // An h2 client may split cookies over several fields; an HTTP/1.1 upstream
            // gets them on one line, joined with "; " (RFC 9113 8.2.3).
            let joined = upstream
                .headers
                .get_all(header::COOKIE)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect::<Vec<_>>()
                .join(&b"; "[..]);
            upstream.insert_header(header::COOKIE, joined)?;
        }
        if let Some(forward) = forward_of(route) {
            let (path, query) = (upstream.uri.path(), upstream.uri.query());
            if let Some(target) =
                request::rewritten_target(route, forward, ctx.match_index, path, query)
            {
                let uri = target.parse().map_err(|_| {
                    Error::explain(ErrorType::InternalError, "rewritten URI is invalid")
                })?;
                upstream.set_uri(uri);
            }
            let dest = &forward.destinations[ctx.destination];
            let forwarding = request::Forwarding {
                scheme: if self.tls { b"https" } else { b"http" },
                client_ip: client_ip(session),
                // Made before routing, among the fields already.
                request_id: None,
                host: request::rewritten_authority(forward).map(HeaderValue::as_bytes),
                ops: [&route.headers.request, &dest.headers.request],
                upgrade: session.is_upgrade_req(),
                span: ctx.span.as_ref(),
                client_cert: request::ClientCert {
                    mode: ctx
                        .snapshot
                        .as_ref()
                        .map(|s| s.settings.forward_client_cert)
                        .unwrap_or_default(),
                    peer: peer_cert(session),
                },
                auth: ctx.auth.as_deref(),
            };
            rebuild_upstream_headers(upstream, &forwarding)?;
            if ctx.close_upstream {
                upstream.insert_header(header::CONNECTION, "close")?;
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // This try connected: an earlier try's handshake failure is not the request's.
        ctx.transport_failure = None;
        if let Some(f) = ctx.forward() {
            ctx.close_upstream = f.destinations[ctx.destination]
                .cluster
                .last_on_connection(fd, reused);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        // The same limits as Portico's codecs put on a response head (pingora's own are
        // 1 MiB and 256 fields): a larger one is an invalid response.
        let fields = upstream_response.headers.len();
        let size: usize = upstream_response
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        if fields > h1::MAX_HEADERS || size > h1::MAX_RESPONSE_HEAD {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                format!("response head of {fields} fields, {size} bytes: over the limit"),
            )
            .into_up());
        }

        self.record(ctx, Some(status));
        ctx.upstream_time = ctx.in_flight.as_ref().map(|i| i.started.elapsed());
        ctx.details = Details::ViaUpstream;
        let retry_status = ctx.forward().is_some_and(|f| f.retries.on.status(status));
        if retry_status && !session.as_ref().retry_buffer_truncated() && self.may_retry(ctx) {
            ctx.retry_on_status = true;
            let mut e = Error::new_up(ErrorType::HTTPStatus(status));
            e.set_retry(true);
            return Err(e);
        }
        // As the core's `Forwarded::upstream_flag`: an injected delay's `DI` stays.
        if ctx.flag == Flag::None
            && ctx
                .forward()
                .is_some_and(|f| f.retries.exhausted_on(status, ctx.retries))
        {
            ctx.flag = Flag::UpstreamRetryLimitExceeded;
        }
        ctx.upstream_responded = true;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(route) = ctx.route.as_ref() {
            route.headers.response.apply_response(upstream_response);
            if let Some(f) = forward_of(route) {
                f.destinations[ctx.destination]
                    .headers
                    .response
                    .apply_response(upstream_response);
            }
        }
        if let Some(added) = ctx.response_additions.take() {
            // Over the upstream's fields of the same names, as every codec writes them (a
            // consistent-hash cookie after the upstream's own).
            added.write(&mut ReplaceFields(upstream_response));
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.transport_failure = (e.etype() == &ErrorType::TLSHandshakeFailure)
            .then(|| transport_failure_reason(&e).into());
        let truncated = session.as_ref().retry_buffer_truncated();
        let method = session.req_header().method.clone();
        if self.after_failure(ctx, TryFailure::Connect, &method, truncated) {
            e.set_retry(true);
        } else {
            e.set_retry(false);
            ctx.flag = if ctx.retries > 0 {
                Flag::UpstreamRetryLimitExceeded
            } else {
                Flag::UpstreamConnectFailure
            };
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let truncated = session.as_ref().retry_buffer_truncated();
        if std::mem::take(&mut ctx.retry_on_status) {
            e.set_retry(!truncated);
            return e;
        }
        if *e.esource() == ErrorSource::Downstream {
            // The client's error (a bad body, a close): never tried again, and never held
            // against the endpoint.
            e.set_retry(false);
            return e;
        }
        let fail = if ctx.upstream_responded || session.response_written().is_some() {
            TryFailure::AfterResponse
        } else if matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        ) {
            TryFailure::Timeout
        } else if matches!(e.retry, pingora_error::RetryType::Decided(true)) {
            // pingora marks what an h2 upstream refused unprocessed (REFUSED_STREAM,
            // GOAWAY, a downgrade) as safe to send again.
            TryFailure::Refused
        } else if matches!(e.etype(), ErrorType::InvalidHTTPHeader | ErrorType::H1Error) {
            TryFailure::BadResponse
        } else if client_reused {
            TryFailure::StaleConnection
        } else {
            TryFailure::Reset
        };
        let method = session.req_header().method.clone();
        let again = self.after_failure(ctx, fail, &method, truncated);
        e.set_retry(again);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        use ErrorType::*;
        let retried = ctx.retries > 0;
        // Upstream failures read as the try failure the fast codecs see, so both answer
        // from one table (`TryFailure::answer`).
        let failure = match (e.etype(), e.esource()) {
            (HTTPStatus(_), _) => None,
            (
                ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError
                | TLSHandshakeFailure | SocketError | BindError,
                _,
            ) => Some(TryFailure::Connect),
            (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => Some(TryFailure::Timeout),
            (_, ErrorSource::Upstream) if ctx.upstream_responded => Some(TryFailure::AfterResponse),
            (InvalidHTTPHeader | H1Error, ErrorSource::Upstream) => Some(TryFailure::BadResponse),
            (_, ErrorSource::Upstream) => Some(TryFailure::Reset),
            _ => None,
        };
        let (code, flag, what) = match (failure, e.etype(), e.esource()) {
            (Some(f), _, _) => f.answer(retried),
            (None, HTTPStatus(code), _) => (*code, ctx.flag, ctx.flag.reply_text()),
            (None, ReadTimedout, ErrorSource::Downstream) => {
                (408, Flag::None, check::BODY_TIMEOUT.what)
            }
            (
                None,
                ReadError | WriteError | WriteTimedout | ConnectionClosed,
                ErrorSource::Downstream,
            ) => (
                0,
                Flag::DownstreamConnectionTermination,
                "downstream closed",
            ),
            (None, _, ErrorSource::Downstream) => {
                (400, Flag::DownstreamProtocolError, "bad request")
            }
            _ => (500, Flag::None, "internal error"),
        };
        ctx.flag = flag;
        if code > 0 {
            let req = session.req_header();
            tracing::warn!(
                status = code,
                flag = %ctx.flag,
                method = %req.method,
                path = req.uri.path(),
                route = ctx.route.as_ref().map(|r| r.origin.to_string()).unwrap_or_default(),
                tries = ctx.retries + 1,
                error = %e,
                "{what}"
            );
            // The same reply as the fast codecs make; nothing once a response started.
            session.set_keepalive(None);
            if session.response_written().is_none() {
                let body = Bytes::from(format!("{what}\n"));
                let _ = respond(session, code, body, None, None, &[]).await;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        let response = session.response_written();
        let req = session.req_header();
        let digest = session.digest();
        let span = ctx.span.take();
        Outcome {
            codec: Codec::Cycle,
            protocol: if session.is_http2() {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            tls: self.tls,
            method: req.method.as_str(),
            path: req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            query: None,
            authority: authority(req),
            request_headers: access_log::Headers::Map(&req.headers),
            response_headers: response.map(|r| access_log::Headers::Map(&r.headers)),
            // The request core put a made id into the request's headers.
            request_id: None,
            started: ctx.started,
            status: response.map(|r| r.status.as_u16()).unwrap_or(0),
            flag: ctx.flag,
            details: ctx.details,
            request_bytes: session.body_bytes_read(),
            response_bytes: session.body_bytes_sent(),
            upstream_time: ctx.upstream_time,
            upstream_host: ctx.upstream_host,
            attempts: if ctx.upstream_host.is_some() {
                ctx.retries + 1
            } else {
                0
            },
            route: ctx.route.as_deref(),
            cluster: ctx
                .forward()
                .map(|f| &*f.destinations[ctx.destination].cluster),
            other_cluster: ctx.egress.as_ref().map(|t| t.cluster()),
            socket: digest.and_then(|d| d.socket_digest.as_deref()),
            ssl: digest.and_then(|d| d.ssl_digest.as_deref()),
            client_ip: client_ip(session),
            principal: ctx.principal.as_deref(),
            transport_failure: ctx.transport_failure.as_deref(),
            span: span.as_ref(),
        }
        .finish(ctx.snapshot.as_deref());
    }
}

/// Envoy's UPSTREAM_TRANSPORT_FAILURE_REASON for a failed TLS handshake: rustls's reason,
/// from the innermost cause in pingora's error (`invalid peer certificate: Revoked`).
fn transport_failure_reason(e: &Error) -> String {
    let text = match &e.context {
        Some(c) => c.to_string(),
        None => e.to_string(),
    };
    let text = text.split(", SNI: ").next().unwrap_or(&text);
    let why = text.rsplit("cause: ").next().unwrap_or(text).trim();
    format!("TLS_error: {why}")
}

impl RequestCycle {
    /// An absolute-form request on a forward-proxy listener: allowed by the egress registry
    /// (then forwarded by `egress_peer`), or refused with 502, a body and a log line.
    async fn egress_request(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(snapshot) = ctx.snapshot.clone() else {
            return Err(Error::explain(ErrorType::InternalError, "no snapshot"));
        };
        let client = session.client_addr().and_then(|a| a.as_inet()).copied();
        let verdict = match egress_forward::http_target(session.req_header()) {
            None => Err((400, Bytes::from_static(b"not an absolute-form request\n"))),
            Some(Err(e)) => Err((400, Bytes::from(format!("{e}\n")))),
            Some(Ok((host, port))) => {
                match snapshot.egress.decide(&host, port, egress::Kind::Http) {
                    Ok(t) => Ok(t),
                    Err(d) => {
                        egress_forward::log_denied(
                            &host,
                            port,
                            egress::Kind::Http,
                            &d.rule,
                            client,
                        );
                        Err((
                            502,
                            Bytes::from(egress_forward::denied_body(&host, port, &d.rule)),
                        ))
                    }
                }
            }
        };
        match verdict {
            Ok(target) => {
                ctx.egress = Some(target);
                Ok(false)
            }
            Err((status, body)) => {
                ctx.details = if status == 502 {
                    Details::EgressDenied
                } else {
                    Details::BadRequest
                };
                respond(session, status, body, None, None, &[]).await?;
                Ok(true)
            }
        }
    }

    /// The peer of a forward-proxied request: a registered endpoint or the requested name.
    async fn egress_peer(&self, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let Some(snapshot) = ctx.snapshot.clone() else {
            return Err(Error::explain(ErrorType::InternalError, "no snapshot"));
        };
        let addr = match ctx.egress.as_ref() {
            Some(t) => t.address(&snapshot.egress).await,
            None => Err("no egress target".to_string()),
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                ctx.flag = Flag::NoHealthyUpstream;
                return Err(Error::explain(ErrorType::HTTPStatus(503), e));
            }
        };
        ctx.upstream_host = Some(addr);
        // The host's DestinationRule: connect timeout and TCP keep-alive (by the connect
        // step below), and how long a pooled connection may idle (60 s when it sets
        // none). Its `tls` is not applied to forward-proxied requests (README, "Egress").
        let settings = match ctx.egress.as_ref() {
            Some(t) => t.settings(snapshot.settings.connect_timeout),
            None => Default::default(),
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(settings.connect_timeout);
        o.total_connection_timeout = Some(settings.connect_timeout);
        o.idle_timeout = Some(settings.idle_timeout.unwrap_or(Duration::from_secs(60)));
        // Connected as every upstream connection is (`upstream::connect`).
        o.custom_l4 = Some(Arc::new(crate::upstream::connect::PingoraTcp::new(
            &settings, None,
        )));
        Ok(Box::new(peer))
    }
}

/// The upstream head's fields as the request core makes them (`request::
/// upstream_request_headers`), from the client's as pingora read them (their case kept).
fn rebuild_upstream_headers(
    upstream: &mut RequestHeader,
    f: &request::Forwarding<'_>,
) -> Result<()> {
    struct Fields(Vec<(Bytes, HeaderValue)>);
    impl request::HeaderSink for Fields {
        fn field(&mut self, name: &[u8], value: &[u8]) {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                self.0.push((Bytes::copy_from_slice(name), v));
            }
        }
        fn forwarded_for(&mut self, prev: &mut dyn Iterator<Item = &[u8]>, ip: IpAddr) {
            let mut v = Vec::with_capacity(64);
            write_forwarded_for(&mut v, prev, ip);
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(v)) {
                self.0.push((Bytes::from_static(b"x-forwarded-for"), v));
            }
        }
    }
    let mut fields = Fields(Vec::with_capacity(upstream.headers.len() + 4));
    // An HTTP/1.x head keeps its names' case; an h2 one has none to keep.
    let case = upstream.has_case();
    let client = || {
        upstream
            .case_header_iter()
            .map(|(n, v)| {
                (
                    std::str::from_utf8(n.as_slice()).unwrap_or(""),
                    v.as_bytes(),
                )
            })
            .chain(
                upstream
                    .headers
                    .iter()
                    .filter(move |_| !case)
                    .map(|(n, v)| (n.as_str(), v.as_bytes())),
            )
    };
    request::upstream_request_headers(client, f, &mut fields);
    let mut fresh = RequestHeader::build(
        upstream.method.clone(),
        upstream.raw_path(),
        Some(fields.0.len()),
    )?;
    fresh.set_uri(upstream.uri.clone());
    fresh.set_version(upstream.version);
    for (name, value) in fields.0 {
        fresh.append_header(name, value)?;
    }
    *upstream = fresh;
    Ok(())
}

static X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Appends `X-Forwarded-For`'s value to `out`: the values the client sent (every header
/// line of it, in order, as one list: RFC 9110 5.3), then the client's address. The fast
/// path writes it straight into the upstream head, with no value of its own to allocate.
fn write_forwarded_for<'a>(
    out: &mut Vec<u8>,
    prev: impl IntoIterator<Item = &'a [u8]>,
    ip: IpAddr,
) {
    for p in prev {
        out.extend_from_slice(p);
        out.extend_from_slice(b", ");
    }
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// A random version-4 UUID for `x-request-id`, in lower-case hex with dashes. Written
/// into a stack buffer: it is made for every request that comes without one, and two
/// `format!`s were two allocations and the formatting machinery each time.
pub(crate) fn request_id() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Where each byte's two digits go in the 8-4-4-4-12 form: a fixed table unrolls into
    // 32 stores, where shifting a u128 per digit cost ~4x the instructions.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut out = [b'-'; 36];
    for (byte, at) in b.into_iter().zip(AT) {
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0xf)];
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn forwarded_for_appends_the_client_address_as_display_writes_it() {
        use std::net::IpAddr;
        let xff = |prev: &[&[u8]], ip: IpAddr| {
            let mut out = Vec::new();
            super::write_forwarded_for(&mut out, prev.iter().copied(), ip);
            String::from_utf8(out).unwrap()
        };
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "9.99.199.250",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(xff(&[], addr), ip);
            assert_eq!(xff(&[b"203.0.113.7"], addr), format!("203.0.113.7, {ip}"));
            assert_eq!(
                xff(&[b"1.1.1.1", b"2.2.2.2, 3.3.3.3"], addr),
                format!("1.1.1.1, 2.2.2.2, 3.3.3.3, {ip}")
            );
        }
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let a = super::request_id();
        let text = std::str::from_utf8(&a).unwrap();
        let groups: Vec<&str> = text.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{text}"
        );
        assert!(groups
            .concat()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(&text[14..15], "4", "version: {text}");
        assert!("89ab".contains(&text[19..20]), "variant: {text}");
        assert_ne!(a, super::request_id());
        // Every digit but the version's is random: over 64 ids each position takes more
        // than one value (a byte written to the wrong place would leave one constant).
        let ids: Vec<[u8; 36]> = (0..64).map(|_| super::request_id()).collect();
        for at in (0..36).filter(|&at| ![8, 13, 14, 18, 23].contains(&at)) {
            assert!(
                ids.iter().any(|id| id[at] != ids[0][at]),
                "position {at} never changes"
            );
        }
    }
}
