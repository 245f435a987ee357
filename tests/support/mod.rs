//! Shared harness for Portico's integration tests: a real gateway process, real HTTP/1.1
//! upstreams, a small blocking HTTP/1.1 client (plain and TLS) and certificate helpers.
//! Everything talks to 127.0.0.1 only.
//!
//! Each test file does `mod support;` and uses what it needs, so most items are unused in
//! some test crate.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub mod dns;
pub mod redis_server;
pub mod scripted;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

/// The gateway binary under test.
pub const PORTICO: &str = env!("CARGO_BIN_EXE_portico");

/// How long `Portico::start` waits for `GET /ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Ports and small utilities
// ---------------------------------------------------------------------------------------------

/// A port on 127.0.0.1 that was free a moment ago, for a listener the gateway will open.
///
/// Ports come from 20000-32767, below Linux's ephemeral range (32768-60999): ports the
/// kernel hands to echo servers and client sockets can then never take a port a test
/// reserved for the gateway between the check and the gateway's bind. Each test binary
/// walks its own pid-seeded sequence, and a port handed out is never handed out again.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<Mutex<(u32, HashSet<u16>)>> = OnceLock::new();
    let state =
        NEXT.get_or_init(|| Mutex::new((std::process::id().wrapping_mul(7919), HashSet::new())));
    let mut state = state.lock().unwrap();
    for _ in 0..1000 {
        state.0 = state.0.wrapping_add(4099);
        let port = 20000 + (state.0 % 12768) as u16;
        if state.1.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            state.1.insert(port);
            return port;
        }
    }
    panic!("could not find a free port");
}

/// Poll `f` every 20 ms until it returns true or `timeout` passes. Returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Write a file atomically: write `<path>.tmp` (a name no include glob `*.toml` matches),
/// then rename it over `path`, so a poller never sees a half-written file.
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    let mut tmp_name = path.file_name().expect("file name").to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f =
            fs::File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        f.write_all(contents.as_ref())
            .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        f.sync_all().ok();
    }
    fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
}

/// 1-based number of the only line of `text` that contains `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected exactly one line containing {needle:?} in:\n{text}"
    );
    hits[0]
}

/// Replace `@KEY@` placeholders, then expand `@to(SUBSET)@` into a one-destination route to
/// `svc.internal` (see [`upstreams_config`]). Templates use placeholders instead of `format!`
/// so TOML's inline-table braces need no escaping.
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut text = template.to_string();
    for (key, value) in vars {
        text = text.replace(&format!("@{key}@"), value);
    }
    let re = regex::Regex::new(r"@to\(([A-Za-z0-9_-]+)\)@").unwrap();
    let text = re
        .replace_all(&text, |caps: &regex::Captures<'_>| route_to(&caps[1]))
        .into_owned();
    let leftover = regex::Regex::new(r"@[A-Za-z0-9_()-]+@").unwrap();
    assert!(
        !leftover.is_match(&text),
        "unexpanded placeholder in config:\n{text}"
    );
    text
}

/// `route = [...]` with one destination: subset `subset` of `svc.internal`, port 80.
pub fn route_to(subset: &str) -> String {
    format!(
        "route = [{{ destination = {{ host = \"svc.internal\", subset = \"{subset}\", port = {{ number = 80 }} }} }}]"
    )
}

/// A `[mesh]` table for tests: admin on 127.0.0.1:`admin_port`, fast polling, quick drain.
pub fn mesh_config(admin_port: u16) -> String {
    format!(
        "[mesh]\nadmin = \"127.0.0.1:{admin_port}\"\nreloadPollInterval = \"50ms\"\ndrainDuration = \"1s\"\n"
    )
}

/// A DestinationRule and a STATIC ServiceEntry for host `svc.internal` (port 80, named `http`):
/// one endpoint on 127.0.0.1 per `(name, port)`, labelled `version = name`, and one subset per
/// name selecting it.
pub fn upstreams_config(upstreams: &[(&str, u16)]) -> String {
    let mut subsets = String::new();
    let mut endpoints = String::new();
    for (name, port) in upstreams {
        subsets.push_str(&format!(
            "  {{ name = \"{name}\", labels = {{ version = \"{name}\" }} }},\n"
        ));
        endpoints.push_str(&format!(
            "  {{ address = \"127.0.0.1\", ports = {{ http = {port} }}, labels = {{ version = \"{name}\" }} }},\n"
        ));
    }
    format!(
        r#"
[[destinationRules]]
name = "svc"
host = "svc.internal"
subsets = [
{subsets}]

[[serviceEntries]]
name = "svc"
hosts = ["svc.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [
{endpoints}]
"#
    )
}

/// Whether the gateways these tests start run the fast path: `PORTICO_NO_FAST_PATH` in the
/// environment of `cargo test` (read as clap reads the flag's variable) turns it off in
/// every gateway they spawn, and the fast path's own counts are then all 0.
pub fn fast_path_on() -> bool {
    match std::env::var("PORTICO_NO_FAST_PATH") {
        Ok(v) => {
            ["", "0", "false", "f", "no", "n", "off"].contains(&v.to_ascii_lowercase().as_str())
        }
        Err(_) => true,
    }
}

/// Sum of the values of every sample of metric `name` whose label set contains `label`
/// (e.g. `result="failure"`; pass "" for any). None if no such sample exists.
pub fn metric_sum(metrics_text: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for line in metrics_text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            match rest.split_once('}') {
                Some((labels, value)) => (labels, value),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // a longer metric name with the same prefix
        };
        if !labels.contains(label) {
            continue;
        }
        let value: f64 = match value.split_whitespace().next().and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => continue,
        };
        found = Some(found.unwrap_or(0.0) + value);
    }
    found
}

