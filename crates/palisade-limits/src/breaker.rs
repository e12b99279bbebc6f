//! The classic circuit breaker, one per upstream, with gobreaker's
//! semantics.
//!
//! - **closed**: requests pass and are counted in windows of `interval`.
//!   When a window holds at least `min_requests` requests and the failure
//!   ratio reaches `failure_ratio`, the breaker opens.
//! - **open**: every request is refused (the caller answers 503 without
//!   calling the upstream) for `open_for`, then the breaker half-opens.
//! - **half-open**: `probes` requests pass; all succeed → closed, any
//!   fails → open again. More concurrent requests are refused.
//!
//! Per-upstream state is tiny and contended only by requests to that
//! upstream, so a mutex held for a few instructions is the simple, correct
//! choice here.

use std::sync::{Arc, Mutex};

use palisade_core::{Clock, NANOS_PER_SEC, Nanos};

/// Breaker rules. Defaults are the documented ones.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Fewest requests in a window before the ratio can trip the breaker.
    pub min_requests: u32,
    /// Failure ratio (0–1) that trips it.
    pub failure_ratio: f64,
    /// Length of a counting window while closed.
    pub interval: Nanos,
    /// How long it stays open.
    pub open_for: Nanos,
    /// Probe requests let through while half-open.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            min_requests: 5,
            failure_ratio: 0.6,
            interval: 10 * NANOS_PER_SEC,
            open_for: 30 * NANOS_PER_SEC,
            probes: 3,
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused.
    Open,
    /// A few probes pass.
    HalfOpen,
}

impl BreakerState {
    /// Name for metrics, logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// Requests counted in the current window (or since half-opening).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests admitted.
    pub requests: u32,
    /// Of which succeeded.
    pub successes: u32,
    /// Of which failed.
    pub failures: u32,
}

/// A state change and the numbers that caused it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// Before.
    pub from: BreakerState,
    /// After.
    pub to: BreakerState,
    /// Counts at the moment of the change.
    pub counts: Counts,
}

/// Proof that a request was admitted; hand it back with the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
}

/// How an admitted request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered well.
    Success,
    /// Connect error, timeout or a failure status.
    Failure,
    /// Says nothing about the upstream (the client went away, or its body
    /// was too slow); a half-open probe slot is given back.
    Ignored,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Time until the breaker half-opens (0 while half-open and full).
    pub retry_after: Nanos,
}

/// A request a breaker let through, holding its place until its outcome is
/// reported. Dropped unreported (the client went away, the future was
/// cancelled) it reports [`Outcome::Ignored`], so a half-open probe slot is
/// never lost.
pub struct Attempt<C: Clock> {
    breaker: Arc<Breaker>,
    ticket: Ticket,
    clock: C,
    done: bool,
}

impl<C: Clock> Attempt<C> {
    /// Asks `breaker` to admit a request now; a time-driven transition that
    /// happened on the way is returned too.
    pub fn begin(breaker: &Arc<Breaker>, clock: C) -> (Result<Self, Refused>, Option<Transition>) {
        let (admitted, transition) = breaker.before(clock.now());
        let attempt = admitted.map(|ticket| Self {
            breaker: breaker.clone(),
            ticket,
            clock,
            done: false,
        });
        (attempt, transition)
    }

    /// Reports how the request ended; returns the transition it caused.
    pub fn finish(mut self, outcome: Outcome) -> Option<Transition> {
        self.done = true;
        self.breaker.after(self.ticket, outcome, self.clock.now())
    }
}

impl<C: Clock> Drop for Attempt<C> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker
                .after(self.ticket, Outcome::Ignored, self.clock.now());
        }
    }
}

