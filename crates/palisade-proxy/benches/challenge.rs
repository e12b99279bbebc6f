//! The challenge's costs per request, beside the 429 answer they stand in
//! for: checking a clearance cookie (every request on a challenged route
//! that carries one), verifying a solution (valid, and forged), issuing a
//! token, rendering the page; and, for the attacker's side, what solving
//! at difficulty 16 costs native code on one core.
//!
//! Run: `cargo bench -p palisade-proxy --bench challenge`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_core::RejectReason;
use palisade_limits::rate::Quota;
use palisade_limits::shield::Rejection;
use palisade_proxy::challenge::{ChallengeSettings, Challenger, Prefix, RouteChallenge, leading_zero_bits};

const NOW: u64 = 1_800_000_000_000;

fn challenger() -> Challenger {
    Challenger::new(
        ChallengeSettings {
            secret: Some(b"0123456789abcdef0123456789abcdef".to_vec()),
            clearance_ttl: Duration::from_secs(3600),
            token_ttl: Duration::from_secs(300),
            key_rotation: Duration::from_secs(86_400 * 365 * 100),
            difficulty: 16,
            max_difficulty: 22,
            attack_rps: 500,
            issue_penalty: 1,
            fail_penalty: 5,
            cookie_penalty: 5,
            routes: vec![RouteChallenge::default()],
            block_below: 30,
        },
        None,
    )
    .unwrap()
}

fn solve(token: &str, d: u32) -> u64 {
    (0u64..)
        .find(|n| {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(token.as_bytes());
            ctx.update(n.to_string().as_bytes());
            leading_zero_bits(ctx.finish().as_ref()) >= d
        })
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let ch = challenger();
    let now = palisade_core::unix_now_ms();
    let prefix = Prefix::of("198.51.100.7".parse().unwrap());
    let fp = Some(&b"t13d1516h2_8daaf6152771_e5627efa2ab1"[..]);
    let token = ch.issue(prefix, 1, 16, now);
    let nonce = solve(token.as_str(), 16).to_string();
    let cookie = ch.clearance(prefix, fp, now);
    let mut forged = cookie.as_str().as_bytes().to_vec();
    forged[10] ^= 1;
    let mut g = c.benchmark_group("challenge");
    g.bench_function("check_clearance", |b| {
        b.iter(|| ch.check_clearance(black_box(cookie.as_str().as_bytes()), prefix, fp, now))
    });
    g.bench_function("check_clearance_forged", |b| {
        b.iter(|| ch.check_clearance(black_box(&forged), prefix, fp, now))
    });
    g.bench_function("verify_solution", |b| {
        b.iter(|| {
            ch.verify(
                black_box(token.as_str().as_bytes()),
                nonce.as_bytes(),
                prefix,
                now,
            )
        })
    });
    g.bench_function("verify_garbage_nonce", |b| {
        b.iter(|| {
            ch.verify(
                black_box(token.as_str().as_bytes()),
                b"99999999999999999999999",
                prefix,
                now,
            )
        })
    });
    g.bench_function("issue_token", |b| {
        b.iter(|| ch.issue(black_box(prefix), 1, 16, now))
    });
    g.bench_function("page", |b| {
        b.iter(|| ch.page(black_box(&token), 16, "/some/page?x=1"))
    });
    let rejection = Rejection {
        reason: RejectReason::RateLimited,
        retry_after_secs: Some(1),
        quota: Some(Quota::per_second(NonZeroU32::new(100).unwrap())),
    };
    g.bench_function("rejection_429", |b| {
        b.iter(|| palisade_proxy::respond::rejection(black_box(&rejection), "default"))
    });
    g.finish();
    let mut g = c.benchmark_group("attacker");
    g.sample_size(20);
    // A fresh token each time: the cost of one solve, 2^16 hashes on average.
    let mut at = NOW;
    g.bench_function("native_solve_d16", |b| {
        b.iter(|| {
            at += 1;
            solve(ch.issue(prefix, 1, 16, at).as_str(), 16)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
