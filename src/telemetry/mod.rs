//! Metrics and the access log. Counters are created once; the request path only
//! increments them.

pub mod access_log;
pub mod istio;
pub mod outcome;
pub mod record;
pub mod trace;

use std::sync::OnceLock;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::snapshot::Snapshot;

pub struct Metrics {
    registry: Registry,
    pub config_generation: IntGauge,
    pub reloads: IntCounterVec,
    reload_success: IntCounter,
    reload_failure: IntCounter,
    requests: IntCounterVec,
    pub access_log_dropped: IntCounter,
    pub spans_dropped: IntCounter,
    pub istio: istio::IstioMetrics,
    pub upstream_overflow: IntCounterVec,
    /// Requests the HTTP/1.1 fast path served, and connections it handed to pingora.
    pub fast_path_requests: IntCounter,
    pub fast_path_handoffs: IntCounterVec,
    /// Forward-proxy decisions: `decision` allowed/denied, `kind` http/connect, `host` the
    /// registered host pattern or `unregistered` (never a name a client made up).
    pub egress_decisions: IntCounterVec,
    /// Connections each listener holds, and those it closed at its `maxConnections`.
    pub listener_connections: IntGaugeVec,
    pub listener_refused: IntCounterVec,
    /// ACME orders by result (`success`, `failure`).
    acme_orders: IntCounterVec,
    /// Connections closed on arrival because their client address held
    /// `maxConnectionsPerClient` on the listener already.
    pub listener_client_refused: IntCounterVec,
    /// Connections closed on arrival by the PROXY protocol check, by `reason` (untrusted,
    /// missing, invalid, disallowed_version, timeout, closed).
    pub proxy_protocol_refused: IntCounterVec,
    /// Connections the process-wide cap (`globalMaxConnections`) acted on, by `action`:
    /// `idle_closed` (an idle keep-alive connection closed to make room for a new one) or
    /// `refused` (a new one closed on arrival: nothing idle to close).
    pub overload_connections: IntCounterVec,
    /// Requests in flight on each listener (kept while a request cap is set), and those
    /// answered 503 `OM` at a cap, by `scope`: `listener` (`maxRequests`) or `client`
    /// (`maxRequestsPerClient`).
    pub listener_requests_active: IntGaugeVec,
    pub listener_requests_refused: IntCounterVec,
    /// Rate-limit decisions by rule (`rule`) and `decision`: allowed, limited,
    /// failed_open, failed_closed.
    pub ratelimit_decisions: IntCounterVec,
    /// Redis calls of global rate limits that failed, by `reason`: timeout, connect,
    /// command.
    pub ratelimit_redis_errors: IntCounterVec,
    /// Access-list decisions by `list` and `decision` (allowed, denied); refreshes of
    /// their sources by `source` (file, url) and `result`; entries in force.
    pub access_list_decisions: IntCounterVec,
    pub access_list_refreshes: IntCounterVec,
    pub access_list_entries: IntGaugeVec,
    /// JWKS fetches of a `jwksUri`, by `result` (a failure keeps the last good set).
    pub jwks_fetches: IntCounterVec,
    /// Requests a RequestAuthentication applied to, by `result`: `verified`, `denied`
    /// (a bad token: 401/403) or `no_token`.
    pub jwt_requests: IntCounterVec,
    pub authz_decisions: IntCounterVec,
    certificate_expiry: IntGaugeVec,
    endpoint_healthy: IntGaugeVec,
    upstream_active: IntGaugeVec,
    /// One counter per status code, filled on first use, so counting a request is an
    /// index and an atomic add rather than a labelled lookup.
    by_status: Vec<OnceLock<IntCounter>>,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let config_generation = IntGauge::new(
            "portico_config_generation",
            "Generation of the configuration being served (1 = the one loaded at start).",
        )
        .expect("static metric definition");
        let reloads = IntCounterVec::new(
            Opts::new(
                "portico_config_reloads_total",
                "Configuration reloads by result.",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let requests = IntCounterVec::new(
            Opts::new(
                "portico_requests_total",
                "HTTP requests served, by response code.",
            ),
            &["response_code"],
        )
        .expect("static metric definition");
        let access_log_dropped = IntCounter::new(
            "portico_access_log_dropped_total",
            "Access log lines dropped because the writer could not keep up.",
        )
        .expect("static metric definition");
        let spans_dropped = IntCounter::new(
            "portico_trace_spans_dropped_total",
            "Trace spans dropped: the export queue was full or the collector failed.",
        )
        .expect("static metric definition");
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
        };
        let certificate_expiry = gauge(
            "portico_certificate_expiry_seconds",
            "When each served certificate expires, in seconds since the Unix epoch.",
            &["listener", "host"],
        );
        let endpoint_healthy = gauge(
            "portico_upstream_endpoint_healthy",
            "1 when the endpoint takes traffic, 0 while outlier detection has ejected it.",
            &["cluster", "endpoint"],
        );
        let upstream_active = gauge(
            "portico_upstream_requests_active",
            "Requests in flight to the cluster's endpoints.",
            &["cluster"],
        );
        let upstream_overflow = IntCounterVec::new(
            Opts::new(
                "portico_upstream_overflow_total",
                "Requests refused with 503 UO because the cluster's connection pool was full.",
            ),
            &["cluster"],
        )
        .expect("static metric definition");
        let egress_decisions = IntCounterVec::new(
            Opts::new(
                "portico_egress_decisions_total",
                "Egress (forward proxy) requests and CONNECT tunnels, allowed or denied by the ServiceEntry registry and outboundTrafficPolicy.",
            ),
            &["decision", "kind", "host"],
        )
        .expect("static metric definition");
        let fast_path_requests = IntCounter::new(
            "portico_fast_path_requests_total",
            "Requests (HTTP/1.1, and h2 streams) served by the fast path rather than pingora's request cycle.",
        )
        .expect("static metric definition");
        let fast_path_handoffs = IntCounterVec::new(
            Opts::new(
                "portico_fast_path_handoffs_total",
                "Connections (h2: streams) the fast path handed to pingora, by what made it: request (a body, an upgrade, HTTP/1.0, ...), route (no route, a local reply, a policy the fast path leaves to pingora), tracing, admission (connection pool full), head (too long or not parsed).",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let listener_connections = gauge(
            "portico_listener_connections_active",
            "Client connections each listener holds.",
            &["listener"],
        );
        let listener_refused = IntCounterVec::new(
            Opts::new(
                "portico_listener_connections_refused_total",
                "Client connections closed on arrival because the listener held mesh.downstream.maxConnections already.",
            ),
            &["listener"],
        )
        .expect("static metric definition");
        let acme_orders = IntCounterVec::new(
            Opts::new(
                "portico_acme_orders_total",
                "ACME certificate orders by result: success (a certificate was issued and installed) or failure (see the log line for the CA's problem document).",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
        };
        let listener_client_refused = counter(
            "portico_listener_client_connections_refused_total",
            "Client connections closed on arrival because their address held mesh.downstream.maxConnectionsPerClient on the listener already.",
            &["listener"],
        );
        let proxy_protocol_refused = counter(
            "portico_proxy_protocol_refused_total",
            "Connections closed on arrival by the PROXY protocol check (gatewayTopology.proxyProtocol): untrusted (a header from a source not in trustedCidrs), missing, invalid, disallowed_version, timeout, closed.",
            &["listener", "reason"],
        );
        let overload_connections = counter(
            "portico_overload_connections_total",
            "Connections the process-wide cap (mesh.downstream.globalMaxConnections) acted on: idle_closed (an idle keep-alive connection closed to make room for a new one), refused (a new one closed on arrival, none being idle).",
            &["action"],
        );
        let listener_requests_active = gauge(
            "portico_listener_requests_active",
            "Requests in flight on each listener, counted while mesh.downstream.maxRequests or maxRequestsPerClient is set.",
            &["listener"],
        );
        let listener_requests_refused = counter(
            "portico_listener_requests_refused_total",
            "Requests answered 503 (flag OM) because the listener had mesh.downstream.maxRequests in flight already (scope=listener), or their client address had maxRequestsPerClient (scope=client).",
            &["listener", "scope"],
        );
        let ratelimit_decisions = counter(
            "portico_ratelimit_decisions_total",
            "Rate-limit decisions by rule: allowed, limited (429), failed_open (Redis did not answer; allowed), failed_closed (Redis did not answer; refused).",
            &["rule", "decision"],
        );
        let ratelimit_redis_errors = counter(
            "portico_ratelimit_redis_errors_total",
            "Redis calls of global rate limits that failed: timeout, connect, command.",
            &["reason"],
        );
        let access_list_decisions = counter(
            "portico_access_list_decisions_total",
            "Requests an access list let through (allowed) or refused (denied).",
            &["list", "decision"],
        );
        let access_list_refreshes = counter(
            "portico_access_list_refreshes_total",
            "Reads of an access list's file and fetches of its URL, by result (a failure keeps the last good entries).",
            &["list", "source", "result"],
        );
        let access_list_entries = gauge(
            "portico_access_list_entries",
            "Entries (addresses, ranges or values) an access list holds now.",
            &["list"],
        );
        let jwks_fetches = counter(
            "portico_jwks_fetches_total",
            "Fetches of a RequestAuthentication jwksUri, by result (a failure keeps the last good key set).",
            &["result"],
        );
        let jwt_requests = counter(
            "portico_jwt_requests_total",
            "Requests a RequestAuthentication applied to, by result: verified, denied (a bad token) or no_token.",
            &["result"],
        );
        let authz_decisions = counter(
            "portico_authz_decisions_total",
            "AuthorizationPolicy decisions: the policy that decided (none: no ALLOW policy matched), its action, the result (allowed, denied, audited; for CUSTOM also error and failed_open: the external authorizer could not be asked), and whether the policy is a dry run (evaluated, not enforced).",
            &["policy", "action", "result", "dry_run"],
        );
        let istio = istio::IstioMetrics::new(&registry);
        for c in [
            Box::new(config_generation.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reloads.clone()),
            Box::new(requests.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(spans_dropped.clone()),
            Box::new(certificate_expiry.clone()),
            Box::new(endpoint_healthy.clone()),
            Box::new(upstream_active.clone()),
            Box::new(upstream_overflow.clone()),
            Box::new(fast_path_requests.clone()),
            Box::new(fast_path_handoffs.clone()),
            Box::new(egress_decisions.clone()),
            Box::new(listener_connections.clone()),
            Box::new(listener_refused.clone()),
            Box::new(acme_orders.clone()),
            Box::new(listener_client_refused.clone()),
            Box::new(proxy_protocol_refused.clone()),
            Box::new(overload_connections.clone()),
            Box::new(listener_requests_active.clone()),
            Box::new(listener_requests_refused.clone()),
            Box::new(ratelimit_decisions.clone()),
            Box::new(ratelimit_redis_errors.clone()),
            Box::new(access_list_decisions.clone()),
            Box::new(access_list_refreshes.clone()),
            Box::new(access_list_entries.clone()),
            Box::new(jwks_fetches.clone()),
            Box::new(jwt_requests.clone()),
            Box::new(authz_decisions.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            reload_success: reloads.with_label_values(&["success"]),
            reload_failure: reloads.with_label_values(&["failure"]),
            registry,
            config_generation,
            reloads,
            requests,
            access_log_dropped,
            spans_dropped,
            istio,
            upstream_overflow,
            fast_path_requests,
            fast_path_handoffs,
            egress_decisions,
            listener_connections,
            listener_refused,
            acme_orders,
            listener_client_refused,
            proxy_protocol_refused,
            overload_connections,
            listener_requests_active,
            listener_requests_refused,
            ratelimit_decisions,
            ratelimit_redis_errors,
            access_list_decisions,
            access_list_refreshes,
            access_list_entries,
            jwks_fetches,
            jwt_requests,
            authz_decisions,
            certificate_expiry,
            endpoint_healthy,
            upstream_active,
            by_status: (0..600).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::new)
    }

    pub fn reload_succeeded(&self, generation: u64) {
        self.reload_success.inc();
        self.config_generation.set(generation as i64);
    }

    pub fn acme_order(&self, result: &str) {
        self.acme_orders.with_label_values(&[result]).inc();
    }

    pub fn reload_failed(&self) {
        self.reload_failure.inc();
    }

    pub fn reload_counts(&self) -> (u64, u64) {
        (self.reload_success.get(), self.reload_failure.get())
    }

    pub fn request(&self, status: u16) {
        let i = usize::from(status);
        match self.by_status.get(i) {
            Some(slot) => slot
                .get_or_init(|| self.requests.with_label_values(&[&status.to_string()]))
                .inc(),
            None => self
                .requests
                .with_label_values(&[&status.to_string()])
                .inc(),
        }
    }

    /// Requests answered so far by status class: index 1 = 1xx … 5 = 5xx, 0 = no response.
    pub fn status_classes(&self) -> [u64; 6] {
        let mut out = [0u64; 6];
        for (code, slot) in self.by_status.iter().enumerate() {
            if let Some(c) = slot.get() {
                out[(code / 100).min(5)] += c.get();
            }
        }
        out
    }

    /// Prometheus text format; gauges that describe the config in force are set from
    /// `snapshot` at scrape time.
    pub fn render(&self, snapshot: Option<&Snapshot>) -> Vec<u8> {
        if let Some(snapshot) = snapshot {
            self.certificate_expiry.reset();
            self.endpoint_healthy.reset();
            self.upstream_active.reset();
            for l in &snapshot.listeners {
                let listener = l.addr.to_string();
                for (host, cert) in l.certs.iter().flat_map(|c| c.hosts.entries()) {
                    if cert.stand_in {
                        // Not a certificate anyone should alert on: ACME is ordering one.
                        continue;
                    }
                    self.certificate_expiry
                        .with_label_values(&[listener.as_str(), host.as_str()])
                        .set(cert.not_after);
                }
            }
            if !snapshot.acme.is_empty() {
                for result in ["success", "failure"] {
                    self.acme_orders.with_label_values(&[result]);
                }
            }
            for c in &snapshot.clusters {
                let mut active = 0i64;
                for (i, e) in c.endpoints.iter().enumerate() {
                    active += i64::from(e.stats.active.load(std::sync::atomic::Ordering::Relaxed));
                    self.endpoint_healthy
                        .with_label_values(&[c.name.as_str(), &e.addr.to_string()])
                        .set(i64::from(!c.is_ejected(i)));
                }
                self.upstream_active
                    .with_label_values(&[c.name.as_str()])
                    .set(active);
                // Known clusters show 0 rather than no series until their first overflow.
                self.upstream_overflow.with_label_values(&[c.name.as_str()]);
            }
        }
        let mut out = Vec::with_capacity(4096);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
