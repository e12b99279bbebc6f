//! The weighted two-counter window of a client record against an exact
//! sliding 1 s window: admitted ÷ window limit, in steady state (admitted
//! per second after a warm-up) and at worst (the most admitted in any 1 s
//! span). The bucket is set far above the window so only the window binds.
//! Simulated time, so exact and repeatable.
//!
//! Run with `--nocapture` for the table that docs/client-state.md quotes.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::num::NonZeroU32;

use palisade_core::{NANOS_PER_SEC, Nanos};
use palisade_limits::rate::{Period, Quota};
use palisade_limits::record::Words;

fn quota(limit: u32) -> Quota {
    Quota {
        rate: NonZeroU32::new(limit * 20).unwrap(),
        per: Period::Second,
        burst: NonZeroU32::new(limit * 20).unwrap(),
        window_limit: NonZeroU32::new(limit).unwrap(),
    }
}

/// Arrival times: every `gap` ns plus a reproducible jitter below `jitter`.
fn arrivals(limit: u32, factor: f64, jitter: u64, end: Nanos) -> Vec<Nanos> {
    let gap = ((NANOS_PER_SEC as f64 / (f64::from(limit) * factor)) as u64).max(1);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = Vec::new();
    let mut t = 0;
    while t < end {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(t + if jitter == 0 { 0 } else { state % jitter });
        t += gap;
    }
    out.sort_unstable();
    out
}

/// Admission times under the record's window.
fn weighted(limit: u32, times: &[Nanos]) -> Vec<Nanos> {
    let q = quota(limit);
    let mut w = Words::fresh(1);
    times
        .iter()
        .copied()
        .filter(|&t| w.check(&q, t).is_ok())
        .collect()
}

/// Admission times under an exact sliding window of 1 s.
fn exact(limit: u32, times: &[Nanos]) -> Vec<Nanos> {
    let mut window = VecDeque::new();
    let mut out = Vec::new();
    for &t in times {
        while window.front().is_some_and(|&a| a + NANOS_PER_SEC <= t) {
            window.pop_front();
        }
        if window.len() < limit as usize {
            window.push_back(t);
            out.push(t);
        }
    }
    out
}

/// (steady, worst) as multiples of the limit.
fn measure(limit: u32, admitted: &[Nanos], from: Nanos, to: Nanos) -> (f64, f64) {
    let steady = admitted.iter().filter(|&&t| t >= from && t < to).count() as f64
        / ((to - from) / NANOS_PER_SEC) as f64;
    let mut worst = 0;
    let mut lo = 0;
    for (hi, &t) in admitted.iter().enumerate() {
        while admitted[lo] + NANOS_PER_SEC <= t {
            lo += 1;
        }
        worst = worst.max(hi + 1 - lo);
    }
    (steady / f64::from(limit), worst as f64 / f64::from(limit))
}

#[test]
fn steady_state_within_one_percent_of_the_exact_window() {
    let (from, to) = (2 * NANOS_PER_SEC, 7 * NANOS_PER_SEC);
    println!("limit/s  offered  jitter ns | weighted steady worst | exact steady worst");
    for limit in [100u32, 1_000, 10_000, 100_000] {
        for (factor, jitter) in [(1.5, 0), (3.0, 0), (2.0, 200_000), (10.0, 50_000)] {
            let times = arrivals(limit, factor, jitter, to);
            let (ws, ww) = measure(limit, &weighted(limit, &times), from, to);
            let (es, ew) = measure(limit, &exact(limit, &times), from, to);
            println!("{limit:>7} ×{factor:<5} {jitter:>9} | {ws:>15.4} {ww:.4} | {es:>12.4} {ew:.4}");
            assert!(
                (0.99..=1.01).contains(&ws),
                "limit {limit} ×{factor}: steady {ws:.4}"
            );
            // Evenly offered load never gets much past the limit in any span.
            assert!(ww <= 1.05, "limit {limit} ×{factor}: worst {ww:.4}");
            assert!(ew <= 1.0);
        }
    }
}

/// The weighted window's known worst case: a client that spends its whole
/// limit at the very end of one second, then floods. The previous second
/// is counted as if spread out, so up to twice the limit fits in the 1 s
/// span that straddles the boundary (the exact window admits the limit).
#[test]
fn worst_case_is_twice_the_limit_for_a_timed_burst() {
    for limit in [100u32, 10_000] {
        let end = NANOS_PER_SEC - 1_000;
        let mut times = vec![end; limit as usize];
        times.extend(
            arrivals(limit, 10.0, 0, 3 * NANOS_PER_SEC)
                .into_iter()
                .filter(|&t| t > end),
        );
        let (_, ww) = measure(limit, &weighted(limit, &times), 0, 3 * NANOS_PER_SEC);
        let (_, ew) = measure(limit, &exact(limit, &times), 0, 3 * NANOS_PER_SEC);
        println!("limit {limit}: timed burst, worst 1 s span: weighted {ww:.4}, exact {ew:.4}");
        assert!(ww <= 2.0, "{ww}");
        assert!(ww > 1.5, "the documented worst case moved: {ww}");
        assert!(ew <= 1.0);
    }
}
