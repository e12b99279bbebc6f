//! One spelling per path, so a route limit on `/login` also covers
//! `//login`, `/./login`, `/%6Cogin` and `/x/../login`.
//!
//! The normalized path is what routes match and what is forwarded: a limit
//! and the upstream see the same resource. Spellings whose meaning depends
//! on the server behind (an encoded `/` or `\`, an encoded NUL) are refused
//! rather than guessed at.
//!
//! Routes match one step further: without the segments' `;parameters`
//! ([`route_path`]), as Java servers route. The upstream still gets them.

use std::borrow::Cow;
use std::fmt;

/// Why a path cannot be normalized; the request is answered 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    InvalidPercentEncoding,
    /// `%2F`, `%5C` or `%00`: one server decodes them into a separator
    /// (or a terminator), another does not, so no route can be sure what
    /// the request names.
    AmbiguousEncoding,
    /// `%25` followed by two hex digits: an upstream that decodes twice
    /// reads `/%256Cogin` as `/login`.
    DoubleEncoding,
    /// A segment that is empty, `.` or `..` once its `;parameters` are
    /// removed (`/;x/login`, `/..;/login`): a server that drops parameters
    /// before it resolves dot segments names another resource than one that
    /// keeps them.
    AmbiguousParameters,
    /// A raw `\`: IIS, ASP.NET and WHATWG URL parsers read it as `/`,
    /// others as a name byte, the same doubt as `%5C`.
    Backslash,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidPercentEncoding => "invalid percent-encoding in path",
            Self::AmbiguousEncoding => "encoded '/', '\\' or NUL in path",
            Self::DoubleEncoding => "encoded '%' starting another escape in path",
            Self::AmbiguousParameters => "empty or dot segment with parameters in path",
            Self::Backslash => "'\\' in path",
        })
    }
}

impl std::error::Error for PathError {}

/// The normalized form of an origin-form `path` (RFC 3986 §6.2.2):
/// percent-encoded unreserved characters decoded, other escapes in upper
/// case, runs of `/` collapsed, `.` and `..` segments removed (`..` never
/// climbs above the root). A path already in that form is borrowed, so the
/// common case allocates nothing. A path not starting with `/` (`*`) is
/// returned as it is.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Ok(Cow::Borrowed(path));
    }
    if bytes.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    if is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(bytes)?;
    let mut out = String::with_capacity(decoded.len());
    // Segments between slashes; empty ones (from `//`) are dropped, except
    // the last, which keeps a trailing slash.
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded[1..].split('/') {
        trailing_slash = false;
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    if double_encoded(out.as_bytes()) {
        return Err(PathError::DoubleEncoding);
    }
    Ok(Cow::Owned(out))
}

/// The path routes match, given a [`normalize_path`] result: each segment's
/// parameters (`;…`, RFC 3986 §3.3) removed, as Tomcat, Jetty and Spring
/// remove them before they route, so `/login;x` counts against `/login`.
/// Borrowed when there is no `;`.
///
/// A segment that would be empty (except the last: `/app/;jsessionid=1`
/// is `/app/`) or `.`/`..` without its parameters is refused: the
/// normalized path keeps it as a name, a parameter-dropping server would
/// resolve it, and the two would read different resources.
pub fn route_path(normalized: &str) -> Result<Cow<'_, str>, PathError> {
    if !normalized.contains(';') {
        return Ok(Cow::Borrowed(normalized));
    }
    let mut out = String::with_capacity(normalized.len());
    let mut segments = normalized.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        let (name, params) = seg.split_once(';').map_or((seg, false), |(n, _)| (n, true));
        let last = segments.peek().is_none();
        if params && ((name.is_empty() && !last) || name == "." || name == "..") {
            return Err(PathError::AmbiguousParameters);
        }
        out.push('/');
        out.push_str(name);
    }
    Ok(Cow::Owned(out))
}

/// `%25` and then two hex digits, anywhere.
fn double_encoded(bytes: &[u8]) -> bool {
    bytes.windows(5).any(|w| {
        w[0] == b'%' && w[1] == b'2' && w[2] == b'5' && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit()
    })
}

