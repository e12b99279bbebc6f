//! The admission listener under a real axum server and real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::{Router, routing::get};
use palisade::{AdmissionConfig, AdmissionListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

async fn served(from: &str, to: SocketAddr) -> bool {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => buf.starts_with(b"HTTP/1.1 200"),
        Ok(Err(_)) => false,
        Err(_) => panic!("neither served nor reset"),
    }
}

#[tokio::test]
async fn axum_behind_the_admission_listener() {
    let cfg = AdmissionConfig {
        new_per_ip_per_second: NonZeroU32::new(5),
        ..Default::default()
    };
    let listener = AdmissionListener::bind("127.0.0.1:0", cfg).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admission = listener.admission().clone();
    let app = Router::new().route("/", get(|| async { "ok" }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let started = tokio::time::Instant::now();
    let mut ok = 0u32;
    for _ in 0..20 {
        ok += u32::from(served("127.0.0.80", addr).await);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // A burst of 5 new connections, plus 5/s refilled while the loop ran.
    assert!(ok >= 5, "{ok}");
    assert!(
        f64::from(ok) <= 5.0 + 5.0 * elapsed + 1.0,
        "{ok} served in {elapsed:.2}s"
    );
    assert!(served("127.0.0.81", addr).await, "another address was refused");
    // Closed connections gave their places back.
    let mut open = u32::MAX;
    for _ in 0..50 {
        open = admission.open();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 0);
    server.abort();
}

// ---------------------------------------------------------------------------
// The layers in an axum Router.

#[path = "../examples/axum.rs"]
mod example;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{Request, StatusCode};
use palisade::{Palisade, PeerAddr};
use tower::ServiceExt;

fn from(ip: &str, path: &str) -> Request<Body> {
    let mut r = Request::get(path).body(Body::empty()).unwrap();
    r.extensions_mut()
        .insert(ConnectInfo(PeerAddr(SocketAddr::new(ip.parse().unwrap(), 5000))));
    r
}

async fn body(r: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn router_oneshot_limits_each_fake_peer_on_its_own() {
    let palisade = example::palisade().unwrap();
    let app = example::app(&palisade);
    let r = app.clone().oneshot(from("192.0.2.10", "/")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await, "hello 192.0.2.10\n");
    // /login has its own 2/s limit, named in the RateLimit headers.
    for _ in 0..2 {
        let r = app.clone().oneshot(from("192.0.2.10", "/login")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = app.clone().oneshot(from("192.0.2.10", "/login")).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["ratelimit-policy"], "\"login\";q=2;w=1");
    // The other route and the other client are untouched.
    let r = app.clone().oneshot(from("192.0.2.10", "/")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.clone().oneshot(from("192.0.2.11", "/login")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A plain ConnectInfo<SocketAddr> (axum over a TcpListener) works too.
    let mut plain = Request::get("/").body(Body::empty()).unwrap();
    plain
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 12], 1))));
    let r = app.clone().oneshot(plain).await.unwrap();
    assert_eq!(body(r).await, "hello 192.0.2.12\n");
}

#[tokio::test]
async fn router_without_connect_info_fails_closed() {
    let palisade = example::palisade().unwrap();
    let r = example::app(&palisade)
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn denied_and_allowed_networks() {
    let palisade = Palisade::builder()
        .rate_limit(1)
        .deny("203.0.113.0/24".parse().unwrap())
        .allow("198.51.100.0/24".parse().unwrap())
        .build()
        .unwrap();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .layer(palisade.layer());
    let r = app.clone().oneshot(from("203.0.113.9", "/")).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    for _ in 0..5 {
        let r = app.clone().oneshot(from("198.51.100.9", "/")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "allow-listed clients skip the limit");
    }
}

/// Requests on one keep-alive connection; the statuses in order.
async fn burst(to: SocketAddr, from: &str, n: usize) -> Vec<u16> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    let mut all = Vec::new();
    for _ in 0..n {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        all.push(read_status(&mut s).await);
    }
    all
}

/// Reads one response (head + content-length body) and returns its status.
async fn read_status(s: &mut tokio::net::TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection closed mid-response");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await.unwrap();
    head[9..12].parse().unwrap()
}

#[tokio::test]
async fn the_axum_example_over_real_sockets_under_a_burst() {
    let palisade = example::palisade().unwrap();
    let listener = palisade.bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = example::app(&palisade).into_make_service_with_connect_info::<PeerAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // 60 requests back to back from one address: the example allows bursts
    // of 20 at 20/s, so 20 plus what refills while the burst runs.
    #[allow(clippy::disallowed_methods)] // the refill bound needs the real elapsed time
    let started = std::time::Instant::now();
    let statuses = burst(addr, "127.0.0.90", 60).await;
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + limited, 60, "{statuses:?}");
    assert!(ok >= 20, "{statuses:?}");
    assert!(
        (ok as f64) <= 20.0 + 20.0 * elapsed + 1.0,
        "{ok} in {elapsed:.2}s"
    );
    assert!(statuses[..20].iter().all(|s| *s == 200), "{statuses:?}");
    // Its neighbour is served.
    assert_eq!(burst(addr, "127.0.0.91", 1).await, vec![200]);
    server.abort();
}

/// Requests on one keep-alive connection: each answer's status and its
/// `RateLimit` field, if any.
async fn burst_fields(to: SocketAddr, from: &str, n: usize) -> Vec<(u16, Option<String>)> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    let mut all = Vec::new();
    for _ in 0..n {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let head = read_head(&mut s).await;
        let field = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("ratelimit")
                .then(|| value.trim().to_owned())
        });
        all.push((head[9..12].parse().unwrap(), field));
    }
    all
}

