//! Clients that hold responses: HTTP/2 flow-control stalls, over real
//! sockets against the real daemon and an upstream that reports its open
//! connections.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Harness, connect_from, get_requests, metric};
use h2::client::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An h2c connection from `source` to the proxy, set up by `builder`. Its
/// connection task is spawned: polling it answers PINGs, and it ends (with
/// the GOAWAY's reason, if any) when the server closes.
async fn h2_client(
    h: &Harness,
    source: &str,
    builder: &h2::client::Builder,
) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tcp = connect_from(source, h.proxy()).await;
    let (client, conn) = builder.handshake::<_, Bytes>(tcp).await.unwrap();
    (client, tokio::spawn(conn))
}

/// A GET of `path` on the proxy, as an h2 client sends it.
fn h2_get(h: &Harness, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{}{path}", h.proxy()))
        .body(())
        .unwrap()
}

/// Whether a new connection from `source` is served a `GET /` within ten
/// seconds, once the proxy has given back the places its holders had.
async fn served_again(h: &Harness, source: &str) -> bool {
    for _ in 0..100 {
        let mut c = common::Client::connect(source, h.proxy()).await;
        if c.get("/").await.0 == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// An upstream whose every request gets `size` bytes, and which counts the
/// connections it has open (a connection ends when the proxy closes it).
async fn big_upstream(size: usize) -> (SocketAddr, Arc<AtomicI64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicI64::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let open = counter.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            open.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                let body = vec![b'x'; size];
                let sent = async {
                    s.write_all(reply.as_bytes()).await?;
                    s.write_all(&body).await?;
                    // The proxy reads the whole body only if its client does;
                    // either way, wait for it to hang up.
                    while s.read(&mut buf).await? > 0 {}
                    std::io::Result::Ok(())
                };
                let _ = sent.await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// Polls `cond` every 50 ms for at most `bound`; whether it came true.
async fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// The attack: an h2c client that opens no flow-control window
/// (SETTINGS_INITIAL_WINDOW_SIZE = 0), asks for 8 large responses, never
/// sends WINDOW_UPDATE and answers PINGs. Each response must be reset
/// once it made no progress for `write_timeout`, its upstream connection
/// closed, and the connection, all of whose streams stalled, sent GOAWAY
/// and closed.
#[tokio::test]
async fn h2_flow_control_stall_is_reset_and_upstreams_released() {
    let (upstream, open) = big_upstream(1_000_000).await;
    let h = Harness::start_with_upstream(
        &format!("http://{upstream}"),
        "write_timeout = \"1s\"\nidle_timeout = \"60s\"",
        "",
        upstream,
    )
    .await;
    let (client, conn) = h2_client(
        &h,
        "127.0.0.90",
        h2::client::Builder::new().initial_window_size(0),
    )
    .await;
    let mut bodies = Vec::new();
    for _ in 0..8 {
        let mut ready = client.clone().ready().await.unwrap();
        let (resp, _) = ready.send_request(h2_get(&h, "/big"), true).unwrap();
        bodies.push(resp);
    }
    let mut streams = Vec::new();
    for resp in bodies {
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("no response head")
            .unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(resp.into_body());
    }
    assert!(
        eventually(Duration::from_secs(5), || open.load(Ordering::SeqCst) == 8).await,
        "the upstream never saw 8 connections: {}",
        open.load(Ordering::SeqCst)
    );
    // Never read (no WINDOW_UPDATE): each stream must end with a reset.
    for mut body in streams {
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match body.data().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        })
        .await
        .expect("a stalled response was never reset");
        let e = ended.expect("a stalled response ended cleanly");
        assert!(e.is_reset() || e.is_go_away() || e.is_io(), "{e:?}");
    }
    assert!(
        eventually(Duration::from_secs(20), || open.load(Ordering::SeqCst) == 0).await,
        "upstream connections still held: {}",
        open.load(Ordering::SeqCst)
    );
    let closed = tokio::time::timeout(Duration::from_secs(20), conn).await;
    assert!(closed.is_ok(), "the stalled connection was never closed");
    drop(client);
    let m = h.metrics().await;
    assert_eq!(metric(&m, "palisade_stalled_responses_total"), 8.0);
    assert_eq!(
        metric(&m, "palisade_connection_timeouts_total{kind=\"stalled\"}"),
        1.0
    );
    h.running.shutdown().await;
}

/// A client that reads its response, however it opens its window, is
/// not mistaken for a stalled one.
#[tokio::test]
async fn h2_client_that_reads_gets_the_whole_response() {
    let (upstream, open) = big_upstream(1_000_000).await;
    let h = Harness::start_with_upstream(
        &format!("http://{upstream}"),
        "write_timeout = \"1s\"",
        "",
        upstream,
    )
    .await;
    let (client, _conn) = h2_client(&h, "127.0.0.91", &h2::client::Builder::new()).await;
    let mut ready = client.ready().await.unwrap();
    let (resp, _) = ready.send_request(h2_get(&h, "/big"), true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut got = 0usize;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        got += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    assert_eq!(got, 1_000_000);
    let m = h.metrics().await;
    assert_eq!(metric(&m, "palisade_stalled_responses_total"), 0.0);
    drop(open);
    h.running.shutdown().await;
}

/// A client that reads steadily but slowly, through a small window, is not
/// a stalled one: reading a 16 KiB frame every 100 ms (about 80 KB/s once
/// its connection window's updates are counted), twenty frames within
/// `write_timeout`, it gets its whole response. The upstream writes the
/// body at once, so the proxy reads it in chunks of up to hundreds of KiB;
/// counted as one step of progress each, such a chunk took longer than
/// `write_timeout` to drain through this window and the stream was reset
/// half way (as it would be for a browser on a link slower than about
/// 40 KB/s with the default 10 s).
#[tokio::test]
async fn h2_client_reading_slowly_through_a_small_window_is_not_reset() {
    let (upstream, open) = big_upstream(800_000).await;
    let h = Harness::start_with_upstream(
        &format!("http://{upstream}"),
        "write_timeout = \"2s\"",
        "",
        upstream,
    )
    .await;
    let (client, _conn) = h2_client(
        &h,
        "127.0.0.89",
        h2::client::Builder::new().initial_window_size(16_384),
    )
    .await;
    let mut ready = client.ready().await.unwrap();
    let (resp, _) = ready.send_request(h2_get(&h, "/big"), true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut got = 0usize;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("reset after {got} bytes: {e:?}"));
        got += chunk.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    assert_eq!(got, 800_000);
    let m = h.metrics().await;
    assert_eq!(metric(&m, "palisade_stalled_responses_total"), 0.0);
    drop(open);
    h.running.shutdown().await;
}

/// With `upstream.max_connections = 2` and two requests holding both
/// upstream connections, a third is answered 503 at once (it does not
/// wait for a connection), and the places come back when the holders go.
#[tokio::test]
async fn upstream_connections_are_capped_with_a_prompt_503() {
    let h = Harness::start("", "[upstream]\nmax_connections = 2\n").await;
    let mut holders = Vec::new();
    for source in ["127.0.0.92", "127.0.0.93"] {
        let mut c = common::Client::connect(source, h.proxy()).await;
        holders.push(tokio::spawn(async move { c.get("/delay/60000").await }));
    }
    let hits = h.upstream_hits.clone();
    assert!(
        eventually(Duration::from_secs(10), || hits.load(Ordering::SeqCst) == 2).await,
        "the upstream never got both holders"
    );
    let mut c = common::Client::connect("127.0.0.94", h.proxy()).await;
    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(10), c.get("/"))
        .await
        .expect("a request past the upstream cap hung");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream connection limit"), "{body}");
    assert_eq!(headers["retry-after"], "1");
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_upstream_errors_total{kind=\"at_capacity\"}"),
        1.0
    );
    // Our own cap is not the upstream failing: its breaker is not charged.
    assert_eq!(
        metric(&m, "palisade_upstream_errors_total{kind=\"connect\"}"),
        0.0
    );
    // The holders give up; their upstream connections close and the
    // places come back.
    for held in holders {
        held.abort();
    }
    assert!(
        served_again(&h, "127.0.0.95").await,
        "the upstream places never came back"
    );
    h.running.shutdown().await;
}

