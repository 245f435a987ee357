//! The one end of a request. Whichever codec carried it (the fast HTTP/1.1 or h2 codec, or
//! pingora's request cycle) describes what happened as an [`Outcome`]; [`Outcome::record`]
//! turns that into the [`Record`] every sink reads — the Istio observation (metrics), the
//! server span (traces) and the access-log entry — so a request counts, traces and logs the
//! same way on every codec. Before this, each codec built the three itself, and they had
//! drifted (the gRPC label, the egress cluster, the span's start).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use pingora::protocols::tls::SslDigest;
use pingora::protocols::SocketDigest;

use super::access_log::{self, Entry, Headers, Sink};
use super::istio::Observation;
use super::outcome::{Details, Flag};
use super::trace::{ServerSpan, SpanContext};
use super::Metrics;
use crate::routing::Route;
use crate::snapshot::{AccessLogSettings, Snapshot};
use crate::upstream::Cluster;

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Which codec carried a request (`portico_fast_path_requests_total` counts the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The fast HTTP/1.1 or h2 codec.
    Fast,
    /// Pingora's request cycle.
    Cycle,
}

/// What happened to one request, as the codec that carried it saw it.
pub struct Outcome<'a> {
    pub codec: Codec,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// The client spoke TLS to the gateway.
    pub tls: bool,
    pub method: &'a str,
    /// The path routed and forwarded (normalized); the query apart when the codec has it so.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub request_headers: Headers<'a>,
    /// The response head sent, when the codec has it parsed (the access-log format says
    /// whether it is needed: [`wants_response_headers`]).
    pub response_headers: Option<Headers<'a>>,
    /// The id the gateway made for a request that came without one (otherwise the
    /// request's own `x-request-id`).
    pub request_id: Option<&'a str>,
    pub started: Instant,
    pub status: u16,
    pub flag: Flag,
    /// The request's own details; without them, the flag's ([`Details::or_flag`]).
    pub details: Details,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub upstream_time: Option<Duration>,
    pub upstream_host: Option<SocketAddr>,
    pub attempts: u32,
    pub route: Option<&'a Route>,
    /// The cluster of the destination chosen.
    pub cluster: Option<&'a Cluster>,
    /// The cluster name logged when no route's cluster carried the request (the forward
    /// proxy's egress target).
    pub other_cluster: Option<&'a str>,
    pub socket: Option<&'a SocketDigest>,
    pub ssl: Option<&'a SslDigest>,
    pub client_ip: Option<IpAddr>,
    /// The verified JWT's principal (`iss/sub`).
    pub principal: Option<&'a str>,
    /// Why the last try's TLS handshake with the upstream failed.
    pub transport_failure: Option<&'a str>,
    /// The request's span when tracing is on; exported when sampled.
    pub span: Option<&'a SpanContext>,
}

/// What the sinks take from one request.
pub struct Record<'a> {
    pub observation: Observation<'a>,
    /// The server span, with the context it is exported under; only for a sampled request.
    pub span: Option<(ServerSpan<'a>, &'a SpanContext)>,
    pub entry: Entry<'a>,
    codec: Codec,
}

/// Whether the access-log format reads response headers (then a codec that holds the
/// response head as bytes parses it for [`Outcome::response_headers`]).
pub fn wants_response_headers(snapshot: &Snapshot) -> bool {
    log_settings(snapshot).is_some_and(|(al, _)| al.format.reads_response_headers())
}

fn log_settings(snapshot: &Snapshot) -> Option<(&AccessLogSettings, &'static Sink)> {
    Some((snapshot.settings.access_log.as_ref()?, Sink::get()?))
}

impl<'a> Outcome<'a> {
    /// The request's record: one value for the metrics, the span and the log line.
    pub fn record(&self) -> Record<'a> {
        let duration = self.started.elapsed();
        let start = SystemTime::now() - duration;
        let grpc = self
            .request_headers
            .get_known(&http::header::CONTENT_TYPE)
            .is_some_and(|v| v.starts_with("application/grpc"));
        let upstream_cluster = self.cluster.map(|c| c.name.as_str()).or(self.other_cluster);
        let request_id = self
            .request_id
            .or_else(|| self.request_headers.get_known(&X_REQUEST_ID));
        let span = self.span.filter(|s| s.sampled).map(|ctx| {
            let span = ServerSpan {
                scheme: if self.tls { "https" } else { "http" },
                authority: self.authority,
                path: self.path,
                query: self.query,
                method: self.method,
                protocol: self.protocol,
                user_agent: self.request_headers.get_known(&http::header::USER_AGENT),
                request_id,
                request_size: self.request_bytes,
                response_size: self.response_bytes,
                flag: self.flag,
                cluster: self.cluster.map(|c| (&*c.host, c.port, c.name.as_str())),
                upstream: self.upstream_host,
                client_ip: self.client_ip,
                start,
                status: self.status,
            };
            (span, ctx)
        });
        let (downstream_local, downstream_remote) = access_log::addresses(self.socket);
        let conn = crate::tls::client_auth::TlsConn::of(self.ssl);
        Record {
            observation: Observation {
                dest: self.cluster.map(|c| &c.metrics_dest),
                status: self.status,
                flags: self.flag,
                grpc,
                duration_ms: duration.as_secs_f64() * 1000.0,
                request_bytes: self.request_bytes,
                response_bytes: self.response_bytes,
            },
            span,
            entry: Entry {
                start,
                method: self.method,
                path: self.path,
                query: self.query,
                protocol: self.protocol,
                status: self.status,
                flags: self.flag.as_str(),
                details: self.details.or_flag(self.flag).as_str(),
                bytes_received: self.request_bytes,
                bytes_sent: self.response_bytes,
                duration,
                upstream_time: self.upstream_time,
                request_headers: self.request_headers,
                response_headers: self.response_headers,
                authority: self.authority,
                upstream_host: self.upstream_host,
                upstream_cluster,
                downstream_local,
                downstream_remote,
                sni: conn.and_then(|c| c.sni.as_deref()),
                peer: conn.and_then(|c| c.peer.as_deref()),
                route_name: self.route.and_then(|r| r.name.as_deref()),
                attempts: self.attempts,
                request_principal: self.principal,
                upstream_transport_failure: self.transport_failure,
            },
            codec: self.codec,
        }
    }

    /// Records the request in the metrics, the trace and the access log (none without a
    /// snapshot: a request that failed before one was taken).
    pub fn finish(&self, snapshot: Option<&Snapshot>) {
        self.record().emit(snapshot);
    }
}

