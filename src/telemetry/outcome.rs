//! How a request or connection ended, typed: Envoy's response flags as one enum, so every
//! codec, the L4 proxy and the forward proxy name an outcome the same way and the log,
//! the metrics and the traces read one value.

use std::fmt;

/// Envoy's response flags that Portico sets (`%RESPONSE_FLAGS%`, the `response_flags`
/// label of Istio's metrics). `None` is written `-` in logs and as an empty label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Flag {
    #[default]
    None,
    /// `NR`: no route (or no filter chain) for the request or connection.
    NoRoute,
    /// `UH`: no healthy endpoint in the cluster.
    NoHealthyUpstream,
    /// `UF`: the upstream connection failed.
    UpstreamConnectFailure,
    /// `UO`: the circuit breaker's limits were reached.
    UpstreamOverflow,
    /// `URX`: the retry limit was reached with the last try failing to connect or reset.
    UpstreamRetryLimitExceeded,
    /// `UT`: the route's timeout or the try's time ran out.
    UpstreamRequestTimeout,
    /// `UC`: the upstream closed or reset the connection.
    UpstreamConnectionTermination,
    /// `DC`: the client closed the connection.
    DownstreamConnectionTermination,
    /// `UPE`: the upstream's response broke HTTP.
    UpstreamProtocolError,
    /// `DPE`: the client's request broke HTTP.
    DownstreamProtocolError,
    /// `DI`: a fault delay was injected.
    DelayInjected,
    /// `FI`: a fault abort was injected.
    FaultInjected,
    /// `SI`: the stream idle timeout fired.
    StreamIdleTimeout,
    /// `RL`: a rate limit refused the request.
    RateLimited,
    /// `RLSE`: the rate limit service (Redis) failed and the policy fails closed.
    RateLimitServiceError,
    /// `OM`: the overload manager refused the request (Portico: a request cap,
    /// `maxRequests` or `maxRequestsPerClient`, was reached).
    OverloadManager,
    /// `NC`: the cluster a connection names does not exist (an AUTO_PASSTHROUGH SNI of
    /// no known service, port or subset).
    NoClusterFound,
    /// `UAEX`: the external authorizer (AuthorizationPolicy CUSTOM) denied the request,
    /// or could not be asked and the provider fails closed.
    UnauthorizedExternalService,
}

impl Flag {
    /// Envoy's short name; empty for `None`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Flag::None => "",
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnectFailure => "UF",
            Flag::UpstreamOverflow => "UO",
            Flag::UpstreamRetryLimitExceeded => "URX",
            Flag::UpstreamRequestTimeout => "UT",
            Flag::UpstreamConnectionTermination => "UC",
            Flag::DownstreamConnectionTermination => "DC",
            Flag::UpstreamProtocolError => "UPE",
            Flag::DownstreamProtocolError => "DPE",
            Flag::DelayInjected => "DI",
            Flag::FaultInjected => "FI",
            Flag::StreamIdleTimeout => "SI",
            Flag::RateLimited => "RL",
            Flag::RateLimitServiceError => "RLSE",
            Flag::OverloadManager => "OM",
            Flag::NoClusterFound => "NC",
            Flag::UnauthorizedExternalService => "UAEX",
        }
    }

    /// The body of the gateway's own reply when it ends a request with this flag before
    /// any upstream answered (Envoy's wording where Envoy has one).
    pub const fn reply_text(self) -> &'static str {
        match self {
            Flag::NoHealthyUpstream => "no healthy upstream",
            Flag::UpstreamRequestTimeout => "upstream request timeout",
            Flag::UpstreamOverflow => "upstream overflow",
            Flag::OverloadManager => "too many requests in flight",
            Flag::UpstreamConnectFailure | Flag::UpstreamRetryLimitExceeded => {
                "upstream connect error"
            }
            _ => "local reply",
        }
    }

    pub const fn is_none(self) -> bool {
        matches!(self, Flag::None)
    }

    /// After retries, a connect failure or a reset is reported as the retry limit (`URX`),
    /// as Envoy reports it; other flags stay.
    pub const fn after_retries(self, retried: bool) -> Flag {
        match self {
            Flag::UpstreamConnectFailure | Flag::UpstreamConnectionTermination if retried => {
                Flag::UpstreamRetryLimitExceeded
            }
            f => f,
        }
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_none() { "-" } else { self.as_str() })
    }
}

