//! Compiles a VirtualService's HTTP routes: matches (strings and regexes compiled here),
//! header edits, rewrites, redirects, direct responses, retries, faults, mirrors, CORS and
//! weighted destinations, each destination's cluster taken from `clusters`. Reuses the
//! last compile's routes of an unchanged VirtualService. Binds nothing (`binding`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use regex::Regex;

use super::cache::{CachedRoutes, VsRoutes};
use super::{gateway_ref, Cx};
use crate::config::load::{Item, Origin};
use crate::config::schema::{self, StringMatch};
use crate::routing::route::{RouteOrigin, WeightedDestination};
use crate::routing::{
    Action, Cors, DirectResponse, Fault, Forward, HeaderOps, HeaderRules, Mirror, Redirect,
    RequestMatch, RetryOn, RetryPolicy, Rewrite, Route, StrMatch,
};

impl Cx {
    /// The routes the last compile made of this VirtualService (the same `Arc`, bound to the
    /// same gateways, or to any when `bound` is `None`), with their clusters and DNS names
    /// taken into this compile, and whether binding it was quiet.
    pub(super) fn reused_routes(
        &mut self,
        key: usize,
        spec: &Arc<schema::VirtualService>,
        bound: Option<&[String]>,
        pos: usize,
    ) -> Option<(VsRoutes, bool)> {
        let reuse = self.reuse.as_mut()?;
        let mut c = reuse
            .routes
            .remove(&key)
            .filter(|c| Arc::ptr_eq(&c.spec, spec) && bound.is_none_or(|b| c.bound == b))?;
        // The context is the last compile's, so its clusters are this compile's (`cluster`
        // hands out the same objects); each is taken in once.
        for cl in &c.clusters {
            if self.clusters_in.insert(Arc::as_ptr(cl) as usize) {
                self.clusters
                    .entry(cl.name.clone())
                    .or_insert_with(|| cl.clone());
            }
        }
        self.dns_names.extend(c.dns_names.iter().cloned());
        self.reused += 1;
        c.pos = pos as u32;
        let out = (c.routes.clone(), c.quiet);
        self.next_routes.insert(key, c);
        Some(out)
    }

    /// Compiles a VirtualService's HTTP routes, and keeps them for the next compile when
    /// they compiled cleanly.
    pub(super) fn compile_routes(
        &mut self,
        key: usize,
        vs: &Item<schema::VirtualService>,
        bound: &[String],
        ns: &str,
        pos: usize,
        quiet: bool,
    ) -> VsRoutes {
        let (v, o) = (&*vs.spec, &vs.origin);
        let vs_key = &format!("{ns}/{}", v.name);
        let (warnings, errors, dns) =
            (self.warnings.len(), self.errors.len(), self.dns_names.len());
        self.touched.clear();
        let routes: Arc<[Arc<Route>]> = v
            .http
            .iter()
            .enumerate()
            .filter_map(|(ri, r)| {
                // A route for other proxies only (`gateways: [mesh]` in every match) is
                // not compiled: its destinations are the sidecars' business.
                let elsewhere = |m: &schema::HttpMatchRequest| {
                    !m.gateways.is_empty()
                        && !m
                            .gateways
                            .iter()
                            .any(|g| bound.contains(&gateway_ref(g, ns)))
                };
                if !r.matches.is_empty() && r.matches.iter().all(elsewhere) {
                    self.warn(
                        o,
                        &format!(".http[{ri}].match"),
                        "every match is for other gateways or `mesh`: not applied here",
                    );
                    return None;
                }
                self.route(o, vs_key, ns, ri, r).map(Arc::new)
            })
            .collect();
        let per_gateway = routes
            .iter()
            .any(|r| r.matches.iter().any(|m| !m.gateways.is_empty()));
        let routes = VsRoutes {
            routes,
            per_gateway,
        };
        // Only a clean compile is kept: a reused one would not repeat its warnings.
        if self.warnings.len() == warnings && self.errors.len() == errors {
            self.next_routes.insert(
                key,
                CachedRoutes {
                    spec: vs.spec.clone(),
                    bound: bound.to_vec(),
                    routes: routes.clone(),
                    clusters: self
                        .touched
                        .iter()
                        .filter_map(|n| self.clusters.get(n).cloned())
                        .collect(),
                    dns_names: self.dns_names[dns..].to_vec(),
                    pos: pos as u32,
                    quiet,
                },
            );
        }
        routes
    }

