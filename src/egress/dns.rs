//! DNS for egress: the names ServiceEntries resolve (`resolution = DNS` / `DNS_ROUND_ROBIN`)
//! and the names clients ask for (`NONE`, wildcard hosts, `ALLOW_ANY`).
//!
//! A [`DnsName`] is shared by every Snapshot that uses it (a process-wide table of weak
//! handles), so a reload keeps its last answer. A background task ([`Refresher`]) asks again
//! when an answer's TTL runs out; the request path only reads the current answer through an
//! `ArcSwap` and never waits for DNS, except for a name that has never been answered yet.
//! A failed refresh keeps the last good answer and is retried with a back-off.
//! Owns no policy: what may be resolved is decided by the registry.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::snapshot::Snapshot;

/// An answer is never kept for less than this, so a TTL of 0 cannot make the refresher spin.
const MIN_TTL: Duration = Duration::from_secs(1);
/// After a failed refresh the next try waits this long, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Which nameservers to ask: `mesh.dnsServers`, or the system's (`/etc/resolv.conf`).
/// The hickory resolver is built on first use, inside a runtime.
pub struct Resolver {
    servers: Vec<SocketAddr>,
    inner: OnceLock<Result<TokioResolver, String>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("servers", &self.servers)
            .finish()
    }
}

/// One answer: the addresses and when to ask again.
#[derive(Debug)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    pub valid_until: Instant,
}

impl Resolver {
    /// `servers` empty: the system resolver.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Resolver {
            servers,
            inner: OnceLock::new(),
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    fn build(&self) -> Result<TokioResolver, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if self.servers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?
        } else {
            let servers = self
                .servers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                provider,
            );
            // The configured servers are the whole truth: no /etc/hosts.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        // The refresher and first lookups should fail fast and keep the last answer rather
        // than wait out the defaults (5 s × 2).
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        builder
            .build()
            .map_err(|e| format!("cannot build the resolver: {e}"))
    }

    /// Asks the nameservers for `name`'s addresses.
    pub async fn lookup(&self, name: &str) -> Result<Answer, String> {
        let resolver = self
            .inner
            .get_or_init(|| self.build())
            .as_ref()
            .map_err(Clone::clone)?;
        // A trailing dot keeps resolv.conf search domains from being tried first.
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        match resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                addrs.dedup();
                let now = Instant::now();
                Ok(Answer {
                    addrs,
                    valid_until: lookup.valid_until().max(now + MIN_TTL),
                })
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A name resolved in the background; the current answer is read without a lock.
#[derive(Debug)]
pub struct DnsName {
    pub name: String,
    answer: ArcSwapOption<Answer>,
    /// When the refresher should ask next, in ms since [`epoch`]; 0 = now.
    refresh_at_ms: AtomicU64,
    /// Consecutive failures, for the back-off.
    failures: AtomicU64,
    /// A cluster's endpoints were compiled from this name: a changed answer recompiles.
    for_clusters: AtomicBool,
}

/// Set when a name clusters were compiled from gets a different answer; the config watcher
/// takes it and reloads, so the clusters' endpoints follow DNS without a request waiting.
static CLUSTER_ANSWER_CHANGED: AtomicBool = AtomicBool::new(false);

/// Counts answer changes of any name: compiled clusters are reusable (compile::Cache) only
/// while it stands still.
static ANSWER_EPOCH: AtomicU64 = AtomicU64::new(0);

pub fn answer_epoch() -> u64 {
    ANSWER_EPOCH.load(Ordering::Acquire)
}

/// Whether a cluster's name has a new answer since the last call.
pub fn take_cluster_change() -> bool {
    CLUSTER_ANSWER_CHANGED.swap(false, Ordering::AcqRel)
}

fn same_addrs(a: &[IpAddr], b: &[IpAddr]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    a == b
}

/// Resolves `name` now, blocking, with `servers` (empty: the system's resolver through
/// getaddrinfo, as the rest of the system sees names, /etc/hosts included). For compiling a
/// Snapshot off the request path; runs on its own thread so that it works whether or not
/// the caller is inside a runtime.
pub fn lookup_blocking(servers: &[SocketAddr], name: &str) -> Result<Vec<IpAddr>, String> {
    if servers.is_empty() {
        use std::net::ToSocketAddrs;
        return (name, 0)
            .to_socket_addrs()
            .map(|it| it.map(|s| s.ip()).collect())
            .map_err(|e| e.to_string());
    }
    let servers = servers.to_vec();
    let name = name.to_string();
    std::thread::scope(|s| {
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a resolver runtime: {e}"))?;
            rt.block_on(Resolver::new(servers).lookup(&name))
                .map(|a| a.addrs)
        })
        .join()
        .unwrap_or_else(|_| Err("the resolver thread panicked".into()))
    })
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn ms_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64
}

impl DnsName {
    /// The last good answer, `None` when there never was one.
    pub fn answer(&self) -> Option<Arc<Answer>> {
        self.answer.load_full()
    }

    /// Marks the name as one clusters were compiled from (see [`take_cluster_change`]).
    pub fn follow_for_clusters(&self) {
        self.for_clusters.store(true, Ordering::Relaxed);
    }

