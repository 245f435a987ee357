//! The request core: what a request becomes on its way upstream and what a local reply
//! says, decided once for every codec (Portico's HTTP/1.1 and h2 fast codecs, and
//! pingora's request cycle). Codecs only move bytes: each feeds the client's header fields
//! in and writes out what comes back, in its own form. Never touches sockets.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};

use crate::policy::authz::{Authorization, CustomRefusal};
use crate::policy::jwt::{Authn, UpstreamEdits};
use crate::policy::{self, Claims, RequestKeys, RoutePolicy};
use crate::routing::{chance, Action, Cors, Decision, Forward, HeaderOps, RequestView, Route};
use crate::snapshot::Listener;
use crate::telemetry::outcome::{Details, Flag};
use crate::telemetry::trace::SpanContext;
use crate::tls::client_auth::{ForwardClientCert, PeerCert};

/// Fields about one hop, never passed upstream: RFC 9110 7.6.1's (`Connection` and what it
/// names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`), the client's
/// credentials for this proxy (`Proxy-Authorization`), and h2c's `HTTP2-Settings`.
/// `Transfer-Encoding` is the codec's: it frames the body it writes.
const HOP_BY_HOP_REQUEST: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
];

/// Whether request field `name` is about the hop to this proxy (an upgrade keeps
/// `Upgrade` and `Connection`, which ask the upstream for it).
pub fn hop_by_hop_request(name: &str, upgrade: bool) -> bool {
    HOP_BY_HOP_REQUEST
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        && !(upgrade
            && (name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("connection")))
}

/// Where the upstream head's fields go: a codec's buffer or header map.
pub trait HeaderSink {
    fn field(&mut self, name: &[u8], value: &[u8]);
    /// A field added after any of the same name (a sink whose `field` replaces one
    /// overrides this).
    fn appended(&mut self, name: &[u8], value: &[u8]) {
        self.field(name, value);
    }
    /// `X-Forwarded-For`: the values `prev` (each a list), then `ip`, as one field.
    fn forwarded_for(&mut self, prev: &mut dyn Iterator<Item = &[u8]>, ip: IpAddr);
}

/// What the upstream head adds to the client's fields.
pub struct Forwarding<'a> {
    /// `http` or `https`: how the client reached the gateway.
    pub scheme: &'static [u8],
    pub client_ip: Option<IpAddr>,
    /// The id made for a request that came without one: a field of the request from then
    /// on (routes match on it), written as if the client had sent it last.
    pub request_id: Option<&'a [u8]>,
    /// A rewrite's authority: the `Host` the upstream gets instead of the client's.
    pub host: Option<&'a [u8]>,
    /// The route's header operations, then the destination's (a later one wins).
    pub ops: [&'a HeaderOps; 2],
    /// The request asks for an upgrade: `Upgrade` and `Connection` go upstream.
    pub upgrade: bool,
    /// The request's span (tracing on): its propagation fields replace the client's and
    /// any route's, written last.
    pub span: Option<&'a SpanContext>,
    /// `x-forwarded-client-cert`: the mode and the connection's verified certificate.
    pub client_cert: ClientCert<'a>,
    /// Request authentication's edits (the token's header removed, a verified token's
    /// outputs added): made before the route's operations, which may replace them.
    pub auth: Option<&'a UpstreamEdits>,
}

/// What `x-forwarded-client-cert` becomes (Envoy's `forward_client_cert_details`).
#[derive(Clone, Copy, Default)]
pub struct ClientCert<'a> {
    pub mode: ForwardClientCert,
    /// The verified client certificate of a mutual-TLS connection.
    pub peer: Option<&'a PeerCert>,
}

const XFCC: &str = "x-forwarded-client-cert";

impl Forwarding<'_> {
    /// Whether a `set` or `remove` in `ops[from..]` replaces field `name`.
    fn replaced_in(&self, from: usize, name: &[u8]) -> bool {
        self.ops[from..].iter().any(|o| {
            o.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
                || o.remove
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        })
    }

    /// Whether a `set` in the operations writes field `name`.
    fn traced(&self, name: &[u8]) -> bool {
        self.span.is_some_and(|s| s.replaces(name))
    }

    fn set_by_ops(&self, name: &[u8]) -> bool {
        self.ops
            .iter()
            .any(|o| o.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)))
    }
}

/// Whether a `Connection` field of `client` names field `name` (RFC 9110 7.6.1: a proxy
/// removes the fields the client's `Connection` names).
fn named_by_connection<'h>(client: impl Iterator<Item = (&'h str, &'h [u8])>, name: &str) -> bool {
    client
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// The upstream request's header fields, after the request line: the client's fields
/// less those about the hop (and those its `Connection` names), less those the operations
/// replace; a generated request id; the operations' own fields (route's, then
/// destination's); then `X-Forwarded-Proto` (unless an operation sets it) and
/// `X-Forwarded-For`: the client's values that no operation removed, then the client's
/// address (unless an operation sets it). So a route's `remove: [x-forwarded-for]` drops
/// what a client claimed and keeps the address Portico saw, and a `set` of any of these
/// fields gives one field with the route's value. `X-Forwarded-Client-Cert` likewise, last:
/// the client's values when the mode keeps them (never by default), then this hop's
/// element for a verified client certificate (SANITIZE_SET, APPEND_FORWARD), one field.
///
/// `client` gives the client's fields afresh on each call (they are looked at more than
/// once: for what `Connection` names, and for `X-Forwarded-For`).
pub fn upstream_request_headers<'h, I>(
    client: impl Fn() -> I,
    f: &Forwarding<'_>,
    out: &mut impl HeaderSink,
) where
    I: Iterator<Item = (&'h str, &'h [u8])>,
{
    let has_connection = client().any(|(n, _)| n.eq_ignore_ascii_case("connection"));
    let mut host_written = f.host.is_none();
    let mut upgrade_written = false;
    for (name, value) in client() {
        if let (Some(host), true) = (f.host, name.eq_ignore_ascii_case("host")) {
            if !host_written && !f.replaced_in(0, b"host") {
                out.field(name.as_bytes(), host);
            }
            host_written = true;
            continue;
        }
        if f.upgrade && name.eq_ignore_ascii_case("connection") {
            // The upgrade is all the upstream hop's `Connection` says (as Envoy sends it):
            // the other options were about the client's hop.
            if !upgrade_written {
                out.field(b"connection", b"upgrade");
                upgrade_written = true;
            }
            continue;
        }
        if hop_by_hop_request(name, f.upgrade)
            || name.eq_ignore_ascii_case(XFCC)
            || name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || f.replaced_in(0, name.as_bytes())
            || f.traced(name.as_bytes())
            || f.auth.is_some_and(|a| a.removes(name.as_bytes()))
            || (has_connection
                // An upgrade's `Connection: Upgrade` names the field that goes on.
                && !(f.upgrade && name.eq_ignore_ascii_case("upgrade"))
                && named_by_connection(client(), name))
        {
            continue;
        }
        out.field(name.as_bytes(), value);
    }
    if let (Some(host), false) = (f.host, host_written) {
        if !f.replaced_in(0, b"host") {
            out.field(b"host", host);
        }
    }
    if let Some(id) = f.request_id {
        if !f.replaced_in(0, b"x-request-id") {
            out.field(b"x-request-id", id);
        }
    }
    for (name, value) in f.auth.iter().flat_map(|a| &a.add) {
        if !f.replaced_in(0, name.as_bytes()) && !f.traced(name.as_bytes()) {
            out.field(name.as_bytes(), value);
        }
    }
    for (i, o) in f.ops.iter().enumerate() {
        for (name, value) in o.set.iter().chain(&o.add) {
            if !f.replaced_in(i + 1, name) && !f.traced(name) {
                out.field(name, value.as_bytes());
            }
        }
    }
    if !f.set_by_ops(b"x-forwarded-proto") {
        out.field(b"x-forwarded-proto", f.scheme);
    }
    if let Some(ip) = f.client_ip {
        if !f.set_by_ops(b"x-forwarded-for") {
            let kept = !f.replaced_in(0, b"x-forwarded-for");
            let mut prev = client()
                .filter(|(n, _)| kept && n.eq_ignore_ascii_case("x-forwarded-for"))
                .map(|(_, v)| v);
            out.forwarded_for(&mut prev, ip);
        }
    }
    forwarded_client_cert(&client, f, out);
    if let Some(span) = f.span {
        span.fields(|n, v| out.field(n, v));
    }
}

