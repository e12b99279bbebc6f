//! Cluster mode: nodes share per-client limits and reputation through
//! Redis (one server or a Redis Cluster), without any request waiting on it.
//!
//! **Limits.** Each node keeps, per limiter and client, a sliding window of
//! two one-second halves (the previous and the current wall-clock second,
//! weighted by how far into the current second we are, as Cloudflare's
//! limiter does) for its own admissions and for everyone else's. A request
//! is admitted while `own + others < window_limit`. Every `sync_interval` a
//! background task pushes each client's new admissions with one Lua script
//! per client (`INCRBY` on `prefix:rl:{limiter:client}:second`, read the
//! previous second), pipelined, and learns the cluster's totals.
//! A node learns of the others' admissions at most one interval plus a
//! round trip late, so N nodes together admit at most
//! `window_limit + (N - 1) × r × (sync_interval + RTT)` per second for a
//! client sending `r` requests/s to each node: with two nodes, 50 ms and a
//! client at 150 req/s per node, about 8 over a limit of 100.
//!
//! **Reputation and bans.** Score changes (penalties, operator changes) and
//! kernel bans (SYN defense) are appended
//! to a Redis stream (`{prefix}:events`) and kept in a hash
//! (`{prefix}:rep` and `{prefix}:bans`, one field per client, with its
//! expiry); the braces are
//! a hash tag, so in a Redis Cluster these keys share a slot. Every node reads
//! the stream each interval and applies what other nodes did; a node that
//! starts or reconnects reads the hash first, so it catches up.
//!
//! **Trust.** Whoever can write to Redis is not trusted. Every shared record
//! (counter, event, ban, score, heartbeat) carries an HMAC-SHA256 under the
//! cluster key over its Redis key name, its field and every value in it, so
//! it cannot be forged, altered, or moved to another key or client (a ban of
//! one address copied to the field of `0.0.0.0/0` fails its check). A
//! record that fails its check, does not parse or names impossible values
//! is ignored, counted by reason and logged within a budget; it never stops
//! the sync. An authentic record can still be *replayed* verbatim: it then
//! says what it said, no more. A ban ends at its signed expiry, a node
//! applies for each client only records newer than the last one it applied
//! (so a replayed ban cannot undo a later lift on a node that saw the lift),
//! a heartbeat is live only while its signed time is recent, and a counter
//! is bound to its second. Authentic records obey this node's policy too:
//! the never-ban set, the prefix minimums and the longest ban.
//!
//! **Failure.** Redis slow or down: the sync fails (bounded by timeouts),
//! the node says so once, counts it, and limits go local-only
//! (`failure_mode = "open"`) or assume every other live node admitted as
//! much as this one did (`"closed"`). Score changes queue (bounded) until
//! Redis is back; then the node re-publishes what it knows and catches up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use palisade_core::{ClientKey, Nanos, unix_now_ms};
use palisade_limits::table::{ClientTable, Slot, Zeroable};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::{mpsc, watch};

use arc_swap::ArcSwap;
use ring::hmac;

use crate::config::{ClusterKey, ClusterSettings, FailureMode};
use crate::metrics::{KindLabel, Metrics, ReasonLabel};
use crate::never_ban::NeverBan;
use crate::proxy::App;

const TIMEOUT: Duration = Duration::from_millis(500);
/// 9999-12-31T23:59:59Z: the latest time a shared record may name.
const MAX_UNIX_SECS: u64 = 253_402_300_799;
/// Clients pushed per sync at most; the rest wait for the next one.
const PUSH_BATCH: usize = 10_000;
const OUTBOX: usize = 10_000;
/// Stream entries kept in Redis (approximately).
const STREAM_LEN: usize = 100_000;
/// A node is live if it sent a heartbeat this recently.
const PEER_TTL_MS: u64 = 5_000;
/// How far ahead of this node's clock a record's time may be: clocks of
/// real nodes differ a little; a record from the future would otherwise
/// hold (a score that never starts recovering, a peer that never dies).
const MAX_SKEW_MS: u64 = 60_000;

/// Longest field name or value of any shared record, in bytes. Ours are
/// under 200 (a node name, a network, three numbers and a MAC); anything
/// longer was put there by someone who can write to Redis, and is deleted
/// unread: a few values of hundreds of MB took a node from 25 MB to 418 MB
/// resident and the sync down for good (every read timed out).
const MAX_RECORD_BYTES: usize = 1024;
/// Nodes read from the heartbeat hash, and other nodes' counts from one
/// counter hash, at most.
const MAX_NODES: usize = 1024;
/// Stream pages (1 000 entries each) read in one sync at most: a writer
/// that floods the stream must not keep the sync reading it forever.
const MAX_STREAM_PAGES: usize = 10;

/// `bounded(key, max, most)`: the fields and values of hash `key`, at most
/// `most` of them, flattened; any field or value longer than `max` bytes
/// is deleted without being read (lengths come from `HSTRLEN`). Returns
/// them and how many were deleted. Not a hash: nothing.
const BOUNDED: &str = r"
local function bounded(k, max, most)
  local out, dropped = {}, 0
  if redis.call('TYPE', k).ok ~= 'hash' then return out, dropped end
  for _, f in ipairs(redis.call('HKEYS', k)) do
    if #f > max or redis.call('HSTRLEN', k, f) > max then
      redis.call('HDEL', k, f)
      dropped = dropped + 1
    elseif #out < most * 2 then
      out[#out + 1] = f
      out[#out + 1] = redis.call('HGET', k, f)
    end
  end
  return out, dropped
end
";

/// `KEYS[1]` this second's counters (a hash, one field per node),
/// `KEYS[2]` the previous second's; `ARGV[1]` this node, `ARGV[2]` its
/// signed count, `ARGV[3]` expiry in ms, `ARGV[4]`, `ARGV[5]` the bounds of
/// [`BOUNDED`]. A key of another type (planted by someone who can write to
/// Redis) is dropped rather than failing the whole pipeline, which would
/// stop every client's sync.
const PUSH: &str = r"
local function odd(k)
  local t = redis.call('TYPE', k).ok
  return t ~= 'hash' and t ~= 'none'
end
if odd(KEYS[1]) then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local max, most = tonumber(ARGV[4]), tonumber(ARGV[5])
local c, dc = bounded(KEYS[1], max, most)
local p, dp = bounded(KEYS[2], max, most)
return {c, p, dc + dp}
";

/// `KEYS[1]` a hash; `ARGV` the bounds of [`BOUNDED`]: how many oversized
/// fields were deleted, then the rest, flattened.
const READ_HASH: &str = r"
local out, dropped = bounded(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
return {dropped, out}
";

/// `KEYS[1]` the events stream: up to `ARGV[2]` entries after id `ARGV[1]`.
/// An entry with a field or value over `ARGV[3]` bytes is deleted and
/// comes back as its id alone (counted as unauthenticated, the sync moves
/// past it). Not a stream: nothing.
const READ_STREAM: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return {} end
local max, out = tonumber(ARGV[3]), {}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])) do
  local fit = true
  for _, x in ipairs(e[2]) do
    if #x > max then fit = false end
  end
  if fit then
    out[#out + 1] = e
  else
    redis.call('XDEL', KEYS[1], e[1])
    out[#out + 1] = {e[1], {}}
  end
end
return out
";

/// `KEYS[1]` the events stream: its last entry's id, without the entry.
const LAST_ID: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return false end
local e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if e[1] then return e[1][1] end
return false
";

/// `EVAL script` with [`BOUNDED`] in front, on one or two keys.
fn eval(script: &str, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(format!("{BOUNDED}{script}")).arg(keys.len()).arg(keys);
    cmd
}

/// Why a shared record was ignored: the `reason` label of
/// `palisade_cluster_records_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejected {
    /// No MAC, or one that does not match the record under the cluster key.
    Unauthenticated,
    /// Not a record of its kind (wrong number of fields, not a number, not
    /// a network).
    Malformed,
    /// Authentic in form but impossible: a time past the year 9999 or too
    /// far in the future, a negative or oversized count.
    OutOfRange,
    /// Refused by this node's policy: the never-ban set, a prefix wider
    /// than the minimum, a ban longer than the longest allowed.
    Refused,
    /// Older than what this node already applied for that client.
    Stale,
}

impl Rejected {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Malformed => "malformed",
            Self::OutOfRange => "out_of_range",
            Self::Refused => "refused",
            Self::Stale => "stale",
        }
    }

    const ALL: [Self; 5] = [
        Self::Unauthenticated,
        Self::Malformed,
        Self::OutOfRange,
        Self::Refused,
        Self::Stale,
    ];
}

