//! Addresses no ban may cover, whoever asks for it.
//!
//! A source address costs an attacker nothing to forge: a SYN flood
//! "from" the upstream, the Redis server or the resolver would otherwise
//! make the defense cut the service off from what it depends on. So every
//! path that bans (the SYN defense, the admin API, bans another cluster node
//! made) asks [`NeverBan::covers`] first, and a ban that overlaps a
//! protected address is refused with the reason.
//!
//! The set is built at start and on every reload from the config (allow
//! list, trusted proxies, upstreams, Redis, the feed host, names resolved),
//! the host (its own addresses, resolvers in `/etc/resolv.conf`, default
//! gateways) and
//! `syn.never_ban`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs as _};

use ipnet::IpNet;

use crate::config::{Config, FeedSource};

/// Why an address is protected: the `reason` label of
/// `palisade_bans_refused_total` and the word in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protected {
    /// 127.0.0.0/8 and ::1 (`syn.never_ban_loopback`).
    Loopback,
    /// `clients.allow`.
    Allow,
    /// `clients.trusted_proxies`.
    TrustedProxy,
    /// An upstream's address.
    Upstream,
    /// A Redis (cluster) server.
    Redis,
    /// The reputation feed's host.
    Feed,
    /// A resolver from `/etc/resolv.conf`.
    Resolver,
    /// A default gateway.
    Gateway,
    /// An address of this host (a spoofed SYN "from" it is counted before
    /// the kernel drops it as a martian).
    Local,
    /// `syn.never_ban`.
    Configured,
}

impl Protected {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Allow => "allow",
            Self::TrustedProxy => "trusted_proxy",
            Self::Upstream => "upstream",
            Self::Redis => "redis",
            Self::Feed => "feed",
            Self::Resolver => "resolver",
            Self::Gateway => "gateway",
            Self::Local => "local",
            Self::Configured => "never_ban",
        }
    }
}

/// The protected networks.
#[derive(Debug, Clone, Default)]
pub struct NeverBan {
    nets: Vec<(IpNet, Protected)>,
}

impl NeverBan {
    /// From explicit entries (tests, and the pieces [`Self::build`] finds).
    pub fn from_nets(nets: Vec<(IpNet, Protected)>) -> Self {
        Self { nets }
    }

    /// Everything the config and the host say must stay reachable. Resolves
    /// host names (blocking: call it off the async workers).
    pub fn build(config: &Config) -> Self {
        let mut nets = Vec::new();
        let syn = config.syn.as_ref();
        if syn.is_none_or(|s| s.never_ban_loopback) {
            for ip in [
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                let len = if ip.is_ipv4() { 8 } else { 128 };
                if let Ok(n) = IpNet::new(ip, len) {
                    nets.push((n, Protected::Loopback));
                }
            }
        }
        let shield = &config.shield;
        nets.extend(shield.allow.iter().map(|n| (*n, Protected::Allow)));
        nets.extend(
            shield
                .trusted_proxies
                .nets()
                .iter()
                .map(|n| (*n, Protected::TrustedProxy)),
        );
        for uri in config.upstream_urls() {
            if let Some(host) = uri.host() {
                let https = crate::connector::wire(uri).is_some_and(|(s, _)| s == http::uri::Scheme::HTTPS);
                let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
                resolve(host, port, Protected::Upstream, &mut nets);
            }
        }
        if let Some(cluster) = &config.cluster {
            for url in &cluster.redis {
                if let Some(info) = redis_host(url) {
                    resolve(&info.0, info.1, Protected::Redis, &mut nets);
                }
            }
        }
        if let Some(FeedSource::Url(uri)) = config.store.as_ref().and_then(|s| s.feed.as_ref())
            && let Some(host) = uri.host()
        {
            resolve(host, uri.port_u16().unwrap_or(443), Protected::Feed, &mut nets);
        }
        if let Ok(text) = std::fs::read_to_string("/etc/resolv.conf") {
            nets.extend(
                resolvers(&text)
                    .into_iter()
                    .map(|ip| (IpNet::from(ip), Protected::Resolver)),
            );
        }
        let mut gateways = Vec::new();
        if let Ok(text) = std::fs::read_to_string("/proc/net/route") {
            gateways.extend(ipv4_gateways(&text));
        }
        if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
            gateways.extend(ipv6_gateways(&text));
        }
        nets.extend(
            gateways
                .into_iter()
                .map(|ip| (IpNet::from(ip), Protected::Gateway)),
        );
        let mut local = Vec::new();
        if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
            local.extend(local_ipv4(&text));
        }
        if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
            local.extend(local_ipv6(&text));
        }
        // Loopback is the loopback rule's (a test rig may turn it off).
        nets.extend(
            local
                .into_iter()
                .filter(|ip| !ip.is_loopback())
                .map(|ip| (IpNet::from(ip), Protected::Local)),
        );
        if let Some(s) = syn {
            nets.extend(s.never_ban.iter().map(|n| (*n, Protected::Configured)));
        }
        Self { nets }
    }

    /// Why a ban of `net` is refused: it overlaps a protected network
    /// (`0.0.0.0/0` covers loopback; a /32 inside an allowed /24 is allowed).
    pub fn covers(&self, net: &IpNet) -> Option<(IpNet, Protected)> {
        let net = canonical(net);
        self.nets
            .iter()
            .find(|(p, _)| p.contains(&net) || net.contains(p))
            .copied()
    }

    /// The protected networks and why, in the order found.
    pub fn entries(&self) -> &[(IpNet, Protected)] {
        &self.nets
    }

    /// How many networks are protected.
    pub fn len(&self) -> usize {
        self.nets.len()
    }

    /// Whether nothing is protected.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// An IPv4-mapped IPv6 network as its IPv4 self: `::ffff:10.0.0.1` is
