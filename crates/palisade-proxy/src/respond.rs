//! The one place where refusals and failures become HTTP responses.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
pub use palisade::respond::{breaker_open, rejection, text};

use crate::upstream_tls::TlsReason;

/// Why the proxy could not get an answer from upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Connect refused or timed out.
    Connect,
    /// No response head within the response timeout.
    Timeout,
    /// The client's request body was too slow.
    SlowBody,
    /// The client's request body is larger than `server.max_body_size`.
    BodyTooLarge,
    /// Reading the client's request body failed (client went away).
    ClientBody,
    /// Every connection `upstream.max_connections` allows is open.
    AtCapacity,
    /// The TLS handshake with an `https://` upstream failed.
    Tls(TlsReason),
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
            Self::BodyTooLarge => "body_too_large",
            Self::ClientBody => "client_body",
            Self::AtCapacity => "at_capacity",
            Self::Tls(reason) => reason.as_str(),
            Self::Other => "other",
        }
    }
}

/// The answer when upstream failed.
pub fn upstream_failure(f: UpstreamFailure) -> Response<Full<Bytes>> {
    match f {
        UpstreamFailure::Connect | UpstreamFailure::Tls(_) | UpstreamFailure::Other => {
            text(StatusCode::BAD_GATEWAY, "Bad Gateway\n")
        }
        UpstreamFailure::ClientBody => text(StatusCode::BAD_REQUEST, "Bad Request\n"),
        UpstreamFailure::Timeout => text(StatusCode::GATEWAY_TIMEOUT, "Gateway Timeout\n"),
        UpstreamFailure::AtCapacity => {
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable: upstream connection limit reached\n",
            );
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        // The rest of the body is never read: the connection cannot carry
        // another request.
        UpstreamFailure::SlowBody => {
            let mut r = text(StatusCode::REQUEST_TIMEOUT, "Request Timeout\n");
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
        UpstreamFailure::BodyTooLarge => {
            let mut r = text(StatusCode::PAYLOAD_TOO_LARGE, "Content Too Large\n");
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// Whether a request is a gRPC call (`application/grpc`, or with a
/// `+proto`-style suffix; not gRPC-Web, which reads statuses in its body).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= GRPC.len()
            && v[..GRPC.len()].eq_ignore_ascii_case(GRPC)
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// The gRPC status (and its message) for one of our own answers: a gRPC
/// client reads an HTTP 429 as `UNAVAILABLE` and retries at once, so a
/// refusal says what it is in gRPC's own terms.
fn grpc_status(status: StatusCode) -> (u8, &'static str) {
    match status {
        StatusCode::TOO_MANY_REQUESTS => (8, "rate limited by palisade"),
        StatusCode::PAYLOAD_TOO_LARGE => (8, "request too large"),
        StatusCode::FORBIDDEN => (7, "access denied by palisade"),
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => (4, "upstream timed out"),
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => (14, "upstream unavailable"),
        _ => (2, "refused by palisade"),
    }
}

/// Turns the head of one of our own answers to a gRPC call into a
/// trailers-only gRPC response (HTTP 200, `grpc-status`, `grpc-message`,
/// no body): 429 is `RESOURCE_EXHAUSTED` (8), 403 `PERMISSION_DENIED` (7),
/// 502/503 `UNAVAILABLE` (14), 504 `DEADLINE_EXCEEDED` (4). `Retry-After`
/// and the rate-limit fields stay, and a retry delay is also given as
/// `grpc-retry-pushback-ms`, which gRPC's retry policy obeys. The caller
/// sends it with an empty body.
pub fn into_grpc(head: &mut http::response::Parts) {
    let (code, message) = grpc_status(head.status);
    head.status = StatusCode::OK;
    let h = &mut head.headers;
    h.remove(CONTENT_LENGTH);
    h.remove(CONNECTION);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    h.insert("grpc-message", HeaderValue::from_static(message));
    if let Some(secs) = h
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        h.insert(
            "grpc-retry-pushback-ms",
            HeaderValue::from(secs.saturating_mul(1000)),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC;charset=x", true),
            ("application/grpc-web", false),
            ("application/grpcx", false),
            ("text/plain", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), grpc, "{ct}");
        }
    }

    #[test]
    fn a_refusal_becomes_a_trailers_only_grpc_status() {
        for (status, code) in [
            (429, "8"),
            (403, "7"),
            (503, "14"),
            (502, "14"),
            (504, "4"),
            (400, "2"),
        ] {
            let mut r = text(StatusCode::from_u16(status).unwrap(), "x\n");
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("3"));
            let (mut head, _) = r.into_parts();
            into_grpc(&mut head);
            assert_eq!(head.status, 200);
            assert_eq!(head.headers["grpc-status"], code, "{status}");
            assert_eq!(head.headers["content-type"], "application/grpc");
            assert_eq!(head.headers["grpc-retry-pushback-ms"], "3000");
            assert!(!head.headers.contains_key(CONTENT_LENGTH));
        }
    }
}
