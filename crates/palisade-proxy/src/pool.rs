//! Upstream pools: named groups of members, each request going to one
//! member chosen by smooth weighted round-robin (nginx's). Over any run of
//! requests every member gets its weight's share, and the shares are
//! interleaved (weights 3:1 give a a b a, not a a a b), so no member takes
//! a burst while another idles.
//!
//! A member whose breaker refuses is skipped for that request; the others
//! share its requests by their weights. Breakers belong to upstreams (one
//! per `scheme://host:port`, shared by every pool the upstream is a member
//! of), since they judge the server, not the pool.

use std::sync::{Arc, Mutex};

use http::Uri;
use http::uri::{Authority, Scheme};
use palisade_core::{Clock, NANOS_PER_SEC, Nanos};
use palisade_limits::breaker::{Attempt, Breaker, Transition};

use crate::config::PoolConfig;
use crate::connector::Protocol;
use crate::health::Health;
use crate::metrics::intern;

/// One upstream server and its breaker.
pub struct Upstream {
    /// `http` or `https`: what requests to it go out with.
    pub scheme: Scheme,
    /// HTTP/1.1 or HTTP/2.
    pub protocol: Protocol,
    /// Where requests go.
    pub authority: Authority,
    /// The `upstream` metrics label.
    pub label: &'static str,
    /// Its circuit breaker, when enabled.
    pub breaker: Option<Arc<Breaker>>,
}

/// An upstream as a member of one pool.
pub struct Member {
    /// The server.
    pub upstream: Arc<Upstream>,
    /// Its share of the pool's requests.
    pub weight: u32,
    /// Its active health checks, when the pool has them.
    pub health: Option<Arc<Health>>,
}

impl Member {
    /// Whether its health checks leave it in rotation.
    fn in_rotation(&self) -> bool {
        self.health.as_ref().is_none_or(|h| h.is_up())
    }
}

/// A named pool of members.
pub struct Pool {
    /// Its name (interned: a metrics label).
    pub name: &'static str,
    /// Its members, in config order.
    pub members: Vec<Member>,
    /// Smooth weighted round-robin's running weights, one per member.
    current: Mutex<Vec<i64>>,
    /// `Retry-After` when health checks hold every member out.
    held_out: Nanos,
}

/// No member of the pool admitted the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    /// The shortest time until a member's breaker half-opens.
    pub retry_after: Nanos,
}

