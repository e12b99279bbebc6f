//! One spelling per host, so a route on `api.example` also covers
//! `API.example`, `api.example.` and `api.example:80`, and a `Host` line
//! agrees with an absolute-form target that differs from it only so.

use std::borrow::Cow;
use std::fmt;

/// Why a host cannot be compared; the request is answered 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// A byte outside printable ASCII: no host name has one (RFC 3986
    /// §3.2.2), and one that cannot be read as a name must not skip the
    /// routes on names.
    NotAscii,
    /// Not a name (`A-Z a-z 0-9 - . _ ~`, no empty label but the root's
    /// one trailing dot), a bracketed IPv6 literal or either with a
    /// numeric port: URL parsers read `u@api.example`, `api.example/x` or
    /// `api%2eexample` as `api.example`, and a server that trims every
    /// trailing dot `api.example..`; host routes would not.
    NotAHost,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAscii => "host is not printable ASCII",
            Self::NotAHost => "host is not a name, an IP literal or a port",
        })
    }
}

impl std::error::Error for HostError {}

/// The compared form of a `Host` value or an authority: the name in
/// lower case with one trailing dot removed (`a.` is `a` in DNS), and the
/// port removed when it is empty or `default_port` (80 for `http`, 443 for
/// `https`). Any other port is kept. Borrowed when already in that form.
pub fn normalize_host(host: &[u8], default_port: Option<u16>) -> Result<Cow<'_, str>, HostError> {
    if !host.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(HostError::NotAscii);
    }
    let host = std::str::from_utf8(host).map_err(|_| HostError::NotAscii)?;
    let (name, port) = split_port(host);
    if !host.is_empty() && !is_host_name(name) {
        return Err(HostError::NotAHost);
    }
    let drop_port = port.is_some_and(|p| p.is_empty() || p.parse::<u16>().ok() == default_port);
    let dotless = match name.strip_suffix('.') {
        Some(n) if !name.starts_with('[') => n,
        _ => name,
    };
    let lower = !dotless.bytes().any(|b| b.is_ascii_uppercase());
    if lower && dotless.len() == name.len() && !drop_port {
        return Ok(Cow::Borrowed(host));
    }
    let mut out = dotless.to_ascii_lowercase();
    if let Some(p) = port.filter(|_| !drop_port) {
        out.push(':');
        out.push_str(p);
    }
    Ok(Cow::Owned(out))
}

/// A registered name of unreserved characters, or `[IPv6]`. Stricter than
/// RFC 3986's reg-name (no `%`, no sub-delims, no empty label except after
/// the one trailing dot of the root): nothing resolvable needs them, and
/// each is read differently by some parser behind us.
fn is_host_name(name: &str) -> bool {
    match name.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').is_some_and(|a| {
            !a.is_empty() && a.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }),
        None => {
            let labels = name.strip_suffix('.').unwrap_or(name);
            !labels.is_empty()
                && labels.split('.').all(|l| !l.is_empty())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        }
    }
}

/// `name` and `port` of `name:port` (`[v6]:port` included); a bare IPv6
/// address or anything else without a numeric port has none.
fn split_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => match host[i + 1..].strip_prefix(':') {
                Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => (&host[..=i], Some(p)),
                _ => (host, None),
            },
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => (n, Some(p)),
        _ => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(h: &str, port: u16) -> String {
        normalize_host(h.as_bytes(), Some(port)).unwrap().into_owned()
    }

    #[test]
    fn every_spelling_of_one_host_is_one() {
        for h in [
            "a.test",
            "A.Test",
            "a.test.",
            "a.test:80",
            "a.test.:80",
            "a.test:",
            "a.test:080",
        ] {
            assert_eq!(n(h, 80), "a.test", "{h}");
        }
        assert_eq!(n("[::1]:80", 80), "[::1]");
        assert_eq!(n("[::1]", 80), "[::1]");
        assert_eq!(n("127.0.0.1:80", 80), "127.0.0.1");
    }

    #[test]
    fn other_ports_and_dots_are_kept() {
        assert_eq!(n("a.test:443", 80), "a.test:443");
        assert_eq!(n("a.test:80", 443), "a.test:80");
        assert_eq!(n("A.test:8080", 80), "a.test:8080");
        assert_eq!(n("[::1]:8080", 80), "[::1]:8080");
        assert_eq!(normalize_host(b"a.test:80", None).unwrap(), "a.test:80");
    }

    #[test]
    fn a_host_in_its_form_is_borrowed() {
        for h in ["a.test", "a.test:8080", "[::1]", ""] {
            assert!(
                matches!(normalize_host(h.as_bytes(), Some(80)), Ok(Cow::Borrowed(_))),
                "{h}"
            );
        }
    }

    #[test]
    fn a_host_outside_printable_ascii_is_refused() {
        for h in [&b"a.t\xffest"[..], b"a test", b"a\ttest", "caf\u{e9}".as_bytes()] {
            assert_eq!(normalize_host(h, Some(80)), Err(HostError::NotAscii), "{h:?}");
        }
    }

    #[test]
    fn a_host_that_a_url_parser_reads_otherwise_is_refused() {
        for h in [
            "u@a.test",
            "a.test/x",
            "a.test#x",
            "a.test?",
            "a%2etest",
            "a.test,b",
            "a.test..",
            ".a.test",
            "a..test",
            ".",
            "..",
            "a.test:x",
            "a.test::80",
            "::1",
            ":80",
            "[a.test]",
            "[]",
            "[::1",
        ] {
            assert_eq!(
                normalize_host(h.as_bytes(), Some(80)),
                Err(HostError::NotAHost),
                "{h}"
            );
        }
    }
}