impl Record<'_> {
    /// Hands the record to each sink: metrics always, the span when sampled, the access log
    /// when the snapshot has one.
    pub fn emit(self, snapshot: Option<&Snapshot>) {
        let metrics = Metrics::global();
        if self.codec == Codec::Fast {
            metrics.fast_path_requests.inc();
        }
        metrics.request(self.observation.status);
        metrics.istio.observe(&self.observation);
        if let Some((span, ctx)) = self.span {
            span.export(ctx);
        }
        if let Some((al, sink)) = snapshot.and_then(log_settings) {
            sink.log(&al.format, &self.entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome<'a>(headers: &'a http::HeaderMap, codec: Codec) -> Outcome<'a> {
        Outcome {
            codec,
            protocol: "HTTP/2",
            tls: true,
            method: "POST",
            path: "/pkg.Svc/Call",
            query: None,
            authority: "api.example.com",
            request_headers: Headers::Map(headers),
            response_headers: None,
            request_id: None,
            started: Instant::now(),
            status: 503,
            flag: Flag::UpstreamConnectFailure,
            details: Details::None,
            request_bytes: 12,
            response_bytes: 20,
            upstream_time: None,
            upstream_host: None,
            attempts: 0,
            route: None,
            cluster: None,
            other_cluster: Some("outbound|443||api.example.com"),
            socket: None,
            ssl: None,
            client_ip: None,
            principal: None,
            transport_failure: Some("invalid peer certificate: Revoked"),
            span: None,
        }
    }

    #[test]
    fn the_log_and_the_metrics_read_one_outcome() {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "application/grpc+proto".parse().unwrap());
        headers.insert("x-request-id", "r-1".parse().unwrap());
        let r = outcome(&headers, Codec::Cycle).record();
        assert_eq!((r.entry.status, r.observation.status), (503, 503));
        assert_eq!(r.entry.flags, "UF");
        assert_eq!(
            r.entry.details, "upstream_reset_before_response_started{connection_failure}",
            "a reply after failed tries takes its details from the flag"
        );
        assert_eq!(r.observation.flags, Flag::UpstreamConnectFailure);
        assert!(
            r.observation.grpc,
            "the gRPC label comes from the request's content type"
        );
        assert_eq!(
            (r.entry.bytes_received, r.entry.bytes_sent),
            (r.observation.request_bytes, r.observation.response_bytes)
        );
        // No route's cluster: the log names the other one (the forward proxy's target).
        assert_eq!(
            r.entry.upstream_cluster,
            Some("outbound|443||api.example.com")
        );
        assert!(r.observation.dest.is_none());
        assert_eq!(
            r.entry.upstream_transport_failure,
            Some("invalid peer certificate: Revoked")
        );
        assert!(r.span.is_none(), "no span without a sampled context");
    }

    #[test]
    fn a_sampled_span_carries_the_request_id_and_the_outcome() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-request-id", "from-client".parse().unwrap());
        let ctx = SpanContext {
            trace_id: 1,
            span_id: 2,
            parent_id: None,
            sampled: true,
            tracestate: None,
            b3: false,
        };
        let mut o = outcome(&headers, Codec::Fast);
        o.span = Some(&ctx);
        let (span, _) = o.record().span.expect("sampled");
        assert_eq!(span.request_id, Some("from-client"));
        assert_eq!(
            (span.status, span.flag),
            (503, Flag::UpstreamConnectFailure)
        );
        assert!(!o.record().observation.grpc);
        // A made id wins over the headers (the fast codecs keep it apart from them).
        o.request_id = Some("made");
        assert_eq!(o.record().span.unwrap().0.request_id, Some("made"));
        let unsampled = SpanContext {
            sampled: false,
            ..ctx.clone()
        };
        o.span = Some(&unsampled);
        assert!(o.record().span.is_none());
    }
}
