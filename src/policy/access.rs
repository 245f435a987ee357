//! Access lists: Mixer's `listchecker` and `denier` as a policy. Owns a list's entries (the
//! inline ones from the config, a file's and a URL's, merged into a CIDR range table and a
//! value set) and keeps them fresh: a file is re-read when it changes, a URL fetched every
//! `refreshInterval`, and a source that fails keeps its last good entries. Checking a
//! request is a binary search or a hash lookup; never reads or fetches on the request
//! path, never parses config.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::IntCounter;

use super::{Decision, Outcome, RequestKeys};
use crate::config::load::{stamp, FileStamp};
use crate::telemetry::Metrics;

/// What a list looks up, in Istio's attribute names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListKey {
    /// `source.ip`: the client address the core trusts.
    SourceIp,
    /// `request.headers[name]` (lower-case).
    Header(String),
    /// `request.auth.claims[name]`.
    Claim(String),
    /// `request.auth.principal`.
    Principal,
}

impl ListKey {
    pub fn parse(text: &str) -> Result<ListKey, String> {
        let inside = |prefix: &str| {
            text.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(']'))
                .filter(|n| !n.is_empty())
        };
        if text == "source.ip" {
            Ok(ListKey::SourceIp)
        } else if text == "request.auth.principal" {
            Ok(ListKey::Principal)
        } else if let Some(h) = inside("request.headers[") {
            Ok(ListKey::Header(h.to_ascii_lowercase()))
        } else if let Some(c) = inside("request.auth.claims[") {
            Ok(ListKey::Claim(c.to_string()))
        } else {
            Err(format!("{text:?} is not source.ip, request.headers[NAME], request.auth.claims[NAME] or request.auth.principal"))
        }
    }
}

/// listchecker's `entryType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    IpAddresses,
    Strings,
    CaseInsensitiveStrings,
}

/// A list's entries, ready for lookups.
#[derive(Debug, Default)]
pub struct Entries {
    /// Merged, sorted, non-overlapping inclusive ranges.
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    values: foldhash::HashSet<Box<str>>,
}

impl Entries {
    /// Entries from lines (`#` starts a comment; blank lines are skipped). An entry that
    /// is not of `kind` is an error naming its line (1-based) in `lines`.
    pub fn parse<'a>(
        lines: impl IntoIterator<Item = &'a str>,
        kind: EntryType,
    ) -> Result<Entries, (usize, String)> {
        let mut out = Entries::default();
        for (n, line) in lines.into_iter().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            match kind {
                EntryType::IpAddresses => {
                    // An IPv4-mapped address is the IPv4 address, as clients' are.
                    let net: ipnet::IpNet = match entry.parse::<IpAddr>() {
                        Ok(ip) => ip.to_canonical().into(),
                        Err(_) => match entry.parse() {
                            Ok(n) => n,
                            Err(_) => {
                                return Err((
                                    n + 1,
                                    format!("{entry:?} is not an IP address or CIDR range"),
                                ))
                            }
                        },
                    };
                    match net.trunc() {
                        ipnet::IpNet::V4(v4) => out
                            .v4
                            .push((v4.network().to_bits(), v4.broadcast().to_bits())),
                        ipnet::IpNet::V6(v6) => out
                            .v6
                            .push((v6.network().to_bits(), v6.broadcast().to_bits())),
                    }
                }
                EntryType::Strings => {
                    out.values.insert(entry.into());
                }
                EntryType::CaseInsensitiveStrings => {
                    out.values.insert(entry.to_lowercase().into());
                }
            }
        }
        merge(&mut out.v4);
        merge(&mut out.v6);
        Ok(out)
    }

    /// These entries and `other`'s.
    fn union(mut self, other: &Entries) -> Entries {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
        self.values.extend(other.values.iter().cloned());
        merge(&mut self.v4);
        merge(&mut self.v6);
        self
    }

    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => in_ranges(&self.v4, v4.to_bits()),
            IpAddr::V6(v6) => in_ranges(&self.v6, v6.to_bits()),
        }
    }

    pub fn contains_value(&self, value: &str) -> bool {
        self.values.contains(value)
    }

    /// Entries held (ranges count once however many addresses they hold).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len() + self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn merge<T: Ord + Copy + num_step::Step>(ranges: &mut Vec<(T, T)>) {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges.iter() {
        match out.last_mut() {
            Some(last) if start <= last.1.next_or_max() => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    *ranges = out;
}

