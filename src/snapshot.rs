//! The Snapshot: everything a request needs, compiled and immutable. Requests load it once
//! and keep that `Arc` to their end, so a reload never changes a request half-way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::routing::RouteTable;
use crate::tls::CertStore;
use crate::upstream::Cluster;

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    /// Config files that went into this Snapshot, main file first.
    pub files: Vec<PathBuf>,
    /// Config files plus every certificate and key file: a change to any reloads.
    pub watched: Vec<PathBuf>,
    /// Sorted by address; the set is fixed for the life of the process.
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Arc<Cluster>>,
    /// ServiceEntry registry and outbound policy for the forward proxy.
    pub egress: crate::egress::EgressRegistry,
    /// The DNS names clusters were compiled from: holding them keeps the refresher asking,
    /// and a changed answer recompiles (`egress::dns::take_cluster_change`).
    pub dns_names: Vec<Arc<crate::egress::dns::DnsName>>,
    /// Certificates Portico orders and renews over ACME (`tls.acme`).
    pub acme: Vec<Arc<crate::tls::acme::ManagedCert>>,
    pub settings: Settings,
    pub summary: Summary,
    /// Access lists (for the refresher) and the Redis of global rate limits; each
    /// route's policies are its listener's (`Listener::policies`).
    pub policies: crate::policy::Policies,
}

#[derive(Debug)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: bool,
    /// Accept HTTP/2 with prior knowledge on a plaintext listener (servers of protocol
    /// HTTP2 or GRPC).
    pub h2c: bool,
    /// A plain-HTTP server of an egress gateway: also a forward proxy (absolute-form
    /// requests and CONNECT).
    pub forward_proxy: bool,
    pub table: RouteTable,
    /// Shared with the compile cache: rebuilt only when the Gateways or their
    /// certificates change.
    pub certs: Option<Arc<CertStore>>,
    /// Client-certificate policies by SNI, when a server here is MUTUAL or
    /// OPTIONAL_MUTUAL (`listener::https` then picks each connection's by its ClientHello).
    pub client_auth: Option<Arc<crate::tls::client_auth::ClientAuthStore>>,
    /// TLS passthrough routes by SNI (with `tls`, the names its HTTPS servers claim are
    /// terminated and served by `table`), or the port's TCP route.
    pub l4: Option<crate::l4::L4Table>,
    /// The hosts ACME challenges are answered for: HTTP-01 on a plain-HTTP listener
    /// (before routing), TLS-ALPN-01 on a TLS one (by the certificate resolver).
    pub acme: Option<Arc<crate::tls::acme::AcmeHosts>>,
    /// Rate limits and access lists of this listener's routes (`request::plan` looks a
    /// routed request's up here).
    pub policies: crate::policy::RoutePolicies,
    /// The AuthorizationPolicies of the gateways on this listener's port, decided for
    /// every request before routing's answer (`request::Planned::police`).
    pub authz: Option<Arc<crate::policy::authz::Authorization>>,
    /// The request caps (`mesh.downstream.maxRequests`, `maxRequestsPerClient`) and the
    /// counts they read, when one is set (`request::Planned::police` admits each request).
    pub requests: Option<crate::listener::RequestCaps>,
    /// The JWT rules of the RequestAuthentications bound to the gateways on this
    /// listener's port (no targets, a `selector`, Gateway `targetRefs`): checked for every
    /// request before authorization, routed or not, as Envoy's `jwt_authn` filter runs on
    /// the listener. A route a RequestAuthentication targets by VirtualService or Host
    /// has its own set (`RoutePolicy::authn`: these rules and its own).
    pub authn: Option<Arc<crate::policy::jwt::Authn>>,
}

/// The shape of a listener: what needs a new socket when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerShape {
    pub addr: SocketAddr,
    pub tls: bool,
    pub h2c: bool,
    pub forward_proxy: bool,
    pub l4: Option<crate::l4::L4Kind>,
}