/// Envoy's `response_code_details` (`%RESPONSE_CODE_DETAILS%`): why a request got the
/// answer it got, one value for every codec. `None` is written `-` in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Details {
    #[default]
    None,
    /// The upstream's response was passed on.
    ViaUpstream,
    RouteNotFound,
    DirectResponse,
    CorsResponse,
    FaultFilterAbort,
    /// An ACME HTTP-01 challenge answered by the gateway.
    AcmeHttp01Challenge,
    /// A request cap (`maxRequests`, `maxRequestsPerClient`) was reached.
    Overload,
    ExtAuthzDenied,
    ExtAuthzError,
    LocalRateLimited,
    RequestRateLimited,
    RateLimiterError,
    AccessListDenied,
    /// An AuthorizationPolicy refused the request:
    /// `rbac_access_denied_matched_policy[ns[NS]-policy[NAME]-rule[I]]` (or `[none]`),
    /// made once when the policy is compiled.
    Rbac(&'static str),
    /// A JWT was refused (`jwt_authn_access_denied{...}`).
    Jwt(crate::policy::jwt::Failure),
    /// The request path could not be normalized.
    Path(crate::routing::path::PathError),
    // Request hygiene (`proxy::check`).
    MissingHostHeader,
    InvalidAuthority,
    DuplicateHostHeader,
    InvalidContentLength,
    DuplicateContentLength,
    ContentLengthAndChunked,
    UnsupportedTransferEncoding,
    TransferEncodingInHttp10,
    RequestHeadersTooLarge,
    UriTooLong,
    CodecError,
    RequestHeaderTimeout,
    RequestBodyTimeout,
    // The forward proxy.
    EgressDenied,
    BadRequest,
    /// A CONNECT tunnel was opened.
    Tunnel,
    // Failures, after any retries (also the L4 proxy's).
    NoHealthyUpstream,
    UpstreamConnectFailure,
    UpstreamConnectionTermination,
    UpstreamOverflow,
    UpstreamProtocolError,
    ResponseTimeout,
    DownstreamRemoteDisconnect,
    // The L4 proxy's.
    FilterChainNotFound,
    ClusterNotFound,
    InvalidClientHello,
    ClientHelloTimeout,
}

