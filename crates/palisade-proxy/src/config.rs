//! Configuration: one TOML file, parsed into raw serde structs, then checked
//! into typed values. Every error names the file, line, column and key.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use palisade::__config_path as p;
use palisade::BreakerSettings;
pub use palisade::config::raw::parse_duration;
use palisade::config::raw::{
    self, Invalid, RawAdaptive, RawBreaker, RawClients, RawConnections, RawRateLimit, RawReputation,
    RawRoute, Seg, at, duration, nanos,
};
use palisade::config::{ConfigError as FileError, Protection};
use palisade_limits::admission::AdmissionConfig;
use palisade_limits::shield::ShieldConfig;
use palisade_store::sign::PublicKey;
use serde::Deserialize;

use crate::access_log::{AccessLogSettings, Destination, Format};
use crate::challenge::{ChallengeMode, ChallengeSettings, MAX_DIFFICULTY, RouteChallenge};
use crate::maintenance::MaintenancePage;
use crate::tasks::WatchdogConfig;
use crate::tls::TlsConfig;
use crate::upstream_tls::UpstreamTls;

/// The quickstart config, which is also the reference of every key.
pub const QUICKSTART: &str = include_str!("quickstart.toml");

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, or a key in it is wrong: file, line,
    /// column and key (the same errors the `palisade` library reports).
    #[error(transparent)]
    File(#[from] FileError),
    /// A command-line override is wrong.
    #[error("{flag}: {message}")]
    Override {
        /// The flag, e.g. `--upstream`.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The daemon's whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client-facing listener and its limits.
    pub server: ServerConfig,
    /// How upstreams are reached.
    pub upstream: UpstreamConfig,
    /// Upstream pools; the first is the one named `default`, where requests
    /// go that no route sends elsewhere.
    pub pools: Vec<PoolConfig>,
    /// Per route (indexed like the shield's routes, 0 the default route):
    /// the index in `pools` of the pool its requests go to.
    pub route_pools: Vec<usize>,
    /// Admin API.
    pub admin: AdminConfig,
    /// Protection rules.
    pub shield: ShieldConfig,
    /// Per-upstream circuit breaker; `None` when disabled.
    pub breaker: Option<BreakerSettings>,
    /// TLS on the client listener; `None` for cleartext.
    pub tls: Option<TlsConfig>,
    /// Admission at accept.
    pub connections: AdmissionConfig,
    /// Task-leak watchdog; `None` when disabled.
    pub watchdog: Option<WatchdogSettings>,
    /// External reputation store and its feed; `None` without one.
    pub store: Option<StoreSettings>,
    /// Durable learned state; `None` keeps it in memory only.
    pub state: Option<StateSettings>,
    /// Cluster mode; `None` runs as a single node.
    pub cluster: Option<ClusterSettings>,
    /// SYN-flood defense; `None` when off.
    pub syn: Option<SynSettings>,
    /// The access log; `None` when off.
    pub access_log: Option<AccessLogSettings>,
    /// The proof-of-work challenge; `None` when no route has one.
    pub challenge: Option<ChallengeSettings>,
}

/// `[syn]`: SYN-flood detection and kernel bans.
#[derive(Debug, Clone, PartialEq)]
pub struct SynSettings {
    /// Which firewall enforces bans.
    pub firewall: FirewallChoice,
    /// How long a ban lasts.
    pub ban_duration: Duration,
    /// SYNs/s to our listener above which sources are judged.
    pub global_threshold: u64,
    /// SYNs/s from one source that make it an offender during a flood.
    pub source_threshold: u64,
    /// How often the kernel counters are read.
    pub poll_interval: Duration,
    /// SYN-ACK retransmit ratio that turns `tcp_syncookies` on...
    pub syncookies_ratio: f64,
    /// ...when it lasts this long.
    pub syncookies_after: Duration,
    /// Reputation points an offender loses.
    pub reputation_penalty: u8,
    /// Ports whose handshakes nftables SYNPROXY answers (empty: off).
    pub synproxy_ports: Vec<u16>,
    /// How often the kernel's ban set is checked against ours.
    pub reconcile_interval: Duration,
    /// Attach the XDP program to the listener's interfaces.
    pub xdp: bool,
    /// Networks no ban may cover, besides those the config and host imply.
    pub never_ban: Vec<ipnet::IpNet>,
    /// Loopback is never banned (default; a test rig may turn it off).
    pub never_ban_loopback: bool,
    /// Longest ban anyone (admin, cluster) may ask for.
    pub max_ban_duration: Duration,
    /// Widest IPv4 prefix a ban may cover.
    pub min_prefix_v4: u8,
    /// Widest IPv6 prefix a ban may cover.
    pub min_prefix_v6: u8,
    /// New per-source SYN-flood bans a minute, at most: past it, the flood
    /// is met with syncookies instead.
    pub ban_budget: u32,
}

/// `syn.firewall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirewallChoice {
    /// nftables, else iptables, else a dry run (and say so).
    Auto,
    /// nftables only.
    Nftables,
    /// iptables + ipset only.
    Iptables,
    /// Decide and log, change nothing in the kernel.
    DryRun,
}

/// `[cluster]`: shared limits and reputation through Redis.
#[derive(Clone, PartialEq)]
pub struct ClusterSettings {
    /// Redis URLs (`redis://` or `rediss://`); several are Cluster seeds.
    pub redis: Vec<String>,
    /// Talk to a Redis Cluster rather than one server.
    pub redis_cluster: bool,
    /// How often counts are reconciled and events exchanged.
    pub sync_interval: Duration,
    /// This node's name in events and the node list.
    pub node_name: String,
    /// What limits do while Redis is unreachable.
    pub failure_mode: FailureMode,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// PEM CA bundle trusted for `rediss://` (default: the public roots).
    pub redis_ca: Option<PathBuf>,
    /// The key every shared record is signed with; `None` only with
    /// `cluster.insecure = true`.
    pub key: Option<ClusterKey>,
}

// By hand: a Redis URL may carry a password. Destructured so that a new
// field cannot be left out.
impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            redis,
            redis_cluster,
            sync_interval,
            node_name,
            failure_mode,
            key_prefix,
            redis_ca,
            key,
        } = self;
        let redis: Vec<String> = redis.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("ClusterSettings")
            .field("redis", &redis)
            .field("redis_cluster", redis_cluster)
            .field("sync_interval", sync_interval)
            .field("node_name", node_name)
            .field("failure_mode", failure_mode)
            .field("key_prefix", key_prefix)
            .field("redis_ca", redis_ca)
            .field("key", key)
            .finish()
    }
}

/// `url` with its user and password (if any) replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// A secret from the config (the admin token). Its `Debug` never shows it:
/// configs are logged and printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret itself, for the one place that compares or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Longest `cluster.node_name`, in bytes.
pub const MAX_NODE_NAME_BYTES: usize = 255;

/// Shortest `cluster.key` accepted, in characters.
pub const MIN_CLUSTER_KEY_CHARS: usize = 32;

/// The cluster's shared secret. Its `Debug` never shows it: configs are
/// logged and printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl ClusterKey {
    /// A key from its text, at least [`MIN_CLUSTER_KEY_CHARS`] characters.
    pub fn new(text: &str) -> Result<Self, String> {
        if text.chars().count() < MIN_CLUSTER_KEY_CHARS {
            return Err(format!(
                "must be at least {MIN_CLUSTER_KEY_CHARS} characters (e.g. `openssl rand -hex 32`)"
            ));
        }
        Ok(Self(text.as_bytes().to_vec()))
    }

    /// The secret's bytes.
    pub fn secret(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Limits while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Each node enforces the limits on its own (up to N× in total).
    Open,
    /// Each node assumes every other live node admitted as much as it did.
    Closed,
}

/// `[store]`: the reputation snapshot and its delta feed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSettings {
    /// The snapshot file; applied deltas are written back to it.
    pub path: PathBuf,
    /// Where deltas come from.
    pub feed: Option<FeedSource>,
    /// How often the feed is polled and the file checked for replacement.
    pub poll_interval: Duration,
    /// PEM CA bundle for an https feed (system roots when `None`).
    pub feed_ca: Option<PathBuf>,
    /// The key every feed delta must be signed with; `None` only with
    /// `store.feed_unsigned = true` (or without a feed).
    pub feed_public_key: Option<PublicKey>,
    /// Environment variable whose value is sent as `Authorization` to a URL
    /// feed. The name, not the value: the value stays out of the config
    /// (and so out of anything that prints it).
    pub feed_auth_env: Option<String>,
    /// Largest feed body read; past it the fetch fails.
    pub feed_max_bytes: usize,
}

/// A delta feed.
#[derive(Clone, PartialEq)]
pub enum FeedSource {
    /// A local file, re-read when it changes.
    File(PathBuf),
    /// An http:// or https:// URL, fetched with `If-None-Match`.
    Url(http::Uri),
}

// By hand: a feed URL's query may hold a publisher's token.
impl std::fmt::Debug for FeedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Url(u) => f.debug_tuple("Url").field(&crate::feed::shown(u)).finish(),
        }
    }
}

/// `[state]`: where learned state survives restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSettings {
    /// Directory for the write-ahead log and its snapshot.
    pub data_dir: PathBuf,
    /// Most clients kept.
    pub max_entries: usize,
}

/// `[watchdog]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogSettings {
    /// How often the live task count is sampled.
    pub interval: Duration,
    /// Growth, sites and cooldown rules.
    pub rules: WatchdogConfig,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Client listener.
    pub listen: SocketAddr,
    /// The listener's accept queue length, as asked of `listen(2)` (the
    /// kernel caps it at `net.core.somaxconn`).
    pub backlog: u32,
    /// Whole-header deadline.
    pub header_read_timeout: Duration,
    /// Write progress deadline.
    pub write_timeout: Duration,
    /// Keep-alive idle limit.
    pub idle_timeout: Duration,
    /// Longest gap between request body chunks.
    pub body_read_timeout: Duration,
    /// Minimum average request body rate, bytes/s (0 = off).
    pub body_min_rate: u64,
    /// When the body rate starts to be checked.
    pub body_rate_grace: Duration,
    /// Largest request body in bytes (0 = no limit).
    pub max_body_size: u64,
    /// Slowest a client may read a response, bytes/s over each
    /// `write_timeout` spent waiting on it (0 = off).
    pub response_min_rate: u64,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Most header fields.
    pub max_headers: usize,
    /// HTTP/2 concurrent streams.
    pub h2_max_concurrent_streams: u32,
    /// After SIGTERM, how long the proxy goes on accepting and serving
    /// while `/readyz` answers 503 (zero: stop accepting at once).
    pub drain_delay: Duration,
    /// Drain limit on shutdown.
    pub shutdown_grace: Duration,
    /// Connections start with a PROXY protocol header (v1 or v2) from a
    /// trusted proxy.
    pub proxy_protocol: bool,
    /// Maintenance mode: every connection gets this page with a 503.
    pub maintenance_page: Option<MaintenancePage>,
    /// An upgraded connection (WebSocket) with no bytes either way for this
    /// long is closed.
    pub tunnel_idle_timeout: Duration,
    /// The header the connection's JA4 is passed to the upstream in; any
    /// copy a client sent is removed whether or not one is written.
    pub tls_fingerprint_header: Option<http::HeaderName>,
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Response head timeout.
    pub response_timeout: Duration,
    /// Pool idle timeout.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per upstream.
    pub pool_max_idle: usize,
    /// Open connections per upstream, busy or idle; past it, 503.
    pub max_connections: usize,
    /// TLS to `https://` upstreams; `None` when every upstream is `http://`
    /// and no `tls_*` key is set.
    pub tls: Option<UpstreamTls>,
}

