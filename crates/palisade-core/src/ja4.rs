//! JA4 TLS client fingerprints (FoxIO's JA4, TLS over TCP), computed from
//! the raw bytes a client sent before the server's first answer.
//!
//! `t13d1516h2_8daaf6152771_e5627efa2ab1` reads: TLS over TCP, highest
//! offered version 1.3, an SNI (`d`; `i` without), 15 cipher suites, 16
//! extensions, first ALPN `h2`; then the truncated SHA-256 of the sorted
//! cipher suites, and of the sorted extensions (SNI and ALPN left out)
//! followed by the signature algorithms in their order. GREASE values
//! count nowhere.
//!
//! The parser reads only what the lengths on the wire promise and never
//! more than it was given: any input is an answer or an error, never a
//! panic.
//!
//! ```
//! use palisade_core::ja4::{Ja4Error, ja4};
//!
//! assert_eq!(ja4(b"GET / HTTP/1.1\r\n"), Err(Ja4Error::NotHandshake));
//! ```

use std::fmt;
use std::fmt::Write as _;

/// The largest ClientHello kept to fingerprint it, its 4-byte handshake
/// header included: rustls's own bound on a handshake message. A hello
/// declaring more has no JA4 ([`Ja4Error::TooLarge`]) and nothing of it is
/// kept.
pub const MAX_HELLO: usize = 64 * 1024;

/// The most TLS records a ClientHello may span and still get a JA4. A
/// post-quantum hello (Chromium's, 1.8 KB) fits one 16 KiB record, but a
/// client may fragment it (RFC 8446 §5.1): tools that dodge SNI filters
/// cut it into tens of records of a few bytes. Each record costs a 5-byte
/// header read and nothing kept; the bound ends a stream of empty records.
pub const MAX_HELLO_RECORDS: usize = 1024;

/// A JA4 fingerprint: always 36 ASCII characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ja4([u8; 36]);

impl Ja4 {
    /// The fingerprint as text.
    pub fn as_str(&self) -> &str {
        // Built from ASCII only (digits, letters, hex, `_`).
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for Ja4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Ja4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ja4({})", self.as_str())
    }
}

/// A ClientHello's JA4, and the same computed without the extensions
/// that come and go between one client's fresh and resumed handshakes
/// (padding, session_ticket, pre_shared_key, early_data): a browser that
/// resumes its TLS session sends a pre_shared_key and so another JA4, but
/// the same `stable` one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Fingerprints {
    /// JA4 as FoxIO defines it: what logs and other tools show.
    pub ja4: Ja4,
    /// JA4 without the resumption-dependent extensions, in JA4's form:
    /// what to recognize one client by across its connections.
    pub stable: Ja4,
}

/// Extensions present or absent by connection state, not by TLS stack.
const EPHEMERAL: [u16; 4] = [0x0015, 0x0023, 0x0029, 0x002a];

/// Why bytes gave no fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ja4Error {
    /// The bytes end before the ClientHello does.
    Incomplete,
    /// The first record is not a TLS handshake record.
    NotHandshake,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// A length inside the ClientHello does not fit, or a record of
    /// another kind came between its parts.
    Malformed,
    /// The ClientHello is longer than [`MAX_HELLO`] or spans more than
    /// [`MAX_HELLO_RECORDS`] records.
    TooLarge,
}

impl fmt::Display for Ja4Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Incomplete => "client hello incomplete",
            Self::NotHandshake => "not a tls handshake",
            Self::NotClientHello => "not a client hello",
            Self::Malformed => "malformed client hello",
            Self::TooLarge => "client hello too large",
        })
    }
}

impl std::error::Error for Ja4Error {}

const HANDSHAKE: u8 = 22;
const EXT_SNI: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
const EXT_SIGNATURE_ALGORITHMS: u16 = 0x000d;
const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;

/// The JA4 of the ClientHello at the start of `records` (TLS records as
/// read from the connection; the hello may span several).
pub fn ja4(records: &[u8]) -> Result<Ja4, Ja4Error> {
    fingerprints(records).map(|f| f.ja4)
}

