//! Route table: matches a request to a route. Never touches sockets or files.
//!
//! A listener's table maps hosts (exact, `*.suffix`, `*`) to virtual hosts; a virtual host
//! holds the merged `http` routes of every VirtualService bound to it, in order.

pub mod host;
pub mod matcher;
pub mod path;
pub mod route;

use std::sync::Arc;

pub use host::{normalize_host, HostMatcher};
pub use matcher::{Headers, RequestMatch, RequestView, StrMatch};
pub use route::{
    chance, Action, Cors, DirectResponse, Fault, Forward, HeaderOps, HeaderRules, Mirror, Redirect,
    RetryOn, RetryPolicy, Rewrite, Route,
};

/// The routes for one host name (or wildcard) on one listener.
#[derive(Debug)]
pub struct VirtualHost {
    pub domain: String,
    /// Shared with the compile cache when one VirtualService makes the whole host: a reload
    /// then neither copies nor counts each route again.
    pub routes: Arc<[Arc<Route>]>,
}

/// Per-host settings of a Gateway server on a listener.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    /// `tls.httpsRedirect`: answer every request with a 301 to https.
    pub https_redirect: bool,
    /// `gateways[i].servers[j]`, for explanations.
    pub server: String,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// Shared with the compile cache: rebuilt only when the Gateways change.
    pub servers: Arc<HostMatcher<ServerPolicy>>,
    /// Shared with the compile cache: a reload that changes a few VirtualServices copies
    /// it and replaces only the domains they touch.
    pub vhosts: Arc<HostMatcher<Arc<VirtualHost>>>,
}

/// What the table decided for a request.
pub enum Decision<'a> {
    HttpsRedirect(&'a ServerPolicy),
    /// No server or virtual host for the Host: 404 (`NR`).
    NoHost,
    /// The host is known but no route matched: 404 (`NR`).
    NoRoute(&'a Arc<VirtualHost>),
    Route {
        vhost: &'a Arc<VirtualHost>,
        route: &'a Arc<Route>,
        match_index: usize,
    },
}

impl RouteTable {
    /// `host` must be normalized (see [`normalize_host`]).
    pub fn decide<'a>(&'a self, host: &str, req: &RequestView<'_>) -> Decision<'a> {
        if let Some(policy) = self.servers.lookup(host) {
            if policy.https_redirect {
                return Decision::HttpsRedirect(policy);
            }
        }
        let Some(vhost) = self.vhosts.lookup(host) else {
            return Decision::NoHost;
        };
        for route in vhost.routes.iter() {
            if let Some(match_index) = route.matches(req) {
                return Decision::Route {
                    vhost,
                    route,
                    match_index,
                };
            }
        }
        Decision::NoRoute(vhost)
    }
}
