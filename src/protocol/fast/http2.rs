//! HTTP/2 on the fast path: the h2 connections of an HTTPS listener.
//!
//! pingora drives the connection (handshake, frames, flow control, HPACK: the `h2` crate)
//! and hands over each stream as a session; what pingora would then run per stream, its
//! whole proxy cycle with an upstream session from its pool, costs several times the CPU
//! of the forwarding itself (`bench/RESULTS.md`, h2). Here a stream the fast path can serve
//! (the same rules as for HTTP/1.1: no body, a route that only forwards) is forwarded by
//! Portico over HTTP/1.1 on an upstream connection from a per-thread pool; any other stream
//! goes to pingora's cycle as before, alone (its siblings stay here).

use std::net::IpAddr;

use bytes::BufMut;
use http::header;
use pingora::protocols::http::v2::server::{
    default_h2_options, handshake, H2Accept, H2Options, HttpSession,
};
use pingora::protocols::Digest;
use pingora_http::{RequestHeader, ResponseHeader};

use super::*;

/// The stream's connection's client and local address, for a PROXY header upstream.
fn conn_addrs(s: &HttpSession) -> Option<ConnAddrs> {
    ConnAddrs::of(s.digest().and_then(|d| d.socket_digest.as_deref()))
}

/// Response body bytes an h2 stream may have queued in the connection, not yet written
/// to the socket. h2's default is 400 KiB per stream: a client that opens its 128 streams
/// with large windows and then reads slowly held 50 MiB of one connection's answers in
/// memory, and a 100-stream download of 100 KiB answers (`bench/run.sh`'s h2-100k) raised
/// the process's peak RSS 2.4 times NGINX's. Two 16 KiB frames per stream keep the socket
/// fed (the connection writes the streams' frames in turn) while a stream that is not
/// read waits for its window, not in memory. NGINX holds a stream to its `proxy_buffers`
/// (8 x 4 KiB) the same way.
const H2_SEND_BUFFER: usize = 32 * 1024;

/// The h2 settings of every HTTP/2 connection Portico serves, its own codec's and
/// pingora's cycle's (pingora's bounded defaults, and the send buffer above).
pub(crate) fn options() -> H2Options {
    let mut options = default_h2_options();
    options.max_send_buffer_size(H2_SEND_BUFFER);
    options
}

/// Rejected (malformed) streams after which a connection is closed, as pingora's own
/// accept loop does.
const MAX_MALFORMED_STREAMS: usize = 32;

/// The streams of an h2 connection in progress, and when the last one ended (or the
/// connection started).
struct StreamCount {
    active: std::sync::atomic::AtomicUsize,
    last_end: std::sync::Mutex<Instant>,
}

