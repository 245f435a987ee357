//! Client selectors, compiled: which requests a rate-limit rule counts, and which values
//! (`Distinct` parts) make its key. Envoy Gateway's `clientSelectors` plus Portico's JWT
//! and path-template parts. Looks at a request's borrowed fields only: no allocation, no
//! parsing of anything but the request's own path.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

use super::RequestKeys;

/// A rule's limit: `requests` per `window`, `burst` of them at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u32,
    pub window: Duration,
    /// The bucket's size (GCRA's tolerance, in requests). At least 1.
    pub burst: u32,
    /// `window / requests` in nanoseconds (the time one request's token takes to come
    /// back); `u64::MAX` when `requests` is 0 (every request is over).
    pub interval_ns: u64,
}

impl Rate {
    pub fn new(requests: u32, window: Duration, burst: Option<u32>) -> Rate {
        let interval_ns = if requests == 0 {
            u64::MAX
        } else {
            (window.as_nanos() / u128::from(requests)).max(1) as u64
        };
        Rate {
            requests,
            window,
            burst: burst.unwrap_or(requests).max(1),
            interval_ns,
        }
    }

    /// The window in whole seconds, for the `RateLimit-Policy` field.
    pub fn window_secs(&self) -> u32 {
        self.window.as_secs().min(u64::from(u32::MAX)) as u32
    }
}

/// Where a selector's `Distinct` values go: a hasher for local buckets, a digest for
/// Redis keys. Each part is written with its length, so `ab`+`c` is not `a`+`bc`.
pub trait KeySink {
    fn part(&mut self, bytes: &[u8]);
}

impl<H: std::hash::Hasher> KeySink for H {
    fn part(&mut self, bytes: &[u8]) {
        self.write_usize(bytes.len());
        self.write(bytes);
    }
}

/// Envoy Gateway's header match types: `Exact`, `RegularExpression` (a full match), or
/// `Distinct` (any value; each value counted apart).
#[derive(Debug, Clone)]
pub enum ValueTest {
    Exact(String),
    Regex(Regex),
    Distinct,
}

/// One value condition, possibly inverted (then a missing value matches).
#[derive(Debug, Clone)]
pub struct ValueMatch {
    pub test: ValueTest,
    pub invert: bool,
}

impl ValueMatch {
    /// Whether the condition holds for `value`; a `Distinct` value goes into `sink`.
    fn check(&self, value: Option<&str>, sink: &mut impl KeySink) -> bool {
        let held = match (&self.test, value) {
            (_, None) => false,
            (ValueTest::Exact(e), Some(v)) => v == e,
            (ValueTest::Regex(r), Some(v)) => r.is_match(v),
            (ValueTest::Distinct, Some(v)) => {
                sink.part(v.as_bytes());
                true
            }
        };
        held != self.invert
    }
}

/// `sourceCIDR`: the client's address in `net`; `distinct` counts each address apart.
#[derive(Debug, Clone)]
pub struct SourceMatch {
    pub net: IpNet,
    pub distinct: bool,
}

/// A path template (`/users/{id}/orders/*`, `/files/**`): literal segments, `{name}` and
/// `*` for one segment, `**` (last) for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Named,
    One,
    Rest,
}

impl PathTemplate {
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("{text:?} must start with /"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let seg = match *p {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err("`**` may only be the last segment".into()),
                "*" => Segment::One,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                        return Err(format!("{p:?}: a variable name is letters, digits, _"));
                    }
                    Segment::Named
                }
                p if p.contains(['{', '}', '*']) => {
                    return Err(format!("{p:?}: a segment is literal, *, ** or {{name}}"))
                }
                p => Segment::Literal(p.to_string()),
            };
            segments.push(seg);
        }
        Ok(PathTemplate { segments })
    }

    fn has_names(&self) -> bool {
        self.segments.contains(&Segment::Named)
    }

    /// Whether `path` fits; the `{name}` segments' values go into `sink` when `distinct`.
    fn check(&self, path: &str, distinct: bool, sink: &mut impl KeySink) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        for (i, seg) in self.segments.iter().enumerate() {
            if *seg == Segment::Rest {
                return true;
            }
            let last = i + 1 == self.segments.len();
            let (part, after) = match rest.split_once('/') {
                Some((p, a)) => (p, Some(a)),
                None => (rest, None),
            };
            let ok = match seg {
                Segment::Literal(l) => part == l,
                Segment::Named => {
                    if distinct && !part.is_empty() {
                        sink.part(part.as_bytes());
                    }
                    !part.is_empty()
                }
                Segment::One => !part.is_empty(),
                Segment::Rest => true,
            };
            if !ok {
                return false;
            }
            match after {
                Some(a) if !last => rest = a,
                Some(_) => return false,
                None => return last || self.segments[i + 1..] == [Segment::Rest],
            }
        }
        true
    }
}

/// Portico's `path` selector.
#[derive(Debug, Clone)]
pub struct PathMatch {
    pub template: PathTemplate,
    pub distinct: bool,
}

/// One entry of `clientSelectors`: every part must hold.
#[derive(Debug, Clone, Default)]
pub struct Condition {
    /// Lower-case names.
    pub headers: Vec<(String, ValueMatch)>,
    pub source: Option<SourceMatch>,
    pub claims: Vec<(String, ValueMatch)>,
    pub principal: Option<ValueMatch>,
    pub path: Option<PathMatch>,
}

