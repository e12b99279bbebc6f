//! Cluster mode: nodes share per-client limits and reputation through
//! Redis (one server or a Redis Cluster), without any request waiting on it.
//!
//! **Limits.** Each node keeps, per limiter and client, a sliding window of
//! two one-second halves (the previous and the current wall-clock second,
//! weighted by how far into the current second we are, as Cloudflare's
//! limiter does) for its own admissions and for everyone else's. A request
//! is admitted while `own + others < window_limit`. Every `sync_interval` a
//! background task pushes each client's new admissions with one Lua script
//! per client (`INCRBY` on `prefix:rl:{limiter:client}:second`, read the
//! previous second), pipelined, and learns the cluster's totals.
//! A node learns of the others' admissions at most one interval plus a
//! round trip late, so N nodes together admit at most
//! `window_limit + (N - 1) × r × (sync_interval + RTT)` per second for a
//! client sending `r` requests/s to each node: with two nodes, 50 ms and a
//! client at 150 req/s per node, about 8 over a limit of 100.
//!
//! **Reputation and bans.** Score changes (penalties, operator changes) and
//! kernel bans (SYN defense) are appended
//! to a Redis stream (`{prefix}:events`) and kept in a hash
//! (`{prefix}:rep` and `{prefix}:bans`, one field per client, with its
//! expiry); the braces are
//! a hash tag, so in a Redis Cluster these keys share a slot. Every node reads
//! the stream each interval and applies what other nodes did; a node that
//! starts or reconnects reads the hash first, so it catches up.
//!
//! **Failure.** Redis slow or down: the sync fails (bounded by timeouts),
//! the node says so once, counts it, and limits go local-only
//! (`failure_mode = "open"`) or assume every other live node admitted as
//! much as this one did (`"closed"`). Score changes queue (bounded) until
//! Redis is back; then the node re-publishes what it knows and catches up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use palisade_core::{ClientKey, Nanos, unix_now_ms};
use palisade_limits::table::{ClientTable, Slot, Zeroable};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::{mpsc, watch};

use crate::config::{ClusterSettings, FailureMode};
use crate::metrics::{KindLabel, Metrics};
use crate::proxy::App;

const TIMEOUT: Duration = Duration::from_millis(500);
/// 9999-12-31T23:59:59Z: the latest time a shared record may name.
const MAX_UNIX_SECS: u64 = 253_402_300_799;
/// Clients pushed per sync at most; the rest wait for the next one.
const PUSH_BATCH: usize = 10_000;
const OUTBOX: usize = 10_000;
/// Stream entries kept in Redis (approximately).
const STREAM_LEN: usize = 100_000;
/// A node is live if it sent a heartbeat this recently.
const PEER_TTL_MS: u64 = 5_000;

/// `KEYS[1]` this second's counter, `KEYS[2]` the previous second's;
/// `ARGV[1]` admissions to add, `ARGV[2]` expiry in ms.
const PUSH: &str = r"
local c = redis.call('INCRBY', KEYS[1], ARGV[1])
if c == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local p = tonumber(redis.call('GET', KEYS[2]) or '0')
return {c, p}
";

/// A score change or a kernel ban, as it travels between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreEvent {
    /// The client (address, or IPv6 prefix).
    pub net: IpNet,
    /// A kernel ban (SYN defense) rather than a score: `expires` is when it
    /// lapses, a past `expires` lifts it, `score` is unused.
    pub ban: bool,
    /// The new score; `None`: forgotten.
    pub score: Option<u8>,
    /// Unix seconds after which the change no longer matters (0: never).
    pub expires: u64,
    /// When it happened (Unix ms).
    pub at_ms: u64,
}

impl ScoreEvent {
    fn value(&self) -> String {
        let score = self.score.map_or_else(|| "-".to_owned(), |s| s.to_string());
        format!("{score} {} {}", self.expires, self.at_ms)
    }

