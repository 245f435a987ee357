//! The HTTP/1.1 fast path (h2 streams: [`http2`]). HTTP/1.1 requests without a body or
//! with a short `Content-Length` one, on plain-text listeners and HTTPS connections that
//! did not choose h2, are served by a per-connection loop of Portico's own instead of
//! pingora's request cycle, which costs ~5x the user-space CPU per request
//! (bench/RESULTS.md). The loop reads a request head (and body), asks the request core
//! (`request::plan`) what to do, and writes what it decided: an answer (direct response,
//! redirect, 404, fault abort, CORS preflight), or the upstream head with the core's
//! header edits, then the response after parsing its head, under the route's timeouts and
//! retry rules (`upstream::retry`), with the request's span when tracing is on.
//!
//! Anything else is lent to pingora's cycle for that one request, the bytes already read
//! replayed first, before anything went upstream, and the connection comes back after it:
//! a chunked or long body, an upgrade, `Expect`, HTTP/1.0, a head httparse rejects; a
//! destination with TLS or h2c ([`lent_for`]); a full connection pool. A destination that
//! hashes to an endpoint is carried: the plan holds the request's hash (and the cookie to
//! set), and the tries pick by it as pingora's do (`Cluster::select`).

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{Shutdown, SocketDigest, Stream};
use pingora::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::h1::{
    self, dropped_response_header, dropped_response_header_or_length, has_two_framings, head_end,
    raw, uri_char, write_headers, BodyWalk, ChunkScan, Framing, MAX_HEADERS, MAX_RESPONSE_HEAD,
};
use crate::protocol::lend::{Handover, Left, Lent};
use crate::proxy::check::{self, Refusal};
use crate::proxy::mirror::{self, MirrorClient};
use crate::proxy::request;
use crate::proxy::{request_id, RequestCycle};
use crate::routing::{normalize_host, Forward, HeaderOps, Headers, RequestView, Route};
use crate::snapshot::Snapshot;
use crate::telemetry::outcome::{Details, Flag};
use crate::telemetry::record::{self, Codec, Outcome};
use crate::telemetry::trace::{self, SpanContext};
use crate::telemetry::Metrics;
use crate::upstream::proxy_protocol::{ConnAddrs, Header as ProxyHeader};
use crate::upstream::retry::{self, Again, TryFailure};
use crate::upstream::{self, Cluster, InFlight, RetryPermit};

pub(crate) mod http2;
pub(crate) mod tunnel;

/// Request bodies up to this are read whole and forwarded with the head (and replayed on a
/// retry); longer ones, and chunked ones, go to pingora, which streams them.
const MAX_BODY: usize = 16 * 1024;
/// Free space for each read of an upstream response head.
const HEAD_READ: usize = 8192;

/// Portico's HTTP front (the fast HTTP/1.1 codec, and the fast h2 codec for HTTPS
/// connections that chose h2, see `http2`; an h2c connection is pingora's): reads and checks every request head of a listener's
/// HTTP/1.1 connections (plain, and HTTPS ones that did not choose h2), then forwards the
/// request itself (the fast path) or lends the connection to pingora's request cycle for
/// that one request.
pub struct HttpFront {
    pub listener: usize,
    /// Requests arrive over TLS (an HTTPS listener hands over each handshaken stream).
    pub tls: bool,
    /// An h2c listener: a connection that opens with the h2 preface is pingora's.
    pub h2c: bool,
    /// The fast path forwards what it can; when off (`--no-fast-path`), every request goes
    /// through pingora's cycle.
    pub forward: bool,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub http: Arc<HttpProxy<RequestCycle>>,
    /// The listener's connection cap (the outermost app admits: an HTTPS listener before
    /// its handshake).
    pub connections: Arc<crate::listener::ConnectionLimit>,
}

/// The upstream connection of a request.
struct Upstream {
    addr: SocketAddr,
    /// The PROXY header it opened with (it is pooled under it).
    proxy: Option<ProxyHeader>,
    io: TcpStream,
    /// Taken from the pool, rather than connected for this try.
    pooled: bool,
    /// The request sent on it is its last (`maxRequestsPerConnection`): it said
    /// `connection: close` and is not pooled after.
    last: bool,
}

impl Upstream {
    /// Sends request `out` (head, then body); counted against the cluster's
    /// `maxRequestsPerConnection` as pingora's path counts it, and the last request a
    /// connection may carry asks the upstream to close it, as pingora's path does.
    async fn send(&mut self, out: &[u8], cluster: &Cluster) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.last = cluster.last_on_connection(self.io.as_raw_fd(), self.pooled);
        // The head's end is looked for only on a last request: the others go out as they are.
        let head_end = self
            .last
            .then(|| out.windows(4).position(|w| w == b"\r\n\r\n"))
            .flatten();
        match head_end {
            Some(p) => {
                let mut head = Vec::with_capacity(out.len() + 19);
                head.extend_from_slice(&out[..p + 2]);
                head.extend_from_slice(b"connection: close\r\n");
                head.extend_from_slice(&out[p + 2..]);
                self.io.write_all(&head).await
            }
            None => self.io.write_all(out).await,
        }
    }

    /// Back to the thread's pool after a response that ended where its framing said,
    /// with nothing read past it (`extra` is false), unless either side said close.
    fn release(self, cluster: &Cluster, extra: bool, close: bool) {
        if !extra && !close && !self.last {
            let now = Instant::now();
            upstream::pool::put(self.addr, self.proxy, self.io, now, idle_limit(cluster));
        }
    }
}

/// How long an upstream connection may idle in the pool: the cluster's `idleTimeout`,
/// else pingora's pool default (60 s), as pingora's own path does.
fn idle_limit(cluster: &Cluster) -> Duration {
    cluster
        .settings
        .idle_timeout
        .unwrap_or(Duration::from_secs(60))
}

struct Conn {
    io: Stream,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    /// The request's state while one is served (`work`); none between requests.
    work: Option<Box<Work>>,
    client_ip: Option<IpAddr>,
    /// The verified client certificate (mutual TLS).
    peer: Option<Arc<crate::tls::client_auth::PeerCert>>,
    /// The wait for a request head: one timer for the connection, moved on at every read.
    /// Moving a registered timer later is an atomic store; a `timeout` around each read
    /// would add and remove a timer-wheel entry per request, a lock each way.
    wait: Pin<Box<tokio::time::Sleep>>,
}

/// What a request being served works with: its upstream connection and buffers. A
/// connection holds one only while it serves a request; between requests the box waits
/// among the thread's spares (`SPARE`) for whichever connection gets a request next, so
/// an idle keep-alive connection holds a pointer instead of ~230 bytes (#28), and a busy
/// thread allocates none of it per request.
#[derive(Default)]
struct Work {
    /// The upstream connection of the request being served (between requests, idle
    /// connections wait in the thread's pool, `upstream::pool`).
    up: Option<Upstream>,
    ubuf: BytesMut,
    /// The upstream request head being sent.
    out: Vec<u8>,
    /// The response head for the client (then the first body bytes).
    resp: Vec<u8>,
    /// Endpoints tried for the request being served (kept to reuse its allocation).
    tried: Vec<usize>,
}

/// The connection's `Work`, taken from the thread's spares (or made) if it has none.
fn work(slot: &mut Option<Box<Work>>) -> &mut Work {
    slot.get_or_insert_with(|| SPARE.with_borrow_mut(Vec::pop).unwrap_or_default())
}

/// Spare buffers at most kept per thread, and the largest buffer kept.
const MAX_SPARE: usize = 128;
const MAX_SPARE_BYTES: usize = 64 * 1024;

/// Upstream body reads: the large size when more than the small one is left of a
/// Content-Length body, or after a read that filled its buffer (other framings). On
/// loopback, where a segment can be 64 KiB, reading a 100 KiB response in 16 or 32 KiB
/// pieces cost `bench/run.sh`'s h1-100k a third of its throughput, and reads of 64 KiB, or
/// of exactly what was left, brought 40 ms delayed-ACK stalls into its p99. See
/// bench/RESULTS.md, "Large responses".
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 128 * 1024;

/// The sizes of one body's upstream reads (see `MIN_READ`).
struct BodyReads {
    size: usize,
    max: usize,
}

impl BodyReads {
    fn new() -> Self {
        BodyReads {
            size: MIN_READ,
            max: MAX_READ,
        }
    }

    /// Reads more of the body `walk` is at.
    async fn read(
        &mut self,
        io: &mut TcpStream,
        buf: &mut BytesMut,
        walk: &BodyWalk,
    ) -> io::Result<usize> {
        let want = match walk.framing() {
            Framing::Length(_) if walk.remaining() > MIN_READ as u64 => self.max,
            _ => self.size,
        };
        buf.reserve(want);
        let n = io.read_buf(buf).await?;
        if n >= self.size {
            // The read filled the buffer: more is queued, take it in larger reads.
            self.size = self.max;
        }
        Ok(n)
    }
}