/// Asserts that `hits` of `n` independent trials fit probability `p`: within 5 standard
/// deviations of `n·p`, so a right split fails this about once in 1.7 million runs.
pub fn assert_binomial(hits: usize, n: usize, p: f64, what: &str) {
    let (mean, sd) = binomial(n, p);
    assert!(
        (hits as f64 - mean).abs() <= 5.0 * sd,
        "{what}: {hits} of {n}, expected {mean:.0} ± {:.0} (5 standard deviations)",
        5.0 * sd
    );
}

/// Whether `n` trials are enough for [`assert_binomial`] with `p` to catch `wrong`: its band
/// around `n·p` ends at least 5 of `wrong`'s standard deviations away from `n·wrong`, so a
/// split of `wrong` passes about once in 3.5 million runs. Tests assert this of the wrong
/// weight they must notice, so the sample size says what it can tell apart.
pub fn binomial_tells_apart(n: usize, p: f64, wrong: f64) -> bool {
    let (mean, sd) = binomial(n, p);
    let (wrong_mean, wrong_sd) = binomial(n, wrong);
    (mean - wrong_mean).abs() - 5.0 * sd >= 5.0 * wrong_sd
}

fn binomial(n: usize, p: f64) -> (f64, f64) {
    let n = n as f64;
    (n * p, (n * p * (1.0 - p)).sqrt())
}

/// Run `portico ARGS...` to completion (10 s limit). Returns (exit code, stdout + stderr).
pub fn run_cli(args: &[&str]) -> (i32, String) {
    run_cli_env(args, &[])
}

/// [`run_cli`] with extra environment variables for the process.
pub fn run_cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut child = Command::new(PORTICO)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {PORTICO}: {e}"));
    // Drain the pipes in threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`portico {}` did not exit within 10 s", args.join(" "));
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    let output = Output {
        status,
        stdout,
        stderr,
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

// ---------------------------------------------------------------------------------------------
// Echo upstream
// ---------------------------------------------------------------------------------------------

/// A real HTTP/1.1 upstream on 127.0.0.1 (keep-alive, Content-Length and chunked request
/// bodies). Answers 200 with `x-upstream: NAME` and a JSON body
/// `{"upstream", "method", "path", "headers", "body"}`; `/status/NNN` answers NNN and
/// `/sleep/MS` waits MS milliseconds first.
pub struct Echo {
    name: String,
    port: u16,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    state: Arc<EchoState>,
}

/// What an [`Echo`] saw, and how it misbehaves on request.
///
/// Besides `/status/NNN` and `/sleep/MS`: `/flaky/N/KEY` answers 503 to the first N requests
/// for KEY and 200 after; `/slowfirst/MS/KEY` waits MS before answering the first request
/// for KEY only; [`Echo::set_fail_status`] makes every answer that status.
#[derive(Default)]
pub struct EchoState {
    connections: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    fail_status: std::sync::atomic::AtomicU16,
    seen: std::sync::Mutex<HashMap<String, usize>>,
    /// `(method, path, host)` of every request, in arrival order.
    log: std::sync::Mutex<Vec<(String, String, String)>>,
}

impl Echo {
    pub fn start(name: &str) -> Echo {
        Self::start_on(name, "127.0.0.1:0")
    }

    /// An echo on a given address (e.g. `127.0.0.2:PORT`, another loopback address).
    pub fn start_on(name: &str, addr: &str) -> Echo {
        let listener = TcpListener::bind(addr).expect("echo bind");
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(EchoState::default());
        {
            let name = name.to_string();
            let count = count.clone();
            let stop = stop.clone();
            let state = state.clone();
            thread::Builder::new()
                .name(format!("echo-{name}"))
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let name = name.clone();
                        let count = count.clone();
                        let state = state.clone();
                        let _ = thread::Builder::new()
                            .name(format!("echo-{name}-conn"))
                            .spawn(move || echo_connection(conn, &name, &count, &state));
                    }
                })
                .expect("spawn echo thread");
        }
        Echo {
            name: name.to_string(),
            port,
            count,
            stop,
            state,
        }
    }

    /// Every answer gets this status from now on (0 = behave normally).
    pub fn set_fail_status(&self, status: u16) {
        self.state.fail_status.store(status, Ordering::SeqCst);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The most requests this upstream was handling at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_active.load(Ordering::SeqCst)
    }

    /// `(method, path, host)` of every request so far.
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests answered so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn reset_count(&self) {
        self.count.store(0, Ordering::SeqCst);
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_millis(200),
        );
    }
}

/// Decrements the in-flight count when a request's answer is done.
struct Active<'a>(&'a EchoState);

