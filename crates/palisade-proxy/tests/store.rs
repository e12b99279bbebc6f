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
use palisade_store::{Action, BuildOptions, Builder, Delta, Op, Snapshot};

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

/// Replaces the feed file by rename, as a feed writer should: a poll never
/// reads it half-written.
fn publish(feed: &std::path::Path, text: &str) {
    let tmp = feed.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, feed).unwrap();
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

#[tokio::test]
async fn entries_decide_and_a_file_feed_updates_them() {
    let dir = tmp("file");
    let path = snapshot(&dir);
    let feed = dir.join("feed.delta");
    let h = Harness::start(
        "",
        &format!(
            "[store]\npath = \"{}\"\nfeed = \"{}\"\npoll_interval = \"50ms\"\n",
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
    assert!(
        info["feed"]["last_error"]
            .as_str()
            .unwrap()
            .contains("feed.delta"),
        "{info}"
    );
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
    assert!(
        store_info(&h).await["feed"]["last_error"]
            .as_str()
            .unwrap()
            .contains("does not follow watermark 1")
    );
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

/// A feed server answering with an ETag and honouring If-None-Match.
async fn feed_server(
    body: Arc<std::sync::Mutex<String>>,
    full: Arc<AtomicU64>,
    cached: Arc<AtomicU64>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (body, full, cached) = (body.clone(), full.clone(), cached.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let text = body.lock().unwrap().clone();
                    let etag = format!("\"{:08x}\"", crc(&text));
                    let unchanged = req
                        .headers()
                        .get("if-none-match")
                        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
                    let resp = if unchanged {
                        cached.fetch_add(1, Ordering::SeqCst);
                        http::Response::builder()
                            .status(304)
                            .body(Full::new(Bytes::new()))
                    } else {
                        full.fetch_add(1, Ordering::SeqCst);
                        http::Response::builder()
                            .header("etag", etag)
                            .body(Full::new(Bytes::from(text)))
                    };
                    async move { Ok::<_, Infallible>(resp.unwrap()) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn crc(s: &str) -> u32 {
    s.bytes().fold(0u32, |h, b| h.rotate_left(5) ^ u32::from(b))
}

#[tokio::test]
async fn an_http_feed_is_polled_with_etags() {
    let dir = tmp("http");
    let path = snapshot(&dir);
    let body = Arc::new(std::sync::Mutex::new(delta(0, 1, vec![deny("127.0.0.9/32")])));
    let (full, cached) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let addr = feed_server(body.clone(), full.clone(), cached.clone()).await;
    let h = Harness::start(
        "",
        &format!(
            "[store]\npath = \"{}\"\nfeed = \"http://{addr}/delta\"\npoll_interval = \"50ms\"\n",
            path.display()
        ),
    )
    .await;
    eventually("the HTTP delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::FORBIDDEN
    })
    .await;
    eventually("unchanged polls answered 304", async || {
        cached.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        full.load(Ordering::SeqCst),
        1,
        "the unchanged delta was downloaded again"
    );
    *body.lock().unwrap() = delta(1, 2, vec![Op::Delete("127.0.0.9/32".parse().unwrap())]);
    eventually("the next delta applied", async || {
        status_from(&h, "127.0.0.9").await == StatusCode::OK
    })
    .await;
    assert_eq!(store_info(&h).await["watermark"], 2);
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
