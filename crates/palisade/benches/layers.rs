//! Per-request cost of the layers on an axum handler: the bare handler,
//! Palisade's full stack, Palisade's rate limit alone, and tower_governor
//! doing only rate limiting. Limits are set high enough never to refuse,
//! so the machinery is what is measured; clients rotate over 1 000 and
//! 100 000 addresses. Each iteration builds a request (the same for all
//! contenders) and drives the router to the response.
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::Request;
use palisade::{Palisade, Quota, ShieldLayer};
use tower::{Service, ServiceExt};
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;

fn handler() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

fn request(i: u32, clients: u32) -> Request<Body> {
    let ip = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i % clients));
    let mut r = Request::get("/").body(Body::empty()).unwrap();
    r.extensions_mut().insert(ConnectInfo(SocketAddr::new(ip, 40000)));
    r
}

/// Runs `iters` requests through `app` on one current-thread runtime.
fn drive(rt: &tokio::runtime::Runtime, app: &Router, clients: u32, iters: u64) -> Duration {
    rt.block_on(async {
        let mut svc = app.clone();
        #[allow(clippy::disallowed_methods)] // a benchmark measures wall time
        let start = std::time::Instant::now();
        for i in 0..iters {
            let r = ServiceExt::<Request<Body>>::ready(&mut svc)
                .await
                .unwrap()
                .call(request(i as u32, clients))
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }
        start.elapsed()
    })
}

fn contenders() -> Vec<(&'static str, Router)> {
    // Limits that never refuse: the cost of the machinery alone.
    let full = Palisade::builder()
        .rate_limit(10_000_000)
        .max_tracked_clients(200_000)
        .build()
        .unwrap();
    let limit = ShieldLayer::rate_limit(Quota::per_second(NonZeroU32::new(10_000_000).unwrap()));
    let governor = GovernorConfigBuilder::default()
        .per_nanosecond(100)
        .burst_size(1_000_000)
        .finish()
        .unwrap();
    vec![
        ("bare_handler", handler()),
        ("palisade_full_stack", handler().layer(full.layer())),
        (
            "palisade_rate_limit",
            handler().layer(limit.expose_client_ip(false)),
        ),
        ("tower_governor", handler().layer(GovernorLayer::new(governor))),
    ]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("axum_request");
    for clients in [1_000u32, 100_000] {
        for (name, app) in contenders() {
            let mut warm = false;
            g.bench_with_input(BenchmarkId::new(name, clients), &clients, |b, &clients| {
                if !std::mem::replace(&mut warm, true) {
                    // Every client known before measuring (only for the
                    // benchmarks that run, so profiles stay clean).
                    drive(&rt, &app, clients, u64::from(clients));
                }
                b.iter_custom(|iters| drive(&rt, &app, clients, iters));
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