thread_local! {
    // Per thread: each worker runs its own connections (no work stealing by default), so
    // no lock, and a connection that moved threads just uses the other thread's spares.
    // Boxes, not values: a connection holds its `Work` by the box it takes from here.
    #[allow(clippy::vec_box)]
    static SPARE: std::cell::RefCell<Vec<Box<Work>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The read buffer of a request head: what one read asks for.
const HEAD_BUF: usize = 4096;
/// Read buffers at most kept per thread for connections waiting for a request.
const MAX_HEAD_BUFS: usize = 256;

thread_local! {
    // Read buffers lent to the connection that has bytes to read at this moment.
    static HEAD_BUFS: std::cell::RefCell<Vec<BytesMut>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads more of a request head into `buf`. A connection waiting for its next request
/// holds no buffer: each poll takes one from the thread's pool and gives it back when
/// nothing was there (tokio, as epoll, only says when bytes may be read; the bytes then
/// land in whatever buffer that poll holds). So an idle keep-alive connection costs no
/// read buffer, as NGINX frees its `client_header_buffer` between requests, and a busy
/// thread reuses a few warm buffers instead of one per connection.
fn pooled_read<'a, S>(
    io: &'a mut S,
    buf: &'a mut BytesMut,
) -> impl std::future::Future<Output = io::Result<usize>> + 'a
where
    S: tokio::io::AsyncRead + Unpin + ?Sized,
{
    std::future::poll_fn(move |cx| {
        if buf.capacity() == 0 {
            if let Some(pooled) = HEAD_BUFS.with_borrow_mut(Vec::pop) {
                *buf = pooled;
            }
        }
        buf.reserve(HEAD_BUF);
        let polled = tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf);
        if polled.is_pending() && buf.is_empty() {
            park_head_buf(std::mem::take(buf));
        }
        polled
    })
}

/// Gives an empty read buffer back to the thread's pool (or frees it).
fn park_head_buf(buf: BytesMut) {
    park_buf(buf, MAX_SPARE_BYTES);
}

/// Gives a drained buffer back to the thread's pool of read buffers when its allocation
/// is at most `largest` bytes, or frees it.
fn park_buf(mut buf: BytesMut, largest: usize) {
    if buf.capacity() == 0 || buf.capacity() > largest {
        return;
    }
    buf.clear();
    // A request head split off this buffer shared its memory; with the head gone, this
    // takes the whole allocation back rather than making a new one.
    buf.reserve(HEAD_BUF);
    if buf.capacity() > largest {
        return;
    }
    HEAD_BUFS.with_borrow_mut(|v| {
        if v.len() < MAX_HEAD_BUFS {
            v.push(buf);
        }
    });
}

impl Conn {
    /// Between requests a connection keeps only its read buffer, as pingora's do (an edge
    /// proxy holds many idle keep-alive connections); the others go to the thread's spares
    /// for whichever connection gets a request next, so a busy thread does not allocate
    /// them per request and an idle one holds at most `MAX_SPARE`.
    fn release(&mut self) {
        let Some(mut spare) = self.work.take() else {
            return;
        };
        if spare.up.is_some() {
            // (None is: an upstream connection is pooled or closed when its response
            // ends. Should one be held, it stays with its connection.)
            self.work = Some(spare);
            return;
        }
        if spare.out.capacity().max(spare.resp.capacity()) > MAX_SPARE_BYTES {
            return;
        }
        if spare.ubuf.capacity() > MAX_SPARE_BYTES {
            // Grown for a large body: not kept idle; the next request starts a new one.
            spare.ubuf = BytesMut::new();
        }
        spare.ubuf.clear();
        SPARE.with_borrow_mut(|v| {
            if v.len() < MAX_SPARE {
                v.push(spare);
            }
        });
    }
}

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// Not for the fast path: lend the connection to pingora's request cycle for this one
    /// request (its head first); why.
    Lend(Lending, &'static str),
    /// Upgraded: the connection is a tunnel from here on (`tunnel`).
    Tunnel(Box<Tunnel>),
}

/// A request lent to pingora: its head, and how far pingora may read after it.
struct Lending {
    head: BytesMut,
    rest: Rest,
    /// The plan, when this codec made one (pingora's cycle carries it out).
    handover: Option<Box<Handover>>,
}

impl Lending {
    /// A request lent before it was planned: pingora's cycle plans it.
    fn unplanned(head: BytesMut, rest: Rest) -> Lending {
        Lending {
            head,
            rest,
            handover: None,
        }
    }
}

/// What follows a lent request's head, which pingora may read.
#[derive(Debug)]
enum Rest {
    /// A body of this many bytes (0: none).
    Length(u64),
    /// A chunked body, found by scanning it as it is read.
    Chunked(ChunkScan),
    /// Everything: an upgrade or an h2c connection, which never comes back.
    All,
}

enum Head {
    Complete(usize),
    /// The client closed, went quiet between requests, or the server is shutting down.
    Closed,
    /// A head that gets a local reply and a close.
    Refused(Refusal),
    /// An h2c connection preface: the connection is pingora's.
    H2c,
}

/// The h2 connection preface, which an h2c client sends instead of a request.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Conn {
    fn new(io: Stream, wait_for: Duration) -> Conn {
        let client_ip = crate::listener::peer_ip(&io);
        let peer = crate::tls::client_auth::TlsConn::of(io.get_ssl_digest().as_deref())
            .and_then(|t| t.peer.clone());
        Conn {
            io,
            peer,
            buf: BytesMut::new(),
            work: None,
            client_ip,
            wait: Box::pin(tokio::time::sleep(wait_for)),
        }
    }
}

#[async_trait]
impl ServerApp for HttpFront {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let app = self.clone();
        let shutdown = shutdown.clone();
        crate::listener::own_task(async move {
            let (_slot, mut io) =
                crate::listener::accept(&app.connections, &app.snapshots, app.listener, io).await?;
            // A stream handed back (pingora's HTTP/1 cycle keeps a connection it was lent
            // to the end, so none is today) is this connection still: served again, not
            // admitted again (its place is held, its PROXY header was read).
            loop {
                io = app.serve_connection(io, &shutdown).await?;
            }
        });
        None
    }

    async fn cleanup(&self) {
        self.http.cleanup().await;
    }
}

impl HttpFront {
    /// Serves an HTTP/1.1 connection (already admitted) until it closes.
    pub async fn serve_connection(
        self: &Arc<Self>,
        io: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let born = Instant::now();
        let idle_timeout = self.snapshots.load().settings.downstream.idle_timeout;
        let mut c = Conn::new(io, idle_timeout);
        loop {
            let limits = HeadLimits::of(&self.snapshots.load().settings.downstream);
            let outcome = match read_head(&mut c, &limits, self.h2c).await {
                Head::Closed => return None,
                Head::Refused(r) => {
                    // Boxed, as the rare paths below: a future awaited in place makes this
                    // one, which every idle connection holds, as large as itself.
                    let snapshot = self.snapshots.load_full();
                    Box::pin(refuse(&mut c, r, None, &snapshot)).await;
                    return None;
                }
                Head::H2c => {
                    let rest = Rest::All;
                    Next::Lend(Lending::unplanned(BytesMut::new(), rest), "h2c")
                }
                Head::Complete(n) => {
                    // Past its maximum age a connection closes after the request in
                    // progress (`connection: close` on the response).
                    let old = limits.max_age.is_some_and(|m| born.elapsed() >= m);
                    // Boxed: the request's state (its parsed head, the upstream exchange,
                    // the log record) is several KiB that only a request in progress
                    // needs; inline, every idle keep-alive connection would hold it too.
                    Box::pin(self.serve(&mut c, n, shutdown, old)).await
                }
            };
            let (lending, reason) = match outcome {
                Next::KeepAlive => continue,
                Next::Close => {
                    Shutdown::shutdown(&mut *c.io).await;
                    return None;
                }
                Next::Tunnel(t) => {
                    Box::pin(t.run(&mut c)).await;
                    return None;
                }
                Next::Lend(lending, reason) => (lending, reason),
            };
            if self.forward {
                Metrics::global()
                    .fast_path_handoffs
                    .with_label_values(&[reason])
                    .inc();
            }
            c.release();
            // Boxed: pingora's session and the lent stream are large, and only a handed-over
            // request needs them; inline, every idle keep-alive connection would hold their
            // place too (#28).
            match Box::pin(self.lend(c, lending, born, shutdown)).await {
                Ok(back) => c = back,
                Err(end) => return end,
            }
        }
    }

