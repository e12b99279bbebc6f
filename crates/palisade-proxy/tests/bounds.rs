//! What one request may cost: a body no larger than `server.max_body_size`,
//! and a response read no slower than `server.response_min_rate`, over
//! real sockets against the real daemon and upstreams that record what
//! reached them and which connections they still have open.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Harness, connect_from, metric};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The limit every test here configures.
const MAX: usize = 65536;

/// One upstream connection as the upstream read it.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The request head arrived whole.
    head: bool,
    /// Body bytes read, framing removed.
    body: usize,
    /// The whole request arrived (and was answered `200`).
    complete: bool,
    /// The connection has ended.
    ended: bool,
}

/// An HTTP/1.1 upstream that reads one request per connection (by
/// `Content-Length` or chunked), answers `200` when it is whole, and
/// records each connection.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let i = {
                    let mut v = log.lock().unwrap();
                    v.push(Seen::default());
                    v.len() - 1
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    let _ = read_request(&mut r, &log, i).await;
                    // Whatever happened, wait for the daemon to hang up.
                    let mut sink = [0u8; 4096];
                    while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
                    log.lock().unwrap()[i].ended = true;
                });
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `cond` holds of what the upstream saw.
    async fn wait(&self, what: &str, cond: impl Fn(&[Seen]) -> bool) {
        for _ in 0..200 {
            if cond(&self.seen()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}; the upstream saw {:?}", self.seen());
    }
}

async fn read_request(r: &mut BufReader<TcpStream>, log: &Mutex<Vec<Seen>>, i: usize) -> std::io::Result<()> {
    let update = |f: &dyn Fn(&mut Seen)| f(&mut log.lock().unwrap()[i]);
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if l.starts_with("transfer-encoding:") && l.ends_with("chunked") {
            chunked = true;
        }
    }
    update(&|s| s.head = true);
    let mut buf = vec![0u8; 16384];
    if chunked {
        loop {
            let mut size = String::new();
            if r.read_line(&mut size).await? == 0 {
                return Ok(());
            }
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end).await?;
                break;
            }
            let mut left = n;
            while left > 0 {
                let got = r.read(&mut buf[..left.min(16384)]).await?;
                if got == 0 {
                    return Ok(());
                }
                left -= got;
                update(&|s| s.body += got);
            }
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).await?;
        }
    } else {
        let mut left = length.unwrap_or(0);
        while left > 0 {
            let got = r.read(&mut buf[..left.min(16384)]).await?;
            if got == 0 {
                return Ok(());
            }
            left -= got;
            update(&|s| s.body += got);
        }
    }
    update(&|s| s.complete = true);
    r.get_mut()
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
        .await
}

async fn daemon(upstream: &Recorder) -> Harness {
    Harness::start_with_upstream(
        &format!("http://{}", upstream.addr),
        &format!("max_body_size = {MAX}"),
        "[upstream]\npool_max_idle = 0\n",
        upstream.addr,
    )
    .await
}