const MAC_DOMAIN: &[u8] = b"palisade cluster record v1";

/// The MAC of a shared record: HMAC-SHA256 under `secret` over the record's
/// parts (Redis key name, field, values), each length-prefixed so that no
/// two different records sign the same bytes; lowercase hex.
pub fn record_mac(secret: &[u8], parts: &[&str]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hex(hmac::sign(&key, &mac_message(parts)).as_ref())
}

fn mac_message(parts: &[&str]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(MAC_DOMAIN.len() + parts.iter().map(|p| p.len() + 8).sum::<usize>());
    msg.extend_from_slice(MAC_DOMAIN);
    for p in parts {
        msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
        msg.extend_from_slice(p.as_bytes());
    }
    msg
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// Signs and checks records; without a key (`cluster.insecure`) signs
/// nothing and takes everything.
struct Signer(Option<hmac::Key>);

impl Signer {
    fn new(key: Option<&ClusterKey>) -> Self {
        Self(key.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k.secret())))
    }

    /// `value` with the MAC of `parts` and `value` appended (` mac`), or
    /// alone when insecure.
    fn signed(&self, parts: &[&str], value: &str) -> String {
        let mut all = parts.to_vec();
        all.push(value);
        match &self.0 {
            Some(key) => format!("{value} {}", hex(hmac::sign(key, &mac_message(&all)).as_ref())),
            None => value.to_owned(),
        }
    }

    /// The MAC of `parts` alone (a separate stream field), empty when
    /// insecure.
    fn mac(&self, parts: &[&str]) -> String {
        self.0
            .as_ref()
            .map(|key| hex(hmac::sign(key, &mac_message(parts)).as_ref()))
            .unwrap_or_default()
    }

    /// Whether `mac` is the MAC of `parts` (constant time).
    fn check(&self, parts: &[&str], mac: Option<&str>) -> Result<(), Rejected> {
        let Some(key) = &self.0 else { return Ok(()) };
        let tag = mac.and_then(unhex).ok_or(Rejected::Unauthenticated)?;
        hmac::verify(key, &mac_message(parts), &tag).map_err(|_| Rejected::Unauthenticated)
    }

    /// Splits a stored `value mac` (`fields` values before the MAC) and
    /// checks it; returns the value's fields.
    fn open<'a>(&self, parts: &[&str], stored: &'a str, fields: usize) -> Result<Vec<&'a str>, Rejected> {
        let all: Vec<&str> = stored.split(' ').collect();
        let (values, mac) = match all.len() {
            n if n == fields => (&all[..], None),
            n if n == fields + 1 => (&all[..fields], Some(all[fields])),
            _ => {
                // Forged or broken; with a key it cannot be told apart.
                return Err(if self.0.is_some() {
                    Rejected::Unauthenticated
                } else {
                    Rejected::Malformed
                });
            }
        };
        let value = values.join(" ");
        let mut signed: Vec<&str> = parts.to_vec();
        signed.push(&value);
        self.check(&signed, mac)?;
        Ok(values.to_vec())
    }
}

/// A score change or a kernel ban, as it travels between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreEvent {
    /// The client (address, or IPv6 prefix).
    pub net: IpNet,
    /// A kernel ban (SYN defense) rather than a score: `expires` is when it
    /// lapses, a past `expires` lifts it, `score` is unused.
    pub ban: bool,
    /// The new score; `None`: forgotten.
    pub score: Option<u8>,
    /// Unix seconds after which the change no longer matters (0: never).
    pub expires: u64,
    /// When it happened (Unix ms).
    pub at_ms: u64,
}

impl ScoreEvent {
    fn value(&self) -> String {
        let score = self.score.map_or_else(|| "-".to_owned(), |s| s.to_string());
        format!("{score} {} {}", self.expires, self.at_ms)
    }

    /// A record's values (`score expires at_ms`, checked already).
    fn parse(net: &str, fields: &[&str], ban: bool, now_ms: u64) -> Result<Self, Rejected> {
        let [score, expires, at_ms] = fields else {
            return Err(Rejected::Malformed);
        };
        let score = match *score {
            "-" => None,
            s => Some(s.parse::<u8>().map_err(|_| Rejected::Malformed)?),
        };
        if score.is_some_and(|s| s > 100) {
            return Err(Rejected::OutOfRange);
        }
        let number = |t: &str| t.parse::<u64>().map_err(|_| Rejected::Malformed);
        let (expires, at_ms) = (number(expires)?, number(at_ms)?);
        // An expiry or stamp past the year 9999 is no real record, and
        // would overflow the millisecond arithmetic below; one from the
        // future would never start to age.
        if expires > MAX_UNIX_SECS || at_ms > now_ms.saturating_add(MAX_SKEW_MS).min(MAX_UNIX_SECS * 1000) {
            return Err(Rejected::OutOfRange);
        }
        let net: IpNet = net.parse().map_err(|_| Rejected::Malformed)?;
        Ok(Self {
            // `::ffff:a.b.c.d/n` is the IPv4 network it maps, or it would
            // escape the IPv4 prefix minimum and hold nowhere.
            net: crate::never_ban::canonical(&net),
            ban,
            score,
            expires,
            at_ms,
        })
    }

    fn live(&self, now_ms: u64) -> bool {
        (self.expires == 0 && !self.ban) || self.expires.saturating_mul(1000) > now_ms
    }

    /// Whether it still says something to apply (a live score or ban).
    fn current(&self, now_ms: u64) -> bool {
        self.live(now_ms) && (self.ban || self.score.is_some())
    }
}

