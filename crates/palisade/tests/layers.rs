//! Each layer through tower, with a mock service and a hand-driven clock.
#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use palisade::{
    AdaptiveConfig, BreakerConfig, BreakerLayer, BreakerSettings, BreakerState, ClientIp, ClientIpHeader,
    Clock, IpNet, KeyExtractor, LimitKey, LimitPolicy, ManualClock, Mode, Palisade, PeerAddr, Period, Quota,
    RateHeaders, Refused, RejectReason, ReputationConfig, RequestFacts, Route, Shield, ShieldConfig,
    ShieldLayer, StatusSet,
};
use tower::{Layer, Service, ServiceExt, service_fn};

type Body = Full<Bytes>;

/// A handler answering the status in `status` and counting its calls.
#[derive(Clone, Default)]
struct Mock {
    calls: Arc<AtomicU32>,
    status: Arc<AtomicU16>,
}

impl Mock {
    fn new(status: u16) -> Self {
        let m = Self::default();
        m.status.store(status, Ordering::Relaxed);
        m
    }

    fn service(
        &self,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone
    {
        let (calls, status) = (self.calls.clone(), self.status.clone());
        service_fn(move |req: Request<Body>| {
            calls.fetch_add(1, Ordering::Relaxed);
            let status = status.load(Ordering::Relaxed);
            // Echo the resolved client so tests can see it.
            let client = req.extensions().get::<ClientIp>().map(|c| c.0.to_string());
            async move {
                let mut r = Response::new(Full::new(Bytes::from(client.unwrap_or_default())));
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok::<_, Infallible>(r)
            }
        })
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::Relaxed)
    }
}

fn req(peer: &str) -> Request<Body> {
    let mut r = Request::get("/").body(Body::default()).unwrap();
    r.extensions_mut()
        .insert(PeerAddr(SocketAddr::new(peer.parse().unwrap(), 40000)));
    r
}

async fn status<S, B>(svc: &mut S, r: Request<Body>) -> StatusCode
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(r).await.unwrap().status()
}

async fn text<B: http_body::Body>(r: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let bytes = http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn shield(cfg: ShieldConfig, clock: &Arc<ManualClock>) -> ShieldLayer<Arc<Shield<Arc<ManualClock>>>> {
    ShieldLayer::with_shield(Arc::new(Shield::new(cfg, clock.clone())))
}

fn only_limit(rate: u32) -> ShieldConfig {
    ShieldConfig {
        limit: Some(palisade_limits_policy(rate)),
        reputation: None,
        adaptive: None,
        ..ShieldConfig::default()
    }
}

fn palisade_limits_policy(rate: u32) -> LimitPolicy {
    LimitPolicy {
        quota: Quota::per_second(NonZeroU32::new(rate).unwrap()),
        mode: Mode::Enforce,
    }
}

#[tokio::test]
async fn rate_limit_answers_429_with_headers_per_client_and_refills() {
    let clock = Arc::new(ManualClock::new());
    let mock = Mock::new(200);
    let mut svc = shield(only_limit(3), &clock).layer(mock.service());
    for _ in 0..3 {
        assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::OK);
    }
    let refused = svc.ready().await.unwrap().call(req("192.0.2.1")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["ratelimit-policy"], "\"default\";q=3;w=1");
    assert_eq!(mock.calls(), 3, "a refused request reached the service");
    // Another client has its own allowance.
    assert_eq!(status(&mut svc, req("192.0.2.2")).await, StatusCode::OK);
    clock.advance(Duration::from_secs(1));
    assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::OK);
}

