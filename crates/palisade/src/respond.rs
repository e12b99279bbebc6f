//! The one place where refusals become HTTP responses, for the layers and
//! the daemon alike: small static plain-text bodies, no per-request logging.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use palisade_core::RejectReason;
use palisade_limits::rate::Period;
use palisade_limits::shield::Rejection;

/// A small plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Stated, so what answered it (and its access log) knows the size.
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

/// The answer to a refused request: 429 with `Retry-After` and the IETF
/// `RateLimit-Policy`/`RateLimit` fields (named after `policy_name`), 403
/// `Access denied`, or 503 with `Retry-After` when a breaker is open.
pub fn rejection(rej: &Rejection, policy_name: &str) -> Response<Full<Bytes>> {
    match rej.reason {
        RejectReason::RateLimited => {
            let mut r = text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests\n");
            let retry = rej.retry_after_secs.unwrap_or(1);
            let h = r.headers_mut();
            h.insert(RETRY_AFTER, HeaderValue::from(retry));
            if let Some(q) = rej.quota {
                // Per second the window is the tighter figure; over a
                // minute or an hour it is the rate over its period.
                let policy = match q.per {
                    Period::Second => format!("\"{policy_name}\";q={};w=1", q.window_limit),
                    per => format!("\"{policy_name}\";q={};w={}", q.rate, per.secs()),
                };
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

/// 503 with `Retry-After`: a breaker is open, the service is not called.
pub fn breaker_open(retry_after_secs: u64) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n");
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use palisade_limits::rate::Quota;
    use std::num::NonZeroU32;

    #[test]
    fn a_per_minute_policy_says_its_minute() {
        let rej = Rejection {
            reason: RejectReason::RateLimited,
            retry_after_secs: Some(12),
            quota: Some(Quota::per(NonZeroU32::new(5).unwrap(), Period::Minute)),
        };
        let r = rejection(&rej, "login");
        assert_eq!(r.headers()["retry-after"], "12");
        assert_eq!(r.headers()["ratelimit-policy"], "\"login\";q=5;w=60");
        assert_eq!(r.headers()["ratelimit"], "\"login\";r=0;t=12");
    }

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
    fn reputation_block_is_access_denied_and_breakers_say_503() {
        let mut rej = Rejection {
            reason: RejectReason::Reputation,
            retry_after_secs: None,
            quota: None,
        };
        assert_eq!(rejection(&rej, "x").status(), 403);
        rej.reason = RejectReason::ClientBreakerOpen;
        rej.retry_after_secs = Some(7);
        let r = rejection(&rej, "x");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "7");
    }
}
