//! Authorization: Istio's AuthorizationPolicy (Envoy's RBAC filter as Istio configures
//! it), compiled. Owns the typed rules of the policies that apply to one listener and
//! decides a request in Istio's order: a matching DENY policy refuses; with no ALLOW
//! policy the request passes; a matching ALLOW policy lets it pass; otherwise it is
//! refused. AUDIT policies only mark a request. Dry-run policies are evaluated the same
//! way (Envoy's shadow rules), counted and logged, never enforced. Looks at a request's
//! borrowed attributes only ([`RequestKeys`]): no parsing, no allocation but for a
//! header sent more than once.
//!
//! CUSTOM policies come first ([`Authorization::custom`]): for each external authorizer
//! (`policy::ext_authz`) whose policies match the request, the authorizer is asked, and
//! a denial or a failed check refuses the request before DENY and ALLOW are looked at.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use ipnet::IpNet;
use prometheus::IntCounter;

use super::ext_authz::{self, Provider};
use super::RequestKeys;
use crate::routing::RequestView;
use crate::telemetry::Metrics;

/// Istio's string match: exact, `abc*` prefix, `*abc` suffix, `*` presence (non-empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrPat {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StrPat {
    pub fn parse(text: &str) -> StrPat {
        if text == "*" {
            StrPat::Presence
        } else if let Some(p) = text.strip_suffix('*') {
            StrPat::Prefix(p.into())
        } else if let Some(s) = text.strip_prefix('*') {
            StrPat::Suffix(s.into())
        } else {
            StrPat::Exact(text.into())
        }
    }

    /// The pattern lower-cased, for [`StrPat::matches_ignore_case`].
    pub fn lowercase(self) -> StrPat {
        match self {
            StrPat::Exact(e) => StrPat::Exact(e.to_ascii_lowercase().into()),
            StrPat::Prefix(e) => StrPat::Prefix(e.to_ascii_lowercase().into()),
            StrPat::Suffix(e) => StrPat::Suffix(e.to_ascii_lowercase().into()),
            StrPat::Presence => StrPat::Presence,
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrPat::Exact(e) => v == &**e,
            StrPat::Prefix(p) => v.starts_with(&**p),
            StrPat::Suffix(s) => v.ends_with(&**s),
            StrPat::Presence => !v.is_empty(),
        }
    }

    /// Against a lower-cased pattern, ignoring the case of `v`.
    pub fn matches_ignore_case(&self, v: &str) -> bool {
        let (v, n) = (v.as_bytes(), |p: &str| p.len());
        match self {
            StrPat::Exact(e) => v.eq_ignore_ascii_case(e.as_bytes()),
            StrPat::Prefix(p) => v.len() >= n(p) && v[..n(p)].eq_ignore_ascii_case(p.as_bytes()),
            StrPat::Suffix(s) => {
                v.len() >= n(s) && v[v.len() - n(s)..].eq_ignore_ascii_case(s.as_bytes())
            }
            StrPat::Presence => !v.is_empty(),
        }
    }
}

/// One segment of an Istio path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Literal(Box<str>),
    /// `{*}`: exactly one segment.
    One,
    /// `{**}` (last only): one or more segments.
    Rest,
}

/// A `paths` entry: a string match, or a template with `{*}` and `{**}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPat {
    Str(StrPat),
    Template(Box<[Seg]>),
}

impl PathPat {
    pub fn parse(text: &str) -> Result<PathPat, String> {
        if !text.contains('{') && !text.contains('}') {
            return Ok(PathPat::Str(StrPat::parse(text)));
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("{text:?}: a path template must start with /"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segs = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            segs.push(match *p {
                "{*}" => Seg::One,
                "{**}" if i + 1 == parts.len() => Seg::Rest,
                "{**}" => return Err(format!("{text:?}: {{**}} may only be the last segment")),
                p if p.contains(['{', '}', '*']) => {
                    return Err(format!(
                    "{text:?}: a template segment is literal text, {{*}} or {{**}} ({p:?} is none)"
                ))
                }
                p => Seg::Literal(p.into()),
            });
        }
        Ok(PathPat::Template(segs.into()))
    }

    pub fn matches(&self, path: &str) -> bool {
        let segs = match self {
            PathPat::Str(s) => return s.matches(path),
            PathPat::Template(t) => t,
        };
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        for (i, seg) in segs.iter().enumerate() {
            if *seg == Seg::Rest {
                return !rest.is_empty();
            }
            let (part, after) = match rest.split_once('/') {
                Some((p, a)) => (p, Some(a)),
                None => (rest, None),
            };
            let ok = match seg {
                Seg::Literal(l) => part == &**l,
                Seg::One => !part.is_empty(),
                Seg::Rest => true,
            };
            if !ok {
                return false;
            }
            let last = i + 1 == segs.len();
            match after {
                Some(a) if !last => rest = a,
                Some(_) => return false,
                None => return last,
            }
        }
        true
    }
}

/// A list and its `not` list: the value must match one of `any` (when there is one) and
/// none of `not`. A missing attribute matches no `any` and so no `not` either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    pub any: Vec<T>,
    pub not: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            any: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    pub fn is_empty(&self) -> bool {
        self.any.is_empty() && self.not.is_empty()
    }

