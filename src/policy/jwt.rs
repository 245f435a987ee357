//! Request authentication: Istio's RequestAuthentication as Envoy's `jwt_authn` filter
//! runs it. Finds a request's token where the rules say, and checks it in Envoy's order
//! (format, issuer, time with 60 s of clock skew, audiences, then the signature against
//! the issuer's key set). A bad token is a [`Failure`] (401, or 403 for audiences, with
//! Envoy's words); no token is no identity, not a failure. A good one is [`Verified`]:
//! the principal (`iss/sub`), the claims, and the edits the upstream request gets.
//!
//! Signatures are checked by `jsonwebtoken` (ring); nothing here hand-verifies. Rules are
//! compiled at load; per request this parses the token's two JSON parts and verifies one
//! signature (keys are ring public keys made when the set was parsed).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::jwks::{Jwks, KeySet};
use super::Claims;
use crate::routing::RequestView;

/// Envoy's default `clock_skew_seconds`.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The longest request URI the `WWW-Authenticate` realm repeats (Envoy's).
const MAX_REALM_PATH: usize = 256;

/// Where a rule looks for its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header (name lowercase), its value after `prefix` (matched without case).
    Header { name: String, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl Location {
    /// Istio's default: `Authorization: Bearer <token>`, then `?access_token=<token>`.
    pub fn defaults() -> Vec<Location> {
        vec![
            Location::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ]
    }

    fn find<'r>(&'r self, view: &RequestView<'r>) -> Option<Cow<'r, str>> {
        match self {
            Location::Header { name, prefix } => {
                view.headers.values(name).flatten().find_map(|v| {
                    let v = v.trim();
                    let rest = match v.get(..prefix.len()) {
                        Some(p) if p.eq_ignore_ascii_case(prefix) => &v[prefix.len()..],
                        _ => return None,
                    };
                    let t = rest.trim();
                    (!t.is_empty()).then_some(Cow::Borrowed(t))
                })
            }
            Location::Param(name) => view.query?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name && !v.is_empty()).then(|| percent_decode(v))
            }),
            Location::Cookie(name) => view.headers.values("cookie").flatten().find_map(|c| {
                c.split(';').find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name && !v.is_empty()).then_some(Cow::Borrowed(v.trim_matches('"')))
                })
            }),
        }
    }
}

