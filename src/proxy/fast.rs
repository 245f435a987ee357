//! The HTTP/1.1 fast path (h2 streams: [`http2`]). HTTP/1.1 requests without a body or
//! with a short `Content-Length` one, on routes that only forward, on plain-text listeners
//! and HTTPS connections that did not choose h2, are served by a per-connection loop of
//! Portico's own instead of pingora's request cycle, which costs ~5x the user-space CPU per
//! request (bench/RESULTS.md). The loop reads a request head (and body), decides with the
//! same route table, writes the upstream head, and passes the response through after
//! parsing its head.
//!
//! Anything else is handed to pingora with the connection, the bytes already read
//! replayed first, before anything went upstream: a chunked or long body, an upgrade,
//! `Expect`, HTTP/1.0, a head httparse rejects; a route that redirects, responds itself or
//! has faults, mirrors, CORS, a rewrite, a timeout, consistent hashing, retries on status;
//! an upstream with TLS, h2c, TCP keepalive or `maxRequestsPerConnection`; tracing on; no
//! route (404). A connection stays with pingora once handed over.

use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use pingora::apps::ServerApp;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{request_id, write_forwarded_for, Gateway};
use crate::routing::{
    normalize_host, Action, Decision, Forward, HeaderOps, Headers, RequestView, Route,
};
use crate::snapshot::AccessLogSettings;
use crate::snapshot::Snapshot;
use crate::telemetry::access_log::Sink;
use crate::telemetry::istio::Observation;
use crate::telemetry::{access_log, Metrics};
use crate::upstream::{Cluster, InFlight, RetryPermit};

mod http2;

/// Longer heads go to pingora, which answers them as it does any other.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Request bodies up to this are read whole and forwarded with the head (and replayed on a
/// retry); longer ones, and chunked ones, go to pingora, which streams them.
const MAX_BODY: usize = 16 * 1024;
/// Free space for each read of an upstream response head.
const HEAD_READ: usize = 8192;
/// Idle upstream connections one client connection keeps (the least recently used goes).
const MAX_IDLE_UPSTREAMS: usize = 4;
/// Keep-alive idle time of a client connection, pingora's default.
const IDLE: Duration = Duration::from_secs(60);

/// The app of a plain-text HTTP/1.1 listener with the fast path on.
pub struct FastH1 {
    pub listener: usize,
    /// Requests arrive over TLS (an HTTPS listener hands over each handshaken stream).
    pub tls: bool,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub http: Arc<HttpProxy<Gateway>>,
}

/// An upstream connection a client connection keeps between its requests.
struct Upstream {
    addr: SocketAddr,
    io: TcpStream,
    /// When the last request on it started: idle since about then.
    used: Instant,
}

struct Conn {
    io: Stream,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    /// The upstream connection of the request being served.
    up: Option<Upstream>,
    /// Idle upstream connections kept for this client's next requests, one per endpoint
    /// lately used (a round-robin cluster sends one client's requests to each in turn).
    idle: Vec<Upstream>,
    ubuf: BytesMut,
    /// The upstream request head being sent.
    out: Vec<u8>,
    /// The response head for the client (then the first body bytes).
    resp: Vec<u8>,
    /// Endpoints tried for the request being served (kept to reuse its allocation).
    tried: Vec<usize>,
    client_ip: Option<IpAddr>,
    /// The wait for a request head: one timer for the connection, moved on at every read.
    /// Moving a registered timer later is an atomic store; a `timeout` around each read
    /// would add and remove a timer-wheel entry per request, a lock each way.
    wait: Pin<Box<tokio::time::Sleep>>,
}

/// A connection's per-request buffers while it waits for its next request.
struct Spare {
    ubuf: BytesMut,
    out: Vec<u8>,
    resp: Vec<u8>,
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
}

impl BodyReads {
    fn new() -> Self {
        BodyReads { size: MIN_READ }
    }

    /// Reads more of a body framed by `framing`, `remaining` bytes of it still to come.
    async fn read(
        &mut self,
        io: &mut TcpStream,
        buf: &mut BytesMut,
        framing: Framing,
        remaining: u64,
    ) -> io::Result<usize> {
        let want = match framing {
            Framing::Length(_) if remaining > MIN_READ as u64 => MAX_READ,
            _ => self.size,
        };
        buf.reserve(want);
        let n = io.read_buf(buf).await?;
        if n >= self.size {
            // The read filled the buffer: more is queued, take it in larger reads.
            self.size = MAX_READ;
        }
        Ok(n)
    }
}