    /// Serves one request with pingora's request cycle (`lending`: its head, and what may
    /// follow it). `Ok`: the connection is back for its next request; `Err`: it is done
    /// here (pingora may hand back a stream it served, as `process_new` may).
    async fn lend(
        self: &Arc<Self>,
        c: Conn,
        lending: Lending,
        born: Instant,
        shutdown: &ShutdownWatch,
    ) -> Result<Conn, Option<Stream>> {
        let limits = self.snapshots.load().settings.downstream.clone();
        let Conn { io, buf, .. } = c;
        let Lending {
            mut head,
            rest,
            handover,
        } = lending;
        let head_len = head.len() as u64;
        head.unsplit(buf);
        let lent = Lent {
            inner: io,
            buf: head,
            left: match rest {
                Rest::Length(n) => Left::Bytes(head_len + n),
                Rest::Chunked(scan) => Left::Chunked {
                    head: head_len as usize,
                    scan,
                },
                Rest::All => Left::All,
            },
            spoiled: false,
            close_after: limits
                .max_connection_duration
                .is_some_and(|m| born.elapsed() >= m),
        };
        if matches!(lent.left, Left::All) {
            // An h2c connection or an upgrade: pingora keeps it to the end.
            let cycle = self.http.process_new(Box::new(lent), shutdown);
            return Err(crate::protocol::lend::with_handover(handover, cycle).await);
        }
        let old = lent.close_after;
        let mut session = ServerSession::new_http1(Box::new(lent));
        session.set_keepalive((!old).then(|| whole_seconds(limits.idle_timeout)));
        session.set_read_timeout(Some(limits.request_body_timeout));
        session.set_write_timeout(Some(limits.stream_idle_timeout));
        let cycle = self.http.process_new_http(session, shutdown);
        let reused = crate::protocol::lend::with_handover(handover, cycle)
            .await
            .ok_or(None)?;
        let (stream, _) = reused.consume();
        // Back from pingora: the front reads the next request, if pingora read exactly
        // this one.
        let lent = stream.into_any().downcast::<Lent>().map_err(|_| None)?;
        if lent.spoiled || !matches!(lent.left, Left::Bytes(0)) {
            return Err(None);
        }
        let mut c = Conn::new(lent.inner, limits.idle_timeout);
        c.buf = lent.buf;
        Ok(c)
    }
}

/// Seconds for pingora's keep-alive setting, at least 1.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// What the wait for a request head needs of the listener's limits. An idle connection's
/// task holds it while it waits: the whole `Downstream` is ~180 bytes, this 56.
#[derive(Clone, Copy)]
struct HeadLimits {
    idle_timeout: Duration,
    request_headers_timeout: Duration,
    max_request_headers: usize,
    /// `maxConnectionDuration`.
    max_age: Option<Duration>,
}

impl HeadLimits {
    fn of(d: &crate::snapshot::Downstream) -> HeadLimits {
        HeadLimits {
            idle_timeout: d.idle_timeout,
            request_headers_timeout: d.request_headers_timeout,
            max_request_headers: d.max_request_headers,
            max_age: d.max_connection_duration,
        }
    }
}

/// Reads a request head into `c.buf`: the connection may idle for `idleTimeout` before
/// its first byte, and then the whole head must come within `requestHeadersTimeout` and
/// `maxRequestHeadersKb` (with a request line within `maxUriLength`), whatever pace the
/// bytes come at.
async fn read_head(c: &mut Conn, limits: &HeadLimits, h2c: bool) -> Head {
    let mut searched: usize = 0;
    let mut started: Option<tokio::time::Instant> = None;
    loop {
        let preface = h2c
            && !c.buf.is_empty()
            && H2_PREFACE.starts_with(&c.buf[..c.buf.len().min(H2_PREFACE.len())]);
        match head_end(&c.buf, searched) {
            _ if preface && c.buf.len() >= H2_PREFACE.len() => return Head::H2c,
            _ if preface => {}
            Some(Ok(n)) if n > limits.max_request_headers => {
                return Head::Refused(too_large(&c.buf))
            }
            Some(Ok(n)) => return Head::Complete(n),
            Some(Err(())) => return Head::Refused(check::BAD_HEAD),
            None if c.buf.len() > limits.max_request_headers => {
                return Head::Refused(too_large(&c.buf))
            }
            None => {}
        }
        searched = c.buf.len();
        let idle = c.buf.is_empty();
        if idle {
            c.release();
            c.wait
                .as_mut()
                .reset(tokio::time::Instant::now() + limits.idle_timeout);
        } else if started.is_none() {
            let at = tokio::time::Instant::now();
            started = Some(at);
            c.wait.as_mut().reset(at + limits.request_headers_timeout);
        }
        let read = pooled_read(&mut c.io, &mut c.buf);
        let timer = c.wait.as_mut();
        // Waiting for a request, the connection is one the process-wide cap may close to
        // make room for a new one (`listener::Overload`), and one a shutting-down server
        // closes. (One signal for both: a shutdown watch's wait would add ~130 bytes to
        // every idle connection.) The wait is made before the shutdown flag is read, so a
        // shutdown that begins between the two still wakes it.
        let idle_here = crate::listener::IdleConnections::here();
        let closing = idle_here.closing();
        if idle && crate::listener::IdleConnections::shutting_down() {
            return Head::Closed;
        }
        let _idle = idle.then(|| idle_here.enter());
        // Bytes already sent win over shutdown, the timer and the cap (biased, as in
        // pingora): a request the client sent is answered rather than dropped.
        let result = tokio::select! {
            biased;
            r = read => Some(r),
            _ = timer => None,
            _ = closing, if idle => return Head::Closed,
        };
        match result {
            Some(Ok(0)) | Some(Err(_)) => return Head::Closed,
            None if c.buf.is_empty() => return Head::Closed,
            None => return Head::Refused(check::HEAD_TIMEOUT),
            Some(Ok(_)) => {}
        }
    }
}

/// 414 when the request line alone is over the limit (or not even it fit), else 431.
fn too_large(buf: &[u8]) -> Refusal {
    match memchr::memchr(b'\n', buf) {
        Some(_) => check::HEAD_TOO_LARGE,
        None => check::URI_TOO_LONG,
    }
}

/// What is known of a request refused before routing, for its log line.
struct RefusedRequest<'a> {
    method: &'a str,
    target: &'a str,
    started: Instant,
}

/// Writes refusal `r`'s local reply and closes; logs it (with what is known of the
/// request: `req` when the head parsed).
async fn refuse(c: &mut Conn, r: Refusal, req: Option<&RefusedRequest<'_>>, snapshot: &Snapshot) {
    let reply = request::LocalReply {
        status: r.status,
        what: r.what,
        close: true,
    };
    let head = req.is_some_and(|q| q.method == "HEAD");
    let body_len = if head { 0 } else { reply.body_len() };
    let resp = &mut work(&mut c.work).resp;
    resp.clear();
    reply.write_h1(resp, head);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = c.io.write_all(resp).await;
        let _ = c.io.flush().await;
    })
    .await;
    Shutdown::shutdown(&mut *c.io).await;
    tracing::debug!(
        status = r.status,
        details = r.details.as_str(),
        "request refused: {}",
        r.what
    );
    let (method, target, started) = match req {
        Some(q) => (q.method, q.target, q.started),
        None => ("-", "-", Instant::now()),
    };
    let req = Req {
        method,
        path: target,
        query: None,
        host: "",
        close: true,
        has_request_id: false,
        body: 0,
        upgrade: false,
    };
    let log = Log {
        snapshot,
        req: &req,
        headers: Headers::Raw(&[], &[]),
        route: None,
        cluster: None,
        started,
        span: None,
        request_id: None,
        tls: false,
        client_ip: c.client_ip,
        principal: None,
    };
    let mut done = Done::local(r.status, Flag::DownstreamProtocolError, None, 0);
    done.details = r.details;
    done.sent = body_len;
    log.finish(c, &done);
}

/// What the fast path takes from a request head.
struct Req<'h> {
    method: &'h str,
    /// The normalized path (without the query).
    path: &'h str,
    query: Option<&'h str>,
    host: &'h str,
    close: bool,
    has_request_id: bool,
    /// The length of the request body (`Content-Length`), at most `MAX_BODY`.
    body: usize,
    /// An upgrade (`Upgrade`, and `Connection: upgrade`): a `101` makes the connection a
    /// tunnel (`tunnel`).
    upgrade: bool,
}

/// The request, when the fast path can serve it: its head passed the checks (`checked`),
/// `path` is its normalized path.
fn eligible<'h>(
    req: &httparse::Request<'_, 'h>,
    checked: check::Checked<'h>,
    path: &'h str,
    query: Option<&'h str>,
) -> Option<Req<'h>> {
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    if !matches!(
        method,
        "GET" | "HEAD" | "DELETE" | "OPTIONS" | "POST" | "PUT" | "PATCH"
    ) {
        return None;
    }
    // Normalization leaves a path of these characters; with it off, and in the query,
    // anything else is pingora's to parse its way.
    if !path.bytes().all(uri_char) || !query.is_none_or(|q| q.bytes().all(uri_char)) {
        return None;
    }
    let body = match checked.body {
        check::BodyFraming::None => 0,
        // Bodies up to MAX_BODY are read whole; longer and chunked ones pingora streams.
        check::BodyFraming::Length(n) if n <= MAX_BODY as u64 => n as usize,
        _ => return None,
    };
    let mut r = Req {
        method,
        path,
        query,
        host: checked.host,
        close: false,
        has_request_id: false,
        body,
        upgrade: false,
    };
    let mut upgrade_field = false;
    for h in req.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("expect") {
            return None;
        } else if n.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    r.close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    r.upgrade = true;
                }
                // Other tokens name fields that stay behind (the request core drops them).
            }
        } else if n.eq_ignore_ascii_case("upgrade") {
            upgrade_field = true;
        } else if n.eq_ignore_ascii_case("x-request-id") {
            r.has_request_id = true;
        } else if n.eq_ignore_ascii_case("content-type") && h.value.starts_with(b"application/grpc")
        {
            return None;
        }
    }
    // An upgrade asked for in one field and not the other is none (the fields stay
    // behind); a GET without a body, whose 101 is a tunnel from the next byte on.
    r.upgrade &= upgrade_field;
    if r.upgrade && (method != "GET" || body != 0) {
        return None;
    }
    Some(r)
}

