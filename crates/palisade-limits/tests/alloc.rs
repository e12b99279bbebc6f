//! No allocation per decision and bounded memory, proven with a counting allocator.
//!
//! Counting is per thread, so tests running in parallel do not disturb each
//! other; each test does its work on its own thread.
#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use palisade_core::{ClientIpHeader, ManualClock, TrustedProxies};
use palisade_limits::shield::{KeyBy, LimitKey, RequestFacts, RouteConfig, RouteMatch, Shield, ShieldConfig};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only adds thread-local counters,
// which neither allocate nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        let _ = LIVE.try_with(|c| c.set(c.get() + layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|c| c.set(c.get() - layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        let _ = LIVE.try_with(|c| c.set(c.get() + new_size as i64 - layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

fn live() -> i64 {
    LIVE.with(Cell::get)
}

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

fn config(key_by: KeyBy) -> ShieldConfig {
    let mut cfg = ShieldConfig::default();
    cfg.key_by = key_by;
    cfg.trusted_proxies = TrustedProxies::new(
        vec!["192.0.2.0/24".parse().unwrap()],
        ClientIpHeader::XForwardedFor,
    );
    cfg.deny = vec!["203.0.113.0/24".parse().unwrap()];
    cfg.routes = vec![RouteConfig {
        name: "api".into(),
        matcher: RouteMatch {
            path_prefix: Some("/api".into()),
            methods: vec![Method::GET],
            host: Some("example.com".into()),
            case_sensitive: false,
        },
        limit: cfg.limit,
        key: LimitKey::Client,
        rate_headers: None,
        anonymous: None,
    }];
    cfg
}

#[test]
fn steady_state_decisions_allocate_nothing() {
    std::thread::spawn(|| {
        for key_by in [KeyBy::Ip, KeyBy::IpUserAgent] {
            let clock = ManualClock::new();
            let shield = Shield::new(config(key_by), clock.clone());
            let method = Method::GET;
            let mut direct = HeaderMap::new();
            direct.insert("user-agent", HeaderValue::from_static("curl/8.0"));
            // Behind a trusted proxy: the header is parsed on every request.
            let mut proxied = direct.clone();
            proxied.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 10.0.0.7"));
            let facts = |i: u32, headers: &'static HeaderMap| RequestFacts {
                peer: if i.is_multiple_of(2) {
                    ip(i % 1000)
                } else {
                    "192.0.2.1".parse().unwrap()
                },
                method: &method,
                host: Some("example.com:443"),
                path: if i.is_multiple_of(3) { "/api/items" } else { "/" },
                target: "/",
                version: http::Version::HTTP_11,
                headers,
                tls_fingerprint: None,
            };
            let direct: &'static HeaderMap = Box::leak(Box::new(direct));
            let proxied: &'static HeaderMap = Box::leak(Box::new(proxied));
            let pick = |i: u32| if i.is_multiple_of(2) { direct } else { proxied };
            // Warm up: every client gets its table slots.
            for i in 0..2000 {
                let d = shield.decide(&facts(i, pick(i)));
                shield.observe_response(&d, 200);
            }
            let before = allocs();
            let mut allowed = 0;
            for i in 0..20_000u32 {
                clock.advance(Duration::from_micros(50));
                let d = shield.decide(&facts(i, pick(i)));
                shield.observe_response(&d, if i.is_multiple_of(7) { 401 } else { 200 });
                allowed += usize::from(d.rejection.is_none());
            }
            let during = allocs() - before;
            // The counter itself works: one allocation is seen.
            let probe = std::hint::black_box(vec![0u8; 8]);
            assert_eq!(allocs() - before, during + 1);
            drop(probe);
            assert_eq!(during, 0, "{key_by:?}: {during} allocations in 20 000 decisions");
            assert!(allowed > 10_000, "the decisions did real work: {allowed} allowed");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_million_distinct_clients_stay_within_the_bound() {
    std::thread::spawn(|| {
        const CAP: usize = 100_000;
        let clock = ManualClock::new();
        let mut cfg = ShieldConfig::default();
        cfg.max_tracked_clients = CAP;
        let base = live();
        let shield = Shield::new(cfg, clock.clone());
        let method = Method::GET;
        let headers = HeaderMap::new();
        let decide = |i: u32| {
            shield.decide(&RequestFacts {
                peer: ip(i),
                method: &method,
                host: None,
                path: "/",
                target: "/",
                version: http::Version::HTTP_11,
                headers: &headers,
                tls_fingerprint: None,
            })
        };
        for i in 0..CAP as u32 {
            clock.advance(Duration::from_micros(1));
            decide(i);
        }
        let full = live() - base;
        // A flood of 900 000 more distinct sources, 1 µs apart: nobody goes
        // idle, so nobody may be evicted; newcomers share overflow slots.
        for i in CAP as u32..1_000_000 {
            clock.advance(Duration::from_micros(1));
            decide(i);
        }
        let after = live() - base;
        let rep = shield.reputation().unwrap().table();
        let (_, limiter) = shield.limiters().next().unwrap();
        // The tables' bucket arrays are their own mappings, fixed at
        // creation; the heap (counted above) holds the rest.
        // The limiter and reputation share one table; the adaptive breaker
        // has one for every client and one for those out of the closed
        // state (reserved, resident only as such clients arrive).
        let tables = shield.clients().unwrap().bucket_bytes()
            + shield
                .adaptive()
                .map_or(0, |a| a.table().bucket_bytes() + a.full_table().bucket_bytes());
        assert!(rep.len() <= rep.capacity() && rep.capacity() < CAP + 128);
        assert!(limiter.table().len() <= limiter.table().capacity());
        assert!(limiter.table().overflowed() > 0);
        assert!(
            after <= full + (1 << 20),
            "memory grew from {full} to {after} bytes under a key flood"
        );
        println!(
            "{CAP} tracked clients: {:.1} MiB ({} bytes/client: limiter, reputation, adaptive breaker)",
            (after + tables as i64) as f64 / (1 << 20) as f64,
            (after + tables as i64) / CAP as i64
        );
        // Two seconds later everyone is idle: the tables recycle slots
        // instead of overflowing.
        clock.advance(Duration::from_secs(2));
        let overflowed = limiter.table().overflowed();
        for i in 1_000_000..1_000_100 {
            decide(i);
        }
        assert_eq!(limiter.table().overflowed(), overflowed);
        assert!(live() - base <= full + (1 << 20));
    })
    .join()
    .unwrap();
}
