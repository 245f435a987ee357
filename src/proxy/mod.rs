//! The pingora `ProxyHttp` implementation: one request's life. It orchestrates and holds
//! no policy of its own: routing decides the route, upstream picks the endpoint.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::routing::{normalize_host, Action, Decision, HeaderOps, RequestView, Route};
use crate::snapshot::Snapshot;
use crate::telemetry::Metrics;

/// Retries Istio makes when a route says nothing: 2, on connect failures.
const DEFAULT_CONNECT_RETRIES: usize = 2;

/// The proxy for one listener.
pub struct Gateway {
    pub listener: usize,
    pub tls: bool,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
}

/// Per-request state. The Snapshot is loaded once, in the first phase, and kept to the end.
#[derive(Default)]
pub struct RequestCtx {
    snapshot: Option<Arc<Snapshot>>,
    route: Option<Arc<Route>>,
    match_index: usize,
    destination: usize,
    attempts: usize,
    /// Round-robin start, fixed on the first try so retries walk on from it.
    start: Option<usize>,
    /// Envoy-style response flag for logs: NR, UH, UF, UT, URX...
    pub flag: &'static str,
}

/// What the route table decided, owned, so the request borrow can end before responding.
enum Local {
    Respond {
        status: u16,
        body: Bytes,
        location: Option<String>,
        route: Option<Arc<Route>>,
    },
    /// Route, chosen destination, index of the match block that held.
    Forward(Arc<Route>, usize, usize),
}

