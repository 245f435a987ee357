//! An upgraded HTTP/1.1 connection (a WebSocket after its `101`) on the fast path, a
//! forward proxy's `CONNECT` tunnel (`egress::forward`) and an L4 listener's spliced
//! connection (`l4::service`): bytes both ways, as they come, until both sides have closed.
//!
//! A tunnel mostly waits (a chat, a feed, a long-lived socket of a browser tab), so what
//! it holds at rest is what counts: each direction reads into a buffer from the thread's
//! pool of head buffers only when the poll finds bytes, and gives it back once they are
//! written, as an idle keep-alive connection does (`pooled_read`). At rest a tunnel holds
//! its two sockets and its task, no buffer; pingora's cycle, which carried upgrades
//! before, held 64 KiB per tunnel (`bench/run.sh conns`, WebSocket rows).
//!
//! A direction that fills its whole buffer in one read doubles the next read, up to
//! `MAX_READ`: a bulk transfer (a download through TLS passthrough) moves in large
//! reads and writes, while a chatty one stays at one small buffer; the size falls back when
//! the direction waits.
//!
//! A side that closes (EOF) has its close passed on as a write shutdown on the other
//! side, once what it sent is written; the tunnel ends when both have, when either fails,
//! or when no byte moved either way for the idle time (Envoy's stream idle timeout).

use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};

use super::*;

/// The largest read of one direction. 1 GiB through one TCP-route connection on loopback
/// (release build, `bench/lib/tunnels.py BIN 1024 tcp-bulk`): ~1.45 GB/s with 16 KiB
/// copies, ~2.4 GB/s with reads growing to 64 KiB (bench/RESULTS.md).
const MAX_READ: usize = 64 * 1024;

/// Gives a drained buffer back: one of the pool's size to the thread's pool, a larger one
/// (grown by a bulk transfer) to the allocator, so that the pool keeps small buffers only.
fn rest(buf: BytesMut) {
    park_buf(buf, 2 * HEAD_BUF);
}

/// One direction of a tunnel.
struct Pump {
    /// Read and not yet written; no memory while the direction waits for bytes.
    buf: BytesMut,
    /// Written since the last flush.
    unflushed: bool,
    /// The source closed; `shut` once that close went on to the destination.
    eof: bool,
    shut: bool,
    /// Bytes written to the destination.
    moved: u64,
    /// How much the next read asks for.
    want: usize,
    /// Which end a read failure and a write failure are on.
    from: Side,
    to: Side,
}

impl Pump {
    fn new(first: BytesMut, from: Side, to: Side) -> Pump {
        let mut pump = Pump {
            buf: first,
            unflushed: false,
            eof: false,
            shut: false,
            moved: 0,
            want: HEAD_BUF,
            from,
            to,
        };
        if pump.buf.is_empty() {
            rest(std::mem::take(&mut pump.buf));
        }
        pump
    }

    /// Moves what `from` has to `to`: `Ready(Ok)` once `from` closed and that close was
    /// passed on, `Pending` while waiting on either.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<Result<(), Side>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if !self.buf.is_empty() {
                match Pin::new(&mut *to).poll_write(cx, &self.buf) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.buf.advance(n);
                        self.moved += n as u64;
                        self.unflushed = true;
                        continue;
                    }
                    Poll::Ready(_) => return Poll::Ready(Err(self.to)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.unflushed {
                match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(self.to)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                if !self.shut {
                    // The other side may be gone already: its own read says so.
                    let _ = std::task::ready!(Pin::new(&mut *to).poll_shutdown(cx));
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            if self.buf.capacity() == 0 {
                if let Some(pooled) = HEAD_BUFS.with_borrow_mut(Vec::pop) {
                    self.buf = pooled;
                }
            }
            // Written out: the buffer is empty, and `reserve` takes its whole allocation back.
            self.buf.reserve(self.want);
            let room = self.buf.capacity() - self.buf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *from), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => {
                    // Back to the pool now: a half-closed tunnel may wait long for the
                    // other side's close.
                    rest(std::mem::take(&mut self.buf));
                    self.eof = true;
                }
                Poll::Ready(Ok(n)) => {
                    if n >= room {
                        self.want = (self.want * 2).min(MAX_READ);
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Err(self.from)),
                Poll::Pending => {
                    rest(std::mem::take(&mut self.buf));
                    self.want = HEAD_BUF;
                    return Poll::Pending;
                }
            }
        }
    }

    /// What has happened so far, to tell whether a poll moved anything.
    fn progress(&self) -> u64 {
        self.moved + u64::from(self.eof) + u64::from(self.shut)
    }
}

/// How a tunnel went: bytes to the client and to the upstream, and how it ended (`Err`:
/// the side that failed, or went quiet for the idle time).
pub(crate) struct Tunneled {
    pub to_client: u64,
    pub to_upstream: u64,
    pub end: Result<(), Side>,
}

/// Carries bytes between `client` and `up` until both have closed (see the module doc).
/// `to_client` (the `101` head and whatever the upstream sent after it) and `to_up` (what
/// the client sent after its request) go first. With no `idle` time a quiet tunnel is
/// never closed for it (`tcp.idleTimeout: 0s`).
pub(crate) async fn run<C, U>(
    client: &mut C,
    up: &mut U,
    (to_client, to_up): (BytesMut, BytesMut),
    wait: &mut Pin<Box<tokio::time::Sleep>>,
    idle: Option<Duration>,
) -> Tunneled
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    const DOWN: Side = Side::Downstream { idle: false };
    const UP: Side = Side::Upstream { idle: false };
    let mut upward = Pump::new(to_up, DOWN, UP);
    let mut downward = Pump::new(to_client, UP, DOWN);
    if let Some(idle) = idle {
        wait.as_mut().reset(tokio::time::Instant::now() + idle);
    }
    let end = std::future::poll_fn(|cx| {
        let before = upward.progress() + downward.progress();
        let a = upward.poll(cx, &mut *client, &mut *up);
        let b = downward.poll(cx, &mut *up, &mut *client);
        match (a, b) {
            (Poll::Ready(Err(side)), _) | (_, Poll::Ready(Err(side))) => {
                return Poll::Ready(Err(side))
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ok(())),
            _ => {}
        }
        let Some(idle) = idle else {
            return Poll::Pending;
        };
        if upward.progress() + downward.progress() != before {
            wait.as_mut().reset(tokio::time::Instant::now() + idle);
        }
        match std::future::Future::poll(wait.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Err(Side::Downstream { idle: true })),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    Tunneled {
        to_client: downward.moved,
        to_upstream: upward.moved,
        end,
    }
}
