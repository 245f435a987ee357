//! Listeners: what a listener admits. Owns the per-listener connection cap and the
//! per-client-address one (before any protocol runs), and the counts behind the request
//! caps (`RequestCaps`, which the request core asks; this module never reads a request).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::telemetry::Metrics;

pub mod https;
pub mod proxy_protocol;

/// The connections one listener holds, and its cap (`mesh.downstream.maxConnections`,
/// read from the Snapshot in force as each connection arrives, so a reload changes it).
pub struct ConnectionLimit {
    /// The listener, as `/config` and the logs name it (`HTTP 0.0.0.0:8080`).
    name: String,
    active: AtomicUsize,
    /// Milliseconds since `epoch` of the last "at its limit" log line (one a second at most:
    /// a flood of connections must not become a flood of log lines).
    last_log_ms: AtomicU64,
    /// The same for the per-client cap.
    last_client_log_ms: AtomicU64,
    /// The same for PROXY protocol refusals.
    last_proxy_log_ms: AtomicU64,
    epoch: std::time::Instant,
    /// Connections held by each client address (only addresses that hold one: the table
    /// is as large as the connections held, never larger).
    clients: ClientTable,
}

/// The peer's IP address of an accepted connection (none for a Unix socket): after
/// [`accept`], the PROXY header's source when the listener reads one.
pub fn peer_ip(io: &pingora::protocols::Stream) -> Option<IpAddr> {
    io.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}

/// Admits a new connection on listener `listener`, the one way every listener's app takes
/// a connection: the listener's and the process's caps, then the PROXY header when the
/// listener expects one (`proxy_protocol::read`, which makes the header's address the
/// connection's peer), then the per-client cap by that peer. `None`: the connection is
/// to be closed (each refusal is counted and logged where it is decided).
pub async fn accept(
    limit: &Arc<ConnectionLimit>,
    snapshots: &arc_swap::ArcSwap<crate::snapshot::Snapshot>,
    listener: usize,
    io: pingora::protocols::Stream,
) -> Option<(Slot, pingora::protocols::Stream)> {
    let snapshot = snapshots.load_full();
    let limits = &snapshot.settings.downstream;
    let mut slot = limit.admit(limits.max_connections, limits.global_max_connections)?;
    let expects = snapshot.settings.proxy_protocol.as_deref().filter(|pp| {
        snapshot
            .listeners
            .get(listener)
            .is_some_and(|l| pp.applies_to(l.addr.port()))
    });
    let io = match expects {
        None => io,
        Some(pp) => {
            let peer = peer_ip(&io);
            // Boxed: inline, its state would be part of every connection's task for the
            // connection's life.
            match Box::pin(proxy_protocol::read(io, pp)).await {
                Ok(io) => io,
                Err(refused) => {
                    limit.proxy_refused(peer, &refused);
                    return None;
                }
            }
        }
    };
    limit
        .enter_client(&mut slot, limits, peer_ip(&io))
        .then_some((slot, io))
}

/// What a listener serves, read from its config; `server::run` builds one app per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP: a `tcp` route or TLS passthrough by SNI (`l4`); the HTTPS hosts that share a
    /// passthrough port are terminated here too.
    Tcp { terminates_https: bool },
    /// A forward proxy (egress): CONNECT tunnels and absolute-form HTTP requests.
    ForwardProxy,
    /// HTTPS: Portico's TLS accept (`https`), then HTTP/1.1 or h2 as ALPN chose.
    Https,
    /// Plain HTTP/1.1, and h2c where the listener allows it.
    Http,
}

impl Kind {
    pub fn of(l: &crate::snapshot::Listener) -> Kind {
        if l.l4.is_some() {
            Kind::Tcp {
                terminates_https: l.tls,
            }
        } else if l.forward_proxy {
            Kind::ForwardProxy
        } else if l.tls {
            Kind::Https
        } else {
            Kind::Http
        }
    }
}

/// Serves a connection in a task of its own, on the thread that accepted it, so that
/// pingora's per-connection task ends at once. That task is a future sized for pingora's
/// accept-side TLS handshake (~8.6 KiB in a release build, on plain listeners too, as
/// pingora uses one future type for both) and it would otherwise stay with the connection
/// for its whole life, idle keep-alive ones included (bench/RESULTS.md, "Idle connection
/// memory by allocation site"). Pingora never waits for its connection tasks either: at
/// shutdown they end with the runtime, as this one does, and the connection closes itself
/// on the shutdown signal while it idles.
pub fn own_task<F>(serve: F)
where
    F: std::future::Future<Output = Option<pingora::protocols::Stream>> + Send + 'static,
{
    // Spawned as it is: an async block awaiting `serve` would hold it twice (the captured
    // future and the one being awaited). Its output is always `None`: `serve` serves a
    // stream handed back itself, as the same connection (not admitted again).
    drop(tokio::spawn(serve));
}