    /// A first answer found while compiling, when there is none yet. The refresher asks
    /// its nameservers at once and keeps the answer fresh from then on.
    pub fn seed(&self, addrs: Vec<IpAddr>) {
        if self.answer().is_none() {
            self.answer.store(Some(Arc::new(Answer {
                addrs,
                valid_until: Instant::now(),
            })));
            self.refresh_at_ms.store(0, Ordering::Relaxed);
            wake().notify_one();
        }
    }

    /// The last good answer, or a lookup now when there never was one (the first request
    /// after a name appears in the config). Concurrent first lookups may both ask.
    pub async fn current(&self, resolver: &Resolver) -> Result<Arc<Answer>, String> {
        if let Some(a) = self.answer() {
            return Ok(a);
        }
        self.refresh(resolver).await?;
        self.answer()
            .ok_or_else(|| format!("{} has no answer", self.name))
    }

    /// Asks again and stores a good answer; a failure keeps the old one.
    async fn refresh(&self, resolver: &Resolver) -> Result<(), String> {
        match resolver.lookup(&self.name).await {
            Ok(answer) => {
                self.refresh_at_ms
                    .store(ms_since_epoch(answer.valid_until), Ordering::Relaxed);
                self.failures.store(0, Ordering::Relaxed);
                let old = self.answer();
                let changed = old
                    .as_ref()
                    .is_none_or(|old| !same_addrs(&old.addrs, &answer.addrs));
                if changed {
                    ANSWER_EPOCH.fetch_add(1, Ordering::AcqRel);
                }
                if changed && old.is_some() && self.for_clusters.load(Ordering::Relaxed) {
                    CLUSTER_ANSWER_CHANGED.store(true, Ordering::Release);
                }
                if changed {
                    tracing::info!(name = %self.name, addrs = ?answer.addrs, ttl_ms = answer.valid_until.saturating_duration_since(Instant::now()).as_millis() as u64, "dns answer");
                }
                self.answer.store(Some(Arc::new(answer)));
                Ok(())
            }
            Err(e) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed);
                let backoff = FIRST_BACKOFF.saturating_mul(1 << n.min(5)).min(MAX_BACKOFF);
                self.refresh_at_ms
                    .store(ms_since_epoch(Instant::now() + backoff), Ordering::Relaxed);
                tracing::warn!(name = %self.name, error = %e, kept = self.answer().is_some(), retry_in_ms = backoff.as_millis() as u64, "dns lookup failed; keeping the last answer");
                Err(e)
            }
        }
    }

    fn due(&self, now_ms: u64) -> bool {
        self.refresh_at_ms.load(Ordering::Relaxed) <= now_ms
    }
}

/// The process-wide table of names in use, so Snapshots share answers across reloads.
fn table() -> &'static Mutex<HashMap<String, Weak<DnsName>>> {
    static TABLE: OnceLock<Mutex<HashMap<String, Weak<DnsName>>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

fn wake() -> &'static tokio::sync::Notify {
    static WAKE: OnceLock<tokio::sync::Notify> = OnceLock::new();
    WAKE.get_or_init(tokio::sync::Notify::new)
}

/// The shared handle for `name` (lower case, no trailing dot). Called while compiling a
/// Snapshot; a name no Snapshot uses any more is dropped with its last handle.
pub fn name(name: &str) -> Arc<DnsName> {
    let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = t.get(name).and_then(Weak::upgrade) {
        return n;
    }
    let n = Arc::new(DnsName {
        name: name.to_string(),
        answer: ArcSwapOption::empty(),
        refresh_at_ms: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        for_clusters: AtomicBool::new(false),
    });
    t.insert(name.to_string(), Arc::downgrade(&n));
    drop(t);
    wake().notify_one();
    n
}

fn live_names() -> Vec<Arc<DnsName>> {
    let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
    t.retain(|_, w| w.strong_count() > 0);
    t.values().filter_map(Weak::upgrade).collect()
}

/// Keeps every name's answer fresh: asks again when the TTL runs out, with the resolver
/// of the Snapshot in force.
pub struct Refresher {
    pub snapshots: Arc<arc_swap::ArcSwap<Snapshot>>,
}

#[async_trait]
impl BackgroundService for Refresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let resolver = self.snapshots.load().egress.resolver.clone();
            let now = ms_since_epoch(Instant::now());
            let names = live_names();
            let due: Vec<_> = names.iter().filter(|n| n.due(now)).cloned().collect();
            let lookups = due.into_iter().map(|n| {
                let r = resolver.clone();
                tokio::spawn(async move {
                    let _ = n.refresh(&r).await;
                })
            });
            for task in lookups.collect::<Vec<_>>() {
                let _ = task.await;
            }
            drop(names);
            let next = live_names()
                .iter()
                .map(|n| n.refresh_at_ms.load(Ordering::Relaxed))
                .min();
            let now = ms_since_epoch(Instant::now());
            // Re-checked at least every few seconds: a reload may bring another resolver.
            let wait = next
                .map(|t| Duration::from_millis(t.saturating_sub(now)))
                .unwrap_or(Duration::from_secs(5))
                .clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake().notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