/// Both [`Fingerprints`] of the ClientHello at the start of `records`.
pub fn fingerprints(records: &[u8]) -> Result<Fingerprints, Ja4Error> {
    HelloReader::new()
        .feed(records)
        .unwrap_or(Err(Ja4Error::Incomplete))
}

/// Reads a connection's first bytes as they arrive, however they are cut,
/// and answers with the JA4 of its ClientHello once the hello is whole (or
/// why it has none) without keeping more than the hello itself: the
/// record headers are read and dropped, the handshake message is kept
/// (growing as its bytes arrive, never past [`MAX_HELLO`]) only until it is
/// whole, and nothing at all is kept when it sits in one read, as it
/// nearly always does.
///
/// ```
/// use palisade_core::ja4::{HelloReader, Ja4Error};
///
/// let mut r = HelloReader::new();
/// assert_eq!(r.feed(&[22, 3, 1]), None, "more to come");
/// // A ClientHello declaring 1 MiB: refused from its header, nothing kept.
/// assert_eq!(r.feed(&[0, 4, 1, 0x10, 0, 0]), Some(Err(Ja4Error::TooLarge)));
/// assert_eq!(r.kept(), 0);
/// ```
#[derive(Debug, Default)]
pub struct HelloReader {
    /// The record header being read, and how much of it has arrived.
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current record's fragment still to come.
    fragment_left: usize,
    /// Records begun so far.
    records: usize,
    /// The handshake message so far, its header included.
    message: Vec<u8>,
    /// The answer, once there is one.
    done: Option<Result<Fingerprints, Ja4Error>>,
}

impl HelloReader {
    /// A reader that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held for the hello (what is allocated, not only used).
    pub fn kept(&self) -> usize {
        self.message.capacity()
    }

    /// The next bytes read from the connection. `None` while the hello is
    /// not whole; then the same answer for every later call, whatever is
    /// fed (what follows the hello is no part of it).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<Result<Fingerprints, Ja4Error>> {
        while self.done.is_none() && !bytes.is_empty() {
            if self.fragment_left == 0 {
                let n = (5 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header[0] != HANDSHAKE {
                    // RFC 8446 §5.1: a handshake message is not interleaved
                    // with other records.
                    let first = self.records == 0;
                    self.finish(Err(if first {
                        Ja4Error::NotHandshake
                    } else {
                        Ja4Error::Malformed
                    }));
                } else if self.header_len == 5 {
                    self.header_len = 0;
                    self.records += 1;
                    self.fragment_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                    if self.records > MAX_HELLO_RECORDS {
                        self.finish(Err(Ja4Error::TooLarge));
                    }
                }
                continue;
            }
            let n = self.fragment_left.min(bytes.len());
            let (fragment, rest) = bytes.split_at(n);
            self.fragment_left -= n;
            bytes = rest;
            // The hello whole in one read: fingerprinted where it lies.
            if self.message.is_empty()
                && let Some(hello) = whole_hello(fragment)
            {
                self.finish(hello.and_then(fingerprint));
                continue;
            }
            self.append(fragment);
        }
        self.done
    }

    /// Adds a fragment's bytes to the message, up to its declared end.
    fn append(&mut self, mut fragment: &[u8]) {
        while self.done.is_none() && !fragment.is_empty() {
            let end = match declared_len(&self.message) {
                None => 4,
                Some(len) => 4 + len,
            };
            let n = (end - self.message.len()).min(fragment.len());
            let needed = self.message.len() + n;
            if needed > self.message.capacity() {
                // Doubling, but never past the declared end: at most
                // MAX_HELLO is ever allocated.
                let cap = (self.message.capacity() * 2).clamp(needed, end);
                self.message.reserve_exact(cap - self.message.len());
            }
            self.message.extend_from_slice(&fragment[..n]);
            fragment = &fragment[n..];
            if self.message.len() == 4 {
                if self.message[0] != CLIENT_HELLO {
                    return self.finish(Err(Ja4Error::NotClientHello));
                }
                if declared_len(&self.message).is_none_or(|len| 4 + len > MAX_HELLO) {
                    return self.finish(Err(Ja4Error::TooLarge));
                }
            }
            if declared_len(&self.message).is_some_and(|len| self.message.len() == 4 + len) {
                let answer = fingerprint(&self.message[4..]);
                self.finish(answer);
            }
        }
    }

