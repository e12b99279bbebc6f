//! One client's state in 32 bytes: four 64-bit words, half a cache line.
//!
//! ```text
//! word 0  tag:32 | lock:1 | sec:28 | spare:3
//! word 1  tat:44 | win_prev:20
//! word 2  spare:1 | score:17 | streak:8 | flood:18 | win_cur:20
//! word 3  score_at:40 | settle:24
//! ```
//!
//! - `tag` identifies the client within its table (0: no client).
//! - `lock` is held while the other words are read or changed: a decision
//!   takes it with one compare-and-swap on word 0, works on plain copies of
//!   the words and releases it with one store, so the words never need to
//!   agree with each other through atomics.
//! - `sec` is the clock second (wrapping at 2²⁸ s, eight years) of the last
//!   request; it is the window's current second and the base of `tat`.
//! - `tat` is the GCRA theoretical arrival time in nanoseconds after the
//!   start of second `sec` (44 bits: 4.8 hours), 0 when it is not ahead of
//!   that second's start. Keeping it in time units, not tokens, is what lets
//!   a reloaded quota apply to the client's current state.
//! - `win_prev`, `win_cur`: requests admitted in the second before `sec` and
//!   in second `sec`. The 1 s window is approximated by weighting the
//!   previous second by the part of it still inside the window (see
//!   [`Words::check`]; error measured in `tests/window.rs`).
//!
//! - `flood`: requests seen in second `sec` (reputation's flood rule),
//!   saturating at 2¹⁸ − 1.
//! - `streak`: consecutive 400/401 responses.
//! - `score`: the reputation score in thousandths of a point, plus one (0:
//!   never scored, so at the initial score), stored at `score_at`
//!   (milliseconds of clock time); recovery is applied when it is read.
//! - `settle`: seconds after `score_at` until the score is back at the
//!   initial one (2²⁴ − 1: never, recovery disabled).
//!
//! The default limiter and reputation share one table and so each client's
//! record: the limiter uses the rate fields, reputation the others, and
//! one idleness rule serves both. A route's own limiter leaves the
//! reputation fields at zero.

use std::sync::atomic::{AtomicU64, Ordering};

use palisade_core::{NANOS_PER_SEC, Nanos};

use crate::rate::{Headroom, Quota, RateLimited, gcra};

const TAG_SHIFT: u32 = 32;
const LOCK: u64 = 1 << 31;
const SEC_SHIFT: u32 = 3;
const SEC_BITS: u32 = 28;
const SEC_MASK: u64 = (1 << SEC_BITS) - 1;

const TAT_SHIFT: u32 = 20;
const TAT_BITS: u32 = 44;
const TAT_MAX: u64 = (1 << TAT_BITS) - 1;

const FLOOD_SHIFT: u32 = 20;
/// Flood counts saturate here.
pub const FLOOD_MAX: u64 = (1 << 18) - 1;
const STREAK_SHIFT: u32 = 38;
const SCORE_SHIFT: u32 = 46;
const SCORE_MASK: u64 = (1 << 17) - 1;
const SETTLE_MASK: u64 = (1 << 24) - 1;
/// `settle` of a score that never recovers.
const NEVER: u64 = SETTLE_MASK;
const AT_SHIFT: u32 = 24;

const COUNT_BITS: u32 = 20;
/// Counts fit in 20 bits: a window limit above this acts as this limit.
/// Config validation keeps limits at or below 1 000 000.
pub const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;

/// The longest a bucket may take to refill from empty, its burst tolerance
/// plus one emission interval (a `tat` that far ahead of now, measured from
/// the start of the last request's second, must fit in 44 bits of
/// nanoseconds). Longer tolerances are cut to fit.
pub const MAX_TOLERANCE: Nanos = 4 * 3600 * NANOS_PER_SEC;

/// A client's record: `N` 64-bit words, word 0 holding the tag, the lock
/// and the second of the last request. The table of client state uses
/// [`Record`] (four words, 32 bytes, two per cache line); the adaptive
/// breaker's closed clients a two-word one (16 bytes, four per line).
/// Aligned to 16 bytes; a table's records start on a page, so a 32-byte
/// one never straddles two cache lines.
#[repr(C, align(16))]
pub struct RecordN<const N: usize> {
    w: [AtomicU64; N],
}

