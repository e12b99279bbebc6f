//! The proof-of-work challenge: a page a browser solves once, and the
//! clearance cookie that spares it the page until the cookie expires.
//!
//! Everything here is stateless. A challenge is a token the daemon signs
//! (HMAC-SHA-256) over the client's address prefix (/24 for IPv4, /64 for
//! IPv6), the difficulty, the route, the issue time and the expiry; the
//! page's script looks for a nonce such that `SHA-256(token || nonce)`
//! starts with `difficulty` zero bits, and sends both to [`VERIFY_PATH`].
//! Checking that costs one HMAC and one SHA-256 of under 128 bytes, on the
//! stack. The clearance cookie is signed the same way over the prefix, the
//! connection's TLS stack (the part of its JA4 that stays the same over one
//! browser's connections, when there is one) and its expiry.
//!
//! The signing key rotates: each `key_rotation` period has its own key,
//! derived from a master secret (random at start, or read from
//! `challenge.secret_file` so that every node of a cluster derives the same
//! keys), and the key of the previous period is still accepted.
//!
//! Lengths are fixed and checked before anything is decoded or hashed: a
//! token or cookie of another length is refused without a hash.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use ring::{digest, hmac, rand::SecureRandom as _};

/// Where the page sends its solution.
pub const VERIFY_PATH: &str = "/.palisade/challenge";
/// The clearance cookie's name; it never reaches the upstream.
pub const COOKIE: &str = "palisade_clearance";

/// The decision a served page shows in metrics and the access log.
pub const ISSUED: &str = "challenge";
/// The decision of a verified solution.
pub const PASSED: &str = "challenge_passed";
/// The decision of a refused solution.
pub const FAILED: &str = "challenge_failed";

/// Hardest difficulty a config may ask for, in leading zero bits.
pub const MAX_DIFFICULTY: u8 = 32;
/// Longest nonce accepted, in decimal digits (a u64).
pub const MAX_NONCE: usize = 20;
/// Longest return path the verification redirects to.
pub const MAX_RETURN: usize = 2048;

const TAG: usize = 32;
const TOKEN_VERSION: u8 = b'T';
const COOKIE_VERSION: u8 = b'C';
/// version, difficulty, epoch, issued ms, expires ms, route, prefix.
const TOKEN_BODY: usize = 1 + 1 + 4 + 8 + 8 + 4 + PREFIX;
const TOKEN_RAW: usize = TOKEN_BODY + TAG;
/// The token as sent: base64url without padding.
pub const TOKEN_LEN: usize = b64_len(TOKEN_RAW);
/// version, epoch, expires ms, prefix, fingerprint hash.
const COOKIE_BODY: usize = 1 + 4 + 8 + PREFIX + 8;
const COOKIE_RAW: usize = COOKIE_BODY + TAG;
/// The cookie's value as sent.
pub const COOKIE_LEN: usize = b64_len(COOKIE_RAW);
/// Family byte and up to 8 address bytes.
const PREFIX: usize = 9;

const fn b64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// When a route's clients are challenged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChallengeMode {
    /// Never (the default).
    #[default]
    Off,
    /// Clients whose score is below the route's `challenge_below`.
    Suspicious,
    /// Suspicious clients, and every client while the route is under
    /// attack (its request rate is over `challenge.attack_rps`).
    UnderAttack,
    /// Every client without a valid clearance.
    Always,
}

impl ChallengeMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Suspicious => "suspicious",
            Self::UnderAttack => "under_attack",
            Self::Always => "always",
        }
    }

    /// From the config spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Self::Off,
            "suspicious" => Self::Suspicious,
            "under_attack" => Self::UnderAttack,
            "always" => Self::Always,
            _ => return None,
        })
    }
}

/// One route's challenge settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteChallenge {
    /// When its clients are challenged.
    pub mode: ChallengeMode,
    /// Scores strictly below this are suspicious.
    pub below: u8,
    /// A machine API: never a page, and never refused for want of one.
    pub api: bool,
}

/// `[challenge]`, with the routes' own settings.
#[derive(Clone, PartialEq)]
pub struct ChallengeSettings {
    /// The master secret from `challenge.secret_file`; `None`: random at start.
    pub secret: Option<Vec<u8>>,
    /// How long a clearance cookie admits its client.
    pub clearance_ttl: Duration,
    /// How long a challenge may take to be solved.
    pub token_ttl: Duration,
    /// How long one signing key is the current one.
    pub key_rotation: Duration,
    /// Difficulty of a client at the initial score, on a calm route.
    pub difficulty: u8,
    /// The hardest the table may go.
    pub max_difficulty: u8,
    /// Requests per second on a route above which it is under attack.
    pub attack_rps: u32,
    /// Points a client loses when a page is issued (a solve gives them back).
    pub issue_penalty: u8,
    /// Points a failed verification costs.
    pub fail_penalty: u8,
    /// Points a forged, expired or moved clearance cookie costs.
    pub cookie_penalty: u8,
    /// Per route, by route index (0 is the default route).
    pub routes: Vec<RouteChallenge>,
    /// The reputation rules' block threshold, for the difficulty table.
    pub block_below: u8,
}