fn in_ranges<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|r| r.0 <= x);
    i > 0 && x <= ranges[i - 1].1
}

mod num_step {
    /// The next integer, or the largest.
    pub trait Step {
        fn next_or_max(self) -> Self;
    }
    impl Step for u32 {
        fn next_or_max(self) -> Self {
            self.saturating_add(1)
        }
    }
    impl Step for u128 {
        fn next_or_max(self) -> Self {
            self.saturating_add(1)
        }
    }
}

/// An `http://` URL, parsed at compile time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderUrl {
    pub host: String,
    pub port: u16,
    /// Path and query.
    pub target: String,
}

impl ProviderUrl {
    pub fn parse(text: &str) -> Result<ProviderUrl, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err("https is not supported for providerUrl yet: serve the list over http inside the network, or use `file`".into()),
            _ => return Err(format!("{text:?} is not an http:// URL")),
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("{text:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(ProviderUrl {
            host,
            port: uri.port_u16().unwrap_or(80),
            target: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
        })
    }
}

/// Where a list's entries come from besides the config.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub url: Option<ProviderUrl>,
    /// How often the URL is fetched.
    pub refresh_interval: Duration,
}

/// What the sources last gave: their good entries, and when to look again.
#[derive(Default)]
struct Fresh {
    file_stamp: Option<FileStamp>,
    file: Option<Entries>,
    url: Option<Entries>,
    url_fetched: Option<Instant>,
}

/// One access list, compiled, with its entries.
pub struct AccessList {
    /// `namespace/name`: the `list` label and the name rules refer to it by.
    pub name: String,
    /// `ALLOW`: only listed requests pass. `DENY`: listed requests are refused.
    pub allow: bool,
    pub key: ListKey,
    pub entry_type: EntryType,
    pub status: u16,
    pub body: String,
    inline: Entries,
    pub sources: Sources,
    entries: ArcSwap<Entries>,
    fresh: Mutex<Fresh>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    passed: IntCounter,
    denied: IntCounter,
}

/// A refresh that failed: the source and why (the list keeps what it had).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshError {
    pub source: &'static str,
    pub message: String,
}

