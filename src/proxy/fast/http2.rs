//! HTTP/2 on the fast path: the h2 connections of an HTTPS listener.
//!
//! pingora drives the connection (handshake, frames, flow control, HPACK: the `h2` crate)
//! and hands over each stream as a session; what pingora would then run per stream, its
//! whole proxy cycle with an upstream session from its pool, costs several times the CPU
//! of the forwarding itself (`bench/RESULTS.md`, h2). Here a stream the fast path can serve
//! (the same rules as for HTTP/1.1: no body, a route that only forwards) is forwarded by
//! Portico over HTTP/1.1 on an upstream connection from a per-thread pool; any other stream
//! goes to pingora's cycle as before, alone (its siblings stay here).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::IpAddr;

use http::header;
use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{handshake, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Digest;
use pingora_http::{RequestHeader, ResponseHeader};

use super::*;

/// Rejected (malformed) streams after which a connection is closed, as pingora's own
/// accept loop does.
const MAX_MALFORMED_STREAMS: usize = 32;

/// Idle upstream connections kept per thread for h2 streams (the least recently used goes).
/// An h2 client has many streams in flight at once, each needing its own HTTP/1.1
/// upstream connection, so they are shared by all h2 connections on the thread rather than
/// kept per client connection as on HTTP/1.1.
const MAX_IDLE: usize = 256;

thread_local! {
    static IDLE_UPSTREAMS: RefCell<VecDeque<Upstream>> = const { RefCell::new(VecDeque::new()) };
}

/// The most recently used idle connection to `addr` still within `limit`.
fn take_idle(addr: SocketAddr, now: Instant, limit: Duration) -> Option<Upstream> {
    IDLE_UPSTREAMS.with_borrow_mut(|idle| {
        while let Some(k) = idle.iter().rposition(|u| u.addr == addr) {
            let up = idle.remove(k)?;
            if now.saturating_duration_since(up.used) < limit {
                return Some(up);
            }
        }
        None
    })
}

fn keep_idle(up: Upstream) {
    IDLE_UPSTREAMS.with_borrow_mut(|idle| {
        if idle.len() == MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(up);
    });
}

impl FastH1 {
    /// Serves an h2 connection until the client is done with it.
    pub(crate) async fn serve_h2(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) {
        let client_ip = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let digest = Arc::new(Digest {
            ssl_digest: io.get_ssl_digest(),
            timing_digest: io.get_timing_digest(),
            proxy_digest: io.get_proxy_digest(),
            socket_digest: io.get_socket_digest(),
        });
        let mut conn = match handshake(io, self.http.h2_options()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "h2 handshake failed");
                return;
            }
        };
        let mut watch = shutdown.clone();
        let mut closing = false;
        let mut malformed = 0;
        loop {
            let accepted = if closing {
                HttpSession::from_h2_conn(&mut conn, digest.clone()).await
            } else {
                // Accepting is cancel-safe (pingora's loop does the same).
                tokio::select! {
                    biased;
                    _ = watch.changed() => {
                        conn.graceful_shutdown();
                        closing = true;
                        continue;
                    }
                    a = HttpSession::from_h2_conn(&mut conn, digest.clone()) => a,
                }
            };
            match accepted {
                Ok(Some(H2Accept::Session(session))) => {
                    let app = self.clone();
                    let shutdown = shutdown.clone();
                    // Boxed: the stream's future is a few KiB, and tokio moves a future it
                    // spawns (and the task's stage when it ends) by value, a copy each time;
                    // behind a box those moves are of a pointer.
                    let stream = async move { app.h2_stream(session, client_ip, shutdown).await };
                    tokio::spawn(Box::pin(stream));
                }
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MAX_MALFORMED_STREAMS {
                        tracing::debug!("h2 connection closed after {malformed} malformed streams");
                        return;
                    }
                }
                // Closed by the client, or after the GOAWAY once its streams are done.
                Ok(None) => return,
                // Clients often just close the TCP connection: not worth more than debug.
                Err(e) => {
                    tracing::debug!(error = %e, "h2 connection ended");
                    return;
                }
            }
        }
    }

    async fn h2_stream(
        self: Arc<Self>,
        mut s: HttpSession,
        client_ip: Option<IpAddr>,
        shutdown: ShutdownWatch,
    ) {
        if let Some(reason) = self.forward_h2(&mut s, client_ip).await {
            Metrics::global()
                .fast_path_handoffs
                .with_label_values(&[reason])
                .inc();
            self.http
                .process_new_http(ServerSession::new_http2(s), &shutdown)
                .await;
        }
    }

    /// Forwards one stream; `Some(why)` when it is left to pingora (nothing sent yet).
    async fn forward_h2(
        &self,
        s: &mut HttpSession,
        client_ip: Option<IpAddr>,
    ) -> Option<&'static str> {
        let started = Instant::now();
        let snapshot = self.snapshots.load_full();
        if snapshot.settings.tracing.is_some() {
            return Some("tracing");
        }
        let Some(listener) = snapshot.listeners.get(self.listener) else {
            return Some("route");
        };
        let req = s.req_header();
        // (`?` would be wrong in here: `None` means served.)
        let Some(q) = eligible_h2(req) else {
            return Some("request");
        };
        if q.body == 0 && !s.is_body_empty() {
            // A body without a length.
            return Some("request");
        }
        let view = RequestView {
            method: q.method,
            path: req.uri.path(),
            query: req.uri.query(),
            authority: q.host,
            scheme: "https",
            headers: Headers::Map(&req.headers),
            port: listener.addr.port(),
            client_ip,
        };
        let host = normalize_host(q.host);
        let (route, forward) = match listener.table.decide(&host, &view) {
            Decision::Route { route, .. } => match &route.action {
                Action::Forward(f) if route.cors.is_none() && plain(f) => (route, f),
                _ => return Some("route"),
            },
            _ => return Some("route"),
        };
        let destination = &forward.destinations[forward.pick()];
        let cluster = &destination.cluster;
        let Some(_admission) = cluster.try_admit() else {
            return Some("admission");
        };
        let head_only = req.method == http::Method::HEAD;
        let (body_len, has_request_id) = (q.body, q.has_request_id);
        if !has_request_id {
            // In the request header too, for the access log.
            let id = request_id();
            let _ = s.req_header_mut().insert_header("x-request-id", &id[..]);
        }
        let mut out = upstream_head(
            s.req_header(),
            [&route.headers.request, &destination.headers.request],
            client_ip,
        );
        if body_len > 0 {
            // Read whole (the h2 crate holds the stream to its content-length), then sent
            // after the head and replayed on a retry, as on HTTP/1.1.
            let start = out.len();
            let read = async {
                while let Some(data) = s.read_body_bytes().await.ok()? {
                    out.extend_from_slice(&data);
                }
                Some(())
            };
            let whole = tokio::time::timeout(IDLE, read).await.ok().flatten();
            if whole.is_none() || out.len() - start != body_len {
                // The client reset the stream or stalled: nothing went upstream.
                s.shutdown();
                return None;
            }
        }

        // Tries: another endpoint after a connect failure, as the route's retries allow.
        let mut tried = Vec::new();
        let mut retries = 0u32;
        let mut _permit: Option<RetryPermit> = None;
        // What `read_response` reserves before its first read: less would make that reserve
        // reallocate, copying the whole old block, once per stream.
        let mut ubuf = BytesMut::with_capacity(HEAD_READ);
        let ops = [&route.headers.response, &destination.headers.response];
        let mut head = None;
        let (mut up, resp, i, inflight) = loop {
            let Some(i) = cluster.select(None, &tried) else {
                let done = Done::local(503, "UH", None, retries);
                local_h2(
                    s,
                    &snapshot,
                    route,
                    cluster,
                    started,
                    done,
                    "no healthy upstream",
                )
                .await;
                return None;
            };
            tried.push(i);
            let inflight = InFlight::new(cluster.clone(), i);
            let emit = |r: &httparse::Response<'_, '_>, raw: &[u8], _close: bool| {
                head = response_head(r, raw, ops);
            };
            match exchange_h2(&out, &mut ubuf, cluster, i, head_only, started, emit).await {
                Ok((up, resp)) => break (up, resp, i, inflight),
                Err(fail) => {
                    let tries = (&mut retries, &mut _permit);
                    match after_failure(fail, forward, cluster, i, tries).await {
                        None => continue,
                        Some((done, what)) => {
                            local_h2(s, &snapshot, route, cluster, started, done, what).await;
                            return None;
                        }
                    }
                }
            }
        };
        let upstream_time = inflight.started.elapsed();
        cluster.record(i, Some(resp.status), Some(upstream_time));
        let mut done = Done::via_upstream(
            resp.status,
            cluster.endpoints[i].addr,
            upstream_time,
            retries,
        );
        let Some(head) = head else {
            // A 101, or a field HTTP/2 cannot carry: nothing went to the client yet.
            let done = Done::local(502, "UPE", done.upstream_host, retries);
            let what = "upstream sent a response HTTP/2 cannot carry";
            local_h2(s, &snapshot, route, cluster, started, done, what).await;
            return None;
        };
        let end = resp.framing == Framing::Empty;
        let result = match s.write_response_header(Box::new(head), end) {
            Ok(()) => body_h2(s, &mut up, &mut ubuf, resp.framing).await,
            Err(_) => Err(Side::Downstream),
        };
        drop(inflight);
        match result {
            Ok(n) => {
                done.sent = n;
                if ubuf.is_empty() && !resp.upstream_close && resp.framing != Framing::Close {
                    keep_idle(up);
                }
            }
            Err(side) => {
                done.flags = match side {
                    Side::Upstream => {
                        // Part of a response went out: the client must not take it as whole.
                        s.shutdown();
                        "UC"
                    }
                    Side::Downstream => "DC",
                };
                done.sent = s.body_bytes_sent();
            }
        }
        log_h2(s, &snapshot, route, cluster, started, &done);
        None
    }
}