/// Connections (or requests in flight, for [`RequestCaps`]) per client address, in shards
/// of their own lock. Only addresses that hold one are in it, so it is never larger than
/// what is held: bounded by the connection caps, not by how many addresses come and go.
struct ClientTable {
    shards: [Mutex<HashMap<IpAddr, u32>>; CLIENT_SHARDS],
}

const CLIENT_SHARDS: usize = 16;

impl ClientTable {
    fn new() -> ClientTable {
        ClientTable {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, ip: &IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let h = match ip {
            IpAddr::V4(v4) => v4.to_bits() as usize,
            IpAddr::V6(v6) => (v6.to_bits() >> 64) as usize ^ v6.to_bits() as usize,
        };
        // Low bits of an address vary most between clients; mixed so a /24 spreads out.
        let i = (h ^ (h >> 8) ^ (h >> 16)) % CLIENT_SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more connection for `ip`, unless it holds `max` already.
    fn enter(&self, ip: IpAddr, max: usize) -> bool {
        let mut s = self.shard(&ip);
        let n = s.entry(ip).or_insert(0);
        if *n as usize >= max {
            if *n == 0 {
                s.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, ip: IpAddr) {
        let mut s = self.shard(&ip);
        if let Some(n) = s.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                s.remove(&ip);
            }
        }
    }

    fn held(&self, ip: IpAddr) -> usize {
        self.shard(&ip).get(&ip).map_or(0, |n| *n as usize)
    }

    fn addresses(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// A connection the listener holds; dropping it frees the place (and its client's).
pub struct Slot {
    limit: Arc<ConnectionLimit>,
    /// Counted against its address's cap.
    client: Option<IpAddr>,
    /// Its place in the process-wide count.
    _place: GlobalPlace,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.client {
            self.limit.clients.leave(ip);
        }
        self.limit.active.fetch_sub(1, Ordering::AcqRel);
        Metrics::global()
            .listener_connections
            .with_label_values(&[&self.limit.name])
            .dec();
    }
}

impl ConnectionLimit {
    pub fn new(name: impl Into<String>) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            name: name.into(),
            active: AtomicUsize::new(0),
            last_log_ms: AtomicU64::new(0),
            last_client_log_ms: AtomicU64::new(0),
            last_proxy_log_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            clients: ClientTable::new(),
        })
    }

