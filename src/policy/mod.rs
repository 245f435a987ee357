//! Policy: what a request may do before it is forwarded — rate limits counted here
//! (`local`) or in Redis (`global`), and access lists (`access`). Owns the compiled
//! policies of a Snapshot, their counters and buckets, and the Redis connections. Never
//! parses config (the compile step hands it typed rules), never reads a socket of a
//! client, and never answers a request itself: it returns a [`Decision`] that the request
//! core turns into a reply (or lets through), the same for every codec.
//!
//! The request core (`proxy::request`) calls, per request, after routing:
//! 1. [`RoutePolicies::route`] of the listener with the routed virtual host and route (a
//!    hash lookup on two pointers; `None` when no policy targets the route — the usual
//!    case costs one branch);
//! 2. [`RoutePolicy::decide`]: the access lists, then the local rules (`Limits::check`:
//!    synchronous, no allocation for a key already seen), and, when those let the request
//!    through and the route has global rules, `GlobalLimits::check` (one pipelined Redis
//!    round trip, awaited; no lock is held across it);
//! 3. answers a refusal with [`Decision::status`], [`Decision::body`] and
//!    [`Decision::fields`], or adds the fields of the allowed decision to the answer or
//!    the upstream's response.

pub mod access;
pub mod authz;
pub mod ext_authz;
pub mod global;
pub mod jwks;
pub mod jwt;
pub mod local;
pub mod selector;

use std::net::IpAddr;
use std::sync::Arc;

use crate::routing::{Headers, Route, VirtualHost};
use crate::telemetry::outcome::{Details, Flag};

pub use access::AccessList;
pub use global::{GlobalLimits, GlobalRule, RedisLimiter};
pub use local::{Limits, LocalRule};

/// What the policies may look at in a request. Borrowed; built once per request by the
/// core from what it already has.
#[derive(Clone, Copy)]
pub struct RequestKeys<'a> {
    /// The client's address as the core trusts it (Istio's `remote.ip`: the peer, or the
    /// `X-Forwarded-For` entry `numTrustedProxies` points at). `None`: no sourceCIDR
    /// selector matches, and an IP access list does not list the request.
    pub client_ip: Option<IpAddr>,
    /// The connection's peer address (Istio's `source.ip`).
    pub peer_ip: Option<IpAddr>,
    pub headers: Headers<'a>,
    /// The normalized path, without the query.
    pub path: &'a str,
    pub method: &'a str,
    /// The Host / `:authority` as sent (with its port, if any).
    pub authority: &'a str,
    /// The port of the listener the request arrived on (`destination.port`).
    pub port: u16,
    /// The TLS server name the client sent (`connection.sni`).
    pub sni: Option<&'a str>,
    /// The verified client certificate's identity (`source.principal`, such as
    /// `cluster.local/ns/foo/sa/bar`), when the client presented one.
    pub peer_principal: Option<&'a str>,
    /// `iss/sub` of the request's verified JWT, if any.
    pub principal: Option<&'a str>,
    /// The claims of the request's verified JWT, if any.
    pub claims: Option<&'a (dyn Claims + Sync)>,
}

/// A verified JWT's claims (`jwt::Verified` is the one implementation).
pub trait Claims {
    /// A string claim's value by name; `a.b` names a nested claim when no claim is named
    /// `a.b`. Lists, numbers and booleans are `None` here (see `any_value`).
    fn claim(&self, name: &str) -> Option<&str>;

    /// Whether `f` holds for a value of the claim at `path` (nested names outermost
    /// first: `request.auth.claims[a][b]` is `["a", "b"]`): for each element of a list
    /// claim, for a string claim (each word of a space-delimited `scope` or `permission`),
    /// and for a number or boolean as JSON writes it. Stops at the first that holds.
    fn any_value(&self, path: &[&str], f: &mut dyn FnMut(&str) -> bool) -> bool {
        match path {
            [name] => self.claim(name).is_some_and(f),
            _ => false,
        }
    }
}

