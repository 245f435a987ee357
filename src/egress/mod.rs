//! Egress: the ServiceEntry registry compiled into the Snapshot, the outbound traffic
//! policy, and the forward proxy that applies them to absolute-form requests and CONNECT
//! tunnels. Decides whether a host:port may be reached and where it goes; compiling from
//! config happens in `config::egress`, sockets are opened only by `forward`.

pub mod dns;
pub mod forward;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntCounter;

use crate::routing::HostMatcher;
use crate::telemetry::Metrics;
use crate::upstream::{ClusterSettings, Limits};

/// `mesh.outboundTrafficPolicy.mode`, as it applies to the forward proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Only hosts and ports a ServiceEntry registers (the default for egress).
    RegistryOnly,
    /// Anything else passes through to the name the client asked for.
    AllowAny,
}

/// ServiceEntry `ports[].protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Https,
    Tls,
    Tcp,
    Mongo,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "GRPC" => Protocol::Grpc,
            "HTTPS" => Protocol::Https,
            "TLS" => Protocol::Tls,
            "TCP" => Protocol::Tcp,
            "MONGO" => Protocol::Mongo,
            _ => return None,
        })
    }

    /// Plain-text HTTP can be forwarded to it as it came in.
    fn carries_plain_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::Https => "HTTPS",
            Protocol::Tls => "TLS",
            Protocol::Tcp => "TCP",
            Protocol::Mongo => "MONGO",
        }
    }
}

/// ServiceEntry `location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

/// ServiceEntry `resolution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// Where one endpoint is.
#[derive(Debug)]
pub enum Endpoint {
    Addr(SocketAddr),
    /// A name kept fresh by the DNS refresher, and the port to use.
    Name(Arc<dns::DnsName>, u16),
}

/// Where a registered port's connections go.
#[derive(Debug)]
pub enum Upstream {
    Endpoints(Vec<Endpoint>),
    /// `resolution = NONE`, or a wildcard host without endpoints: the name the client asked
    /// for, resolved when asked (the resolver caches it by its TTL), on this port.
    Requested(u16),
}

#[derive(Debug)]
pub struct RegisteredPort {
    pub number: u16,
    pub protocol: Protocol,
    pub upstream: Upstream,
    /// Istio's cluster name, for the access log: `outbound|443||api.example.com`.
    pub cluster: String,
    /// The host's DestinationRule, as it applies to forward-proxied traffic: connect
    /// timeout, TCP keep-alive, HTTP idle timeout, and `tcp.maxConnections` for tunnels.
    pub settings: ClusterSettings,
    pub limits: Limits,
    next: AtomicUsize,
}

impl RegisteredPort {
    pub fn new(number: u16, protocol: Protocol, upstream: Upstream, host: &str) -> Self {
        RegisteredPort {
            number,
            protocol,
            upstream,
            cluster: crate::upstream::cluster_name(host, number, None),
            settings: ClusterSettings::default(),
            limits: Limits::new(None, None, None),
            next: AtomicUsize::new(0),
        }
    }

    /// With the connection settings and limits of the host's DestinationRule.
    pub fn with_pool(self, (settings, limits): (ClusterSettings, Limits)) -> Self {
        RegisteredPort {
            settings,
            limits,
            ..self
        }
    }
}

/// Decisions counted for one host label; created once, incremented on the request path.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Indexed by `[allowed, denied]` × `[http, connect]`.
    c: [IntCounter; 4],
}

impl Counters {
    pub fn for_host(host: &str) -> Self {
        let m = &Metrics::global().egress_decisions;
        let mk = |d: &str, k: &str| m.with_label_values(&[d, k, host]);
        Counters {
            c: [
                mk("allowed", "http"),
                mk("allowed", "connect"),
                mk("denied", "http"),
                mk("denied", "connect"),
            ],
        }
    }

    fn count(&self, allowed: bool, kind: Kind) {
        let i = usize::from(!allowed) * 2 + usize::from(kind == Kind::Connect);
        self.c[i].inc();
    }
}

/// One host pattern of one ServiceEntry.
#[derive(Debug)]
pub struct RegisteredHost {
    /// As registered: `api.example.com` or `*.example.com`; the metric's host label.
    pub pattern: String,
    /// `namespace/name` of the ServiceEntry.
    pub service_entry: String,
    pub location: Location,
    pub resolution: Resolution,
    pub ports: Vec<RegisteredPort>,
    counters: Counters,
}

impl RegisteredHost {
    pub fn new(
        pattern: String,
        service_entry: String,
        location: Location,
        resolution: Resolution,
        ports: Vec<RegisteredPort>,
    ) -> Self {
        RegisteredHost {
            counters: Counters::for_host(&pattern),
            pattern,
            service_entry,
            location,
            resolution,
            ports,
        }
    }
}

