//! Metrics and the access log. Counters are created once; the request path only
//! increments them.

pub mod access_log;

use std::sync::OnceLock;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub config_generation: IntGauge,
    pub reloads: IntCounterVec,
    reload_success: IntCounter,
    reload_failure: IntCounter,
    requests: IntCounterVec,
    pub access_log_dropped: IntCounter,
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
        for c in [
            Box::new(config_generation.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reloads.clone()),
            Box::new(requests.clone()),
            Box::new(access_log_dropped.clone()),
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

    /// Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