impl<'a> Active<'a> {
    fn enter(state: &'a EchoState) -> Self {
        let now = state.active.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_active.fetch_max(now, Ordering::SeqCst);
        Active(state)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many requests for `key` came before this one.
fn seen_before(state: &EchoState, key: &str) -> usize {
    let mut seen = state.seen.lock().unwrap();
    let n = seen.entry(key.to_string()).or_insert(0);
    *n += 1;
    *n - 1
}

fn echo_connection(stream: TcpStream, name: &str, count: &AtomicUsize, state: &EchoState) {
    state.connections.fetch_add(1, Ordering::SeqCst);
    let _ = stream.set_nodelay(true);
    let mut writer = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let (start, headers) = match read_head(&mut reader) {
            Ok(Some(head)) => head,
            _ => return,
        };
        let mut parts = start.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let version = parts.next().unwrap_or("HTTP/1.1").to_string();
        let body = match read_body(&mut reader, &headers, false) {
            Ok(b) => b,
            Err(_) => return,
        };
        count.fetch_add(1, Ordering::SeqCst);
        let _active = Active::enter(state);
        state.log.lock().unwrap().push((
            method.clone(),
            target.clone(),
            header_value(&headers, "host")
                .unwrap_or_default()
                .to_string(),
        ));

        let path_only = target.split('?').next().unwrap_or("");
        let mut status: u16 = 200;
        let mut segments = path_only.trim_start_matches('/').splitn(3, '/');
        match (segments.next(), segments.next(), segments.next()) {
            (Some("flaky"), Some(n), Some(key))
                if seen_before(state, key) < n.parse::<usize>().unwrap_or(0) =>
            {
                status = 503;
            }
            (Some("slowfirst"), Some(ms), Some(key)) if seen_before(state, key) == 0 => {
                thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            }
            _ => {}
        }
        let forced = state.fail_status.load(Ordering::SeqCst);
        if forced != 0 {
            status = forced;
        }
        if let Some(code) = path_only.strip_prefix("/status/") {
            if let Ok(code) = code.trim_end_matches('/').parse::<u16>() {
                if (200..600).contains(&code) {
                    status = code;
                }
            }
        }
        if let Some(ms) = path_only.strip_prefix("/sleep/") {
            if let Ok(ms) = ms.trim_end_matches('/').parse::<u64>() {
                thread::sleep(Duration::from_millis(ms));
            }
        }

        let mut header_map = serde_json::Map::new();
        for (k, v) in &headers {
            let k = k.to_ascii_lowercase();
            match header_map.get_mut(&k) {
                Some(serde_json::Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(v);
                }
                _ => {
                    header_map.insert(k, serde_json::Value::String(v.clone()));
                }
            }
        }
        let json = serde_json::json!({
            "upstream": name,
            "method": method,
            "path": target,
            "headers": header_map,
            "body": String::from_utf8_lossy(&body),
        });
        let json_bytes = serde_json::to_vec(&json).unwrap();
        let bodiless_status = status == 204 || status == 304;
        let send_body = !bodiless_status && !method.eq_ignore_ascii_case("HEAD");
        let close = version.eq_ignore_ascii_case("HTTP/1.0")
            || header_value(&headers, "connection")
                .map(|v| v.to_ascii_lowercase().contains("close"))
                .unwrap_or(false);

        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nx-upstream: {name}\r\ncontent-type: application/json\r\n",
            reason_phrase(status)
        );
        if !bodiless_status {
            head.push_str(&format!("content-length: {}\r\n", json_bytes.len()));
        }
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if send_body {
            out.extend_from_slice(&json_bytes);
        }
        // Done before the answer goes out: once it is out the proxy may send the next
        // request, which another thread could count before this one got here.
        drop(_active);
        if writer.write_all(&out).and_then(|_| writer.flush()).is_err() {
            return;
        }
        if close {
            let _ = writer.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        418 => "I'm a teapot",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 wire format
// ---------------------------------------------------------------------------------------------

/// An HTTP response as received.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The `x-upstream` header set by [`Echo`].
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream")
    }

    /// A header as the upstream [`Echo`] received it (from the JSON body).
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name.to_ascii_lowercase()]
            .as_str()
            .map(str::to_string)
    }

    fn wants_close(&self) -> bool {
        self.header_all("connection")
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("close"))
    }
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

const NO_RESPONSE: &str = "connection closed before any response bytes";

/// Read a start line and headers. Ok(None) on a clean EOF before the first byte.
/// A request or status line and its headers.
pub type Head = (String, Vec<(String, String)>);

pub fn read_head<R: BufRead>(r: &mut R) -> io::Result<Option<Head>> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if !line.trim_end_matches(&['\r', '\n'][..]).is_empty() {
            break;
        }
    }
    let start = line.trim_end_matches(&['\r', '\n'][..]).to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF inside the header block",
            ));
        }
        let l = line.trim_end_matches(&['\r', '\n'][..]);
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some((start, headers)))
}

/// Read a message body framed by `Transfer-Encoding: chunked` or `Content-Length`; without
/// either, read to EOF when `until_eof` (responses), else there is no body (requests).
pub fn read_body<R: BufRead>(
    r: &mut R,
    headers: &[(String, String)],
    until_eof: bool,
) -> io::Result<Vec<u8>> {
    let chunked = header_value(headers, "transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false);
    if chunked {
        let mut body = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF in chunk size",
                ));
            }
            let size_text = line
                .trim()
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if size_text.is_empty() {
                continue;
            }
            let size = usize::from_str_radix(&size_text, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {size_text:?}"),
                )
            })?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    let n = r.read_line(&mut line)?;
                    if n == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = String::new();
            r.read_line(&mut crlf)?;
        }
    }
    if let Some(cl) = header_value(headers, "content-length") {
        let n: usize = cl.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad content-length {cl:?}"),
            )
        })?;
        let mut body = vec![0u8; n];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    if until_eof {
        let mut body = Vec::new();
        match r.read_to_end(&mut body) {
            Ok(_) => {}
            // TLS peers may close without close_notify; what arrived is the body.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
        return Ok(body);
    }
    Ok(Vec::new())
}

/// Read one response (skipping 1xx interim responses). HEAD, 1xx, 204 and 304 have no body.
pub fn read_response<R: BufRead>(r: &mut R, method: &str) -> io::Result<Response> {
    loop {
        let (start, headers) = read_head(r)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, NO_RESPONSE))?;
        let status: u16 = start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {start:?}"),
                )
            })?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let no_body = method.eq_ignore_ascii_case("HEAD")
            || status == 204
            || status == 304
            || (100..200).contains(&status);
        let body = if no_body {
            Vec::new()
        } else {
            read_body(r, &headers, true)?
        };
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
}