/// One client's shared window for one limiter.
#[derive(Default)]
#[repr(C)]
pub struct GlobalSlot {
    /// The Unix second `own` and `remote` count in their high halves.
    sec: AtomicU64,
    /// This node's admissions: `(current second << 32) | previous second`.
    own: AtomicU64,
    /// Everyone else's, as of the last sync, same packing.
    remote: AtomicU64,
    /// Admissions of the current second already pushed to Redis.
    pushed: AtomicU32,
    /// Admissions not pushed yet.
    unsynced: AtomicU32,
    /// The client, for naming its Redis key: kind (1 IPv4, 2 IPv6), bits.
    kind: AtomicU32,
    hi: AtomicU64,
    lo: AtomicU64,
}

// SAFETY: only atomic integers, whose zero is their default.
unsafe impl Zeroable for GlobalSlot {}

impl Slot for GlobalSlot {
    fn is_idle(&self, now: Nanos) -> bool {
        // `now` is Unix ms × 1e6 for this table: idle once two seconds old.
        let sec = now / 1_000_000_000;
        self.sec.load(Ordering::Acquire) + 2 <= sec && self.unsynced.load(Ordering::Acquire) == 0
    }

    fn reset(&self) {
        for a in [&self.sec, &self.own, &self.remote, &self.hi, &self.lo] {
            a.store(0, Ordering::Release);
        }
        for a in [&self.pushed, &self.unsynced, &self.kind] {
            a.store(0, Ordering::Release);
        }
    }
}

const LOW: u64 = u32::MAX as u64;

impl GlobalSlot {
    /// Moves the window to `sec`: the current half becomes the previous one
    /// (or both clear after a gap). Concurrent requests may lose a count in
    /// the instant of the roll; the error is one request, toward admitting.
    fn roll(&self, sec: u64) {
        let cur = self.sec.load(Ordering::Acquire);
        if cur >= sec {
            return;
        }
        if self
            .sec
            .compare_exchange(cur, sec, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let shift = |v: u64| if sec == cur + 1 { v >> 32 } else { 0 };
            self.own
                .store(shift(self.own.load(Ordering::Acquire)), Ordering::Release);
            self.remote
                .store(shift(self.remote.load(Ordering::Acquire)), Ordering::Release);
            self.pushed.store(0, Ordering::Release);
        }
    }

    fn note_key(&self, key: &ClientKey) {
        if self.kind.load(Ordering::Relaxed) != 0 {
            return;
        }
        let (kind, bits) = match *key {
            ClientKey::V4(v) => (1, u128::from(v)),
            ClientKey::V6(v) => (2, v),
            ClientKey::Fingerprint(v) => (3, u128::from(v)),
        };
        self.hi.store((bits >> 64) as u64, Ordering::Relaxed);
        self.lo.store(bits as u64, Ordering::Relaxed);
        self.kind.store(kind, Ordering::Release);
    }

    fn key(&self) -> Option<ClientKey> {
        let bits =
            (u128::from(self.hi.load(Ordering::Relaxed)) << 64) | u128::from(self.lo.load(Ordering::Relaxed));
        match self.kind.load(Ordering::Acquire) {
            1 => Some(ClientKey::V4(bits as u32)),
            2 => Some(ClientKey::V6(bits)),
            3 => Some(ClientKey::Fingerprint(bits as u64)),
            _ => None,
        }
    }
}

/// The shared windows of one limiter.
pub struct Window {
    name: String,
    table: ClientTable<GlobalSlot>,
}

/// What [`Cluster::status`] reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// This node.
    pub node: String,
    /// Whether the last sync reached Redis.
    pub up: bool,
    /// Other nodes with a recent heartbeat.
    pub peers: u32,
    /// Milliseconds since the last successful sync (None: never).
    pub last_sync_ms_ago: Option<u64>,
    /// Score changes sent to the cluster.
    pub published: u64,
    /// Score changes applied from other nodes.
    pub applied: u64,
    /// Failed syncs.
    pub errors: u64,
    /// Shared records ignored since start, by reason.
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
}

/// This node's membership in a cluster.
pub struct Cluster {
    settings: ClusterSettings,
    node: String,
    max_clients: usize,
    windows: Mutex<HashMap<String, Arc<Window>>>,
    up: AtomicBool,
    peers: AtomicU32,
    outbox: mpsc::Sender<ScoreEvent>,
    inbox: Mutex<Option<mpsc::Receiver<ScoreEvent>>>,
    /// Live score changes this node made, re-published after Redis comes
    /// back empty (bounded like the durable state).
    known: Mutex<HashMap<(IpNet, bool), ScoreEvent>>,
    published: AtomicU64,
    applied: AtomicU64,
    errors: AtomicU64,
    last_sync_ms: AtomicU64,
    signer: Signer,
    /// What no shared score may touch (the SYN defense keeps its own copy
    /// for bans); rebuilt on reload.
    never_ban: ArcSwap<NeverBan>,
    /// Per client and kind, the stamp (Unix ms) and expiry of the newest
    /// record applied or made here: older ones are replays or overtaken.
    latest: Mutex<HashMap<(IpNet, bool), (u64, u64)>>,
    /// Records rejected per reason, for the log budget.
    rejected: Mutex<HashMap<Rejected, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// The Redis name of a client.
fn client_name(key: &ClientKey) -> String {
    match *key {
        ClientKey::V4(v) => std::net::Ipv4Addr::from(v).to_string(),
        ClientKey::V6(v) => std::net::Ipv6Addr::from(v).to_string(),
        ClientKey::Fingerprint(v) => format!("fp-{v:016x}"),
    }
}

impl Cluster {
    /// A member with no connection yet (the sync task connects).
    pub fn new(settings: ClusterSettings, max_clients: usize) -> Self {
        let node = if settings.node_name.is_empty() {
            format!("{}-{}", hostname(), std::process::id())
        } else {
            settings.node_name.clone()
        };
        let (outbox, inbox) = mpsc::channel(OUTBOX);
        Self {
            node,
            max_clients,
            windows: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            peers: AtomicU32::new(0),
            outbox,
            inbox: Mutex::new(Some(inbox)),
            known: Mutex::new(HashMap::new()),
            published: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_sync_ms: AtomicU64::new(0),
            signer: Signer::new(settings.key.as_ref()),
            never_ban: ArcSwap::from_pointee(NeverBan::default()),
            latest: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            settings,
        }
    }

    /// What no shared score may touch; set at start and on every reload.
    pub fn set_never_ban(&self, never_ban: NeverBan) {
        self.never_ban.store(Arc::new(never_ban));
    }

    /// Why a score for `net` is refused: it overlaps a protected network.
    pub fn protected(&self, net: &IpNet) -> Option<String> {
        self.never_ban.load().covers(net).map(|(covered, why)| {
            format!(
                "{net} overlaps {covered}, which is never banned ({})",
                why.as_str()
            )
        })
    }

