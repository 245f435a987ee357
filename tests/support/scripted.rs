//! An HTTP/1.1 upstream that misbehaves on command, for the hostile-input suite: the first
//! segment of the request path says how to answer, and every request is recorded as the
//! bytes that arrived (head and body), so a test can say what the upstream received.
//!
//! | path | answer |
//! |---|---|
//! | `/ok/...` | 200, body = the path the upstream saw |
//! | `/echo/...` | 200, body = the whole request as received |
//! | `/stray204/...` | 204, then 100 ms later a second response nobody asked for |
//! | `/stray304/...` | the same after a 304 |
//! | `/headbody/...` | to HEAD: 200 with `content-length: 4` and then 4 body bytes anyway |
//! | `/short/...` | 200 with `content-length: 100`, 10 bytes, close |
//! | `/long/...` | 200 with `content-length: 5`, then 10 bytes |
//! | `/reset/...` | closes without answering |
//! | `/badchunk/...` | 200 chunked with a bad chunk size after a good chunk |
//! | `/clte/...` | 200 with both `content-length` and `transfer-encoding: chunked` |
//! | `/info/...` | `100 Continue`, then 200 |
//! | `/garbage/...` | a status line that is not HTTP |
//! | `/hugehead/...` | a 200 whose head is 128 KiB |
//! | `/large/...` | 200 with `content-length`, body = [`large_body`] (4 MiB) |
//! | `/fail/...` | 503 |
//! | `/slow/<ms>/...` | waits, then 200 |
//! | `/never/...` | reads the request and never answers |
//! | `/cookie/...` | 200 with a `set-cookie: upstream=1; Path=/` of its own, body = the path |
//! | `/upgrade/...` | to a request with `Upgrade`: 101, then echoes every byte until the close |
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Header lines as received (name, value), in order.
    pub headers: Vec<(String, String)>,
    /// The head and body bytes exactly as they arrived.
    pub raw: Vec<u8>,
    pub body: Vec<u8>,
    /// Which upstream connection (1-based) carried it.
    pub connection: usize,
}

impl Received {
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Received>>,
    connections: AtomicUsize,
    stop: AtomicBool,
}

pub struct Scripted {
    port: u16,
    state: Arc<State>,
}

impl Scripted {
    pub fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted upstream");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let n = st.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let st = st.clone();
                thread::spawn(move || serve(conn, n, &st));
            }
        });
        Scripted { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests received for paths starting with `prefix`.
    pub fn received_for(&self, prefix: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path.starts_with(prefix))
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request (as received on connection `connection`); `None` at a close.
fn read_request(r: &mut BufReader<TcpStream>, connection: usize) -> Option<Received> {
    let mut raw = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(line.as_bytes());
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?.to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            line.clear();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            raw.extend_from_slice(line.as_bytes());
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line).ok()? == 0 {
                        return None;
                    }
                    raw.extend_from_slice(line.as_bytes());
                    if line == "\r\n" {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk).ok()?;
            raw.extend_from_slice(&chunk);
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut b = vec![0u8; n];
        r.read_exact(&mut b).ok()?;
        raw.extend_from_slice(&b);
        body = b;
    }
    Some(Received {
        method,
        path,
        headers,
        raw,
        body,
        connection,
    })
}

fn serve(conn: TcpStream, n: usize, st: &State) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    while let Some(received) = read_request(&mut r, n) {
        st.requests.lock().unwrap().push(received.clone());
        let upgrade = received
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("upgrade"));
        let Received {
            method, path, raw, ..
        } = received;
        let kind = path.split('/').nth(1).unwrap_or("");
        let ok = |w: &mut TcpStream, body: &[u8]| {
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = w.write_all(head.as_bytes());
            if method != "HEAD" {
                let _ = w.write_all(body);
            }
        };
        match kind {
            "echo" => ok(&mut w, &raw),
            "stray204" | "stray304" => {
                let status = if kind == "stray204" {
                    "204 No Content"
                } else {
                    "304 Not Modified"
                };
                let _ = w.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes());
                thread::sleep(Duration::from_millis(100));
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTRAY");
            }
            "headbody" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nBODY");
            }
            "short" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789");
                return;
            }
            "long" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloEXTRA");
            }
            "reset" => return,
            "badchunk" => {
                let _ = w.write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
                );
                return;
            }
            "clte" => {
                let _ = w.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                );
                return;
            }
            "info" => {
                let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                ok(&mut w, path.as_bytes());
            }
            "garbage" => {
                let _ = w.write_all(b"NOT HTTP AT ALL\r\n\r\n");
                return;
            }
            "hugehead" => {
                let filler = "x".repeat(128 * 1024);
                let _ = w.write_all(
                    format!("HTTP/1.1 200 OK\r\nx-filler: {filler}\r\ncontent-length: 2\r\n\r\nok")
                        .as_bytes(),
                );
            }
            "fail" => {
                let _ = w.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nfail",
                );
            }
            "large" => {
                let body = large_body();
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let _ = w.write_all(head.as_bytes());
                let _ = w.write_all(&body);
            }
            "slow" => {
                let ms: u64 = path
                    .split('/')
                    .nth(2)
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(100);
                thread::sleep(Duration::from_millis(ms));
                ok(&mut w, path.as_bytes());
            }
            "cookie" => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nset-cookie: upstream=1; Path=/\r\ncontent-length: {}\r\n\r\n",
                    path.len()
                );
                let _ = w.write_all(head.as_bytes());
                if method != "HEAD" {
                    let _ = w.write_all(path.as_bytes());
                }
            }
            "never" => {
                thread::sleep(Duration::from_secs(30));
                return;
            }
            "upgrade" if upgrade => {
                let _ = w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                );
                // The tunnel: bytes back as they come (what the reader holds first), until
                // the other side closes; then this side closes too.
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = w.shutdown(std::net::Shutdown::Both);
                return;
            }
            _ => ok(&mut w, path.as_bytes()),
        }
        let _ = w.flush();
    }
}

/// The body `/large/...` answers with: 4 MiB, byte `i` is `i % 251`.
pub fn large_body() -> Vec<u8> {
    (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect()
}