    fn parse(net: &str, value: &str, ban: bool) -> Option<Self> {
        let mut parts = value.split(' ');
        let score = match parts.next()? {
            "-" => None,
            s => Some(s.parse::<u8>().ok()?.min(100)),
        };
        Some(Self {
            net: net.parse().ok()?,
            ban,
            score,
            // Anything a writer to Redis sends is read back here: an expiry
            // or stamp past the year 9999 is no real record, and would
            // overflow the millisecond arithmetic below.
            expires: parts.next()?.parse().ok().filter(|&e| e <= MAX_UNIX_SECS)?,
            at_ms: parts
                .next()?
                .parse()
                .ok()
                .filter(|&t| t <= MAX_UNIX_SECS * 1000)?,
        })
    }

    fn live(&self, now_ms: u64) -> bool {
        (self.expires == 0 && !self.ban) || self.expires.saturating_mul(1000) > now_ms
    }

    /// Whether it still says something to apply (a live score or ban).
    fn current(&self, now_ms: u64) -> bool {
        self.live(now_ms) && (self.ban || self.score.is_some())
    }
}

/// One client's shared window for one limiter.
#[derive(Default)]
#[repr(C)]
pub struct GlobalSlot {
    /// The Unix second `own` and `remote` count in their high halves.
    sec: AtomicU64,
    /// This node's admissions: `(current second << 32) | previous second`.
    own: AtomicU64,
    /// Everyone else's, as of the last sync, same packing.
    remote: AtomicU64,
    /// Admissions of the current second already pushed to Redis.
    pushed: AtomicU32,
    /// Admissions not pushed yet.
    unsynced: AtomicU32,
    /// The client, for naming its Redis key: kind (1 IPv4, 2 IPv6), bits.
    kind: AtomicU32,
    hi: AtomicU64,
    lo: AtomicU64,
}

// SAFETY: only atomic integers, whose zero is their default.
unsafe impl Zeroable for GlobalSlot {}

impl Slot for GlobalSlot {
    fn is_idle(&self, now: Nanos) -> bool {
        // `now` is Unix ms × 1e6 for this table: idle once two seconds old.
        let sec = now / 1_000_000_000;
        self.sec.load(Ordering::Acquire) + 2 <= sec && self.unsynced.load(Ordering::Acquire) == 0
    }

    fn reset(&self) {
        for a in [&self.sec, &self.own, &self.remote, &self.hi, &self.lo] {
            a.store(0, Ordering::Release);
        }
        for a in [&self.pushed, &self.unsynced, &self.kind] {
            a.store(0, Ordering::Release);
        }
    }
}

const LOW: u64 = u32::MAX as u64;

impl GlobalSlot {
    /// Moves the window to `sec`: the current half becomes the previous one
    /// (or both clear after a gap). Concurrent requests may lose a count in
    /// the instant of the roll; the error is one request, toward admitting.
    fn roll(&self, sec: u64) {
        let cur = self.sec.load(Ordering::Acquire);
        if cur >= sec {
            return;
        }
        if self
            .sec
            .compare_exchange(cur, sec, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let shift = |v: u64| if sec == cur + 1 { v >> 32 } else { 0 };
            self.own
                .store(shift(self.own.load(Ordering::Acquire)), Ordering::Release);
            self.remote
                .store(shift(self.remote.load(Ordering::Acquire)), Ordering::Release);
            self.pushed.store(0, Ordering::Release);
        }
    }

    fn note_key(&self, key: &ClientKey) {
        if self.kind.load(Ordering::Relaxed) != 0 {
            return;
        }
        let (kind, bits) = match *key {
            ClientKey::V4(v) => (1, u128::from(v)),
            ClientKey::V6(v) => (2, v),
            ClientKey::Fingerprint(v) => (3, u128::from(v)),
        };
        self.hi.store((bits >> 64) as u64, Ordering::Relaxed);
        self.lo.store(bits as u64, Ordering::Relaxed);
        self.kind.store(kind, Ordering::Release);
    }

    fn key(&self) -> Option<ClientKey> {
        let bits =
            (u128::from(self.hi.load(Ordering::Relaxed)) << 64) | u128::from(self.lo.load(Ordering::Relaxed));
        match self.kind.load(Ordering::Acquire) {
            1 => Some(ClientKey::V4(bits as u32)),
            2 => Some(ClientKey::V6(bits)),
            3 => Some(ClientKey::Fingerprint(bits as u64)),
            _ => None,
        }
    }
}

