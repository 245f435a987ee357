//! The pingora `ServerApp` of an L4 listener: one connection's life. Load the Snapshot,
//! route (by SNI peeked from the ClientHello, or the port's `tcp` route), pick a weighted
//! destination and an endpoint from the cluster's balancer, connect, then splice bytes both
//! ways until either side closes. Every connection ends with metrics and, when configured,
//! an access log line; a refused one also with a warning naming the reason.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::client_hello::{self, Parsed};
use super::{L4Route, L4Table, SniRoute};
use crate::protocol::fast::{tunnel, Side};
use crate::snapshot::Snapshot;
use crate::telemetry::outcome::{Details, Flag};
use crate::telemetry::{access_log, Metrics};
use crate::upstream::balancer::hash_ip;
use crate::upstream::proxy_protocol::{ConnAddrs, Header as ProxyHeader};
use crate::upstream::{Cluster, HashSource, InFlight};

/// At most this many endpoints are tried before a connection is given up (Envoy's TCP
/// proxy default `max_connect_attempts` is 1; a gateway that skips a dead endpoint serves
/// better, and the client is still waiting).
const CONNECT_ATTEMPTS: usize = 3;

pub struct L4Service {
    pub listener: usize,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    /// On a port shared with HTTPS servers: how names they claim are terminated.
    pub terminate: Option<Terminate>,
    /// The listener's connection cap.
    pub connections: Arc<crate::listener::ConnectionLimit>,
}

/// TLS termination for the HTTPS servers of a passthrough port: the same app as on any
/// HTTPS port (certificates from the Snapshot, the HTTP proxy it feeds).
pub type Terminate = crate::listener::https::Https;

/// Where a connection goes.
enum Decision {
    Forward(Arc<L4Route>),
    Terminate,
}

/// Why a connection was closed without being forwarded.
struct Refusal {
    flag: Flag,
    details: Details,
    reason: String,
}

impl Refusal {
    fn new(flag: Flag, details: Details, reason: impl Into<String>) -> Self {
        Refusal {
            flag,
            details,
            reason: reason.into(),
        }
    }
}

/// What the log line and metrics of one connection need.
struct Record {
    started: Instant,
    started_at: SystemTime,
    downstream_local: Option<SocketAddr>,
    downstream_remote: Option<SocketAddr>,
    sni: Option<String>,
    route: Option<Arc<L4Route>>,
    cluster: Option<Arc<Cluster>>,
    upstream: Option<SocketAddr>,
    received: u64,
    sent: u64,
}

#[async_trait]
impl ServerApp for L4Service {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // In a task of its own, not pingora's per-connection one (see `listener::own_task`):
        // a spliced connection can live for hours.
        let app = self.clone();
        let shutdown = shutdown.clone();
        crate::listener::own_task(async move { app.serve(io, &shutdown).await });
        None
    }

    /// Open keep-alive connections on the HTTPS side stop at shutdown, as on an HTTPS port.
    async fn cleanup(&self) {
        if let Some(t) = &self.terminate {
            t.cleanup().await;
        }
    }
}

impl L4Service {
    /// Serves a connection to its end.
    async fn serve(&self, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // Open connections are not cut on shutdown: pingora stops accepting, waits
        // `drainDuration`, then stops the runtime, which closes whatever is still open.
        let (_slot, mut io) =
            crate::listener::accept(&self.connections, &self.snapshots, self.listener, io).await?;
        let snapshot = self.snapshots.load_full();
        let (downstream_local, downstream_remote) =
            access_log::addresses(io.get_socket_digest().as_deref());
        let mut rec = Record {
            started: Instant::now(),
            started_at: SystemTime::now(),
            downstream_local,
            downstream_remote,
            sni: None,
            route: None,
            cluster: None,
            upstream: None,
            received: 0,
            sent: 0,
        };
        let decided = self.decide(&snapshot, &mut io, &mut rec).await;
        let result = match decided {
            // Boxed: an HTTPS connection's future is KiBs that every spliced connection's
            // task would carry for its whole life otherwise.
            Ok(Decision::Terminate) => {
                return Box::pin(self.terminate(&snapshot, io, shutdown)).await
            }
            Ok(Decision::Forward(route)) => forward(route, io, &mut rec).await,
            Err(r) => Err(r),
        };
        match result {
            Ok(()) => finish(&snapshot, &rec, Flag::None, Details::None),
            Err(r) => {
                tracing::warn!(
                    listener = self.listener_name(&snapshot),
                    client = ?rec.downstream_remote,
                    sni = rec.sni.as_deref().unwrap_or("-"),
                    route = rec.route.as_ref().map(|r| r.origin.as_str()).unwrap_or("-"),
                    cluster = rec.cluster.as_ref().map(|c| c.name.as_str()).unwrap_or("-"),
                    flag = %r.flag,
                    reason = %r.reason,
                    "connection closed"
                );
                finish(&snapshot, &rec, r.flag, r.details);
            }
        }
        None
    }