    pub(super) fn route(
        &mut self,
        o: &Origin,
        vs: &str,
        ns: &str,
        ri: usize,
        r: &schema::HttpRoute,
    ) -> Option<Route> {
        let at = format!(".http[{ri}]");
        let errors_before = self.errors.len();
        let matches: Vec<RequestMatch> = r
            .matches
            .iter()
            .enumerate()
            .filter_map(|(mi, m)| self.request_match(o, &format!("{at}.match[{mi}]"), ns, m))
            .collect();
        let headers = self.header_rules(o, &format!("{at}.headers"), r.headers.as_ref());
        let timeout = r.timeout.map(|d| d.get()).filter(|d| !d.is_zero());
        let cors = r
            .cors_policy
            .as_ref()
            .and_then(|c| self.cors(o, &format!("{at}.corsPolicy"), c));
        if r.delegate.is_some() {
            self.err(
                o,
                &format!("{at}.delegate"),
                "delegate VirtualServices are not supported yet: write the routes in the root VirtualService",
            );
        }
        let forwards = !r.route.is_empty();
        for (field, set) in [
            ("retries", r.retries.is_some()),
            ("fault", r.fault.is_some()),
            ("mirror", r.mirror.is_some() || !r.mirrors.is_empty()),
            ("timeout", r.timeout.is_some()),
        ] {
            if set && !forwards && (r.redirect.is_some() || r.direct_response.is_some()) {
                self.err(
                    o,
                    &format!("{at}.{field}"),
                    format!("{field} applies only to a route that forwards (route = [...])"),
                );
            }
        }
        let action = match (&r.redirect, &r.direct_response, r.route.is_empty()) {
            (Some(red), None, true) => {
                if r.rewrite.is_some() {
                    self.err(
                        o,
                        &format!("{at}.rewrite"),
                        "a redirect route cannot also rewrite",
                    );
                }
                self.redirect(o, &format!("{at}.redirect"), red)
                    .map(Action::Redirect)
            }
            (None, Some(d), true) => self
                .direct(o, &format!("{at}.directResponse"), d)
                .map(Action::Direct),
            (None, None, false) => {
                let destinations = self.destinations(o, &at, &r.route);
                let rewrite = r.rewrite.as_ref().map(|rw| {
                    let authority = match &rw.authority {
                        Some(a) => match HeaderValue::from_str(a) {
                            Ok(v) => Some(v),
                            Err(_) => {
                                self.err(
                                    o,
                                    &format!("{at}.rewrite.authority"),
                                    "not a valid Host value",
                                );
                                None
                            }
                        },
                        None => None,
                    };
                    if let Some(u) = &rw.uri {
                        if !u.starts_with('/') {
                            self.err(o, &format!("{at}.rewrite.uri"), "must start with /");
                        }
                    }
                    Rewrite {
                        uri: rw.uri.clone(),
                        authority,
                    }
                });
                let retries = self.retries(o, &at, r.retries.as_ref());
                let fault = self.fault(o, &format!("{at}.fault"), r.fault.as_ref());
                let mirrors = self.mirrors(o, &at, r);
                destinations.map(|(destinations, total_weight)| {
                    Action::Forward(Forward {
                        destinations,
                        total_weight,
                        rewrite,
                        timeout,
                        retries,
                        fault,
                        mirrors,
                    })
                })
            }
            (None, None, true) => {
                self.err(
                    o,
                    &at,
                    "a route needs one of route, redirect or directResponse",
                );
                None
            }
            _ => {
                self.err(
                    o,
                    &at,
                    "route, redirect and directResponse are mutually exclusive",
                );
                None
            }
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Route {
            name: r.name.clone(),
            origin: RouteOrigin {
                virtual_service: vs.to_string(),
                index: ri,
            },
            matches,
            action: action?,
            headers,
            cors,
        })
    }

