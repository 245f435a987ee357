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
    pub cors: Option<Cors>,
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

#[derive(Debug, Clone)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct(DirectResponse),
}

#[derive(Debug, Clone)]
pub struct Forward {
    pub destinations: Vec<WeightedDestination>,
    /// Sum of the weights; `pick` draws in `0..total`.
    pub total_weight: u32,
    pub rewrite: Option<Rewrite>,
    /// Whole request, retries included; `None` = no timeout (Istio's default).
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
}

/// Istio HTTPRetry, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries, not tries: at most `1 + attempts` tries.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// Base interval of the exponential backoff (full jitter, capped at 10×).
    pub backoff: Duration,
}

impl RetryPolicy {
    /// Istio's default when a route has no `retries`: 2 retries on connect-failure,
    /// refused-stream, unavailable, cancelled, retriable-status-codes.
    pub fn istio_default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                ..RetryOn::default()
            },
            backoff: Duration::from_millis(25),
        }
    }

    /// A response with `status` after `retries` retries is passed on because the retries
    /// ran out, not because its status was fine: Envoy flags it `URX`.
    pub fn exhausted_on(&self, status: u16, retries: u32) -> bool {
        self.attempts > 0 && retries >= self.attempts && self.on.status(status)
    }

    /// The pause before retry number `retry` (1-based).
    pub fn backoff_for(&self, retry: u32) -> Duration {
        let cap = self.backoff * 10;
        let exp = self
            .backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(10))
            .min(cap);
        exp.mul_f64(fastrand::f64())
    }
}

/// The conditions of `retryOn`.
#[derive(Debug, Clone, Default)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    /// Plain status codes and `retriable-status-codes`.
    pub codes: Vec<u16>,
}

impl RetryOn {
    /// Parses Envoy's `x-envoy-retry-on` names and plain status codes.
    pub fn parse(text: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "refused-stream" | "http3-post-connect-failure" => on.refused_stream = true,
                "retriable-4xx" => on.retriable_4xx = true,
                // gRPC status conditions: Portico does not proxy gRPC status yet; accepted
                // because Istio's default list contains them.
                "retriable-status-codes"
                | "unavailable"
                | "cancelled"
                | "deadline-exceeded"
                | "internal"
                | "resource-exhausted" => {}
                code => match code.parse::<u16>() {
                    Ok(c) if (100..600).contains(&c) => on.codes.push(c),
                    _ => return Err(format!("unknown retryOn condition {code:?}")),
                },
            }
        }
        Ok(on)
    }

    pub fn status(&self, status: u16) -> bool {
        (self.five_xx && status >= 500)
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || self.codes.contains(&status)
    }

    pub fn connect(&self) -> bool {
        self.connect_failure || self.five_xx || self.gateway_error
    }

    /// The upstream closed or reset the connection before answering. (`refused-stream`
    /// is not a reset: it is an h2 upstream's refusal of a request it never processed.)
    pub fn reset(&self) -> bool {
        self.reset || self.five_xx
    }

    /// A try timed out (`perTryTimeout`).
    pub fn timeout(&self) -> bool {
        self.five_xx || self.gateway_error
    }
}

/// Istio HTTPFaultInjection: percentages in 0..=100.
#[derive(Debug, Clone)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

/// Whether an event with probability `percent` (0-100) happens this time.
pub fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    pub percent: f64,
}

/// Istio CorsPolicy, compiled to header values.
#[derive(Debug, Clone)]
pub struct Cors {
    pub allow_origins: Vec<super::StrMatch>,
    pub allow_methods: Option<HeaderValue>,
    pub allow_headers: Option<HeaderValue>,
    pub expose_headers: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub allow_credentials: bool,
}

impl Cors {
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| m.matches(origin))
    }
}

#[derive(Debug, Clone)]
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

/// The operations on one message's headers. `set` and `add` keep each name as the bytes
/// pingora's case map stores (`IntoCaseHeaderName`: title case for standard headers, lower
/// case otherwise), made once when the config compiles: given a `HeaderName`, pingora makes
/// those bytes, an allocation and a copy for a non-standard name, on every request.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(Bytes, HeaderValue)>,
    pub add: Vec<(Bytes, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// The name in the form `set` and `add` hold it.
    pub fn wire_name(name: HeaderName) -> Bytes {
        use pingora_http::IntoCaseHeaderName;
        Bytes::copy_from_slice(name.into_case_header_name().as_slice())
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