/// The egress part of a Snapshot.
#[derive(Debug)]
pub struct EgressRegistry {
    pub policy: OutboundPolicy,
    pub hosts: HostMatcher<Arc<RegisteredHost>>,
    /// ServiceEntry `addresses`: a request for an IP literal inside one is the entry's (as
    /// its first host).
    pub addresses: Vec<(ipnet::IpNet, Arc<RegisteredHost>)>,
    pub resolver: Arc<dns::Resolver>,
    unregistered: Counters,
}

impl EgressRegistry {
    pub fn new(
        policy: OutboundPolicy,
        hosts: HostMatcher<Arc<RegisteredHost>>,
        resolver: Arc<dns::Resolver>,
    ) -> Self {
        EgressRegistry {
            policy,
            hosts,
            addresses: Vec::new(),
            resolver,
            unregistered: Counters::for_host("unregistered"),
        }
    }
}

impl Default for EgressRegistry {
    fn default() -> Self {
        Self::new(
            OutboundPolicy::RegistryOnly,
            HostMatcher::default(),
            Arc::new(dns::Resolver::new(Vec::new())),
        )
    }
}

/// How the client asked: absolute-form HTTP, or a CONNECT tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Connect,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Connect => "connect",
        }
    }
}

/// An allowed destination, owned so a request can keep it across its phases.
#[derive(Debug, Clone)]
pub struct Target {
    /// `None`: passed through under ALLOW_ANY.
    pub entry: Option<(Arc<RegisteredHost>, usize)>,
    /// The name the client asked for, kept only when it must be resolved.
    pub requested: Option<String>,
    pub port: u16,
}

/// Why a destination is refused: the rule that refused it.
#[derive(Debug)]
pub struct Denied {
    pub rule: String,
}

impl Target {
    /// Istio's cluster name: the ServiceEntry's, or `PassthroughCluster`.
    pub fn cluster(&self) -> &str {
        match &self.entry {
            Some((h, i)) => h.ports[*i].cluster.as_str(),
            None => "PassthroughCluster",
        }
    }

    /// The registered port (its connection settings and limits); `None` for a destination
    /// passed through under ALLOW_ANY, which gets the mesh's.
    pub fn port(&self) -> Option<&RegisteredPort> {
        self.entry.as_ref().map(|(h, i)| &h.ports[*i])
    }

    /// The connection settings of this destination: its DestinationRule's, or the mesh's
    /// connect timeout (`connect_timeout`) alone.
    pub fn settings(&self, connect_timeout: std::time::Duration) -> ClusterSettings {
        match self.port() {
            Some(p) => p.settings.clone(),
            None => ClusterSettings {
                connect_timeout,
                ..ClusterSettings::default()
            },
        }
    }

    /// The address to connect to: an endpoint picked round-robin, or the requested name
    /// resolved. Reads cached answers; waits for DNS only for a name never answered yet.
    pub async fn address(&self, registry: &EgressRegistry) -> Result<SocketAddr, String> {
        let resolver = &registry.resolver;
        let (endpoints, rr, first_only) = match &self.entry {
            Some((h, i)) => {
                let p = &h.ports[*i];
                match &p.upstream {
                    Upstream::Endpoints(eps) => (
                        eps.as_slice(),
                        &p.next,
                        h.resolution == Resolution::DnsRoundRobin,
                    ),
                    Upstream::Requested(port) => {
                        return requested(resolver, self.requested.as_deref(), *port).await
                    }
                }
            }
            None => return requested(resolver, self.requested.as_deref(), self.port).await,
        };
        // Names never answered are asked now, so the count below sees every endpoint.
        let mut answers = Vec::new();
        for ep in endpoints {
            if let Endpoint::Name(n, _) = ep {
                answers.push(n.current(resolver).await.ok());
            }
        }
        let total: usize = endpoints
            .iter()
            .filter(|e| matches!(e, Endpoint::Addr(_)))
            .count()
            + answers
                .iter()
                .map(|a| names_size(a.as_ref(), first_only))
                .sum::<usize>();
        if total == 0 {
            let name = self.entry.as_ref().map(|(h, _)| h.pattern.as_str());
            return Err(format!(
                "no address for {}: its names did not resolve",
                name.unwrap_or("?")
            ));
        }
        let mut k = rr.fetch_add(1, Ordering::Relaxed) % total;
        let mut names = answers.iter();
        for ep in endpoints {
            match ep {
                Endpoint::Addr(a) => {
                    if k == 0 {
                        return Ok(*a);
                    }
                    k -= 1;
                }
                Endpoint::Name(_, port) => {
                    let a = names.next().and_then(Option::as_ref);
                    let n = names_size(a, first_only);
                    if k < n {
                        if let Some(a) = a {
                            return Ok(SocketAddr::new(a.addrs[k], *port));
                        }
                    }
                    k -= n;
                }
            }
        }
        Err("no address".into())
    }
}