    /// Whether a line may be logged now (one a second at most per `last`).
    fn may_log(&self, last_ms: &AtomicU64) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = last_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 1000)
            && last_ms
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// `admit`, and the client's place: `None` also when `client` holds `per_client`
    /// connections on this listener already (NGINX's `limit_conn` per address). Refused
    /// ones are counted in `portico_listener_client_connections_refused_total` and logged
    /// at most once a second. Without an address (a Unix socket) only `max` applies.
    pub fn admit_client(
        self: &Arc<Self>,
        limits: &crate::snapshot::Downstream,
        client: Option<IpAddr>,
    ) -> Option<Slot> {
        let mut slot = self.admit(limits.max_connections, limits.global_max_connections)?;
        self.enter_client(&mut slot, limits, client).then_some(slot)
    }

    /// Counts `slot` against `client`'s cap; false when it holds its cap already.
    fn enter_client(
        &self,
        slot: &mut Slot,
        limits: &crate::snapshot::Downstream,
        client: Option<IpAddr>,
    ) -> bool {
        let (Some(cap), Some(ip)) = (limits.max_connections_per_client, client) else {
            return true;
        };
        let ip = ip.to_canonical();
        if !self.clients.enter(ip, cap) {
            Metrics::global()
                .listener_client_refused
                .with_label_values(&[&self.name])
                .inc();
            if self.may_log(&self.last_client_log_ms) {
                tracing::warn!(
                    listener = %self.name,
                    client = %ip,
                    max_connections_per_client = cap,
                    "client at its connection limit: its new connections are closed"
                );
            }
            return false;
        }
        slot.client = Some(ip);
        true
    }

    /// Counts and logs (once a second at most) a connection the PROXY protocol check closed.
    fn proxy_refused(&self, peer: Option<IpAddr>, refused: &proxy_protocol::Refused) {
        Metrics::global()
            .proxy_protocol_refused
            .with_label_values(&[&self.name, refused.reason()])
            .inc();
        if *refused == proxy_protocol::Refused::Closed {
            // A balancer's TCP health check opens and closes without a byte.
            tracing::debug!(listener = %self.name, peer = ?peer, "closed before a PROXY header");
        } else if self.may_log(&self.last_proxy_log_ms) {
            tracing::warn!(
                listener = %self.name,
                peer = ?peer,
                reason = %refused,
                "connection closed by the PROXY protocol check"
            );
        }
    }

    /// Connections `ip` holds now.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.clients.held(ip.to_canonical())
    }

    /// Client addresses holding a connection now.
    pub fn clients(&self) -> usize {
        self.clients.addresses()
    }

    /// A place for a new connection, or `None` when `max` are held already: the caller
    /// closes the connection at once (as Envoy's listener `max_connections` does), and it
    /// is counted in `portico_listener_connections_refused_total`. The process-wide cap
    /// (`global`, see [`Overload`]) applies after it.
    pub fn admit(self: &Arc<Self>, max: Option<usize>, global: Option<usize>) -> Option<Slot> {
        let place = Overload::get().admit(global)?;
        let held = self.active.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|m| held >= m) {
            self.active.fetch_sub(1, Ordering::AcqRel);
            let metrics = Metrics::global();
            metrics
                .listener_refused
                .with_label_values(&[&self.name])
                .inc();
            if self.may_log(&self.last_log_ms) {
                tracing::warn!(
                    listener = %self.name,
                    max_connections = max.unwrap_or_default(),
                    "listener at its connection limit: new connections are closed"
                );
            }
            return None;
        }
        Metrics::global()
            .listener_connections
            .with_label_values(&[&self.name])
            .inc();
        Some(Slot {
            limit: self.clone(),
            client: None,
            _place: place,
        })
    }

    /// Connections held now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// The requests in flight on one listener, as its request caps count them
/// (`mesh.downstream.maxRequests`, `maxRequestsPerClient`): an HTTP/1.1 request or an h2
/// stream from the moment the request core admits it to the end of its response. Kept
/// while a cap is set; a reload that keeps one set (whatever its values) keeps the counts
/// (`config::Cache` carries them by listener address).
pub struct RequestCounts {
    /// The listener, as the connection caps' metrics and log lines name it.
    name: String,
    active: AtomicUsize,
    /// Requests in flight per client address (only addresses with one).
    clients: ClientTable,
    /// `portico_listener_requests_active{listener}`, looked up once.
    gauge: prometheus::IntGauge,
    refused_listener: prometheus::IntCounter,
    refused_client: prometheus::IntCounter,
    /// One line a second at most per cap: a flood of requests must not become a flood of
    /// log lines.
    log: crate::admin::LogLimit,
    client_log: crate::admin::LogLimit,
}

impl std::fmt::Debug for RequestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCounts")
            .field("listener", &self.name)
            .field("active", &self.active())
            .finish()
    }
}

impl RequestCounts {
    pub fn new(name: impl Into<String>) -> Arc<RequestCounts> {
        let name = name.into();
        let m = Metrics::global();
        Arc::new(RequestCounts {
            gauge: m.listener_requests_active.with_label_values(&[&name]),
            refused_listener: m
                .listener_requests_refused
                .with_label_values(&[&name, CapScope::Listener.as_str()]),
            refused_client: m
                .listener_requests_refused
                .with_label_values(&[&name, CapScope::Client.as_str()]),
            name,
            active: AtomicUsize::new(0),
            clients: ClientTable::new(),
            log: crate::admin::LogLimit::new(),
            client_log: crate::admin::LogLimit::new(),
        })
    }

    /// Requests in flight now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Requests in flight from `ip` now.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.clients.held(ip.to_canonical())
    }

    /// Client addresses with a request in flight now.
    pub fn clients(&self) -> usize {
        self.clients.addresses()
    }
}

/// A listener's request caps in force, compiled into its Snapshot listener (`None` there
/// when neither is set: a request then pays one `Option` check).
#[derive(Debug, Clone)]
pub struct RequestCaps {
    /// `maxRequests`: in flight on the listener.
    pub max: Option<usize>,
    /// `maxRequestsPerClient`: in flight from one client address on the listener.
    pub per_client: Option<usize>,
    pub counts: Arc<RequestCounts>,
}