impl Pool {
    /// The pool `cfg` describes, each member's upstream taken from
    /// `upstream` (which shares one per server).
    pub fn new(cfg: &PoolConfig, mut upstream: impl FnMut(&Uri) -> Option<Arc<Upstream>>) -> Self {
        let members: Vec<Member> = cfg
            .members
            .iter()
            .filter_map(|m| {
                let upstream = upstream(&m.url)?;
                Some(Member {
                    upstream,
                    weight: m.weight.get(),
                    health: None,
                })
            })
            .collect();
        // Until a member is back: at least `rise` checks away.
        let held_out = cfg.health_check.as_ref().map_or(NANOS_PER_SEC, |h| {
            u64::try_from(h.interval.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(u64::from(h.rise.get()))
        });
        Self {
            name: intern(&cfg.name),
            current: Mutex::new(vec![0; members.len()]),
            members,
            held_out,
        }
    }

    /// The member the next request goes to, with its breaker's admission;
    /// `transition` hears of every breaker state change on the way.
    pub fn choose<C: Clock + Clone>(
        &self,
        clock: C,
        mut transition: impl FnMut(&Upstream, Transition),
    ) -> Result<(&Upstream, Option<Attempt<C>>), Unavailable> {
        let mut admit = |u: &Upstream| -> Result<Option<Attempt<C>>, Nanos> {
            let Some(breaker) = &u.breaker else {
                return Ok(None);
            };
            let (admitted, t) = Attempt::begin(breaker, clock.clone());
            if let Some(t) = t {
                transition(u, t);
            }
            admitted.map(Some).map_err(|refused| refused.retry_after)
        };
        let mut retry_after = Nanos::MAX;
        // One member: nothing to weigh, no lock to take.
        if let [only] = self.members.as_slice() {
            if !only.in_rotation() {
                return Err(Unavailable {
                    retry_after: self.held_out,
                });
            }
            return match admit(&only.upstream) {
                Ok(attempt) => Ok((&only.upstream, attempt)),
                Err(after) => Err(Unavailable { retry_after: after }),
            };
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        // Allocated only when a member refuses.
        let mut refused: Vec<bool> = Vec::new();
        loop {
            let eligible =
                |i: usize| self.members[i].in_rotation() && !refused.get(i).copied().unwrap_or(false);
            let Some(i) = smooth_next(&mut current, &self.members, eligible) else {
                break;
            };
            let upstream = &self.members[i].upstream;
            match admit(upstream) {
                Ok(attempt) => return Ok((upstream, attempt)),
                Err(after) => {
                    // As if it had not been in the running: the others'
                    // shares stay exact while it is out.
                    smooth_undo(&mut current, &self.members, eligible, i);
                    retry_after = retry_after.min(after);
                    refused.resize(self.members.len(), false);
                    refused[i] = true;
                }
            }
        }
        if retry_after == Nanos::MAX {
            retry_after = self.held_out;
        }
        Err(Unavailable { retry_after })
    }
}

/// One step of smooth weighted round-robin over the members `eligible`
/// lets in: each adds its weight to its running weight, the largest wins
/// (the first of equals) and gives back the total. `None` when none is
/// eligible.
fn smooth_next(current: &mut [i64], members: &[Member], eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, m) in members.iter().enumerate() {
        if !eligible(i) {
            continue;
        }
        let w = i64::from(m.weight);
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let best = best?;
    current[best] -= total;
    Some(best)
}

/// Takes back the step of [`smooth_next`] that chose `chosen`.
fn smooth_undo(current: &mut [i64], members: &[Member], eligible: impl Fn(usize) -> bool, chosen: usize) {
    let mut total = 0i64;
    for (i, m) in members.iter().enumerate() {
        if eligible(i) {
            let w = i64::from(m.weight);
            current[i] -= w;
            total += w;
        }
    }
    current[chosen] += total;
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use palisade_core::ManualClock;
    use palisade_limits::breaker::{BreakerConfig, Outcome};

    use super::*;
    use crate::config::MemberConfig;

    fn pool(weights: &[u32], breakers: bool) -> Pool {
        let cfg = PoolConfig {
            name: "p".into(),
            members: weights
                .iter()
                .enumerate()
                .map(|(i, w)| MemberConfig {
                    url: format!("http://10.0.0.{i}:80").parse().unwrap(),
                    weight: NonZeroU32::new(*w).unwrap(),
                })
                .collect(),
            health_check: None,
        };
        Pool::new(&cfg, |url| {
            let authority = url.authority()?;
            Some(Arc::new(Upstream {
                scheme: url.scheme()?.clone(),
                protocol: Protocol::Http1,
                authority: authority.clone(),
                label: intern(authority.as_str()),
                breaker: breakers.then(|| Arc::new(Breaker::new(BreakerConfig::default(), 0))),
            }))
        })
    }

    fn picks(p: &Pool, n: usize) -> String {
        let clock = ManualClock::new();
        (0..n)
            .map(|_| {
                let (u, _) = p.choose(clock.clone(), |_, _| {}).unwrap();
                let i = p
                    .members
                    .iter()
                    .position(|m| std::ptr::eq(&*m.upstream, u))
                    .unwrap();
                char::from(b'a' + i as u8)
            })
            .collect()
    }

    #[test]
    fn weights_are_shared_exactly_and_interleaved() {
        // nginx's sequence for 5:1:1 is a a b a c a a.
        assert_eq!(picks(&pool(&[5, 1, 1], false), 14), "aabacaaaabacaa");
        assert_eq!(picks(&pool(&[3, 1], false), 8), "aabaaaba");
        assert_eq!(picks(&pool(&[1, 1, 1], false), 6), "abcabc");
        let counts = picks(&pool(&[3, 1], true), 400);
        assert_eq!(counts.matches('a').count(), 300);
    }

    #[test]
    fn a_member_whose_breaker_is_open_is_skipped_and_the_rest_share_by_weight() {
        let p = pool(&[1, 2, 1], true);
        let clock = ManualClock::new();
        let b = p.members[1].upstream.breaker.clone().unwrap();
        for _ in 0..5 {
            let (ticket, _) = b.before(0);
            b.after(ticket.unwrap(), Outcome::Failure, 0);
        }
        let mut seen = [0; 3];
        let mut opened = 0;
        for _ in 0..20 {
            let (u, attempt) = p.choose(clock.clone(), |_, _| opened += 1).unwrap();
            assert!(attempt.is_some());
            let i = p
                .members
                .iter()
                .position(|m| std::ptr::eq(&*m.upstream, u))
                .unwrap();
            seen[i] += 1;
        }
        assert_eq!(seen, [10, 0, 10]);
        assert_eq!(opened, 0, "no transition: the breaker stays open");
    }

    #[test]
    fn every_breaker_open_is_unavailable_until_the_soonest_half_opens() {
        let p = pool(&[1, 1], true);
        for (m, at) in p.members.iter().zip([0, 10 * palisade_core::NANOS_PER_SEC]) {
            let b = m.upstream.breaker.as_ref().unwrap();
            for _ in 0..5 {
                let (ticket, _) = b.before(at);
                b.after(ticket.unwrap(), Outcome::Failure, at);
            }
        }
        let clock = ManualClock::new();
        clock.set(15 * palisade_core::NANOS_PER_SEC);
        let e = p.choose(clock, |_, _| {}).err().unwrap();
        assert_eq!(e.retry_after, 15 * palisade_core::NANOS_PER_SEC);
    }
}
