//! The forward proxy of egress servers: absolute-form requests (`GET http://host/x`, what
//! clients send with `HTTP_PROXY`) and `CONNECT host:port` tunnels (`HTTPS_PROXY`).
//!
//! pingora answers CONNECT with 405 and has no tunnel API, so an egress listener runs
//! [`ForwardProxy`]: it peeks at the first bytes of each request on a connection, handles a
//! `CONNECT` itself and hands everything else to the usual HTTP proxy, where absolute-form
//! requests are decided with [`http_target`]. Listeners that are not egress servers never
//! see this code.
//!
//! An open tunnel is not touched by a reload: it carries bytes until either side closes,
//! and on shutdown it gets the drain period like any connection. A new tunnel or request is
//! decided by the Snapshot in force when it starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use http::header;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora_http::RequestHeader;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Kind;
use crate::protocol::fast::tunnel;
use crate::proxy::RequestCycle;
use crate::snapshot::Snapshot;
use crate::telemetry::access_log;
use crate::telemetry::outcome::{Details, Flag};

/// How long a kept-alive connection may sit idle before its next request.
const IDLE: Duration = Duration::from_secs(60);
/// How long a client has to send the CONNECT request head, and its largest size.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 16 * 1024;

/// Whether the request target is in absolute form (`http://host/x`). pingora keeps such a
/// target verbatim in `raw_path()` and only its path in the URI.
pub fn is_absolute_form(req: &RequestHeader) -> bool {
    !matches!(req.raw_path().first(), Some(b'/' | b'*') | None)
}

/// The absolute-form target of a request, parsed.
fn absolute_uri(req: &RequestHeader) -> Option<http::Uri> {
    if !is_absolute_form(req) {
        return None;
    }
    http::Uri::try_from(req.raw_path()).ok()
}

/// The destination (lower-case host, port) of an absolute-form HTTP/1 request, or `None`
/// for an origin-form one. `Err` names what is wrong with it.
pub fn http_target(req: &RequestHeader) -> Option<Result<(String, u16), &'static str>> {
    if !is_absolute_form(req) {
        return None;
    }
    let Some(uri) = absolute_uri(req) else {
        return Some(Err("the request target is not a valid absolute URI"));
    };
    let Some(authority) = uri.authority() else {
        return Some(Err("absolute-form request without a host"));
    };
    let port = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => authority.port_u16().unwrap_or(80),
        Some("https") => {
            return Some(Err(
                "absolute-form https:// requests are not proxied: use CONNECT (HTTPS_PROXY)",
            ))
        }
        _ => return Some(Err("absolute-form requests must use http://")),
    };
    let host = authority.host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Some(Err("absolute-form request without a host"));
    }
    Some(Ok((host.to_ascii_lowercase(), port)))
}

/// Turns a proxied absolute-form request into what an origin server expects: origin-form
/// target, a Host header, and no proxy-only headers.
pub fn to_origin_form(upstream: &mut RequestHeader) -> pingora_error::Result<()> {
    if let Some(uri) = absolute_uri(upstream) {
        if let Some(a) = uri.authority() {
            if !upstream.headers.contains_key(header::HOST) {
                upstream.insert_header(header::HOST, a.as_str())?;
            }
        }
    }
    // pingora sends a verbatim target as it came; setting the URI (which holds the path
    // and query only) makes it send origin-form.
    let uri = upstream.uri.clone();
    upstream.set_uri(uri);
    upstream.remove_header("proxy-connection");
    upstream.remove_header(&header::PROXY_AUTHORIZATION);
    Ok(())
}

/// The log line of a refused destination: the host, the port and the rule.
pub fn log_denied(host: &str, port: u16, kind: Kind, rule: &str, client: Option<SocketAddr>) {
    tracing::warn!(
        host,
        port,
        kind = kind.as_str(),
        rule,
        client = client.map(|c| c.to_string()).unwrap_or_default(),
        "egress denied"
    );
}

