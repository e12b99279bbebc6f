//! Upstream pools over real sockets: routes send requests to named pools
//! by host and by path prefix, and a pool shares its requests by weight,
//! each counted where it lands, at the upstream servers themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use common::{Client, Harness, demo};
use http::{Request, StatusCode};
use http_body_util::Full;

/// A demo upstream serving in the background; its hit counter.
async fn upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let (addr, hits, serve) = demo().await;
    tokio::spawn(serve);
    (addr, hits)
}

/// The status of `GET path` with `Host: host`; the demo upstream answers
/// 200 for `/`, 404 for paths it does not know.
async fn get(c: &mut Client, host: &str, path: &str) -> StatusCode {
    let req = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.send(req).await.0
}

fn counts(hits: &[&Arc<AtomicU64>]) -> Vec<u64> {
    hits.iter().map(|h| h.load(Ordering::Relaxed)).collect()
}

#[tokio::test]
async fn routes_send_requests_to_their_pool_by_host_and_by_path_prefix() {
    let (api, api_hits) = upstream().await;
    let (site, site_hits) = upstream().await;
    let rest = format!(
        "[[upstreams]]\nname = \"api\"\nmembers = [{{ url = \"http://{api}\" }}]\n\
         [[upstreams]]\nname = \"site\"\nmembers = [{{ url = \"http://{site}\" }}]\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api/\"\nupstream = \"api\"\n\
         [[routes]]\nname = \"site\"\nhost = \"www.example.test\"\nupstream = \"site\"\n"
    );
    let h = Harness::start("", &rest).await;
    let mut c = h.client("127.0.0.2").await;
    let all = [&h.upstream_hits, &api_hits, &site_hits];

    assert_eq!(get(&mut c, "test.local", "/").await, StatusCode::OK);
    assert_eq!(counts(&all), [1, 0, 0], "no route: the default pool");
    for _ in 0..3 {
        assert_eq!(get(&mut c, "test.local", "/api/x").await, StatusCode::NOT_FOUND);
    }
    assert_eq!(counts(&all), [1, 3, 0], "/api/ goes to the api pool");
    for _ in 0..2 {
        assert_eq!(get(&mut c, "WWW.Example.Test.", "/").await, StatusCode::OK);
    }
    assert_eq!(counts(&all), [1, 3, 2], "the virtual host goes to the site pool");
    // /api/ on the virtual host: the first route that matches decides.
    assert_eq!(
        get(&mut c, "www.example.test", "/api/x").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(counts(&all), [1, 4, 2]);
    // Another host, a path outside /api/: the default pool again.
    assert_eq!(get(&mut c, "other.test", "/apix").await, StatusCode::NOT_FOUND);
    assert_eq!(counts(&all), [2, 4, 2]);
}

/// A client on the default host trying to reach another pool by making the
/// route and the upstream read two different hosts: an absolute-form
/// target naming the other host beside its own `Host`, or an HTTP/2
/// `:authority` beside a `Host` that disagrees. Each is refused with 400
/// and no pool sees it; spellings of one host (case, trailing dot, port)
/// are that host, and an absolute-form target alone is routed by its host.
#[tokio::test]
async fn no_spelling_of_the_request_reaches_a_pool_its_host_does_not_name() {
    let (site, site_hits) = upstream().await;
    let rest = format!(
        "[[upstreams]]\nname = \"site\"\nmembers = [{{ url = \"http://{site}\" }}]\n\
         [[routes]]\nname = \"site\"\nhost = \"www.example.test\"\nupstream = \"site\"\n"
    );
    let h = Harness::start("", &rest).await;
    let all = [&h.upstream_hits, &site_hits];
    let status = |answer: String| answer.get(9..12).unwrap_or_default().to_owned();
    for (i, head) in [
        "GET http://www.example.test/ HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n",
        "GET http://test.local/ HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n",
        "GET http://www.example.test:8080/ HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: www.example.test\r\nHost: test.local\r\nConnection: close\r\n\r\n",
    ]
    .iter()
    .enumerate()
    {
        let answer = common::raw_exchange("127.0.0.4", h.proxy(), head.as_bytes()).await;
        assert_eq!(status(answer), "400", "case {i}: {head:?}");
    }
    assert_eq!(counts(&all), [0, 0], "no pool saw a request whose hosts disagree");
    for (i, head) in [
        "GET http://www.example.test/ HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n",
        "GET http://WWW.example.test.:80/ HTTP/1.1\r\nHost: www.Example.TEST\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: www.example.test:8443\r\nConnection: close\r\n\r\n",
    ]
    .iter()
    .enumerate()
    {
        let answer = common::raw_exchange("127.0.0.4", h.proxy(), head.as_bytes()).await;
        assert_eq!(status(answer), "200", "case {i}: {head:?}");
    }
    assert_eq!(counts(&all), [0, 3], "one host, however spelled, is the site's");

    // HTTP/2: :authority and Host must name one host.
    let mut h2 = common::h2_client("127.0.0.5", h.proxy()).await;
    let mut send = |uri: &str, host: Option<&str>| {
        let mut req = Request::get(uri);
        if let Some(host) = host {
            req = req.header("host", host);
        }
        h2.send_request(req.body(Full::new(Bytes::new())).unwrap())
    };
    let refused = send("http://test.local/", Some("www.example.test"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let refused = send("http://www.example.test/", Some("test.local"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(counts(&all), [0, 3]);
    let served = send("http://www.example.test/", Some("WWW.example.test."))
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(counts(&all), [0, 4]);
    h.running.shutdown().await;
}

#[tokio::test]
async fn weights_three_to_one_share_requests_exactly() {
    let (a, a_hits) = upstream().await;
    let (b, b_hits) = upstream().await;
    let rest = format!(
        "[[upstreams]]\nname = \"w\"\nmembers = [{{ url = \"http://{a}\", weight = 3 }}, {{ url = \"http://{b}\" }}]\n\
         [[routes]]\nname = \"w\"\nhost = \"w.test\"\nupstream = \"w\"\n"
    );
    let h = Harness::start("", &rest).await;
    // Two clients, to stay clear of the per-client limit.
    for source in ["127.0.0.2", "127.0.0.3"] {
        let mut c = h.client(source).await;
        for _ in 0..40 {
            assert_eq!(get(&mut c, "w.test", "/").await, StatusCode::OK);
        }
    }
    // Smooth weighted round-robin is exact over every four requests.
    assert_eq!(counts(&[&a_hits, &b_hits, &h.upstream_hits]), [60, 20, 0]);
}

/// An upstream whose `/healthz` answers `health` (a status code), and
/// `/fail` 500; it counts the requests that are not health checks.
struct Checked {
    addr: std::net::SocketAddr,
    health: Arc<std::sync::atomic::AtomicU16>,
    served: Arc<AtomicU64>,
}

async fn checked_upstream() -> Checked {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let served = Arc::new(AtomicU64::new(0));
    let (h, s) = (health.clone(), served.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (h, s) = (h.clone(), s.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let status = match req.uri().path() {
                        "/healthz" => {
                            assert_eq!(req.headers()["user-agent"], "palisade-health-check");
                            h.load(Ordering::SeqCst)
                        }
                        "/fail" => {
                            s.fetch_add(1, Ordering::SeqCst);
                            500
                        }
                        _ => {
                            s.fetch_add(1, Ordering::SeqCst);
                            200
                        }
                    };
                    let mut r = http::Response::new(Full::new(Bytes::from_static(b"ok\n")));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap();
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Checked { addr, health, served }
}

/// The admin API's view of `member` in `pool`.
async fn member_json(h: &Harness, pool: &str, member: std::net::SocketAddr) -> serde_json::Value {
    let (status, body) = h.admin_request("GET", "/api/v1/pools", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pool)
        .and_then(|p| {
            p["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["member"] == member.to_string())
                .cloned()
        })
        .unwrap_or_else(|| panic!("no member {member} of {pool} in {body}"))
}

/// Polls the admin API until `member`'s health state is `state` (checks
/// run every 100 ms; bounded, so a member that never changes fails).
async fn wait_state(h: &Harness, member: std::net::SocketAddr, state: &str) -> serde_json::Value {
    for _ in 0..200 {
        let m = member_json(h, "h", member).await;
        if m["health"]["state"] == state {
            return m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!(
        "{member} never became {state}: {}",
        member_json(h, "h", member).await
    );
}

const CHECKED_POOL: &str = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", rise = 2, fall = 3 }\n\
     [[routes]]\nname = \"h\"\nhost = \"h.test\"\nupstream = \"h\"\n";

#[tokio::test]
async fn a_member_failing_its_health_checks_leaves_rotation_and_comes_back() {
    let a = checked_upstream().await;
    let b = checked_upstream().await;
    let rest = format!(
        "[[upstreams]]\nname = \"h\"\nmembers = [{{ url = \"http://{}\" }}, {{ url = \"http://{}\" }}]\n{CHECKED_POOL}",
        a.addr, b.addr
    );
    let h = Harness::start("", &rest).await;
    let mut c = h.client("127.0.0.2").await;
    for _ in 0..10 {
        assert_eq!(get(&mut c, "h.test", "/").await, StatusCode::OK);
    }
    assert_eq!(counts(&[&a.served, &b.served]), [5, 5]);

    a.health.store(503, Ordering::SeqCst);
    let m = wait_state(&h, a.addr, "down").await;
    assert!(m["health"]["consecutive_failures"].as_u64().unwrap() >= 3, "{m}");
    assert_eq!(m["health"]["last_error"], "status 503 (expected 200)", "{m}");
    assert_eq!(m["breaker"], "open", "fed to the breaker: {m}");
    let metrics = h.metrics().await;
    let member = format!("pool=\"h\",member=\"{}\"", a.addr);
    assert_eq!(
        common::metric(&metrics, &format!("palisade_upstream_member_up{{{member}}}")),
        0.0
    );
    assert!(
        common::metric(
            &metrics,
            &format!("palisade_upstream_health_checks_total{{{member},result=\"failure\"}}")
        ) >= 3.0
    );
    let b_member = format!("pool=\"h\",member=\"{}\"", b.addr);
    assert_eq!(
        common::metric(&metrics, &format!("palisade_upstream_member_up{{{b_member}}}")),
        1.0
    );
    // Out of rotation: no client request reaches it.
    for _ in 0..10 {
        assert_eq!(get(&mut c, "h.test", "/").await, StatusCode::OK);
    }
    assert_eq!(counts(&[&a.served, &b.served]), [5, 15]);

    a.health.store(200, Ordering::SeqCst);
    let m = wait_state(&h, a.addr, "up").await;
    assert_eq!(m["health"]["consecutive_failures"], 0, "{m}");
    assert_eq!(m["breaker"], "half_open", "back: probes decide: {m}");
    for _ in 0..10 {
        assert_eq!(get(&mut c, "h.test", "/").await, StatusCode::OK);
    }
    let served = counts(&[&a.served, &b.served]);
    assert!(served[0] > 5, "back in rotation: {served:?}");
    assert_eq!(served[0] + served[1], 30);
}

#[tokio::test]
async fn failures_a_client_causes_through_palisade_do_not_make_a_member_look_down() {
    let a = checked_upstream().await;
    let rest = format!(
        "[[upstreams]]\nname = \"h\"\nmembers = [{{ url = \"http://{}\" }}]\n{CHECKED_POOL}",
        a.addr
    );
    let h = Harness::start("", &rest).await;
    let mut c = h.client("127.0.0.2").await;
    // The client makes the member answer 500 until the passive breaker opens.
    for _ in 0..5 {
        assert_eq!(
            get(&mut c, "h.test", "/fail").await,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(
        get(&mut c, "h.test", "/fail").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Its own checks, which no client request enters, keep passing.
    let before = member_json(&h, "h", a.addr).await["health"]["checks_passed"]
        .as_u64()
        .unwrap();
    let mut m = member_json(&h, "h", a.addr).await;
    for _ in 0..200 {
        if m["health"]["checks_passed"].as_u64().unwrap() >= before + 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        m = member_json(&h, "h", a.addr).await;
    }
    assert!(
        m["health"]["checks_passed"].as_u64().unwrap() >= before + 3,
        "{m}"
    );
    assert_eq!(m["health"]["state"], "up", "{m}");
    assert_eq!(m["health"]["checks_failed"], 0, "{m}");
    assert_eq!(m["breaker"], "open", "{m}");
}

#[tokio::test]
async fn a_route_naming_an_unknown_pool_is_a_config_error() {
    let text = common::config_text(
        "http://127.0.0.1:9",
        "",
        "[[routes]]\nname = \"r\"\nhost = \"a.test\"\nupstream = \"nope\"\n",
    );
    let e = palisade_proxy::config::Config::parse(
        &text,
        "test.toml",
        &palisade_proxy::config::Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(": routes[0].upstream: no pool named \"nope\" (the pools are [\"default\"])"),
        "{e}"
    );
    assert!(e.starts_with("test.toml:"), "{e}");
}
