//! Request matchers, compiled once: Istio's HTTPMatchRequest as typed comparisons.

use http::{HeaderMap, HeaderName};
use regex::Regex;

/// Istio StringMatch. Regexes are anchored at compile time (RE2 full-match semantics).
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// `{}` in a header or query match: the key must be present.
    Present,
}

impl StrMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(e) => value == e,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(value),
            StrMatch::Present => true,
        }
    }

    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            // Compiled lower-case when ignoreUriCase is set.
            StrMatch::Exact(e) => value.len() == e.len() && value.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => {
                value.len() >= p.len()
                    && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            other => other.matches(value),
        }
    }

    /// A route whose only condition is this URI match serves everything.
    pub fn is_catch_all(&self) -> bool {
        match self {
            StrMatch::Prefix(p) => p == "/" || p.is_empty(),
            StrMatch::Regex(r) => matches!(r.as_str(), "^(?:.*)$" | "^(?:.+)$" | "^(?:/.*)$"),
            StrMatch::Present => true,
            StrMatch::Exact(_) => false,
        }
    }
}

/// A message's headers: pingora's map, or a head the HTTP/1.1 fast path parsed with the
/// headers it added (`x-request-id`).
#[derive(Clone, Copy)]
pub enum Headers<'a> {
    Map(&'a HeaderMap),
    Raw(&'a [httparse::Header<'a>], &'a [(&'a str, &'a [u8])]),
}

impl<'a> Headers<'a> {
    /// The values of `name`, each as `HeaderValue::to_str` would give it.
    pub fn values(self, name: &'a str) -> impl Iterator<Item = Option<&'a str>> + 'a {
        let (map, raw) = match self {
            Headers::Map(m) => (Some(m.get_all(name).iter().map(|v| v.to_str().ok())), None),
            Headers::Raw(head, added) => (
                None,
                Some(
                    head.iter()
                        .map(|h| (h.name, h.value))
                        .chain(added.iter().copied())
                        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
                        .map(|(_, v)| visible(v)),
                ),
            ),
        };
        map.into_iter().flatten().chain(raw.into_iter().flatten())
    }

    /// The first value of `name`, if it is text.
    pub fn get(self, name: &'a str) -> Option<&'a str> {
        self.values(name).next().flatten()
    }

    /// [`Headers::get`] for a name known in advance: a map is searched without parsing
    /// the name first.
    pub fn get_known(self, name: &'a http::HeaderName) -> Option<&'a str> {
        match self {
            Headers::Map(m) => m.get(name).and_then(|v| v.to_str().ok()),
            Headers::Raw(..) => self.get(name.as_str()),
        }
    }

    /// The first value of `name`, as sent (text or not).
    pub fn first_raw(self, name: &'a str) -> Option<&'a [u8]> {
        match self {
            Headers::Map(m) => m.get(name).map(|v| v.as_bytes()),
            Headers::Raw(head, added) => head
                .iter()
                .map(|h| (h.name, h.value))
                .chain(added.iter().copied())
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v),
        }
    }

    /// Calls `f` with each field's name and raw value, in order.
    pub fn each(self, mut f: impl FnMut(&'a str, &'a [u8])) {
        match self {
            Headers::Map(m) => {
                for (n, v) in m {
                    f(n.as_str(), v.as_bytes());
                }
            }
            Headers::Raw(head, added) => {
                for h in head.iter() {
                    f(h.name, h.value);
                }
                for (n, v) in added {
                    f(n, v);
                }
            }
        }
    }
}

/// `HeaderValue::to_str`'s rule: visible ASCII and tab only.
pub fn visible(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}

/// What a matcher needs from a request; borrowed, built once per request.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The Host / `:authority` as sent (with port).
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: Headers<'a>,
    /// Port of the listener the request arrived on.
    pub port: u16,
    /// The client's address as the core trusts it (Istio's `remote.ip`): the peer, or the
    /// `X-Forwarded-For` entry `numTrustedProxies` names (`request::remote_address`).
    pub client_ip: Option<std::net::IpAddr>,
    /// The verified client certificate of a mutual-TLS connection.
    pub peer: Option<&'a crate::tls::client_auth::PeerCert>,
    /// The connection's peer (Istio's `source.ip`).
    pub peer_ip: Option<std::net::IpAddr>,
    /// The TLS server name the client sent.
    pub sni: Option<&'a str>,
    /// The verified client certificate's identity (`source.principal`).
    pub peer_principal: Option<&'a str>,
}

/// One `match` block: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub name: Option<String>,
    pub uri: Option<StrMatch>,
    pub ignore_uri_case: bool,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub scheme: Option<StrMatch>,
    pub headers: Vec<(HeaderName, StrMatch)>,
    pub without_headers: Vec<(HeaderName, StrMatch)>,
    pub query: Vec<(String, StrMatch)>,
    pub port: Option<u16>,
    /// Per-match gateway restriction (`namespace/name` keys); empty = the route's gateways.
    pub gateways: Vec<String>,
    /// Portico extension `sourceIp`: the client address must be in one of these.
    pub source_ip: Vec<ipnet::IpNet>,
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if !self.source_ip.is_empty() {
            match req.client_ip {
                Some(ip) if self.source_ip.iter().any(|n| n.contains(&ip)) => {}
                _ => return false,
            }
        }
        if let Some(port) = self.port {
            if port != req.port {
                return false;
            }
        }
        if let Some(uri) = &self.uri {
            let ok = if self.ignore_uri_case {
                uri.matches_ignore_case(req.path)
            } else {
                uri.matches(req.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if !m.matches(req.method) {
                return false;
            }
        }
        if let Some(m) = &self.authority {
            if !m.matches(req.authority) {
                return false;
            }
        }
        if let Some(m) = &self.scheme {
            if !m.matches(req.scheme) {
                return false;
            }
        }
        for (name, m) in &self.headers {
            let ok = req
                .headers
                .values(name.as_str())
                .any(|v| v.is_some_and(|v| m.matches(v)));
            if !ok {
                return false;
            }
        }
        for (name, m) in &self.without_headers {
            // A missing header counts as empty, as in Istio.
            let mut values = req.headers.values(name.as_str()).peekable();
            let hit = if values.peek().is_none() {
                !matches!(m, StrMatch::Present) && m.matches("")
            } else {
                values.any(|v| v.is_some_and(|v| m.matches(v)))
            };
            if hit {
                return false;
            }
        }
        for (key, m) in &self.query {
            let found = req
                .query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == key).then_some(v)
                });
            match found {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        true
    }