    fn finish(&mut self, answer: Result<Fingerprints, Ja4Error>) {
        self.done = Some(answer);
        self.message = Vec::new();
    }
}

const CLIENT_HELLO: u8 = 1;

/// The body length a handshake header declares, once its 4 bytes are here.
fn declared_len(message: &[u8]) -> Option<usize> {
    let h = message.first_chunk::<4>()?;
    Some(usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]))
}

/// The ClientHello body when `fragment` (a record's, from its start)
/// holds all of it, or why it is none; `None` when more is to come.
fn whole_hello(fragment: &[u8]) -> Option<Result<&[u8], Ja4Error>> {
    let len = declared_len(fragment)?;
    if fragment[0] != CLIENT_HELLO {
        return Some(Err(Ja4Error::NotClientHello));
    }
    if 4 + len > MAX_HELLO {
        return Some(Err(Ja4Error::TooLarge));
    }
    fragment.get(4..4 + len).map(Ok)
}

/// A cursor over bytes whose every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Ja4Error> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(Ja4Error::Malformed)?;
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Ja4Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Ja4Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Result<&'a [u8], Ja4Error> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Result<&'a [u8], Ja4Error> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The u16 values of a list, in order.
fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes.chunks_exact(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// GREASE (RFC 8701): 0x0a0a, 0x1a1a, … 0xfafa.
fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

fn fingerprint(hello: &[u8]) -> Result<Fingerprints, Ja4Error> {
    let mut r = Reader(hello);
    let legacy_version = r.u16()?;
    r.take(32)?; // random
    r.vec8()?; // session id
    let mut ciphers: Vec<u16> = u16s(r.vec16()?).filter(|c| !is_grease(*c)).collect();
    r.vec8()?; // compression methods
    let mut extensions: Vec<u16> = Vec::new();
    let mut extension_count = 0usize;
    let mut sni = false;
    let mut alpn: &[u8] = &[];
    let mut highest: Option<u16> = None;
    let mut signature_algorithms: &[u8] = &[];
    // Extensions are optional (before TLS 1.2 clients could leave them out).
    if !r.0.is_empty() {
        let mut ext = Reader(r.vec16()?);
        while !ext.0.is_empty() {
            let kind = ext.u16()?;
            let data = ext.vec16()?;
            if is_grease(kind) {
                continue;
            }
            extension_count += 1;
            match kind {
                EXT_SNI => sni = true,
                EXT_ALPN => {
                    let mut list = Reader(data);
                    // An empty or cut list leaves the ALPN part at "00".
                    alpn = list
                        .vec16()
                        .ok()
                        .and_then(|l| Reader(l).vec8().ok())
                        .unwrap_or(&[]);
                }
                EXT_SUPPORTED_VERSIONS => {
                    let list = Reader(data).vec8().unwrap_or(&[]);
                    highest = u16s(list).filter(|v| !is_grease(*v)).max();
                }
                EXT_SIGNATURE_ALGORITHMS => {
                    signature_algorithms = Reader(data).vec16().unwrap_or(&[]);
                }
                _ => {}
            }
            if kind != EXT_SNI && kind != EXT_ALPN {
                extensions.push(kind);
            }
        }
    }
    ciphers.sort_unstable();
    extensions.sort_unstable();

    let mut text = String::with_capacity(5 * (ciphers.len() + extensions.len()) + 5 * 32);
    let ciphers_hash = hash12(&mut text, ciphers.iter().copied(), None::<std::iter::Empty<u16>>);
    let algorithms = || u16s(signature_algorithms).filter(|a| !is_grease(*a));
    let mut assemble = |count: usize, extensions: &[u16]| {
        let mut out = [0u8; 36];
        out[0] = b't';
        out[1..3].copy_from_slice(version(highest.unwrap_or(legacy_version)));
        out[3] = if sni { b'd' } else { b'i' };
        out[4..6].copy_from_slice(&two_digits(ciphers.len()));
        out[6..8].copy_from_slice(&two_digits(count));
        out[8..10].copy_from_slice(&alpn_chars(alpn));
        out[10] = b'_';
        out[11..23].copy_from_slice(&ciphers_hash);
        out[23] = b'_';
        out[24..36].copy_from_slice(&hash12(&mut text, extensions.iter().copied(), Some(algorithms())));
        Ja4(out)
    };
    let ja4 = assemble(extension_count, &extensions);
    let before = extensions.len();
    extensions.retain(|e| !EPHEMERAL.contains(e));
    let stable = if extensions.len() == before {
        ja4
    } else {
        assemble(extension_count - (before - extensions.len()), &extensions)
    };
    Ok(Fingerprints { ja4, stable })
}

fn version(v: u16) -> &'static [u8; 2] {
    match v {
        0x0304 => b"13",
        0x0303 => b"12",
        0x0302 => b"11",
        0x0301 => b"10",
        0x0300 => b"s3",
        0x0002 => b"s2",
        0xfeff => b"d1",
        0xfefd => b"d2",
        0xfefc => b"d3",
        _ => b"00",
    }
}