    /// Whether the field holds for an attribute, `test` telling whether one entry matches
    /// it (false for a missing attribute).
    fn holds(&self, test: impl Fn(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&test)) && !self.not.iter().any(&test)
    }
}

fn in_nets(nets: &IpNet, ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| nets.contains(&ip.to_canonical()))
}

fn str_is(p: &StrPat, v: Option<&str>) -> bool {
    v.is_some_and(|v| p.matches(v))
}

/// `rules[].from[].source`: every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Field<StrPat>,
    pub request_principals: Field<StrPat>,
    pub namespaces: Field<StrPat>,
    pub ip_blocks: Field<IpNet>,
    pub remote_ip_blocks: Field<IpNet>,
}

impl Source {
    fn matches(&self, k: &RequestKeys<'_>) -> bool {
        self.principals.holds(|p| str_is(p, k.peer_principal))
            && self.request_principals.holds(|p| str_is(p, k.principal))
            && self
                .namespaces
                .holds(|p| str_is(p, k.peer_principal.and_then(namespace_of)))
            && self.ip_blocks.holds(|n| in_nets(n, k.peer_ip))
            && self.remote_ip_blocks.holds(|n| in_nets(n, k.client_ip))
    }
}

/// The namespace of a SPIFFE-style peer identity `<trust domain>/ns/<ns>/sa/<sa>`.
pub fn namespace_of(principal: &str) -> Option<&str> {
    let principal = principal.strip_prefix("spiffe://").unwrap_or(principal);
    let mut parts = principal.split('/');
    parts.next()?;
    (parts.next()? == "ns").then_some(())?;
    parts.next().filter(|n| !n.is_empty())
}

/// `rules[].to[].operation`: every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    /// Lower-cased; matched against the Host / `:authority` as sent, ignoring case.
    pub hosts: Field<StrPat>,
    pub ports: Field<u16>,
    pub methods: Field<StrPat>,
    pub paths: Field<PathPat>,
}

impl Operation {
    fn matches(&self, k: &RequestKeys<'_>) -> bool {
        self.hosts.holds(|p| p.matches_ignore_case(k.authority))
            && self.ports.holds(|p| *p == k.port)
            && self.methods.holds(|p| p.matches(k.method))
            && self.paths.holds(|p| p.matches(k.path))
    }
}

/// What a `when` condition looks at (Istio's attribute names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// `request.headers[name]` (lower-case).
    Header(Box<str>),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    /// `request.auth.claims[a][b]`: the claim's path.
    Claim(Box<[String]>),
    DestinationPort,
    ConnectionSni,
}

impl Attr {
    /// The attribute a `when` key names, or why not.
    pub fn parse(key: &str) -> Result<Attr, String> {
        let inside = |prefix: &str| {
            key.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(']'))
                .filter(|n| !n.is_empty())
        };
        Ok(match key {
            "source.ip" => Attr::SourceIp,
            "remote.ip" => Attr::RemoteIp,
            "source.namespace" => Attr::SourceNamespace,
            "source.principal" => Attr::SourcePrincipal,
            "request.auth.principal" => Attr::RequestPrincipal,
            "request.auth.audiences" => Attr::RequestAudiences,
            "request.auth.presenter" => Attr::RequestPresenter,
            "destination.port" => Attr::DestinationPort,
            "connection.sni" => Attr::ConnectionSni,
            "destination.ip" | "source.serviceAccount" | "source.trustDomain" => {
                return Err(format!("{key} is not supported by Portico"))
            }
            k if k.starts_with("experimental.envoy.filters.") => {
                return Err(format!("{key} is not supported by Portico"))
            }
            _ => {
                if let Some(h) = inside("request.headers[") {
                    Attr::Header(h.to_ascii_lowercase().into())
                } else if let Some(c) = inside("request.auth.claims[") {
                    // `[a][b]` is the nested claim a.b.
                    let path: Vec<String> = c.split("][").map(str::to_string).collect();
                    if path.iter().any(|p| p.is_empty() || p.contains(['[', ']'])) {
                        return Err(format!("{key:?}: a claim is request.auth.claims[NAME] or request.auth.claims[NAME][NESTED]"));
                    }
                    Attr::Claim(path.into())
                } else {
                    return Err(format!(
                        "{key:?} is not a condition key Portico knows (request.headers[NAME], source.ip, remote.ip, source.namespace, source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[NAME], destination.port, connection.sni)"
                    ));
                }
            }
        })
    }

    fn ips(&self) -> bool {
        matches!(self, Attr::SourceIp | Attr::RemoteIp)
    }
}