    /// Counts a rejected record and logs it: the first, second, fourth...
    /// per reason, so that a Redis full of garbage cannot flood the log.
    fn reject(&self, metrics: &Metrics, why: Rejected, record: &str, detail: &str) {
        metrics
            .cluster_records_rejected
            .get_or_create(&ReasonLabel { reason: why.as_str() })
            .inc();
        let n = {
            let mut counts = lock(&self.rejected);
            let n = counts.entry(why).or_insert(0);
            *n += 1;
            *n
        };
        if n.is_power_of_two() {
            // The record's text is attacker-chosen: bounded, and Debug-escaped.
            let record: String = record.chars().take(120).collect();
            tracing::warn!(
                node = %self.node,
                reason = why.as_str(),
                rejected = n,
                "cluster record ignored: {record:?} {detail}"
            );
        }
    }

    /// Counts the fields of `key` deleted for their size, if any.
    fn oversized(&self, metrics: &Metrics, key: &str, dropped: u64) {
        if dropped == 0 {
            return;
        }
        metrics
            .cluster_records_rejected
            .get_or_create(&ReasonLabel {
                reason: Rejected::Malformed.as_str(),
            })
            .inc_by(dropped);
        let n = {
            let mut counts = lock(&self.rejected);
            let n = counts.entry(Rejected::Malformed).or_insert(0);
            *n += dropped;
            *n
        };
        // Within the same budget as one by one: when a power of two is passed.
        if (n - dropped + 1).next_power_of_two() <= n {
            tracing::warn!(
            node = %self.node,
            reason = Rejected::Malformed.as_str(),
            rejected = n,
                "cluster records ignored: {dropped} fields of {key} over {MAX_RECORD_BYTES} bytes, deleted unread"
            );
        }
    }

    /// Whether `e` is newer than what this node applied or made for its
    /// client; notes it when it is. Equal stamps are the same record read
    /// again (`Ok(false)`: skip quietly).
    fn fresh(&self, e: &ScoreEvent) -> Result<bool, Rejected> {
        let mut latest = lock(&self.latest);
        let key = (e.net, e.ban);
        match latest.get(&key) {
            Some(&(at, _)) if e.at_ms == at => return Ok(false),
            Some(&(at, _)) if e.at_ms < at => return Err(Rejected::Stale),
            _ => {}
        }
        if latest.len() >= self.max_clients && !latest.contains_key(&key) {
            let now_s = unix_now_ms() / 1000;
            // Past its expiry a record does nothing, replayed or not.
            latest.retain(|_, (_, exp)| *exp == 0 || *exp > now_s);
        }
        if latest.len() < self.max_clients || latest.contains_key(&key) {
            latest.insert(key, (e.at_ms, e.expires));
        }
        Ok(true)
    }

    /// The settings it was started with.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// The shared windows of limiter `name` (the same across reloads).
    pub fn window(&self, name: &str) -> Arc<Window> {
        lock(&self.windows)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Window {
                    name: name.to_owned(),
                    table: ClientTable::new(self.max_clients),
                })
            })
            .clone()
    }

    /// Whether one more request of `key` fits the shared limit. Never waits:
    /// it reads what the last sync learned.
    pub fn admit(&self, window: &Window, key: &ClientKey, limit: u32, now_ms: u64) -> bool {
        let sec = now_ms / 1000;
        let elapsed = (now_ms % 1000) as f64 / 1000.0;
        let up = self.up.load(Ordering::Acquire);
        let peers = u64::from(self.peers.load(Ordering::Relaxed));
        window.table.with(key, now_ms.saturating_mul(1_000_000), |s| {
            s.roll(sec);
            s.note_key(key);
            let own = s.own.load(Ordering::Acquire);
            let remote = match (up, self.settings.failure_mode) {
                (true, _) => s.remote.load(Ordering::Acquire),
                (false, FailureMode::Open) => 0,
                (false, FailureMode::Closed) => {
                    ((own >> 32) * peers).min(LOW) << 32 | ((own & LOW) * peers).min(LOW)
                }
            };
            let prev = (own & LOW) + (remote & LOW);
            let curr = (own >> 32) + (remote >> 32);
            let estimate = prev as f64 * (1.0 - elapsed) + curr as f64;
            if estimate + 1.0 > f64::from(limit) {
                return false;
            }
            s.own.fetch_add(1 << 32, Ordering::AcqRel);
            s.unsynced.fetch_add(1, Ordering::AcqRel);
            true
        })
    }

    /// Sends a score change to the other nodes (queued; never waits). It
    /// is called on the request path (penalties), so it takes no lock and
    /// scans nothing: the sync task remembers what it sends.
    pub fn publish(&self, event: ScoreEvent, metrics: &Metrics) {
        if self.outbox.try_send(event).is_err() {
            Metrics::inc(&metrics.cluster_events, "dropped");
        }
    }

    /// Notes events this node sends, for re-publishing after Redis comes
    /// back empty. Full of live entries, it makes room by dropping lapsed
    /// ones at most once a call, not once an event.
    fn remember(&self, events: &[ScoreEvent]) {
        let mut known = lock(&self.known);
        let mut pruned = false;
        for e in events {
            // A replay of an older record must not undo this change here.
            let _ = self.fresh(e);
            let key = (e.net, e.ban);
            if known.len() >= self.max_clients && !known.contains_key(&key) && !pruned {
                let now = unix_now_ms();
                known.retain(|_, e| e.current(now));
                pruned = true;
            }
            if known.len() < self.max_clients || known.contains_key(&key) {
                known.insert(key, *e);
            }
        }
    }

    /// For `GET /api/v1/cluster`.
    pub fn status(&self) -> Status {
        let last = self.last_sync_ms.load(Ordering::Acquire);
        Status {
            node: self.node.clone(),
            up: self.up.load(Ordering::Acquire),
            peers: self.peers.load(Ordering::Acquire),
            last_sync_ms_ago: (last > 0).then(|| unix_now_ms().saturating_sub(last)),
            published: self.published.load(Ordering::Acquire),
            applied: self.applied.load(Ordering::Acquire),
            errors: self.errors.load(Ordering::Acquire),
            rejected: {
                let counts = lock(&self.rejected);
                Rejected::ALL
                    .iter()
                    .map(|r| (r.as_str(), counts.get(r).copied().unwrap_or(0)))
                    .collect()
            },
        }
    }

    /// A shared key. All of them carry the prefix as hash tag, so that in a
    /// Redis Cluster they live in one slot and pipeline together.
    fn key(&self, parts: &str) -> String {
        format!("{{{}}}:{parts}", self.settings.key_prefix)
    }

    /// A client's counters for one second, one field per node
    /// (hash-tagged per client, spread across a Redis Cluster).
    fn counter_key(&self, tag: &str, sec: u64) -> String {
        format!("{}:rc:{{{tag}}}:{sec}", self.settings.key_prefix)
    }

    /// The other nodes' admissions in one counter hash (flattened field,
    /// value pairs), each checked; bad ones are counted and left out.
    fn others(&self, key: &str, flat: &[String], metrics: &Metrics) -> u64 {
        let mut sum = 0u64;
        for pair in flat.chunks(2) {
            let [node, stored] = pair else { break };
            if *node == self.node {
                continue;
            }
            let count = self.signer.open(&[key, node], stored, 1).and_then(|f| {
                let n = f[0].parse::<i64>().map_err(|_| Rejected::Malformed)?;
                u32::try_from(n).map_err(|_| Rejected::OutOfRange)
            });
            match count {
                Ok(n) => sum = sum.saturating_add(u64::from(n)),
                Err(why) => self.reject(metrics, why, &format!("{key} {node} {stored}"), ""),
            }
        }
        sum.min(LOW)
    }
}

