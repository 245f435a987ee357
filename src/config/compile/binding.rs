//! Binds VirtualServices to the listeners of the gateways they name: each VirtualService
//! host lands on the server hosts it overlaps (`ServerHostIndex`), and each domain's
//! routes merge into one virtual host. While the gateways are reused, patches the last
//! compile's tables (unbinds what left, binds what came) instead of binding everything
//! again. Compiles no route itself (`routes`), opens nothing.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::cache::{Reuse, VsRoutes};
use super::gateways::{GatewayInfo, ListenerBuild};
use super::{gateway_ref, Cx};
use crate::config::load::{Document, Item};
use crate::config::schema;
use crate::routing::{host, HostMatcher, RequestMatch, Route, VirtualHost};

/// The listeners with every VirtualService bound, and the domain tables the Snapshot got
/// from them. While the gateways are reused, a compile takes these, unbinds the
/// VirtualServices that left (changed or removed), binds the new ones and rebuilds only the
/// domains those touch: binding 10 000 VirtualServices again was half of a reload.
pub(super) struct BoundState {
    pub(super) listeners: BTreeMap<u16, ListenerBuild>,
    pub(super) vhosts: BTreeMap<u16, Arc<HostMatcher<Arc<VirtualHost>>>>,
    /// Every VirtualService's key, in document order.
    pub(super) order: Vec<usize>,
    /// VirtualServices bound without a routes cache entry (their routes warned): what
    /// unbinding them takes. Holding the `Arc` keeps the key unique.
    pub(super) uncached: foldhash::HashMap<usize, Bound>,
}

/// A VirtualService and the gateways it was bound to: what unbinding it takes.
pub(super) type Bound = (Arc<schema::VirtualService>, Vec<String>);

/// Whether a VirtualService has TLS or TCP routes (bound into the SNI and TCP tables, which
/// are not patched).
fn has_l4(v: &schema::VirtualService) -> bool {
    !v.tls.is_empty() || !v.tcp.is_empty()
}

/// The VirtualServices the last compile bound that this one does not reuse (changed,
/// removed, or bound without a cache entry), when its tables can be patched: the reused
/// ones keep their order, and none that comes or goes has TLS or TCP routes (those are
/// bound into the SNI tables, which are not patched).
pub(super) fn unbound_since(
    doc: &Document,
    reuse: &Reuse,
    last: &BoundState,
) -> Option<Vec<(usize, Bound)>> {
    let mut seen = vec![false; last.order.len()];
    let mut prev: Option<u32> = None;
    for vs in &doc.virtual_services {
        match reuse.routes.get(&(Arc::as_ptr(&vs.spec) as usize)) {
            Some(c) => {
                // Moved, or (a TLS or TCP route's warnings are repeated only by binding
                // it again) noisy.
                if prev.is_some_and(|p| p >= c.pos)
                    || c.pos as usize >= seen.len()
                    || (!c.quiet && has_l4(&c.spec))
                {
                    return None;
                }
                seen[c.pos as usize] = true;
                prev = Some(c.pos);
            }
            None if has_l4(&vs.spec) => return None,
            None => {}
        }
    }
    let mut gone = Vec::new();
    for (&key, seen) in last.order.iter().zip(&seen) {
        if *seen {
            continue;
        }
        let bound = match reuse.routes.get(&key) {
            Some(c) => (c.spec.clone(), c.bound.clone()),
            None => last.uncached.get(&key)?.clone(),
        };
        if has_l4(&bound.0) {
            return None;
        }
        gone.push((key, bound));
    }
    Some(gone)
}