/// Which request cap refused a request (the `scope` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapScope {
    Listener,
    Client,
}

impl CapScope {
    pub const fn as_str(self) -> &'static str {
        match self {
            CapScope::Listener => "listener",
            CapScope::Client => "client",
        }
    }
}

/// A request in flight. Dropping it (the request ended, whichever way) frees its place
/// and its client's in the counts it was taken from, so a reload that starts counting
/// afresh never sees it and nothing is freed twice.
pub struct RequestSlot {
    counts: Arc<RequestCounts>,
    client: Option<IpAddr>,
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.client {
            self.counts.clients.leave(ip);
        }
        self.counts.active.fetch_sub(1, Ordering::AcqRel);
        self.counts.gauge.dec();
    }
}

impl std::fmt::Debug for RequestSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSlot")
            .field("listener", &self.counts.name)
            .field("client", &self.client)
            .finish()
    }
}

impl RequestCaps {
    /// A place for a request from `client` (the trusted client address), or the cap it
    /// would exceed: `max` in flight on the listener, or `per_client` from that address
    /// (NGINX's `limit_conn`, which counts each h2 stream). A refusal is counted in
    /// `portico_listener_requests_refused_total{listener,scope}` and logged at most once a
    /// second per cap. Without an address only `max` applies.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<RequestSlot, CapScope> {
        let c = &self.counts;
        let held = c.active.fetch_add(1, Ordering::AcqRel);
        c.gauge.inc();
        // Counted from here: a refusal below drops it, which uncounts it.
        let mut slot = RequestSlot {
            counts: c.clone(),
            client: None,
        };
        if let Some(max) = self.max.filter(|&m| held >= m) {
            c.refused_listener.inc();
            if let Some(skipped) = c.log.admit(std::time::Instant::now()) {
                tracing::warn!(
                    listener = %c.name,
                    max_requests = max,
                    since_last_line = skipped,
                    "listener at its limit of requests in flight: new requests get 503"
                );
            }
            return Err(CapScope::Listener);
        }
        if let (Some(cap), Some(ip)) = (self.per_client, client) {
            let ip = ip.to_canonical();
            if !c.clients.enter(ip, cap) {
                c.refused_client.inc();
                if let Some(skipped) = c.client_log.admit(std::time::Instant::now()) {
                    tracing::warn!(
                        listener = %c.name,
                        client = %ip,
                        max_requests_per_client = cap,
                        since_last_line = skipped,
                        "client at its limit of requests in flight: its new requests get 503"
                    );
                }
                return Err(CapScope::Client);
            }
            slot.client = Some(ip);
        }
        Ok(slot)
    }
}

/// The process-wide connection count and its cap (Envoy's overload manager with
/// `global_downstream_max_connections`; NGINX's `worker_connections`, which also closes
/// idle keep-alive connections when it runs out): at the cap a new connection takes the
/// place of the longest-idle keep-alive connection of the thread that accepted it, and is
/// closed at once only when that thread has none idle. So a flood of new connections,
/// or a memory limit, never closes a connection that is in the middle of a request.
pub struct Overload {
    held: AtomicUsize,
    /// One line a second at most while at the cap.
    log: crate::admin::LogLimit,
}

static OVERLOAD: Overload = Overload {
    held: AtomicUsize::new(0),
    log: crate::admin::LogLimit::new(),
};

/// A place in the process-wide count; dropping it frees it.
struct GlobalPlace(());

impl Drop for GlobalPlace {
    fn drop(&mut self) {
        OVERLOAD.held.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Overload {
    pub fn get() -> &'static Overload {
        &OVERLOAD
    }

    /// Connections held by every listener now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn admit(&self, cap: Option<usize>) -> Option<GlobalPlace> {
        let held = self.held.fetch_add(1, Ordering::AcqRel);
        let place = GlobalPlace(());
        let Some(cap) = cap else {
            return Some(place);
        };
        if held < cap {
            return Some(place);
        }
        let made_room = IdleConnections::here().close_one();
        Metrics::global()
            .overload_connections
            .with_label_values(&[if made_room { "idle_closed" } else { "refused" }])
            .inc();
        if let Some(skipped) = self.log.admit(std::time::Instant::now()) {
            tracing::warn!(
                global_max_connections = cap,
                since_last_line = skipped,
                "process at its connection limit: idle keep-alive connections are closed to make room, new ones closed when none is idle"
            );
        }
        made_room.then_some(place)
    }
}