thread_local! {
    // Per thread: each worker runs its own connections (no work stealing by default), so
    // no lock, and a connection that moved threads just uses the other thread's spares.
    static SPARE: std::cell::RefCell<Vec<Spare>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Conn {
    /// Between requests a connection keeps only its read buffer, as pingora's do (an edge
    /// proxy holds many idle keep-alive connections); the others go to the thread's spares
    /// for whichever connection gets a request next, so a busy thread does not allocate
    /// them per request and an idle one holds at most `MAX_SPARE`.
    fn release(&mut self) {
        if self.out.capacity() == 0 {
            return;
        }
        let mut spare = Spare {
            ubuf: std::mem::take(&mut self.ubuf),
            out: std::mem::take(&mut self.out),
            resp: std::mem::take(&mut self.resp),
        };
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

    fn reuse(&mut self) {
        if self.out.capacity() != 0 {
            return;
        }
        if let Some(s) = SPARE.with_borrow_mut(Vec::pop) {
            self.ubuf = s.ubuf;
            self.out = s.out;
            self.resp = s.resp;
        }
    }
}

enum Outcome {
    KeepAlive,
    Close,
    /// Not for the fast path: hand the connection to pingora with these bytes first; why.
    Fallback(BytesMut, &'static str),
}

enum Head {
    Complete(usize),
    Closed,
    /// Too long, or line ends the search does not see: pingora decides.
    Other,
}

#[async_trait]
impl ServerApp for FastH1 {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let client_ip = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut c = Conn {
            io,
            buf: BytesMut::new(),
            up: None,
            idle: Vec::new(),
            ubuf: BytesMut::new(),
            out: Vec::new(),
            resp: Vec::new(),
            tried: Vec::new(),
            client_ip,
            wait: Box::pin(tokio::time::sleep(IDLE)),
        };
        // Watched while the connection is idle: a shutting-down server closes it then.
        let mut watch = shutdown.clone();
        loop {
            let outcome = match read_head(&mut c, &mut watch).await {
                Head::Closed => return None,
                Head::Other => Outcome::Fallback(c.buf.split(), "head"),
                Head::Complete(n) => {
                    c.reuse();
                    self.serve(&mut c, n, shutdown).await
                }
            };
            match outcome {
                Outcome::KeepAlive => continue,
                Outcome::Close => {
                    Shutdown::shutdown(&mut *c.io).await;
                    return None;
                }
                Outcome::Fallback(mut replay, reason) => {
                    Metrics::global()
                        .fast_path_handoffs
                        .with_label_values(&[reason])
                        .inc();
                    replay.unsplit(c.buf.split());
                    let io = Box::new(Replay {
                        inner: c.io,
                        buf: replay.freeze(),
                    });
                    return super::serve_connection(&self.http, io, shutdown).await;
                }
            }
        }
    }

    async fn cleanup(&self) {
        self.http.cleanup().await;
    }
}

/// Where the head in `buf` ends (after its empty line), looking from `from` on: `Err` at a
/// line ended by a bare LF, which only pingora's parser takes.
fn head_end(buf: &[u8], from: usize) -> Option<Result<usize, ()>> {
    let start = from.saturating_sub(3);
    for i in memchr::memchr_iter(b'\n', &buf[start..]).map(|i| start + i) {
        if i == 0 || buf[i - 1] != b'\r' {
            return Some(Err(()));
        }
        if i >= 3 && buf[i - 2] == b'\n' && buf[i - 3] == b'\r' {
            return Some(Ok(i + 1));
        }
    }
    None
}

async fn read_head(c: &mut Conn, watch: &mut ShutdownWatch) -> Head {
    let mut searched: usize = 0;
    loop {
        match head_end(&c.buf, searched) {
            Some(Ok(n)) => return Head::Complete(n),
            Some(Err(())) => return Head::Other,
            None if c.buf.len() > MAX_HEAD => return Head::Other,
            None => {}
        }
        searched = c.buf.len();
        let idle = c.buf.is_empty();
        if idle {
            c.release();
        }
        c.buf.reserve(4096);
        c.wait.as_mut().reset(tokio::time::Instant::now() + IDLE);
        let read = c.io.read_buf(&mut c.buf);
        let timer = c.wait.as_mut();
        // Bytes already sent win over shutdown and the timer (biased, as in pingora): a
        // request the client sent is answered rather than dropped.
        let result = tokio::select! {
            biased;
            r = read => Some(r),
            _ = timer => None,
            _ = watch.changed(), if idle => return Head::Closed,
        };
        match result {
            Some(Ok(0)) | Some(Err(_)) | None => {
                return if c.buf.is_empty() {
                    Head::Closed
                } else {
                    Head::Other
                };
            }
            Some(Ok(_)) => {}
        }
    }
}

/// What the fast path takes from a request head.
struct Req<'h> {
    method: &'h str,
    path: &'h str,
    host: &'h str,
    close: bool,
    has_request_id: bool,
    xff: Option<&'h [u8]>,
    /// The length of the request body (`Content-Length`), at most `MAX_BODY`.
    body: usize,
}

/// The request head, when the fast path can serve it.
fn eligible<'h>(req: &httparse::Request<'_, 'h>) -> Option<Req<'h>> {
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
    let path = req.path?;
    if !path.starts_with('/') || !path.bytes().all(uri_char) {
        return None;
    }
    let mut r = Req {
        method,
        path,
        host: "",
        close: false,
        has_request_id: false,
        xff: None,
        body: 0,
    };
    let mut hosts = 0;
    let mut lengths = 0;
    for h in req.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            hosts += 1;
            r.host = crate::routing::matcher::visible(h.value)?;
        } else if n.eq_ignore_ascii_case("content-length") {
            // One plain length up to MAX_BODY; anything else (a list, a second header, a
            // larger body, which pingora streams) is pingora's.
            let v = h.value;
            lengths += 1;
            if v.is_empty() || v.len() > 6 || !v.iter().all(u8::is_ascii_digit) {
                return None;
            }
            r.body = v.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0'));
            if r.body > MAX_BODY {
                return None;
            }
        } else if n.eq_ignore_ascii_case("transfer-encoding")
            || n.eq_ignore_ascii_case("upgrade")
            || n.eq_ignore_ascii_case("expect")
        {
            return None;
        } else if n.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    r.close = true;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                    return None;
                }
            }
        } else if n.eq_ignore_ascii_case("x-request-id") {
            r.has_request_id = true;
        } else if n.eq_ignore_ascii_case("x-forwarded-for") {
            if r.xff.is_some() {
                return None;
            }
            r.xff = Some(h.value);
        } else if n.eq_ignore_ascii_case("content-type") && h.value.starts_with(b"application/grpc")
        {
            return None;
        }
    }
    (hosts == 1 && lengths <= 1).then_some(r)
}

