//! PROXY protocol v1 (text) and v2 (binary) headers, as load balancers send
//! them ahead of a connection's first byte, so a proxy behind them sees the
//! real client. Pure parsing; the caller decides whom to believe (only
//! trusted proxies).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// Longest v2 header accepted (address block plus TLVs).
pub const V2_MAX: usize = 16 + 1024;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied connection from `source` to `destination`.
    Proxied {
        /// The real client.
        source: SocketAddr,
        /// Where the client connected.
        destination: SocketAddr,
    },
    /// The proxy's own connection (health check) or an unknown family:
    /// the TCP peer stands.
    Local,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// The bytes are not a PROXY header.
    Missing,
    /// It starts like one but is malformed (what is wrong).
    Malformed(&'static str),
    /// Longer than any header we accept.
    TooLong,
}

impl std::fmt::Display for ProxyHeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str("no PROXY protocol header"),
            Self::Malformed(what) => write!(f, "malformed PROXY protocol header: {what}"),
            Self::TooLong => f.write_str("PROXY protocol header too long"),
        }
    }
}

impl std::error::Error for ProxyHeaderError {}

/// Parses a header at the start of `buf`. `Ok(None)`: not enough bytes yet.
/// `Ok(Some((header, n)))`: the header is the first `n` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    if buf[0] == b'\r' {
        return parse_v2(buf);
    }
    Err(ProxyHeaderError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Err(ProxyHeaderError::Missing);
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::TooLong)
        } else {
            Ok(None)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyHeaderError::TooLong);
    }
    let line =
        std::str::from_utf8(&buf[prefix.len()..end]).map_err(|_| ProxyHeaderError::Malformed("not ASCII"))?;
    let mut parts = line.split(' ');
    let family = parts.next().unwrap_or("");
    if family == "UNKNOWN" {
        return Ok(Some((ProxyHeader::Local, end + 2)));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyHeaderError::Malformed("expected 4 fields after the family"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| ProxyHeaderError::Malformed("bad address"))?;
        match (family, ip) {
            ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
            ("TCP4" | "TCP6", _) => Err(ProxyHeaderError::Malformed("address does not match the family")),
            _ => Err(ProxyHeaderError::Malformed(
                "family must be TCP4, TCP6 or UNKNOWN",
            )),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        // No leading zeros or signs: "0080" and "+80" are not ports here.
        if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProxyHeaderError::Malformed("bad port"));
        }
        s.parse().map_err(|_| ProxyHeaderError::Malformed("bad port"))
    };
    let header = ProxyHeader::Proxied {
        source: SocketAddr::new(ip(src)?, port(sport)?),
        destination: SocketAddr::new(ip(dst)?, port(dport)?),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyHeaderError::Missing);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ProxyHeaderError::TooLong);
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    match version_command & 0x0f {
        0 => return Ok(Some((ProxyHeader::Local, total))),
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("command is neither LOCAL nor PROXY")),
    }
    let header = match buf[13] {
        // TCP over IPv4.
        0x11 => {
            let a = body
                .get(..12)
                .ok_or(ProxyHeaderError::Malformed("IPv4 address block too short"))?;
            let src = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let dst = Ipv4Addr::new(a[4], a[5], a[6], a[7]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(src.into(), u16::from_be_bytes([a[8], a[9]])),
                destination: SocketAddr::new(dst.into(), u16::from_be_bytes([a[10], a[11]])),
            }
        }
        // TCP over IPv6.
        0x21 => {
            let a = body
                .get(..36)
                .ok_or(ProxyHeaderError::Malformed("IPv6 address block too short"))?;
            let octets = |s: &[u8]| -> [u8; 16] {
                let mut o = [0u8; 16];
                o.copy_from_slice(s);
                o
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(
                    Ipv6Addr::from(octets(&a[..16])).into(),
                    u16::from_be_bytes([a[32], a[33]]),
                ),
                destination: SocketAddr::new(
                    Ipv6Addr::from(octets(&a[16..32])).into(),
                    u16::from_be_bytes([a[34], a[35]]),
                ),
            }
        }
        // UNSPEC, UDP, unix sockets: nothing to believe about the client.
        _ => ProxyHeader::Local,
    };
    Ok(Some((header, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n";
        let (header, n) = parse(h).unwrap().unwrap();
        assert_eq!(
            header,
            ProxyHeader::Proxied {
                source: sa("192.0.2.1:56324"),
                destination: sa("198.51.100.1:443")
            }
        );
        assert_eq!(&h[n..n + 3], b"GET");
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        let (header, n) = parse(h).unwrap().unwrap();
        assert_eq!(n, h.len());
        assert_eq!(
            header,
            ProxyHeader::Proxied {
                source: sa("[2001:db8::1]:1"),
                destination: sa("[2001:db8::2]:65535")
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((ProxyHeader::Local, 15))
        );
    }

    #[test]
    fn v1_partial_and_bad() {
        assert_eq!(parse(b"PRO").unwrap(), None);
        assert_eq!(parse(b"PROXY TCP4 192.0.2.1").unwrap(), None);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"PROXZ"), Err(ProxyHeaderError::Missing));
        assert!(matches!(
            parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324\r\n"),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n"),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 0080 2\r\n"),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 70000 2\r\n"),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY UDP4 192.0.2.1 198.51.100.1 1 2\r\n"),
            Err(ProxyHeaderError::Malformed(_))
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(ProxyHeaderError::TooLong));
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v2_tcp4_tcp6_local_and_tlvs() {
        let body = [192, 0, 2, 1, 198, 51, 100, 1, 0xdc, 0x04, 0x01, 0xbb];
        let mut h = v2(1, 0x11, &body);
        h.extend_from_slice(b"GET");
        assert_eq!(
            parse(&h).unwrap(),
            Some((
                ProxyHeader::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.1:443")
                },
                28
            ))
        );
        let mut body6 = Vec::new();
        body6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body6.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        body6.extend_from_slice(&[0, 1, 0, 2]);
        // A TLV after the addresses is skipped.
        body6.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]);
        let h = v2(1, 0x21, &body6);
        let (header, n) = parse(&h).unwrap().unwrap();
        assert_eq!(n, h.len());
        assert_eq!(
            header,
            ProxyHeader::Proxied {
                source: sa("[2001:db8::1]:1"),
                destination: sa("[2001:db8::2]:2")
            }
        );
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap(), Some((ProxyHeader::Local, 16)));
    }

    #[test]
    fn v2_partial_and_bad() {
        let h = v2(1, 0x11, &[192, 0, 2, 1, 198, 51, 100, 1, 0, 1, 0, 2]);
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(matches!(
            parse(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(&v2(5, 0x11, &[0; 12])),
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert!(matches!(parse(&bad_version), Err(ProxyHeaderError::Malformed(_))));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyHeaderError::TooLong));
        assert_eq!(parse(b"\r\n\r\nX"), Err(ProxyHeaderError::Missing));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes never panic, and a header that parses never
        /// claims more bytes than it was given or than the protocol allows.
        #[test]
        fn arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, n))) = parse(&buf) {
                prop_assert!(n <= buf.len());
                prop_assert!(n <= V2_MAX);
            }
        }

        /// Mutated valid v1 headers never panic.
        #[test]
        fn mutated_v1(pos in 0usize..45, byte in any::<u8>()) {
            let mut h = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n".to_vec();
            h[pos] = byte;
            let _ = parse(&h);
        }

        /// Every valid v2 header round-trips its addresses.
        #[test]
        fn v2_round_trip(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>()) {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&src);
            h.extend_from_slice(&dst);
            h.extend_from_slice(&sp.to_be_bytes());
            h.extend_from_slice(&dp.to_be_bytes());
            let (header, n) = parse(&h).unwrap().unwrap();
            prop_assert_eq!(n, 28);
            prop_assert_eq!(header, ProxyHeader::Proxied {
                source: SocketAddr::new(Ipv4Addr::from(src).into(), sp),
                destination: SocketAddr::new(Ipv4Addr::from(dst).into(), dp),
            });
        }
    }
}