/// The text of a refusal.
pub fn denied_body(host: &str, port: u16, rule: &str) -> String {
    format!("egress to {host}:{port} denied: {rule}\n")
}

/// An egress listener's app: CONNECT tunnels here, all other requests through Portico's
/// HTTP/1.1 front to pingora's cycle (`http`), which decides absolute-form requests by the
/// egress registry.
pub struct ForwardProxy {
    pub front: Arc<crate::protocol::fast::HttpFront>,
    pub http: Arc<HttpProxy<RequestCycle>>,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
}

#[async_trait]
impl ServerApp for ForwardProxy {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // In a task of its own, not pingora's per-connection one (see `listener::own_task`):
        // a tunnel can live for hours.
        let app = self.clone();
        let shutdown = shutdown.clone();
        crate::listener::own_task(async move { app.serve(io, &shutdown).await });
        None
    }

    async fn cleanup(&self) {
        self.http.cleanup().await;
    }
}

impl ForwardProxy {
    /// Serves a connection to its end.
    async fn serve(&self, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let (_slot, mut io) = crate::listener::accept(
            &self.front.connections,
            &self.snapshots,
            self.front.listener,
            io,
        )
        .await?;
        // Peeked bytes stay in the stream for whoever reads next. A connection that opens
        // with a CONNECT is a tunnel; any other is HTTP, whose later requests the front
        // reads (a CONNECT among them gets pingora's 405).
        let mut first = [0u8; 8];
        match tokio::time::timeout(IDLE, io.try_peek(&mut first)).await {
            Ok(Ok(true)) if &first == b"CONNECT " => {
                self.connect(io).await;
                None
            }
            Ok(Ok(_)) => {
                // A stream handed back is this connection still (not admitted again).
                // Boxed: the HTTP front's connection future is KiBs that every tunnel's
                // task would carry for its whole life otherwise.
                loop {
                    io = Box::pin(self.front.serve_connection(io, shutdown)).await?;
                }
            }
            // Idle too long, or closed before a request.
            _ => None,
        }
    }
}

/// A CONNECT request head: the target and any bytes the client sent after it.
struct ConnectHead {
    host: String,
    port: u16,
    rest: Vec<u8>,
}

fn client_of(io: &Stream) -> Option<SocketAddr> {
    io.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied())
}

async fn reply(io: &mut Stream, status: &str, body: &str) {
    let text = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(text.as_bytes()).await;
    let _ = io.flush().await;
    let _ = io.shutdown().await;
}

async fn read_head(io: &mut Stream) -> Result<Vec<u8>, &'static str> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|_| "read error before the end of the request head")?;
        if n == 0 {
            return Err("closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large");
        }
    }
}

/// Parses `CONNECT host:port HTTP/1.1`; the port is required (RFC 9110 §9.3.6).
fn parse_connect(buf: Vec<u8>) -> Result<ConnectHead, &'static str> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of head")?
        + 4;
    let line_end = buf.windows(2).position(|w| w == b"\r\n").unwrap_or(end);
    let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| "request line is not text")?;
    let mut parts = line.split(' ');
    let (Some("CONNECT"), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed CONNECT request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("CONNECT needs HTTP/1.x");
    }
    let (host, port) = target
        .rsplit_once(':')
        .ok_or("CONNECT target needs host:port")?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or("CONNECT target port is not 1-65535")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err("CONNECT target without a host");
    }
    Ok(ConnectHead {
        host,
        port,
        rest: buf[end..].to_vec(),
    })
}

/// What became of one CONNECT, for its access log line.
#[derive(Default)]
struct TunnelOutcome {
    authority: String,
    status: u16,
    details: Details,
    flags: Flag,
    upstream: Option<SocketAddr>,
    cluster: Option<String>,
    /// Client to upstream, upstream to client.
    bytes: (u64, u64),
}

