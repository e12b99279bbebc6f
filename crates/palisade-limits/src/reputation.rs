//! IP reputation.
//!
//! Every client starts at the initial score (70). Penalties lower it; below
//! the block threshold (30) the client gets `403 Access denied`. Scores move
//! back toward the initial score at a steady rate, so a penalty is not
//! forever. The last few events that moved a score are kept with it so an
//! operator can ask *why*.
//!
//! All state is atomics; the per-request path reads one word and bumps one
//! counter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use palisade_core::{ClientKey, NANOS_PER_MS, NANOS_PER_SEC, Nanos};

use crate::table::{ClientTable, Slot, Zeroable};

/// Scores are kept in thousandths of a point so that slow recovery rates
/// still move them.
const MILLI: i64 = 1000;
const MAX_SCORE: i64 = 100 * MILLI;
const SCORE_BITS: u32 = 20;
/// Marks a stored score, so that a score of 0 at time 0 is not "unset".
const SET: u64 = 1 << 63;
const EVENTS: usize = 4;

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
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Flood,
            2 => Self::ErrorStreak,
            3 => Self::SynFlood,
            4 => Self::External,
            5 => Self::AdminSet,
            6 => Self::Restored,
            7 => Self::Cluster,
            _ => return None,
        })
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

/// One client's reputation state. The fields every request touches come
/// first, in the cache line shared with the table tag.
#[derive(Default)]
#[repr(C)]
pub struct RepState {
    /// `SET | (updated_at_ms << 20) | milli_score`; 0 means "never scored".
    score: AtomicU64,
    /// When the score will have recovered to the initial one (clock nanos).
    settles_at: AtomicU64,
    /// `(second << 32) | requests in that second`.
    flood: AtomicU64,
    /// Consecutive 400/401 responses.
    streak: AtomicU32,
    /// Where the next event goes in `events`.
    next_event: AtomicU32,
    /// Ring of packed events: `at_ms:40 | kind:8 | delta+128:8 | score:8`.
    events: [AtomicU64; EVENTS],
}

impl RepState {
    fn score_milli(&self, cfg: &Rules, now: Nanos) -> i64 {
        let packed = self.score.load(Ordering::Acquire);
        if packed == 0 {
            return cfg.initial;
        }
        let at_ms = (packed & !SET) >> SCORE_BITS;
        let stored = (packed & ((1 << SCORE_BITS) - 1)) as i64;
        let elapsed_ms = (now / NANOS_PER_MS).saturating_sub(at_ms);
        let moved = (u128::from(elapsed_ms) * u128::from(cfg.recovery_milli_per_min) / 60_000)
            .min(MAX_SCORE as u128) as i64;
        if stored < cfg.initial {
            (stored + moved).min(cfg.initial)
        } else {
            (stored - moved).max(cfg.initial)
        }
    }

    fn store_score(&self, cfg: &Rules, milli: i64, now: Nanos) {
        let milli = milli.clamp(0, MAX_SCORE);
        let distance = (milli - cfg.initial).unsigned_abs();
        let settle = if distance == 0 {
            0
        } else if cfg.recovery_milli_per_min > 0 {
            (distance * 60_000)
                .div_ceil(cfg.recovery_milli_per_min)
                .saturating_mul(NANOS_PER_MS)
        } else {
            u64::MAX
        };
        self.settles_at
            .store(now.saturating_add(settle), Ordering::Release);
        let at_ms = now / NANOS_PER_MS;
        self.score
            .store(SET | (at_ms << SCORE_BITS) | milli as u64, Ordering::Release);
    }

    /// Adds `delta` points; returns the new score.
    fn adjust(&self, cfg: &Rules, delta: i64, kind: EventKind, now: Nanos) -> i64 {
        // Penalties are rare; a lost race between two of them loses one, which
        // is not worth a CAS loop over the whole read-modify-write.
        let next = (self.score_milli(cfg, now) + delta * MILLI).clamp(0, MAX_SCORE);
        self.store_score(cfg, next, now);
        self.record(kind, delta, next, now);
        next
    }

