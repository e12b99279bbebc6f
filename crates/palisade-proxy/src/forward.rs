//! Request/response rewriting between client and upstream: hop-by-hop
//! headers removed, forwarding headers appended (from trusted proxies) or
//! replaced by Palisade's own (from anyone else), HTTP/2 cookie crumbs
//! joined for HTTP/1.1.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::HeaderMap;
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, COOKIE, FORWARDED, HOST, HeaderName, HeaderValue, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

/// Headers that describe one connection and must not be forwarded
/// (RFC 9110 §7.6.1, plus the legacy ones still seen in the wild).
const HOP_BY_HOP: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Headers `Connection` cannot name for removal: without them the upstream
/// would see its own address as `Host`, lose the body's framing, or the
/// credentials.
const END_TO_END: [HeaderName; 3] = [HOST, CONTENT_LENGTH, AUTHORIZATION];

/// Forwarding headers a client could forge; from an untrusted peer none of
/// them reaches the upstream except as Palisade writes it.
const FORWARDING: [&str; 7] = [
    "x-forwarded-for",
    "x-real-ip",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-server",
];

/// A header Palisade writes for the upstream (`server.tls_fingerprint_header`):
/// a valid name that is not hop-by-hop (it would be removed on the way),
/// a forwarding header (whose meaning is already taken) or one a request
/// is made of (`Host`, `Content-Length`, `Authorization`, `Cookie`).
pub fn own_header(name: &str) -> Result<HeaderName, String> {
    let parsed =
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))?;
    let n = parsed.as_str();
    let hop_by_hop =
        [CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE].contains(&parsed) || HOP_BY_HOP.contains(&n);
    if hop_by_hop {
        return Err(format!(
            "{name:?} is a hop-by-hop header: it never reaches the upstream"
        ));
    }
    if FORWARDING.contains(&n) {
        return Err(format!(
            "{name:?} is a forwarding header: choose a name of its own, such as \"X-JA4\""
        ));
    }
    if END_TO_END.contains(&parsed) || parsed == COOKIE {
        return Err(format!(
            "{name:?} is part of every request: choose a name of its own, such as \"X-JA4\""
        ));
    }
    Ok(parsed)
}

/// Writes the connection's TLS fingerprint in `name`, after removing every
/// copy the client sent (a client must never choose the fingerprint the
/// upstream reads); without a fingerprint (plain HTTP) the header is absent.
pub fn set_fingerprint(headers: &mut HeaderMap, name: &HeaderName, fingerprint: Option<&str>) {
    headers.remove(name);
    if let Some(v) = fingerprint.and_then(|fp| HeaderValue::from_str(fp).ok()) {
        headers.insert(name.clone(), v);
    }
}