#[derive(Debug)]
struct Inner {
    cfg: BreakerConfig,
    state: BreakerState,
    generation: u64,
    counts: Counts,
    /// End of the counting window (closed) or of the open period (open).
    expiry: Nanos,
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker whose first window starts at `now`.
    pub fn new(cfg: BreakerConfig, now: Nanos) -> Self {
        let expiry = now.saturating_add(cfg.interval);
        Self {
            inner: Mutex::new(Inner {
                cfg,
                state: BreakerState::Closed,
                generation: 0,
                counts: Counts::default(),
                expiry,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Inner is plain data updated in place; a panic cannot leave it
        // inconsistent beyond a count.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the rules (live reload), keeping state and counts.
    pub fn reconfigure(&self, cfg: BreakerConfig) {
        self.lock().cfg = cfg;
    }

    /// Admits or refuses a request. A time-driven transition (open →
    /// half-open) that happened on the way is returned too.
    pub fn before(&self, now: Nanos) -> (Result<Ticket, Refused>, Option<Transition>) {
        let mut inner = self.lock();
        let transition = inner.advance(now);
        let result = match inner.state {
            BreakerState::Open => Err(Refused {
                retry_after: inner.expiry.saturating_sub(now),
            }),
            BreakerState::HalfOpen if inner.counts.requests >= inner.cfg.probes => {
                Err(Refused { retry_after: 0 })
            }
            _ => {
                inner.counts.requests += 1;
                Ok(Ticket {
                    generation: inner.generation,
                })
            }
        };
        (result, transition)
    }

    /// Records how an admitted request ended; returns a transition if the
    /// outcome caused one. Outcomes from an earlier generation (before the
    /// last transition) are dropped, as in gobreaker.
    pub fn after(&self, ticket: Ticket, outcome: Outcome, now: Nanos) -> Option<Transition> {
        let mut inner = self.lock();
        let timed = inner.advance(now);
        if ticket.generation != inner.generation {
            return timed;
        }
        match outcome {
            Outcome::Success => {
                inner.counts.successes += 1;
                if inner.state == BreakerState::HalfOpen && inner.counts.successes >= inner.cfg.probes {
                    return Some(inner.switch(BreakerState::Closed, now));
                }
            }
            Outcome::Failure => {
                inner.counts.failures += 1;
                let trip = match inner.state {
                    BreakerState::Closed => inner.ready_to_trip(),
                    BreakerState::HalfOpen => true,
                    BreakerState::Open => false,
                };
                if trip {
                    return Some(inner.switch(BreakerState::Open, now));
                }
            }
            Outcome::Ignored => {
                inner.counts.requests = inner.counts.requests.saturating_sub(1);
            }
        }
        timed
    }

    /// Opens the breaker from outside (an active health check found the
    /// upstream down); returns the transition, `None` if already open.
    pub fn trip(&self, now: Nanos) -> Option<Transition> {
        let mut inner = self.lock();
        let timed = inner.advance(now);
        match inner.state {
            BreakerState::Open => timed,
            _ => Some(inner.switch(BreakerState::Open, now)),
        }
    }

    /// Ends an open period early (an active health check found the
    /// upstream back): half-open, so probes decide. `None` unless open.
    pub fn recover(&self, now: Nanos) -> Option<Transition> {
        let mut inner = self.lock();
        if let Some(t) = inner.advance(now) {
            return Some(t);
        }
        match inner.state {
            BreakerState::Open => Some(inner.switch(BreakerState::HalfOpen, now)),
            _ => None,
        }
    }

    /// Current state and counts.
    pub fn state(&self, now: Nanos) -> (BreakerState, Counts, Option<Transition>) {
        let mut inner = self.lock();
        let t = inner.advance(now);
        (inner.state, inner.counts, t)
    }
}

impl Inner {
    /// Applies what time alone changes.
    fn advance(&mut self, now: Nanos) -> Option<Transition> {
        match self.state {
            BreakerState::Closed if now >= self.expiry => {
                self.new_generation(now);
                None
            }
            BreakerState::Open if now >= self.expiry => Some(self.switch(BreakerState::HalfOpen, now)),
            _ => None,
        }
    }

    fn ready_to_trip(&self) -> bool {
        let c = self.counts;
        c.requests >= self.cfg.min_requests
            && f64::from(c.failures) >= self.cfg.failure_ratio * f64::from(c.requests)
    }

    fn switch(&mut self, to: BreakerState, now: Nanos) -> Transition {
        let t = Transition {
            from: self.state,
            to,
            counts: self.counts,
        };
        self.state = to;
        self.new_generation(now);
        t
    }

    fn new_generation(&mut self, now: Nanos) {
        self.generation += 1;
        self.counts = Counts::default();
        self.expiry = match self.state {
            BreakerState::Closed => now.saturating_add(self.cfg.interval),
            BreakerState::Open => now.saturating_add(self.cfg.open_for),
            BreakerState::HalfOpen => Nanos::MAX,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = NANOS_PER_SEC;

    fn run(b: &Breaker, outcome: Outcome, now: Nanos) -> (Result<(), Refused>, Vec<Transition>) {
        let mut ts = Vec::new();
        let (r, t) = b.before(now);
        ts.extend(t);
        let r = r.map(|ticket| ts.extend(b.after(ticket, outcome, now)));
        (r, ts)
    }

    #[test]
    fn trip_opens_from_outside_and_recover_half_opens_early() {
        let b = Breaker::new(BreakerConfig::default(), 0);
        let t = b.trip(SEC).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert!(b.trip(2 * SEC).is_none(), "already open");
        assert_eq!(
            b.before(2 * SEC).0,
            Err(Refused {
                retry_after: 29 * SEC
            })
        );
        let t = b.recover(3 * SEC).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Open, BreakerState::HalfOpen));
        assert!(b.recover(3 * SEC).is_none(), "only an open breaker recovers");
        assert!(b.before(3 * SEC).0.is_ok(), "probes pass");
        let t = b.trip(4 * SEC).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
    }

    #[test]
    fn trips_at_five_requests_and_sixty_percent() {
        let b = Breaker::new(BreakerConfig::default(), 0);
        // 4 failures out of 4: below the volume floor.
        for _ in 0..4 {
            assert!(run(&b, Outcome::Failure, 0).1.is_empty());
        }
        // 5th request, 5 failures: trip.
        let (_, ts) = run(&b, Outcome::Failure, 0);
        assert_eq!(ts.len(), 1);
        assert_eq!((ts[0].from, ts[0].to), (BreakerState::Closed, BreakerState::Open));
        assert_eq!(
            ts[0].counts,
            Counts {
                requests: 5,
                successes: 0,
                failures: 5
            }
        );
    }

    #[test]
    fn ratio_below_sixty_percent_does_not_trip() {
        let b = Breaker::new(BreakerConfig::default(), 0);
        // 2 failures of 5 (40 %), then 3 of 6 (50 %): stays closed.
        for o in [
            Outcome::Success,
            Outcome::Success,
            Outcome::Success,
            Outcome::Failure,
            Outcome::Failure,
        ] {
            let _ = run(&b, o, 0);
        }
        assert!(run(&b, Outcome::Failure, 0).1.is_empty());
        assert_eq!(b.state(0).0, BreakerState::Closed);
        // 4 of 7 (57 %) still closed, 5 of 8 (62.5 %) trips.
        assert!(run(&b, Outcome::Failure, 0).1.is_empty());
        assert_eq!(run(&b, Outcome::Failure, 0).1[0].to, BreakerState::Open);
    }

    #[test]
    fn windows_reset_counts_while_closed() {
        let b = Breaker::new(BreakerConfig::default(), 0);
        for _ in 0..4 {
            let _ = run(&b, Outcome::Failure, 0);
        }
        // A new 10 s window forgets them.
        assert!(run(&b, Outcome::Failure, 10 * SEC).1.is_empty());
        assert_eq!(b.state(10 * SEC).1.failures, 1);
    }

    #[test]
    fn open_refuses_for_thirty_seconds_then_probes_close_it() {
        let b = Breaker::new(BreakerConfig::default(), 0);
        for _ in 0..5 {
            let _ = run(&b, Outcome::Failure, 0);
        }
        let (r, _) = run(&b, Outcome::Success, 10 * SEC);
        assert_eq!(
            r,
            Err(Refused {
                retry_after: 20 * SEC
            })
        );
        // At 30 s: half-open, three probes pass at once, a fourth waits.
        let (t1, timed) = b.before(30 * SEC);
        assert_eq!(timed.map(|t| t.to), Some(BreakerState::HalfOpen));
        let (t2, _) = b.before(30 * SEC);
        let (t3, _) = b.before(30 * SEC);
        assert_eq!(b.before(30 * SEC).0, Err(Refused { retry_after: 0 }));
        assert!(b.after(t1.unwrap(), Outcome::Success, 31 * SEC).is_none());
        assert!(b.after(t2.unwrap(), Outcome::Success, 31 * SEC).is_none());
        let closed = b.after(t3.unwrap(), Outcome::Success, 31 * SEC).unwrap();
        assert_eq!(
            (closed.from, closed.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert_eq!(closed.counts.successes, 3);
        assert!(run(&b, Outcome::Success, 31 * SEC).0.is_ok());
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = Breaker::new(BreakerConfig::default(), 0);
        for _ in 0..5 {
            let _ = run(&b, Outcome::Failure, 0);
        }
        let (ok, ts) = run(&b, Outcome::Failure, 30 * SEC);
        assert!(ok.is_ok());
        assert_eq!(
            ts.iter().map(|t| t.to).collect::<Vec<_>>(),
            [BreakerState::HalfOpen, BreakerState::Open]
        );
        assert_eq!(b.before(59 * SEC).0, Err(Refused { retry_after: SEC }));
    }

    #[test]
    fn ignored_probe_gives_its_slot_back() {
        let b = Breaker::new(
            BreakerConfig {
                probes: 1,
                ..Default::default()
            },
            0,
        );
        for _ in 0..5 {
            let _ = run(&b, Outcome::Failure, 0);
        }
        let _ = run(&b, Outcome::Ignored, 30 * SEC);
        assert_eq!(b.state(30 * SEC).0, BreakerState::HalfOpen);
        let (_, ts) = run(&b, Outcome::Success, 30 * SEC);
        assert_eq!(ts[0].to, BreakerState::Closed);
    }

    #[test]
    fn late_outcomes_from_an_old_generation_are_dropped() {
        let b = Breaker::new(BreakerConfig::default(), 0);
        let (old, _) = b.before(0);
        for _ in 0..5 {
            let _ = run(&b, Outcome::Failure, 0);
        }
        // The breaker opened meanwhile; the old ticket's success is stale.
        assert!(b.after(old.unwrap(), Outcome::Success, 1).is_none());
        assert_eq!(b.state(1).0, BreakerState::Open);
    }
}
