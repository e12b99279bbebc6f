//! The reputation store in the daemon: entries decide requests, feeds
//! (file, HTTP with ETag, admin push) update it, bad deltas change nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Harness, metric};
use http::StatusCode;
use http_body_util::Full;
use palisade_store::sign::SigningKey;
use palisade_store::{Action, BuildOptions, Builder, Delta, Op, Snapshot};

/// Config lines for the tests that are not about signatures or transport.
const UNSIGNED_HTTP: &str = "feed_unsigned = true\nfeed_allow_http = true\n";

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-store-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 127.0.0.2 denied, 127.0.0.3 scored 10, 127.0.0.4 allowed, 127.0.10.0/24 scored 5.
fn snapshot(dir: &std::path::Path) -> PathBuf {
    let csv =
        "127.0.0.2,0,abuse,deny\n127.0.0.3,10,spam\n127.0.0.4,90,partner,allow\n127.0.10.0/24,5,botnet\n";
    let path = dir.join("rep.pstore");
    Builder::from_csv(csv.as_bytes(), "t.csv")
        .unwrap()
        .finish(BuildOptions::default())
        .unwrap()
        .write_to(&path)
        .unwrap();
    path
}

fn delta(from: u64, to: u64, ops: Vec<Op>) -> String {
    Delta { from, to, ops }.encode()
}

fn deny(ip: &str) -> Op {
    Op::Upsert {
        net: ip.parse().unwrap(),
        score: 0,
        action: Action::Deny,
        reason: "feed".into(),
        expires: 0,
    }
}

/// Writes `file`.sig, as `palisade store sign` does.
fn sign_file(key: &SigningKey, file: &std::path::Path) {
    let sig = key.sign(&std::fs::read(file).unwrap());
    std::fs::write(palisade_store::sign::signature_path(file), sig).unwrap();
}

/// Replaces the feed file by rename, as a feed writer should: a poll never
/// reads it half-written.
fn publish(feed: &std::path::Path, text: &str) {
    let tmp = feed.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, feed).unwrap();
}

/// `publish`, with the publisher's signature of `text` put next to it
/// first.
fn publish_signed(publisher: &SigningKey, feed: &std::path::Path, text: &str) {
    std::fs::write(
        palisade_store::sign::signature_path(feed),
        publisher.sign(text.as_bytes()),
    )
    .unwrap();
    publish(feed, text);
}

async fn status_from(h: &Harness, source: &str) -> StatusCode {
    h.client(source).await.get("/").await.0
}

/// Polls `check` every 20 ms for at most 10 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