impl StreamCount {
    fn new() -> StreamCount {
        StreamCount {
            active: std::sync::atomic::AtomicUsize::new(0),
            last_end: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Since when the connection has had no stream in progress; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        if self.active.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.last_end.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A stream in progress; dropping it ends it.
struct StreamOpen(Arc<StreamCount>);

impl StreamOpen {
    fn new(count: &Arc<StreamCount>) -> StreamOpen {
        count
            .active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        StreamOpen(count.clone())
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl HttpFront {
    /// Serves an h2 connection until the client is done with it.
    pub(crate) async fn serve_h2(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) {
        let client_ip = crate::listener::peer_ip(&io);
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
        // A connection with no stream for `idleTimeout`, or older than
        // `maxConnectionDuration`, is sent a GOAWAY (its streams in progress finish).
        let limits = self.snapshots.load().settings.downstream.clone();
        let born = tokio::time::Instant::now();
        let streams = Arc::new(StreamCount::new());
        let mut idle = Box::pin(tokio::time::sleep(limits.idle_timeout));
        let old_at = limits.max_connection_duration.map(|d| born + d);
        let mut old = Box::pin(tokio::time::sleep_until(old_at.unwrap_or(born)));
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
                    _ = idle.as_mut() => {
                        match streams.idle_since() {
                            Some(since) if since.elapsed() >= limits.idle_timeout => {
                                conn.graceful_shutdown();
                                closing = true;
                            }
                            Some(since) => idle.as_mut().reset((since + limits.idle_timeout).into()),
                            None => idle
                                .as_mut()
                                .reset(tokio::time::Instant::now() + limits.idle_timeout),
                        }
                        continue;
                    }
                    _ = old.as_mut(), if old_at.is_some() => {
                        conn.graceful_shutdown();
                        closing = true;
                        continue;
                    }
                }
            };
            match accepted {
                Ok(Some(H2Accept::Session(session))) => {
                    let app = self.clone();
                    let shutdown = shutdown.clone();
                    let open = StreamOpen::new(&streams);
                    // Boxed: the stream's future is a few KiB, and tokio moves a future it
                    // spawns (and the task's stage when it ends) by value, a copy each time;
                    // behind a box those moves are of a pointer.
                    let stream = async move {
                        app.h2_stream(session, client_ip, shutdown).await;
                        drop(open);
                    };
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
        if let Some((reason, handover)) = self.forward_h2(&mut s, client_ip).await {
            Metrics::global()
                .fast_path_handoffs
                .with_label_values(&[reason])
                .inc();
            let cycle = self
                .http
                .process_new_http(ServerSession::new_http2(s), &shutdown);
            crate::protocol::lend::with_handover(handover, cycle).await;
        }
    }

    /// Forwards one stream; `Some(why)` when it is left to pingora (nothing sent yet).
    async fn forward_h2(
        &self,
        s: &mut HttpSession,
        client_ip: Option<IpAddr>,
    ) -> Option<(&'static str, Option<Box<Handover>>)> {
        let started = Instant::now();
        let snapshot = self.snapshots.load_full();
        let Some(listener) = snapshot.listeners.get(self.listener) else {
            return Some(("route", None));
        };
        // The request id first: a route may match on it, on every codec.
        if !s.req_header().headers.contains_key("x-request-id") {
            let id = request_id();
            let _ = s.req_header_mut().insert_header("x-request-id", &id[..]);
        }
        let peer =
            crate::tls::client_auth::TlsConn::of(s.digest().and_then(|d| d.ssl_digest.as_deref()))
                .and_then(|t| t.peer.clone());
        let req = s.req_header();
        let settings = &snapshot.settings;
        let span = settings
            .tracing
            .as_ref()
            .map(|t| trace::start(&req.headers, t.sampling));
        let sl = StreamLog {
            snapshot: &snapshot,
            started,
            span: span.as_ref(),
            client_ip,
            principal: None,
        };
        // A path that does not normalize gets pingora's reply (the same check there).
        // (`?` would be wrong in here: `None` means served.)
        let Ok(path) = settings.path_normalization.apply(req.uri.path()) else {
            return Some(("request", None));
        };
        let Some(q) = eligible_h2(req, &path) else {
            return Some(("request", None));
        };
        if q.body == 0 && !s.is_body_empty() {
            // A body without a length.
            return Some(("request", None));
        }
        let digest = s.digest();
        let headers = Headers::Map(&req.headers);
        let view = RequestView {
            method: q.method,
            path: q.path,
            query: q.query,
            authority: q.host,
            scheme: "https",
            headers,
            port: listener.addr.port(),
            client_ip: request::remote_address(settings.num_trusted_proxies, client_ip, headers),
            peer_ip: client_ip,
            sni: crate::tls::client_auth::TlsConn::of(digest.and_then(|d| d.ssl_digest.as_deref()))
                .and_then(|t| t.sni.as_deref()),
            peer_principal: peer.as_deref().and_then(|p| p.principal()),
            peer: peer.as_deref(),
        };
        let host = normalize_host(q.host);
        let planned = request::plan(listener, &host, &view);
        // What this codec cannot carry (as on HTTP/1.1, and an answer with a body to read
        // first) is handed to pingora's cycle with its plan, once the policies have
        // counted it.
        let (mut lend, mut lend_answer) = (None, false);
        let _admission = match planned.plan() {
            request::Plan::Answer(_) if q.body > 0 || !s.is_body_empty() => {
                (lend, lend_answer) = (Some("route"), true);
                None
            }
            plan => carried(plan).unwrap_or_else(|why| {
                lend = Some(why);
                None
            }),
        };
        // Boxed only for a route with policies: their state is KiBs that every request's
        // future would carry otherwise.
        let policed = match planned.policies() {
            request::Policies::None(plan) => plan,
            request::Policies::Apply(planned) => Box::pin(planned.police(&view)).await,
        };
        // A forward the policies refused is answered here whatever was to be lent.
        let lent = match &policed {
            request::Plan::Answer(_) => lend.filter(|_| lend_answer),
            request::Plan::Forward(_) => lend,
        };
        if let Some(reason) = lent {
            let handover = Handover {
                snapshot: snapshot.clone(),
                started,
                // Already among the fields (made before routing).
                request_id: None,
                span,
                plan: policed.into(),
            };
            return Some((reason, Some(Box::new(handover))));
        }
        let f = match policed {
            request::Plan::Answer(a) => {
                // (A refused forward with a body unread: the answer ends the stream, and
                // the client stops sending it, RFC 9113 8.1.)
                answer_h2(s, &sl, &a).await;
                return None;
            }
            request::Plan::Forward(f) => f,
        };
        let sl = StreamLog {
            principal: f.principal.as_deref(),
            ..sl
        };
        let (route, forward) = (f.route, f.forward);
        let destination = &forward.destinations[f.destination];
        let cluster = &destination.cluster;
        let added = f.response_additions();
        if let Some(d) = f.delay {
            tokio::time::sleep(d).await;
        }
        let rewritten = f.rewritten_target(q.path, q.query);
        let authority = request::rewritten_authority(forward);
        let head_only = req.method == http::Method::HEAD;
        let idempotent = retry::idempotent(q.method);
        let body_len = q.body;
        let target = match &rewritten {
            Some(t) => Target::Whole(t),
            None => Target::Parts(q.path, q.query),
        };
        let mut out = upstream_head(
            req,
            target,
            &request::Forwarding {
                scheme: b"https",
                client_ip,
                // Already among the fields (made before routing).
                request_id: None,
                host: authority.map(http::HeaderValue::as_bytes),
                ops: [&route.headers.request, &destination.headers.request],
                upgrade: false,
                span: span.as_ref(),
                client_cert: request::ClientCert {
                    mode: settings.forward_client_cert,
                    peer: peer.as_deref(),
                },
                auth: f.auth.as_deref(),
            },
        );
        // A path normalization changed: the log shows the normalized one, as elsewhere.
        let normalized = match &path {
            std::borrow::Cow::Owned(_) => q
                .query
                .map_or_else(|| path.to_string(), |query| format!("{path}?{query}")),
            std::borrow::Cow::Borrowed(_) => String::new(),
        };
        if let Ok(uri) = normalized.parse::<http::Uri>() {
            s.req_header_mut().set_uri(uri);
        }
        let body_timeout = settings.downstream.request_body_timeout;
        let mut mirrors = f.mirrors().peekable();
        // Boxed: a head is ~350 bytes that a request without mirrors would carry too.
        let mirror_head = mirrors
            .peek()
            .is_some()
            .then(|| Box::new(s.req_header().clone()));
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
            let whole = tokio::time::timeout(body_timeout, read)
                .await
                .ok()
                .flatten();
            if whole.is_none() || out.len() - start != body_len {
                // The client reset the stream or stalled: nothing went upstream.
                s.shutdown();
                return None;
            }
        }
        if let Some(head) = mirror_head {
            // The copies: the request as received (its head as pingora parsed it, as on
            // pingora's cycle), its whole body (read above).
            let body = (body_len > 0).then(|| Bytes::copy_from_slice(&out[out.len() - body_len..]));
            for cluster in mirrors {
                let proxy = cluster.proxy_header(|| conn_addrs(s));
                let head = (*head).clone();
                MirrorClient::global().send(cluster.clone(), head, body.clone(), proxy);
            }
        }
        // The PROXY header of the destination's new connections (and its pool key).
        let proxy = cluster.proxy_header(|| conn_addrs(s));

        // Tries: as the route's retries and the shared resend rule allow.
        let mut tried = Vec::new();
        let mut tries = Tries::new(forward);
        let stream_idle = snapshot.settings.downstream.stream_idle_timeout;
        let mut wait = Box::pin(tokio::time::sleep(stream_idle));
        let mut wait_for;
        // What `read_response` reserves before its first read: less would make that reserve
        // reallocate, copying the whole old block, once per stream.
        let mut ubuf = BytesMut::with_capacity(HEAD_READ);
        let ops = [&route.headers.response, &destination.headers.response];
        let mut head = None;
        let (up, resp, i, inflight) = loop {
            let Some(w) = tries.wait(stream_idle) else {
                let done = Done::local(504, Flag::UpstreamRequestTimeout, None, tries.made);
                let what = Flag::UpstreamRequestTimeout.reply_text();
                Box::pin(local_h2(s, &sl, route, cluster, done, what)).await;
                return None;
            };
            wait_for = w;
            let (i, pooled) = match tries.resend_to.take() {
                Some(i) => (i, false),
                None => match cluster.select(f.hash, &tried) {
                    Some(i) => (i, true),
                    None => {
                        let done = Done::local(503, Flag::NoHealthyUpstream, None, tries.made);
                        let what = Flag::NoHealthyUpstream.reply_text();
                        Box::pin(local_h2(s, &sl, route, cluster, done, what)).await;
                        return None;
                    }
                },
            };
            tried.push(i);
            tries.made += 1;
            let inflight = InFlight::new(cluster.clone(), i);
            let emit = |r: &httparse::Response<'_, '_>, raw: &[u8], _close: bool| {
                head = response_head(r, raw, ops, &added);
            };
            let ex = Exchange {
                cluster,
                i,
                proxy,
                pooled,
                head_only,
                upgrade: false,
                ops,
                added: &added,
                client_close: false,
                wait: wait_for,
            };
            match exchange_h2(&out, &mut ubuf, &ex, &mut wait, emit).await {
                Ok((up, resp)) => {
                    if tries.again_on(resp.status, forward, cluster).await {
                        // Nothing of it went to the client: its upstream connection
                        // closes with the body unread, and the next try begins.
                        drop(up);
                        cluster.record(i, Some(resp.status), Some(inflight.started.elapsed()));
                        continue;
                    }
                    break (up, resp, i, inflight);
                }
                Err(fail) => match tries.after(fail, forward, cluster, i, idempotent).await {
                    None => continue,
                    Some((done, what)) => {
                        Box::pin(local_h2(s, &sl, route, cluster, done, what)).await;
                        return None;
                    }
                },
            }
        };
        let mut done = tries.answered(&f, cluster, i, resp.status, &inflight);
        let Some(head) = head else {
            // A 101, or a field HTTP/2 cannot carry: nothing went to the client yet.
            let done = Done::local(
                502,
                Flag::UpstreamProtocolError,
                done.upstream_host,
                tries.made,
            );
            let what = "upstream sent a response HTTP/2 cannot carry";
            Box::pin(local_h2(s, &sl, route, cluster, done, what)).await;
            return None;
        };
        let end = resp.framing == Framing::Empty;
        // Only an access-log format that shows response fields reads the written head
        // back: otherwise its fields move into the h2 response, not a copy of them.
        let written = if record::wants_response_headers(sl.snapshot) {
            s.write_response_header(Box::new(head), end)
        } else {
            s.write_response_header_fields_moved(Box::new(head), end)
        };
        let result = match written {
            Ok(()) => {
                let release = (cluster.as_ref(), resp.upstream_close);
                let mut up = Some(up);
                body_h2(
                    s,
                    &mut up,
                    &mut ubuf,
                    resp.framing,
                    (&mut wait, wait_for),
                    release,
                    &mut done.sent,
                )
                .await
            }
            Err(_) => Err(Side::Downstream { idle: false }),
        };
        drop(inflight);
        if let Err(side) = result {
            if let Side::Upstream { .. } = side {
                cluster.record(i, None, None);
            }
            // Part of a response may have gone out: the client must not take it as
            // whole, so the stream is reset (an h2 stream has no other way to say it).
            s.shutdown();
            done.flags = tries.flag(&side);
        }
        log_h2(s, &sl, Some(route), Some(cluster), &done);
        None
    }
}

/// What the fast path takes from an h2 request header, when it can serve it; `path` is
/// its normalized path.
fn eligible_h2<'r>(req: &'r RequestHeader, path: &'r str) -> Option<Req<'r>> {
    let method = req.method.as_str();
    if !matches!(
        method,
        "GET" | "HEAD" | "DELETE" | "OPTIONS" | "POST" | "PUT" | "PATCH"
    ) {
        return None;
    }
    let query = req.uri.query();
    if !path.bytes().all(uri_char) || !query.is_none_or(|q| q.bytes().all(uri_char)) {
        return None;
    }
    let host = crate::proxy::authority(req);
    if !check::valid_authority(host) {
        return None;
    }
    let mut r = Req {
        method,
        path,
        query,
        host,
        close: false,
        has_request_id: true,
        body: 0,
        upgrade: false,
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
            || (*name == header::CONTENT_TYPE && value.as_bytes().starts_with(b"application/grpc"))
        {
            return None;
        }
    }
    Some(r)
}

/// The request target the upstream gets: the (normalized) path and query, or a rewrite's.
enum Target<'a> {
    Parts(&'a str, Option<&'a str>),
    Whole(&'a str),
}

/// Answers the stream with the request core's answer `a` and logs it.
async fn answer_h2(s: &mut HttpSession, sl: &StreamLog<'_>, a: &request::Answer) {
    if let Some(d) = a.delay {
        tokio::time::sleep(d).await;
    }
    let Ok(head) = ResponseHeader::build_no_case(a.status, Some(6)) else {
        return;
    };
    let mut head = crate::proxy::ResponseFields(head);
    request::answer_fields(a, &mut head);
    let head_only = a.body.is_empty() || s.req_header().method == http::Method::HEAD;
    let mut sent = 0;
    if s.write_response_header(Box::new(head.0), head_only).is_ok()
        && !head_only
        && s.write_body(a.body.clone(), true).await.is_ok()
    {
        sent = a.body.len();
    }
    let done = Done {
        status: a.status,
        flags: a.flag,
        details: a.details,
        sent,
        tunneled: 0,
        upstream_time: None,
        upstream_host: None,
        attempts: 0,
    };
    let sl = StreamLog {
        principal: a.principal.as_deref(),
        ..*sl
    };
    log_h2(s, &sl, a.route.as_deref(), a.cluster(), &done);
}

/// The HTTP/1.1 request head for the upstream, as pingora's path would write it: `Host`
/// from `:authority`, cookies on one line (RFC 9113 8.2.3), then as on HTTP/1.1, with the
/// core's `forwarding` edits. `path` is the normalized path.
fn upstream_head(
    req: &RequestHeader,
    target: Target<'_>,
    forwarding: &request::Forwarding<'_>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    match target {
        Target::Whole(t) => out.extend_from_slice(t.as_bytes()),
        Target::Parts(path, query) => {
            out.extend_from_slice(path.as_bytes());
            if let Some(q) = query {
                out.push(b'?');
                out.extend_from_slice(q.as_bytes());
            }
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The client's fields as an HTTP/1.1 request carries them: Host from `:authority`
    // (first), cookie fields on one line, joined with "; " (RFC 9113 8.2.3).
    let from_authority = (!req.headers.contains_key(header::HOST))
        .then(|| req.uri.authority())
        .flatten()
        .map(|a| ("host", a.as_str().as_bytes()));
    let mut cookies = req.headers.get_all(header::COOKIE).iter();
    let first = cookies.next();
    let joined: Option<Vec<u8>> = match (first, cookies.next()) {
        (Some(a), Some(b)) => {
            let mut j = a.as_bytes().to_vec();
            for c in std::iter::once(b).chain(cookies) {
                j.extend_from_slice(b"; ");
                j.extend_from_slice(c.as_bytes());
            }
            Some(j)
        }
        _ => None,
    };
    let cookie = match (&joined, first) {
        (Some(j), _) => Some(("cookie", j.as_slice())),
        (None, Some(c)) => Some(("cookie", c.as_bytes())),
        (None, None) => None,
    };
    let client = || {
        from_authority
            .into_iter()
            .chain(
                req.headers
                    .iter()
                    .filter(|(n, _)| **n != header::COOKIE)
                    .map(|(n, v)| (n.as_str(), v.as_bytes())),
            )
            .chain(cookie)
    };
    request::upstream_request_headers(client, forwarding, &mut out);
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
    added: &request::ResponseAdditions,
) -> Option<ResponseHeader> {
    let status = r.code?;
    if status < 200 {
        return None;
    }
    let mut h = ResponseHeader::build_no_case(status, Some(r.headers.len() + 2)).ok()?;
    // Names and values share one copy of the head: a value of its own each would be an
    // allocation, and another when pingora keeps a copy of the header for a log line
    // that shows response fields.
    // pingora parses a name given as bytes into a `HeaderName` once; given a `HeaderName`
    // it would look up its title case (copying a name it does not know) and parse again.
    let block = Bytes::copy_from_slice(raw);
    let base = raw.as_ptr() as usize;
    // httparse's names and values are slices of `raw`.
    let part = |s: &[u8]| {
        let at = (s.as_ptr() as usize).checked_sub(base)?;
        (at + s.len() <= block.len()).then(|| block.slice(at..at + s.len()))
    };
    let two_framings = has_two_framings(r.headers);
    for x in r.headers.iter() {
        if dropped_response_header(x.name)
            || x.name.eq_ignore_ascii_case("transfer-encoding")
            || (two_framings && x.name.eq_ignore_ascii_case("content-length"))
        {
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
    if !added.is_empty() {
        added.write(&mut crate::proxy::ReplaceFields(&mut h));
    }
    Some(h)
}

/// Sends `out` to endpoint `ex.i` (on a clean pooled connection when there is one) and
/// reads the response head into `ubuf`, handing it to `emit`.
async fn exchange_h2(
    out: &[u8],
    ubuf: &mut BytesMut,
    ex: &Exchange<'_>,
    wait: &mut Pin<Box<tokio::time::Sleep>>,
    mut emit: impl FnMut(&httparse::Response<'_, '_>, &[u8], bool),
) -> Result<(Upstream, Resp), TryFailure> {
    let addr = ex.cluster.endpoints[ex.i].addr;
    let mut up = 'open: {
        if let Some(up) = ex.pooled_upstream(addr) {
            break 'open up;
        }
        Upstream::connect(addr, ex.cluster, ex.proxy)
            .await
            .map_err(|_| TryFailure::Connect)?
    };
    ubuf.clear();
    let head_only = ex.head_only;
    let io = async {
        up.send(out, ex.cluster).await?;
        read_response(&mut up.io, ubuf, (head_only, false), false, &mut emit).await
    };
    let result = timed(wait, ex.wait, io).await;
    let stale = up.pooled && ubuf.is_empty();
    exchanged(result, stale).map(|resp| (up, resp))
}

/// Passes the body (what is in `ubuf`, then what the upstream sends) to the stream, as
/// DATA frames, each read and write within `idle`; ends the stream after it. `sent` counts
/// the body bytes given to the stream, also when it fails part way.
///
/// The upstream is read only as far as the stream has room: the client's flow-control
/// window and `H2_SEND_BUFFER` bound what the connection queues, and each read asks for no
/// more than that, so a stream holds at most its queued frames, never a read waiting for
/// room besides them (the rest waits in the upstream socket, as with NGINX's
/// `proxy_buffers`). Reading first and waiting after held up to 16 KiB more per stream.
async fn body_h2(
    s: &mut HttpSession,
    up: &mut Option<Upstream>,
    ubuf: &mut BytesMut,
    framing: Framing,
    (wait, idle): (&mut Pin<Box<tokio::time::Sleep>>, Duration),
    (cluster, upstream_close): (&Cluster, bool),
    sent: &mut usize,
) -> Result<(), Side> {
    // Back to the pool as soon as the body was read whole, before the last frame goes
    // out (the client may open its next stream the moment it arrives).
    let release = |up: &mut Option<Upstream>, extra: bool| {
        if let Some(u) = up.take() {
            u.release(cluster, extra, upstream_close || framing == Framing::Close);
        }
    };
    if framing == Framing::Empty {
        // The head ended the stream.
        release(up, !ubuf.is_empty());
        return Ok(());
    }
    // The stream's DATA side, taken from the session (pingora's `write_body` reserves
    // room for what it is given, and the room has to be known before the read).
    let Some(mut w) = s.take_response_body_writer() else {
        return Err(Side::Downstream { idle: false });
    };
    let chunked = framing == Framing::Chunked;
    let mut walk = BodyWalk::new(framing);
    loop {
        // A chunked body's data is copied out of its framing; any other is its bytes.
        let mut decoded = BytesMut::new();
        let (take, done) = walk.step(ubuf, |r| {
            if chunked {
                decoded.extend_from_slice(&ubuf[r]);
            }
        });
        if walk.broken() {
            // Malformed chunked framing: the body cannot be told whole.
            return Err(Side::Upstream { idle: false });
        }
        let data = if chunked {
            ubuf.advance(take);
            decoded.freeze()
        } else {
            ubuf.split_to(take).freeze()
        };
        if done {
            release(up, !ubuf.is_empty());
        }
        if !data.is_empty() || done {
            send_data(&mut w, data, done, (wait, idle), sent).await?;
        }
        if done {
            return Ok(());
        }
        let Some(u) = up.as_mut() else {
            return Err(Side::Upstream { idle: false });
        };
        let room = room(&mut w, MIN_READ, (wait, idle)).await?;
        ubuf.reserve(room);
        let n = timed(wait, idle, u.io.read_buf(&mut (&mut *ubuf).limit(room)))
            .await
            .ok_or(Side::Upstream { idle: true })?
            .map_err(|_| Side::Upstream { idle: false })?;
        if n == 0 {
            if framing == Framing::Close {
                send_data(&mut w, Bytes::new(), true, (wait, idle), sent).await?;
                return Ok(());
            }
            return Err(Side::Upstream { idle: false });
        }
    }
}

/// Room in stream `w`'s send buffer for up to `want` more bytes: waits until there is
/// some (the client's window and `H2_SEND_BUFFER` allow it), no longer than `idle` (a
/// client that stops reading holds the stream only this long). An error when the stream
/// can take no more (the client reset it, or the connection failed).
async fn room(
    w: &mut h2::SendStream<Bytes>,
    want: usize,
    (wait, idle): (&mut Pin<Box<tokio::time::Sleep>>, Duration),
) -> Result<usize, Side> {
    w.reserve_capacity(want);
    let wait_for_room = async {
        loop {
            // `poll_capacity` answers only when the room grew since it last answered:
            // room that is there already is taken without asking it.
            let room = w.capacity();
            if room > 0 {
                return Some(room);
            }
            std::future::poll_fn(|cx| w.poll_capacity(cx)).await?.ok()?;
        }
    };
    timed(wait, idle, wait_for_room)
        .await
        .ok_or(Side::Downstream { idle: true })?
        .ok_or(Side::Downstream { idle: false })
}

/// Sends `data` on stream `w` as its room allows (each wait for room within `idle`);
/// `end` ends the stream with the last piece. `sent` counts what was given to the stream.
async fn send_data(
    w: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    (wait, idle): (&mut Pin<Box<tokio::time::Sleep>>, Duration),
    sent: &mut usize,
) -> Result<(), Side> {
    if data.is_empty() {
        // An empty frame needs no room: it only ends the stream.
        if end {
            w.send_data(data, true)
                .map_err(|_| Side::Downstream { idle: false })?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        let room = room(w, data.len(), (&mut *wait, idle)).await?;
        let piece = data.split_to(room.min(data.len()));
        let n = piece.len();
        w.send_data(piece, end && data.is_empty())
            .map_err(|_| Side::Downstream { idle: false })?;
        *sent += n;
    }
    Ok(())
}

/// A local reply after failed tries, as on HTTP/1.1 (the stream, not the connection, ends).
async fn local_h2(
    s: &mut HttpSession,
    sl: &StreamLog<'_>,
    route: &Route,
    cluster: &Cluster,
    mut done: Done,
    what: &str,
) {
    {
        let req = s.req_header();
        tracing::warn!(
            status = done.status,
            flag = %done.flags,
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
    log_h2(s, sl, Some(route), Some(cluster), &done);
}

/// What an h2 stream's log line, metrics and span need besides the session.
#[derive(Clone, Copy)]
struct StreamLog<'a> {
    snapshot: &'a Snapshot,
    started: Instant,
    span: Option<&'a SpanContext>,
    client_ip: Option<IpAddr>,
    /// The verified JWT's principal.
    principal: Option<&'a str>,
}

fn log_h2(
    s: &HttpSession,
    sl: &StreamLog<'_>,
    route: Option<&Route>,
    cluster: Option<&Cluster>,
    done: &Done,
) {
    // What the log reads of the request, without going through its headers again.
    let req_header = s.req_header();
    let req = Req {
        method: req_header.method.as_str(),
        path: req_header.uri.path_and_query().map_or("/", |p| p.as_str()),
        query: None,
        host: crate::proxy::authority(req_header),
        close: false,
        has_request_id: true,
        body: s.body_bytes_read(),
        upgrade: false,
    };
    let log = Log {
        snapshot: sl.snapshot,
        req: &req,
        headers: Headers::Map(&req_header.headers),
        route,
        cluster,
        started: sl.started,
        span: sl.span,
        request_id: None,
        tls: true,
        client_ip: sl.client_ip,
        principal: sl.principal,
    };
    let digest = s.digest();
    log.outcome(
        done,
        "HTTP/2",
        digest.and_then(|d| d.socket_digest.as_deref()),
        digest.and_then(|d| d.ssl_digest.as_deref()),
        s.response_written().map(|r| Headers::Map(&r.headers)),
    )
    .finish(Some(sl.snapshot));
}
