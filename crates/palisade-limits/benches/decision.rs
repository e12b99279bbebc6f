//! Decision cost per request with 1 k, 1 M and 10 M active clients: the
//! full shield (key extraction + reputation + limiter + adaptive breaker),
//! the 32-byte client record table alone, our limiter alone, and `governor`'s keyed GCRA limiter for comparison;
//! and decisions per second with two threads deciding at once.
//!
//! Run: `cargo bench -p palisade-limits --bench decision`
#![allow(missing_docs, clippy::unwrap_used, clippy::field_reassign_with_default)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use palisade_core::{ClientKey, Clock, MonotonicClock};
use palisade_limits::clients::Clients;
use palisade_limits::rate::{Quota, RateLimiter};
use palisade_limits::shield::{Decision, LimitPolicy, RequestFacts, Shield, ShieldConfig};

/// Limits far above what the bench sends: the cost of the machinery is
/// measured, not the cost of refusing.
const HIGH: u32 = 1_000_000_000;

fn ip(i: u32) -> IpAddr {
    // Spread keys over the address space like real clients.
    IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)))
}

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(HIGH).unwrap())
}

fn key(i: u32) -> ClientKey {
    ClientKey::from_ip(ip(i), 64)
}

/// A shield with default protection that has seen every one of `clients`.
fn shield(clients: u32) -> Shield<MonotonicClock> {
    let mut cfg = ShieldConfig::default();
    cfg.max_tracked_clients = clients as usize;
    cfg.limit = Some(LimitPolicy {
        quota: quota(),
        mode: palisade_core::Mode::Enforce,
    });
    if let Some((rep, _)) = cfg.reputation.as_mut() {
        rep.flood_threshold = HIGH;
    }
    let shield = Shield::new(cfg, MonotonicClock::new());
    for i in 0..clients {
        decide(&shield, i);
    }
    shield
}

fn decide(shield: &Shield<MonotonicClock>, i: u32) -> Decision {
    static HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);
    shield.decide(&RequestFacts {
        peer: ip(i),
        method: &Method::GET,
        host: Some("example.com"),
        path: "/api/items",
        target: "/",
        version: http::Version::HTTP_11,
        headers: &HEADERS,
        tls_fingerprint: None,
    })
}

fn limiter(clients: u32, clock: &MonotonicClock) -> RateLimiter {
    let limiter = RateLimiter::new(quota(), clients as usize);
    for i in 0..clients {
        let _ = limiter.check(&key(i), clock.now());
    }
    limiter
}

/// The one-record table alone: lookup, lock, window and bucket.
fn records(clients: u32, clock: &MonotonicClock) -> Clients {
    let table = Clients::new(clients as usize);
    let q = quota();
    for i in 0..clients {
        let now = clock.now();
        table.with(&key(i), now, |w, _| w.check(&q, now).is_ok());
    }
    table
}

fn governor(clients: u32) -> governor::DefaultKeyedRateLimiter<IpAddr> {
    let gov = governor::RateLimiter::keyed(governor::Quota::per_second(NonZeroU32::new(HIGH).unwrap()));
    for i in 0..clients {
        let _ = gov.check_key(&ip(i));
    }
    gov
}

fn per_decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u32;
    for clients in [1_000u32, 1_000_000] {
        let shield = shield(clients);
        g.bench_function(BenchmarkId::new("shield", clients), |b| {
            b.iter(|| {
                i = (i + 1) % clients;
                black_box(decide(&shield, i))
            })
        });
        drop(shield);
        limiter_and_governor(&mut g, clients, &mut i);
    }
    g.finish();

    // Ten million clients: the limiter and governor only (the shield's
    // three tables would take ~7 GiB at this size).
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1)).sample_size(10);
    limiter_and_governor(&mut g, 10_000_000, &mut i);
    g.finish();
}

fn limiter_and_governor(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    clients: u32,
    i: &mut u32,
) {
    let clock = MonotonicClock::new();
    let table = records(clients, &clock);
    let q = quota();
    g.bench_function(BenchmarkId::new("client_record", clients), |b| {
        b.iter(|| {
            *i = (*i + 1) % clients;
            let now = clock.now();
            black_box(table.with(&key(*i), now, |w, _| w.check(&q, now).is_ok()))
        })
    });
    drop(table);
    let limiter = limiter(clients, &clock);
    g.bench_function(BenchmarkId::new("palisade_limiter", clients), |b| {
        b.iter(|| {
            *i = (*i + 1) % clients;
            black_box(limiter.check(&key(*i), clock.now()).is_ok())
        })
    });
    drop(limiter);
    let gov = governor(clients);
    g.bench_function(BenchmarkId::new("governor_keyed", clients), |b| {
        b.iter(|| {
            *i = (*i + 1) % clients;
            black_box(gov.check_key(&ip(*i)).is_ok())
        })
    });
}

/// `iters` calls of `f` split over two threads, each walking its own half
/// of the keys; returns the wall time for all of them, so criterion's
/// elements/s is decisions per second on two threads.
// Wall time is what is measured here.
#[allow(clippy::disallowed_methods)]
fn on_two_threads(iters: u64, clients: u32, f: impl Fn(u32) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2u32 {
            let f = &f;
            s.spawn(move || {
                let mut i = t * (clients / 2);
                for _ in 0..iters / 2 {
                    i = (i + 1) % clients;
                    f(i);
                }
            });
        }
    });
    start.elapsed()
}

fn two_threads(c: &mut Criterion) {
    const CLIENTS: u32 = 1_000_000;
    let mut g = c.benchmark_group("decision_two_threads");
    g.throughput(Throughput::Elements(1));
    let shield = shield(CLIENTS);
    g.bench_function(BenchmarkId::new("shield", CLIENTS), |b| {
        b.iter_custom(|iters| {
            on_two_threads(iters, CLIENTS, |i| {
                black_box(decide(&shield, i));
            })
        })
    });
    drop(shield);
    let clock = MonotonicClock::new();
    let limiter = limiter(CLIENTS, &clock);
    g.bench_function(BenchmarkId::new("palisade_limiter", CLIENTS), |b| {
        b.iter_custom(|iters| {
            on_two_threads(iters, CLIENTS, |i| {
                black_box(limiter.check(&key(i), clock.now()).is_ok());
            })
        })
    });
    drop(limiter);
    let gov = governor(CLIENTS);
    g.bench_function(BenchmarkId::new("governor_keyed", CLIENTS), |b| {
        b.iter_custom(|iters| {
            on_two_threads(iters, CLIENTS, |i| {
                black_box(gov.check_key(&ip(i)).is_ok());
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = per_decision, two_threads
}
criterion_main!(benches);
