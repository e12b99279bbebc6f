//! The adaptive 4-state breaker, one per client fingerprint
//! (hash of client address key and User-Agent).
//!
//! Each client's requests and their weighted failures (upstream 5xx ×1.0,
//! slow first byte ×1.0, TLS handshake timeout ×1.5, request-header parse
//! failure ×2.0) are counted over a 10 s window. With at least
//! `min_requests` in the window:
//!
//! - **closed → degraded** when the weighted failure rate exceeds 0.35:
//!   the client gets a tighter rate limit (half, by default);
//! - **degraded → open** above 0.5: the client is refused (503) for
//!   `open_for`, then half-opens;
//! - **degraded → half-open** when the rate stays below 0.1 for 10 s;
//! - **half-open → closed** after `probes` successful probes; a failed
//!   probe opens it again.
//!
//! The breakers are kept in tables of their own, keyed by fingerprint. A
//! closed breaker whose degraded bucket is full (every client's, until it
//! first fails too often) is only its window: a 16-byte record of two
//! words in a table of every fingerprint seen,
//!
//! ```text
//! word 0  tag:32 | lock:1 | sec:28 | spare:2 | moved:1
//! word 1  cur_requests:16 | cur_failures:16 | prev_requests:16 | prev_failures:16
//! ```
//!
//! and any other breaker is the three free words of a 32-byte
//! [record](crate::record) in a second table, as large, made resident only
//! by the clients that get there:
//!
//! ```text
//! word 1  tat:44 | probes_sent:10 | probes_ok:10
//! word 2  since:40 | state:2 | calm:1 | spare:21
//! word 3  cur_requests:16 | cur_failures:16 | prev_requests:16 | prev_failures:16
//! ```
//!
//! A breaker that leaves the closed state moves to the second table, and
//! its small record is marked `moved`; one that is closed again with its
//! bucket full moves back. The full record is the client's state whenever
//! it exists: a small record that looks fresh (it may have been taken over
//! meanwhile: a moved one is as good as idle) or has none to be had (an
//! overflow sharer) is looked up there, once the second table has ever
//! held a client. Both tables judge what a single one did, bit for bit.
//!
//! The window is approximate, as the rate limiter's: outcomes are counted
//! per aligned 10 s period, and the previous period is weighted by the
//! share of it still inside the last 10 s, so an outcome fades out over 10
//! to 20 s instead of leaving exactly 10 s later. Counts are 16-bit (a
//! failure counts its weight in halves): beyond 65 535 in one period a
//! client's period stops counting, so the window holds a sample of its
//! first outcomes, which keeps the rate honest at any volume.
//!
//! `tat` is the degraded limit's GCRA time, in nanoseconds after the start
//! of the record's second. `since` (milliseconds of clock time) is when an
//! open or half-open breaker changed state, or since when a degraded one
//! has been calm (`calm` set).
//!
//! A client with no record of its own (sharing an overflow record of the
//! first table, or with no room in the second to leave the closed state)
//! is not judged: pooling strangers' outcomes would let one of them open
//! the breaker for all.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use palisade_core::{ClientKey, NANOS_PER_MS, NANOS_PER_SEC, Nanos};

use crate::clients::{Clients, ClientsN, Place};
use crate::rate::{Quota, gcra};
use crate::record::{MAX_TOLERANCE, Words, WordsN};

/// A closed breaker's record: its window.
type Closed = WordsN<2>;

/// Length of the window (and of the periods it is counted in).
pub const WINDOW: Nanos = 10 * NANOS_PER_SEC;
const WINDOW_SECS: u64 = WINDOW / NANOS_PER_SEC;
/// Outcomes (and failure half-units) counted per 10 s period, at most:
/// a `min_requests` above it acts as it.
pub const COUNT_MAX: u32 = u16::MAX as u32;
const PROBES_MAX: u32 = (1 << 10) - 1;
const TAT_MAX: u64 = (1 << 44) - 1;
const MS_MASK: u64 = (1 << 40) - 1;

/// Rules. Defaults are the documented ones.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    /// closed → degraded above this weighted failure rate.
    pub degrade_above: f64,
    /// degraded → open above this rate.
    pub open_above: f64,
    /// degraded → half-open when below this rate for `recover_after`.
    pub recover_below: f64,
    /// How long the rate must stay low.
    pub recover_after: Nanos,
    /// Fewest requests in the window before the rate can degrade or open.
    pub min_requests: u32,
    /// How long an open client is refused.
    pub open_for: Nanos,
    /// Successful probes that close a half-open breaker.
    pub probes: u32,
    /// Degraded clients get this fraction of their normal rate limit.
    pub degraded_rate_factor: f64,
    /// A first byte slower than this counts as a failure.
    pub slow_first_byte: Nanos,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            degrade_above: 0.35,
            open_above: 0.5,
            recover_below: 0.1,
            recover_after: 10 * NANOS_PER_SEC,
            min_requests: 10,
            open_for: 30 * NANOS_PER_SEC,
            probes: 3,
            degraded_rate_factor: 0.5,
            slow_first_byte: 800 * NANOS_PER_MS,
        }
    }
}

/// What a request's outcome says about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A good answer.
    Success,
    /// Upstream 5xx (or the proxy's 502/504): weight 1.0.
    ServerError,
    /// First byte later than `slow_first_byte`: weight 1.0.
    SlowFirstByte,
    /// TLS handshake timed out: weight 1.5.
    TlsHandshakeTimeout,
    /// The request head could not be parsed: weight 2.0.
    HeaderParseFailure,
}