/// A connection to one Redis server or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Runs commands that each touch their own keys. One server: one
    /// pipeline. Redis Cluster refuses pipelines across hash slots, so
    /// there they go as concurrent single commands (multiplexed on the
    /// cluster connections), 256 at a time.
    async fn each<T: redis::FromRedisValue>(&mut self, cmds: Vec<redis::Cmd>) -> redis::RedisResult<Vec<T>> {
        match self {
            Self::Single(_) => {
                let mut pipe = redis::pipe();
                for c in cmds {
                    pipe.add_command(c);
                }
                self.query(&pipe).await
            }
            Self::Cluster(conn) => {
                let mut out = Vec::with_capacity(cmds.len());
                for chunk in cmds.chunks(256) {
                    let calls = chunk.iter().map(|cmd| {
                        let mut conn = conn.clone();
                        async move {
                            tokio::time::timeout(TIMEOUT, cmd.query_async::<T>(&mut conn))
                                .await
                                .unwrap_or_else(|_| {
                                    Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
                                })
                        }
                    });
                    out.extend(futures_util::future::try_join_all(calls).await?);
                }
                Ok(out)
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&mut self, pipe: &redis::Pipeline) -> redis::RedisResult<T> {
        let fut = async {
            match self {
                Self::Single(c) => pipe.query_async(c).await,
                Self::Cluster(c) => pipe.query_async(c).await,
            }
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))))
    }
}

fn certificates(settings: &ClusterSettings) -> redis::RedisResult<Option<redis::TlsCertificates>> {
    let Some(ca) = &settings.redis_ca else {
        return Ok(None);
    };
    let pem = std::fs::read(ca).map_err(|e| {
        redis::RedisError::from((redis::ErrorKind::Io, "reading cluster.redis_ca", e.to_string()))
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

async fn connect(settings: &ClusterSettings) -> redis::RedisResult<Conn> {
    let certs = certificates(settings)?;
    if settings.redis_cluster {
        let mut builder = redis::cluster::ClusterClient::builder(settings.redis.clone())
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .retries(1);
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        let client = builder.build()?;
        let conn = tokio::time::timeout(TIMEOUT * 2, client.get_async_connection())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "cluster connect timed out")))??;
        Ok(Conn::Cluster(conn))
    } else {
        let url = settings.redis[0].as_str();
        let client = match certs {
            Some(certs) => redis::Client::build_with_tls(url, certs)?,
            None => redis::Client::open(url)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        Ok(Conn::Single(client.get_connection_manager_lazy(config)?))
    }
}

struct Pushed {
    window: Arc<Window>,
    key: ClientKey,
    sec: u64,
}

/// The background side: connects, syncs every interval, reconnects, until
/// `stop`.
pub async fn run(cluster: Arc<Cluster>, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let metrics = &app.metrics;
    let Some(mut inbox) = lock(&cluster.inbox).take() else {
        return;
    };
    for why in Rejected::ALL {
        metrics
            .cluster_records_rejected
            .get_or_create(&ReasonLabel { reason: why.as_str() })
            .inc_by(0);
    }
    if cluster.signer.0.is_none() {
        tracing::warn!(
            node = %cluster.node,
            "CLUSTER RECORDS ARE NOT AUTHENTICATED (cluster.insecure = true): anyone who can write \
             to Redis can ban addresses, set scores and skew shared limits on every node; \
             set cluster.key or PALISADE_CLUSTER_KEY"
        );
    }
    {
        // Resolves names: off the async workers.
        let config = app.runtime().config.clone();
        match tokio::task::spawn_blocking(move || NeverBan::build(&config)).await {
            Ok(never_ban) => cluster.set_never_ban(never_ban),
            Err(e) => tracing::error!("cluster never-ban set not built: {e}"),
        }
    }
    let mut conn: Option<Conn> = None;
    let mut pending: Vec<ScoreEvent> = Vec::new();
    let mut stream_id = String::from("$");
    let mut synced_once = false;
    let mut last_heartbeat = 0u64;
    let mut was_up = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cluster.settings.sync_interval) => {}
            _ = stop.changed() => return,
        }
        let queued = pending.len();
        while pending.len() < OUTBOX {
            match inbox.try_recv() {
                Ok(e) => pending.push(e),
                Err(_) => break,
            }
        }
        cluster.remember(&pending[queued..]);
        if conn.is_none() {
            match connect(&cluster.settings).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    down(&cluster, metrics, &mut was_up, &e.to_string());
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let result = async {
            if !synced_once || !was_up {
                catch_up(&cluster, c, &app, &mut stream_id).await?;
                synced_once = true;
            }
            push_counts(&cluster, c, metrics).await?;
            publish(&cluster, c, &mut pending).await?;
            read_events(&cluster, c, &app, &mut stream_id).await?;
            let now = unix_now_ms();
            if now >= last_heartbeat + 1000 {
                heartbeat(&cluster, c, now, metrics).await?;
                last_heartbeat = now;
            }
            redis::RedisResult::Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                cluster.last_sync_ms.store(unix_now_ms(), Ordering::Release);
                if !was_up {
                    tracing::info!(node = %cluster.node, "redis reachable: cluster limits and reputation are shared");
                }
                was_up = true;
                cluster.up.store(true, Ordering::Release);
                metrics.cluster_up.set(1);
                metrics
                    .cluster_peers
                    .set(i64::from(cluster.peers.load(Ordering::Acquire)));
            }
            Err(e) => {
                down(&cluster, metrics, &mut was_up, &e.to_string());
                if wrong_type(&e)
                    && let Some(c) = conn.as_mut()
                    && let Err(e) = repair(&cluster, c, metrics).await
                {
                    tracing::debug!("repairing shared keys failed: {e}");
                }
                if cluster.settings.redis_cluster {
                    // Topology may have changed: start over.
                    conn = None;
                }
            }
        }
        for (kind, now) in [
            ("applied", cluster.applied.load(Ordering::Acquire)),
            ("published", cluster.published.load(Ordering::Acquire)),
        ] {
            // The counters mirror the cluster's own totals.
            let c = metrics.cluster_events.get_or_create(&KindLabel { kind });
            c.inc_by(now.saturating_sub(c.get()));
        }
    }
}

fn down(cluster: &Cluster, metrics: &Metrics, was_up: &mut bool, why: &str) {
    cluster.errors.fetch_add(1, Ordering::AcqRel);
    metrics.cluster_sync_errors.inc();
    metrics.cluster_up.set(0);
    cluster.up.store(false, Ordering::Release);
    if *was_up || cluster.errors.load(Ordering::Acquire) == 1 {
        let mode = match cluster.settings.failure_mode {
            FailureMode::Open => "each node enforces the limits alone",
            FailureMode::Closed => "limits assume every live peer admitted as much as this node",
        };
        tracing::warn!(node = %cluster.node, "redis unreachable ({why}): local-only, {mode}; retrying");
    }
    *was_up = false;
}