fn names_size(a: Option<&Arc<dns::Answer>>, first_only: bool) -> usize {
    match a {
        Some(a) if first_only => a.addrs.len().min(1),
        Some(a) => a.addrs.len(),
        None => 0,
    }
}

async fn requested(
    resolver: &dns::Resolver,
    name: Option<&str>,
    port: u16,
) -> Result<SocketAddr, String> {
    let name = name.ok_or("no requested name")?;
    if let Ok(ip) = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, port));
    }
    let answer = resolver
        .lookup(name)
        .await
        .map_err(|e| format!("cannot resolve {name}: {e}"))?;
    answer
        .addrs
        .first()
        .map(|ip| SocketAddr::new(*ip, port))
        .ok_or_else(|| format!("{name} has no addresses"))
}

impl EgressRegistry {
    /// For the admin API: the policy, the nameservers, and each registered host with its
    /// ports and the addresses its names resolve to now.
    pub fn describe(&self) -> serde_json::Value {
        let mut hosts: Vec<_> = self.hosts.values().collect();
        hosts.sort_by(|a, b| a.pattern.cmp(&b.pattern));
        let hosts: Vec<_> = hosts
            .into_iter()
            .map(|h| {
                let ports: Vec<_> = h
                    .ports
                    .iter()
                    .map(|p| {
                        let endpoints: Vec<String> = match &p.upstream {
                            Upstream::Requested(port) => vec![format!("(requested name):{port}")],
                            Upstream::Endpoints(eps) => eps
                                .iter()
                                .flat_map(|e| match e {
                                    Endpoint::Addr(a) => vec![a.to_string()],
                                    Endpoint::Name(n, port) => match n.answer() {
                                        Some(a) => a
                                            .addrs
                                            .iter()
                                            .map(|ip| SocketAddr::new(*ip, *port).to_string())
                                            .collect(),
                                        None => {
                                            vec![format!("{}:{port} (not resolved yet)", n.name)]
                                        }
                                    },
                                })
                                .collect(),
                        };
                        serde_json::json!({
                            "number": p.number,
                            "protocol": p.protocol.as_str(),
                            "endpoints": endpoints,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "host": h.pattern,
                    "serviceEntry": h.service_entry,
                    "ports": ports,
                })
            })
            .collect();
        serde_json::json!({
            "outboundTrafficPolicy": match self.policy {
                OutboundPolicy::RegistryOnly => "REGISTRY_ONLY",
                OutboundPolicy::AllowAny => "ALLOW_ANY",
            },
            "dnsServers": self.resolver.servers().iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "hosts": hosts,
        })
    }

    /// May the client reach `host:port` this way? `host` is lower case without a port.
    /// Counts the decision; the caller logs a denial with the rule.
    pub fn decide(&self, host: &str, port: u16, kind: Kind) -> Result<Target, Denied> {
        let entry = self.hosts.lookup(host).or_else(|| self.by_address(host));
        let verdict = self.verdict(entry, host, port, kind);
        let counters = entry.map(|e| &e.counters).unwrap_or(&self.unregistered);
        counters.count(verdict.is_ok(), kind);
        verdict
    }

    fn by_address(&self, host: &str) -> Option<&Arc<RegisteredHost>> {
        if self.addresses.is_empty() {
            return None;
        }
        let ip: IpAddr = host.parse().ok()?;
        self.addresses
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, h)| h)
    }