/// A forward the fast path can carry (the request core's plan decided faults, CORS, the
/// rewrite and a consistent-hash key already): a destination it speaks to (plain
/// HTTP/1.1).
fn plain(forward: &Forward) -> bool {
    lent_for(forward).is_none()
}

/// Whether the fast codecs (HTTP/1.1 and h2) carry a plan now: a forward's place under
/// its cluster's concurrency limit (an answer needs none), or why pingora's cycle carries
/// it instead, with the plan: a destination only pingora's connector speaks to (`route`),
/// or a full pool (`admission`: pingora's cycle waits for a place as long as the route
/// allows; the fast codecs never wait).
pub(crate) fn carried(
    plan: &request::Plan<'_>,
) -> Result<Option<upstream::Admission>, &'static str> {
    match plan {
        request::Plan::Answer(_) => Ok(None),
        request::Plan::Forward(f) if !plain(f.forward) => Err("route"),
        request::Plan::Forward(f) => f.forward.destinations[f.destination]
            .cluster
            .try_admit()
            .map(Some)
            .ok_or("admission"),
    }
}

/// Why the fast codecs leave a forward to pingora's request cycle: a destination needs
/// what only pingora's connector does. `None`: the fast codecs carry it (HTTP/1.1 and h2).
/// Also what `portico routes` reports for a route.
pub fn lent_for(forward: &Forward) -> Option<&'static str> {
    forward
        .destinations
        .iter()
        .find_map(|d| d.cluster.pingora_only())
}

/// An upstream response head, owned (the upstream buffer is reused for the body).
struct Resp {
    status: u16,
    framing: Framing,
    upstream_close: bool,
    /// The client's connection closes after this response.
    close: bool,
}

impl HttpFront {
    async fn serve(
        &self,
        c: &mut Conn,
        head_len: usize,
        shutdown: &ShutdownWatch,
        old: bool,
    ) -> Next {
        let started = Instant::now();
        let head = c.buf.split_to(head_len);
        // The fields' slots on the heap, uninitialized: as an array in this future they
        // were set, then copied into the box the front makes per request (3.2 KiB each).
        let mut slots = Box::new([const { MaybeUninit::uninit() }; MAX_HEADERS]);
        let mut parsed = httparse::Request::new(&mut []);
        match parsed.parse_with_uninit_headers(&head, &mut slots[..]) {
            Ok(httparse::Status::Complete(n)) if n == head_len => {}
            Err(httparse::Error::TooManyHeaders) => {
                refuse(c, check::HEAD_TOO_LARGE, None, &self.snapshots.load()).await;
                return Next::Close;
            }
            _ => {
                refuse(c, check::BAD_HEAD, None, &self.snapshots.load()).await;
                return Next::Close;
            }
        }
        let snapshot = self.snapshots.load_full();
        let (Some(method), Some(target), Some(minor)) =
            (parsed.method, parsed.path, parsed.version)
        else {
            refuse(c, check::BAD_HEAD, None, &snapshot).await;
            return Next::Close;
        };
        let settings = &snapshot.settings;
        let refused = RefusedRequest {
            method,
            target,
            started,
        };
        if target.len() > settings.downstream.max_uri_length {
            refuse(c, check::URI_TOO_LONG, Some(&refused), &snapshot).await;
            return Next::Close;
        }
        let absolute_form = !target.starts_with('/') && target != "*";
        let checked = match check::check_h1(minor, absolute_form, raw(parsed.headers)) {
            Ok(checked) => checked,
            Err(r) => {
                refuse(c, r, Some(&refused), &snapshot).await;
                return Next::Close;
            }
        };
        // A request with an upgrade lent to pingora is lent with the rest of the
        // connection: after a 101 it is pingora's tunnel.
        let upgrade = parsed
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
        let rest = match checked.body {
            _ if upgrade => Rest::All,
            check::BodyFraming::None => Rest::Length(0),
            check::BodyFraming::Length(n) => Rest::Length(n),
            check::BodyFraming::Chunked => Rest::Chunked(ChunkScan::default()),
        };
        if !target.starts_with('/') {
            // Absolute-form or `*`: pingora's cycle reads it (and normalizes its path).
            return Next::Lend(Lending::unplanned(head, rest), "request");
        }
        let (raw_path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let path = match settings.path_normalization.apply(raw_path) {
            Ok(p) => p,
            Err(e) => {
                let r = Refusal::new(400, Details::Path(e), "bad request path");
                refuse(c, r, Some(&refused), &snapshot).await;
                return Next::Close;
            }
        };
        let h2c = upgrade
            && parsed.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("upgrade")
                    && h.value
                        .split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
            });
        if h2c || method == "CONNECT" {
            // Pingora's (the connection never comes back).
            return Next::Lend(Lending::unplanned(head, Rest::All), "request");
        }
        let Some(req) = eligible(&parsed, checked, path.as_ref(), query).filter(|_| self.forward)
        else {
            return Next::Lend(Lending::unplanned(head, rest), "request");
        };
        let Some(listener) = snapshot.listeners.get(self.listener) else {
            return Next::Lend(Lending::unplanned(head, rest), "route");
        };
        // The request id before routing: a route may match on it, on every codec.
        let id = (!req.has_request_id).then(request_id);
        let span = settings.tracing.as_ref().map(|t| {
            let get = |name: &str| {
                raw(parsed.headers)
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
            };
            trace::start_with(get, t.sampling)
        });
        let added = [("x-request-id", id.as_ref().map_or(&b""[..], |id| &id[..]))];
        let added: &[(&str, &[u8])] = if id.is_some() { &added } else { &[] };
        let ssl = c.io.get_ssl_digest();
        let headers = Headers::Raw(parsed.headers, added);
        let view = RequestView {
            method: req.method,
            path: req.path,
            query,
            authority: req.host,
            scheme: if self.tls { "https" } else { "http" },
            headers,
            port: listener.addr.port(),
            client_ip: request::remote_address(settings.num_trusted_proxies, c.client_ip, headers),
            peer_ip: c.client_ip,
            sni: crate::tls::client_auth::TlsConn::of(ssl.as_deref())
                .and_then(|t| t.sni.as_deref()),
            peer_principal: c.peer.as_deref().and_then(|p| p.principal()),
            peer: c.peer.as_deref(),
        };
        // The body, whole, after the head; each read within `requestBodyTimeout`. (It
        // stays in `c.buf` until it is forwarded: a request lent to pingora below gets
        // it with the head.)
        let body_timeout = settings.downstream.request_body_timeout;
        let unrouted = || Log {
            snapshot: &snapshot,
            req: &req,
            headers: Headers::Raw(parsed.headers, added),
            route: None,
            cluster: None,
            started,
            span: span.as_ref(),
            request_id: id.as_ref().map(|id| &id[..]),
            tls: self.tls,
            client_ip: c.client_ip,
            principal: None,
        };
        while c.buf.len() < req.body {
            c.buf.reserve(req.body - c.buf.len());
            let n = timed(&mut c.wait, body_timeout, c.io.read_buf(&mut c.buf)).await;
            match n {
                Some(Ok(n)) if n > 0 => {}
                Some(_) => {
                    // The client went away mid-body: nothing was sent upstream.
                    unrouted().finish(
                        c,
                        &Done::local(0, Flag::DownstreamConnectionTermination, None, 0),
                    );
                    return Next::Close;
                }
                None => {
                    let done = Done::local(408, Flag::None, None, 0);
                    return local(c, &unrouted(), done, check::BODY_TIMEOUT.what).await;
                }
            }
        }