/// RFC 3986's characters of a path and query (unreserved, sub-delims, `:@/?%`). Targets
/// with anything else (a fragment, quotes, braces, non-ASCII) go to pingora, which parses
/// them into a URI and answers or normalizes them its way.
fn uri_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// A route the fast path can forward on: no policy it leaves to pingora.
fn plain(forward: &Forward) -> bool {
    let on = &forward.retries.on;
    forward.fault.is_none()
        && forward.mirrors.is_empty()
        && forward.rewrite.is_none()
        && forward.timeout.is_none()
        && forward.retries.per_try_timeout.is_none()
        && !on.five_xx
        && !on.gateway_error
        && !on.retriable_4xx
        && on.codes.is_empty()
        && forward.destinations.iter().all(|d| {
            let c = &d.cluster;
            c.settings.tls.is_none()
                && c.settings.tcp_keepalive.is_none()
                && !c.settings.h2c
                && c.settings.max_requests_per_connection.is_none()
                && c.policy.hash_source().is_none()
        })
}

/// Hop-by-hop headers: about one connection, never passed on.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

fn dropped_response_header(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|d| name.eq_ignore_ascii_case(d))
}

/// Hop-by-hop headers, and those the proxy writes itself.
fn dropped_request_header(name: &str) -> bool {
    dropped_response_header(name)
        || name.eq_ignore_ascii_case("x-forwarded-for")
        || name.eq_ignore_ascii_case("x-forwarded-proto")
}

/// Writes `headers` less those `ops` (route's, then destination's) remove or set, then the
/// operations' own.
fn write_headers<'a>(
    out: &mut Vec<u8>,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ops: [&HeaderOps; 2],
    drop: fn(&str) -> bool,
) {
    // Whether a set or remove in `ops[from..]` replaces header `name`: a later operation
    // wins, as with pingora's header map.
    let replaced_in = |from: usize, name: &[u8]| {
        ops[from..].iter().any(|o| {
            o.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
                || o.remove
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        })
    };
    for (name, value) in headers {
        if drop(name) || replaced_in(0, name.as_bytes()) {
            continue;
        }
        put(out, name.as_bytes(), value);
    }
    for (i, o) in ops.iter().enumerate() {
        for (name, value) in o.set.iter().chain(&o.add) {
            if !replaced_in(i + 1, name) {
                put(out, name, value.as_bytes());
            }
        }
    }
}

/// httparse's headers as name-value pairs.
fn raw<'a>(headers: &'a [httparse::Header<'a>]) -> impl Iterator<Item = (&'a str, &'a [u8])> {
    headers.iter().map(|h| (h.name, h.value))
}