    /// A match with nothing but a catch-all URI (Istio moves such routes last when it
    /// merges VirtualServices).
    pub fn is_catch_all(&self) -> bool {
        self.uri.as_ref().is_none_or(StrMatch::is_catch_all)
            && self.method.is_none()
            && self.authority.is_none()
            && self.scheme.is_none()
            && self.headers.is_empty()
            && self.without_headers.is_empty()
            && self.query.is_empty()
            && self.port.is_none()
            && self.source_ip.is_empty()
    }

    /// The prefix this match matched on, for `rewrite.uri` prefix replacement.
    pub fn matched_prefix(&self) -> Option<&str> {
        match &self.uri {
            Some(StrMatch::Prefix(p)) => Some(p),
            _ => None,
        }
    }
}

impl std::fmt::Display for StrMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StrMatch::Exact(s) => write!(f, "exact {s:?}"),
            StrMatch::Prefix(s) => write!(f, "prefix {s:?}"),
            StrMatch::Regex(r) => write!(f, "regex {:?}", r.as_str()),
            StrMatch::Present => f.write_str("present"),
        }
    }
}

/// `uri prefix "/api/" and header end-user exact "jason"`: for `portico routes`.
impl std::fmt::Display for RequestMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(u) = &self.uri {
            parts.push(format!(
                "uri {u}{}",
                if self.ignore_uri_case {
                    " (ignoring case)"
                } else {
                    ""
                }
            ));
        }
        for (what, m) in [
            ("method", &self.method),
            ("authority", &self.authority),
            ("scheme", &self.scheme),
        ] {
            if let Some(m) = m {
                parts.push(format!("{what} {m}"));
            }
        }
        for (k, m) in &self.headers {
            parts.push(format!("header {k} {m}"));
        }
        for (k, m) in &self.without_headers {
            parts.push(format!("without header {k} {m}"));
        }
        for (k, m) in &self.query {
            parts.push(format!("query {k} {m}"));
        }
        if let Some(p) = self.port {
            parts.push(format!("port {p}"));
        }
        for n in &self.source_ip {
            parts.push(format!("source {n}"));
        }
        if parts.is_empty() {
            f.write_str("anything")
        } else {
            f.write_str(&parts.join(" and "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: "GET",
            path,
            query,
            authority: "a.example.com",
            scheme: "http",
            headers: Headers::Map(headers),
            port: 80,
            client_ip: None,
            peer: None,
            peer_ip: None,
            sni: None,
            peer_principal: None,
        }
    }

    #[test]
    fn uri_kinds_and_case() {
        let h = HeaderMap::new();
        let m = RequestMatch {
            uri: Some(StrMatch::Prefix("/API/".into())),
            ignore_uri_case: true,
            ..Default::default()
        };
        assert!(m.matches(&view("/api/x", None, &h)));
        assert!(!m.matches(&view("/ap", None, &h)));
        let r = RequestMatch {
            uri: Some(StrMatch::Regex(Regex::new("^(?:/v[0-9]+/.*)$").unwrap())),
            ..Default::default()
        };
        assert!(r.matches(&view("/v2/items", None, &h)));
        assert!(!r.matches(&view("/x/v2/items", None, &h)));
    }

    #[test]
    fn headers_and_query() {
        let mut h = HeaderMap::new();
        h.insert("end-user", "jason".parse().unwrap());
        let m = RequestMatch {
            headers: vec![(
                HeaderName::from_static("end-user"),
                StrMatch::Exact("jason".into()),
            )],
            query: vec![("debug".into(), StrMatch::Exact("".into()))],
            ..Default::default()
        };
        assert!(m.matches(&view("/", Some("a=1&debug"), &h)));
        assert!(!m.matches(&view("/", Some("a=1"), &h)));
        let without = RequestMatch {
            without_headers: vec![(HeaderName::from_static("x-canary"), StrMatch::Present)],
            ..Default::default()
        };
        assert!(
            without.matches(&view("/", None, &h)),
            "absent header is not present"
        );
        h.insert("x-canary", "1".parse().unwrap());
        assert!(!without.matches(&view("/", None, &h)));
        assert!(RequestMatch::default().is_catch_all());
        assert!(!m.is_catch_all());
    }
}
