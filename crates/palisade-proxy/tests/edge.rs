//! The HTTP edge attacked as an outside client would: path spellings that
//! dodge route limits, smuggled `Host` headers, forged forwarding headers.
//! Real daemon, real sockets, raw bytes where a polite client would refuse
//! to send them.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, metric, raw_exchange};

/// One request on its own connection; the status code and the body.
async fn raw_get(h: &Harness, source: &str, head: &str) -> (u16, String) {
    let text = raw_exchange(
        source,
        h.proxy(),
        format!("{head}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

#[tokio::test]
async fn every_spelling_of_a_limited_path_counts_against_its_route_and_is_forwarded_normalized() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"hdr\"\npath_prefix = \"/headers\"\nrate = 1000\n",
    )
    .await;
    let spellings = [
        "/headers",
        "//headers",
        "/./headers",
        "/%68eaders",
        "/x/../headers",
        "/x/%2e%2E/headers",
    ];
    for p in spellings {
        let (status, body) = raw_get(
            &h,
            "127.0.0.20",
            &format!("GET {p}?a=%2F HTTP/1.1\r\nHost: test.local\r\n"),
        )
        .await;
        assert_eq!(status, 200, "{p}: {body}");
        // The upstream gets the path the route matched, query untouched.
        assert!(body.starts_with("GET /headers?a=%2F HTTP/1.1\n"), "{p}: {body}");
    }
    // Case-insensitive by default: counted against the route too.
    let (status, _) = raw_get(&h, "127.0.0.20", "GET /Headers HTTP/1.1\r\nHost: test.local\r\n").await;
    assert_eq!(status, 404);
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "palisade_requests_total{endpoint=\"hdr\",method=\"GET\",status=\"200\"}"
        ),
        spellings.len() as f64,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "palisade_requests_total{endpoint=\"hdr\",method=\"GET\",status=\"404\"}"
        ),
        1.0
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn an_encoded_slash_or_a_broken_escape_in_the_path_is_400_and_never_forwarded() {
    let h = Harness::start("", "").await;
    for p in ["/a%2Fb", "/a%2fheaders", "/a%5Cb", "/a%00", "/a%", "/a%zz"] {
        let (status, body) = raw_get(
            &h,
            "127.0.0.21",
            &format!("GET {p} HTTP/1.1\r\nHost: test.local\r\n"),
        )
        .await;
        assert_eq!(status, 400, "{p}: {body}");
    }
    assert_eq!(h.upstream_hits.load(std::sync::atomic::Ordering::Relaxed), 0);
    h.running.shutdown().await;
}