fn put(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How the response body ends.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// An upstream response head, owned (the upstream buffer is reused for the body).
struct Resp {
    status: u16,
    framing: Framing,
    upstream_close: bool,
    /// The client's connection closes after this response.
    close: bool,
}

enum Fail {
    Connect,
    /// The upstream closed or reset before a whole response head (on a kept connection:
    /// also on the new one tried after it).
    Reset,
    /// A response head that does not parse or frames its body ambiguously.
    Bad,
}

impl FastH1 {
    async fn serve(&self, c: &mut Conn, head_len: usize, shutdown: &ShutdownWatch) -> Outcome {
        let started = Instant::now();
        let head = c.buf.split_to(head_len);
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut hs);
        match parsed.parse(&head) {
            Ok(httparse::Status::Complete(n)) if n == head_len => {}
            _ => return Outcome::Fallback(head, "head"),
        }
        let Some(req) = eligible(&parsed) else {
            return Outcome::Fallback(head, "request");
        };
        let snapshot = self.snapshots.load_full();
        if snapshot.settings.tracing.is_some() {
            return Outcome::Fallback(head, "tracing");
        }
        let Some(listener) = snapshot.listeners.get(self.listener) else {
            return Outcome::Fallback(head, "route");
        };
        let (path, query) = match req.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.path, None),
        };
        let view = RequestView {
            method: req.method,
            path,
            query,
            authority: req.host,
            scheme: if self.tls { "https" } else { "http" },
            headers: Headers::Raw(parsed.headers, &[]),
            port: listener.addr.port(),
            client_ip: c.client_ip,
        };
        let host = normalize_host(req.host);
        let (route, forward) = match listener.table.decide(&host, &view) {
            Decision::Route { route, .. } => match &route.action {
                Action::Forward(f) if route.cors.is_none() && plain(f) => (route, f),
                _ => return Outcome::Fallback(head, "route"),
            },
            _ => return Outcome::Fallback(head, "route"),
        };
        let destination = &forward.destinations[forward.pick()];
        let cluster = &destination.cluster;
        // No waiting here (and no pending slot taken): pingora's path waits for a full pool,
        // as long as the route allows.
        let Some(_admission) = cluster.try_admit() else {
            return Outcome::Fallback(head, "admission");
        };
        // The body, whole, after the head (pingora would get these bytes too on a fallback
        // above: they stay in `c.buf` until here).
        while c.buf.len() < req.body {
            c.buf.reserve(req.body - c.buf.len());
            c.wait.as_mut().reset(tokio::time::Instant::now() + IDLE);
            let read = c.io.read_buf(&mut c.buf);
            let timer = c.wait.as_mut();
            let n = tokio::select! {
                biased;
                r = read => r.unwrap_or(0),
                _ = timer => 0,
            };
            if n == 0 {
                // The client went away or stalled mid-body: nothing was sent upstream.
                return Outcome::Close;
            }
        }

        // The upstream request head.
        let id = (!req.has_request_id).then(request_id);
        let out = &mut c.out;
        out.clear();
        out.reserve(head_len + 256 + req.body);
        out.extend_from_slice(req.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(req.path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        write_headers(
            out,
            raw(parsed.headers),
            [&route.headers.request, &destination.headers.request],
            dropped_request_header,
        );
        if let Some(id) = &id {
            put(out, b"x-request-id", id);
        }
        let proto: &[u8] = if self.tls { b"https" } else { b"http" };
        put(out, b"x-forwarded-proto", proto);
        if let Some(ip) = c.client_ip {
            out.extend_from_slice(b"x-forwarded-for: ");
            write_forwarded_for(out, req.xff, ip);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&c.buf[..req.body]);
        c.buf.advance(req.body);
        let head_only = req.method == "HEAD";

        let added = [("x-request-id", id.as_ref().map_or(&b""[..], |id| &id[..]))];
        let log = Log {
            snapshot: &snapshot,
            req: &req,
            headers: Headers::Raw(parsed.headers, if id.is_some() { &added } else { &[] }),
            route,
            cluster,
            started,
        };

        let client_close = req.close || *shutdown.borrow();
        let response_ops = [&route.headers.response, &destination.headers.response];

        // Tries: another endpoint after a connect failure, as the route's retries allow.
        c.tried.clear();
        let mut retries = 0u32;
        let mut _permit: Option<RetryPermit> = None;
        let (resp, i, inflight) = loop {
            let Some(i) = cluster.select(None, &c.tried) else {
                let done = Done::local(503, "UH", None, retries);
                return local(c, &log, done, "no healthy upstream").await;
            };
            c.tried.push(i);
            let inflight = InFlight::new(cluster.clone(), i);
            match exchange(
                c,
                cluster,
                i,
                head_only,
                response_ops,
                client_close,
                started,
            )
            .await
            {
                Ok(resp) => break (resp, i, inflight),
                Err(fail) => {
                    let tries = (&mut retries, &mut _permit);
                    match after_failure(fail, forward, cluster, i, tries).await {
                        None => continue,
                        Some((done, what)) => return local(c, &log, done, what).await,
                    }
                }
            }
        };
        let upstream_time = inflight.started.elapsed();
        cluster.record(i, Some(resp.status), Some(upstream_time));

        // The response head is in `c.resp`; the body follows as it comes.
        let mut done = Done::via_upstream(
            resp.status,
            cluster.endpoints[i].addr,
            upstream_time,
            retries,
        );
        let result = forward_body(c, resp.framing).await;
        drop(inflight);
        match result {
            Ok(n) => done.sent = n,
            Err(side) => {
                // Part of a response went out: all that is left is to close both ends.
                c.up = None;
                done.flags = match side {
                    Side::Upstream => "UC",
                    Side::Downstream => "DC",
                };
                log.finish(c, &done);
                return Outcome::Close;
            }
        }
        match c.up.take() {
            Some(_) if resp.upstream_close || resp.framing == Framing::Close => {}
            Some(up) => {
                if c.idle.len() == MAX_IDLE_UPSTREAMS {
                    c.idle.remove(0);
                }
                c.idle.push(up);
            }
            None => {}
        }
        log.finish(c, &done);
        if resp.close {
            Outcome::Close
        } else {
            Outcome::KeepAlive
        }
    }
}

