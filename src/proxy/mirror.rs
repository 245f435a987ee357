//! Traffic mirroring: a copy of the request goes to the mirror cluster, fire and forget.
//! The copy runs in its own task with its own timeout; the client never waits for it and
//! never sees its answer. Copies beyond a fixed number in flight are dropped. A copy goes
//! on the fast codecs' upstream connections (their pool, their reuse rules), or, to a
//! cluster only pingora's connector speaks to (TLS origination, h2c), through pingora's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora_error::Result;
use pingora_http::RequestHeader;
use tokio::sync::Semaphore;

use crate::upstream::proxy_protocol::Header;
use crate::upstream::Cluster;

/// Largest request body that is mirrored; larger bodies are not mirrored at all.
pub const MAX_MIRROR_BODY: usize = 64 * 1024;
const MAX_IN_FLIGHT: usize = 256;
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

pub struct MirrorClient {
    connector: Connector,
    in_flight: Arc<Semaphore>,
}

impl Default for MirrorClient {
    fn default() -> Self {
        MirrorClient {
            connector: Connector::new(None),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }
}

impl MirrorClient {
    /// The process's mirror client, shared by every listener and codec: one connection
    /// pool for the copies and one cap on those in flight.
    pub fn global() -> &'static Arc<MirrorClient> {
        static GLOBAL: std::sync::OnceLock<Arc<MirrorClient>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| Arc::new(MirrorClient::default()))
    }
}

/// The head of a copy made from a request's method, target and fields as received (the
/// fast codecs' raw fields; pingora's cycle copies its parsed head). `None` when they do not
/// make a valid head, which pingora's parser would have refused too.
pub fn request_head<'a>(
    method: &str,
    target: &str,
    fields: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Option<RequestHeader> {
    let mut head = RequestHeader::build(method, target.as_bytes(), None).ok()?;
    for (name, value) in fields {
        head.append_header(name.to_string(), value).ok()?;
    }
    Some(head)
}

/// `host:port` → `host-shadow:port`, as Envoy names shadow traffic.
pub fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(']') =>
        {
            format!("{h}-shadow:{p}")
        }
        _ => format!("{host}-shadow"),
    }
}

impl MirrorClient {
    /// Sends a copy of a request; `proxy` is the mirror cluster's PROXY header for the
    /// request's downstream connection (`Cluster::proxy_header`): the copy is that
    /// client's request too.
    pub fn send(
        self: &Arc<Self>,
        cluster: Arc<Cluster>,
        mut req: RequestHeader,
        body: Option<Bytes>,
        proxy: Option<Header>,
    ) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::debug!(cluster = %cluster.name, "mirror dropped: too many copies in flight");
            return;
        };
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let _ = req.insert_header(http::header::HOST, shadow_host(&host));
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(MIRROR_TIMEOUT, this.forward(&cluster, req, body, proxy))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(cluster = %cluster.name, error = %e, "mirror failed"),
                Err(_) => tracing::debug!(cluster = %cluster.name, "mirror timed out"),
            }
        });
    }

    async fn forward(
        &self,
        cluster: &Cluster,
        req: RequestHeader,
        body: Option<Bytes>,
        proxy: Option<Header>,
    ) -> std::result::Result<(), String> {
        let Some(i) = cluster.select(None, &[]) else {
            return Ok(());
        };
        if cluster.pingora_only().is_some() {
            return self
                .forward_by_pingora(cluster, i, req, body, proxy)
                .await
                .map_err(|e| e.to_string());
        }
        let out = wire(req, body.as_deref());
        crate::protocol::fast::exchange_unread(cluster, i, proxy, &out)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// A copy to a cluster only pingora's connector speaks to (TLS origination, h2c).
    async fn forward_by_pingora(
        &self,
        cluster: &Cluster,
        i: usize,
        req: RequestHeader,
        body: Option<Bytes>,
        proxy: Option<Header>,
    ) -> Result<()> {
        let peer = cluster.peer(i, Some(MIRROR_TIMEOUT), proxy);
        let (mut session, _reused) = self.connector.get_http_session(&peer).await?;
        session.write_request_header(Box::new(req)).await?;
        if let Some(body) = body {
            session.write_request_body(body, true).await?;
        }
        session.finish_request_body().await?;
        session.read_response_header().await?;
        while session.read_response_body().await?.is_some() {}
        self.connector
            .release_http_session(session, &peer, peer.options.idle_timeout)
            .await;
        Ok(())
    }
}

/// A copy's bytes as they go upstream on HTTP/1.1: its head as pingora writes one (the
/// fields' case kept), its body whole with its length (whatever framing the client's had).
fn wire(mut req: RequestHeader, body: Option<&[u8]>) -> Vec<u8> {
    req.remove_header(&http::header::CONTENT_LENGTH);
    req.remove_header(&http::header::TRANSFER_ENCODING);
    if let Some(b) = body {
        let _ = req.insert_header(http::header::CONTENT_LENGTH, b.len());
    }
    let mut out = Vec::with_capacity(1024 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.raw_path());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    req.header_to_h1_wire(&mut out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::shadow_host;

    #[test]
    fn shadow_names() {
        assert_eq!(shadow_host("httpbin:8000"), "httpbin-shadow:8000");
        assert_eq!(shadow_host("a.example.com"), "a.example.com-shadow");
    }
}
