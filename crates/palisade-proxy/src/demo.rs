//! The built-in demo upstream, so a new user can see limits, penalties and
//! breakers work without writing a backend:
//! `/` → 200 `ok`; `/status/{code}`; `/delay/{ms}` (≤ 60 000);
//! `/bytes/{n}` (≤ 100 MiB, streamed in 64 KiB chunks); `/ws` (accepts an
//! `Upgrade:` and echoes bytes); `/headers` (the
//! request head as received, to see what the proxy forwards); any `POST`
//! echoes its body.

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

async fn serve(listener: TcpListener, hits: Arc<AtomicU64>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let hits = hits.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                hits.fetch_add(1, Ordering::Relaxed);
                async move { Ok::<_, Infallible>(answer(req).await) }
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