/// The keep-alive connections of one worker thread that are waiting for a request, and
/// the signal that closes the longest-waiting one. Per thread (each worker runs its own
/// connections) so that going idle and back, twice per request, touches no lock or
/// counter another thread writes.
pub struct IdleConnections {
    idle: AtomicUsize,
    close: tokio::sync::Notify,
}

thread_local! {
    // Leaked once per thread (worker threads live as long as the process), so a
    // connection can hold a `&'static` to it in a `Send` future.
    static IDLE: &'static IdleConnections = {
        let here: &'static IdleConnections = Box::leak(Box::new(IdleConnections {
            idle: AtomicUsize::new(0),
            close: tokio::sync::Notify::new(),
        }));
        EVERY_THREAD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(here);
        here
    };
}

/// Every thread's idle connections, for the shutdown to close them all.
static EVERY_THREAD: Mutex<Vec<&'static IdleConnections>> = Mutex::new(Vec::new());
/// Set when the server begins to shut down.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// A connection counted as idle; dropping it (a request came) uncounts it.
pub struct Idle(&'static IdleConnections);

impl Drop for Idle {
    fn drop(&mut self) {
        self.0.idle.fetch_sub(1, Ordering::AcqRel);
    }
}

impl IdleConnections {
    /// This thread's.
    pub fn here() -> &'static IdleConnections {
        IDLE.with(|i| *i)
    }

    /// Counts a connection as idle until the guard is dropped.
    pub fn enter(&'static self) -> Idle {
        self.idle.fetch_add(1, Ordering::AcqRel);
        Idle(self)
    }

    /// Completes when this idle connection is to close: it is the one the process-wide
    /// cap closes (waiters are woken longest-waiting first), or the server is shutting
    /// down (every waiter, and every wait made before [`Self::shutting_down`] is read).
    pub fn closing(&self) -> tokio::sync::futures::Notified<'_> {
        self.close.notified()
    }

    /// Whether the server is shutting down: a connection about to wait for a request
    /// closes instead.
    pub fn shutting_down() -> bool {
        SHUTTING_DOWN.load(Ordering::Acquire)
    }

    /// Closes every connection that waits for a request, on every thread, and those that
    /// come to wait from now on.
    pub fn shut_down() {
        SHUTTING_DOWN.store(true, Ordering::Release);
        let every = EVERY_THREAD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for idle in every.iter() {
            idle.close.notify_waiters();
        }
    }

    /// Asks the longest-idle connection to close; false when none is idle.
    fn close_one(&self) -> bool {
        if self.idle.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.close.notify_one();
        true
    }
}

/// Memory a client connection is budgeted when the cap comes from a memory limit: more
/// than the costliest idle kind measured (an h2 connection ~11 KiB, TLS ~5 KiB, plain
/// HTTP/1.1 ~2 KiB, a tunnel 3-5 KiB: `bench/run.sh conns`, bench/RESULTS.md) and than a
/// busy HTTP/1.1 exchange (its buffers grow with a large body's reads), so the cap
/// holds whatever mix of them is open.
pub const CONNECTION_BUDGET: u64 = 64 * 1024;
/// Memory kept out of the connection budget: the process itself, its config and caches.
pub const MEMORY_RESERVE: u64 = 64 * 1024 * 1024;

/// A connection cap derived from the cgroup's memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryCap {
    pub limit: u64,
    pub connections: usize,
}

/// The cgroup's memory limit (v2 `memory.max`, else v1 `memory.limit_in_bytes`) and the
/// connections it allows, read once; `None` without a limit.
pub fn memory_cap() -> Option<MemoryCap> {
    static CAP: std::sync::OnceLock<Option<MemoryCap>> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        let cap = memory_cap_from(std::path::Path::new("/sys/fs/cgroup"));
        if let Some(c) = cap {
            tracing::info!(
                memory_limit = c.limit,
                global_max_connections = c.connections,
                "connection cap from the cgroup memory limit (mesh.downstream.globalMaxConnections sets another)"
            );
        }
        cap
    })
}

