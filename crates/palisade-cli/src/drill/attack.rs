//! What an attack is to the runner: a name, a budget, and a future that
//! sends at most the budget and says what it saw. The runner measures
//! everything else (the daemon's counters, CPU, descriptors, memory, the
//! legitimate population) around it.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A boxed future an attack returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pub use super::report::Layer;

/// How much an attack may send, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Packets, requests, streams or connections, whichever the attack
    /// counts in; it stops at this many.
    pub max: u64,
    /// It stops after this long, whatever it sent.
    pub seconds: Duration,
}

/// What the daemon under attack was configured with, as far as attacks
/// need to know to judge what got through.
#[derive(Clone, Debug)]
pub struct Defenses {
    /// The default per-client limit, when it is on and enforced.
    pub limit: Option<Limit>,
    /// The first route with an enforced limit of its own and a path prefix.
    pub route: Option<LimitedRoute>,
    /// `server.header_read_timeout`.
    pub header_read_timeout: Duration,
    /// `server.body_rate_grace`: after it, a body slower than
    /// `server.body_min_rate` is cut.
    pub body_rate_grace: Duration,
    /// `server.body_min_rate` (0: off).
    pub body_min_rate: u64,
    /// `server.write_timeout`.
    pub write_timeout: Duration,
    /// `connections.max_per_ip`.
    pub max_conns_per_ip: u32,
    /// `cluster.key_prefix`, when in cluster mode.
    pub cluster_prefix: Option<String>,
}

/// A per-client limit.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests admitted at once.
    pub burst: u32,
}

impl Limit {
    /// The most one client can get through in `d`: the burst plus the
    /// sustained rate over it.
    pub fn allowance(&self, d: Duration) -> u64 {
        u64::from(self.burst) + (self.per_second * d.as_secs_f64()).ceil() as u64
    }
}

/// A configured route with a limit of its own.
#[derive(Clone, Debug)]
pub struct LimitedRoute {
    /// Its name.
    pub name: String,
    /// The path prefix it matches.
    pub prefix: String,
    /// Its limit.
    pub limit: Limit,
    /// Whether `/Login` is another path than `/login`.
    pub case_sensitive: bool,
}

/// Everything an attack gets. Its sockets are opened in the client
/// namespace: the runtime it runs on lives there.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Palisade's listener.
    pub target: SocketAddr,
    /// The demo upstream behind it, as Palisade reaches it.
    pub upstream: SocketAddr,
    /// The upstream's namespace, where probes of what it holds run.
    pub upstream_ns: String,
    /// Addresses of this attack's own, bindable in the client namespace
    /// (no other attack and no legitimate client uses them).
    pub sources: Arc<[Ipv4Addr]>,
    /// Sources to forge in raw packets: routed back towards the client
    /// namespace, which owns none of them (answers die there).
    pub spoof: (Ipv4Addr, u8),
    /// What it may send.
    pub budget: Budget,
    /// Whether this is a `--quick` drill.
    pub quick: bool,
    /// What it is up against.
    pub defenses: Arc<Defenses>,
    /// `--redis`, for attacks on the cluster's shared records.
    pub redis: Option<String>,
    /// The legitimate clients' addresses: what an attack must not get
    /// banned or limited.
    pub legit: Arc<[Ipv4Addr]>,
    /// The daemon's admin API, to read what it decided.
    pub admin: super::daemon::Admin,
}

/// What an attack saw.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Packets, requests, streams or connections sent.
    pub sent: u64,
    /// The first refusal it met, since it started, and where.
    pub refused: Option<(Duration, Layer)>,
    /// What got through that must not have: each fails the verdict.
    pub breaches: Vec<String>,
    /// Anything else worth a line in the report.
    pub notes: Vec<String>,
}

impl Outcome {
    /// Keeps the earliest refusal.
    pub fn refused_at(&mut self, at: Duration, layer: Layer) {
        if self.refused.is_none_or(|(t, _)| at < t) {
            self.refused = Some((at, layer));
        }
    }

    /// Folds another worker's outcome into this one.
    pub fn merge(&mut self, other: Outcome) {
        self.sent += other.sent;
        if let Some((at, layer)) = other.refused {
            self.refused_at(at, layer);
        }
        self.breaches.extend(other.breaches);
        self.notes.extend(other.notes);
    }
}

/// One attack of the catalog.
pub trait Attack: Send + Sync {
    /// Its `--only`/`--skip` name, e.g. `http-flood`.
    fn name(&self) -> &'static str;
    /// One line saying what it does.
    fn title(&self) -> &'static str;
    /// How many addresses of its own it binds (0: none, e.g. raw packets
    /// with forged sources).
    fn sources(&self) -> u32 {
        1
    }
    /// Its budget, short under `--quick`.
    fn budget(&self, quick: bool) -> Budget;
    /// Why it cannot run against this setup, if it cannot.
    fn skip(&self, _ctx: &Ctx) -> Option<String> {
        None
    }
    /// Runs it. The runner also cuts it off shortly after its budget's
    /// seconds, so a stuck attack cannot hold the drill.
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>>;
}

/// The catalog, in the order attacks run.
pub fn catalog() -> Vec<Box<dyn Attack>> {
    vec![
        Box::new(super::http::Flood),
        Box::new(super::http::ManySourceFlood),
        Box::new(super::http::ForgedHeaders),
        Box::new(super::http::RouteBypass),
        Box::new(super::slow::Slowloris),
        Box::new(super::slow::SlowBody),
        Box::new(super::http2::RapidReset),
        Box::new(super::http2::Stall),
        Box::new(super::packet::ConnFloodAttack),
        Box::new(super::packet::SynAttack(super::packet::SynKind::OneSource)),
        Box::new(super::packet::SynAttack(super::packet::SynKind::Spoofed)),
        Box::new(super::packet::SynAttack(super::packet::SynKind::AsUpstream)),
        Box::new(super::cluster::ForgedRedis),
    ]
}

/// A budget of `max`, for `quick` or `full` seconds.
pub fn budget(quick: bool, max_quick: u64, max_full: u64, full_seconds: u64) -> Budget {
    if quick {
        Budget {
            max: max_quick,
            seconds: Duration::from_secs(3),
        }
    } else {
        Budget {
            max: max_full,
            seconds: Duration::from_secs(full_seconds),
        }
    }
}