/// After a failed try on endpoint `i`: `None` when the route's retries allow another (the
/// backoff already waited), else the local reply to make and what to say.
async fn after_failure(
    fail: Fail,
    forward: &Forward,
    cluster: &Arc<Cluster>,
    i: usize,
    (retries, permit): (&mut u32, &mut Option<RetryPermit>),
) -> Option<(Done, &'static str)> {
    cluster.record(i, None, None);
    let wanted = match fail {
        Fail::Connect => forward.retries.on.connect(),
        Fail::Reset => forward.retries.on.reset(),
        Fail::Bad => false,
    };
    if wanted && *retries < forward.retries.attempts {
        if let Some(p) = cluster.start_retry() {
            *permit = Some(p);
            *retries += 1;
            tokio::time::sleep(forward.retries.backoff_for(*retries)).await;
            return None;
        }
    }
    let retried = *retries > 0;
    let (status, flag, what) = match fail {
        Fail::Connect => (
            503,
            if retried { "URX" } else { "UF" },
            "upstream connect error",
        ),
        Fail::Reset => (
            503,
            if retried { "URX" } else { "UC" },
            "upstream reset before response",
        ),
        Fail::Bad => (502, "UPE", "upstream sent an invalid response"),
    };
    let addr = Some(cluster.endpoints[i].addr);
    Some((Done::local(status, flag, addr, *retries), what))
}

/// How a request ended, for metrics and the access log.
struct Done {
    status: u16,
    flags: &'static str,
    details: &'static str,
    sent: usize,
    upstream_time: Option<Duration>,
    upstream_host: Option<SocketAddr>,
    attempts: u32,
}

impl Done {
    /// A response from endpoint `addr`, before its body is passed on.
    fn via_upstream(status: u16, addr: SocketAddr, upstream_time: Duration, retries: u32) -> Done {
        Done {
            status,
            flags: "",
            details: "via_upstream",
            sent: 0,
            upstream_time: Some(upstream_time),
            upstream_host: Some(addr),
            attempts: retries + 1,
        }
    }

    /// A reply the gateway makes after failed tries; as on pingora's path, its details
    /// are left empty.
    fn local(
        status: u16,
        flags: &'static str,
        upstream_host: Option<SocketAddr>,
        retries: u32,
    ) -> Done {
        Done {
            status,
            flags,
            details: "",
            sent: 0,
            upstream_time: None,
            upstream_host,
            attempts: if upstream_host.is_some() {
                retries + 1
            } else {
                0
            },
        }
    }
}

/// What the metrics and the access log need of a request, gathered as it is served.
struct Log<'r> {
    snapshot: &'r Snapshot,
    req: &'r Req<'r>,
    headers: Headers<'r>,
    route: &'r Route,
    cluster: &'r Cluster,
    started: Instant,
}