/// Serialize a request. Adds `Host` (unless `host` is empty or a Host header is given),
/// `Content-Length` when there is a body (or for POST/PUT/PATCH), and `Connection: close`
/// when `close`.
pub fn build_request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !host.is_empty() && !has("host") {
        req.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let needs_length = !body.is_empty()
        || ["POST", "PUT", "PATCH"]
            .iter()
            .any(|m| method.eq_ignore_ascii_case(m));
    if needs_length && !has("content-length") && !has("transfer-encoding") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close && !has("connection") {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Something that names a TCP address: a port on 127.0.0.1, or a full socket address.
pub trait ToTarget {
    fn to_target(&self) -> SocketAddr;
}

impl ToTarget for u16 {
    fn to_target(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], *self))
    }
}

impl ToTarget for SocketAddr {
    fn to_target(&self) -> SocketAddr {
        *self
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request on a fresh connection (`Connection: close`).
pub fn try_http_request<A: ToTarget>(
    addr: A,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut stream = connect(addr.to_target())?;
    stream.write_all(&build_request(method, host, path, headers, body, true))?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader, method)
}

/// Like [`try_http_request`], panicking on I/O errors.
pub fn http_request<A: ToTarget>(
    addr: A,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let target = addr.to_target();
    try_http_request(target, method, host, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} http://{host}{path} via {target}: {e}"))
}

/// `GET path` with `Host: host` on a fresh connection.
pub fn http_get<A: ToTarget>(addr: A, host: &str, path: &str) -> Response {
    http_request(addr, "GET", host, path, &[], b"")
}

/// A keep-alive HTTP/1.1 client: one connection, reused; reconnects when the server closes it.
/// A request that fails on a *reused* connection before any response byte arrived (the server
/// closed an idle connection) is retried once on a new connection, as HTTP clients do.
pub struct HttpClient {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    pub connects: usize,
    /// Requests retried after a reused connection turned out to be closed.
    pub retries: usize,
}

impl HttpClient {
    pub fn new<A: ToTarget>(addr: A) -> HttpClient {
        HttpClient {
            addr: addr.to_target(),
            conn: None,
            connects: 0,
            retries: 0,
        }
    }

    pub fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let req = build_request(method, host, path, headers, body, false);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reused = self.conn.is_some();
            if self.conn.is_none() {
                self.conn = Some(BufReader::new(connect(self.addr)?));
                self.connects += 1;
            }
            let conn = self.conn.as_mut().unwrap();
            let written = conn.get_mut().write_all(&req);
            let result = match written {
                Ok(()) => read_response(conn, method),
                Err(e) => Err(e),
            };
            match result {
                Ok(resp) => {
                    if resp.wants_close() {
                        self.conn = None;
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    self.conn = None;
                    let stale = e.to_string() == NO_RESPONSE
                        || matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset
                                | io::ErrorKind::BrokenPipe
                                | io::ErrorKind::ConnectionAborted
                        );
                    if reused && stale && attempt == 1 {
                        self.retries += 1;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    pub fn get(&mut self, host: &str, path: &str) -> io::Result<Response> {
        self.request("GET", host, path, &[], b"")
    }
}

// ---------------------------------------------------------------------------------------------
// TLS client
// ---------------------------------------------------------------------------------------------

/// Accepts any server certificate (the tests compare the DER themselves) but still checks the
/// handshake signatures with ring's algorithms.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A verifier that accepts any server certificate (for tests about something else than
/// verification) but checks handshake signatures with `provider`'s algorithms.
pub fn accept_any_cert(provider: Arc<CryptoProvider>) -> Arc<dyn ServerCertVerifier> {
    Arc::new(AcceptAnyCert(provider))
}

/// A fresh client config per connection: no session cache is shared, so every handshake is a
/// full one and shows the certificate the server picks now.
fn tls_client_config(alpn: &[&str]) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// An established TLS connection to the gateway.
pub struct TlsConn {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
    /// DER of the leaf certificate the server presented.
    pub peer_cert: Vec<u8>,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<String>,
}

impl TlsConn {
    /// Send one HTTP/1.1 request on this connection and read the response.
    pub fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let req = build_request(method, host, path, headers, body, false);
        let stream = self.stream.get_mut();
        stream.write_all(&req)?;
        stream.flush()?;
        read_response(&mut self.stream, method)
    }

    pub fn get(&mut self, host: &str, path: &str) -> io::Result<Response> {
        self.request("GET", host, path, &[], b"")
    }

    /// The TLS stream itself, for a test that reads it byte by byte (an upgrade's head,
    /// then the tunnel). Nothing is lost: only `request` reads through the buffer.
    pub fn into_stream(self) -> StreamOwned<ClientConnection, TcpStream> {
        assert!(self.stream.buffer().is_empty(), "bytes left in the reader");
        self.stream.into_inner()
    }
}

/// TLS handshake with 127.0.0.1:`port`, offering ALPN `http/1.1`. `sni: None` sends no SNI
/// (the server name is an IP address). The handshake completes before this returns, so a
/// rejected handshake is an `Err`.
pub fn tls_connect(port: u16, sni: Option<&str>) -> Result<TlsConn, String> {
    tls_connect_alpn(port, sni, &["http/1.1"])
}

/// Like [`tls_connect`] with the given ALPN offer.
pub fn tls_connect_alpn(port: u16, sni: Option<&str>, alpn: &[&str]) -> Result<TlsConn, String> {
    let server_name: ServerName<'static> = match sni {
        Some(name) => ServerName::try_from(name.to_string())
            .map_err(|e| format!("invalid server name {name:?}: {e}"))?,
        None => ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    };
    let mut conn = ClientConnection::new(tls_client_config(alpn), server_name)
        .map_err(|e| format!("client connection: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    sock.set_write_timeout(Some(Duration::from_secs(10))).ok();
    sock.set_nodelay(true).ok();
    let deadline = Instant::now() + Duration::from_secs(15);
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err(format!(
                "TLS handshake (sni {sni:?}) did not finish in 15 s"
            ));
        }
        conn.complete_io(&mut sock)
            .map_err(|e| format!("TLS handshake (sni {sni:?}) failed: {e}"))?;
    }
    let peer_cert = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| format!("TLS handshake (sni {sni:?}): no peer certificate"))?;
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    Ok(TlsConn {
        stream: BufReader::new(StreamOwned::new(conn, sock)),
        peer_cert,
        alpn,
    })
}

/// An HTTP/2 client over TLS (ALPN h2 only), the `h2` crate on a runtime of its own.
pub struct H2Client {
    rt: tokio::runtime::Runtime,
    send: h2::client::SendRequest<bytes::Bytes>,
    /// Set when the connection has ended (closed or shut down by the server).
    ended: Arc<AtomicBool>,
}

/// One request for [`H2Client::send_all`]: method, authority, path, extra headers, body.
pub type H2Request<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>, &'a [u8]);

impl H2Client {
    pub fn connect(port: u16, sni: &str) -> Result<H2Client, String> {
        Self::connect_after(port, sni, b"")
    }