/// With `connections.max_in_flight_per_ip = 2`, an address holding two
/// requests on two connections gets 429 for a third (on a third
/// connection) at once; another address is served; the places come back.
#[tokio::test]
async fn requests_in_flight_per_address_are_bounded_over_its_connections() {
    let h = Harness::start("", "[connections]\nmax_in_flight_per_ip = 2\n").await;
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut c = common::Client::connect("127.0.0.96", h.proxy()).await;
        holders.push(tokio::spawn(async move { c.get("/delay/60000").await }));
    }
    let hits = h.upstream_hits.clone();
    assert!(
        eventually(Duration::from_secs(10), || hits.load(Ordering::SeqCst) == 2).await,
        "the upstream never got both holders"
    );
    let mut c = common::Client::connect("127.0.0.96", h.proxy()).await;
    let (status, headers, _) = tokio::time::timeout(Duration::from_secs(10), c.get("/"))
        .await
        .expect("a request past the in-flight bound hung");
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    let mut other = common::Client::connect("127.0.0.97", h.proxy()).await;
    assert_eq!(other.get("/").await.0, 200);
    let m = h.metrics().await;
    assert_eq!(get_requests(&m, "default", 429), 1.0);
    for held in holders {
        held.abort();
    }
    assert!(
        served_again(&h, "127.0.0.96").await,
        "the in-flight places never came back"
    );
    h.running.shutdown().await;
}