#[tokio::test]
async fn clones_of_the_layer_share_one_table() {
    let clock = Arc::new(ManualClock::new());
    let layer = shield(only_limit(2), &clock);
    let mock = Mock::new(200);
    let mut a = layer.layer(mock.service());
    let mut b = layer.clone().layer(mock.service());
    assert_eq!(status(&mut a, req("192.0.2.1")).await, StatusCode::OK);
    assert_eq!(status(&mut b, req("192.0.2.1")).await, StatusCode::OK);
    assert_eq!(
        status(&mut a, req("192.0.2.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let clock = Arc::new(ManualClock::new());
    let mut cfg = only_limit(1);
    cfg.trusted_proxies = palisade::TrustedProxies::new(
        vec!["10.0.0.0/8".parse::<IpNet>().unwrap()],
        ClientIpHeader::XForwardedFor,
    );
    let mock = Mock::new(200);
    let mut svc = shield(cfg, &clock).layer(mock.service());
    let with_xff = |peer: &str, client: &str| {
        let mut r = req(peer);
        r.headers_mut().insert("x-forwarded-for", client.parse().unwrap());
        r
    };
    // Through the trusted balancer, two clients are two clients...
    let r = svc
        .ready()
        .await
        .unwrap()
        .call(with_xff("10.0.0.1", "198.51.100.7"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(text(r).await, "198.51.100.7");
    assert_eq!(
        status(&mut svc, with_xff("10.0.0.1", "198.51.100.8")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&mut svc, with_xff("10.0.0.1", "198.51.100.7")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // ...but a direct client cannot pick a fresh identity per request.
    assert_eq!(
        status(&mut svc, with_xff("192.0.2.9", "203.0.113.1")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&mut svc, with_xff("192.0.2.9", "203.0.113.2")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn reputation_refuses_an_error_streak_then_forgives() {
    let clock = Arc::new(ManualClock::new());
    let rep = ReputationConfig::default();
    let cfg = ShieldConfig {
        limit: None,
        reputation: Some((rep.clone(), Mode::Enforce)),
        adaptive: None,
        ..ShieldConfig::default()
    };
    let mock = Mock::new(401);
    let mut svc = shield(cfg, &clock).layer(mock.service());
    let mut answered = 0;
    while status(&mut svc, req("192.0.2.1")).await == StatusCode::UNAUTHORIZED {
        answered += 1;
        assert!(answered < 1000, "never refused");
    }
    assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::FORBIDDEN);
    // Points needed back to cross the threshold, at the configured pace.
    let deficit = f64::from(rep.initial - rep.block_below);
    clock.advance(Duration::from_secs_f64(
        60.0 * deficit / rep.recovery_per_minute + 1.0,
    ));
    mock.status.store(200, Ordering::Relaxed);
    assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::OK);
}

#[tokio::test]
async fn adaptive_breaker_stops_a_client_whose_requests_fail() {
    let clock = Arc::new(ManualClock::new());
    let cfg = ShieldConfig {
        limit: None,
        reputation: None,
        adaptive: Some((AdaptiveConfig::default(), Mode::Enforce)),
        ..ShieldConfig::default()
    };
    let mock = Mock::new(500);
    let mut svc = shield(cfg, &clock).layer(mock.service());
    let mut refused = None;
    for _ in 0..200 {
        let s = status(&mut svc, req("192.0.2.1")).await;
        if s != StatusCode::INTERNAL_SERVER_ERROR {
            refused = Some(s);
            break;
        }
        clock.advance(Duration::from_millis(10));
    }
    let refused = refused.expect("the failing client was never slowed down");
    assert!(
        refused == StatusCode::SERVICE_UNAVAILABLE || refused == StatusCode::TOO_MANY_REQUESTS,
        "{refused}"
    );
    // Someone else is not affected.
    mock.status.store(200, Ordering::Relaxed);
    assert_eq!(status(&mut svc, req("192.0.2.2")).await, StatusCode::OK);
}

fn breaker_settings() -> BreakerSettings {
    BreakerSettings {
        rules: BreakerConfig {
            min_requests: 5,
            failure_ratio: 0.6,
            interval: 10_000_000_000,
            open_for: 1_000_000_000,
            probes: 2,
        },
        failure_statuses: StatusSet::server_errors(),
    }
}

#[tokio::test]
async fn classic_breaker_opens_skips_the_service_then_probes_close_it() {
    let clock = Arc::new(ManualClock::new());
    let mock = Mock::new(503);
    let layer = BreakerLayer::with_clock(breaker_settings(), clock.clone());
    let mut svc = layer.layer(mock.service());
    for _ in 0..5 {
        assert_eq!(
            status(&mut svc, req("192.0.2.1")).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(mock.calls(), 5);
    let r = svc.ready().await.unwrap().call(req("192.0.2.2")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(mock.calls(), 5, "an open breaker called the service");
    clock.advance(Duration::from_millis(1001));
    mock.status.store(200, Ordering::Relaxed);
    for _ in 0..2 {
        assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::OK);
    }
    assert_eq!(
        layer.breaker().unwrap().state(clock.now()).0,
        BreakerState::Closed
    );
}

#[tokio::test]
async fn a_breaker_503_is_not_held_against_the_client() {
    let clock = Arc::new(ManualClock::new());
    let p = Palisade::builder()
        .clock(clock.clone())
        .no_rate_limit()
        .breaker(breaker_settings())
        .build()
        .unwrap();
    let mock = Mock::new(500);
    let mut svc = p.layer().layer(mock.service());
    for _ in 0..5 {
        assert_eq!(
            status(&mut svc, req("192.0.2.1")).await,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    // The breaker is open now: its 503s come without calling the service,
    // and a client that keeps asking is not pushed into its adaptive
    // breaker or lower reputation by them (50: under the flood threshold).
    for _ in 0..50 {
        let r = svc.ready().await.unwrap().call(req("192.0.2.1")).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
    }
    assert_eq!(mock.calls(), 5);
    let key = p.shield().key_for_ip("192.0.2.1".parse().unwrap());
    let score = p.shield().reputation().unwrap().score(&key, clock.now());
    assert_eq!(score, f64::from(ReputationConfig::default().initial));
    let troubled = p.shield().adaptive().unwrap().state_counts();
    assert!(troubled.iter().all(|(_, n)| *n == 0), "{troubled:?}");
}

#[tokio::test]
async fn errors_variant_returns_refusals_as_errors() {
    let clock = Arc::new(ManualClock::new());
    let mock = Mock::new(200);
    let mut svc = shield(only_limit(1), &clock).errors().layer(mock.service());
    assert!(svc.ready().await.unwrap().call(req("192.0.2.1")).await.is_ok());
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("192.0.2.1"))
        .await
        .unwrap_err();
    let refused = err.downcast_ref::<Refused>().expect("a Refused error");
    assert_eq!(refused.rejection.reason, RejectReason::RateLimited);
    assert_eq!(refused.response.status(), StatusCode::TOO_MANY_REQUESTS);
    // No peer address: an error that says how to fix it.
    let no_peer = Request::get("/").body(Body::default()).unwrap();
    let err = svc.ready().await.unwrap().call(no_peer).await.unwrap_err();
    assert!(
        err.to_string().contains("into_make_service_with_connect_info"),
        "{err}"
    );
}

#[tokio::test]
async fn without_a_peer_address_the_answer_is_500_not_a_pass() {
    let clock = Arc::new(ManualClock::new());
    let mock = Mock::new(200);
    let mut svc = shield(only_limit(100), &clock).layer(mock.service());
    let no_peer = Request::get("/").body(Body::default()).unwrap();
    assert_eq!(status(&mut svc, no_peer).await, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(mock.calls(), 0);
    // A service built per connection knows its peer.
    let mut per_conn = shield(only_limit(100), &clock)
        .layer(mock.service())
        .with_peer("192.0.2.5:1234".parse().unwrap());
    let r = per_conn
        .ready()
        .await
        .unwrap()
        .call(Request::get("/").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(text(r).await, "192.0.2.5");
}

#[tokio::test]
async fn builder_reports_the_setting_it_refuses() {
    let e = Palisade::builder().rate_limit(0).build().err().unwrap();
    assert_eq!(e.setting, "rate_limit.rate");
    let e = Palisade::builder().route("api", "api", 5).build().err().unwrap();
    assert_eq!(e.setting, "routes[0].path_prefix");
    let e = Palisade::builder()
        .route("a", "/a", 5)
        .route("a", "/b", 5)
        .build()
        .err()
        .unwrap();
    assert_eq!(e.setting, "routes[1].name");
    let e = Palisade::builder().max_tracked_clients(0).build().err().unwrap();
    assert_eq!(
        e.to_string(),
        "palisade: clients.max_tracked: must be between 1 and 20000000"
    );
}

/// On the injected clock: 5 a minute passes 5, refuses the sixth for 12 s,
/// and admits one more 12 s later.
#[tokio::test]
async fn five_a_minute_through_the_layer() {
    let clock = Arc::new(ManualClock::new());
    let p = Palisade::builder()
        .clock(clock.clone())
        .rate_limit_per(5, Period::Minute)
        .build()
        .unwrap();
    let mock = Mock::new(200);
    let mut svc = p.layer().layer(mock.service());
    for _ in 0..5 {
        assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::OK);
    }
    let refused = svc.ready().await.unwrap().call(req("192.0.2.1")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "12");
    assert_eq!(refused.headers()["ratelimit-policy"], "\"default\";q=5;w=60");
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        status(&mut svc, req("192.0.2.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::OK);
    assert_eq!(
        status(&mut svc, req("192.0.2.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(mock.calls(), 6);
}

/// A default limit keyed by header: two addresses with one key share it.
#[tokio::test]
async fn a_keyed_default_limit_through_the_layer() {
    let clock = Arc::new(ManualClock::new());
    let p = Palisade::builder()
        .clock(clock.clone())
        .rate_limit(4)
        .rate_limit_key(LimitKey::Header("x-api-key".parse().unwrap()))
        .no_reputation()
        .no_adaptive_breaker()
        .build()
        .unwrap();
    let mock = Mock::new(200);
    let mut svc = p.layer().layer(mock.service());
    let mut ok = 0;
    for i in 0..10u32 {
        let mut r = req(if i.is_multiple_of(2) {
            "192.0.2.1"
        } else {
            "192.0.2.2"
        });
        r.headers_mut().insert("x-api-key", "k".parse().unwrap());
        if status(&mut svc, r).await == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 4);
}

/// Keys on the first path segment after `/t/`; nothing elsewhere.
#[derive(Debug)]
struct Tenant;

impl KeyExtractor for Tenant {
    fn key<'r>(&self, req: &RequestFacts<'r>) -> Option<Cow<'r, [u8]>> {
        let tenant = req.path.strip_prefix("/t/")?.split('/').next()?;
        Some(Cow::Borrowed(tenant.as_bytes()))
    }
}

/// A custom extractor's key is what the limit counts: two addresses on one
/// tenant share its 3, another tenant has its own 3, and every request is
/// also charged to its address on the default limit (10 here).
#[tokio::test]
async fn a_custom_key_extractor_through_the_layer() {
    let clock = Arc::new(ManualClock::new());
    let three = Quota::per_second(NonZeroU32::new(3).unwrap());
    let p = Palisade::builder()
        .clock(clock.clone())
        .rate_limit(10)
        .limited_route(Route::new("tenants", "/t", three).key(LimitKey::Custom(Arc::new(Tenant))))
        .no_reputation()
        .no_adaptive_breaker()
        .build()
        .unwrap();
    let mock = Mock::new(200);
    let mut svc = p.layer().layer(mock.service());
    let mut ok = Vec::new();
    for (peer, path) in [
        ("192.0.2.1", "/t/acme/x"),
        ("192.0.2.2", "/t/acme/y"),
        ("192.0.2.1", "/t/acme/z"),
        ("192.0.2.2", "/t/acme/x"),
        ("192.0.2.1", "/t/globex/x"),
        ("192.0.2.1", "/t/globex/y"),
        ("192.0.2.1", "/t/globex/z"),
        ("192.0.2.1", "/t/globex/w"),
    ] {
        let mut r = req(peer);
        *r.uri_mut() = path.parse().unwrap();
        ok.push(status(&mut svc, r).await == StatusCode::OK);
    }
    assert_eq!(ok, [true, true, true, false, true, true, true, false]);
}

/// A route built with everything the config file can say: 2 a minute per
/// API key, 1 a minute for requests without one, `RateLimit` on every
/// response. Two addresses share a key's 2; an anonymous client has its 1;
/// a minute later each has its own again.
#[tokio::test]
async fn a_route_with_a_period_a_key_and_an_anonymous_limit() {
    let clock = Arc::new(ManualClock::new());
    let per_minute = |n| Quota::per(NonZeroU32::new(n).unwrap(), Period::Minute);
    let p = Palisade::builder()
        .clock(clock.clone())
        .rate_limit(100)
        .limited_route(
            Route::new("api", "/api", per_minute(2))
                .key(LimitKey::Header("x-api-key".parse().unwrap()))
                .anonymous(per_minute(1))
                .headers(RateHeaders::Always),
        )
        .no_reputation()
        .no_adaptive_breaker()
        .build()
        .unwrap();
    let mock = Mock::new(200);
    let mut svc = p.layer().layer(mock.service());
    let call = |peer: &str, key: Option<&str>| {
        let mut r = req(peer);
        *r.uri_mut() = "/api/items".parse().unwrap();
        if let Some(k) = key {
            r.headers_mut().insert("x-api-key", k.parse().unwrap());
        }
        r
    };
    let mut seen = Vec::new();
    for (peer, key) in [
        ("192.0.2.1", Some("k1")),
        ("192.0.2.2", Some("k1")),
        ("192.0.2.1", Some("k1")),
        ("192.0.2.3", None),
        ("192.0.2.3", None),
    ] {
        let r = svc.ready().await.unwrap().call(call(peer, key)).await.unwrap();
        let policy = r
            .headers()
            .get("ratelimit-policy")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.push((r.status().as_u16(), policy));
    }
    let statuses: Vec<u16> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 429, 200, 429]);
    assert!(
        seen.iter()
            .all(|(_, p)| p.as_deref().is_some_and(|p| p.contains("w=60"))),
        "every response names its per-minute policy: {seen:?}"
    );
    clock.advance(Duration::from_secs(60));
    let r = svc
        .ready()
        .await
        .unwrap()
        .call(call("192.0.2.3", None))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the anonymous minute is over");
}

#[tokio::test]
async fn a_route_without_a_request_key_has_no_anonymous_limit() {
    let one = Quota::per_second(NonZeroU32::MIN);
    let e = Palisade::builder()
        .limited_route(Route::new("api", "/api", one).anonymous(one))
        .build()
        .err()
        .unwrap();
    assert_eq!(e.setting, "routes[0].anonymous_rate");
}

#[tokio::test]
async fn shadow_mode_counts_but_lets_everything_through() {
    let clock = Arc::new(ManualClock::new());
    let p = Palisade::builder()
        .clock(clock.clone())
        .rate_limit(1)
        .shadow()
        .build()
        .unwrap();
    let mock = Mock::new(200);
    let mut svc = p.layer().layer(mock.service());
    for _ in 0..10 {
        assert_eq!(status(&mut svc, req("192.0.2.1")).await, StatusCode::OK);
    }
    assert_eq!(mock.calls(), 10);
}

#[tokio::test]
async fn store_entries_decide_before_everything_else() {
    let csv = "192.0.2.66,0,abuse,deny\n192.0.2.67,90,partner,allow\n192.0.2.68,10,spam\n";
    let snapshot = palisade_store::Builder::from_csv(csv.as_bytes(), "t.csv")
        .unwrap()
        .finish(palisade_store::BuildOptions::default())
        .unwrap();
    let store = Arc::new(palisade::StoreCell::new(snapshot, None));
    let clock = Arc::new(ManualClock::new());
    let p = Palisade::builder()
        .clock(clock)
        .rate_limit(1)
        .store(store)
        .build()
        .unwrap();
    let mock = Mock::new(200);
    let mut svc = p.layer().layer(mock.service());
    assert_eq!(status(&mut svc, req("192.0.2.66")).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&mut svc, req("192.0.2.68")).await, StatusCode::FORBIDDEN);
    for _ in 0..5 {
        assert_eq!(
            status(&mut svc, req("192.0.2.67")).await,
            StatusCode::OK,
            "allow skips the limit"
        );
    }
    assert_eq!(status(&mut svc, req("192.0.2.69")).await, StatusCode::OK);
    assert_eq!(mock.calls(), 6);
}