impl Condition {
    fn check(&self, keys: &RequestKeys<'_>, sink: &mut impl KeySink) -> bool {
        if let Some(s) = &self.source {
            match keys.client_ip {
                Some(ip) if s.net.contains(&ip) => {
                    if s.distinct {
                        match ip {
                            IpAddr::V4(v4) => sink.part(&v4.octets()),
                            IpAddr::V6(v6) => sink.part(&v6.octets()),
                        }
                    }
                }
                _ => return false,
            }
        }
        for (name, m) in &self.headers {
            if !m.check(keys.headers.get(name), sink) {
                return false;
            }
        }
        for (name, m) in &self.claims {
            let value = keys.claims.and_then(|c| c.claim(name));
            if !m.check(value, sink) {
                return false;
            }
        }
        if let Some(m) = &self.principal {
            if !m.check(keys.principal, sink) {
                return false;
            }
        }
        if let Some(p) = &self.path {
            if p.distinct && !p.template.has_names() {
                sink.part(keys.path.as_bytes());
            }
            if !p.template.check(keys.path, p.distinct, sink) {
                return false;
            }
        }
        true
    }
}

/// A rule's `clientSelectors`: all must hold. None selects every request, as one client.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub conditions: Vec<Condition>,
}

impl Selector {
    /// Whether the rule counts this request; its key parts went into `sink`.
    pub fn select(&self, keys: &RequestKeys<'_>, sink: &mut impl KeySink) -> bool {
        self.conditions.iter().all(|c| c.check(keys, sink))
    }
}

/// Mixer's quota override: a different rate for the keys with these values.
#[derive(Debug, Clone)]
pub struct Override {
    /// Lower-case header names and the value each must have.
    pub headers: Vec<(String, String)>,
    pub source: Option<IpNet>,
    pub claims: Vec<(String, String)>,
    pub principal: Option<String>,
    pub rate: Rate,
}

impl Override {
    pub fn matches(&self, keys: &RequestKeys<'_>) -> bool {
        if let Some(net) = &self.source {
            if !keys.client_ip.is_some_and(|ip| net.contains(&ip)) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(n, v)| keys.headers.get(n) == Some(v.as_str()))
            && self
                .claims
                .iter()
                .all(|(n, v)| keys.claims.and_then(|c| c.claim(n)) == Some(v.as_str()))
            && self
                .principal
                .as_ref()
                .is_none_or(|p| keys.principal == Some(p.as_str()))
    }
}

/// The rate for a request: the first override that matches, else the rule's.
pub fn rate_for<'a>(rate: &'a Rate, overrides: &'a [Override], keys: &RequestKeys<'_>) -> &'a Rate {
    overrides
        .iter()
        .find(|o| o.matches(keys))
        .map_or(rate, |o| &o.rate)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::routing::Headers;

    /// Collects key parts as text, for assertions.
    #[derive(Default)]
    pub struct Parts(pub Vec<Vec<u8>>);

    impl KeySink for Parts {
        fn part(&mut self, bytes: &[u8]) {
            self.0.push(bytes.to_vec());
        }
    }

    pub fn keys<'a>(
        ip: &str,
        headers: &'a [httparse::Header<'a>],
        path: &'a str,
    ) -> RequestKeys<'a> {
        RequestKeys {
            client_ip: ip.parse().ok(),
            peer_ip: ip.parse().ok(),
            headers: Headers::Raw(headers, &[]),
            path,
            method: "GET",
            authority: "example.com",
            port: 80,
            sni: None,
            peer_principal: None,
            principal: None,
            claims: None,
        }
    }

    #[test]
    fn templates_match_and_capture() {
        let t = PathTemplate::parse("/users/{id}/orders/*").unwrap();
        let mut p = Parts::default();
        assert!(t.check("/users/42/orders/7", true, &mut p));
        assert_eq!(p.0, [b"42".to_vec()]);
        assert!(!t.check("/users/42/orders", true, &mut Parts::default()));
        assert!(!t.check("/users/42/orders/7/x", true, &mut Parts::default()));
        assert!(!t.check("/users//orders/7", true, &mut Parts::default()));
        let t = PathTemplate::parse("/files/**").unwrap();
        assert!(t.check("/files/a/b/c", false, &mut Parts::default()));
        assert!(t.check("/files", false, &mut Parts::default()));
        assert!(!t.check("/other/a", false, &mut Parts::default()));
        assert!(PathTemplate::parse("/a/**/b").is_err());
        assert!(PathTemplate::parse("a").is_err());
        assert!(PathTemplate::parse("/a{b}").is_err());
    }

    #[test]
    fn conditions_select_and_key() {
        let c = Condition {
            headers: vec![
                (
                    "x-user".into(),
                    ValueMatch {
                        test: ValueTest::Distinct,
                        invert: false,
                    },
                ),
                (
                    "x-tier".into(),
                    ValueMatch {
                        test: ValueTest::Exact("free".into()),
                        invert: false,
                    },
                ),
            ],
            source: Some(SourceMatch {
                net: "10.0.0.0/8".parse().unwrap(),
                distinct: true,
            }),
            ..Default::default()
        };
        let s = Selector {
            conditions: vec![c],
        };
        let h = [
            httparse::Header {
                name: "X-User",
                value: b"alice",
            },
            httparse::Header {
                name: "x-tier",
                value: b"free",
            },
        ];
        let mut p = Parts::default();
        assert!(s.select(&keys("10.1.2.3", &h, "/"), &mut p));
        assert_eq!(p.0, [vec![10, 1, 2, 3], b"alice".to_vec()]);
        assert!(!s.select(&keys("192.0.2.1", &h, "/"), &mut Parts::default()));
        assert!(!s.select(&keys("10.1.2.3", &h[..1], "/"), &mut Parts::default()));
        let inverted = ValueMatch {
            test: ValueTest::Exact("free".into()),
            invert: true,
        };
        assert!(inverted.check(None, &mut Parts::default()));
        assert!(!inverted.check(Some("free"), &mut Parts::default()));
    }
}
