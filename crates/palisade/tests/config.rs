//! The library reading the daemon's config file.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{Request, StatusCode};
use palisade::{Palisade, PeerAddr};
use tower::ServiceExt;

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_example_file_configures_the_stack() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/palisade.toml");
    let palisade = Palisade::from_file(path).unwrap();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .layer(palisade.layer());
    let req = || {
        let mut r = Request::get("/").body(Body::empty()).unwrap();
        r.extensions_mut()
            .insert(ConnectInfo(PeerAddr(SocketAddr::from(([192, 0, 2, 1], 1)))));
        r
    };
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(app.clone().oneshot(req()).await.unwrap().status());
    }
    // rate = 5, burst = 5 in the file.
    assert_eq!(statuses[..5], [StatusCode::OK; 5]);
    assert_eq!(statuses[5..], [StatusCode::TOO_MANY_REQUESTS; 2]);
    assert!(palisade.breaker().is_some());
}

#[test]
fn the_daemon_quickstart_is_accepted_whole() {
    // Every daemon section parses: the library ignores what is not its own.
    let quickstart = include_str!("../../palisade-proxy/src/quickstart.toml");
    let path = write("quickstart.toml", quickstart);
    Palisade::from_file(&path).unwrap();
}

/// `headers = "always"` in `[rate_limit]` and per route; a value it does
/// not know names its key.
#[tokio::test]
async fn rate_limit_headers_are_read_for_the_file_and_per_route() {
    let path = write(
        "headers.toml",
        "[rate_limit]\nrate = 5\nheaders = \"always\"\n\n[[routes]]\nname = \"quiet\"\npath_prefix = \"/quiet\"\nheaders = \"refused\"\n",
    );
    let palisade = Palisade::from_file(&path).unwrap();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .route("/quiet", axum::routing::get(|| async { "ok" }))
        .layer(palisade.layer());
    let get = |path: &str| {
        let mut r = Request::get(path).body(Body::empty()).unwrap();
        r.extensions_mut()
            .insert(ConnectInfo(PeerAddr(SocketAddr::from(([192, 0, 2, 2], 1)))));
        app.clone().oneshot(r)
    };
    let r = get("/").await.unwrap();
    assert_eq!(r.headers()["ratelimit-policy"], "\"default\";q=5;w=1");
    assert!(
        r.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"default\";r=4;t=")
    );
    // The route shares the default limit (it sets none of its own) but not its fields.
    let r = get("/quiet").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!r.headers().contains_key("ratelimit"));

    let path = write("bad-headers.toml", "[rate_limit]\nheaders = \"sometimes\"\n");
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(
        e.ends_with("bad-headers.toml:2:1: rate_limit.headers: unknown value \"sometimes\"; expected \"refused\" or \"always\""),
        "{e}"
    );
}

/// `anonymous_rate` needs a key taken from the request, and the other
/// `anonymous_` keys need it; the errors name the key.
#[test]
fn anonymous_limits_need_a_request_key() {
    let route = "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\n";
    let cases = [
        (
            "anonymous_rate = 2\n",
            "anon.toml:4:1: routes[0].anonymous_rate: needs a key taken from the request",
        ),
        (
            "key = \"header:X-API-Key\"\nanonymous_burst = 2\n",
            "anon.toml:5:1: routes[0].anonymous_burst: needs anonymous_rate",
        ),
        (
            "key = \"header:X-API-Key\"\nanonymous_rate = \"0/m\"\n",
            "anon.toml:5:1: routes[0].anonymous_rate: must be between 1 and 10000000",
        ),
    ];
    for (keys, expect) in cases {
        let path = write("anon.toml", &format!("{route}{keys}"));
        let e = Palisade::from_file(&path).err().unwrap().to_string();
        assert!(e.contains(expect), "{e}");
    }
    let path = write(
        "anon.toml",
        &format!("{route}key = \"cookie:session\"\nrate = \"100/m\"\nanonymous_rate = \"10/m\"\n"),
    );
    let p = Palisade::from_file(&path).unwrap();
    let anonymous = p.shield().config().routes[0].anonymous.unwrap();
    assert_eq!(
        (anonymous.quota.rate.get(), anonymous.quota.burst.get()),
        (10, 10)
    );
}

#[test]
fn errors_name_file_line_and_key() {
    let path = write("bad.toml", "[clients]\nkey = \"ip\"\n\n[rate_limit]\nrate = 0\n");
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(
        e.ends_with("bad.toml:5:1: rate_limit.rate: must be between 1 and 10000000"),
        "{e}"
    );
    let path = write("typo.toml", "[rate_limti]\nrate = 5\n");
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(e.contains("typo.toml:1:") && e.contains("rate_limti"), "{e}");
    let e = Palisade::from_file("/nonexistent/palisade.toml")
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("/nonexistent/palisade.toml: "), "{e}");
}

#[test]
fn a_challenged_route_is_an_error_for_the_library() {
    // The layers cannot serve the page: silently unprotected would be worse.
    let path = write(
        "challenge.toml",
        "[[routes]]\nname = \"site\"\nchallenge = \"always\"\n",
    );
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(
        e.contains("challenge.toml:3:") && e.contains("routes[0].challenge"),
        "{e}"
    );
    let path = write(
        "off.toml",
        "[[routes]]\nname = \"site\"\nchallenge = \"off\"\napi = true\n",
    );
    Palisade::from_file(&path).unwrap();
}

#[test]
fn a_ja4_key_is_an_error_for_the_library() {
    // The layers see no TLS handshake: a JA4 limit would count by address.
    let path = write("ja4-route.toml", "[[routes]]\nname = \"site\"\nkey = \"ja4\"\n");
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(
        e.contains("ja4-route.toml:3:") && e.contains("routes[0].key") && e.contains("daemon"),
        "{e}"
    );
    let path = write("ja4-default.toml", "[rate_limit]\nkey = \"ja4\"\n");
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(
        e.contains("ja4-default.toml:2:") && e.contains("rate_limit.key"),
        "{e}"
    );
    let path = write("ja4-breaker.toml", "[adaptive_breaker]\nfingerprint = \"ja4\"\n");
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(
        e.contains("ja4-breaker.toml:2:") && e.contains("adaptive_breaker.fingerprint"),
        "{e}"
    );
}

#[tokio::test]
async fn server_proxy_protocol_is_read_too() {
    let path = write(
        "pp-bad.toml",
        "[server]\nlisten = \"0.0.0.0:80\"\nproxy_protocol = true\n",
    );
    let e = Palisade::from_file(&path).err().unwrap().to_string();
    assert!(
        e.contains("pp-bad.toml:3:1: server.proxy_protocol: needs clients.trusted_proxies"),
        "{e}"
    );

    let path = write(
        "pp.toml",
        "[server]\nproxy_protocol = true\nheader_read_timeout = \"2s\"\n[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let palisade = Palisade::from_file(&path).unwrap();
    let (addr, server) = common::serve_client_echo(&palisade).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("203.0.113.7"),
        "{out}"
    );
    server.abort();
}