/// A condition's values, typed by its attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Values {
    Str(Field<StrPat>),
    Ip(Field<IpNet>),
    Port(Field<u16>),
}

/// One `when` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub attr: Attr,
    pub values: Values,
}

impl Condition {
    /// Compiles `key` with `values` and `not_values` (each parsed by the attribute's type).
    pub fn new(key: &str, values: &[String], not_values: &[String]) -> Result<Condition, String> {
        let attr = Attr::parse(key)?;
        if values.is_empty() && not_values.is_empty() {
            return Err(format!("{key}: values or notValues must be set"));
        }
        let values = if attr.ips() {
            let nets = |l: &[String]| l.iter().map(|v| parse_net(v)).collect::<Result<_, _>>();
            Values::Ip(Field {
                any: nets(values)?,
                not: nets(not_values)?,
            })
        } else if attr == Attr::DestinationPort {
            let ports = |l: &[String]| l.iter().map(|v| parse_port(v)).collect::<Result<_, _>>();
            Values::Port(Field {
                any: ports(values)?,
                not: ports(not_values)?,
            })
        } else {
            let pats = |l: &[String]| l.iter().map(|v| StrPat::parse(v)).collect();
            Values::Str(Field {
                any: pats(values),
                not: pats(not_values),
            })
        };
        Ok(Condition { attr, values })
    }

    fn matches(&self, k: &RequestKeys<'_>) -> bool {
        match &self.values {
            Values::Ip(f) => {
                let ip = match self.attr {
                    Attr::SourceIp => k.peer_ip,
                    _ => k.client_ip,
                };
                f.holds(|n| in_nets(n, ip))
            }
            Values::Port(f) => f.holds(|p| *p == k.port),
            Values::Str(f) => match &self.attr {
                Attr::Header(name) => {
                    // Envoy matches a field sent more than once as its values joined
                    // with `,`.
                    let mut vals = k.headers.values(name).flatten();
                    let first = vals.next();
                    match vals.next() {
                        None => f.holds(|p| str_is(p, first)),
                        Some(second) => {
                            let mut joined = String::new();
                            for v in [first.unwrap_or(""), second].into_iter().chain(vals) {
                                if !joined.is_empty() {
                                    joined.push(',');
                                }
                                joined.push_str(v);
                            }
                            f.holds(|p| p.matches(&joined))
                        }
                    }
                }
                Attr::SourcePrincipal => f.holds(|p| str_is(p, k.peer_principal)),
                Attr::SourceNamespace => {
                    f.holds(|p| str_is(p, k.peer_principal.and_then(namespace_of)))
                }
                Attr::RequestPrincipal => f.holds(|p| str_is(p, k.principal)),
                Attr::ConnectionSni => f.holds(|p| str_is(p, k.sni)),
                Attr::RequestAudiences => claim_holds(f, k, &["aud"]),
                Attr::RequestPresenter => claim_holds(f, k, &["azp"]),
                Attr::Claim(path) => {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    claim_holds(f, k, &path)
                }
                _ => false,
            },
        }
    }
}

/// A claim condition: a list claim matches when one of its strings does.
fn claim_holds(f: &Field<StrPat>, k: &RequestKeys<'_>, path: &[&str]) -> bool {
    let any_value = |p: &StrPat| {
        k.claims
            .is_some_and(|c| c.any_value(path, &mut |v: &str| p.matches(v)))
    };
    f.holds(any_value)
}

pub fn parse_net(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))
}

pub fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| format!("{text:?} is not a port number"))
}

/// One rule: a source, an operation and every condition must hold (an empty list holds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    pub fn matches(&self, k: &RequestKeys<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(k)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(k)))
            && self.when.iter().all(|c| c.matches(k))
    }
}