impl ListenerShape {
    pub fn protocol(&self) -> &'static str {
        match (self.l4, self.tls, self.h2c) {
            (Some(crate::l4::L4Kind::Passthrough), true, _) => "HTTPS+TLS-PASSTHROUGH",
            (Some(k), _, _) => k.protocol(),
            (None, true, _) => "HTTPS",
            (None, false, true) => "HTTP2",
            (None, false, false) => "HTTP",
        }
    }
}

impl std::fmt::Display for ListenerShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = if self.forward_proxy {
            " forward-proxy"
        } else {
            ""
        };
        write!(f, "{}{role} {}", self.protocol(), self.addr)
    }
}

impl Listener {
    pub fn shape(&self) -> ListenerShape {
        ListenerShape {
            addr: self.addr,
            tls: self.tls,
            h2c: self.h2c,
            forward_proxy: self.forward_proxy,
            l4: self.l4.as_ref().map(crate::l4::L4Table::kind),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub admin: SocketAddr,
    /// `mesh.adminTokenFile`'s token: every admin request but the probes must carry it.
    pub admin_token: Option<crate::admin::AdminToken>,
    pub connect_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub reload_poll_interval: Duration,
    pub drain_duration: Duration,
    pub access_log: Option<AccessLogSettings>,
    pub tracing: Option<crate::telemetry::trace::TraceSettings>,
    pub upgrade_socket: PathBuf,
    /// How request paths are normalized before routing.
    pub path_normalization: crate::routing::path::PathNormalization,
    pub downstream: Downstream,
    /// What becomes of `x-forwarded-client-cert` (`gatewayTopology`).
    pub forward_client_cert: crate::tls::client_auth::ForwardClientCert,
    /// `defaultConfig.gatewayTopology.numTrustedProxies`: which `X-Forwarded-For` entry
    /// is the client (`request::remote_address`). 0: the peer.
    pub num_trusted_proxies: u32,
    /// `defaultConfig.gatewayTopology.proxyProtocol`: the listeners that read a PROXY
    /// header first, and from whom (`listener::accept`).
    pub proxy_protocol: Option<Arc<crate::listener::proxy_protocol::ProxyProtocol>>,
}

/// Timeouts and limits of client connections and requests (`mesh.downstream`).
#[derive(Debug, Clone)]
pub struct Downstream {
    pub request_headers_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_body_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub max_connection_duration: Option<Duration>,
    pub max_connections: Option<usize>,
    /// Connections one client address may hold on a listener.
    pub max_connections_per_client: Option<usize>,
    /// Connections the process holds over all listeners (`globalMaxConnections`, or what
    /// the cgroup's memory limit allows).
    pub global_max_connections: Option<usize>,
    /// Requests in flight on a listener (an h2 stream is one); more get 503 `OM`.
    pub max_requests: Option<usize>,
    /// Requests in flight from one client address on a listener.
    pub max_requests_per_client: Option<usize>,
    /// Bytes.
    pub max_request_headers: usize,
    /// Bytes of the request target.
    pub max_uri_length: usize,
}

impl Default for Downstream {
    fn default() -> Self {
        Downstream {
            request_headers_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            request_body_timeout: Duration::from_secs(60),
            stream_idle_timeout: Duration::from_secs(300),
            max_connection_duration: None,
            max_connections: None,
            max_connections_per_client: None,
            global_max_connections: None,
            max_requests: None,
            max_requests_per_client: None,
            max_request_headers: 60 * 1024,
            max_uri_length: 8192,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLogSettings {
    pub path: PathBuf,
    pub format: Arc<crate::telemetry::access_log::Format>,
}

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub gateways: usize,
    pub hosts: usize,
    pub routes: usize,
    pub clusters: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} gateways, {} hosts, {} routes, {} clusters",
            self.gateways, self.hosts, self.routes, self.clusters
        )
    }
}

impl Snapshot {
    pub fn shapes(&self) -> Vec<ListenerShape> {
        self.listeners.iter().map(Listener::shape).collect()
    }
}
