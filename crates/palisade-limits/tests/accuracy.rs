//! Limiter accuracy (issue 9): once the initial burst is spent, a client
//! offering more than its limit gets the configured rate, within ±2 %,
//! from 100 to 100 000 requests per second. Simulated time, so exact.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

use palisade_core::{ClientKey, NANOS_PER_SEC};
use palisade_limits::rate::{Quota, RateLimiter};

/// Admitted per second over `secs` seconds after a warm-up of 2 s, with
/// requests arriving every `gap` ns plus a deterministic jitter of up to
/// `jitter` ns.
fn admitted_rate(rate: u32, offered_factor: f64, jitter: u64, secs: u64) -> f64 {
    let quota = Quota::per_second(NonZeroU32::new(rate).unwrap());
    let limiter = RateLimiter::new(quota, 16);
    let key = ClientKey::from_ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 64);
    let gap = (NANOS_PER_SEC as f64 / (f64::from(rate) * offered_factor)) as u64;
    let (warmup, end) = (2 * NANOS_PER_SEC, (2 + secs) * NANOS_PER_SEC);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let (mut t, mut admitted) = (0u64, 0u64);
    while t < end {
        // xorshift: reproducible jitter without a dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let at = t + if jitter == 0 { 0 } else { state % jitter };
        if limiter.check(&key, at).is_ok() && at >= warmup {
            admitted += 1;
        }
        t += gap.max(1);
    }
    admitted as f64 / secs as f64
}

#[test]
fn admitted_rate_is_within_two_percent_of_the_limit() {
    for rate in [100u32, 1_000, 10_000, 100_000] {
        for (factor, jitter) in [(1.5, 0), (3.0, 0), (2.0, 200_000), (10.0, 50_000)] {
            let got = admitted_rate(rate, factor, jitter, 5);
            let ratio = got / f64::from(rate);
            eprintln!("rate {rate:>6}/s offered ×{factor:<4} jitter {jitter:>6} ns: admitted ×{ratio:.4}");
            assert!(
                (0.98..=1.02).contains(&ratio),
                "rate {rate}/s offered ×{factor} (jitter {jitter} ns): {got:.1}/s = {ratio:.4}"
            );
        }
    }
}

#[test]
fn under_the_limit_everything_passes() {
    for rate in [100u32, 100_000] {
        let got = admitted_rate(rate, 0.9, 0, 5);
        let ratio = got / (f64::from(rate) * 0.9);
        assert!((0.99..=1.01).contains(&ratio), "rate {rate}: {ratio:.4}");
    }
}