/// True when nothing needs rewriting: every escape already canonical, no
/// `//`, no `.` or `..` segment. One pass, no allocation.
fn is_normal(bytes: &[u8]) -> bool {
    let escapes_canonical = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%' || {
            let upper = |j: usize| {
                bytes
                    .get(j)
                    .filter(|d| d.is_ascii_digit() || (b'A'..=b'F').contains(d))
            };
            match (upper(i + 1), upper(i + 2)) {
                (Some(&h), Some(&l)) => hex(h)
                    .zip(hex(l))
                    .is_some_and(|(h, l)| !is_unreserved((h << 4) | l) && !is_ambiguous((h << 4) | l)),
                _ => false,
            }
        }
    });
    escapes_canonical
        && !double_encoded(bytes)
        && !bytes.windows(2).any(|w| w == b"//")
        && bytes.split(|b| *b == b'/').all(|seg| seg != b"." && seg != b"..")
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn is_ambiguous(c: u8) -> bool {
    matches!(c, b'/' | b'\\' | 0)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    const UPPER: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::InvalidPercentEncoding);
        };
        let c = (hi << 4) | lo;
        match c {
            c if is_ambiguous(c) => return Err(PathError::AmbiguousEncoding),
            c if is_unreserved(c) => out.push(c),
            _ => {
                out.extend_from_slice(&[b'%', UPPER[usize::from(hi)], UPPER[usize::from(lo)]]);
            }
        }
        i += 3;
    }
    // Raw bytes came from a `str` and every decoded byte is ASCII.
    String::from_utf8(out).map_err(|_| PathError::InvalidPercentEncoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize_path(p).unwrap().into_owned()
    }

    #[test]
    fn every_spelling_of_login_is_login() {
        for p in [
            "/login",
            "//login",
            "/./login",
            "/%6Cogin",
            "/%6cogin",
            "/x/../login",
            "/../login",
            "///x//..//login",
            "/%2E/login",
            "/x/%2e%2E/login",
        ] {
            assert_eq!(n(p), "/login", "{p}");
        }
    }

    #[test]
    fn trailing_slash_and_root_are_kept() {
        assert_eq!(n("/"), "/");
        assert_eq!(n("//"), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a/"), "/a/");
        assert_eq!(n("/a/."), "/a/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a//"), "/a/");
        assert_eq!(n("*"), "*");
    }

    #[test]
    fn reserved_escapes_stay_escaped_in_upper_case() {
        assert_eq!(n("/a%3fb"), "/a%3Fb");
        assert_eq!(n("/caf%C3%A9"), "/caf%C3%A9");
        assert_eq!(n("/a%20b"), "/a%20b");
    }

    #[test]
    fn a_normal_path_is_borrowed() {
        for p in ["/", "/login", "/a/b/", "/a.b/.c/..d", "/a%20b%3F"] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn ambiguous_and_broken_escapes_are_refused() {
        for p in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%00"] {
            assert_eq!(normalize_path(p), Err(PathError::AmbiguousEncoding), "{p}");
        }
        for p in ["/a\\b", "/x\\..\\login", "/\\login"] {
            assert_eq!(normalize_path(p), Err(PathError::Backslash), "{p}");
        }
        for p in ["/a%", "/a%4", "/a%zz", "/%G0"] {
            assert_eq!(normalize_path(p), Err(PathError::InvalidPercentEncoding), "{p}");
        }
    }

    #[test]
    fn an_escaped_percent_before_hex_digits_is_refused() {
        for p in ["/%256Cogin", "/%25%36%43ogin", "/a%252F", "/%2525"] {
            assert_eq!(normalize_path(p), Err(PathError::DoubleEncoding), "{p}");
        }
        assert_eq!(n("/100%25off"), "/100%25off");
        assert_eq!(n("/100%25"), "/100%25");
        assert_eq!(n("/a%25%7A"), "/a%25z");
    }

    #[test]
    fn routes_match_without_segment_parameters() {
        let r = |p: &str| route_path(p).map(Cow::into_owned);
        assert_eq!(r("/login;x").unwrap(), "/login");
        assert_eq!(r("/a;b=1;c=2/login;x").unwrap(), "/a/login");
        assert_eq!(r("/app/;jsessionid=1").unwrap(), "/app/");
        assert_eq!(r("/;x").unwrap(), "/");
        assert!(matches!(route_path("/login"), Ok(Cow::Borrowed(_))));
        for p in ["/;x/login", "/..;/login", "/x/..;/login", "/.;x/login", "/x/..;"] {
            assert_eq!(route_path(p), Err(PathError::AmbiguousParameters), "{p}");
        }
    }

    proptest::proptest! {
        #[test]
        fn normalizing_twice_changes_nothing(p in "/[a-zA-Z0-9./%~_;-]{0,40}") {
            if let Ok(once) = normalize_path(&p) {
                let twice = normalize_path(&once).unwrap();
                proptest::prop_assert_eq!(&*once, &*twice);
                proptest::prop_assert!(matches!(normalize_path(&once), Ok(Cow::Borrowed(_))));
                // What routes match needs no further resolving: a server that
                // drops parameters reads the resource the route matched.
                if let Ok(route) = route_path(&once) {
                    proptest::prop_assert!(matches!(normalize_path(&route), Ok(Cow::Borrowed(_))), "{}", route);
                }
            }
        }
    }
}