/// The shared windows of one limiter.
pub struct Window {
    name: String,
    table: ClientTable<GlobalSlot>,
}

/// What [`Cluster::status`] reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// This node.
    pub node: String,
    /// Whether the last sync reached Redis.
    pub up: bool,
    /// Other nodes with a recent heartbeat.
    pub peers: u32,
    /// Milliseconds since the last successful sync (None: never).
    pub last_sync_ms_ago: Option<u64>,
    /// Score changes sent to the cluster.
    pub published: u64,
    /// Score changes applied from other nodes.
    pub applied: u64,
    /// Failed syncs.
    pub errors: u64,
}

/// This node's membership in a cluster.
pub struct Cluster {
    settings: ClusterSettings,
    node: String,
    max_clients: usize,
    windows: Mutex<HashMap<String, Arc<Window>>>,
    up: AtomicBool,
    peers: AtomicU32,
    outbox: mpsc::Sender<ScoreEvent>,
    inbox: Mutex<Option<mpsc::Receiver<ScoreEvent>>>,
    /// Live score changes this node made, re-published after Redis comes
    /// back empty (bounded like the durable state).
    known: Mutex<HashMap<(IpNet, bool), ScoreEvent>>,
    published: AtomicU64,
    applied: AtomicU64,
    errors: AtomicU64,
    last_sync_ms: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// The Redis name of a client.
fn client_name(key: &ClientKey) -> String {
    match *key {
        ClientKey::V4(v) => std::net::Ipv4Addr::from(v).to_string(),
        ClientKey::V6(v) => std::net::Ipv6Addr::from(v).to_string(),
        ClientKey::Fingerprint(v) => format!("fp-{v:016x}"),
    }
}

impl Cluster {
    /// A member with no connection yet (the sync task connects).
    pub fn new(settings: ClusterSettings, max_clients: usize) -> Self {
        let node = if settings.node_name.is_empty() {
            format!("{}-{}", hostname(), std::process::id())
        } else {
            settings.node_name.clone()
        };
        let (outbox, inbox) = mpsc::channel(OUTBOX);
        Self {
            settings,
            node,
            max_clients,
            windows: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            peers: AtomicU32::new(0),
            outbox,
            inbox: Mutex::new(Some(inbox)),
            known: Mutex::new(HashMap::new()),
            published: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_sync_ms: AtomicU64::new(0),
        }
    }