impl Log<'_> {
    fn finish(&self, c: &Conn, done: &Done) {
        let Some((al, sink)) = self.observe(done) else {
            return;
        };
        // The JSON format (the default) names no response header: no need to parse it.
        let mut rh = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut rh);
        let response_headers = (al.format.reads_response_headers() && r.parse(&c.resp).is_ok())
            .then_some(Headers::Raw(r.headers, &[]));
        self.write(
            al,
            sink,
            done,
            "HTTP/1.1",
            c.io.get_socket_digest().as_deref(),
            c.io.get_ssl_digest().as_deref(),
            response_headers,
        );
    }

    /// Counts the request in the metrics; the access log's settings and sink when a line
    /// is to be written.
    fn observe(&self, done: &Done) -> Option<(&AccessLogSettings, &'static Sink)> {
        let metrics = Metrics::global();
        metrics.fast_path_requests.inc();
        metrics.request(done.status);
        metrics.istio.observe(&Observation {
            dest: Some(&self.cluster.metrics_dest),
            status: done.status,
            flags: done.flags,
            grpc: false,
            duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            request_bytes: self.req.body,
            response_bytes: done.sent,
        });
        let al = self.snapshot.settings.access_log.as_ref()?;
        Some((al, access_log::Sink::get()?))
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        al: &AccessLogSettings,
        sink: &Sink,
        done: &Done,
        protocol: &'static str,
        socket: Option<&SocketDigest>,
        ssl: Option<&SslDigest>,
        response_headers: Option<Headers<'_>>,
    ) {
        let duration = self.started.elapsed();
        let (downstream_local, downstream_remote) = access_log::addresses(socket);
        let entry = access_log::Entry {
            start: std::time::SystemTime::now() - duration,
            method: self.req.method,
            path: self.req.path,
            protocol,
            status: done.status,
            flags: done.flags,
            details: done.details,
            bytes_received: self.req.body,
            bytes_sent: done.sent,
            duration,
            upstream_time: done.upstream_time,
            request_headers: self.headers,
            response_headers,
            authority: self.req.host,
            upstream_host: done.upstream_host,
            upstream_cluster: Some(self.cluster.name.as_str()),
            downstream_local,
            downstream_remote,
            sni: ssl
                .and_then(|t| t.extension.get::<super::Sni>())
                .map(|s| s.0.as_str()),
            route_name: self.route.name.as_deref(),
            attempts: done.attempts,
        };
        sink.write(al.format.render(&entry));
    }
}

/// Sends the request head in `c.out` to endpoint `i` (the kept connection when it goes
/// there) and reads the response head into `c.ubuf`.
async fn exchange(
    c: &mut Conn,
    cluster: &Cluster,
    i: usize,
    head_only: bool,
    ops: [&HeaderOps; 2],
    client_close: bool,
    now: Instant,
) -> Result<Resp, Fail> {
    let addr = cluster.endpoints[i].addr;
    // An idle connection past the cluster's idle timeout (pingora's pool default: 60 s)
    // is closed rather than reused, as pingora's pool would have.
    let idle_limit = cluster
        .settings
        .idle_timeout
        .unwrap_or(Duration::from_secs(60));
    c.up = c
        .idle
        .iter()
        .position(|u| u.addr == addr)
        .map(|k| c.idle.remove(k))
        .filter(|u| now.saturating_duration_since(u.used) < idle_limit);
    if let Some(up) = c.up.as_mut() {
        up.used = now;
    }
    let mut reused = c.up.is_some();
    loop {
        if !reused {
            c.up = None;
            let io = match tokio::time::timeout(
                cluster.settings.connect_timeout,
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(io)) => io,
                _ => return Err(Fail::Connect),
            };
            let _ = io.set_nodelay(true);
            c.up = Some(Upstream {
                addr,
                io,
                used: now,
            });
        }
        let up = c.up.as_mut().expect("connected above");
        c.ubuf.clear();
        let result = async {
            up.io.write_all(&c.out).await?;
            let resp = &mut c.resp;
            read_response(
                &mut up.io,
                &mut c.ubuf,
                head_only,
                client_close,
                |r, _, close| write_response_head(resp, r, close, ops),
            )
            .await
        }
        .await;
        match result {
            Ok(Some(resp)) => return Ok(resp),
            Ok(None) => {
                c.up = None;
                return Err(Fail::Bad);
            }
            Err(_) if reused => {
                // Closed by the upstream while idle: once more on a new connection.
                reused = false;
            }
            Err(_) => {
                c.up = None;
                return Err(Fail::Reset);
            }
        }
    }
}