    /// Routes by the port's `tcp` route, or by the SNI peeked from the ClientHello.
    async fn decide(
        &self,
        snapshot: &Snapshot,
        io: &mut Stream,
        rec: &mut Record,
    ) -> Result<Decision, Refusal> {
        let table = snapshot
            .listeners
            .get(self.listener)
            .and_then(|l| l.l4.as_ref())
            .ok_or_else(|| {
                Refusal::new(
                    Flag::NoRoute,
                    Details::FilterChainNotFound,
                    "no L4 routes here",
                )
            })?;
        let routes = match table {
            L4Table::Tcp(route) => {
                return route.clone().map(Decision::Forward).ok_or_else(|| {
                    Refusal::new(Flag::NoRoute, Details::FilterChainNotFound, "no tcp route")
                })
            }
            L4Table::Passthrough(routes) => routes,
        };
        let sni = read_sni(io, snapshot.settings.tls_handshake_timeout).await?;
        rec.sni = sni;
        let found = rec.sni.as_deref().and_then(|n| routes.lookup(n));
        match (found, &self.terminate) {
            (Some(SniRoute::Pass(route)), _) => Ok(Decision::Forward(route.clone())),
            (Some(SniRoute::AutoUnknown), _) => Err(Refusal::new(
                Flag::NoClusterFound,
                Details::ClusterNotFound,
                "AUTO_PASSTHROUGH: the SNI names no known cluster (outbound_.<port>_.<subset>_.<host> of a registered service, one of its ports and a DestinationRule subset)",
            )),
            // A name no passthrough route claims, or no name, goes to the HTTPS servers
            // when the port has them: their certificate store decides, as on any HTTPS port.
            (Some(SniRoute::Terminate), Some(_)) | (None, Some(_)) => Ok(Decision::Terminate),
            (_, None) if rec.sni.is_none() => Err(Refusal::new(
                Flag::NoRoute,
                Details::FilterChainNotFound,
                "the ClientHello has no SNI",
            )),
            (_, None) => Err(Refusal::new(
                Flag::NoRoute,
                Details::FilterChainNotFound,
                "no tls route for this SNI",
            )),
        }
    }

    /// Terminates TLS and serves HTTP on this connection, as an HTTPS listener would.
    async fn terminate(
        &self,
        snapshot: &Snapshot,
        io: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let t = self.terminate.as_ref()?;
        t.serve_to_end(io, snapshot.settings.tls_handshake_timeout, shutdown)
            .await
    }

    fn listener_name(&self, snapshot: &Snapshot) -> String {
        snapshot
            .listeners
            .get(self.listener)
            .map(|l| l.shape().to_string())
            .unwrap_or_default()
    }
}