/// Reads until the daemon closes the connection (a reset after data
/// counts as closed), at most 10 s.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the daemon neither answered nor closed in 10 s; it sent {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// An h2c connection from `source`, its connection task spawned.
async fn h2_client(h: &Harness, source: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = connect_from(source, h.proxy()).await;
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

fn h2_post(h: &Harness, length: Option<usize>) -> http::Request<()> {
    let mut req = http::Request::post(format!("http://{}/upload", h.proxy()));
    if let Some(n) = length {
        req = req.header("content-length", n);
    }
    req.body(()).unwrap()
}

fn too_large(text: &str) -> f64 {
    metric(text, "palisade_upstream_errors_total{kind=\"body_too_large\"}")
}

fn posts(text: &str, status: u16) -> f64 {
    metric(
        text,
        &format!("palisade_requests_total{{endpoint=\"default\",method=\"POST\",status=\"{status}\"}}"),
    )
}

/// The attack: a `Content-Length` past `server.max_body_size`, on
/// HTTP/1.1 and HTTP/2. It is answered 413 before the upstream is asked
/// (no connection reaches it) and, on HTTP/1.1, the connection closes:
/// the body that follows is never read. A body of exactly the limit goes
/// through whole.
#[tokio::test]
async fn a_declared_body_over_max_body_size_is_413_before_the_upstream() {
    let upstream = Recorder::start().await;
    let h = daemon(&upstream).await;

    let mut s = connect_from("127.0.0.171", h.proxy()).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        MAX + 1
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let reply = read_to_close(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply:.300}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply:.300}"
    );

    let mut h2 = h2_client(&h, "127.0.0.172").await;
    let (resp, _body) = h2.send_request(h2_post(&h, Some(MAX + 1)), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no HTTP/2 answer in 10 s")
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());

    // Exactly the limit is not over it.
    let mut s = connect_from("127.0.0.173", h.proxy()).await;
    let mut req =
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {MAX}\r\n\r\n")
            .into_bytes();
    req.extend(std::iter::repeat_n(b'a', MAX));
    s.write_all(&req).await.unwrap();
    let reply = read_to_close(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:.300}");
    assert_eq!(upstream.seen().len(), 1);
    assert!(upstream.seen()[0].complete && upstream.seen()[0].body == MAX);

    let m = h.metrics().await;
    assert_eq!(too_large(&m), 2.0);
    assert_eq!(posts(&m, 413), 2.0);
    h.running.shutdown().await;
}

/// The attack: a body without a length (HTTP/1.1 chunked, HTTP/2 DATA
/// frames) that streams on past `server.max_body_size`. The first `MAX`
/// bytes stream to the upstream as they come; the byte past them is
/// never sent, the upstream connection ends without a whole request, and
/// the client, with no response started, gets 413 (on HTTP/1.1 with the
/// connection closed).
#[tokio::test]
async fn a_streamed_body_growing_past_max_body_size_is_cut_and_413() {
    let upstream = Recorder::start().await;
    let h = daemon(&upstream).await;

    let mut s = connect_from("127.0.0.174", h.proxy()).await;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("1000\r\n{}\r\n", "a".repeat(4096));
    for _ in 0..MAX / 4096 {
        s.write_all(chunk.as_bytes()).await.unwrap();
    }
    upstream
        .wait("the first MAX bytes never streamed to the upstream", |seen| {
            seen.len() == 1 && seen[0].body == MAX
        })
        .await;
    s.write_all(b"1\r\nb\r\n").await.unwrap();
    let reply = read_to_close(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply:.300}");
    upstream
        .wait("the upstream connection stayed open", |seen| seen[0].ended)
        .await;
    let first = &upstream.seen()[0];
    assert!(first.head && !first.complete && first.body == MAX, "{first:?}");

    let mut h2 = h2_client(&h, "127.0.0.175").await;
    let (resp, mut body) = h2.send_request(h2_post(&h, None), false).unwrap();
    for _ in 0..MAX / 16384 {
        body.send_data(Bytes::from(vec![b'a'; 16384]), false).unwrap();
    }
    upstream
        .wait(
            "the first MAX bytes of the HTTP/2 body never streamed to the upstream",
            |seen| seen.len() == 2 && seen[1].body == MAX,
        )
        .await;
    body.send_data(Bytes::from_static(b"b"), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no HTTP/2 answer in 10 s")
        .unwrap();
    assert_eq!(resp.status(), 413);
    upstream
        .wait(
            "the upstream connection of the HTTP/2 request stayed open",
            |seen| seen[1].ended,
        )
        .await;
    let second = &upstream.seen()[1];
    assert!(
        second.head && !second.complete && second.body == MAX,
        "{second:?}"
    );

    let m = h.metrics().await;
    assert_eq!(too_large(&m), 2.0);
    assert_eq!(posts(&m, 413), 2.0);
    h.running.shutdown().await;
}

/// The response every request to [`big_upstream`] gets.
const BIG: usize = 64 * 1024 * 1024;

/// An upstream whose every request gets `BIG` bytes, and which counts the
/// connections it has open (one ends when the proxy closes it).
async fn big_upstream() -> (SocketAddr, Arc<AtomicI64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicI64::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let open = counter.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                let served = async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await?;
                        if n == 0 {
                            return Ok(());
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                    s.write_all(reply.as_bytes()).await?;
                    s.write_all(&vec![b'x'; BIG]).await?;
                    while s.read(&mut buf).await? > 0 {}
                    std::io::Result::Ok(())
                };
                let _ = served.await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// The daemon in front of [`big_upstream`]: writes may pause 1 s, and a
/// client must read `rate` bytes/s of the time it is waited on.
async fn slow_reader_daemon(upstream: SocketAddr, rate: u64) -> Harness {
    Harness::start_with_upstream(
        &format!("http://{upstream}"),
        &format!("write_timeout = \"1s\"\nidle_timeout = \"60s\"\nresponse_min_rate = {rate}"),
        "",
        upstream,
    )
    .await
}

fn slow_reads(text: &str) -> f64 {
    metric(text, "palisade_connection_timeouts_total{kind=\"slow_read\"}")
}

/// The attack on HTTP/1.1: a client that reads at most 64 KiB every 20 ms
/// (3.2 MB/s), so the kernel frees room in the daemon's send buffer well
/// within `write_timeout` and no write ever stalls. Set here to 16 MiB/s,
/// `response_min_rate` cuts it: the connection closes short of the
/// response (once the client has read what the kernels still buffer) and
/// the upstream connection behind it is released. A client that reads at
/// loopback speed under the same settings gets the whole response.
#[tokio::test]
async fn an_http1_reader_below_response_min_rate_is_cut_and_its_upstream_released() {
    let (upstream, open) = big_upstream().await;
    let h = slow_reader_daemon(upstream, 16 << 20).await;

    let mut s = connect_from("127.0.0.176", h.proxy()).await;
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The head is part of what was read: a whole response is more than BIG.
    assert!(
        got < BIG,
        "a client reading at most 3.2 MB/s got the whole response ({got} bytes)"
    );
    for _ in 0..200 {
        if open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        open.load(Ordering::SeqCst),
        0,
        "the upstream connection stayed open"
    );
    let m = h.metrics().await;
    assert_eq!(slow_reads(&m), 1.0);
    assert_eq!(
        metric(&m, "palisade_connection_timeouts_total{kind=\"write\"}"),
        0.0
    );

    let mut fast = common::Client::connect("127.0.0.177", h.proxy()).await;
    let (status, _, body) = fast
        .send_raw(http::Request::get("/big").body(Default::default()).unwrap())
        .await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), BIG);
    assert_eq!(slow_reads(&h.metrics().await), 1.0);
    h.running.shutdown().await;
}