/// Reads a response head from the upstream into `ubuf` and hands it to `emit` (with
/// whether the client's connection closes after it), leaving the body bytes read so far in
/// `ubuf`. `Ok(None)` when the head does not parse or frames its body ambiguously.
async fn read_response(
    io: &mut TcpStream,
    ubuf: &mut BytesMut,
    head_only: bool,
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
            if (100..200).contains(&status) && status != 101 {
                // Informational: dropped; the final response follows (pingora passes them on).
                ubuf.advance(head_len);
                continue;
            }
            if !(200..600).contains(&status) {
                return Ok(None);
            }
            let mut length: Option<u64> = None;
            // Some(whether chunked is the last coding) when transfer-encoding is sent.
            let mut te: Option<bool> = None;
            // An HTTP/1.0 upstream: no keep-alive assumed.
            let mut upstream_close = r.version == Some(0);
            for h in r.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    let v = h.value.trim_ascii();
                    let n = (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
                        .then(|| v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
                    match (n, length) {
                        (Some(n), None) => length = Some(n),
                        (Some(n), Some(l)) if n == l => {}
                        _ => return Ok(None),
                    }
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    // Chunked when it is the last coding; otherwise the body ends with the
                    // connection (RFC 9112 6.3).
                    let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                    te = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                } else if h.name.eq_ignore_ascii_case("connection") {
                    upstream_close |= h
                        .value
                        .split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                }
            }
            let framing = if head_only || status == 204 || status == 304 {
                Framing::Empty
            } else if let Some(chunked) = te {
                if length.is_some() {
                    return Ok(None);
                }
                if chunked {
                    Framing::Chunked
                } else {
                    Framing::Close
                }
            } else if let Some(n) = length {
                Framing::Length(n)
            } else {
                Framing::Close
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
        if ubuf.len() > MAX_HEAD {
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
) {
    let status = r.code.unwrap_or(0);
    out.clear();
    out.reserve(1024 + 4096);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(r.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_headers(out, raw(r.headers), ops, dropped_response_header);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Which end failed while a body was passed on.
enum Side {
    Upstream,
    Downstream,
}

/// Writes the response head in `c.resp` and the body from `c.ubuf` and the upstream to the
/// client. Returns the body bytes sent.
async fn forward_body(c: &mut Conn, framing: Framing) -> Result<usize, Side> {
    let mut chunks = ChunkScan::default();
    let mut sent = 0usize;
    let mut remaining = match framing {
        Framing::Empty => 0,
        Framing::Length(n) => n,
        Framing::Chunked | Framing::Close => u64::MAX,
    };
    let mut first = true;
    let mut reads = BodyReads::new();
    loop {
        // What of ubuf belongs to this body.
        let take = match framing {
            Framing::Empty => 0,
            Framing::Length(_) => (c.ubuf.len() as u64).min(remaining) as usize,
            Framing::Chunked => chunks.scan(&c.ubuf).unwrap_or(c.ubuf.len()),
            Framing::Close => c.ubuf.len(),
        };
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(_) => {
                remaining -= take as u64;
                remaining == 0
            }
            Framing::Chunked => chunks.done,
            Framing::Close => false,
        };
        if first {
            c.resp.extend_from_slice(&c.ubuf[..take]);
            c.io.write_all(&c.resp)
                .await
                .map_err(|_| Side::Downstream)?;
            first = false;
        } else if take > 0 {
            c.io.write_all(&c.ubuf[..take])
                .await
                .map_err(|_| Side::Downstream)?;
        }
        sent += take;
        c.ubuf.advance(take);
        if done {
            if !c.ubuf.is_empty() {
                // The upstream sent more than its response: do not reuse it.
                c.up = None;
            }
            c.io.flush().await.map_err(|_| Side::Downstream)?;
            return Ok(sent);
        }
        let Some(up) = c.up.as_mut() else {
            return Err(Side::Upstream);
        };
        c.ubuf.clear();
        let n = reads
            .read(&mut up.io, &mut c.ubuf, framing, remaining)
            .await
            .map_err(|_| Side::Upstream)?;
        if n == 0 {
            if framing == Framing::Close {
                c.io.flush().await.map_err(|_| Side::Downstream)?;
                return Ok(sent);
            }
            return Err(Side::Upstream);
        }
    }
}

/// Finds the end of a chunked body in the bytes passed through it.
#[derive(Default)]
struct ChunkScan {
    state: ChunkState,
    size: u64,
    done: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Debug)]
enum ChunkState {
    #[default]
    Size,
    /// Chunk extensions up to the end of the size line.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk; `TrailerStart` at the start of a line.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl ChunkScan {
    /// Scans `buf` (continuing from the last call); `Some(n)` when the body ends after
    /// `n` bytes of it. Malformed framing also ends it (the connection is then not reused).
    fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        self.decode(buf, |_| {})
    }

    /// As [`ChunkScan::scan`], handing each run of chunk data in `buf` to `data`.
    fn decode(
        &mut self,
        buf: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Option<usize> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = match self.size.checked_mul(16) {
                            Some(s) => s + d,
                            None => {
                                self.done = true;
                                return Some(i);
                            }
                        };
                    }
                    b';' | b' ' | b'\t' => self.state = Ext,
                    b'\r' => self.state = SizeLf,
                    _ => {
                        self.done = true;
                        return Some(i);
                    }
                },
                Ext => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        self.done = true;
                        return Some(i);
                    }
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let n = ((buf.len() - i) as u64).min(self.size) as usize;
                    data(i..i + n);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        self.done = true;
                        return Some(i);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        self.done = true;
                        return Some(i);
                    }
                    self.state = Size;
                }
                TrailerStart => {
                    self.state = if b == b'\r' { EndLf } else { Trailer };
                }
                Trailer => {
                    if b == b'\r' {
                        self.state = TrailerLf;
                    }
                }
                TrailerLf => {
                    self.state = if b == b'\n' { TrailerStart } else { Trailer };
                }
                EndLf => {
                    self.done = true;
                    return Some(i + 1);
                }
            }
            i += 1;
        }
        None
    }
}

