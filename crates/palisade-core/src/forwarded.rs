//! Client address resolution behind reverse proxies.
//!
//! A forwarding header is attacker-controlled unless it was written by a proxy
//! we trust, so it is read only when the TCP peer is in `trusted_proxies`, and
//! then from the right: each trusted hop vouches for the address to its left,
//! and the first address that is *not* a trusted proxy is the client. Spoofed
//! entries a client prepends are never reached.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::FORWARDED;
use ipnet::IpNet;

/// Which header trusted proxies put the client address in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// The set of networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ClientIpHeader,
}

impl TrustedProxies {
    /// Trust `nets`, reading the client address from `header`.
    pub fn new(nets: Vec<IpNet>, header: ClientIpHeader) -> Self {
        Self { nets, header }
    }

    /// The trusted networks.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request that arrived from `peer`.
    ///
    /// Allocation-free: header values are walked in place.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.nets.is_empty() || !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let name = match self.header {
            ClientIpHeader::XForwardedFor => "x-forwarded-for",
            ClientIpHeader::Forwarded => FORWARDED.as_str(),
        };
        // Later header lines were appended by later hops: walk them last-first.
        for value in headers.get_all(name).iter().rev() {
            for element in value.as_bytes().rsplit(|b| *b == b',') {
                let hop = match self.header {
                    ClientIpHeader::XForwardedFor => parse_node(element),
                    ClientIpHeader::Forwarded => forwarded_for(element).and_then(parse_node),
                };
                // An unparseable hop ends the chain: everything to its left is
                // unverifiable, so the last verified address stands.
                let Some(hop) = hop else { return client };
                client = canonical(hop);
                if !self.contains(client) {
                    return client;
                }
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 peers (dual-stack sockets) are treated as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &[u8]) -> Option<&[u8]> {
    element.split(|b| *b == b';').find_map(|pair| {
        let pair = trim(pair);
        let (name, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
        name.eq_ignore_ascii_case(b"for").then(|| &value[1..])
    })
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
/// `[2001:db8::1]:80`, optionally in double quotes.
fn parse_node(raw: &[u8]) -> Option<IpAddr> {
    let mut s = trim(raw);
    if let [b'"', inner @ .., b'"'] = s {
        s = inner;
    }
    let s = std::str::from_utf8(s).ok()?;
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    // `v4:port`; a bare IPv6 address was handled above.
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &'static str, values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_static(v));
        }
        h
    }

    fn trusted(header: ClientIpHeader) -> TrustedProxies {
        TrustedProxies::new(
            vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            header,
        )
    }

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let t = trusted(ClientIpHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(t.client_ip(ip("192.0.2.9"), &h), ip("192.0.2.9"));
        // No trusted proxies at all: never read.
        assert_eq!(
            TrustedProxies::default().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn rightmost_untrusted_wins_over_spoofed_prefix() {
        let t = trusted(ClientIpHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["6.6.6.6, 198.51.100.7, 10.1.1.1"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("198.51.100.7"));
    }

    #[test]
    fn multiple_header_lines_are_one_list() {
        let t = trusted(ClientIpHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["6.6.6.6", "198.51.100.7:5555", "10.2.2.2"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("198.51.100.7"));
    }

    #[test]
    fn garbage_stops_at_last_verified_hop() {
        let t = trusted(ClientIpHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["1.2.3.4, nonsense, 10.9.9.9"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.9.9.9"));
        let h = headers("x-forwarded-for", &[""]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn all_trusted_yields_leftmost() {
        let t = trusted(ClientIpHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["10.3.3.3, 10.4.4.4"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.3.3.3"));
    }

    #[test]
    fn forwarded_header_forms() {
        let t = trusted(ClientIpHeader::Forwarded);
        let h = headers(
            "forwarded",
            &[r#"for=6.6.6.6, For="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.5;by=10.0.0.1"#],
        );
        assert_eq!(t.client_ip(ip("::1"), &h), ip("2001:db8:cafe::17"));
        let h = headers("forwarded", &["for=unknown"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // XFF is not consulted when Forwarded is configured.
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn mapped_peer_is_canonical() {
        let t = trusted(ClientIpHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["198.51.100.1"]);
        assert_eq!(t.client_ip(ip("::ffff:10.0.0.1"), &h), ip("198.51.100.1"));
        assert_eq!(t.client_ip(ip("::ffff:192.0.2.1"), &h), ip("192.0.2.1"));
    }

    #[test]
    fn node_forms() {
        assert_eq!(parse_node(b" 1.2.3.4 "), Some(ip("1.2.3.4")));
        assert_eq!(parse_node(b"1.2.3.4:80"), Some(ip("1.2.3.4")));
        assert_eq!(parse_node(b"2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node(b"[2001:db8::1]:80"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node(b"\"[::1]\""), Some(ip("::1")));
        assert_eq!(parse_node(b"_hidden"), None);
        assert_eq!(parse_node(b"1.2.3.4:99999"), None);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a trusted proxy's header says, the answer is the peer or
        /// an address written in the header, and never a trusted proxy unless
        /// every hop is one.
        #[test]
        fn arbitrary_headers(values in proptest::collection::vec("[0-9a-f.:, \\[\\]\"=;forFOR_-]{0,60}", 0..4)) {
            for header in [ClientIpHeader::XForwardedFor, ClientIpHeader::Forwarded] {
                let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()], header);
                let mut h = HeaderMap::new();
                let name = if header == ClientIpHeader::Forwarded { "forwarded" } else { "x-forwarded-for" };
                for v in &values {
                    if let Ok(v) = HeaderValue::from_str(v) {
                        h.append(name, v);
                    }
                }
                let peer: IpAddr = "10.1.2.3".parse().unwrap();
                let ip = t.client_ip(peer, &h);
                let text: String = values.concat();
                prop_assert!(ip == peer || text.contains(&ip.to_string()) || ip.is_ipv6(), "{ip} from {values:?}");
            }
        }
    }
}
