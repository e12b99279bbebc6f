//! No allocation per decision for the tower layer: an admitted request through `ShieldService`
//! (decision, inner call, response observed) allocates nothing once its
//! client is known. Counted per thread by a counting global allocator.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use http::{Request, Response};
use palisade::{ManualClock, Shield, ShieldConfig, ShieldLayer};
use tower::{Layer, Service};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only bumps a thread-local
// counter, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// An inner service that allocates nothing itself.
#[derive(Clone)]
struct Empty;

impl Service<Request<()>> for Empty {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

#[test]
fn an_admitted_request_allocates_nothing() {
    std::thread::spawn(|| {
        let clock = Arc::new(ManualClock::new());
        // Rate limit, reputation and adaptive breaker all on, limits far above the load.
        let mut cfg = ShieldConfig::default();
        if let Some(l) = &mut cfg.limit {
            l.quota = palisade::Quota::per_second(std::num::NonZeroU32::new(1_000_000).unwrap());
        }
        if let Some((rep, _)) = &mut cfg.reputation {
            rep.flood_threshold = 2_000_000;
        }
        let layer = ShieldLayer::with_shield(Arc::new(Shield::new(cfg, clock))).expose_client_ip(false);
        let services: Vec<_> = (0..1000u32)
            .map(|i| {
                let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i)), 40000);
                layer.layer(Empty).with_peer(peer)
            })
            .collect();
        let mut cx = Context::from_waker(Waker::noop());
        let mut run = |svc: &mut _| {
            let svc: &mut palisade::ShieldService<Empty, _> = svc;
            let fut = pin!(svc.call(Request::new(())));
            match fut.poll(&mut cx) {
                Poll::Ready(Ok(r)) => assert!(r.status().is_success()),
                other => panic!("{other:?}"),
            }
        };
        let mut services = services;
        // Every client known first.
        for svc in &mut services {
            run(svc);
        }
        let before = ALLOCS.with(Cell::get);
        for round in 0..20 {
            for svc in &mut services {
                run(svc);
            }
            assert_eq!(ALLOCS.with(Cell::get), before, "allocated in round {round}");
        }
    })
    .join()
    .unwrap();
}

/// With `RateLimit` fields on every answer, what an admitted request
/// allocates is the two field values and the response's header map (empty
/// until then), nothing per decision.
#[test]
fn rate_limit_fields_cost_their_two_values_and_the_map() {
    std::thread::spawn(|| {
        let clock = Arc::new(ManualClock::new());
        let mut cfg = ShieldConfig::default();
        if let Some(l) = &mut cfg.limit {
            l.quota = palisade::Quota::per_second(std::num::NonZeroU32::new(1_000_000).unwrap());
        }
        if let Some((rep, _)) = &mut cfg.reputation {
            rep.flood_threshold = 2_000_000;
        }
        cfg.rate_headers = palisade::RateHeaders::Always;
        let layer = ShieldLayer::with_shield(Arc::new(Shield::new(cfg, clock))).expose_client_ip(false);
        let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 40000);
        let mut svc = layer.layer(Empty).with_peer(peer);
        let mut cx = Context::from_waker(Waker::noop());
        let mut run = || {
            let fut = pin!(svc.call(Request::new(())));
            match fut.poll(&mut cx) {
                Poll::Ready(Ok(r)) => {
                    assert!(r.headers().contains_key("ratelimit"));
                    drop(r);
                }
                other => panic!("{other:?}"),
            }
        };
        run();
        let before = ALLOCS.with(Cell::get);
        for _ in 0..100 {
            run();
        }
        let per_request = (ALLOCS.with(Cell::get) - before) / 100;
        assert!(per_request <= 4, "{per_request} allocations per request");
    })
    .join()
    .unwrap();
}
