//! Ed25519 signatures for snapshots and deltas.
//!
//! A signature is detached: `FILE.sig` (or `URL.sig`) next to the body holds
//! the 64-byte Ed25519 signature of the body's exact bytes, in base64 on one
//! line. Detached, so that any static file host can serve a signed feed and a
//! signature never changes the body it covers.
//!
//! Keys: the public key is the raw 32 bytes, written in base64 (or hex); the
//! private key is a PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`), the same
//! form `openssl genpkey -algorithm ed25519` writes.

use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// Longest `.sig` file read: a signature is 88 base64 characters.
pub const MAX_SIGNATURE_BYTES: usize = 1024;

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// Why a body was not accepted as signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature text is not 64 bytes of base64 or hex.
    #[error("the signature is malformed: {0}")]
    Malformed(String),
    /// Well-formed, but not made by the configured key over these bytes.
    #[error("the signature does not match the content and the public key")]
    Mismatch,
}

/// An Ed25519 public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses 32 bytes written in base64 (44 characters) or hex (64).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            decode_hex(text)
        } else {
            decode_base64(text).ok_or_else(|| "neither base64 nor hex".to_owned())?
        };
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("an Ed25519 public key is 32 bytes, this is {}", b.len()))?;
        Ok(Self(key))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks `signature` (the text of a `.sig` file) over `body`.
    pub fn verify(&self, body: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let sig = parse_signature(signature)?;
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(body, &sig)
            .map_err(|_| SignatureError::Mismatch)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&encode_base64(&self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

fn parse_signature(text: &[u8]) -> Result<[u8; 64], SignatureError> {
    let malformed = |why: &str| SignatureError::Malformed(why.to_owned());
    let text = std::str::from_utf8(text)
        .map_err(|_| malformed("not text"))?
        .trim();
    let bytes = if text.len() == 128 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        decode_hex(text)
    } else {
        decode_base64(text).ok_or_else(|| malformed("neither base64 nor hex"))?
    };
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| SignatureError::Malformed(format!("{} bytes, not 64", b.len())))
}

/// A private key that signs.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A new random key and its PKCS#8 PEM text (to be saved privately).
    pub fn generate() -> Result<(Self, String), String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "no randomness".to_owned())?;
        let key = Self::from_der(pkcs8.as_ref())?;
        Ok((key, pem(pkcs8.as_ref())))
    }

    /// Reads a PKCS#8 PEM private key.
    pub fn from_pem(text: &str) -> Result<Self, String> {
        let body = text
            .split_once(PEM_BEGIN)
            .and_then(|(_, rest)| rest.split_once(PEM_END))
            .map(|(body, _)| body)
            .ok_or_else(|| format!("not a PEM private key (no {PEM_BEGIN:?} block)"))?;
        let der = decode_base64(&body.split_whitespace().collect::<String>())
            .ok_or_else(|| "the PEM block is not base64".to_owned())?;
        Self::from_der(&der)
    }

    fn from_der(der: &[u8]) -> Result<Self, String> {
        // "maybe_unchecked" also takes PKCS#8 v1, which OpenSSL writes.
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(Self)
            .map_err(|e| format!("not an Ed25519 private key: {e}"))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut key = [0; 32];
        key.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(key)
    }

    /// The `.sig` file text for `body`: base64 and a newline.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut s = encode_base64(self.0.sign(body).as_ref());
        s.push('\n');
        s
    }
}

/// Where the detached signature of `path` lives: `path` + `.sig`.
pub fn signature_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Where a store records the snapshots it wrote itself (applied deltas):
/// `path` + `.written`, one SHA-256 per line, newest first.
pub fn written_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".written");
    PathBuf::from(s)
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Records that this store is about to write `bytes` to `path`. The
/// previous record is kept: a crash between this and the rename leaves
/// whichever file is there loadable.
pub(crate) fn record_written(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    let record = written_path(path);
    let previous = std::fs::read_to_string(&record).unwrap_or_default();
    let mut text = sha256_hex(bytes);
    text.push('\n');
    if let Some(last) = previous.lines().next() {
        text.push_str(last);
        text.push('\n');
    }
    crate::write_atomically(&record, text.as_bytes())
}