    fn retries(&mut self, o: &Origin, at: &str, r: Option<&schema::HttpRetry>) -> RetryPolicy {
        let Some(r) = r else {
            return RetryPolicy::istio_default();
        };
        let here = format!("{at}.retries");
        let attempts = match r.attempts {
            None => 0,
            Some(a) if (0..=10).contains(&a) => a as u32,
            Some(a) => {
                self.err(
                    o,
                    &format!("{here}.attempts"),
                    format!("{a}: attempts must be 0-10"),
                );
                0
            }
        };
        let on = match r.retry_on.as_deref() {
            None | Some("") => RetryPolicy::istio_default().on,
            Some(text) => match RetryOn::parse(text) {
                Ok(on) => on,
                Err(e) => {
                    self.err(o, &format!("{here}.retryOn"), e);
                    RetryOn::default()
                }
            },
        };
        if r.retry_remote_localities.is_some() {
            self.warn(
                o,
                &format!("{here}.retryRemoteLocalities"),
                "ignored: Portico has no localities",
            );
        }
        if r.retry_ignore_previous_hosts == Some(false) {
            self.warn(
                o,
                &format!("{here}.retryIgnorePreviousHosts"),
                "ignored: a retry always prefers an endpoint not tried yet",
            );
        }
        if let Some(t) = r.per_try_timeout {
            if t.get() < Duration::from_millis(1) {
                self.err(o, &format!("{here}.perTryTimeout"), "must be at least 1ms");
            }
        }
        RetryPolicy {
            attempts,
            per_try_timeout: r.per_try_timeout.map(|d| d.get()),
            on,
            backoff: r
                .backoff
                .map(|d| d.get())
                .unwrap_or(Duration::from_millis(25)),
        }
    }

    fn percent(&mut self, o: &Origin, at: &str, p: Option<&schema::Percent>, missing: f64) -> f64 {
        match p {
            None => missing,
            Some(p) if (0.0..=100.0).contains(&p.value) => p.value,
            Some(p) => {
                self.err(
                    o,
                    &format!("{at}.value"),
                    format!("{} is not a percentage (0-100)", p.value),
                );
                0.0
            }
        }
    }

    fn fault(
        &mut self,
        o: &Origin,
        at: &str,
        f: Option<&schema::HttpFaultInjection>,
    ) -> Option<Fault> {
        let f = f?;
        let delay = f.delay.as_ref().and_then(|d| {
            let here = format!("{at}.delay");
            if d.exponential_delay.is_some() {
                self.err(
                    o,
                    &format!("{here}.exponentialDelay"),
                    "not supported (as in Istio); use fixedDelay",
                );
            }
            let Some(fixed) = d.fixed_delay else {
                self.err(o, &here, "fixedDelay is required");
                return None;
            };
            // A missing percentage injects nothing, as in current Istio.
            let pct = match (&d.percentage, d.percent) {
                (Some(p), _) => self.percent(o, &format!("{here}.percentage"), Some(p), 0.0),
                (None, Some(p)) => f64::from(p.min(100)),
                (None, None) => 0.0,
            };
            Some((fixed.get(), pct))
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let here = format!("{at}.abort");
            if a.grpc_status.is_some() || a.http2_error.is_some() {
                self.err(
                    o,
                    &here,
                    "grpcStatus and http2Error aborts are not supported yet; use httpStatus",
                );
                return None;
            }
            let status = match a.http_status {
                Some(s) if (200..=599).contains(&s) => s as u16,
                Some(s) => {
                    self.err(
                        o,
                        &format!("{here}.httpStatus"),
                        format!("{s} is not a status code (200-599)"),
                    );
                    return None;
                }
                None => {
                    self.err(o, &here, "httpStatus is required");
                    return None;
                }
            };
            let pct = self.percent(o, &format!("{here}.percentage"), a.percentage.as_ref(), 0.0);
            Some((status, pct))
        });
        Some(Fault { delay, abort })
    }