fn two_digits(n: usize) -> [u8; 2] {
    let n = n.min(99) as u8;
    [b'0' + n / 10, b'0' + n % 10]
}

/// First and last character of the first ALPN value; its hex spelling's
/// when either is not alphanumeric; `00` without one.
fn alpn_chars(alpn: &[u8]) -> [u8; 2] {
    let (Some(&first), Some(&last)) = (alpn.first(), alpn.last()) else {
        return *b"00";
    };
    if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
        [first, last]
    } else {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        [HEX[usize::from(first >> 4)], HEX[usize::from(last & 0xf)]]
    }
}

/// The first 12 hex characters of the SHA-256 of `values` in 4-digit hex,
/// comma-separated, then `_` and `tail` the same way when it has any;
/// `000000000000` when `values` is empty.
fn hash12(
    text: &mut String,
    values: impl Iterator<Item = u16>,
    tail: Option<impl Iterator<Item = u16>>,
) -> [u8; 12] {
    text.clear();
    for (i, v) in values.enumerate() {
        if i > 0 {
            text.push(',');
        }
        let _ = write!(text, "{v:04x}");
    }
    if text.is_empty() {
        return *b"000000000000";
    }
    for (i, v) in tail.into_iter().flatten().enumerate() {
        text.push(if i == 0 { '_' } else { ',' });
        let _ = write!(text, "{v:04x}");
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut out = [0u8; 12];
    for (pair, byte) in out.chunks_exact_mut(2).zip(digest.as_ref()) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello with these values, in these orders; every extension
    /// not given a body here is empty.
    struct Hello<'a> {
        legacy_version: u16,
        ciphers: &'a [u16],
        extensions: &'a [u16],
        versions: &'a [u16],
        alpn: &'a [&'a [u8]],
        sigalgs: &'a [u16],
    }

    fn be(v: u16) -> [u8; 2] {
        v.to_be_bytes()
    }

    impl Hello<'_> {
        /// The handshake message (header included).
        fn message(&self) -> Vec<u8> {
            self.message_padded(0)
        }

        /// The message with a padding extension (RFC 7685) of `padding`
        /// bytes at the end, when not 0.
        fn message_padded(&self, padding: usize) -> Vec<u8> {
            let mut body = Vec::new();
            body.extend(be(self.legacy_version));
            body.extend([7u8; 32]);
            body.push(32);
            body.extend([9u8; 32]);
            body.extend(be((self.ciphers.len() * 2) as u16));
            self.ciphers.iter().for_each(|c| body.extend(be(*c)));
            body.extend([1, 0]);
            let mut exts = Vec::new();
            for &kind in self.extensions {
                let data: Vec<u8> = match kind {
                    EXT_SNI => {
                        let name = b"example.com";
                        let mut d = be((name.len() + 3) as u16).to_vec();
                        d.push(0);
                        d.extend(be(name.len() as u16));
                        d.extend(name);
                        d
                    }
                    EXT_ALPN => {
                        let mut list = Vec::new();
                        for p in self.alpn {
                            list.push(p.len() as u8);
                            list.extend(*p);
                        }
                        let mut d = be(list.len() as u16).to_vec();
                        d.extend(list);
                        d
                    }
                    EXT_SUPPORTED_VERSIONS => {
                        let mut d = vec![(self.versions.len() * 2) as u8];
                        self.versions.iter().for_each(|v| d.extend(be(*v)));
                        d
                    }
                    EXT_SIGNATURE_ALGORITHMS => {
                        let mut d = be((self.sigalgs.len() * 2) as u16).to_vec();
                        self.sigalgs.iter().for_each(|v| d.extend(be(*v)));
                        d
                    }
                    _ => Vec::new(),
                };
                exts.extend(be(kind));
                exts.extend(be(data.len() as u16));
                exts.extend(data);
            }
            if padding > 0 {
                exts.extend(be(0x0015));
                exts.extend(be(padding as u16));
                exts.resize(exts.len() + padding, 0);
            }
            body.extend(be(exts.len() as u16));
            body.extend(exts);
            let mut msg = vec![1];
            msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
            msg.extend(body);
            msg
        }

        /// The message in records of at most `max` bytes each.
        fn records(&self, max: usize) -> Vec<u8> {
            let mut out = Vec::new();
            for chunk in self.message().chunks(max) {
                out.extend(record(chunk));
            }
            out
        }
    }

    /// One handshake record holding `fragment`.
    fn record(fragment: &[u8]) -> Vec<u8> {
        let mut out = vec![22, 3, 1];
        out.extend(be(fragment.len() as u16));
        out.extend(fragment);
        out
    }

    /// `message` in records cut at `cuts` (offsets into it, any order).
    fn split_at(message: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(message.len())).collect();
        cuts.push(0);
        cuts.push(message.len());
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2)
            .flat_map(|w| record(&message[w[0]..w[1]]))
            .collect()
    }

    const CHROME_EXAMPLE: &str = "t13d1516h2_8daaf6152771_e5627efa2ab1";

    fn hex_list(s: &str) -> Vec<u16> {
        s.split(',')
            .map(|h| u16::from_str_radix(h, 16).unwrap())
            .collect()
    }

    /// Chrome's hello of FoxIO's worked example (JA4_ro of JA4.md), with
    /// GREASE put back where Chrome sends it.
    fn chrome_example() -> Hello<'static> {
        Hello {
            legacy_version: 0x0303,
            ciphers: Box::leak(
                [
                    vec![0x2a2a],
                    hex_list("1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,0035"),
                ]
                .concat()
                .into_boxed_slice(),
            ),
            extensions: Box::leak(
                [
                    vec![0xdada],
                    hex_list(
                        "001b,0000,0033,0010,4469,0017,002d,000d,0005,0023,0012,002b,ff01,000b,000a,0015",
                    ),
                    vec![0x3a3a],
                ]
                .concat()
                .into_boxed_slice(),
            ),
            versions: &[0x7a7a, 0x0304, 0x0303],
            alpn: &[b"h2", b"http/1.1"],
            sigalgs: Box::leak(hex_list("0403,0804,0401,0503,0805,0501,0806,0601").into_boxed_slice()),
        }
    }

    #[test]
    fn foxio_worked_example() {
        let hello = chrome_example();
        let fp = ja4(&hello.records(16 * 1024)).unwrap();
        assert_eq!(fp.as_str(), CHROME_EXAMPLE);
    }

    #[test]
    fn the_stable_fingerprint_ignores_what_resumption_changes() {
        let fresh = chrome_example();
        let exts = [fresh.extensions, &[0x0029, 0x002a]].concat();
        let resumed = Hello {
            extensions: &exts,
            ..chrome_example()
        };
        let (a, b) = (
            fingerprints(&fresh.records(16 * 1024)).unwrap(),
            fingerprints(&resumed.records(16 * 1024)).unwrap(),
        );
        assert_eq!(a.ja4.as_str(), CHROME_EXAMPLE);
        assert_eq!(
            &b.ja4.as_str()[..11],
            "t13d1518h2_",
            "pre_shared_key and early_data count"
        );
        assert_ne!(a.ja4, b.ja4);
        assert_eq!(a.stable, b.stable);
        // Chrome's padding and session_ticket go too: 14 extensions, the
        // cipher part as is.
        assert_eq!(&a.stable.as_str()[..23], "t13d1514h2_8daaf6152771");
        assert_ne!(a.stable.as_str()[24..], a.ja4.as_str()[24..]);
        // Without any of them, both are one.
        let plain = Hello {
            legacy_version: 0x0303,
            ciphers: &[0x1301],
            extensions: &[0x000a, 0x000d],
            versions: &[0x0304],
            alpn: &[],
            sigalgs: &[0x0403],
        };
        let p = fingerprints(&plain.records(16 * 1024)).unwrap();
        assert_eq!(p.ja4, p.stable);
    }

    #[test]
    fn published_chrome_fingerprints() {
        // FoxIO's sigalg-grease capture: a GREASE signature algorithm
        // (0x0a0a) must not count.
        let ciphers = hex_list("1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,0035");
        let exts =
            hex_list("fe0d,0010,0017,0033,44cd,ff01,000a,000d,0023,002b,000b,ca34,002d,0000,0005,001b,0012");
        let sigalgs = [
            vec![0x0a0a],
            hex_list("0904,0905,0906,0403,0804,0401,0503,0805,0501,0806,0601"),
        ]
        .concat();
        let hello = Hello {
            legacy_version: 0x0303,
            ciphers: &ciphers,
            extensions: &exts,
            versions: &[0x0304, 0x0303],
            alpn: &[b"h2"],
            sigalgs: &sigalgs,
        };
        assert_eq!(
            ja4(&hello.records(16 * 1024)).unwrap().as_str(),
            "t13d1517h2_8daaf6152771_cb7bf5808d99"
        );
        // Chrome 143 as browserleaks.com reports it (JA4 and JA4_ro).
        let exts =
            hex_list("002d,0033,0010,fe0d,0017,44cd,0000,000b,000a,002b,ff01,0023,0012,0005,000d,001b");
        let sigalgs = hex_list("0403,0804,0401,0503,0805,0501,0806,0601");
        let hello = Hello {
            extensions: &exts,
            sigalgs: &sigalgs,
            ..hello
        };
        assert_eq!(
            ja4(&hello.records(16 * 1024)).unwrap().as_str(),
            "t13d1516h2_8daaf6152771_d8a2da3f94cd"
        );
    }

    #[test]
    fn a_real_chromium_hello() {
        // Captured from headless Chromium 148 (Debian) on this machine:
        // its GREASE values and extension order change with every
        // connection, its JA4 does not; browserleaks.com publishes the
        // same for Chrome 143.
        let bytes = include_bytes!("../testdata/chromium148-hello.bin");
        assert_eq!(
            ja4(bytes).unwrap().as_str(),
            "t13d1516h2_8daaf6152771_d8a2da3f94cd"
        );
    }

    #[test]
    fn hello_across_records_is_joined() {
        let hello = chrome_example();
        for max in [1, 3, 4, 5, 100] {
            assert_eq!(
                ja4(&hello.records(max)).unwrap().as_str(),
                CHROME_EXAMPLE,
                "records of {max} bytes"
            );
        }
        let message = hello.message();
        let half = message.len() / 2;
        // Two records, three, and cuts inside the 4-byte handshake header.
        for cuts in [&[half][..], &[50, 120], &[1], &[2], &[3], &[1, 2, 3], &[2, 4, 90]] {
            assert_eq!(
                ja4(&split_at(&message, cuts)).unwrap().as_str(),
                CHROME_EXAMPLE,
                "cut at {cuts:?}"
            );
        }
        // One byte a record, for a longer hello: more records than a hello
        // may span.
        let long = hello.message_padded(MAX_HELLO_RECORDS);
        let cuts: Vec<usize> = (1..MAX_HELLO_RECORDS).collect();
        assert_eq!(
            &ja4(&split_at(&long, &cuts)).unwrap().as_str()[..10],
            "t13d1517h2"
        );
        let cuts: Vec<usize> = (1..=MAX_HELLO_RECORDS).collect();
        assert_eq!(ja4(&split_at(&long, &cuts)), Err(Ja4Error::TooLarge));
        // Empty records count too: a stream of them ends.
        let mut r = HelloReader::new();
        let empty = [22, 3, 1, 0, 0];
        let answers: Vec<_> = (0..=MAX_HELLO_RECORDS).map(|_| r.feed(&empty)).collect();
        assert!(answers[..MAX_HELLO_RECORDS].iter().all(Option::is_none));
        assert_eq!(answers[MAX_HELLO_RECORDS], Some(Err(Ja4Error::TooLarge)));
    }

    #[test]
    fn a_hello_larger_than_a_record_spans_two() {
        // 20 KB of padding: past one record's 16 KiB, as a hello with
        // several post-quantum key shares may be.
        let message = chrome_example().message_padded(20_000);
        assert!(message.len() > 16 * 1024);
        let records = split_at(&message, &[16 * 1024]);
        let fp = fingerprints(&records).unwrap();
        assert_eq!(
            &fp.ja4.as_str()[..10],
            "t13d1517h2",
            "padding is one more extension"
        );
        // Fed in reads of 1 000 bytes: the same, and never more kept than
        // the message.
        let mut r = HelloReader::new();
        let mut answer = None;
        for read in records.chunks(1000) {
            answer = answer.or(r.feed(read));
            assert!(r.kept() <= message.len(), "{} kept", r.kept());
        }
        assert_eq!(answer, Some(Ok(fp)));
        assert_eq!(r.kept(), 0, "the copy goes once the hello is whole");
    }

    #[test]
    fn an_oversized_hello_has_no_fingerprint_and_costs_nothing() {
        // Declared past MAX_HELLO: refused at its header, before its body.
        let mut r = HelloReader::new();
        let header = [22, 3, 1, 0x40, 0, 1, 0x01, 0x00, 0x00];
        assert_eq!(r.feed(&header), Some(Err(Ja4Error::TooLarge)));
        assert_eq!(r.kept(), 0);
        // The same cut inside its header, over two records.
        let mut r = HelloReader::new();
        assert_eq!(r.feed(&[22, 3, 1, 0, 2, 1, 0x01]), None);
        assert_eq!(
            r.feed(&[22, 3, 1, 0, 2, 0x00, 0x00]),
            Some(Err(Ja4Error::TooLarge))
        );
        assert_eq!(r.kept(), 0);
        // At the bound exactly: kept, at most MAX_HELLO, while it arrives.
        let body = MAX_HELLO - 4;
        let mut r = HelloReader::new();
        let head = [1, (body >> 16) as u8, (body >> 8) as u8, body as u8];
        assert_eq!(r.feed(&record(&head)), None);
        let filler = vec![0xffu8; 16 * 1024];
        for _ in 0..3 {
            assert_eq!(r.feed(&record(&filler)), None);
            assert!(r.kept() <= MAX_HELLO);
        }
        // Filler is no hello: malformed once whole, and dropped.
        assert_eq!(
            r.feed(&record(&filler[..body - 3 * filler.len()])),
            Some(Err(Ja4Error::Malformed))
        );
        assert_eq!(r.kept(), 0);
    }

    #[test]
    fn another_record_inside_the_hello_means_no_fingerprint() {
        let message = chrome_example().message();
        let mut bytes = record(&message[..100]);
        bytes.extend([20, 3, 3, 0, 1, 1]); // ChangeCipherSpec
        bytes.extend(record(&message[100..]));
        assert_eq!(ja4(&bytes), Err(Ja4Error::Malformed));
        // An alert in the middle of a record header's worth of bytes too.
        let mut bytes = record(&message[..2]);
        bytes.extend([21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(ja4(&bytes), Err(Ja4Error::Malformed));
    }

    #[test]
    fn no_sni_no_alpn_no_supported_versions() {
        let hello = Hello {
            legacy_version: 0x0303,
            ciphers: &[0xc02f, 0x009c],
            extensions: &[0x000a, 0x000d],
            versions: &[],
            alpn: &[],
            sigalgs: &[0x0401],
        };
        let fp = ja4(&hello.records(16 * 1024)).unwrap();
        assert_eq!(&fp.as_str()[..11], "t12i020200_");
        // Without signature algorithms the extension list ends unadorned;
        // the spec's own example of that: 6d807ffa2a79.
        let mut text = String::new();
        let exts = hex_list("0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01");
        assert_eq!(
            &hash12(&mut text, exts.into_iter(), None::<std::iter::Empty<u16>>),
            b"6d807ffa2a79"
        );
    }

    #[test]
    fn empty_lists_hash_to_zeros() {
        let hello = Hello {
            legacy_version: 0x0301,
            ciphers: &[0x0a0a],
            extensions: &[EXT_SNI, EXT_ALPN],
            versions: &[],
            alpn: &[b""],
            sigalgs: &[],
        };
        assert_eq!(
            ja4(&hello.records(16 * 1024)).unwrap().as_str(),
            "t10d000200_000000000000_000000000000"
        );
    }

    #[test]
    fn alpn_characters_follow_the_spec() {
        assert_eq!(&alpn_chars(b"h2"), b"h2");
        assert_eq!(&alpn_chars(b"http/1.1"), b"h1");
        assert_eq!(&alpn_chars(b"x"), b"xx");
        assert_eq!(&alpn_chars(b""), b"00");
        assert_eq!(&alpn_chars(&[0xab]), b"ab");
        assert_eq!(&alpn_chars(&[0xab, 0xcd]), b"ad");
        assert_eq!(&alpn_chars(&[0x30, 0xab]), b"3b");
        assert_eq!(&alpn_chars(&[0x30, 0xab, 0xcd, 0x31]), b"01");
    }

    #[test]
    fn grease_values() {
        assert!(is_grease(0x0a0a) && is_grease(0xfafa) && is_grease(0x3a3a));
        assert!(!is_grease(0x0a1a) && !is_grease(0x1301) && !is_grease(0x0a0b));
    }

    #[test]
    fn what_is_not_a_hello_says_so() {
        assert_eq!(ja4(b""), Err(Ja4Error::Incomplete));
        assert_eq!(
            ja4(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(Ja4Error::NotHandshake)
        );
        assert_eq!(ja4(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Err(Ja4Error::NotClientHello));
        let all = chrome_example().records(16 * 1024);
        for cut in 0..all.len() {
            assert_eq!(ja4(&all[..cut]), Err(Ja4Error::Incomplete), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes_after_the_hello_are_ignored() {
        let mut bytes = chrome_example().records(16 * 1024);
        bytes.extend([20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 2, 0xff, 0xff]);
        assert_eq!(
            ja4(&bytes).unwrap().as_str(),
            "t13d1516h2_8daaf6152771_e5627efa2ab1"
        );
    }

    proptest! {
        #[test]
        fn any_bytes_are_an_answer_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = ja4(&bytes);
            // The same behind a handshake record header, so the parser
            // gets past the first checks.
            let mut rec = vec![22, 3, 1];
            rec.extend(((bytes.len() + 4) as u16).to_be_bytes());
            rec.extend([1, 0]);
            rec.extend((bytes.len() as u16).to_be_bytes());
            rec.extend(&bytes);
            let _ = ja4(&rec);
        }

        #[test]
        fn any_split_into_records_and_reads_gives_the_same_fingerprint(
            cuts in proptest::collection::vec(0usize..400, 0..20),
            reads in proptest::collection::vec(1usize..300, 1..40),
        ) {
            let message = chrome_example().message_padded(100);
            let bytes = split_at(&message, &cuts);
            let mut r = HelloReader::new();
            let mut answer = None;
            let mut rest = &bytes[..];
            for &n in reads.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (read, more) = rest.split_at(n.min(rest.len()));
                answer = answer.or(r.feed(read));
                prop_assert!(r.kept() <= message.len());
                rest = more;
            }
            let whole = ja4(&chrome_example().records(16 * 1024)).unwrap();
            let expected = fingerprints(&record(&message)).unwrap();
            prop_assert_eq!(whole.as_str(), CHROME_EXAMPLE);
            prop_assert_eq!(answer, Some(Ok(expected)));
            prop_assert_eq!(r.kept(), 0);
        }

        #[test]
        fn a_damaged_hello_is_an_answer_not_a_panic(at in 0usize..400, byte in any::<u8>(), max in 1usize..300) {
            let mut bytes = chrome_example().records(max);
            if let Some(b) = bytes.get_mut(at) {
                *b = byte;
            }
            if let Ok(fp) = ja4(&bytes) {
                prop_assert_eq!(fp.as_str().len(), 36);
            }
        }
    }
}