/// A local reply after failed tries: status, body, log line, metrics and access log as
/// pingora's path makes them; the connection is closed after it, as there.
async fn local(c: &mut Conn, log: &Log<'_>, mut done: Done, what: &str) -> Outcome {
    tracing::warn!(
        status = done.status,
        flag = done.flags,
        method = log.req.method,
        path = log.req.path,
        route = %log.route.origin,
        cluster = %log.cluster.name,
        tries = done.attempts.max(1),
        "{what}"
    );
    let reason = http::StatusCode::from_u16(done.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let body_len = what.len() + 1;
    c.resp.clear();
    c.resp.reserve(256);
    let _ = write!(
        c.resp,
        "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {body_len}\r\nconnection: close\r\n\r\n{what}\n",
        done.status
    );
    let _ = c.io.write_all(&c.resp).await;
    let _ = c.io.flush().await;
    done.sent = body_len;
    log.finish(c, &done);
    Outcome::Close
}

/// The client connection handed to pingora: the bytes the fast path read come first.
#[derive(Debug)]
struct Replay {
    inner: Stream,
    buf: Bytes,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() {
            let n = self.buf.len().min(out.remaining());
            out.put_slice(&self.buf[..n]);
            self.buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Replay {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Replay {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Replay {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Replay {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Replay {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Replay {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Replay {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.buf.len() >= buf.len() {
            buf.copy_from_slice(&self.buf[..buf.len()]);
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_scan_finds_the_end_across_calls() {
        let body = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nTrailer: a\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 1..body.len() {
            let mut s = ChunkScan::default();
            let first = s.scan(&body[..split]);
            let total = match first {
                Some(n) => n,
                None => split + s.scan(&body[split..]).expect("end in the rest"),
            };
            assert_eq!(total, end, "split at {split}");
            assert!(s.done);
        }
        let mut s = ChunkScan::default();
        assert_eq!(s.scan(b"0\r\n\r\n"), Some(5));
    }

    #[test]
    fn head_end_finds_the_empty_line_and_refuses_bare_lf() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nnext";
        let end = head.len() - 4;
        for from in 0..=end {
            assert_eq!(head_end(head, from), Some(Ok(end)), "from {from}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0), Some(Err(())));
    }

    #[test]
    fn header_operations_replace_remove_and_add_in_route_then_destination_order() {
        let ops = |set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]| HeaderOps {
            set: set
                .iter()
                .map(|(n, v)| (Bytes::copy_from_slice(n.as_bytes()), v.parse().unwrap()))
                .collect(),
            add: add
                .iter()
                .map(|(n, v)| (Bytes::copy_from_slice(n.as_bytes()), v.parse().unwrap()))
                .collect(),
            remove: remove.iter().map(|n| n.parse().unwrap()).collect(),
        };
        let route = ops(
            &[("x-a", "route"), ("x-b", "route")],
            &[("x-c", "1")],
            &["x-gone"],
        );
        let dest = ops(&[("x-b", "dest")], &[], &["x-c"]);
        let client = [
            httparse::Header {
                name: "Host",
                value: b"h",
            },
            httparse::Header {
                name: "X-A",
                value: b"client",
            },
            httparse::Header {
                name: "x-gone",
                value: b"1",
            },
            httparse::Header {
                name: "Connection",
                value: b"keep-alive",
            },
        ];
        let mut out = Vec::new();
        write_headers(
            &mut out,
            raw(&client),
            [&route, &dest],
            dropped_request_header,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Host: h\r\nx-a: route\r\nx-b: dest\r\n"
        );
    }

    #[test]
    fn chunk_scan_stops_at_bad_framing() {
        let mut s = ChunkScan::default();
        assert_eq!(s.scan(b"zz\r\n"), Some(0));
        assert!(s.done);
    }
}
