//! The one place where refusals and failures become HTTP responses.

use bytes::Bytes;
use http::header::{CONNECTION, HeaderValue};
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