/// The four-word record of client state (layout above).
pub type Record = RecordN<4>;

/// The words of a locked record, as plain integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WordsN<const N: usize>([u64; N]);

/// The words of a locked [`Record`].
pub type Words = WordsN<4>;

impl<const N: usize> Default for RecordN<N> {
    fn default() -> Self {
        Self {
            w: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl<const N: usize> RecordN<N> {
    /// The client's tag (0: the record is free).
    #[inline]
    pub fn tag(&self) -> u32 {
        (self.w[0].load(Ordering::Acquire) >> TAG_SHIFT) as u32
    }

    /// Claims a free record for `tag`, locked. Fails if it is not free.
    #[inline]
    pub fn claim_free(&self, tag: u32) -> Result<WordsN<N>, u32> {
        match self.w[0].compare_exchange(0, word0(tag) | LOCK, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => Ok(WordsN::fresh(tag)),
            Err(seen) => Err((seen >> TAG_SHIFT) as u32),
        }
    }

    /// Locks the record if its tag is `tag` (`None` when it belongs to
    /// someone else, or became free, meanwhile). Waits out a holder: locks
    /// are held for a few dozen instructions.
    #[inline]
    pub fn lock(&self, tag: u32) -> Option<WordsN<N>> {
        let mut w0 = self.w[0].load(Ordering::Relaxed);
        loop {
            if (w0 >> TAG_SHIFT) as u32 != tag {
                return None;
            }
            if w0 & LOCK != 0 {
                std::hint::spin_loop();
                w0 = self.w[0].load(Ordering::Relaxed);
                continue;
            }
            match self.w[0].compare_exchange_weak(w0, w0 | LOCK, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => {
                    let mut words = [w0; N];
                    for (i, w) in words.iter_mut().enumerate().skip(1) {
                        *w = self.w[i].load(Ordering::Relaxed);
                    }
                    return Some(WordsN(words));
                }
                Err(seen) => w0 = seen,
            }
        }
    }

    /// Writes `words` back and releases the lock. Word 0 (the tag) goes
    /// last, so whoever locks next sees the other words.
    #[inline]
    pub fn unlock(&self, words: WordsN<N>) {
        for i in 1..N {
            self.w[i].store(words.0[i], Ordering::Relaxed);
        }
        self.w[0].store(words.0[0] & !LOCK, Ordering::Release);
    }

    /// The words without the lock: a hint that may mix two moments.
    #[inline]
    pub fn peek(&self) -> WordsN<N> {
        let mut words = [self.w[0].load(Ordering::Acquire); N];
        for (i, w) in words.iter_mut().enumerate().skip(1) {
            *w = self.w[i].load(Ordering::Relaxed);
        }
        WordsN(words)
    }

    /// Runs `f` on the locked words of a record that has no tag of its own
    /// (the shared overflow records).
    #[inline]
    pub fn with_untagged<R>(&self, f: impl FnOnce(&mut WordsN<N>) -> R) -> R {
        let Some(mut words) = self.lock(0) else {
            unreachable!("overflow records are never tagged");
        };
        let r = f(&mut words);
        self.unlock(words);
        r
    }
}

fn word0(tag: u32) -> u64 {
    u64::from(tag) << TAG_SHIFT
}

/// A spare bit of word 0, for a table whose user lays out the other words.
const FLAG: u64 = 1;

impl<const N: usize> WordsN<N> {
    /// A fresh client's words under `tag`.
    pub fn fresh(tag: u32) -> Self {
        let mut words = [0; N];
        words[0] = word0(tag);
        Self(words)
    }

    /// The tag.
    pub fn tag(&self) -> u32 {
        (self.0[0] >> TAG_SHIFT) as u32
    }

    /// Gives the record to another client, fresh.
    pub fn retag(&mut self, tag: u32) {
        *self = Self::fresh(tag);
    }

    /// Word `i` (1 to N − 1) of a record whose table lays its state out
    /// itself (the adaptive breaker's); word 0 keeps tag, lock and second.
    pub(crate) fn word(&self, i: usize) -> u64 {
        self.0[i]
    }

    /// Sets word `i` (1 to N − 1), as [`word`](Self::word).
    pub(crate) fn set_word(&mut self, i: usize, v: u64) {
        debug_assert!(i > 0, "word 0 holds the tag and the lock");
        self.0[i] = v;
    }

    /// A bit of word 0 left to such a table (clear in a fresh record).
    pub(crate) fn flag(&self) -> bool {
        self.0[0] & FLAG != 0
    }

    /// Sets the bit [`flag`](Self::flag) reads.
    pub(crate) fn set_flag(&mut self, on: bool) {
        self.0[0] = (self.0[0] & !FLAG) | if on { FLAG } else { 0 };
    }

    /// Makes `now`'s second the record's second.
    pub(crate) fn stamp(&mut self, now: Nanos) {
        self.set_sec(now / NANOS_PER_SEC);
    }

    /// The second of the last request (wrapping).
    pub fn sec(&self) -> u64 {
        (self.0[0] >> SEC_SHIFT) & SEC_MASK
    }

    fn set_sec(&mut self, sec: u64) {
        self.0[0] = (self.0[0] & !(SEC_MASK << SEC_SHIFT)) | ((sec & SEC_MASK) << SEC_SHIFT);
    }

    /// Seconds since the last request (wrapping: a client quiet for eight
    /// years looks recent, which only keeps its state longer).
    pub fn quiet_secs(&self, now: Nanos) -> u64 {
        (now / NANOS_PER_SEC).wrapping_sub(self.sec()) & SEC_MASK
    }
}

impl Words {
    fn tat(&self) -> u64 {
        self.0[1] >> TAT_SHIFT
    }

    fn win_prev(&self) -> u64 {
        self.0[1] & COUNT_MAX
    }

    fn win_cur(&self) -> u64 {
        self.0[2] & COUNT_MAX
    }

    /// Requests admitted in the current second of the last request.
    pub fn admitted_now(&self) -> u64 {
        self.win_cur()
    }

    fn set_rate(&mut self, tat: u64, prev: u64, cur: u64) {
        self.0[1] = (tat.min(TAT_MAX) << TAT_SHIFT) | prev.min(COUNT_MAX);
        self.0[2] = (self.0[2] & !COUNT_MAX) | cur.min(COUNT_MAX);
    }

    /// Moves the per-second state to `now`'s second: `tat` rebased, the
    /// window shifted by the seconds that passed, the flood count restarted.
    pub fn roll(&mut self, now: Nanos) {
        let gap = self.quiet_secs(now);
        if gap == 0 {
            return;
        }
        self.0[2] &= !(FLOOD_MAX << FLOOD_SHIFT);
        let tat = self.tat().saturating_sub(gap.saturating_mul(NANOS_PER_SEC));
        let (prev, cur) = match gap {
            1 => (self.win_cur(), 0),
            _ => (0, 0),
        };
        self.set_rate(tat, prev, cur);
        self.set_sec(now / NANOS_PER_SEC);
    }

    /// True when the state equals a fresh one at `now`: nothing is lost by
    /// forgetting the client (window empty, bucket full, no flood count or
    /// error streak, score back at the initial one).
    pub fn idle(&self, now: Nanos) -> bool {
        let mut w = *self;
        w.roll(now);
        w.win_prev() == 0
            && w.win_cur() == 0
            && w.tat() <= now % NANOS_PER_SEC
            && w.flood() == 0
            && w.streak() == 0
            && w.settled(now)
    }

    /// Requests counted in the current second (call [`roll`](Self::roll) first).
    pub fn flood(&self) -> u64 {
        (self.0[2] >> FLOOD_SHIFT) & FLOOD_MAX
    }

    /// Counts one request for the flood rule; returns the count.
    pub fn count_request(&mut self) -> u64 {
        let n = (self.flood() + 1).min(FLOOD_MAX);
        self.0[2] = (self.0[2] & !(FLOOD_MAX << FLOOD_SHIFT)) | (n << FLOOD_SHIFT);
        n
    }

    /// Consecutive 400/401 responses.
    pub fn streak(&self) -> u8 {
        (self.0[2] >> STREAK_SHIFT) as u8
    }

    /// Sets the error streak.
    pub fn set_streak(&mut self, n: u8) {
        self.0[2] = (self.0[2] & !(0xff << STREAK_SHIFT)) | (u64::from(n) << STREAK_SHIFT);
    }

    /// The stored score (thousandths) and when it was stored (ms), if any.
    pub fn stored_score(&self) -> Option<(i64, u64)> {
        let s = (self.0[2] >> SCORE_SHIFT) & SCORE_MASK;
        (s != 0).then(|| ((s - 1) as i64, self.0[3] >> AT_SHIFT))
    }

    /// Forgets the reputation fields (score, flood count, error streak),
    /// leaving the limiter's.
    pub fn clear_reputation(&mut self) {
        self.0[2] &= COUNT_MAX;
        self.0[3] = 0;
    }

    /// Stores a score (thousandths, 0–100 000) at `now`, with the seconds
    /// it takes to recover (`None`: never).
    pub fn store_score(&mut self, milli: i64, settle_secs: Option<u64>, now: Nanos) {
        let s = milli.clamp(0, 100_000) as u64 + 1;
        self.0[2] = (self.0[2] & !(SCORE_MASK << SCORE_SHIFT)) | (s << SCORE_SHIFT);
        let settle = settle_secs.map_or(NEVER, |t| t.min(NEVER - 1));
        let at = (now / palisade_core::NANOS_PER_MS) & ((1 << 40) - 1);
        self.0[3] = (at << AT_SHIFT) | settle;
    }

    /// Whether the score is back at the initial one by `now`.
    fn settled(&self, now: Nanos) -> bool {
        let Some((_, at_ms)) = self.stored_score() else {
            return true;
        };
        let settle = self.0[3] & SETTLE_MASK;
        settle != NEVER && now / palisade_core::NANOS_PER_MS >= at_ms + settle * 1000
    }

    /// Admits or rejects one request at `now`: the approximate 1 s window
    /// first, then the GCRA bucket; a rejection consumes nothing.
    ///
    /// The window counts the current second's admissions plus the previous
    /// second's, weighted by the share of the previous second still inside
    /// the last 1 s (rounded down): exact for evenly spread traffic, and a
    /// previous second whose requests came at its start or end is counted
    /// as if spread out.
    #[inline]
    pub fn check(&mut self, quota: &Quota, now: Nanos) -> Result<(), RateLimited> {
        self.admit(quota, now).map(|_| ())
    }

    /// [`check`](Self::check), saying on admission what is left of the
    /// quota (for `RateLimit` fields on allowed responses).
    #[inline]
    pub fn admit(&mut self, quota: &Quota, now: Nanos) -> Result<Headroom, RateLimited> {
        self.roll(now);
        let into = now % NANOS_PER_SEC;
        let (prev, cur) = (self.win_prev(), self.win_cur());
        let limit = u64::from(quota.window_limit.get()).min(COUNT_MAX);
        // The window is (now − 1 s, now]: at a second's start the previous
        // second still weighs all but its first instant.
        let weighted = prev * (NANOS_PER_SEC - 1 - into) / NANOS_PER_SEC;
        let tau = quota.tolerance_within(MAX_TOLERANCE);
        // `tat` and `now` both measured from the start of the current second.
        let bucket = gcra(self.tat(), into, quota.emission_interval(), tau);
        if cur + weighted >= limit {
            // Both must pass: a per-minute bucket that is empty too says
            // when trying again can help, not the window's next second.
            let window = window_retry_after(prev, cur, limit, into);
            return Err(RateLimited {
                retry_after: bucket.err().map_or(window, |b| b.retry_after.max(window)),
            });
        }
        let tat = bucket?;
        self.set_rate(tat, prev, cur + 1);
        let t = quota.emission_interval();
        // GCRA admits the next request while `tat` is within `tau` of now,
        // and each admission moves `tat` one interval on.
        let ahead = tat - into;
        let in_bucket = if ahead <= tau { (tau - ahead) / t + 1 } else { 0 };
        let in_window = limit.saturating_sub(cur + 1 + weighted);
        Ok(Headroom {
            remaining: in_bucket.min(in_window).min(u64::from(u32::MAX)) as u32,
            full_in: ahead,
        })
    }
}

/// How long until the weighted window has room for one more request, if no
/// other is admitted meanwhile.
fn window_retry_after(prev: u64, cur: u64, limit: u64, into: Nanos) -> Nanos {
    // Within this second: room once prev·(1 − f) < limit − cur.
    if cur < limit && prev > 0 {
        let room = limit - cur;
        let f = NANOS_PER_SEC - (room * NANOS_PER_SEC).div_ceil(prev).min(NANOS_PER_SEC);
        if f < NANOS_PER_SEC {
            return f.saturating_sub(into).max(1);
        }
    }
    // Next second: this second's count becomes the weighted one.
    let rest = NANOS_PER_SEC - into;
    if cur < limit {
        return rest;
    }
    let f = NANOS_PER_SEC - (limit * NANOS_PER_SEC).div_ceil(cur.max(1)).min(NANOS_PER_SEC);
    rest + f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::quota;
    use palisade_core::NANOS_PER_MS;
    use std::num::NonZeroU32;

    fn admitted(w: &mut Words, q: &Quota, now: Nanos, n: u32) -> u32 {
        (0..n).filter(|_| w.check(q, now).is_ok()).count() as u32
    }

    #[test]
    fn is_half_a_cache_line() {
        assert_eq!(size_of::<Record>(), 32);
        assert_eq!(size_of::<RecordN<2>>(), 16);
        // Tables start on a page: a record never straddles two lines.
        assert_eq!(4096 % size_of::<Record>(), 0);
    }

    #[test]
    fn lock_claims_and_tags() {
        let r = Record::default();
        assert_eq!(r.tag(), 0);
        let w = r.claim_free(7).unwrap();
        // Locked: another claim fails and sees the tag.
        assert_eq!(r.claim_free(9), Err(7));
        r.unlock(w);
        assert_eq!(r.tag(), 7);
        assert!(r.lock(8).is_none());
        let w = r.lock(7).unwrap();
        assert_eq!(w.tag(), 7);
        r.unlock(w);
    }

    #[test]
    fn headroom_counts_down_to_the_refusal() {
        let q = Quota::per(NonZeroU32::new(5).unwrap(), crate::rate::Period::Minute);
        let mut w = Words::fresh(1);
        let left: Vec<_> = (0..5).map(|_| w.admit(&q, 0).unwrap()).collect();
        assert_eq!(
            left.iter().map(|h| h.remaining).collect::<Vec<_>>(),
            [4, 3, 2, 1, 0]
        );
        // One every 12 s: full again a minute after five at once.
        assert_eq!(left[0].full_in_secs(), 12);
        assert_eq!(left[4].full_in_secs(), 60);
        assert!(w.admit(&q, 0).is_err());
        // The window binds a per-second quota whose bucket holds more.
        let q = quota(10, 100, 3);
        let mut w = Words::fresh(1);
        let left: Vec<_> = (0..3).map(|_| w.admit(&q, 0).unwrap().remaining).collect();
        assert_eq!(left, [2, 1, 0]);
    }

    #[test]
    fn burst_then_window() {
        let q = quota(100, 100, 100);
        let mut w = Words::fresh(1);
        assert_eq!(admitted(&mut w, &q, 0, 150), 100);
        let err = w.check(&q, 10 * NANOS_PER_MS).unwrap_err();
        // Second 0 holds 100: room comes just after second 1 starts.
        assert_eq!(err.retry_after_secs(), 1);
        assert_eq!(err.retry_after, NANOS_PER_SEC - 10 * NANOS_PER_MS);
        // Half-way through second 1, just under half of second 0 weighs.
        assert_eq!(admitted(&mut w, &q, 1500 * NANOS_PER_MS, 150), 51);
        assert_eq!(admitted(&mut w, &q, 3 * NANOS_PER_SEC, 150), 100);
    }

    #[test]
    fn window_retry_after_is_when_room_comes() {
        let q = quota(1000, 1000, 100);
        let mut w = Words::fresh(1);
        assert_eq!(admitted(&mut w, &q, 0, 100), 100);
        let err = w.check(&q, 0).unwrap_err();
        assert!(w.check(&q, err.retry_after - 1).is_err());
        assert!(w.check(&q, err.retry_after).is_ok());
        // Half-way through second 1, 49 of second 0 weigh: 50 more fit.
        let mid = NANOS_PER_SEC + 500 * NANOS_PER_MS;
        assert_eq!(admitted(&mut w, &q, mid, 200), 50);
        let err = w.check(&q, mid).unwrap_err();
        assert!(w.check(&q, mid + err.retry_after - 1).is_err());
        assert!(w.check(&q, mid + err.retry_after).is_ok());
        // Second 1 is full (100): room again once enough of it has left.
        let err = w.check(&q, mid + err.retry_after).unwrap_err();
        assert!(err.retry_after > 0);
    }

    #[test]
    fn bucket_paces_after_burst() {
        let q = quota(10, 5, 1000);
        let mut w = Words::fresh(1);
        assert_eq!(admitted(&mut w, &q, 0, 20), 5);
        assert_eq!(w.check(&q, 0).unwrap_err().retry_after, 100 * NANOS_PER_MS);
        assert_eq!(admitted(&mut w, &q, 100 * NANOS_PER_MS, 20), 1);
        assert_eq!(admitted(&mut w, &q, 150 * NANOS_PER_MS, 20), 0);
        assert_eq!(admitted(&mut w, &q, 200 * NANOS_PER_MS, 20), 1);
        // Across second boundaries the bucket is rebased, not lost.
        assert_eq!(admitted(&mut w, &q, 1_000 * NANOS_PER_MS, 20), 5);
        assert_eq!(admitted(&mut w, &q, 1_050 * NANOS_PER_MS, 20), 0);
    }

    #[test]
    fn idle_once_window_and_bucket_are_clear() {
        let q = quota(1, 1, 100);
        let mut w = Words::fresh(1);
        assert!(w.idle(0));
        w.check(&q, 0).unwrap();
        assert!(!w.idle(500 * NANOS_PER_MS));
        assert!(!w.idle(1500 * NANOS_PER_MS));
        assert!(w.idle(2 * NANOS_PER_SEC));
        // A long tolerance keeps the client until its bucket is full again.
        let q = quota(1, 10, 100);
        let mut w = Words::fresh(1);
        assert_eq!(admitted(&mut w, &q, 0, 10), 10);
        assert!(!w.idle(5 * NANOS_PER_SEC));
        assert!(w.idle(10 * NANOS_PER_SEC));
    }

    #[test]
    fn reputation_fields_keep_the_client_until_settled() {
        let mut w = Words::fresh(1);
        w.roll(0);
        assert_eq!((w.count_request(), w.count_request()), (1, 2));
        assert!(!w.idle(500 * NANOS_PER_MS));
        w.roll(NANOS_PER_SEC);
        assert_eq!(w.flood(), 0);
        w.set_streak(2);
        assert!(!w.idle(NANOS_PER_SEC));
        w.set_streak(0);
        // 40 000 thousandths, 60 s to recover.
        w.store_score(40_000, Some(60), NANOS_PER_SEC);
        assert_eq!(w.stored_score(), Some((40_000, 1_000)));
        assert!(!w.idle(60 * NANOS_PER_SEC));
        assert!(w.idle(61 * NANOS_PER_SEC));
        // Never recovers: never idle.
        w.store_score(0, None, 0);
        assert!(!w.idle(u64::MAX / 2));
        assert_eq!(w.win_prev() + w.win_cur() + w.tat(), 0);
    }

    #[test]
    fn the_limiter_leaves_the_reputation_fields_alone() {
        let q = quota(1_000_000, 1_000_000, 1_000_000);
        let mut w = Words::fresh(u32::MAX);
        for i in 0..10_000u64 {
            let _ = w.check(&q, i * 997 * NANOS_PER_MS);
        }
        assert_eq!(w.0[2] & !COUNT_MAX, 0);
        assert_eq!(w.0[3], 0);
        assert!(w.idle((10_000 * 997 + 3_000) * NANOS_PER_MS));
        assert_eq!(w.tag(), u32::MAX);
    }
}
