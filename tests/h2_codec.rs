//! The vendored h2 codec (vendor/h2), which both of Portico's codecs serve HTTP/2 with:
//! what Portico relies on it for beyond the protocol itself, over real loopback sockets.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A socket that counts the writes made on it: each is one `write`/`writev` system call.
struct CountedWrites {
    io: TcpStream,
    writes: Arc<AtomicUsize>,
}

impl CountedWrites {
    fn count(&self, done: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = done {
            if *n > 0 {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl AsyncRead for CountedWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.io).poll_write(cx, buf);
        self.count(&done);
        done
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.count(&done);
        done
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

const STREAMS: usize = 100;

/// The body of stream `i`: `len` bytes, each stream's different.
fn body(i: usize, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|j| b'a' + ((i * 7 + j) % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Serves `STREAMS` streams at once, each answered with `len` bytes, and returns the
/// number of writes the server made and the bodies the client received (in stream order).
async fn answer_streams_together(len: usize) -> (usize, Vec<Bytes>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let writes = Arc::new(AtomicUsize::new(0));

    let counted = writes.clone();
    let server = tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        io.set_nodelay(true).unwrap();
        let io = CountedWrites {
            io,
            writes: counted,
        };
        let mut conn = h2::server::handshake(io).await.unwrap();
        // Every stream's answer is queued before the connection is polled again, as on a
        // proxy whose upstreams answered in the same turn of the event loop.
        let mut waiting = Vec::new();
        while waiting.len() < STREAMS {
            let (req, respond) = conn.accept().await.unwrap().unwrap();
            let i: usize = req.uri().path()[1..].parse().unwrap();
            waiting.push((i, respond));
        }
        for (i, mut respond) in waiting {
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(body(i, len), true).unwrap();
        }
        // The client closes the connection once it has every body.
        while let Some(next) = conn.accept().await {
            next.unwrap();
        }
    });

    let io = TcpStream::connect(addr).await.unwrap();
    // Windows large enough for every answer at once: flow control does not split the
    // answers into rounds.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut responses = Vec::new();
    for i in 0..STREAMS {
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://h2.test/{i}"))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(req, true).unwrap();
        responses.push(response);
    }
    let mut bodies = Vec::new();
    for response in responses {
        let mut body = response.await.unwrap().into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        bodies.push(Bytes::from(got));
    }
    drop(client);
    server.await.unwrap();
    conn.abort();
    (writes.load(Ordering::Relaxed), bodies)
}

/// A DATA frame at or above the codec's chain threshold (256 bytes) used to be written
/// alone, with a flush behind it: one write system call (and over TLS one record) per
/// response, where HAProxy and NGINX write their buffer once for many. The vendored codec
/// copies payloads of up to 4 KiB into its 16 KiB write buffer while they fit.
#[tokio::test]
async fn small_answers_of_many_streams_share_their_writes() {
    let (writes, bodies) = answer_streams_together(1024).await;
    for (i, got) in bodies.iter().enumerate() {
        assert_eq!(got, &body(i, 1024), "stream {i}");
    }
    // 100 answers of 1 KiB and their heads are ~105 KiB: 7 full buffers; the
    // handshake's SETTINGS and their acknowledgements add a few writes.
    assert!(
        writes <= 20,
        "{writes} writes for {STREAMS} answers of 1 KiB (one per answer before the change)"
    );
}

/// Payloads too large to copy still go out whole and in order.
#[tokio::test]
async fn large_answers_of_many_streams_arrive_whole() {
    let (writes, bodies) = answer_streams_together(40 * 1024).await;
    for (i, got) in bodies.iter().enumerate() {
        assert_eq!(got, &body(i, 40 * 1024), "stream {i}");
    }
    // Frames above 4 KiB are not copied: each is written from its own buffer, so every
    // answer's three frames (16, 16 and 8 KiB) take a write of their own.
    assert!(writes >= 3 * STREAMS, "{writes} writes");
}