/// Pushes every client's new admissions and learns the others' counts.
async fn push_counts(cluster: &Cluster, c: &mut Conn, metrics: &Metrics) -> redis::RedisResult<()> {
    let windows: Vec<Arc<Window>> = lock(&cluster.windows).values().cloned().collect();
    // Each node writes its own total for the second (signed), never an
    // increment of a shared number: a record says exactly what one node
    // admitted, and nobody else's count can be changed.
    let mut batch: Vec<(Pushed, u32, u32)> = Vec::new();
    for w in &windows {
        w.table.for_each(|s| {
            if batch.len() >= PUSH_BATCH {
                return;
            }
            let n = s.unsynced.swap(0, Ordering::AcqRel);
            if n == 0 {
                return;
            }
            match s.key() {
                Some(key) => batch.push((
                    Pushed {
                        window: w.clone(),
                        key,
                        sec: s.sec.load(Ordering::Acquire),
                    },
                    n,
                    s.pushed.load(Ordering::Acquire).saturating_add(n),
                )),
                None => {
                    s.unsynced.fetch_add(n, Ordering::AcqRel);
                }
            }
        });
    }
    if batch.is_empty() {
        return Ok(());
    }
    let keys: Vec<(String, String)> = batch
        .iter()
        .map(|(p, _, _)| {
            // One hash tag per client: both seconds live in one slot.
            let tag = format!("{}:{}", p.window.name, client_name(&p.key));
            (
                cluster.counter_key(&tag, p.sec),
                cluster.counter_key(&tag, p.sec.saturating_sub(1)),
            )
        })
        .collect();
    let cmds = batch
        .iter()
        .zip(&keys)
        .map(|((_, _, total), (curr, prev))| {
            let mut cmd = eval(PUSH, &[curr, prev]);
            cmd.arg(&cluster.node)
                .arg(cluster.signer.signed(&[curr, &cluster.node], &total.to_string()))
                .arg(3000)
                .arg(MAX_RECORD_BYTES)
                .arg(MAX_NODES);
            cmd
        })
        .collect();
    let replies: Vec<(Vec<String>, Vec<String>, u64)> = match c.each(cmds).await {
        Ok(t) => t,
        Err(e) => {
            // Not counted in Redis: keep them for the next sync.
            for (p, n, _) in &batch {
                p.window
                    .table
                    .get(&p.key, |s| s.unsynced.fetch_add(*n, Ordering::AcqRel));
            }
            return Err(e);
        }
    };
    for (((p, n, _), (curr_key, prev_key)), (curr, prev, dropped)) in batch.iter().zip(&keys).zip(replies) {
        cluster.oversized(metrics, curr_key, dropped);
        let others_curr = cluster.others(curr_key, &curr, metrics);
        let others_prev = cluster.others(prev_key, &prev, metrics);
        p.window.table.get(&p.key, |s| {
            if s.sec.load(Ordering::Acquire) != p.sec {
                return;
            }
            s.pushed.fetch_add(*n, Ordering::AcqRel);
            s.remote
                .store((others_curr << 32) | others_prev, Ordering::Release);
        });
    }
    Ok(())
}

/// Sends queued score changes: the stream for live nodes, the hash for
/// late ones.
async fn publish(cluster: &Cluster, c: &mut Conn, pending: &mut Vec<ScoreEvent>) -> redis::RedisResult<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let stream = cluster.key("events");
    let now = unix_now_ms();
    let mut pipe = redis::pipe();
    for e in pending.iter() {
        let net = e.net.to_string();
        let kind = if e.ban { "ban" } else { "score" };
        let value = e.value();
        let mac = cluster.signer.mac(&[&stream, &cluster.node, &net, kind, &value]);
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_LEN)
            .arg("*")
            .arg("node")
            .arg(&cluster.node)
            .arg("net")
            .arg(&net)
            .arg("k")
            .arg(kind)
            .arg("v")
            .arg(&value)
            .arg("mac")
            .arg(mac)
            .ignore();
        let hash = cluster.key(if e.ban { "bans" } else { "rep" });
        if e.current(now) {
            pipe.cmd("HSET")
                .arg(&hash)
                .arg(&net)
                .arg(cluster.signer.signed(&[&hash, &net], &value))
                .ignore();
        } else {
            pipe.cmd("HDEL").arg(&hash).arg(&net).ignore();
        }
    }
    c.query::<()>(&pipe).await?;
    cluster
        .published
        .fetch_add(pending.len() as u64, Ordering::AcqRel);
    pending.clear();
    Ok(())
}

type StreamReply = Vec<(String, HashMap<String, String>)>;

/// Applies what other nodes published since `stream_id`.
async fn read_events(
    cluster: &Cluster,
    c: &mut Conn,
    app: &App,
    stream_id: &mut String,
) -> redis::RedisResult<()> {
    let stream = cluster.key("events");
    for _ in 0..MAX_STREAM_PAGES {
        let mut pipe = redis::pipe();
        pipe.add_command(eval(READ_STREAM, &[&stream]))
            .arg(&*stream_id)
            .arg(1000)
            .arg(MAX_RECORD_BYTES);
        let (entries,): (StreamReply,) = c.query(&pipe).await?;
        let got = entries.len();
        let now = unix_now_ms();
        for (id, fields) in entries {
            *stream_id = id;
            let field = |k: &str| fields.get(k).map(String::as_str);
            if field("node") == Some(cluster.node.as_str()) {
                continue;
            }
            let event = stream_event(cluster, &stream, &fields, now);
            take(cluster, app, event, || format!("{fields:?}")).await;
        }
        if got < 1000 {
            return Ok(());
        }
    }
    Ok(())
}

/// A stream entry as an event, checked.
fn stream_event(
    cluster: &Cluster,
    stream: &str,
    fields: &HashMap<String, String>,
    now_ms: u64,
) -> Result<ScoreEvent, Rejected> {
    let field = |k: &str| fields.get(k).map(String::as_str);
    let (Some(node), Some(net), Some(kind), Some(value)) =
        (field("node"), field("net"), field("k"), field("v"))
    else {
        return Err(if cluster.signer.0.is_some() {
            Rejected::Unauthenticated
        } else {
            Rejected::Malformed
        });
    };
    cluster
        .signer
        .check(&[stream, node, net, kind, value], field("mac"))?;
    let ban = match kind {
        "ban" => true,
        "score" => false,
        _ => return Err(Rejected::Malformed),
    };
    ScoreEvent::parse(net, &value.split(' ').collect::<Vec<_>>(), ban, now_ms)
}

/// Applies a checked event, or counts and logs why not.
async fn take(
    cluster: &Cluster,
    app: &App,
    event: Result<ScoreEvent, Rejected>,
    record: impl Fn() -> String,
) {
    let metrics = &app.metrics;
    let e = match event.and_then(|e| cluster.fresh(&e).map(|new| (e, new))) {
        Ok((e, true)) => e,
        Ok((_, false)) => return,
        Err(why) => {
            cluster.reject(metrics, why, &record(), "");
            return;
        }
    };
    match app.apply_cluster_event(&e).await {
        Ok(()) => {
            cluster.applied.fetch_add(1, Ordering::AcqRel);
        }
        Err(refused) => cluster.reject(metrics, Rejected::Refused, &record(), &refused),
    }
}