        let host = normalize_host(req.host);
        let client_close = req.close || old || *shutdown.borrow();
        let planned = request::plan(listener, &host, &view);
        // What this codec cannot carry is handed to pingora's cycle with its plan, once
        // the policies have counted it.
        let (lend, _admission) = match carried(planned.plan()) {
            Ok(admission) => (None, admission),
            Err(why) => (Some(why), None),
        };
        // Boxed only for a route with policies: their state is KiBs that every request's
        // future would carry otherwise.
        let policed = match planned.policies() {
            request::Policies::None(plan) => plan,
            request::Policies::Apply(planned) => Box::pin(planned.police(&view)).await,
        };
        let f = match policed {
            request::Plan::Answer(a) => {
                c.buf.advance(req.body);
                let log = Log {
                    route: a.route.as_deref(),
                    cluster: a.cluster(),
                    principal: a.principal.as_deref(),
                    ..unrouted()
                };
                return answer(c, &log, &a, client_close).await;
            }
            request::Plan::Forward(f) => match lend {
                Some(reason) => {
                    let handover = Handover {
                        snapshot: snapshot.clone(),
                        started,
                        request_id: id,
                        span,
                        plan: request::OwnedPlan::Forward(Box::new(f.into_owned())),
                    };
                    let lending = Lending {
                        head,
                        rest,
                        handover: Some(Box::new(handover)),
                    };
                    return Next::Lend(lending, reason);
                }
                None => f,
            },
        };
        let (route, forward) = (f.route, f.forward);
        let mut mirrors = f.mirrors().peekable();
        if mirrors.peek().is_some() {
            // The copies: the request as received with the id made for it (as pingora's
            // cycle copies it), its whole body (read above).
            let fields = raw(parsed.headers).chain(added.iter().copied());
            if let Some(head) = mirror::request_head(method, target, fields) {
                let body = (req.body > 0).then(|| Bytes::copy_from_slice(&c.buf[..req.body]));
                for cluster in mirrors {
                    let proxy =
                        cluster.proxy_header(|| ConnAddrs::of(c.io.get_socket_digest().as_deref()));
                    MirrorClient::global().send(cluster.clone(), head.clone(), body.clone(), proxy);
                }
            }
        }
        let destination = &forward.destinations[f.destination];
        let cluster = &destination.cluster;
        let added = f.response_additions();
        let log = Log {
            route: Some(route),
            cluster: Some(cluster),
            principal: f.principal.as_deref(),
            ..unrouted()
        };
        if let Some(d) = f.delay {
            tokio::time::sleep(d).await;
        }
        // A rewrite: the path (with the query) and the authority the upstream sees.
        let rewritten = f.rewritten_target(req.path, query);
        let authority = request::rewritten_authority(forward);

        // The upstream request head.
        let out = &mut work(&mut c.work).out;
        out.clear();
        out.reserve(head_len + 256 + req.body);
        out.extend_from_slice(req.method.as_bytes());
        out.push(b' ');
        match &rewritten {
            Some(target) => out.extend_from_slice(target.as_bytes()),
            None => {
                out.extend_from_slice(req.path.as_bytes());
                if let Some(q) = query {
                    out.push(b'?');
                    out.extend_from_slice(q.as_bytes());
                }
            }
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let forwarding = request::Forwarding {
            scheme: if self.tls {
                &b"https"[..]
            } else {
                &b"http"[..]
            },
            client_ip: c.client_ip,
            request_id: id.as_ref().map(|id| &id[..]),
            host: authority.map(|a| a.as_bytes()),
            ops: [&route.headers.request, &destination.headers.request],
            upgrade: req.upgrade,
            span: span.as_ref(),
            client_cert: request::ClientCert {
                mode: settings.forward_client_cert,
                peer: c.peer.as_deref(),
            },
            auth: f.auth.as_deref(),
        };
        request::upstream_request_headers(|| raw(parsed.headers), &forwarding, out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&c.buf[..req.body]);
        c.buf.advance(req.body);
        let head_only = req.method == "HEAD";

        let response_ops = [&route.headers.response, &destination.headers.response];

        // Tries: as the route's retries and the shared resend rule allow, within its
        // timeouts.
        work(&mut c.work).tried.clear();
        let mut tries = Tries::new(forward);
        let idempotent = retry::idempotent(req.method);
        let stream_idle = snapshot.settings.downstream.stream_idle_timeout;
        let mut wait;
        let (resp, i, inflight) = loop {
            let Some(w) = tries.wait(stream_idle) else {
                let done = Done::local(504, Flag::UpstreamRequestTimeout, None, tries.made);
                let what = Flag::UpstreamRequestTimeout.reply_text();
                return local(c, &log, done, what).await;
            };
            wait = w;
            let (i, pooled) = match tries.resend_to.take() {
                Some(i) => (i, false),
                None => match cluster.select(f.hash, &work(&mut c.work).tried) {
                    // An upgrade's connection becomes its tunnel: a new one.
                    Some(i) => (i, !req.upgrade),
                    None => {
                        let done = Done::local(503, Flag::NoHealthyUpstream, None, tries.made);
                        return local(c, &log, done, Flag::NoHealthyUpstream.reply_text()).await;
                    }
                },
            };
            work(&mut c.work).tried.push(i);
            tries.made += 1;
            let inflight = InFlight::new(cluster.clone(), i);
            let ex = Exchange {
                cluster,
                i,
                proxy: cluster.proxy_header(|| ConnAddrs::of(c.io.get_socket_digest().as_deref())),
                pooled,
                head_only,
                upgrade: req.upgrade,
                ops: response_ops,
                added: &added,
                client_close,
                wait,
            };
            match exchange(c, ex).await {
                Ok(resp) => {
                    if tries.again_on(resp.status, forward, cluster).await {
                        // Not a byte of this answer went to the client: its connection
                        // (with the body unread) is closed, and the next try begins.
                        work(&mut c.work).up = None;
                        cluster.record(i, Some(resp.status), Some(inflight.started.elapsed()));
                        continue;
                    }
                    break (resp, i, inflight);
                }
                Err(fail) => match tries.after(fail, forward, cluster, i, idempotent).await {
                    None => continue,
                    Some((done, what)) => return local(c, &log, done, what).await,
                },
            }
        };
        // The response head is in the work's `resp`; the body follows as it comes.
        let mut done = tries.answered(&f, cluster, i, resp.status, &inflight);
        if resp.status == 101 {
            let _held = (inflight, _admission);
            let w = work(&mut c.work);
            let Some(up) = w.up.take() else {
                return Next::Close;
            };
            let first = {
                let mut b = BytesMut::with_capacity(w.resp.len() + w.ubuf.len());
                b.extend_from_slice(&w.resp);
                b.extend_from_slice(&w.ubuf);
                (b, std::mem::take(&mut c.buf))
            };
            // The tunnel runs once this request's state is gone (the parse: its head's
            // read buffer and header slots; the request's other buffers; this future):
            // a tunnel mostly waits, and there may be many. What its log needs at the end
            // goes with it, owned and in exactly its size.
            let mut response_head = std::mem::take(&mut work(&mut c.work).resp);
            response_head.shrink_to_fit();
            c.release();
            return Next::Tunnel(Box::new(Tunnel {
                up,
                first,
                idle: stream_idle,
                done,
                _held,
                response_head,
                snapshot: snapshot.clone(),
                route: route.clone(),
                cluster: cluster.clone(),
                started,
                span,
                request_id: id,
                tls: self.tls,
                head: Bytes::copy_from_slice(&head),
                path: req.path.into(),
                query: query.map(Into::into),
                host: req.host.into(),
                has_request_id: req.has_request_id,
                principal: f.principal.clone(),
            }));
        }
        // An upgrade the upstream declined: its connection was asked to change, not kept.
        let upstream_close = resp.upstream_close || req.upgrade;
        let result = forward_body(c, resp.framing, wait, (cluster, upstream_close)).await;
        drop(inflight);
        match result {
            Ok(n) => done.sent = n,
            Err(Side::Unsent) => {
                work(&mut c.work).up = None;
                cluster.record(i, None, None);
                let done = Done::local(
                    502,
                    Flag::UpstreamProtocolError,
                    done.upstream_host,
                    tries.made,
                );
                return local(c, &log, done, "upstream sent an invalid response").await;
            }
            Err(side) => {
                // Part of a response went out: all that is left is to close both ends.
                work(&mut c.work).up = None;
                if let Side::Upstream { .. } = side {
                    // The endpoint failed mid-response: never tried again, but counted.
                    cluster.record(i, None, None);
                }
                done.flags = tries.flag(&side);
                log.finish(c, &done);
                return Next::Close;
            }
        }
        // A body framed by the close: the connection is done (released above otherwise).
        work(&mut c.work).up = None;
        log.finish(c, &done);
        if resp.close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }
}

/// The tries of one request: retries under the route's policy, and at most one resend of
/// a request that went out on a pooled connection the upstream had closed
/// (`upstream::retry`). Shared by the HTTP/1.1 and h2 fast paths.
#[derive(Default)]
struct Tries {
    /// Tries made so far (the log's attempt count).
    made: u32,
    retries: u32,
    resent: bool,
    /// The next try resends to this endpoint on a new connection.
    resend_to: Option<usize>,
    /// Holds the cluster's `maxRetries` budget while a retry is under way.
    permit: Option<RetryPermit>,
    /// The route's `timeout`, from the moment the request was read whole.
    deadline: Option<Instant>,
    per_try: Option<Duration>,
}