/// `10.0.0.1` to the kernel's IPv4 rule.
pub(crate) fn canonical(net: &IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(a) => IpNet::new(IpAddr::V4(a), n.prefix_len() - 96).unwrap_or(*net),
            None => *net,
        },
        _ => *net,
    }
}

fn resolve(host: &str, port: u16, why: Protected, into: &mut Vec<(IpNet, Protected)>) {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        into.push((IpNet::from(ip.to_canonical()), why));
        return;
    }
    match (host, port).to_socket_addrs() {
        Ok(addrs) => into.extend(addrs.map(|a| (IpNet::from(a.ip().to_canonical()), why))),
        Err(e) => tracing::warn!(host, "never-ban set: cannot resolve {} host: {e}", why.as_str()),
    }
}

/// Host and port of a `redis://` or `rediss://` URL.
fn redis_host(url: &str) -> Option<(String, u16)> {
    let info = redis::parse_redis_url(url)?;
    Some((info.host_str()?.to_owned(), info.port().unwrap_or(6379)))
}

/// The `nameserver` lines of a resolv.conf.
pub fn resolvers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver")).then(|| f.next()).flatten()
        })
        // A link-local resolver may carry a zone (`fe80::1%eth0`).
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// Gateways of `/proc/net/route` (hex, little-endian; flag 0x2 is
/// RTF_GATEWAY).
pub fn ipv4_gateways(text: &str) -> Vec<IpAddr> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let gw = u32::from_str_radix(f.get(2)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            (flags & 0x2 != 0 && gw != 0).then(|| IpAddr::V4(Ipv4Addr::from(gw.swap_bytes())))
        })
        .collect()
}

/// Next hops of `/proc/net/ipv6_route` (fifth field, 32 hex digits).
pub fn ipv6_gateways(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let hop = u128::from_str_radix(l.split_whitespace().nth(4)?, 16).ok()?;
            (hop != 0).then(|| IpAddr::V6(Ipv6Addr::from(hop)))
        })
        .collect()
}

/// This host's IPv4 addresses: the `/32 host LOCAL` leaves of
/// `/proc/net/fib_trie` (each under the `|-- ADDR` line naming it).
pub fn local_ipv4(text: &str) -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut last: Option<IpAddr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = addr.parse().ok();
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && !found.contains(&ip)
        {
            found.push(ip);
        }
    }
    found
}

/// This host's IPv6 addresses: the first field of `/proc/net/if_inet6`.
pub fn local_ipv6(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| u128::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_ban_overlapping_a_protected_network_is_refused() {
        let nb = NeverBan::from_nets(vec![
            (net("127.0.0.0/8"), Protected::Loopback),
            (net("198.18.3.4/32"), Protected::Upstream),
            (net("10.0.0.0/24"), Protected::Allow),
        ]);
        assert_eq!(
            nb.covers(&net("198.18.3.4/32")).map(|c| c.1),
            Some(Protected::Upstream)
        );
        assert_eq!(
            nb.covers(&net("0.0.0.0/0")).map(|c| c.1),
            Some(Protected::Loopback)
        );
        assert_eq!(
            nb.covers(&net("10.0.0.7/32")).map(|c| c.1),
            Some(Protected::Allow)
        );
        assert_eq!(
            nb.covers(&net("198.18.0.0/16")).map(|c| c.1),
            Some(Protected::Upstream)
        );
        assert_eq!(
            nb.covers(&net("::ffff:198.18.3.4/128")).map(|c| c.1),
            Some(Protected::Upstream)
        );
        assert!(nb.covers(&net("198.18.3.5/32")).is_none());
        assert!(nb.covers(&net("2001:db8::/64")).is_none());
    }

    #[test]
    fn host_files_are_read() {
        let resolv = "# generated\nsearch example\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\noptions ndots:1\n";
        assert_eq!(
            resolvers(resolv),
            vec![
                "10.255.255.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(ipv4_gateways(route), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        let route6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                      00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n";
        assert_eq!(ipv6_gateways(route6), vec!["fd00::1".parse::<IpAddr>().unwrap()]);
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
                    \x20    +-- 198.18.3.0/24 2 0 2\n        |-- 198.18.3.0\n           /24 link UNICAST\n\
                    \x20       |-- 198.18.3.1\n           /32 host LOCAL\n\
                    \x20    |-- 198.18.3.255\n        /32 link BROADCAST\n\
                    Local:\n        |-- 198.18.3.1\n           /32 host LOCAL\n        |-- 127.0.0.1\n           /32 host LOCAL\n";
        assert_eq!(
            local_ipv4(trie),
            vec![
                "198.18.3.1".parse::<IpAddr>().unwrap(),
                "127.0.0.1".parse().unwrap()
            ]
        );
        let inet6 = "00000000000000000000000000000001 01 80 10 80       lo\n\
                     fe800000000000000000000000000001 02 40 20 80     eth0\n";
        assert_eq!(
            local_ipv6(inet6),
            vec!["::1".parse::<IpAddr>().unwrap(), "fe80::1".parse().unwrap()]
        );
    }
}
