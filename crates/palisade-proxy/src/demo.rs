//! The built-in demo upstream, so a new user can see limits, penalties and
//! breakers work without writing a backend:
//! `/` → 200 `ok`; `/status/{code}`; `/delay/{ms}` (≤ 60 000);
//! `/bytes/{n}` (≤ 100 MiB, streamed in 64 KiB chunks); `/ws` (accepts an
//! `Upgrade:` and echoes bytes); `/headers` (the
//! request head as received, to see what the proxy forwards); any `POST`
//! echoes its body; `/stats` (requests received and still being answered,
//! by kind, so a test or the drill can see what the upstream is holding).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const MAX_DELAY_MS: u64 = 60_000;
const MAX_BYTES: u64 = 100 << 20;
const CHUNK: usize = 64 << 10;
const MAX_ECHO: usize = 10 << 20;

/// Binds the demo upstream; returns its address and the serving future.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let (local, _, serve) = bind_counted(addr).await?;
    Ok((local, serve))
}

/// Like [`bind`], also returning a count of requests answered (tests use it
/// to prove a request never reached the upstream).
pub async fn bind_counted(
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, Arc<AtomicU64>, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} (demo upstream): {e}"))
    })?;
    let local = listener.local_addr()?;
    let hits = Arc::new(AtomicU64::new(0));
    Ok((local, hits.clone(), serve(listener, hits)))
}

/// What `/stats` reports: a kind of request per line, `KIND RECEIVED
/// IN_FLIGHT`. A request is in flight from its head until its response
/// body is done or dropped (a POST whose body still trickles in, a
/// `/bytes` response the proxy has not read, a `/delay` still sleeping).
const KINDS: [&str; 8] = [
    "root", "headers", "status", "delay", "bytes", "ws", "post", "other",
];

#[derive(Default)]
struct Stats {
    received: [AtomicU64; KINDS.len()],
    in_flight: [AtomicU64; KINDS.len()],
}

impl Stats {
    fn kind(req: &Request<Incoming>) -> usize {
        let head = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        let name = match head {
            _ if req.method() == http::Method::POST => "post",
            "" => "root",
            "headers" | "status" | "delay" | "bytes" | "ws" => head,
            _ => "other",
        };
        KINDS.iter().position(|k| *k == name).unwrap_or(KINDS.len() - 1)
    }

    fn text(&self) -> String {
        KINDS
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let (r, f) = (&self.received[i], &self.in_flight[i]);
                format!(
                    "{k} {} {}\n",
                    r.load(Ordering::Relaxed),
                    f.load(Ordering::Relaxed)
                )
            })
            .collect()
    }
}

/// One request in flight: counted out when dropped.
struct InFlight(Arc<Stats>, usize);

