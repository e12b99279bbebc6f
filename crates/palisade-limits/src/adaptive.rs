//! The adaptive 4-state breaker, one per client fingerprint
//! (hash of client address key and User-Agent).
//!
//! Each client has a 10 s window of 100 ms buckets counting its requests and
//! their weighted failures (upstream 5xx ×1.0, slow first byte ×1.0, TLS
//! handshake timeout ×1.5, request-header parse failure ×2.0). With at least
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
//! Bucket counts are 8-bit: beyond 255 outcomes in one 100 ms bucket a
//! client's bucket stops counting, so the window holds a sample of its first
//! outcomes per 100 ms, which keeps the rate honest at any volume.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use palisade_core::{NANOS_PER_MS, NANOS_PER_SEC, Nanos};

use crate::rate::Quota;
use crate::table::{ClientTable, Slot, Zeroable};

/// Buckets in the window.
pub const BUCKETS: usize = 100;
/// Width of one bucket.
pub const BUCKET_NANOS: Nanos = 100 * NANOS_PER_MS;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdaptiveState {
    /// Normal.
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
    pub ip: Option<IpAddr>,
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

/// One client's adaptive breaker.
#[repr(C)]
pub struct AdaptiveSlot {
    state: AtomicU8,
    /// The client's address family: 0 none, 4, 6.
    family: AtomicU8,
    probes_sent: AtomicU16,
    probes_ok: AtomicU16,
    /// Bucket number (100 ms units, wrapping) of the last recorded outcome.
    last: AtomicU32,
    /// When the state last changed.
    changed_at: AtomicU64,
    /// While degraded: since when the rate has been below `recover_below`
    /// (0: it is not).
    calm_since: AtomicU64,
    /// GCRA time for the degraded (tighter) limit.
    tat: AtomicU64,
    ip_hi: AtomicU64,
    ip_lo: AtomicU64,
    /// `(failure_half_units << 8) | requests`, per 100 ms bucket.
    buckets: [AtomicU16; BUCKETS],
}

impl Default for AdaptiveSlot {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(0),
            family: AtomicU8::new(0),
            probes_sent: AtomicU16::new(0),
            probes_ok: AtomicU16::new(0),
            last: AtomicU32::new(0),
            changed_at: AtomicU64::new(0),
            calm_since: AtomicU64::new(0),
            tat: AtomicU64::new(0),
            ip_hi: AtomicU64::new(0),
            ip_lo: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU16::new(0)),
        }
    }
}