    /// [`H2Client::connect`] that writes `first` (a PROXY protocol header) on the TCP
    /// connection before the ClientHello.
    pub fn connect_after(port: u16, sni: &str, first: &[u8]) -> Result<H2Client, String> {
        Self::connect_with(port, sni, first, h2::client::Builder::new())
    }

    /// [`H2Client::connect`] with a flow-control window of `window` bytes for each stream
    /// (the connection's stays at 64 KiB), as a client short of memory sets it.
    pub fn connect_with_window(port: u16, sni: &str, window: u32) -> Result<H2Client, String> {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(window);
        Self::connect_with(port, sni, b"", b)
    }

    fn connect_with(
        port: u16,
        sni: &str,
        first: &[u8],
        builder: h2::client::Builder,
    ) -> Result<H2Client, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let name = ServerName::try_from(sni.to_string()).map_err(|e| format!("{sni}: {e}"))?;
        let ended = Arc::new(AtomicBool::new(false));
        let ended_by_conn = ended.clone();
        let send = rt.block_on(async {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            tokio::io::AsyncWriteExt::write_all(&mut tcp, first)
                .await
                .map_err(|e| format!("write: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(tls_client_config(&["h2"]))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err("the server did not choose h2".to_string());
            }
            let (send, conn) = builder
                .handshake(tls)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
                ended_by_conn.store(true, Ordering::SeqCst);
            });
            Ok::<_, String>(send)
        })?;
        Ok(H2Client { rt, send, ended })
    }

    /// Whether the connection ends (the server shuts it down) within `within`.
    pub fn ended_within(&mut self, within: Duration) -> bool {
        let ended = self.ended.clone();
        self.rt.block_on(async move {
            let deadline = tokio::time::Instant::now() + within;
            while !ended.load(Ordering::SeqCst) {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        })
    }

    pub fn get(&mut self, host: &str, path: &str) -> Result<Response, String> {
        self.send_all(&[("GET", host, path, vec![], b"")])
            .pop()
            .expect("one answer")
    }

    /// Sends all `requests` at once, as streams of the one connection, and waits for every
    /// answer (in the order of the requests).
    pub fn send_all(&mut self, requests: &[H2Request<'_>]) -> Vec<Result<Response, String>> {
        let send = self.send.clone();
        self.rt.block_on(async move {
            let mut pending = Vec::new();
            for (method, host, path, headers, body) in requests {
                let mut b = http::Request::builder()
                    .method(*method)
                    .uri(format!("https://{host}{path}"));
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                let req = b.body(()).expect("request");
                let mut send = match send.clone().ready().await {
                    Ok(s) => s,
                    Err(e) => {
                        pending.push(Err(format!("not ready: {e}")));
                        continue;
                    }
                };
                let sent =
                    send.send_request(req, body.is_empty())
                        .and_then(|(resp, mut stream)| {
                            if !body.is_empty() {
                                stream.send_data(bytes::Bytes::copy_from_slice(body), true)?;
                            }
                            Ok(resp)
                        });
                pending.push(sent.map_err(|e| format!("send: {e}")));
            }
            // Each answer is read as it comes, as a browser reads them: read one after
            // another, the unread ones would hold the connection's flow-control window
            // and the one being read could wait behind them.
            let reading: Vec<_> = pending
                .into_iter()
                .map(|p| p.map(|resp| tokio::spawn(read_h2(resp))))
                .collect();
            let mut answers = Vec::new();
            for r in reading {
                answers.push(match r {
                    Ok(task) => task.await.unwrap_or_else(|e| Err(format!("reader: {e}"))),
                    Err(e) => Err(e),
                });
            }
            answers
        })
    }
}

/// How a stream whose reader stopped ended, for [`H2Client::stop_reading`].
#[derive(Debug)]
pub struct Stalled {
    pub status: u16,
    /// Body bytes that arrived (no more than the stream's window).
    pub received: usize,
    /// How the body ended: `Err` with the reason (the server reset the stream), or
    /// `Ok(())` when it ended whole.
    pub end: Result<(), String>,
    /// From the response head to that end.
    pub after: Duration,
}

impl H2Client {
    /// GETs `path` and takes its body without ever giving the flow-control window back,
    /// as a client that stopped reading: the server can send no more than the window, and
    /// what then ends the stream (within `within`) is reported.
    pub fn stop_reading(
        &mut self,
        host: &str,
        path: &str,
        within: Duration,
    ) -> Result<Stalled, String> {
        let send = self.send.clone();
        let uri = format!("https://{host}{path}");
        self.rt.block_on(async move {
            let req = http::Request::get(uri).body(()).expect("request");
            let mut send = send.ready().await.map_err(|e| format!("not ready: {e}"))?;
            let (resp, _) = send
                .send_request(req, true)
                .map_err(|e| format!("send: {e}"))?;
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .map_err(|_| "no answer in 10 s".to_string())?
                .map_err(|e| format!("response: {e}"))?;
            let status = resp.status().as_u16();
            let started = tokio::time::Instant::now();
            let mut body = resp.into_body();
            let mut received = 0;
            let end = loop {
                match tokio::time::timeout_at(started + within, body.data()).await {
                    Err(_) => return Err(format!("the stream did not end in {within:?}")),
                    Ok(None) => break Ok(()),
                    Ok(Some(Ok(chunk))) => received += chunk.len(),
                    Ok(Some(Err(e))) => break Err(e.to_string()),
                }
            };
            Ok(Stalled {
                status,
                received,
                end,
                after: started.elapsed(),
            })
        })
    }

    /// Opens a stream for each of `requests` and then gives them up: a request with a body
    /// sends only its first `partial` bytes of it (the stream stays open), then, once
    /// `until` holds (or 10 s passed), every stream is reset (`CANCEL`), as a client that
    /// goes away mid-request does. Whether `until` held.
    pub fn abandon(
        &mut self,
        requests: &[H2Request<'_>],
        partial: usize,
        until: impl Fn() -> bool,
    ) -> bool {
        let send = self.send.clone();
        self.rt.block_on(async move {
            let mut streams = Vec::new();
            for (method, host, path, headers, body) in requests {
                let mut b = http::Request::builder()
                    .method(*method)
                    .uri(format!("https://{host}{path}"));
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                if !body.is_empty() {
                    b = b.header("content-length", body.len());
                }
                let req = b.body(()).expect("request");
                let mut send = send.clone().ready().await.expect("ready");
                let (resp, mut stream) = send.send_request(req, body.is_empty()).expect("send");
                if !body.is_empty() {
                    let part = bytes::Bytes::copy_from_slice(&body[..partial.min(body.len())]);
                    stream.send_data(part, false).expect("data");
                }
                streams.push((resp, stream));
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let held = loop {
                if until() {
                    break true;
                }
                if tokio::time::Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            for (_, stream) in &mut streams {
                stream.send_reset(h2::Reason::CANCEL);
            }
            // Let the connection task write the resets.
            tokio::time::sleep(Duration::from_millis(50)).await;
            held
        })
    }
}

async fn read_h2(resp: h2::client::ResponseFuture) -> Result<Response, String> {
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .map_err(|_| "no answer in 10 s".to_string())?
        .map_err(|e| format!("response: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let read = async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("body: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .map_err(|_| "body not whole in 30 s".to_string())??;
    Ok(Response {
        status,
        headers,
        body: data,
    })
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A generated self-signed certificate.
#[derive(Clone)]
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// Generate a self-signed certificate (ECDSA P-256) for `names`.
pub fn gen_cert(names: &[&str]) -> TestCert {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed");
    TestCert {
        cert_pem: certified.cert.pem(),
        key_pem: certified.key_pair.serialize_pem(),
        der: certified.cert.der().to_vec(),
    }
}

/// Write `cert` as `<dir>/<name>.crt` and `<dir>/<name>.key` (each atomically; key first).
pub fn write_cert_files(dir: &Path, name: &str, cert: &TestCert) {
    write_atomic(&dir.join(format!("{name}.key")), &cert.key_pem);
    write_atomic(&dir.join(format!("{name}.crt")), &cert.cert_pem);
}

/// Generate a certificate for `names`, write `<dir>/<name>.crt` and `.key`, return its DER.
pub fn write_cert(dir: &Path, name: &str, names: &[&str]) -> Vec<u8> {
    let cert = gen_cert(names);
    write_cert_files(dir, name, &cert);
    cert.der
}

/// An HTTPS origin (another Portico) that answers every request with 200 and `body`, with a
/// self-signed certificate for `names` written to `<dir>/origin.crt`; `route_extra` is
/// added to its one HTTP route (TOML lines). Returns (it, its HTTPS port).
pub fn https_origin(dir: &Path, names: &[&str], body: &str, route_extra: &str) -> (Portico, u16) {
    write_cert(dir, "origin", names);
    let https = free_port();
    let config = format!(
        r#"{mesh}
[[gateways]]
name = "origin"
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["*"]
tls = {{ mode = "SIMPLE", serverCertificate = "origin.crt", privateKey = "origin.key" }}

[[virtualServices]]
name = "origin"
hosts = ["*"]
gateways = ["origin"]
[[virtualServices.http]]
directResponse = {{ status = 200, body = {{ string = "{body}" }} }}
{route_extra}
"#,
        mesh = mesh_config(free_port()),
    );
    (Portico::start(dir, &config), https)
}

/// Generate a certificate for `names` and write it as a credential, Kubernetes-Secret style:
/// `<creds_dir>/<credential>/tls.crt` and `tls.key`. Returns its DER.
pub fn write_credential(creds_dir: &Path, credential: &str, names: &[&str]) -> Vec<u8> {
    let cert = gen_cert(names);
    let dir = creds_dir.join(credential);
    write_atomic(&dir.join("tls.key"), &cert.key_pem);
    write_atomic(&dir.join("tls.crt"), &cert.cert_pem);
    cert.der
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

enum Ready {
    Yes,
    /// It stopped because a port it was to listen on was in use; its log.
    PortTaken(String),
}

/// A running `portico run -c <dir>/portico.toml`. Killed on drop; if the test is panicking,
/// the gateway's log is printed first.
pub struct Portico {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub admin_port: u16,
    child: Option<Child>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Portico {
    /// Write `config_toml` to `<dir>/portico.toml`, start the gateway and wait for
    /// `GET /ready` = 200 on the admin address, which must be set in the config as
    /// `admin = "127.0.0.1:PORT"` (see [`mesh_config`]).
    pub fn start(dir: &Path, config_toml: &str) -> Portico {
        Self::start_with_env(dir, config_toml, &[])
    }

    /// Starts another `portico run` on the config already in `dir` with `extra` arguments
    /// (e.g. `--upgrade`), without waiting for it to be ready.
    pub fn spawn_more(dir: &Path, admin_port: u16, extra: &[&str]) -> Portico {
        let config_path = dir.join("portico.toml");
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let stdout_path = dir.join(format!("portico-{n}.stdout.log"));
        let stderr_path = dir.join(format!("portico-{n}.stderr.log"));
        let child = Command::new(PORTICO)
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).unwrap())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {PORTICO}: {e}"));
        Portico {
            dir: dir.to_path_buf(),
            config_path,
            admin_port,
            child: Some(child),
            stdout_path,
            stderr_path,
        }
    }

    /// Writes `config_toml` to `<dir>/portico.toml` and starts `portico run` on it with
    /// extra environment variables, without waiting for it to be ready.
    pub fn spawn_with_env(dir: &Path, config_toml: &str, env: &[(&str, &str)]) -> Portico {
        let admin_re = regex::Regex::new(r#"admin\s*=\s*"127\.0\.0\.1:(\d+)""#).unwrap();
        let admin_port: u16 = admin_re
            .captures(config_toml)
            .and_then(|c| c[1].parse().ok())
            .expect("test config must set mesh.admin = \"127.0.0.1:PORT\"");
        let config_path = dir.join("portico.toml");
        write_atomic(&config_path, config_toml);
        let stdout_path = dir.join("portico.stdout.log");
        let stderr_path = dir.join("portico.stderr.log");
        let child = Command::new(PORTICO)
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).unwrap())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {PORTICO}: {e}"));
        Portico {
            dir: dir.to_path_buf(),
            config_path,
            admin_port,
            child: Some(child),
            stdout_path,
            stderr_path,
        }
    }

    /// [`Portico::start`] with extra environment variables for the process.
    pub fn start_with_env(dir: &Path, config_toml: &str, env: &[(&str, &str)]) -> Portico {
        Self::start_full(dir, config_toml, &[], env)
    }

    /// [`Portico::start`] with extra arguments after `run -c <dir>/portico.toml`.
    pub fn start_with_args(dir: &Path, config_toml: &str, args: &[&str]) -> Portico {
        Self::start_full(dir, config_toml, args, &[])
    }

    fn start_full(dir: &Path, config_toml: &str, args: &[&str], env: &[(&str, &str)]) -> Portico {
        let admin_re = regex::Regex::new(r#"admin\s*=\s*"127\.0\.0\.1:(\d+)""#).unwrap();
        let admin_port: u16 = admin_re
            .captures(config_toml)
            .and_then(|c| c[1].parse().ok())
            .expect("test config must set mesh.admin = \"127.0.0.1:PORT\"");
        let config_path = dir.join("portico.toml");
        write_atomic(&config_path, config_toml);
        let stdout_path = dir.join("portico.stdout.log");
        let stderr_path = dir.join("portico.stderr.log");
        let spawn = || {
            let stdout = fs::File::create(&stdout_path).expect("create stdout log");
            let stderr = fs::File::create(&stderr_path).expect("create stderr log");
            Command::new(PORTICO)
                .arg("run")
                .arg("-c")
                .arg(&config_path)
                .arg("--log-level")
                .arg("info")
                .args(args)
                .current_dir(dir)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {PORTICO}: {e}"))
        };
        let mut portico = Portico {
            dir: dir.to_path_buf(),
            config_path: config_path.clone(),
            admin_port,
            child: Some(spawn()),
            stdout_path: stdout_path.clone(),
            stderr_path: stderr_path.clone(),
        };
        // A port from `free_port` is free when handed out, not reserved: another process
        // can open it before the gateway does (seen once in CI: listen() failed with
        // EADDRINUSE right after bind() succeeded). The gateway then stops with "cannot
        // listen"; start it again on the same config, whose ports are free again by then.
        for attempt in 1.. {
            match portico.wait_ready() {
                Ready::Yes => break,
                Ready::PortTaken(log) if attempt < 4 => {
                    eprintln!("portico could not open a port; starting it again. log:\n{log}");
                    thread::sleep(Duration::from_millis(200));
                    portico.child = Some(spawn());
                }
                Ready::PortTaken(log) => {
                    panic!("portico could not open its ports {attempt} times; log:\n{log}")
                }
            }
        }
        portico
    }

    fn wait_ready(&mut self) -> Ready {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                let log = self.log();
                self.child = None;
                if log.contains("cannot listen") {
                    return Ready::PortTaken(log);
                }
                panic!("portico exited before becoming ready ({status}); log:\n{log}");
            }
            if let Ok(resp) =
                try_http_request(self.admin_port, "GET", "127.0.0.1", "/ready", &[], b"")
            {
                if resp.status == 200 {
                    return Ready::Yes;
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "portico did not answer GET /ready with 200 within {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (a `kill -s` name such as `TERM`) to the gateway.
    pub fn send_signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(signal)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} failed");
    }

    /// Waits up to `timeout` for the process to exit; its status, or None if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("portico is running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The gateway's stdout and stderr so far.
    /// What the gateway wrote to stdout (the access log, by default).
    /// Stdout so far, up to its last complete line: a read can meet a line (an access-log
    /// buffer) the process is still writing, which the next call returns whole.
    pub fn stdout(&self) -> String {
        let mut out = fs::read_to_string(&self.stdout_path).unwrap_or_default();
        out.truncate(out.rfind('\n').map_or(0, |i| i + 1));
        out
    }

    pub fn log(&self) -> String {
        let out = fs::read_to_string(&self.stdout_path).unwrap_or_default();
        let err = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        format!("--- stdout ---\n{out}\n--- stderr ---\n{err}")
    }

    pub fn admin_get(&self, path: &str) -> Response {
        try_http_request(self.admin_port, "GET", "127.0.0.1", path, &[], b"")
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}; log:\n{}", self.log()))
    }

    pub fn admin_post(&self, path: &str) -> Response {
        try_http_request(self.admin_port, "POST", "127.0.0.1", path, &[], b"")
            .unwrap_or_else(|e| panic!("admin POST {path}: {e}; log:\n{}", self.log()))
    }

    /// `GET /config` as JSON.
    pub fn config_json(&self) -> serde_json::Value {
        let resp = self.admin_get("/config");
        assert_eq!(resp.status, 200, "GET /config: {}", resp.text());
        resp.json()
    }

    /// The current config generation from `GET /config`.
    pub fn generation(&self) -> u64 {
        let json = self.config_json();
        json["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("/config has no numeric generation: {json}"))
    }

    /// Wait until the generation is greater than `previous`; returns the new generation.
    pub fn wait_generation_above(&self, previous: u64, timeout: Duration) -> u64 {
        let mut current = previous;
        let advanced = wait_until(timeout, || {
            current = self.generation();
            current > previous
        });
        if !advanced {
            panic!(
                "config generation did not advance past {previous} within {timeout:?}; /config: {}\nlog:\n{}",
                self.config_json(),
                self.log()
            );
        }
        current
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        let resp = self.admin_get("/metrics");
        assert_eq!(resp.status, 200, "GET /metrics");
        resp.text()
    }

    /// Replace `portico.toml` atomically (temp file + rename).
    pub fn rewrite_config(&self, config_toml: &str) {
        write_atomic(&self.config_path, config_toml);
    }

    /// Send SIGHUP to the gateway (`kill -HUP PID`).
    pub fn send_signal_hup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "kill -HUP failed: {status}");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines.len().saturating_sub(300);
            eprintln!(
                "==== portico log ({}), last {} lines ====\n{}",
                self.dir.display(),
                lines.len() - tail,
                lines[tail..].join("\n")
            );
        }
    }
}

/// Everything a request is decided by, in a stable order (host maps sorted by pattern).
pub fn dump(s: &portico::snapshot::Snapshot) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for l in &s.listeners {
        writeln!(
            out,
            "listener {} tls={} h2c={} forward_proxy={}",
            l.addr, l.tls, l.h2c, l.forward_proxy
        )
        .unwrap();
        for (p, policy) in l.table.servers.patterns() {
            // `policy.server` names where the server was written, which a conversion moves.
            writeln!(
                out,
                "  server {p}: https_redirect={}",
                policy.https_redirect
            )
            .unwrap();
        }
        for (p, vhost) in l.table.vhosts.patterns() {
            writeln!(out, "  vhost {p}: {vhost:?}").unwrap();
        }
        if let Some(certs) = &l.certs {
            for (p, cert) in certs.hosts.patterns() {
                writeln!(out, "  cert {p}: {:?} {:?}", cert.cert_path, cert.subject).unwrap();
            }
            let default = certs.default.as_ref().map(|c| &c.cert_path);
            writeln!(out, "  default cert: {default:?}").unwrap();
        }
    }
    for c in &s.clusters {
        writeln!(out, "cluster {c:?}").unwrap();
    }
    writeln!(out, "egress policy {:?}", s.egress.policy).unwrap();
    for (p, h) in s.egress.hosts.patterns() {
        writeln!(out, "egress host {p}: {h:?}").unwrap();
    }
    writeln!(out, "settings {:?}", s.settings).unwrap();
    out
}

/// The keep-alive timer of each established IPv4 socket connected to `port` (the kernel's
/// `/proc/net/tcp`: timer kind 2 is keep-alive, its expiry in clock ticks of 1/100 s), or
/// `None` for one with no keep-alive timer running.
pub fn keepalive_timers_to(port: u16) -> Vec<Option<Duration>> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
            // State 01: established.
            if remote_port != port || *f.get(3)? != "01" {
                return None;
            }
            let (kind, when) = f.get(5)?.split_once(':')?;
            let ticks = u64::from_str_radix(when, 16).ok()?;
            Some((kind == "02").then(|| Duration::from_millis(ticks * 10)))
        })
        .collect()
}
