//! Decision cost per request with 1 k and 1 M active clients: the full
//! shield (key extraction + reputation + limiter), our limiter alone, and
//! `governor`'s keyed GCRA limiter for comparison.
//!
//! Run: `cargo bench -p palisade-limits --bench decision`
#![allow(missing_docs, clippy::unwrap_used, clippy::field_reassign_with_default)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use palisade_core::{ClientKey, Clock, MonotonicClock};
use palisade_limits::rate::{Quota, RateLimiter};
use palisade_limits::shield::{LimitPolicy, RequestFacts, Shield, ShieldConfig};

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

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    for clients in [1_000u32, 1_000_000] {
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
        let headers = HeaderMap::new();
        let method = Method::GET;
        let facts = |i: u32| RequestFacts {
            peer: ip(i),
            method: &method,
            host: Some("example.com"),
            path: "/api/items",
            headers: &headers,
        };
        for i in 0..clients {
            shield.decide(&facts(i));
        }
        let mut i = 0u32;
        g.bench_function(BenchmarkId::new("shield", clients), |b| {
            b.iter(|| {
                i = (i + 1) % clients;
                black_box(shield.decide(&facts(i)))
            })
        });
        drop(shield);

        let clock = MonotonicClock::new();
        let limiter = RateLimiter::new(quota(), clients as usize);
        let key = |i: u32| ClientKey::from_ip(ip(i), 64);
        for i in 0..clients {
            let _ = limiter.check(&key(i), clock.now());
        }
        g.bench_function(BenchmarkId::new("palisade_limiter", clients), |b| {
            b.iter(|| {
                i = (i + 1) % clients;
                black_box(limiter.check(&key(i), clock.now()).is_ok())
            })
        });
        drop(limiter);

        let gov = governor::RateLimiter::keyed(governor::Quota::per_second(NonZeroU32::new(HIGH).unwrap()));
        for i in 0..clients {
            let _ = gov.check_key(&ip(i));
        }
        g.bench_function(BenchmarkId::new("governor_keyed", clients), |b| {
            b.iter(|| {
                i = (i + 1) % clients;
                black_box(gov.check_key(&ip(i)).is_ok())
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