    fn record(&self, kind: EventKind, delta: i64, score_milli: i64, now: Nanos) {
        let at_ms = (now / NANOS_PER_MS) & ((1 << 40) - 1);
        let delta = (delta.clamp(-128, 127) + 128) as u64;
        let score = (score_milli / MILLI) as u64;
        let packed = (at_ms << 24) | (u64::from(kind as u8) << 16) | (delta << 8) | score;
        let i = self.next_event.fetch_add(1, Ordering::AcqRel) as usize % EVENTS;
        self.events[i].store(packed, Ordering::Release);
    }

    fn events(&self) -> Vec<Event> {
        let next = self.next_event.load(Ordering::Acquire) as usize;
        (1..=EVENTS)
            .filter_map(|back| {
                let p = self.events[(next + EVENTS - back) % EVENTS].load(Ordering::Acquire);
                let kind = EventKind::from_u8((p >> 16) as u8)?;
                Some(Event {
                    at: (p >> 24) * NANOS_PER_MS,
                    kind,
                    delta: i16::from((p >> 8) as u8) - 128,
                    score_after: p as u8,
                })
            })
            .collect()
    }
}

// SAFETY: only atomic integers (and arrays of them), whose zero is their default.
unsafe impl Zeroable for RepState {}

impl Slot for RepState {
    fn is_idle(&self, now: Nanos) -> bool {
        // Forgetting is lossless only at the initial score with no pending
        // flood second or error streak. Scores above initial (admin grants)
        // also decay there first.
        let second = now / NANOS_PER_SEC;
        let flood = self.flood.load(Ordering::Acquire);
        self.settles_at.load(Ordering::Acquire) <= now
            && (flood & u64::from(u32::MAX) == 0 || (flood >> 32) < second)
            && self.streak.load(Ordering::Acquire) == 0
    }

    fn reset(&self) {
        self.score.store(0, Ordering::Release);
        self.settles_at.store(0, Ordering::Release);
        self.flood.store(0, Ordering::Release);
        self.streak.store(0, Ordering::Release);
        for e in &self.events {
            e.store(0, Ordering::Release);
        }
        self.next_event.store(0, Ordering::Release);
    }
}

/// Rules pre-converted to the units the hot path uses.
#[derive(Debug, Clone)]
struct Rules {
    initial: i64,
    block_below: i64,
    recovery_milli_per_min: u64,
}

/// The keyed reputation engine.
pub struct Reputation {
    cfg: ReputationConfig,
    rules: Rules,
    table: Arc<ClientTable<RepState>>,
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
    /// An engine tracking at most `max_clients` clients.
    pub fn new(cfg: ReputationConfig, max_clients: usize) -> Self {
        Self::with_table(cfg, Arc::new(ClientTable::new(max_clients)))
    }

    /// An engine applying `cfg` to an existing table (live reload: scores
    /// are kept, new rules apply to them).
    pub fn with_table(cfg: ReputationConfig, table: Arc<ClientTable<RepState>>) -> Self {
        let rules = Rules {
            initial: i64::from(cfg.initial.min(100)) * MILLI,
            block_below: i64::from(cfg.block_below.min(100)) * MILLI,
            recovery_milli_per_min: (cfg.recovery_per_minute.max(0.0) * MILLI as f64) as u64,
        };
        Self { cfg, rules, table }
    }

    /// The rules in force.
    pub fn config(&self) -> &ReputationConfig {
        &self.cfg
    }

    /// Counts one request (allowed or not) and reports the client's standing.
    pub fn observe_request(&self, key: &ClientKey, now: Nanos) -> Standing {
        self.table.with(key, now, |slot| {
            let second = now / NANOS_PER_SEC;
            let prev = slot.flood.load(Ordering::Acquire);
            let count = if prev >> 32 == second {
                (slot.flood.fetch_add(1, Ordering::AcqRel) & u64::from(u32::MAX)) + 1
            } else {
                // New second: a racing reset may drop one count, which only
                // delays a penalty by a request.
                slot.flood.store((second << 32) | 1, Ordering::Release);
                1
            };
            // Penalise once per second, on the request that crosses the line.
            let flooded = count == u64::from(self.cfg.flood_threshold) + 1;
            let score = if flooded {
                slot.adjust(
                    &self.rules,
                    -i64::from(self.cfg.flood_penalty),
                    EventKind::Flood,
                    now,
                )
            } else {
                slot.score_milli(&self.rules, now)
            };
            Standing {
                score: (score / MILLI) as u8,
                blocked: score < self.rules.block_below,
                flooded,
            }
        })
    }