/// The name of the pool `server.upstreams` makes, and where requests go
/// that no route sends elsewhere.
pub const DEFAULT_POOL: &str = "default";

/// An upstream pool: `[[upstreams]]`, or `server.upstreams` (the pool named
/// [`DEFAULT_POOL`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Its name, for routes' `upstream` key, metrics and the admin API.
    pub name: String,
    /// Its members, in the order written.
    pub members: Vec<MemberConfig>,
    /// Active health checks of each member; `None`: members are never
    /// checked (only the breaker takes them out).
    pub health_check: Option<HealthCheckConfig>,
}

/// One member of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberConfig {
    /// `http://host:port` or `https://host:port`.
    pub url: Uri,
    /// Its share of the pool's requests, relative to the other members'.
    pub weight: NonZeroU32,
}

/// Largest member weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// `health_check = { ... }` of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Path (and query) asked with `GET`.
    pub path: http::uri::PathAndQuery,
    /// Time from the start of one check to the start of the next.
    pub interval: Duration,
    /// A check with no whole answer by then fails.
    pub timeout: Duration,
    /// The status a healthy member answers.
    pub expect_status: http::StatusCode,
    /// Successes in a row that bring a down member back.
    pub rise: NonZeroU32,
    /// Failures in a row that take an up member out.
    pub fall: NonZeroU32,
}

impl Config {
    /// Every pool member's URL (a member of several pools once per pool).
    pub fn upstream_urls(&self) -> impl Iterator<Item = &Uri> {
        self.pools.iter().flat_map(|p| p.members.iter().map(|m| &m.url))
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Admin listener.
    pub listen: SocketAddr,
    /// A second listener that serves only `GET metrics_path`, without
    /// token, for Prometheus (`None`: metrics only on the admin listener).
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token for changes; `None` refuses changes.
    pub token: Option<Secret>,
    /// Prometheus endpoint path.
    pub metrics_path: String,
    /// Deadline for a request head, from its first byte.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Most open admin connections; past it the oldest idle one gives way.
    pub max_connections: usize,
    /// Failed token checks per address per minute before it gets 429.
    pub max_auth_failures: u32,
    /// `Host` names accepted besides IP literals and `localhost`
    /// (lowercase, without port).
    pub allowed_hosts: Vec<String>,
}

/// Shortest admin token accepted, from the file or the environment.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Refuses an admin token too short to resist guessing.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 16`)"
        ));
    }
    Ok(())
}