/// `x-forwarded-client-cert` as the mode says (see [`upstream_request_headers`]).
fn forwarded_client_cert<'h, I>(
    client: &impl Fn() -> I,
    f: &Forwarding<'_>,
    out: &mut impl HeaderSink,
) where
    I: Iterator<Item = (&'h str, &'h [u8])>,
{
    let c = f.client_cert;
    if f.set_by_ops(XFCC.as_bytes()) {
        return;
    }
    let keep = c.mode.keeps_client_field(c.peer.is_some()) && !f.replaced_in(0, XFCC.as_bytes());
    let own = c.peer.filter(|_| c.mode.adds_element());
    let mut prev = client()
        .filter(|(n, _)| keep && n.eq_ignore_ascii_case(XFCC))
        .map(|(_, v)| v);
    let first = prev.next();
    match (first, own) {
        (None, None) => {}
        (None, Some(p)) => out.field(XFCC.as_bytes(), p.xfcc.as_bytes()),
        (Some(v), own) => {
            let mut value = v.to_vec();
            for v in prev.chain(own.map(|p| p.xfcc.as_bytes())) {
                value.push(b',');
                value.extend_from_slice(v);
            }
            out.field(XFCC.as_bytes(), &value);
        }
    }
}

/// An HTTP/1.1 head being written: each field as a line.
impl HeaderSink for Vec<u8> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        self.extend_from_slice(value);
        self.extend_from_slice(b"\r\n");
    }

    fn forwarded_for(&mut self, prev: &mut dyn Iterator<Item = &[u8]>, ip: IpAddr) {
        self.extend_from_slice(b"x-forwarded-for: ");
        super::write_forwarded_for(self, prev, ip);
        self.extend_from_slice(b"\r\n");
    }
}

/// The client's address as Envoy's `xff_num_trusted_hops` decides it (Istio's
/// `remote.ip`): with `trusted` proxies in front, the `X-Forwarded-For` entry `trusted`
/// from the right (the last one a trusted proxy wrote), of every field line read as one
/// list; the peer when `trusted` is 0, when the list is shorter, or when that entry is not
/// an IP address. Two passes over the fields, no allocation.
pub fn remote_address(
    trusted: u32,
    peer: Option<IpAddr>,
    headers: crate::routing::Headers<'_>,
) -> Option<IpAddr> {
    if trusted == 0 {
        return peer;
    }
    let entries = || {
        headers
            .values("x-forwarded-for")
            .flat_map(|v| v.unwrap_or("").split(','))
    };
    let n = entries().count();
    let Some(at) = n.checked_sub(trusted as usize) else {
        return peer;
    };
    match entries().nth(at).map(str::trim).map(str::parse::<IpAddr>) {
        Some(Ok(ip)) => Some(ip.to_canonical()),
        _ => peer,
    }
}

/// What the request core decided for a request: answer it here, or forward it.
// The forward plan stays inline (it is the hot one; ~250 bytes, moved a couple of times
// per request), the answer is boxed.
#[allow(clippy::large_enum_variant)]
pub enum Plan<'s> {
    /// Boxed: an answer carries its CORS fields, and the forward plan is the hot one.
    Answer(Box<Answer>),
    Forward(Forwarded<'s>),
}

impl Plan<'_> {
    /// The route the plan is on, if any.
    fn route(&self) -> Option<&Arc<Route>> {
        match self {
            Plan::Answer(a) => a.route.as_ref(),
            Plan::Forward(f) => Some(f.route),
        }
    }
}

/// Whether a planned request has policies to ask ([`Planned::policies`]).
pub enum Policies<'s> {
    /// None applies: the plan stands.
    None(Plan<'s>),
    /// Some do: [`Planned::police`].
    Apply(Planned<'s>),
}

/// A plan whose route's policies (access lists, rate limits) have not been asked yet.
/// A codec looks at [`Planned::plan`] to see whether it can serve the request itself;
/// [`Planned::police`] counts the request and gives the plan to carry out (a refusal turns
/// it into an answer). A codec that cannot carry out the policed plan hands it to
/// pingora's cycle with the request ([`OwnedPlan`], `protocol::lend::Handover`), which
/// carries it out without planning or counting again: every request is planned, counted,
/// and holds a place under the caps, once.
pub struct Planned<'s> {
    plan: Plan<'s>,
    /// The route's policies, when the plan is one they apply to (a direct response, a
    /// redirect or a forward; not a CORS preflight or a fault abort, which Envoy's
    /// filters answer before its rate-limit filters run).
    policy: Option<&'s RoutePolicy>,
    /// The listener's AuthorizationPolicies: every request but an ACME challenge's is
    /// decided by them first (Istio's RBAC filter runs before CORS, fault injection and
    /// the router, so a refused request gets 403 whatever routing would have said).
    authz: Option<&'s Authorization>,
    /// The listener's request caps, when one is set: every request the core plans is
    /// admitted by them first (Envoy's overload manager refuses a stream before any
    /// filter runs), so one over a cap costs no policy a token.
    caps: Option<&'s crate::listener::RequestCaps>,
    /// The JWT rules that apply: the listener's RequestAuthentications for every request
    /// but an ACME challenge's (Envoy's jwt_authn filter runs before RBAC, routed or not),
    /// or a route's own set when one targets the route.
    authn: Option<&'s Authn>,
}