/// The last compile's domain tables with the domains in `dirty` rebuilt from `listeners`
/// (and dropped where no binding is left). Routes of several VirtualServices merge in
/// document order, as a full compile merges them.
pub(super) fn patched_tables(
    listeners: &mut BTreeMap<u16, ListenerBuild>,
    mut tables: BTreeMap<u16, Arc<HostMatcher<Arc<VirtualHost>>>>,
    mut dirty: Vec<(u16, String)>,
    order: &[usize],
) -> BTreeMap<u16, Arc<HostMatcher<Arc<VirtualHost>>>> {
    dirty.sort_unstable();
    dirty.dedup();
    let mut positions: Option<foldhash::HashMap<usize, usize>> = None;
    for (port, domain) in dirty {
        let (Some(l), Some(table)) = (listeners.get_mut(&port), tables.get_mut(&port)) else {
            continue;
        };
        let table = Arc::make_mut(table);
        let Some(b) = l.vhosts.get_mut(&domain) else {
            continue;
        };
        if b.parts.is_empty() {
            l.vhosts.remove(&domain);
            table.remove_pattern(&domain);
            continue;
        }
        if b.parts.iter().any(|(k, _)| *k != b.parts[0].0) {
            let positions = positions
                .get_or_insert_with(|| order.iter().enumerate().map(|(i, &k)| (k, i)).collect());
            // Stable: one VirtualService's parts keep their binding order.
            b.parts.sort_by_key(|(k, _)| positions.get(k).copied());
        }
        table.insert_owned(domain.clone(), virtual_host(&domain, &b.parts));
    }
    tables
}

/// A domain's virtual host: the routes of its bindings, merged.
pub(super) fn virtual_host(domain: &str, parts: &[(usize, Arc<[Arc<Route>]>)]) -> Arc<VirtualHost> {
    let routes = match parts {
        [(_, one)] => one.clone(),
        parts => {
            let mut routes: Vec<Arc<Route>> =
                parts.iter().flat_map(|(_, p)| p.iter().cloned()).collect();
            // Istio's SortVHostRoutes: merged catch-all routes go last.
            routes.sort_by_key(|r| r.is_catch_all());
            routes.into()
        }
    };
    Arc::new(VirtualHost {
        domain: domain.to_string(),
        routes,
    })
}

/// A gateway's server hosts, for binding VirtualService hosts without scanning them all.
pub(super) struct ServerHostIndex {
    /// Exact server host → (server, host) positions.
    pub(super) exact: foldhash::HashMap<String, Vec<(usize, usize)>>,
    /// Server hosts with a wildcard (`*`, `*.example.com`): few, scanned.
    pub(super) wild: Vec<(usize, usize)>,
}

impl ServerHostIndex {
    pub(super) fn new(gw: &GatewayInfo) -> Self {
        let mut index = ServerHostIndex {
            exact: foldhash::HashMap::default(),
            wild: Vec::new(),
        };
        for (si, s) in gw.servers.iter().enumerate() {
            for (hi, h) in s.hosts.iter().enumerate() {
                if h.contains('*') {
                    index.wild.push((si, hi));
                } else {
                    index.exact.entry(h.clone()).or_default().push((si, hi));
                }
            }
        }
        index
    }

    /// Calls `hit` for every server host that overlaps VirtualService host `vh`.
    fn matching(&self, gw: &GatewayInfo, vh: &str, mut hit: impl FnMut(usize, usize)) {
        if vh.contains('*') {
            // A wildcard VirtualService host can overlap any server host.
            for (si, s) in gw.servers.iter().enumerate() {
                for (hi, sh) in s.hosts.iter().enumerate() {
                    if host::intersect(sh, vh).is_some() {
                        hit(si, hi);
                    }
                }
            }
            return;
        }
        // An exact name overlaps the same name and the wildcards that cover it.
        for &(si, hi) in self.exact.get(vh).into_iter().flatten() {
            hit(si, hi);
        }
        for &(si, hi) in &self.wild {
            if host::covers(&gw.servers[si].hosts[hi], vh) {
                hit(si, hi);
            }
        }
    }
}

