//! IP reputation.
//!
//! Every client starts at the initial score (70). Penalties lower it; below
//! the block threshold (30) the client gets `403 Access denied`. Scores move
//! back toward the initial score at a steady rate, so a penalty is not
//! forever. The last few events that moved a score are kept with it so an
//! operator can ask *why*.
//!
//! A client's score, flood count and error streak live in its 32-byte
//! [`record`](crate::record), in the table the default rate limiter keeps
//! its state in too (see [`Reputation::with_table`]); the events behind a
//! score in a small side table ([`Notes`]). A client that found no record of its own (the table
//! is full of active or penalized clients) shares an overflow record, and
//! reputation neither counts nor penalizes it there: a shared record would
//! turn a crowd of strangers' requests into one client's 403.

use std::sync::Arc;

use palisade_core::{ClientKey, NANOS_PER_MS, Nanos};

use crate::clients::{Clients, Place};
use crate::notes::Notes;
use crate::record::{FLOOD_MAX, Words};

/// Scores are kept in thousandths of a point so that slow recovery rates
/// still move them.
const MILLI: i64 = 1000;
const MAX_SCORE: i64 = 100 * MILLI;

/// Reputation rules. Defaults are the documented ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ReputationConfig {
    /// Score of a client never seen (0–100).
    pub initial: u8,
    /// Scores strictly below this are blocked.
    pub block_below: u8,
    /// More than this many requests within one second is a flood.
    pub flood_threshold: u32,
    /// Points lost per flooded second.
    pub flood_penalty: u8,
    /// This many consecutive 400/401 responses cost `error_penalty`.
    pub error_streak: u8,
    /// Points lost per error streak.
    pub error_penalty: u8,
    /// Points per minute a score moves back toward `initial`.
    pub recovery_per_minute: f64,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        Self {
            initial: 70,
            block_below: 30,
            flood_threshold: 200,
            flood_penalty: 15,
            error_streak: 3,
            error_penalty: 10,
            recovery_per_minute: 1.0,
        }
    }
}

/// What changed a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// More than `flood_threshold` requests in one second.
    Flood = 1,
    /// `error_streak` consecutive 400/401 responses.
    ErrorStreak = 2,
    /// A SYN flood from this source (kernel defense).
    SynFlood = 3,
    /// Another component applied a penalty.
    External = 4,
    /// An operator set the score.
    AdminSet = 5,
    /// Loaded from durable state after a restart.
    Restored = 6,
    /// Learned by another node of the cluster.
    Cluster = 7,
    /// A challenge: issued (a small penalty), solved (refunded), failed,
    /// or a refused clearance cookie.
    Challenge = 8,
}

impl EventKind {
    /// The name shown by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flood => "flood",
            Self::ErrorStreak => "error_streak",
            Self::SynFlood => "syn_flood",
            Self::External => "external",
            Self::AdminSet => "admin_set",
            Self::Restored => "restored",
            Self::Cluster => "cluster",
            Self::Challenge => "challenge",
        }
    }
}

/// One recorded score change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// When it happened (clock time).
    pub at: Nanos,
    /// Why.
    pub kind: EventKind,
    /// Points added (negative for penalties).
    pub delta: i16,
    /// Score right after it.
    pub score_after: u8,
}

/// A client's score and the events that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// Current score, recovery included.
    pub score: f64,
    /// Most recent first; at most four.
    pub events: Vec<Event>,
}

/// Rules pre-converted to the units the hot path uses.
#[derive(Debug, Clone)]
struct Rules {
    initial: i64,
    block_below: i64,
    recovery_milli_per_min: u64,
}

impl Rules {
    fn score_milli(&self, w: &Words, now: Nanos) -> i64 {
        let Some((stored, at_ms)) = w.stored_score() else {
            return self.initial;
        };
        let elapsed_ms = (now / NANOS_PER_MS).saturating_sub(at_ms);
        let moved = (u128::from(elapsed_ms) * u128::from(self.recovery_milli_per_min) / 60_000)
            .min(MAX_SCORE as u128) as i64;
        if stored < self.initial {
            (stored + moved).min(self.initial)
        } else {
            (stored - moved).max(self.initial)
        }
    }

    fn store(&self, w: &mut Words, milli: i64, now: Nanos) {
        let milli = milli.clamp(0, MAX_SCORE);
        let distance = (milli - self.initial).unsigned_abs();
        let settle = if distance == 0 {
            Some(0)
        } else if self.recovery_milli_per_min > 0 {
            Some((distance * 60).div_ceil(self.recovery_milli_per_min))
        } else {
            None
        };
        w.store_score(milli, settle, now);
    }
}

