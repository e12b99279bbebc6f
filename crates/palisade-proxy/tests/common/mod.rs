//! Shared plumbing for the real-socket tests: a demo upstream, the proxy on
//! ephemeral loopback ports, and HTTP clients bound to chosen loopback
//! source addresses (127.0.0.2, 127.0.0.3, ...) so each test client is a
//! distinct client to the proxy.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use palisade_proxy::Running;
use palisade_proxy::config::{Config, Overrides};
use tokio::net::{TcpSocket, TcpStream};

pub struct Harness {
    pub running: Running,
    pub upstream: SocketAddr,
    /// Requests the demo upstream answered.
    pub upstream_hits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Harness {
    /// Demo upstream + proxy. `server` is extra `[server]` keys, `rest`
    /// any other tables.
    pub async fn start(server: &str, rest: &str) -> Self {
        let (upstream, hits, serve) = demo().await;
        tokio::spawn(serve);
        let mut h = Self::start_with_upstream(&format!("http://{upstream}"), server, rest, upstream).await;
        h.upstream_hits = hits;
        h
    }

    pub async fn start_with_upstream(url: &str, server: &str, rest: &str, upstream: SocketAddr) -> Self {
        let config = Config::parse(
            &config_text(url, server, rest),
            "test.toml",
            &Overrides::default(),
        )
        .unwrap();
        let running = palisade_proxy::start(config).await.unwrap();
        Self {
            running,
            upstream,
            upstream_hits: Default::default(),
        }
    }

    pub fn proxy(&self) -> SocketAddr {
        self.running.proxy_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.running.admin_addr
    }

    /// A keep-alive HTTP/1.1 client to the proxy from `source`.
    pub async fn client(&self, source: &str) -> Client {
        Client::connect(source, self.proxy()).await
    }

    /// A client to the admin API.
    pub async fn admin_client(&self) -> Client {
        Client::connect("127.0.0.1", self.admin()).await
    }

    /// The admin API's metrics text.
    pub async fn metrics(&self) -> String {
        self.admin_client().await.get("/metrics").await.2
    }

    /// An authenticated admin API request.
    pub async fn admin_request(&self, method: &str, path: &str, body: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", "Bearer test-token-0123456789")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let (status, _, body) = self.admin_client().await.send(req).await;
        (status, body)
    }
}

/// Whether a fresh connection from `source` to `to` is closed before it is
/// answered (how a banned address is refused at accept); `Err` holds what
/// the server answered.
pub async fn refused_at_accept(source: &str, to: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = connect_from(source, to).await;
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server neither answered nor closed the connection in 5 s");
    match read {
        Err(_) => Ok(()),
        Ok(_) if buf.is_empty() => Ok(()),
        Ok(_) => Err(String::from_utf8_lossy(&buf).into_owned()),
    }
}

/// A config on ephemeral loopback ports with admin token
/// `test-token-0123456789`; the admin API accepts `Host: test.local`, the
/// name these clients send.
/// The SYN defense stays off unless `rest` configures it: as root it would
/// change the host's firewall, which only the namespace tests may do.
pub fn config_text(upstream_url: &str, server: &str, rest: &str) -> String {
    let syn = if rest.contains("[syn]") {
        ""
    } else {
        "[syn]\nenabled = false\n"
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"{upstream_url}\"]\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"test-token-0123456789\"\nallowed_hosts = [\"test.local\"]\n{rest}\n{syn}"
    )
}

/// A demo upstream on an ephemeral port, with its hit counter.
pub async fn demo() -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    impl std::future::Future<Output = ()>,
) {
    palisade_proxy::demo::bind_counted("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// Connects from `source` (any port) to `to`.
pub async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Writes `bytes` on a fresh connection from `source` and reads until the
/// server closes it (bounded: a server that never closes fails the test).
pub async fn raw_exchange(source: &str, to: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect_from(source, to).await;
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the server never closed the connection")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// An HTTP/2 (prior knowledge, h2c) client to `to` from `source`.
pub async fn h2_client(source: &str, to: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = connect_from(source, to).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

impl Harness {
    /// Requests the demo upstream has answered so far.
    pub fn hits(&self) -> u64 {
        self.upstream_hits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
}

pub struct Reply(pub StatusCode, pub HeaderMap, pub String);

impl Client {
    pub async fn connect(source: &str, to: SocketAddr) -> Self {
        let stream = connect_from(source, to).await;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
        let (status, headers, body) = self.send_raw(req).await;
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends `req`, with `Host: test.local` when it names none (as every
    /// real HTTP/1.1 client names one).
    pub async fn send_raw(&mut self, mut req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, http::HeaderValue::from_static("test.local"));
        }
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    pub async fn get(&mut self, path: &str) -> (StatusCode, HeaderMap, String) {
        self.get_with(path, &[]).await
    }

    pub async fn get_with(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::get(path).header("host", "test.local");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(Bytes::new())).unwrap()).await
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "test.local");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
    }
}

/// The value of a metric line (exact label set). A series that is absent
/// fails the test: read as 0, a misnamed metric would pass every `== 0`.
pub fn metric(text: &str, series: &str) -> f64 {
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()));
    value.unwrap_or_else(|| {
        let name = series.split('{').next().unwrap_or(series);
        let family: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
        panic!(
            "no metric series {series}; the family has:\n{}",
            family.join("\n")
        )
    })
}

/// `palisade_requests_total` of GET requests on `endpoint` answered
/// `status`; absent fails, as in [`metric`].
pub fn get_requests(text: &str, endpoint: &str, status: u16) -> f64 {
    metric(
        text,
        &format!("palisade_requests_total{{endpoint=\"{endpoint}\",method=\"GET\",status=\"{status}\"}}"),
    )
}