// By hand: the secret must not reach a log.
impl std::fmt::Debug for ChallengeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChallengeSettings")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("clearance_ttl", &self.clearance_ttl)
            .field("token_ttl", &self.token_ttl)
            .field("key_rotation", &self.key_rotation)
            .field("difficulty", &self.difficulty)
            .field("max_difficulty", &self.max_difficulty)
            .field("attack_rps", &self.attack_rps)
            .field("issue_penalty", &self.issue_penalty)
            .field("fail_penalty", &self.fail_penalty)
            .field("cookie_penalty", &self.cookie_penalty)
            .field("routes", &self.routes)
            .field("block_below", &self.block_below)
            .finish()
    }
}

/// Why a token or cookie was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Wrong length or encoding, or a nonce that is not 1-20 digits.
    #[error("malformed")]
    Malformed,
    /// The signature does not match (or its key is older than the previous one).
    #[error("forged")]
    Forged,
    /// Past its expiry.
    #[error("expired")]
    Expired,
    /// Signed for another address prefix or TLS fingerprint.
    #[error("moved")]
    Moved,
    /// The nonce does not give enough leading zero bits.
    #[error("unsolved")]
    Unsolved,
}

impl Failure {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Forged => "forged",
            Self::Expired => "expired",
            Self::Moved => "moved",
            Self::Unsolved => "unsolved",
        }
    }

    /// Every label, for zeroed series.
    pub const ALL: [Self; 5] = [
        Self::Malformed,
        Self::Forged,
        Self::Expired,
        Self::Moved,
        Self::Unsolved,
    ];
}

/// A refused solution: why, and the route it was issued on when its
/// signature held (so that an unsigned one cannot pick a label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub failure: Failure,
    /// The route ([`route_id`]), when the token is ours.
    pub route: Option<u32>,
}

impl From<Failure> for Rejected {
    fn from(failure: Failure) -> Self {
        Self { failure, route: None }
    }
}

/// What a valid solution says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Solved {
    /// The route the challenge was issued on ([`route_id`]).
    pub route: u32,
    /// When it was issued (Unix ms).
    pub issued_ms: u64,
    /// How hard it was.
    pub difficulty: u8,
}

/// The address prefix a token or cookie is bound to: /24 for IPv4, /64
/// for IPv6 (one household or one cloud instance, not one address, so a
/// client whose address changes within its network keeps its clearance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix([u8; PREFIX]);

impl Prefix {
    /// The prefix of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        let mut p = [0u8; PREFIX];
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                p[0] = 4;
                p[1..4].copy_from_slice(&v4.octets()[..3]);
            }
            IpAddr::V6(v6) => {
                p[0] = 6;
                p[1..9].copy_from_slice(&v6.octets()[..8]);
            }
        }
        Self(p)
    }
}

/// The stable id of a route in tokens: the first 4 bytes of SHA-256 of its
/// name, so that a reload that reorders routes, or another node, reads it
/// the same.
pub fn route_id(name: &str) -> u32 {
    let d = digest::digest(&digest::SHA256, name.as_bytes());
    let mut b = [0u8; 4];
    b.copy_from_slice(&d.as_ref()[..4]);
    u32::from_be_bytes(b)
}

/// The difficulty table: `base` for a client at a normal score on a calm
/// route; +2 below the route's `challenge_below`, +2 more below halfway
/// from there to the block threshold; +2 per attack level (over
/// `attack_rps`: 1, over 4 × `attack_rps`: 2); at most `max`.
pub fn difficulty(base: u8, max: u8, score: f64, below: u8, block_below: u8, attack_level: u8) -> u8 {
    let mut d = u32::from(base);
    if score < f64::from(below) {
        d += 2;
        let halfway = (f64::from(below) + f64::from(block_below)) / 2.0;
        if score < halfway {
            d += 2;
        }
    }
    d += 2 * u32::from(attack_level.min(2));
    d.min(u32::from(max.min(MAX_DIFFICULTY))).max(1) as u8
}

/// A token, as the page carries it.
#[derive(Clone, Copy)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    /// Its text (base64url: always ASCII).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// A clearance cookie's value.
#[derive(Clone, Copy)]
pub struct Clearance([u8; COOKIE_LEN]);

