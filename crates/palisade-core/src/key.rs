use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

/// Who a request is charged to.
///
/// IPv6 clients are aggregated to a prefix (default /64) because one host
/// usually owns a whole /64 and could otherwise rotate addresses to escape its
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    /// One IPv4 address.
    V4(u32),
    /// An IPv6 prefix: the address with the host bits cleared.
    V6(u128),
    /// A keyed hash of client address and User-Agent.
    Fingerprint(u64),
}

impl ClientKey {
    /// The key for an address, IPv6 masked to `v6_prefix` bits (clamped to 0..=128).
    /// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
    pub fn from_ip(ip: IpAddr, v6_prefix: u8) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => {
                    let bits = u128::from(v6);
                    let prefix = u32::from(v6_prefix.min(128));
                    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                    Self::V6(bits & mask)
                }
            },
        }
    }

    /// A fingerprint key: the address key combined with the User-Agent.
    /// `hasher` must be seeded once per process so that clients cannot aim
    /// collisions at each other.
    pub fn fingerprint(ip: IpAddr, v6_prefix: u8, user_agent: &[u8], hasher: &impl BuildHasher) -> Self {
        let mut h = hasher.build_hasher();
        match Self::from_ip(ip, v6_prefix) {
            Self::V4(v) => h.write_u32(v),
            Self::V6(v) => h.write_u128(v),
            Self::Fingerprint(v) => h.write_u64(v),
        }
        h.write(user_agent);
        Self::Fingerprint(h.finish())
    }

    /// The address (or prefix base address) this key stands for, when it has one.
    pub fn ip(&self) -> Option<IpAddr> {
        match *self {
            Self::V4(v) => Some(IpAddr::from(std::net::Ipv4Addr::from(v))),
            Self::V6(v) => Some(IpAddr::from(std::net::Ipv6Addr::from(v))),
            Self::Fingerprint(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_is_exact() {
        assert_ne!(
            ClientKey::from_ip(ip("10.0.0.1"), 64),
            ClientKey::from_ip(ip("10.0.0.2"), 64)
        );
    }

    #[test]
    fn ipv6_aggregates_to_prefix() {
        let a = ClientKey::from_ip(ip("2001:db8:1:2:aaaa::1"), 64);
        let b = ClientKey::from_ip(ip("2001:db8:1:2:ffff::9"), 64);
        let c = ClientKey::from_ip(ip("2001:db8:1:3::1"), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.ip(), Some(ip("2001:db8:1:2::")));
        // /128 keeps every address apart, /0 folds all together.
        assert_ne!(
            ClientKey::from_ip(ip("2001:db8::1"), 128),
            ClientKey::from_ip(ip("2001:db8::2"), 128)
        );
        assert_eq!(
            ClientKey::from_ip(ip("2001:db8::1"), 0),
            ClientKey::from_ip(ip("fe80::1"), 0)
        );
    }

    #[test]
    fn mapped_v4_is_v4() {
        assert_eq!(
            ClientKey::from_ip(ip("::ffff:192.0.2.1"), 64),
            ClientKey::from_ip(ip("192.0.2.1"), 64)
        );
    }

    #[test]
    fn fingerprint_separates_user_agents() {
        let s = foldhash::fast::FixedState::with_seed(7);
        let a = ClientKey::fingerprint(ip("10.0.0.1"), 64, b"curl/8", &s);
        let b = ClientKey::fingerprint(ip("10.0.0.1"), 64, b"Mozilla/5.0", &s);
        assert_ne!(a, b);
        assert_eq!(a, ClientKey::fingerprint(ip("10.0.0.1"), 64, b"curl/8", &s));
        assert_eq!(a.ip(), None);
    }
}