/// `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// An external authorizer decides the requests the policy matches.
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// A CUSTOM policy's counters besides `matched` (which counts its allowed checks).
#[derive(Debug)]
struct CustomCounters {
    denied: IntCounter,
    /// A failed check that refused the request (`statusOnError`).
    error: IntCounter,
    /// A failed check that let the request through (`failOpen`).
    failed_open: IntCounter,
}

/// One compiled AuthorizationPolicy.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
    /// Per rule: Envoy's `response_code_details` when it refuses
    /// (`rbac_access_denied_matched_policy[ns[NS]-policy[NAME]-rule[I]]`).
    details: Vec<&'static str>,
    /// Per rule: its Envoy policy id (`ns[NS]-policy[NAME]-rule[I]`), for logs.
    ids: Vec<&'static str>,
    /// Counted when a rule matches (the policy's own result: denied, allowed, audited);
    /// for CUSTOM, when the authorizer allowed.
    matched: IntCounter,
    /// CUSTOM: the external authorizer, and the other results of its checks.
    provider: Option<Arc<Provider>>,
    custom: Option<CustomCounters>,
}

impl Policy {
    pub fn new(
        namespace: &str,
        name: &str,
        action: Action,
        dry_run: bool,
        rules: Vec<Rule>,
    ) -> Policy {
        let ids: Vec<&'static str> = (0..rules.len())
            .map(|i| intern(format!("ns[{namespace}]-policy[{name}]-rule[{i}]")))
            .collect();
        let details = ids
            .iter()
            .map(|id| intern(format!("rbac_access_denied_matched_policy[{id}]")))
            .collect();
        let full = format!("{namespace}/{name}");
        let result = match action {
            Action::Allow | Action::Custom => "allowed",
            Action::Deny => "denied",
            Action::Audit => "audited",
        };
        let counter = |result: &str| {
            Metrics::global().authz_decisions.with_label_values(&[
                full.as_str(),
                action.as_str(),
                result,
                if dry_run { "true" } else { "false" },
            ])
        };
        let matched = counter(result);
        let custom = (action == Action::Custom).then(|| CustomCounters {
            denied: counter("denied"),
            error: counter("error"),
            failed_open: counter("failed_open"),
        });
        Policy {
            name: full,
            action,
            dry_run,
            rules,
            details,
            ids,
            matched,
            provider: None,
            custom,
        }
    }

    /// A CUSTOM policy's external authorizer.
    pub fn with_provider(mut self, provider: Arc<Provider>) -> Policy {
        self.provider = Some(provider);
        self
    }

    /// The index of the first rule that matches.
    pub fn matching_rule(&self, k: &RequestKeys<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(k))
    }

    /// Counts (and, for a failure or a dry run, logs) what a CUSTOM check of this
    /// policy's came to.
    fn count_custom(&self, provider: &Provider, outcome: &ext_authz::Outcome, path: &str) {
        let Some(c) = &self.custom else {
            return;
        };
        let result = match outcome {
            ext_authz::Outcome::Allowed(_) => {
                self.matched.inc();
                "allowed"
            }
            ext_authz::Outcome::Denied(_) => {
                c.denied.inc();
                "denied"
            }
            ext_authz::Outcome::Failed(e) => {
                provider.log_failure(e, path);
                if provider.fail_open {
                    c.failed_open.inc();
                    "failed_open"
                } else {
                    c.error.inc();
                    "error"
                }
            }
        };
        if self.dry_run {
            tracing::info!(
                policy = %self.name,
                provider = %provider.name,
                result,
                path,
                "authorization dry run: the external authorizer was asked, its answer not enforced"
            );
        }
    }
}

/// Envoy's details for a request no ALLOW policy matched.
pub const DENIED_NONE: &str = "rbac_access_denied_matched_policy[none]";

/// CUSTOM policies of one external authorizer.
type CustomGroup = (Arc<Provider>, Vec<Arc<Policy>>);

/// Why a CUSTOM check refused a request.
#[derive(Debug)]
pub enum CustomRefusal {
    /// The authorizer's answer, for the client.
    Denied(ext_authz::Denied),
    /// The check failed and the provider fails closed: `statusOnError`.
    Failed(u16),
}

