//! Compiles `authorizationPolicies` (Istio's AuthorizationPolicy) into
//! `policy::authz::Policy`s and binds each to the listeners of the gateways it selects:
//! by `targetRefs` (a Gateway by name), by `selector.matchLabels` (a Gateway whose
//! `selector` has those labels: the workload the Gateway runs on), or, with neither, every
//! gateway of its namespace (of every namespace when it is in the root namespace). Istio's
//! validation errors are config errors naming the field.
//!
//! Also compiles the mesh's `envoyExtAuthzHttp` extension providers, the external
//! authorizers CUSTOM policies name: the service resolves as a destination host does (a
//! ServiceEntry's endpoints, or the name's DNS answer, followed), here, never at request
//! time.

use std::collections::HashMap;
use std::sync::Arc;

use super::{gateway_ref, key, Cx};
use crate::config::load::{Document, Origin};
use crate::config::schema;
use crate::policy::authz::{
    parse_net, parse_port, Action, Authorization, Condition, Field, Operation, PathPat, Policy,
    Rule, Source, StrPat,
};
use crate::policy::ext_authz::{self, NamePatterns, Provider};
use crate::snapshot::Listener;

/// Istio's default `rootNamespace`.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Which gateways a policy applies to.
pub struct Binding {
    namespace: String,
    /// `namespace/name` of Gateways (targetRefs).
    gateways: Vec<String>,
    selector: Option<std::collections::BTreeMap<String, String>>,
}

/// What `mesh.extensionProviders` entry a CUSTOM policy may name.
enum Named {
    Http(Arc<Provider>),
    /// An `envoyExtAuthzHttp` entry with errors (reported where it is).
    Broken,
    Grpc,
    Other,
}

/// The compiled policies, before they are bound to listeners.
pub struct Compiled {
    policies: Vec<(Binding, Arc<Policy>)>,
    root: String,
}