/// Connects to the route's destination and splices bytes until both sides are done.
async fn forward(route: Arc<L4Route>, io: Stream, rec: &mut Record) -> Result<(), Refusal> {
    let cluster = route.pick().cluster.clone();
    rec.route = Some(route);
    rec.cluster = Some(cluster.clone());
    // `tcp.maxConnections` (and the other pool limits) bound open connections; a full pool
    // refuses at once rather than holding the client.
    let _admission = cluster.admit(Duration::ZERO).await.ok_or_else(|| {
        Refusal::new(
            Flag::UpstreamOverflow,
            Details::UpstreamOverflow,
            "connection pool full",
        )
    })?;
    let proxy = cluster.proxy_header(|| match (rec.downstream_remote, rec.downstream_local) {
        (Some(source), Some(destination)) => Some(ConnAddrs::new(source, destination)),
        _ => None,
    });
    let (index, upstream) = connect(&cluster, rec.downstream_remote, proxy).await?;
    rec.upstream = Some(cluster.endpoints[index].addr);
    let _in_flight = InFlight::new(cluster.clone(), index);

    let series = Metrics::global()
        .istio
        .tcp(Some(&cluster.metrics_dest), Flag::None);
    series.opened.inc();
    let mut down = Counted {
        inner: io,
        read: 0,
        written: 0,
        received: &series.received,
        sent: &series.sent,
    };
    let mut up = upstream;
    // The fast path's tunnel relay: each direction holds a buffer only while bytes move
    // (copy_bidirectional kept 16 KiB each way for the connection's life), and a connection
    // quiet both ways for `tcp.idleTimeout` ends. The peeked ClientHello was rewound into
    // the stream, so the upstream sees it first.
    let idle = cluster.settings.tcp_idle_timeout;
    let mut wait = Box::pin(tokio::time::sleep(idle.unwrap_or_default()));
    let t = tunnel::run(&mut down, &mut up, Default::default(), &mut wait, idle).await;
    rec.received = down.read;
    rec.sent = down.written;
    series.closed.inc();
    match t.end {
        Err(Side::Downstream { idle: true }) => tracing::debug!(
            cluster = %cluster.name,
            "no bytes either way for {:?} (tcp.idleTimeout): connection closed",
            idle.unwrap_or_default()
        ),
        Err(side) => tracing::debug!(
            cluster = %cluster.name,
            flags = side.flag().as_str(),
            "connection ended with an error"
        ),
        Ok(()) => {}
    }
    Ok(())
}

/// Peeks (never consumes) the ClientHello and returns its SNI, if it has one; bounded in
/// size and time.
async fn read_sni(io: &mut Stream, timeout: Duration) -> Result<Option<String>, Refusal> {
    let peek = async {
        peek_hello(io.as_mut()).await.map_err(|e| match e {
            PeekError::Invalid(why) => Refusal::new(
                Flag::NoRoute,
                Details::InvalidClientHello,
                format!("not a usable ClientHello: {why}"),
            ),
            PeekError::CannotPeek => Refusal::new(
                Flag::NoRoute,
                Details::InvalidClientHello,
                "this stream cannot be peeked",
            ),
            PeekError::Closed(e) => Refusal::new(
                Flag::DownstreamConnectionTermination,
                Details::DownstreamRemoteDisconnect,
                format!("client closed before its ClientHello was complete: {e}"),
            ),
        })
    };
    tokio::time::timeout(timeout, peek)
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::new(
                Flag::DownstreamConnectionTermination,
                Details::ClientHelloTimeout,
                format!("no complete ClientHello within {timeout:?}"),
            ))
        })
}

