//! Istio's standard metrics, with Istio's names, labels and Envoy's default buckets, so
//! existing dashboards and alerts work. Portico reports as a gateway (`reporter="source"`).
//! The label values a request can produce are bounded: the destination comes from the
//! cluster (never the Host header or the path), plus status code and response flags.
//! Series are cached by that key so a request does one map lookup under a read lock.

use std::sync::{Arc, RwLock};

use super::outcome::Flag;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// Envoy's default histogram buckets (ms for durations, bytes for sizes).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

pub const LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Where a request went, as far as the labels care.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The destination host (`api.internal`), or `unknown` for local replies.
    pub service: Arc<str>,
    /// The subset, reported as `destination_version`.
    pub version: Option<Arc<str>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    dest: Option<Destination>,
    status: u16,
    flags: Flag,
    grpc: bool,
}

struct Series {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// One finished request, as the metrics see it.
pub struct Observation<'a> {
    pub dest: Option<&'a Destination>,
    pub status: u16,
    pub flags: Flag,
    pub grpc: bool,
    pub duration_ms: f64,
    pub request_bytes: usize,
    pub response_bytes: usize,
}

/// The four TCP counters of one destination and response flag.
pub struct TcpSeries {
    pub opened: IntCounter,
    pub closed: IntCounter,
    /// Bytes sent to the client.
    pub sent: IntCounter,
    /// Bytes received from the client.
    pub received: IntCounter,
}

pub struct IstioMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_sent: IntCounterVec,
    pub tcp_received: IntCounterVec,
    // Looked up once per request; the keys come from the config and upstream status codes.
    series: RwLock<foldhash::HashMap<Key, Arc<Series>>>,
    tcp_series: RwLock<foldhash::HashMap<Key, Arc<TcpSeries>>>,
    version: String,
}

fn hist(name: &str, help: &str) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        &LABELS,
    )
    .expect("static metric definition")
}

fn counter(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &LABELS).expect("static metric definition")
}

impl IstioMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = IstioMetrics {
            requests: counter("istio_requests_total", "Requests handled by the gateway."),
            duration: hist(
                "istio_request_duration_milliseconds",
                "Duration of requests, in milliseconds.",
            ),
            request_bytes: hist(
                "istio_request_bytes",
                "Request body bytes received from clients.",
            ),
            response_bytes: hist(
                "istio_response_bytes",
                "Response body bytes sent to clients.",
            ),
            tcp_opened: counter(
                "istio_tcp_connections_opened_total",
                "TCP connections opened.",
            ),
            tcp_closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed.",
            ),
            tcp_sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent on TCP connections.",
            ),
            tcp_received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received on TCP connections.",
            ),
            series: RwLock::default(),
            tcp_series: RwLock::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.duration.clone()),
            Box::new(m.request_bytes.clone()),
            Box::new(m.response_bytes.clone()),
            Box::new(m.tcp_opened.clone()),
            Box::new(m.tcp_closed.clone()),
            Box::new(m.tcp_sent.clone()),
            Box::new(m.tcp_received.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        m
    }

    fn values<'a>(&'a self, key: &'a Key, code: &'a str, protocol: &'a str) -> [&'a str; 25] {
        let (service, name, version) = match &key.dest {
            Some(d) => (
                &*d.service,
                d.service.split('.').next().unwrap_or(&d.service),
                d.version.as_deref().unwrap_or("unknown"),
            ),
            None => ("unknown", "unknown", "unknown"),
        };
        [
            "source",
            "portico",
            "unknown",
            "unknown",
            "portico",
            &self.version,
            "portico",
            "latest",
            "unknown",
            "unknown",
            "unknown",
            "unknown",
            "unknown",
            version,
            service,
            name,
            "unknown",
            name,
            "latest",
            "unknown",
            protocol,
            code,
            "",
            if key.flags.is_none() {
                "-"
            } else {
                key.flags.as_str()
            },
            "unknown",
        ]
    }

    /// Counts one finished request.
    pub fn observe(&self, o: &Observation<'_>) {
        let key = Key {
            dest: o.dest.cloned(),
            status: o.status,
            flags: o.flags,
            grpc: o.grpc,
        };
        let found = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let series = match found {
            Some(s) => s,
            None => {
                let code = o.status.to_string();
                let v = self.values(&key, &code, if key.grpc { "grpc" } else { "http" });
                let s = Arc::new(Series {
                    requests: self.requests.with_label_values(&v),
                    duration: self.duration.with_label_values(&v),
                    request_bytes: self.request_bytes.with_label_values(&v),
                    response_bytes: self.response_bytes.with_label_values(&v),
                });
                self.series
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key)
                    .or_insert(s)
                    .clone()
            }
        };
        series.requests.inc();
        series.duration.observe(o.duration_ms);
        series.request_bytes.observe(o.request_bytes as f64);
        series.response_bytes.observe(o.response_bytes as f64);
    }

    /// The TCP counters for a connection to `dest` (`None`: refused before a destination
    /// was chosen) that ended with response flag `flags`. Labelled
    /// `request_protocol="tcp"` and `response_code="0"`, as Istio labels TCP.
    pub fn tcp(&self, dest: Option<&Destination>, flags: Flag) -> Arc<TcpSeries> {
        let key = Key {
            dest: dest.cloned(),
            status: 0,
            flags,
            grpc: false,
        };
        if let Some(s) = self
            .tcp_series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return s.clone();
        }
        let v = self.values(&key, "0", "tcp");
        let s = Arc::new(TcpSeries {
            opened: self.tcp_opened.with_label_values(&v),
            closed: self.tcp_closed.with_label_values(&v),
            sent: self.tcp_sent.with_label_values(&v),
            received: self.tcp_received.with_label_values(&v),
        });
        self.tcp_series
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(s)
            .clone()
    }
}
