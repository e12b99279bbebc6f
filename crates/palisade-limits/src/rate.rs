//! The per-client rate limiter.
//!
//! [`RateLimiter`] makes two checks, both must pass, on the client's 32-byte
//! [`record`](crate::record) taken under its lock:
//! - a token bucket (as GCRA: a "theoretical arrival time") that refills at
//!   `rate` per [`Period`] and holds up to `burst` requests;
//! - a 1 s window, approximated by two per-second counters, that caps the
//!   requests admitted in the last second at `window_limit`, whatever the
//!   bucket says (error against an exact window: `tests/window.rs`).
//!
//! [`RateState`] is the same pair of checks, lock-free with an exact window
//! of ten 100 ms slots, in 52 bytes: the connection guard keeps it per
//! address. Its window reserves first and gives its reservation back when
//! the bucket refuses, so concurrent callers can only make it stricter.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use palisade_core::{ClientKey, NANOS_PER_SEC, Nanos};

use crate::clients::Clients;
use crate::table::{Slot, Zeroable};

/// Width of one window slot.
pub const SLOT_NANOS: Nanos = 100 * palisade_core::NANOS_PER_MS;
/// Slots per window (10 × 100 ms = 1 s).
pub const SLOTS: usize = 10;

/// What a quota's `rate` counts requests per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Period {
    /// `"100/s"`, or a bare number.
    #[default]
    Second,
    /// `"5/m"`.
    Minute,
    /// `"1000/h"`.
    Hour,
}

impl Period {
    /// Its length in seconds.
    pub const fn secs(self) -> u64 {
        match self {
            Period::Second => 1,
            Period::Minute => 60,
            Period::Hour => 3600,
        }
    }

    /// Its length in nanoseconds.
    pub const fn nanos(self) -> Nanos {
        self.secs() * NANOS_PER_SEC
    }
}

/// A validated limit: it cannot be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Sustained requests per `per`.
    pub rate: NonZeroU32,
    /// The period `rate` counts over.
    pub per: Period,
    /// Requests admitted at once after a quiet period.
    pub burst: NonZeroU32,
    /// Most requests admitted in any 1 s window.
    pub window_limit: NonZeroU32,
}

impl Quota {
    /// `rate` per second with burst and window limit equal to the rate.
    pub fn per_second(rate: NonZeroU32) -> Self {
        Self::per(rate, Period::Second)
    }

    /// `rate` per `per`, with burst and window limit equal to the rate (for
    /// a period longer than a second, a window of the burst adds nothing to
    /// what the bucket admits).
    pub fn per(rate: NonZeroU32, per: Period) -> Self {
        Self {
            rate,
            per,
            burst: rate,
            window_limit: rate,
        }
    }

    /// Time between two requests at the sustained rate.
    pub fn emission_interval(&self) -> Nanos {
        (self.per.nanos() / u64::from(self.rate.get())).max(1)
    }

    pub(crate) fn tolerance(&self) -> Nanos {
        self.emission_interval() * u64::from(self.burst.get() - 1)
    }

    /// The tolerance, cut so that a bucket refills from empty within `max`
    /// (a `tat` can run `tolerance + emission_interval` ahead of now).
    pub(crate) fn tolerance_within(&self, max: Nanos) -> Nanos {
        self.tolerance().min(max.saturating_sub(self.emission_interval()))
    }
}

/// One GCRA step: with theoretical arrival time `tat`, emission interval
/// `t` and burst tolerance `tau`, a request at `now` is admitted while `tat`
/// is within `tau` of `now`; the result is the next `tat`, or how long until
/// one would be admitted. Any time origin works, as long as `tat` and `now`
/// share it.
#[inline]
pub(crate) fn gcra(tat: Nanos, now: Nanos, t: Nanos, tau: Nanos) -> Result<Nanos, RateLimited> {
    let base = tat.max(now);
    if base - now > tau {
        return Err(RateLimited {
            retry_after: base - tau - now,
        });
    }
    Ok(base + t)
}

/// A quota from plain numbers (tests).
#[cfg(test)]
pub(crate) fn quota(rate: u32, burst: u32, window: u32) -> Quota {
    Quota {
        rate: NonZeroU32::new(rate).unwrap(),
        per: Period::Second,
        burst: NonZeroU32::new(burst).unwrap(),
        window_limit: NonZeroU32::new(window).unwrap(),
    }
}

