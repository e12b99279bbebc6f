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

    /// Runs one command with `redis-cli`, as anyone who can write to this
    /// Redis could; returns its output.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (redis-tools) is needed");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
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

/// The cluster key of these tests.
const KEY: &str = "test-cluster-key-0123456789abcdef";

async fn node(redis: &Redis, name: &str, extra: &str) -> Harness {
    node_with(redis, name, "sync_interval = \"20ms\"\n", extra).await
}

/// A node with more `[cluster]` keys. Without a `[syn]` table in `extra`,
/// [`SYN`]: loopback is never banned nor scored by the cluster otherwise.
async fn node_with(redis: &Redis, name: &str, cluster: &str, extra: &str) -> Harness {
    let syn = if extra.contains("[syn]") { "" } else { SYN };
    Harness::start(
        "",
        &format!(
            "[cluster]\nredis = \"{}\"\nnode_name = \"{name}\"\nkey = \"{KEY}\"\n{cluster}{extra}\n{syn}",
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

/// Dry-run firewalls: the bans are enforced at accept by each daemon, the
/// host's kernel is left alone. Loopback bans are the only ones a loopback
/// test can observe.
const SYN: &str = "[syn]\nfirewall = \"dry-run\"\nxdp = \"off\"\nnever_ban_loopback = false\n";

async fn bans_of(h: &Harness) -> String {
    h.admin_request("GET", "/api/v1/bans", "").await.1
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
                "[cluster]\nredis = \"{}\"\nredis_cluster = true\nsync_interval = \"20ms\"\nnode_name = \"{name}\"\nkey = \"{KEY}\"\n{LIMITS}{SYN}",
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
            "[cluster]\nredis = \"rediss://127.0.0.1:{}\"\nsync_interval = \"20ms\"\nredis_ca = \"{ca}\"\nkey = \"{KEY}\"\n",
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
            "[cluster]\nredis = \"rediss://127.0.0.1:{}\"\nsync_interval = \"20ms\"\nkey = \"{KEY}\"\n",
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
    let syn = SYN;
    let a = node(&redis, "a", syn).await;
    let b = node(&redis, "b", syn).await;
    all_up(&[&a, &b]).await;
    let (status, body) = a
        .admin_request(
            "POST",
            "/api/v1/bans",
            r#"{"ip": "127.0.0.50", "duration": "5m"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let took = eventually("B holds A's ban", async || {
        bans_of(&b).await.contains("127.0.0.50/32")
    })
    .await;
    eprintln!("kernel ban on node A held by node B after {took:?}");
    assert!(bans_of(&b).await.contains("\"reason\":\"cluster\""));
    // B refuses the banned address at accept.
    if let Err(answer) = common::refused_at_accept("127.0.0.50", b.proxy()).await {
        panic!("B served a banned client: {answer}");
    }
    assert!(
        metric(
            &b.metrics().await,
            "palisade_connections_refused_total{kind=\"syn_flood\"}"
        ) >= 1.0
    );
    // A late node learns it from Redis; lifting it on A lifts it everywhere.
    let late = node(&redis, "late", syn).await;
    eventually("the late node holds the ban", async || {
        bans_of(&late).await.contains("127.0.0.50/32")
    })
    .await;
    let (status, body) = a.admin_request("DELETE", "/api/v1/bans/127.0.0.50", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for h in [&b, &late] {
        eventually("the ban is lifted everywhere", async || {
            !bans_of(h).await.contains("127.0.0.50/32")
        })
        .await;
    }
}

/// Someone who can write to Redis but does not hold the cluster key: a
/// real ban copied to the field of a whole /24, an unsigned ban of the
/// whole Internet, an unsigned score of 0, a heartbeat that is not a
/// number; and a key holder asking for what policy refuses (a ban of
/// `0.0.0.0/0`, a score of 0 for a never-banned address). Before records
/// were signed the copied ban took every 127.0.1.x client off both nodes,
/// the score was applied, and the heartbeat failed every sync.
#[tokio::test]
async fn forged_records_in_redis_are_ignored_and_counted() {
    let Some(redis) = Redis::start() else { return };
    let syn = format!("{SYN}never_ban = [\"127.0.0.80\"]\n");
    let a = node(&redis, "a", &syn).await;
    let b = node(&redis, "b", &syn).await;
    all_up(&[&a, &b]).await;
    let (status, body) = a
        .admin_request(
            "POST",
            "/api/v1/bans",
            r#"{"ip": "127.0.0.50", "duration": "5m"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("B holds A's ban", async || {
        bans_of(&b).await.contains("127.0.0.50/32")
    })
    .await;

    let (events, bans, rep, nodes) = (
        "{palisade}:events",
        "{palisade}:bans",
        "{palisade}:rep",
        "{palisade}:nodes",
    );
    let real = redis.cli(&["HGET", bans, "127.0.0.50/32"]);
    assert_eq!(real.split(' ').count(), 4, "a ban record carries its MAC: {real}");
    let value = real.rsplit_once(' ').unwrap().0.to_owned();
    let now = palisade_core::unix_now_ms();
    let ban_value = format!("- {} {now}", now / 1000 + 600);
    let score_value = format!("0 0 {now}");
    // Unsigned, or signed for another record.
    for (hash, net, kind, v, stored) in [
        (bans, "127.0.1.0/24", "ban", value.as_str(), real.as_str()),
        (bans, "0.0.0.0/0", "ban", &ban_value, &ban_value),
        (rep, "127.0.0.70/32", "score", &score_value, &score_value),
    ] {
        redis.cli(&["HSET", hash, net, stored]);
        let copied_mac = real.rsplit(' ').next().unwrap();
        redis.cli(&[
            "XADD", events, "*", "node", "mallory", "net", net, "k", kind, "v", v, "mac", copied_mac,
        ]);
    }
    // Signed with the cluster key, refused by policy on every node.
    let sign = |parts: &[&str]| palisade_proxy::cluster::record_mac(KEY.as_bytes(), parts);
    // Longer than syn.max_ban_duration (24 h).
    let long_ban = format!("- {} {now}", now / 1000 + 48 * 3600);
    for (hash, net, kind, v) in [
        (bans, "0.0.0.0/0", "ban", &ban_value),
        (bans, "127.0.0.90/32", "ban", &long_ban),
        (rep, "127.0.0.80/32", "score", &score_value),
    ] {
        let mac = sign(&[events, "mallory", net, kind, v]);
        redis.cli(&[
            "XADD", events, "*", "node", "mallory", "net", net, "k", kind, "v", v, "mac", &mac,
        ]);
        if net != "0.0.0.0/0" {
            redis.cli(&["HSET", hash, net, &format!("{v} {}", sign(&[hash, net, v]))]);
        }
    }
    redis.cli(&["HSET", nodes, "mallory", "not-a-number"]);
    let errors_before = cluster_status(&b).await["errors"].as_u64().unwrap();

    // The sync goes on: a real ban made afterwards still reaches B.
    let (status, body) = a
        .admin_request(
            "POST",
            "/api/v1/bans",
            r#"{"ip": "127.0.0.51", "duration": "5m"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("B holds A's second ban", async || {
        bans_of(&b).await.contains("127.0.0.51/32")
    })
    .await;
    // A heartbeat round (once a second) has read the garbage field.
    eventually("B counts the forged heartbeat", async || {
        metric(
            &b.metrics().await,
            "palisade_cluster_records_rejected_total{reason=\"unauthenticated\"}",
        ) >= 4.0
    })
    .await;
    // And a late node that catches up from the hashes.
    let late = node(&redis, "late", &syn).await;
    eventually("the late node holds the real bans", async || {
        let bans = bans_of(&late).await;
        bans.contains("127.0.0.50/32") && bans.contains("127.0.0.51/32")
    })
    .await;
    for h in [&a, &b, &late] {
        assert_eq!(cluster_status(h).await["up"], true);
        let bans = bans_of(h).await;
        assert!(
            !bans.contains("127.0.1.0/24") && !bans.contains("0.0.0.0/0") && !bans.contains("127.0.0.90"),
            "{bans}"
        );
        for client in ["127.0.1.60", "127.0.0.70", "127.0.0.80"] {
            assert_eq!(status_from(h, client).await, StatusCode::OK, "{client}");
        }
        let score = async |ip: &str| {
            let (_, explain) = h
                .admin_request("GET", &format!("/api/v1/reputation/{ip}"), "")
                .await;
            let v: serde_json::Value = serde_json::from_str(&explain).unwrap();
            (v["score"].as_f64().unwrap(), explain)
        };
        let (untouched, _) = score("127.0.0.71").await;
        for ip in ["127.0.0.70", "127.0.0.80"] {
            let (s, explain) = score(ip).await;
            assert_eq!(s, untouched, "a forged score was applied: {explain}");
        }
    }
    let status = cluster_status(&b).await;
    assert!(
        status["rejected"]["unauthenticated"].as_u64() >= Some(4),
        "{status}"
    );
    assert_eq!(status["rejected"]["refused"], 3, "{status}");
    let errors_after = cluster_status(&b).await["errors"].as_u64().unwrap();
    assert_eq!(
        errors_before, errors_after,
        "the forged heartbeat failed B's syncs"
    );
    let m = b.metrics().await;
    // The copy, the /0, the score (stream), the heartbeat.
    assert!(
        metric(
            &m,
            "palisade_cluster_records_rejected_total{reason=\"unauthenticated\"}"
        ) >= 4.0
    );
    // The signed /0, the signed 48 h ban and the signed score of a
    // never-banned address.
    assert_eq!(
        metric(&m, "palisade_cluster_records_rejected_total{reason=\"refused\"}"),
        3.0
    );
    // Shared keys of the wrong type are dropped, not a reason to stop.
    for key in [nodes, rep, events] {
        redis.cli(&["DEL", key]);
        redis.cli(&["SET", key, "garbage"]);
    }
    let (status, body) = a
        .admin_request(
            "POST",
            "/api/v1/bans",
            r#"{"ip": "127.0.0.52", "duration": "5m"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("B holds a ban made after the keys were clobbered", async || {
        bans_of(&b).await.contains("127.0.0.52/32")
    })
    .await;
    all_up(&[&a, &b]).await;
    let m = late.metrics().await;
    // From the hashes: the copy, the /0, the score; and the heartbeat.
    assert!(
        metric(
            &m,
            "palisade_cluster_records_rejected_total{reason=\"unauthenticated\"}"
        ) >= 4.0
    );
    // The signed 48 h ban and score (the /0 was only in the stream).
    assert_eq!(
        metric(&m, "palisade_cluster_records_rejected_total{reason=\"refused\"}"),
        2.0
    );
}

