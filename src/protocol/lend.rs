//! A client connection lent to pingora's request cycle for one request. Never decides
//! anything about the request: it gives out exactly the bytes of the request the front
//! framed, and the plan the front made for it, if it made one ([`Handover`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::h1::ChunkScan;
use crate::proxy::request::OwnedPlan;
use crate::snapshot::Snapshot;
use crate::telemetry::trace::SpanContext;

/// A request a fast codec planned and policed but cannot carry out (a destination with
/// TLS origination or h2c, a full connection pool, an h2 answer with a request body to
/// read), handed to pingora's request cycle with what was decided: the cycle carries out
/// this plan, under the snapshot it was made with, and neither plans nor counts the
/// request again (its random draws, its request id and its span are the front's).
pub struct Handover {
    pub snapshot: Arc<Snapshot>,
    /// When the front started the request (its log line's `start_time` and `duration`).
    pub started: std::time::Instant,
    /// The `x-request-id` the front made for a request that had none, when the head
    /// pingora reads does not carry it yet (HTTP/1.1: pingora parses the client's bytes).
    pub request_id: Option<[u8; 36]>,
    pub span: Option<SpanContext>,
    pub plan: OwnedPlan,
}

tokio::task_local! {
    /// The hand-over of the request pingora's cycle is serving on this task. Pingora's
    /// `process_new_http` makes the request's context itself (`ProxyHttp::new_ctx`, no
    /// argument), so the plan rides with the task that awaits the cycle, and
    /// `request_filter` takes it.
    static HANDOVER: std::cell::RefCell<Option<Box<Handover>>>;
}

/// Runs pingora's cycle (`cycle`, serving one lent request) with `handover` for its
/// `request_filter` to take ([`take_handover`]).
pub async fn with_handover<F: std::future::Future>(
    handover: Option<Box<Handover>>,
    cycle: F,
) -> F::Output {
    match handover {
        None => cycle.await,
        Some(h) => {
            HANDOVER
                .scope(std::cell::RefCell::new(Some(h)), cycle)
                .await
        }
    }
}

/// The plan a fast codec handed over with the request being served, once.
pub fn take_handover() -> Option<Box<Handover>> {
    HANDOVER.try_with(|h| h.borrow_mut().take()).ok().flatten()
}

/// The client connection lent to pingora's request cycle for one request: the bytes the
/// front read come first, and reads stop at the end of that request, so pingora never
/// reads into the next one (it would drop a pipelined request, and the front reads the
/// next head anyway once pingora hands the connection back).
#[derive(Debug)]
pub struct Lent {
    pub inner: Stream,
    /// Read from the client and not given out yet: this request's bytes first, then
    /// whatever followed it.
    pub buf: BytesMut,
    /// What pingora may still read of this request.
    pub left: Left,
    /// The body's framing was broken: the connection is not reused.
    pub spoiled: bool,
    /// The connection closes after this request (`maxConnectionDuration`): pingora's cycle
    /// answers with `Connection: close`.
    pub close_after: bool,
}

impl Lent {
    /// The lent connection under pingora's session `stream`, if it is one.
    pub fn of(stream: &Stream) -> Option<&Lent> {
        stream.as_any().downcast_ref::<Lent>()
    }
}

#[derive(Debug)]
pub enum Left {
    /// Bytes (head and body with a length); 0 when the request was read whole.
    Bytes(u64),
    /// `head` bytes of head, then a chunked body up to where `scan` finds its end.
    Chunked { head: usize, scan: ChunkScan },
    /// Everything (an upgrade, h2c): the connection stays pingora's.
    All,
}

/// At most this much of what follows a lent request is read ahead while pingora waits
/// on the request's end (it reads to notice a client that went away).
const MAX_READ_AHEAD: usize = 64 * 1024;

impl Lent {
    /// How many of the next `available` buffered bytes belong to the request, updating
    /// what is left.
    fn take(&mut self, available: usize) -> usize {
        match &mut self.left {
            Left::All => available,
            Left::Bytes(n) => {
                let k = (*n).min(available as u64) as usize;
                *n -= k as u64;
                k
            }
            Left::Chunked { head, scan } => {
                if *head > 0 {
                    let k = (*head).min(available);
                    *head -= k;
                    return k;
                }
                let (k, bad) = match scan.scan(&self.buf[..available]) {
                    None => return available,
                    // Broken framing: pingora gets the bad byte too, to refuse it.
                    Some(end) if scan.bad => ((end + 1).min(available), true),
                    Some(end) => (end, false),
                };
                self.spoiled |= bad;
                self.left = Left::Bytes(0);
                k
            }
        }
    }

    pub fn complete(&self) -> bool {
        matches!(self.left, Left::Bytes(0))
    }
}

impl AsyncRead for Lent {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.complete() {
            // The request was read whole: keep what follows for the front, and tell
            // pingora only whether the client went away.
            loop {
                if this.buf.len() >= MAX_READ_AHEAD {
                    return Poll::Pending;
                }
                this.buf.reserve(4096);
                let mut tmp = [0u8; 4096];
                let mut rb = ReadBuf::new(&mut tmp);
                match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(())) => this.buf.extend_from_slice(rb.filled()),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        if this.buf.is_empty() {
            // Nothing buffered: read from the client into the buffer, then give out what
            // belongs to the request.
            this.buf.reserve(16 * 1024);
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.buf.extend_from_slice(rb.filled()),
                other => return other,
            }
        }
        let available = this.buf.len().min(out.remaining());
        let k = this.take(available);
        out.put_slice(&this.buf[..k]);
        this.buf.advance(k);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Lent {
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
impl Shutdown for Lent {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Lent {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Lent {
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

impl GetTimingDigest for Lent {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Lent {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Lent {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Lent {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.buf.len() >= buf.len() {
            buf.copy_from_slice(&self.buf[..buf.len()]);
            return Ok(true);
        }
        Ok(false)
    }
}