impl AdaptiveSlot {
    fn state(&self) -> AdaptiveState {
        AdaptiveState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn remember_ip(&self, ip: IpAddr) {
        let (family, bits) = match ip {
            IpAddr::V4(v4) => (4, u128::from(v4.to_bits())),
            IpAddr::V6(v6) => (6, v6.to_bits()),
        };
        if self.family.load(Ordering::Relaxed) == 0 {
            self.ip_hi.store((bits >> 64) as u64, Ordering::Relaxed);
            self.ip_lo.store(bits as u64, Ordering::Relaxed);
            self.family.store(family, Ordering::Release);
        }
    }

    fn ip(&self) -> Option<IpAddr> {
        let bits = (u128::from(self.ip_hi.load(Ordering::Relaxed)) << 64)
            | u128::from(self.ip_lo.load(Ordering::Relaxed));
        match self.family.load(Ordering::Acquire) {
            4 => Some(IpAddr::from(std::net::Ipv4Addr::from_bits(bits as u32))),
            6 => Some(IpAddr::from(std::net::Ipv6Addr::from_bits(bits))),
            _ => None,
        }
    }

    /// Adds one outcome to the current bucket, clearing buckets skipped
    /// since the last outcome.
    fn record(&self, signal: Signal, now: Nanos) {
        let cur = (now / BUCKET_NANOS) as u32;
        let last = self.last.swap(cur, Ordering::AcqRel);
        let skipped = cur.wrapping_sub(last);
        if skipped > 0 && skipped < u32::MAX / 2 {
            let from = last as usize % BUCKETS;
            for n in 1..=skipped.min(BUCKETS as u32) as usize {
                self.buckets[(from + n) % BUCKETS].store(0, Ordering::Release);
            }
        }
        let bucket = &self.buckets[cur as usize % BUCKETS];
        let add = (signal.half_units() << 8) | 1;
        let mut v = bucket.load(Ordering::Acquire);
        loop {
            let (fails, reqs) = (v >> 8, v & 0xff);
            // A full bucket stops counting: it keeps a consistent sample.
            if reqs == 0xff || fails + signal.half_units() > 0xff {
                return;
            }
            match bucket.compare_exchange_weak(v, v + add, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => v = seen,
            }
        }
    }

    /// (requests, weighted failure rate) over the window ending now.
    fn window(&self, now: Nanos) -> (u32, f64) {
        let cur = (now / BUCKET_NANOS) as u32;
        let last = self.last.load(Ordering::Acquire);
        let age = cur.wrapping_sub(last);
        if age >= BUCKETS as u32 && age < u32::MAX / 2 {
            return (0, 0.0);
        }
        // Buckets after `last` were not cleared yet: they are stale.
        let mut requests = 0u32;
        let mut half_units = 0u32;
        let here = cur as usize % BUCKETS;
        for back in age.min(BUCKETS as u32) as usize..BUCKETS {
            let v = self.buckets[(here + BUCKETS - back) % BUCKETS].load(Ordering::Acquire);
            requests += u32::from(v & 0xff);
            half_units += u32::from(v >> 8);
        }
        let rate = if requests == 0 {
            0.0
        } else {
            f64::from(half_units) / 2.0 / f64::from(requests)
        };
        (requests, rate)
    }

    fn clear_window(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Release);
        }
    }

    /// Moves `from` → `to` if no one else did first.
    fn switch(
        &self,
        from: AdaptiveState,
        to: AdaptiveState,
        reason: Reason,
        now: Nanos,
        window: (u32, f64),
    ) -> Option<AdaptiveTransition> {
        self.state
            .compare_exchange(from.as_u8(), to.as_u8(), Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.changed_at.store(now, Ordering::Release);
        self.calm_since.store(0, Ordering::Release);
        if to == AdaptiveState::HalfOpen {
            self.probes_sent.store(0, Ordering::Release);
            self.probes_ok.store(0, Ordering::Release);
        }
        if to == AdaptiveState::Closed {
            // Start over: the failures that degraded the client are history.
            self.clear_window();
        }
        Some(AdaptiveTransition {
            from,
            to,
            reason,
            rate: window.1,
            requests: window.0,
            ip: self.ip(),
        })
    }
}

// SAFETY: only atomic integers (and arrays of them), whose zero is their default.
unsafe impl Zeroable for AdaptiveSlot {}

impl Slot for AdaptiveSlot {
    fn is_idle(&self, now: Nanos) -> bool {
        self.state() == AdaptiveState::Closed
            && self.tat.load(Ordering::Acquire) <= now
            && self.window(now).0 == 0
    }

    fn reset(&self) {
        self.state.store(0, Ordering::Release);
        self.family.store(0, Ordering::Release);
        self.probes_sent.store(0, Ordering::Release);
        self.probes_ok.store(0, Ordering::Release);
        self.last.store(0, Ordering::Release);
        self.changed_at.store(0, Ordering::Release);
        self.calm_since.store(0, Ordering::Release);
        self.tat.store(0, Ordering::Release);
        self.clear_window();
    }
}

/// Counts of clients per state, kept as transitions happen.
#[derive(Debug, Default)]
struct StateCounts([AtomicU64; 4]);

/// The keyed adaptive breaker.
pub struct AdaptiveBreaker {
    cfg: AdaptiveConfig,
    table: std::sync::Arc<ClientTable<AdaptiveSlot>>,
    counts: std::sync::Arc<StateCountsHandle>,
}

/// Shared per-state client counts (kept across reloads with the table).
#[derive(Debug, Default)]
pub struct StateCountsHandle(StateCounts);

impl AdaptiveBreaker {
    /// A breaker tracking at most `max_clients` fingerprints.
    pub fn new(cfg: AdaptiveConfig, max_clients: usize) -> Self {
        Self {
            cfg,
            table: std::sync::Arc::new(ClientTable::new(max_clients)),
            counts: Default::default(),
        }
    }

    /// New rules over the state of `previous` (live reload).
    pub fn carrying_over(cfg: AdaptiveConfig, previous: &AdaptiveBreaker) -> Self {
        Self {
            cfg,
            table: previous.table.clone(),
            counts: previous.counts.clone(),
        }
    }

