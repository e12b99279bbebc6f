//! Limits keyed by what a request carries (an API key header, a session
//! cookie, a token in the query): shared by every address that sends the
//! key, counted by address when it is absent, and never a way around the
//! per-address default limit.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU32;

use http::{HeaderMap, HeaderValue, Method, Version};
use palisade_core::{ManualClock, Mode, RejectReason};
use palisade_limits::rate::Quota;
use palisade_limits::shield::{
    LimitKey, LimitPolicy, RequestFacts, RouteConfig, RouteMatch, Shield, ShieldConfig,
};

fn policy(rate: u32) -> LimitPolicy {
    LimitPolicy {
        quota: Quota::per_second(NonZeroU32::new(rate).unwrap()),
        mode: Mode::Enforce,
    }
}

/// Default limit `default` per address; `/api` limited to `api` per `key`.
fn shield(default: u32, api: u32, key: LimitKey) -> Shield<ManualClock> {
    let cfg = ShieldConfig {
        limit: Some(policy(default)),
        reputation: None,
        adaptive: None,
        routes: vec![RouteConfig {
            name: "api".into(),
            matcher: RouteMatch {
                path_prefix: Some("/api".into()),
                ..RouteMatch::default()
            },
            limit: Some(policy(api)),
            key,
            rate_headers: None,
            anonymous: None,
        }],
        ..ShieldConfig::default()
    };
    Shield::new(cfg, ManualClock::new())
}