/// After a (re)connect: re-publish what this node knows (Redis may have
/// restarted empty), note the stream's end, then apply the hash.
async fn catch_up(
    cluster: &Cluster,
    c: &mut Conn,
    app: &App,
    stream_id: &mut String,
) -> redis::RedisResult<()> {
    let now = unix_now_ms();
    let mine: Vec<ScoreEvent> = lock(&cluster.known)
        .values()
        .filter(|e| e.current(now))
        .copied()
        .collect();
    if !mine.is_empty() {
        let mut pipe = redis::pipe();
        for e in &mine {
            // Only where the hash does not hold something newer.
            let hash = cluster.key(if e.ban { "bans" } else { "rep" });
            let net = e.net.to_string();
            pipe.cmd("HSETNX")
                .arg(&hash)
                .arg(&net)
                .arg(cluster.signer.signed(&[&hash, &net], &e.value()))
                .ignore();
        }
        c.query::<()>(&pipe).await?;
    }
    let mut pipe = redis::pipe();
    pipe.add_command(eval(LAST_ID, &[&cluster.key("events")]));
    let (last,): (Option<String>,) = c.query(&pipe).await?;
    *stream_id = last.unwrap_or_else(|| "0-0".into());
    let mut total = 0;
    for (name, ban) in [("rep", false), ("bans", true)] {
        let hash = cluster.key(name);
        let all = read_hash(cluster, c, &app.metrics, &hash, cluster.max_clients).await?;
        total += all.len();
        let mut expired = Vec::new();
        for (net, v) in &all {
            let event = cluster
                .signer
                .open(&[&hash, net], v, 3)
                .and_then(|fields| ScoreEvent::parse(net, &fields, ban, now));
            match event {
                // Only authentic records are cleaned up: a node with the
                // wrong key must not wipe the others' state.
                Ok(e) if !e.current(now) => expired.push(net.clone()),
                event => take(cluster, app, event, || format!("{hash} {net} {v}")).await,
            }
        }
        if !expired.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("HDEL").arg(&hash).arg(expired).ignore();
            c.query::<()>(&pipe).await?;
        }
    }
    tracing::info!(node = %cluster.node, entries = total, "cluster state caught up from redis");
    Ok(())
}

/// Whether a command (alone or in a pipeline) met a key of the wrong type.
fn wrong_type(e: &redis::RedisError) -> bool {
    e.clone()
        .into_server_errors()
        .is_some_and(|errs| errs.iter().any(|(_, e)| e.code() == "WRONGTYPE"))
}

/// Drops shared keys of the wrong type (planted by a writer to Redis):
/// every command on them would fail, and with it every sync from now on.
/// Their content was never a record of ours.
async fn repair(cluster: &Cluster, c: &mut Conn, metrics: &Metrics) -> redis::RedisResult<()> {
    let keys = [
        ("events", "stream"),
        ("rep", "hash"),
        ("bans", "hash"),
        ("nodes", "hash"),
    ];
    let mut pipe = redis::pipe();
    for (name, _) in keys {
        pipe.cmd("TYPE").arg(cluster.key(name));
    }
    let types: Vec<String> = c.query(&pipe).await?;
    for ((name, want), got) in keys.iter().zip(types) {
        if got != *want && got != "none" {
            let key = cluster.key(name);
            cluster.reject(
                metrics,
                Rejected::Malformed,
                &key,
                &format!("is a {got}, not a {want}: deleted"),
            );
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(&key).ignore();
            c.query::<()>(&pipe).await?;
        }
    }
    Ok(())
}

/// Up to `most` fields of hash `key`, oversized ones deleted unread and
/// counted.
async fn read_hash(
    cluster: &Cluster,
    c: &mut Conn,
    metrics: &Metrics,
    key: &str,
    most: usize,
) -> redis::RedisResult<HashMap<String, String>> {
    let mut pipe = redis::pipe();
    pipe.add_command(eval(READ_HASH, &[key]))
        .arg(MAX_RECORD_BYTES)
        .arg(most);
    let ((dropped, flat),): ((u64, Vec<String>),) = c.query(&pipe).await?;
    cluster.oversized(metrics, key, dropped);
    let mut all = HashMap::with_capacity(flat.len() / 2);
    let mut pairs = flat.into_iter();
    while let (Some(f), Some(v)) = (pairs.next(), pairs.next()) {
        all.insert(f, v);
    }
    Ok(all)
}