/// Why a ClientHello could not be peeked.
pub(crate) enum PeekError {
    Invalid(&'static str),
    CannotPeek,
    Closed(std::io::Error),
}

/// Peeks (never consumes) the ClientHello and returns its SNI, if it has one; bounded in
/// size (not in time: the caller's timeout).
pub(crate) async fn peek_hello<S>(io: &mut S) -> Result<Option<String>, PeekError>
where
    S: pingora::protocols::Peek + Send + ?Sized,
{
    let mut buf = Vec::with_capacity(512);
    loop {
        match client_hello::parse(&buf) {
            Parsed::Hello { sni } => return Ok(sni),
            Parsed::Invalid(why) => return Err(PeekError::Invalid(why)),
            Parsed::NeedBytes(n) => {
                // `try_peek` reads exactly `buf.len()` bytes and rewinds them, so the
                // buffer is grown to what the parser asks for, never beyond MAX_PEEK.
                buf.resize(n, 0);
                match io.try_peek(&mut buf).await {
                    Ok(true) => {}
                    Ok(false) => return Err(PeekError::CannotPeek),
                    Err(e) => return Err(PeekError::Closed(e)),
                }
            }
        }
    }
}

/// [`peek_hello`] for the TLS accept path: the error as a message.
pub(crate) async fn peek_sni<S>(io: &mut S) -> Result<Option<String>, String>
where
    S: pingora::protocols::Peek + Send + ?Sized,
{
    peek_hello(io).await.map_err(|e| match e {
        PeekError::Invalid(why) => format!("not a usable ClientHello: {why}"),
        PeekError::CannotPeek => "this stream cannot be peeked".to_string(),
        PeekError::Closed(e) => format!("client closed before its ClientHello was complete: {e}"),
    })
}

/// Connects to an endpoint the cluster's balancer picks, trying others when one fails;
/// a new connection opens with the PROXY header `proxy`, within the connect timeout.
async fn connect(
    cluster: &Cluster,
    client: Option<SocketAddr>,
    proxy: Option<ProxyHeader>,
) -> Result<(usize, TcpStream), Refusal> {
    let hash = match cluster.policy.hash_source() {
        Some(HashSource::SourceIp) => client.map(|c| hash_ip(c.ip())),
        _ => None,
    };
    let attempts = cluster.endpoints.len().min(CONNECT_ATTEMPTS);
    let mut tried = Vec::with_capacity(attempts);
    let mut last_error = String::new();
    while tried.len() < attempts {
        let Some(i) = cluster.select(hash, &tried) else {
            break;
        };
        if tried.contains(&i) {
            break;
        }
        tried.push(i);
        let addr = cluster.endpoints[i].addr;
        let started = Instant::now();
        match crate::upstream::connect::connect(addr, &cluster.settings, proxy.as_ref()).await {
            Ok(stream) => {
                // A connection made counts as a success for outlier detection, and its
                // connect time feeds the latency-aware balancers.
                cluster.record(i, Some(200), Some(started.elapsed()));
                return Ok((i, stream));
            }
            Err(e) => last_error = format!("{addr}: {e}"),
        }
        cluster.record(i, None, None);
        tracing::debug!(cluster = %cluster.name, error = %last_error, "upstream connect failed");
    }
    if tried.is_empty() {
        return Err(Refusal::new(
            Flag::NoHealthyUpstream,
            Details::NoHealthyUpstream,
            "the destination has no healthy endpoints",
        ));
    }
    Err(Refusal::new(
        Flag::UpstreamConnectFailure,
        Details::UpstreamConnectFailure,
        format!("could not connect to the destination ({last_error})"),
    ))
}

/// Metrics for refused connections (forwarded ones counted as they went) and the access
/// log line for every connection.
fn finish(snapshot: &Snapshot, rec: &Record, flag: Flag, details: Details) {
    if !flag.is_none() {
        let series = Metrics::global()
            .istio
            .tcp(rec.cluster.as_ref().map(|c| &c.metrics_dest), flag);
        series.opened.inc();
        series.closed.inc();
    }
    let Some(al) = snapshot.settings.access_log.as_ref() else {
        return;
    };
    let Some(sink) = access_log::Sink::get() else {
        return;
    };
    let headers = http::HeaderMap::new();
    let entry = access_log::Entry {
        start: rec.started_at,
        method: "-",
        path: "-",
        query: None,
        protocol: "-",
        status: 0,
        flags: flag.as_str(),
        details: details.as_str(),
        bytes_received: rec.received as usize,
        bytes_sent: rec.sent as usize,
        duration: rec.started.elapsed(),
        upstream_time: None,
        request_headers: access_log::Headers::Map(&headers),
        response_headers: None,
        authority: "",
        upstream_host: rec.upstream,
        upstream_cluster: rec.cluster.as_ref().map(|c| c.name.as_str()),
        downstream_local: rec.downstream_local,
        downstream_remote: rec.downstream_remote,
        sni: rec.sni.as_deref(),
        peer: None,
        route_name: None,
        attempts: u32::from(rec.upstream.is_some()),
        request_principal: None,
        upstream_transport_failure: None,
    };
    sink.log(&al.format, &entry);
}

/// Counts the bytes read from and written to the client while passing them on, in the
/// connection's totals (for the log line) and in the metrics as they flow, so a long-lived
/// tunnel shows its traffic before it closes.
struct Counted<'a, S> {
    inner: S,
    read: u64,
    written: u64,
    received: &'a IntCounter,
    sent: &'a IntCounter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        self.read += n;
        self.received.inc_by(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.written += n as u64;
        self.sent.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