impl Clearance {
    /// Its text (base64url).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// The signing keys of the current and the previous period.
struct Ring {
    epoch: u32,
    current: hmac::Key,
    previous: hmac::Key,
}

/// Issues and checks tokens and cookies, and serves the page.
pub struct Challenger {
    master: hmac::Key,
    /// Whether the master came from a file (kept across reloads only when
    /// random: a file's may have changed).
    random: Option<[u8; 32]>,
    ring: ArcSwap<Ring>,
    rotation_secs: u64,
    settings: ChallengeSettings,
    /// Per route: requests in the current and the previous second.
    meters: Vec<AttackMeter>,
    page: Page,
}

impl Challenger {
    /// Builds from `settings`; a random master secret is kept from
    /// `previous` so that a reload does not void every clearance.
    pub fn new(settings: ChallengeSettings, previous: Option<&Challenger>) -> Result<Self, String> {
        let (secret, random) = match (&settings.secret, previous.and_then(|p| p.random)) {
            (Some(s), _) => (s.clone(), None),
            (None, Some(kept)) => (kept.to_vec(), Some(kept)),
            (None, None) => {
                let mut fresh = [0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut fresh)
                    .map_err(|_| "no randomness for the challenge key".to_owned())?;
                (fresh.to_vec(), Some(fresh))
            }
        };
        let master = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        let rotation_secs = settings.key_rotation.as_secs().max(1);
        let epoch = epoch_at(palisade_core::unix_now_ms(), rotation_secs);
        let ring = ArcSwap::from_pointee(derive_ring(&master, epoch));
        let meters = settings.routes.iter().map(|_| AttackMeter::default()).collect();
        Ok(Self {
            master,
            random,
            ring,
            rotation_secs,
            meters,
            page: Page::new(),
            settings,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &ChallengeSettings {
        &self.settings
    }

    /// The route's settings (off for an unknown one).
    pub fn route(&self, route: usize) -> RouteChallenge {
        self.settings.routes.get(route).cloned().unwrap_or_default()
    }

    /// Counts a request on `route` and returns its attack level: 0 calm,
    /// 1 over `attack_rps`, 2 over four times that.
    pub fn attack_level(&self, route: usize, now_ms: u64) -> u8 {
        let Some(meter) = self.meters.get(route) else {
            return 0;
        };
        let rate = meter.hit(now_ms / 1000);
        let limit = u64::from(self.settings.attack_rps.max(1));
        match u64::from(rate) {
            r if r > 4 * limit => 2,
            r if r > limit => 1,
            _ => 0,
        }
    }

    fn keys(&self, now_ms: u64) -> arc_swap::Guard<Arc<Ring>> {
        let epoch = epoch_at(now_ms, self.rotation_secs);
        let ring = self.ring.load();
        if ring.epoch == epoch {
            return ring;
        }
        // Once per rotation period (and per node): the new period's key.
        self.ring.store(Arc::new(derive_ring(&self.master, epoch)));
        self.ring.load()
    }

    /// The key a token or cookie of `epoch` was signed with, if it is the
    /// current or the previous one.
    fn key_for(ring: &Ring, epoch: u32) -> Option<&hmac::Key> {
        if epoch == ring.epoch {
            Some(&ring.current)
        } else if epoch.checked_add(1) == Some(ring.epoch) {
            Some(&ring.previous)
        } else {
            None
        }
    }

    /// A challenge for a client of `prefix` on `route`.
    pub fn issue(&self, prefix: Prefix, route: u32, difficulty: u8, now_ms: u64) -> Token {
        let ring = self.keys(now_ms);
        let ttl = u64::try_from(self.settings.token_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut raw = [0u8; TOKEN_RAW];
        raw[0] = TOKEN_VERSION;
        raw[1] = difficulty.clamp(1, MAX_DIFFICULTY);
        raw[2..6].copy_from_slice(&ring.epoch.to_be_bytes());
        raw[6..14].copy_from_slice(&now_ms.to_be_bytes());
        raw[14..22].copy_from_slice(&now_ms.saturating_add(ttl).to_be_bytes());
        raw[22..26].copy_from_slice(&route.to_be_bytes());
        raw[26..TOKEN_BODY].copy_from_slice(&prefix.0);
        let tag = hmac::sign(&ring.current, &raw[..TOKEN_BODY]);
        raw[TOKEN_BODY..].copy_from_slice(tag.as_ref());
        let mut out = [0u8; TOKEN_LEN];
        b64url_encode(&raw, &mut out);
        Token(out)
    }

    /// Checks a solution: `token` as issued, `nonce` in decimal digits,
    /// from a client of `prefix`. Allocates nothing.
    pub fn verify(
        &self,
        token: &[u8],
        nonce: &[u8],
        prefix: Prefix,
        now_ms: u64,
    ) -> Result<Solved, Rejected> {
        if token.len() != TOKEN_LEN || nonce.is_empty() || nonce.len() > MAX_NONCE {
            return Err(Failure::Malformed.into());
        }
        if !nonce.iter().all(u8::is_ascii_digit) {
            return Err(Failure::Malformed.into());
        }
        let mut raw = [0u8; TOKEN_RAW];
        if !b64url_decode(token, &mut raw) || raw[0] != TOKEN_VERSION {
            return Err(Failure::Malformed.into());
        }
        let (body, tag) = raw.split_at(TOKEN_BODY);
        let epoch = u32::from_be_bytes([body[2], body[3], body[4], body[5]]);
        let ring = self.keys(now_ms);
        let key = Self::key_for(&ring, epoch).ok_or(Failure::Forged)?;
        // ring compares the tags in constant time.
        hmac::verify(key, body, tag).map_err(|_| Failure::Forged)?;
        let route = u32::from_be_bytes([body[22], body[23], body[24], body[25]]);
        let refuse = |failure| Rejected {
            failure,
            route: Some(route),
        };
        let issued_ms = be_u64(&body[6..14]);
        if now_ms > be_u64(&body[14..22]) {
            return Err(refuse(Failure::Expired));
        }
        if body[26..TOKEN_BODY] != prefix.0 {
            return Err(refuse(Failure::Moved));
        }
        let difficulty = body[1];
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(token);
        ctx.update(nonce);
        if leading_zero_bits(ctx.finish().as_ref()) < u32::from(difficulty) {
            return Err(refuse(Failure::Unsolved));
        }
        Ok(Solved {
            route,
            issued_ms,
            difficulty,
        })
    }

    /// A clearance for a client of `prefix` on a connection with
    /// `fingerprint` (its TLS fingerprint, when known).
    pub fn clearance(&self, prefix: Prefix, fingerprint: Option<&[u8]>, now_ms: u64) -> Clearance {
        let ring = self.keys(now_ms);
        let ttl = u64::try_from(self.settings.clearance_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut raw = [0u8; COOKIE_RAW];
        raw[0] = COOKIE_VERSION;
        raw[1..5].copy_from_slice(&ring.epoch.to_be_bytes());
        raw[5..13].copy_from_slice(&now_ms.saturating_add(ttl).to_be_bytes());
        raw[13..22].copy_from_slice(&prefix.0);
        raw[22..COOKIE_BODY].copy_from_slice(&fingerprint_hash(fingerprint));
        let tag = hmac::sign(&ring.current, &raw[..COOKIE_BODY]);
        raw[COOKIE_BODY..].copy_from_slice(tag.as_ref());
        let mut out = [0u8; COOKIE_LEN];
        b64url_encode(&raw, &mut out);
        Clearance(out)
    }

    /// Checks a clearance cookie's value. Allocates nothing.
    pub fn check_clearance(
        &self,
        value: &[u8],
        prefix: Prefix,
        fingerprint: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<(), Failure> {
        if value.len() != COOKIE_LEN {
            return Err(Failure::Malformed);
        }
        let mut raw = [0u8; COOKIE_RAW];
        if !b64url_decode(value, &mut raw) || raw[0] != COOKIE_VERSION {
            return Err(Failure::Malformed);
        }
        let (body, tag) = raw.split_at(COOKIE_BODY);
        let epoch = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
        let ring = self.keys(now_ms);
        let key = Self::key_for(&ring, epoch).ok_or(Failure::Forged)?;
        hmac::verify(key, body, tag).map_err(|_| Failure::Forged)?;
        if now_ms > be_u64(&body[5..13]) {
            return Err(Failure::Expired);
        }
        if body[13..22] != prefix.0 || body[22..COOKIE_BODY] != fingerprint_hash(fingerprint) {
            return Err(Failure::Moved);
        }
        Ok(())
    }

    /// The challenge page for `token`, returning to `back` once solved.
    pub fn page(&self, token: &Token, difficulty: u8, back: &str) -> Response<Full<Bytes>> {
        self.page.render(token, difficulty, back)
    }

    /// The answer to a solved challenge: back to `back`, with the cookie.
    pub fn passed(&self, clearance: &Clearance, back: &str, tls: bool) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        let h = r.headers_mut();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            LOCATION,
            HeaderValue::from_str(back).unwrap_or(HeaderValue::from_static("/")),
        );
        let cookie = format!(
            "{COOKIE}={}; Max-Age={}; Path=/; HttpOnly; SameSite=Lax{}",
            clearance.as_str(),
            self.settings.clearance_ttl.as_secs().max(1),
            if tls { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(SET_COOKIE, v);
        }
        r
    }
}

/// Back to `back` without a clearance (a solution that came too late).
pub fn back_to(back: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    let h = r.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        LOCATION,
        HeaderValue::from_str(back).unwrap_or(HeaderValue::from_static("/")),
    );
    r
}

/// The answer to a solution that does not verify.
pub fn failed() -> Response<Full<Bytes>> {
    let mut r = crate::respond::text(StatusCode::FORBIDDEN, "Forbidden: challenge failed\n");
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn epoch_at(now_ms: u64, rotation_secs: u64) -> u32 {
    u32::try_from(now_ms / 1000 / rotation_secs).unwrap_or(u32::MAX)
}

fn derive_ring(master: &hmac::Key, epoch: u32) -> Ring {
    let derive = |e: u32| {
        let mut ctx = hmac::Context::with_key(master);
        ctx.update(b"palisade challenge key v1");
        ctx.update(&e.to_be_bytes());
        hmac::Key::new(hmac::HMAC_SHA256, ctx.sign().as_ref())
    };
    Ring {
        epoch,
        current: derive(epoch),
        previous: derive(epoch.wrapping_sub(1)),
    }
}

/// The hash a clearance keeps of its connection's JA4: of the part one
/// browser's connections share, its TLS version, SNI flag, cipher count and
/// cipher hash (`t13d15` and `8daaf6152771` of
/// `t13d1516h2_8daaf6152771_e5627efa2ab1`). The rest moves between them: a
/// resumed session's ClientHello adds `pre_shared_key` (another extension
/// count and hash) and a WebSocket's connection offers only `http/1.1`
/// (another ALPN part); bound to all of it, a clearance would be refused
/// as moved on the browser's next connection, and cost it reputation.
fn fingerprint_hash(fingerprint: Option<&[u8]>) -> [u8; 8] {
    let mut out = [0u8; 8];
    if let Some(fp) = fingerprint {
        let mut ctx = digest::Context::new(&digest::SHA256);
        match (fp.get(..6), fp.get(11..23)) {
            (Some(stack), Some(ciphers)) if fp.len() == 36 => {
                ctx.update(stack);
                ctx.update(ciphers);
            }
            _ => ctx.update(fp),
        }
        out.copy_from_slice(&ctx.finish().as_ref()[..8]);
    }
    out
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Leading zero bits of a digest.
pub fn leading_zero_bits(d: &[u8]) -> u32 {
    let mut n = 0;
    for b in d {
        if *b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

/// Requests on one route in the current second, and in the one before.
#[derive(Default)]
struct AttackMeter {
    /// `(second << 32) | requests`.
    now: AtomicU64,
    last: AtomicU32,
}

impl AttackMeter {
    /// Counts a request in second `sec`; returns the higher of this
    /// second's count so far and the last full second's.
    fn hit(&self, sec: u64) -> u32 {
        let sec = sec & u64::from(u32::MAX);
        let prev = self.now.load(Ordering::Relaxed);
        if prev >> 32 == sec {
            let count = (self.now.fetch_add(1, Ordering::Relaxed) & u64::from(u32::MAX)) + 1;
            let count = u32::try_from(count).unwrap_or(u32::MAX);
            return count.max(self.last.load(Ordering::Relaxed));
        }
        if self
            .now
            .compare_exchange(prev, (sec << 32) | 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let last = if (prev >> 32) + 1 == sec {
                (prev & u64::from(u32::MAX)) as u32
            } else {
                0
            };
            self.last.store(last, Ordering::Relaxed);
        }
        self.last.load(Ordering::Relaxed)
    }
}

/// Whether `headers` say the client takes HTML (a browser navigation).
pub fn accepts_html(headers: &HeaderMap) -> bool {
    headers.get_all(http::header::ACCEPT).iter().any(|v| {
        v.as_bytes()
            .windows(9)
            .any(|w| w.eq_ignore_ascii_case(b"text/html"))
    })
}

/// The clearance cookie's value in the request, if it sent one.
pub fn clearance_cookie(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == COOKIE.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// The `t`, `n` and `r` parameters of a verification (the query of
/// [`VERIFY_PATH`]), as sent.
pub fn solution(target: &str) -> (&[u8], &[u8], &[u8]) {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let (mut t, mut n, mut r) = (&[][..], &[][..], &[][..]);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("t", v)) => t = v.as_bytes(),
            Some(("n", v)) => n = v.as_bytes(),
            Some(("r", v)) => r = v.as_bytes(),
            _ => {}
        }
    }
    (t, n, r)
}

/// Where a solved challenge sends the browser: `r` percent-decoded when it
/// is a path on this site (starts with one `/`, printable ASCII, at most
/// [`MAX_RETURN`] bytes), else `/`. Never another site: an open redirect
/// would make the challenge a phishing tool.
pub fn return_path(r: &[u8]) -> String {
    let fallback = || "/".to_owned();
    if r.len() > 3 * MAX_RETURN {
        return fallback();
    }
    let mut out = Vec::with_capacity(r.len());
    let mut i = 0;
    while i < r.len() {
        let b = match r[i] {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(hi), Some(lo)) = (
                    r.get(i + 1).and_then(|c| hex(*c)),
                    r.get(i + 2).and_then(|c| hex(*c)),
                ) else {
                    return fallback();
                };
                i += 2;
                (hi * 16 + lo) as u8
            }
            b'+' => b' ',
            b => b,
        };
        out.push(b);
        i += 1;
    }
    let ok = out.len() <= MAX_RETURN
        && out.first() == Some(&b'/')
        && !matches!(out.get(1), Some(b'/' | b'\\'))
        && out.iter().all(|b| (0x21..=0x7e).contains(b));
    match String::from_utf8(out) {
        Ok(s) if ok => s,
        _ => fallback(),
    }
}

/// The page: fixed parts built once, with the hashes its CSP allows.
struct Page {
    head: String,
    csp: HeaderValue,
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:36rem;margin:15vh auto;padding:0 1rem;color:#222}h1{font-size:1.4rem}";

/// SHA-256 over `token || nonce` until the digest starts with `d` zero
/// bits. The blocks of the token that are whole are hashed once; each
/// nonce costs the one or two blocks of its tail.
const SCRIPT: &str = r#"(function(){"use strict";
var b=document.body,t=b.getAttribute("data-t"),d=+b.getAttribute("data-d"),r=b.getAttribute("data-r");
var K=new Uint32Array([0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2]);
var W=new Int32Array(64);
function blk(h,m,o){var i,x,y;for(i=0;i<16;i++){W[i]=(m[o+4*i]<<24)|(m[o+4*i+1]<<16)|(m[o+4*i+2]<<8)|m[o+4*i+3];}
for(i=16;i<64;i++){x=W[i-15];y=W[i-2];W[i]=(W[i-16]+(((x>>>7)|(x<<25))^((x>>>18)|(x<<14))^(x>>>3))+W[i-7]+(((y>>>17)|(y<<15))^((y>>>19)|(y<<13))^(y>>>10)))|0;}
var a=h[0]|0,c1=h[1]|0,c2=h[2]|0,c3=h[3]|0,e=h[4]|0,f=h[5]|0,g=h[6]|0,k=h[7]|0,t1,t2;
for(i=0;i<64;i++){t1=(k+(((e>>>6)|(e<<26))^((e>>>11)|(e<<21))^((e>>>25)|(e<<7)))+((e&f)^(~e&g))+K[i]+W[i])|0;
t2=((((a>>>2)|(a<<30))^((a>>>13)|(a<<19))^((a>>>22)|(a<<10)))+((a&c1)^(a&c2)^(c1&c2)))|0;
k=g;g=f;f=e;e=(c3+t1)|0;c3=c2;c2=c1;c1=a;a=(t1+t2)|0;}
h[0]=(h[0]+a)|0;h[1]=(h[1]+c1)|0;h[2]=(h[2]+c2)|0;h[3]=(h[3]+c3)|0;h[4]=(h[4]+e)|0;h[5]=(h[5]+f)|0;h[6]=(h[6]+g)|0;h[7]=(h[7]+k)|0;}
var T=new Uint8Array(t.length),i;for(i=0;i<t.length;i++)T[i]=t.charCodeAt(i);
var mid=new Int32Array([0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19]);
var full=T.length-T.length%64;for(i=0;i<full;i+=64)blk(mid,T,i);
var rem=T.length-full,tail=new Uint8Array(128),h=new Int32Array(8);tail.set(T.subarray(full),0);
function ok(n){var s=""+n,p=rem,j,len,bits;for(j=0;j<s.length;j++)tail[p++]=s.charCodeAt(j);tail[p++]=0x80;
len=(p+8<=64)?64:128;for(j=p;j<len;j++)tail[j]=0;bits=(T.length+s.length)*8;
tail[len-2]=(bits>>>8)&255;tail[len-1]=bits&255;h.set(mid);blk(h,tail,0);if(len===128)blk(h,tail,64);
return d>=32?h[0]===0:(h[0]>>>(32-d))===0;}
var n=0,el=document.getElementById("s"),t0=Date.now();
function step(){for(var end=n+20000;n<end;n++){if(ok(n)){
location.replace("/.palisade/challenge?t="+t+"&n="+n+"&r="+encodeURIComponent(r));return;}}
el.textContent="Checking your browser\u2026 "+Math.round((Date.now()-t0)/1000)+" s";setTimeout(step,0);}
setTimeout(step,0);})();"#;

impl Page {
    fn new() -> Self {
        let csp = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            b64_std(digest::digest(&digest::SHA256, SCRIPT.as_bytes()).as_ref()),
            b64_std(digest::digest(&digest::SHA256, STYLE.as_bytes()).as_ref()),
        );
        let head = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><meta name=\"robots\" content=\"noindex\"><title>One moment</title><style>{STYLE}</style></head><body "
        );
        Self {
            head,
            csp: HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static("default-src 'none'")),
        }
    }