/// What `failure_mode = "closed"` promises: with Redis gone, each node
/// assumes every other live node admitted as much as it did, so two nodes
/// each admit about half the shared limit; `"open"` nodes each admit the
/// whole limit. Both pairs share one Redis (different key prefixes), which
/// is killed under them.
#[tokio::test]
async fn with_redis_down_closed_nodes_admit_their_share_and_open_ones_the_whole_limit() {
    let Some(mut redis) = Redis::start() else { return };
    let pair = async |mode: &str| {
        let cluster =
            format!("sync_interval = \"20ms\"\nfailure_mode = \"{mode}\"\nkey_prefix = \"{mode}\"\n");
        let a = node_with(&redis, &format!("{mode}-a"), &cluster, LIMITS).await;
        let b = node_with(&redis, &format!("{mode}-b"), &cluster, LIMITS).await;
        (a, b)
    };
    let (closed, closed_peer) = pair("closed").await;
    let (open, open_peer) = pair("open").await;
    all_up(&[&closed, &closed_peer, &open, &open_peer]).await;
    for h in [&closed, &open] {
        eventually("the node sees its peer", async || {
            cluster_status(h).await["peers"] == 1
        })
        .await;
    }
    redis.kill();
    for h in [&closed, &open] {
        eventually("the node notices Redis is gone", async || {
            cluster_status(h).await["up"] == false
        })
        .await;
    }
    // One client as fast as it goes to one node of each pair (limit 50/s),
    // counted over the measured span: an open node admits about 50 × (1 +
    // span) of the 150, more than any closed one may, as long as the 150
    // take less than about 5 s.
    let mut admitted = Vec::new();
    for (h, client) in [(&closed, "127.0.0.20"), (&open, "127.0.0.21")] {
        let mut c = h.client(client).await;
        let start = Instant::now();
        let mut ok = 0u32;
        for _ in 0..150 {
            if c.get("/").await.0 == StatusCode::OK {
                ok += 1;
            }
        }
        admitted.push((ok, start.elapsed().as_secs_f64()));
    }
    let [(closed_ok, closed_span), (open_ok, open_span)] = admitted[..] else {
        unreachable!()
    };
    eprintln!(
        "Redis down, limit 50/s, 150 requests: closed node admitted {closed_ok} in {closed_span:.3} s, \
         open node {open_ok} in {open_span:.3} s"
    );
    // Half the sliding limit over the span (the peer is assumed to have
    // admitted as much), one request of rounding.
    let closed_bound = 25.0 * (1.0 + closed_span) + 1.0;
    assert!(
        f64::from(closed_ok) <= closed_bound,
        "closed: {closed_ok} admitted, bound {closed_bound:.0}"
    );
    assert!(closed_ok >= 20, "closed: only {closed_ok} admitted");
    // Open: the node's own limit alone, more than a closed node's share.
    assert!(
        f64::from(open_ok) <= 50.0 * (1.0 + open_span) + 1.0,
        "open: {open_ok} admitted"
    );
    assert!(
        f64::from(open_ok) > 25.0 * (1.0 + open_span) + 1.0,
        "open: {open_ok} admitted in {open_span:.3} s, no more than a closed node may"
    );
}