/// Whether the snapshot `bytes`, read from `path`, may be served under
/// `key`: `path.sig` verifies, or the bytes are a snapshot this store wrote
/// itself there (a delta applied on top of a signed one; see
/// [`written_path`]). The record is trusted like the store's directory.
pub(crate) fn check_snapshot(path: &Path, bytes: &[u8], key: &PublicKey) -> crate::Result<()> {
    use std::io::Read as _;
    let digest = sha256_hex(bytes);
    let record = std::fs::read_to_string(written_path(path)).unwrap_or_default();
    if record.lines().any(|l| l.trim() == digest) {
        return Ok(());
    }
    let sig_path = signature_path(path);
    let untrusted = |missing: bool, why: String| crate::Error::Untrusted {
        path: path.to_owned(),
        missing,
        why,
    };
    let mut sig = Vec::new();
    match std::fs::File::open(&sig_path) {
        Ok(f) => f
            .take(MAX_SIGNATURE_BYTES as u64)
            .read_to_end(&mut sig)
            .map_err(|e| untrusted(false, format!("{}: {e}", sig_path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(untrusted(
                true,
                format!(
                    "not signed: {} is missing (store.feed_public_key is set; sign the snapshot with `palisade store sign`)",
                    sig_path.display()
                ),
            ));
        }
        Err(e) => return Err(untrusted(false, format!("{}: {e}", sig_path.display()))),
    };
    key.verify(bytes, &sig)
        .map_err(|e| untrusted(false, format!("{e} ({})", sig_path.display())))
}

fn pem(der: &[u8]) -> String {
    let b64 = encode_base64(der);
    let mut s = format!("{PEM_BEGIN}\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(PEM_END);
    s.push('\n');
    s
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn encode_base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding required; `None` for anything else.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if text.is_empty() || !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let last = text.len() / 4 - 1;
    for (q, quad) in text.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && q != last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = B64.iter().position(|&b| b == c)?;
            n = n << 6 | v as u32;
        }
        n <<= 6 * pad;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

fn decode_hex(text: &str) -> Vec<u8> {
    text.as_bytes()
        .chunks(2)
        .map(|p| {
            let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            digit(p[0]) << 4 | digit(p[1])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base64_round_trips() {
        for len in 0..70 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode_base64(&bytes);
            if len > 0 {
                assert_eq!(decode_base64(&text).unwrap(), bytes, "{len}");
            }
        }
        assert_eq!(encode_base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_base64(b"fo"), "Zm8=");
        assert_eq!(decode_base64("Zm8=").unwrap(), b"fo");
        assert!(decode_base64("Zm8").is_none());
        assert!(decode_base64("Zm==Zm8=").is_none());
        assert!(decode_base64("Zm8*").is_none());
    }

    #[test]
    fn a_signature_covers_every_byte() {
        let (key, pem) = SigningKey::generate().unwrap();
        let public = SigningKey::from_pem(&pem).unwrap().public_key();
        assert_eq!(public, key.public_key());
        assert_eq!(PublicKey::parse(&public.to_string()).unwrap(), public);
        let hex: String = public.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(PublicKey::parse(&hex).unwrap(), public);

        let body = b"palisade-delta 1 from=0 to=1\nend ops=0 crc32=0\n".to_vec();
        let sig = key.sign(&body);
        public.verify(&body, sig.as_bytes()).unwrap();
        for i in 0..body.len() {
            let mut flipped = body.clone();
            flipped[i] ^= 1;
            assert_eq!(
                public.verify(&flipped, sig.as_bytes()),
                Err(SignatureError::Mismatch)
            );
        }
        let (other, _) = SigningKey::generate().unwrap();
        assert_eq!(
            other.public_key().verify(&body, sig.as_bytes()),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            public.verify(&body, b"garbage"),
            Err(SignatureError::Malformed(_))
        ));
        assert!(PublicKey::parse("abc").is_err());
        assert!(PublicKey::parse(&encode_base64(&[1; 31])).is_err());
    }

    #[test]
    fn a_snapshot_is_trusted_when_signed_or_written_here() {
        let dir = std::env::temp_dir().join(format!("palisade-sign-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.pstore");
        let (key, _) = SigningKey::generate().unwrap();
        let public = key.public_key();
        let untrusted = |bytes: &[u8]| match check_snapshot(&path, bytes, &public) {
            Err(crate::Error::Untrusted { missing, .. }) => Some(missing),
            Err(e) => panic!("{e}"),
            Ok(()) => None,
        };
        assert_eq!(untrusted(b"one"), Some(true), "no signature, no record");
        std::fs::write(signature_path(&path), key.sign(b"one")).unwrap();
        assert_eq!(untrusted(b"one"), None);
        assert_eq!(untrusted(b"two"), Some(false));
        // Our own writes: the newest and the one before stay trusted (a
        // crash between the record and the rename leaves either in place).
        record_written(&path, b"two").unwrap();
        record_written(&path, b"three").unwrap();
        assert_eq!(untrusted(b"two"), None);
        assert_eq!(untrusted(b"three"), None);
        record_written(&path, b"four").unwrap();
        assert_eq!(untrusted(b"two"), Some(false), "only two records are kept");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