    fn render(&self, token: &Token, difficulty: u8, back: &str) -> Response<Full<Bytes>> {
        let mut html = String::with_capacity(self.head.len() + SCRIPT.len() + back.len() + 512);
        html.push_str(&self.head);
        html.push_str("data-t=\"");
        html.push_str(token.as_str());
        html.push_str("\" data-d=\"");
        html.push_str(&difficulty.to_string());
        html.push_str("\" data-r=\"");
        escape_attr(&mut html, back);
        html.push_str(
            "\"><main><h1>One moment\u{2026}</h1><p id=\"s\">Checking your browser before the page loads.</p>\
             <noscript><p>This check needs JavaScript: turn it on and reload the page.</p></noscript></main><script>",
        );
        html.push_str(SCRIPT);
        html.push_str("</script></body></html>\n");
        let mut r = Response::new(Full::new(Bytes::from(html)));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(http::header::CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert("x-robots-tag", HeaderValue::from_static("noindex"));
        r
    }
}

fn escape_attr(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64url_encode(src: &[u8], dst: &mut [u8]) {
    let mut o = 0;
    for chunk in src.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = chunk.len() + 1;
        for k in 0..chars {
            if let Some(slot) = dst.get_mut(o) {
                *slot = B64URL[((n >> (18 - 6 * k)) & 63) as usize];
            }
            o += 1;
        }
    }
}

/// Decodes unpadded base64url into exactly `dst.len()` bytes; false on any
/// other length or character.
fn b64url_decode(src: &[u8], dst: &mut [u8]) -> bool {
    if src.len() != b64_len(dst.len()) {
        return false;
    }
    let val = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        }))
    };
    let mut o = 0;
    for chunk in src.chunks(4) {
        let mut n = 0u32;
        for (k, c) in chunk.iter().enumerate() {
            let Some(v) = val(*c) else { return false };
            n |= v << (18 - 6 * k);
        }
        for k in 0..chunk.len() - 1 {
            let Some(slot) = dst.get_mut(o) else { return false };
            *slot = (n >> (16 - 8 * k)) as u8;
            o += 1;
        }
    }
    o == dst.len()
}

