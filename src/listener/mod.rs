//! Listeners: what a listener admits before any protocol runs. Owns the per-listener
//! connection cap and the per-client-address one; never reads a request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::telemetry::Metrics;

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
    epoch: std::time::Instant,
    /// Connections held by each client address (only addresses that hold one: the table
    /// is as large as the connections held, never larger).
    clients: ClientTable,
}

/// The peer's IP address of an accepted connection (none for a Unix socket).
pub fn peer_ip(io: &pingora::protocols::Stream) -> Option<IpAddr> {
    io.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}

/// Connections per client address, in shards of their own lock.
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
        max: Option<usize>,
        per_client: Option<usize>,
        client: Option<IpAddr>,
    ) -> Option<Slot> {
        let mut slot = self.admit(max)?;
        let (Some(cap), Some(ip)) = (per_client, client) else {
            return Some(slot);
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
            return None;
        }
        slot.client = Some(ip);
        Some(slot)
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
    /// is counted in `portico_listener_connections_refused_total`.
    pub fn admit(self: &Arc<Self>, max: Option<usize>) -> Option<Slot> {
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
        })
    }

    /// Connections held now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_its_cap_and_places_come_back() {
        let limit = ConnectionLimit::new("HTTP 127.0.0.1:0");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        let held: Vec<Slot> = (0..3)
            .filter_map(|_| limit.admit_client(Some(100), Some(2), Some(a)))
            .collect();
        assert_eq!(held.len(), 2);
        assert_eq!(limit.held_by(a), 2);
        assert!(limit.admit_client(Some(100), Some(2), Some(b)).is_some());
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
        let _one = limit.admit_client(Some(1), Some(5), None).unwrap();
        assert!(limit.admit_client(Some(1), Some(5), Some(a)).is_none());
        assert_eq!(limit.held_by(a), 0);
    }
}