/// A rejection: when trying again can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// Time until a request would be admitted.
    pub retry_after: Nanos,
}

impl RateLimited {
    /// `retry_after` in whole seconds, rounded up, at least 1 (for `Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.div_ceil(NANOS_PER_SEC).max(1)
    }
}

/// What an admitted request leaves of its client's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// Requests that would be admitted right now, one after the other:
    /// the fewer of what the bucket holds and what the 1 s window has room for.
    pub remaining: u32,
    /// Time until the bucket is full again if no request comes.
    pub full_in: Nanos,
}

impl Headroom {
    /// `full_in` in whole seconds, rounded up.
    pub fn full_in_secs(&self) -> u64 {
        self.full_in.div_ceil(NANOS_PER_SEC)
    }
}

/// One client's limiter state: 52 bytes of atomics, one cache line with its
/// table tag.
#[derive(Default)]
#[repr(C)]
pub struct RateState {
    /// GCRA theoretical arrival time of the next request.
    tat: AtomicU64,
    /// Slot number (100 ms units, wrapping) of the last check. Every check
    /// clears slots that left the window, so while checks come less than a
    /// second apart every non-zero slot is under two seconds old and its
    /// 8-bit tag is unambiguous; after a longer pause all slots are stale.
    last: AtomicU32,
    /// `(slot_number & 0xff) << 24 | admitted`.
    slots: [AtomicU32; SLOTS],
}

const COUNT_BITS: u32 = 24;
const COUNT_MASK: u32 = (1 << COUNT_BITS) - 1;

#[inline]
fn tag_of(packed: u32) -> u32 {
    packed >> COUNT_BITS
}

#[inline]
fn count_of(packed: u32) -> u32 {
    packed & COUNT_MASK
}

/// Slots between `slot` (an 8-bit tag) and the current slot's tag.
#[inline]
fn age(tag: u32, cur_tag: u32) -> u32 {
    cur_tag.wrapping_sub(tag) & 0xff
}

