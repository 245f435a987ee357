//! Clusters: where a destination's requests go. Endpoints are resolved before a Snapshot is
//! published; picking one is a lookup and a few atomics. Outlier detection and connection
//! pool limits keep their state in atomics here. Never parses config.

pub mod balancer;
pub mod connect;
pub mod pool;
pub mod proxy_protocol;
pub mod retry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pingora::upstreams::peer::HttpPeer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use balancer::{HashSource, HashTable, Policy};

/// Per-endpoint counters shared by every request.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub active: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since [`epoch`] until which the endpoint is ejected (0 = not ejected).
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Peak-EWMA latency in microseconds.
    pub ewma_us: AtomicU64,
}

/// One upstream endpoint (subset selection happened at compile time).
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub stats: EndpointStats,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            stats: EndpointStats::default(),
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Istio's outlierDetection, with its defaults.
#[derive(Debug, Clone)]
pub struct OutlierPolicy {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

/// Connection pool limits (circuit breaking). `None` fields are unlimited.
#[derive(Debug)]
pub struct Limits {
    /// Concurrent requests to the cluster: `tcp.maxConnections` for HTTP/1.1 (one request
    /// per connection), `http.http2MaxRequests` for both.
    concurrency: Option<Arc<Semaphore>>,
    pub max_pending: usize,
    pending: AtomicUsize,
    pub max_retries: Option<u32>,
    active_retries: AtomicU32,
}

impl Limits {
    /// A place under the concurrency limit now, or `None` (no waiting).
    pub fn try_admit(&self) -> Option<Admission> {
        let Some(sem) = &self.concurrency else {
            return Some(Admission { _permit: None });
        };
        let p = sem.clone().try_acquire_owned().ok()?;
        Some(Admission { _permit: Some(p) })
    }

    pub fn new(
        max_concurrency: Option<u32>,
        max_pending: Option<u32>,
        max_retries: Option<u32>,
    ) -> Self {
        Limits {
            concurrency: max_concurrency.map(|n| Arc::new(Semaphore::new(n as usize))),
            // Envoy's default is unbounded; Portico never queues without bound.
            max_pending: max_pending.map(|n| n as usize).unwrap_or(1024),
            pending: AtomicUsize::new(0),
            max_retries,
            active_retries: AtomicU32::new(0),
        }
    }

    pub fn unlimited() -> Self {
        Self::new(None, None, None)
    }
}

/// Held while a request uses the cluster; dropping it frees the slot.
#[derive(Debug)]
pub struct Admission {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Held while a retry is under way (`http.maxRetries`).
pub struct RetryPermit {
    cluster: Arc<Cluster>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.cluster
            .limits
            .active_retries
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A set of endpoints for one `host`, `port` and `subset`, named as Envoy names clusters:
/// `outbound|8080|v1|api.internal`.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    pub endpoints: Vec<Endpoint>,
    pub settings: ClusterSettings,
    pub policy: Policy,
    pub limits: Limits,
    pub outlier: Option<OutlierPolicy>,
    /// The destination labels of Istio's metrics for this cluster.
    pub metrics_dest: crate::telemetry::istio::Destination,
    /// Requests served per upstream connection (by file descriptor), kept only when
    /// `maxRequestsPerConnection` is above 1.
    uses: std::sync::Mutex<std::collections::HashMap<i32, u32>>,
    /// Pingora's TCP step for connections without a PROXY header, made on first use.
    tcp: OnceLock<Arc<connect::PingoraTcp>>,
}

/// TLS origination settings, parsed once: certificates are DER already, the verifier is
/// built.
pub struct UpstreamTls {
    /// Server name sent (the destination host unless `sni` is set), and the name checked
    /// when `subjectAltNames` is empty (not for `ISTIO_MUTUAL`).
    pub sni: String,
    /// The verifier of the upstream's certificate (chain, CRL, names); `None` with
    /// `insecureSkipVerify`.
    pub verifier: Option<Arc<crate::tls::upstream::UpstreamVerifier>>,
    /// `MUTUAL`: the client certificate and key.
    pub client: Option<Arc<pingora::utils::tls::CertKey>>,
    /// Separates the connection pools of clusters that verify differently (CA, CRL, names
    /// and the files' contents), since the verifier is not part of pingora's pool key: a
    /// connection verified under an old CRL is not reused once a new one is loaded.
    pub group_key: u64,
    /// The files it was read from: a compile that reuses the cluster watches them still.
    pub files: Vec<std::path::PathBuf>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("verifier", &self.verifier)
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Speak HTTP/2 with prior knowledge (h2c) to this cluster.
    pub h2c: bool,
    pub tcp_keepalive: Option<pingora::protocols::TcpKeepalive>,
    /// TLS to the upstream (DestinationRule `trafficPolicy.tls`).
    pub tls: Option<Arc<UpstreamTls>>,
    /// `maxRequestsPerConnection`: a connection that has served this many requests is
    /// closed (`Connection: close` on its last request). `None` = unlimited.
    pub max_requests_per_connection: Option<u32>,
    /// `tcp.idleTimeout`: a TCP or passthrough connection with no bytes either way for this
    /// long is closed. Istio's default is 1h; `None` (written `0s`) never closes.
    pub tcp_idle_timeout: Option<Duration>,
    /// `trafficPolicy.proxyProtocol`: each new connection opens with a PROXY header of
    /// this version ([`Cluster::proxy_header`]).
    pub proxy_protocol: Option<proxy_protocol::Version>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: None,
            h2c: false,
            tcp_keepalive: None,
            tls: None,
            max_requests_per_connection: None,
            tcp_idle_timeout: Some(Duration::from_secs(3600)),
            proxy_protocol: None,
        }
    }
}

