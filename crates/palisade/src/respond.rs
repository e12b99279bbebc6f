//! The one place where refusals become HTTP responses, for the layers and
//! the daemon alike: small static plain-text bodies, no per-request logging.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use palisade_core::RejectReason;
use palisade_limits::rate::{Period, Quota};
use palisade_limits::shield::{Allowance, Rejection};

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
                rate_limit_fields(h, policy_name, &q, 0, retry);
            }
            r
        }
        RejectReason::Reputation | RejectReason::Denylisted => text(StatusCode::FORBIDDEN, "Access denied"),
        RejectReason::BreakerOpen | RejectReason::ClientBreakerOpen => {
            breaker_open(rej.retry_after_secs.unwrap_or(1))
        }
    }
}

/// Sets `RateLimit-Policy` (the quota of the limit named `policy_name`)
/// and `RateLimit` (`r=` requests left, `t=` seconds), replacing any the
/// service set: a client reads one limit's state, the one that binds it.
pub fn rate_limit_fields(h: &mut HeaderMap, policy_name: &str, quota: &Quota, remaining: u32, secs: u64) {
    // Per second the window is the tighter figure; over a minute or an
    // hour it is the rate over its period.
    let (q, w) = match quota.per {
        Period::Second => (quota.window_limit.get(), 1),
        per => (quota.rate.get(), per.secs()),
    };
    let policy = field(format_args!("\"{policy_name}\";q={q};w={w}"));
    let state = field(format_args!("\"{policy_name}\";r={remaining};t={secs}"));
    if let (Some(p), Some(s)) = (policy, state) {
        h.insert(RATELIMIT_POLICY, p);
        h.insert(RATELIMIT, s);
    }
}

/// A field value written on the stack and copied once, into its own
/// allocation: these go on every response when a route asks for them.
fn field(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    use std::io::Write;
    // A route name is at most 64 bytes, the numbers at most 20 each.
    let mut buf = [0u8; 160];
    let mut rest = &mut buf[..];
    rest.write_fmt(args).ok()?;
    let len = 160 - rest.len();
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// The fields of an admitted request's response when its route says what
/// is left of its limit: `r=` what is left, `t=` seconds until the bucket
/// is full again.
pub fn allowance_fields(h: &mut HeaderMap, policy_name: &str, allowance: &Allowance) {
    rate_limit_fields(
        h,
        policy_name,
        &allowance.quota,
        allowance.headroom.remaining,
        allowance.headroom.full_in_secs(),
    );
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

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