impl ForwardProxy {
    /// One CONNECT: decided, tunnelled or refused, then one access log line.
    async fn connect(&self, mut io: Stream) {
        let start = SystemTime::now();
        let started = Instant::now();
        let client = client_of(&io);
        let local = io
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let format = self
            .snapshots
            .load()
            .settings
            .access_log
            .as_ref()
            .map(|a| a.format.clone());
        let mut out = TunnelOutcome::default();
        self.tunnel(&mut io, client, &mut out).await;
        let (Some(format), Some(sink)) = (format, access_log::Sink::get()) else {
            return;
        };
        let no_headers = http::HeaderMap::new();
        sink.log(
            &format,
            &access_log::Entry {
                start,
                method: "CONNECT",
                path: &out.authority,
                query: None,
                protocol: "HTTP/1.1",
                status: out.status,
                flags: out.flags.as_str(),
                details: out.details.as_str(),
                bytes_received: out.bytes.0 as usize,
                bytes_sent: out.bytes.1 as usize,
                duration: started.elapsed(),
                upstream_time: None,
                request_headers: access_log::Headers::Map(&no_headers),
                response_headers: None,
                authority: &out.authority,
                upstream_host: out.upstream,
                upstream_cluster: out.cluster.as_deref(),
                downstream_local: local,
                downstream_remote: client,
                sni: None,
                peer: None,
                request_principal: None,
                upstream_transport_failure: None,
                route_name: None,
                attempts: u32::from(out.upstream.is_some()),
            },
        );
    }