fn percent_decode(v: &str) -> Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return Cow::Borrowed(v);
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(c) => {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// One compiled `jwtRules` entry.
pub struct JwtRule {
    pub issuer: String,
    /// Accepted audiences, normalized as Envoy compares them; empty: any.
    audiences: Vec<String>,
    pub jwks: Jwks,
    locations: Vec<Location>,
    /// `outputPayloadToHeader`, lowercase.
    output_payload: Option<String>,
    /// `outputClaimToHeaders`: header (lowercase), claim (`a.b` nested).
    output_claims: Vec<(String, String)>,
    /// `forwardOriginalToken`.
    forward: bool,
}

/// What a [`JwtRule`] is made of (the compile step checks each part).
pub struct RuleParts {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: Jwks,
    /// Empty: the defaults.
    pub locations: Vec<Location>,
    pub output_payload: Option<String>,
    pub output_claims: Vec<(String, String)>,
    pub forward: bool,
}

impl JwtRule {
    pub fn new(p: RuleParts) -> JwtRule {
        JwtRule {
            issuer: p.issuer,
            audiences: p
                .audiences
                .iter()
                .map(|a| normal_audience(a).to_string())
                .collect(),
            jwks: p.jwks,
            locations: if p.locations.is_empty() {
                Location::defaults()
            } else {
                p.locations
            },
            output_payload: p.output_payload.map(|h| h.to_ascii_lowercase()),
            output_claims: p
                .output_claims
                .into_iter()
                .map(|(h, c)| (h.to_ascii_lowercase(), c))
                .collect(),
            forward: p.forward,
        }
    }

    fn outputs(&self) -> impl Iterator<Item = &str> {
        self.output_payload
            .iter()
            .map(String::as_str)
            .chain(self.output_claims.iter().map(|(h, _)| h.as_str()))
    }
}

/// Envoy's audience comparison ignores an `http://` or `https://` scheme and a trailing
/// `/`.
fn normal_audience(a: &str) -> &str {
    let a = a
        .strip_prefix("https://")
        .or_else(|| a.strip_prefix("http://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

/// Why a token was refused: Envoy's `jwt_verify` statuses that apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    BadFormat,
    HeaderBadBase64,
    HeaderBadJson,
    HeaderBadAlg,
    HeaderNotImplementedAlg,
    HeaderBadKid,
    PayloadBadBase64,
    PayloadBadJson,
    IssNotString,
    SubNotString,
    NbfNotInteger,
    ExpNotInteger,
    AudNotString,
    SignatureBadBase64,
    UnknownIssuer,
    NotYetValid,
    Expired,
    AudienceNotAllowed,
    KidAlgMismatch,
    JwksFetchFail,
    VerificationFail,
}

macro_rules! failures {
    ($($v:ident => $text:literal, $details:literal;)*) => {
        impl Failure {
            /// Envoy's words: the answer's body.
            pub const fn text(self) -> &'static str {
                match self { $(Failure::$v => $text,)* }
            }

            /// Envoy's `response_code_details`: `jwt_authn_access_denied{...}` with the
            /// words joined by `_`.
            pub const fn details(self) -> &'static str {
                match self { $(Failure::$v => $details,)* }
            }
        }
    };
}

failures! {
    BadFormat => "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        "jwt_authn_access_denied{Jwt_is_not_in_the_form_of_Header.Payload.Signature_with_two_dots_and_3_sections}";
    HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
        "jwt_authn_access_denied{Jwt_header_is_an_invalid_Base64url_encoded}";
    HeaderBadJson => "Jwt header is an invalid JSON",
        "jwt_authn_access_denied{Jwt_header_is_an_invalid_JSON}";
    HeaderBadAlg => "Jwt header [alg] field is required and must be a string",
        "jwt_authn_access_denied{Jwt_header_[alg]_field_is_required_and_must_be_a_string}";
    HeaderNotImplementedAlg => "Jwt header [alg] is not supported",
        "jwt_authn_access_denied{Jwt_header_[alg]_is_not_supported}";
    HeaderBadKid => "Jwt header [kid] field is not a string",
        "jwt_authn_access_denied{Jwt_header_[kid]_field_is_not_a_string}";
    PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
        "jwt_authn_access_denied{Jwt_payload_is_an_invalid_Base64url_encoded}";
    PayloadBadJson => "Jwt payload is an invalid JSON",
        "jwt_authn_access_denied{Jwt_payload_is_an_invalid_JSON}";
    IssNotString => "Jwt payload [iss] field is not a string",
        "jwt_authn_access_denied{Jwt_payload_[iss]_field_is_not_a_string}";
    SubNotString => "Jwt payload [sub] field is not a string",
        "jwt_authn_access_denied{Jwt_payload_[sub]_field_is_not_a_string}";
    NbfNotInteger => "Jwt payload [nbf] field is not an integer",
        "jwt_authn_access_denied{Jwt_payload_[nbf]_field_is_not_an_integer}";
    ExpNotInteger => "Jwt payload [exp] field is not an integer",
        "jwt_authn_access_denied{Jwt_payload_[exp]_field_is_not_an_integer}";
    AudNotString => "Jwt payload [aud] field is not a string or string list",
        "jwt_authn_access_denied{Jwt_payload_[aud]_field_is_not_a_string_or_string_list}";
    SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
        "jwt_authn_access_denied{Jwt_signature_is_an_invalid_Base64url_encoded}";
    UnknownIssuer => "Jwt issuer is not configured",
        "jwt_authn_access_denied{Jwt_issuer_is_not_configured}";
    NotYetValid => "Jwt not yet valid",
        "jwt_authn_access_denied{Jwt_not_yet_valid}";
    Expired => "Jwt is expired",
        "jwt_authn_access_denied{Jwt_is_expired}";
    AudienceNotAllowed => "Audiences in Jwt are not allowed",
        "jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}";
    KidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
        "jwt_authn_access_denied{Jwks_doesn't_have_key_to_match_kid_or_alg_from_Jwt}";
    JwksFetchFail => "Jwks remote fetch is failed",
        "jwt_authn_access_denied{Jwks_remote_fetch_is_failed}";
    VerificationFail => "Jwt verification fails",
        "jwt_authn_access_denied{Jwt_verification_fails}";
}

impl Failure {
    /// Envoy answers 403 for audiences, 401 for everything else.
    pub const fn status(self) -> u16 {
        match self {
            Failure::AudienceNotAllowed => 403,
            _ => 401,
        }
    }
}

/// A refused token and the `WWW-Authenticate` field of the answer.
#[derive(Debug)]
pub struct Refused {
    pub failure: Failure,
    /// `Bearer realm="<request URL>", error="invalid_token"`, as Envoy writes it.
    pub challenge: String,
}

/// Edits of the upstream request that authentication makes: fields removed (the token's
/// header unless it is forwarded; every output header a client might have sent) and
/// fields added (the outputs of a verified token). Applied by
/// `request::upstream_request_headers` for every codec, before the route's operations.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UpstreamEdits {
    /// Lowercase names.
    pub remove: Vec<String>,
    pub add: Vec<(String, Bytes)>,
}