/// The attack on HTTP/2: a client that opens its 16 KiB stream window again
/// every 100 ms (160 KB/s), ten times per `write_timeout`, so the stream
/// never stalls. Below `response_min_rate` the stream is reset and its
/// upstream connection released.
#[tokio::test]
async fn an_h2_reader_below_response_min_rate_is_reset_and_its_upstream_released() {
    let (upstream, open) = big_upstream().await;
    let h = slow_reader_daemon(upstream, 1 << 20).await;

    let tcp = connect_from("127.0.0.178", h.proxy()).await;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(16384)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/big", h.proxy()))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no response head in 10 s")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0;
    let mut reset = None;
    // 150 frames: 15 s of reading, 2.4 MB at most.
    for _ in 0..150 {
        match body.data().await {
            Some(Ok(chunk)) => {
                got += chunk.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                body.flow_control().release_capacity(chunk.len()).unwrap();
            }
            Some(Err(e)) => {
                reset = Some(e);
                break;
            }
            None => break,
        }
    }
    let reset =
        reset.unwrap_or_else(|| panic!("a stream read at 160 KB/s was still served after {got} bytes"));
    assert!(reset.is_reset(), "{reset}");
    assert!(got < BIG, "{got}");
    for _ in 0..200 {
        if open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        open.load(Ordering::SeqCst),
        0,
        "the upstream connection stayed open"
    );
    let m = h.metrics().await;
    assert_eq!(slow_reads(&m), 1.0);
    assert_eq!(metric(&m, "palisade_stalled_responses_total"), 0.0);
    h.running.shutdown().await;
}