/// How a decision came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No rule or list applied to the request.
    Unlimited,
    Allowed,
    /// Over a local limit: 429 `RL`.
    LocalLimited,
    /// Over a global limit: 429 `RL`.
    GlobalLimited,
    /// Redis did not answer in time and the policy fails open: allowed.
    FailedOpen,
    /// Redis did not answer in time and the policy fails closed: `statusOnError`, `RLSE`.
    FailedClosed,
    /// Refused by an access list: its status (403 by default).
    Denied,
}

impl Outcome {
    pub fn allowed(self) -> bool {
        matches!(
            self,
            Outcome::Unlimited | Outcome::Allowed | Outcome::FailedOpen
        )
    }

    /// The `decision` label of `portico_ratelimit_decisions_total` (and of the access
    /// list counter).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Unlimited | Outcome::Allowed => "allowed",
            Outcome::LocalLimited | Outcome::GlobalLimited => "limited",
            Outcome::FailedOpen => "failed_open",
            Outcome::FailedClosed => "failed_closed",
            Outcome::Denied => "denied",
        }
    }

    /// Envoy's response flag for the access log.
    pub fn response_flag(self) -> Flag {
        match self {
            Outcome::LocalLimited | Outcome::GlobalLimited => Flag::RateLimited,
            Outcome::FailedClosed => Flag::RateLimitServiceError,
            _ => Flag::None,
        }
    }

    /// Envoy's `response_code_details` for a refusal.
    pub fn details(self) -> Details {
        match self {
            Outcome::LocalLimited => Details::LocalRateLimited,
            Outcome::GlobalLimited => Details::RequestRateLimited,
            Outcome::FailedClosed => Details::RateLimiterError,
            Outcome::Denied => Details::AccessListDenied,
            _ => Details::None,
        }
    }
}

/// The IETF RateLimit fields of a decision (draft-ietf-httpapi-ratelimit-headers, the
/// `RateLimit-Limit` / `-Remaining` / `-Reset` / `-Policy` form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// Requests per window.
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the quota is back (allowed) or a request would be allowed (limited).
    pub reset: u32,
    /// The window, in seconds (`Second` is 1, `Day` 86400).
    pub window: u32,
}

/// What the policies decided for a request, and what its answer needs.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'p> {
    pub outcome: Outcome,
    /// The rule or list that decided (`rule` label): the one that refused, or among those
    /// that allowed the one with the fewest requests left. Empty when none applied.
    pub rule: &'p str,
    /// The refusal's status: 429, the policy's `statusOnError`, or the list's status.
    pub status: u16,
    /// The refusal's body (empty for none).
    pub body: &'p str,
    /// `None` when no limit applied or the policy turned the fields off.
    pub headers: Option<RateLimitHeaders>,
}

impl<'p> Decision<'p> {
    /// Nothing applied.
    pub const UNLIMITED: Decision<'static> = Decision {
        outcome: Outcome::Unlimited,
        rule: "",
        status: 200,
        body: "",
        headers: None,
    };

    pub fn allowed(&self) -> bool {
        self.outcome.allowed()
    }

    /// The decision of two checks of one request: the first refusal, else the allowed one
    /// with fewer requests left (its fields are the ones the client should heed).
    pub fn and(self, other: Decision<'p>) -> Decision<'p> {
        if !self.allowed() {
            return self;
        }
        if !other.allowed() {
            return other;
        }
        match (self.headers, other.headers) {
            (_, None) => {
                if self.outcome == Outcome::Unlimited {
                    other
                } else {
                    self
                }
            }
            (None, Some(_)) => other,
            (Some(a), Some(b)) if b.remaining < a.remaining => other,
            _ => self,
        }
    }

    /// The response fields this decision adds (owned: they outlive the borrow of the
    /// Snapshot's rules, as the response comes later).
    pub fn fields(&self) -> Fields {
        Fields {
            limited: matches!(self.outcome, Outcome::LocalLimited | Outcome::GlobalLimited),
            headers: self.headers,
        }
    }

    /// `Fields::write` of [`Decision::fields`].
    pub fn response_fields(&self, field: impl FnMut(&'static str, &[u8])) {
        self.fields().write(field)
    }
}

/// The response fields of a decision: `x-envoy-ratelimited: true` on a rate-limit
/// refusal, and the RateLimit fields when the policy has them on. Every codec writes them
/// the same way (`proxy::request`), replacing an upstream's fields of the same names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fields {
    pub limited: bool,
    pub headers: Option<RateLimitHeaders>,
}