/// Removes from a client's request trailers what must come from Palisade
/// or before the body: forwarding fields (an HTTP/2 upstream reads
/// trailers like headers, so an `X-Forwarded-For` there would name a
/// client of the client's choosing), routing and framing fields,
/// hop-by-hop ones, and `own`, the header Palisade writes itself.
pub fn strip_trailers(trailers: &mut HeaderMap, own: Option<&HeaderName>) {
    for name in FORWARDING.iter().chain(&HOP_BY_HOP) {
        trailers.remove(*name);
    }
    for name in [
        HOST,
        CONTENT_LENGTH,
        CONNECTION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        trailers.remove(name);
    }
    if let Some(name) = own {
        trailers.remove(name);
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`
/// (except `Host`, `Content-Length` and `Authorization`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .filter(|n| !END_TO_END.contains(n))
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

/// Removes cookie `name` from the request's `Cookie` fields, keeping the
/// others as they were sent; a field left empty is removed.
pub fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let holds = |v: &HeaderValue| {
        v.as_bytes()
            .split(|&b| b == b';')
            .any(|pair| pair.split(|&b| b == b'=').next().map(<[u8]>::trim_ascii) == Some(name.as_bytes()))
    };
    if !headers.get_all(COOKIE).iter().any(holds) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| {
            let rest: Vec<&[u8]> = v
                .as_bytes()
                .split(|&b| b == b';')
                .map(<[u8]>::trim_ascii)
                .filter(|pair| !pair.is_empty())
                .filter(|pair| {
                    pair.split(|&b| b == b'=').next().map(<[u8]>::trim_ascii) != Some(name.as_bytes())
                })
                .collect();
            (!rest.is_empty()).then(|| HeaderValue::from_bytes(&rest.join(&b"; "[..])).ok())?
        })
        .collect();
    headers.remove(COOKIE);
    for v in kept {
        headers.append(COOKIE, v);
    }
}

/// Joins the `Cookie` fields of an HTTP/2 request into one, separated by
/// `; `, as it must be before it goes out as HTTP/1.1 (RFC 9113 §8.2.3):
/// HTTP/2 clients may send one field per cookie, and an HTTP/1.1 server
/// reads one `Cookie` line.
pub fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    // Each crumb was a valid value, so their join with "; " is one too.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

/// What Palisade saw of one request, for the forwarding headers.
pub struct Hop<'a> {
    /// The TCP peer (or the PROXY-protocol source).
    pub peer: IpAddr,
    /// Whether `peer` is a trusted proxy, whose forwarding headers stand.
    pub trusted: bool,
    /// The client address resolved from them (`peer` when untrusted).
    pub client: IpAddr,
    /// `http` or `https`.
    pub proto: &'a str,
    /// The request's `Host`.
    pub host: Option<&'a str>,
}

/// Writes the forwarding headers of this hop. From a trusted proxy, the
/// peer is appended to `X-Forwarded-For` and `Forwarded` (RFC 7239), and
/// the proxy's `X-Forwarded-Proto`/`-Host` stand. From anyone else, every
/// forwarding header the client sent is removed first, so the upstream
/// reads only what Palisade saw. `X-Real-IP` is always the resolved client.
pub fn set_forwarded(headers: &mut HeaderMap, hop: &Hop<'_>) {
    if !hop.trusted {
        for name in FORWARDING {
            headers.remove(name);
        }
    }
    append_forwarded(headers, hop.peer, hop.proto, hop.host);
    if let Ok(v) = HeaderValue::try_from(hop.client.to_string()) {
        headers.insert("x-real-ip", v);
    }
    if !headers.contains_key("x-forwarded-proto")
        && let Ok(v) = HeaderValue::try_from(hop.proto)
    {
        headers.insert("x-forwarded-proto", v);
    }
    if !headers.contains_key("x-forwarded-host")
        && let Some(v) = hop.host.and_then(|h| HeaderValue::try_from(h).ok())
    {
        headers.insert("x-forwarded-host", v);
    }
}

/// Appends the TCP peer to `X-Forwarded-For` and a `Forwarded` element
/// (RFC 7239) describing this hop.
fn append_forwarded(headers: &mut HeaderMap, peer: IpAddr, proto: &str, host: Option<&str>) {
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
        headers.append(FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_header_is_ours_alone() {
        let name = own_header("X-JA4").unwrap();
        assert_eq!(name.as_str(), "x-ja4");
        let mut h = HeaderMap::new();
        h.append("x-ja4", HeaderValue::from_static("forged"));
        h.append("X-Ja4", HeaderValue::from_static("forged too"));
        set_fingerprint(&mut h, &name, Some("t13d1516h2_8daaf6152771_e5627efa2ab1"));
        let all: Vec<_> = h.get_all("x-ja4").iter().collect();
        assert_eq!(all, ["t13d1516h2_8daaf6152771_e5627efa2ab1"]);
        set_fingerprint(&mut h, &name, None);
        assert!(!h.contains_key("x-ja4"));
        for bad in ["X JA4", "", "x-ja4:"] {
            assert!(
                own_header(bad).unwrap_err().contains("not a header name"),
                "{bad:?}"
            );
        }
        for bad in ["Connection", "keep-alive", "Upgrade", "proxy-authorization"] {
            assert!(own_header(bad).unwrap_err().contains("hop-by-hop"), "{bad}");
        }
        for bad in ["X-Forwarded-For", "forwarded", "X-Real-IP"] {
            assert!(own_header(bad).unwrap_err().contains("forwarding"), "{bad}");
        }
        for bad in ["Host", "content-length", "Cookie", "Authorization"] {
            assert!(own_header(bad).unwrap_err().contains("every request"), "{bad}");
        }
    }

    #[test]
    fn one_cookie_is_stripped_and_the_others_kept() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; palisade_clearance=x;b=2"));
        h.append(COOKIE, HeaderValue::from_static(" palisade_clearance = y "));
        h.append(COOKIE, HeaderValue::from_static("palisade_clearance_other=z"));
        strip_cookie(&mut h, "palisade_clearance");
        let all: Vec<_> = h.get_all(COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2", "palisade_clearance_other=z"]);
        let mut none = HeaderMap::new();
        none.append(COOKIE, HeaderValue::from_static("a=1"));
        strip_cookie(&mut none, "palisade_clearance");
        assert_eq!(none.get_all(COOKIE).iter().collect::<Vec<_>>(), ["a=1"]);
    }

    #[test]
    fn cookie_crumbs_are_joined_into_one_field() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1"));
        h.append(COOKIE, HeaderValue::from_static("b=2"));
        h.append(COOKIE, HeaderValue::from_static("c=3"));
        join_cookie_crumbs(&mut h);
        let all: Vec<_> = h.get_all(COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        let mut one = HeaderMap::new();
        one.append(COOKIE, HeaderValue::from_static("a=1; b=2"));
        join_cookie_crumbs(&mut one);
        assert_eq!(one.get_all(COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    }

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

        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("host, content-length, authorization"),
        );
        h.insert(HOST, HeaderValue::from_static("example.com"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn an_untrusted_peer_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        for name in FORWARDING {
            h.insert(name, HeaderValue::from_static("6.6.6.6"));
        }
        let peer = "127.0.0.2".parse().unwrap();
        set_forwarded(
            &mut h,
            &Hop {
                peer,
                trusted: false,
                client: peer,
                proto: "http",
                host: Some("example.com"),
            },
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.2");
        assert_eq!(h["x-real-ip"], "127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["forwarded"], "for=127.0.0.2;proto=http;host=\"example.com\"");
        assert!(!h.contains_key("x-forwarded-port"));
        assert!(!h.contains_key("x-forwarded-server"));
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