/// A request the client abandons still ends in the metrics, once, as 499.
#[tokio::test]
async fn an_abandoned_request_is_counted_once_as_499() {
    let h = Harness::start("", "").await;
    let mut c = common::Client::connect("127.0.0.98", h.proxy()).await;
    let held = tokio::spawn(async move { c.get("/delay/60000").await });
    let hits = h.upstream_hits.clone();
    assert!(
        eventually(Duration::from_secs(10), || hits.load(Ordering::SeqCst) == 1).await,
        "the upstream never got the request"
    );
    // Dropping the client's connection abandons the request.
    held.abort();
    let series = "palisade_requests_total{endpoint=\"default\",method=\"GET\",status=\"499\"}";
    let mut m = String::new();
    for _ in 0..100 {
        m = h.metrics().await;
        if m.lines().any(|l| l.starts_with(series)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        m.lines().any(|l| l.starts_with(series)),
        "the abandoned request was never counted"
    );
    assert_eq!(metric(&m, series), 1.0);
    assert_eq!(
        metric(
            &m,
            "palisade_request_duration_seconds_count{endpoint=\"default\",method=\"GET\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "palisade_decisions_total{decision=\"allowed\"}"), 1.0);
    h.running.shutdown().await;
}

/// Opens `n` streams on `client` and resets each at once, without yielding:
/// the HEADERS and RST_STREAM frames go out together, so the server reads
/// the resets before it has accepted the streams (the "rapid reset"
/// pattern).
fn open_and_reset(h: &Harness, client: &SendRequest<Bytes>, n: usize) {
    for _ in 0..n {
        // A fresh handle has no stream of its own waiting to open, so it is
        // ready without a trip through the connection task.
        let mut handle = client.clone();
        let (resp, mut stream) = handle.send_request(h2_get(h, "/"), false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
        drop(resp);
    }
}

/// Rapid reset (CVE-2023-44487): a client may reset 20 streams the server
/// has not accepted yet; with the 21st the connection gets GOAWAY with
/// ENHANCE_YOUR_CALM and closes. Up to the bound it stays and serves.
#[tokio::test]
async fn h2_rapid_reset_past_twenty_streams_gets_goaway_enhance_your_calm() {
    let h = Harness::start("", "").await;
    let builder = h2::client::Builder::new();
    let (client, conn) = h2_client(&h, "127.0.0.99", &builder).await;
    open_and_reset(&h, &client, 20);
    let mut ready = client.clone().ready().await.unwrap();
    let (resp, _) = ready.send_request(h2_get(&h, "/"), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer after 20 resets")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        !conn.is_finished(),
        "the connection closed within the bound: {:?}",
        conn.await
    );

    let (client, conn) = h2_client(&h, "127.0.0.99", &builder).await;
    open_and_reset(&h, &client, 21);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection was kept past the reset bound")
        .unwrap();
    let e = ended.expect_err("the connection closed without GOAWAY");
    assert!(e.is_go_away() && e.is_remote(), "{e:?}");
    assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e:?}");
    h.running.shutdown().await;
}
