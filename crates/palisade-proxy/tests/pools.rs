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