    /// Feeds a response status back: `error_streak` consecutive 400/401 cost
    /// `error_penalty`; any other status ends the streak. Returns whether a
    /// penalty was applied.
    pub fn observe_response(&self, key: &ClientKey, status: u16, now: Nanos) -> bool {
        self.table.with(key, now, |slot| {
            if matches!(status, 400 | 401) {
                let streak = slot.streak.fetch_add(1, Ordering::AcqRel) + 1;
                if streak >= u32::from(self.cfg.error_streak.max(1)) {
                    slot.streak.store(0, Ordering::Release);
                    slot.adjust(
                        &self.rules,
                        -i64::from(self.cfg.error_penalty),
                        EventKind::ErrorStreak,
                        now,
                    );
                    return true;
                }
            } else if slot.streak.load(Ordering::Relaxed) != 0 {
                slot.streak.store(0, Ordering::Release);
            }
            false
        })
    }

    /// Applies a penalty (positive `points` are subtracted) from another
    /// component, e.g. the SYN-flood detector's −30. Returns the new score.
    pub fn penalize(&self, key: &ClientKey, points: u8, kind: EventKind, now: Nanos) -> f64 {
        self.table.with(key, now, |slot| {
            slot.adjust(&self.rules, -i64::from(points), kind, now)
        }) as f64
            / MILLI as f64
    }

    /// Sets a score outright (admin). Returns the new score.
    pub fn set(&self, key: &ClientKey, score: u8, now: Nanos) -> f64 {
        let target = i64::from(score.min(100)) * MILLI;
        self.table.with(key, now, |slot| {
            let delta = (target - slot.score_milli(&self.rules, now)) / MILLI;
            slot.store_score(&self.rules, target, now);
            slot.record(EventKind::AdminSet, delta, target, now);
        });
        target as f64 / MILLI as f64
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
            self.table.with(key, now, |slot| {
                let delta = (target - slot.score_milli(&self.rules, now)) / MILLI;
                slot.store_score(&self.rules, target, now);
                slot.record(kind, delta, target, now);
            });
        }
        target as f64 / MILLI as f64
    }

    /// The client's current score (recovery included).
    pub fn score(&self, key: &ClientKey, now: Nanos) -> f64 {
        self.table
            .get(key, |s| s.score_milli(&self.rules, now))
            .unwrap_or(self.rules.initial) as f64
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

    /// Forgets everything about a client (admin). Returns whether it was tracked.
    pub fn reset(&self, key: &ClientKey) -> bool {
        self.table.remove(key)
    }

    /// The client's current score and the recent events behind it.
    pub fn explain(&self, key: &ClientKey, now: Nanos) -> Explanation {
        self.table
            .get(key, |s| Explanation {
                score: s.score_milli(&self.rules, now) as f64 / MILLI as f64,
                events: s.events(),
            })
            .unwrap_or(Explanation {
                score: f64::from(self.cfg.initial),
                events: Vec::new(),
            })
    }

    /// Current scores of all tracked clients, bucketed by tens (0–9, 10–19,
    /// …, 90–100) for the distribution metric.
    pub fn distribution(&self, now: Nanos) -> [u64; 10] {
        let mut buckets = [0u64; 10];
        self.table.for_each(|s| {
            let score = s.score_milli(&self.rules, now) / MILLI;
            buckets[(score / 10).clamp(0, 9) as usize] += 1;
        });
        buckets
    }

    /// The client table (for gauges).
    pub fn table(&self) -> &Arc<ClientTable<RepState>> {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = NANOS_PER_SEC;
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
        let r = Reputation::new(ReputationConfig::default(), 1);
        r.penalize(&K, 50, EventKind::External, 0);
        // The table is full of a penalised client: a newcomer overflows
        // instead of evicting it.
        r.observe_request(&ClientKey::V4(2), 10 * SEC);
        assert_eq!(r.explain(&K, 10 * SEC).score.floor(), 20.0);
        // Once recovered (50 points at 1/min), the slot can be recycled.
        r.observe_request(&ClientKey::V4(2), 51 * 60 * SEC);
        assert_eq!(r.explain(&ClientKey::V4(2), 51 * 60 * SEC).events.len(), 0);
        assert_eq!(r.table().len(), 1);
        assert!(r.table().get(&K, |_| ()).is_none());
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
