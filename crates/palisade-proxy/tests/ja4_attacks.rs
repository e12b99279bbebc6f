//! What a client can do with, or to, the JA4 fingerprint's uses: the
//! clearance cookie bound to it, a limit counted by it, the upstream
//! header. Real rustls clients against the daemon's TLS listener.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{config_text, demo};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_proxy::config::{Config, Overrides};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("palisade-ja4-attacks-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A daemon terminating TLS for `localhost` (certificate in `dir`),
/// logging JSON lines to `dir/access.log`; `server` is extra `[server]`
/// keys, `rest` other tables.
async fn start(dir: &Path, server: &str, rest: &str) -> palisade_proxy::Running {
    let (upstream, _, serve) = demo().await;
    tokio::spawn(serve);
    start_with(dir, &format!("http://{upstream}"), server, rest).await
}

/// [`start`] in front of the upstream at `url`.
async fn start_with(dir: &Path, url: &str, server: &str, rest: &str) -> palisade_proxy::Running {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
    let text = config_text(
        url,
        server,
        &format!(
            "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [access_log]\nenabled = true\nformat = \"json\"\npath = \"access.log\"\n{rest}"
        ),
    );
    let path = dir.join("palisade.toml");
    std::fs::write(&path, text).unwrap();
    let mut config = Config::load(&path, &Overrides::default()).unwrap();
    config.syn = None;
    palisade_proxy::start(config).await.unwrap()
}

/// The `ja4` field of the access log's lines, once there are `n`.
async fn logged_ja4(dir: &Path, n: usize) -> Vec<String> {
    for _ in 0..500 {
        let text = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() >= n {
            return lines
                .iter()
                .map(|v| v["ja4"].as_str().unwrap_or("-").to_owned())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} access log lines");
}

/// A rustls client config trusting the daemon's certificate, offering
/// `alpn` and the first `ciphers` of rustls's suites. Session resumption
/// is rustls's default (an in-memory ticket cache), as in every browser.
fn client_config(dir: &Path, alpn: &[&[u8]], ciphers: usize) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap())
        .unwrap();
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.truncate(ciphers);
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

async fn connect(cfg: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr, source: &str) -> Tls {
    let tcp = common::connect_from(source, addr).await;
    tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// One connection, speaking HTTP/2 or HTTP/1.1 as ALPN chose.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn over(tls: Tls) -> Self {
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            Self::H2(h2)
        } else {
            let (h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            Self::H1(h1)
        }
    }

    /// A browser navigation to `path`, with `cookie` when given.
    async fn navigate(&mut self, path: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let html = ("accept", "text/html,application/xhtml+xml,*/*;q=0.8");
        match cookie {
            Some(c) => self.get(path, &[html, ("cookie", c)]).await,
            None => self.get(path, &[html]).await,
        }
    }

    /// A GET of `path` with `headers`.
    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::get(format!("https://localhost{path}")).header("user-agent", "Mozilla/5.0");
        if matches!(self, Self::H1(_)) {
            req = req.header("host", "localhost");
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = match self {
            Self::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Self::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }
}

/// `data-<name>` of the challenge page's body element, when it is one.
fn page_data(body: &str, name: &str) -> Option<String> {
    let key = format!("data-{name}=\"");
    let start = body.find(&key)? + key.len();
    let len = body[start..].find('"')?;
    Some(body[start..start + len].to_owned())
}

/// The nonce a browser's script would find.
fn solve(token: &str, difficulty: u32) -> u64 {
    (0u64..)
        .find(|n| {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(token.as_bytes());
            ctx.update(n.to_string().as_bytes());
            palisade_proxy::challenge::leading_zero_bits(ctx.finish().as_ref()) >= difficulty
        })
        .unwrap()
}

/// Loads `/headers`, gets the page, solves it: the clearance cookie.
async fn clear(conn: &mut Conn) -> String {
    let (status, _, body) = conn.navigate("/headers", None).await;
    assert_eq!(status, 200);
    let token = page_data(&body, "t").unwrap_or_else(|| panic!("not the page: {body}"));
    let d: u32 = page_data(&body, "d").unwrap().parse().unwrap();
    let nonce = solve(&token, d);
    let (status, headers, _) = conn
        .navigate(
            &format!("/.palisade/challenge?t={token}&n={nonce}&r=%2Fheaders"),
            None,
        )
        .await;
    assert_eq!(status, 303);
    let set = headers.get("set-cookie").unwrap().to_str().unwrap();
    set.split(';').next().unwrap().to_owned()
}

/// Whether a navigation with `cookie` reached the upstream's `/headers`
/// (instead of getting the page again).
async fn passes(conn: &mut Conn, cookie: &str) -> bool {
    let (status, _, body) = conn.navigate("/headers", Some(cookie)).await;
    assert_eq!(status, 200, "{body}");
    page_data(&body, "t").is_none()
}

/// Every route challenged, at a difficulty the solver here finds at once.
const ALWAYS: &str = "[challenge]\ndifficulty = 4\nmax_difficulty = 8\n\
                      [[routes]]\nname = \"site\"\nchallenge = \"always\"\n";