/// What the policies see of a request: its fields, and the verified JWT's identity.
pub fn request_keys<'a>(
    view: &RequestView<'a>,
    verified: Option<&'a policy::jwt::Verified>,
) -> RequestKeys<'a> {
    RequestKeys {
        client_ip: view.client_ip.map(|ip| ip.to_canonical()),
        peer_ip: view.peer_ip.map(|ip| ip.to_canonical()),
        headers: view.headers,
        path: view.path,
        method: view.method,
        authority: view.authority,
        port: view.port,
        sni: view.sni,
        peer_principal: view.peer_principal,
        principal: verified.map(|v| v.principal.as_str()),
        claims: verified.map(|v| v as &(dyn Claims + Sync)),
    }
}

impl<'s> Planned<'s> {
    /// The plan before the policies are asked.
    pub fn plan(&self) -> &Plan<'s> {
        &self.plan
    }

    /// The JWT rules [`Planned::police`] checks the request with (for `portico routes`).
    pub fn authn(&self) -> Option<&'s Authn> {
        self.authn
    }

    /// The AuthorizationPolicies [`Planned::police`] decides the request by.
    pub fn authz(&self) -> Option<&'s Authorization> {
        self.authz
    }

    /// Admits the request under the listener's request caps, asks the route's policies
    /// and counts the request; the plan to carry out. A refusal is an answer (503 `OM` at
    /// a request cap, 429 `RL`, or a list's 403, or `statusOnError` `RLSE` when Redis is
    /// down and the policy fails closed); an allowed request carries the RateLimit fields
    /// to its answer or response. The plan holds the request's place under the caps
    /// (`Answer::slot`, `Forwarded::slot`) until the codec drops it with the request.
    /// Waits for Redis only when the route has global rules; nothing is locked while it
    /// waits.
    pub async fn police(self, view: &RequestView<'_>) -> Plan<'s> {
        match self.policies() {
            Policies::None(plan) => plan,
            Policies::Apply(planned) => planned.admit(view).await,
        }
    }

    /// The plan when no cap and no policy applies to it (there is nothing to ask or wait
    /// for), else this back for [`Planned::police`]. A codec that keeps a request's state
    /// in one future can box the policies' (KiBs: token checks, authorizer calls, Redis)
    /// only for the requests that have them.
    pub fn policies(self) -> Policies<'s> {
        if self.caps.is_none()
            && self.policy.is_none()
            && self.authz.is_none()
            && self.authn.is_none()
        {
            return Policies::None(self.plan);
        }
        Policies::Apply(self)
    }

    async fn admit(self, view: &RequestView<'_>) -> Plan<'s> {
        let Some(caps) = self.caps else {
            return self.decide(view).await;
        };
        match caps.admit(view.client_ip) {
            Ok(slot) => {
                let mut plan = self.decide(view).await;
                match &mut plan {
                    Plan::Answer(a) => a.slot = Some(slot),
                    Plan::Forward(f) => f.slot = Some(slot),
                }
                plan
            }
            Err(_) => Plan::Answer(Box::new(overloaded(self.plan.route()))),
        }
    }

    /// [`Planned::police`] past the request caps.
    async fn decide(self, view: &RequestView<'_>) -> Plan<'s> {
        if self.policy.is_none() && self.authz.is_none() && self.authn.is_none() {
            return self.plan;
        }
        // Request authentication first (Envoy's jwt_authn filter runs before RBAC and
        // rate limits): a bad token is refused; a good one is who the request is.
        let mut verified = None;
        let mut edits = None;
        // A JWKS fetch, an external authorizer's call and a Redis round trip are KiBs of
        // state each: they are boxed where they are awaited, so that every request's
        // future (the fast codecs box one per request) does not carry and copy them.
        if let Some(authn) = self.authn {
            match authn.authenticate(view).await {
                Err(refused) => {
                    return Plan::Answer(Box::new(jwt_refusal(refused, self.plan.route())))
                }
                Ok(Some(v)) => verified = Some(v),
                Ok(None) => edits = authn.anonymous_edits(),
            }
        }
        let keys = request_keys(view, verified.as_ref());
        // AuthorizationPolicy: CUSTOM (the external authorizers) first, then DENY and
        // ALLOW, as Istio orders them.
        let mut custom = None;
        if let Some(authz) = self.authz {
            if authz.has_custom() {
                match Box::pin(authz.custom(&keys, view)).await {
                    Ok(allowed) => custom = allowed,
                    Err(refused) => {
                        return Plan::Answer(Box::new(ext_authz_refusal(
                            refused,
                            self.plan.route(),
                        )))
                    }
                }
            }
            let verdict = authz.check(&keys);
            if !verdict.allowed {
                return Plan::Answer(Box::new(rbac_denied(verdict.details, self.plan.route())));
            }
        }
        let mut plan = self.plan;
        let d = match self.policy {
            Some(policy) => policy.decide(&keys).await,
            None => policy::Decision::UNLIMITED,
        };
        if d.allowed() {
            let principal = verified.as_ref().map(|v| Box::from(v.principal.as_str()));
            match &mut plan {
                Plan::Answer(a) => {
                    a.policy = d.fields();
                    a.principal = principal;
                    if let Some(c) = custom {
                        a.authz_fields = c.downstream;
                    }
                }
                Plan::Forward(f) => {
                    f.policy = d.fields();
                    f.principal = principal;
                    let mut edits = verified.map(|v| v.edits).or(edits);
                    if let Some(c) = custom {
                        apply_authz_edits(edits.get_or_insert_with(Default::default), &c);
                        f.authz_fields = c.downstream;
                    }
                    f.auth = edits
                        .filter(|e| *e != UpstreamEdits::default())
                        .map(Box::new);
                }
            }
            return plan;
        }
        Plan::Answer(Box::new(refusal(&d, plan.route())))
    }
}

/// The answer to a request over a request cap: 503 with Envoy's overload manager's flag
/// `OM` and details `overload` (NGINX's `limit_conn_status 503`).
fn overloaded(route: Option<&Arc<Route>>) -> Answer {
    Answer {
        status: 503,
        body: Bytes::from_static(b"too many requests in flight\n"),
        location: None,
        cors: CorsFields::default(),
        response_ops: true,
        delay: None,
        flag: Flag::OverloadManager,
        details: Details::Overload,
        route: route.cloned(),
        policy: policy::Fields::NONE,
        www_authenticate: None,
        principal: None,
        slot: None,
        authz_fields: Vec::new(),
    }
}

/// The answer to a request whose token was refused: Envoy's status, words and
/// `WWW-Authenticate`.
fn jwt_refusal(r: policy::jwt::Refused, route: Option<&Arc<Route>>) -> Answer {
    Answer {
        status: r.failure.status(),
        body: Bytes::from_static(r.failure.text().as_bytes()),
        location: None,
        cors: CorsFields::default(),
        response_ops: true,
        delay: None,
        flag: Flag::None,
        details: Details::Jwt(r.failure),
        route: route.cloned(),
        policy: policy::Fields::NONE,
        www_authenticate: HeaderValue::try_from(r.challenge).ok(),
        authz_fields: Vec::new(),
        principal: None,
        slot: None,
    }
}

/// An external authorizer's allow, made edits of the upstream request: its
/// `headersToUpstreamOnAllow` fields replace any of the same names (the client's, or
/// request authentication's), then `x-envoy-auth-headers-to-remove` removes fields.
fn apply_authz_edits(e: &mut UpstreamEdits, a: &crate::policy::ext_authz::Allowed) {
    for (name, value) in &a.upstream {
        let name = name.as_str();
        e.add.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if !e.removes(name.as_bytes()) {
            e.remove.push(name.to_string());
        }
        e.add
            .push((name.to_string(), Bytes::copy_from_slice(value.as_bytes())));
    }
    for name in &a.remove {
        let name = name.as_str();
        e.add.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if !e.removes(name.as_bytes()) {
            e.remove.push(name.to_string());
        }
    }
}

/// The answer to a request a CUSTOM AuthorizationPolicy refused: the external
/// authorizer's denial (its status, body and fields), or `statusOnError` with no body
/// when the check failed; flag `UAEX` either way, as Envoy's ext_authz filter answers.
fn ext_authz_refusal(r: CustomRefusal, route: Option<&Arc<Route>>) -> Answer {
    let (status, body, fields, details) = match r {
        CustomRefusal::Denied(d) => (d.status, d.body, d.fields, Details::ExtAuthzDenied),
        CustomRefusal::Failed(status) => (status, Bytes::new(), Vec::new(), Details::ExtAuthzError),
    };
    Answer {
        status,
        body,
        location: None,
        cors: CorsFields::default(),
        response_ops: true,
        delay: None,
        flag: Flag::UnauthorizedExternalService,
        details,
        route: route.cloned(),
        policy: policy::Fields::NONE,
        www_authenticate: None,
        authz_fields: fields,
        principal: None,
        slot: None,
    }
}

/// The answer to a request an AuthorizationPolicy refused: Envoy's RBAC filter's 403.
fn rbac_denied(details: &'static str, route: Option<&Arc<Route>>) -> Answer {
    Answer {
        status: 403,
        body: Bytes::from_static(b"RBAC: access denied"),
        location: None,
        cors: CorsFields::default(),
        response_ops: true,
        delay: None,
        flag: Flag::None,
        details: Details::Rbac(details),
        route: route.cloned(),
        policy: policy::Fields::NONE,
        www_authenticate: None,
        authz_fields: Vec::new(),
        principal: None,
        slot: None,
    }
}

/// The answer to a request the policies refused.
fn refusal(d: &policy::Decision<'_>, route: Option<&Arc<Route>>) -> Answer {
    let details = d.outcome.details();
    let body = match d.outcome {
        policy::Outcome::Denied => Bytes::copy_from_slice(d.body.as_bytes()),
        policy::Outcome::LocalLimited => Bytes::from_static(b"local_rate_limited\n"),
        policy::Outcome::GlobalLimited => Bytes::from_static(b"request_rate_limited\n"),
        _ => Bytes::from_static(b"rate limit service unavailable\n"),
    };
    Answer {
        status: d.status,
        body,
        location: None,
        cors: CorsFields::default(),
        response_ops: true,
        delay: None,
        flag: d.outcome.response_flag(),
        details,
        route: route.cloned(),
        policy: d.fields(),
        www_authenticate: None,
        authz_fields: Vec::new(),
        principal: None,
        slot: None,
    }
}

/// An answer the gateway makes without an upstream: a direct response, a redirect, no
/// route (404), a CORS preflight, a fault abort.
///
/// Owned (the route is an `Arc`, not a borrow of the snapshot): a codec that cannot write
/// an answer hands it over whole (`protocol::lend::Handover`).
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub location: Option<String>,
    /// CORS fields (an allowed preflight's, or `access-control-allow-origin`).
    pub cors: CorsFields,
    /// Whether the route's response operations apply (not to a preflight): [`Answer::ops`].
    pub response_ops: bool,
    /// Wait this long first (a fault delay).
    pub delay: Option<Duration>,
    /// Envoy's response flag and details for the log.
    pub flag: Flag,
    pub details: Details,
    pub route: Option<Arc<Route>>,
    /// The policies' fields (`x-envoy-ratelimited`, RateLimit).
    pub policy: policy::Fields,
    /// A refused token's `WWW-Authenticate`.
    pub www_authenticate: Option<HeaderValue>,
    /// The external authorizer's fields: a denial's, or an allow's
    /// `headersToDownstreamOnAllow`. They replace the answer's own of the same names.
    pub authz_fields: Vec<(HeaderName, HeaderValue)>,
    /// The verified JWT's principal (`iss/sub`), for the log.
    pub principal: Option<Box<str>>,
    /// The request's place under the listener's request caps: the codec keeps the answer
    /// (or this) until the request is done.
    pub slot: Option<crate::listener::RequestSlot>,
}