impl Fields {
    /// Nothing to add.
    pub const NONE: Fields = Fields {
        limited: false,
        headers: None,
    };

    pub fn is_empty(&self) -> bool {
        !self.limited && self.headers.is_none()
    }

    /// Whether these fields write field `name` (any case).
    pub fn writes(&self, name: &[u8]) -> bool {
        if self.limited && name.eq_ignore_ascii_case(b"x-envoy-ratelimited") {
            return true;
        }
        self.headers.is_some()
            && [
                &b"ratelimit-limit"[..],
                b"ratelimit-remaining",
                b"ratelimit-reset",
                b"ratelimit-policy",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
    }

    /// The fields, as `(name, value)`. Formats into a stack buffer: no allocation.
    pub fn write(&self, mut field: impl FnMut(&'static str, &[u8])) {
        if self.limited {
            field("x-envoy-ratelimited", b"true");
        }
        let Some(h) = self.headers else { return };
        let mut buf = itoa::Buffer::new();
        field("ratelimit-limit", buf.format(h.limit).as_bytes());
        field("ratelimit-remaining", buf.format(h.remaining).as_bytes());
        field("ratelimit-reset", buf.format(h.reset).as_bytes());
        let mut policy = [0u8; 24];
        let limit = buf.format(h.limit).as_bytes();
        let mut n = limit.len();
        policy[..n].copy_from_slice(limit);
        policy[n..n + 3].copy_from_slice(b";w=");
        n += 3;
        let window = buf.format(h.window).as_bytes();
        policy[n..n + window.len()].copy_from_slice(window);
        n += window.len();
        field("ratelimit-policy", &policy[..n]);
    }
}

/// The policies that apply to one route (on one virtual host of one listener).
#[derive(Default)]
pub struct RoutePolicy {
    /// RequestAuthentication's JWT rules: checked first (`Planned::police`), and a
    /// verified token's principal and claims are what the other policies see.
    pub authn: Option<Arc<jwt::Authn>>,
    /// Access lists, in the order written: the first refusal answers.
    pub access: Vec<Arc<AccessList>>,
    pub local: Limits,
    pub global: Option<GlobalLimits>,
}

impl RoutePolicy {
    /// The access lists' decision: the first list that refuses, else allowed.
    pub fn access(&self, keys: &RequestKeys<'_>) -> Decision<'_> {
        let mut out = Decision::UNLIMITED;
        for list in &self.access {
            let d = list.check(keys);
            if !d.allowed() {
                return d;
            }
            out = out.and(d);
        }
        out
    }

    /// `Limits::check` of the local rules.
    pub fn local(&self, keys: &RequestKeys<'_>) -> Decision<'_> {
        self.local.check(keys)
    }

    /// The global rules, when there are any.
    pub fn global(&self) -> Option<&GlobalLimits> {
        self.global.as_ref()
    }

    /// The policies' decision for a request, counting it: the access lists first (a
    /// refused request is not counted against any limit, as Envoy's RBAC filter runs before
    /// its rate limit filters), then the local rules, then — only when those let it through
    /// — the global rules in one Redis round trip. The wait for Redis borrows nothing but
    /// `self` and `keys`, and no lock is held across it.
    pub async fn decide(&self, keys: &RequestKeys<'_>) -> Decision<'_> {
        let d = self.access(keys);
        if !d.allowed() {
            return d;
        }
        let d = d.and(self.local(keys));
        if !d.allowed() {
            return d;
        }
        match &self.global {
            // Boxed: the Redis round trip's state is KiBs that every request's future
            // would otherwise carry (and copy) whether or not its route has global rules.
            Some(g) => d.and(Box::pin(g.check(keys)).await),
            None => d,
        }
    }
}

/// The policies of one listener's routes, by the addresses of the virtual host and the
/// route (both held by the listener's route table, so the addresses stay theirs while
/// this lives).
#[derive(Default)]
pub struct RoutePolicies {
    routes: foldhash::HashMap<(usize, usize), Arc<RoutePolicy>>,
}

impl RoutePolicies {
    pub fn new(routes: foldhash::HashMap<(usize, usize), Arc<RoutePolicy>>) -> RoutePolicies {
        RoutePolicies { routes }
    }

    /// The policies of the route `route` of virtual host `vhost`, as routing decided them
    /// (`routing::Decision::Route`). `None`: nothing applies.
    pub fn route(&self, vhost: &Arc<VirtualHost>, route: &Arc<Route>) -> Option<&RoutePolicy> {
        if self.routes.is_empty() {
            return None;
        }
        self.routes
            .get(&route_key(vhost, route))
            .map(|p| p.as_ref())
    }

    /// Routes with a policy.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl std::fmt::Debug for RoutePolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RoutePolicies({} routes)", self.routes.len())
    }
}

/// The compiled policies of one Snapshot that are not a route's (those are each
/// listener's, `snapshot::Listener::policies`).
#[derive(Default)]
pub struct Policies {
    /// Every access list by `namespace/name`, targeted or not (for AuthorizationPolicy-
    /// style rules that name one, and for the refresher).
    lists: std::collections::BTreeMap<String, Arc<AccessList>>,
    /// Every global rule's Redis, when `mesh.redis` is set.
    pub redis: Option<Arc<RedisLimiter>>,
    /// Every `jwksUri` of the RequestAuthentications (the JWKS refresher fetches them).
    pub jwks: Vec<Arc<jwks::RemoteJwks>>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("lists", &self.lists.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Policies {
    pub fn new(
        lists: std::collections::BTreeMap<String, Arc<AccessList>>,
        redis: Option<Arc<RedisLimiter>>,
    ) -> Policies {
        Policies {
            lists,
            redis,
            jwks: Vec::new(),
        }
    }

    /// An access list by `namespace/name`.
    pub fn access_list(&self, key: &str) -> Option<&Arc<AccessList>> {
        self.lists.get(key)
    }

    /// Every access list (the refresher keeps their files and URLs read).
    pub fn access_lists(&self) -> impl Iterator<Item = &Arc<AccessList>> {
        self.lists.values()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty() && self.redis.is_none() && self.jwks.is_empty()
    }
}

/// The key of a (virtual host, route) pair in [`Policies`].
pub fn route_key(vhost: &Arc<VirtualHost>, route: &Arc<Route>) -> (usize, usize) {
    (
        Arc::as_ptr(vhost) as *const () as usize,
        Arc::as_ptr(route) as *const () as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_fields_are_written_without_allocating_strings() {
        let d = Decision {
            outcome: Outcome::LocalLimited,
            rule: "r",
            status: 429,
            body: "",
            headers: Some(RateLimitHeaders {
                limit: 100,
                remaining: 0,
                reset: 7,
                window: 60,
            }),
        };
        let mut got = Vec::new();
        d.response_fields(|n, v| got.push(format!("{n}: {}", String::from_utf8_lossy(v))));
        assert_eq!(
            got,
            [
                "x-envoy-ratelimited: true",
                "ratelimit-limit: 100",
                "ratelimit-remaining: 0",
                "ratelimit-reset: 7",
                "ratelimit-policy: 100;w=60",
            ]
        );
    }

    #[test]
    fn decisions_combine_to_the_first_refusal_or_the_tightest_allowance() {
        let h = |remaining| {
            Some(RateLimitHeaders {
                limit: 10,
                remaining,
                reset: 1,
                window: 1,
            })
        };
        let allow = |rule, remaining| Decision {
            outcome: Outcome::Allowed,
            rule,
            status: 200,
            body: "",
            headers: h(remaining),
        };
        let deny = Decision {
            outcome: Outcome::GlobalLimited,
            rule: "g",
            status: 429,
            body: "",
            headers: h(0),
        };
        assert_eq!(allow("a", 5).and(allow("b", 3)).rule, "b");
        assert_eq!(allow("a", 2).and(allow("b", 3)).rule, "a");
        assert_eq!(allow("a", 2).and(deny).rule, "g");
        assert_eq!(Decision::UNLIMITED.and(allow("a", 2)).rule, "a");
        assert_eq!(allow("a", 2).and(Decision::UNLIMITED).rule, "a");
    }
}