/// Calls `hit(gateway position in bound, port, domain)` for each place a VirtualService's
/// hosts land: every HTTP server whose host overlaps one of them, on each gateway it is
/// bound to, by gateway, server, server host, VirtualService host (the order routes merge
/// into a domain). `hits` is scratch space.
fn each_binding(
    hits: &mut Vec<(usize, usize, usize)>,
    v: &schema::VirtualService,
    bound: &[String],
    gateways: &HashMap<String, GatewayInfo>,
    mut hit: impl FnMut(usize, u16, &str),
) {
    // Borrowed unless a host has capitals: a reload binds every changed VirtualService.
    let vhosts: Vec<Cow<str>> = v.hosts.iter().map(|h| host::lowercase(h)).collect();
    for (gi, gk) in bound.iter().enumerate() {
        let Some(gw) = gateways.get(gk) else {
            continue;
        };
        // Server hosts by name: binding each VirtualService host by scanning every
        // server host was quadratic (10 000 hosts on 1 000 servers: seconds).
        let index = gw.index.get_or_init(|| ServerHostIndex::new(gw));
        hits.clear();
        for (vi, vh) in vhosts.iter().enumerate() {
            index.matching(gw, vh, |si, hi| hits.push((si, hi, vi)));
        }
        hits.sort_unstable();
        for &(si, hi, vi) in hits.iter() {
            let s = &gw.servers[si];
            if s.l4.is_some() {
                continue;
            }
            if let Some(domain) = host::intersect(&s.hosts[hi], &vhosts[vi]) {
                hit(gi, s.port, domain);
            }
        }
    }
}

/// A route as it applies on gateway `gk`: match blocks restricted to other gateways are
/// dropped; a route left with none does not apply.
fn restrict_to_gateway(r: &Arc<Route>, gk: &str) -> Option<Arc<Route>> {
    if r.matches.iter().all(|m| m.gateways.is_empty()) {
        return Some(r.clone());
    }
    let kept: Vec<RequestMatch> = r
        .matches
        .iter()
        .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == gk))
        .cloned()
        .collect();
    if kept.is_empty() {
        return None;
    }
    let action = r.action.clone();
    Some(Arc::new(Route {
        name: r.name.clone(),
        origin: r.origin.clone(),
        matches: kept,
        action,
        headers: r.headers.clone(),
        cors: r.cors.clone(),
    }))
}

impl Cx {
    /// Compiles every VirtualService and binds its routes to the listeners of its gateways;
    /// returns the number of routes. `patching`: `listeners` are the last compile's bound
    /// tables, and only VirtualServices without a cache entry are bound (the reused ones'
    /// bindings are there already; `Cx::unbind` took out the rest).
    pub(super) fn virtual_services(
        &mut self,
        doc: &Document,
        gateways: &HashMap<String, GatewayInfo>,
        listeners: &mut BTreeMap<u16, ListenerBuild>,
        patching: bool,
    ) -> usize {
        let mut count = 0;
        for (pos, vs) in doc.virtual_services.iter().enumerate() {
            let v = &vs.spec;
            let ns = v.namespace.as_deref().unwrap_or("default");
            let key = Arc::as_ptr(&vs.spec) as usize;
            count += v.http.len() + v.tls.len() + v.tcp.len();
            self.order.push(key);
            if patching {
                if let Some((_, quiet)) = self.reused_routes(key, &vs.spec, None, pos) {
                    if !quiet {
                        // Bound already; this repeats its warnings.
                        self.bound_gateways(vs, gateways);
                    }
                    continue;
                }
            }
            let warnings = self.warnings.len();
            let bound = self.bound_gateways(vs, gateways);
            let quiet = self.warnings.len() == warnings;
            let routes = match self.reused_routes(key, &vs.spec, Some(&bound), pos) {
                Some((routes, _)) => routes,
                None => self.compile_routes(key, vs, &bound, ns, pos, quiet),
            };
            if has_l4(v) {
                let vs_key = format!("{ns}/{}", v.name);
                let warnings = self.warnings.len();
                self.l4_routes(&vs.origin, &vs_key, v, &bound, gateways, listeners);
                if self.warnings.len() != warnings {
                    if let Some(c) = self.next_routes.get_mut(&key) {
                        c.quiet = false;
                    }
                }
            }
            self.bind(key, v, &bound, &routes, gateways, listeners);
            if !self.next_routes.contains_key(&key) {
                self.uncached.insert(key, (vs.spec.clone(), bound));
            }
        }
        count
    }