impl Answer {
    /// The cluster an answer on a forwarding route (a fault abort, a preflight) is counted
    /// for: the route's first destination, as Istio reports such requests.
    pub fn cluster(&self) -> Option<&crate::upstream::Cluster> {
        match &self.route.as_ref()?.action {
            Action::Forward(f) => f.destinations.first().map(|d| &*d.cluster),
            _ => None,
        }
    }

    /// The route's response operations, when they apply to this answer.
    pub fn ops(&self) -> Option<&HeaderOps> {
        self.route
            .as_ref()
            .filter(|_| self.response_ops)
            .map(|r| &r.headers.response)
    }
}

/// A request to forward.
pub struct Forwarded<'s> {
    pub route: &'s Arc<Route>,
    pub forward: &'s Forward,
    /// The match block that held (a prefix rewrite replaces its prefix).
    pub match_index: usize,
    /// The weighted destination chosen.
    pub destination: usize,
    /// Wait this long first (a fault delay, flag `DI`).
    pub delay: Option<Duration>,
    /// The request's `Origin` when the route's CORS policy allows it: the response
    /// carries `access-control-allow-origin` (and the policy's expose/credentials).
    pub cors_origin: Option<HeaderValue>,
    /// The policies' fields for the response (RateLimit), set by [`Planned::police`].
    pub policy: policy::Fields,
    /// Request authentication's and the external authorizer's edits of the upstream
    /// request (`Forwarding::auth`).
    pub auth: Option<Box<UpstreamEdits>>,
    /// The verified JWT's principal (`iss/sub`), for the log.
    pub principal: Option<Box<str>>,
    /// The request's place under the listener's request caps: the codec keeps the plan
    /// (or this) until the request's response is done or it fails, whichever way.
    pub slot: Option<crate::listener::RequestSlot>,
    /// The external authorizer's `headersToDownstreamOnAllow` fields for the response.
    pub authz_fields: Vec<(HeaderName, HeaderValue)>,
    /// The request's key when the destination hashes to an endpoint
    /// (`loadBalancer.consistentHash`), hashed: every codec's tries pick by it
    /// (`Cluster::select`). `None`: balanced as the cluster's policy says (a hashing
    /// cluster picks at random for a request without the key).
    pub hash: Option<u64>,
    /// The cookie the gateway sets (`httpCookie` with a ttl, and the request had none):
    /// appended to the response, after the upstream's own `Set-Cookie` fields.
    pub set_cookie: Option<HeaderValue>,
}

