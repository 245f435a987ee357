//! Istio YAML manifests: Kubernetes documents (`apiVersion`, `kind`, `metadata`, `spec`)
//! read into the same schema structs as TOML, with what Istio implies for a manifest:
//! short host names resolved against its namespace, `mesh`-only rules skipped (Portico is
//! a gateway), fields Portico does not implement reported by path. Portico's own kinds
//! (`portico.dev/v1alpha1` RateLimitPolicy and AccessList) are read here too, with unknown
//! fields as errors, as in TOML. Reads the text it is given; never opens files or sockets.

use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::error::ConfigError;
use super::load::{ignored_path, SourceFile};
use super::schema::{
    AccessList, AuthorizationPolicy, DestinationRule, Gateway, RateLimitPolicy,
    RequestAuthentication, ServiceEntry, VirtualService,
};

/// Kubernetes' cluster domain, as Istio appends it to short names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The API versions of `networking.istio.io` whose resources Portico reads.
const NETWORKING_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// The API versions of `security.istio.io` whose resources Portico reads.
const SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// The API group and version of Portico's own kinds.
pub const PORTICO_GROUP: &str = "portico.dev";
pub const PORTICO_VERSION: &str = "v1alpha1";

/// The resources of one YAML file, each with its field path there (`documents[2].spec`).
#[derive(Default)]
pub struct Resources {
    pub gateways: Vec<(String, Gateway)>,
    pub virtual_services: Vec<(String, VirtualService)>,
    pub destination_rules: Vec<(String, DestinationRule)>,
    pub service_entries: Vec<(String, ServiceEntry)>,
    pub rate_limits: Vec<(String, RateLimitPolicy)>,
    pub access_lists: Vec<(String, AccessList)>,
    pub request_authentications: Vec<(String, RequestAuthentication)>,
    pub authorization_policies: Vec<(String, AuthorizationPolicy)>,
    pub warnings: Vec<ConfigError>,
    pub errors: Vec<ConfigError>,
}

/// `host` as Istio resolves a short name written in a resource of namespace `ns`:
/// a name without a dot becomes `<host>.<ns>.svc.cluster.local`; `*`, IP addresses and
/// names with a dot stay as written (so `reviews.prod` is taken literally, as in Istio).
pub fn fqdn(host: &str, ns: &str) -> String {
    if host.is_empty() || host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        host.to_string()
    } else {
        format!("{host}.{ns}.svc.{CLUSTER_DOMAIN}")
    }
}

/// Istio's `exportTo`: whether a resource of namespace `own` is visible in namespace `to`.
/// Empty means everywhere; `.` is its own namespace; `~` is nowhere.
pub fn exported_to(export_to: &[String], own: &str, to: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == to || (e == "." && own == to))
}

/// Reads every document of a YAML stream. A syntax error stops the file there (the
/// documents after it cannot be told apart reliably); a bad document is reported and the
/// others are still read.
pub fn read(file: &SourceFile) -> Resources {
    let mut out = Resources::default();
    for (i, de) in serde_yaml::Deserializer::from_str(&file.text).enumerate() {
        let doc = format!("documents[{i}]");
        let value = match <Value as serde::Deserialize>::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(syntax_error(file, &doc, &e));
                break;
            }
        };
        read_document(file, &doc, value, &mut out);
    }
    out
}