impl Tries {
    fn new(forward: &Forward) -> Tries {
        Tries {
            deadline: forward.timeout.map(|t| Instant::now() + t),
            per_try: forward.retries.per_try_timeout,
            ..Tries::default()
        }
    }

    /// Try `inflight` was answered with `status` and the answer goes to the client: the
    /// endpoint's record, and the request's record as passed on (`URX` when a retryable
    /// status ran out of retries, `DI` after a fault's delay).
    fn answered(
        &self,
        f: &request::Forwarded<'_>,
        cluster: &Cluster,
        i: usize,
        status: u16,
        inflight: &InFlight,
    ) -> Done {
        let upstream_time = inflight.started.elapsed();
        cluster.record(i, Some(status), Some(upstream_time));
        let mut done =
            Done::via_upstream(status, cluster.endpoints[i].addr, upstream_time, self.made);
        done.flags = f.upstream_flag(status, self.retries);
        done
    }

    /// The time the next try may take (`retry::try_wait`); `None` once the route's time
    /// is up.
    fn wait(&self, idle: Duration) -> Option<Duration> {
        retry::try_wait(self.per_try, self.deadline, idle)
    }

    /// The flag of a response cut short on `side`: an upstream that went quiet for the
    /// route's timeout is `UT`, as on pingora's path, not the stream idle timeout.
    fn flag(&self, side: &Side) -> Flag {
        let timed = self.deadline.is_some() || self.per_try.is_some();
        match side {
            Side::Upstream { idle: true } if timed => Flag::UpstreamRequestTimeout,
            _ => side.flag(),
        }
    }

    /// After a response with `status`, none of it sent yet: whether to try again, as the
    /// route's `retryOn` names the status (the rule pingora's path applies in
    /// `upstream_response_filter`), attempts and the cluster's retry budget allow, and
    /// the route's time is not up; the backoff is waited here.
    async fn again_on(&mut self, status: u16, forward: &Forward, cluster: &Arc<Cluster>) -> bool {
        if !forward.retries.on.status(status) || self.retries >= forward.retries.attempts {
            return false;
        }
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return false;
        }
        self.start_retry(forward, cluster).await
    }

    /// Takes a place in the cluster's retry budget (`maxRetries`) and waits the backoff
    /// (within the route's time); false when the budget is spent.
    async fn start_retry(&mut self, forward: &Forward, cluster: &Arc<Cluster>) -> bool {
        let Some(p) = cluster.start_retry() else {
            return false;
        };
        self.permit = Some(p);
        self.retries += 1;
        let pause = forward.retries.backoff_for(self.retries);
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        tokio::time::sleep(left.map_or(pause, |l| l.min(pause))).await;
        true
    }

    /// After try `fail` on endpoint `i`: `None` when another try follows (after the
    /// backoff, already waited), else the local reply to make and what it says.
    async fn after(
        &mut self,
        fail: TryFailure,
        forward: &Forward,
        cluster: &Arc<Cluster>,
        i: usize,
        idempotent: bool,
    ) -> Option<(Done, &'static str)> {
        if fail.counts_against_endpoint() {
            cluster.record(i, None, None);
        }
        let retry = match fail.again(&forward.retries.on, idempotent, self.resent) {
            Again::Resend => {
                self.resent = true;
                self.resend_to = Some(i);
                return None;
            }
            Again::Retry => self.retries < forward.retries.attempts,
            _ => false,
        };
        if retry && self.start_retry(forward, cluster).await {
            return None;
        }
        let (status, flag, what) = fail.answer(self.retries > 0);
        let addr = Some(cluster.endpoints[i].addr);
        Some((Done::local(status, flag, addr, self.made), what))
    }
}

/// How a request ended, for metrics and the access log.
struct Done {
    status: u16,
    flags: Flag,
    details: Details,
    sent: usize,
    /// Bytes from the client past the request's body: an upgraded connection's.
    tunneled: usize,
    upstream_time: Option<Duration>,
    upstream_host: Option<SocketAddr>,
    attempts: u32,
}

impl Done {
    /// A response from endpoint `addr` after `tries` tries, before its body is passed on.
    fn via_upstream(status: u16, addr: SocketAddr, upstream_time: Duration, tries: u32) -> Done {
        Done {
            status,
            flags: Flag::None,
            details: Details::ViaUpstream,
            sent: 0,
            tunneled: 0,
            upstream_time: Some(upstream_time),
            upstream_host: Some(addr),
            attempts: tries,
        }
    }

    /// A reply the gateway makes after failed tries; its details come from the flag when
    /// the request is recorded, as on every codec.
    fn local(status: u16, flags: Flag, upstream_host: Option<SocketAddr>, tries: u32) -> Done {
        Done {
            status,
            flags,
            details: Details::None,
            sent: 0,
            tunneled: 0,
            upstream_time: None,
            upstream_host,
            attempts: if upstream_host.is_some() { tries } else { 0 },
        }
    }
}

/// A request id as `request_id` makes it.
type RequestId = [u8; 36];

/// An upgraded request once its `101` is read: the upstream connection, the bytes each
/// way that go first (the client's `101` head and what the upstream sent after it; what
/// the client sent after its request), and what the request's log needs at the tunnel's
/// end, owned.
struct Tunnel {
    up: Upstream,
    first: (BytesMut, BytesMut),
    idle: Duration,
    done: Done,
    /// The endpoint's request in flight and the cluster's admission, held to the end, as
    /// Envoy counts an upgraded stream active.
    _held: (InFlight, Option<upstream::Admission>),
    response_head: Vec<u8>,
    snapshot: Arc<Snapshot>,
    route: Arc<Route>,
    cluster: Arc<Cluster>,
    started: Instant,
    span: Option<SpanContext>,
    request_id: Option<RequestId>,
    tls: bool,
    /// The request head as received (parsed again for the log), its normalized path and
    /// its authority.
    head: Bytes,
    path: Box<str>,
    query: Option<Box<str>>,
    host: Box<str>,
    has_request_id: bool,
    principal: Option<Box<str>>,
}

impl Tunnel {
    /// Carries the tunnel to its end, then records the request (as `Log::finish` does).
    async fn run(self: Box<Self>, c: &mut Conn) {
        let Tunnel {
            mut up,
            first,
            idle,
            mut done,
            ..
        } = *self;
        let t = tunnel::run(&mut c.io, &mut up.io, first, &mut c.wait, Some(idle)).await;
        let response_head = &mut work(&mut c.work).resp;
        *response_head = self.response_head;
        done.sent = t.to_client.saturating_sub(response_head.len() as u64) as usize;
        done.tunneled = t.to_upstream as usize;
        if let Err(side) = t.end {
            done.flags = side.flag();
        }
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut hs);
        // It parsed before; a failure here could only leave fields out of the line.
        let _ = parsed.parse(&self.head);
        let req = Req {
            method: "GET",
            path: &self.path,
            query: self.query.as_deref(),
            host: &self.host,
            close: false,
            has_request_id: self.has_request_id,
            body: 0,
            upgrade: true,
        };
        let request_id = self.request_id.as_ref().map(|id| &id[..]);
        let added = [("x-request-id", request_id.unwrap_or_default())];
        let added: &[(&str, &[u8])] = if request_id.is_some() { &added } else { &[] };
        Log {
            snapshot: &self.snapshot,
            req: &req,
            headers: Headers::Raw(parsed.headers, added),
            route: Some(&self.route),
            cluster: Some(&self.cluster),
            started: self.started,
            span: self.span.as_ref(),
            request_id,
            tls: self.tls,
            client_ip: c.client_ip,
            principal: self.principal.as_deref(),
        }
        .finish(c, &done);
    }
}

/// What the metrics and the access log need of a request, gathered as it is served.
struct Log<'r> {
    snapshot: &'r Snapshot,
    req: &'r Req<'r>,
    headers: Headers<'r>,
    /// None for a request refused before routing.
    route: Option<&'r Route>,
    cluster: Option<&'r Cluster>,
    started: Instant,
    /// The request's span when tracing is on; exported when sampled.
    span: Option<&'r SpanContext>,
    /// The id made for the request, when it came without one.
    request_id: Option<&'r [u8]>,
    tls: bool,
    client_ip: Option<IpAddr>,
    /// The verified JWT's principal.
    principal: Option<&'r str>,
}