/// Reads one response (head + content-length body) and returns its head.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection closed mid-response");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await.unwrap();
    head
}

/// `rate_limit_headers(Always)`: an axum client sees `r=` count down to 0
/// on its 200s, then the 429; without it, its 200s carry no field. On a
/// hand-driven clock, so nothing refills while the requests run.
#[tokio::test]
async fn rate_limit_fields_on_every_answer_when_asked() {
    for always in [true, false] {
        let mut b = palisade::Palisade::builder()
            .rate_limit_per(3, palisade::Period::Minute)
            .no_reputation()
            .no_adaptive_breaker()
            .clock(palisade::ManualClock::new());
        if always {
            b = b.rate_limit_headers(palisade::RateHeaders::Always);
        }
        let palisade = b.build().unwrap();
        let listener = palisade.bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(palisade.layer())
            .into_make_service_with_connect_info::<PeerAddr>();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let seen = burst_fields(addr, "127.0.0.92", 4).await;
        let field = |r: &str| Some(format!("\"default\";{r}"));
        let expect = if always {
            [
                (200, field("r=2;t=20")),
                (200, field("r=1;t=40")),
                (200, field("r=0;t=60")),
                (429, field("r=0;t=20")),
            ]
        } else {
            [(200, None), (200, None), (200, None), (429, field("r=0;t=20"))]
        };
        assert_eq!(seen, expect, "always: {always}");
        server.abort();
    }
}

/// An app answering with its client's address, behind the guard expecting
/// PROXY headers from `trusted`.
async fn behind_proxy_protocol(
    trusted: &str,
    builder: palisade::Builder,
) -> (SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
    let palisade = builder
        .trusted_proxies(
            [trusted.parse().unwrap()],
            palisade::ClientIpHeader::XForwardedFor,
        )
        .proxy_protocol(Duration::from_secs(2))
        .build()
        .unwrap();
    common::serve_client_echo(&palisade).await
}

#[tokio::test]
async fn proxy_protocol_from_a_trusted_proxy_names_the_client() {
    let (addr, server) = behind_proxy_protocol("127.0.0.92/32", Palisade::builder().rate_limit(2)).await;

    let via_proxy = |client: &'static str| async move {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.92:0".parse().unwrap()).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let header = format!("PROXY TCP4 {client} 127.0.0.1 5555 80\r\n");
        s.write_all(header.as_bytes()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    };
    let first = via_proxy("198.51.100.20").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.ends_with("198.51.100.20"), "{first}");
    assert!(via_proxy("198.51.100.20").await.starts_with("HTTP/1.1 200"));
    // The named client is the one limited, not the proxy.
    assert!(via_proxy("198.51.100.20").await.starts_with("HTTP/1.1 429"));
    assert!(via_proxy("198.51.100.21").await.starts_with("HTTP/1.1 200"));
    // Anyone else sending a PROXY header is reset.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.93:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let _ = s
        .write_all(b"PROXY TCP4 10.1.1.1 127.0.0.1 1 80\r\nGET / HTTP/1.1\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(read.is_err() || out.is_empty(), "an untrusted peer was served");
    server.abort();
}

#[tokio::test]
async fn deny_list_resets_at_accept_and_allow_list_skips_per_address_bounds() {
    let palisade = Palisade::builder()
        .deny("127.0.0.94/32".parse().unwrap())
        .allow("127.0.0.95/32".parse().unwrap())
        .connections(palisade::AdmissionConfig {
            max_per_ip: 1,
            ..Default::default()
        })
        .build()
        .unwrap();
    let listener = palisade.bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .layer(palisade.layer())
        .into_make_service_with_connect_info::<PeerAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    assert!(!served("127.0.0.94", addr).await, "a denied source was served");
    // Two open connections at once from an allow-listed address (the
    // per-address bound is 1), then from an ordinary one.
    let open = |from: &'static str| async move {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        // A refused connection can be reset before connect() returns.
        socket.connect(addr).await
    };
    let mut a = open("127.0.0.95").await.unwrap();
    let mut b = open("127.0.0.95").await.unwrap();
    assert_eq!(burst_on(&mut a).await, 200);
    assert_eq!(burst_on(&mut b).await, 200);
    let mut c = open("127.0.0.96").await.unwrap();
    assert_eq!(burst_on(&mut c).await, 200);
    let mut buf = [0u8; 1];
    let second = match open("127.0.0.96").await {
        Ok(mut d) => match d.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await {
            Ok(()) => tokio::time::timeout(Duration::from_secs(10), d.read(&mut buf))
                .await
                .unwrap(),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    assert!(
        matches!(second, Ok(0) | Err(_)),
        "a second connection over the bound was served"
    );
    server.abort();
}

async fn burst_on(s: &mut tokio::net::TcpStream) -> u16 {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_status(s).await
}

#[tokio::test]
async fn a_refused_proxy_header_does_not_stall_the_next_one() {
    let (addr, server) = behind_proxy_protocol("127.0.0.97/32", Palisade::builder()).await;
    let connect = || async {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.97:0".parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    };
    // Both accepted and waiting for their headers...
    let mut bad = connect().await;
    let mut good = connect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...the first is refused, then the second must still be served.
    bad.write_all(b"NOT A PROXY HEADER\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    good.write_all(b"PROXY TCP4 198.51.100.30 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), read_status(&mut good))
        .await
        .expect("the second connection was never handed to the server");
    assert_eq!(status, 200);
    server.abort();
}