impl Signal {
    /// Failure weight in half-units (1.0 = 2).
    fn half_units(self) -> u16 {
        match self {
            Self::Success => 0,
            Self::ServerError | Self::SlowFirstByte => 2,
            Self::TlsHandshakeTimeout => 3,
            Self::HeaderParseFailure => 4,
        }
    }

    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ServerError => "server_error",
            Self::SlowFirstByte => "slow_first_byte",
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::HeaderParseFailure => "header_parse_failure",
        }
    }
}

/// A client's breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdaptiveState {
    /// Normal.
    #[default]
    Closed,
    /// Tighter rate limit.
    Degraded,
    /// Refused.
    Open,
    /// A few probes pass.
    HalfOpen,
}

impl AdaptiveState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Degraded,
            2 => Self::Open,
            3 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::Degraded => 1,
            Self::Open => 2,
            Self::HalfOpen => 3,
        }
    }

    /// Name for metrics, logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Degraded => "degraded",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// Every state, for gauges.
    pub const ALL: [Self; 4] = [Self::Closed, Self::Degraded, Self::Open, Self::HalfOpen];
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The weighted failure rate crossed a threshold.
    FailureRate,
    /// The rate stayed below `recover_below` for `recover_after`.
    Calm,
    /// `open_for` elapsed.
    OpenElapsed,
    /// All probes succeeded.
    ProbesSucceeded,
    /// A probe failed.
    ProbeFailed,
}

impl Reason {
    /// Name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailureRate => "failure_rate",
            Self::Calm => "calm",
            Self::OpenElapsed => "open_elapsed",
            Self::ProbesSucceeded => "probes_succeeded",
            Self::ProbeFailed => "probe_failed",
        }
    }
}

/// A state change with the numbers that caused it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveTransition {
    /// Before.
    pub from: AdaptiveState,
    /// After.
    pub to: AdaptiveState,
    /// Why.
    pub reason: Reason,
    /// Weighted failure rate in the window at that moment.
    pub rate: f64,
    /// Requests in the window at that moment.
    pub requests: u32,
    /// The client's address.
    pub ip: IpAddr,
}

/// What the breaker says about a request before it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Go ahead.
    Pass,
    /// Degraded and over the tighter limit: retry after this long (429).
    Limited {
        /// Time until the tighter bucket admits again.
        retry_after: Nanos,
        /// The tighter quota.
        quota: Quota,
    },
    /// Open, or half-open with all probes out: refuse (503).
    Refused {
        /// Time until the breaker half-opens (0 when probes are out).
        retry_after: Nanos,
    },
}

/// One client's breaker, decoded from its record at a moment `now`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Breaker {
    state: AdaptiveState,
    /// Degraded limit's GCRA time, in nanoseconds after the start of
    /// `now`'s second.
    tat: Nanos,
    probes_sent: u32,
    probes_ok: u32,
    /// Milliseconds (wrapping at 2⁴⁰): open or half-open since, or, with
    /// `calm`, calm since.
    since: u64,
    calm: bool,
    /// (requests, failure half-units) in `now`'s 10 s period and the one before.
    cur: (u32, u32),
    prev: (u32, u32),
}

fn unpack(v: u64) -> (u32, u32) {
    ((v >> 16) as u32 & COUNT_MAX, v as u32 & COUNT_MAX)
}

fn pack((requests, half_units): (u32, u32)) -> u64 {
    (u64::from(requests.min(COUNT_MAX)) << 16) | u64::from(half_units.min(COUNT_MAX))
}

/// The window stored as `counts` `gap` seconds before `now`, shifted by
/// the periods that passed: (current, previous).
fn shifted(counts: u64, gap: u64, now: Nanos) -> ((u32, u32), (u32, u32)) {
    let now_sec = now / NANOS_PER_SEC;
    let periods = now_sec / WINDOW_SECS - now_sec.saturating_sub(gap) / WINDOW_SECS;
    let (cur, prev) = (unpack(counts >> 32), unpack(counts));
    match periods {
        0 => (cur, prev),
        1 => ((0, 0), cur),
        _ => ((0, 0), (0, 0)),
    }
}

impl Breaker {
    /// The breaker of `w`, brought to `now`: `tat` rebased to `now`'s
    /// second, the periods shifted by the ones that passed.
    fn load(w: &Words, now: Nanos) -> Self {
        let (w1, w2) = (w.word(1), w.word(2));
        let gap = w.quiet_secs(now);
        let (cur, prev) = shifted(w.word(3), gap, now);
        Self {
            state: AdaptiveState::from_u8(((w2 >> 40) & 3) as u8),
            tat: (w1 >> 20).saturating_sub(gap.saturating_mul(NANOS_PER_SEC)),
            probes_sent: ((w1 >> 10) as u32) & PROBES_MAX,
            probes_ok: (w1 as u32) & PROBES_MAX,
            since: w2 & MS_MASK,
            calm: (w2 >> 42) & 1 == 1,
            cur,
            prev,
        }
    }

    /// Writes the breaker back as of `now`.
    fn store(&self, w: &mut Words, now: Nanos) {
        w.stamp(now);
        w.set_word(
            1,
            (self.tat.min(TAT_MAX) << 20)
                | (u64::from(self.probes_sent.min(PROBES_MAX)) << 10)
                | u64::from(self.probes_ok.min(PROBES_MAX)),
        );
        w.set_word(
            2,
            (self.since & MS_MASK) | (u64::from(self.state.as_u8()) << 40) | (u64::from(self.calm) << 42),
        );
        w.set_word(3, (pack(self.cur) << 32) | pack(self.prev));
    }