/// The keyed reputation engine.
pub struct Reputation {
    cfg: ReputationConfig,
    rules: Rules,
    table: Arc<Clients>,
    notes: Arc<Notes>,
}

/// What [`Reputation::observe_request`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Score in whole points (rounded down).
    pub score: u8,
    /// Whether the score is below the block threshold.
    pub blocked: bool,
    /// Whether this request crossed the flood threshold (a penalty was applied).
    pub flooded: bool,
}

impl Reputation {
    /// An engine tracking at most `max_clients` clients, with the events of
    /// up to 1/16 of them (at least 256, at most 65 536) for explanations.
    pub fn new(cfg: ReputationConfig, max_clients: usize) -> Self {
        Self::with_table(cfg, Arc::new(Clients::new(max_clients)))
    }

    /// An engine keeping its clients in `table`, whose records it shares
    /// with whoever else uses the table's other fields (the default rate
    /// limiter: one record, one lookup per client for both).
    pub fn with_table(cfg: ReputationConfig, table: Arc<Clients>) -> Self {
        let notes = Notes::new((table.capacity() / 16).clamp(256, 65_536));
        Self::with_tables(cfg, table, Arc::new(notes))
    }

    /// An engine applying `cfg` to `previous`'s clients (live reload:
    /// scores and explanations are kept, new rules apply to them).
    pub fn carrying_over(cfg: ReputationConfig, previous: &Reputation) -> Self {
        Self::with_tables(cfg, previous.table.clone(), previous.notes.clone())
    }

    fn with_tables(cfg: ReputationConfig, table: Arc<Clients>, notes: Arc<Notes>) -> Self {
        let rules = Rules {
            initial: i64::from(cfg.initial.min(100)) * MILLI,
            block_below: i64::from(cfg.block_below.min(100)) * MILLI,
            recovery_milli_per_min: (cfg.recovery_per_minute.max(0.0) * MILLI as f64) as u64,
        };
        Self {
            cfg,
            rules,
            table,
            notes,
        }
    }

    /// The rules in force.
    pub fn config(&self) -> &ReputationConfig {
        &self.cfg
    }

    fn initial_standing(&self) -> Standing {
        Standing {
            score: (self.rules.initial / MILLI) as u8,
            blocked: self.rules.initial < self.rules.block_below,
            flooded: false,
        }
    }

    /// Adds `delta` points and notes why; returns the new score.
    fn adjust(&self, key: &ClientKey, w: &mut Words, delta: i64, kind: EventKind, now: Nanos) -> i64 {
        let next = (self.rules.score_milli(w, now) + delta * MILLI).clamp(0, MAX_SCORE);
        self.rules.store(w, next, now);
        self.note(key, kind, delta, next, now);
        next
    }

    fn note(&self, key: &ClientKey, kind: EventKind, delta: i64, score_milli: i64, now: Nanos) {
        self.notes.record(
            key,
            Event {
                at: now / NANOS_PER_MS * NANOS_PER_MS,
                kind,
                delta: delta.clamp(-128, 127) as i16,
                score_after: (score_milli / MILLI) as u8,
            },
        );
    }

    /// Counts one request (allowed or not) and reports the client's standing.
    #[inline]
    pub fn observe_request(&self, key: &ClientKey, now: Nanos) -> Standing {
        self.table
            .with(key, now, |w, place| self.observe_in(key, w, place, now))
    }

    /// [`observe_request`](Self::observe_request) on the client's record
    /// already locked from this engine's table, for a caller that has more
    /// to do in the same record.
    #[inline]
    pub(crate) fn observe_in(&self, key: &ClientKey, w: &mut Words, place: Place, now: Nanos) -> Standing {
        if place == Place::Overflow {
            return self.initial_standing();
        }
        w.roll(now);
        let count = w.count_request();
        // Penalise once per second, on the request that crosses the
        // line (thresholds past the counter's range act as its top).
        let threshold = u64::from(self.cfg.flood_threshold).min(FLOOD_MAX - 1);
        let flooded = count == threshold + 1;
        let score = if flooded {
            self.adjust(key, w, -i64::from(self.cfg.flood_penalty), EventKind::Flood, now)
        } else {
            self.rules.score_milli(w, now)
        };
        Standing {
            score: (score / MILLI) as u8,
            blocked: score < self.rules.block_below,
            flooded,
        }
    }