/// The consistent-hash key of a request for a destination hashing by `source`, and the
/// cookie to set when the key is a cookie the request does not have (and the rule has a
/// ttl): a new random value, which the request is hashed by too. The key's bytes are
/// hashed where they lie (no copy), as the balancer's ring and table were built.
fn hash_key(
    source: &crate::upstream::HashSource,
    view: &RequestView<'_>,
) -> (Option<u64>, Option<HeaderValue>) {
    use crate::upstream::balancer::{hash_bytes, hash_ip};
    use crate::upstream::HashSource;
    match source {
        HashSource::Header(name) => (view.headers.first_raw(name.as_str()).map(hash_bytes), None),
        HashSource::SourceIp => (view.client_ip.map(hash_ip), None),
        HashSource::Query(name) => {
            let value = view.query.and_then(|q| {
                q.split('&')
                    .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                    .find_map(|(k, v)| (k == name).then_some(v))
            });
            (value.map(|v| hash_bytes(v.as_bytes())), None)
        }
        HashSource::Cookie {
            name,
            set_attributes,
            ..
        } => {
            // Every `Cookie` field (an h2 client may send several), each a `;` list.
            let sent = view
                .headers
                .values("cookie")
                .flatten()
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find_map(|(k, v)| (k == name).then_some(v));
            if let Some(v) = sent {
                return (Some(hash_bytes(v.as_bytes())), None);
            }
            let Some(attributes) = set_attributes else {
                return (None, None);
            };
            let value = format!("{:016x}", fastrand::u64(..));
            let cookie = format!("{name}={value}{attributes}");
            // The name and attributes were checked at load; the value is hex.
            let cookie = HeaderValue::try_from(cookie).ok();
            (Some(hash_bytes(value.as_bytes())), cookie)
        }
    }
}

/// The target (path with the query) the upstream sees after `forward`'s rewrite, for a
/// request `path`/`query` that matched `route`'s match `match_index` (a prefix match has
/// the prefix replaced, any other the whole path); `None` without a URI rewrite. Every
/// codec asks this.
pub fn rewritten_target(
    route: &Route,
    forward: &Forward,
    match_index: usize,
    path: &str,
    query: Option<&str>,
) -> Option<String> {
    let rw = forward.rewrite.as_ref()?;
    let prefix = route
        .matches
        .get(match_index)
        .and_then(|m| m.matched_prefix());
    rw.path(path, query, prefix)
}

/// The authority the upstream sees after `forward`'s rewrite, if it rewrites one.
pub fn rewritten_authority(forward: &Forward) -> Option<&http::HeaderValue> {
    forward
        .rewrite
        .as_ref()
        .and_then(|rw| rw.authority.as_ref())
}

impl Forwarded<'_> {
    /// [`rewritten_target`] for this plan's route and match.
    pub fn rewritten_target(&self, path: &str, query: Option<&str>) -> Option<String> {
        rewritten_target(self.route, self.forward, self.match_index, path, query)
    }

    /// What the response gets besides the upstream's fields and the route's operations:
    /// the CORS fields for an allowed origin, and the policies' fields. Every codec writes
    /// these over the upstream's fields of the same names.
    /// The clusters this request is copied to: each of the route's mirrors, sampled at its
    /// percentage here, once, whichever codec sends the copies.
    pub fn mirrors(&self) -> impl Iterator<Item = &Arc<crate::upstream::Cluster>> + '_ {
        self.forward
            .mirrors
            .iter()
            .filter(|m| crate::routing::route::chance(m.percent))
            .map(|m| &m.cluster)
    }

    /// The flag of the upstream's answer to this request: `DI` when a delay was injected,
    /// else `URX` when its status was one to retry and the retries ran out (Envoy's
    /// `UpstreamRetryLimitExceeded` on a passed-on response).
    pub fn upstream_flag(&self, status: u16, retries: u32) -> Flag {
        if self.delay.is_some() {
            Flag::DelayInjected
        } else if self.forward.retries.exhausted_on(status, retries) {
            Flag::UpstreamRetryLimitExceeded
        } else {
            Flag::None
        }
    }

    pub fn response_additions(&self) -> ResponseAdditions {
        let cors = match (&self.cors_origin, self.route.cors.as_ref()) {
            (Some(origin), Some(policy)) => CorsFields::for_response(policy, origin.clone()),
            _ => CorsFields::default(),
        };
        ResponseAdditions {
            cors,
            policy: self.policy,
            authz: self.authz_fields.clone(),
            set_cookie: self.set_cookie.clone(),
        }
    }
}

/// A forward plan the codec that carries it out owns: pingora's request cycle keeps
/// these in its context, and the fast codecs hand them over with a request they planned
/// and cannot carry (`protocol::lend::Handover`).
pub struct OwnedForward {
    pub route: Arc<Route>,
    pub match_index: usize,
    pub destination: usize,
    pub delay: Option<Duration>,
    pub additions: ResponseAdditions,
    pub hash: Option<u64>,
    pub auth: Option<Box<UpstreamEdits>>,
    pub principal: Option<Box<str>>,
    pub slot: Option<crate::listener::RequestSlot>,
    /// The mirrors drawn for this request ([`Forwarded::mirrors`]).
    pub mirrors: Vec<Arc<crate::upstream::Cluster>>,
}