    /// The settings it was started with.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// The shared windows of limiter `name` (the same across reloads).
    pub fn window(&self, name: &str) -> Arc<Window> {
        lock(&self.windows)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Window {
                    name: name.to_owned(),
                    table: ClientTable::new(self.max_clients),
                })
            })
            .clone()
    }

    /// Whether one more request of `key` fits the shared limit. Never waits:
    /// it reads what the last sync learned.
    pub fn admit(&self, window: &Window, key: &ClientKey, limit: u32, now_ms: u64) -> bool {
        let sec = now_ms / 1000;
        let elapsed = (now_ms % 1000) as f64 / 1000.0;
        let up = self.up.load(Ordering::Acquire);
        let peers = u64::from(self.peers.load(Ordering::Relaxed));
        window.table.with(key, now_ms.saturating_mul(1_000_000), |s| {
            s.roll(sec);
            s.note_key(key);
            let own = s.own.load(Ordering::Acquire);
            let remote = match (up, self.settings.failure_mode) {
                (true, _) => s.remote.load(Ordering::Acquire),
                (false, FailureMode::Open) => 0,
                (false, FailureMode::Closed) => {
                    ((own >> 32) * peers).min(LOW) << 32 | ((own & LOW) * peers).min(LOW)
                }
            };
            let prev = (own & LOW) + (remote & LOW);
            let curr = (own >> 32) + (remote >> 32);
            let estimate = prev as f64 * (1.0 - elapsed) + curr as f64;
            if estimate + 1.0 > f64::from(limit) {
                return false;
            }
            s.own.fetch_add(1 << 32, Ordering::AcqRel);
            s.unsynced.fetch_add(1, Ordering::AcqRel);
            true
        })
    }

    /// Sends a score change to the other nodes (queued; never waits).
    pub fn publish(&self, event: ScoreEvent, metrics: &Metrics) {
        {
            let mut known = lock(&self.known);
            let key = (event.net, event.ban);
            if known.len() >= self.max_clients && !known.contains_key(&key) {
                let now = unix_now_ms();
                known.retain(|_, e| e.current(now));
            }
            if known.len() < self.max_clients {
                known.insert(key, event);
            }
        }
        if self.outbox.try_send(event).is_err() {
            Metrics::inc(&metrics.cluster_events, "dropped");
        }
    }

    /// For `GET /api/v1/cluster`.
    pub fn status(&self) -> Status {
        let last = self.last_sync_ms.load(Ordering::Acquire);
        Status {
            node: self.node.clone(),
            up: self.up.load(Ordering::Acquire),
            peers: self.peers.load(Ordering::Acquire),
            last_sync_ms_ago: (last > 0).then(|| unix_now_ms().saturating_sub(last)),
            published: self.published.load(Ordering::Acquire),
            applied: self.applied.load(Ordering::Acquire),
            errors: self.errors.load(Ordering::Acquire),
        }
    }

    /// A shared key. All of them carry the prefix as hash tag, so that in a
    /// Redis Cluster they live in one slot and pipeline together.
    fn key(&self, parts: &str) -> String {
        format!("{{{}}}:{parts}", self.settings.key_prefix)
    }

    /// A client's counter for one second (hash-tagged per client, spread
    /// across a Redis Cluster).
    fn counter_key(&self, tag: &str, sec: u64) -> String {
        format!("{}:rl:{{{tag}}}:{sec}", self.settings.key_prefix)
    }
}

/// A connection to one Redis server or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Runs commands that each touch their own keys. One server: one
    /// pipeline. Redis Cluster refuses pipelines across hash slots, so
    /// there they go as concurrent single commands (multiplexed on the
    /// cluster connections), 256 at a time.
    async fn each<T: redis::FromRedisValue>(&mut self, cmds: Vec<redis::Cmd>) -> redis::RedisResult<Vec<T>> {
        match self {
            Self::Single(_) => {
                let mut pipe = redis::pipe();
                for c in cmds {
                    pipe.add_command(c);
                }
                self.query(&pipe).await
            }
            Self::Cluster(conn) => {
                let mut out = Vec::with_capacity(cmds.len());
                for chunk in cmds.chunks(256) {
                    let calls = chunk.iter().map(|cmd| {
                        let mut conn = conn.clone();
                        async move {
                            tokio::time::timeout(TIMEOUT, cmd.query_async::<T>(&mut conn))
                                .await
                                .unwrap_or_else(|_| {
                                    Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
                                })
                        }
                    });
                    out.extend(futures_util::future::try_join_all(calls).await?);
                }
                Ok(out)
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&mut self, pipe: &redis::Pipeline) -> redis::RedisResult<T> {
        let fut = async {
            match self {
                Self::Single(c) => pipe.query_async(c).await,
                Self::Cluster(c) => pipe.query_async(c).await,
            }
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))))
    }
}

