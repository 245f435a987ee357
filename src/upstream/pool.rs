//! Idle upstream connections of Portico's own codecs (HTTP/1.1 and h2 streams forwarded
//! over HTTP/1.1), kept per worker thread. Owns when a connection may be reused; never
//! decides what is sent on it.
//!
//! A connection goes back to the pool only after a response that was completely framed
//! with nothing read past its end (the codec's call), and it is handed out again only
//! when nothing has arrived on it since: an upstream that writes after a response (a body
//! after a 204, a second response, a close) has spoiled the connection, and reusing it
//! would give the next request, possibly another client's, bytes that answer nothing it
//! sent. The check is tokio's readiness, kept current by the runtime's event loop as
//! bytes or a FIN arrive (the event-driven watch pingora's pool and NGINX's keepalive
//! module do with a task or a read handler per idle connection): a connection with no
//! read event since its last empty read costs no syscall to check; one with an event is
//! read once, and anything but "would block" retires it.
//!
//! A connection that opened with a PROXY protocol header (DestinationRule
//! `proxyProtocol`) names one downstream client: it is kept under that header too, and
//! handed out only for a request that would open a connection with the same header (the
//! same client connection, cluster setting and version), never to another client.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::proxy_protocol::Header;

/// Idle connections kept per thread (the least recently used goes first). An h2 client
/// has many streams in flight at once, each needing its own HTTP/1.1 upstream connection,
/// and HTTP/1.1 clients on the thread share them too.
pub const MAX_IDLE_PER_THREAD: usize = 256;

/// An idle connection to an endpoint.
struct Idle {
    addr: SocketAddr,
    /// The PROXY header it opened with.
    proxy: Option<Header>,
    io: TcpStream,
    /// When it is too old to be used: it went idle this long ago (the cluster's
    /// `idleTimeout`).
    expires: Instant,
}

thread_local! {
    static IDLE: RefCell<VecDeque<Idle>> = const { RefCell::new(VecDeque::new()) };
}

/// Whether nothing has arrived on `io` since its last response: no bytes, no FIN, no
/// error. Bytes that arrive here are never given to anyone: the connection is dropped.
pub fn is_clean(io: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// The most recently used idle connection to `addr` that opened with PROXY header `proxy`
/// and is neither too old nor spoiled. Those met on the way that are, are closed.
pub fn take(addr: SocketAddr, proxy: Option<&Header>, now: Instant) -> Option<TcpStream> {
    IDLE.with_borrow_mut(|idle| {
        while let Some(k) = idle
            .iter()
            .rposition(|u| u.addr == addr && u.proxy.as_ref() == proxy)
        {
            let up = idle.remove(k)?;
            if now < up.expires && is_clean(&up.io) {
                return Some(up.io);
            }
        }
        None
    })
}

/// Keeps `io`, connected to `addr` (and opened with PROXY header `proxy`), for a later
/// request for at most `max_idle`. Call only after a response that ended exactly where
/// its framing said, with nothing read past it.
pub fn put(
    addr: SocketAddr,
    proxy: Option<Header>,
    io: TcpStream,
    now: Instant,
    max_idle: Duration,
) {
    IDLE.with_borrow_mut(|idle| {
        // Oldest first: drop those past their time (a quiet thread's pool otherwise keeps
        // connections the upstream has closed until they are asked for).
        while idle.front().is_some_and(|u| now >= u.expires) {
            idle.pop_front();
        }
        if idle.len() == MAX_IDLE_PER_THREAD {
            idle.pop_front();
        }
        idle.push_back(Idle {
            addr,
            proxy,
            io,
            expires: now + max_idle,
        });
    });
}

/// Idle connections on this thread (for tests).
pub fn idle_count() -> usize {
    IDLE.with_borrow(VecDeque::len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// Waits until the runtime has seen `io` become readable.
    async fn readable(io: &TcpStream) {
        tokio::time::timeout(Duration::from_secs(5), io.readable())
            .await
            .expect("readable within 5 s")
            .unwrap();
    }

    #[tokio::test]
    async fn a_connection_with_stray_bytes_or_a_close_is_never_handed_out() {
        let now = Instant::now();
        let long = Duration::from_secs(60);

        let (quiet, _quiet_peer) = pair().await;
        // A response read in full leaves the readiness flag set: still clean.
        let (mut c, mut s) = pair().await;
        s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 27];
        c.read_exact(&mut head).await.unwrap();
        assert!(is_clean(&c), "nothing arrived after the response");

        let addr = quiet.peer_addr().unwrap();
        put(addr, None, quiet, now, long);
        assert!(
            take(addr, None, now).is_some(),
            "a quiet connection is reused"
        );

        // Stray bytes after the response: never reused.
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTRAY")
            .await
            .unwrap();
        readable(&c).await;
        let addr = c.peer_addr().unwrap();
        put(addr, None, c, now, long);
        assert!(take(addr, None, now).is_none(), "stray bytes spoil it");

        // Closed by the upstream while idle: never reused.
        let (c, s) = pair().await;
        drop(s);
        readable(&c).await;
        let addr = c.peer_addr().unwrap();
        put(addr, None, c, now, long);
        assert!(take(addr, None, now).is_none(), "a closed one is dropped");
        assert_eq!(idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_opened_with_a_proxy_header_goes_only_to_that_header() {
        use crate::upstream::proxy_protocol::{ConnAddrs, Version};
        let now = Instant::now();
        let long = Duration::from_secs(60);
        let header = |port: u16, version| Header {
            version,
            addrs: Some(ConnAddrs::new(
                SocketAddr::from(([192, 0, 2, 7], port)),
                SocketAddr::from(([198, 51, 100, 1], 443)),
            )),
        };
        let (c, _s) = pair().await;
        let addr = c.peer_addr().unwrap();
        put(addr, Some(header(4000, Version::V1)), c, now, long);
        assert!(
            take(addr, None, now).is_none(),
            "not for a request without one"
        );
        assert!(
            take(addr, Some(&header(4001, Version::V1)), now).is_none(),
            "nor another client"
        );
        assert!(
            take(addr, Some(&header(4000, Version::V2)), now).is_none(),
            "nor v2"
        );
        assert!(take(addr, Some(&header(4000, Version::V1)), now).is_some());
        let (c, _s) = pair().await;
        let addr = c.peer_addr().unwrap();
        put(addr, None, c, now, long);
        assert!(take(addr, Some(&header(4000, Version::V1)), now).is_none());
        assert!(take(addr, None, now).is_some());
    }

    #[tokio::test]
    async fn idle_time_limits_reuse_and_old_connections_are_dropped_on_put() {
        let start = Instant::now();
        let limit = Duration::from_millis(100);
        let (a, _pa) = pair().await;
        let (b, _pb) = pair().await;
        let addr_a = a.peer_addr().unwrap();
        let addr_b = b.peer_addr().unwrap();
        put(addr_a, None, a, start, limit);
        assert!(take(addr_a, None, start + limit).is_none(), "too old");
        let (a, _pa2) = pair().await;
        let addr_a = a.peer_addr().unwrap();
        put(addr_a, None, a, start, limit);
        put(addr_b, None, b, start + limit, limit);
        assert_eq!(
            idle_count(),
            1,
            "the expired one went when the new one came"
        );
        assert!(take(addr_b, None, start + limit).is_some());
    }
}