impl Forwarded<'_> {
    /// The plan, owned; the mirrors are drawn here.
    pub fn into_owned(mut self) -> OwnedForward {
        OwnedForward {
            additions: self.response_additions(),
            mirrors: self.mirrors().cloned().collect(),
            route: self.route.clone(),
            match_index: self.match_index,
            destination: self.destination,
            delay: self.delay,
            hash: self.hash,
            auth: self.auth.take(),
            principal: self.principal.take(),
            slot: self.slot.take(),
        }
    }
}

/// A policed plan, owned ([`Answer`], [`OwnedForward`]).
pub enum OwnedPlan {
    Answer(Box<Answer>),
    Forward(Box<OwnedForward>),
}

impl From<Plan<'_>> for OwnedPlan {
    fn from(plan: Plan<'_>) -> OwnedPlan {
        match plan {
            Plan::Answer(a) => OwnedPlan::Answer(a),
            Plan::Forward(f) => OwnedPlan::Forward(Box::new(f.into_owned())),
        }
    }
}

/// The fields the core adds to a forwarded request's response, replacing the upstream's
/// of the same names: CORS, then the policies' (RateLimit), then the external
/// authorizer's (`headersToDownstreamOnAllow`); and, appended (the upstream's own stay),
/// the `Set-Cookie` of a consistent-hash cookie the gateway made.
#[derive(Default)]
pub struct ResponseAdditions {
    pub cors: CorsFields,
    pub policy: policy::Fields,
    pub authz: Vec<(HeaderName, HeaderValue)>,
    pub set_cookie: Option<HeaderValue>,
}