    /// The closed breaker of a small record, brought to `now`.
    fn load_closed(c: &Closed, now: Nanos) -> Self {
        let (cur, prev) = shifted(c.word(1), c.quiet_secs(now), now);
        Self {
            cur,
            prev,
            ..Self::default()
        }
    }

    /// Whether the breaker is all a small record holds: closed, with its
    /// degraded bucket full (other fields are not read while closed, and
    /// are set afresh on leaving it).
    fn is_closed(&self, now: Nanos) -> bool {
        self.state == AdaptiveState::Closed && self.tat <= now % NANOS_PER_SEC
    }

    /// Writes a closed breaker into a small record as of `now`.
    fn store_closed(&self, c: &mut Closed, now: Nanos) {
        c.stamp(now);
        c.set_flag(false);
        c.set_word(1, (pack(self.cur) << 32) | pack(self.prev));
    }

    /// A small record may change hands when its window is empty, or when
    /// its breaker moved to a full record (where it is found without it).
    fn idle_closed(c: &Closed, now: Nanos) -> bool {
        let b = Self::load_closed(c, now);
        c.flag() || (b.cur == (0, 0) && b.prev == (0, 0))
    }

    /// True when the record equals a fresh one at `now`: closed, window
    /// empty, degraded bucket full. The table's rule for handing it over.
    fn idle(w: &Words, now: Nanos) -> bool {
        let b = Self::load(w, now);
        b.state == AdaptiveState::Closed
            && b.cur == (0, 0)
            && b.prev == (0, 0)
            && b.tat <= now % NANOS_PER_SEC
    }

    /// Adds one outcome to the current period.
    fn count(&mut self, signal: Signal) {
        let half_units = u32::from(signal.half_units());
        // A full period stops counting: it keeps a consistent sample.
        if self.cur.0 < COUNT_MAX && self.cur.1 + half_units <= COUNT_MAX {
            self.cur = (self.cur.0 + 1, self.cur.1 + half_units);
        }
    }

    /// (requests, weighted failure rate) over the 10 s ending now.
    fn window(&self, now: Nanos) -> (u32, f64) {
        let left = WINDOW - now % WINDOW;
        let weighted = |n: u32| u64::from(n) * left / WINDOW;
        let requests = u64::from(self.cur.0) + weighted(self.prev.0);
        let share = left as f64 / WINDOW as f64;
        let reqs = f64::from(self.cur.0) + f64::from(self.prev.0) * share;
        let half_units = f64::from(self.cur.1) + f64::from(self.prev.1) * share;
        let rate = if reqs > 0.0 { half_units / 2.0 / reqs } else { 0.0 };
        (requests as u32, rate)
    }

    /// Time since `since`, in nanoseconds (from its millisecond).
    fn elapsed(&self, now: Nanos) -> Nanos {
        let ms = (now / NANOS_PER_MS).wrapping_sub(self.since) & MS_MASK;
        ms * NANOS_PER_MS + now % NANOS_PER_MS
    }

    fn switch(
        &mut self,
        to: AdaptiveState,
        reason: Reason,
        now: Nanos,
        window: (u32, f64),
        ip: IpAddr,
    ) -> AdaptiveTransition {
        let from = self.state;
        self.state = to;
        self.since = (now / NANOS_PER_MS) & MS_MASK;
        self.calm = false;
        if to == AdaptiveState::HalfOpen {
            self.probes_sent = 0;
            self.probes_ok = 0;
        }
        if to == AdaptiveState::Closed {
            // Start over: the failures that degraded the client are history.
            self.cur = (0, 0);
            self.prev = (0, 0);
        }
        AdaptiveTransition {
            from,
            to,
            reason,
            rate: window.1,
            requests: window.0,
            ip,
        }
    }
}

/// A fingerprint and the address it was last seen from.
type Noted = (ClientKey, IpAddr);

/// The addresses of clients that left the closed state, for the admin
/// listing (records have no room for an address). A fixed array of slots
/// picked by a seeded hash of the fingerprint; transitions are rare, so a
/// slot is a small mutex. A client whose slot another took is missing from
/// the listing but keeps its state.
struct Troubled {
    slots: Box<[Mutex<Option<Noted>>]>,
    hasher: foldhash::fast::RandomState,
}