fn certificates(settings: &ClusterSettings) -> redis::RedisResult<Option<redis::TlsCertificates>> {
    let Some(ca) = &settings.redis_ca else {
        return Ok(None);
    };
    let pem = std::fs::read(ca).map_err(|e| {
        redis::RedisError::from((redis::ErrorKind::Io, "reading cluster.redis_ca", e.to_string()))
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

async fn connect(settings: &ClusterSettings) -> redis::RedisResult<Conn> {
    let certs = certificates(settings)?;
    if settings.redis_cluster {
        let mut builder = redis::cluster::ClusterClient::builder(settings.redis.clone())
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .retries(1);
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        let client = builder.build()?;
        let conn = tokio::time::timeout(TIMEOUT * 2, client.get_async_connection())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "cluster connect timed out")))??;
        Ok(Conn::Cluster(conn))
    } else {
        let url = settings.redis[0].as_str();
        let client = match certs {
            Some(certs) => redis::Client::build_with_tls(url, certs)?,
            None => redis::Client::open(url)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        Ok(Conn::Single(client.get_connection_manager_lazy(config)?))
    }
}

struct Pushed {
    window: Arc<Window>,
    key: ClientKey,
    sec: u64,
}

/// The background side: connects, syncs every interval, reconnects, until
/// `stop`.
pub async fn run(cluster: Arc<Cluster>, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let metrics = &app.metrics;
    let Some(mut inbox) = lock(&cluster.inbox).take() else {
        return;
    };
    let mut conn: Option<Conn> = None;
    let mut pending: Vec<ScoreEvent> = Vec::new();
    let mut stream_id = String::from("$");
    let mut synced_once = false;
    let mut last_heartbeat = 0u64;
    let mut was_up = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cluster.settings.sync_interval) => {}
            _ = stop.changed() => return,
        }
        while pending.len() < OUTBOX {
            match inbox.try_recv() {
                Ok(e) => pending.push(e),
                Err(_) => break,
            }
        }
        if conn.is_none() {
            match connect(&cluster.settings).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    down(&cluster, metrics, &mut was_up, &e.to_string());
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let result = async {
            if !synced_once || !was_up {
                catch_up(&cluster, c, &app, &mut stream_id).await?;
                synced_once = true;
            }
            push_counts(&cluster, c).await?;
            publish(&cluster, c, &mut pending).await?;
            read_events(&cluster, c, &app, &mut stream_id).await?;
            let now = unix_now_ms();
            if now >= last_heartbeat + 1000 {
                heartbeat(&cluster, c, now).await?;
                last_heartbeat = now;
            }
            redis::RedisResult::Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                cluster.last_sync_ms.store(unix_now_ms(), Ordering::Release);
                if !was_up {
                    tracing::info!(node = %cluster.node, "redis reachable: cluster limits and reputation are shared");
                }
                was_up = true;
                cluster.up.store(true, Ordering::Release);
                metrics.cluster_up.set(1);
                metrics
                    .cluster_peers
                    .set(i64::from(cluster.peers.load(Ordering::Acquire)));
            }
            Err(e) => {
                down(&cluster, metrics, &mut was_up, &e.to_string());
                if cluster.settings.redis_cluster {
                    // Topology may have changed: start over.
                    conn = None;
                }
            }
        }
        for (kind, now) in [
            ("applied", cluster.applied.load(Ordering::Acquire)),
            ("published", cluster.published.load(Ordering::Acquire)),
        ] {
            // The counters mirror the cluster's own totals.
            let c = metrics.cluster_events.get_or_create(&KindLabel { kind });
            c.inc_by(now.saturating_sub(c.get()));
        }
    }
}

fn down(cluster: &Cluster, metrics: &Metrics, was_up: &mut bool, why: &str) {
    cluster.errors.fetch_add(1, Ordering::AcqRel);
    metrics.cluster_sync_errors.inc();
    metrics.cluster_up.set(0);
    cluster.up.store(false, Ordering::Release);
    if *was_up || cluster.errors.load(Ordering::Acquire) == 1 {
        let mode = match cluster.settings.failure_mode {
            FailureMode::Open => "each node enforces the limits alone",
            FailureMode::Closed => "limits assume every live peer admitted as much as this node",
        };
        tracing::warn!(node = %cluster.node, "redis unreachable ({why}): local-only, {mode}; retrying");
    }
    *was_up = false;
}