    /// Feeds a response status back: `error_streak` consecutive 400/401 cost
    /// `error_penalty`; any other status ends the streak. Returns whether a
    /// penalty was applied.
    pub fn observe_response(&self, key: &ClientKey, status: u16, now: Nanos) -> bool {
        self.table.with(key, now, |w, place| {
            if place == Place::Overflow {
                return false;
            }
            if matches!(status, 400 | 401) {
                let streak = w.streak().saturating_add(1);
                if streak >= self.cfg.error_streak.max(1) {
                    w.set_streak(0);
                    self.adjust(
                        key,
                        w,
                        -i64::from(self.cfg.error_penalty),
                        EventKind::ErrorStreak,
                        now,
                    );
                    return true;
                }
                w.set_streak(streak);
            } else {
                w.set_streak(0);
            }
            false
        })
    }

    /// Applies a penalty (positive `points` are subtracted) from another
    /// component, e.g. the SYN-flood detector's −30. Returns the new score
    /// (the initial one for a client without a record of its own, which
    /// cannot be penalized).
    pub fn penalize(&self, key: &ClientKey, points: u8, kind: EventKind, now: Nanos) -> f64 {
        self.table.with(key, now, |w, place| match place {
            Place::Own => self.adjust(key, w, -i64::from(points), kind, now),
            Place::Overflow => self.rules.initial,
        }) as f64
            / MILLI as f64
    }

    /// Gives back up to `points` (a refund: a solved challenge's issue
    /// penalty), never past the initial score, so that refunds cannot be
    /// farmed into a better standing than a stranger's. Returns the new
    /// score.
    pub fn refund(&self, key: &ClientKey, points: u8, kind: EventKind, now: Nanos) -> f64 {
        self.table.with(key, now, |w, place| match place {
            Place::Own => {
                let score = self.rules.score_milli(w, now);
                let room = (self.rules.initial - score).max(0) / MILLI;
                let give = i64::from(points).min(room);
                if give == 0 {
                    return score;
                }
                self.adjust(key, w, give, kind, now)
            }
            Place::Overflow => self.rules.initial,
        }) as f64
            / MILLI as f64
    }

    /// Sets a score outright (admin). Returns the new score.
    pub fn set(&self, key: &ClientKey, score: u8, now: Nanos) -> f64 {
        let target = i64::from(score.min(100)) * MILLI;
        self.store_recorded(key, target, EventKind::AdminSet, now)
    }

    fn store_recorded(&self, key: &ClientKey, target: i64, kind: EventKind, now: Nanos) -> f64 {
        self.table.with(key, now, |w, place| match place {
            Place::Own => {
                let delta = (target - self.rules.score_milli(w, now)) / MILLI;
                self.rules.store(w, target, now);
                self.note(key, kind, delta, target, now);
                target
            }
            Place::Overflow => self.rules.initial,
        }) as f64
            / MILLI as f64
    }

    /// Restores a score recorded `age_ms` ago (durable state after a
    /// restart), moved toward the initial score as recovery would have
    /// moved it meanwhile. Returns the score now.
    pub fn restore(&self, key: &ClientKey, score: u8, age_ms: u64, now: Nanos) -> f64 {
        self.set_recorded(key, score, age_ms, EventKind::Restored, now)
    }

    /// Like [`Self::restore`], for a score learned elsewhere (`kind` says
    /// where: durable state, another cluster node).
    pub fn set_recorded(&self, key: &ClientKey, score: u8, age_ms: u64, kind: EventKind, now: Nanos) -> f64 {
        let stored = i64::from(score.min(100)) * MILLI;
        let moved = (u128::from(age_ms) * u128::from(self.rules.recovery_milli_per_min) / 60_000)
            .min(MAX_SCORE as u128) as i64;
        let initial = self.rules.initial;
        let target = if stored < initial {
            (stored + moved).min(initial)
        } else {
            (stored - moved).max(initial)
        };
        if target != initial || kind == EventKind::Cluster {
            return self.store_recorded(key, target, kind, now);
        }
        target as f64 / MILLI as f64
    }

    /// The client's current score (recovery included).
    pub fn score(&self, key: &ClientKey, now: Nanos) -> f64 {
        self.table
            .get(key)
            .map_or(self.rules.initial, |w| self.rules.score_milli(&w, now)) as f64
            / MILLI as f64
    }

    /// Seconds until a score moves all the way back to the initial one;
    /// `None` when it never does (recovery disabled).
    pub fn settle_secs(&self, score: f64) -> Option<u64> {
        let distance = ((score * MILLI as f64) as i64 - self.rules.initial).unsigned_abs();
        if distance == 0 {
            return Some(0);
        }
        (self.rules.recovery_milli_per_min > 0)
            .then(|| (distance * 60).div_ceil(self.rules.recovery_milli_per_min))
    }

