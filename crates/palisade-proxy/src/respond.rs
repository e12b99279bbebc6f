//! The one place where refusals and failures become HTTP responses.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use palisade_core::RejectReason;
use palisade_limits::shield::Rejection;

/// Why the proxy could not get an answer from upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Connect refused or timed out.
    Connect,
    /// No response head within the response timeout.
    Timeout,
    /// The client's request body was too slow.
    SlowBody,
    /// Reading the client's request body failed (client went away).
    ClientBody,
    /// Anything else (reset mid-response, protocol error).
    Other,
}

impl UpstreamFailure {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::SlowBody => "slow_body",
            Self::ClientBody => "client_body",
            Self::Other => "other",
        }
    }
}

/// A small plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to a refused request: 429 with `Retry-After` and the IETF
/// `RateLimit-Policy`/`RateLimit` fields, or 403 `Access denied`.
pub fn rejection(rej: &Rejection, policy_name: &str) -> Response<Full<Bytes>> {
    match rej.reason {
        RejectReason::RateLimited => {
            let mut r = text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests\n");
            let retry = rej.retry_after_secs.unwrap_or(1);
            let h = r.headers_mut();
            h.insert(RETRY_AFTER, HeaderValue::from(retry));
            if let Some(q) = rej.quota {
                let policy = format!("\"{policy_name}\";q={};w=1", q.window_limit);
                let state = format!("\"{policy_name}\";r=0;t={retry}");
                if let (Ok(p), Ok(s)) = (HeaderValue::try_from(policy), HeaderValue::try_from(state)) {
                    h.insert("ratelimit-policy", p);
                    h.insert("ratelimit", s);
                }
            }
            r
        }
        RejectReason::Reputation | RejectReason::Denylisted => text(StatusCode::FORBIDDEN, "Access denied"),
        RejectReason::BreakerOpen | RejectReason::ClientBreakerOpen => {
            breaker_open(rej.retry_after_secs.unwrap_or(1))
        }
    }
}

/// The answer when every upstream's breaker is open: 503, no upstream call.
pub fn breaker_open(retry_after_secs: u64) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n");
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    r
}

/// The answer when upstream failed.
pub fn upstream_failure(f: UpstreamFailure) -> Response<Full<Bytes>> {
    match f {
        UpstreamFailure::Connect | UpstreamFailure::Other => text(StatusCode::BAD_GATEWAY, "Bad Gateway\n"),
        UpstreamFailure::ClientBody => text(StatusCode::BAD_REQUEST, "Bad Request\n"),
        UpstreamFailure::Timeout => text(StatusCode::GATEWAY_TIMEOUT, "Gateway Timeout\n"),
        UpstreamFailure::SlowBody => {
            let mut r = text(StatusCode::REQUEST_TIMEOUT, "Request Timeout\n");
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_limits::rate::Quota;
    use std::num::NonZeroU32;

    #[test]
    fn rate_limited_has_retry_after_and_ratelimit_fields() {
        let rej = Rejection {
            reason: RejectReason::RateLimited,
            retry_after_secs: Some(2),
            quota: Some(Quota::per_second(NonZeroU32::new(100).unwrap())),
        };
        let r = rejection(&rej, "default");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["ratelimit-policy"], "\"default\";q=100;w=1");
        assert_eq!(r.headers()["ratelimit"], "\"default\";r=0;t=2");
    }

    #[test]
    fn reputation_block_is_access_denied() {
        let rej = Rejection {
            reason: RejectReason::Reputation,
            retry_after_secs: None,
            quota: None,
        };
        assert_eq!(rejection(&rej, "x").status(), 403);
    }
}