impl UpstreamEdits {
    pub fn removes(&self, name: &[u8]) -> bool {
        self.remove
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r.as_bytes()))
    }
}

/// A verified token: its principal, its claims, and its edits of the upstream request.
///
/// The claims are the payload's JSON object. As [`Claims`]: `claim("a")` is a string
/// claim's value (`"a.b"` looks into nested objects when there is no claim named `a.b`);
/// `any_value(&["a", "b"], f)` tries every value of nested claim `a.b` — each element of a
/// list, a string (each space-separated word of `scope` and `permission`, as Istio splits
/// them), and numbers and booleans as JSON writes them. `request.auth.claims[groups]`
/// holds for a list claim when any element matches.
#[derive(Debug)]
pub struct Verified {
    /// `iss/sub`.
    pub principal: String,
    pub claims: Map<String, Value>,
    pub edits: UpstreamEdits,
}

/// The claim at `name`: a top-level claim of that name, or else the nested one `a.b.c`
/// names.
fn lookup<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

fn scalar_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

impl Claims for Verified {
    fn claim(&self, name: &str) -> Option<&str> {
        lookup(&self.claims, name).and_then(Value::as_str)
    }

    fn any_value(&self, path: &[&str], f: &mut dyn FnMut(&str) -> bool) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return false;
        };
        let Some(mut v) = self.claims.get(*first) else {
            return false;
        };
        for p in rest {
            match v.as_object().and_then(|o| o.get(*p)) {
                Some(next) => v = next,
                None => return false,
            }
        }
        let last = path[path.len() - 1];
        match v {
            Value::Array(items) => items.iter().filter_map(scalar_text).any(|s| f(&s)),
            Value::String(s) if path.len() == 1 && (last == "scope" || last == "permission") => {
                s.split(' ').filter(|w| !w.is_empty()).any(f)
            }
            other => scalar_text(other).is_some_and(|s| f(&s)),
        }
    }
}

/// The JWT rules that apply to a route: those of every RequestAuthentication covering it.
pub struct Authn {
    rules: Vec<Arc<JwtRule>>,
    /// Every rule's output headers: a client's fields of these names never go upstream.
    outputs: Vec<String>,
}

impl std::fmt::Debug for Authn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let issuers: Vec<_> = self.rules.iter().map(|r| r.issuer.as_str()).collect();
        f.debug_struct("Authn").field("issuers", &issuers).finish()
    }
}

/// The parts of a token before its signature is checked.
struct Token<'t> {
    alg: Algorithm,
    kid: Option<String>,
    /// `header.payload`, what was signed.
    message: &'t str,
    payload_b64: &'t str,
    signature: &'t str,
    claims: Map<String, Value>,
}

fn b64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