/// Command-line values that win over the file.
#[derive(Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--admin`.
    pub admin: Option<SocketAddr>,
    /// `--upstream` (repeatable); replaces the file's list.
    pub upstreams: Vec<String>,
    /// `--rate-limit`: per-client requests/s (moves burst, window and flood
    /// threshold defaults along with it).
    pub rate_limit: Option<NonZeroU32>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--redis`: cluster mode through this Redis.
    pub redis: Option<String>,
    /// `PALISADE_CLUSTER_KEY` (see [`Self::with_env`]); wins over
    /// `cluster.key`.
    pub cluster_key: Option<String>,
}

// By hand, destructured: the Redis URL and the cluster key are secrets.
impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            listen,
            admin,
            upstreams,
            rate_limit,
            tls_cert,
            tls_key,
            redis,
            cluster_key,
        } = self;
        f.debug_struct("Overrides")
            .field("listen", listen)
            .field("admin", admin)
            .field("upstreams", upstreams)
            .field("rate_limit", rate_limit)
            .field("tls_cert", tls_cert)
            .field("tls_key", tls_key)
            .field("redis", &redis.as_deref().map(redact_url))
            .field("cluster_key", &cluster_key.as_ref().map(|_| Secret::new("")))
            .finish()
    }
}

impl Overrides {
    /// Adds what the environment says: `PALISADE_CLUSTER_KEY`.
    #[must_use]
    pub fn with_env(mut self) -> Self {
        self.cluster_key = std::env::var("PALISADE_CLUSTER_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        self
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let src = FileError::read(path)?;
        Self::parse(&src, &path.display().to_string(), overrides)
    }

    /// The built-in quickstart config.
    pub fn quickstart(overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::parse(QUICKSTART, "<quickstart>", overrides)
    }

    /// Validates config text; `file` names it in errors.
    pub fn parse(src: &str, file: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let fail = |located| ConfigError::File(FileError::invalid(file, located));
        let mut raw: RawConfig = toml::from_str(src).map_err(|e| fail(raw::toml_error(src, &e)))?;
        for u in &overrides.upstreams {
            upstream_uri(u).map_err(|message| ConfigError::Override {
                flag: "--upstream",
                message,
            })?;
        }
        raw.apply(overrides);
        // Relative certificate paths in a file are relative to that file.
        let base = Path::new(file)
            .parent()
            .filter(|p| p.is_dir())
            .map(Path::to_path_buf);
        raw.validate(base.as_deref())
            .map_err(|invalid| fail(raw::locate(src, invalid)))
    }
}

// ---------------------------------------------------------------------------
// Raw serde structs: exactly the file's shape.

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    upstreams: Vec<RawPool>,
    admin: RawAdmin,
    clients: RawClients,
    rate_limit: RawRateLimit,
    reputation: RawReputation,
    breaker: RawBreaker,
    adaptive_breaker: RawAdaptive,
    tls: RawTls,
    connections: RawConnections,
    watchdog: RawWatchdog,
    store: RawStore,
    state: RawState,
    cluster: RawCluster,
    syn: RawSyn,
    access_log: RawAccessLog,
    challenge: RawChallenge,
    routes: Vec<RawRoute>,
    /// `PALISADE_CLUSTER_KEY`, never read from the file.
    #[serde(skip)]
    env_cluster_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSyn {
    enabled: bool,
    firewall: String,
    ban_duration: String,
    global_threshold: u64,
    source_threshold: u64,
    poll_interval: String,
    syncookies_ratio: f64,
    syncookies_after: String,
    reputation_penalty: u8,
    synproxy_ports: Vec<u16>,
    reconcile_interval: String,
    xdp: String,
    never_ban: Vec<String>,
    never_ban_loopback: bool,
    max_ban_duration: String,
    min_prefix_v4: u8,
    min_prefix_v6: u8,
    ban_budget: u32,
}

impl Default for RawSyn {
    fn default() -> Self {
        Self {
            enabled: true,
            firewall: "auto".into(),
            ban_duration: "10m".into(),
            global_threshold: 1000,
            source_threshold: 500,
            poll_interval: "200ms".into(),
            syncookies_ratio: 0.85,
            syncookies_after: "5m".into(),
            reputation_penalty: 30,
            synproxy_ports: Vec::new(),
            reconcile_interval: "10s".into(),
            xdp: "auto".into(),
            never_ban: Vec::new(),
            never_ban_loopback: true,
            max_ban_duration: "24h".into(),
            min_prefix_v4: 16,
            min_prefix_v6: 32,
            ban_budget: 20,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawCluster {
    redis: String,
    redis_cluster: bool,
    sync_interval: String,
    node_name: String,
    failure_mode: String,
    key_prefix: String,
    redis_ca: String,
    key: String,
    insecure: bool,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            redis: String::new(),
            redis_cluster: false,
            sync_interval: "50ms".into(),
            node_name: String::new(),
            failure_mode: "open".into(),
            key_prefix: "palisade".into(),
            redis_ca: String::new(),
            key: String::new(),
            insecure: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawStore {
    path: String,
    feed: String,
    poll_interval: String,
    feed_ca: String,
    feed_public_key: String,
    feed_unsigned: bool,
    feed_allow_http: bool,
    feed_auth_env: String,
    feed_max_bytes: usize,
}

/// Default `store.feed_max_bytes`: 64 MiB, a delta of about two million
/// operations.
pub const FEED_MAX_BYTES: usize = 64 << 20;

impl Default for RawStore {
    fn default() -> Self {
        Self {
            path: String::new(),
            feed: String::new(),
            poll_interval: "10s".into(),
            feed_ca: String::new(),
            feed_public_key: String::new(),
            feed_unsigned: false,
            feed_allow_http: false,
            feed_auth_env: String::new(),
            feed_max_bytes: FEED_MAX_BYTES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawChallenge {
    secret_file: String,
    clearance_ttl: String,
    token_ttl: String,
    key_rotation: String,
    difficulty: u8,
    max_difficulty: u8,
    attack_rps: u32,
    issue_penalty: u8,
    fail_penalty: u8,
    cookie_penalty: u8,
}

impl Default for RawChallenge {
    fn default() -> Self {
        Self {
            secret_file: String::new(),
            clearance_ttl: "1h".into(),
            token_ttl: "5m".into(),
            key_rotation: "24h".into(),
            difficulty: 16,
            max_difficulty: 22,
            attack_rps: 500,
            issue_penalty: 1,
            fail_penalty: 5,
            cookie_penalty: 5,
        }
    }
}

/// Shortest `challenge.secret_file` content accepted, in bytes.
pub const MIN_CHALLENGE_SECRET: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAccessLog {
    enabled: bool,
    format: String,
    path: String,
    refusal_budget: u32,
}

impl Default for RawAccessLog {
    fn default() -> Self {
        Self {
            enabled: false,
            format: "combined".into(),
            path: "stderr".into(),
            refusal_budget: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawState {
    data_dir: String,
    max_entries: usize,
}

impl Default for RawState {
    fn default() -> Self {
        Self {
            data_dir: String::new(),
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawWatchdog {
    enabled: bool,
    interval: String,
    growth_per_minute: f64,
    min_tasks: u64,
    cooldown: String,
}

impl Default for RawWatchdog {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: "5s".into(),
            growth_per_minute: 0.10,
            min_tasks: 100,
            cooldown: "10m".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    handshake_timeout: String,
    certificates: Vec<RawNamedCert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamedCert {
    names: Vec<String>,
    cert: String,
    key: String,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            cert: String::new(),
            key: String::new(),
            handshake_timeout: "5s".into(),
            certificates: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawServer {
    listen: String,
    backlog: u32,
    upstreams: Vec<String>,
    header_read_timeout: String,
    write_timeout: String,
    idle_timeout: String,
    body_read_timeout: String,
    body_min_rate: u64,
    body_rate_grace: String,
    max_body_size: u64,
    response_min_rate: u64,
    max_header_bytes: usize,
    max_headers: usize,
    h2_max_concurrent_streams: u32,
    drain_delay: String,
    shutdown_grace: String,
    proxy_protocol: bool,
    maintenance_page: String,
    tunnel_idle_timeout: String,
    tls_fingerprint_header: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            backlog: 4096,
            upstreams: Vec::new(),
            header_read_timeout: "5s".into(),
            write_timeout: "10s".into(),
            idle_timeout: "30s".into(),
            body_read_timeout: "10s".into(),
            body_min_rate: 1024,
            body_rate_grace: "5s".into(),
            max_body_size: 8 * 1024 * 1024,
            response_min_rate: 1024,
            max_header_bytes: 65536,
            max_headers: 100,
            h2_max_concurrent_streams: 128,
            drain_delay: "5s".into(),
            shutdown_grace: "10s".into(),
            proxy_protocol: false,
            maintenance_page: String::new(),
            tunnel_idle_timeout: "10m".into(),
            tls_fingerprint_header: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawUpstream {
    connect_timeout: String,
    response_timeout: String,
    pool_idle_timeout: String,
    pool_max_idle: usize,
    max_connections: usize,
    tls_server_name: String,
    tls_ca: String,
    tls_client_cert: String,
    tls_client_key: String,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            connect_timeout: "2s".into(),
            response_timeout: "30s".into(),
            pool_idle_timeout: "90s".into(),
            pool_max_idle: 256,
            max_connections: 1024,
            tls_server_name: String::new(),
            tls_ca: String::new(),
            tls_client_cert: String::new(),
            tls_client_key: String::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawPool {
    name: String,
    members: Vec<RawMember>,
    health_check: Option<RawHealthCheck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    url: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawHealthCheck {
    path: String,
    interval: String,
    timeout: String,
    expect_status: u16,
    rise: u32,
    fall: u32,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        Self {
            path: "/".into(),
            interval: "5s".into(),
            timeout: "1s".into(),
            expect_status: 200,
            rise: 2,
            fall: 3,
        }
    }
}

impl RawHealthCheck {
    fn validate(&self, i: usize) -> Result<HealthCheckConfig, Invalid> {
        let key = |k: &'static str| p!("upstreams", i, "health_check", k).to_vec();
        let path = match self.path.parse::<http::uri::PathAndQuery>() {
            Ok(pq) if self.path.starts_with('/') => pq,
            _ => {
                return Err(at(
                    &key("path"),
                    format!("{:?}: a path starting with '/'", self.path),
                ));
            }
        };
        let interval = positive(duration(&self.interval, &key("interval"))?, &key("interval"))?;
        let timeout = positive(duration(&self.timeout, &key("timeout"))?, &key("timeout"))?;
        // One check at a time per member: a longer timeout would stretch
        // the interval.
        if timeout > interval {
            return Err(at(&key("timeout"), "must not exceed health_check.interval"));
        }
        let expect_status = match http::StatusCode::from_u16(self.expect_status) {
            Ok(s) if (200..600).contains(&self.expect_status) => s,
            _ => return Err(at(&key("expect_status"), "must be a status between 200 and 599")),
        };
        let count = |n: u32, k: &'static str| match NonZeroU32::new(n) {
            Some(n) if n.get() <= 100 => Ok(n),
            _ => Err(at(&key(k), "must be between 1 and 100")),
        };
        Ok(HealthCheckConfig {
            path,
            interval,
            timeout,
            expect_status,
            rise: count(self.rise, "rise")?,
            fall: count(self.fall, "fall")?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    metrics_listen: String,
    token: String,
    metrics_path: String,
    header_read_timeout: String,
    idle_timeout: String,
    max_connections: usize,
    max_auth_failures: u32,
    allowed_hosts: Vec<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            metrics_listen: String::new(),
            token: String::new(),
            metrics_path: "/metrics".into(),
            header_read_timeout: "5s".into(),
            idle_timeout: "60s".into(),
            max_connections: 64,
            max_auth_failures: 10,
            allowed_hosts: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Raw → typed.

impl RawConfig {
    fn apply(&mut self, o: &Overrides) {
        if let Some(listen) = o.listen {
            self.server.listen = listen.to_string();
        }
        if let Some(admin) = o.admin {
            self.admin.listen = admin.to_string();
        }
        if !o.upstreams.is_empty() {
            // `--upstream` is the default pool, wherever the file wrote it.
            self.server.upstreams = o.upstreams.clone();
            self.upstreams.retain(|p| p.name.trim() != DEFAULT_POOL);
        }
        if let Some(rate) = o.rate_limit {
            self.rate_limit.rate = raw::RawRate::per_second(rate.get());
        }
        if let Some(cert) = &o.tls_cert {
            self.tls.cert = cert.display().to_string();
        }
        if let Some(key) = &o.tls_key {
            self.tls.key = key.display().to_string();
        }
        if let Some(redis) = &o.redis {
            self.cluster.redis.clone_from(redis);
        }
        self.env_cluster_key.clone_from(&o.cluster_key);
    }

    fn sections(&self) -> raw::Sections<'_> {
        raw::Sections {
            clients: &self.clients,
            rate_limit: &self.rate_limit,
            reputation: &self.reputation,
            breaker: &self.breaker,
            adaptive_breaker: &self.adaptive_breaker,
            connections: &self.connections,
            routes: &self.routes,
        }
    }

    fn tls(&self, base: Option<&Path>) -> Result<Option<TlsConfig>, Invalid> {
        let t = &self.tls;
        match (t.cert.is_empty(), t.key.is_empty()) {
            (true, true) if t.certificates.is_empty() => return Ok(None),
            (true, true) => {
                return Err(at(
                    p!("tls", "certificates"),
                    "tls.certificates is set: tls.cert and tls.key, the certificate for clients \
                     that send no or an unknown server name, are needed too",
                ));
            }
            (false, true) => {
                return Err(at(
                    p!("tls", "key"),
                    "tls.cert is set: the private key is needed too",
                ));
            }
            (true, false) => {
                return Err(at(
                    p!("tls", "cert"),
                    "tls.key is set: the certificate is needed too",
                ));
            }
            (false, false) => {}
        }
        let (cert, key) = (resolve(base, &t.cert), resolve(base, &t.key));
        let named: Vec<crate::tls::Named> = t
            .certificates
            .iter()
            .map(|n| crate::tls::Named {
                names: n.names.clone(),
                cert: resolve(base, &n.cert),
                key: resolve(base, &n.key),
            })
            .collect();
        let (acceptor, certificates) =
            crate::tls::acceptor_by_name(&cert, &key, &named).map_err(|e| match e.named {
                None => at(p!("tls", "cert"), e.message),
                Some(i) => at(p!("tls", "certificates", i, "cert"), e.message),
            })?;
        Ok(Some(TlsConfig {
            handshake_timeout: duration(&t.handshake_timeout, p!("tls", "handshake_timeout"))?,
            cert,
            key,
            named: named.into_iter().map(|n| (n.cert, n.key)).collect(),
            acceptor,
            certificates,
        }))
    }

    fn upstream_tls(&self, upstreams: &[Uri], base: Option<&Path>) -> Result<Option<UpstreamTls>, Invalid> {
        use crate::upstream_tls::Key;
        let u = &self.upstream;
        let https = upstreams
            .iter()
            .filter_map(crate::connector::wire)
            .any(|(scheme, _)| scheme == http::uri::Scheme::HTTPS);
        let keys = [
            &u.tls_server_name,
            &u.tls_ca,
            &u.tls_client_cert,
            &u.tls_client_key,
        ];
        if !https && keys.iter().all(|k| k.is_empty()) {
            return Ok(None);
        }
        let server_name = match u.tls_server_name.as_str() {
            "" => None,
            name => Some(
                crate::upstream_tls::server_name(name)
                    .map_err(|m| at(p!("upstream", "tls_server_name"), m))?,
            ),
        };
        let client_cert = match (u.tls_client_cert.as_str(), u.tls_client_key.as_str()) {
            ("", "") => None,
            (_, "") => {
                return Err(at(
                    p!("upstream", "tls_client_cert"),
                    "upstream.tls_client_cert is set: upstream.tls_client_key is needed too",
                ));
            }
            ("", _) => {
                return Err(at(
                    p!("upstream", "tls_client_key"),
                    "upstream.tls_client_key is set: upstream.tls_client_cert is needed too",
                ));
            }
            (cert, key) => Some((resolve(base, cert), resolve(base, key))),
        };
        let ca = (!u.tls_ca.is_empty()).then(|| resolve(base, &u.tls_ca));
        let system_roots = ca.is_none();
        crate::upstream_tls::load(server_name, ca, client_cert)
            .map(Some)
            .map_err(|(key, m)| match key {
                // Without upstream.tls_ca the roots are the system's: the
                // error is about the upstreams that need them.
                Key::Ca if system_roots => at(p!("server", "upstreams"), m),
                Key::Ca => at(p!("upstream", "tls_ca"), m),
                Key::ClientCert => at(p!("upstream", "tls_client_cert"), m),
                Key::ClientKey => at(p!("upstream", "tls_client_key"), m),
            })
    }

    fn validate(self, base: Option<&Path>) -> Result<Config, Invalid> {
        let s = &self.server;
        let server = ServerConfig {
            listen: addr(&s.listen, p!("server", "listen"))?,
            header_read_timeout: duration(&s.header_read_timeout, p!("server", "header_read_timeout"))?,
            write_timeout: duration(&s.write_timeout, p!("server", "write_timeout"))?,
            idle_timeout: duration(&s.idle_timeout, p!("server", "idle_timeout"))?,
            body_read_timeout: duration(&s.body_read_timeout, p!("server", "body_read_timeout"))?,
            body_min_rate: s.body_min_rate,
            body_rate_grace: duration(&s.body_rate_grace, p!("server", "body_rate_grace"))?,
            max_body_size: s.max_body_size,
            response_min_rate: s.response_min_rate,
            max_header_bytes: match s.max_header_bytes {
                n @ 8192..=1_048_576 => n,
                _ => {
                    return Err(at(
                        p!("server", "max_header_bytes"),
                        "must be between 8192 and 1048576",
                    ));
                }
            },
            max_headers: match s.max_headers {
                n @ 1..=1000 => n,
                _ => {
                    return Err(at(p!("server", "max_headers"), "must be between 1 and 1000"));
                }
            },
            backlog: match s.backlog {
                n @ 1..=65535 => n,
                _ => return Err(at(p!("server", "backlog"), "must be between 1 and 65535")),
            },
            h2_max_concurrent_streams: match s.h2_max_concurrent_streams {
                0 => return Err(at(p!("server", "h2_max_concurrent_streams"), "must be > 0")),
                n => n,
            },
            drain_delay: parse_duration(&s.drain_delay).map_err(|m| at(p!("server", "drain_delay"), m))?,
            shutdown_grace: duration(&s.shutdown_grace, p!("server", "shutdown_grace"))?,
            proxy_protocol: s.proxy_protocol,
            tunnel_idle_timeout: duration(&s.tunnel_idle_timeout, p!("server", "tunnel_idle_timeout"))?,
            tls_fingerprint_header: match s.tls_fingerprint_header.trim() {
                "" => None,
                name => Some(
                    crate::forward::own_header(name)
                        .map_err(|m| at(p!("server", "tls_fingerprint_header"), m))?,
                ),
            },
            maintenance_page: match s.maintenance_page.as_str() {
                "" => None,
                page => {
                    let path = resolve(base, page);
                    Some(MaintenancePage::open(&path).map_err(|m| at(p!("server", "maintenance_page"), m))?)
                }
            },
        };
        let pools = self.pools()?;
        let urls: Vec<Uri> = pools
            .iter()
            .flat_map(|p| p.members.iter().map(|m| m.url.clone()))
            .collect();
        let u = &self.upstream;
        let upstream = UpstreamConfig {
            connect_timeout: duration(&u.connect_timeout, p!("upstream", "connect_timeout"))?,
            response_timeout: duration(&u.response_timeout, p!("upstream", "response_timeout"))?,
            pool_idle_timeout: duration(&u.pool_idle_timeout, p!("upstream", "pool_idle_timeout"))?,
            pool_max_idle: u.pool_max_idle,
            max_connections: match u.max_connections {
                0 => return Err(at(p!("upstream", "max_connections"), "must be > 0")),
                n => n,
            },
            tls: self.upstream_tls(&urls, base)?,
        };
        let a = &self.admin;
        let admin_listen = addr(&a.listen, p!("admin", "listen"))?;
        let metrics_listen = match a.metrics_listen.trim() {
            "" => None,
            text => {
                let m = addr(text, p!("admin", "metrics_listen"))?;
                // Port 0 picks a free port each time, so only a fixed port clashes.
                for (taken, key) in [(admin_listen, "admin.listen"), (server.listen, "server.listen")] {
                    if m.port() != 0 && m == taken {
                        return Err(at(
                            p!("admin", "metrics_listen"),
                            format!("{m} is also {key}: give the metrics a port of their own"),
                        ));
                    }
                }
                Some(m)
            }
        };
        let admin = AdminConfig {
            listen: admin_listen,
            metrics_listen,
            token: if a.token.is_empty() {
                None
            } else {
                check_token(&a.token).map_err(|m| at(p!("admin", "token"), m))?;
                Some(Secret::new(a.token.clone()))
            },
            metrics_path: if a.metrics_path.starts_with('/') {
                a.metrics_path.clone()
            } else {
                return Err(at(p!("admin", "metrics_path"), "must start with '/'"));
            },
            header_read_timeout: positive(
                duration(&a.header_read_timeout, p!("admin", "header_read_timeout"))?,
                p!("admin", "header_read_timeout"),
            )?,
            idle_timeout: positive(
                duration(&a.idle_timeout, p!("admin", "idle_timeout"))?,
                p!("admin", "idle_timeout"),
            )?,
            max_connections: match a.max_connections {
                1..=100_000 => a.max_connections,
                _ => return Err(at(p!("admin", "max_connections"), "must be between 1 and 100000")),
            },
            max_auth_failures: match a.max_auth_failures {
                1..=1_000_000 => a.max_auth_failures,
                _ => {
                    return Err(at(
                        p!("admin", "max_auth_failures"),
                        "must be between 1 and 1000000",
                    ));
                }
            },
            allowed_hosts: a
                .allowed_hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let h = h.trim().to_ascii_lowercase();
                    if h.is_empty() || h.contains([':', '/', ' ']) {
                        Err(at(
                            p!("admin", "allowed_hosts", i),
                            format!("{h:?} is not a host name (no port, no scheme)"),
                        ))
                    } else {
                        Ok(h)
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        // `server.proxy_protocol` is read with the rest of `[server]` above.
        let Protection {
            shield,
            breaker,
            connections,
            proxy_protocol: _,
        } = self.sections().validate()?;
        if server.proxy_protocol {
            raw::proxy_protocol_allowed(&shield)?;
        }
        let route_pools = self.route_pools(&pools)?;
        let tls = self.tls(base)?;
        let w = &self.watchdog;
        let watchdog = if w.enabled {
            if !(w.growth_per_minute.is_finite() && w.growth_per_minute > 0.0) {
                return Err(at(p!("watchdog", "growth_per_minute"), "must be a number > 0"));
            }
            Some(WatchdogSettings {
                interval: duration(&w.interval, p!("watchdog", "interval"))?,
                rules: WatchdogConfig {
                    growth_per_minute: w.growth_per_minute,
                    min_tasks: w.min_tasks,
                    cooldown: nanos(duration(&w.cooldown, p!("watchdog", "cooldown"))?),
                },
            })
        } else {
            None
        };
        let store = self.store(base)?;
        let cluster = self.cluster(base)?;
        let syn = self.syn()?;
        let access_log = self.access_log(base)?;
        let challenge = self.challenge(&shield, base)?;
        let state = match self.state.data_dir.as_str() {
            "" => None,
            dir => {
                if self.state.max_entries == 0 {
                    return Err(at(p!("state", "max_entries"), "must be > 0"));
                }
                Some(StateSettings {
                    data_dir: resolve(base, dir),
                    max_entries: self.state.max_entries,
                })
            }
        };
        Ok(Config {
            server,
            upstream,
            pools,
            route_pools,
            admin,
            shield,
            breaker,
            tls,
            connections,
            watchdog,
            store,
            state,
            cluster,
            syn,
            access_log,
            challenge,
        })
    }

    fn challenge(
        &self,
        shield: &ShieldConfig,
        base: Option<&Path>,
    ) -> Result<Option<ChallengeSettings>, Invalid> {
        let (initial, block_below) = shield
            .reputation
            .as_ref()
            .map_or((100, 0), |(r, _)| (r.initial, r.block_below));
        let mut routes = vec![RouteChallenge::default()];
        for (i, r) in self.routes.iter().enumerate() {
            let mode = match r.challenge.as_deref() {
                None => ChallengeMode::Off,
                Some(text) => ChallengeMode::parse(text).ok_or_else(|| {
                    at(
                        p!("routes", i, "challenge"),
                        format!("{text:?}: expected off, suspicious, under_attack or always"),
                    )
                })?,
            };
            let suspicious = matches!(mode, ChallengeMode::Suspicious | ChallengeMode::UnderAttack);
            if suspicious && shield.reputation.is_none() {
                return Err(at(
                    p!("routes", i, "challenge"),
                    "\"suspicious\" reads reputation scores: enable [reputation], or use \"always\"",
                ));
            }
            let below = match r.challenge_below {
                None => block_below + initial.saturating_sub(block_below).div_ceil(2),
                Some(b) if b > block_below && b <= initial => b,
                Some(b) => {
                    return Err(at(
                        p!("routes", i, "challenge_below"),
                        format!(
                            "{b}: must lie above reputation.block_below ({block_below}) and at most reputation.initial ({initial})"
                        ),
                    ));
                }
            };
            routes.push(RouteChallenge {
                mode,
                below,
                api: r.api,
            });
        }
        if routes.iter().all(|r| r.mode == ChallengeMode::Off) {
            return Ok(None);
        }
        let c = &self.challenge;
        let clearance_ttl = positive(
            duration(&c.clearance_ttl, p!("challenge", "clearance_ttl"))?,
            p!("challenge", "clearance_ttl"),
        )?;
        let token_ttl = positive(
            duration(&c.token_ttl, p!("challenge", "token_ttl"))?,
            p!("challenge", "token_ttl"),
        )?;
        let key_rotation = duration(&c.key_rotation, p!("challenge", "key_rotation"))?;
        // A cookie or token signed just before a rotation must outlive it
        // under the previous key, and not a second one.
        if key_rotation < clearance_ttl.max(token_ttl) || key_rotation < Duration::from_secs(60) {
            return Err(at(
                p!("challenge", "key_rotation"),
                "must be at least 1m and at least challenge.clearance_ttl and challenge.token_ttl",
            ));
        }
        if !(1..=MAX_DIFFICULTY).contains(&c.difficulty) {
            return Err(at(
                p!("challenge", "difficulty"),
                format!("must be between 1 and {MAX_DIFFICULTY} (leading zero bits)"),
            ));
        }
        if !(c.difficulty..=MAX_DIFFICULTY).contains(&c.max_difficulty) {
            return Err(at(
                p!("challenge", "max_difficulty"),
                format!("must be between challenge.difficulty and {MAX_DIFFICULTY}"),
            ));
        }
        if c.attack_rps == 0 {
            return Err(at(p!("challenge", "attack_rps"), "must be > 0"));
        }
        let secret = match c.secret_file.as_str() {
            "" => None,
            file => Some(
                read_secret_file(&resolve(base, file)).map_err(|m| at(p!("challenge", "secret_file"), m))?,
            ),
        };
        Ok(Some(ChallengeSettings {
            secret,
            clearance_ttl,
            token_ttl,
            key_rotation,
            difficulty: c.difficulty,
            max_difficulty: c.max_difficulty,
            attack_rps: c.attack_rps,
            issue_penalty: c.issue_penalty.min(100),
            fail_penalty: c.fail_penalty.min(100),
            cookie_penalty: c.cookie_penalty.min(100),
            routes,
            block_below,
        }))
    }

    /// `server.upstreams` (the default pool) and `[[upstreams]]`; the
    /// default pool first.
    fn pools(&self) -> Result<Vec<PoolConfig>, Invalid> {
        let mut pools = Vec::with_capacity(self.upstreams.len() + 1);
        if !self.server.upstreams.is_empty() {
            pools.push(PoolConfig {
                name: DEFAULT_POOL.to_owned(),
                members: self
                    .server
                    .upstreams
                    .iter()
                    .enumerate()
                    .map(|(i, u)| {
                        Ok(MemberConfig {
                            url: upstream_uri(u).map_err(|m| at(p!("server", "upstreams", i), m))?,
                            weight: NonZeroU32::MIN,
                        })
                    })
                    .collect::<Result<_, Invalid>>()?,
                health_check: None,
            });
        }
        for (i, raw) in self.upstreams.iter().enumerate() {
            let name = raw.name.trim();
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !valid_name {
                return Err(at(
                    p!("upstreams", i, "name"),
                    "required: 1-64 characters from [A-Za-z0-9_.-]",
                ));
            }
            if pools.iter().any(|p: &PoolConfig| p.name == name) {
                let why = if name == DEFAULT_POOL && !self.server.upstreams.is_empty() {
                    "the pool named \"default\" is server.upstreams: write it in one place".to_owned()
                } else {
                    format!("pool name {name:?} is already used")
                };
                return Err(at(p!("upstreams", i, "name"), why));
            }
            if raw.members.is_empty() {
                return Err(at(
                    p!("upstreams", i, "members"),
                    "at least one member is required",
                ));
            }
            let mut members: Vec<MemberConfig> = Vec::with_capacity(raw.members.len());
            for (j, m) in raw.members.iter().enumerate() {
                let url = upstream_uri(&m.url).map_err(|e| at(p!("upstreams", i, "members", j, "url"), e))?;
                if members.iter().any(|earlier| earlier.url == url) {
                    return Err(at(
                        p!("upstreams", i, "members", j, "url"),
                        format!(
                            "{:?} is listed twice: give it a higher weight instead",
                            redact_url(&m.url)
                        ),
                    ));
                }
                let weight = match NonZeroU32::new(m.weight) {
                    Some(w) if w.get() <= MAX_WEIGHT => w,
                    _ => {
                        return Err(at(
                            p!("upstreams", i, "members", j, "weight"),
                            format!("must be between 1 and {MAX_WEIGHT}"),
                        ));
                    }
                };
                members.push(MemberConfig { url, weight });
            }
            let health_check = raw.health_check.as_ref().map(|h| h.validate(i)).transpose()?;
            // The default pool is first: requests no route claims go there.
            let pool = PoolConfig {
                name: name.to_owned(),
                members,
                health_check,
            };
            if name == DEFAULT_POOL {
                pools.insert(0, pool);
            } else {
                pools.push(pool);
            }
        }
        if pools.first().is_none_or(|p| p.name != DEFAULT_POOL) {
            return Err(at(
                p!("server", "upstreams"),
                "at least one upstream is required (here, or in an [[upstreams]] named \"default\")",
            ));
        }
        Ok(pools)
    }

    /// The pool of each route: its `upstream`, else the default pool.
    fn route_pools(&self, pools: &[PoolConfig]) -> Result<Vec<usize>, Invalid> {
        let mut route_pools = vec![0];
        for (i, route) in self.routes.iter().enumerate() {
            let pool = match route.upstream.as_deref() {
                None => 0,
                Some(name) => pools.iter().position(|p| p.name == name.trim()).ok_or_else(|| {
                    let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                    at(
                        p!("routes", i, "upstream"),
                        format!("no pool named {name:?} (the pools are {known:?})"),
                    )
                })?,
            };
            route_pools.push(pool);
        }
        Ok(route_pools)
    }

    fn access_log(&self, base: Option<&Path>) -> Result<Option<AccessLogSettings>, Invalid> {
        let a = &self.access_log;
        if !a.enabled {
            return Ok(None);
        }
        let format = match a.format.as_str() {
            "combined" => Format::Combined,
            "json" => Format::Json,
            other => {
                return Err(at(
                    p!("access_log", "format"),
                    format!("{other:?}: expected combined or json"),
                ));
            }
        };
        let destination = match a.path.as_str() {
            "" => return Err(at(p!("access_log", "path"), "a file, or \"stderr\"")),
            "stderr" => Destination::Stderr,
            path => Destination::File(resolve(base, path)),
        };
        Ok(Some(AccessLogSettings {
            format,
            destination,
            refusal_budget: a.refusal_budget,
        }))
    }

    fn syn(&self) -> Result<Option<SynSettings>, Invalid> {
        let y = &self.syn;
        if !y.enabled {
            return Ok(None);
        }
        let firewall = match y.firewall.as_str() {
            "auto" => FirewallChoice::Auto,
            "nftables" => FirewallChoice::Nftables,
            "iptables" => FirewallChoice::Iptables,
            "dry-run" => FirewallChoice::DryRun,
            other => {
                return Err(at(
                    p!("syn", "firewall"),
                    format!("{other:?}: expected auto, nftables, iptables or dry-run"),
                ));
            }
        };
        if y.global_threshold == 0 || y.source_threshold == 0 {
            return Err(at(p!("syn", "global_threshold"), "thresholds must be > 0"));
        }
        if !(y.syncookies_ratio > 0.0 && y.syncookies_ratio <= 1.0) {
            return Err(at(p!("syn", "syncookies_ratio"), "must be in (0, 1]"));
        }
        if y.min_prefix_v4 > 32 {
            return Err(at(p!("syn", "min_prefix_v4"), "must be between 0 and 32"));
        }
        if y.min_prefix_v6 > 128 {
            return Err(at(p!("syn", "min_prefix_v6"), "must be between 0 and 128"));
        }
        if y.ban_budget == 0 {
            return Err(at(p!("syn", "ban_budget"), "must be > 0"));
        }
        let never_ban = y
            .never_ban
            .iter()
            .map(|c| raw::cidr(c).map_err(|m| at(p!("syn", "never_ban"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        let ban_duration = duration(&y.ban_duration, p!("syn", "ban_duration"))?;
        let max_ban_duration = duration(&y.max_ban_duration, p!("syn", "max_ban_duration"))?;
        if ban_duration > max_ban_duration {
            return Err(at(
                p!("syn", "ban_duration"),
                "must not exceed syn.max_ban_duration",
            ));
        }
        Ok(Some(SynSettings {
            never_ban,
            never_ban_loopback: y.never_ban_loopback,
            max_ban_duration,
            min_prefix_v4: y.min_prefix_v4,
            min_prefix_v6: y.min_prefix_v6,
            ban_budget: y.ban_budget,
            firewall,
            ban_duration,
            global_threshold: y.global_threshold,
            source_threshold: y.source_threshold,
            poll_interval: duration(&y.poll_interval, p!("syn", "poll_interval"))?,
            syncookies_ratio: y.syncookies_ratio,
            syncookies_after: duration(&y.syncookies_after, p!("syn", "syncookies_after"))?,
            reputation_penalty: y.reputation_penalty.min(100),
            synproxy_ports: {
                if y.synproxy_ports.contains(&0) {
                    return Err(at(p!("syn", "synproxy_ports"), "ports are 1-65535"));
                }
                if !y.synproxy_ports.is_empty() && firewall == FirewallChoice::Iptables {
                    return Err(at(
                        p!("syn", "synproxy_ports"),
                        "SYNPROXY is set up through nftables",
                    ));
                }
                y.synproxy_ports.clone()
            },
            reconcile_interval: duration(&y.reconcile_interval, p!("syn", "reconcile_interval"))?,
            xdp: match y.xdp.as_str() {
                "auto" => true,
                "off" => false,
                other => {
                    return Err(at(
                        p!("syn", "xdp"),
                        format!("{other:?}: expected \"auto\" or \"off\""),
                    ));
                }
            },
        }))
    }

    fn cluster(&self, base: Option<&Path>) -> Result<Option<ClusterSettings>, Invalid> {
        let c = &self.cluster;
        if c.redis.trim().is_empty() {
            return Ok(None);
        }
        let redis: Vec<String> = c.redis.split(',').map(|u| u.trim().to_owned()).collect();
        for url in &redis {
            redis::parse_redis_url(url)
                .filter(|u| matches!(u.scheme(), "redis" | "rediss"))
                .ok_or_else(|| {
                    at(
                        p!("cluster", "redis"),
                        format!("{:?} is not a redis:// or rediss:// URL", redact_url(url)),
                    )
                })?;
        }
        if redis.len() > 1 && !c.redis_cluster {
            return Err(at(
                p!("cluster", "redis"),
                "several URLs are Redis Cluster seeds: set cluster.redis_cluster = true",
            ));
        }
        let sync_interval = duration(&c.sync_interval, p!("cluster", "sync_interval"))?;
        if !(Duration::from_millis(5)..=Duration::from_secs(1)).contains(&sync_interval) {
            return Err(at(p!("cluster", "sync_interval"), "must be between 5ms and 1s"));
        }
        let failure_mode = match c.failure_mode.as_str() {
            "open" => FailureMode::Open,
            "closed" => FailureMode::Closed,
            other => {
                return Err(at(
                    p!("cluster", "failure_mode"),
                    format!("{other:?}: expected \"open\" or \"closed\""),
                ));
            }
        };
        // Shared records longer than 1 KiB are deleted unread, and a node
        // name is in every one of its records.
        if c.node_name.len() > MAX_NODE_NAME_BYTES {
            return Err(at(
                p!("cluster", "node_name"),
                format!("at most {MAX_NODE_NAME_BYTES} bytes"),
            ));
        }
        if c.key_prefix.is_empty() || c.key_prefix.contains(['{', '}', ' ']) {
            return Err(at(
                p!("cluster", "key_prefix"),
                "must be non-empty, without braces or spaces",
            ));
        }
        let redis_ca = match c.redis_ca.as_str() {
            "" => None,
            ca => {
                let ca = resolve(base, ca);
                crate::feed::roots(Some(&ca)).map_err(|m| at(p!("cluster", "redis_ca"), m))?;
                Some(ca)
            }
        };
        let key = match (&self.env_cluster_key, c.key.as_str()) {
            (Some(env), _) => Some(
                ClusterKey::new(env)
                    .map_err(|m| at(p!("cluster", "key"), format!("PALISADE_CLUSTER_KEY {m}")))?,
            ),
            (None, "") => None,
            (None, text) => Some(ClusterKey::new(text).map_err(|m| at(p!("cluster", "key"), m))?),
        };
        if key.is_none() && !c.insecure {
            return Err(at(
                p!("cluster", "key"),
                "cluster mode needs a key to sign what the nodes share: set cluster.key or \
                 PALISADE_CLUSTER_KEY (at least 32 characters, the same on every node), or \
                 cluster.insecure = true to trust anyone who can write to Redis",
            ));
        }
        Ok(Some(ClusterSettings {
            key,
            redis_ca,
            redis,
            redis_cluster: c.redis_cluster,
            sync_interval,
            node_name: c.node_name.clone(),
            failure_mode,
            key_prefix: c.key_prefix.clone(),
        }))
    }

    fn store(&self, base: Option<&Path>) -> Result<Option<StoreSettings>, Invalid> {
        let s = &self.store;
        if s.path.is_empty() {
            if !s.feed.is_empty() {
                return Err(at(
                    p!("store", "feed"),
                    "a feed needs store.path (the snapshot it updates)",
                ));
            }
            return Ok(None);
        }
        let path = resolve(base, &s.path);
        let feed_public_key = match s.feed_public_key.as_str() {
            "" => None,
            key => Some(PublicKey::parse(key).map_err(|m| {
                at(
                    p!("store", "feed_public_key"),
                    format!("not an Ed25519 public key: {m}"),
                )
            })?),
        };
        // Checked now so that a bad (or, with a key, unsigned) file is a
        // config error with a line.
        palisade_store::Snapshot::open_trusted(&path, feed_public_key.as_ref())
            .map_err(|e| at(p!("store", "path"), e.to_string()))?;
        let feed = match s.feed.as_str() {
            "" => None,
            url if url.starts_with("http://") || url.starts_with("https://") => {
                let uri: http::Uri = url.parse().map_err(|e| {
                    at(
                        p!("store", "feed"),
                        format!("{:?} is not a URL: {e}", without_query(url)),
                    )
                })?;
                let Some(authority) = uri.authority() else {
                    return Err(at(
                        p!("store", "feed"),
                        format!("{:?} has no host", without_query(url)),
                    ));
                };
                if authority.as_str().contains('@') {
                    // The URL is logged and shown by the admin API.
                    return Err(at(
                        p!("store", "feed"),
                        "no credentials in the URL: put them in the environment variable named by store.feed_auth_env",
                    ));
                }
                if uri.scheme_str() == Some("http") && !s.feed_allow_http {
                    return Err(at(
                        p!("store", "feed"),
                        format!(
                            "{:?}: a plain http:// feed can be read and rewritten on the way; use https://, \
                             or set store.feed_allow_http = true",
                            without_query(url)
                        ),
                    ));
                }
                Some(FeedSource::Url(uri))
            }
            file if file.contains("://") => {
                return Err(at(p!("store", "feed"), "only http://, https:// or a file path"));
            }
            file => Some(FeedSource::File(resolve(base, file))),
        };
        let feed_ca = match s.feed_ca.as_str() {
            "" => None,
            ca => {
                let ca = resolve(base, ca);
                crate::feed::roots(Some(&ca)).map_err(|m| at(p!("store", "feed_ca"), m))?;
                Some(ca)
            }
        };
        if feed_public_key.is_some() && s.feed_unsigned {
            return Err(at(
                p!("store", "feed_unsigned"),
                "contradicts store.feed_public_key: remove one",
            ));
        }
        if feed.is_some() && feed_public_key.is_none() && !s.feed_unsigned {
            return Err(at(
                p!("store", "feed"),
                "a feed must be signed: set store.feed_public_key (see `palisade store keygen`), \
                 or accept unsigned deltas with store.feed_unsigned = true",
            ));
        }
        let feed_auth_env = match s.feed_auth_env.as_str() {
            "" => None,
            _ if !matches!(feed, Some(FeedSource::Url(_))) => {
                return Err(at(p!("store", "feed_auth_env"), "only for an http(s) feed"));
            }
            name => {
                crate::feed::auth_header(name).map_err(|m| at(p!("store", "feed_auth_env"), m))?;
                Some(name.to_owned())
            }
        };
        if s.feed_max_bytes == 0 {
            return Err(at(p!("store", "feed_max_bytes"), "must be > 0"));
        }
        Ok(Some(StoreSettings {
            path,
            feed,
            poll_interval: duration(&s.poll_interval, p!("store", "poll_interval"))?,
            feed_ca,
            feed_public_key,
            feed_auth_env,
            feed_max_bytes: s.feed_max_bytes,
        }))
    }
}
/// A feed URL as errors show it: its query, where a publisher may have put
/// a token, cut to `?…` (as logs and the admin API show it).
fn without_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

/// The challenge's master secret: a file only its owner (and group) may
/// read, of at least [`MIN_CHALLENGE_SECRET`] bytes (surrounding
/// whitespace aside). A secret every user on the host can read lets any
/// of them mint clearances for every node of the cluster.
fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "{} is readable by every user on this host: chmod o-r it (e.g. chmod 600)",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = bytes.trim_ascii();
    if secret.len() < MIN_CHALLENGE_SECRET {
        return Err(format!(
            "{} holds {} bytes: at least {MIN_CHALLENGE_SECRET} are needed (e.g. `openssl rand -hex 32`)",
            path.display(),
            secret.len()
        ));
    }
    Ok(secret.to_vec())
}

/// A path from the config file, relative to the file's directory.
fn resolve(base: Option<&Path>, s: &str) -> PathBuf {
    match base {
        Some(dir) if Path::new(s).is_relative() => dir.join(s),
        _ => PathBuf::from(s),
    }
}

fn positive(d: Duration, path: &[Seg]) -> Result<Duration, Invalid> {
    if d.is_zero() {
        return Err(at(path, "must be more than 0s"));
    }
    Ok(d)
}

fn addr(s: &str, path: &[Seg]) -> Result<SocketAddr, Invalid> {
    s.parse().map_err(|_| {
        at(
            path,
            format!("{s:?} is not an address:port (e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"),
        )
    })
}

fn upstream_uri(s: &str) -> Result<Uri, String> {
    // Errors are printed and logged: never with credentials in them.
    let shown = redact_url(s);
    let uri: Uri = s.parse().map_err(|e| format!("{shown:?} is not a URL: {e}"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "{shown:?}: no credentials in an upstream URL (they are not sent, and the URL is logged)"
        ));
    }
    let Some((scheme, _)) = crate::connector::wire(&uri) else {
        return Err(format!(
            "{shown:?}: expected http://, https://, h2c:// or h2://host:port"
        ));
    };
    if uri.authority().is_none() {
        return Err(format!("{shown:?}: missing host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{shown:?}: a path or query on an upstream is not supported"
        ));
    }
    if scheme == http::uri::Scheme::HTTPS
        && let Some(host) = uri.host()
    {
        crate::upstream_tls::server_name(host).map_err(|m| format!("{shown:?}: {m}"))?;
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use palisade::config::raw::cidr;
    use palisade_core::Mode;
    use palisade_limits::breaker::BreakerConfig;
    use palisade_limits::rate::Period;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(src, "test.toml", &Overrides::default())
    }

    fn err(src: &str) -> String {
        parse(src).unwrap_err().to_string()
    }

    const MINIMAL: &str = "[server]\nupstreams = [\"http://127.0.0.1:8081\"]\n";

    #[test]
    fn quickstart_documents_the_defaults() {
        // Every value written in the reference file is the code default.
        let q = Config::quickstart(&Overrides::default()).unwrap();
        let d = parse(MINIMAL).unwrap();
        assert_eq!(q.server, d.server);
        assert_eq!(q.upstream, d.upstream);
        assert_eq!(q.admin, d.admin);
        assert_eq!(q.breaker, d.breaker);
        assert_eq!(q.connections, AdmissionConfig::default());
        assert_eq!(q.connections, d.connections);
        assert_eq!(q.watchdog, d.watchdog);
        assert_eq!(q.access_log, d.access_log);
        assert_eq!(q.watchdog.unwrap().rules, crate::tasks::WatchdogConfig::default());
        let b = q.breaker.unwrap();
        assert_eq!(b.rules, BreakerConfig::default());
        assert!(b.failure_statuses.contains(500) && b.failure_statuses.contains(599));
        assert!(!b.failure_statuses.contains(404));
        assert_eq!(format!("{:?}", q.shield), format!("{:?}", d.shield));
        assert_eq!(q.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(q.admin.listen.to_string(), "127.0.0.1:9090");
        let limit = q.shield.limit.unwrap();
        assert_eq!(limit.quota.rate.get(), 100);
        assert_eq!(limit.quota.burst.get(), 100);
        assert_eq!(q.shield.reputation.unwrap().0.flood_threshold, 200);
    }

    #[test]
    fn debug_output_shows_no_secret() {
        // Configs reach logs through `{:?}`; none of these may be in them.
        let token = "admin-token-0123456789abcdef";
        let file_key = "file-cluster-key-0123456789abcdef-0123";
        let env_key = "env-cluster-key-0123456789abcdef-01234";
        let file_redis_password = "file-redis-password-42";
        let flag_redis_password = "flag-redis-password-43";
        let feed_token = "feed-query-token-44";
        let dir = std::env::temp_dir().join(format!("palisade-config-debug-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = dir.join("rep.pstore");
        palisade_store::Builder::from_csv(&b"192.0.2.1,0,abuse,deny\n"[..], "t.csv")
            .unwrap()
            .finish(palisade_store::BuildOptions::default())
            .unwrap()
            .write_to(&store)
            .unwrap();
        let src = format!(
            "{MINIMAL}[admin]\ntoken = \"{token}\"\n\
             [cluster]\nredis = \"redis://palisade:{file_redis_password}@127.0.0.1:6379/0\"\n\
             key = \"{file_key}\"\n\
             [store]\npath = \"{}\"\nfeed = \"https://feeds.test/d?token={feed_token}\"\n\
             feed_unsigned = true\n",
            store.display()
        );
        let from_file = parse(&src).unwrap();
        let overrides = Overrides {
            redis: Some(format!("rediss://:{flag_redis_password}@redis.test:6380")),
            cluster_key: Some(env_key.into()),
            ..Default::default()
        };
        let from_flags = Config::parse(&src, "test.toml", &overrides).unwrap();
        let shown = format!("{from_file:?}\n{from_flags:?}\n{overrides:?}");
        std::fs::remove_dir_all(&dir).unwrap();
        for secret in [
            token,
            file_key,
            env_key,
            file_redis_password,
            flag_redis_password,
            feed_token,
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        // Still useful: where things are, just not the secrets.
        assert!(shown.contains("redis://<redacted>@127.0.0.1:6379/0"), "{shown}");
        assert!(shown.contains("rediss://<redacted>@redis.test:6380"), "{shown}");
        assert!(shown.contains("https://feeds.test/d?…"), "{shown}");
        assert_eq!(from_file.admin.token.as_ref().map(Secret::expose), Some(token));
        let key = |c: &Config| {
            c.cluster
                .as_ref()
                .unwrap()
                .key
                .as_ref()
                .unwrap()
                .secret()
                .to_vec()
        };
        assert_eq!(key(&from_flags), env_key.as_bytes());
    }

    #[test]
    fn errors_show_no_credentials_of_a_url() {
        // An upstream's user and password would be logged with the URL
        // (and are never sent): refused, and the refusal does not show them.
        let e = err("[server]\nupstreams = [\"http://user:upstream-secret@127.0.0.1:8081\"]\n");
        assert!(e.contains("no credentials in an upstream URL"), "{e}");
        assert!(!e.contains("upstream-secret"), "{e}");
        let o = Overrides {
            upstreams: vec!["ftp://user:flag-secret@x".into()],
            ..Default::default()
        };
        let e = Config::parse(MINIMAL, "t", &o).unwrap_err().to_string();
        assert!(!e.contains("flag-secret"), "{e}");
        // A feed URL's query is cut from the errors that show the URL.
        let dir = std::env::temp_dir().join(format!("palisade-config-feed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = dir.join("rep.pstore");
        palisade_store::Builder::from_csv(&b"192.0.2.1,0,abuse,deny\n"[..], "t.csv")
            .unwrap()
            .finish(palisade_store::BuildOptions::default())
            .unwrap()
            .write_to(&store)
            .unwrap();
        let e = err(&format!(
            "{MINIMAL}[store]\npath = \"{}\"\nfeed = \"http://feeds.test/d?token=feed-secret\"\nfeed_unsigned = true\n",
            store.display()
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.contains("plain http:// feed") && e.contains("http://feeds.test/d?…"),
            "{e}"
        );
        assert!(!e.contains("feed-secret"), "{e}");
    }

    #[test]
    fn redact_url_hides_only_the_userinfo() {
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("redis://u:p@h:1"), "redis://<redacted>@h:1");
        assert_eq!(redact_url("redis://:p@ss@h:1/0"), "redis://<redacted>@h:1/0");
        assert_eq!(redact_url("redis://h:1/a@b"), "redis://h:1/a@b");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn drain_delay_may_be_zero_but_needs_a_unit() {
        assert_eq!(parse(MINIMAL).unwrap().server.drain_delay, Duration::from_secs(5));
        let off = parse(&format!("{MINIMAL}drain_delay = \"0s\"\n")).unwrap();
        assert_eq!(off.server.drain_delay, Duration::ZERO);
        let e = err(&format!("{MINIMAL}drain_delay = \"5\"\n"));
        assert!(
            e.starts_with("test.toml:3:1: server.drain_delay: \"5\": unit must be"),
            "{e}"
        );
    }

    #[test]
    fn the_fingerprint_header_is_a_name_of_its_own() {
        assert_eq!(parse(MINIMAL).unwrap().server.tls_fingerprint_header, None);
        let on = parse(&format!("{MINIMAL}tls_fingerprint_header = \"X-JA4\"\n")).unwrap();
        assert_eq!(on.server.tls_fingerprint_header.unwrap().as_str(), "x-ja4");
        assert_eq!(
            err(&format!("{MINIMAL}tls_fingerprint_header = \"X JA4\"\n")),
            "test.toml:3:1: server.tls_fingerprint_header: \"X JA4\" is not a header name"
        );
        let e = err(&format!(
            "{MINIMAL}tls_fingerprint_header = \"X-Forwarded-For\"\n"
        ));
        assert!(
            e.starts_with(
                "test.toml:3:1: server.tls_fingerprint_header: \"X-Forwarded-For\" is a forwarding header"
            ),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}tls_fingerprint_header = \"Keep-Alive\"\n"));
        assert!(e.contains("is a hop-by-hop header"), "{e}");
    }

    #[test]
    fn the_breaker_fingerprint_is_user_agent_or_ja4() {
        use palisade_limits::shield::BreakerFingerprint;
        let d = parse(MINIMAL).unwrap();
        assert_eq!(d.shield.breaker_fingerprint, BreakerFingerprint::ClientUserAgent);
        let on = parse(&format!("{MINIMAL}[adaptive_breaker]\nfingerprint = \"ja4\"\n")).unwrap();
        assert_eq!(on.shield.breaker_fingerprint, BreakerFingerprint::Ja4);
        assert_eq!(
            err(&format!("{MINIMAL}[adaptive_breaker]\nfingerprint = \"tls\"\n")),
            "test.toml:4:1: adaptive_breaker.fingerprint: unknown fingerprint \"tls\"; expected \"user_agent\" or \"ja4\""
        );
    }

    #[test]
    fn rate_override_moves_derived_defaults() {
        let o = Overrides {
            rate_limit: NonZeroU32::new(10),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            upstreams: vec!["http://10.0.0.1:80".into()],
            ..Default::default()
        };
        let c = Config::parse(MINIMAL, "t", &o).unwrap();
        let q = c.shield.limit.unwrap().quota;
        assert_eq!((q.rate.get(), q.burst.get(), q.window_limit.get()), (10, 10, 10));
        assert_eq!(c.shield.reputation.unwrap().0.flood_threshold, 20);
        assert_eq!(c.server.listen.port(), 1);
        let bad = Overrides {
            upstreams: vec!["ftp://x".into()],
            ..Default::default()
        };
        let e = Config::parse(MINIMAL, "t", &bad).unwrap_err().to_string();
        assert!(e.starts_with("--upstream: \"ftp://x\": expected http://"), "{e}");
        assert_eq!(c.pools[0].members[0].url.to_string(), "http://10.0.0.1:80/");
    }

    #[test]
    fn type_errors_name_line_column_and_key() {
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n\n[rate_limit]\nrate = \"fast\"\n");
        assert!(e.starts_with("test.toml:5:8: rate_limit.rate: "), "{e}");
        let e = err("[rate_limit]\nrat = 5\n");
        assert!(
            e.starts_with("test.toml:2:1: rate_limit.rat: unknown field `rat`"),
            "{e}"
        );
        let e = err("[server\n");
        assert_eq!(e, "test.toml:1:8: unclosed table, expected `]`");
    }

    #[test]
    fn quotas_must_fit_a_client_record() {
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\nwindow_limit = 2000000\n");
        assert_eq!(
            e,
            "test.toml:4:1: rate_limit.window_limit: must be between 1 and 1000000"
        );
        let e = err(
            "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"x\"\nrate = 1\nburst = 20000\n",
        );
        assert_eq!(
            e,
            "test.toml:6:1: routes[0].burst: at most 14400 at this rate: the bucket must refill within 4 hours"
        );
        // An unset window limit follows a rate above its range, cut to it.
        let cfg = parse("[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\nrate = 5000000\n").unwrap();
        let q = cfg.shield.limit.unwrap().quota;
        assert_eq!((q.rate.get(), q.window_limit.get()), (5_000_000, 1_000_000));
    }

    #[test]
    fn rates_take_a_period() {
        let cfg = parse(
            "[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\nrate = \"1000/h\"\n\
             [[routes]]\nname = \"login\"\npath_prefix = \"/login\"\nrate = \"5/m\"\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nrate = 50\n\
             [[routes]]\nname = \"search\"\npath_prefix = \"/search\"\nburst = 10\n",
        )
        .unwrap();
        let q = cfg.shield.limit.unwrap().quota;
        assert_eq!(
            (q.rate.get(), q.per, q.burst.get(), q.window_limit.get()),
            (1000, Period::Hour, 1000, 1000)
        );
        // Twice the most admitted in a second, not twice 0.28 a second.
        assert_eq!(cfg.shield.reputation.unwrap().0.flood_threshold, 2000);
        let routes: Vec<_> = cfg.shield.routes.iter().map(|r| r.limit.unwrap().quota).collect();
        let login = routes[0];
        assert_eq!(
            (
                login.rate.get(),
                login.per,
                login.burst.get(),
                login.window_limit.get()
            ),
            (5, Period::Minute, 5, 5)
        );
        assert_eq!(login.emission_interval(), 12_000_000_000);
        // A bare number stays per second.
        assert_eq!((routes[1].rate.get(), routes[1].per), (50, Period::Second));
        // A route without a rate of its own takes the default's, period and all.
        assert_eq!(
            (routes[2].rate.get(), routes[2].per, routes[2].burst.get()),
            (1000, Period::Hour, 10)
        );
        for (src, per) in [
            ("\"100/s\"", Period::Second),
            ("\"100\"", Period::Second),
            ("\" 7 / minute \"", Period::Minute),
        ] {
            let cfg = parse(&format!(
                "[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\nrate = {src}\n"
            ))
            .unwrap();
            assert_eq!(cfg.shield.limit.unwrap().quota.per, per, "{src}");
        }
    }

    #[test]
    fn bad_rates_name_line_column_and_key() {
        let at = |rate: &str| {
            err(&format!(
                "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"x\"\n  rate = {rate}\n"
            ))
        };
        assert_eq!(
            at("\"5/x\""),
            "test.toml:5:10: routes[0].rate: \"5/x\": the period must be s, m or h (e.g. 100, \"100/s\", \"5/m\", \"1000/h\")"
        );
        assert_eq!(
            at("\"abc\""),
            "test.toml:5:10: routes[0].rate: \"abc\" is not a rate (e.g. 100, \"100/s\", \"5/m\", \"1000/h\")"
        );
        assert_eq!(
            at("\"0/m\""),
            "test.toml:5:3: routes[0].rate: must be between 1 and 10000000"
        );
        assert_eq!(
            at("-3"),
            "test.toml:5:10: routes[0].rate: must be between 1 and 10000000"
        );
        assert_eq!(
            at("1.5"),
            "test.toml:5:10: routes[0].rate: invalid type: floating point `1.5`, expected requests per second, or a string such as \"5/m\""
        );
        // The 4 hour refill cap counts the period: 1/h holds at most 4.
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\nrate = \"1/h\"\nburst = 5\n");
        assert_eq!(
            e,
            "test.toml:5:1: rate_limit.burst: at most 4 at this rate: the bucket must refill within 4 hours"
        );
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\nrate = \"10/m\"\nburst = 2401\n");
        assert!(e.contains("at most 2400 at this rate"), "{e}");
    }

    #[test]
    fn limits_take_a_key() {
        use palisade_limits::shield::LimitKey;
        let cfg = parse(
            "[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\nkey = \"cookie:session\"\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nkey = \"header:X-API-Key\"\n\
             [[routes]]\nname = \"dl\"\npath_prefix = \"/dl\"\nrate = 2\n\
             [[routes]]\nname = \"q\"\npath_prefix = \"/q\"\nkey = \"query:token\"\n\
             [[routes]]\nname = \"ua\"\npath_prefix = \"/ua\"\nkey = \"ip_user_agent\"\n\
             [[routes]]\nname = \"tls\"\npath_prefix = \"/tls\"\nkey = \"ja4\"\n",
        )
        .unwrap();
        assert_eq!(cfg.shield.limit_key, LimitKey::Cookie("session".into()));
        let keys: Vec<_> = cfg.shield.routes.iter().map(|r| r.key.clone()).collect();
        assert_eq!(
            keys,
            [
                LimitKey::Header("x-api-key".parse().unwrap()),
                // A route's own limit counts by the default's key unless it names one.
                LimitKey::Cookie("session".into()),
                LimitKey::Query("token".into()),
                LimitKey::IpUserAgent,
                LimitKey::Ja4,
            ]
        );
        // `key` alone gives a route a limit of its own, at the default's rate.
        assert_eq!(cfg.shield.routes[0].limit.unwrap().quota.rate.get(), 100);
        let at = |key: &str| {
            err(&format!(
                "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"x\"\nkey = {key}\n"
            ))
        };
        assert_eq!(
            at("\"token\""),
            "test.toml:5:1: routes[0].key: unknown key \"token\"; expected \"ip\", \"ip_user_agent\", \"ja4\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\""
        );
        assert_eq!(
            at("\"header:X API\""),
            "test.toml:5:1: routes[0].key: \"X API\" is not a header name"
        );
        assert_eq!(
            at("\"cookie:\""),
            "test.toml:5:1: routes[0].key: \"cookie:\": the name must be 1-128 printable characters"
        );
    }

    #[test]
    fn cluster_mode_needs_a_long_enough_key_or_says_insecure() {
        let base = "[server]\nupstreams = [\"http://a:1\"]\n[cluster]\nredis = \"redis://127.0.0.1:6379\"\n";
        let e = err(base);
        assert!(
            e.starts_with("test.toml:3:2: cluster.key: cluster mode needs a key"),
            "{e}"
        );
        let e = err(&format!("{base}key = \"short\"\n"));
        assert_eq!(
            e,
            "test.toml:5:1: cluster.key: must be at least 32 characters (e.g. `openssl rand -hex 32`)"
        );
        let long = "k".repeat(32);
        let c = parse(&format!("{base}key = \"{long}\"\n"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.key.as_ref().map(ClusterKey::secret), Some(long.as_bytes()));
        // Configs are printed: the key is not.
        assert!(!format!("{c:?}").contains(&long));
        let c = parse(&format!("{base}insecure = true\n"))
            .unwrap()
            .cluster
            .unwrap();
        assert!(c.key.is_none());
        // Every record carries the node name; past 1 KiB records are dropped.
        let name = "n".repeat(MAX_NODE_NAME_BYTES);
        parse(&format!("{base}insecure = true\nnode_name = \"{name}\"\n")).unwrap();
        let e = err(&format!("{base}insecure = true\nnode_name = \"{name}n\"\n"));
        assert!(e.contains("cluster.node_name: at most 255 bytes"), "{e}");
        // The environment wins over the file, and is checked too.
        let env = |k: &str| Overrides {
            cluster_key: Some(k.into()),
            ..Default::default()
        };
        let c = Config::parse(&format!("{base}key = \"{long}\"\n"), "t", &env(&"e".repeat(40)))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(
            c.key.as_ref().map(ClusterKey::secret),
            Some("e".repeat(40).as_bytes())
        );
        let e = Config::parse(base, "t", &env("short")).unwrap_err().to_string();
        assert!(
            e.contains("cluster.key: PALISADE_CLUSTER_KEY must be at least 32"),
            "{e}"
        );
    }

    #[test]
    fn pools_and_the_routes_that_choose_them() {
        let c = parse(
            "[server]\nupstreams = [\"http://a:1\"]\n\
             [[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://b:1\", weight = 3 }, { url = \"https://c:1\" }]\n\
             health_check = { path = \"/healthz\", interval = \"2s\" }\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/api/\"\nupstream = \"api\"\n[[routes]]\nname = \"s\"\n",
        )
        .unwrap();
        let names: Vec<&str> = c.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["default", "api"]);
        assert_eq!(c.route_pools, [0, 1, 0]);
        let weights: Vec<u32> = c.pools[1].members.iter().map(|m| m.weight.get()).collect();
        assert_eq!(weights, [3, 1]);
        let h = c.pools[1].health_check.as_ref().unwrap();
        assert_eq!(
            (
                h.path.as_str(),
                h.interval,
                h.timeout,
                h.expect_status.as_u16(),
                h.rise.get(),
                h.fall.get()
            ),
            (
                "/healthz",
                Duration::from_secs(2),
                Duration::from_secs(1),
                200,
                2,
                3
            )
        );
        assert!(c.upstream.tls.is_some(), "an https member needs TLS settings");
        // The default pool may be written as [[upstreams]] too, anywhere.
        let c = parse(
            "[[upstreams]]\nname = \"x\"\nmembers = [{ url = \"http://b:1\" }]\n\
             [[upstreams]]\nname = \"default\"\nmembers = [{ url = \"http://a:1\" }]\n",
        )
        .unwrap();
        assert_eq!(c.pools[0].name, "default");
        // --upstream replaces the default pool wherever it is written.
        let o = Overrides {
            upstreams: vec!["http://10.0.0.9:80".into()],
            ..Overrides::default()
        };
        let c = Config::parse(
            "[[upstreams]]\nname = \"default\"\nmembers = [{ url = \"http://a:1\" }]\n",
            "test.toml",
            &o,
        )
        .unwrap();
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].members[0].url.to_string(), "http://10.0.0.9:80/");
    }

    #[test]
    fn pool_errors_name_line_column_and_key() {
        let base = "[server]\nupstreams = [\"http://a:1\"]\n";
        let cases = [
            (
                "[[routes]]\nname = \"r\"\nupstream = \"api\"\n",
                "test.toml:5:1: routes[0].upstream: no pool named \"api\" (the pools are [\"default\"])",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = []\n",
                "test.toml:5:1: upstreams[0].members: at least one member is required",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://b:1\", weight = 0 }]\n",
                "test.toml:5:34: upstreams[0].members[0].weight: must be between 1 and 10000",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://b:1\" }]\n\
                 [[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://c:1\" }]\n",
                "test.toml:7:1: upstreams[1].name: pool name \"api\" is already used",
            ),
            (
                "[[upstreams]]\nname = \"default\"\nmembers = [{ url = \"http://b:1\" }]\n",
                "test.toml:4:1: upstreams[0].name: the pool named \"default\" is server.upstreams: write it in one place",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://b:1\" }, { url = \"http://b:1/\" }]\n",
                "test.toml:5:38: upstreams[0].members[1].url: \"http://b:1/\" is listed twice: give it a higher weight instead",
            ),
            (
                "[[upstreams]]\nname = \"a b\"\nmembers = [{ url = \"http://b:1\" }]\n",
                "test.toml:4:1: upstreams[0].name: required: 1-64 characters from [A-Za-z0-9_.-]",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = [{ url = \"ftp://b:1\" }]\n",
                "test.toml:5:14: upstreams[0].members[0].url: \"ftp://b:1\": expected http://, https://, h2c:// or h2://host:port",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://b:1\" }]\nhealth_check = { interval = \"1s\", timeout = \"2s\" }\n",
                "test.toml:6:35: upstreams[0].health_check.timeout: must not exceed health_check.interval",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://b:1\" }]\nhealth_check = { path = \"healthz\" }\n",
                "test.toml:6:18: upstreams[0].health_check.path: \"healthz\": a path starting with '/'",
            ),
            (
                "[[upstreams]]\nname = \"api\"\nmembers = [{ url = \"http://b:1\" }]\nhealth_check = { fall = 0 }\n",
                "test.toml:6:18: upstreams[0].health_check.fall: must be between 1 and 100",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .map(|(rest, expected)| (err(&format!("{base}{rest}")), expected))
            .filter(|(got, expected)| got != *expected)
            .map(|(got, expected)| format!("got      {got}\nexpected {expected}"))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn semantic_errors_name_line_column_and_key() {
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[rate_limit]\n  rate = 0\n");
        assert_eq!(
            e,
            "test.toml:4:3: rate_limit.rate: must be between 1 and 10000000"
        );
        let e = err("[server]\nupstreams = [\"http://a:1\", \"ftp://b\"]\n");
        assert_eq!(
            e,
            "test.toml:2:28: server.upstreams[1]: \"ftp://b\": expected http://, https://, h2c:// or h2://host:port"
        );
        let e = err("[server]\nupstreams = []\n");
        assert_eq!(
            e,
            "test.toml:2:1: server.upstreams: at least one upstream is required (here, or in an [[upstreams]] named \"default\")"
        );
        let e = err("[server]\nupstreams = [\"http://a:1\"]\nidle_timeout = \"soon\"\n");
        assert!(
            e.starts_with("test.toml:3:1: server.idle_timeout: \"soon\" is not a duration"),
            "{e}"
        );
        let e = err(
            "[server]\nupstreams = [\"http://a:1\"]\n[clients]\ntrusted_proxies = [\"10.0.0.0/8\", \"nope\"]\n",
        );
        assert_eq!(
            e,
            "test.toml:4:34: clients.trusted_proxies[1]: \"nope\" is not an IP address or CIDR"
        );
        let e = err(
            "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"a\"\n[[routes]]\nname = \"a\"\n",
        );
        assert_eq!(
            e,
            "test.toml:6:1: routes[1].name: route name \"a\" is already used"
        );
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"a\"\nmode = \"loud\"\n");
        assert!(
            e.starts_with("test.toml:5:1: routes[0].mode: unknown mode"),
            "{e}"
        );
        // A missing key points at what encloses it.
        let e = err("[admin]\nlisten = \"x\"\n");
        assert!(e.starts_with("test.toml:"), "{e}");
    }

    #[test]
    fn the_metrics_listener_needs_a_port_of_its_own() {
        let base = "[server]\nlisten = \"127.0.0.1:8080\"\nupstreams = [\"http://a:1\"]\n[admin]\nlisten = \"127.0.0.1:9090\"\n";
        let e = err(&format!("{base}metrics_listen = \"127.0.0.1:9090\"\n"));
        assert_eq!(
            e,
            "test.toml:6:1: admin.metrics_listen: 127.0.0.1:9090 is also admin.listen: give the metrics a port of their own"
        );
        let e = err(&format!("{base}metrics_listen = \"127.0.0.1:8080\"\n"));
        assert!(e.contains("is also server.listen"), "{e}");
        let e = err(&format!("{base}metrics_listen = \"9091\"\n"));
        assert!(e.starts_with("test.toml:6:1: admin.metrics_listen: "), "{e}");
        let c = parse(&format!("{base}metrics_listen = \"0.0.0.0:9091\"\n")).unwrap();
        assert_eq!(c.admin.metrics_listen, Some("0.0.0.0:9091".parse().unwrap()));
        let c = parse(base).unwrap();
        assert_eq!(c.admin.metrics_listen, None);
    }

    #[test]
    fn short_admin_tokens_are_refused_with_file_line_and_key() {
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[admin]\ntoken = \"s3cret\"\n");
        assert!(
            e.starts_with("test.toml:4:1: admin.token: must be at least 16 characters"),
            "{e}"
        );
        let ok = "[server]\nupstreams = [\"http://a:1\"]\n[admin]\ntoken = \"0123456789abcdef\"\n";
        let c = Config::parse(ok, "t", &Overrides::default()).unwrap();
        assert_eq!(
            c.admin.token.as_ref().map(Secret::expose),
            Some("0123456789abcdef")
        );
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[admin]\nallowed_hosts = [\"a.example:80\"]\n");
        assert!(e.starts_with("test.toml:4:18: admin.allowed_hosts[0]: "), "{e}");
    }

    #[test]
    fn adaptive_thresholds_are_checked_together() {
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[adaptive_breaker]\ndegrade_above = 0.6\n");
        assert!(
            e.starts_with("test.toml:3:2: adaptive_breaker.open_above: must not be below"),
            "{e}"
        );
        let c = parse("[server]\nupstreams = [\"http://a:1\"]\n[adaptive_breaker]\ndegrade_above = 0.4\nmode = \"shadow\"\n")
            .unwrap();
        let (a, mode) = c.shield.adaptive.unwrap();
        assert_eq!((a.degrade_above, mode), (0.4, Mode::Shadow));
    }

    #[test]
    fn breaker_statuses() {
        let c = parse(
            "[server]\nupstreams = [\"http://a:1\"]\n[breaker]\nfailure_statuses = [\"502\", \"4xx\"]\n",
        )
        .unwrap();
        let set = c.breaker.unwrap().failure_statuses;
        assert!(set.contains(502) && set.contains(429) && !set.contains(500));
        let e = err("[server]\nupstreams = [\"http://a:1\"]\n[breaker]\nfailure_statuses = [\"5xy\"]\n");
        assert!(
            e.starts_with("test.toml:4:21: breaker.failure_statuses[0]: \"5xy\" is not a status"),
            "{e}"
        );
        assert!(
            parse("[server]\nupstreams = [\"http://a:1\"]\n[breaker]\nenabled = false\n")
                .unwrap()
                .breaker
                .is_none()
        );
    }

    #[test]
    fn routes_parse() {
        let c = parse(
            "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"login\"\npath_prefix = \"/login\"\nmethods = [\"post\"]\nrate = 5\n[[routes]]\nname = \"static\"\npath_prefix = \"/s/\"\n",
        )
        .unwrap();
        let r = &c.shield.routes;
        assert_eq!(r[0].matcher.methods, vec![Method::POST]);
        assert_eq!(r[0].limit.unwrap().quota.burst.get(), 5);
        assert!(r[1].limit.is_none());
    }

    #[test]
    fn route_hosts_are_compared_as_requests_hosts_are() {
        let c = parse(
            "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"a\"\nhost = \"API.Example.\"\n[[routes]]\nname = \"b\"\nhost = \"[::1]\"\n",
        )
        .unwrap();
        let r = &c.shield.routes;
        assert_eq!(r[0].matcher.host.as_deref(), Some("api.example"));
        assert_eq!(r[1].matcher.host.as_deref(), Some("::1"));
        for host in ["a.example:80", "[::1]:80"] {
            let e = err(&format!(
                "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"a\"\nhost = \"{host}\"\n"
            ));
            assert!(
                e.starts_with("test.toml:5:1: routes[0].host: write the host without its port"),
                "{e}"
            );
        }
        let e = err(
            "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"a\"\npath_prefix = \"/login;x\"\n",
        );
        assert!(
            e.starts_with("test.toml:5:1: routes[0].path_prefix: routes match the path without"),
            "{e}"
        );
        let e = err(
            "[server]\nupstreams = [\"http://a:1\"]\n[[routes]]\nname = \"a\"\npath_prefix = \"/%256C\"\n",
        );
        assert!(
            e.starts_with("test.toml:5:1: routes[0].path_prefix: encoded '%'"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-5s").is_err());
        // Overflow is an error, not a wrap or a silent ceiling.
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
    }

    #[test]
    fn cidrs_accept_bare_addresses() {
        assert_eq!(cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary text, and arbitrary edits of the reference config,
        /// give a config or an error that names a line and column: never a
        /// panic.
        #[test]
        fn arbitrary_text(src in "[\\[\\]a-z_=\" .0-9\n#,{}:/]{0,200}") {
            check(&src);
        }

        #[test]
        fn edited_reference(pos in 0usize..QUICKSTART.len(), junk in "[\\[\\]a-z=\"0-9\n ]{0,6}") {
            let mut src = QUICKSTART.to_string();
            let pos = (0..=pos).rev().find(|p| src.is_char_boundary(*p)).unwrap_or(0);
            src.insert_str(pos, &junk);
            check(&src);
        }
    }

    fn check(src: &str) {
        match Config::parse(src, "f.toml", &Overrides::default()) {
            Ok(_) => {}
            Err(ConfigError::File(FileError::Invalid { line, column, .. })) => {
                assert!(line >= 1 && column >= 1);
                assert!(line <= src.lines().count().max(1) + 1, "line {line} past the end");
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
}