/// What the fast path takes from an h2 request header, when it can serve it.
fn eligible_h2(req: &RequestHeader) -> Option<Req<'_>> {
    let method = req.method.as_str();
    if !matches!(
        method,
        "GET" | "HEAD" | "DELETE" | "OPTIONS" | "POST" | "PUT" | "PATCH"
    ) {
        return None;
    }
    let path = req.uri.path_and_query().map(|p| p.as_str())?;
    if !path.starts_with('/') || !path.bytes().all(uri_char) {
        return None;
    }
    let host = crate::proxy::authority(req);
    if host.is_empty() {
        return None;
    }
    let mut r = Req {
        method,
        path,
        host,
        close: false,
        has_request_id: false,
        xff: None,
        body: 0,
    };
    for (name, value) in req.headers.iter() {
        if *name == header::CONTENT_LENGTH {
            // Bodies up to MAX_BODY are read whole; longer ones pingora streams.
            let v = value.as_bytes();
            if r.body != 0 || v.is_empty() || v.len() > 6 || !v.iter().all(u8::is_ascii_digit) {
                return None;
            }
            r.body = v.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0'));
            if r.body > MAX_BODY {
                return None;
            }
        } else if *name == header::TRANSFER_ENCODING
            || *name == header::UPGRADE
            || *name == header::EXPECT
        {
            return None;
        } else if *name == header::CONTENT_TYPE {
            if value.as_bytes().starts_with(b"application/grpc") {
                return None;
            }
        } else if name == "x-request-id" {
            r.has_request_id = true;
        } else if name == "x-forwarded-for" {
            if r.xff.is_some() {
                return None;
            }
            r.xff = Some(value.as_bytes());
        }
    }
    Some(r)
}

