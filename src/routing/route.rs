//! Compiled routes and what they do: forward (weighted), redirect, direct response.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use super::matcher::{RequestMatch, RequestView};
use crate::upstream::Cluster;

/// One `http` route of a VirtualService.
#[derive(Debug)]
pub struct Route {
    /// `name` of the route, if set.
    pub name: Option<String>,
    /// The VirtualService (`namespace/name`) and index it came from, for `portico routes`
    /// and logs.
    pub origin: RouteOrigin,
    /// OR of match blocks; empty matches everything.
    pub matches: Vec<RequestMatch>,
    pub action: Action,
    pub headers: HeaderRules,
}

#[derive(Debug, Clone)]
pub struct RouteOrigin {
    pub virtual_service: String,
    pub index: usize,
}

impl std::fmt::Display for RouteOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.http[{}]", self.virtual_service, self.index)
    }
}

impl Route {
    /// The index of the first match block that holds (0 for a route without matches).
    pub fn matches(&self, req: &RequestView<'_>) -> Option<usize> {
        if self.matches.is_empty() {
            return Some(0);
        }
        self.matches.iter().position(|m| m.matches(req))
    }

    pub fn is_catch_all(&self) -> bool {
        self.matches.is_empty() || self.matches.iter().any(RequestMatch::is_catch_all)
    }
}

#[derive(Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct(DirectResponse),
}

#[derive(Debug)]
pub struct Forward {
    pub destinations: Vec<WeightedDestination>,
    /// Sum of the weights; `pick` draws in `0..total`.
    pub total_weight: u32,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
pub struct WeightedDestination {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    pub headers: HeaderRules,
}

impl Forward {
    /// Weighted choice: destination `i` is chosen with probability `weight_i / total`.
    pub fn pick(&self) -> usize {
        if self.destinations.len() == 1 {
            return 0;
        }
        let mut draw = fastrand::u32(0..self.total_weight);
        for (i, d) in self.destinations.iter().enumerate() {
            if draw < d.weight {
                return i;
            }
            draw -= d.weight;
        }
        self.destinations.len() - 1
    }
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<HeaderValue>,
}

impl Rewrite {
    /// The new path (with the original query) for a request whose path matched with
    /// `matched_prefix` (replaced) or otherwise (the whole path is replaced).
    pub fn path(
        &self,
        path: &str,
        query: Option<&str>,
        matched_prefix: Option<&str>,
    ) -> Option<String> {
        let new = self.uri.as_deref()?;
        let mut out = match matched_prefix {
            Some(prefix) if path.len() >= prefix.len() => {
                let mut s = String::with_capacity(new.len() + path.len());
                s.push_str(new);
                s.push_str(&path[prefix.len()..]);
                s
            }
            _ => new.to_string(),
        };
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    pub code: u16,
}

impl Redirect {
    /// The `Location` for a request. Default ports (80 for http, 443 for https) are never
    /// written.
    pub fn location(&self, scheme: &str, host: &str, path: &str, query: Option<&str>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(scheme);
        let (req_host, req_port) = split_port(host);
        let host = self.authority.as_deref().unwrap_or(req_host);
        let port = match self.port {
            Some(p) => Some(p),
            None if self.authority.is_some() || self.scheme.is_some() => None,
            None => req_port,
        };
        let mut out = String::with_capacity(64);
        out.push_str(scheme);
        out.push_str("://");
        out.push_str(host);
        if let Some(p) = port {
            let default = (scheme == "http" && p == 80) || (scheme == "https" && p == 443);
            if !default {
                out.push(':');
                out.push_str(&p.to_string());
            }
        }
        match &self.uri {
            Some(uri) => {
                out.push_str(uri);
                if !uri.contains('?') {
                    if let Some(q) = query {
                        out.push('?');
                        out.push_str(q);
                    }
                }
            }
            None => {
                out.push_str(path);
                if let Some(q) = query {
                    out.push('?');
                    out.push_str(q);
                }
            }
        }
        out
    }
}

fn split_port(host: &str) -> (&str, Option<u16>) {
    match host.rfind(':') {
        Some(i) if !host.ends_with(']') => match host[i + 1..].parse() {
            Ok(p) => (&host[..i], Some(p)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

#[derive(Debug, Clone)]
pub struct DirectResponse {
    pub status: u16,
    pub body: Bytes,
}

/// Header operations of a route or destination, with names and values parsed.
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply_request(&self, h: &mut pingora_http::RequestHeader) {
        for name in &self.remove {
            h.remove_header(name);
        }
        for (name, value) in &self.set {
            let _ = h.insert_header(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            let _ = h.append_header(name.clone(), value.clone());
        }
    }

    pub fn apply_response(&self, h: &mut pingora_http::ResponseHeader) {
        for name in &self.remove {
            h.remove_header(name);
        }
        for (name, value) in &self.set {
            let _ = h.insert_header(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            let _ = h.append_header(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_locations() {
        let r = Redirect {
            uri: Some("/new".into()),
            authority: None,
            port: None,
            scheme: None,
            code: 301,
        };
        assert_eq!(
            r.location("http", "a.com:8080", "/old", Some("x=1")),
            "http://a.com:8080/new?x=1"
        );
        let r = Redirect {
            uri: None,
            authority: Some("b.com".into()),
            port: None,
            scheme: Some("https".into()),
            code: 302,
        };
        assert_eq!(
            r.location("http", "a.com:8080", "/p", None),
            "https://b.com/p"
        );
        let r = Redirect {
            uri: None,
            authority: None,
            port: Some(443),
            scheme: Some("https".into()),
            code: 308,
        };
        assert_eq!(r.location("http", "a.com", "/p", None), "https://a.com/p");
    }

    #[test]
    fn rewrite_prefix_or_whole_path() {
        let rw = Rewrite {
            uri: Some("/v2/".into()),
            authority: None,
        };
        assert_eq!(
            rw.path("/api/x", Some("y=1"), Some("/api/")).unwrap(),
            "/v2/x?y=1"
        );
        assert_eq!(rw.path("/exact", None, None).unwrap(), "/v2/");
    }
}