fn parse(token: &str) -> Result<Token<'_>, Failure> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Failure::BadFormat);
    };
    let header = b64(h).ok_or(Failure::HeaderBadBase64)?;
    let header: Value = serde_json::from_slice(&header).map_err(|_| Failure::HeaderBadJson)?;
    let header = header.as_object().ok_or(Failure::HeaderBadJson)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(Failure::HeaderBadAlg)?;
    // HMAC keys are secrets: a gateway verifying with public key sets has none.
    let alg = match alg.parse::<Algorithm>() {
        Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => {
            return Err(Failure::HeaderNotImplementedAlg)
        }
        Ok(a) => a,
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(Failure::HeaderBadKid),
    };
    let payload = b64(p).ok_or(Failure::PayloadBadBase64)?;
    let payload: Value = serde_json::from_slice(&payload).map_err(|_| Failure::PayloadBadJson)?;
    let Value::Object(claims) = payload else {
        return Err(Failure::PayloadBadJson);
    };
    let string = |name, fail| match claims.get(name) {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(fail),
    };
    string("iss", Failure::IssNotString)?;
    string("sub", Failure::SubNotString)?;
    let int = |name, fail| match claims.get(name) {
        None => Ok(()),
        Some(v) if v.as_u64().is_some() => Ok(()),
        Some(_) => Err(fail),
    };
    int("nbf", Failure::NbfNotInteger)?;
    int("exp", Failure::ExpNotInteger)?;
    match claims.get("aud") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(_) => return Err(Failure::AudNotString),
    }
    Ok(Token {
        alg,
        kid,
        message: &token[..h.len() + 1 + p.len()],
        payload_b64: p,
        signature: s,
        claims,
    })
}

impl Authn {
    pub fn new(rules: Vec<Arc<JwtRule>>) -> Authn {
        let mut outputs: Vec<String> = Vec::new();
        for r in &rules {
            for o in r.outputs() {
                if !outputs.iter().any(|x| x == o) {
                    outputs.push(o.to_string());
                }
            }
        }
        Authn { rules, outputs }
    }