    async fn tunnel(&self, io: &mut Stream, client: Option<SocketAddr>, out: &mut TunnelOutcome) {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(io)).await {
            Ok(Ok(buf)) => parse_connect(buf),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("timed out reading the CONNECT request"),
        };
        let head = match head {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(
                    client = client.map(|c| c.to_string()).unwrap_or_default(),
                    error = e,
                    "bad CONNECT request"
                );
                (out.status, out.flags, out.details) =
                    (400, Flag::DownstreamProtocolError, Details::BadRequest);
                reply(io, "400 Bad Request", &format!("{e}\n")).await;
                return;
            }
        };
        let (host, port) = (head.host.as_str(), head.port);
        out.authority = format!("{host}:{port}");
        let snapshot = self.snapshots.load_full();
        let target = match snapshot.egress.decide(host, port, Kind::Connect) {
            Ok(t) => t,
            Err(d) => {
                log_denied(host, port, Kind::Connect, &d.rule, client);
                (out.status, out.details) = (403, Details::EgressDenied);
                reply(io, "403 Forbidden", &denied_body(host, port, &d.rule)).await;
                return;
            }
        };
        out.cluster = Some(target.cluster().to_string());
        let addr = match target.address(&snapshot.egress).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(host, port, kind = "connect", cluster = target.cluster(), error = %e, "egress upstream unresolved");
                (out.status, out.flags, out.details) =
                    (503, Flag::NoHealthyUpstream, Details::NoHealthyUpstream);
                reply(io, "503 Service Unavailable", &format!("{e}\n")).await;
                return;
            }
        };
        out.upstream = Some(addr);
        // The host's DestinationRule: `tcp.maxConnections` bounds its open tunnels (a full
        // pool refuses at once, as on a TCP route), and its connect timeout and TCP
        // keep-alive apply to the upstream connection (the connector of every route).
        let _admission = match target.port().map(|p| p.limits.try_admit()) {
            Some(None) => {
                tracing::warn!(
                    host,
                    port,
                    cluster = target.cluster(),
                    "egress tunnel: connection pool full"
                );
                (out.status, out.flags, out.details) =
                    (503, Flag::UpstreamOverflow, Details::UpstreamOverflow);
                reply(
                    io,
                    "503 Service Unavailable",
                    "upstream connection pool full\n",
                )
                .await;
                return;
            }
            admitted => admitted.flatten(),
        };
        let settings = target.settings(snapshot.settings.connect_timeout);
        // A tunnel is a stream: Envoy's stream idle timeout holds for it too.
        let idle = snapshot.settings.downstream.stream_idle_timeout;
        // The tunnel may outlive many reloads; it must not keep an old Snapshot alive.
        drop(target);
        drop(snapshot);
        let connected = crate::upstream::connect::connect(addr, &settings, None).await;
        drop(settings);
        let mut upstream = match connected {
            Ok(s) => s,
            Err(e) => {
                let error = e.to_string();
                tracing::warn!(host, port, upstream = %addr, error, "egress tunnel: upstream connect failed");
                (out.status, out.flags, out.details) = (
                    503,
                    Flag::UpstreamConnectFailure,
                    Details::UpstreamConnectFailure,
                );
                reply(io, "503 Service Unavailable", "upstream connect error\n").await;
                return;
            }
        };
        out.status = 200;
        out.details = Details::Tunnel;
        if io
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_err()
            || io.flush().await.is_err()
        {
            out.flags = Flag::DownstreamConnectionTermination;
            return;
        }
        // The relay of the fast path's WebSocket tunnels: each direction holds a buffer
        // only while bytes move (copy_bidirectional kept 8 KiB each way for the tunnel's
        // life), and a tunnel quiet both ways for the idle time ends (`SI`). What the
        // client sent after its CONNECT head goes first.
        let early = BytesMut::from(&head.rest[..]);
        let mut wait = Box::pin(tokio::time::sleep(idle));
        let t = tunnel::run(
            io,
            &mut upstream,
            (BytesMut::new(), early),
            &mut wait,
            Some(idle),
        )
        .await;
        out.bytes = (t.to_upstream, t.to_client);
        if let Err(side) = t.end {
            out.flags = side.flag();
            tracing::debug!(
                host,
                port,
                flags = out.flags.as_str(),
                "egress tunnel ended early"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_head_is_parsed() {
        let h =
            parse_connect(b"CONNECT API.Example.com:443 HTTP/1.1\r\nHost: x\r\n\r\nHELLO".to_vec())
                .unwrap();
        assert_eq!((h.host.as_str(), h.port), ("api.example.com", 443));
        assert_eq!(h.rest, b"HELLO");
        let v6 = parse_connect(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n".to_vec()).unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        assert!(parse_connect(b"CONNECT example.com HTTP/1.1\r\n\r\n".to_vec()).is_err());
        assert!(parse_connect(b"CONNECT example.com:0 HTTP/1.1\r\n\r\n".to_vec()).is_err());
        assert!(parse_connect(b"CONNECT a:1 b HTTP/1.1\r\n\r\n".to_vec()).is_err());
    }

    #[test]
    fn absolute_form_targets() {
        let req = RequestHeader::build("GET", b"http://Api.Example.com:8080/x?y=1", None).unwrap();
        let (h, p) = http_target(&req).unwrap().unwrap();
        assert_eq!((h.as_str(), p), ("api.example.com", 8080));
        let req = RequestHeader::build("GET", b"http://plain.test/", None).unwrap();
        assert_eq!(http_target(&req).unwrap().unwrap().1, 80);
        let req = RequestHeader::build("GET", b"/origin-form", None).unwrap();
        assert!(http_target(&req).is_none());
        let req = RequestHeader::build("GET", b"https://x.test/", None).unwrap();
        assert!(http_target(&req).unwrap().is_err());

        let mut req = RequestHeader::build("GET", b"http://plain.test:81/a?b", None).unwrap();
        req.insert_header("proxy-connection", "keep-alive").unwrap();
        to_origin_form(&mut req).unwrap();
        assert_eq!(req.raw_path(), b"/a?b");
        assert_eq!(req.headers.get("host").unwrap(), "plain.test:81");
        assert!(req.headers.get("proxy-connection").is_none());
    }
}