impl ResponseAdditions {
    /// Whether the additions replace a field `name` of the upstream's.
    pub fn replaces(&self, name: &[u8]) -> bool {
        self.cors
            .iter()
            .any(|(n, _)| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
            || self.policy.writes(name)
            || self
                .authz
                .iter()
                .any(|(n, _)| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
    }

    /// The fields, in order.
    pub fn write(&self, out: &mut impl HeaderSink) {
        for (n, v) in self.cors.iter() {
            out.field(n.as_str().as_bytes(), v.as_bytes());
        }
        self.policy.write(|n, v| out.field(n.as_bytes(), v));
        for (n, v) in &self.authz {
            out.field(n.as_str().as_bytes(), v.as_bytes());
        }
        if let Some(c) = &self.set_cookie {
            out.appended(b"set-cookie", c.as_bytes());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cors.iter().next().is_none()
            && self.policy.is_empty()
            && self.authz.is_empty()
            && self.set_cookie.is_none()
    }
}

/// CORS response fields, at most five.
#[derive(Default)]
pub struct CorsFields {
    fields: [Option<(HeaderName, HeaderValue)>; 5],
}

impl CorsFields {
    fn push(&mut self, name: HeaderName, value: HeaderValue) {
        if let Some(slot) = self.fields.iter_mut().find(|f| f.is_none()) {
            *slot = Some((name, value));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.fields.iter().flatten().map(|(n, v)| (n, v))
    }

    /// The fields of an allowed preflight (`OPTIONS` with
    /// `access-control-request-method` from an origin the policy allows), or `None`.
    fn preflight(cors: &Cors, view: &RequestView<'_>) -> Option<CorsFields> {
        if view.method != "OPTIONS" || view.headers.get("access-control-request-method").is_none() {
            return None;
        }
        let origin = view.headers.get("origin")?;
        if !cors.allows(origin) {
            return None;
        }
        let mut f = CorsFields::default();
        f.push(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_str(origin).ok()?,
        );
        if let Some(v) = &cors.allow_methods {
            f.push(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        if let Some(v) = &cors.allow_headers {
            f.push(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &cors.max_age {
            f.push(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if cors.allow_credentials {
            f.push(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Some(f)
    }

    /// The fields a forwarded response gets for allowed origin `origin`.
    pub fn for_response(cors: &Cors, origin: HeaderValue) -> CorsFields {
        let mut f = CorsFields::default();
        f.push(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if let Some(v) = &cors.expose_headers {
            f.push(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        if cors.allow_credentials {
            f.push(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        f
    }
}

/// The origin of the request when `cors` allows it.
fn allowed_origin(cors: &Cors, view: &RequestView<'_>) -> Option<HeaderValue> {
    let origin = view.headers.get("origin")?;
    cors.allows(origin)
        .then(|| HeaderValue::from_str(origin).ok())
        .flatten()
}

/// The answer to a request no route takes: 404, `NR`.
pub fn not_found() -> Answer {
    Answer {
        status: 404,
        body: Bytes::new(),
        location: None,
        cors: CorsFields::default(),
        response_ops: false,
        delay: None,
        flag: Flag::NoRoute,
        details: Details::RouteNotFound,
        route: None,
        policy: policy::Fields::NONE,
        www_authenticate: None,
        authz_fields: Vec::new(),
        principal: None,
        slot: None,
    }
}

/// Decides what becomes of a request on `listener` for (normalized) host `host`: the
/// route table's choice, then the route's policies in Envoy's order (CORS preflight,
/// fault delay, fault abort; access lists and rate limits in [`Planned::police`]). Random
/// draws (weights, fault percentages, a new consistent-hash cookie) happen here, once. Counts nothing.
pub fn plan<'s>(listener: &'s Listener, host: &str, view: &RequestView<'_>) -> Planned<'s> {
    let authz = listener.authz.as_deref();
    let caps = listener.requests.as_ref();
    let authn = listener.authn.as_deref();
    let unpoliced = |plan| Planned {
        plan,
        policy: None,
        authz,
        caps,
        authn,
    };
    // A CA validating HTTP-01 for a name Portico orders a certificate for: answered
    // before routing and before httpsRedirect (the CA asks over plain HTTP), and never
    // counted by a rate limit.
    if let (false, Some(acme)) = (listener.tls, &listener.acme) {
        if let Some(found) = acme.http01_answer(host, view.path) {
            let (status, body) = match found {
                Some(key_authorization) => (200, Bytes::from(key_authorization)),
                None => (404, Bytes::new()),
            };
            return Planned {
                plan: Plan::Answer(Box::new(Answer {
                    status,
                    body,
                    location: None,
                    cors: CorsFields::default(),
                    response_ops: false,
                    delay: None,
                    flag: Flag::None,
                    details: Details::AcmeHttp01Challenge,
                    route: None,
                    policy: policy::Fields::NONE,
                    www_authenticate: None,
                    authz_fields: Vec::new(),
                    principal: None,
                    slot: None,
                })),
                policy: None,
                authz: None,
                caps,
                authn: None,
            };
        }
    }
    let (vhost, route, match_index) = match listener.table.decide(host, view) {
        Decision::HttpsRedirect(_) => {
            let mut location = String::with_capacity(host.len() + view.path.len() + 16);
            location.push_str("https://");
            location.push_str(host);
            location.push_str(view.path);
            if let Some(q) = view.query {
                location.push('?');
                location.push_str(q);
            }
            return unpoliced(Plan::Answer(Box::new(Answer {
                status: 301,
                body: Bytes::new(),
                location: Some(location),
                cors: CorsFields::default(),
                response_ops: false,
                delay: None,
                flag: Flag::None,
                details: Details::DirectResponse,
                route: None,
                policy: policy::Fields::NONE,
                www_authenticate: None,
                authz_fields: Vec::new(),
                principal: None,
                slot: None,
            })));
        }
        Decision::NoHost | Decision::NoRoute(_) => {
            return unpoliced(Plan::Answer(Box::new(not_found())))
        }
        Decision::Route {
            vhost,
            route,
            match_index,
        } => (vhost, route, match_index),
    };
    if let Some(cors) = &route.cors {
        if let Some(fields) = CorsFields::preflight(cors, view) {
            return unpoliced(Plan::Answer(Box::new(Answer {
                status: 200,
                body: Bytes::new(),
                location: None,
                cors: fields,
                response_ops: false,
                delay: None,
                flag: Flag::None,
                details: Details::CorsResponse,
                route: Some(route.clone()),
                policy: policy::Fields::NONE,
                www_authenticate: None,
                authz_fields: Vec::new(),
                principal: None,
                slot: None,
            })));
        }
    }
    let policy = listener.policies.route(vhost, route);
    let policed = |plan| Planned {
        plan,
        policy,
        authz,
        caps,
        authn: policy.and_then(|p| p.authn.as_deref()).or(authn),
    };
    let cors_origin = route.cors.as_ref().and_then(|c| allowed_origin(c, view));
    let answer = |status: u16, body: Bytes, location: Option<String>| {
        let mut cors = CorsFields::default();
        if let Some(origin) = cors_origin.clone() {
            cors.push(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        Plan::Answer(Box::new(Answer {
            status,
            body,
            location,
            cors,
            response_ops: true,
            delay: None,
            flag: Flag::None,
            details: Details::DirectResponse,
            route: Some(route.clone()),
            policy: policy::Fields::NONE,
            www_authenticate: None,
            authz_fields: Vec::new(),
            principal: None,
            slot: None,
        }))
    };
    let forward = match &route.action {
        Action::Direct(d) => return policed(answer(d.status, d.body.clone(), None)),
        Action::Redirect(r) => {
            let location = r.location(view.scheme, view.authority, view.path, view.query);
            return policed(answer(r.code, Bytes::new(), Some(location)));
        }
        Action::Forward(f) => f,
    };
    let mut delay = None;
    if let Some(fault) = &forward.fault {
        if let Some((d, pct)) = fault.delay {
            if chance(pct) {
                delay = Some(d);
            }
        }
        if let Some((status, pct)) = fault.abort {
            if chance(pct) {
                return unpoliced(Plan::Answer(Box::new(Answer {
                    status,
                    body: Bytes::from_static(b"fault filter abort"),
                    location: None,
                    cors: CorsFields::default(),
                    response_ops: true,
                    delay,
                    flag: Flag::FaultInjected,
                    details: Details::FaultFilterAbort,
                    route: Some(route.clone()),
                    policy: policy::Fields::NONE,
                    www_authenticate: None,
                    authz_fields: Vec::new(),
                    principal: None,
                    slot: None,
                })));
            }
        }
    }
    let destination = forward.pick();
    let cluster = &forward.destinations[destination].cluster;
    let (hash, set_cookie) = match cluster.policy.hash_source() {
        Some(source) => hash_key(source, view),
        None => (None, None),
    };
    policed(Plan::Forward(Forwarded {
        route,
        forward,
        match_index,
        destination,
        hash,
        set_cookie,
        delay,
        cors_origin,
        policy: policy::Fields::NONE,
        auth: None,
        principal: None,
        slot: None,
        authz_fields: Vec::new(),
    }))
}

/// The fields of answer `a`'s head, as every codec writes them: content type and length
/// (the body's, for HEAD too), `location`, the CORS fields, the policies' fields
/// (`x-envoy-ratelimited`, RateLimit), then the route's response operations (which may
/// replace any of them).
pub fn answer_fields(a: &Answer, out: &mut impl HeaderSink) {
    let none = HeaderOps::default();
    let ops = a.ops().unwrap_or(&none);
    let by_ops = |name: &[u8]| {
        ops.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
            || ops
                .remove
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
    };
    let replaced = |name: &[u8]| {
        by_ops(name)
            || a.authz_fields
                .iter()
                .any(|(n, _)| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
    };
    let mut digits = [0u8; 20];
    if !a.body.is_empty() && !replaced(b"content-type") {
        out.field(b"content-type", b"text/plain");
    }
    if !replaced(b"content-length") {
        out.field(b"content-length", decimal(a.body.len(), &mut digits));
    }
    if let Some(l) = &a.location {
        if !replaced(b"location") {
            out.field(b"location", l.as_bytes());
        }
    }
    for (n, v) in a.cors.iter() {
        if !replaced(n.as_str().as_bytes()) {
            out.field(n.as_str().as_bytes(), v.as_bytes());
        }
    }
    a.policy.write(|n, v| {
        if !replaced(n.as_bytes()) {
            out.field(n.as_bytes(), v);
        }
    });
    if let Some(v) = &a.www_authenticate {
        if !replaced(b"www-authenticate") {
            out.field(b"www-authenticate", v.as_bytes());
        }
    }
    for (n, v) in &a.authz_fields {
        if !by_ops(n.as_str().as_bytes()) {
            out.field(n.as_str().as_bytes(), v.as_bytes());
        }
    }
    for (name, value) in ops.set.iter().chain(&ops.add) {
        out.field(name, value.as_bytes());
    }
}

/// `n` in decimal, written into `buf`.
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A reply the gateway makes itself (a refusal, no route, a failure upstream): the same
/// status line, fields and body from every codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalReply<'a> {
    pub status: u16,
    /// One line of text (the body is it and a newline); empty for no body.
    pub what: &'a str,
    /// The client's connection closes after it (HTTP/1.1: `connection: close`).
    pub close: bool,
}

impl LocalReply<'_> {
    /// The body's length.
    pub fn body_len(&self) -> usize {
        if self.what.is_empty() {
            0
        } else {
            self.what.len() + 1
        }
    }

    /// The reply as HTTP/1.1 bytes into `out` (no body for a HEAD request).
    pub fn write_h1(&self, out: &mut Vec<u8>, head: bool) {
        use std::io::Write as _;
        let reason = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", self.status);
        let len = self.body_len();
        if len > 0 {
            out.extend_from_slice(b"content-type: text/plain\r\n");
        }
        let _ = write!(out, "content-length: {len}\r\n");
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if len > 0 && !head {
            out.extend_from_slice(self.what.as_bytes());
            out.push(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ops(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderOps {
        HeaderOps {
            set: set
                .iter()
                .map(|(n, v)| (Bytes::copy_from_slice(n.as_bytes()), v.parse().unwrap()))
                .collect(),
            add: add
                .iter()
                .map(|(n, v)| (Bytes::copy_from_slice(n.as_bytes()), v.parse().unwrap()))
                .collect(),
            remove: remove.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn run(
        client: &[(&str, &str)],
        route: &HeaderOps,
        dest: &HeaderOps,
        id: Option<&str>,
    ) -> String {
        run_upgrade(client, route, dest, id, false)
    }

    fn run_upgrade(
        client: &[(&str, &str)],
        route: &HeaderOps,
        dest: &HeaderOps,
        id: Option<&str>,
        upgrade: bool,
    ) -> String {
        let f = Forwarding {
            scheme: b"https",
            client_ip: Some("10.0.0.1".parse().unwrap()),
            request_id: id.map(str::as_bytes),
            host: None,
            ops: [route, dest],
            upgrade,
            span: None,
            client_cert: ClientCert::default(),
            auth: None,
        };
        let mut out = Vec::new();
        upstream_request_headers(
            || client.iter().map(|(n, v)| (*n, v.as_bytes())),
            &f,
            &mut out,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn operations_replace_remove_and_add_in_route_then_destination_order() {
        let route = ops(
            &[("x-a", "route"), ("x-b", "route")],
            &[("x-c", "1")],
            &["x-gone"],
        );
        let dest = ops(&[("x-b", "dest")], &[], &["x-c"]);
        let got = run(
            &[
                ("Host", "h"),
                ("X-A", "client"),
                ("x-gone", "1"),
                ("Connection", "keep-alive"),
            ],
            &route,
            &dest,
            None,
        );
        assert_eq!(
            got,
            "Host: h\r\nx-a: route\r\nx-b: dest\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n"
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_stay_behind() {
        let none = HeaderOps::default();
        let got = run(
            &[
                ("Host", "h"),
                ("Connection", "keep-alive, X-Private"),
                ("x-private", "1"),
                ("Proxy-Authorization", "Basic eDp5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("HTTP2-Settings", "AAMA"),
                ("Keep-Alive", "timeout=5"),
                ("x-kept", "1"),
            ],
            &none,
            &none,
            None,
        );
        assert_eq!(
            got,
            "Host: h\r\nx-kept: 1\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n"
        );
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_and_drops_the_rest_of_the_hop() {
        let none = HeaderOps::default();
        let client = [
            ("Host", "h"),
            ("Connection", "keep-alive, Upgrade, x-private"),
            ("Upgrade", "websocket"),
            ("x-private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Sec-WebSocket-Key", "k"),
        ];
        assert_eq!(
            run_upgrade(&client, &none, &none, None, true),
            "Host: h\r\nconnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n"
        );
        assert_eq!(
            run_upgrade(&client, &none, &none, None, false),
            "Host: h\r\nSec-WebSocket-Key: k\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n",
            "no upgrade asked for: the hop's fields stay behind"
        );
    }

    #[test]
    fn forwarded_fields_the_request_id_and_what_routes_do_to_them() {
        let none = HeaderOps::default();
        let client = [
            ("Host", "h"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("X-Forwarded-Proto", "spoofed"),
        ];
        assert_eq!(
            run(&client, &none, &none, Some("id-1")),
            "Host: h\r\nx-request-id: id-1\r\nx-forwarded-proto: https\r\nx-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.1\r\n"
        );
        let remove = ops(&[], &[], &["x-forwarded-for", "x-request-id"]);
        assert_eq!(
            run(&client, &remove, &none, Some("id-1")),
            "Host: h\r\nx-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.1\r\n",
            "remove drops what the client claimed, not the address Portico saw"
        );
        let set = ops(
            &[
                ("x-forwarded-for", "set"),
                ("x-forwarded-proto", "p"),
                ("x-request-id", "r"),
            ],
            &[],
            &[],
        );
        assert_eq!(
            run(&client, &set, &none, Some("id-1")),
            "Host: h\r\nx-forwarded-for: set\r\nx-forwarded-proto: p\r\nx-request-id: r\r\n",
            "a set gives one field with the route's value"
        );
    }

    #[test]
    fn the_client_address_is_the_entry_the_trusted_proxies_name() {
        let mut h = http::HeaderMap::new();
        h.append(
            "x-forwarded-for",
            "198.51.100.1, 198.51.100.2".parse().unwrap(),
        );
        h.append("x-forwarded-for", " 198.51.100.3".parse().unwrap());
        let peer = Some("10.0.0.7".parse().unwrap());
        let at = |h: &http::HeaderMap, n| {
            remote_address(n, peer, crate::routing::Headers::Map(h)).map(|ip| ip.to_string())
        };
        assert_eq!(at(&h, 0).as_deref(), Some("10.0.0.7"));
        assert_eq!(at(&h, 1).as_deref(), Some("198.51.100.3"));
        assert_eq!(at(&h, 2).as_deref(), Some("198.51.100.2"));
        assert_eq!(at(&h, 3).as_deref(), Some("198.51.100.1"));
        assert_eq!(
            at(&h, 4).as_deref(),
            Some("10.0.0.7"),
            "fewer entries: the peer"
        );
        h.insert("x-forwarded-for", "unknown".parse().unwrap());
        assert_eq!(
            at(&h, 1).as_deref(),
            Some("10.0.0.7"),
            "not an address: the peer"
        );
        h.insert("x-forwarded-for", "::ffff:192.0.2.9".parse().unwrap());
        assert_eq!(at(&h, 1).as_deref(), Some("192.0.2.9"));
    }

    #[test]
    fn local_replies_read_the_same_everywhere() {
        let mut out = Vec::new();
        LocalReply {
            status: 503,
            what: "no healthy upstream",
            close: true,
        }
        .write_h1(&mut out, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 20\r\nconnection: close\r\n\r\nno healthy upstream\n"
        );
        let mut out = Vec::new();
        LocalReply {
            status: 404,
            what: "",
            close: false,
        }
        .write_h1(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