impl Troubled {
    fn new(clients: usize) -> Self {
        Self {
            slots: (0..(clients / 64).clamp(64, 4096))
                .map(|_| Mutex::new(None))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn note(&self, key: &ClientKey, ip: IpAddr) {
        let i = (self.hasher.hash_one(key) % self.slots.len() as u64) as usize;
        // A slot holds plain data: a panic elsewhere cannot leave it torn.
        *self.slots[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((*key, ip));
    }

    fn each(&self, mut f: impl FnMut(ClientKey, IpAddr) -> bool) {
        for slot in &self.slots {
            let noted = *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((key, ip)) = noted
                && !f(key, ip)
            {
                return;
            }
        }
    }
}

/// The keyed adaptive breaker.
pub struct AdaptiveBreaker {
    cfg: AdaptiveConfig,
    /// Every fingerprint, closed breakers whole.
    table: Arc<ClientsN<2>>,
    /// Breakers out of the closed state (or with a degraded bucket still
    /// refilling).
    full: Arc<Clients>,
    troubled: Arc<Troubled>,
    counts: Arc<StateCounts>,
}

/// Clients per state, kept as transitions happen (and across reloads).
#[derive(Debug, Default)]
struct StateCounts([AtomicU64; 4]);

impl AdaptiveBreaker {
    /// A breaker tracking at most `max_clients` fingerprints.
    pub fn new(cfg: AdaptiveConfig, max_clients: usize) -> Self {
        Self {
            cfg,
            table: Arc::new(ClientsN::with_idle_rule(max_clients, Breaker::idle_closed)),
            full: Arc::new(Clients::with_idle_rule(max_clients, Breaker::idle)),
            troubled: Arc::new(Troubled::new(max_clients)),
            counts: Arc::default(),
        }
    }

    /// New rules over the state of `previous` (live reload).
    pub fn carrying_over(cfg: AdaptiveConfig, previous: &AdaptiveBreaker) -> Self {
        Self {
            cfg,
            table: previous.table.clone(),
            full: previous.full.clone(),
            troubled: previous.troubled.clone(),
            counts: previous.counts.clone(),
        }
    }

    /// The rules in force.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.cfg
    }

    /// The table of every fingerprint (for gauges).
    pub fn table(&self) -> &ClientsN<2> {
        &self.table
    }

    /// The table of breakers out of the closed state (for gauges).
    pub fn full_table(&self) -> &Clients {
        &self.full
    }

    /// Clients per state other than closed: (degraded, open, half-open).
    pub fn state_counts(&self) -> [(AdaptiveState, u64); 3] {
        let c = &self.counts.0;
        [
            (AdaptiveState::Degraded, c[1].load(Ordering::Relaxed)),
            (AdaptiveState::Open, c[2].load(Ordering::Relaxed)),
            (AdaptiveState::HalfOpen, c[3].load(Ordering::Relaxed)),
        ]
    }

    fn counted(&self, key: &ClientKey, t: Option<AdaptiveTransition>) -> Option<AdaptiveTransition> {
        if let Some(t) = &t {
            let c = &self.counts.0;
            if t.from != AdaptiveState::Closed {
                c[t.from.as_u8() as usize].fetch_sub(1, Ordering::Relaxed);
            }
            if t.to != AdaptiveState::Closed {
                c[t.to.as_u8() as usize].fetch_add(1, Ordering::Relaxed);
                self.troubled.note(key, t.ip);
            }
        }
        t
    }

    /// Runs `f` on the client's breaker at `now`, unless the client has no
    /// record of its own for it (then `untracked`, and nothing is stored).
    fn with<R>(&self, key: &ClientKey, now: Nanos, untracked: R, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let mut f = Some(f);
        let mut run = |b: &mut Breaker| f.take().map(|f| f(b));
        let out = self.table.with(key, now, |c, place| {
            let own = place == Place::Own;
            // The full record, when there is one, is the client's state.
            if (!own || c.flag() || c.word(1) == 0) && !self.full.is_empty() {
                let found = self.full.update(key, |w| {
                    let mut b = Breaker::load(w, now);
                    let r = run(&mut b);
                    if own && b.is_closed(now) {
                        b.store_closed(c, now);
                        w.retag(w.tag());
                    } else {
                        b.store(w, now);
                    }
                    r
                });
                if let Some(r) = found {
                    return r;
                }
                // Gone: it was idle (as good as fresh) when taken over.
                if own {
                    c.set_word(1, 0);
                    c.set_flag(false);
                }
            }
            if !own {
                return None;
            }
            let mut b = Breaker::load_closed(c, now);
            let r = run(&mut b);
            if b.is_closed(now) {
                b.store_closed(c, now);
                return r;
            }
            // Leaving the closed state, for a full record if there is room.
            let moved = self.full.with(key, now, |w, place| {
                if place == Place::Own {
                    b.store(w, now);
                }
                place == Place::Own
            });
            if !moved {
                return None;
            }
            c.stamp(now);
            c.set_word(1, 0);
            c.set_flag(true);
            r
        });
        out.unwrap_or(untracked)
    }

    /// Before forwarding: may this client's request pass? `quota` is the
    /// client's normal limit (tightened when degraded).
    pub fn admit(
        &self,
        key: &ClientKey,
        ip: IpAddr,
        quota: &Quota,
        now: Nanos,
    ) -> (Admission, Option<AdaptiveTransition>) {
        let (admission, t) = self.with(key, now, (Admission::Pass, None), |b| {
            self.admit_breaker(b, ip, quota, now)
        });
        (admission, self.counted(key, t))
    }

    fn admit_breaker(
        &self,
        b: &mut Breaker,
        ip: IpAddr,
        quota: &Quota,
        now: Nanos,
    ) -> (Admission, Option<AdaptiveTransition>) {
        match b.state {
            AdaptiveState::Closed => (Admission::Pass, None),
            AdaptiveState::Degraded => {
                // Recovery is judged on admission too: a calm client may
                // have no failures left to report.
                let window = b.window(now);
                let t = self.calm_check(b, window, now, ip);
                if t.is_some() {
                    return (self.probe(b, now), t);
                }
                (self.tighter_limit(b, quota, now), None)
            }
            AdaptiveState::Open => {
                let elapsed = b.elapsed(now);
                if elapsed < self.cfg.open_for {
                    return (
                        Admission::Refused {
                            retry_after: self.cfg.open_for - elapsed,
                        },
                        None,
                    );
                }
                let window = b.window(now);
                let t = b.switch(AdaptiveState::HalfOpen, Reason::OpenElapsed, now, window, ip);
                (self.probe(b, now), Some(t))
            }
            AdaptiveState::HalfOpen => (self.probe(b, now), None),
        }
    }

    fn probe(&self, b: &mut Breaker, now: Nanos) -> Admission {
        // Probes whose outcome never came back (the request was refused
        // further on, or the client left) must not wedge the breaker: after
        // `open_for` without a verdict, the probes are sent again.
        if b.elapsed(now) > self.cfg.open_for {
            b.since = (now / NANOS_PER_MS) & MS_MASK;
            b.probes_sent = 0;
        }
        if b.probes_sent < self.cfg.probes {
            b.probes_sent += 1;
            Admission::Pass
        } else {
            Admission::Refused { retry_after: 0 }
        }
    }

    fn tighter_limit(&self, b: &mut Breaker, quota: &Quota, now: Nanos) -> Admission {
        let tight = tighten(quota, self.cfg.degraded_rate_factor);
        let tau = tight.tolerance_within(MAX_TOLERANCE);
        // `tat` and `now` both measured from the start of the current second.
        match gcra(b.tat, now % NANOS_PER_SEC, tight.emission_interval(), tau) {
            Ok(tat) => {
                b.tat = tat;
                Admission::Pass
            }
            Err(limited) => Admission::Limited {
                retry_after: limited.retry_after,
                quota: tight,
            },
        }
    }

    fn calm_check(
        &self,
        b: &mut Breaker,
        window: (u32, f64),
        now: Nanos,
        ip: IpAddr,
    ) -> Option<AdaptiveTransition> {
        if window.1 >= self.cfg.recover_below {
            b.calm = false;
        } else if !b.calm {
            b.calm = true;
            b.since = (now / NANOS_PER_MS) & MS_MASK;
        } else if b.elapsed(now) >= self.cfg.recover_after {
            return Some(b.switch(AdaptiveState::HalfOpen, Reason::Calm, now, window, ip));
        }
        None
    }

    /// After the response: records the outcome and applies what it changes.
    pub fn record(
        &self,
        key: &ClientKey,
        ip: IpAddr,
        signal: Signal,
        now: Nanos,
    ) -> Option<AdaptiveTransition> {
        let t = self.with(key, now, None, |b| self.record_breaker(b, ip, signal, now));
        self.counted(key, t)
    }

    fn record_breaker(
        &self,
        b: &mut Breaker,
        ip: IpAddr,
        signal: Signal,
        now: Nanos,
    ) -> Option<AdaptiveTransition> {
        let cfg = &self.cfg;
        b.count(signal);
        let window = b.window(now);
        if b.state == AdaptiveState::HalfOpen {
            // Probes decide alone; their outcomes still enter the window.
            if signal != Signal::Success {
                return Some(b.switch(AdaptiveState::Open, Reason::ProbeFailed, now, window, ip));
            }
            b.probes_ok += 1;
            if b.probes_ok >= cfg.probes {
                return Some(b.switch(AdaptiveState::Closed, Reason::ProbesSucceeded, now, window, ip));
            }
            return None;
        }
        let (requests, rate) = window;
        let enough = requests >= cfg.min_requests.min(COUNT_MAX);
        match b.state {
            AdaptiveState::Closed if enough && rate > cfg.degrade_above => {
                Some(b.switch(AdaptiveState::Degraded, Reason::FailureRate, now, window, ip))
            }
            AdaptiveState::Degraded if enough && rate > cfg.open_above => {
                Some(b.switch(AdaptiveState::Open, Reason::FailureRate, now, window, ip))
            }
            AdaptiveState::Degraded => self.calm_check(b, window, now, ip),
            _ => None,
        }
    }

    /// A client's state, requests and weighted failure rate.
    pub fn inspect(&self, key: &ClientKey, now: Nanos) -> Option<(AdaptiveState, u32, f64)> {
        let closed = self.table.get(key);
        let b = match closed {
            Some(c) if !c.flag() && c.word(1) != 0 => Breaker::load_closed(&c, now),
            _ => match self.full.get(key) {
                Some(w) => Breaker::load(&w, now),
                None => Breaker::load_closed(&closed?, now),
            },
        };
        let (requests, rate) = b.window(now);
        Some((b.state, requests, rate))
    }

    /// Up to `limit` clients not in the closed state: (ip, state, requests, rate).
    pub fn troubled(&self, limit: usize, now: Nanos) -> Vec<(IpAddr, AdaptiveState, u32, f64)> {
        let mut out = Vec::new();
        self.troubled.each(|key, ip| {
            if let Some((state, requests, rate)) = self.inspect(&key, now)
                && state != AdaptiveState::Closed
            {
                out.push((ip, state, requests, rate));
            }
            out.len() < limit
        });
        out
    }
}

/// The degraded quota: every figure scaled by `factor`, at least 1.
pub fn tighten(quota: &Quota, factor: f64) -> Quota {
    let scale = |n: std::num::NonZeroU32| {
        let v = (f64::from(n.get()) * factor).floor() as u32;
        std::num::NonZeroU32::new(v).unwrap_or(std::num::NonZeroU32::MIN)
    };
    Quota {
        rate: scale(quota.rate),
        per: quota.per,
        burst: scale(quota.burst),
        window_limit: scale(quota.window_limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = NANOS_PER_MS;
    const SEC: Nanos = NANOS_PER_SEC;
    const K: ClientKey = ClientKey::Fingerprint(42);

    fn ip() -> IpAddr {
        "198.51.100.9".parse().unwrap()
    }

    fn breaker() -> AdaptiveBreaker {
        AdaptiveBreaker::new(AdaptiveConfig::default(), 100)
    }

    fn quota() -> Quota {
        Quota::per_second(std::num::NonZeroU32::new(100).unwrap())
    }

    /// `n` outcomes 10 ms apart from `start`, the last `failing` of them `signal`.
    fn feed(
        b: &AdaptiveBreaker,
        start: Nanos,
        n: u32,
        failing: u32,
        signal: Signal,
    ) -> Vec<AdaptiveTransition> {
        (0..n)
            .filter_map(|i| {
                let s = if i >= n - failing { signal } else { Signal::Success };
                b.record(&K, ip(), s, start + Nanos::from(i) * 10 * MS)
            })
            .collect()
    }

    /// `n` outcomes of `key` 10 ms apart from `start`, the last `failing` failures.
    fn feed_key(
        b: &AdaptiveBreaker,
        key: ClientKey,
        start: Nanos,
        n: u32,
        failing: u32,
    ) -> Vec<AdaptiveTransition> {
        (0..n)
            .filter_map(|i| {
                let s = if i >= n - failing {
                    Signal::ServerError
                } else {
                    Signal::Success
                };
                b.record(&key, ip(), s, start + Nanos::from(i) * 10 * MS)
            })
            .collect()
    }

    fn state(b: &AdaptiveBreaker, now: Nanos) -> AdaptiveState {
        b.inspect(&K, now).map_or(AdaptiveState::Closed, |s| s.0)
    }

    #[test]
    fn weights_are_the_specs() {
        let b = breaker();
        for s in [
            Signal::ServerError,
            Signal::SlowFirstByte,
            Signal::TlsHandshakeTimeout,
            Signal::HeaderParseFailure,
        ] {
            b.record(&K, ip(), s, 0);
        }
        // 1.0 + 1.0 + 1.5 + 2.0 over 4 requests.
        let (_, requests, rate) = b.inspect(&K, 0).unwrap();
        assert_eq!(requests, 4);
        assert!((rate - 5.5 / 4.0).abs() < 1e-9, "{rate}");
    }

    #[test]
    fn closed_to_degraded_just_above_035_with_enough_volume() {
        let b = breaker();
        // 7 failures of 20 = 0.35: not above.
        assert!(feed(&b, 0, 20, 7, Signal::ServerError).is_empty());
        assert_eq!(state(&b, SEC), AdaptiveState::Closed);
        // One more failure: 8/21 = 0.38.
        let t = b.record(&K, ip(), Signal::ServerError, SEC).unwrap();
        assert_eq!(
            (t.from, t.to, t.reason),
            (
                AdaptiveState::Closed,
                AdaptiveState::Degraded,
                Reason::FailureRate
            )
        );
        assert_eq!(t.requests, 21);
        assert!((t.rate - 8.0 / 21.0).abs() < 1e-9);
        assert_eq!(t.ip, ip());
    }

    #[test]
    fn few_requests_never_trip() {
        let b = breaker();
        let ts = feed(&b, 0, 9, 9, Signal::HeaderParseFailure);
        assert!(ts.is_empty(), "{ts:?}");
    }

    #[test]
    fn degraded_halves_the_rate_limit() {
        let b = breaker();
        feed(&b, 0, 10, 4, Signal::ServerError);
        assert_eq!(state(&b, SEC), AdaptiveState::Degraded);
        let now = 2 * SEC;
        let passed = (0..100)
            .filter(|_| b.admit(&K, ip(), &quota(), now).0 == Admission::Pass)
            .count();
        assert_eq!(passed, 50);
        match b.admit(&K, ip(), &quota(), now).0 {
            Admission::Limited { retry_after, quota } => {
                assert_eq!(quota.rate.get(), 50);
                assert_eq!(retry_after, 20 * MS);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn degraded_to_open_above_half_and_open_refuses_then_half_opens() {
        let b = breaker();
        let ts = feed(&b, 0, 20, 20, Signal::ServerError);
        // Degraded at the 10th request (rate 1.0), then open on the next.
        assert_eq!(
            ts.iter().map(|t| t.to).collect::<Vec<_>>(),
            [AdaptiveState::Degraded, AdaptiveState::Open]
        );
        let opened = 10 * 10 * MS;
        assert_eq!(
            b.admit(&K, ip(), &quota(), opened + SEC).0,
            Admission::Refused {
                retry_after: 29 * SEC
            }
        );
        let (a, t) = b.admit(&K, ip(), &quota(), opened + 30 * SEC);
        assert_eq!(a, Admission::Pass);
        assert_eq!(
            t.map(|t| (t.to, t.reason)),
            Some((AdaptiveState::HalfOpen, Reason::OpenElapsed))
        );
        assert_eq!(b.state_counts()[2], (AdaptiveState::HalfOpen, 1));
        assert_eq!(b.state_counts()[1], (AdaptiveState::Open, 0));
    }

    #[test]
    fn half_open_closes_after_three_good_probes_and_reopens_on_a_bad_one() {
        let b = breaker();
        feed(&b, 0, 20, 20, Signal::ServerError);
        let now = 40 * SEC;
        for _ in 0..3 {
            assert_eq!(b.admit(&K, ip(), &quota(), now).0, Admission::Pass);
        }
        // Probes are out: the fourth waits.
        assert_eq!(
            b.admit(&K, ip(), &quota(), now).0,
            Admission::Refused { retry_after: 0 }
        );
        assert!(b.record(&K, ip(), Signal::Success, now).is_none());
        assert!(b.record(&K, ip(), Signal::Success, now).is_none());
        let t = b.record(&K, ip(), Signal::Success, now).unwrap();
        assert_eq!((t.to, t.reason), (AdaptiveState::Closed, Reason::ProbesSucceeded));
        assert_eq!(b.admit(&K, ip(), &quota(), now).0, Admission::Pass);
        assert_eq!(b.state_counts().iter().map(|c| c.1).sum::<u64>(), 0);

        // Trip again; this time a probe fails.
        feed(&b, now, 20, 20, Signal::ServerError);
        let later = now + 40 * SEC;
        assert_eq!(b.admit(&K, ip(), &quota(), later).0, Admission::Pass);
        let t = b.record(&K, ip(), Signal::SlowFirstByte, later).unwrap();
        assert_eq!((t.to, t.reason), (AdaptiveState::Open, Reason::ProbeFailed));
    }

    #[test]
    fn lost_probes_are_sent_again_after_open_for() {
        let b = breaker();
        feed(&b, 0, 20, 20, Signal::ServerError);
        let now = 40 * SEC;
        for _ in 0..3 {
            assert_eq!(b.admit(&K, ip(), &quota(), now).0, Admission::Pass);
        }
        // No outcome ever arrives.
        assert_eq!(
            b.admit(&K, ip(), &quota(), now + 10 * SEC).0,
            Admission::Refused { retry_after: 0 }
        );
        assert_eq!(b.admit(&K, ip(), &quota(), now + 31 * SEC).0, Admission::Pass);
    }

    #[test]
    fn reload_keeps_state_and_applies_new_thresholds() {
        let b = breaker();
        feed(&b, 0, 20, 6, Signal::ServerError); // 0.30: closed under 0.35
        assert_eq!(state(&b, SEC), AdaptiveState::Closed);
        let cfg = AdaptiveConfig {
            degrade_above: 0.25,
            ..Default::default()
        };
        let b2 = AdaptiveBreaker::carrying_over(cfg, &b);
        let t = b2.record(&K, ip(), Signal::Success, SEC).unwrap();
        assert_eq!(t.to, AdaptiveState::Degraded);
    }

    #[test]
    fn degraded_recovers_to_half_open_after_ten_calm_seconds() {
        let b = breaker();
        feed(&b, 0, 10, 4, Signal::ServerError);
        assert_eq!(state(&b, 0), AdaptiveState::Degraded);
        // The failures fade out of the window; successes keep coming.
        let mut now = 0;
        let mut transition = None;
        while now < 40 * SEC && transition.is_none() {
            now += 500 * MS;
            transition = b.record(&K, ip(), Signal::Success, now);
        }
        let t = transition.unwrap();
        assert_eq!((t.to, t.reason), (AdaptiveState::HalfOpen, Reason::Calm));
        // The first period holds 4 failures in 29 requests; 10 s + x in,
        // it weighs w = (10 − x) / 10 beside 2x + 1 successes, and the rate
        // 4w / (29w + 2x + 1) is below 0.1 once x > 3.23: calm from
        // 13.5 s, recovered 10 s later.
        assert_eq!(now, 23_500 * MS);
    }

    #[test]
    fn calm_is_interrupted_by_a_bad_patch() {
        // Two clients degraded alike; one has a bad patch while calm.
        let (steady, patchy) = (ClientKey::Fingerprint(1), ClientKey::Fingerprint(2));
        let b = breaker();
        for k in [steady, patchy] {
            for i in 0..10 {
                let s = if i < 6 {
                    Signal::Success
                } else {
                    Signal::ServerError
                };
                b.record(&k, ip(), s, i * 10 * MS);
            }
        }
        let mut recovered = [None, None];
        let mut now = 0;
        while now < 60 * SEC {
            now += 100 * MS;
            for (n, k) in [steady, patchy].into_iter().enumerate() {
                let s = if n == 1 && (8 * SEC..9 * SEC).contains(&now) {
                    Signal::ServerError
                } else {
                    Signal::Success
                };
                if let Some(t) = b.record(&k, ip(), s, now)
                    && t.reason == Reason::Calm
                {
                    recovered[n].get_or_insert(now);
                }
            }
        }
        let (steady_at, patchy_at) = (recovered[0].unwrap(), recovered[1].unwrap());
        // 4 failures in 10 + 10 t requests: calm from 3 s, recovered 10 s
        // later; 10 failures from 8 s lift the rate above 0.1 again, which
        // restarts the patchy client's clock.
        assert!((12 * SEC..15 * SEC).contains(&steady_at), "{steady_at}");
        assert!(patchy_at >= 18 * SEC, "{patchy_at}");
    }

    #[test]
    fn idle_only_when_closed_and_quiet() {
        let mut w = Words::fresh(1);
        assert!(Breaker::idle(&w, 0));
        let mut b = Breaker::load(&w, 0);
        b.count(Signal::ServerError);
        b.store(&mut w, 0);
        assert!(!Breaker::idle(&w, SEC));
        // In the previous period until 20 s, weighing less and less.
        assert!(!Breaker::idle(&w, 19 * SEC));
        assert!(Breaker::idle(&w, 20 * SEC));
        // Degraded or open: never idle, however quiet.
        b.state = AdaptiveState::Degraded;
        b.store(&mut w, 0);
        assert!(!Breaker::idle(&w, 3600 * SEC));
    }

    #[test]
    fn the_record_round_trips() {
        let b = Breaker {
            state: AdaptiveState::HalfOpen,
            tat: 999_999_999,
            probes_sent: 1000,
            probes_ok: 999,
            since: MS_MASK,
            calm: true,
            cur: (COUNT_MAX, 1),
            prev: (7, COUNT_MAX),
        };
        let mut w = Words::fresh(u32::MAX);
        b.store(&mut w, 3 * SEC + 5);
        assert_eq!(Breaker::load(&w, 3 * SEC + 6), b);
        assert_eq!(w.tag(), u32::MAX);
        // A second later the bucket has drained by a second.
        assert_eq!(Breaker::load(&w, 4 * SEC).tat, 0);
    }

    #[test]
    fn saturated_periods_keep_a_consistent_sample() {
        let mut b = Breaker::default();
        for i in 0..200_000 {
            b.count(if i % 2 == 0 {
                Signal::ServerError
            } else {
                Signal::Success
            });
        }
        let (requests, rate) = b.window(0);
        assert!(requests >= COUNT_MAX - 1, "{requests}");
        assert!((rate - 0.5).abs() < 0.01, "{rate}");
    }

    /// A client without a record of its own (the table is full of active
    /// clients) shares an overflow record: it is neither judged nor lets
    /// its failures refuse the strangers it shares with.
    #[test]
    fn overflow_sharers_are_not_judged() {
        let b = AdaptiveBreaker::new(AdaptiveConfig::default(), 16);
        // Sixteen failing clients fill the table and stay degraded.
        let mut k = 0u64;
        while b.table().len() < b.table().capacity() {
            feed_key(&b, ClientKey::Fingerprint(k), 0, 10, 10);
            k += 1;
        }
        let before = b.table().overflowed();
        let crowd: Vec<_> = (1_000..1_100).map(ClientKey::Fingerprint).collect();
        for key in &crowd {
            assert!(feed_key(&b, *key, 0, 50, 50).is_empty());
            assert_eq!(b.admit(key, ip(), &quota(), SEC).0, Admission::Pass);
        }
        assert!(b.table().overflowed() > before);
        // The degraded clients kept their records: still degraded.
        assert_eq!(
            b.inspect(&ClientKey::Fingerprint(0), SEC).unwrap().0,
            AdaptiveState::Degraded
        );
    }

    /// Closed clients live in the small table alone; a client that leaves
    /// the closed state moves to a full record, and back once closed with
    /// its degraded bucket full.
    #[test]
    fn only_clients_out_of_the_closed_state_take_a_full_record() {
        let b = breaker();
        for k in 100..150 {
            feed_key(&b, ClientKey::Fingerprint(k), 0, 20, 5);
        }
        assert_eq!((b.table().len(), b.full_table().len()), (50, 0));
        feed(&b, 0, 20, 20, Signal::ServerError);
        assert_eq!(b.full_table().len(), 1);
        assert_eq!(state(&b, SEC), AdaptiveState::Open);
        // A closed client's window still reads through the small record.
        let (state1, requests, rate) = b.inspect(&ClientKey::Fingerprint(101), SEC).unwrap();
        assert_eq!((state1, requests), (AdaptiveState::Closed, 20));
        assert!((rate - 0.25).abs() < 1e-9, "{rate}");
        let now = 40 * SEC;
        for _ in 0..3 {
            b.admit(&K, ip(), &quota(), now);
            b.record(&K, ip(), Signal::Success, now);
        }
        assert_eq!(state(&b, now), AdaptiveState::Closed);
        // Back in the small record: its full one is fresh, free to go.
        let full = b.full_table().get(&K).unwrap();
        assert!(Breaker::idle(&full, now));
        b.record(&K, ip(), Signal::Success, now);
        assert_eq!(b.inspect(&K, now).unwrap().1, 1);
    }

    /// A key flood takes the small record of a client whose breaker moved
    /// (it holds nothing then), and leaves later clients only overflow
    /// records: the client is still found, and refused, in its full one.
    #[test]
    fn a_key_flood_does_not_free_an_open_client() {
        let b = AdaptiveBreaker::new(AdaptiveConfig::default(), 16);
        feed(&b, 0, 20, 20, Signal::ServerError);
        assert_eq!(state(&b, SEC), AdaptiveState::Open);
        let before = b.table().taken_over();
        for k in 1_000..11_000 {
            b.record(&ClientKey::Fingerprint(k), ip(), Signal::Success, SEC);
        }
        assert!(b.table().taken_over() > before);
        assert!(b.table().overflowed() > 9_000, "{}", b.table().overflowed());
        assert!(b.table().get(&K).is_none(), "its small record was kept");
        assert!(matches!(
            b.admit(&K, ip(), &quota(), 2 * SEC).0,
            Admission::Refused { .. }
        ));
        assert_eq!(state(&b, 2 * SEC), AdaptiveState::Open);
    }

    #[test]
    fn troubled_clients_are_listed_with_their_address() {
        let b = breaker();
        feed(&b, 0, 20, 20, Signal::ServerError);
        let listed = b.troubled(10, SEC);
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].0, listed[0].1), (ip(), AdaptiveState::Open));
        // Closed again: no longer listed.
        let now = 40 * SEC;
        for _ in 0..3 {
            b.admit(&K, ip(), &quota(), now);
            b.record(&K, ip(), Signal::Success, now);
        }
        assert_eq!(state(&b, now), AdaptiveState::Closed);
        assert!(b.troubled(10, now).is_empty());
    }
}