    /// The issuers of the rules, in order (for `portico routes`).
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.issuer.as_str())
    }

    /// The request's token, where it was found, checked. `Ok(None)`: no token, so no
    /// identity (authorization decides). `Err`: refuse the request. Waits only when the
    /// issuer's remote key set lacks the token's key (a refetch, up to its timeout).
    pub async fn authenticate(&self, view: &RequestView<'_>) -> Result<Option<Verified>, Refused> {
        let m = crate::telemetry::Metrics::global();
        let found = self
            .rules
            .iter()
            .flat_map(|r| r.locations.iter())
            .find_map(|l| l.find(view).map(|t| (l, t)));
        let Some((location, token)) = found else {
            m.jwt_requests.with_label_values(&["no_token"]).inc();
            return Ok(None);
        };
        match self.verify(location, &token).await {
            Ok(v) => {
                m.jwt_requests.with_label_values(&["verified"]).inc();
                Ok(Some(v))
            }
            Err(failure) => {
                m.jwt_requests.with_label_values(&["denied"]).inc();
                Err(Refused {
                    failure,
                    challenge: challenge(view),
                })
            }
        }
    }

    /// The edits of a request that has no token: the output headers a client sent go.
    pub fn anonymous_edits(&self) -> Option<UpstreamEdits> {
        (!self.outputs.is_empty()).then(|| UpstreamEdits {
            remove: self.outputs.clone(),
            add: Vec::new(),
        })
    }

    async fn verify(&self, location: &Location, token: &str) -> Result<Verified, Failure> {
        let t = parse(token)?;
        let iss = t.claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let rule = self
            .rules
            .iter()
            .find(|r| r.issuer == iss && r.locations.contains(location))
            .ok_or(Failure::UnknownIssuer)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let time = |name| t.claims.get(name).and_then(Value::as_u64).unwrap_or(0);
        let (nbf, exp) = (time("nbf"), time("exp"));
        if nbf > now + CLOCK_SKEW_SECS {
            return Err(Failure::NotYetValid);
        }
        if exp != 0 && exp < now.saturating_sub(CLOCK_SKEW_SECS) {
            return Err(Failure::Expired);
        }
        if !rule.audiences.is_empty() {
            let allowed = |a: &str| rule.audiences.iter().any(|x| x == normal_audience(a));
            let ok = match t.claims.get("aud") {
                Some(Value::String(a)) => allowed(a),
                Some(Value::Array(l)) => l.iter().filter_map(Value::as_str).any(allowed),
                _ => false,
            };
            if !ok {
                return Err(Failure::AudienceNotAllowed);
            }
        }
        let kid = t.kid.as_deref();
        let set: Arc<KeySet> = match &rule.jwks {
            Jwks::Inline(set) => set.clone(),
            Jwks::Remote(remote) => match remote.current() {
                Some(set) if set.candidates(kid, t.alg).next().is_some() => set,
                // A key the set lacks (a rotation), or no set yet: fetch again, once.
                current => match Box::pin(remote.refetch()).await {
                    Some(set) => set,
                    None if current.is_none() => return Err(Failure::JwksFetchFail),
                    None => return Err(Failure::KidAlgMismatch),
                },
            },
        };
        let mut tried = false;
        for key in set.candidates(kid, t.alg) {
            tried = true;
            match jsonwebtoken::crypto::verify(t.signature, t.message.as_bytes(), &key.key, t.alg) {
                Ok(true) => return Ok(self.verified(rule, location, &t)),
                Ok(false) => {}
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::Base64(_)) => {
                    return Err(Failure::SignatureBadBase64)
                }
                Err(_) => {}
            }
        }
        Err(if tried {
            Failure::VerificationFail
        } else {
            Failure::KidAlgMismatch
        })
    }

    fn verified(&self, rule: &JwtRule, location: &Location, t: &Token<'_>) -> Verified {
        let iss = t.claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let sub = t.claims.get("sub").and_then(Value::as_str).unwrap_or("");
        let mut edits = UpstreamEdits {
            remove: self.outputs.clone(),
            add: Vec::new(),
        };
        if let (false, Location::Header { name, .. }) = (rule.forward, location) {
            if !edits.removes(name.as_bytes()) {
                edits.remove.push(name.clone());
            }
        }
        if let Some(h) = &rule.output_payload {
            edits
                .add
                .push((h.clone(), Bytes::copy_from_slice(t.payload_b64.as_bytes())));
        }
        for (h, claim) in &rule.output_claims {
            let value = match lookup(&t.claims, claim) {
                Some(Value::Array(items)) => {
                    let parts: Vec<_> = items.iter().filter_map(scalar_text).collect();
                    (!parts.is_empty()).then(|| parts.join(","))
                }
                Some(v) => scalar_text(v).map(Cow::into_owned),
                None => None,
            };
            if let Some(v) = value.filter(|v| http::HeaderValue::from_str(v).is_ok()) {
                edits.add.push((h.clone(), Bytes::from(v)));
            }
        }
        Verified {
            principal: format!("{iss}/{sub}"),
            claims: t.claims.clone(),
            edits,
        }
    }
}