impl Gateway {
    fn decide(&self, snapshot: &Snapshot, req: &RequestHeader) -> Local {
        let Some(listener) = snapshot.listeners.get(self.listener) else {
            return not_found();
        };
        let authority = req
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let host = normalize_host(authority);
        let scheme = if self.tls { "https" } else { "http" };
        let view = RequestView {
            method: req.method.as_str(),
            path: req.uri.path(),
            query: req.uri.query(),
            authority,
            scheme,
            headers: &req.headers,
            port: listener.addr.port(),
        };
        match listener.table.decide(&host, &view) {
            Decision::HttpsRedirect(_) => {
                let mut location = String::with_capacity(host.len() + view.path.len() + 16);
                location.push_str("https://");
                location.push_str(&host);
                location.push_str(req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
                Local::Respond {
                    status: 301,
                    body: Bytes::new(),
                    location: Some(location),
                    route: None,
                }
            }
            Decision::NoHost | Decision::NoRoute(_) => not_found(),
            Decision::Route {
                route, match_index, ..
            } => match &route.action {
                Action::Direct(d) => Local::Respond {
                    status: d.status,
                    body: d.body.clone(),
                    location: None,
                    route: Some(route.clone()),
                },
                Action::Redirect(r) => Local::Respond {
                    status: r.code,
                    body: Bytes::new(),
                    location: Some(r.location(scheme, authority, view.path, view.query)),
                    route: Some(route.clone()),
                },
                Action::Forward(f) => Local::Forward(route.clone(), f.pick(), match_index),
            },
        }
    }
}

fn not_found() -> Local {
    Local::Respond {
        status: 404,
        body: Bytes::new(),
        location: None,
        route: None,
    }
}

async fn respond(
    session: &mut Session,
    status: u16,
    body: Bytes,
    location: Option<String>,
    ops: Option<&HeaderOps>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    if !body.is_empty() {
        resp.insert_header(header::CONTENT_TYPE, "text/plain")?;
    }
    if let Some(l) = location {
        resp.insert_header(header::LOCATION, l)?;
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

fn forward_of(route: &Route) -> Option<&crate::routing::Forward> {
    match &route.action {
        Action::Forward(f) => Some(f),
        _ => None,
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let snapshot = self.snapshots.load_full();
        let local = self.decide(&snapshot, session.req_header());
        ctx.snapshot = Some(snapshot);
        match local {
            Local::Forward(route, destination, match_index) => {
                ctx.match_index = match_index;
                ctx.route = Some(route);
                ctx.destination = destination;
                Ok(false)
            }
            Local::Respond {
                status,
                body,
                location,
                route,
            } => {
                if status == 404 && route.is_none() {
                    ctx.flag = "NR";
                }
                let ops = route.as_ref().map(|r| &r.headers.response);
                respond(session, status, body, location, ops).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route chosen"))?;
        let forward = forward_of(route)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route does not forward"))?;
        let dest = &forward.destinations[ctx.destination];
        let start = *ctx.start.get_or_insert_with(|| dest.cluster.next_index());
        let Some(endpoint) = dest.cluster.endpoint(start, ctx.attempts) else {
            ctx.flag = "UH";
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                format!("no healthy upstream for {}", dest.cluster.name),
            ));
        };
        Ok(Box::new(dest.cluster.peer(endpoint, forward.timeout)))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let Some(route) = ctx.route.as_ref() else {
            return Ok(());
        };
        if upstream.headers.get(header::HOST).is_none() {
            // HTTP/2 clients send :authority only; an HTTP/1.1 upstream needs Host.
            if let Some(a) = upstream.uri.authority().map(|a| a.as_str().to_string()) {
                upstream.insert_header(header::HOST, a)?;
            }
        }
        if let Some(forward) = forward_of(route) {
            if let Some(rw) = &forward.rewrite {
                let prefix = route
                    .matches
                    .get(ctx.match_index)
                    .and_then(|m| m.matched_prefix());
                if let Some(path) = rw.path(upstream.uri.path(), upstream.uri.query(), prefix) {
                    let uri = path.parse().map_err(|_| {
                        Error::explain(ErrorType::InternalError, "rewritten URI is invalid")
                    })?;
                    upstream.set_uri(uri);
                }
                if let Some(a) = &rw.authority {
                    upstream.insert_header(header::HOST, a.clone())?;
                }
            }
            route.headers.request.apply_request(upstream);
            forward.destinations[ctx.destination]
                .headers
                .request
                .apply_request(upstream);
        }
        upstream.insert_header("x-forwarded-proto", if self.tls { "https" } else { "http" })?;
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            let xff = match upstream
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip.to_string(),
            };
            upstream.insert_header("x-forwarded-for", xff)?;
        }
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
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if ctx.attempts < DEFAULT_CONNECT_RETRIES {
            ctx.attempts += 1;
            e.set_retry(true);
        } else {
            ctx.flag = "UF";
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        use ErrorType::*;
        let (code, flag, what) = match (e.etype(), e.esource()) {
            (HTTPStatus(code), _) => (*code, ctx.flag, "local reply"),
            (ConnectTimedout, _) => (503, "UF", "upstream connect timeout"),
            (ConnectRefused, _) => (503, "UF", "upstream connection refused"),
            (ConnectNoRoute | ConnectError | TLSHandshakeFailure | SocketError | BindError, _) => {
                (503, "UF", "upstream connect error")
            }
            (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => {
                (504, "UT", "upstream request timeout")
            }
            (_, ErrorSource::Upstream) => (503, "UC", "upstream reset before response"),
            (ReadError | WriteError | ConnectionClosed, ErrorSource::Downstream) => {
                (0, "DC", "downstream closed")
            }
            (_, ErrorSource::Downstream) => (400, "DPE", "bad request"),
            _ => (500, "", "internal error"),
        };
        ctx.flag = if ctx.attempts > 0 && flag == "UF" {
            "URX"
        } else {
            flag
        };
        if code > 0 {
            let req = session.req_header();
            tracing::warn!(
                status = code,
                flag = ctx.flag,
                method = %req.method,
                path = req.uri.path(),
                route = ctx.route.as_ref().map(|r| r.origin.to_string()).unwrap_or_default(),
                attempts = ctx.attempts + 1,
                error = %e,
                "{what}"
            );
            let body = Bytes::from(format!("{what}\n"));
            let _ = session.respond_error_with_body(code, body).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        Metrics::global().request(status);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let req = session.req_header();
            tracing::debug!(
                status,
                flag = ctx.flag,
                method = %req.method,
                path = req.uri.path(),
                generation = ctx.snapshot.as_ref().map(|s| s.generation).unwrap_or(0),
                "request"
            );
        }
    }
}