impl Log<'_> {
    fn finish(&self, c: &Conn, done: &Done) {
        // The JSON format (the default) names no response header: no need to parse it.
        let mut rh = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut rh);
        let response_headers = (record::wants_response_headers(self.snapshot)
            && c.work.as_ref().is_some_and(|w| r.parse(&w.resp).is_ok()))
        .then_some(Headers::Raw(r.headers, &[]));
        let socket = c.io.get_socket_digest();
        let ssl = c.io.get_ssl_digest();
        self.outcome(
            done,
            "HTTP/1.1",
            socket.as_deref(),
            ssl.as_deref(),
            response_headers,
        )
        .finish(Some(self.snapshot));
    }

    /// The request's outcome, for the one record both codecs (and pingora's cycle) make.
    fn outcome<'a>(
        &'a self,
        done: &'a Done,
        protocol: &'static str,
        socket: Option<&'a SocketDigest>,
        ssl: Option<&'a SslDigest>,
        response_headers: Option<Headers<'a>>,
    ) -> Outcome<'a> {
        Outcome {
            codec: Codec::Fast,
            protocol,
            tls: self.tls,
            method: self.req.method,
            path: self.req.path,
            query: self.req.query,
            authority: self.req.host,
            request_headers: self.headers,
            response_headers,
            request_id: self.request_id.and_then(|id| std::str::from_utf8(id).ok()),
            started: self.started,
            status: done.status,
            flag: done.flags,
            details: done.details,
            request_bytes: self.req.body + done.tunneled,
            response_bytes: done.sent,
            upstream_time: done.upstream_time,
            upstream_host: done.upstream_host,
            attempts: done.attempts,
            route: self.route,
            cluster: self.cluster,
            other_cluster: None,
            socket,
            ssl,
            client_ip: self.client_ip,
            principal: self.principal,
            // TLS upstreams are lent to pingora's cycle: no handshake with one here.
            transport_failure: None,
            span: self.span,
        }
    }
}

/// One try of a request: where it goes and what the response needs.
struct Exchange<'a> {
    cluster: &'a Cluster,
    i: usize,
    /// The PROXY header a new connection opens with (`Cluster::proxy_header`).
    proxy: Option<ProxyHeader>,
    /// A pooled connection may carry it (not when resending after a stale one).
    pooled: bool,
    head_only: bool,
    /// The request asked for an upgrade: a `101` answers it (and nothing else may).
    upgrade: bool,
    ops: [&'a HeaderOps; 2],
    /// CORS and policy fields for the response.
    added: &'a request::ResponseAdditions,
    client_close: bool,
    /// The response head must come within this (`retry::try_wait`).
    wait: Duration,
}

/// `f`, unless `wait`, moved to `idle` from now, fires first. One timer per connection,
/// moved on for each wait: moving a registered timer later is an atomic store, where a
/// `timeout` per wait would add and remove a timer-wheel entry, a lock each way.
async fn timed<F: std::future::Future>(
    wait: &mut Pin<Box<tokio::time::Sleep>>,
    idle: Duration,
    f: F,
) -> Option<F::Output> {
    wait.as_mut().reset(tokio::time::Instant::now() + idle);
    tokio::select! {
        biased;
        r = f => Some(r),
        _ = wait.as_mut() => None,
    }
}

/// Sends the request head in `Work::out` to endpoint `ex.i` (on a clean pooled connection when
/// there is one) and reads the response head into `Work::ubuf`, with the client's head for it
/// in `Work::resp`. On success the connection is in `Work::up`.
async fn exchange(c: &mut Conn, ex: Exchange<'_>) -> Result<Resp, TryFailure> {
    let addr = ex.cluster.endpoints[ex.i].addr;
    let w = work(&mut c.work);
    w.up = None;
    let up = w.up.insert('open: {
        if let Some(up) = ex.pooled_upstream(addr) {
            break 'open up;
        }
        Upstream::connect(addr, ex.cluster, ex.proxy)
            .await
            .map_err(|_| TryFailure::Connect)?
    });
    w.ubuf.clear();
    let (out, ubuf, resp) = (&w.out, &mut w.ubuf, &mut w.resp);
    let (head_only, client_close, ops, added) = (ex.head_only, ex.client_close, ex.ops, ex.added);
    let cluster = ex.cluster;
    let upgrade = ex.upgrade;
    let io = async {
        up.send(out, cluster).await?;
        read_response(
            &mut up.io,
            ubuf,
            (head_only, upgrade),
            client_close,
            |r, _, close| write_response_head(resp, r, close, ops, added),
        )
        .await
    };
    let result = timed(&mut c.wait, ex.wait, io).await;
    let stale = up.pooled && w.ubuf.is_empty();
    let result = exchanged(result, stale);
    if result.is_err() {
        w.up = None;
    }
    result
}

impl Exchange<'_> {
    /// A clean pooled connection to `addr` for this try, when it may take one. Callers
    /// hold it in no local across the await of `Upstream::connect` (the request's future
    /// would carry its place), and await that connect in place: a helper future around it
    /// cost ~190 instructions per request (`bench/run.sh instructions`).
    fn pooled_upstream(&self, addr: SocketAddr) -> Option<Upstream> {
        if self.pooled {
            Upstream::pooled(addr, self.proxy)
        } else {
            None
        }
    }
}

impl Upstream {
    /// A clean connection to `addr` that opened with PROXY header `proxy`, from the
    /// thread's pool. Not a future: a request on a kept-alive upstream connection (the
    /// common case) builds and moves no connect state.
    fn pooled(addr: SocketAddr, proxy: Option<ProxyHeader>) -> Option<Upstream> {
        let io = upstream::pool::take(addr, proxy.as_ref(), Instant::now())?;
        Some(Upstream {
            addr,
            proxy,
            io,
            pooled: true,
            last: false,
        })
    }

    /// A new connection to endpoint `addr` of `cluster` (`upstream::connect`: the
    /// cluster's connect timeout, PROXY header `proxy` first).
    async fn connect(
        addr: SocketAddr,
        cluster: &Cluster,
        proxy: Option<ProxyHeader>,
    ) -> io::Result<Upstream> {
        let io = upstream::connect::connect(addr, &cluster.settings, proxy.as_ref()).await?;
        Ok(Upstream {
            addr,
            proxy,
            io,
            pooled: false,
            last: false,
        })
    }
}

/// How a try's exchange ended, as the retry rules read it: `None` when its time ran out,
/// `Ok(None)` for a response head that does not parse; `stale` when the request went out
/// on a pooled connection and not a byte came back.
fn exchanged<T>(result: Option<io::Result<Option<T>>>, stale: bool) -> Result<T, TryFailure> {
    match result {
        Some(Ok(Some(resp))) => Ok(resp),
        None => Err(TryFailure::Timeout),
        Some(Ok(None)) => Err(TryFailure::BadResponse),
        Some(Err(_)) if stale => Err(TryFailure::StaleConnection),
        Some(Err(_)) => Err(TryFailure::Reset),
    }
}

/// A mirror's copy (`out`, the request's whole bytes) to endpoint `i` of `cluster`, its
/// answer read to its end and dropped: on the upstream connections of the fast codecs,
/// by their rules (a clean pooled connection or a new one, `maxRequestsPerConnection`,
/// back to the thread's pool only after a response that ended where its framing said).
/// The answer's status. The caller bounds its time (the mirror's timeout).
pub(crate) async fn exchange_unread(
    cluster: &Cluster,
    i: usize,
    proxy: Option<ProxyHeader>,
    out: &[u8],
) -> io::Result<u16> {
    let addr = cluster.endpoints[i].addr;
    let head_only = out.starts_with(b"HEAD ");
    let mut up = match Upstream::pooled(addr, proxy) {
        Some(up) => up,
        None => Upstream::connect(addr, cluster, proxy).await?,
    };
    up.send(out, cluster).await?;
    let mut ubuf = BytesMut::with_capacity(HEAD_READ);
    let resp = read_response(
        &mut up.io,
        &mut ubuf,
        (head_only, false),
        false,
        |_, _, _| {},
    )
    .await?
    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "invalid response head"))?;
    let extra = discard_body(&mut up.io, &mut ubuf, resp.framing).await?;
    up.release(cluster, extra, resp.upstream_close);
    Ok(resp.status)
}

