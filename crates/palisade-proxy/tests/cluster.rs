//! Cluster mode against a real `redis-server` (started here on a free
//! loopback port, killed at the end): shared limits, reputation that
//! reaches every node, late joiners, Redis dying and coming back.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{Harness, metric};
use http::StatusCode;
use http_body_util::Full;
use tokio::time::Instant;

struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Redis {
    /// A fresh redis-server, or `None` (with the reason printed) where there
    /// is none outside CI. In CI (`CI=true`) its absence is a failure:
    /// `scripts/test` installs it.
    fn start() -> Option<Self> {
        Self::start_with(|_, _| Vec::new())
    }

    /// `extra(port, dir)`: more `redis-server` arguments (later ones win).
    fn start_with(extra: impl Fn(u16, &std::path::Path) -> Vec<String>) -> Option<Self> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").is_err(),
                "redis-server is missing in CI: scripts/test installs it"
            );
            eprintln!(
                "skipped: redis-server is not installed (apt install redis-server, or run scripts/test as root)"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("palisade-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Self {
            child: None,
            port,
            dir,
            extra: Vec::new(),
        };
        r.extra = extra(port, &r.dir);
        r.restart();
        Some(r)
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three masters, no replicas: a real Redis Cluster on loopback.
struct RedisCluster(Vec<Redis>);

impl RedisCluster {
    fn start() -> Option<Self> {
        let nodes: Vec<Redis> = (0..3)
            .map(|_| {
                Redis::start_with(|_, _| {
                    ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                        .map(String::from)
                        .to_vec()
                })
            })
            .collect::<Option<_>>()?;
        let addrs: Vec<String> = nodes.iter().map(|r| format!("127.0.0.1:{}", r.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (redis-tools) is needed to form a cluster");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        for r in &nodes {
            for i in 0.. {
                let info = Command::new("redis-cli")
                    .args(["-p", &r.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(i < 500, "the Redis Cluster never reached cluster_state:ok");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Some(Self(nodes))
    }

    fn urls(&self) -> String {
        self.0.iter().map(Redis::url).collect::<Vec<_>>().join(",")
    }
}

async fn node(redis: &Redis, name: &str, extra: &str) -> Harness {
    Harness::start(
        "",
        &format!(
            "[cluster]\nredis = \"{}\"\nsync_interval = \"20ms\"\nnode_name = \"{name}\"\n{extra}",
            redis.url()
        ),
    )
    .await
}

async fn cluster_status(h: &Harness) -> serde_json::Value {
    let (status, _, body) = h.admin_client().await.get("/api/v1/cluster").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `check` every 10 ms for at most 10 s; returns how long it took.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    for _ in 0..1000 {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// Waits until every node's last sync reached Redis.
async fn all_up(nodes: &[&Harness]) {
    for h in nodes {
        eventually("the node reaches redis", async || {
            cluster_status(h).await["up"] == true
        })
        .await;
    }
}

async fn status_from(h: &Harness, source: &str) -> StatusCode {
    h.client(source).await.get("/").await.0
}

async fn set_score(h: &Harness, ip: &str, score: u8) {
    let req = http::Request::put(format!("/api/v1/reputation/{ip}"))
        .header("host", "localhost")
        .header("authorization", "Bearer test-token-0123456789")
        .body(Full::new(Bytes::from(format!("{{\"score\": {score}}}"))))
        .unwrap();
    let (status, _, body) = h.admin_client().await.send(req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

const LIMITS: &str =
    "[rate_limit]\nrate = 50\n[reputation]\nflood_threshold = 100000\n[adaptive_breaker]\nenabled = false\n";

#[tokio::test]
async fn two_nodes_share_one_limit() {
    let Some(redis) = Redis::start() else { return };
    let a = node(&redis, "a", LIMITS).await;
    let b = node(&redis, "b", LIMITS).await;
    all_up(&[&a, &b]).await;
    let mut to_a = a.client("127.0.0.2").await;
    let mut to_b = b.client("127.0.0.2").await;
    let start = Instant::now();
    let mut admitted = 0u32;
    for i in 0..300 {
        let c = if i % 2 == 0 { &mut to_a } else { &mut to_b };
        if c.get("/").await.0 == StatusCode::OK {
            admitted += 1;
        }
        // A few hundred requests per second: a client over its limit, not
        // a benchmark of the loopback.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let span = start.elapsed().as_secs_f64();
    // One limit of 50/s shared: at most 50 in any sliding second, so over
    // the span at most 50 × (1 + span); plus the documented lag overshoot,
    // what the other node admits in one sync interval and a round trip
    // (20 ms + 30 ms of room) at its measured rate. Each node alone would
    // admit 50 × (1 + span) by itself: twice as much.
    let per_node_rate = 150.0 / span;
    let bound = 50.0 * (1.0 + span) + per_node_rate * 0.05;
    let local_only = 2.0 * 50.0 * (1.0 + span);
    eprintln!(
        "two nodes admitted {admitted} of 300 requests in {span:.3} s ({per_node_rate:.0} req/s per node); \
         bound {bound:.0}, each node alone would admit {local_only:.0}"
    );
    assert!(
        f64::from(admitted) <= bound,
        "{admitted} admitted, bound {bound:.0}"
    );
    assert!(admitted >= 45, "the shared limit let only {admitted} through");
    let m = a.metrics().await;
    assert!(
        metric(&m, "palisade_cluster_limited_total")
            + metric(&b.metrics().await, "palisade_cluster_limited_total")
            > 0.0
    );
    assert_eq!(metric(&m, "palisade_cluster_up"), 1.0);
}

#[tokio::test]
async fn reputation_reaches_every_node_and_late_joiners() {
    let Some(redis) = Redis::start() else { return };
    let a = node(&redis, "a", "").await;
    let b = node(&redis, "b", "").await;
    all_up(&[&a, &b]).await;
    assert_eq!(status_from(&b, "127.0.0.3").await, StatusCode::OK);
    set_score(&a, "127.0.0.3", 0).await;
    let took = eventually("B refuses the client A banned", async || {
        status_from(&b, "127.0.0.3").await == StatusCode::FORBIDDEN
    })
    .await;
    eprintln!("ban on node A enforced on node B after {took:?}");
    let (_, _, explain) = b.admin_client().await.get("/api/v1/reputation/127.0.0.3").await;
    assert!(explain.contains("\"kind\":\"cluster\""), "{explain}");

    // An automatic penalty (three 401s in a row: -10) travels too.
    let mut c = a.client("127.0.0.4").await;
    for _ in 0..3 {
        assert_eq!(c.get("/status/401").await.0, StatusCode::UNAUTHORIZED);
    }
    eventually("B sees the penalty", async || {
        let (_, _, body) = b.admin_client().await.get("/api/v1/reputation/127.0.0.4").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["score"].as_f64().is_some_and(|s| s < 61.0)
    })
    .await;

    // A node that starts later catches up from Redis.
    let late = node(&redis, "late", "").await;
    eventually("the late node refuses the banned client", async || {
        status_from(&late, "127.0.0.3").await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(status_from(&late, "127.0.0.9").await, StatusCode::OK);
}

#[tokio::test]
async fn nodes_serve_through_a_redis_outage_and_resync() {
    let Some(mut redis) = Redis::start() else { return };
    let a = node(&redis, "a", "").await;
    let b = node(&redis, "b", "").await;
    all_up(&[&a, &b]).await;
    redis.kill();
    for h in [&a, &b] {
        eventually("the node notices", async || {
            cluster_status(h).await["up"] == false
        })
        .await;
        // Still serving, local-only.
        for src in ["127.0.0.6", "127.0.0.7"] {
            assert_eq!(status_from(h, src).await, StatusCode::OK);
        }
        assert_eq!(metric(&h.metrics().await, "palisade_cluster_up"), 0.0);
        assert!(metric(&h.metrics().await, "palisade_cluster_sync_errors_total") >= 1.0);
    }
    // A ban while Redis is down holds locally and waits to be shared.
    set_score(&a, "127.0.0.5", 0).await;
    assert_eq!(status_from(&a, "127.0.0.5").await, StatusCode::FORBIDDEN);
    assert_eq!(status_from(&b, "127.0.0.5").await, StatusCode::OK);

    redis.restart();
    all_up(&[&a, &b]).await;
    eventually("the ban made while Redis was down reaches B", async || {
        status_from(&b, "127.0.0.5").await == StatusCode::FORBIDDEN
    })
    .await;
}

#[tokio::test]
async fn a_redis_cluster_works_too() {
    let Some(rc) = RedisCluster::start() else { return };
    let start = async |name: &str| {
        Harness::start(
            "",
            &format!(
                "[cluster]\nredis = \"{}\"\nredis_cluster = true\nsync_interval = \"20ms\"\nnode_name = \"{name}\"\n{LIMITS}",
                rc.urls()
            ),
        )
        .await
    };
    let (a, b) = (start("a").await, start("b").await);
    all_up(&[&a, &b]).await;
    // Counters spread over the cluster's slots, one client per slot.
    let mut admitted = 0;
    for i in 0..200u32 {
        let h = if i % 2 == 0 { &a } else { &b };
        let src = format!("127.0.1.{}", i % 20 + 1);
        if status_from(h, &src).await == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 200, "20 clients at 10 requests each are all under 50/s");
    // One limit shared (as in `two_nodes_share_one_limit`): at most 50 in any
    // sliding second plus what the other node admits in one sync and a round
    // trip; each node alone would admit twice as much. The bound follows the
    // measured span, so a loaded machine stretches both sides alike.
    let mut to_a = a.client("127.0.0.2").await;
    let mut to_b = b.client("127.0.0.2").await;
    let began = Instant::now();
    let mut shared = 0u32;
    for i in 0..200 {
        let c = if i % 2 == 0 { &mut to_a } else { &mut to_b };
        if c.get("/").await.0 == StatusCode::OK {
            shared += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let span = began.elapsed().as_secs_f64();
    let per_node_rate = 100.0 / span;
    let bound = 50.0 * (1.0 + span) + per_node_rate * 0.05;
    eprintln!("Redis Cluster: two nodes admitted {shared} of 200 for one client in {span:.3} s (limit 50/s)");
    assert!(
        f64::from(shared) <= bound,
        "no sharing through the Redis Cluster: {shared} admitted in {span:.3} s (bound {bound:.0})"
    );
    set_score(&a, "127.0.0.3", 0).await;
    eventually("B refuses the client A banned", async || {
        status_from(&b, "127.0.0.3").await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(
        metric(&a.metrics().await, "palisade_cluster_sync_errors_total"),
        0.0
    );
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let Some(redis) = Redis::start_with(|port, dir| {
        std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &key_pem).unwrap();
        let file = |n: &str| dir.join(n).display().to_string();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            file("cert.pem"),
            "--tls-key-file".into(),
            file("key.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }) else {
        return;
    };
    let ca = redis.dir.join("cert.pem");
    let cfg = |ca: &str| {
        format!(
            "[cluster]\nredis = \"rediss://127.0.0.1:{}\"\nsync_interval = \"20ms\"\nredis_ca = \"{ca}\"\n",
            redis.port
        )
    };
    let h = Harness::start("", &cfg(&ca.display().to_string())).await;
    eventually("the node reaches redis over TLS", async || {
        cluster_status(&h).await["up"] == true
    })
    .await;
    // Without the CA the server is not trusted: the node stays local-only.
    let untrusted = Harness::start(
        "",
        &format!(
            "[cluster]\nredis = \"rediss://127.0.0.1:{}\"\nsync_interval = \"20ms\"\n",
            redis.port
        ),
    )
    .await;
    eventually("the untrusted connection fails", async || {
        cluster_status(&untrusted).await["errors"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(cluster_status(&untrusted).await["up"], false);
    assert_eq!(
        status_from(&untrusted, "127.0.0.2").await,
        StatusCode::OK,
        "serves anyway"
    );
}

#[tokio::test]
async fn kernel_bans_reach_every_node() {
    let Some(redis) = Redis::start() else { return };
    // Dry-run firewalls: the bans are enforced at accept by each daemon,
    // the host's kernel is left alone.
    // Loopback bans are the only ones a loopback test can observe.
    let syn = "[syn]\nfirewall = \"dry-run\"\nxdp = \"off\"\nnever_ban_loopback = false\n";
    let a = node(&redis, "a", syn).await;
    let b = node(&redis, "b", syn).await;
    all_up(&[&a, &b]).await;
    let send = async |h: &Harness, method: &str, path: &str, body: &str| {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", "Bearer test-token-0123456789")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        h.admin_client().await.send(req).await
    };
    let listed = async |h: &Harness| send(h, "GET", "/api/v1/bans", "").await.2;
    let (status, _, body) = send(
        &a,
        "POST",
        "/api/v1/bans",
        r#"{"ip": "127.0.0.50", "duration": "5m"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let took = eventually("B holds A's ban", async || {
        listed(&b).await.contains("127.0.0.50/32")
    })
    .await;
    eprintln!("kernel ban on node A held by node B after {took:?}");
    assert!(listed(&b).await.contains("\"reason\":\"cluster\""));
    // B refuses the banned address at accept.
    let mut s = common::connect_from("127.0.0.50", b.proxy()).await;
    let answer = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap()
            .map(|_| buf)
    };
    assert!(
        answer.is_err() || answer.as_ref().is_ok_and(|b| b.is_empty()),
        "B served a banned client: {answer:?}"
    );
    assert!(
        metric(
            &b.metrics().await,
            "palisade_connections_refused_total{kind=\"syn_flood\"}"
        ) >= 1.0
    );
    // A late node learns it from Redis; lifting it on A lifts it everywhere.
    let late = node(&redis, "late", syn).await;
    eventually("the late node holds the ban", async || {
        listed(&late).await.contains("127.0.0.50/32")
    })
    .await;
    let (status, _, body) = send(&a, "DELETE", "/api/v1/bans/127.0.0.50", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for h in [&b, &late] {
        eventually("the ban is lifted everywhere", async || {
            !listed(h).await.contains("127.0.0.50/32")
        })
        .await;
    }
}