    fn mirrors(&mut self, o: &Origin, at: &str, r: &schema::HttpRoute) -> Vec<Mirror> {
        let mut out = Vec::new();
        if r.mirror.is_some() && !r.mirrors.is_empty() {
            self.err(
                o,
                &format!("{at}.mirrors"),
                "mirror and mirrors are mutually exclusive",
            );
            return out;
        }
        if let Some(d) = &r.mirror {
            // An absent percentage mirrors everything; mirrorPercent is the deprecated form.
            let pct = match (&r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => self.percent(o, &format!("{at}.mirrorPercentage"), Some(p), 100.0),
                (None, Some(p)) => f64::from(p.min(100)),
                (None, None) => 100.0,
            };
            if let Some(cluster) = self.cluster(o, &format!("{at}.mirror"), d) {
                out.push(Mirror {
                    cluster,
                    percent: pct,
                });
            }
        }
        for (i, m) in r.mirrors.iter().enumerate() {
            let pct = self.percent(
                o,
                &format!("{at}.mirrors[{i}].percentage"),
                m.percentage.as_ref(),
                100.0,
            );
            if let Some(cluster) =
                self.cluster(o, &format!("{at}.mirrors[{i}].destination"), &m.destination)
            {
                out.push(Mirror {
                    cluster,
                    percent: pct,
                });
            }
        }
        out
    }

    fn cors(&mut self, o: &Origin, at: &str, c: &schema::CorsPolicy) -> Option<Cors> {
        let mut origins = Vec::new();
        for (i, m) in c.allow_origins.iter().enumerate() {
            if let Some(sm) = self.string_match(o, &format!("{at}.allowOrigins[{i}]"), m, false) {
                origins.push(sm);
            }
        }
        for origin in &c.allow_origin {
            origins.push(if origin == "*" {
                StrMatch::Present
            } else {
                StrMatch::Exact(origin.clone())
            });
        }
        if !c.allow_origin.is_empty() {
            self.warn(
                o,
                &format!("{at}.allowOrigin"),
                "deprecated: use allowOrigins",
            );
        }
        if c.unmatched_preflights.is_some() {
            self.warn(
                o,
                &format!("{at}.unmatchedPreflights"),
                "ignored: unmatched preflights are forwarded",
            );
        }
        let mut join = |field: &str, v: &[String]| -> Option<HeaderValue> {
            if v.is_empty() {
                return None;
            }
            match HeaderValue::from_str(&v.join(",")) {
                Ok(h) => Some(h),
                Err(_) => {
                    self.err(o, &format!("{at}.{field}"), "not a valid header value");
                    None
                }
            }
        };
        let allow_methods = join("allowMethods", &c.allow_methods);
        let allow_headers = join("allowHeaders", &c.allow_headers);
        let expose_headers = join("exposeHeaders", &c.expose_headers);
        Some(Cors {
            allow_origins: origins,
            allow_methods,
            allow_headers,
            expose_headers,
            max_age: c
                .max_age
                .and_then(|d| HeaderValue::from_str(&d.get().as_secs().to_string()).ok()),
            allow_credentials: c.allow_credentials.unwrap_or(false),
        })
    }