/// The policies that apply to one listener, by action; enforced and dry-run apart.
#[derive(Debug, Default)]
pub struct Authorization {
    /// By provider name (the order Istio chains several providers' filters in).
    custom: Vec<CustomGroup>,
    dry_custom: Vec<CustomGroup>,
    deny: Vec<Arc<Policy>>,
    allow: Vec<Arc<Policy>>,
    audit: Vec<Arc<Policy>>,
    dry_deny: Vec<Arc<Policy>>,
    dry_allow: Vec<Arc<Policy>>,
    /// `{policy="none",action="ALLOW",result="denied"}`, enforced and dry-run.
    none: Option<(IntCounter, IntCounter)>,
}

/// What authorization decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Envoy's `response_code_details` of a refusal; empty when allowed.
    pub details: &'static str,
}

impl Authorization {
    pub fn new(policies: Vec<Arc<Policy>>) -> Authorization {
        let mut a = Authorization::default();
        for p in policies {
            match (p.action, p.dry_run) {
                (Action::Deny, false) => a.deny.push(p),
                (Action::Deny, true) => a.dry_deny.push(p),
                (Action::Allow, false) => a.allow.push(p),
                (Action::Allow, true) => a.dry_allow.push(p),
                (Action::Audit, _) => a.audit.push(p),
                (Action::Custom, dry) => {
                    let Some(provider) = p.provider.clone() else {
                        continue;
                    };
                    let groups = if dry {
                        &mut a.dry_custom
                    } else {
                        &mut a.custom
                    };
                    match groups.iter_mut().find(|(g, _)| g.name == provider.name) {
                        Some((_, list)) => list.push(p),
                        None => groups.push((provider, vec![p])),
                    }
                }
            }
        }
        a.custom.sort_by(|x, y| x.0.name.cmp(&y.0.name));
        a.dry_custom.sort_by(|x, y| x.0.name.cmp(&y.0.name));
        if !a.allow.is_empty() || !a.dry_allow.is_empty() {
            let c = |dry: &str| {
                Metrics::global()
                    .authz_decisions
                    .with_label_values(&["none", "ALLOW", "denied", dry])
            };
            a.none = Some((c("false"), c("true")));
        }
        a
    }

