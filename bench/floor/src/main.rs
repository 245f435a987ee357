//! The floor: about the least an HTTP/1.1 keep-alive proxy on tokio has to do per request,
//! measured next to NGINX and Portico by `bench/run.sh instructions`.
//! Not a product: one upstream connection per client connection, the benchmark's route
//! (Host `bench.example.com`, prefix `/api/`) hard-wired, `x-bench: 1` added, only
//! Content-Length bodies, the upstream's response passed through unparsed past its head.
//!
//! Usage: portico-bench-floor LISTEN_ADDR UPSTREAM_ADDR
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

async fn serve(mut down: TcpStream, upstream: std::net::SocketAddr) -> std::io::Result<()> {
    down.set_nodelay(true)?;
    let mut up: Option<TcpStream> = None;
    let mut inb = Vec::with_capacity(16384);
    let mut upb = Vec::with_capacity(65536);
    let mut out = Vec::with_capacity(4096);
    loop {
        // read a request head
        let hlen = loop {
            if let Some(n) = head_end(&inb) {
                break n;
            }
            inb.reserve(4096);
            if down.read_buf(&mut inb).await? == 0 {
                return Ok(());
            }
        };
        out.clear();
        let mut routed = false;
        {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut hs);
            req.parse(&inb[..hlen])
                .map_err(|_| std::io::ErrorKind::InvalidData)?;
            let path = req.path.unwrap_or("/");
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| h.value)
                .unwrap_or(b"");
            if host == b"bench.example.com" && path.starts_with("/api/") {
                routed = true;
                out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
                out.push(b' ');
                out.extend_from_slice(path.as_bytes());
                out.extend_from_slice(b" HTTP/1.1\r\n");
                for h in req.headers.iter() {
                    out.extend_from_slice(h.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(h.value);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"x-bench: 1\r\n\r\n");
            }
        }
        inb.drain(..hlen);
        if !routed {
            down.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await?;
            continue;
        }
        if up.is_none() {
            let s = TcpStream::connect(upstream).await?;
            s.set_nodelay(true)?;
            up = Some(s);
        }
        let u = up.as_mut().unwrap();
        u.write_all(&out).await?;
        // read the response head, then Content-Length bytes
        upb.clear();
        let (rlen, clen) = loop {
            if let Some(n) = head_end(&upb) {
                let mut hs = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut hs);
                resp.parse(&upb[..n])
                    .map_err(|_| std::io::ErrorKind::InvalidData)?;
                let cl = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .unwrap_or(0);
                break (n, cl);
            }
            upb.reserve(4096);
            if u.read_buf(&mut upb).await? == 0 {
                return Ok(());
            }
        };
        while upb.len() < rlen + clen {
            upb.reserve(rlen + clen - upb.len());
            if u.read_buf(&mut upb).await? == 0 {
                return Ok(());
            }
        }
        down.write_all(&upb[..rlen + clen]).await?;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (listen, upstream): (std::net::SocketAddr, std::net::SocketAddr) = match &args[1..] {
        [l, u] => (
            l.parse().expect("LISTEN_ADDR"),
            u.parse().expect("UPSTREAM_ADDR"),
        ),
        _ => {
            eprintln!("usage: portico-bench-floor LISTEN_ADDR UPSTREAM_ADDR");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let l = TcpListener::bind(listen).await.expect("bind");
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = serve(s, upstream).await;
            });
        }
    });
}