/// Says this node is alive and counts the others.
async fn heartbeat(cluster: &Cluster, c: &mut Conn, now: u64, metrics: &Metrics) -> redis::RedisResult<()> {
    let nodes = cluster.key("nodes");
    let mut pipe = redis::pipe();
    let stamp = now.to_string();
    pipe.cmd("HSET")
        .arg(&nodes)
        .arg(&cluster.node)
        .arg(cluster.signer.signed(&[&nodes, &cluster.node], &stamp))
        .ignore();
    c.query::<()>(&pipe).await?;
    // Read as text: one field that is not a number must not fail the reply.
    let all = read_hash(cluster, c, metrics, &nodes, MAX_NODES).await?;
    let mut live = 0usize;
    let mut gone = Vec::new();
    for (node, stored) in &all {
        if *node == cluster.node {
            continue;
        }
        let at = cluster.signer.open(&[&nodes, node], stored, 1).and_then(|f| {
            let at = f[0].parse::<u64>().map_err(|_| Rejected::Malformed)?;
            if at > now.saturating_add(MAX_SKEW_MS) {
                return Err(Rejected::OutOfRange);
            }
            Ok(at)
        });
        match at {
            Ok(at) if now.saturating_sub(at) < PEER_TTL_MS => live += 1,
            Ok(at) if now.saturating_sub(at) > 60_000 => gone.push(node),
            Ok(_) => {}
            Err(why) => cluster.reject(metrics, why, &format!("{nodes} {node} {stored}"), ""),
        }
    }
    cluster
        .peers
        .store(u32::try_from(live).unwrap_or(u32::MAX), Ordering::Release);
    if !gone.is_empty() {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(&nodes).arg(gone).ignore();
        c.query::<()>(&pipe).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: &str) -> Vec<&str> {
        v.split(' ').collect()
    }

    /// A forged ban with a u64::MAX expiry used to overflow in `live` (a
    /// panic in the sync task in debug builds, a wrapped expiry in release).
    #[test]
    fn out_of_range_times_from_redis_are_refused() {
        let max = u64::MAX.to_string();
        let now = 1_800_000_000_000;
        let parse = |v: &str, ban| ScoreEvent::parse("198.18.0.1/32", &fields(v), ban, now);
        assert_eq!(parse(&format!("- {max} 0"), true), Err(Rejected::OutOfRange));
        assert_eq!(parse("- 253402300800 0", true), Err(Rejected::OutOfRange));
        assert_eq!(parse(&format!("5 0 {max}"), false), Err(Rejected::OutOfRange));
        assert_eq!(parse("5 0 18446744073709551616", false), Err(Rejected::Malformed));
        // A stamp from the future would never start to recover.
        assert_eq!(
            parse(&format!("0 0 {}", now + 3_600_000), false),
            Err(Rejected::OutOfRange)
        );
        assert_eq!(parse("101 0 0", false), Err(Rejected::OutOfRange));
        assert_eq!(parse("-5 0 0", false), Err(Rejected::Malformed));
        assert_eq!(parse("5 0", false), Err(Rejected::Malformed));
        let mapped = ScoreEvent::parse("::ffff:64.0.0.0/99", &fields("- 0 0"), true, now);
        assert_eq!(mapped.map(|e| e.net.to_string()), Ok("64.0.0.0/3".to_owned()));
        let Ok(e) = parse("- 253402300799 0", true) else {
            panic!("the largest allowed expiry parses");
        };
        assert!(e.live(0));
        assert!(!e.live(u64::MAX));
    }

    /// Counter records of other nodes: forged, negative, huge and garbage
    /// ones are left out of the sum (and counted), authentic ones add up.
    #[test]
    fn only_authentic_counts_of_other_nodes_add_up() {
        let Ok(key) = ClusterKey::new("0123456789abcdef0123456789abcdef") else {
            panic!("a 32-character key is accepted");
        };
        let settings = ClusterSettings {
            redis: vec!["redis://127.0.0.1:1".into()],
            redis_cluster: false,
            sync_interval: Duration::from_millis(50),
            node_name: "me".into(),
            failure_mode: FailureMode::Open,
            key_prefix: "palisade".into(),
            redis_ca: None,
            key: Some(key.clone()),
        };
        let cluster = Cluster::new(settings, 100);
        let metrics = Metrics::new();
        let k = "palisade:rc:{default:198.18.0.1}:1800000000";
        let signed = |node: &str, n: &str| cluster.signer.signed(&[k, node], n);
        let flat: Vec<String> = [
            ("me", signed("me", "1000")),
            ("b", signed("b", "7")),
            ("c", signed("c", "5")),
            ("d", "9".to_owned()),
            ("e", signed("e", "-3")),
            ("f", signed("f", "4294967296")),
            ("g", signed("g", "many")),
            ("h", signed("b", "7")),
        ]
        .into_iter()
        .flat_map(|(n, v)| [n.to_owned(), v])
        .collect();
        assert_eq!(cluster.others(k, &flat, &metrics), 12);
        // Bound to its second: the same record one second later is forged.
        assert_eq!(
            cluster.others(
                "palisade:rc:{default:198.18.0.1}:1800000001",
                &flat[2..4],
                &metrics
            ),
            0
        );
        let rejected = |r: &'static str| {
            metrics
                .cluster_records_rejected
                .get_or_create(&ReasonLabel { reason: r })
                .get()
        };
        assert_eq!(rejected("unauthenticated"), 3);
        assert_eq!(rejected("out_of_range"), 2);
        assert_eq!(rejected("malformed"), 1);
    }

    /// Per client and kind the newest stamp wins: a replay of an older
    /// record is stale, the same record read again is skipped quietly.
    #[test]
    fn older_records_than_the_last_applied_are_stale() {
        let settings = ClusterSettings {
            redis: vec!["redis://127.0.0.1:1".into()],
            redis_cluster: false,
            sync_interval: Duration::from_millis(50),
            node_name: "me".into(),
            failure_mode: FailureMode::Open,
            key_prefix: "palisade".into(),
            redis_ca: None,
            key: None,
        };
        let cluster = Cluster::new(settings, 2);
        let event = |net: &str, ban, at_ms| ScoreEvent {
            net: net.parse().unwrap(),
            ban,
            score: None,
            expires: 0,
            at_ms,
        };
        assert_eq!(cluster.fresh(&event("198.18.0.1/32", true, 2000)), Ok(true));
        assert_eq!(cluster.fresh(&event("198.18.0.1/32", true, 2000)), Ok(false));
        assert_eq!(
            cluster.fresh(&event("198.18.0.1/32", true, 1000)),
            Err(Rejected::Stale)
        );
        // A score is another record than a ban.
        assert_eq!(cluster.fresh(&event("198.18.0.1/32", false, 1000)), Ok(true));
        assert_eq!(cluster.fresh(&event("198.18.0.1/32", true, 3000)), Ok(true));
        // Bounded: past max_clients (2) new clients are not remembered.
        assert_eq!(cluster.fresh(&event("198.18.0.2/32", true, 1000)), Ok(true));
        assert_eq!(lock(&cluster.latest).len(), 2);
    }

    #[test]
    fn a_record_is_bound_to_its_key_field_and_values() {
        let Ok(key) = ClusterKey::new("0123456789abcdef0123456789abcdef") else {
            panic!("a 32-character key is accepted");
        };
        let signer = Signer::new(Some(&key));
        let hash = "{palisade}:bans";
        let stored = signer.signed(&[hash, "198.18.0.1/32"], "- 2000000000 1000");
        assert_eq!(
            signer.open(&[hash, "198.18.0.1/32"], &stored, 3),
            Ok(vec!["-", "2000000000", "1000"])
        );
        // Copied to the field of the whole Internet, or to the score hash.
        assert_eq!(
            signer.open(&[hash, "0.0.0.0/0"], &stored, 3),
            Err(Rejected::Unauthenticated)
        );
        assert_eq!(
            signer.open(&["{palisade}:rep", "198.18.0.1/32"], &stored, 3),
            Err(Rejected::Unauthenticated)
        );
        // A longer ban under the same MAC.
        let longer = stored.replacen("2000000000", "2000000001", 1);
        assert_eq!(
            signer.open(&[hash, "198.18.0.1/32"], &longer, 3),
            Err(Rejected::Unauthenticated)
        );
        // No MAC, a MAC that is not hex, another key's MAC.
        for forged in [
            "- 2000000000 1000".to_owned(),
            "- 2000000000 1000 zz".to_owned(),
            format!(
                "- 2000000000 1000 {}",
                record_mac(
                    b"another key, also 32 characters!",
                    &[hash, "198.18.0.1/32", "- 2000000000 1000"]
                )
            ),
        ] {
            assert_eq!(
                signer.open(&[hash, "198.18.0.1/32"], &forged, 3),
                Err(Rejected::Unauthenticated),
                "{forged}"
            );
        }
        // The public helper signs as the nodes do.
        assert_eq!(
            stored,
            format!(
                "- 2000000000 1000 {}",
                record_mac(key.secret(), &[hash, "198.18.0.1/32", "- 2000000000 1000"])
            )
        );
        // Length prefixes: moving a boundary between parts changes the MAC.
        assert_ne!(record_mac(b"k", &["ab", "c"]), record_mac(b"k", &["a", "bc"]));
        // Insecure: nothing is checked, a garbled record is malformed.
        let open = Signer::new(None);
        assert_eq!(open.open(&[hash, "x"], "- 1 2", 3), Ok(vec!["-", "1", "2"]));
        assert_eq!(open.open(&[hash, "x"], "- 1 2 3 4", 3), Err(Rejected::Malformed));
    }
}
