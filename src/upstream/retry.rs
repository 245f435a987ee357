//! Whether a failed try may be tried again, and whether it counts against the endpoint.
//! One rule for every codec. Never touches sockets: the codec says what happened.
//!
//! Envoy's rules, which Istio users expect: nothing is tried again once a response head
//! came back (a partial body is ended by closing the client's stream, never completed
//! with another try's bytes); a request that may have reached the upstream is sent again
//! only when its method is idempotent or the route's `retryOn` asks for it (`reset`,
//! `5xx`); a request that never left (connect failure) or was refused unprocessed (h2
//! `REFUSED_STREAM`, `GOAWAY`) is safe to send again.

use super::super::routing::RetryOn;
use std::time::{Duration, Instant};

use crate::telemetry::outcome::Flag;

/// How a try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// No connection: nothing was sent.
    Connect,
    /// A pooled connection closed or reset before any byte of the response: the upstream
    /// most likely closed it while idle, and may not have seen the request.
    StaleConnection,
    /// The upstream refused the request before processing it (h2 `REFUSED_STREAM`, a
    /// `GOAWAY` that does not cover it).
    Refused,
    /// Closed or reset after the request went out, before a response head.
    Reset,
    /// The try's time ran out (`perTryTimeout`) before a response head.
    Timeout,
    /// A response head that does not parse or frames its body ambiguously.
    BadResponse,
    /// The failure came after the response head: too late for anything but closing.
    AfterResponse,
}

/// What to do after a failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// Answer (or end) the request with the failure.
    No,
    /// A retry under the route's policy: counted against `attempts` and the cluster's
    /// `maxRetries`, after the backoff, preferably on another endpoint.
    Retry,
    /// The same request once more on a new connection, at once: the pooled connection it
    /// went out on had been closed by the upstream. Not a retry of the policy's.
    Resend,
}

impl TryFailure {
    /// What the route's `retryOn` (`on`) allows after this failure for a request whose
    /// method is `idempotent`; `resent` says whether a stale connection was resent already.
    pub fn again(self, on: &RetryOn, idempotent: bool, resent: bool) -> Again {
        match self {
            TryFailure::Connect if on.connect() => Again::Retry,
            TryFailure::Refused if on.refused_stream || on.reset() => Again::Retry,
            TryFailure::StaleConnection if on.reset() => Again::Retry,
            TryFailure::StaleConnection if idempotent && !resent => Again::Resend,
            TryFailure::Reset if on.reset() => Again::Retry,
            TryFailure::Timeout if on.timeout() => Again::Retry,
            _ => Again::No,
        }
    }

    /// Whether the failure counts against the endpoint in outlier detection. A pooled
    /// connection the upstream closed while idle says nothing about its health, and a
    /// refused stream is an answer.
    pub fn counts_against_endpoint(self) -> bool {
        !matches!(self, TryFailure::StaleConnection | TryFailure::Refused)
    }
}

impl TryFailure {
    /// The reply after the last try failed this way: status, response flag and the local
    /// reply's text. One table for every codec; `retried` says whether a retry was made.
    pub fn answer(self, retried: bool) -> (u16, Flag, &'static str) {
        let (status, flag, what) = match self {
            TryFailure::Connect => (503, Flag::UpstreamConnectFailure, ""),
            TryFailure::Timeout => (504, Flag::UpstreamRequestTimeout, ""),
            TryFailure::BadResponse => (
                502,
                Flag::UpstreamProtocolError,
                "upstream sent an invalid response",
            ),
            TryFailure::AfterResponse => (
                502,
                Flag::UpstreamConnectionTermination,
                "upstream reset after the response started",
            ),
            TryFailure::StaleConnection | TryFailure::Reset | TryFailure::Refused => (
                503,
                Flag::UpstreamConnectionTermination,
                "upstream reset before response",
            ),
        };
        // Connect failures and timeouts say what the gateway says of them elsewhere.
        let what = if what.is_empty() {
            flag.reply_text()
        } else {
            what
        };
        (status, flag.after_retries(retried), what)
    }
}

/// The time the next try may take: the route's `perTryTimeout`, what is left of its
/// `timeout` (from `deadline`), the shorter of the two, else `idle` (the stream idle
/// timeout: no wait on an upstream is unbounded). `None` once the route's time is up:
/// the request ends with 504 `UT` and no further try.
pub fn try_wait(
    per_try: Option<Duration>,
    deadline: Option<Instant>,
    idle: Duration,
) -> Option<Duration> {
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    if left.is_some_and(|l| l.is_zero()) {
        return None;
    }
    Some(match (per_try, left) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(idle),
    })
}

/// RFC 9110 9.2.2: methods a client may repeat without a different effect.
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(text: &str) -> RetryOn {
        RetryOn::parse(text).unwrap()
    }

    #[test]
    fn nothing_is_tried_again_after_a_response_head() {
        for policy in ["5xx", "reset", "gateway-error,reset,connect-failure", ""] {
            for idempotent in [true, false] {
                assert_eq!(
                    TryFailure::AfterResponse.again(&on(policy), idempotent, false),
                    Again::No,
                    "{policy}"
                );
            }
        }
    }

    #[test]
    fn a_request_that_may_have_arrived_is_resent_only_when_idempotent_or_asked_for() {
        // Istio's default policy.
        let default =
            on("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes");
        assert_eq!(TryFailure::Reset.again(&default, false, false), Again::No);
        assert_eq!(TryFailure::Reset.again(&default, true, false), Again::No);
        assert_eq!(
            TryFailure::Connect.again(&default, false, false),
            Again::Retry
        );
        assert_eq!(
            TryFailure::Refused.again(&default, false, false),
            Again::Retry
        );
        assert_eq!(
            TryFailure::StaleConnection.again(&default, true, false),
            Again::Resend
        );
        assert_eq!(
            TryFailure::StaleConnection.again(&default, true, true),
            Again::No,
            "once"
        );
        assert_eq!(
            TryFailure::StaleConnection.again(&default, false, false),
            Again::No,
            "a POST on a closed pooled connection is not sent twice"
        );
        let reset = on("reset");
        assert_eq!(TryFailure::Reset.again(&reset, false, false), Again::Retry);
        assert_eq!(
            TryFailure::StaleConnection.again(&reset, false, false),
            Again::Retry
        );
        assert_eq!(TryFailure::Timeout.again(&reset, true, false), Again::No);
        assert_eq!(
            TryFailure::Timeout.again(&on("5xx"), false, false),
            Again::Retry
        );
        assert_eq!(
            TryFailure::BadResponse.again(&on("5xx"), true, false),
            Again::No
        );
    }

    #[test]
    fn idempotent_methods() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(idempotent(m), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "get"] {
            assert!(!idempotent(m), "{m}");
        }
    }
}