impl Cx {
    pub(super) fn authorization(&mut self, doc: &Document) -> Compiled {
        let root = doc
            .mesh
            .spec
            .root_namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.to_string());
        let providers = self.ext_authz_providers(doc);
        let mut policies = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for item in &doc.authorization_policies {
            let (p, o) = (&*item.spec, &item.origin);
            let k = key(&p.namespace, &p.name);
            if !seen.insert(k.clone()) {
                self.err(
                    o,
                    ".name",
                    format!("a second AuthorizationPolicy named {k}"),
                );
                continue;
            }
            if let Some(c) = self.authorization_policy(doc, &providers, o, p) {
                policies.push(c);
            }
        }
        Compiled { policies, root }
    }

    fn authorization_policy(
        &mut self,
        doc: &Document,
        providers: &HashMap<String, Named>,
        o: &Origin,
        p: &schema::AuthorizationPolicy,
    ) -> Option<(Binding, Arc<Policy>)> {
        let errors = self.errors.len();
        let ns = p.namespace.as_deref().unwrap_or("default");
        let action = match p.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            Some("CUSTOM") => Action::Custom,
            Some(other) => {
                self.err(
                    o,
                    ".action",
                    format!("{other:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
                );
                Action::Deny
            }
        };
        let mut provider = None;
        match (action, &p.provider) {
            (Action::Custom, None) => {
                self.err(o, ".provider", "action CUSTOM needs provider.name");
            }
            (Action::Custom, Some(named)) => match providers.get(&named.name) {
                Some(Named::Http(p)) => provider = Some(p.clone()),
                Some(Named::Broken) => {}
                Some(Named::Grpc) => self.err(
                    o,
                    ".provider.name",
                    format!(
                        "{:?} is an envoyExtAuthzGrpc provider: gRPC external authorization is not supported by Portico (use envoyExtAuthzHttp)",
                        named.name
                    ),
                ),
                Some(Named::Other) => self.err(
                    o,
                    ".provider.name",
                    format!("{:?} is not an external authorizer (envoyExtAuthzHttp)", named.name),
                ),
                None => {
                    let mut known: Vec<&str> = providers
                        .iter()
                        .filter(|(_, n)| matches!(n, Named::Http(_) | Named::Broken))
                        .map(|(k, _)| k.as_str())
                        .collect();
                    known.sort();
                    self.err(
                        o,
                        ".provider.name",
                        format!(
                            "no mesh.extensionProviders entry named {:?} (envoyExtAuthzHttp ones: {})",
                            named.name,
                            if known.is_empty() { "none".to_string() } else { known.join(", ") }
                        ),
                    );
                }
            },
            (_, Some(_)) => self.err(o, ".provider", "provider is only for action CUSTOM"),
            (_, None) => {}
        }
        let refs: Vec<&schema::PolicyTargetRef> =
            p.target_refs.iter().chain(p.target_ref.as_ref()).collect();
        if p.target_ref.is_some() && !p.target_refs.is_empty() {
            self.err(o, ".targetRef", "set targetRefs or targetRef, not both");
        }
        if p.selector.is_some() && !refs.is_empty() {
            self.err(o, ".selector", "set selector or targetRefs, not both");
        }
        let mut gateways = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let at = if i < p.target_refs.len() {
                format!(".targetRefs[{i}]")
            } else {
                ".targetRef".to_string()
            };
            if r.kind != "Gateway" {
                self.err(
                    o,
                    &format!("{at}.kind"),
                    format!(
                        "{:?}: Portico binds an AuthorizationPolicy to a Gateway only (a Service or ServiceEntry target is for waypoints)",
                        r.kind
                    ),
                );
                continue;
            }
            if r.namespace.as_deref().is_some_and(|n| n != ns) {
                self.err(
                    o,
                    &format!("{at}.namespace"),
                    "a target must be in the policy's namespace",
                );
            }
            let k = gateway_ref(&r.name, ns);
            if !doc
                .gateways
                .iter()
                .any(|g| key(&g.spec.namespace, &g.spec.name) == k)
            {
                self.err(o, &format!("{at}.name"), format!("no Gateway {k}"));
            }
            gateways.push(k);
        }
        let rules = match &p.rules {
            None => Vec::new(),
            Some(rules) => rules
                .iter()
                .enumerate()
                .map(|(i, r)| self.authz_rule(o, &format!(".rules[{i}]"), r))
                .collect(),
        };
        if self.errors.len() > errors {
            return None;
        }
        let binding = Binding {
            namespace: ns.to_string(),
            gateways,
            selector: p.selector.as_ref().map(|s| s.match_labels.clone()),
        };
        let mut policy = Policy::new(ns, &p.name, action, p.dry_run.unwrap_or(false), rules);
        if let Some(provider) = provider {
            policy = policy.with_provider(provider);
        }
        Some((binding, Arc::new(policy)))
    }

    /// `mesh.extensionProviders`, by name, as CUSTOM policies may name them; each
    /// `envoyExtAuthzHttp` one compiled (errors name its fields).
    fn ext_authz_providers(&mut self, doc: &Document) -> HashMap<String, Named> {
        let o = &doc.mesh.origin;
        let mut out = HashMap::new();
        for (i, e) in doc.mesh.spec.extension_providers.iter().enumerate() {
            let at = format!(".extensionProviders[{i}]");
            if e.name.is_empty() {
                self.err(o, &format!("{at}.name"), "a provider needs a name");
                continue;
            }
            let kinds = [
                e.opentelemetry.is_some(),
                e.envoy_ext_authz_http.is_some(),
                e.envoy_ext_authz_grpc.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() > 1 {
                self.err(
                    o,
                    &at,
                    "set one of opentelemetry, envoyExtAuthzHttp, envoyExtAuthzGrpc",
                );
            }
            let named = match (&e.envoy_ext_authz_http, &e.envoy_ext_authz_grpc) {
                (Some(h), _) => {
                    match self.ext_authz_provider(o, &format!("{at}.envoyExtAuthzHttp"), &e.name, h)
                    {
                        Some(p) => Named::Http(Arc::new(p)),
                        None => Named::Broken,
                    }
                }
                (None, Some(_)) => Named::Grpc,
                (None, None) => Named::Other,
            };
            if out.insert(e.name.clone(), named).is_some() {
                self.err(
                    o,
                    &format!("{at}.name"),
                    format!("a second extension provider named {:?}", e.name),
                );
            }
        }
        out
    }

    fn ext_authz_provider(
        &mut self,
        o: &Origin,
        at: &str,
        name: &str,
        h: &schema::ExtAuthzHttpProvider,
    ) -> Option<Provider> {
        let errors = self.errors.len();
        let port = match u16::try_from(h.port) {
            Ok(p) if p > 0 => p,
            _ => {
                self.err(o, &format!("{at}.port"), "port must be 1-65535");
                0
            }
        };
        // `[<namespace>/]<host>`: the namespace only disambiguates Kubernetes services.
        let host = h.service.rsplit('/').next().unwrap_or("").trim();
        if host.is_empty() {
            self.err(o, &format!("{at}.service"), "service must name a host");
        }
        let timeout = match h.timeout.map(|t| t.get()) {
            None => ext_authz::DEFAULT_TIMEOUT,
            Some(t) if t.is_zero() => {
                self.err(o, &format!("{at}.timeout"), "timeout must be above 0");
                ext_authz::DEFAULT_TIMEOUT
            }
            Some(t) => t,
        };
        let path_prefix = h.path_prefix.clone().unwrap_or_default();
        if !path_prefix.is_empty()
            && (!path_prefix.starts_with('/')
                || path_prefix.parse::<http::uri::PathAndQuery>().is_err()
                || path_prefix.contains(['?', '#']))
        {
            self.err(
                o,
                &format!("{at}.pathPrefix"),
                format!("{path_prefix:?} is not a path (it must begin with /)"),
            );
        }
        let status_on_error = match h.status_on_error.as_deref() {
            None | Some("") => 403,
            Some(text) => match text.parse::<u16>() {
                Ok(code)
                    if (200..=599).contains(&code)
                        && http::StatusCode::from_u16(code)
                            .ok()
                            .and_then(|c| c.canonical_reason())
                            .is_some() =>
                {
                    code
                }
                _ => {
                    self.err(
                        o,
                        &format!("{at}.statusOnError"),
                        format!("{text:?} is not an HTTP status code (200-599)"),
                    );
                    403
                }
            },
        };
        let mut patterns = |field: &str, list: &[String]| match NamePatterns::parse(list) {
            Ok(p) => p,
            Err((i, e)) => {
                self.err(o, &format!("{at}.{field}[{i}]"), e);
                NamePatterns::default()
            }
        };
        let include = if h.include_request_headers_in_check.is_empty() {
            patterns("includeHeadersInCheck", &h.include_headers_in_check)
        } else {
            patterns(
                "includeRequestHeadersInCheck",
                &h.include_request_headers_in_check,
            )
        };
        let to_upstream_on_allow =
            patterns("headersToUpstreamOnAllow", &h.headers_to_upstream_on_allow);
        let to_downstream_on_deny = patterns(
            "headersToDownstreamOnDeny",
            &h.headers_to_downstream_on_deny,
        );
        let to_downstream_on_allow = patterns(
            "headersToDownstreamOnAllow",
            &h.headers_to_downstream_on_allow,
        );
        let mut additional = Vec::new();
        for (n, v) in &h.include_additional_headers_in_check {
            let field = format!("{at}.includeAdditionalHeadersInCheck.{n}");
            match (
                http::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                (Ok(n), Ok(v)) => additional.push((n, v)),
                (Err(_), _) => self.err(o, &field, format!("{n:?} is not a header name")),
                (_, Err(_)) => self.err(o, &field, "the value is not a header value"),
            }
        }
        if h.include_request_body_in_check.is_some() {
            self.err(
                o,
                &format!("{at}.includeRequestBodyInCheck"),
                "sending the request body to the authorizer is not supported by Portico",
            );
        }
        if h.clear_route_cache == Some(true) {
            self.warn(
                o,
                &format!("{at}.clearRouteCache"),
                "ignored: Portico routes a request before it is authorized; the authorizer's fields do not change the route",
            );
        }
        if self.errors.len() > errors {
            return None;
        }
        let destination = schema::Destination {
            host: host.to_string(),
            subset: None,
            port: Some(schema::PortSelector {
                number: u32::from(port),
            }),
        };
        let cluster = self.cluster(o, at, &destination)?;
        if cluster.settings.tls.is_some() {
            self.err(
                o,
                &format!("{at}.service"),
                format!(
                    "a DestinationRule gives {host} TLS: Portico speaks plain HTTP/1.1 to an external authorizer"
                ),
            );
            return None;
        }
        Some(Provider::new(
            name.to_string(),
            cluster,
            timeout,
            path_prefix,
            h.fail_open.unwrap_or(false),
            status_on_error,
            include,
            additional,
            to_upstream_on_allow,
            to_downstream_on_deny,
            to_downstream_on_allow,
        ))
    }

    fn authz_rule(&mut self, o: &Origin, at: &str, r: &schema::AuthzRule) -> Rule {
        let mut rule = Rule::default();
        for (i, f) in r.from.iter().enumerate() {
            let at = format!("{at}.from[{i}].source");
            let Some(s) = &f.source else {
                self.err(o, &at, "source must be set");
                continue;
            };
            let source = Source {
                principals: strs(&s.principals, &s.not_principals),
                request_principals: strs(&s.request_principals, &s.not_request_principals),
                namespaces: strs(&s.namespaces, &s.not_namespaces),
                ip_blocks: self.nets(o, &at, "ipBlocks", &s.ip_blocks, &s.not_ip_blocks),
                remote_ip_blocks: self.nets(
                    o,
                    &at,
                    "remoteIpBlocks",
                    &s.remote_ip_blocks,
                    &s.not_remote_ip_blocks,
                ),
            };
            if source == Source::default() {
                self.err(o, &at, "source must not be empty");
            }
            rule.from.push(source);
        }
        for (i, t) in r.to.iter().enumerate() {
            let at = format!("{at}.to[{i}].operation");
            let Some(op) = &t.operation else {
                self.err(o, &at, "operation must be set");
                continue;
            };
            let lower = |l: &[String]| l.iter().map(|h| StrPat::parse(h).lowercase()).collect();
            let mut paths = Field::default();
            for (name, list, out) in [
                ("paths", &op.paths, &mut paths.any),
                ("notPaths", &op.not_paths, &mut paths.not),
            ] {
                for (j, text) in list.iter().enumerate() {
                    match PathPat::parse(text) {
                        Ok(p) => out.push(p),
                        Err(e) => self.err(o, &format!("{at}.{name}[{j}]"), e),
                    }
                }
            }
            let mut ports = Field::default();
            for (name, list, out) in [
                ("ports", &op.ports, &mut ports.any),
                ("notPorts", &op.not_ports, &mut ports.not),
            ] {
                for (j, text) in list.iter().enumerate() {
                    match parse_port(text) {
                        Ok(p) => out.push(p),
                        Err(e) => self.err(o, &format!("{at}.{name}[{j}]"), e),
                    }
                }
            }
            let operation = Operation {
                hosts: Field {
                    any: lower(&op.hosts),
                    not: lower(&op.not_hosts),
                },
                ports,
                methods: strs(&op.methods, &op.not_methods),
                paths,
            };
            if op == &schema::AuthzOperation::default() {
                self.err(o, &at, "operation must not be empty");
            }
            rule.to.push(operation);
        }
        for (i, c) in r.when.iter().enumerate() {
            match Condition::new(&c.key, &c.values, &c.not_values) {
                Ok(c) => rule.when.push(c),
                Err(e) => self.err(o, &format!("{at}.when[{i}]"), e),
            }
        }
        rule
    }

    fn nets(
        &mut self,
        o: &Origin,
        at: &str,
        name: &str,
        any: &[String],
        not: &[String],
    ) -> Field<ipnet::IpNet> {
        let mut f = Field::default();
        let not_name = format!("not{}{}", name[..1].to_ascii_uppercase(), &name[1..]);
        for (field, list, out) in [(name, any, &mut f.any), (&*not_name, not, &mut f.not)] {
            for (j, text) in list.iter().enumerate() {
                match parse_net(text) {
                    Ok(n) => out.push(n),
                    Err(e) => self.err(o, &format!("{at}.{field}[{j}]"), e),
                }
            }
        }
        f
    }
}