    /// The rules in force.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.cfg
    }

    /// The table (for gauges).
    pub fn table(&self) -> &ClientTable<AdaptiveSlot> {
        &self.table
    }

    /// Clients per state other than closed: (degraded, open, half-open).
    pub fn state_counts(&self) -> [(AdaptiveState, u64); 3] {
        let c = &self.counts.0.0;
        [
            (AdaptiveState::Degraded, c[1].load(Ordering::Relaxed)),
            (AdaptiveState::Open, c[2].load(Ordering::Relaxed)),
            (AdaptiveState::HalfOpen, c[3].load(Ordering::Relaxed)),
        ]
    }

    fn counted(&self, t: Option<AdaptiveTransition>) -> Option<AdaptiveTransition> {
        if let Some(t) = &t {
            let c = &self.counts.0.0;
            if t.from != AdaptiveState::Closed {
                c[t.from.as_u8() as usize].fetch_sub(1, Ordering::Relaxed);
            }
            if t.to != AdaptiveState::Closed {
                c[t.to.as_u8() as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        t
    }

    /// Before forwarding: may this client's request pass? `quota` is the
    /// client's normal limit (tightened when degraded).
    pub fn admit(
        &self,
        key: &palisade_core::ClientKey,
        quota: &Quota,
        now: Nanos,
    ) -> (Admission, Option<AdaptiveTransition>) {
        let (admission, t) = self.table.with(key, now, |s| self.admit_slot(s, quota, now));
        (admission, self.counted(t))
    }

    fn admit_slot(
        &self,
        s: &AdaptiveSlot,
        quota: &Quota,
        now: Nanos,
    ) -> (Admission, Option<AdaptiveTransition>) {
        let cfg = &self.cfg;
        match s.state() {
            AdaptiveState::Closed => (Admission::Pass, None),
            AdaptiveState::Degraded => {
                // Recovery is judged on admission too: a calm client may
                // have no failures left to report.
                let window = s.window(now);
                let t = self.calm_check(s, window, now);
                if t.is_some() {
                    return (self.probe(s, now), t);
                }
                (self.tighter_limit(s, quota, now), None)
            }
            AdaptiveState::Open => {
                let opened = s.changed_at.load(Ordering::Acquire);
                let reopen = opened.saturating_add(cfg.open_for);
                if now < reopen {
                    return (
                        Admission::Refused {
                            retry_after: reopen - now,
                        },
                        None,
                    );
                }
                let t = s.switch(
                    AdaptiveState::Open,
                    AdaptiveState::HalfOpen,
                    Reason::OpenElapsed,
                    now,
                    s.window(now),
                );
                (self.probe(s, now), t)
            }
            AdaptiveState::HalfOpen => (self.probe(s, now), None),
        }
    }

    fn probe(&self, s: &AdaptiveSlot, now: Nanos) -> Admission {
        // Probes whose outcome never came back (the request was refused
        // further on, or the client left) must not wedge the breaker: after
        // `open_for` without a verdict, the probes are sent again.
        let since = s.changed_at.load(Ordering::Acquire);
        if now.saturating_sub(since) > self.cfg.open_for {
            s.changed_at.store(now, Ordering::Release);
            s.probes_sent.store(0, Ordering::Release);
        }
        if u32::from(s.probes_sent.fetch_add(1, Ordering::AcqRel)) < self.cfg.probes {
            Admission::Pass
        } else {
            s.probes_sent.fetch_sub(1, Ordering::AcqRel);
            Admission::Refused { retry_after: 0 }
        }
    }

    fn tighter_limit(&self, s: &AdaptiveSlot, quota: &Quota, now: Nanos) -> Admission {
        let tight = tighten(quota, self.cfg.degraded_rate_factor);
        let t = (NANOS_PER_SEC / u64::from(tight.rate.get())).max(1);
        let tau = t * u64::from(tight.burst.get() - 1);
        let mut tat = s.tat.load(Ordering::Acquire);
        loop {
            let base = tat.max(now);
            if base - now > tau {
                return Admission::Limited {
                    retry_after: base - tau - now,
                    quota: tight,
                };
            }
            match s
                .tat
                .compare_exchange_weak(tat, base + t, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Admission::Pass,
                Err(seen) => tat = seen,
            }
        }
    }

    fn calm_check(&self, s: &AdaptiveSlot, window: (u32, f64), now: Nanos) -> Option<AdaptiveTransition> {
        if window.1 < self.cfg.recover_below {
            let since = s.calm_since.load(Ordering::Acquire);
            if since == 0 {
                // `now` may be 0 on a manual clock; 1 ns later is as good.
                s.calm_since.store(now.max(1), Ordering::Release);
            } else if now.saturating_sub(since) >= self.cfg.recover_after {
                return s.switch(
                    AdaptiveState::Degraded,
                    AdaptiveState::HalfOpen,
                    Reason::Calm,
                    now,
                    window,
                );
            }
        } else {
            s.calm_since.store(0, Ordering::Release);
        }
        None
    }

    /// After the response: records the outcome and applies what it changes.
    pub fn record(
        &self,
        key: &palisade_core::ClientKey,
        ip: IpAddr,
        signal: Signal,
        now: Nanos,
    ) -> Option<AdaptiveTransition> {
        let t = self.table.with(key, now, |s| {
            s.remember_ip(ip);
            self.record_slot(s, signal, now)
        });
        self.counted(t)
    }

    fn record_slot(&self, s: &AdaptiveSlot, signal: Signal, now: Nanos) -> Option<AdaptiveTransition> {
        let cfg = &self.cfg;
        let state = s.state();
        if state == AdaptiveState::HalfOpen {
            // Probes decide alone; their outcomes still enter the window.
            s.record(signal, now);
            let window = s.window(now);
            if signal != Signal::Success {
                return s.switch(state, AdaptiveState::Open, Reason::ProbeFailed, now, window);
            }
            let ok = u32::from(s.probes_ok.fetch_add(1, Ordering::AcqRel)) + 1;
            if ok >= cfg.probes {
                return s.switch(state, AdaptiveState::Closed, Reason::ProbesSucceeded, now, window);
            }
            return None;
        }
        s.record(signal, now);
        let window = s.window(now);
        let (requests, rate) = window;
        let enough = requests >= cfg.min_requests;
        match state {
            AdaptiveState::Closed if enough && rate > cfg.degrade_above => {
                s.switch(state, AdaptiveState::Degraded, Reason::FailureRate, now, window)
            }
            AdaptiveState::Degraded if enough && rate > cfg.open_above => {
                s.switch(state, AdaptiveState::Open, Reason::FailureRate, now, window)
            }
            AdaptiveState::Degraded => self.calm_check(s, window, now),
            _ => None,
        }
    }

    /// A client's state, requests and weighted failure rate.
    pub fn inspect(&self, key: &palisade_core::ClientKey, now: Nanos) -> Option<(AdaptiveState, u32, f64)> {
        self.table.get(key, |s| {
            let (requests, rate) = s.window(now);
            (s.state(), requests, rate)
        })
    }

    /// Up to `limit` clients not in the closed state: (ip, state, requests, rate).
    pub fn troubled(&self, limit: usize, now: Nanos) -> Vec<(Option<IpAddr>, AdaptiveState, u32, f64)> {
        let mut out = Vec::new();
        self.table.for_each(|s| {
            let state = s.state();
            if out.len() < limit && state != AdaptiveState::Closed {
                let (requests, rate) = s.window(now);
                out.push((s.ip(), state, requests, rate));
            }
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
        burst: scale(quota.burst),
        window_limit: scale(quota.window_limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_core::ClientKey;

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
        assert_eq!(t.ip, Some(ip()));
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
            .filter(|_| b.admit(&K, &quota(), now).0 == Admission::Pass)
            .count();
        assert_eq!(passed, 50);
        match b.admit(&K, &quota(), now).0 {
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
            b.admit(&K, &quota(), opened + SEC).0,
            Admission::Refused {
                retry_after: 29 * SEC
            }
        );
        let (a, t) = b.admit(&K, &quota(), opened + 30 * SEC);
        assert_eq!(a, Admission::Pass);
        assert_eq!(
            t.map(|t| (t.to, t.reason)),
            Some((AdaptiveState::HalfOpen, Reason::OpenElapsed))
        );
        assert_eq!(b.state_counts()[2], (AdaptiveState::HalfOpen, 1));
        assert_eq!(b.state_counts()[1], (AdaptiveState::Open, 0));
    }

    #[test]
    fn degraded_recovers_to_half_open_after_ten_calm_seconds() {
        let b = breaker();
        feed(&b, 0, 10, 4, Signal::ServerError);
        assert_eq!(state(&b, 0), AdaptiveState::Degraded);
        // The failures leave the 10 s window; successes keep coming.
        let mut now = 0;
        let mut transition = None;
        while now < 30 * SEC && transition.is_none() {
            now += 500 * MS;
            transition = b.record(&K, ip(), Signal::Success, now);
        }
        let t = transition.unwrap();
        assert_eq!((t.to, t.reason), (AdaptiveState::HalfOpen, Reason::Calm));
        // The rate stays above 0.1 (4 failures / < 30 requests) until the
        // failures leave the window at 10 s; calm from then, recovered 10 s later.
        assert_eq!(now, 20 * SEC);
    }

    #[test]
    fn calm_is_interrupted_by_a_bad_patch() {
        let b = breaker();
        feed(&b, 0, 10, 4, Signal::ServerError);
        // Calm from 11 s (window empty of failures) ...
        for i in 0..10 {
            assert!(
                b.record(&K, ip(), Signal::Success, 11 * SEC + i * 100 * MS)
                    .is_none()
            );
        }
        // ... a bad patch at 15 s resets the clock (3/13 = 0.23, not open) ...
        for _ in 0..3 {
            assert!(b.record(&K, ip(), Signal::ServerError, 15 * SEC).is_none());
        }
        // ... so at 22 s (11 s after the calm started) it is still degraded.
        assert!(b.record(&K, ip(), Signal::Success, 22 * SEC).is_none());
        assert_eq!(state(&b, 22 * SEC), AdaptiveState::Degraded);
    }

    #[test]
    fn half_open_closes_after_three_good_probes_and_reopens_on_a_bad_one() {
        let b = breaker();
        feed(&b, 0, 20, 20, Signal::ServerError);
        let now = 40 * SEC;
        for _ in 0..3 {
            assert_eq!(b.admit(&K, &quota(), now).0, Admission::Pass);
        }
        // Probes are out: the fourth waits.
        assert_eq!(
            b.admit(&K, &quota(), now).0,
            Admission::Refused { retry_after: 0 }
        );
        assert!(b.record(&K, ip(), Signal::Success, now).is_none());
        assert!(b.record(&K, ip(), Signal::Success, now).is_none());
        let t = b.record(&K, ip(), Signal::Success, now).unwrap();
        assert_eq!((t.to, t.reason), (AdaptiveState::Closed, Reason::ProbesSucceeded));
        assert_eq!(b.admit(&K, &quota(), now).0, Admission::Pass);
        assert_eq!(b.state_counts().iter().map(|c| c.1).sum::<u64>(), 0);

        // Trip again; this time a probe fails.
        feed(&b, now, 20, 20, Signal::ServerError);
        let later = now + 40 * SEC;
        assert_eq!(b.admit(&K, &quota(), later).0, Admission::Pass);
        let t = b.record(&K, ip(), Signal::SlowFirstByte, later).unwrap();
        assert_eq!((t.to, t.reason), (AdaptiveState::Open, Reason::ProbeFailed));
    }

    #[test]
    fn lost_probes_are_sent_again_after_open_for() {
        let b = breaker();
        feed(&b, 0, 20, 20, Signal::ServerError);
        let now = 40 * SEC;
        for _ in 0..3 {
            assert_eq!(b.admit(&K, &quota(), now).0, Admission::Pass);
        }
        // No outcome ever arrives.
        assert_eq!(
            b.admit(&K, &quota(), now + 10 * SEC).0,
            Admission::Refused { retry_after: 0 }
        );
        assert_eq!(b.admit(&K, &quota(), now + 31 * SEC).0, Admission::Pass);
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
    fn idle_only_when_closed_and_quiet() {
        let s = AdaptiveSlot::default();
        assert!(s.is_idle(0));
        s.record(Signal::ServerError, 0);
        assert!(!s.is_idle(SEC));
        assert!(s.is_idle(10 * SEC));
    }

    #[test]
    fn saturated_buckets_keep_a_consistent_sample() {
        let s = AdaptiveSlot::default();
        for i in 0..1000 {
            s.record(
                if i % 2 == 0 {
                    Signal::ServerError
                } else {
                    Signal::Success
                },
                0,
            );
        }
        let (requests, rate) = s.window(0);
        assert_eq!(requests, 255);
        assert!((rate - 0.5).abs() < 0.01, "{rate}");
    }
}