async fn store_info(h: &Harness) -> serde_json::Value {
    let (status, _, body) = h.admin_client().await.get("/api/v1/store").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn last_error(info: &serde_json::Value) -> &str {
    info["feed"]["last_error"].as_str().unwrap()
}

/// Makes `replace` to the store's files and waits for the daemon to count
/// a refusal of it; the store's state then.
async fn refused(h: &Harness, what: &str, replace: impl FnOnce()) -> serde_json::Value {
    let before = store_info(h).await["feed"]["rejected"].as_u64().unwrap();
    replace();
    eventually(what, async || {
        store_info(h).await["feed"]["rejected"].as_u64() > Some(before)
    })
    .await;
    store_info(h).await
}

#[tokio::test]
async fn entries_decide_and_a_file_feed_updates_them() {
    let dir = tmp("file");
    let path = snapshot(&dir);
    let feed = dir.join("feed.delta");
    let h = Harness::start(
        "",
        &format!(
            "[store]\npath = \"{}\"\nfeed = \"{}\"\npoll_interval = \"50ms\"\nfeed_unsigned = true\n",
            path.display(),
            feed.display()
        ),
    )
    .await;
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&h, "127.0.0.3").await, StatusCode::FORBIDDEN);
    assert_eq!(
        status_from(&h, "127.0.10.77").await,
        StatusCode::FORBIDDEN,
        "prefix entry"
    );
    assert_eq!(status_from(&h, "127.0.0.5").await, StatusCode::OK);
    // Allowed: 300 requests pass a 100/s limit.
    let mut c = h.client("127.0.0.4").await;
    for _ in 0..300 {
        assert_eq!(c.get("/").await.0, StatusCode::OK);
    }
    let (_, _, explain) = h.admin_client().await.get("/api/v1/reputation/127.0.0.3").await;
    let explain: serde_json::Value = serde_json::from_str(&explain).unwrap();
    assert_eq!(explain["store"]["score"], 10);
    assert_eq!(explain["store"]["reason"], "spam");

    publish(&feed, &delta(0, 1, vec![deny("127.0.0.5/32")]));
    eventually("the feed's delta applied", async || {
        status_from(&h, "127.0.0.5").await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(store_info(&h).await["watermark"], 1);
    // Persisted into the snapshot file.
    assert_eq!(Snapshot::open(&path).unwrap().watermark(), 1);

    // A truncated delta is rejected whole; the data in force stays.
    let bad = delta(
        1,
        2,
        vec![deny("127.0.0.6/32"), Op::Delete("127.0.0.5/32".parse().unwrap())],
    );
    publish(&feed, &bad[..bad.len() - 10]);
    // Before the first delta the feed file may not have existed yet: that
    // is one rejection (a feed that stays broken is counted once).
    let before = store_info(&h).await["feed"]["rejected"].as_u64().unwrap();
    assert!(before <= 1, "a missing feed was counted {before} times");
    eventually("the bad delta rejected", async || {
        store_info(&h).await["feed"]["rejected"] == before + 1
    })
    .await;
    let info = store_info(&h).await;
    assert!(last_error(&info).contains("feed.delta"), "{info}");
    assert_eq!(info["watermark"], 1);
    assert_eq!(status_from(&h, "127.0.0.5").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&h, "127.0.0.6").await, StatusCode::OK);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_store_updates_total{kind=\"rejected\"}"),
        (before + 1) as f64
    );
    assert_eq!(metric(&m, "palisade_store_updates_total{kind=\"applied\"}"), 1.0);
    assert_eq!(metric(&m, "palisade_store_watermark"), 1.0);
    assert_eq!(metric(&m, "palisade_store_entries"), 5.0);

    // Out of order (skips watermark 2): rejected too.
    publish(&feed, &delta(2, 3, vec![deny("127.0.0.6/32")]));
    eventually("the gap rejected", async || {
        store_info(&h).await["feed"]["rejected"] == before + 2
    })
    .await;
    assert!(last_error(&store_info(&h).await).contains("does not follow watermark 1"));
    assert_eq!(status_from(&h, "127.0.0.6").await, StatusCode::OK);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn admin_pushes_deltas_and_reloads_a_rebuilt_file() {
    let dir = tmp("admin");
    let path = snapshot(&dir);
    let h = Harness::start("", &format!("[store]\npath = \"{}\"\n", path.display())).await;
    let post = |path: &str, body: String, token: bool| {
        let mut r = http::Request::post(path).header("host", "localhost");
        if token {
            r = r.header("authorization", "Bearer test-token-0123456789");
        }
        r.body(Full::new(Bytes::from(body))).unwrap()
    };
    let mut admin = h.admin_client().await;
    let (status, _, _) = admin
        .send(post(
            "/api/v1/store/delta",
            delta(0, 1, vec![deny("127.0.0.7/32")]),
            false,
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(status_from(&h, "127.0.0.7").await, StatusCode::OK);
    let (status, _, body) = admin
        .send(post(
            "/api/v1/store/delta",
            delta(0, 1, vec![deny("127.0.0.7/32")]),
            true,
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(status_from(&h, "127.0.0.7").await, StatusCode::FORBIDDEN);
    let (status, _, body) = admin
        .send(post("/api/v1/store/delta", delta(5, 6, vec![]), true))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _, body) = admin
        .send(post("/api/v1/store/delta", "garbage".into(), true))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("admin API:1: not a delta"), "{body}");

    // An operator rebuilds the file: POST reload picks it up.
    let csv = "127.0.0.8,0,,deny\n";
    Builder::from_csv(csv.as_bytes(), "t")
        .unwrap()
        .finish(BuildOptions::default())
        .unwrap()
        .write_to(&path)
        .unwrap();
    let (status, _, body) = admin
        .send(post("/api/v1/store/reload", String::new(), true))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(status_from(&h, "127.0.0.8").await, StatusCode::FORBIDDEN);
    assert_eq!(
        status_from(&h, "127.0.0.2").await,
        StatusCode::OK,
        "the old entries are gone"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A feed host on loopback: serves whatever the test put at a path (404
/// otherwise) with an ETag, honours If-None-Match, and remembers the
/// query strings it was sent.
#[derive(Clone, Default)]
struct FeedServer {
    files: Arc<std::sync::Mutex<std::collections::HashMap<String, Bytes>>>,
    full: Arc<AtomicU64>,
    cached: Arc<AtomicU64>,
    queries: Arc<std::sync::Mutex<Vec<String>>>,
}

impl FeedServer {
    async fn start() -> (Self, SocketAddr) {
        let server = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let resp = this.answer(&req);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (server, addr)
    }

    /// The same over TLS, with this certificate chain and key (PEM).
    async fn start_tls(cert_pem: &str, key_pem: &str) -> (Self, SocketAddr) {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let server = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (this, acceptor) = (this.clone(), acceptor.clone());
                tokio::spawn(async move {
                    // A client that does not trust us fails here.
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let resp = this.answer(&req);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (server, addr)
    }

    fn put(&self, path: &str, body: impl Into<Bytes>) {
        self.files.lock().unwrap().insert(path.into(), body.into());
    }

    fn answer(&self, req: &http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
        self.queries
            .lock()
            .unwrap()
            .push(req.uri().query().unwrap_or_default().to_owned());
        let Some(body) = self.files.lock().unwrap().get(req.uri().path()).cloned() else {
            return http::Response::builder()
                .status(404)
                .body(Full::new(Bytes::new()))
                .unwrap();
        };
        let etag = format!("\"{:08x}\"", crc(&body));
        let unchanged = req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v.as_bytes() == etag.as_bytes());
        if unchanged {
            self.cached.fetch_add(1, Ordering::SeqCst);
            http::Response::builder()
                .status(304)
                .body(Full::new(Bytes::new()))
                .unwrap()
        } else {
            self.full.fetch_add(1, Ordering::SeqCst);
            http::Response::builder()
                .header("etag", etag)
                .body(Full::new(body))
                .unwrap()
        }
    }
}

fn crc(s: &[u8]) -> u32 {
    s.iter().fold(0u32, |h, &b| h.rotate_left(5) ^ u32::from(b))
}

#[tokio::test]
async fn an_http_feed_is_polled_with_etags() {
    let dir = tmp("http");
    let path = snapshot(&dir);
    let (feed, addr) = FeedServer::start().await;
    feed.put("/delta", delta(0, 1, vec![deny("127.0.0.9/32")]));
    let h = Harness::start(
        "",
        &format!(
            "[store]\npath = \"{}\"\nfeed = \"http://{addr}/delta?token=q-secret-77\"\npoll_interval = \"50ms\"\n{UNSIGNED_HTTP}",
            path.display()
        ),
    )
    .await;
    eventually("the HTTP delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::FORBIDDEN
    })
    .await;
    eventually("unchanged polls answered 304", async || {
        feed.cached.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        feed.full.load(Ordering::SeqCst),
        1,
        "the unchanged delta was downloaded again"
    );
    feed.put(
        "/delta",
        delta(1, 2, vec![Op::Delete("127.0.0.9/32".parse().unwrap())]),
    );
    eventually("the next delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::OK
    })
    .await;
    assert_eq!(store_info(&h).await["watermark"], 2);
    // A token a publisher put in the query string is sent, never shown.
    assert!(
        feed.queries
            .lock()
            .unwrap()
            .iter()
            .all(|q| q == "token=q-secret-77")
    );
    feed.put("/delta", "garbage");
    eventually("the bad delta rejected", async || {
        !store_info(&h).await["feed"]["last_error"].is_null()
    })
    .await;
    let info = store_info(&h).await.to_string();
    assert!(info.contains(&format!("http://{addr}/delta?…")), "{info}");
    assert!(!info.contains("q-secret"), "{info}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The default transport: a signed feed over https, trusted through
/// `store.feed_ca`. The same host is not trusted without that CA (its
/// certificate is self-signed): nothing is fetched, the store stays.
#[tokio::test]
async fn a_signed_feed_over_https() {
    let dir = tmp("https");
    let path = snapshot(&dir);
    let (publisher, _) = SigningKey::generate().unwrap();
    sign_file(&publisher, &path);
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let (feed, addr) = FeedServer::start_tls(&cert.cert.pem(), &cert.signing_key.serialize_pem()).await;
    let text = delta(0, 1, vec![deny("127.0.0.9/32")]);
    feed.put("/delta.sig", publisher.sign(text.as_bytes()));
    feed.put("/delta", text);
    let config = |ca_line: &str| {
        format!(
            "[store]\npath = \"{}\"\nfeed = \"https://{addr}/delta\"\npoll_interval = \"50ms\"\n\
             feed_public_key = \"{}\"\n{ca_line}",
            path.display(),
            publisher.public_key()
        )
    };
    let untrusted = Harness::start("", &config("")).await;
    eventually("the untrusted host refused", async || {
        metric(
            &untrusted.metrics().await,
            "palisade_feed_rejected_total{reason=\"fetch\"}",
        ) == 1.0
    })
    .await;
    let info = store_info(&untrusted).await;
    assert_eq!(info["watermark"], 0, "{info}");
    // Unknown issuer, or (on a machine without a system trust store) no
    // roots at all: either way the host is not trusted.
    let error = last_error(&info);
    assert!(
        error.contains("certificate") || error.contains("no system trust roots"),
        "{info}"
    );
    assert_eq!(
        feed.full.load(Ordering::SeqCst),
        0,
        "a delta was served to an untrusting client"
    );
    untrusted.running.shutdown().await;

    let h = Harness::start("", &config(&format!("feed_ca = \"{}\"\n", ca.display()))).await;
    eventually("the https delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(store_info(&h).await["watermark"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Everything at or above 0.0.0.0/0: exempt from every control.
fn allow_everyone() -> Op {
    Op::Upsert {
        net: "0.0.0.0/0".parse().unwrap(),
        score: 100,
        action: Action::Allow,
        reason: String::new(),
        expires: 0,
    }
}

/// Someone between the publisher and the daemon (or on the feed host)
/// rewrites a delta into `+,0.0.0.0/0,100,,allow`, with a correct
/// checksum and the next watermark. Before signatures it was applied and
/// every client, denied ones included, skipped every control. Now the
/// publisher's signature does not cover it: rejected whole, counted, and
/// the store in force stays.
#[tokio::test]
async fn a_tampered_delta_is_rejected_whole() {
    let dir = tmp("tamper");
    let path = snapshot(&dir);
    let (publisher, _) = SigningKey::generate().unwrap();
    sign_file(&publisher, &path);
    let genuine = delta(0, 1, vec![deny("127.0.0.9/32")]);
    let tampered = delta(0, 1, vec![allow_everyone()]);
    assert!(tampered.contains("+,0.0.0.0/0,100,,allow"), "{tampered}");
    let (feed, addr) = FeedServer::start().await;
    // First without a signature at all.
    feed.put("/delta", tampered.clone());
    let h = Harness::start(
        "",
        &format!(
            "[store]\npath = \"{}\"\nfeed = \"http://{addr}/delta\"\npoll_interval = \"50ms\"\n\
             feed_allow_http = true\nfeed_public_key = \"{}\"\n",
            path.display(),
            publisher.public_key()
        ),
    )
    .await;
    eventually("the unsigned delta refused", async || {
        metric(
            &h.metrics().await,
            "palisade_feed_rejected_total{reason=\"unsigned\"}",
        ) == 1.0
    })
    .await;
    assert!(last_error(&store_info(&h).await).contains("no signature"));
    assert_eq!(store_info(&h).await["watermark"], 0);
    // Then with the publisher's signature of what it really published.
    feed.put("/delta.sig", publisher.sign(genuine.as_bytes()));
    eventually("the tampered delta handled", async || {
        let info = store_info(&h).await;
        info["feed"]["rejected"].as_u64() >= Some(2) || info["watermark"] != 0
    })
    .await;
    let info = store_info(&h).await;
    assert_eq!(info["watermark"], 0, "the tampered delta was applied: {info}");
    assert!(last_error(&info).contains("signature"), "{info}");
    // The store in force still decides: denied and low-scored clients
    // are refused, and an unlisted client is still rate limited.
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&h, "127.0.0.3").await, StatusCode::FORBIDDEN);
    let mut c = h.client("127.0.0.5").await;
    let mut limited = 0;
    for _ in 0..300 {
        if c.get("/").await.0 == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert!(
        limited > 0,
        "300 requests from one client all passed a 100/s limit"
    );
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_feed_rejected_total{reason=\"bad_signature\"}"),
        1.0,
        "a feed that stays tampered is counted once"
    );
    assert_eq!(metric(&m, "palisade_store_updates_total{kind=\"applied\"}"), 0.0);

    // The publisher's own delta, with its signature, goes through.
    feed.put("/delta", genuine);
    eventually("the genuine delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(store_info(&h).await["watermark"], 1);
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A feed host that answers every request with an endless chunked body
/// (no length declared). It records the most bytes it sent on one
/// connection; it stops when the client hangs up, or at 1 GiB.
async fn endless_feed() -> (SocketAddr, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let most = Arc::new(AtomicU64::new(0));
    let record = most.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(start).await.is_err() {
                    return;
                }
                let mut chunk = b"4000\r\n".to_vec();
                chunk.extend(std::iter::repeat_n(b'#', 0x4000));
                chunk.extend_from_slice(b"\r\n");
                let mut sent = 0u64;
                while sent < 1 << 30 && s.write_all(&chunk).await.is_ok() {
                    sent += 0x4000;
                    record.fetch_max(sent, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, most)
}

/// A feed body past `store.feed_max_bytes` is refused with a clear error:
/// at once when its length is declared, and after at most the bound (plus
/// what the socket buffers hold) when it is streamed without one, however
/// long the sender would go on.
#[tokio::test]
async fn an_oversized_feed_body_is_refused() {
    let dir = tmp("big");
    let path = snapshot(&dir);
    let max = 100_000;
    let start = |addr: SocketAddr| {
        let path = path.clone();
        async move {
            Harness::start(
                "",
                &format!(
                    "[store]\npath = \"{}\"\nfeed = \"http://{addr}/delta\"\npoll_interval = \"50ms\"\n\
                     feed_max_bytes = {max}\n{UNSIGNED_HTTP}",
                    path.display()
                ),
            )
            .await
        }
    };
    // Declared: a well-formed delta of about 200 kB.
    let (feed, addr) = FeedServer::start().await;
    let ops = (0..8000u32)
        .map(|i| deny(&format!("10.{}.{}.1/32", i / 250, i % 250)))
        .collect();
    let big = delta(0, 1, ops);
    assert!(big.len() > 2 * max, "{}", big.len());
    feed.put("/delta", big);
    let h = start(addr).await;
    eventually("the declared oversized body refused", async || {
        store_info(&h).await["feed"]["rejected"] == 1
    })
    .await;
    let info = store_info(&h).await;
    let error = last_error(&info);
    assert!(
        error.contains("larger than 100000 bytes") && error.contains("store.feed_max_bytes"),
        "{info}"
    );
    assert_eq!(info["watermark"], 0);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_feed_rejected_total{reason=\"too_large\"}"),
        1.0
    );
    h.running.shutdown().await;

    // Streamed: no length, no end.
    let (addr, most) = endless_feed().await;
    let h = start(addr).await;
    eventually("the endless body refused", async || {
        store_info(&h).await["feed"]["rejected"].as_u64() >= Some(1)
    })
    .await;
    let info = store_info(&h).await;
    assert!(last_error(&info).contains("larger than 100000 bytes"), "{info}");
    let m = h.metrics().await;
    assert!(metric(&m, "palisade_feed_rejected_total{reason=\"too_large\"}") >= 1.0);
    // The daemon hung up on each poll's connection after the bound plus
    // what loopback socket buffers hold (a few MiB), far short of 1 GiB.
    let most = most.load(Ordering::SeqCst);
    assert!(most < 32 << 20, "{most} bytes sent on one connection");
    eprintln!("endless feed: at most {most} bytes sent on one connection");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a feed key, the snapshot file must be signed too: someone who can
/// replace `store.path` (a compromised sync job, a tampered download of the
/// publisher's full snapshot) cannot swap in `0.0.0.0/0 allow`. The
/// daemon's own write-backs of verified deltas stay loadable across a
/// restart without a signature.
#[tokio::test]
async fn a_replaced_snapshot_needs_the_publisher_signature() {
    let dir = tmp("snapsig");
    let path = snapshot(&dir);
    let (publisher, _) = SigningKey::generate().unwrap();
    let sign = |file: &std::path::Path| sign_file(&publisher, file);
    let feed = dir.join("feed.delta");
    let config = format!(
        "[store]\npath = \"{}\"\nfeed = \"{}\"\npoll_interval = \"50ms\"\nfeed_public_key = \"{}\"\n",
        path.display(),
        feed.display(),
        publisher.public_key()
    );
    let parse = || {
        palisade_proxy::config::Config::parse(
            &common::config_text("http://127.0.0.1:1", "", &config),
            "t.toml",
            &Default::default(),
        )
    };
    // Unsigned: refused at load, naming the file, the line and the key.
    let err = parse().unwrap_err().to_string();
    assert!(
        err.starts_with("t.toml:10:") && err.contains("store.path") && err.contains("rep.pstore.sig"),
        "{err}"
    );
    sign(&path);
    parse().unwrap();
    let h = Harness::start("", &config).await;
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);

    // A signed delta is applied and written back to the file.
    let text = delta(0, 1, vec![deny("127.0.0.9/32")]);
    publish_signed(&publisher, &feed, &text);
    eventually("the signed delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(Snapshot::open(&path).unwrap().watermark(), 1);

    // Someone replaces the file (by rename, as a sync job would) with a
    // store that lets everyone through.
    let forged = dir.join("forged.pstore");
    Builder::from_csv("0.0.0.0/0,100,,allow\n".as_bytes(), "forged")
        .unwrap()
        .finish(BuildOptions::default())
        .unwrap()
        .write_to(&forged)
        .unwrap();
    let info = refused(&h, "the forged snapshot refused", || {
        std::fs::rename(&forged, &path).unwrap();
    })
    .await;
    assert_eq!(info["watermark"], 1, "{info}");
    assert!(last_error(&info).contains("signature"), "{info}");
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&h, "127.0.0.9").await, StatusCode::FORBIDDEN);
    let mut admin = h.admin_client().await;
    let reload = || {
        http::Request::post("/api/v1/store/reload")
            .header("host", "localhost")
            .header("authorization", "Bearer test-token-0123456789")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (status, _, body) = admin.send(reload()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);
    let m = h.metrics().await;
    assert!(metric(&m, "palisade_feed_rejected_total{reason=\"bad_signature\"}") >= 1.0);

    // The publisher's own replacement, signed, is taken.
    let next = dir.join("next.pstore");
    let mut builder = Builder::from_csv("127.0.0.8,0,,deny\n".as_bytes(), "next").unwrap();
    builder.watermark(5);
    builder
        .finish(BuildOptions::default())
        .unwrap()
        .write_to(&next)
        .unwrap();
    sign(&next);
    std::fs::rename(
        palisade_store::sign::signature_path(&next),
        palisade_store::sign::signature_path(&path),
    )
    .unwrap();
    std::fs::rename(&next, &path).unwrap();
    let (status, _, body) = admin.send(reload()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(status_from(&h, "127.0.0.8").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::OK);

    // A signed delta on top, written back; the daemon restarts and loads
    // its own write-back though the signature next to it is the
    // publisher's for the file before.
    let text = delta(5, 6, vec![deny("127.0.0.10/32")]);
    publish_signed(&publisher, &feed, &text);
    eventually("the second signed delta applied", async || {
        store_info(&h).await["watermark"] == 6
    })
    .await;
    h.running.shutdown().await;
    parse().unwrap();
    let h = Harness::start("", &config).await;
    assert_eq!(store_info(&h).await["watermark"], 6);
    assert_eq!(status_from(&h, "127.0.0.10").await, StatusCode::FORBIDDEN);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_errors_name_the_store_key() {
    let dir = tmp("cfg");
    let missing = dir.join("nope.pstore");
    let text = common::config_text(
        "http://127.0.0.1:1",
        "",
        &format!("[store]\npath = \"{}\"\n", missing.display()),
    );
    let err = palisade_proxy::config::Config::parse(&text, "t.toml", &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("t.toml:10:") && err.contains("store.path") && err.contains("nope.pstore"),
        "{err}"
    );
    let path = snapshot(&dir);
    let text = common::config_text(
        "http://127.0.0.1:1",
        "",
        &format!("[store]\npath = \"{}\"\nfeed = \"ftp://x/y\"\n", path.display()),
    );
    let err = palisade_proxy::config::Config::parse(&text, "t.toml", &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("store.feed") && err.contains("only http"), "{err}");

    // Each of these is refused at load, naming the file, the line and the key.
    let (signer, _) = SigningKey::generate().unwrap();
    sign_file(&signer, &path);
    let key = signer.public_key();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "feed = \"https://feeds.test/d\"\n".into(),
            "store.feed",
            "must be signed",
        ),
        (
            format!("feed = \"http://feeds.test/d\"\nfeed_public_key = \"{key}\"\n"),
            "store.feed",
            "feed_allow_http",
        ),
        (
            format!("feed = \"https://user:secret@feeds.test/d\"\nfeed_public_key = \"{key}\"\n"),
            "store.feed",
            "no credentials in the URL",
        ),
        (
            "feed = \"https://feeds.test/d\"\nfeed_public_key = \"c2hvcnQ=\"\n".into(),
            "store.feed_public_key",
            "32 bytes, this is 5",
        ),
        (
            "feed = \"https://feeds.test/d\"\nfeed_public_key = \"not a key!\"\n".into(),
            "store.feed_public_key",
            "not an Ed25519 public key",
        ),
        (
            format!("feed = \"https://feeds.test/d\"\nfeed_public_key = \"{key}\"\nfeed_unsigned = true\n"),
            "store.feed_unsigned",
            "contradicts",
        ),
        (
            format!(
                "feed = \"https://feeds.test/d\"\nfeed_public_key = \"{key}\"\n\
                 feed_auth_env = \"PALISADE_TEST_UNSET_FEED_TOKEN\"\n"
            ),
            "store.feed_auth_env",
            "$PALISADE_TEST_UNSET_FEED_TOKEN is not set",
        ),
        (
            format!("feed = \"https://feeds.test/d\"\nfeed_public_key = \"{key}\"\nfeed_max_bytes = 0\n"),
            "store.feed_max_bytes",
            "must be > 0",
        ),
    ];
    for (lines, key_name, problem) in cases {
        let text = common::config_text(
            "http://127.0.0.1:1",
            "",
            &format!("[store]\npath = \"{}\"\n{lines}", path.display()),
        );
        let err = palisade_proxy::config::Config::parse(&text, "t.toml", &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("t.toml:") && err.contains(key_name) && err.contains(problem),
            "{lines}: {err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }
    // Signed https, and plain http when asked for, load.
    for lines in [
        format!("feed = \"https://feeds.test/d\"\nfeed_public_key = \"{key}\"\n"),
        "feed = \"http://feeds.test/d\"\nfeed_unsigned = true\nfeed_allow_http = true\n".into(),
    ] {
        let text = common::config_text(
            "http://127.0.0.1:1",
            "",
            &format!("[store]\npath = \"{}\"\n{lines}", path.display()),
        );
        palisade_proxy::config::Config::parse(&text, "t.toml", &Default::default()).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn automatic_penalties_reach_the_durable_log() {
    let dir = tmp("state");
    let h = Harness::start(
        "",
        &format!(
            "[reputation]\nflood_threshold = 5\n[state]\ndata_dir = \"{}\"\n",
            dir.display()
        ),
    )
    .await;
    let mut c = h.client("127.0.0.20").await;
    for _ in 0..10 {
        c.get("/").await;
    }
    eventually("the flood penalty logged", async || {
        metric(
            &h.metrics().await,
            "palisade_state_records_total{kind=\"written\"}",
        ) >= 1.0
    })
    .await;
    assert_eq!(metric(&h.metrics().await, "palisade_state_entries"), 1.0);
    h.running.shutdown().await;
    let (_, rec) = palisade_store::StateLog::open(&dir, 100, palisade_core::unix_now()).unwrap();
    assert_eq!(rec.entries.len(), 1);
    assert_eq!(rec.entries[0].net, "127.0.0.20/32".parse().unwrap());
    assert_eq!(
        rec.entries[0].score,
        Some(55),
        "70 minus the 15-point flood penalty"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An operator who copies a new store over the old one (`cp new.pstore
/// rep.pstore`, which truncates and rewrites the same inode) instead of
/// renaming it must not take the daemon down: the store in force stays
/// in force until a reload reads the new file.
#[tokio::test]
async fn overwriting_the_store_file_in_place_keeps_the_daemon_serving() {
    let dir = tmp("inplace");
    let path = snapshot(&dir);
    let h = Harness::start("", &format!("[store]\npath = \"{}\"\n", path.display())).await;
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);

    let replacement = Builder::from_csv("127.0.0.9,0,,deny\n".as_bytes(), "t")
        .unwrap()
        .finish(BuildOptions::default())
        .unwrap();
    let staged = dir.join("new.pstore");
    replacement.write_to(&staged).unwrap();
    let new_bytes = std::fs::read(&staged).unwrap();
    {
        use std::io::{Seek, Write};
        // Truncated to nothing first, then written in pieces while lookups
        // run against the file that was open.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        for ip in ["127.0.0.2", "127.0.10.9", "127.0.0.3"] {
            assert_eq!(status_from(&h, ip).await, StatusCode::FORBIDDEN, "{ip}");
        }
        for chunk in new_bytes.chunks(new_bytes.len().div_ceil(3)) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);
            assert_eq!(status_from(&h, "127.0.10.9").await, StatusCode::FORBIDDEN);
        }
        // Garbage past the new end, then cut short again.
        f.write_all(&[0xAB; 4096]).unwrap();
        f.set_len(100).unwrap();
        assert_eq!(status_from(&h, "127.0.0.3").await, StatusCode::FORBIDDEN);
        f.set_len(0).unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(&new_bytes).unwrap();
    }
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&h, "127.0.0.9").await, StatusCode::OK);

    let mut admin = h.admin_client().await;
    let reload = http::Request::post("/api/v1/store/reload")
        .header("host", "localhost")
        .header("authorization", "Bearer test-token-0123456789")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = admin.send(reload).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(status_from(&h, "127.0.0.9").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&h, "127.0.0.2").await, StatusCode::OK);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The publisher's snapshots and their signatures are public (every
/// daemon downloads them). Someone who can replace the store file (a sync
/// job, a download path) puts back an older one, signed as it was: the
/// daemon took it, the store went back in time (an address denied since
/// was let through again), and the old signed deltas from its watermark
/// could be replayed one by one. A signed replacement must not go back in
/// watermark.
#[tokio::test]
async fn an_older_signed_snapshot_cannot_roll_the_store_back() {
    let dir = tmp("rollback");
    let path = snapshot(&dir);
    let (publisher, _) = SigningKey::generate().unwrap();
    sign_file(&publisher, &path);
    // The attacker keeps the publisher's snapshot at watermark 0.
    let old = dir.join("old.pstore");
    std::fs::copy(&path, &old).unwrap();
    std::fs::copy(
        palisade_store::sign::signature_path(&path),
        palisade_store::sign::signature_path(&old),
    )
    .unwrap();
    let feed = dir.join("feed.delta");
    let config = format!(
        "[store]\npath = \"{}\"\nfeed = \"{}\"\npoll_interval = \"50ms\"\nfeed_public_key = \"{}\"\n",
        path.display(),
        feed.display(),
        publisher.public_key()
    );
    let h = Harness::start("", &config).await;
    let text = delta(0, 1, vec![deny("127.0.0.9/32")]);
    publish_signed(&publisher, &feed, &text);
    eventually("the signed delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::FORBIDDEN
    })
    .await;

    let info = refused(&h, "the older snapshot refused", || {
        std::fs::rename(
            palisade_store::sign::signature_path(&old),
            palisade_store::sign::signature_path(&path),
        )
        .unwrap();
        std::fs::rename(&old, &path).unwrap();
    })
    .await;
    assert_eq!(info["watermark"], 1, "{info}");
    assert!(last_error(&info).contains("watermark"), "{info}");
    assert_eq!(status_from(&h, "127.0.0.9").await, StatusCode::FORBIDDEN);
    let m = h.metrics().await;
    assert!(metric(&m, "palisade_feed_rejected_total{reason=\"out_of_order\"}") >= 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}