/// A browser solves once, then opens more connections the way browsers
/// do: resumed with the session ticket the first one got (its ClientHello
/// now carries `pre_shared_key`, so its JA4 is another), and one offering
/// only `http/1.1` (a WebSocket's). Both keep the clearance; another TLS
/// stack carrying the same cookie from the same address is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clearance_survives_session_resumption_and_an_http1_only_connection() {
    let d = dir("resumed");
    let running = start(&d, "", ALWAYS).await;
    let addr = running.proxy_addr;
    let browser = client_config(&d, &[b"h2", b"http/1.1"], usize::MAX);
    let mut websocket = browser.clone();
    websocket.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (browser, websocket) = (Arc::new(browser), Arc::new(websocket));

    let tls = connect(&browser, addr, "127.0.0.2").await;
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    let mut first = Conn::over(tls).await;
    let cookie = clear(&mut first).await;
    assert!(
        passes(&mut first, &cookie).await,
        "on the connection it was solved on"
    );
    drop(first);

    let tls = connect(&browser, addr, "127.0.0.2").await;
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let mut resumed = Conn::over(tls).await;
    assert!(
        passes(&mut resumed, &cookie).await,
        "a resumed connection is refused"
    );

    let mut h1 = Conn::over(connect(&websocket, addr, "127.0.0.2").await).await;
    assert!(matches!(h1, Conn::H1(_)));
    assert!(
        passes(&mut h1, &cookie).await,
        "an http/1.1-only connection is refused"
    );

    // Each JA4 of the three was another: the binding did not lean on
    // them being equal.
    let logged = logged_ja4(&d, 5).await;
    let (solved_on, resumed_on, h1_on) = (&logged[0], &logged[3], &logged[4]);
    assert_ne!(solved_on, resumed_on, "{logged:?}");
    assert_ne!(solved_on, h1_on, "{logged:?}");

    let other = Arc::new(client_config(&d, &[b"h2", b"http/1.1"], 1));
    let mut other = Conn::over(connect(&other, addr, "127.0.0.2").await).await;
    assert!(!passes(&mut other, &cookie).await, "another TLS stack passed");
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&d);
}

/// A TLS-terminating hop in front of Palisade (a CDN re-encrypting to the
/// origin) is a trusted proxy: its connection's ClientHello is the hop's
/// own, so its JA4 says nothing of the clients it forwards for. Counted by
/// it, every client behind the hop shared one limit (one of them spent it
/// for all), and the upstream was told the hop's JA4 as theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_hops_ja4_is_nobodys() {
    let d = dir("trusted");
    let rest = "[clients]\ntrusted_proxies = [\"127.0.0.2/32\"]\n\
                [[routes]]\nname = \"site\"\npath_prefix = \"/\"\nrate = \"3/h\"\nkey = \"ja4\"\n";
    let running = start(&d, "tls_fingerprint_header = \"X-JA4\"\n", rest).await;
    let addr = running.proxy_addr;
    let hop = Arc::new(client_config(&d, &[b"http/1.1"], usize::MAX));
    let mut conn = Conn::over(connect(&hop, addr, "127.0.0.2").await).await;
    for client in ["198.51.100.1", "198.51.100.2"] {
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let (status, _, body) = conn.get("/headers", &[("x-forwarded-for", client)]).await;
            if status == 200 {
                assert!(body.contains(&format!("x-real-ip: {client}")), "{body}");
                assert!(
                    !body.contains("x-ja4:"),
                    "the hop's JA4 went up as {client}'s: {body}"
                );
            }
            statuses.push(status.as_u16());
        }
        assert_eq!(statuses, [200, 200, 200, 429], "{client}");
    }
    // The hop's own requests are its own: its JA4 counts and goes up.
    let (status, _, body) = conn.get("/headers", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("x-ja4: t13"), "{body}");
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&d);
}

/// An h2c upstream answering each request with the `x-ja4` values it got,
/// in its headers (`h:`) and in its trailers (`t:`), one a line.
async fn trailer_echo() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let mut seen = String::new();
                for v in req.headers().get_all("x-ja4") {
                    seen.push_str(&format!("h:{}\n", v.to_str().unwrap()));
                }
                let body = req.into_body().collect().await.unwrap();
                if let Some(t) = body.trailers() {
                    for (name, v) in t {
                        seen.push_str(&format!("t:{name}:{}\n", v.to_str().unwrap()));
                    }
                }
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(seen))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    addr
}

/// A client's `X-JA4` sent as a request trailer, which an HTTP/2 upstream
/// (gRPC's) reads like a header: the upstream must still see only
/// Palisade's value. Forwarding, routing and framing fields sent as
/// trailers are dropped too; other trailers pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_header_forged_in_trailers_does_not_reach_the_upstream() {
    let d = dir("trailers");
    let upstream = trailer_echo().await;
    let running = start_with(
        &d,
        &format!("h2c://{upstream}"),
        "tls_fingerprint_header = \"X-JA4\"\n",
        "",
    )
    .await;
    let cfg = Arc::new(client_config(&d, &[b"h2"], usize::MAX));
    let tls = connect(&cfg, running.proxy_addr, "127.0.0.2").await;
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-ja4", "forged-in-trailers".parse().unwrap());
    // What the upstream must learn from Palisade alone, or only before
    // the body: the client's address and the request's host and framing.
    trailers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    trailers.insert("x-real-ip", "203.0.113.9".parse().unwrap());
    trailers.insert("forwarded", "for=203.0.113.9".parse().unwrap());
    trailers.insert("host", "admin.internal".parse().unwrap());
    trailers.insert("grpc-status-details", "kept".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"body"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let req = Request::post("https://localhost/upload")
        .header("x-ja4", "forged-in-headers")
        .body(body)
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 2, "{seen}");
    assert!(lines[0].starts_with("h:t13"), "{seen}");
    assert_eq!(
        lines[1], "t:grpc-status-details:kept",
        "other trailers pass: {seen}"
    );
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&d);
}