/// Whether `peer`'s request for `target` with `headers` passes.
fn passes(s: &Shield<ManualClock>, peer: &str, target: &str, headers: &[(&'static str, &str)]) -> bool {
    passes_on(s, peer, target, headers, None)
}

/// [`passes`] on a TLS connection whose ClientHello gave `ja4`.
fn passes_on(
    s: &Shield<ManualClock>,
    peer: &str,
    target: &str,
    headers: &[(&'static str, &str)],
    ja4: Option<&str>,
) -> bool {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    let path = target.split('?').next().unwrap();
    let d = s.decide(&RequestFacts {
        peer: peer.parse().unwrap(),
        method: &Method::GET,
        host: Some("example.com"),
        path,
        target,
        version: Version::HTTP_11,
        headers: &h,
        tls_fingerprint: ja4,
    });
    match d.rejection {
        None => true,
        Some(r) => {
            assert_eq!(r.reason, RejectReason::RateLimited);
            false
        }
    }
}

fn count(n: usize, mut f: impl FnMut(usize) -> bool) -> usize {
    (0..n).filter(|&i| f(i)).count()
}

#[test]
fn two_addresses_with_one_api_key_share_its_limit() {
    let s = shield(100, 5, LimitKey::Header("x-api-key".parse().unwrap()));
    let key = [("x-api-key", "team-a")];
    let from = |i: usize| {
        if i.is_multiple_of(2) {
            "198.18.0.1"
        } else {
            "198.18.0.2"
        }
    };
    assert_eq!(count(20, |i| passes(&s, from(i), "/api/x", &key)), 5);
    // Another key has its own 5, from either address.
    assert_eq!(
        count(20, |_| passes(
            &s,
            "198.18.0.1",
            "/api/x",
            &[("x-api-key", "team-b")]
        )),
        5
    );
}

#[test]
fn without_the_key_a_request_is_counted_by_its_address() {
    let s = shield(100, 5, LimitKey::Header("x-api-key".parse().unwrap()));
    assert_eq!(count(20, |_| passes(&s, "198.18.0.3", "/api/x", &[])), 5);
    // An empty key is no key.
    assert_eq!(
        count(5, |_| passes(&s, "198.18.0.3", "/api/x", &[("x-api-key", "")])),
        0
    );
    assert_eq!(
        count(20, |_| passes(&s, "198.18.0.4", "/api/x", &[("x-api-key", "")])),
        5
    );
    // Spending the address's share leaves a keyed client its own.
    assert_eq!(
        count(20, |_| passes(&s, "198.18.0.3", "/api/x", &[("x-api-key", "k")])),
        5
    );
}

/// Failed before keyed limits sat beside the default one: with the route's
/// limit alone, every fresh key was a fresh bucket and all 500 passed.
#[test]
fn rotating_keys_are_stopped_by_the_address_limit() {
    let s = shield(50, 5, LimitKey::Header("x-api-key".parse().unwrap()));
    let passed = count(500, |i| {
        passes(&s, "198.18.0.5", "/api/x", &[("x-api-key", &format!("k{i}"))])
    });
    assert_eq!(passed, 50);
    // Another address is untouched.
    assert!(passes(&s, "198.18.0.6", "/api/x", &[("x-api-key", "k0")]));
}

#[test]
fn cookies_and_query_parameters_key_a_limit_too() {
    let s = shield(100, 3, LimitKey::Cookie("session".into()));
    let cookie = |v: &str| format!("theme=dark; session={v}; lang=en");
    let from = |i: usize| {
        if i.is_multiple_of(2) {
            "198.18.0.7"
        } else {
            "198.18.0.8"
        }
    };
    assert_eq!(
        count(10, |i| passes(&s, from(i), "/api", &[("cookie", &cookie("s1"))])),
        3
    );
    // The cookie in a second Cookie header is found too.
    assert_eq!(
        count(10, |_| passes(
            &s,
            "198.18.0.9",
            "/api",
            &[("cookie", "a=b"), ("cookie", "session=s2")]
        )),
        3
    );
    let s = shield(100, 3, LimitKey::Query("token".into()));
    assert_eq!(count(10, |i| passes(&s, from(i), "/api?a=1&token=t1", &[])), 3);
    // `tokens=` is another parameter: counted by address.
    assert_eq!(count(10, |_| passes(&s, "198.18.0.10", "/api?tokens=t1", &[])), 3);
    assert_eq!(
        count(10, |_| passes(&s, "198.18.0.10", "/api?token=t2#x", &[])),
        3
    );
}

#[test]
fn a_key_of_any_length_costs_one_record() {
    let s = shield(1000, 2, LimitKey::Header("x-api-key".parse().unwrap()));
    let long = "k".repeat(60_000);
    assert_eq!(
        count(5, |_| passes(&s, "198.18.0.11", "/api", &[("x-api-key", &long)])),
        2
    );
    let tracked: Vec<_> = s
        .limiters()
        .map(|(name, l)| (name.to_string(), l.table().len()))
        .collect();
    assert_eq!(tracked, [("default".to_string(), 1), ("api".to_string(), 1)]);
}

#[test]
fn a_ja4_limit_is_shared_by_one_tls_stack_and_plain_http_counts_by_address() {
    let s = shield(100, 5, LimitKey::Ja4);
    let chrome = Some("t13d1516h2_8daaf6152771_d8a2da3f94cd");
    let curl = Some("t13d3112h2_e8f1e7e78f70_b26ce05bbdd6");
    let from = |i: usize| {
        if i.is_multiple_of(2) {
            "198.18.1.1"
        } else {
            "198.18.1.2"
        }
    };
    assert_eq!(count(20, |i| passes_on(&s, from(i), "/api/x", &[], chrome)), 5);
    // Another TLS stack has its own, from an address already counted.
    assert_eq!(count(20, |_| passes_on(&s, "198.18.1.1", "/api/x", &[], curl)), 5);
    // Plain HTTP has no fingerprint: each address its own.
    assert_eq!(count(20, |_| passes_on(&s, "198.18.1.3", "/api/x", &[], None)), 5);
    assert_eq!(count(20, |_| passes_on(&s, "198.18.1.4", "/api/x", &[], None)), 5);
}

#[test]
fn rotating_fingerprints_are_stopped_by_the_address_limit() {
    let s = shield(30, 5, LimitKey::Ja4);
    let passed = count(300, |i| {
        passes_on(
            &s,
            "198.18.1.5",
            "/api/x",
            &[],
            Some(&format!("t13d1516h2_{i:012x}_000000000000")),
        )
    });
    assert_eq!(passed, 30);
}
