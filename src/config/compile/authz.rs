//! Compiles `authorizationPolicies` (Istio's AuthorizationPolicy) into
//! `policy::authz::Policy`s and binds each to the listeners of the gateways it selects:
//! by `targetRefs` (a Gateway by name), by `selector.matchLabels` (a Gateway whose
//! `selector` has those labels: the workload the Gateway runs on), or, with neither, every
//! gateway of its namespace (of every namespace when it is in the root namespace). Istio's
//! validation errors are config errors naming the field.

use std::sync::Arc;

use super::{gateway_ref, key, Cx};
use crate::config::load::{Document, Origin};
use crate::config::schema;
use crate::policy::authz::{
    parse_net, parse_port, Action, Authorization, Condition, Field, Operation, PathPat, Policy,
    Rule, Source, StrPat,
};
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
            if let Some(c) = self.authorization_policy(doc, o, p) {
                policies.push(c);
            }
        }
        Compiled { policies, root }
    }

    fn authorization_policy(
        &mut self,
        doc: &Document,
        o: &Origin,
        p: &schema::AuthorizationPolicy,
    ) -> Option<(Binding, Arc<Policy>)> {
        let errors = self.errors.len();
        let ns = p.namespace.as_deref().unwrap_or("default");
        let action = match p.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            Some("CUSTOM") => {
                self.err(
                    o,
                    ".action",
                    "CUSTOM (an external authorizer) is not supported by Portico yet",
                );
                Action::Deny
            }
            Some(other) => {
                self.err(
                    o,
                    ".action",
                    format!("{other:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
                );
                Action::Deny
            }
        };
        if p.provider.is_some() {
            self.err(o, ".provider", "provider is only for action CUSTOM");
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
        let policy = Policy::new(ns, &p.name, action, p.dry_run.unwrap_or(false), rules);
        Some((binding, Arc::new(policy)))
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