impl AccessList {
    /// A list with its inline entries and, when it has a file, the file's entries read
    /// now (`file_entries`, read by the compile step so a bad file is a config error).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        allow: bool,
        key: ListKey,
        entry_type: EntryType,
        status: u16,
        body: String,
        inline: Entries,
        sources: Sources,
        file_entries: Option<(Option<FileStamp>, Entries)>,
    ) -> AccessList {
        let m = Metrics::global();
        let mut fresh = Fresh::default();
        if let Some((s, e)) = file_entries {
            fresh.file_stamp = s;
            fresh.file = Some(e);
        }
        let list = AccessList {
            passed: m
                .access_list_decisions
                .with_label_values(&[name.as_str(), "allowed"]),
            denied: m
                .access_list_decisions
                .with_label_values(&[name.as_str(), "denied"]),
            name,
            allow,
            key,
            entry_type,
            status,
            body,
            inline,
            sources,
            entries: ArcSwap::from_pointee(Entries::default()),
            fresh: Mutex::new(fresh),
            refreshing: tokio::sync::Mutex::new(()),
        };
        list.rebuild();
        list
    }

    /// The entries in force now.
    pub fn entries(&self) -> Arc<Entries> {
        self.entries.load_full()
    }

    /// Whether `value` is listed.
    pub fn contains(&self, value: &str) -> bool {
        let e = self.entries.load();
        match self.entry_type {
            EntryType::IpAddresses => value.parse().is_ok_and(|ip| e.contains_ip(ip)),
            EntryType::Strings => e.contains_value(value),
            EntryType::CaseInsensitiveStrings => {
                if value.bytes().any(|b| b.is_ascii_uppercase()) || !value.is_ascii() {
                    e.contains_value(&value.to_lowercase())
                } else {
                    e.contains_value(value)
                }
            }
        }
    }

    fn listed(&self, keys: &RequestKeys<'_>) -> bool {
        let value = match &self.key {
            ListKey::SourceIp => {
                return keys.client_ip.is_some_and(|ip| match self.entry_type {
                    EntryType::IpAddresses => self.entries.load().contains_ip(ip),
                    _ => self.contains(&ip.to_canonical().to_string()),
                })
            }
            ListKey::Header(h) => keys.headers.get(h),
            ListKey::Claim(c) => keys.claims.and_then(|cl| cl.claim(c)),
            ListKey::Principal => keys.principal,
        };
        value.is_some_and(|v| self.contains(v))
    }

    /// The list's decision for a request: refused (the list's status and body) when a
    /// `DENY` list holds its value or an `ALLOW` list does not.
    pub fn check(&self, keys: &RequestKeys<'_>) -> Decision<'_> {
        if self.listed(keys) == self.allow {
            self.passed.inc();
            Decision {
                outcome: Outcome::Allowed,
                rule: &self.name,
                status: 200,
                body: "",
                headers: None,
            }
        } else {
            self.denied.inc();
            Decision {
                outcome: Outcome::Denied,
                rule: &self.name,
                status: self.status,
                body: &self.body,
                headers: None,
            }
        }
    }

    fn rebuild(&self) {
        let fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = Entries::default().union(&self.inline);
        for e in fresh.file.iter().chain(fresh.url.iter()) {
            all = all.union(e);
        }
        Metrics::global()
            .access_list_entries
            .with_label_values(&[self.name.as_str()])
            .set(all.len() as i64);
        self.entries.store(Arc::new(all));
    }

    /// Re-reads the file if its stamp changed, and fetches the URL if `refreshInterval`
    /// has passed since the last fetch (or `force`). A source that fails keeps its last
    /// good entries; the failures are returned (and counted, and logged).
    pub async fn refresh(&self, force: bool) -> Vec<RefreshError> {
        let _one = self.refreshing.lock().await;
        let mut errors = Vec::new();
        let mut changed = false;
        let m = Metrics::global();
        if let Some(path) = &self.sources.file {
            let now = stamp(path);
            let last = self
                .fresh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .file_stamp;
            if force || now != last {
                let read = match tokio::fs::read_to_string(path).await {
                    Ok(text) => Entries::parse(text.lines(), self.entry_type)
                        .map_err(|(line, e)| format!("{}:{line}: {e}", path.display())),
                    Err(e) => Err(format!("cannot read {}: {e}", path.display())),
                };
                let result = match read {
                    Ok(e) => {
                        let mut f = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
                        f.file = Some(e);
                        f.file_stamp = now;
                        changed = true;
                        "success"
                    }
                    Err(message) => {
                        // Not read again until the file changes again.
                        self.fresh
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .file_stamp = now;
                        errors.push(RefreshError {
                            source: "file",
                            message,
                        });
                        "failure"
                    }
                };
                m.access_list_refreshes
                    .with_label_values(&[self.name.as_str(), "file", result])
                    .inc();
            }
        }
        if let Some(url) = &self.sources.url {
            let due = self
                .fresh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .url_fetched
                .is_none_or(|t| t.elapsed() >= self.sources.refresh_interval);
            if force || due {
                let timeout = self
                    .sources
                    .refresh_interval
                    .clamp(Duration::from_millis(100), Duration::from_secs(10));
                let fetched = match tokio::time::timeout(timeout, fetch(url)).await {
                    Ok(Ok(text)) => Entries::parse(text.lines(), self.entry_type)
                        .map_err(|(line, e)| format!("line {line}: {e}")),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                let mut f = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
                f.url_fetched = Some(Instant::now());
                let result = match fetched {
                    Ok(e) => {
                        f.url = Some(e);
                        changed = true;
                        "success"
                    }
                    Err(message) => {
                        errors.push(RefreshError {
                            source: "url",
                            message,
                        });
                        "failure"
                    }
                };
                drop(f);
                m.access_list_refreshes
                    .with_label_values(&[self.name.as_str(), "url", result])
                    .inc();
            }
        }
        if changed {
            self.rebuild();
        }
        for e in &errors {
            tracing::warn!(list = %self.name, source = e.source, error = %e.message, "access list not refreshed: its last good entries stay");
        }
        errors
    }
}

/// The background task that keeps every access list of the Snapshot in force fresh: each
/// second it re-reads changed files and fetches the URLs that are due.
pub struct Refresher {
    pub snapshots: Arc<ArcSwap<crate::snapshot::Snapshot>>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Refresher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let snapshot = self.snapshots.load_full();
                    for list in snapshot.policies.access_lists() {
                        list.refresh(false).await;
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// The largest list a URL may answer.
const MAX_LIST_BYTES: usize = 16 << 20;

/// GET `url` over HTTP/1.1: the body of a 200 answer.
async fn fetch(url: &ProviderUrl) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let mut conn = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{}: {e}", url.port))?;
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: portico/{}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
        url.target,
        url.port,
        env!("CARGO_PKG_VERSION")
    );
    conn.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut buf = Vec::new();
    (&mut conn)
        .take(MAX_LIST_BYTES as u64 + 64 * 1024)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut fields);
    let head_len = match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err("the answer's head does not parse".into()),
    };
    if resp.code != Some(200) {
        return Err(format!("the server answered {}", resp.code.unwrap_or(0)));
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding") && h.value.eq_ignore_ascii_case(b"chunked")
    });
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let rest = &buf[head_len..];
    let body = if chunked {
        dechunk(rest).ok_or("the answer's chunked body is cut short or malformed")?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("the answer is shorter than its Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > MAX_LIST_BYTES {
        return Err(format!("the list is over {MAX_LIST_BYTES} bytes"));
    }
    String::from_utf8(body).map_err(|_| "the list is not UTF-8 text".into())
}