    fn string_match(
        &mut self,
        o: &Origin,
        at: &str,
        m: &StringMatch,
        allow_presence: bool,
    ) -> Option<StrMatch> {
        match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), None, None) => Some(StrMatch::Exact(e.clone())),
            (None, Some(p), None) => Some(StrMatch::Prefix(p.clone())),
            (None, None, Some(r)) if allow_presence && r == "*" => Some(StrMatch::Present),
            (None, None, Some(r)) => match Regex::new(&format!("^(?:{r})$")) {
                Ok(re) => Some(StrMatch::Regex(re)),
                Err(e) => {
                    self.err(o, &format!("{at}.regex"), format!("invalid regex: {e}"));
                    None
                }
            },
            (None, None, None) if allow_presence => Some(StrMatch::Present),
            (None, None, None) => {
                self.err(o, at, "set one of exact, prefix or regex");
                None
            }
            _ => {
                self.err(o, at, "exact, prefix and regex are mutually exclusive");
                None
            }
        }
    }

    fn request_match(
        &mut self,
        o: &Origin,
        at: &str,
        ns: &str,
        m: &schema::HttpMatchRequest,
    ) -> Option<RequestMatch> {
        let mut out = RequestMatch {
            name: m.name.clone(),
            ignore_uri_case: m.ignore_uri_case,
            ..Default::default()
        };
        if let Some(u) = &m.uri {
            out.uri = self.string_match(o, &format!("{at}.uri"), u, false);
            if let (true, Some(StrMatch::Regex(_))) = (m.ignore_uri_case, &out.uri) {
                self.warn(
                    o,
                    &format!("{at}.ignoreUriCase"),
                    "applies to exact and prefix only; write (?i) in the regex",
                );
            }
        }
        if let Some(x) = &m.method {
            out.method = self.string_match(o, &format!("{at}.method"), x, false);
        }
        if let Some(x) = &m.authority {
            out.authority = self.string_match(o, &format!("{at}.authority"), x, false);
        }
        if let Some(x) = &m.scheme {
            out.scheme = self.string_match(o, &format!("{at}.scheme"), x, false);
        }
        for (field, src, dst) in [
            ("headers", &m.headers, &mut out.headers),
            (
                "withoutHeaders",
                &m.without_headers,
                &mut out.without_headers,
            ),
        ] {
            for (k, v) in src {
                let here = format!("{at}.{field}.{k}");
                if matches!(k.as_str(), "uri" | "scheme" | "method" | "authority")
                    || k.starts_with(':')
                {
                    self.err(
                        o,
                        &here,
                        format!(
                            "{k:?} cannot be matched as a header; use the match field of that name"
                        ),
                    );
                    continue;
                }
                if k.bytes().any(|b| b.is_ascii_uppercase()) {
                    self.err(o, &here, "header names must be lower case");
                    continue;
                }
                let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
                    self.err(o, &here, format!("{k:?} is not a valid header name"));
                    continue;
                };
                if let Some(sm) = self.string_match(o, &here, v, true) {
                    dst.push((name, sm));
                }
            }
        }
        for (k, v) in &m.query_params {
            if let Some(sm) = self.string_match(o, &format!("{at}.queryParams.{k}"), v, true) {
                out.query.push((k.clone(), sm));
            }
        }
        if let Some(p) = m.port {
            match u16::try_from(p) {
                Ok(p) if p > 0 => out.port = Some(p),
                _ => self.err(o, &format!("{at}.port"), "port must be 1-65535"),
            }
        }
        out.gateways = m.gateways.iter().map(|g| gateway_ref(g, ns)).collect();
        for (i, cidr) in m.source_ip.iter().enumerate() {
            let parsed = cidr
                .parse::<ipnet::IpNet>()
                .or_else(|_| cidr.parse::<IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(n) => out.source_ip.push(n),
                Err(_) => self.err(
                    o,
                    &format!("{at}.sourceIp[{i}]"),
                    format!("{cidr:?} is not an IP address or CIDR"),
                ),
            }
        }
        Some(out)
    }

    fn header_rules(&mut self, o: &Origin, at: &str, h: Option<&schema::Headers>) -> HeaderRules {
        let Some(h) = h else {
            return HeaderRules::default();
        };
        HeaderRules {
            request: self.header_ops(o, &format!("{at}.request"), h.request.as_ref()),
            response: self.header_ops(o, &format!("{at}.response"), h.response.as_ref()),
        }
    }

    fn header_ops(
        &mut self,
        o: &Origin,
        at: &str,
        ops: Option<&schema::HeaderOperations>,
    ) -> HeaderOps {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let mut out = HeaderOps::default();
        for (field, src, dst) in [
            ("set", &ops.set, &mut out.set),
            ("add", &ops.add, &mut out.add),
        ] {
            for (k, v) in src {
                let here = format!("{at}.{field}.{k}");
                let name = match HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()) {
                    Ok(n) if !k.starts_with(':') => n,
                    _ => {
                        self.err(
                            o,
                            &here,
                            format!("{k:?} is not a header name Portico can set"),
                        );
                        continue;
                    }
                };
                match HeaderValue::from_str(v) {
                    Ok(val) => dst.push((HeaderOps::wire_name(name), val)),
                    Err(_) => self.err(o, &here, "not a valid header value"),
                }
            }
        }
        for (i, k) in ops.remove.iter().enumerate() {
            match HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()) {
                Ok(n) => out.remove.push(n),
                Err(_) => self.err(
                    o,
                    &format!("{at}.remove[{i}]"),
                    format!("{k:?} is not a header name"),
                ),
            }
        }
        out
    }

    fn redirect(&mut self, o: &Origin, at: &str, r: &schema::HttpRedirect) -> Option<Redirect> {
        let code = match r.redirect_code.unwrap_or(301) {
            c @ (301 | 302 | 303 | 307 | 308) => c as u16,
            0 => 301,
            other => {
                self.err(
                    o,
                    &format!("{at}.redirectCode"),
                    format!("{other} is not a redirect code (301, 302, 303, 307, 308)"),
                );
                return None;
            }
        };
        if let Some(s) = &r.scheme {
            if s != "http" && s != "https" {
                self.err(o, &format!("{at}.scheme"), "must be http or https");
            }
        }
        let port = match r.port {
            None => None,
            Some(p) => match u16::try_from(p) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    self.err(o, &format!("{at}.port"), "port must be 1-65535");
                    None
                }
            },
        };
        Some(Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            port,
            scheme: r.scheme.clone(),
            code,
        })
    }

    fn direct(
        &mut self,
        o: &Origin,
        at: &str,
        d: &schema::HttpDirectResponse,
    ) -> Option<DirectResponse> {
        if !(200..=599).contains(&d.status) {
            self.err(o, &format!("{at}.status"), "status must be 200-599");
            return None;
        }
        let body = match d.body.as_ref().map(|b| (&b.string, &b.bytes)) {
            None | Some((None, None)) => Bytes::new(),
            Some((Some(s), None)) => Bytes::from(s.clone()),
            Some((None, Some(b64))) => {
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        self.err(o, &format!("{at}.body.bytes"), format!("not base64: {e}"));
                        return None;
                    }
                }
            }
            Some((Some(_), Some(_))) => {
                self.err(
                    o,
                    &format!("{at}.body"),
                    "string and bytes are mutually exclusive",
                );
                return None;
            }
        };
        if body.len() > 1024 * 1024 {
            self.err(
                o,
                &format!("{at}.body"),
                "a direct response body may be at most 1 MiB",
            );
            return None;
        }
        Some(DirectResponse {
            status: d.status as u16,
            body,
        })
    }

    fn destinations(
        &mut self,
        o: &Origin,
        at: &str,
        route: &[schema::HttpRouteDestination],
    ) -> Option<(Vec<WeightedDestination>, u32)> {
        let several = route.len() > 1;
        let mut out = Vec::new();
        let mut ok = true;
        for (di, d) in route.iter().enumerate() {
            let here = format!("{at}.route[{di}]");
            let Some(weight) = self.weight(o, &here, d.weight) else {
                ok = false;
                continue;
            };
            let headers = self.header_rules(o, &format!("{here}.headers"), d.headers.as_ref());
            let Some(cluster) = self.cluster(o, &format!("{here}.destination"), &d.destination)
            else {
                ok = false;
                continue;
            };
            // Weights are relative; with several destinations, weight 0 (or none) gets nothing.
            if several && weight == 0 {
                continue;
            }
            out.push(WeightedDestination {
                cluster,
                weight: if several { weight } else { 1 },
                headers,
            });
        }
        if !ok {
            return None;
        }
        let total = self.total_weight(o, at, out.iter().map(|d| d.weight))?;
        Some((out, total))
    }

    /// A route destination's `weight` (none: 0), or `None` after reporting a bad one.
    pub(super) fn weight(&mut self, o: &Origin, here: &str, weight: Option<i64>) -> Option<u32> {
        match weight {
            Some(w) if w < 0 => {
                self.err(
                    o,
                    &format!("{here}.weight"),
                    format!("weight {w} is negative"),
                );
                None
            }
            Some(w) if w > i64::from(u32::MAX / 2) => {
                self.err(o, &format!("{here}.weight"), "weight is too large");
                None
            }
            Some(w) => Some(w as u32),
            None => Some(0),
        }
    }

    /// The sum of the weights of a route's kept destinations; `None` (reported) when it
    /// is 0, which would leave the route nowhere to go.
    pub(super) fn total_weight(
        &mut self,
        o: &Origin,
        at: &str,
        weights: impl Iterator<Item = u32>,
    ) -> Option<u32> {
        let total: u32 = weights.sum();
        if total == 0 {
            self.err(
                o,
                &format!("{at}.route"),
                "total destination weight is 0: with several destinations, give at least one a positive weight",
            );
            return None;
        }
        Some(total)
    }
}
