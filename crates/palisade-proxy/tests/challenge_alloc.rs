//! Checking a clearance cookie and verifying a solution allocate nothing,
//! forged or valid: proven with a counting allocator (per thread, so
//! tests in parallel do not disturb each other).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use palisade_proxy::challenge::{ChallengeSettings, Challenger, Prefix, RouteChallenge, leading_zero_bits};

#[path = "common/counting.rs"]
mod counting;

use counting::allocs;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

#[test]
fn verification_and_clearance_checks_allocate_nothing() {
    let ch = Challenger::new(
        ChallengeSettings {
            secret: Some(b"0123456789abcdef0123456789abcdef".to_vec()),
            clearance_ttl: Duration::from_secs(3600),
            token_ttl: Duration::from_secs(300),
            // One period for a century: no rotation (an allocation) mid-test.
            key_rotation: Duration::from_secs(86_400 * 365 * 100),
            difficulty: 8,
            max_difficulty: 8,
            attack_rps: 500,
            issue_penalty: 1,
            fail_penalty: 5,
            cookie_penalty: 5,
            routes: vec![RouteChallenge::default()],
            block_below: 30,
        },
        None,
    )
    .unwrap();
    let now = palisade_core::unix_now_ms();
    let here = Prefix::of("198.51.100.7".parse().unwrap());
    let there = Prefix::of("203.0.113.7".parse().unwrap());
    let fp = Some(&b"t13d1516h2_8daaf6152771_e5627efa2ab1"[..]);
    let token = ch.issue(here, 1, 8, now);
    let nonce = (0u64..)
        .map(|n| n.to_string())
        .find(|n| {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(token.as_str().as_bytes());
            ctx.update(n.as_bytes());
            leading_zero_bits(ctx.finish().as_ref()) >= 8
        })
        .unwrap();
    let cookie = ch.clearance(here, fp, now);
    let mut forged = cookie.as_str().as_bytes().to_vec();
    forged[20] ^= 1;
    let long = vec![b'A'; 4096];
    let t = token.as_str().as_bytes();
    let before = allocs();
    for _ in 0..1000 {
        assert!(ch.verify(t, nonce.as_bytes(), here, now).is_ok());
        assert!(ch.verify(t, nonce.as_bytes(), there, now).is_err());
        assert!(ch.verify(&long, b"1", here, now).is_err());
        assert!(
            ch.check_clearance(cookie.as_str().as_bytes(), here, fp, now)
                .is_ok()
        );
        assert!(ch.check_clearance(&forged, here, fp, now).is_err());
        assert!(
            ch.check_clearance(cookie.as_str().as_bytes(), there, None, now)
                .is_err()
        );
    }
    assert_eq!(allocs() - before, 0);
}
