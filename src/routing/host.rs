//! Host matching: exact names in a hash map, `*.suffix` wildcards in another, then `*`.
//! Lookups take an already lower-cased host and allocate nothing.

use std::borrow::Cow;

// foldhash, not SipHash: the keys come from the config, so there is no table an attacker
// can fill with colliding keys, and every request hashes its Host (and every handshake
// its SNI) here.
use foldhash::HashMap;

#[derive(Debug, Clone)]
pub struct HostMatcher<T> {
    exact: HashMap<String, T>,
    /// Keyed by the suffix including its leading dot: `*.example.com` → `.example.com`.
    wildcard: HashMap<String, T>,
    any: Option<T>,
}

impl<T> Default for HostMatcher<T> {
    fn default() -> Self {
        HostMatcher {
            exact: HashMap::default(),
            wildcard: HashMap::default(),
            any: None,
        }
    }
}

impl<T> HostMatcher<T> {
    /// Inserts under a pattern (`a.example.com`, `*.example.com` or `*`), which must already
    /// be lower case. Returns the previous value for the same pattern.
    pub fn insert(&mut self, pattern: &str, value: T) -> Option<T> {
        if pattern == "*" {
            self.any.replace(value)
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            self.wildcard.insert(suffix.to_string(), value)
        } else {
            self.exact.insert(pattern.to_string(), value)
        }
    }

    /// Room for `n` exact names, so building a large table does not rehash as it grows.
    pub fn with_capacity(n: usize) -> Self {
        HostMatcher {
            exact: HashMap::with_capacity_and_hasher(n, Default::default()),
            ..Self::default()
        }
    }

    /// `insert` taking the pattern by value: an exact name is not copied.
    pub fn insert_owned(&mut self, pattern: String, value: T) -> Option<T> {
        if pattern.starts_with('*') {
            self.insert(&pattern, value)
        } else {
            self.exact.insert(pattern, value)
        }
    }

    pub fn remove_pattern(&mut self, pattern: &str) -> Option<T> {
        if pattern == "*" {
            self.any.take()
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            self.wildcard.remove(suffix)
        } else {
            self.exact.remove(pattern)
        }
    }

    pub fn get_pattern(&self, pattern: &str) -> Option<&T> {
        if pattern == "*" {
            self.any.as_ref()
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            self.wildcard.get(suffix)
        } else {
            self.exact.get(pattern)
        }
    }

    pub fn get_pattern_mut(&mut self, pattern: &str) -> Option<&mut T> {
        if pattern == "*" {
            self.any.as_mut()
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            self.wildcard.get_mut(suffix)
        } else {
            self.exact.get_mut(pattern)
        }
    }

    /// Every pattern with its value, sorted by pattern: for dumps and comparisons, never
    /// on the request path.
    pub fn patterns(&self) -> Vec<(String, &T)> {
        let mut out: Vec<(String, &T)> = self
            .exact
            .iter()
            .map(|(k, v)| (k.clone(), v))
            .chain(self.wildcard.iter().map(|(k, v)| (format!("*{k}"), v)))
            .chain(self.any.iter().map(|v| ("*".to_string(), v)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Exact name first, then the longest wildcard suffix, then `*`.
    pub fn lookup(&self, host: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(host) {
            return Some(v);
        }
        if !self.wildcard.is_empty() {
            // A wildcard needs at least one character before its suffix, so the search starts
            // at the first dot after position 0.
            for (i, _) in host.match_indices('.').filter(|(i, _)| *i > 0) {
                if let Some(v) = self.wildcard.get(&host[i..]) {
                    return Some(v);
                }
            }
        }
        self.any.as_ref()
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + usize::from(self.any.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every pattern with its value (`*.suffix` and `*` spelled out).
    pub fn entries(&self) -> impl Iterator<Item = (String, &T)> {
        self.exact
            .iter()
            .map(|(k, v)| (k.clone(), v))
            .chain(self.wildcard.iter().map(|(k, v)| (format!("*{k}"), v)))
            .chain(self.any.iter().map(|v| ("*".to_string(), v)))
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .chain(self.any.iter())
    }
}

/// The host of a Host header or `:authority`: port stripped, lower-cased (borrowed when it
/// already is). Handles `[v6]:port`.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let host = if let Some(rest) = raw.strip_prefix('[') {
        match rest.find(']') {
            Some(end) => &raw[..end + 2],
            None => raw,
        }
    } else {
        match raw.rfind(':') {
            Some(i) if raw[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &raw[..i],
            _ => raw,
        }
    };
    lowercase(host.strip_suffix('.').unwrap_or(host))
}

/// `host` in lower case, copied only when it is not already.
pub fn lowercase(host: &str) -> Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Does host `pattern` cover `candidate`? Both may be wildcards; `*.example.com` covers
/// `a.b.example.com` and `*.a.example.com` but not `example.com`.
pub fn covers(pattern: &str, candidate: &str) -> bool {
    if pattern == "*" || pattern == candidate {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => candidate.len() > suffix.len() && candidate.ends_with(suffix),
        None => false,
    }
}

/// The narrower of two host patterns when they overlap: the name a server host and a
/// VirtualService host share.
pub fn intersect<'a>(a: &'a str, b: &'a str) -> Option<&'a str> {
    if covers(a, b) {
        Some(b)
    } else if covers(b, a) {
        Some(a)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_then_longest_wildcard_then_any() {
        let mut m = HostMatcher::default();
        m.insert("a.example.com", 1);
        m.insert("*.example.com", 2);
        m.insert("*.b.example.com", 3);
        assert_eq!(m.lookup("a.example.com"), Some(&1));
        assert_eq!(m.lookup("x.example.com"), Some(&2));
        assert_eq!(m.lookup("x.y.example.com"), Some(&2));
        assert_eq!(m.lookup("x.b.example.com"), Some(&3));
        assert_eq!(m.lookup("example.com"), None);
        m.insert("*", 4);
        assert_eq!(m.lookup("example.com"), Some(&4));
        assert_eq!(m.lookup(".example.com"), Some(&4));
        // Removing a pattern removes only that pattern.
        assert_eq!(m.remove_pattern("*.b.example.com"), Some(3));
        assert_eq!(m.lookup("x.b.example.com"), Some(&2));
        assert_eq!(m.remove_pattern("a.example.com"), Some(1));
        assert_eq!(m.lookup("a.example.com"), Some(&2));
        assert_eq!(m.remove_pattern("*"), Some(4));
        assert_eq!(m.lookup("example.com"), None);
        assert_eq!(m.remove_pattern("*"), None);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn normalizes_host_header() {
        assert_eq!(normalize_host("Shop.Example.COM:8443"), "shop.example.com");
        assert_eq!(normalize_host("shop.example.com"), "shop.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert!(matches!(normalize_host("a.b"), Cow::Borrowed(_)));
    }

    #[test]
    fn intersections() {
        assert_eq!(intersect("*", "a.com"), Some("a.com"));
        assert_eq!(intersect("*.com", "a.com"), Some("a.com"));
        assert_eq!(intersect("*.com", "*.a.com"), Some("*.a.com"));
        assert_eq!(intersect("*.example.com", "example.com"), None);
        assert_eq!(intersect("a.com", "b.com"), None);
    }
}