fn strs(any: &[String], not: &[String]) -> Field<StrPat> {
    Field {
        any: any.iter().map(|s| StrPat::parse(s)).collect(),
        not: not.iter().map(|s| StrPat::parse(s)).collect(),
    }
}

impl Compiled {
    /// Gives each listener the policies of the gateways with servers on its port.
    pub fn bind(self, doc: &Document, listeners: &mut [Listener]) {
        if self.policies.is_empty() {
            return;
        }
        for l in listeners.iter_mut() {
            let port = l.addr.port();
            let on_port: Vec<&schema::Gateway> = doc
                .gateways
                .iter()
                .map(|g| &*g.spec)
                .filter(|g| {
                    g.servers
                        .iter()
                        .any(|s| u16::try_from(s.port.number) == Ok(port))
                })
                .collect();
            let applies = |b: &Binding| {
                on_port.iter().any(|g| {
                    let g_ns = g.namespace.as_deref().unwrap_or("default");
                    if !b.gateways.is_empty() {
                        return b.gateways.contains(&key(&g.namespace, &g.name));
                    }
                    let in_scope = b.namespace == self.root || b.namespace == g_ns;
                    in_scope
                        && b.selector.as_ref().is_none_or(|labels| {
                            labels.iter().all(|(k, v)| g.selector.get(k) == Some(v))
                        })
                })
            };
            let mine: Vec<Arc<Policy>> = self
                .policies
                .iter()
                .filter(|(b, _)| applies(b))
                .map(|(_, p)| p.clone())
                .collect();
            if !mine.is_empty() {
                l.authz = Some(Arc::new(Authorization::new(mine)));
            }
        }
    }
}
