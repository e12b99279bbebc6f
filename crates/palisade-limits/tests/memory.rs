//! Resident memory per tracked client of a whole shield (limiter,
//! reputation and adaptive breaker all on), read from the process's RSS:
//! this file holds one test, so nothing else runs in the process meanwhile.
#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
#![cfg(target_os = "linux")]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use http::{HeaderMap, Method};
use palisade_core::ManualClock;
use palisade_limits::shield::{RequestFacts, Shield, ShieldConfig};

fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: usize = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[test]
fn a_shield_holds_each_tracked_client_in_a_few_dozen_bytes() {
    const CAP: usize = 1_000_000;
    let clock = ManualClock::new();
    let mut cfg = ShieldConfig::default();
    cfg.max_tracked_clients = CAP;
    assert!(cfg.adaptive.is_some() && cfg.reputation.is_some());
    let shield = Shield::new(cfg, clock.clone());
    let (method, headers) = (Method::GET, HeaderMap::new());
    let start = rss();
    for i in 0..CAP as u32 {
        clock.advance(Duration::from_micros(1));
        let d = shield.decide(&RequestFacts {
            peer: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i)),
            method: &method,
            host: None,
            path: "/",
            target: "/",
            version: http::Version::HTTP_11,
            headers: &headers,
            tls_fingerprint: None,
        });
        assert!(d.rejection.is_none());
        shield.observe_response(&d, 200);
    }
    let grown = rss().saturating_sub(start);
    let (_, limiter) = shield.limiters().next().unwrap();
    let tracked = limiter.table().len();
    assert!(tracked > CAP * 9 / 10, "{tracked} tracked");
    let per = grown as f64 / tracked as f64;
    println!(
        "{tracked} tracked clients (limiter, reputation, adaptive breaker): {grown} bytes resident more, {per:.1} B per tracked client"
    );
    // A 32-byte record the limiter and reputation share, and the adaptive
    // breaker's 16-byte one (none of these clients leaves the closed state).
    assert!(per < 60.0, "{per} bytes per tracked client");
}