/// A ban made on node A is held by node B within one second, at the
/// default `sync_interval` (50 ms): measured from A's answer to B listing
/// it, polled every 10 ms through B's admin API. Both kinds: a kernel ban
/// and a score of 0.
#[tokio::test]
async fn a_ban_reaches_the_other_node_within_a_second() {
    let Some(redis) = Redis::start() else { return };
    let a = node_with(&redis, "a", "", "").await;
    let b = node_with(&redis, "b", "", "").await;
    all_up(&[&a, &b]).await;
    let mut kernel = Vec::new();
    let mut score = Vec::new();
    for i in 0..5 {
        let ip = format!("127.0.0.{}", 100 + i);
        let body = format!(r#"{{"ip": "{ip}", "duration": "5m"}}"#);
        let (status, text) = a.admin_request("POST", "/api/v1/bans", &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        kernel.push(
            eventually("B holds the ban", async || {
                bans_of(&b).await.contains(&format!("{ip}/32"))
            })
            .await,
        );

        let ip = format!("127.0.0.{}", 110 + i);
        set_score(&a, &ip, 0).await;
        score.push(
            eventually("B has the score", async || {
                let (_, body) = b
                    .admin_request("GET", &format!("/api/v1/reputation/{ip}"), "")
                    .await;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                v["score"].as_f64().is_some_and(|s| s < 1.0)
            })
            .await,
        );
    }
    eprintln!("ban on A held by B after: kernel bans {kernel:?}, scores {score:?}");
    for took in kernel.iter().chain(&score) {
        assert!(*took < Duration::from_secs(1), "a ban took {took:?} to reach B");
    }
}

/// Redis with its default user off and an ACL user limited to Palisade's
/// keys and to non-dangerous commands, as in the Kubernetes example: the
/// nodes log in with `redis://user:password@host`, share limits and bans,
/// and nothing fails for want of a permission; a wrong password never
/// connects; the user cannot run FLUSHALL.
#[tokio::test]
async fn an_acl_user_limited_to_palisade_keys_is_enough() {
    let Some(redis) = Redis::start_with(|_, _| {
        // One token per argument: redis-server joins them into its
        // config line.
        "--user default off --user palisade on >redis-password-0123 ~{palisade}:* ~palisade:* \
         resetchannels +@all -@dangerous"
            .split_whitespace()
            .map(String::from)
            .collect()
    }) else {
        return;
    };
    let start = async |name: &str, password: &str| {
        Harness::start(
            "",
            &format!(
                "[cluster]\nredis = \"redis://palisade:{password}@127.0.0.1:{}\"\nsync_interval = \"20ms\"\n\
                 node_name = \"{name}\"\nkey = \"{KEY}\"\n{LIMITS}{SYN}",
                redis.port
            ),
        )
        .await
    };
    let a = start("a", "redis-password-0123").await;
    let b = start("b", "redis-password-0123").await;
    all_up(&[&a, &b]).await;
    for i in 0..20 {
        let h = if i % 2 == 0 { &a } else { &b };
        assert_eq!(status_from(h, "127.0.0.30").await, StatusCode::OK);
    }
    let (status, body) = a
        .admin_request(
            "POST",
            "/api/v1/bans",
            r#"{"ip": "127.0.0.31", "duration": "5m"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("B holds A's ban", async || {
        bans_of(&b).await.contains("127.0.0.31/32")
    })
    .await;
    set_score(&a, "127.0.0.32", 0).await;
    eventually("B has A's score", async || {
        status_from(&b, "127.0.0.32").await == StatusCode::FORBIDDEN
    })
    .await;
    // The counters went through too (a refused EVAL would fail the sync).
    let counted = redis.cli(&[
        "--user",
        "palisade",
        "--pass",
        "redis-password-0123",
        "--no-auth-warning",
        "--scan",
        "--pattern",
        "palisade:rc:*",
    ]);
    assert!(!counted.is_empty(), "no shared counters");
    for h in [&a, &b] {
        assert_eq!(
            metric(&h.metrics().await, "palisade_cluster_sync_errors_total"),
            0.0
        );
    }
    let wrong = start("wrong", "not-the-password").await;
    eventually("the wrong password is refused", async || {
        cluster_status(&wrong).await["errors"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(cluster_status(&wrong).await["up"], false);
    let denied = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--user",
            "palisade",
            "--pass",
            "redis-password-0123",
        ])
        .args(["--no-auth-warning", "FLUSHALL"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&denied.stdout).contains("NOPERM"),
        "{}",
        String::from_utf8_lossy(&denied.stdout)
    );
}

/// An authentic record copied back verbatim says what it said, no more: a
/// node that saw a ban lifted does not take the ban back from a replay of
/// the original, neither from the stream nor from the hash.
#[tokio::test]
async fn a_replayed_ban_does_not_undo_a_later_lift() {
    let Some(redis) = Redis::start() else { return };
    let a = node(&redis, "a", "").await;
    let b = node(&redis, "b", "").await;
    all_up(&[&a, &b]).await;
    let ban = async |ip: &str| {
        let body = format!(r#"{{"ip": "{ip}", "duration": "5m"}}"#);
        let (status, text) = a.admin_request("POST", "/api/v1/bans", &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        eventually("B holds A's ban", async || {
            bans_of(&b).await.contains(&format!("{ip}/32"))
        })
        .await;
    };
    ban("127.0.0.55").await;
    // The ban as it went through the stream and into the hash, MAC and all.
    let stream = redis.cli(&["XRANGE", "{palisade}:events", "-", "+"]);
    let lines: Vec<&str> = stream.lines().collect();
    let fields: Vec<&str> = lines
        .chunks(11)
        .find(|e| e.contains(&"127.0.0.55/32") && e.contains(&"ban"))
        .map(|e| e[1..].to_vec())
        .unwrap_or_else(|| panic!("the ban is not in the stream: {stream}"));
    let hashed = redis.cli(&["HGET", "{palisade}:bans", "127.0.0.55/32"]);
    let (status, text) = a.admin_request("DELETE", "/api/v1/bans/127.0.0.55", "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    eventually("B lifts it", async || {
        !bans_of(&b).await.contains("127.0.0.55/32")
    })
    .await;

    redis.cli(&[&["XADD", "{palisade}:events", "*"][..], &fields].concat());
    redis.cli(&["HSET", "{palisade}:bans", "127.0.0.55/32", &hashed]);
    // Stream entries are read in order: once a later ban arrives, the
    // replay has been read.
    ban("127.0.0.56").await;
    assert!(
        !bans_of(&b).await.contains("127.0.0.55/32"),
        "the replay banned again"
    );
    let m = b.metrics().await;
    assert!(metric(&m, "palisade_cluster_records_rejected_total{reason=\"stale\"}") >= 1.0);
}

/// This process's resident or peak resident memory (`VmRSS:`, `VmHWM:`), KiB.
fn memory_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap()
}

/// Someone who can write to Redis but has no key puts values of 32 MiB in
/// every shared hash and the stream. Each node used to read them all at
/// every sync (HGETALL, XREAD): 4 such values in the heartbeat hash took a
/// node from 25 MB to 418 MB resident, every read timed out and the sync
/// stayed down for good. Now a field or value over 1 KiB is deleted in
/// Redis unread, counted as malformed, and the sync goes on.
#[tokio::test]
async fn huge_records_in_redis_are_dropped_unread() {
    let Some(redis) = Redis::start() else { return };
    let a = node(&redis, "a", "").await;
    let b = node(&redis, "b", "").await;
    all_up(&[&a, &b]).await;
    // The value goes to redis-cli from a file: this process never holds it.
    let file = redis.dir.join("huge");
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for _ in 0..32 {
            f.write_all(&[b'7'; 1 << 20]).unwrap();
        }
    }
    let plant = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "-x"])
            .args(args)
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let peak_before = memory_kib("VmHWM:");
    for i in 0..3 {
        plant(&["HSET", "{palisade}:nodes", &format!("mallory{i}")]);
        plant(&["HSET", "{palisade}:bans", &format!("127.0.0.{}/32", 60 + i)]);
        plant(&["HSET", "{palisade}:rep", &format!("127.0.0.{}/32", 70 + i)]);
    }
    plant(&["XADD", "{palisade}:events", "*", "node", "mallory", "v"]);
    // A restart reads the bans and scores hashes too.
    let c = node(&redis, "c", "").await;
    // The sync goes on: a ban made now reaches the other nodes.
    let (status, body) = a
        .admin_request(
            "POST",
            "/api/v1/bans",
            r#"{"ip": "127.0.0.52", "duration": "5m"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for h in [&b, &c] {
        eventually("the ban reaches the node", async || {
            bans_of(h).await.contains("127.0.0.52/32")
        })
        .await;
    }
    all_up(&[&a, &b, &c]).await;
    // Whichever node met them first deleted them.
    let mut malformed = 0;
    for h in [&a, &b, &c] {
        malformed += cluster_status(h).await["rejected"]["malformed"].as_u64().unwrap();
    }
    assert!(malformed >= 9, "{malformed} oversized records counted");
    for key in ["{palisade}:nodes", "{palisade}:bans", "{palisade}:rep"] {
        let longest: usize = redis
            .cli(&["HVALS", key])
            .lines()
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(longest < 1024, "{key} still holds a value of {longest} bytes");
    }
    let grew_mib = memory_kib("VmHWM:").saturating_sub(peak_before) / 1024;
    eprintln!("peak resident memory grew {grew_mib} MiB for 10 planted values of 32 MiB");
    // Three nodes reading 10 values of 32 MiB once each would be 960 MiB.
    assert!(grew_mib < 64, "peak resident memory grew {grew_mib} MiB");
}