    fn verdict(
        &self,
        entry: Option<&Arc<RegisteredHost>>,
        host: &str,
        port: u16,
        kind: Kind,
    ) -> Result<Target, Denied> {
        let passthrough = || Target {
            entry: None,
            requested: Some(host.to_string()),
            port,
        };
        let allow_any = self.policy == OutboundPolicy::AllowAny;
        let Some(e) = entry else {
            if allow_any {
                return Ok(passthrough());
            }
            return Err(Denied {
                rule: "outboundTrafficPolicy REGISTRY_ONLY: no ServiceEntry registers this host"
                    .into(),
            });
        };
        let Some(i) = e.ports.iter().position(|p| p.number == port) else {
            if allow_any {
                return Ok(passthrough());
            }
            return Err(Denied {
                rule: format!(
                    "outboundTrafficPolicy REGISTRY_ONLY: ServiceEntry {} ({}) does not list port {port}",
                    e.service_entry, e.pattern
                ),
            });
        };
        let p = &e.ports[i];
        if kind == Kind::Http && !p.protocol.carries_plain_http() {
            return Err(Denied {
                rule: format!(
                    "port {port} of ServiceEntry {} is {}: plain HTTP cannot go there; use CONNECT (HTTPS_PROXY)",
                    e.service_entry,
                    p.protocol.as_str()
                ),
            });
        }
        Ok(Target {
            entry: Some((e.clone(), i)),
            requested: matches!(p.upstream, Upstream::Requested(_)).then(|| host.to_string()),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(policy: OutboundPolicy) -> EgressRegistry {
        let mut hosts = HostMatcher::default();
        let api = Arc::new(RegisteredHost::new(
            "api.test".into(),
            "default/api".into(),
            Location::MeshExternal,
            Resolution::Static,
            vec![
                RegisteredPort::new(
                    80,
                    Protocol::Http,
                    Upstream::Endpoints(vec![
                        Endpoint::Addr(SocketAddr::from(([10, 0, 0, 1], 8080))),
                        Endpoint::Addr(SocketAddr::from(([10, 0, 0, 2], 8080))),
                    ]),
                    "api.test",
                ),
                RegisteredPort::new(443, Protocol::Https, Upstream::Requested(443), "api.test"),
            ],
        ));
        hosts.insert("api.test", api.clone());
        let wild = Arc::new(RegisteredHost::new(
            "*.wild.test".into(),
            "default/wild".into(),
            Location::MeshExternal,
            Resolution::None,
            vec![RegisteredPort::new(
                443,
                Protocol::Tls,
                Upstream::Requested(443),
                "*.wild.test",
            )],
        ));
        hosts.insert("*.wild.test", wild);
        let mut r = EgressRegistry::new(policy, hosts, Arc::new(dns::Resolver::new(Vec::new())));
        r.addresses.push(("192.0.2.0/24".parse().unwrap(), api));
        r
    }

    #[test]
    fn registry_only_allows_registered_hosts_and_ports() {
        let r = registry(OutboundPolicy::RegistryOnly);
        let t = r.decide("api.test", 80, Kind::Http).unwrap();
        assert_eq!(t.cluster(), "outbound|80||api.test");
        assert!(t.requested.is_none(), "static endpoints need no name");
        let w = r.decide("a.b.wild.test", 443, Kind::Connect).unwrap();
        assert_eq!(w.requested.as_deref(), Some("a.b.wild.test"));
        assert!(
            r.decide("wild.test", 443, Kind::Connect).is_err(),
            "*.x needs a label"
        );
        let d = r.decide("other.test", 80, Kind::Http).unwrap_err();
        assert!(d.rule.contains("REGISTRY_ONLY"), "{}", d.rule);
        let d = r.decide("api.test", 8080, Kind::Connect).unwrap_err();
        assert!(d.rule.contains("does not list port 8080"), "{}", d.rule);
        // Plain HTTP cannot go to an HTTPS port; a tunnel can.
        let d = r.decide("api.test", 443, Kind::Http).unwrap_err();
        assert!(d.rule.contains("HTTPS"), "{}", d.rule);
        assert!(r.decide("api.test", 443, Kind::Connect).is_ok());
        // An IP literal inside the entry's addresses is the entry.
        assert!(r.decide("192.0.2.7", 80, Kind::Http).is_ok());
        assert!(r.decide("198.51.100.7", 80, Kind::Http).is_err());
    }

    #[test]
    fn allow_any_passes_the_rest_through() {
        let r = registry(OutboundPolicy::AllowAny);
        let t = r.decide("other.test", 8080, Kind::Http).unwrap();
        assert!(t.entry.is_none());
        assert_eq!(t.cluster(), "PassthroughCluster");
        assert_eq!((t.requested.as_deref(), t.port), (Some("other.test"), 8080));
        // A registered host on another port passes through too; its rules still hold.
        assert!(r
            .decide("api.test", 9000, Kind::Connect)
            .unwrap()
            .entry
            .is_none());
        assert!(r.decide("api.test", 443, Kind::Http).is_err());
    }

    #[tokio::test]
    async fn static_endpoints_are_picked_round_robin() {
        let r = registry(OutboundPolicy::RegistryOnly);
        let t = r.decide("api.test", 80, Kind::Http).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(t.address(&r).await.unwrap().to_string());
        }
        assert_eq!(
            seen,
            [
                "10.0.0.1:8080",
                "10.0.0.2:8080",
                "10.0.0.1:8080",
                "10.0.0.2:8080"
            ]
        );
        // An IP literal needs no resolver.
        let any = registry(OutboundPolicy::AllowAny);
        let t = any.decide("127.0.0.9", 81, Kind::Connect).unwrap();
        assert_eq!(t.address(&any).await.unwrap().to_string(), "127.0.0.9:81");
    }
}
