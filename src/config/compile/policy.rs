//! Compiles rate limits (`rateLimits`), access lists (`accessLists`) and `mesh.redis` into
//! the Snapshot's `policy::Policies`: selectors and limits typed, targets resolved to the
//! routes they cover. Bucket tables, access lists' fetched entries and Redis connections
//! are carried from the last compile (`PolicyCache`) while what they were built from is
//! unchanged, so a reload that does not touch a rule keeps its counts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::{gateway_ref, key, Cx};
use crate::config::load::{Document, Origin};
use crate::config::schema;
use crate::policy::access::{self, AccessList, Entries, EntryType, ListKey, ProviderUrl};
use crate::policy::global::{Algorithm, GlobalRule, RedisLimiter, RedisSettings};
use crate::policy::jwks::{Jwks, KeySet, RemoteJwks, Target};
use crate::policy::jwt::{Authn, JwtRule, Location, RuleParts};
use crate::policy::local::{BucketTable, LocalRule};
use crate::policy::selector::{
    Condition, Override, PathMatch, PathTemplate, Rate, Selector, SourceMatch, ValueMatch,
    ValueTest,
};
use crate::policy::{GlobalLimits, Policies, RoutePolicies, RoutePolicy};
use crate::snapshot::Listener;

/// How long a `jwksUri` fetch may take unless `timeout` says (Istio's default).
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a `jwksUri` is fetched again unless `jwksRefreshInterval` says (istiod's
/// `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);

/// Keys a local rule remembers unless `maxKeys` says otherwise.
pub const DEFAULT_MAX_KEYS: u32 = 100_000;
/// How long a global decision may wait for Redis unless `mesh.redis.timeout` says.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

/// What a compile keeps for the next: state that must outlive a reload.
#[derive(Default)]
pub struct PolicyCache {
    /// By `<policy>/local/<index>`: the rule and `maxKeys` it was made for, and its table.
    tables: HashMap<String, (schema::RateLimitRule, u32, Arc<BucketTable>)>,
    /// By `namespace/name`.
    lists: HashMap<String, (schema::AccessList, Arc<AccessList>)>,
    /// The settings and password it was made with.
    redis: Option<(schema::Redis, Option<String>, Arc<RedisLimiter>)>,
    /// By `jwksUri`: the set fetched (kept while its timeout and interval stay).
    jwks: HashMap<String, Arc<RemoteJwks>>,
}

/// The policies compiled from the Document, before they are bound to routes.
pub struct Compiled {
    policies: Vec<CompiledPolicy>,
    lists: BTreeMap<String, Arc<AccessList>>,
    list_targets: Vec<(Targets, Arc<AccessList>)>,
    redis: Option<Arc<RedisLimiter>>,
    /// Each RequestAuthentication's targets (`None`: every gateway) and JWT rules.
    authn: Vec<(Option<Targets>, Vec<Arc<JwtRule>>)>,
    next: PolicyCache,
}

struct CompiledPolicy {
    targets: Targets,
    local: Vec<(Arc<LocalRule>, bool)>,
    global: Vec<(Arc<GlobalRule>, bool)>,
}

/// A policy's targetRefs, resolved to names.
#[derive(Default)]
struct Targets {
    gateways: Vec<String>,
    /// VirtualService key and, with `sectionName`, one route's name.
    virtual_services: Vec<(String, Option<String>)>,
    hosts: Vec<String>,
}

impl Targets {
    fn is_empty(&self) -> bool {
        self.gateways.is_empty() && self.virtual_services.is_empty() && self.hosts.is_empty()
    }

    fn covers(&self, gateways: &[&str], vs: &str, route: Option<&str>, host: &str) -> bool {
        self.gateways.iter().any(|g| gateways.contains(&g.as_str()))
            || self.hosts.iter().any(|h| h == host)
            || self
                .virtual_services
                .iter()
                .any(|(v, r)| v == vs && r.as_deref().is_none_or(|r| Some(r) == route))
    }
}

fn unit(text: &str) -> Result<Duration, String> {
    Ok(Duration::from_secs(match text {
        "Second" => 1,
        "Minute" => 60,
        "Hour" => 3600,
        "Day" => 86_400,
        other => return Err(format!("{other:?} is not Second, Minute, Hour or Day")),
    }))
}

impl Cx {
    /// Compiles every rate limit, access list and `mesh.redis`; `cache` is only read (the
    /// caller keeps `Compiled::next` when the whole compile succeeds).
    pub(super) fn policies(&mut self, doc: &Document, cache: &PolicyCache) -> Compiled {
        let mut next = PolicyCache::default();
        let redis = self.redis(doc, cache, &mut next);
        let mut policies = Vec::new();
        for item in &doc.rate_limits {
            if let Some(p) = self.rate_limit_policy(doc, item, cache, &mut next, redis.as_ref()) {
                policies.push(p);
            }
        }
        let mut lists = BTreeMap::new();
        let mut list_targets = Vec::new();
        for item in &doc.access_lists {
            let (l, o) = (&*item.spec, &item.origin);
            let k = key(&l.namespace, &l.name);
            let targets = self.targets(doc, o, &l.target_refs);
            let list = match cache.lists.get(&k) {
                Some((spec, list)) if spec == l => list.clone(),
                _ => match self.access_list(o, l, k.clone()) {
                    Some(list) => Arc::new(list),
                    None => continue,
                },
            };
            next.lists.insert(k.clone(), (l.clone(), list.clone()));
            if lists.insert(k.clone(), list.clone()).is_some() {
                self.err(o, ".name", format!("a second access list named {k}"));
            }
            if !targets.is_empty() {
                list_targets.push((targets, list));
            }
        }
        let mut authn = Vec::new();
        for item in &doc.request_authentications {
            if let Some(a) = self.request_authentication(doc, item, cache, &mut next) {
                authn.push(a);
            }
        }
        Compiled {
            policies,
            lists,
            list_targets,
            redis,
            authn,
            next,
        }
    }

    /// A RequestAuthentication: where it applies (`None`: every gateway) and its rules.
    /// `None` when it applies nowhere (a selector of other workloads) or is wrong.
    fn request_authentication(
        &mut self,
        doc: &Document,
        item: &crate::config::load::Item<schema::RequestAuthentication>,
        cache: &PolicyCache,
        next: &mut PolicyCache,
    ) -> Option<(Option<Targets>, Vec<Arc<JwtRule>>)> {
        let (ra, o) = (&*item.spec, &item.origin);
        let labels = ra.selector.as_ref().map(|s| &s.match_labels);
        let targets = match (labels.filter(|l| !l.is_empty()), ra.target_refs.is_empty()) {
            (Some(_), false) => {
                self.err(
                    o,
                    ".selector",
                    "only one of selector and targetRefs may be set",
                );
                return None;
            }
            (None, true) => None,
            (None, false) => Some(self.targets(doc, o, &ra.target_refs)),
            (Some(labels), true) => {
                // The gateways whose pods the selector picks: those whose own selector
                // has every label it asks for.
                let gateways: Vec<String> = doc
                    .gateways
                    .iter()
                    .filter(|g| {
                        labels
                            .iter()
                            .all(|(k, v)| g.spec.selector.get(k) == Some(v))
                    })
                    .map(|g| key(&g.spec.namespace, &g.spec.name))
                    .collect();
                if gateways.is_empty() {
                    self.warn(
                        o,
                        ".selector",
                        "selects no Gateway's workload (it is for other workloads, such as sidecars): skipped",
                    );
                    return None;
                }
                Some(Targets {
                    gateways,
                    ..Targets::default()
                })
            }
        };
        let errors = self.errors.len();
        let mut rules = Vec::new();
        for (i, r) in ra.jwt_rules.iter().enumerate() {
            if let Some(rule) = self.jwt_rule(o, &format!(".jwtRules[{i}]"), r, cache, next) {
                rules.push(Arc::new(rule));
            }
        }
        if self.errors.len() > errors || rules.is_empty() {
            return None;
        }
        Some((targets, rules))
    }

    fn jwt_rule(
        &mut self,
        o: &Origin,
        at: &str,
        r: &schema::JwtRule,
        cache: &PolicyCache,
        next: &mut PolicyCache,
    ) -> Option<JwtRule> {
        let errors = self.errors.len();
        if r.issuer.is_empty() {
            self.err(o, &format!("{at}.issuer"), "is required");
        }
        let header_name = |cx: &mut Cx, here: String, name: &str| {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                cx.err(o, &here, format!("{name:?} is not a header name"));
            }
        };
        let mut locations = Vec::new();
        for (i, h) in r.from_headers.iter().enumerate() {
            header_name(self, format!("{at}.fromHeaders[{i}].name"), &h.name);
            locations.push(Location::Header {
                name: h.name.to_ascii_lowercase(),
                prefix: h.prefix.clone(),
            });
        }
        for (i, p) in r.from_params.iter().enumerate() {
            if p.is_empty() {
                self.err(o, &format!("{at}.fromParams[{i}]"), "is empty");
            }
            locations.push(Location::Param(p.clone()));
        }
        for (i, c) in r.from_cookies.iter().enumerate() {
            if c.is_empty() || c.contains([';', '=', ' ']) {
                self.err(
                    o,
                    &format!("{at}.fromCookies[{i}]"),
                    format!("{c:?} is not a cookie name"),
                );
            }
            locations.push(Location::Cookie(c.clone()));
        }
        if let Some(h) = &r.output_payload_to_header {
            header_name(self, format!("{at}.outputPayloadToHeader"), h);
        }
        let mut output_claims = Vec::new();
        for (i, c) in r.output_claim_to_headers.iter().enumerate() {
            header_name(
                self,
                format!("{at}.outputClaimToHeaders[{i}].header"),
                &c.header,
            );
            if c.claim.is_empty() {
                self.err(
                    o,
                    &format!("{at}.outputClaimToHeaders[{i}].claim"),
                    "is required",
                );
            }
            output_claims.push((c.header.clone(), c.claim.clone()));
        }
        let timeout = r.timeout.map(|d| d.get()).unwrap_or(DEFAULT_JWKS_TIMEOUT);
        let refresh = r
            .jwks_refresh_interval
            .map(|d| d.get())
            .unwrap_or(DEFAULT_JWKS_REFRESH);
        if r.jwks_uri.is_none() && (r.timeout.is_some() || r.jwks_refresh_interval.is_some()) {
            self.err(
                o,
                at,
                "timeout and jwksRefreshInterval apply to jwksUri only",
            );
        }
        if timeout.is_zero() {
            self.err(o, &format!("{at}.timeout"), "must be more than 0s");
        }
        if refresh < Duration::from_secs(1) {
            self.err(
                o,
                &format!("{at}.jwksRefreshInterval"),
                "must be at least 1s",
            );
        }
        let jwks = match (&r.jwks, &r.jwks_uri) {
            (Some(_), Some(_)) => {
                self.err(o, at, "only one of jwks and jwksUri may be set");
                None
            }
            (None, None) => {
                self.err(
                    o,
                    at,
                    "needs jwks or jwksUri (Portico does not discover keys through the issuer's OpenID configuration)",
                );
                None
            }
            (Some(text), None) => match KeySet::parse(text) {
                Ok(set) => Some(Jwks::Inline(Arc::new(set))),
                Err(e) => {
                    self.err(o, &format!("{at}.jwks"), e);
                    None
                }
            },
            (None, Some(uri)) => match Target::parse(uri) {
                Ok(target) => {
                    let remote = match cache.jwks.get(uri) {
                        Some(j) if j.timeout == timeout && j.refresh == refresh => j.clone(),
                        _ => match next.jwks.get(uri) {
                            Some(j) if j.timeout == timeout && j.refresh == refresh => j.clone(),
                            _ => Arc::new(RemoteJwks::new(uri.clone(), target, timeout, refresh)),
                        },
                    };
                    next.jwks.insert(uri.clone(), remote.clone());
                    Some(Jwks::Remote(remote))
                }
                Err(e) => {
                    self.err(o, &format!("{at}.jwksUri"), e);
                    None
                }
            },
        };
        if self.errors.len() > errors {
            return None;
        }
        Some(JwtRule::new(RuleParts {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks: jwks?,
            locations,
            output_payload: r.output_payload_to_header.clone(),
            output_claims,
            forward: r.forward_original_token.unwrap_or(false),
        }))
    }

    fn redis(
        &mut self,
        doc: &Document,
        cache: &PolicyCache,
        next: &mut PolicyCache,
    ) -> Option<Arc<RedisLimiter>> {
        let r = doc.mesh.spec.redis.as_ref()?;
        let o = &doc.mesh.origin;
        let password = match &r.password_file {
            Some(f) => {
                let path = doc.main.resolve(f);
                match std::fs::read_to_string(&path) {
                    Ok(t) => Some(t.trim_end_matches(['\r', '\n']).to_string()),
                    Err(e) => {
                        self.err(
                            o,
                            ".redis.passwordFile",
                            format!("cannot read {}: {e}", path.display()),
                        );
                        return None;
                    }
                }
            }
            None => None,
        };
        if let Some((spec, pw, limiter)) = &cache.redis {
            if spec == r && *pw == password {
                next.redis = Some((spec.clone(), pw.clone(), limiter.clone()));
                return Some(limiter.clone());
            }
        }
        let mut info: redis::ConnectionInfo = match r.url.parse() {
            Ok(i) => i,
            Err(e) => {
                self.err(
                    o,
                    ".redis.url",
                    format!("{:?} is not a Redis URL: {e}", r.url),
                );
                return None;
            }
        };
        let address = match &info.addr {
            redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
            redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
            redis::ConnectionAddr::Unix(p) => p.display().to_string(),
        };
        let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
        if password.is_some() {
            info.redis.password = password.clone();
        }
        if r.username.is_some() {
            info.redis.username = r.username.clone();
        }
        let client = match (&r.tls, tls) {
            (Some(_), false) => {
                self.err(o, ".redis.tls", "TLS settings need a rediss:// url");
                return None;
            }
            (Some(t), true) => {
                let read = |cx: &mut Cx, field: &str, f: &Option<String>| -> Option<Vec<u8>> {
                    let f = f.as_ref()?;
                    let path = doc.main.resolve(f);
                    match std::fs::read(&path) {
                        Ok(b) => Some(b),
                        Err(e) => {
                            cx.err(
                                o,
                                &format!(".redis.tls.{field}"),
                                format!("cannot read {}: {e}", path.display()),
                            );
                            None
                        }
                    }
                };
                let root_cert = read(self, "caCertificates", &t.ca_certificates);
                let cert = read(self, "clientCertificate", &t.client_certificate);
                let key = read(self, "privateKey", &t.private_key);
                let client_tls = match (cert, key) {
                    (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                    (None, None) => None,
                    _ => {
                        self.err(
                            o,
                            ".redis.tls",
                            "clientCertificate and privateKey go together",
                        );
                        return None;
                    }
                };
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls,
                        root_cert,
                    },
                )
            }
            (None, _) => redis::Client::open(info),
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                self.err(o, ".redis", format!("cannot set up the Redis client: {e}"));
                return None;
            }
        };
        let timeout = r.timeout.map(|d| d.get()).unwrap_or(DEFAULT_REDIS_TIMEOUT);
        if timeout.is_zero() {
            self.err(o, ".redis.timeout", "must be more than 0s");
        }
        let pool_size = r.connection_pool_size.unwrap_or(4);
        if !(1..=64).contains(&pool_size) {
            self.err(o, ".redis.connectionPoolSize", "must be 1-64");
        }
        let limiter = Arc::new(RedisLimiter::new(RedisSettings {
            client,
            address,
            pool_size: pool_size as usize,
            timeout,
            key_prefix: r.key_prefix.clone().unwrap_or_else(|| "portico".into()),
        }));
        next.redis = Some((r.clone(), password, limiter.clone()));
        Some(limiter)
    }

    fn targets(&mut self, doc: &Document, o: &Origin, refs: &[schema::TargetRef]) -> Targets {
        let mut t = Targets::default();
        for (i, r) in refs.iter().enumerate() {
            let at = format!(".targetRefs[{i}]");
            let ns = r.namespace.as_deref().unwrap_or("default");
            let k = gateway_ref(&r.name, ns);
            match r.kind.as_str() {
                "Gateway" => {
                    let known = doc
                        .gateways
                        .iter()
                        .any(|g| key(&g.spec.namespace, &g.spec.name) == k);
                    if !known {
                        self.err(o, &format!("{at}.name"), format!("no Gateway {k}"));
                    }
                    if r.section_name.is_some() {
                        self.err(
                            o,
                            &format!("{at}.sectionName"),
                            "a Gateway target takes no sectionName",
                        );
                    }
                    t.gateways.push(k);
                }
                "VirtualService" => {
                    let vs = doc
                        .virtual_services
                        .iter()
                        .find(|v| key(&v.spec.namespace, &v.spec.name) == k);
                    match (vs, &r.section_name) {
                        (None, _) => {
                            self.err(o, &format!("{at}.name"), format!("no VirtualService {k}"))
                        }
                        (Some(v), Some(s))
                            if !v.spec.http.iter().any(|h| h.name.as_deref() == Some(s)) =>
                        {
                            self.err(
                                o,
                                &format!("{at}.sectionName"),
                                format!("VirtualService {k} has no http route named {s:?}"),
                            )
                        }
                        _ => {}
                    }
                    t.virtual_services.push((k, r.section_name.clone()));
                }
                "Host" => {
                    if r.section_name.is_some() {
                        self.err(
                            o,
                            &format!("{at}.sectionName"),
                            "a Host target takes no sectionName",
                        );
                    }
                    t.hosts.push(r.name.to_ascii_lowercase());
                }
                other => self.err(
                    o,
                    &format!("{at}.kind"),
                    format!("{other:?} is not Gateway, VirtualService or Host"),
                ),
            }
        }
        t
    }

    fn rate_limit_policy(
        &mut self,
        doc: &Document,
        item: &crate::config::load::Item<schema::RateLimitPolicy>,
        cache: &PolicyCache,
        next: &mut PolicyCache,
        redis: Option<&Arc<RedisLimiter>>,
    ) -> Option<CompiledPolicy> {
        let (p, o) = (&*item.spec, &item.origin);
        let pk = key(&p.namespace, &p.name);
        if p.target_refs.is_empty() {
            self.err(o, ".targetRefs", "a rate limit needs targetRefs");
        }
        let targets = self.targets(doc, o, &p.target_refs);
        let status_on_error = match p.status_on_error {
            None => 503,
            Some(s @ 400..=599) => s as u16,
            Some(_) => {
                self.err(o, ".statusOnError", "must be a 4xx or 5xx status");
                503
            }
        };
        if p.status_on_error.is_some() && p.global.is_none() {
            self.err(o, ".statusOnError", "applies to global rules only");
        }
        if p.fail_open.is_some() && p.global.is_none() {
            self.err(o, ".failOpen", "applies to global rules only");
        }
        let max_keys = p.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            self.err(o, ".maxKeys", "must be at least 1");
        }
        let headers = p.response_headers.unwrap_or(true);
        let mut local = Vec::new();
        for (i, r) in p.local.iter().flat_map(|l| l.rules.iter()).enumerate() {
            let at = format!(".local.rules[{i}]");
            if r.rate_limit_algorithm.is_some() {
                self.err(
                    o,
                    &format!("{at}.rateLimitAlgorithm"),
                    "applies to global rules only (local rules are token buckets)",
                );
            }
            let Some((selector, rate, overrides)) = self.rule(o, &at, r) else {
                continue;
            };
            let id = format!("{pk}/local/{i}");
            let table = match cache.tables.get(&id) {
                Some((spec, keys, table)) if spec == r && *keys == max_keys => table.clone(),
                _ => Arc::new(BucketTable::new(max_keys as usize)),
            };
            next.tables
                .insert(id.clone(), (r.clone(), max_keys, table.clone()));
            let name = r.name.clone().unwrap_or(id);
            let rule = LocalRule::new(name, selector, rate, overrides, headers, table);
            local.push((Arc::new(rule), r.shared.unwrap_or(false)));
        }
        let mut global = Vec::new();
        if p.global.is_some() && redis.is_none() {
            self.err(o, ".global", "global rules count in Redis: set mesh.redis");
        }
        for (i, r) in p.global.iter().flat_map(|l| l.rules.iter()).enumerate() {
            let at = format!(".global.rules[{i}]");
            let algorithm = match r.rate_limit_algorithm.as_deref() {
                None | Some("FIXED_WINDOW") => Algorithm::FixedWindow,
                Some("GCRA") => Algorithm::Gcra,
                Some(other) => {
                    self.err(
                        o,
                        &format!("{at}.rateLimitAlgorithm"),
                        format!("{other:?} is not FIXED_WINDOW or GCRA"),
                    );
                    continue;
                }
            };
            if algorithm == Algorithm::FixedWindow && r.burst.is_some() {
                self.err(
                    o,
                    &format!("{at}.burst"),
                    "a FIXED_WINDOW rule has no burst: use rateLimitAlgorithm = \"GCRA\"",
                );
            }
            let Some((selector, rate, overrides)) = self.rule(o, &at, r) else {
                continue;
            };
            let Some(redis) = redis else { continue };
            let id = format!("{pk}/global/{i}");
            let rule = GlobalRule::new(
                r.name.clone().unwrap_or_else(|| id.clone()),
                selector,
                rate,
                overrides,
                algorithm,
                format!("{}:{id}", redis.key_prefix),
                p.fail_open.unwrap_or(true),
                status_on_error,
                headers,
            );
            global.push((Arc::new(rule), r.shared.unwrap_or(false)));
        }
        if local.is_empty() && global.is_empty() {
            if p.local.is_none() && p.global.is_none() {
                self.err(o, "", "a rate limit needs local or global rules");
            }
            return None;
        }
        Some(CompiledPolicy {
            targets,
            local,
            global,
        })
    }

    /// A rule's selector, rate and overrides.
    fn rule(
        &mut self,
        o: &Origin,
        at: &str,
        r: &schema::RateLimitRule,
    ) -> Option<(Selector, Rate, Vec<Override>)> {
        let errors = self.errors.len();
        let rate =
            |cx: &mut Cx, here: &str, v: &schema::RateLimitValue, burst: Option<u32>| match unit(
                &v.unit,
            ) {
                Ok(w) => {
                    if burst == Some(0) {
                        cx.err(o, &format!("{here}.burst"), "must be at least 1");
                    }
                    Some(Rate::new(v.requests, w, burst))
                }
                Err(e) => {
                    cx.err(o, &format!("{here}.limit.unit"), e);
                    None
                }
            };
        let limit = rate(self, at, &r.limit, r.burst);
        let mut conditions = Vec::new();
        for (ci, c) in r.client_selectors.iter().enumerate() {
            let here = format!("{at}.clientSelectors[{ci}]");
            conditions.push(self.condition(o, &here, c));
        }
        let selector = Selector { conditions };
        let mut overrides = Vec::new();
        for (oi, ov) in r.overrides.iter().enumerate() {
            let here = format!("{at}.overrides[{oi}]");
            let distinct_header = |name: &str| {
                r.client_selectors.iter().any(|c| {
                    c.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case(name) && h.kind.as_deref() == Some("Distinct")
                    })
                })
            };
            for name in ov.headers.keys() {
                if !distinct_header(name) {
                    self.err(
                        o,
                        &format!("{here}.headers.{name}"),
                        format!("{name} is not a Distinct header of this rule's clientSelectors"),
                    );
                }
            }
            let source = match &ov.source_cidr {
                None => None,
                Some(s) => match parse_net(s) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        self.err(o, &format!("{here}.sourceCIDR"), e);
                        None
                    }
                },
            };
            if ov.headers.is_empty()
                && source.is_none()
                && ov.jwt_claims.is_empty()
                && ov.request_principal.is_none()
            {
                self.err(o, &here, "an override names the keys it is for");
            }
            if let Some(rate) = rate(self, &here, &ov.limit, ov.burst) {
                overrides.push(Override {
                    headers: ov
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect(),
                    source,
                    claims: ov.jwt_claims.clone().into_iter().collect(),
                    principal: ov.request_principal.clone(),
                    rate,
                });
            }
        }
        if self.errors.len() > errors {
            return None;
        }
        Some((selector, limit?, overrides))
    }

    fn condition(
        &mut self,
        o: &Origin,
        at: &str,
        c: &schema::RateLimitSelectCondition,
    ) -> Condition {
        let mut out = Condition::default();
        for (i, h) in c.headers.iter().enumerate() {
            let here = format!("{at}.headers[{i}]");
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                self.err(
                    o,
                    &format!("{here}.name"),
                    format!("{:?} is not a header name", h.name),
                );
                continue;
            }
            let sel = schema::ValueSelector {
                kind: h.kind.clone(),
                value: h.value.clone(),
                invert: h.invert,
            };
            if let Some(m) = self.value_match(o, &here, &sel) {
                out.headers.push((h.name.to_ascii_lowercase(), m));
            }
        }
        for (i, h) in c.jwt_claims.iter().enumerate() {
            let here = format!("{at}.jwtClaims[{i}]");
            let sel = schema::ValueSelector {
                kind: h.kind.clone(),
                value: h.value.clone(),
                invert: h.invert,
            };
            if let Some(m) = self.value_match(o, &here, &sel) {
                out.claims.push((h.name.clone(), m));
            }
        }
        if let Some(p) = &c.request_principal {
            out.principal = self.value_match(o, &format!("{at}.requestPrincipal"), p);
        }
        if let Some(s) = &c.source_cidr {
            let distinct = match s.kind.as_deref() {
                None | Some("Exact") => false,
                Some("Distinct") => true,
                Some(other) => {
                    self.err(
                        o,
                        &format!("{at}.sourceCIDR.type"),
                        format!("{other:?} is not Exact or Distinct"),
                    );
                    false
                }
            };
            match parse_net(&s.value) {
                Ok(net) => out.source = Some(SourceMatch { net, distinct }),
                Err(e) => self.err(o, &format!("{at}.sourceCIDR.value"), e),
            }
        }
        if let Some(p) = &c.path {
            let distinct = match p.kind.as_deref() {
                None | Some("Exact") => false,
                Some("Distinct") => true,
                Some(other) => {
                    self.err(
                        o,
                        &format!("{at}.path.type"),
                        format!("{other:?} is not Exact or Distinct"),
                    );
                    false
                }
            };
            match PathTemplate::parse(&p.template) {
                Ok(template) => out.path = Some(PathMatch { template, distinct }),
                Err(e) => self.err(o, &format!("{at}.path.template"), e),
            }
        }
        out
    }

    fn value_match(
        &mut self,
        o: &Origin,
        at: &str,
        s: &schema::ValueSelector,
    ) -> Option<ValueMatch> {
        let test = match (s.kind.as_deref(), &s.value) {
            (Some("Distinct"), None) => ValueTest::Distinct,
            (Some("Distinct"), Some(_)) => {
                self.err(o, &format!("{at}.value"), "a Distinct match takes no value");
                return None;
            }
            (None | Some("Exact"), Some(v)) => ValueTest::Exact(v.clone()),
            (Some("RegularExpression"), Some(v)) => {
                match regex::Regex::new(&format!("^(?:{v})$")) {
                    Ok(r) => ValueTest::Regex(r),
                    Err(e) => {
                        self.err(o, &format!("{at}.value"), format!("bad regex: {e}"));
                        return None;
                    }
                }
            }
            (None | Some("Exact" | "RegularExpression"), None) => {
                self.err(o, at, "needs a value (or type = \"Distinct\")");
                return None;
            }
            (Some(other), _) => {
                self.err(
                    o,
                    &format!("{at}.type"),
                    format!("{other:?} is not Exact, RegularExpression or Distinct"),
                );
                return None;
            }
        };
        if s.invert && matches!(test, ValueTest::Distinct) {
            self.err(
                o,
                &format!("{at}.invert"),
                "a Distinct match cannot be inverted",
            );
            return None;
        }
        Some(ValueMatch {
            test,
            invert: s.invert,
        })
    }

    fn access_list(
        &mut self,
        o: &Origin,
        l: &schema::AccessList,
        name: String,
    ) -> Option<AccessList> {
        let errors = self.errors.len();
        let allow = match l.action.as_deref() {
            None | Some("DENY") => false,
            Some("ALLOW") => true,
            Some(other) => {
                self.err(o, ".action", format!("{other:?} is not ALLOW or DENY"));
                false
            }
        };
        let list_key = match ListKey::parse(l.key.as_deref().unwrap_or("source.ip")) {
            Ok(k) => k,
            Err(e) => {
                self.err(o, ".key", e);
                ListKey::SourceIp
            }
        };
        let entry_type = match l.entry_type.as_deref() {
            None if list_key == ListKey::SourceIp => EntryType::IpAddresses,
            None => EntryType::Strings,
            Some("IP_ADDRESSES") => EntryType::IpAddresses,
            Some("STRINGS") => EntryType::Strings,
            Some("CASE_INSENSITIVE_STRINGS") => EntryType::CaseInsensitiveStrings,
            Some(other) => {
                self.err(
                    o,
                    ".entryType",
                    format!("{other:?} is not IP_ADDRESSES, STRINGS or CASE_INSENSITIVE_STRINGS"),
                );
                EntryType::Strings
            }
        };
        let inline = match Entries::parse(l.overrides.iter().map(String::as_str), entry_type) {
            Ok(e) => e,
            Err((n, e)) => {
                self.err(o, &format!(".overrides[{}]", n - 1), e);
                Entries::default()
            }
        };
        let file = l.file.as_ref().map(|f| o.file.resolve(f));
        let file_entries = match &file {
            None => None,
            Some(path) => {
                let stamp = crate::config::load::stamp(path);
                match std::fs::read_to_string(path) {
                    Ok(text) => match Entries::parse(text.lines(), entry_type) {
                        Ok(e) => Some((stamp, e)),
                        Err((n, e)) => {
                            self.err(o, ".file", format!("{}:{n}: {e}", path.display()));
                            None
                        }
                    },
                    Err(e) => {
                        self.err(o, ".file", format!("cannot read {}: {e}", path.display()));
                        None
                    }
                }
            }
        };
        let url = match &l.provider_url {
            None => None,
            Some(u) => match ProviderUrl::parse(u) {
                Ok(u) => Some(u),
                Err(e) => {
                    self.err(o, ".providerUrl", e);
                    None
                }
            },
        };
        let refresh_interval = l
            .refresh_interval
            .map(|d| d.get())
            .unwrap_or(Duration::from_secs(60));
        if l.refresh_interval.is_some() && l.provider_url.is_none() {
            self.err(o, ".refreshInterval", "applies to providerUrl only");
        }
        if refresh_interval < Duration::from_secs(1) {
            self.err(o, ".refreshInterval", "must be at least 1s");
        }
        let (status, body) = match &l.deny_response {
            None => (403, "access denied\n".to_string()),
            Some(d) => {
                let status = match d.status {
                    None => 403,
                    Some(s @ 200..=599) => s as u16,
                    Some(_) => {
                        self.err(o, ".denyResponse.status", "must be 200-599");
                        403
                    }
                };
                (status, d.body.clone().unwrap_or_default())
            }
        };
        if self.errors.len() > errors {
            return None;
        }
        Some(AccessList::new(
            name,
            allow,
            list_key,
            entry_type,
            status,
            body,
            inline,
            access::Sources {
                file,
                url,
                refresh_interval,
            },
            file_entries,
        ))
    }
}

fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))
}

/// A route's instance: the same for the same (port, host, VirtualService, route) on every
/// replica and in every version, so non-shared rules count a route in the same buckets
/// and Redis keys after a reload or an upgrade.
fn instance(port: u16, host: &str, vs: &str, index: usize) -> u64 {
    let id = format!("{port}|{host}|{vs}|{index}");
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b) | 1
}

impl Compiled {
    /// Binds the policies to the routes they target (each listener's
    /// `RoutePolicies`) and makes the Snapshot's `Policies`; returns the state the next
    /// compile carries.
    pub fn bind(self, doc: &Document, listeners: &mut [Listener]) -> (Policies, PolicyCache) {
        let mut policies = Policies::new(self.lists, self.redis.clone());
        policies.jwks = self.next.jwks.values().cloned().collect();
        if self.policies.is_empty() && self.list_targets.is_empty() && self.authn.is_empty() {
            return (policies, self.next);
        }
        // The gateways each VirtualService binds, and those with servers on each port.
        let mut vs_gateways: HashMap<String, Vec<String>> = HashMap::new();
        for v in &doc.virtual_services {
            let ns = v.spec.namespace.as_deref().unwrap_or("default");
            vs_gateways.insert(
                key(&v.spec.namespace, &v.spec.name),
                v.spec.gateways.iter().map(|g| gateway_ref(g, ns)).collect(),
            );
        }
        let mut port_gateways: HashMap<u16, Vec<String>> = HashMap::new();
        for g in &doc.gateways {
            let k = key(&g.spec.namespace, &g.spec.name);
            for s in &g.spec.servers {
                if let Ok(p) = u16::try_from(s.port.number) {
                    port_gateways.entry(p).or_default().push(k.clone());
                }
            }
        }
        let empty = Vec::new();
        for l in listeners.iter_mut() {
            let mut routes = foldhash::HashMap::default();
            let port = l.addr.port();
            let on_port = port_gateways.get(&port).unwrap_or(&empty);
            // RequestAuthentications of the listener (every gateway, or a gateway on this
            // port): checked for every request on it, as Envoy's jwt_authn filter is.
            let on_listener: Vec<bool> = self
                .authn
                .iter()
                .map(|(t, _)| {
                    t.as_ref()
                        .is_none_or(|t| t.gateways.iter().any(|g| on_port.contains(g)))
                })
                .collect();
            let listener_rules: Vec<Arc<JwtRule>> = self
                .authn
                .iter()
                .zip(&on_listener)
                .filter(|(_, on)| **on)
                .flat_map(|((_, rules), _)| rules.iter().cloned())
                .collect();
            l.authn =
                (!listener_rules.is_empty()).then(|| Arc::new(Authn::new(listener_rules.clone())));
            for (domain, vhost) in l.table.vhosts.entries() {
                for route in vhost.routes.iter() {
                    let vs = route.origin.virtual_service.as_str();
                    let gateways: Vec<&str> = vs_gateways
                        .get(vs)
                        .unwrap_or(&empty)
                        .iter()
                        .filter(|g| on_port.contains(g))
                        .map(String::as_str)
                        .collect();
                    let name = route.name.as_deref();
                    let covers = |t: &Targets| t.covers(&gateways, vs, name, &domain);
                    let mut policy = RoutePolicy::default();
                    let id = instance(port, &domain, vs, route.origin.index);
                    let mut global = Vec::new();
                    for p in self.policies.iter().filter(|p| covers(&p.targets)) {
                        for (rule, shared) in &p.local {
                            policy
                                .local
                                .rules
                                .push((rule.clone(), if *shared { 0 } else { id }));
                        }
                        for (rule, shared) in &p.global {
                            global.push((rule.clone(), if *shared { 0 } else { id }));
                        }
                    }
                    for (t, list) in &self.list_targets {
                        if covers(t) {
                            policy.access.push(list.clone());
                        }
                    }
                    // A RequestAuthentication that targets this route (by VirtualService
                    // or Host) and not the listener: the route's rules are the listener's
                    // and its own.
                    let own: Vec<Arc<JwtRule>> = self
                        .authn
                        .iter()
                        .zip(&on_listener)
                        .filter(|((t, _), on)| {
                            !**on && t.as_ref().is_some_and(|t| t.covers(&[], vs, name, &domain))
                        })
                        .flat_map(|((_, rules), _)| rules.iter().cloned())
                        .collect();
                    if !own.is_empty() {
                        let rules = listener_rules.iter().cloned().chain(own).collect();
                        policy.authn = Some(Arc::new(Authn::new(rules)));
                    }
                    if let (false, Some(redis)) = (global.is_empty(), &self.redis) {
                        policy.global = Some(GlobalLimits {
                            rules: global,
                            redis: redis.clone(),
                        });
                    }
                    if policy.access.is_empty()
                        && policy.local.is_empty()
                        && policy.global.is_none()
                        && policy.authn.is_none()
                    {
                        continue;
                    }
                    routes.insert(crate::policy::route_key(vhost, route), Arc::new(policy));
                }
            }
            l.policies = RoutePolicies::new(routes);
        }
        (policies, self.next)
    }
}
