//! HTTP/2 upstreams over real sockets: an in-process hyper h2c upstream
//! (and a raw `h2` one that misbehaves) behind the daemon, reached by
//! HTTP/2 and HTTP/1.1 clients. Bodies stream and trailers pass both
//! ways, every request shares one upstream connection, streams are capped
//! at `upstream.max_connections`, and an upstream's GOAWAY is a clean 502
//! followed by a new connection. A GET that claims the gRPC content type
//! keeps the HTTP status of a refusal.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Harness, connect_from};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

/// What the h2c upstream saw.
#[derive(Default)]
struct Seen {
    /// Connections accepted.
    connections: AtomicU64,
    /// Requests for `/hold` waiting.
    held: AtomicU64,
    /// Lets every `/hold` request answer.
    release: tokio::sync::Notify,
    /// Bytes of `/big` bodies handed to hyper to send.
    produced: AtomicU64,
}

/// An h2c (prior knowledge) upstream on 127.0.0.1. `/echo` answers with
/// the request's body, then trailers naming the HTTP version, `TE` and
/// the request trailer `x-sum` it got; `/hold` answers once released;
/// `/fail` resets its stream; `/big` is 8 MiB in 16 KiB pieces. Little is
/// buffered on its side, so what it has produced is close to what it has
/// sent.
async fn h2c_upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            shared.connections.fetch_add(1, Ordering::SeqCst);
            let seen = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, seen.clone()));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(1000)
                    .max_send_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(req: Request<Incoming>, seen: Arc<Seen>) -> Result<Response<Body>, &'static str> {
    match req.uri().path() {
        "/echo" => {
            let version = format!("{:?}", req.version());
            let te = req
                .headers()
                .get("te")
                .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
            let host = req
                .headers()
                .get("host")
                .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
            let authority = req
                .uri()
                .authority()
                .map_or("none".to_owned(), |a| a.as_str().to_owned());
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            let mut body = req.into_body();
            // Echoed as it arrives: the client sees the first piece before
            // it has sent the last.
            tokio::spawn(async move {
                let mut sum = "none".to_owned();
                while let Some(Ok(frame)) = body.frame().await {
                    match frame.into_data() {
                        Ok(data) => {
                            if tx.send(Ok(Frame::data(data))).await.is_err() {
                                return;
                            }
                        }
                        Err(frame) => {
                            if let Some(t) = frame.trailers_ref().and_then(|t| t.get("x-sum")) {
                                sum = t.to_str().unwrap().to_owned();
                            }
                        }
                    }
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("x-version", HeaderValue::from_str(&version).unwrap());
                trailers.insert("x-te", HeaderValue::from_str(&te).unwrap());
                trailers.insert("x-host", HeaderValue::from_str(&host).unwrap());
                trailers.insert("x-authority", HeaderValue::from_str(&authority).unwrap());
                trailers.insert("x-sum", HeaderValue::from_str(&sum).unwrap());
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            });
            let stream = tokio_stream(rx);
            Ok(Response::new(BoxBody::new(StreamBody::new(stream))))
        }
        "/hold" => {
            let released = seen.release.notified();
            seen.held.fetch_add(1, Ordering::SeqCst);
            released.await;
            Ok(Response::new(full("released")))
        }
        "/fail" => Err("reset"),
        "/big" => {
            let pieces = futures_util::stream::unfold(0u32, move |n| {
                let seen = seen.clone();
                async move {
                    (n < 512).then(|| {
                        seen.produced.fetch_add(16 * 1024, Ordering::SeqCst);
                        (Ok(Frame::data(Bytes::from(vec![b'x'; 16 * 1024]))), n + 1)
                    })
                }
            });
            Ok(Response::new(BoxBody::new(StreamBody::new(pieces))))
        }
        _ => Ok(Response::new(full("h2-upstream"))),
    }
}

fn tokio_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn full(s: &'static str) -> Body {
    BoxBody::new(Full::new(Bytes::from_static(s.as_bytes())))
}