/// [`memory_cap`] under `root` (a cgroup mount).
pub fn memory_cap_from(root: &std::path::Path) -> Option<MemoryCap> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    let limit = read("memory.max")
        .or_else(|| read("memory/memory.limit_in_bytes"))?
        .trim()
        .parse::<u64>()
        .ok()
        // cgroup v1 says "no limit" with a number near 2^63.
        .filter(|&l| l < 1 << 60)?;
    let connections = (limit.saturating_sub(MEMORY_RESERVE) / CONNECTION_BUDGET).max(64) as usize;
    Some(MemoryCap { limit, connections })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(max: usize, per_client: usize) -> crate::snapshot::Downstream {
        crate::snapshot::Downstream {
            max_connections: Some(max),
            max_connections_per_client: Some(per_client),
            ..Default::default()
        }
    }

    #[test]
    fn a_client_holds_at_most_its_cap_and_places_come_back() {
        let limit = ConnectionLimit::new("HTTP 127.0.0.1:0");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        let held: Vec<Slot> = (0..3)
            .filter_map(|_| limit.admit_client(&caps(100, 2), Some(a)))
            .collect();
        assert_eq!(held.len(), 2);
        assert_eq!(limit.held_by(a), 2);
        assert!(limit.admit_client(&caps(100, 2), Some(b)).is_some());
        assert_eq!(
            limit.active(),
            2,
            "the refused one and b's dropped one left"
        );
        drop(held);
        assert_eq!(limit.held_by(a), 0);
        assert_eq!(
            limit.clients(),
            0,
            "addresses with no connection are forgotten"
        );
        assert_eq!(limit.active(), 0);
        // The listener's cap still holds, and no address is no per-client cap.
        let _one = limit.admit_client(&caps(1, 5), None).unwrap();
        assert!(limit.admit_client(&caps(1, 5), Some(a)).is_none());
        assert_eq!(limit.held_by(a), 0);
    }

    #[test]
    fn requests_in_flight_are_capped_per_listener_and_per_client_and_come_back() {
        let caps = RequestCaps {
            max: Some(3),
            per_client: Some(2),
            counts: RequestCounts::new("HTTP 127.0.0.1:1"),
        };
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        let a1 = caps.admit(Some(a)).unwrap();
        let a2 = caps.admit(Some(a)).unwrap();
        assert_eq!(caps.admit(Some(a)).unwrap_err(), CapScope::Client);
        assert_eq!(caps.counts.held_by(a), 2);
        let b1 = caps.admit(Some(b)).unwrap();
        assert_eq!(
            caps.counts.held_by("192.0.2.2".parse().unwrap()),
            1,
            "canonical"
        );
        assert_eq!(caps.admit(None).unwrap_err(), CapScope::Listener);
        assert_eq!(caps.counts.active(), 3, "refused ones are not counted");
        drop((a1, b1));
        assert_eq!(caps.counts.clients(), 1);
        let none = caps.admit(None).unwrap();
        drop((a2, none));
        assert_eq!(caps.counts.active(), 0);
        assert_eq!(
            caps.counts.clients(),
            0,
            "addresses with nothing in flight are forgotten"
        );
        // New caps over the same counts (a reload that changes the numbers) and new
        // counts (one that turned them off and on): slots free what they took.
        let old = caps.admit(Some(a)).unwrap();
        let fresh = RequestCaps {
            max: Some(1),
            per_client: None,
            counts: RequestCounts::new("HTTP 127.0.0.1:1"),
        };
        let new = fresh.admit(Some(a)).unwrap();
        drop(old);
        assert_eq!(caps.counts.active(), 0);
        assert_eq!(fresh.counts.active(), 1);
        drop(new);
        assert_eq!(fresh.counts.active(), 0);
    }

    #[test]
    fn the_memory_cap_comes_from_cgroup_v2_or_v1_and_max_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(memory_cap_from(dir.path()), None, "no cgroup files");
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(memory_cap_from(dir.path()), None, "v2 without a limit");
        std::fs::write(dir.path().join("memory.max"), "268435456\n").unwrap();
        let cap = memory_cap_from(dir.path()).unwrap();
        // 256 MiB less the 64 MiB reserve, 64 KiB a connection.
        assert_eq!(cap.connections, 3072);
        assert_eq!(cap.limit, 256 << 20);
        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir(v1.path().join("memory")).unwrap();
        std::fs::write(
            v1.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(memory_cap_from(v1.path()), None, "v1 without a limit");
        std::fs::write(v1.path().join("memory/memory.limit_in_bytes"), "67108864").unwrap();
        assert_eq!(
            memory_cap_from(v1.path()).unwrap().connections,
            64,
            "a tiny limit still admits a few"
        );
    }
}