/// A chunked body, decoded (trailers ignored).
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::selector::tests::keys;

    fn list(allow: bool, kind: EntryType, key: ListKey, inline: &[&str]) -> AccessList {
        AccessList::new(
            format!("default/test-{allow}-{kind:?}"),
            allow,
            key,
            kind,
            403,
            "blocked\n".into(),
            Entries::parse(inline.iter().copied(), kind).unwrap(),
            Sources::default(),
            None,
        )
    }

    #[test]
    fn ranges_merge_and_look_up() {
        let e = Entries::parse(
            [
                "10.0.0.0/8",
                "10.1.0.0/16 # inside the first",
                "",
                "192.0.2.7",
                "192.0.2.8",
                "2001:db8::/32",
                "::ffff:198.51.100.1",
            ],
            EntryType::IpAddresses,
        )
        .unwrap();
        assert_eq!(e.v4.len(), 3, "{:?}", e.v4);
        for yes in [
            "10.200.1.1",
            "192.0.2.7",
            "192.0.2.8",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "198.51.100.1",
        ] {
            assert!(e.contains_ip(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "192.0.2.9", "2001:db9::1", "9.255.255.255"] {
            assert!(!e.contains_ip(no.parse().unwrap()), "{no}");
        }
        assert_eq!(
            Entries::parse(["1.2.3.4", "nope"], EntryType::IpAddresses)
                .unwrap_err()
                .0,
            2
        );
    }

    #[test]
    fn deny_and_allow_lists_decide() {
        let deny = list(
            false,
            EntryType::IpAddresses,
            ListKey::SourceIp,
            &["192.0.2.0/24"],
        );
        let d = deny.check(&keys("192.0.2.10", &[], "/"));
        assert_eq!(
            (d.outcome, d.status, d.body),
            (Outcome::Denied, 403, "blocked\n")
        );
        assert!(deny.check(&keys("198.51.100.1", &[], "/")).allowed());
        assert!(
            deny.check(&keys("", &[], "/")).allowed(),
            "no address: not listed"
        );

        let allow = list(
            true,
            EntryType::CaseInsensitiveStrings,
            ListKey::Header("x-api-key".into()),
            &["Gold-Key"],
        );
        let h = [httparse::Header {
            name: "X-Api-Key",
            value: b"gold-key",
        }];
        assert!(allow.check(&keys("", &h, "/")).allowed());
        assert!(!allow.check(&keys("", &[], "/")).allowed());
    }

    #[tokio::test]
    async fn a_file_change_applies_and_a_bad_file_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.txt");
        std::fs::write(&path, "192.0.2.1\n").unwrap();
        let l = AccessList::new(
            "default/file".into(),
            false,
            ListKey::SourceIp,
            EntryType::IpAddresses,
            403,
            String::new(),
            Entries::default(),
            Sources {
                file: Some(path.clone()),
                url: None,
                refresh_interval: Duration::from_secs(60),
            },
            None,
        );
        assert!(l.refresh(false).await.is_empty());
        assert!(!l.check(&keys("192.0.2.1", &[], "/")).allowed());
        std::fs::write(&path, "192.0.2.2\n# and a comment\n").unwrap();
        assert!(l.refresh(true).await.is_empty());
        assert!(l.check(&keys("192.0.2.1", &[], "/")).allowed());
        assert!(!l.check(&keys("192.0.2.2", &[], "/")).allowed());
        std::fs::write(&path, "not an address\n").unwrap();
        let errors = l.refresh(true).await;
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains(":1:"), "{errors:?}");
        assert!(
            !l.check(&keys("192.0.2.2", &[], "/")).allowed(),
            "last good kept"
        );
    }

    /// Serves `body` to every GET until the task is aborted.
    async fn list_server(body: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = l.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(answer.as_bytes()).await;
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn a_url_list_is_fetched_and_the_last_good_stays_when_it_is_down() {
        let (port, server) = list_server("203.0.113.0/24\n2001:db8::1\n").await;
        let l = AccessList::new(
            "default/url".into(),
            false,
            ListKey::SourceIp,
            EntryType::IpAddresses,
            403,
            String::new(),
            Entries::parse(["192.0.2.1"], EntryType::IpAddresses).unwrap(),
            Sources {
                file: None,
                url: Some(
                    ProviderUrl::parse(&format!("http://127.0.0.1:{port}/deny.txt")).unwrap(),
                ),
                refresh_interval: Duration::from_secs(1),
            },
            None,
        );
        assert!(
            l.check(&keys("203.0.113.9", &[], "/")).allowed(),
            "not fetched yet"
        );
        assert!(l.refresh(false).await.is_empty());
        assert!(!l.check(&keys("203.0.113.9", &[], "/")).allowed());
        assert!(
            !l.check(&keys("192.0.2.1", &[], "/")).allowed(),
            "inline entries stay"
        );
        assert_eq!(l.entries().len(), 3);
        assert!(
            l.refresh(false).await.is_empty(),
            "not due: nothing fetched"
        );
        server.abort();
        let _ = server.await;
        let errors = l.refresh(true).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].source, "url");
        assert!(
            !l.check(&keys("203.0.113.9", &[], "/")).allowed(),
            "last good kept"
        );
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            dechunk(b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n").unwrap(),
            b"abcdefg"
        );
        assert!(dechunk(b"4\r\nab").is_none());
    }

    #[test]
    fn keys_and_urls_parse() {
        assert_eq!(ListKey::parse("source.ip").unwrap(), ListKey::SourceIp);
        assert_eq!(
            ListKey::parse("request.headers[X-Key]").unwrap(),
            ListKey::Header("x-key".into())
        );
        assert_eq!(
            ListKey::parse("request.auth.claims[sub]").unwrap(),
            ListKey::Claim("sub".into())
        );
        assert!(ListKey::parse("remote.ip").is_err());
        let u = ProviderUrl::parse("http://lists.internal:8080/deny.txt?v=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("lists.internal", 8080, "/deny.txt?v=1")
        );
        assert!(ProviderUrl::parse("https://x/").is_err());
        assert!(ProviderUrl::parse("ftp://x/").is_err());
    }
}