fn syntax_error(file: &SourceFile, doc: &str, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = match e.location() {
        Some(l) => super::error::line_col(&file.text, l.index()),
        None => (1, 1),
    };
    ConfigError {
        file: file.path.clone(),
        line,
        column,
        path: doc.to_string(),
        message: format!("invalid YAML: {e}"),
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn read_document(file: &SourceFile, doc: &str, value: Value, out: &mut Resources) {
    if value.is_null() {
        return; // an empty document, such as after a trailing `---`
    }
    if !value.is_mapping() {
        out.errors.push(file.error(
            doc,
            "a manifest must be a mapping with apiVersion, kind, metadata and spec",
        ));
        return;
    }
    let (Some(api_version), Some(kind)) = (text(&value, "apiVersion"), text(&value, "kind")) else {
        out.errors.push(file.error(
            doc,
            "not a Kubernetes manifest: apiVersion and kind are required",
        ));
        return;
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let skip = |out: &mut Resources, why: String| {
        out.warnings.push(file.error(&format!("{doc}.kind"), why));
    };
    match (group, kind) {
        (_, "List") => {
            return skip(
                out,
                "a Kubernetes List is skipped: write its items as documents separated by ---"
                    .into(),
            )
        }
        ("networking.istio.io", "Gateway" | "VirtualService" | "DestinationRule" | "ServiceEntry") => {}
        (PORTICO_GROUP, "RateLimitPolicy" | "AccessList") => {}
        ("security.istio.io", "RequestAuthentication") => {}
        (PORTICO_GROUP, other) => {
            out.errors.push(file.error(
                &format!("{doc}.kind"),
                format!("{other} is not a {PORTICO_GROUP} kind (RateLimitPolicy, AccessList)"),
            ));
            return;
        }
        ("networking.istio.io", other) => {
            return skip(
                out,
                format!("{other} is not a resource Portico reads (it configures sidecars or Envoy): skipped"),
            )
        }
        ("security.istio.io", "AuthorizationPolicy") => {}
        ("security.istio.io", other) => {
            return skip(
                out,
                format!("{other}: security policies are not supported yet: skipped"),
            )
        }
        (_, other) => {
            return skip(
                out,
                format!("{other} ({api_version}) is not an Istio networking resource: skipped"),
            )
        }
    }
    if group == PORTICO_GROUP && version != PORTICO_VERSION {
        out.errors.push(file.error(
            &format!("{doc}.apiVersion"),
            format!("{api_version} is not supported: use {PORTICO_GROUP}/{PORTICO_VERSION}"),
        ));
        return;
    }
    if group == "security.istio.io" && !SECURITY_VERSIONS.contains(&version) {
        out.errors.push(file.error(
            &format!("{doc}.apiVersion"),
            format!("{api_version} is not supported: use security.istio.io/v1 or v1beta1"),
        ));
        return;
    }
    if group == "networking.istio.io" && !NETWORKING_VERSIONS.contains(&version) {
        out.errors.push(file.error(
            &format!("{doc}.apiVersion"),
            format!(
                "{api_version} is not supported: use networking.istio.io/v1, v1beta1 or v1alpha3"
            ),
        ));
        return;
    }
    let Some(name) = value.get("metadata").and_then(|m| text(m, "name")) else {
        out.errors
            .push(file.error(&format!("{doc}.metadata"), "metadata.name is required"));
        return;
    };
    let namespace = value
        .get("metadata")
        .and_then(|m| text(m, "namespace"))
        .map(str::to_string);
    let ns = namespace.clone().unwrap_or_else(|| "default".into());
    let at = format!("{doc}.spec");
    let mut spec = match value.get("spec") {
        Some(Value::Mapping(m)) => m.clone(),
        None | Some(Value::Null) => serde_yaml::Mapping::new(),
        Some(_) => {
            out.errors.push(file.error(&at, "spec must be a mapping"));
            return;
        }
    };
    for k in ["name", "namespace"] {
        if spec.remove(k).is_some() {
            out.warnings.push(file.error(
                &format!("{at}.{k}"),
                format!("{k} is not an Istio {kind} field (metadata.{k} is): ignored"),
            ));
        }
    }
    spec.insert("name".into(), name.into());
    // Istio's dry-run annotation is Portico's `dryRun` field.
    if kind == "AuthorizationPolicy" {
        let annotation = value
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get("istio.io/dry-run"));
        match annotation {
            None => {}
            Some(Value::String(v)) if v == "true" || v == "false" => {
                spec.insert("dryRun".into(), Value::Bool(v == "true"));
            }
            Some(_) => {
                out.errors.push(file.error(
                    &format!("{doc}.metadata.annotations.istio.io/dry-run"),
                    "must be \"true\" or \"false\"",
                ));
                return;
            }
        }
    }
    if let Some(n) = &namespace {
        spec.insert("namespace".into(), n.as_str().into());
    }
    let spec = Value::Mapping(spec);
    let label = format!("{kind} {ns}/{name}");
    match kind {
        "Gateway" => {
            if let Some((g, unknown)) = parse::<Gateway>(file, &at, spec, out) {
                report_unknown(file, &at, &unknown, |_| false, out);
                out.gateways.push((at, g));
            }
        }
        "VirtualService" => {
            let Some((mut vs, unknown)) = parse::<VirtualService>(file, &at, spec, out) else {
                return;
            };
            if vs.gateways.iter().all(|g| g == "mesh") {
                let field = if vs.gateways.is_empty() {
                    ""
                } else {
                    ".gateways"
                };
                out.warnings.push(file.error(
                    &format!("{at}{field}"),
                    format!("{label} applies only to `mesh` (sidecars; no gateways listed): skipped, Portico is a gateway"),
                ));
                return;
            }
            // Unknown match conditions widen a route unless the match is for sidecars only.
            let widens = |path: &str| {
                let Some(rest) = path.strip_prefix("http[") else {
                    return false;
                };
                let Some((ri, rest)) = rest.split_once(']') else {
                    return false;
                };
                let Some(rest) = rest.strip_prefix(".match[") else {
                    return false;
                };
                let Some((mi, _)) = rest.split_once(']') else {
                    return false;
                };
                let (Ok(ri), Ok(mi)) = (ri.parse::<usize>(), mi.parse::<usize>()) else {
                    return false;
                };
                let sidecar_only =
                    vs.http
                        .get(ri)
                        .and_then(|r| r.matches.get(mi))
                        .is_some_and(|m| {
                            !m.gateways.is_empty() && m.gateways.iter().all(|g| g == "mesh")
                        });
                !sidecar_only
            };
            report_unknown(file, &at, &unknown, widens, out);
            resolve_virtual_service(&mut vs, &ns);
            out.virtual_services.push((at, vs));
        }
        "DestinationRule" => {
            if let Some((mut dr, unknown)) = parse::<DestinationRule>(file, &at, spec, out) {
                report_unknown(file, &at, &unknown, |_| false, out);
                not_enforced_export(file, &at, &dr.export_to, kind, out);
                dr.host = fqdn(&dr.host, &ns);
                out.destination_rules.push((at, dr));
            }
        }
        "ServiceEntry" => {
            if let Some((se, unknown)) = parse::<ServiceEntry>(file, &at, spec, out) {
                report_unknown(file, &at, &unknown, |_| false, out);
                not_enforced_export(file, &at, &se.export_to, kind, out);
                // Istio takes ServiceEntry hosts as written: no short-name resolution.
                out.service_entries.push((at, se));
            }
        }
        "RateLimitPolicy" => {
            if let Some((p, unknown)) = parse::<RateLimitPolicy>(file, &at, spec, out) {
                unknown_are_errors(file, &at, &unknown, out);
                out.rate_limits.push((at, p));
            }
        }
        "AccessList" => {
            if let Some((l, unknown)) = parse::<AccessList>(file, &at, spec, out) {
                unknown_are_errors(file, &at, &unknown, out);
                out.access_lists.push((at, l));
            }
        }
        "RequestAuthentication" => {
            let spec = match spec {
                Value::Mapping(mut m) => {
                    // `targetRef` (singular) is the older form of `targetRefs`.
                    if let Some(one) = m.remove("targetRef") {
                        let refs = m
                            .entry("targetRefs".into())
                            .or_insert_with(|| Value::Sequence(Vec::new()));
                        if let Value::Sequence(refs) = refs {
                            refs.push(one);
                        }
                    }
                    Value::Mapping(m)
                }
                other => other,
            };
            if let Some((r, unknown)) = parse::<RequestAuthentication>(file, &at, spec, out) {
                report_unknown(file, &at, &unknown, |_| false, out);
                out.request_authentications.push((at, r));
            }
        }
        "AuthorizationPolicy" => {
            // An ignored field would widen or narrow who gets in: every unknown one is an
            // error.
            if let Some((p, unknown)) = parse::<AuthorizationPolicy>(file, &at, spec, out) {
                unknown_are_errors(file, &at, &unknown, out);
                out.authorization_policies.push((at, p));
            }
        }
        _ => {}
    }
}

/// Portico's own kinds have no field Portico does not read: an unknown one is a mistake.
fn unknown_are_errors(file: &SourceFile, at: &str, unknown: &[String], out: &mut Resources) {
    for path in unknown {
        let field = path.rsplit('.').next().unwrap_or(path);
        let field = field.split('[').next().unwrap_or(field);
        out.errors
            .push(file.error(&format!("{at}.{path}"), format!("unknown field `{field}`")));
    }
}

/// Deserializes a spec, collecting the paths of the fields the schema does not have.
fn parse<T: DeserializeOwned>(
    file: &SourceFile,
    at: &str,
    spec: Value,
    out: &mut Resources,
) -> Option<(T, Vec<String>)> {
    let mut unknown = Vec::new();
    let mut record = |p: serde_ignored::Path<'_>| unknown.push(ignored_path(&p));
    let result: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(spec, &mut record));
    match result {
        Ok(v) => Some((v, unknown)),
        Err(e) => {
            let path = e.path().to_string();
            let full = if path.is_empty() || path == "." || path == "?" {
                at.to_string()
            } else {
                format!("{at}.{path}")
            };
            out.errors
                .push(file.error(&full, e.into_inner().to_string()));
            None
        }
    }
}

fn report_unknown(
    file: &SourceFile,
    at: &str,
    unknown: &[String],
    widens_a_match: impl Fn(&str) -> bool,
    out: &mut Resources,
) {
    for path in unknown {
        let here = format!("{at}.{path}");
        let field = path.rsplit('.').next().unwrap_or(path);
        if widens_a_match(path) {
            out.errors.push(file.error(
                &here,
                format!("match condition {field} is not supported by Portico; ignoring it would make the route match requests it should not"),
            ));
        } else {
            out.warnings.push(file.error(
                &here,
                format!("{field} is not supported by Portico: ignored"),
            ));
        }
    }
}

fn not_enforced_export(
    file: &SourceFile,
    at: &str,
    export_to: &[String],
    kind: &str,
    out: &mut Resources,
) {
    if !exported_to(export_to, "", "any-namespace") {
        out.warnings.push(file.error(
            &format!("{at}.exportTo"),
            format!("exportTo is not enforced for a {kind}: Portico is one proxy and uses every {kind} it reads"),
        ));
    }
}

/// Short names in a VirtualService's hosts and destinations, as Istio resolves them.
fn resolve_virtual_service(vs: &mut VirtualService, ns: &str) {
    for h in &mut vs.hosts {
        *h = fqdn(h, ns);
    }
    for r in &mut vs.http {
        for d in &mut r.route {
            d.destination.host = fqdn(&d.destination.host, ns);
        }
        if let Some(m) = &mut r.mirror {
            m.host = fqdn(&m.host, ns);
        }
        for m in &mut r.mirrors {
            m.destination.host = fqdn(&m.destination.host, ns);
        }
    }
    let l4 = vs.tls.iter_mut().flat_map(|r| &mut r.route);
    for d in l4.chain(vs.tcp.iter_mut().flat_map(|r| &mut r.route)) {
        d.destination.host = fqdn(&d.destination.host, ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_like_istio() {
        assert_eq!(
            fqdn("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(fqdn("reviews", "prod"), "reviews.prod.svc.cluster.local");
        assert_eq!(fqdn("reviews.prod", "default"), "reviews.prod");
        assert_eq!(fqdn("*", "default"), "*");
        assert_eq!(fqdn("*.example.com", "default"), "*.example.com");
        assert_eq!(fqdn("10.0.0.1", "default"), "10.0.0.1");
        assert_eq!(fqdn("::1", "default"), "::1");
    }

    #[test]
    fn export_to() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(exported_to(&[], "a", "b"));
        assert!(exported_to(&v(&["*"]), "a", "b"));
        assert!(exported_to(&v(&["."]), "a", "a"));
        assert!(!exported_to(&v(&["."]), "a", "b"));
        assert!(exported_to(&v(&[".", "b"]), "a", "b"));
        assert!(!exported_to(&v(&["~"]), "a", "a"));
    }
}