fn b64_std(src: &[u8]) -> String {
    const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(src.len().div_ceil(3) * 4);
    for chunk in src.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(STD[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ChallengeSettings {
        ChallengeSettings {
            secret: Some(b"0123456789abcdef0123456789abcdef".to_vec()),
            clearance_ttl: Duration::from_secs(3600),
            token_ttl: Duration::from_secs(300),
            key_rotation: Duration::from_secs(86400),
            difficulty: 8,
            max_difficulty: 24,
            attack_rps: 10,
            issue_penalty: 1,
            fail_penalty: 5,
            cookie_penalty: 5,
            routes: vec![RouteChallenge::default()],
            block_below: 30,
        }
    }

    fn solve(token: &Token, d: u8) -> String {
        (0u64..)
            .find(|n| {
                let mut ctx = digest::Context::new(&digest::SHA256);
                ctx.update(token.as_str().as_bytes());
                ctx.update(n.to_string().as_bytes());
                leading_zero_bits(ctx.finish().as_ref()) >= u32::from(d)
            })
            .map(|n| n.to_string())
            .unwrap_or_default()
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn a_solved_token_verifies_once_solved_and_only_where_issued() {
        let c = Challenger::new(settings(), None).unwrap();
        let here = Prefix::of("198.51.100.7".parse().unwrap());
        let token = c.issue(here, 7, 8, NOW);
        assert_eq!(token.as_str().len(), TOKEN_LEN);
        let nonce = solve(&token, 8);
        let t = token.as_str().as_bytes();
        let solved = c.verify(t, nonce.as_bytes(), here, NOW + 1000).unwrap();
        assert_eq!((solved.route, solved.issued_ms, solved.difficulty), (7, NOW, 8));
        // Same /24: still here.
        let neighbour = Prefix::of("198.51.100.200".parse().unwrap());
        assert!(c.verify(t, nonce.as_bytes(), neighbour, NOW).is_ok());
        let elsewhere = Prefix::of("198.51.101.7".parse().unwrap());
        assert_eq!(
            c.verify(t, nonce.as_bytes(), elsewhere, NOW)
                .map_err(|r| r.failure),
            Err(Failure::Moved)
        );
        assert_eq!(
            c.verify(t, nonce.as_bytes(), here, NOW + 300_001),
            Err(Rejected {
                failure: Failure::Expired,
                route: Some(7)
            })
        );
        // A wrong nonce: some nonce below the solution fails.
        let wrong = (0u64..)
            .map(|n| n.to_string())
            .find(|n| c.verify(t, n.as_bytes(), here, NOW).map_err(|r| r.failure) == Err(Failure::Unsolved));
        assert!(wrong.is_some());
    }

    #[test]
    fn tampered_tokens_are_forged_and_bad_lengths_malformed() {
        let c = Challenger::new(settings(), None).unwrap();
        let here = Prefix::of("2001:db8:1:2::5".parse().unwrap());
        let token = c.issue(here, 1, 8, NOW);
        let nonce = solve(&token, 8);
        let mut t = token.as_str().as_bytes().to_vec();
        // Lower the difficulty byte (second byte: chars 1-2 of the text).
        let mut raw = [0u8; TOKEN_RAW];
        assert!(b64url_decode(&t, &mut raw));
        raw[1] = 1;
        b64url_encode(&raw, &mut t);
        assert_eq!(
            c.verify(&t, nonce.as_bytes(), here, NOW),
            Err(Failure::Forged.into())
        );
        // Another /64 of the same /48 is elsewhere.
        let other = Prefix::of("2001:db8:1:3::5".parse().unwrap());
        let good = token.as_str().as_bytes();
        assert_eq!(
            c.verify(good, nonce.as_bytes(), other, NOW)
                .map_err(|r| r.failure),
            Err(Failure::Moved)
        );
        for (tok, n) in [
            (&good[..TOKEN_LEN - 1], nonce.as_bytes()),
            (good, b"".as_slice()),
            (good, b"123456789012345678901".as_slice()),
            (good, b"12a".as_slice()),
        ] {
            assert_eq!(c.verify(tok, n, here, NOW), Err(Failure::Malformed.into()));
        }
        let long = vec![b'A'; 1 << 20];
        assert_eq!(c.verify(&long, b"1", here, NOW), Err(Failure::Malformed.into()));
        let mut bad_char = good.to_vec();
        bad_char[5] = b'=';
        assert_eq!(
            c.verify(&bad_char, b"1", here, NOW),
            Err(Failure::Malformed.into())
        );
    }

    #[test]
    fn another_secret_or_an_old_key_does_not_verify() {
        let c = Challenger::new(settings(), None).unwrap();
        let mut s = settings();
        s.secret = Some(b"another secret, also 32 bytes long".to_vec());
        let other = Challenger::new(s, None).unwrap();
        let here = Prefix::of("192.0.2.1".parse().unwrap());
        let token = other.issue(here, 1, 1, NOW);
        let nonce = solve(&token, 1);
        let t = token.as_str().as_bytes();
        assert_eq!(
            c.verify(t, nonce.as_bytes(), here, NOW),
            Err(Failure::Forged.into())
        );
        // One period later the key is the previous one: accepted; two, refused.
        let token = c.issue(here, 1, 1, NOW);
        let nonce = solve(&token, 1);
        let t = token.as_str().as_bytes();
        let mut s = settings();
        s.token_ttl = Duration::from_secs(3 * 86400);
        let c = Challenger::new(s, None).unwrap();
        let token = c.issue(here, 1, 1, NOW);
        let n2 = solve(&token, 1);
        let t2 = token.as_str().as_bytes();
        assert!(c.verify(t2, n2.as_bytes(), here, NOW + 86_400_000).is_ok());
        assert_eq!(
            c.verify(t2, n2.as_bytes(), here, NOW + 2 * 86_400_000),
            Err(Failure::Forged.into())
        );
        let _ = (t, nonce);
    }

    #[test]
    fn clearance_is_bound_to_prefix_fingerprint_and_time() {
        let c = Challenger::new(settings(), None).unwrap();
        let here = Prefix::of("203.0.113.9".parse().unwrap());
        let fp = Some(&b"t13d1516h2_8daaf6152771_e5627efa2ab1"[..]);
        let cookie = c.clearance(here, fp, NOW);
        let v = cookie.as_str().as_bytes();
        assert_eq!(v.len(), COOKIE_LEN);
        assert_eq!(c.check_clearance(v, here, fp, NOW + 1), Ok(()));
        assert_eq!(c.check_clearance(v, here, None, NOW), Err(Failure::Moved));
        assert_eq!(
            c.check_clearance(v, here, Some(b"t13d1516h2_other"), NOW),
            Err(Failure::Moved)
        );
        // The same stack resumed (one extension more) or offering only
        // http/1.1 keeps it; other ciphers, a version or no SNI do not.
        for same in [
            "t13d1517h2_8daaf6152771_b0da82dd1658",
            "t13d1516h1_8daaf6152771_e5627efa2ab1",
        ] {
            assert_eq!(
                c.check_clearance(v, here, Some(same.as_bytes()), NOW),
                Ok(()),
                "{same}"
            );
        }
        for other in [
            "t13d1716h2_8daaf6152771_e5627efa2ab1",
            "t13d1516h2_8daaf6152772_e5627efa2ab1",
            "t12d1516h2_8daaf6152771_e5627efa2ab1",
            "t13i1516h2_8daaf6152771_e5627efa2ab1",
        ] {
            assert_eq!(
                c.check_clearance(v, here, Some(other.as_bytes()), NOW),
                Err(Failure::Moved),
                "{other}"
            );
        }
        let there = Prefix::of("203.0.114.9".parse().unwrap());
        assert_eq!(c.check_clearance(v, there, fp, NOW), Err(Failure::Moved));
        assert_eq!(
            c.check_clearance(v, here, fp, NOW + 3_600_001),
            Err(Failure::Expired)
        );
        let mut forged = v.to_vec();
        forged[COOKIE_LEN - 1] = if forged[COOKIE_LEN - 1] == b'A' {
            b'B'
        } else {
            b'A'
        };
        assert_ne!(c.check_clearance(&forged, here, fp, NOW), Ok(()));
        // A token is not a cookie, whatever its signature.
        let token = c.issue(here, 1, 1, NOW);
        assert_eq!(
            c.check_clearance(token.as_str().as_bytes(), here, fp, NOW),
            Err(Failure::Malformed)
        );
    }

    #[test]
    fn difficulty_table() {
        // base 16, max 24, challenge below 50, block below 30.
        let d = |score, level| difficulty(16, 24, score, 50, 30, level);
        assert_eq!(d(70.0, 0), 16);
        assert_eq!(d(49.0, 0), 18);
        assert_eq!(d(39.0, 0), 20);
        assert_eq!(d(70.0, 1), 18);
        assert_eq!(d(70.0, 2), 20);
        assert_eq!(d(35.0, 2), 24);
        assert_eq!(difficulty(30, 40, 0.0, 50, 30, 2), 32);
    }

    #[test]
    fn attack_meter_counts_this_second_and_remembers_the_last() {
        let m = AttackMeter::default();
        for _ in 0..5 {
            m.hit(100);
        }
        assert_eq!(m.hit(100), 6);
        assert_eq!(m.hit(101), 6, "the last full second counts");
        assert_eq!(m.hit(103), 0, "a gap forgets it");
    }

    #[test]
    fn return_path_stays_on_this_site() {
        assert_eq!(return_path(b"%2Fa%3Fb%3D1"), "/a?b=1");
        assert_eq!(return_path(b"/x"), "/x");
        for evil in [
            &b"https%3A%2F%2Fevil.example"[..],
            b"%2F%2Fevil.example",
            b"%2F%5Cevil.example",
            b"%2Fa%0D%0ASet-Cookie:x",
            b"%2",
            b"",
        ] {
            assert_eq!(return_path(evil), "/", "{}", String::from_utf8_lossy(evil));
        }
    }

    #[test]
    fn query_and_cookie_parsing() {
        let (t, n, r) = solution("/.palisade/challenge?t=abc&n=42&r=%2F");
        assert_eq!((t, n, r), (&b"abc"[..], &b"42"[..], &b"%2F"[..]));
        let mut h = HeaderMap::new();
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; palisade_clearance=xyz"),
        );
        assert_eq!(clearance_cookie(&h), Some(&b"xyz"[..]));
        h.insert(http::header::ACCEPT, HeaderValue::from_static("TEXT/HTML,*/*"));
        assert!(accepts_html(&h));
        h.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(!accepts_html(&h));
    }

    #[test]
    fn base64_round_trips() {
        let raw: Vec<u8> = (0..=255u8).collect();
        for len in [1usize, 2, 3, 4, 62, 67] {
            let mut enc = vec![0u8; b64_len(len)];
            b64url_encode(&raw[..len], &mut enc);
            let mut dec = vec![0u8; len];
            assert!(b64url_decode(&enc, &mut dec));
            assert_eq!(dec, &raw[..len]);
        }
        assert_eq!(b64_std(b"ab"), "YWI=");
    }

    #[test]
    fn the_page_carries_the_token_and_escapes_the_path() {
        let c = Challenger::new(settings(), None).unwrap();
        let token = c.issue(Prefix::of("192.0.2.1".parse().unwrap()), 1, 8, NOW);
        let r = c.page(&token, 8, "/a\"><script>x</script>");
        let csp = r.headers()[http::header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
        let body = http_body_util::BodyExt::collect(r.into_body());
        let body = futures_util::FutureExt::now_or_never(body)
            .unwrap()
            .unwrap()
            .to_bytes();
        let html = std::str::from_utf8(&body).unwrap();
        assert!(html.contains(token.as_str()));
        assert!(html.contains("/a&quot;&gt;&lt;script&gt;"));
        assert_eq!(html.matches("<script>").count(), 1);
    }
}