impl Cluster {
    pub fn new(
        host: &str,
        port: u16,
        subset: Option<&str>,
        addrs: Vec<SocketAddr>,
        settings: ClusterSettings,
    ) -> Self {
        Cluster {
            name: cluster_name(host, port, subset),
            host: host.to_string(),
            port,
            subset: subset.map(str::to_string),
            endpoints: addrs.into_iter().map(Endpoint::new).collect(),
            settings,
            policy: Policy::RoundRobin(AtomicUsize::new(0)),
            limits: Limits::unlimited(),
            outlier: None,
            metrics_dest: crate::telemetry::istio::Destination {
                service: host.into(),
                version: subset.map(Into::into),
            },
            uses: Default::default(),
            tcp: OnceLock::new(),
        }
    }

    /// Counts a request on upstream connection `fd` (`reused` = taken from the pool) and
    /// says whether it must be the connection's last.
    pub fn last_on_connection(&self, fd: i32, reused: bool) -> bool {
        match self.settings.max_requests_per_connection {
            None => false,
            Some(0 | 1) => true,
            Some(max) => {
                let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
                let n = if reused {
                    let n = uses.entry(fd).or_insert(0);
                    *n += 1;
                    *n
                } else {
                    uses.insert(fd, 1);
                    1
                };
                if n >= max {
                    uses.remove(&fd);
                    true
                } else {
                    false
                }
            }
        }
    }

    fn ejected(&self, i: usize, now: u64) -> bool {
        self.endpoints[i]
            .stats
            .ejected_until_ms
            .load(Ordering::Relaxed)
            > now
    }

    /// Picks an endpoint: not ejected (unless the cluster is in panic), and not one of
    /// `tried` while others remain.
    pub fn select(&self, hash: Option<u64>, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let ejected = if self.outlier.is_some() {
            (0..n).filter(|&i| self.ejected(i, now)).count()
        } else {
            0
        };
        let panic = match &self.outlier {
            Some(o) if o.min_health_percent > 0 => {
                (n - ejected) * 100 < n * o.min_health_percent as usize
            }
            _ => false,
        };
        let healthy = |i: usize| panic || ejected == 0 || !self.ejected(i, now);
        let fresh_left = (0..n).any(|i| healthy(i) && !tried.contains(&i));
        self.policy.pick(&self.endpoints, hash, |i| {
            healthy(i) && (!fresh_left || !tried.contains(&i))
        })
    }

    /// A permit if one is free now, without joining the pending queue (whose slots count
    /// against `http1MaxPendingRequests` for everyone else).
    pub fn try_admit(&self) -> Option<Admission> {
        self.limits.try_admit()
    }