/// Whether `ops` set or remove header `name`.
fn touched(ops: [&HeaderOps; 2], name: &str) -> bool {
    ops.iter().any(|o| {
        o.set
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            || o.remove.iter().any(|n| n.as_str() == name)
    })
}

/// Hop-by-hop headers, those the proxy writes itself, and cookies (joined into one line).
fn dropped_h2_request_header(name: &str) -> bool {
    dropped_request_header(name) || name == "cookie"
}

/// The HTTP/1.1 request head for the upstream, as pingora's path would write it: `Host`
/// from `:authority`, cookies on one line (RFC 9113 8.2.3), then as on HTTP/1.1.
fn upstream_head(req: &RequestHeader, ops: [&HeaderOps; 2], client_ip: Option<IpAddr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !req.headers.contains_key(header::HOST) && !touched(ops, "host") {
        if let Some(a) = req.uri.authority() {
            put(&mut out, b"host", a.as_str().as_bytes());
        }
    }
    let headers = req.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
    write_headers(&mut out, headers, ops, dropped_h2_request_header);
    if !touched(ops, "cookie") {
        let mut cookies = req.headers.get_all(header::COOKIE).iter();
        if let Some(first) = cookies.next() {
            out.extend_from_slice(b"cookie: ");
            out.extend_from_slice(first.as_bytes());
            for c in cookies {
                out.extend_from_slice(b"; ");
                out.extend_from_slice(c.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    put(&mut out, b"x-forwarded-proto", b"https");
    if let Some(ip) = client_ip {
        let prev = req.headers.get("x-forwarded-for").map(|v| v.as_bytes());
        out.extend_from_slice(b"x-forwarded-for: ");
        write_forwarded_for(&mut out, prev, ip);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The client's response header for upstream head `r` (parsed from `raw`): what HTTP/2
/// allows of it (pingora drops the connection-specific fields again as it writes), with
/// `ops` applied.
fn response_head(
    r: &httparse::Response<'_, '_>,
    raw: &[u8],
    ops: [&HeaderOps; 2],
) -> Option<ResponseHeader> {
    let status = r.code?;
    if status < 200 {
        return None;
    }
    let mut h = ResponseHeader::build_no_case(status, Some(r.headers.len() + 2)).ok()?;
    // Names and values share one copy of the head: a value of its own each would be an
    // allocation, and another when pingora clones the header to keep it for the log.
    // pingora parses a name given as bytes into a `HeaderName` once; given a `HeaderName`
    // it would look up its title case (copying a name it does not know) and parse again.
    let block = Bytes::copy_from_slice(raw);
    let base = raw.as_ptr() as usize;
    // httparse's names and values are slices of `raw`.
    let part = |s: &[u8]| {
        let at = (s.as_ptr() as usize).checked_sub(base)?;
        (at + s.len() <= block.len()).then(|| block.slice(at..at + s.len()))
    };
    for x in r.headers.iter() {
        if dropped_response_header(x.name) || x.name.eq_ignore_ascii_case("transfer-encoding") {
            continue;
        }
        let name = part(x.name.as_bytes())?;
        let value = if x.value.is_empty() {
            http::HeaderValue::from_static("")
        } else {
            http::HeaderValue::from_maybe_shared(part(x.value)?).ok()?
        };
        h.append_header(name, value).ok()?;
    }
    for o in ops {
        o.apply_response(&mut h);
    }
    Some(h)
}

/// Sends `out` to endpoint `i` (on an idle connection to it when there is one) and reads
/// the response head into `ubuf`, handing it to `emit`.
async fn exchange_h2(
    out: &[u8],
    ubuf: &mut BytesMut,
    cluster: &Cluster,
    i: usize,
    head_only: bool,
    now: Instant,
    mut emit: impl FnMut(&httparse::Response<'_, '_>, &[u8], bool),
) -> Result<(Upstream, Resp), Fail> {
    let addr = cluster.endpoints[i].addr;
    // As on HTTP/1.1: past the cluster's idle timeout (pingora's default 60 s), not reused.
    let limit = cluster
        .settings
        .idle_timeout
        .unwrap_or(Duration::from_secs(60));
    let mut kept = take_idle(addr, now, limit);
    loop {
        let reused = kept.is_some();
        let mut up = match kept.take() {
            Some(up) => up,
            None => {
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
                Upstream {
                    addr,
                    io,
                    used: now,
                }
            }
        };
        up.used = now;
        ubuf.clear();
        let result = async {
            up.io.write_all(out).await?;
            read_response(&mut up.io, ubuf, head_only, false, &mut emit).await
        }
        .await;
        match result {
            Ok(Some(resp)) => return Ok((up, resp)),
            Ok(None) => return Err(Fail::Bad),
            // Closed by the upstream while idle: once more on a new connection.
            Err(_) if reused => {}
            Err(_) => return Err(Fail::Reset),
        }
    }
}

/// Passes the body (what is in `ubuf`, then what the upstream sends) to the stream, as
/// DATA frames; ends the stream after it. Returns the body bytes sent.
async fn body_h2(
    s: &mut HttpSession,
    up: &mut Upstream,
    ubuf: &mut BytesMut,
    framing: Framing,
) -> Result<usize, Side> {
    let mut remaining = match framing {
        Framing::Empty => return Ok(0),
        Framing::Length(n) => n,
        Framing::Chunked | Framing::Close => u64::MAX,
    };
    let mut chunks = ChunkScan::default();
    let mut sent = 0;
    let mut reads = BodyReads::new();
    loop {
        let (data, done) = match framing {
            Framing::Length(_) => {
                let take = (ubuf.len() as u64).min(remaining);
                remaining -= take;
                (ubuf.split_to(take as usize).freeze(), remaining == 0)
            }
            Framing::Chunked => {
                let mut data = BytesMut::new();
                let end = chunks.decode(ubuf, |r| data.extend_from_slice(&ubuf[r]));
                ubuf.advance(end.unwrap_or(ubuf.len()));
                if chunks.done && chunks.state != ChunkState::EndLf {
                    // Malformed chunked framing: the body cannot be told whole.
                    return Err(Side::Upstream);
                }
                (data.freeze(), chunks.done)
            }
            _ => (ubuf.split().freeze(), false),
        };
        if !data.is_empty() || done {
            sent += data.len();
            s.write_body(data, done)
                .await
                .map_err(|_| Side::Downstream)?;
        }
        if done {
            return Ok(sent);
        }
        let n = reads
            .read(&mut up.io, ubuf, framing, remaining)
            .await
            .map_err(|_| Side::Upstream)?;
        if n == 0 {
            if framing == Framing::Close {
                s.finish().map_err(|_| Side::Downstream)?;
                return Ok(sent);
            }
            return Err(Side::Upstream);
        }
    }
}

/// A local reply after failed tries, as on HTTP/1.1 (the stream, not the connection, ends).
async fn local_h2(
    s: &mut HttpSession,
    snapshot: &Snapshot,
    route: &Route,
    cluster: &Cluster,
    started: Instant,
    mut done: Done,
    what: &str,
) {
    {
        let req = s.req_header();
        tracing::warn!(
            status = done.status,
            flag = done.flags,
            method = req.method.as_str(),
            path = req.uri.path(),
            route = %route.origin,
            cluster = %cluster.name,
            tries = done.attempts.max(1),
            "{what}"
        );
    }
    let body = Bytes::from(format!("{what}\n"));
    let mut resp = match ResponseHeader::build_no_case(done.status, Some(2)) {
        Ok(r) => r,
        Err(_) => return,
    };
    let _ = resp.insert_header(header::CONTENT_TYPE, "text/plain");
    let _ = resp.insert_header(header::CONTENT_LENGTH, body.len());
    if s.write_response_header(Box::new(resp), false).is_ok() {
        let n = body.len();
        if s.write_body(body, true).await.is_ok() {
            done.sent = n;
        }
    }
    log_h2(s, snapshot, route, cluster, started, &done);
}

fn log_h2(
    s: &HttpSession,
    snapshot: &Snapshot,
    route: &Route,
    cluster: &Cluster,
    started: Instant,
    done: &Done,
) {
    // What the log reads of the request, without going through its headers again.
    let req_header = s.req_header();
    let req = Req {
        method: req_header.method.as_str(),
        path: req_header.uri.path_and_query().map_or("/", |p| p.as_str()),
        host: crate::proxy::authority(req_header),
        close: false,
        has_request_id: true,
        xff: None,
        body: s.body_bytes_read(),
    };
    let log = Log {
        snapshot,
        req: &req,
        headers: Headers::Map(&req_header.headers),
        route,
        cluster,
        started,
    };
    let Some((al, sink)) = log.observe(done) else {
        return;
    };
    let digest = s.digest();
    log.write(
        al,
        sink,
        done,
        "HTTP/2",
        digest.and_then(|d| d.socket_digest.as_deref()),
        digest.and_then(|d| d.ssl_digest.as_deref()),
        s.response_written().map(|r| Headers::Map(&r.headers)),
    );
}