impl Details {
    /// Envoy's text; empty for `None`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Details::None => "",
            Details::ViaUpstream => "via_upstream",
            Details::RouteNotFound => "route_not_found",
            Details::DirectResponse => "direct_response",
            Details::CorsResponse => "cors_response",
            Details::FaultFilterAbort => "fault_filter_abort",
            Details::AcmeHttp01Challenge => "acme_http01_challenge",
            Details::Overload => "overload",
            Details::ExtAuthzDenied => "ext_authz_denied",
            Details::ExtAuthzError => "ext_authz_error",
            Details::LocalRateLimited => "local_rate_limited",
            Details::RequestRateLimited => "request_rate_limited",
            Details::RateLimiterError => "rate_limiter_error",
            Details::AccessListDenied => "access_list_denied",
            Details::Rbac(text) => text,
            Details::Jwt(f) => f.details(),
            Details::Path(e) => e.details(),
            Details::MissingHostHeader => "missing_host_header",
            Details::InvalidAuthority => "invalid_authority",
            Details::DuplicateHostHeader => "duplicate_host_header",
            Details::InvalidContentLength => "invalid_content_length",
            Details::DuplicateContentLength => "duplicate_content_length",
            Details::ContentLengthAndChunked => "content_length_and_chunked",
            Details::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Details::TransferEncodingInHttp10 => "http1.invalid_transfer_encoding",
            Details::RequestHeadersTooLarge => "request_headers_too_large",
            Details::UriTooLong => "uri_too_long",
            Details::CodecError => "http1.codec_error",
            Details::RequestHeaderTimeout => "request_header_timeout",
            Details::RequestBodyTimeout => "request_body_timeout",
            Details::EgressDenied => "egress_denied",
            Details::BadRequest => "bad_request",
            Details::Tunnel => "tunnel",
            Details::NoHealthyUpstream => "no_healthy_upstream",
            Details::UpstreamConnectFailure => {
                "upstream_reset_before_response_started{connection_failure}"
            }
            Details::UpstreamConnectionTermination => {
                "upstream_reset_before_response_started{connection_termination}"
            }
            Details::UpstreamOverflow => "upstream_reset_before_response_started{overflow}",
            Details::UpstreamProtocolError => {
                "upstream_reset_before_response_started{protocol_error}"
            }
            Details::ResponseTimeout => "response_timeout",
            Details::DownstreamRemoteDisconnect => "downstream_remote_disconnect",
            Details::FilterChainNotFound => "filter_chain_not_found",
            Details::ClusterNotFound => "cluster_not_found",
            Details::InvalidClientHello => "invalid_client_hello",
            Details::ClientHelloTimeout => "client_hello_timeout",
        }
    }

    pub const fn is_none(self) -> bool {
        matches!(self, Details::None)
    }

    /// The details of a request that ended with `flag` and no details of its own: the
    /// gateway's reply after failed tries, or a client gone mid-request. Every codec's
    /// record takes them from here (Envoy's words for the same ends).
    pub const fn of_flag(flag: Flag) -> Details {
        match flag {
            Flag::NoHealthyUpstream => Details::NoHealthyUpstream,
            Flag::UpstreamConnectFailure | Flag::UpstreamRetryLimitExceeded => {
                Details::UpstreamConnectFailure
            }
            Flag::UpstreamConnectionTermination => Details::UpstreamConnectionTermination,
            Flag::UpstreamOverflow => Details::UpstreamOverflow,
            Flag::UpstreamProtocolError => Details::UpstreamProtocolError,
            Flag::UpstreamRequestTimeout => Details::ResponseTimeout,
            Flag::DownstreamConnectionTermination => Details::DownstreamRemoteDisconnect,
            _ => Details::None,
        }
    }

    /// These details, or when there are none, those of `flag`.
    pub const fn or_flag(self, flag: Flag) -> Details {
        match self {
            Details::None => Details::of_flag(flag),
            d => d,
        }
    }
}

impl fmt::Display for Details {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_none() { "-" } else { self.as_str() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_without_their_own_come_from_the_flag() {
        assert_eq!(Details::None.to_string(), "-");
        assert_eq!(
            Details::None.or_flag(Flag::NoHealthyUpstream).as_str(),
            "no_healthy_upstream"
        );
        assert_eq!(
            Details::None
                .or_flag(Flag::UpstreamRetryLimitExceeded)
                .as_str(),
            "upstream_reset_before_response_started{connection_failure}"
        );
        assert_eq!(
            Details::DirectResponse.or_flag(Flag::FaultInjected),
            Details::DirectResponse
        );
        assert_eq!(Details::None.or_flag(Flag::FaultInjected), Details::None);
        assert_eq!(
            Details::Path(crate::routing::path::PathError::EscapedSlash).as_str(),
            "escaped_slashes_rejected"
        );
    }

    #[test]
    fn names_are_envoys() {
        assert_eq!(Flag::UpstreamRetryLimitExceeded.as_str(), "URX");
        assert_eq!(Flag::None.to_string(), "-");
        assert_eq!(Flag::DownstreamProtocolError.to_string(), "DPE");
    }

    #[test]
    fn only_connect_failures_and_resets_become_the_retry_limit() {
        assert_eq!(
            Flag::UpstreamConnectFailure.after_retries(true),
            Flag::UpstreamRetryLimitExceeded
        );
        assert_eq!(
            Flag::UpstreamConnectionTermination.after_retries(true),
            Flag::UpstreamRetryLimitExceeded
        );
        assert_eq!(
            Flag::UpstreamConnectFailure.after_retries(false),
            Flag::UpstreamConnectFailure
        );
        assert_eq!(
            Flag::UpstreamRequestTimeout.after_retries(true),
            Flag::UpstreamRequestTimeout
        );
    }
}