    /// Admission under the connection pool limits: a permit, a bounded wait for one, or
    /// `None` when the pending queue is full too (503, flag UO).
    pub async fn admit(&self, wait_at_most: Duration) -> Option<Admission> {
        if let Some(a) = self.try_admit() {
            return Some(a);
        }
        let sem = self.limits.concurrency.as_ref()?;
        if self.limits.pending.fetch_add(1, Ordering::AcqRel) >= self.limits.max_pending {
            self.limits.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let permit = tokio::time::timeout(wait_at_most, sem.clone().acquire_owned()).await;
        self.limits.pending.fetch_sub(1, Ordering::AcqRel);
        match permit {
            Ok(Ok(p)) => Some(Admission { _permit: Some(p) }),
            _ => None,
        }
    }

    /// A retry may start when the cluster's `maxRetries` budget allows.
    pub fn start_retry(self: &Arc<Self>) -> Option<RetryPermit> {
        if let Some(max) = self.limits.max_retries {
            if self.limits.active_retries.fetch_add(1, Ordering::AcqRel) >= max {
                self.limits.active_retries.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
        } else {
            self.limits.active_retries.fetch_add(1, Ordering::AcqRel);
        }
        Some(RetryPermit {
            cluster: self.clone(),
        })
    }

    /// Records the outcome of a request to endpoint `i`: `Some(status)` for a response,
    /// `None` for a connection failure, reset or timeout (a gateway error).
    pub fn record(&self, i: usize, status: Option<u16>, latency: Option<Duration>) {
        let Some(e) = self.endpoints.get(i) else {
            return;
        };
        if let Some(l) = latency {
            // Peak EWMA: jump up to a slow sample at once, decay towards fast ones.
            let sample = l.as_micros().min(u128::from(u64::MAX)) as u64;
            let old = e.stats.ewma_us.load(Ordering::Relaxed);
            let new = if sample > old {
                sample
            } else {
                (old * 7 + sample) / 8
            };
            e.stats.ewma_us.store(new, Ordering::Relaxed);
        }
        let Some(o) = &self.outlier else { return };
        let (is_5xx, is_gateway) = match status {
            None => (true, true),
            Some(s) => (s >= 500, matches!(s, 502..=504)),
        };
        let s = &e.stats;
        let c5 = if is_5xx {
            s.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            s.consecutive_5xx.store(0, Ordering::Relaxed);
            0
        };
        let cg = if is_gateway {
            s.consecutive_gateway.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            s.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let trip = (o.consecutive_5xx > 0 && c5 >= o.consecutive_5xx)
            || (o.consecutive_gateway > 0 && cg >= o.consecutive_gateway);
        if trip {
            self.eject(i, o);
        }
    }

    fn eject(&self, i: usize, o: &OutlierPolicy) {
        let now = now_ms();
        if self.ejected(i, now) {
            return;
        }
        let n = self.endpoints.len();
        let ejected = (0..n).filter(|&j| self.ejected(j, now)).count();
        // Envoy ejects at least one host whatever maxEjectionPercent says.
        let allowed = (n * o.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            return;
        }
        let s = &self.endpoints[i].stats;
        let times = s.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        let until = now + o.base_ejection.as_millis() as u64 * u64::from(times);
        s.ejected_until_ms.store(until, Ordering::Relaxed);
        s.consecutive_5xx.store(0, Ordering::Relaxed);
        s.consecutive_gateway.store(0, Ordering::Relaxed);
        tracing::warn!(cluster = %self.name, endpoint = %self.endpoints[i].addr, ejections = times, "outlier ejected");
    }

    /// Whether endpoint `i` is ejected now (for the admin API).
    pub fn is_ejected(&self, i: usize) -> bool {
        self.ejected(i, now_ms())
    }

    /// The pingora peer for endpoint `i`. The address is already an IP: `HttpPeer::new`
    /// must never resolve names on the request path.
    /// The PROXY header a new connection of this cluster opens with, for a request or
    /// connection of the downstream connection whose addresses `conn` gives (asked only
    /// when the cluster sends one); `None` when it sends none. Every connector asks here
    /// (pingora's, the fast codecs', L4, the mirror): the one place the setting is read.
    pub fn proxy_header(
        &self,
        conn: impl FnOnce() -> Option<proxy_protocol::ConnAddrs>,
    ) -> Option<proxy_protocol::Header> {
        let version = self.settings.proxy_protocol?;
        Some(proxy_protocol::Header {
            version,
            addrs: conn(),
        })
    }

    /// Why only pingora's connector speaks to this cluster (TLS origination, h2c), or
    /// `None`: Portico's own HTTP/1.1 upstream connections (the fast codecs', the mirror's)
    /// carry its requests.
    pub fn pingora_only(&self) -> Option<&'static str> {
        if self.settings.tls.is_some() {
            Some("TLS to the upstream")
        } else if self.settings.h2c {
            Some("HTTP/2 to the upstream")
        } else {
            None
        }
    }

    /// Pingora's peer for endpoint `i`; `proxy` is [`Cluster::proxy_header`]'s answer for
    /// the request's downstream connection.
    pub fn peer(
        &self,
        i: usize,
        read_timeout: Option<Duration>,
        proxy: Option<proxy_protocol::Header>,
    ) -> HttpPeer {
        let endpoint = &self.endpoints[i];
        let mut peer = match &self.settings.tls {
            None => HttpPeer::new(endpoint.addr, false, String::new()),
            Some(tls) => {
                let mut p = HttpPeer::new(endpoint.addr, true, tls.sni.clone());
                p.client_cert_key = tls.client.clone();
                p.group_key = tls.group_key;
                // Our verifier replaces pingora's (vendor/README.md). Both flags on keep
                // pingora from building a verifier of its own per connection first.
                let verify = tls.verifier.is_some();
                p.options.verify_cert = verify;
                p.options.verify_hostname = verify;
                p.options.server_cert_verifier = tls.verifier.clone().map(|v| {
                    v as Arc<dyn rustls::client::danger::ServerCertVerifier + Send + Sync>
                });
                p
            }
        };
        let o = &mut peer.options;
        o.connection_timeout = Some(self.settings.connect_timeout);
        o.total_connection_timeout = Some(self.settings.connect_timeout);
        o.idle_timeout = self.settings.idle_timeout.or(Some(Duration::from_secs(60)));
        o.read_timeout = read_timeout;
        o.write_timeout = read_timeout;
        if self.settings.h2c {
            // Prior-knowledge h2c in plain text; over TLS, h2 offered by ALPN.
            if self.settings.tls.is_some() {
                o.set_http_version(2, 1);
            } else {
                o.set_http_version(2, 2);
            }
            o.max_h2_streams = 100;
        }
        // The TCP connect (timeout, keep-alive, the PROXY header before TLS) is ours, as
        // on every other path; the header is part of pingora's pool key (vendor/README.md).
        o.proxy_protocol_header = proxy.map(|h| bytes::Bytes::from(h.encode()));
        let tcp: Arc<dyn pingora::connectors::L4Connect + Send + Sync> = match proxy {
            None => self
                .tcp
                .get_or_init(|| Arc::new(connect::PingoraTcp::new(&self.settings, None)))
                .clone(),
            Some(h) => Arc::new(connect::PingoraTcp::new(&self.settings, Some(h))),
        };
        o.custom_l4 = Some(tcp);
        peer
    }
}

/// Decrements the endpoint's in-flight count when the attempt ends.
pub struct InFlight {
    cluster: Arc<Cluster>,
    index: usize,
    pub started: Instant,
}

impl InFlight {
    pub fn new(cluster: Arc<Cluster>, index: usize) -> Self {
        cluster.endpoints[index]
            .stats
            .active
            .fetch_add(1, Ordering::Relaxed);
        InFlight {
            cluster,
            index,
            started: Instant::now(),
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.cluster.endpoints[self.index]
            .stats
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn cluster_name(host: &str, port: u16, subset: Option<&str>) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: u16) -> Cluster {
        let addrs = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
            .collect();
        Cluster::new("svc", 80, None, addrs, ClusterSettings::default())
    }

    #[test]
    fn round_robin_visits_every_endpoint() {
        let c = cluster(3);
        let picks: Vec<usize> = (0..6).map(|_| c.select(None, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn retry_goes_elsewhere() {
        let c = cluster(2);
        let first = c.select(None, &[]).unwrap();
        let retry = c.select(None, &[first]).unwrap();
        assert_ne!(first, retry);
        assert_eq!(
            cluster(1).select(None, &[0]),
            Some(0),
            "the only endpoint is reused"
        );
        assert!(cluster(0).select(None, &[]).is_none());
    }

    #[test]
    fn consecutive_errors_eject_then_time_brings_back() {
        let mut c = cluster(3);
        c.outlier = Some(OutlierPolicy {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            base_ejection: Duration::from_millis(500),
            max_ejection_percent: 100,
            min_health_percent: 0,
        });
        c.record(1, Some(503), None);
        assert!(!c.is_ejected(1));
        c.record(1, Some(200), None);
        c.record(1, Some(500), None);
        assert!(!c.is_ejected(1), "a success resets the count");
        c.record(1, Some(500), None);
        assert!(c.is_ejected(1));
        for _ in 0..20 {
            assert_ne!(c.select(None, &[]), Some(1));
        }
        // Ejected for 500 ms (ample for the checks above on a loaded machine), then back:
        // polled, not slept for.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.is_ejected(1) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!c.is_ejected(1), "back after the ejection time");
    }

    #[test]
    fn max_ejection_percent_keeps_endpoints() {
        let mut c = cluster(3);
        c.outlier = Some(OutlierPolicy {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        });
        c.record(0, None, None);
        c.record(1, None, None);
        assert!(c.is_ejected(0));
        assert!(!c.is_ejected(1), "10 % of 3 still ejects one, and only one");
    }

    #[tokio::test]
    async fn admission_overflows_fast() {
        let mut c = cluster(1);
        c.limits = Limits::new(Some(1), Some(1), None);
        let c = Arc::new(c);
        let first = c
            .admit(Duration::from_secs(5))
            .await
            .expect("first is admitted");
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.admit(Duration::from_secs(5)).await.is_some() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            c.admit(Duration::from_secs(5)).await.is_none(),
            "queue of 1 is full"
        );
        drop(first);
        assert!(
            waiter.await.unwrap(),
            "the pending request gets the freed slot"
        );
    }
}