/// Reads and drops a response body framed by `framing`, of which `ubuf` holds what came
/// with the head. `Ok(true)` when bytes came past its end (the connection is spoiled).
async fn discard_body(
    io: &mut TcpStream,
    ubuf: &mut BytesMut,
    framing: Framing,
) -> io::Result<bool> {
    let mut walk = BodyWalk::new(framing);
    loop {
        let (take, done) = walk.step(ubuf, |_| {});
        if walk.broken() {
            return Err(io::ErrorKind::InvalidData.into());
        }
        if done {
            return Ok(ubuf.len() > take);
        }
        ubuf.clear();
        ubuf.reserve(HEAD_READ);
        if io.read_buf(ubuf).await? == 0 {
            return match framing {
                Framing::Close => Ok(true),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
    }
}

/// Reads a response head from the upstream into `ubuf` and hands it to `emit` (with
/// whether the client's connection closes after it), leaving the body bytes read so far in
/// `ubuf`. `Ok(None)` when the head does not parse or frames its body ambiguously.
async fn read_response(
    io: &mut TcpStream,
    ubuf: &mut BytesMut,
    (head_only, upgrade): (bool, bool),
    client_close: bool,
    mut emit: impl FnMut(&httparse::Response<'_, '_>, &[u8], bool),
) -> io::Result<Option<Resp>> {
    loop {
        if let Some(end) = head_end(ubuf, 0) {
            let Ok(head_len) = end else {
                return Ok(None);
            };
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&ubuf[..head_len]) {
                Ok(httparse::Status::Complete(n)) if n == head_len => {}
                _ => return Ok(None),
            }
            let status = r.code.unwrap_or(0);
            if status == 101 {
                // The upgrade (a 101 nobody asked for is not a valid answer): what follows
                // the head is the tunnel's.
                if !upgrade {
                    return Ok(None);
                }
                emit(&r, &ubuf[..head_len], false);
                ubuf.advance(head_len);
                return Ok(Some(Resp {
                    status,
                    framing: Framing::Close,
                    upstream_close: true,
                    close: true,
                }));
            }
            if (100..200).contains(&status) {
                // Informational: dropped; the final response follows (pingora passes them on).
                ubuf.advance(head_len);
                continue;
            }
            let Some((framing, upstream_close)) = h1::response_framing(&r, head_only) else {
                return Ok(None);
            };
            let close = client_close || framing == Framing::Close;
            emit(&r, &ubuf[..head_len], close);
            ubuf.advance(head_len);
            return Ok(Some(Resp {
                status,
                framing,
                upstream_close,
                close,
            }));
        }
        if ubuf.len() > MAX_RESPONSE_HEAD {
            return Ok(None);
        }
        ubuf.reserve(HEAD_READ);
        if io.read_buf(ubuf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The client's HTTP/1.1 response head for upstream head `r`, with `ops` applied.
fn write_response_head(
    out: &mut Vec<u8>,
    r: &httparse::Response<'_, '_>,
    close: bool,
    ops: [&HeaderOps; 2],
    added: &request::ResponseAdditions,
) {
    out.clear();
    out.reserve(1024 + 4096);
    status_line(out, r.code.unwrap_or(0), Some(r.reason.unwrap_or("")));
    let drop = if has_two_framings(r.headers) {
        dropped_response_header_or_length
    } else {
        dropped_response_header
    };
    // The core's CORS and policy fields replace the upstream's (as pingora's path
    // inserts them). Most requests add none: then no field is compared against them.
    let replacing = !added.is_empty();
    let upstream = raw(r.headers).filter(|(n, _)| !(replacing && added.replaces(n.as_bytes())));
    write_headers(out, upstream, ops, drop);
    added.write(out);
    if r.code == Some(101) {
        // The upgrade goes on to the client: `Upgrade` as the upstream chose it, and a
        // `Connection` that says only that.
        for (name, value) in raw(r.headers).filter(|(n, _)| n.eq_ignore_ascii_case("upgrade")) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Which end failed while a body was passed on; `idle` when it went quiet for the
/// stream idle timeout rather than closing.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Upstream {
        idle: bool,
    },
    Downstream {
        idle: bool,
    },
    /// The upstream's body was broken before anything went to the client.
    Unsent,
}

impl Side {
    /// Envoy's response flag: `SI` for a stream idle timeout, else who closed.
    pub(crate) fn flag(&self) -> Flag {
        match self {
            Side::Upstream { idle: true } | Side::Downstream { idle: true } => {
                Flag::StreamIdleTimeout
            }
            Side::Upstream { idle: false } => Flag::UpstreamConnectionTermination,
            Side::Downstream { idle: false } => Flag::DownstreamConnectionTermination,
            Side::Unsent => Flag::UpstreamProtocolError,
        }
    }
}

/// Writes the response head in `Work::resp` and the body from `Work::ubuf` and the upstream to the
/// client, each read and write within `idle`. Returns the body bytes sent.
/// The upstream connection goes back to `cluster`'s pool as soon as its body has been
/// read whole (before the last bytes go to the client, who may send its next request the
/// moment they arrive), unless `upstream_close`.
async fn forward_body(
    c: &mut Conn,
    framing: Framing,
    idle: Duration,
    (cluster, upstream_close): (&Cluster, bool),
) -> Result<usize, Side> {
    const DOWN: Side = Side::Downstream { idle: false };
    const DOWN_IDLE: Side = Side::Downstream { idle: true };
    let mut walk = BodyWalk::new(framing);
    let mut sent = 0usize;
    let mut first = true;
    let mut reads = BodyReads::new();
    let w = work(&mut c.work);
    loop {
        // What of ubuf belongs to this body, and how much of it is body data (the log's
        // bytes_sent: a chunked body's data, without its framing).
        let mut data = 0usize;
        let (take, done) = walk.step(&w.ubuf, |r| data += r.len());
        if walk.broken() {
            // The upstream broke its chunked framing: the client must not take what it
            // got as a whole body, nor the connection as usable.
            if first {
                return Err(Side::Unsent);
            }
            c.io.write_all(&w.ubuf[..take]).await.map_err(|_| DOWN)?;
            return Err(Side::Upstream { idle: false });
        }
        if done {
            if let Some(up) = w.up.take() {
                let extra = w.ubuf.len() > take;
                up.release(cluster, extra, upstream_close || framing == Framing::Close);
            }
        }
        if first {
            w.resp.extend_from_slice(&w.ubuf[..take]);
            timed(&mut c.wait, idle, c.io.write_all(&w.resp))
                .await
                .ok_or(DOWN_IDLE)?
                .map_err(|_| DOWN)?;
            first = false;
        } else if take > 0 {
            timed(&mut c.wait, idle, c.io.write_all(&w.ubuf[..take]))
                .await
                .ok_or(DOWN_IDLE)?
                .map_err(|_| DOWN)?;
        }
        sent += data;
        w.ubuf.advance(take);
        if done {
            timed(&mut c.wait, idle, c.io.flush())
                .await
                .ok_or(DOWN_IDLE)?
                .map_err(|_| DOWN)?;
            return Ok(sent);
        }
        let Some(up) = w.up.as_mut() else {
            return Err(Side::Upstream { idle: false });
        };
        w.ubuf.clear();
        let n = timed(
            &mut c.wait,
            idle,
            reads.read(&mut up.io, &mut w.ubuf, &walk),
        )
        .await
        .ok_or(Side::Upstream { idle: true })?
        .map_err(|_| Side::Upstream { idle: false })?;
        if n == 0 {
            if framing == Framing::Close {
                timed(&mut c.wait, idle, c.io.flush())
                    .await
                    .ok_or(DOWN_IDLE)?
                    .map_err(|_| DOWN)?;
                return Ok(sent);
            }
            return Err(Side::Upstream { idle: false });
        }
    }
}

/// Writes the request core's answer `a` (a direct response, a redirect, no route, a CORS
/// preflight, a fault abort) and logs it; the connection goes on unless `close`.
async fn answer(c: &mut Conn, log: &Log<'_>, a: &request::Answer, close: bool) -> Next {
    if let Some(d) = a.delay {
        tokio::time::sleep(d).await;
    }
    let head = log.req.method == "HEAD";
    let resp = &mut work(&mut c.work).resp;
    resp.clear();
    status_line(resp, a.status, None);
    request::answer_fields(a, resp);
    if close {
        resp.extend_from_slice(b"connection: close\r\n");
    }
    resp.extend_from_slice(b"\r\n");
    if !head {
        resp.extend_from_slice(&a.body);
    }
    let idle = log.snapshot.settings.downstream.stream_idle_timeout;
    let written = timed(&mut c.wait, idle, async {
        c.io.write_all(resp).await?;
        c.io.flush().await
    })
    .await;
    let done = Done {
        status: a.status,
        flags: a.flag,
        details: a.details,
        sent: if head { 0 } else { a.body.len() },
        tunneled: 0,
        upstream_time: None,
        upstream_host: None,
        attempts: 0,
    };
    log.finish(c, &done);
    match written {
        Some(Ok(())) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// `HTTP/1.1 <status> <reason>` and its line end; the reason the upstream gave, else the
/// standard one.
fn status_line(out: &mut Vec<u8>, status: u16, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    let standard = || {
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
    };
    out.extend_from_slice(reason.unwrap_or_else(standard).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A local reply after failed tries: status, body, log line, metrics and access log as
/// pingora's path makes them; the connection is closed after it, as there.
async fn local(c: &mut Conn, log: &Log<'_>, mut done: Done, what: &str) -> Next {
    tracing::warn!(
        status = done.status,
        flag = %done.flags,
        method = log.req.method,
        path = log.req.path,
        route = log.route.map(|r| r.origin.to_string()).unwrap_or_default(),
        cluster = log.cluster.map(|c| c.name.as_str()).unwrap_or_default(),
        tries = done.attempts.max(1),
        "{what}"
    );
    let reply = request::LocalReply {
        status: done.status,
        what,
        close: true,
    };
    let head = log.req.method == "HEAD";
    let body_len = if head { 0 } else { reply.body_len() };
    let resp = &mut work(&mut c.work).resp;
    resp.clear();
    reply.write_h1(resp, head);
    let _ = c.io.write_all(resp).await;
    let _ = c.io.flush().await;
    done.sent = body_len;
    log.finish(c, &done);
    Next::Close
}