    /// Every policy, enforced ones in the order the request core asks them (CUSTOM, DENY,
    /// ALLOW), then dry-run and AUDIT ones (for `portico routes`, which asks each
    /// `matching_rule`).
    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        fn custom(groups: &[CustomGroup]) -> impl Iterator<Item = &Arc<Policy>> {
            groups.iter().flat_map(|(_, policies)| policies.iter())
        }
        custom(&self.custom)
            .chain(&self.deny)
            .chain(&self.allow)
            .chain(custom(&self.dry_custom))
            .chain(&self.dry_deny)
            .chain(&self.dry_allow)
            .chain(&self.audit)
    }

    pub fn is_empty(&self) -> bool {
        self.custom.is_empty()
            && self.dry_custom.is_empty()
            && self.deny.is_empty()
            && self.allow.is_empty()
            && self.audit.is_empty()
            && self.dry_deny.is_empty()
            && self.dry_allow.is_empty()
    }

    /// Whether CUSTOM policies (enforced or dry-run) apply here.
    pub fn has_custom(&self) -> bool {
        !self.custom.is_empty() || !self.dry_custom.is_empty()
    }

    /// The CUSTOM policies' decision, counted: each external authorizer one of whose
    /// policies matches the request is asked, in the order of their names; a denial or a
    /// failed check (unless the provider fails open) refuses the request. The edits of the
    /// allows, merged (a later provider's over an earlier's). Dry-run policies that match
    /// have their authorizer asked in a task of its own: the answer is counted and logged,
    /// never waited for or enforced.
    pub async fn custom(
        &self,
        k: &RequestKeys<'_>,
        view: &RequestView<'_>,
    ) -> Result<Option<ext_authz::Allowed>, CustomRefusal> {
        for (provider, policies) in &self.dry_custom {
            let Some(p) = policies.iter().find(|p| p.matching_rule(k).is_some()) else {
                continue;
            };
            match provider.prepare(view) {
                Ok(prepared) => {
                    let (provider, p) = (provider.clone(), p.clone());
                    let path = view.path.to_string();
                    tokio::spawn(async move {
                        let outcome = provider.send(prepared).await;
                        p.count_custom(&provider, &outcome, &path);
                    });
                }
                Err(e) => p.count_custom(provider, &ext_authz::Outcome::Failed(e), view.path),
            }
        }
        let mut edits: Option<ext_authz::Allowed> = None;
        for (provider, policies) in &self.custom {
            let Some(p) = policies.iter().find(|p| p.matching_rule(k).is_some()) else {
                continue;
            };
            let outcome = provider.check(view).await;
            p.count_custom(provider, &outcome, view.path);
            match outcome {
                ext_authz::Outcome::Allowed(a) => match &mut edits {
                    None => edits = Some(a),
                    Some(e) => {
                        e.upstream
                            .retain(|(n, _)| !a.upstream.iter().any(|(m, _)| m == n));
                        e.upstream.extend(a.upstream);
                        e.remove.extend(a.remove);
                        e.downstream
                            .retain(|(n, _)| !a.downstream.iter().any(|(m, _)| m == n));
                        e.downstream.extend(a.downstream);
                    }
                },
                ext_authz::Outcome::Denied(d) => return Err(CustomRefusal::Denied(d)),
                ext_authz::Outcome::Failed(_) if provider.fail_open => {}
                ext_authz::Outcome::Failed(_) => {
                    return Err(CustomRefusal::Failed(provider.status_on_error))
                }
            }
        }
        Ok(edits)
    }

    /// Decides a request, counting it: DENY first, then ALLOW. Dry-run policies are
    /// decided the same way apart (what they would do is counted and logged); AUDIT
    /// policies are counted when they match.
    pub fn check(&self, k: &RequestKeys<'_>) -> Verdict {
        for p in &self.audit {
            if let Some(i) = p.matching_rule(k) {
                p.matched.inc();
                tracing::info!(policy = p.ids[i], path = k.path, "authorization audit");
            }
        }
        if !self.dry_deny.is_empty() || !self.dry_allow.is_empty() {
            self.shadow(k);
        }
        for p in &self.deny {
            if let Some(i) = p.matching_rule(k) {
                p.matched.inc();
                return Verdict {
                    allowed: false,
                    details: p.details[i],
                };
            }
        }
        if self.allow.is_empty() {
            return Verdict {
                allowed: true,
                details: "",
            };
        }
        for p in &self.allow {
            if p.matching_rule(k).is_some() {
                p.matched.inc();
                return Verdict {
                    allowed: true,
                    details: "",
                };
            }
        }
        if let Some((c, _)) = &self.none {
            c.inc();
        }
        Verdict {
            allowed: false,
            details: DENIED_NONE,
        }
    }

    /// The dry-run policies' decision, as Envoy's shadow rules make it: counted and
    /// logged, never enforced.
    fn shadow(&self, k: &RequestKeys<'_>) {
        for p in &self.dry_deny {
            if let Some(i) = p.matching_rule(k) {
                p.matched.inc();
                tracing::info!(
                    policy = p.ids[i],
                    path = k.path,
                    "authorization dry run: the request would be denied"
                );
                return;
            }
        }
        if self.dry_allow.is_empty() {
            return;
        }
        for p in &self.dry_allow {
            if p.matching_rule(k).is_some() {
                p.matched.inc();
                return;
            }
        }
        if let Some((_, c)) = &self.none {
            c.inc();
        }
        tracing::info!(
            path = k.path,
            "authorization dry run: the request would be denied (no ALLOW policy matched)"
        );
    }
}

