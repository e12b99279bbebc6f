//! Request/response rewriting between client and upstream: hop-by-hop
//! headers removed, forwarding headers appended.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};

/// Headers that describe one connection and must not be forwarded
/// (RFC 9110 §7.6.1, plus the legacy ones still seen in the wild).
const HOP_BY_HOP: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    for name in [TE, TRAILER, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends the TCP peer to `X-Forwarded-For` and a `Forwarded` element
/// (RFC 7239) describing this hop.
pub fn append_forwarded(headers: &mut HeaderMap, peer: IpAddr, proto: &str, host: Option<&str>) {
    // Several X-Forwarded-For lines are one list: fold them, then append.
    let mut xff = String::new();
    for prev in headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        let prev = prev.trim();
        if !prev.is_empty() {
            xff.push_str(prev);
            xff.push_str(", ");
        }
    }
    let _ = write!(xff, "{peer}");
    headers.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert("x-forwarded-for", v);
    }
    let mut element = String::with_capacity(64);
    match peer {
        IpAddr::V4(v4) => {
            let _ = write!(element, "for={v4}");
        }
        IpAddr::V6(v6) => {
            let _ = write!(element, "for=\"[{v6}]\"");
        }
    }
    let _ = write!(element, ";proto={proto}");
    if let Some(h) = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b';' && b != b',')
    }) {
        let _ = write!(element, ";host=\"{h}\"");
    }
    if let Ok(v) = HeaderValue::try_from(element) {
        headers.append(http::header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_headers_are_appended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        append_forwarded(
            &mut h,
            "127.0.0.2".parse().unwrap(),
            "http",
            Some("example.com:8080"),
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.2");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.2;proto=http;host=\"example.com:8080\""
        );
        let mut h = HeaderMap::new();
        append_forwarded(&mut h, "::1".parse().unwrap(), "https", Some("bad\"host"));
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=https");
    }
}