    /// Forgets the client's score, flood count, error streak and events
    /// (admin); a rate limiter sharing its record keeps its state. Returns
    /// whether it was tracked.
    pub fn reset(&self, key: &ClientKey) -> bool {
        self.notes.forget(key);
        self.table.update(key, Words::clear_reputation).is_some()
    }

    /// The client's current score and the recent events behind it.
    pub fn explain(&self, key: &ClientKey, now: Nanos) -> Explanation {
        Explanation {
            score: self.score(key, now),
            events: self.notes.events(key),
        }
    }

    /// Current scores of all tracked clients, bucketed by tens (0–9, 10–19,
    /// …, 90–100) for the distribution metric.
    pub fn distribution(&self, now: Nanos) -> [u64; 10] {
        let mut buckets = [0u64; 10];
        self.table.for_each(|w| {
            let score = self.rules.score_milli(&w, now) / MILLI;
            buckets[(score / 10).clamp(0, 9) as usize] += 1;
        });
        buckets
    }

    /// The client table (for gauges).
    pub fn table(&self) -> &Arc<Clients> {
        &self.table
    }

    /// The side table of recent events.
    pub fn notes(&self) -> &Notes {
        &self.notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = palisade_core::NANOS_PER_SEC;
    const K: ClientKey = ClientKey::V4(0x0a00_0001);

    fn rep() -> Reputation {
        Reputation::new(ReputationConfig::default(), 1000)
    }

    #[test]
    fn restored_scores_count_the_recovery_while_down() {
        let r = rep();
        // 10 points recorded 5 minutes ago at 1 point/minute: 15 now.
        assert_eq!(r.restore(&K, 10, 5 * 60_000, SEC), 15.0);
        assert_eq!(r.score(&K, SEC), 15.0);
        assert!(r.observe_request(&K, SEC).blocked);
        assert_eq!(r.explain(&K, SEC).events[0].kind, EventKind::Restored);
        // Long enough ago that it has recovered: nothing to track.
        let other = ClientKey::V4(7);
        assert_eq!(r.restore(&other, 10, 3_600_000, SEC), 70.0);
        assert_eq!(r.table().len(), 1);
        assert_eq!(r.settle_secs(15.0), Some(55 * 60));
    }

    #[test]
    fn refunds_never_lift_a_score_past_the_initial_one() {
        let r = rep();
        r.penalize(&K, 1, EventKind::Challenge, SEC);
        assert_eq!(r.score(&K, SEC), 69.0);
        assert_eq!(r.refund(&K, 1, EventKind::Challenge, SEC), 70.0);
        // A second refund for the same penalty (a replayed solution) is nothing.
        assert_eq!(r.refund(&K, 1, EventKind::Challenge, SEC), 70.0);
        r.penalize(&K, 10, EventKind::Challenge, SEC);
        assert_eq!(r.refund(&K, 50, EventKind::Challenge, SEC), 70.0);
    }

    #[test]
    fn new_client_starts_at_initial() {
        let r = rep();
        let s = r.observe_request(&K, 0);
        assert_eq!(
            s,
            Standing {
                score: 70,
                blocked: false,
                flooded: false
            }
        );
        assert_eq!(r.explain(&ClientKey::V4(9), 0).score, 70.0);
    }

    #[test]
    fn flood_costs_fifteen_once_per_second() {
        let r = rep();
        let flooded = (0..500)
            .filter(|_| r.observe_request(&K, SEC / 2).flooded)
            .count();
        assert_eq!(flooded, 1);
        assert_eq!(r.explain(&K, SEC / 2).score, 55.0);
        // Exactly 200 in the next second is not a flood.
        for _ in 0..200 {
            r.observe_request(&K, SEC + 1);
        }
        assert_eq!(r.explain(&K, SEC + 1).score.floor(), 55.0);
    }

    #[test]
    fn floods_lead_to_block_and_recovery_unblocks() {
        let r = rep();
        let mut now = 0;
        for _ in 0..3 {
            for _ in 0..201 {
                r.observe_request(&K, now);
            }
            now += SEC;
        }
        // 70 − 3×15 = 25 < 30, minus a little recovery over 2 s.
        let s = r.observe_request(&K, now);
        assert!(s.blocked, "{s:?}");
        assert_eq!(s.score, 25);
        // 1 point/minute: 5 minutes later the score is back to 30.
        now += 5 * 60 * SEC;
        let s = r.observe_request(&K, now);
        assert!(!s.blocked, "{s:?}");
        assert_eq!(s.score, 30);
        // And never beyond the initial score.
        now += 3600 * SEC;
        assert_eq!(r.observe_request(&K, now).score, 70);
    }

    #[test]
    fn three_consecutive_client_errors_cost_ten() {
        let r = rep();
        assert!(!r.observe_response(&K, 401, 0));
        assert!(!r.observe_response(&K, 400, 0));
        assert!(r.observe_response(&K, 401, 0));
        assert_eq!(r.explain(&K, 0).score, 60.0);
        // A success breaks the streak.
        r.observe_response(&K, 401, 0);
        r.observe_response(&K, 401, 0);
        r.observe_response(&K, 200, 0);
        r.observe_response(&K, 401, 0);
        assert_eq!(r.explain(&K, 0).score, 60.0);
        // 403/404/500 are not part of this rule.
        for s in [403, 404, 500, 403, 404, 500] {
            assert!(!r.observe_response(&K, s, 0));
        }
    }

    #[test]
    fn explain_lists_recent_events_newest_first() {
        let r = rep();
        r.penalize(&K, 30, EventKind::SynFlood, SEC);
        r.observe_response(&K, 400, 2 * SEC);
        r.observe_response(&K, 400, 2 * SEC);
        r.observe_response(&K, 400, 2 * SEC);
        let e = r.explain(&K, 2 * SEC);
        assert_eq!(e.events.len(), 2);
        assert_eq!(e.events[0].kind, EventKind::ErrorStreak);
        assert_eq!(e.events[0].delta, -10);
        assert_eq!(e.events[0].score_after, 30);
        assert_eq!(e.events[1].kind, EventKind::SynFlood);
        assert_eq!(e.events[1].at, SEC);
        // The ring keeps the last four.
        for i in 0..6 {
            r.penalize(&K, 1, EventKind::External, (3 + i) * SEC);
        }
        let e = r.explain(&K, 10 * SEC);
        assert_eq!(e.events.len(), 4);
        assert!(e.events.iter().all(|ev| ev.kind == EventKind::External));
        assert_eq!(e.events[0].at, 8 * SEC);
    }

    #[test]
    fn admin_set_and_reset() {
        let r = rep();
        assert_eq!(r.set(&K, 10, 0), 10.0);
        assert!(r.observe_request(&K, 0).blocked);
        let e = r.explain(&K, 0);
        assert_eq!(e.events[0].kind, EventKind::AdminSet);
        assert_eq!(e.events[0].delta, -60);
        assert!(r.reset(&K));
        assert_eq!(r.explain(&K, 0).score, 70.0);
        // A grant above initial decays down to it.
        r.set(&K, 100, 0);
        assert_eq!(r.explain(&K, 60 * SEC).score, 99.0);
        assert_eq!(r.explain(&K, 3600 * SEC).score, 70.0);
    }

    #[test]
    fn penalised_clients_are_not_evicted() {
        // 16 records (the smallest table), all held by penalised clients.
        let r = Reputation::new(ReputationConfig::default(), 16);
        for k in 0..16 {
            r.penalize(&ClientKey::V4(k), 50, EventKind::External, 0);
        }
        assert_eq!((r.table().len(), r.table().overflowed()), (16, 0));
        // A newcomer overflows instead of evicting one, and is neither
        // counted nor penalised there.
        let newcomer = ClientKey::V4(99);
        for _ in 0..1000 {
            assert!(!r.observe_request(&newcomer, 10 * SEC).blocked);
        }
        assert!(!r.observe_response(&newcomer, 400, 10 * SEC));
        for k in 0..16 {
            assert_eq!(r.explain(&ClientKey::V4(k), 10 * SEC).score.floor(), 20.0);
        }
        // Once recovered (50 points at 1/min), a record can be taken over.
        let later = 51 * 60 * SEC;
        let before = r.table().overflowed();
        r.observe_request(&newcomer, later);
        assert_eq!(r.table().overflowed(), before);
        assert_eq!(r.table().len(), 16);
        assert!(r.table().get(&newcomer).is_some());
    }

    #[test]
    fn distribution_counts_tracked_clients() {
        let r = rep();
        r.observe_request(&ClientKey::V4(1), 0);
        r.set(&ClientKey::V4(2), 5, 0);
        r.set(&ClientKey::V4(3), 100, 0);
        let d = r.distribution(0);
        assert_eq!(d[7], 1);
        assert_eq!(d[0], 1);
        assert_eq!(d[9], 1);
        assert_eq!(d.iter().sum::<u64>(), 3);
    }
}