/// Envoy's `WWW-Authenticate` for a refused token: the request's URL as the realm.
fn challenge(view: &RequestView<'_>) -> String {
    let mut path = String::with_capacity(view.path.len() + 1 + view.query.map_or(0, str::len));
    path.push_str(view.path);
    if let Some(q) = view.query {
        path.push('?');
        path.push_str(q);
    }
    let mut end = path.len().min(MAX_REALM_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(64 + end + view.authority.len());
    out.push_str("Bearer realm=\"");
    out.push_str(view.scheme);
    out.push_str("://");
    for c in view.authority.chars().chain(path[..end].chars()) {
        match c {
            '"' => out.push_str("%22"),
            '\\' => out.push_str("%5C"),
            c if c.is_ascii_graphic() => out.push(c),
            _ => {}
        }
    }
    out.push_str("\", error=\"invalid_token\"");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Headers;

    fn view<'a>(headers: &'a http::HeaderMap, query: Option<&'a str>) -> RequestView<'a> {
        RequestView {
            method: "GET",
            path: "/p",
            query,
            authority: "example.com",
            scheme: "https",
            headers: Headers::Map(headers),
            port: 443,
            client_ip: None,
            peer_ip: None,
            peer_principal: None,
            sni: None,
            peer: None,
        }
    }

    #[test]
    fn tokens_are_found_where_the_rules_say() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "bearer  abc ".parse().unwrap());
        h.append("cookie", "a=1; session=tok.en.x".parse().unwrap());
        let v = view(&h, Some("x=1&access_token=q%2Eq"));
        let d = Location::defaults();
        assert_eq!(d[0].find(&v).as_deref(), Some("abc"));
        assert_eq!(d[1].find(&v).as_deref(), Some("q.q"));
        assert_eq!(
            Location::Cookie("session".into()).find(&v).as_deref(),
            Some("tok.en.x")
        );
        let basic = Location::Header {
            name: "authorization".into(),
            prefix: "Basic ".into(),
        };
        assert_eq!(basic.find(&v), None);
    }

    #[test]
    fn malformed_tokens_fail_with_envoys_words() {
        assert_eq!(parse("a.b").err(), Some(Failure::BadFormat));
        assert_eq!(parse("a.b.c.d").err(), Some(Failure::BadFormat));
        assert_eq!(parse("!!.b.c").err(), Some(Failure::HeaderBadBase64));
        let h = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let p = h(r#"{"iss":"i"}"#);
        assert_eq!(
            parse(&format!("{}.{p}.s", h(r#"{"alg":"HS256"}"#))).err(),
            Some(Failure::HeaderNotImplementedAlg)
        );
        assert_eq!(
            parse(&format!("{}.{p}.s", h(r#"{"alg":"none"}"#))).err(),
            Some(Failure::HeaderNotImplementedAlg)
        );
        assert_eq!(
            parse(&format!("{}.{p}.s", h(r#"{"typ":"JWT"}"#))).err(),
            Some(Failure::HeaderBadAlg)
        );
        let rs = h(r#"{"alg":"RS256","kid":"k"}"#);
        assert_eq!(
            parse(&format!("{rs}.{}.s", h(r#"{"exp":"soon"}"#))).err(),
            Some(Failure::ExpNotInteger)
        );
        assert_eq!(
            parse(&format!("{rs}.{}.s", h(r#"{"aud":[1]}"#))).err(),
            Some(Failure::AudNotString)
        );
        assert_eq!(
            parse(&format!("{rs}.{}.s", h("[]"))).err(),
            Some(Failure::PayloadBadJson)
        );
        let text = format!("{rs}.{p}.sig");
        let t = parse(&text).unwrap();
        assert_eq!((t.alg, t.kid.as_deref()), (Algorithm::RS256, Some("k")));
        assert_eq!(
            Failure::Expired.details(),
            "jwt_authn_access_denied{Jwt_is_expired}"
        );
        assert_eq!(Failure::AudienceNotAllowed.status(), 403);
    }

    #[test]
    fn claims_nested_and_listed() {
        let claims: Map<String, Value> = serde_json::from_str(
            r#"{"sub":"u","groups":["dev","ops"],"org":{"team":"edge","n":7},
                "scope":"read write","a.b":"flat","admin":true}"#,
        )
        .unwrap();
        let v = Verified {
            principal: "i/u".into(),
            claims,
            edits: UpstreamEdits::default(),
        };
        assert_eq!(v.claim("sub"), Some("u"));
        assert_eq!(v.claim("org.team"), Some("edge"));
        assert_eq!(v.claim("a.b"), Some("flat"));
        assert_eq!(v.claim("groups"), None);
        let any = |path: &[&str], want: &str| v.any_value(path, &mut |s| s == want);
        assert!(any(&["groups"], "ops"));
        assert!(!any(&["groups"], "qa"));
        assert!(any(&["org", "team"], "edge"));
        assert!(any(&["org", "n"], "7"));
        assert!(any(&["scope"], "write"));
        assert!(any(&["admin"], "true"));
        assert!(!any(&["org"], "edge"));
    }

    #[test]
    fn the_realm_is_the_request_url() {
        let h = http::HeaderMap::new();
        let v = view(&h, Some("a=\"1\""));
        assert_eq!(
            challenge(&v),
            "Bearer realm=\"https://example.com/p?a=%221%22\", error=\"invalid_token\""
        );
    }
}
