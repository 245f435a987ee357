//! Listeners: what a listener admits before any protocol runs. Owns the per-listener
//! connection cap; never reads a request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

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
    epoch: std::time::Instant,
}

/// A connection the listener holds; dropping it frees the place.
pub struct Slot {
    limit: Arc<ConnectionLimit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
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
            epoch: std::time::Instant::now(),
        })
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
            let now = self.epoch.elapsed().as_millis() as u64;
            let last = self.last_log_ms.load(Ordering::Relaxed);
            if (last == 0 || now.saturating_sub(last) >= 1000)
                && self
                    .last_log_ms
                    .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
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
        })
    }

    /// Connections held now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}