impl RateState {
    /// Admits or rejects one request at `now`.
    #[inline]
    pub fn check(&self, quota: &Quota, now: Nanos) -> Result<(), RateLimited> {
        let cur = slot_number(now);
        let cur_tag = (cur & 0xff) as u32;
        let last = self.last.load(Ordering::Acquire);
        if last != cur as u32 {
            if (cur as u32).wrapping_sub(last) >= SLOTS as u32 {
                // Quiet for a second or more: everything but the current
                // slot (where a concurrent check may be reserving) is stale.
                self.clear_stale(|p| tag_of(p) != cur_tag);
            }
            self.last.store(cur as u32, Ordering::Release);
        }
        let slot = &self.slots[cur as usize % SLOTS];
        // Reserve a place in the current slot (restarting it if stale).
        let mut packed = slot.load(Ordering::Acquire);
        loop {
            let next = if packed != 0 && tag_of(packed) == cur_tag {
                if count_of(packed) == COUNT_MASK {
                    return Err(RateLimited {
                        retry_after: SLOT_NANOS - now % SLOT_NANOS,
                    });
                }
                packed + 1
            } else {
                (cur_tag << COUNT_BITS) | 1
            };
            match slot.compare_exchange_weak(packed, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => packed = seen,
            }
        }
        let in_window = self.window_count(cur_tag);
        if in_window > u64::from(quota.window_limit.get()) {
            self.release(cur_tag, cur);
            return Err(RateLimited {
                retry_after: self.window_retry_after(quota, cur, now),
            });
        }
        let (t, tau) = (quota.emission_interval(), quota.tolerance());
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = match gcra(tat, now, t, tau) {
                Ok(next) => next,
                Err(e) => {
                    self.release(cur_tag, cur);
                    return Err(e);
                }
            };
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Zeroes slots matching `stale`; a slot that changed meanwhile is left.
    fn clear_stale(&self, stale: impl Fn(u32) -> bool) {
        for s in &self.slots {
            let p = s.load(Ordering::Acquire);
            if p != 0 && stale(p) {
                let _ = s.compare_exchange(p, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Requests admitted (or reserved) in the window ending at `cur_tag`;
    /// clears slots that left it.
    #[inline]
    fn window_count(&self, cur_tag: u32) -> u64 {
        let mut sum = 0;
        for s in &self.slots {
            let p = s.load(Ordering::Acquire);
            if p == 0 {
                continue;
            }
            if age(tag_of(p), cur_tag) < SLOTS as u32 {
                sum += u64::from(count_of(p));
            } else {
                let _ = s.compare_exchange(p, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        sum
    }

    /// Gives back a reservation made in slot `cur`, if the slot still is `cur`.
    fn release(&self, cur_tag: u32, cur: u64) {
        let slot = &self.slots[cur as usize % SLOTS];
        let mut packed = slot.load(Ordering::Acquire);
        while tag_of(packed) == cur_tag && count_of(packed) > 0 {
            match slot.compare_exchange_weak(packed, packed - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => packed = seen,
            }
        }
    }

    /// When enough of the oldest slots will have left the window for one more
    /// request to fit.
    fn window_retry_after(&self, quota: &Quota, cur: u64, now: Nanos) -> Nanos {
        let limit = u64::from(quota.window_limit.get());
        let cur_tag = (cur & 0xff) as u32;
        let mut count = self.window_count(cur_tag);
        for n in cur.saturating_sub(SLOTS as u64 - 1)..=cur {
            let p = self.slots[n as usize % SLOTS].load(Ordering::Acquire);
            if p != 0 && tag_of(p) == (n & 0xff) as u32 {
                count -= u64::from(count_of(p)).min(count);
            }
            if count < limit {
                return ((n + SLOTS as u64) * SLOT_NANOS).saturating_sub(now);
            }
        }
        SLOTS as u64 * SLOT_NANOS
    }
}

// SAFETY: only atomic integers (and arrays of them), whose zero is their default.
unsafe impl Zeroable for RateState {}

impl Slot for RateState {
    fn is_idle(&self, now: Nanos) -> bool {
        let cur = slot_number(now);
        let cur_tag = (cur & 0xff) as u32;
        let quiet = (cur as u32).wrapping_sub(self.last.load(Ordering::Acquire)) >= SLOTS as u32;
        self.tat.load(Ordering::Acquire) <= now
            && (quiet
                || self.slots.iter().all(|s| {
                    let p = s.load(Ordering::Acquire);
                    p == 0 || age(tag_of(p), cur_tag) >= SLOTS as u32
                }))
    }

    fn reset(&self) {
        self.tat.store(0, Ordering::Release);
        self.last.store(0, Ordering::Release);
        for s in &self.slots {
            s.store(0, Ordering::Release);
        }
    }
}

fn slot_number(now: Nanos) -> u64 {
    now / SLOT_NANOS
}

/// A keyed limiter: one [`Quota`] applied to every client separately, over a
/// bounded [`Clients`] table.
pub struct RateLimiter {
    quota: Quota,
    table: Arc<Clients>,
}

impl RateLimiter {
    /// A limiter tracking at most `max_clients` clients.
    pub fn new(quota: Quota, max_clients: usize) -> Self {
        Self {
            quota,
            table: Arc::new(Clients::new(max_clients)),
        }
    }

    /// A limiter applying `quota` to an existing table (live reload: a new
    /// quota applies to the clients' current state).
    pub fn with_table(quota: Quota, table: Arc<Clients>) -> Self {
        Self { quota, table }
    }

    /// Admits or rejects one request from `key` at `now`.
    #[inline]
    pub fn check(&self, key: &ClientKey, now: Nanos) -> Result<(), RateLimited> {
        self.table.with(key, now, |w, _| w.check(&self.quota, now))
    }

    /// [`check`](Self::check), saying on admission what is left of the
    /// client's quota.
    #[inline]
    pub fn admit(&self, key: &ClientKey, now: Nanos) -> Result<Headroom, RateLimited> {
        self.table.with(key, now, |w, _| w.admit(&self.quota, now))
    }

    /// The quota applied to each client.
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// The client table (for gauges).
    pub fn table(&self) -> &Arc<Clients> {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_core::NANOS_PER_MS;
    use proptest::prelude::*;

    /// When the requests of `gaps` ((pause in thirds of a millisecond,
    /// requests), in turn) were admitted.
    pub(super) fn admissions(gaps: &[(u64, u32)], mut admit: impl FnMut(Nanos) -> bool) -> Vec<Nanos> {
        let mut now = 0;
        let mut log = Vec::new();
        for &(gap_ms, n) in gaps {
            now += gap_ms * NANOS_PER_MS / 3;
            log.extend((0..n).filter(|_| admit(now)).map(|_| now));
        }
        log
    }

    /// Over any interval [a, b] of `log`, admitted ≤ rate·(b−a) + burst.
    pub(super) fn within_bucket(log: &[Nanos], q: &Quota) -> Result<(), TestCaseError> {
        let t = q.emission_interval();
        for (i, &start) in log.iter().enumerate() {
            for (j, &at) in log[i..].iter().enumerate() {
                let bound = (at - start) / t + u64::from(q.burst.get());
                prop_assert!((j as u64 + 1) <= bound, "{} admitted in {} ns", j + 1, at - start);
            }
        }
        Ok(())
    }

    fn admitted(s: &RateState, q: &Quota, now: Nanos, n: u32) -> u32 {
        (0..n).filter(|_| s.check(q, now).is_ok()).count() as u32
    }

    #[test]
    fn burst_then_refill() {
        let q = quota(100, 100, 100);
        let s = RateState::default();
        assert_eq!(admitted(&s, &q, 0, 150), 100);
        // 10 ms later exactly one token is back, but the window is full.
        let err = s.check(&q, 10 * NANOS_PER_MS).unwrap_err();
        // The window frees up when slot 0 leaves it, at t = 1 s.
        assert_eq!(err.retry_after, NANOS_PER_SEC - 10 * NANOS_PER_MS);
        assert_eq!(err.retry_after_secs(), 1);
        assert_eq!(admitted(&s, &q, NANOS_PER_SEC, 150), 100);
    }

    #[test]
    fn window_caps_what_the_bucket_would_allow() {
        // Bucket alone would admit 100 now and 100 more over the next second.
        let q = quota(100, 100, 100);
        let s = RateState::default();
        let mut total = 0;
        for ms in (0..1000).step_by(10) {
            total += admitted(&s, &q, ms * NANOS_PER_MS, 200);
        }
        assert_eq!(total, 100);
    }

    #[test]
    fn bucket_smooths_after_burst() {
        // Window is generous; the bucket paces at 10/s after a burst of 5.
        let q = quota(10, 5, 1000);
        let s = RateState::default();
        assert_eq!(admitted(&s, &q, 0, 20), 5);
        let err = s.check(&q, 0).unwrap_err();
        assert_eq!(err.retry_after, 100 * NANOS_PER_MS);
        assert_eq!(admitted(&s, &q, 100 * NANOS_PER_MS, 20), 1);
        assert_eq!(admitted(&s, &q, 150 * NANOS_PER_MS, 20), 0);
        assert_eq!(admitted(&s, &q, 200 * NANOS_PER_MS, 20), 1);
    }

    #[test]
    fn rejections_do_not_consume() {
        let q = quota(10, 1, 1000);
        let s = RateState::default();
        assert!(s.check(&q, 0).is_ok());
        for _ in 0..1000 {
            assert!(s.check(&q, 50 * NANOS_PER_MS).is_err());
        }
        assert!(s.check(&q, 100 * NANOS_PER_MS).is_ok());
    }

    #[test]
    fn idle_only_when_fresh() {
        let q = quota(100, 100, 100);
        let s = RateState::default();
        assert!(s.is_idle(0));
        s.check(&q, 0).unwrap();
        assert!(!s.is_idle(5 * NANOS_PER_MS));
        // Bucket refilled at 10 ms, but the window still holds the request.
        assert!(!s.is_idle(500 * NANOS_PER_MS));
        assert!(s.is_idle(NANOS_PER_SEC));
        s.reset();
        assert!(s.is_idle(0));
    }

    #[test]
    fn concurrent_callers_never_exceed_window() {
        let q = quota(1000, 1000, 300);
        let s = std::sync::Arc::new(RateState::default());
        let ok: u32 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| admitted(&s, &q, 0, 500))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert!(ok <= 300, "admitted {ok}");
        assert!(ok >= 290, "window is too pessimistic: {ok}");
    }

    proptest! {
        /// Over any interval [a, b], admitted ≤ rate·(b−a) + burst, and in any
        /// 1 s window admitted ≤ window_limit.
        #[test]
        fn never_more_than_rate_times_time_plus_burst(
            rate in 1u32..500,
            burst in 1u32..200,
            window in 1u32..800,
            gaps in proptest::collection::vec((0u64..300, 1u32..30), 1..200),
        ) {
            let q = quota(rate, burst, window);
            let s = RateState::default();
            let log = admissions(&gaps, |now| s.check(&q, now).is_ok());
            within_bucket(&log, &q)?;
            for (i, &start) in log.iter().enumerate() {
                // Slots are 100 ms aligned, so any span shorter than 900 ms
                // lies inside one window of 10 slots.
                let count_1s = log[i..].iter().take_while(|&&at| at - start < 900 * NANOS_PER_MS).count();
                prop_assert!(count_1s as u64 <= u64::from(window));
            }
        }
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;
    use palisade_core::NANOS_PER_MS;
    use proptest::prelude::*;

    const K: ClientKey = ClientKey::V4(0x7f00_0001);

    fn admitted(l: &RateLimiter, now: Nanos, n: u32) -> u32 {
        (0..n).filter(|_| l.check(&K, now).is_ok()).count() as u32
    }

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(quota(100, 100, 100), 16);
        assert_eq!(admitted(&l, 0, 150), 100);
        // 10 ms later one token is back, but the window is full until
        // second 0 starts to leave it.
        let err = l.check(&K, 10 * NANOS_PER_MS).unwrap_err();
        assert_eq!(err.retry_after_secs(), 1);
        assert_eq!(admitted(&l, 10 * NANOS_PER_MS + err.retry_after, 1), 1);
        assert_eq!(admitted(&l, 3 * NANOS_PER_SEC, 150), 100);
    }

    #[test]
    fn window_caps_what_the_bucket_would_allow() {
        // Bucket alone would admit 100 now and 100 more over the next second.
        let l = RateLimiter::new(quota(100, 100, 100), 16);
        let mut total = 0;
        for ms in (0..1000).step_by(10) {
            total += admitted(&l, ms * NANOS_PER_MS, 200);
        }
        assert_eq!(total, 100);
    }

    #[test]
    fn bucket_smooths_after_burst() {
        // Window is generous; the bucket paces at 10/s after a burst of 5.
        let l = RateLimiter::new(quota(10, 5, 1000), 16);
        assert_eq!(admitted(&l, 0, 20), 5);
        let err = l.check(&K, 0).unwrap_err();
        assert_eq!(err.retry_after, 100 * NANOS_PER_MS);
        assert_eq!(admitted(&l, 100 * NANOS_PER_MS, 20), 1);
        assert_eq!(admitted(&l, 150 * NANOS_PER_MS, 20), 0);
        assert_eq!(admitted(&l, 200 * NANOS_PER_MS, 20), 1);
    }

    #[test]
    fn rejections_do_not_consume() {
        let l = RateLimiter::new(quota(10, 1, 1000), 16);
        assert!(l.check(&K, 0).is_ok());
        for _ in 0..1000 {
            assert!(l.check(&K, 50 * NANOS_PER_MS).is_err());
        }
        assert!(l.check(&K, 100 * NANOS_PER_MS).is_ok());
    }

    #[test]
    fn five_a_minute() {
        let q = Quota::per(NonZeroU32::new(5).unwrap(), Period::Minute);
        assert_eq!(q.emission_interval(), 12 * NANOS_PER_SEC);
        let l = RateLimiter::new(q, 16);
        assert_eq!(admitted(&l, 0, 5), 5);
        // The sixth is refused until one request's worth has dripped back:
        // the bucket's 12 s, not the 1 s window's next second.
        let err = l.check(&K, NANOS_PER_MS).unwrap_err();
        assert_eq!(err.retry_after, 12 * NANOS_PER_SEC - NANOS_PER_MS);
        assert_eq!(err.retry_after_secs(), 12);
        assert_eq!(admitted(&l, 6 * NANOS_PER_SEC, 5), 0);
        assert_eq!(admitted(&l, 12 * NANOS_PER_SEC - 1, 5), 0);
        assert_eq!(admitted(&l, 12 * NANOS_PER_SEC, 5), 1);
        // And then one every 12 s: 5 an hour's minute, not 5 a second.
        assert_eq!(admitted(&l, 23 * NANOS_PER_SEC, 5), 0);
        assert_eq!(admitted(&l, 24 * NANOS_PER_SEC, 5), 1);
        // Quiet for a minute: the whole burst is back.
        assert_eq!(admitted(&l, 84 * NANOS_PER_SEC, 10), 5);
    }

    #[test]
    fn an_hourly_bucket_fits_the_record() {
        // 1000/h with the burst the config allows (4 h to refill): the
        // record's `tat` runs 4 h ahead and must still count exactly.
        let q = Quota {
            burst: NonZeroU32::new(4000).unwrap(),
            window_limit: NonZeroU32::new(4000).unwrap(),
            ..Quota::per(NonZeroU32::new(1000).unwrap(), Period::Hour)
        };
        let l = RateLimiter::new(q, 16);
        assert_eq!(admitted(&l, 0, 5000), 4000);
        let err = l.check(&K, NANOS_PER_MS).unwrap_err();
        // One emission interval (3.6 s) after the burst.
        assert_eq!(err.retry_after, 3599 * NANOS_PER_MS);
        assert_eq!(admitted(&l, 3600 * NANOS_PER_MS - 1, 5), 0);
        assert_eq!(admitted(&l, 3600 * NANOS_PER_MS, 5), 1);
    }

    #[test]
    fn a_new_quota_applies_to_the_current_state() {
        let old = RateLimiter::new(quota(10, 10, 1000), 16);
        assert_eq!(admitted(&old, 0, 20), 10);
        // Reload to a bigger burst: the spent tokens stay spent.
        let new = RateLimiter::with_table(quota(10, 15, 1000), old.table().clone());
        assert_eq!(admitted(&new, 0, 20), 5);
    }

    #[test]
    fn limiter_keys_are_independent() {
        let l = RateLimiter::new(quota(2, 2, 2), 100);
        let (a, b) = (ClientKey::V4(1), ClientKey::V4(2));
        assert!(l.check(&a, 0).is_ok());
        assert!(l.check(&a, 0).is_ok());
        assert!(l.check(&a, 0).is_err());
        assert!(l.check(&b, 0).is_ok());
        assert_eq!(l.table().len(), 2);
    }

    #[test]
    fn concurrent_callers_never_exceed_window() {
        let l = RateLimiter::new(quota(1000, 1000, 300), 16);
        let ok: u32 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| admitted(&l, 0, 500))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        // The record is updated under its lock: exact.
        assert_eq!(ok, 300);
    }

    proptest! {
        /// Over any interval [a, b], admitted ≤ rate·(b−a) + burst; within
        /// one clock second admitted ≤ window_limit, and in any 1 s span at
        /// most twice that (the approximate window's worst case).
        #[test]
        fn never_more_than_rate_times_time_plus_burst(
            rate in 1u32..500,
            burst in 1u32..200,
            window in 1u32..800,
            gaps in proptest::collection::vec((0u64..300, 1u32..30), 1..200),
        ) {
            let q = quota(rate, burst, window);
            let l = RateLimiter::new(q, 16);
            let log = tests::admissions(&gaps, |now| l.check(&K, now).is_ok());
            tests::within_bucket(&log, &q)?;
            for (i, &start) in log.iter().enumerate() {
                let (mut span, mut second) = (0u64, 0u64);
                for &at in &log[i..] {
                    if at - start < NANOS_PER_SEC {
                        span += 1;
                    }
                    if at / NANOS_PER_SEC == start / NANOS_PER_SEC {
                        second += 1;
                    }
                }
                prop_assert!(span <= 2 * u64::from(window));
                // From the first admission of a second, `second` counts all of it.
                if i == 0 || log[i - 1] / NANOS_PER_SEC != start / NANOS_PER_SEC {
                    prop_assert!(second <= u64::from(window));
                }
            }
        }
    }
}