    /// The gateways a VirtualService binds to (those defined and exported to), warning of
    /// the rest.
    fn bound_gateways(
        &mut self,
        vs: &Item<schema::VirtualService>,
        gateways: &HashMap<String, GatewayInfo>,
    ) -> Vec<String> {
        let (v, o) = (&vs.spec, &vs.origin);
        let ns = v.namespace.as_deref().unwrap_or("default");
        if v.hosts.is_empty() {
            self.err(o, ".hosts", "a VirtualService needs at least one host");
        }
        let mut bound = Vec::new();
        for (gi, g) in v.gateways.iter().enumerate() {
            if g == "mesh" {
                continue;
            }
            let gk = gateway_ref(g, ns);
            let gw_ns = gk.split('/').next().unwrap_or_default();
            let defined = gateways.contains_key(&gk);
            if defined && !crate::config::istio::exported_to(&v.export_to, ns, gw_ns) {
                self.warn(
                    o,
                    &format!(".gateways[{gi}]"),
                    format!("not exported to namespace {gw_ns} of gateway {gk} (exportTo): not bound to it"),
                );
            } else if defined {
                bound.push(gk);
            } else {
                self.err(
                    o,
                    &format!(".gateways[{gi}]"),
                    format!("gateway {gk} is not defined"),
                );
            }
        }
        if v.gateways.is_empty() || (bound.is_empty() && v.gateways.iter().all(|g| g == "mesh")) {
            self.warn(
                o,
                ".gateways",
                "bound only to `mesh` (no gateways listed): ignored at the gateway",
            );
        }
        bound
    }

    /// Adds a VirtualService's routes to the virtual hosts of the servers its hosts match,
    /// on each gateway it is bound to.
    pub(super) fn bind(
        &mut self,
        key: usize,
        v: &schema::VirtualService,
        bound: &[String],
        routes: &VsRoutes,
        gateways: &HashMap<String, GatewayInfo>,
        listeners: &mut BTreeMap<u16, ListenerBuild>,
    ) {
        if bound.is_empty() {
            return;
        }
        self.rebound += 1;
        // Without a match block restricted to some gateways (the usual case) every gateway
        // gets the same routes, and nothing is allocated.
        let restricted: Vec<Arc<[Arc<Route>]>> = if routes.per_gateway {
            bound
                .iter()
                .map(|gk| {
                    routes
                        .routes
                        .iter()
                        .filter_map(|r| restrict_to_gateway(r, gk))
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut dirty = self.dirty.take();
        each_binding(&mut self.hits, v, bound, gateways, |gi, port, domain| {
            let Some(l) = listeners.get_mut(&port) else {
                return;
            };
            let b = match l.vhosts.get_mut(domain) {
                Some(b) => b,
                None => l.vhosts.entry(domain.to_string()).or_default(),
            };
            let here = restricted.get(gi).unwrap_or(&routes.routes);
            b.parts.push((key, here.clone()));
            if let Some(d) = &mut dirty {
                d.push((port, domain.to_string()));
            }
        });
        self.dirty = dirty;
    }

    /// Takes a VirtualService's routes out of the domains `bind` put them in.
    pub(super) fn unbind(
        &mut self,
        key: usize,
        v: &schema::VirtualService,
        bound: &[String],
        gateways: &HashMap<String, GatewayInfo>,
        listeners: &mut BTreeMap<u16, ListenerBuild>,
    ) {
        let mut dirty = self.dirty.take().unwrap_or_default();
        each_binding(&mut self.hits, v, bound, gateways, |_, port, domain| {
            if let Some(b) = listeners
                .get_mut(&port)
                .and_then(|l| l.vhosts.get_mut(domain))
            {
                b.parts.retain(|(k, _)| *k != key);
                dirty.push((port, domain.to_string()));
            }
        });
        self.dirty = Some(dirty);
    }
}