/// An HTTP/2 (prior knowledge) client to the proxy from `source`.
async fn h2_client(source: &str, to: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let (sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(connect_from(source, to).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

async fn proxy(upstream: SocketAddr, rest: &str) -> Harness {
    Harness::start_with_upstream(&format!("h2c://{upstream}"), "", rest, upstream).await
}

#[tokio::test]
async fn bodies_stream_and_trailers_pass_both_ways_to_an_h2c_upstream() {
    let (up, seen) = h2c_upstream().await;
    let h = proxy(up, "").await;
    let mut client = h2_client("127.0.0.2", h.proxy()).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let req = Request::post("http://test.local/echo")
        .header("te", "trailers")
        .body(BoxBody::new(StreamBody::new(tokio_stream(rx))))
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
        .await
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The upstream's answer starts while the request is still open: the
    // request body is streamed, not gathered first.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first ");
    tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
        .await
        .unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("42"));
    tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
    drop(tx);
    let mut rest = Vec::new();
    let mut got = None;
    while let Some(frame) = body.frame().await {
        match frame.unwrap().into_data() {
            Ok(d) => rest.extend_from_slice(&d),
            Err(f) => got = f.into_trailers().ok(),
        }
    }
    assert_eq!(rest, b"second");
    let t = got.expect("the upstream's trailers reach an HTTP/2 client");
    assert_eq!(t["x-version"], "HTTP/2.0");
    assert_eq!(t["x-te"], "trailers");
    assert_eq!(t["x-host"], "test.local");
    assert_eq!(t["x-sum"], "42", "the client's trailers reach the upstream");

    // An HTTP/1.1 client gets the same upstream's answer (trailers are
    // HTTP/2's here).
    let (status, _, text) = h
        .client("127.0.0.3")
        .await
        .request("POST", "/echo", &[], "over http/1.1")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "over http/1.1");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_requests_share_one_upstream_connection_and_are_capped() {
    let (up, seen) = h2c_upstream().await;
    let h = proxy(up, "[upstream]\nmax_connections = 4\n").await;
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = h2_client(&format!("127.0.0.{}", 10 + i), h.proxy()).await;
        held.push(tokio::spawn(async move {
            let req = Request::get("http://test.local/hold").body(full("")).unwrap();
            let resp = c.send_request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }));
    }
    while seen.held.load(Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Four streams in flight on one connection: a fifth is refused at
    // once, as a fifth HTTP/1.1 connection would be.
    let (status, headers, _) = h.client("127.0.0.20").await.get("/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    seen.release.notify_waiters();
    for t in held {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "released");
    }
    // Their places are given back with their bodies.
    let (status, _, body) = h.client("127.0.0.20").await.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "h2-upstream"));
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let m = h.metrics().await;
    assert_eq!(
        common::metric(&m, "palisade_upstream_errors_total{kind=\"at_capacity\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_reset_stream_is_a_502_and_the_connection_serves_on() {
    let (up, seen) = h2c_upstream().await;
    let h = proxy(up, "").await;
    let mut c = h.client("127.0.0.2").await;
    assert_eq!(c.get("/fail").await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(c.get("/").await.2, "h2-upstream");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

/// A raw h2 upstream: its first connection answers GOAWAY to the first
/// request and closes; later ones answer `200 again`.
async fn goaway_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let n = counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tcp).await.unwrap();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if n == 0 {
                        conn.abrupt_shutdown(h2::Reason::INTERNAL_ERROR);
                        // Drives the GOAWAY out, then the connection ends.
                        while conn.accept().await.is_some() {}
                        return;
                    }
                    let resp = Response::new(());
                    let mut send = respond.send_response(resp, false).unwrap();
                    send.send_data(Bytes::from_static(b"again"), true).unwrap();
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn an_upstream_goaway_is_a_clean_502_then_a_new_connection() {
    let (up, connections) = goaway_upstream().await;
    let h = proxy(up, "").await;
    let mut c = h.client("127.0.0.2").await;
    let (status, _, _) = c.get("/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, _, body) = c.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "again"));
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    let m = h.metrics().await;
    assert_eq!(
        common::metric(&m, "palisade_upstream_errors_total{kind=\"other\"}"),
        1.0
    );
}

/// Attack: clients that stop reading their responses share the upstream
/// connection with everyone else. Had their unread data counted against
/// the connection's window (hyper's default: 5 MiB for the connection, 2 MiB
/// a stream), three of them would have stopped every stream on it; each
/// holds its own stream's 256 KiB instead, and other clients are served.
/// Failed before the connection window was sized to the streams': the
/// upstream could send no more than 5 MiB in all until the stalled streams
/// were cut by `write_timeout`.
#[tokio::test]
async fn clients_that_stop_reading_do_not_stall_the_shared_upstream_connection() {
    const STALLED: u64 = 24;
    let (up, seen) = h2c_upstream().await;
    // Deadlines that would cut the stalled streams are out of the way:
    // what is tested is the connection they share.
    let h = Harness::start_with_upstream(
        &format!("h2c://{up}"),
        "write_timeout = \"120s\"\nresponse_min_rate = 0\n",
        "",
        up,
    )
    .await;
    // Windows of 0: the proxy can send these streams nothing.
    let tcp = connect_from("127.0.0.2", h.proxy()).await;
    let (mut stalled, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..STALLED {
        stalled = stalled.ready().await.unwrap();
        let req = Request::get("http://test.local/big").body(()).unwrap();
        let (resp, _) = stalled.send_request(req, true).unwrap();
        held.push(resp.await.unwrap());
    }
    // Every stalled stream fills its window upstream (together more than
    // hyper's default connection window), and another client is served.
    let served = tokio::time::timeout(Duration::from_secs(30), async {
        while seen.produced.load(Ordering::SeqCst) < STALLED * 256 * 1024 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h.client("127.0.0.3").await.get("/").await
    })
    .await
    .expect("stalled streams held the shared upstream connection's window");
    assert_eq!((served.0, served.2.as_str()), (StatusCode::OK, "h2-upstream"));
    assert_eq!(held.len() as u64, STALLED);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

/// Attack: a client that keeps its window shut holds a stream to the
/// upstream, and with it one of the upstream's places under the cap. The
/// write deadline resets it like any stalled response, its place is given
/// back, and only its stream is reset upstream: the connection the others
/// share stays up.
#[tokio::test]
async fn a_stalled_stream_cut_by_write_timeout_gives_its_upstream_place_back() {
    let (up, seen) = h2c_upstream().await;
    let h = Harness::start_with_upstream(
        &format!("h2c://{up}"),
        "write_timeout = \"1s\"\n",
        "[upstream]\nmax_connections = 1\n",
        up,
    )
    .await;
    let tcp = connect_from("127.0.0.2", h.proxy()).await;
    let (mut stalled, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    stalled = stalled.ready().await.unwrap();
    let req = Request::get("http://test.local/big").body(()).unwrap();
    let (resp, _) = stalled.send_request(req, true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    // Reset by the proxy once the deadline passes.
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match body.data().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return e,
                None => panic!("the stalled stream ended cleanly"),
            }
        }
    })
    .await
    .expect("the stalled stream was never reset");
    assert!(cut.is_reset(), "{cut}");
    // Its place under the cap of 1 is free again, on the same connection.
    let (status, _, body) = h.client("127.0.0.3").await.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "h2-upstream"));
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let m = h.metrics().await;
    assert_eq!(common::metric(&m, "palisade_stalled_responses_total"), 1.0);
}

#[tokio::test]
async fn a_refused_get_calling_itself_grpc_keeps_its_http_status() {
    // A port nothing listens on: every request upstream is a 502.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = proxy(dead, "").await;
    let mut client = h2_client("127.0.0.2", h.proxy()).await;
    // gRPC calls are POSTs. A GET that claims the gRPC content type would
    // otherwise turn our 502 into a 200 with an empty body, which a cache
    // in front of us may keep and serve for that page to everyone.
    let req = Request::get("http://test.local/index.html")
        .header("content-type", "application/grpc")
        .body(full(""))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(!resp.headers().contains_key("grpc-status"));
    let req = Request::post("http://test.local/echo.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(""))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
}

/// An HTTP/2 upstream must learn the host the client asked for from
/// `:authority`, where HTTP/2 servers (and gRPC's) read it, with no `Host`
/// beside it that says otherwise (RFC 9113 §8.3.1): the same host an
/// HTTP/1.1 upstream reads in `Host`. Today the daemon sends the
/// upstream's own address as `:authority` and the client's host in `Host`,
/// because hyper-util's pool sends each request's URI as it is and keys
/// its connections by that URI's authority; the fix is an HTTP/2 sender
/// of the daemon's own that picks the connection by member and writes the
/// client's host into the request.
#[tokio::test]
#[ignore = "known: an h2 upstream gets the upstream's address as :authority (see the comment)"]
async fn the_upstream_reads_the_clients_host_in_authority() {
    let (up, _seen) = h2c_upstream().await;
    let h = proxy(up, "").await;
    let mut client = h2_client("127.0.0.40", h.proxy()).await;
    let req = Request::get("http://test.local/echo").body(full("")).unwrap();
    let resp = client.send_request(req).await.unwrap();
    let trailers = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned()
        .unwrap();
    assert_eq!(trailers["x-authority"], "test.local");
    assert_eq!(trailers["x-host"], "none", "no Host beside :authority");
    h.running.shutdown().await;
}