/// Pushes every client's new admissions and learns the others' counts.
async fn push_counts(cluster: &Cluster, c: &mut Conn) -> redis::RedisResult<()> {
    let windows: Vec<Arc<Window>> = lock(&cluster.windows).values().cloned().collect();
    let mut batch: Vec<(Pushed, u32)> = Vec::new();
    for w in &windows {
        w.table.for_each(|s| {
            if batch.len() >= PUSH_BATCH {
                return;
            }
            let n = s.unsynced.swap(0, Ordering::AcqRel);
            if n == 0 {
                return;
            }
            match s.key() {
                Some(key) => batch.push((
                    Pushed {
                        window: w.clone(),
                        key,
                        sec: s.sec.load(Ordering::Acquire),
                    },
                    n,
                )),
                None => {
                    s.unsynced.fetch_add(n, Ordering::AcqRel);
                }
            }
        });
    }
    if batch.is_empty() {
        return Ok(());
    }
    let cmds = batch
        .iter()
        .map(|(p, n)| {
            // One hash tag per client: both seconds live in one slot.
            let tag = format!("{}:{}", p.window.name, client_name(&p.key));
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(PUSH)
                .arg(2)
                .arg(cluster.counter_key(&tag, p.sec))
                .arg(cluster.counter_key(&tag, p.sec.saturating_sub(1)))
                .arg(*n)
                .arg(3000);
            cmd
        })
        .collect();
    let totals: Vec<(u64, u64)> = match c.each(cmds).await {
        Ok(t) => t,
        Err(e) => {
            // Not counted in Redis: keep them for the next sync.
            for (p, n) in &batch {
                p.window
                    .table
                    .get(&p.key, |s| s.unsynced.fetch_add(*n, Ordering::AcqRel));
            }
            return Err(e);
        }
    };
    for ((p, n), (curr, prev)) in batch.iter().zip(totals) {
        p.window.table.get(&p.key, |s| {
            if s.sec.load(Ordering::Acquire) != p.sec {
                return;
            }
            let pushed = u64::from(s.pushed.fetch_add(*n, Ordering::AcqRel) + *n);
            let own_prev = s.own.load(Ordering::Acquire) & LOW;
            let others_curr = curr.saturating_sub(pushed).min(LOW);
            let others_prev = prev.saturating_sub(own_prev).min(LOW);
            s.remote
                .store((others_curr << 32) | others_prev, Ordering::Release);
        });
    }
    Ok(())
}

/// Sends queued score changes: the stream for live nodes, the hash for
/// late ones.
async fn publish(cluster: &Cluster, c: &mut Conn, pending: &mut Vec<ScoreEvent>) -> redis::RedisResult<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let stream = cluster.key("events");
    let now = unix_now_ms();
    let mut pipe = redis::pipe();
    for e in pending.iter() {
        let net = e.net.to_string();
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_LEN)
            .arg("*")
            .arg("node")
            .arg(&cluster.node)
            .arg("net")
            .arg(&net)
            .arg("k")
            .arg(if e.ban { "ban" } else { "score" })
            .arg("v")
            .arg(e.value())
            .ignore();
        let hash = cluster.key(if e.ban { "bans" } else { "rep" });
        if e.current(now) {
            pipe.cmd("HSET").arg(&hash).arg(&net).arg(e.value()).ignore();
        } else {
            pipe.cmd("HDEL").arg(&hash).arg(&net).ignore();
        }
    }
    c.query::<()>(&pipe).await?;
    cluster
        .published
        .fetch_add(pending.len() as u64, Ordering::AcqRel);
    pending.clear();
    Ok(())
}

type StreamReply = Option<Vec<(String, Vec<(String, HashMap<String, String>)>)>>;

