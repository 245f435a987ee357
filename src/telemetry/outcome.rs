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

#[cfg(test)]
mod tests {
    use super::*;

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