/// `text` as a `&'static str`: the details and ids of policies outlive the Snapshot that
/// made them (a request's log entry takes its details by reference). Each distinct string
/// is kept once, so memory grows only with the distinct policy names ever loaded.
fn intern(text: String) -> &'static str {
    static SEEN: OnceLock<Mutex<std::collections::HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(s) = seen.get(text.as_str()) {
        return s;
    }
    let s: &'static str = Box::leak(text.into_boxed_str());
    seen.insert(s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Claims;
    use crate::routing::Headers;

    struct TestClaims;
    impl Claims for TestClaims {
        fn claim(&self, name: &str) -> Option<&str> {
            (name == "iss").then_some("https://issuer")
        }
        fn any_value(&self, path: &[&str], f: &mut dyn FnMut(&str) -> bool) -> bool {
            match path {
                ["iss"] => f("https://issuer"),
                ["groups"] => ["dev", "ops"].into_iter().any(f),
                ["aud"] => f("api"),
                ["realm", "role"] => f("admin"),
                _ => false,
            }
        }
    }

    fn keys<'a>(headers: &'a http::HeaderMap) -> RequestKeys<'a> {
        RequestKeys {
            client_ip: Some("203.0.113.7".parse().unwrap()),
            peer_ip: Some("10.0.0.1".parse().unwrap()),
            headers: Headers::Map(headers),
            path: "/api/v1/users/42",
            method: "GET",
            authority: "Shop.Example.com:8443",
            port: 8443,
            sni: Some("shop.example.com"),
            peer_principal: Some("cluster.local/ns/web/sa/frontend"),
            principal: None,
            claims: None,
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn string_patterns_are_exact_prefix_suffix_and_presence() {
        assert!(StrPat::parse("abc").matches("abc"));
        assert!(!StrPat::parse("abc").matches("abcd"));
        assert!(StrPat::parse("abc*").matches("abcd"));
        assert!(StrPat::parse("abc*").matches("abc"));
        assert!(StrPat::parse("*abc").matches("xabc"));
        assert!(!StrPat::parse("*abc").matches("abcx"));
        assert!(StrPat::parse("*").matches("x"));
        assert!(!StrPat::parse("*").matches(""));
        let host = StrPat::parse("*.Example.com").lowercase();
        assert!(host.matches_ignore_case("shop.EXAMPLE.com"));
    }

    #[test]
    fn path_templates_match_one_segment_or_the_rest() {
        let t = |p: &str| PathPat::parse(p).unwrap();
        assert!(t("/api/{*}/users").matches("/api/v1/users"));
        assert!(!t("/api/{*}/users").matches("/api/v1/x/users"));
        assert!(!t("/api/{*}/users").matches("/api//users"));
        assert!(!t("/api/{*}/users").matches("/api/v1/users/1"));
        assert!(t("/api/{**}").matches("/api/v1/users/42"));
        assert!(t("/api/{**}").matches("/api/v1"));
        assert!(!t("/api/{**}").matches("/api/"));
        assert!(!t("/api/{**}").matches("/apix/v1"));
        assert!(t("/api/{*}/users/{**}").matches("/api/v1/users/42"));
        assert!(PathPat::parse("/api/{**}/x").is_err());
        assert!(PathPat::parse("/api/v{*}").is_err());
        assert!(t("/api/*").matches("/api/anything/at/all"));
    }

    #[test]
    fn sources_operations_and_conditions_read_their_attributes() {
        let h = http::HeaderMap::new();
        let k = keys(&h);
        let src = |f: fn(&mut Source)| {
            let mut s = Source::default();
            f(&mut s);
            s.matches(&k)
        };
        assert!(src(
            |s| s.ip_blocks.any = vec![parse_net("10.0.0.0/8").unwrap()]
        ));
        assert!(!src(
            |s| s.ip_blocks.any = vec![parse_net("203.0.113.7").unwrap()]
        ));
        assert!(src(
            |s| s.remote_ip_blocks.any = vec![parse_net("203.0.113.0/24").unwrap()]
        ));
        assert!(!src(
            |s| s.remote_ip_blocks.not = vec![parse_net("203.0.113.7/32").unwrap()]
        ));
        assert!(src(|s| s.namespaces.any = vec![StrPat::parse("web")]));
        assert!(!src(|s| s.namespaces.not = vec![StrPat::parse("web")]));
        assert!(src(
            |s| s.principals.any = vec![StrPat::parse("*/sa/frontend")]
        ));
        // No JWT: requestPrincipals never match, notRequestPrincipals always.
        assert!(!src(|s| s.request_principals.any = vec![StrPat::parse("*")]));
        assert!(src(|s| s.request_principals.not = vec![StrPat::parse("*")]));

        let op = |f: fn(&mut Operation)| {
            let mut o = Operation::default();
            f(&mut o);
            o.matches(&k)
        };
        assert!(op(
            |o| o.hosts.any = vec![StrPat::parse("shop.example.com:*").lowercase()]
        ));
        assert!(!op(
            |o| o.hosts.any = vec![StrPat::parse("shop.example.com").lowercase()]
        ));
        assert!(op(|o| o.ports.any = vec![8443]));
        assert!(op(|o| o.methods.not = vec![StrPat::parse("POST")]));
        assert!(op(
            |o| o.paths.any = vec![PathPat::parse("/api/{**}").unwrap()]
        ));
        assert!(!op(|o| o.paths.not = vec![PathPat::parse("/api*").unwrap()]));

        let when = |key: &str, v: &[&str], not: &[&str]| {
            Condition::new(key, &s(v), &s(not)).unwrap().matches(&k)
        };
        assert!(when("source.ip", &["10.0.0.1"], &[]));
        assert!(when("remote.ip", &["203.0.113.0/24"], &[]));
        assert!(when("destination.port", &["8443"], &[]));
        assert!(when("connection.sni", &["*.example.com"], &[]));
        assert!(when("source.namespace", &["web"], &[]));
        assert!(when("source.principal", &[], &["cluster.local/ns/other/*"]));
        assert!(!when("request.headers[x-user]", &["*"], &[]));
        assert!(when("request.headers[x-user]", &[], &["admin"]));
        assert!(!when("request.auth.claims[iss]", &["https://issuer"], &[]));
    }

    #[test]
    fn headers_sent_twice_match_joined_and_claims_match_any_list_element() {
        let mut h = http::HeaderMap::new();
        h.append("x-role", "user".parse().unwrap());
        h.append("x-role", "admin".parse().unwrap());
        let claims = TestClaims;
        let mut k = keys(&h);
        k.principal = Some("https://issuer/alice");
        k.claims = Some(&claims);
        let when = |key: &str, v: &[&str]| Condition::new(key, &s(v), &[]).unwrap().matches(&k);
        assert!(!when("request.headers[X-Role]", &["admin"]));
        assert!(when("request.headers[x-role]", &["user,admin"]));
        assert!(when("request.auth.claims[groups]", &["ops"]));
        assert!(!when("request.auth.claims[groups]", &["root"]));
        assert!(when("request.auth.claims[realm][role]", &["admin"]));
        assert!(when("request.auth.audiences", &["api"]));
        assert!(when("request.auth.principal", &["https://issuer/*"]));
    }

    #[test]
    fn unknown_and_unsupported_condition_keys_are_errors() {
        for key in [
            "request.header[x]",
            "destination.ip",
            "experimental.envoy.filters.network.mysql_proxy[db.table]",
            "request.auth.claims[]",
            "source.serviceAccount",
        ] {
            assert!(Condition::new(key, &s(&["x"]), &[]).is_err(), "{key}");
        }
        assert!(Condition::new("source.ip", &s(&["nope"]), &[]).is_err());
        assert!(Condition::new("destination.port", &s(&["http"]), &[]).is_err());
        assert!(Condition::new("source.ip", &[], &[]).is_err());
    }

    #[test]
    fn deny_wins_then_allow_decides_and_dry_run_only_counts() {
        let h = http::HeaderMap::new();
        let k = keys(&h);
        let rule = |path: &str| Rule {
            to: vec![Operation {
                paths: Field {
                    any: vec![PathPat::parse(path).unwrap()],
                    not: vec![],
                },
                ..Default::default()
            }],
            ..Default::default()
        };
        let p =
            |name: &str, action, dry, rules| Arc::new(Policy::new("t", name, action, dry, rules));
        // No policy: allowed.
        assert!(Authorization::new(vec![]).check(&k).allowed);
        // An ALLOW policy that matches nothing: denied with `none`.
        let a = Authorization::new(vec![p(
            "allow-other",
            Action::Allow,
            false,
            vec![rule("/other")],
        )]);
        assert_eq!(a.check(&k).details, DENIED_NONE);
        // An ALLOW policy without rules matches nothing; `rules: [{}]` matches everything.
        assert!(
            !Authorization::new(vec![p("empty", Action::Allow, false, vec![])])
                .check(&k)
                .allowed
        );
        assert!(
            Authorization::new(vec![p("all", Action::Allow, false, vec![Rule::default()])])
                .check(&k)
                .allowed
        );
        // DENY wins over a matching ALLOW, and names its policy and rule.
        let a = Authorization::new(vec![
            p("allow-api", Action::Allow, false, vec![rule("/api/*")]),
            p(
                "deny-users",
                Action::Deny,
                false,
                vec![rule("/x"), rule("/api/{*}/users/{*}")],
            ),
        ]);
        let v = a.check(&k);
        assert!(!v.allowed);
        assert_eq!(
            v.details,
            "rbac_access_denied_matched_policy[ns[t]-policy[deny-users]-rule[1]]"
        );
        // Dry-run and AUDIT policies never change the decision.
        let a = Authorization::new(vec![
            p("dry-deny", Action::Deny, true, vec![Rule::default()]),
            p("dry-allow", Action::Allow, true, vec![rule("/nothing")]),
            p("audit", Action::Audit, false, vec![Rule::default()]),
        ]);
        assert!(a.check(&k).allowed);
    }

    #[test]
    fn namespaces_come_from_spiffe_identities() {
        assert_eq!(namespace_of("cluster.local/ns/foo/sa/bar"), Some("foo"));
        assert_eq!(namespace_of("spiffe://td/ns/foo/sa/bar"), Some("foo"));
        assert_eq!(namespace_of("example.com/alice"), None);
    }
}