/// Applies what other nodes published since `stream_id`.
async fn read_events(
    cluster: &Cluster,
    c: &mut Conn,
    app: &App,
    stream_id: &mut String,
) -> redis::RedisResult<()> {
    loop {
        let mut pipe = redis::pipe();
        pipe.cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(cluster.key("events"))
            .arg(&*stream_id);
        let (reply,): (StreamReply,) = c.query(&pipe).await?;
        let Some(streams) = reply else { return Ok(()) };
        let mut got = 0;
        for (_, entries) in streams {
            for (id, fields) in entries {
                got += 1;
                *stream_id = id;
                if fields.get("node").map(String::as_str) == Some(cluster.node.as_str()) {
                    continue;
                }
                let ban = fields.get("k").map(String::as_str) == Some("ban");
                if let (Some(net), Some(v)) = (fields.get("net"), fields.get("v"))
                    && let Some(e) = ScoreEvent::parse(net, v, ban)
                {
                    app.apply_cluster_event(&e);
                    cluster.applied.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        if got < 1000 {
            return Ok(());
        }
    }
}

/// After a (re)connect: re-publish what this node knows (Redis may have
/// restarted empty), note the stream's end, then apply the hash.
async fn catch_up(
    cluster: &Cluster,
    c: &mut Conn,
    app: &App,
    stream_id: &mut String,
) -> redis::RedisResult<()> {
    let now = unix_now_ms();
    let mine: Vec<ScoreEvent> = lock(&cluster.known)
        .values()
        .filter(|e| e.current(now))
        .copied()
        .collect();
    if !mine.is_empty() {
        let mut pipe = redis::pipe();
        for e in &mine {
            // Only where the hash does not hold something newer.
            let hash = cluster.key(if e.ban { "bans" } else { "rep" });
            pipe.cmd("HSETNX")
                .arg(&hash)
                .arg(e.net.to_string())
                .arg(e.value())
                .ignore();
        }
        c.query::<()>(&pipe).await?;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("XREVRANGE")
        .arg(cluster.key("events"))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
    let (last,): (Vec<(String, HashMap<String, String>)>,) = c.query(&pipe).await?;
    if let Some((id, _)) = last.into_iter().next() {
        *stream_id = id;
    } else {
        *stream_id = "0-0".into();
    }
    let mut total = 0;
    for (name, ban) in [("rep", false), ("bans", true)] {
        let hash = cluster.key(name);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&hash);
        let (all,): (HashMap<String, String>,) = c.query(&pipe).await?;
        total += all.len();
        let mut expired = Vec::new();
        for (net, v) in &all {
            match ScoreEvent::parse(net, v, ban) {
                Some(e) if e.current(now) => {
                    app.apply_cluster_event(&e);
                    cluster.applied.fetch_add(1, Ordering::AcqRel);
                }
                _ => expired.push(net.clone()),
            }
        }
        if !expired.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("HDEL").arg(&hash).arg(expired).ignore();
            c.query::<()>(&pipe).await?;
        }
    }
    tracing::info!(node = %cluster.node, entries = total, "cluster state caught up from redis");
    Ok(())
}

/// Says this node is alive and counts the others.
async fn heartbeat(cluster: &Cluster, c: &mut Conn, now: u64) -> redis::RedisResult<()> {
    let nodes = cluster.key("nodes");
    let mut pipe = redis::pipe();
    pipe.cmd("HSET").arg(&nodes).arg(&cluster.node).arg(now).ignore();
    pipe.cmd("HGETALL").arg(&nodes);
    let (all,): (HashMap<String, u64>,) = c.query(&pipe).await?;
    let live = all
        .iter()
        .filter(|(n, t)| **n != cluster.node && now.saturating_sub(**t) < PEER_TTL_MS)
        .count();
    cluster
        .peers
        .store(u32::try_from(live).unwrap_or(u32::MAX), Ordering::Release);
    let gone: Vec<&String> = all
        .iter()
        .filter(|(_, t)| now.saturating_sub(**t) > 60_000)
        .map(|(n, _)| n)
        .collect();
    if !gone.is_empty() {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(&nodes).arg(gone).ignore();
        c.query::<()>(&pipe).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forged ban with a u64::MAX expiry used to overflow in `live` (a
    /// panic in the sync task in debug builds, a wrapped expiry in release).
    #[test]
    fn out_of_range_times_from_redis_are_refused() {
        let max = u64::MAX.to_string();
        assert!(ScoreEvent::parse("198.18.0.1/32", &format!("- {max} 0"), true).is_none());
        assert!(ScoreEvent::parse("198.18.0.1/32", &format!("5 0 {max}"), false).is_none());
        let Some(e) = ScoreEvent::parse("198.18.0.1/32", "- 253402300799 0", true) else {
            panic!("the largest allowed expiry parses");
        };
        assert!(e.live(0));
        assert!(!e.live(u64::MAX));
    }
}