impl InFlight {
    fn new(stats: &Arc<Stats>, kind: usize) -> Self {
        stats.received[kind].fetch_add(1, Ordering::Relaxed);
        stats.in_flight[kind].fetch_add(1, Ordering::Relaxed);
        Self(stats.clone(), kind)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it is done
    /// or dropped.
    struct Tracked {
        #[pin]
        inner: DemoBody,
        guard: Option<InFlight>,
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, std::task::Poll::Ready(None)) {
            this.guard.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn serve(listener: TcpListener, hits: Arc<AtomicU64>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let stats = Arc::new(Stats::default());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let hits = hits.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                hits.fetch_add(1, Ordering::Relaxed);
                let stats = stats.clone();
                async move {
                    if req.uri().path() == "/stats" {
                        return Ok::<_, Infallible>(full(StatusCode::OK, stats.text()));
                    }
                    let guard = InFlight::new(&stats, Stats::kind(&req));
                    let response = answer(req).await.map(|inner| {
                        Tracked {
                            inner,
                            guard: Some(guard),
                        }
                        .boxed()
                    });
                    Ok(response)
                }
            });
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type DemoBody = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<DemoBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

async fn answer(req: Request<Incoming>) -> Response<DemoBody> {
    let path = req.uri().path();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (head, arg) = (parts.next().unwrap_or(""), parts.next());
    let number = arg.and_then(|a| a.parse::<u64>().ok());
    if head == "ws" {
        return echo_upgrade(req);
    }
    if req.method() == http::Method::POST {
        return match http_body_util::Limited::new(req.into_body(), MAX_ECHO)
            .collect()
            .await
        {
            Ok(body) => full(StatusCode::OK, body.to_bytes()),
            Err(_) => full(StatusCode::BAD_REQUEST, "body unreadable or over 10 MiB\n"),
        };
    }
    match (head, number) {
        ("", _) => full(StatusCode::OK, "ok\n"),
        ("headers", _) => {
            let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (name, value) in req.headers() {
                out.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            full(StatusCode::OK, out)
        }
        ("status", Some(code)) => match u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) if status.as_u16() >= 200 => full(status, format!("{}\n", status.as_u16())),
            _ => full(StatusCode::BAD_REQUEST, "status must be 200-999\n"),
        },
        ("delay", Some(ms)) if ms <= MAX_DELAY_MS => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            full(StatusCode::OK, format!("delayed {ms} ms\n"))
        }
        ("delay", _) => full(StatusCode::BAD_REQUEST, "delay must be 0-60000 ms\n"),
        ("bytes", Some(n)) if n <= MAX_BYTES => {
            let body = Repeat {
                chunk: Bytes::from(vec![b'x'; CHUNK]),
                remaining: n,
            };
            Response::new(body.boxed())
        }
        ("bytes", _) => full(StatusCode::BAD_REQUEST, "bytes must be 0-104857600\n"),
        _ => full(
            StatusCode::NOT_FOUND,
            "not found; try /, /status/{code}, /delay/{ms}, /bytes/{n}\n",
        ),
    }
}

/// `/ws`: accepts any `Upgrade:` (a WebSocket handshake, say) with 101 and
/// echoes every byte back until the client closes.
fn echo_upgrade(mut req: Request<Incoming>) -> Response<DemoBody> {
    let Some(proto) = req.headers().get(http::header::UPGRADE).cloned() else {
        return full(
            StatusCode::BAD_REQUEST,
            "send Connection: upgrade and Upgrade: <protocol>\n",
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut r = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    r.headers_mut().insert(http::header::UPGRADE, proto);
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    r
}

/// `remaining` bytes of `x`, one chunk per frame.
struct Repeat {
    chunk: Bytes,
    remaining: u64,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let len = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= len as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    async fn stats(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split_once("\r\n\r\n").unwrap().1.to_owned()
    }

    /// Polls `/stats` until its `kind` line reads `line`.
    async fn reaches(addr: SocketAddr, kind: &str, line: &str) -> String {
        let mut last = String::new();
        for _ in 0..100 {
            last = stats(addr).await;
            if last.lines().any(|l| l == format!("{kind} {line}")) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{kind} never read {line}:\n{last}");
    }

    /// A POST whose body is still coming and a `/bytes` response nobody
    /// reads are in flight until their connections close.
    #[tokio::test]
    async fn stats_count_requests_held_until_their_connections_close() {
        let (addr, serve) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        tokio::spawn(serve);
        let mut post = TcpStream::connect(addr).await.unwrap();
        post.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        let mut big = TcpStream::connect(addr).await.unwrap();
        big.write_all(b"GET /bytes/104857600 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut small = TcpStream::connect(addr).await.unwrap();
        small
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(small.read(&mut buf).await.unwrap() > 0);
        reaches(addr, "post", "1 1").await;
        reaches(addr, "bytes", "1 1").await;
        reaches(addr, "root", "1 0").await;
        drop((post, big));
        reaches(addr, "post", "1 0").await;
        let text = reaches(addr, "bytes", "1 0").await;
        assert!(text.contains("other 0 0\n"), "{text}");
    }
}
