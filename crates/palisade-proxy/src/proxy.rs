//! The request path: decide, then answer or forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::StatusCode;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, REFERER, TRANSFER_ENCODING, UPGRADE, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use palisade::{Finished, LocalRefusal, Malformed, Pipeline, ShieldLayer, ShieldService};
use palisade_core::{ClientKey, Clock, NANOS_PER_SEC, RejectReason};
use palisade_limits::adaptive::AdaptiveTransition;
use palisade_limits::admission::{Admission, Permit, RequestPermit};
use palisade_limits::breaker::{Attempt, Breaker, Outcome, Transition};
use palisade_limits::reputation::EventKind;
use palisade_limits::shield::{Decision, Rejection, RequestFacts, Shield};
use palisade_store::StoreCell;
use tower_layer::Layer;

use crate::access_log::{self, AccessLog, Pending, Refusal, RequestInfo};
use crate::body::{BodyError, BodyLimits, Cut, CutReason, MinRate, TimedBody};
use crate::challenge::{self, ChallengeMode, Challenger, Failure, Prefix};
use crate::clock::TokioClock;
use crate::cluster::{Cluster, ScoreEvent, Window};
use crate::config::{Config, ConfigError, Overrides, Secret};
use crate::connector::{AtCapacity, CappedConnector, Caps, NoH2, Protocol, Slot, wire};
use crate::forward::{
    Hop, join_cookie_crumbs, set_fingerprint, set_forwarded, strip_cookie, strip_hop_by_hop,
};
use crate::io::{ConnActivity, InFlight};
use crate::metrics::{self, LatencyLabels, Metrics, RequestLabels, intern};
use crate::never_ban::NeverBan;
use crate::pool::{Pool, Unavailable, Upstream};
use crate::respond::{self, UpstreamFailure};
use crate::stall::StreamExecutor;
use crate::state::DurableState;
use crate::syn::SynDefense;
use crate::tunnel::{self, TunnelMode};
use crate::upstream_tls::{TlsReason, failure_in_chain};

/// Body sent upstream: the client's body with deadlines, or nothing.
pub type UpstreamBody = Either<TimedBody<Incoming>, Empty<Bytes>>;

/// Where the config came from, so it can be read again.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The config file.
    pub path: PathBuf,
    /// Command-line values that win over the file.
    pub overrides: Overrides,
    /// An admin token from the environment, which wins over the file.
    pub token: Option<Secret>,
}

/// Everything a config decides, swapped as a whole on reload.
pub struct Runtime {
    /// The config in force.
    pub config: Config,
    /// The protection pipeline.
    pub shield: Shield<TokioClock>,
    /// Every upstream server once, whichever pools it is a member of.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The pools, the default one first.
    pub pools: Vec<Pool>,
    /// Connection settings for new client connections.
    pub builder: Arc<auto::Builder<StreamExecutor>>,
    client: Client<CappedConnector, UpstreamBody>,
    /// For HTTP/2 upstreams: one multiplexed connection each.
    client_h2: Client<CappedConnector, UpstreamBody>,
    /// Streams in flight to each HTTP/2 upstream, under the same cap as
    /// an HTTP/1.1 upstream's connections.
    streams: Caps,
    route_labels: Vec<&'static str>,
    body_limits: BodyLimits,
    /// Per route: the shared window of its limiter, in cluster mode.
    cluster_windows: Vec<Option<Arc<Window>>>,
    /// The proof-of-work challenge, when a route has one.
    challenge: Option<Arc<Challenger>>,
    /// Per route: its id in challenge tokens.
    route_ids: Vec<u32>,
}

impl Runtime {
    /// Builds the runtime for `config`, carrying over what `previous` knew:
    /// client scores and limiter state, breaker state of upstreams that
    /// stay, and the upstream connection pool when its settings are equal.
    pub fn build(
        config: Config,
        clock: TokioClock,
        previous: Option<&Runtime>,
        cluster: Option<&Cluster>,
    ) -> Self {
        let now = clock.now();
        let mut shield_cfg = config.shield.clone();
        shield_cfg.store = store_cell(&config, previous);
        let shield = Shield::carrying_over(shield_cfg, clock, previous.map(|p| &p.shield));
        let route_labels = (0..shield.route_count())
            .map(|i| intern(shield.route_name(i)))
            .collect();
        let cluster_windows = (0..shield.route_count())
            .map(|i| Some(cluster?.window(shield.limit_for(i)?.0)))
            .collect();
        let mut upstreams: Vec<Arc<Upstream>> = Vec::new();
        let pools = config
            .pools
            .iter()
            .map(|cfg| {
                Pool::new(cfg, |url| {
                    let (scheme, protocol) = wire(url)?;
                    let authority = url.authority()?;
                    let same = |u: &&Arc<Upstream>| {
                        u.authority == *authority && u.scheme == scheme && u.protocol == protocol
                    };
                    if let Some(u) = upstreams.iter().find(same) {
                        return Some(u.clone());
                    }
                    let old = previous.and_then(|p| p.upstreams.iter().find(same));
                    let breaker =
                        config
                            .breaker
                            .as_ref()
                            .map(|b| match old.and_then(|o| o.breaker.clone()) {
                                Some(kept) => {
                                    kept.reconfigure(b.rules.clone());
                                    kept
                                }
                                None => Arc::new(Breaker::new(b.rules.clone(), now)),
                            });
                    let u = Arc::new(Upstream {
                        label: intern(authority.as_str()),
                        scheme,
                        protocol,
                        authority: authority.clone(),
                        breaker,
                    });
                    upstreams.push(u.clone());
                    Some(u)
                })
            })
            .collect();
        let (client, client_h2, streams) = match previous {
            Some(p) if p.config.upstream == config.upstream => {
                (p.client.clone(), p.client_h2.clone(), p.streams.clone())
            }
            _ => upstream_clients(&config),
        };
        let route_ids = (0..shield.route_count())
            .map(|i| challenge::route_id(shield.route_name(i)))
            .collect();
        let challenge = config.challenge.clone().and_then(|settings| {
            match Challenger::new(settings, previous.and_then(|p| p.challenge.as_deref())) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    tracing::error!("challenge off: {e}");
                    None
                }
            }
        });
        Self {
            builder: Arc::new(connection_builder(&config)),
            body_limits: BodyLimits {
                gap: config.server.body_read_timeout,
                rate: MinRate {
                    min_rate: config.server.body_min_rate,
                    grace: config.server.body_rate_grace,
                },
                max_size: config.server.max_body_size,
            },
            upstreams,
            pools,
            route_labels,
            cluster_windows,
            challenge,
            route_ids,
            client,
            client_h2,
            streams,
            shield,
            config,
        }
    }

    /// The labels of the routes that have a challenge.
    fn challenged_routes(&self) -> impl Iterator<Item = &'static str> + '_ {
        let routes = self.challenge.as_ref().map(|c| &c.settings().routes);
        routes
            .into_iter()
            .flatten()
            .zip(&self.route_labels)
            .filter(|(r, _)| r.mode != ChallengeMode::Off)
            .map(|(_, label)| *label)
    }

    /// The label of the route a token names, when it is one of ours.
    fn route_label_of(&self, id: Option<u32>) -> &'static str {
        id.and_then(|id| self.route_ids.iter().position(|r| *r == id))
            .and_then(|i| self.route_labels.get(i).copied())
            .unwrap_or("unknown")
    }
}

/// The store for `config`: the previous runtime's when the path is the
/// same (its feed state and swaps carry on), else freshly opened.
fn store_cell(config: &Config, previous: Option<&Runtime>) -> Option<Arc<StoreCell>> {
    let settings = config.store.as_ref()?;
    if let Some(cell) = previous.and_then(|p| p.shield.config().store.clone())
        && cell.path() == Some(settings.path.as_path())
        && cell.key() == settings.feed_public_key
    {
        return Some(cell);
    }
    match StoreCell::open_trusted(&settings.path, settings.feed_public_key) {
        Ok(cell) => {
            let info = cell.load().info();
            tracing::info!(
                path = %settings.path.display(),
                entries = info.entries(),
                watermark = info.watermark,
                bytes = info.bytes,
                "reputation store loaded"
            );
            Some(Arc::new(cell))
        }
        Err(e) => {
            // The config check opened it moments ago; it changed since.
            tracing::error!("reputation store not loaded: {e}");
            None
        }
    }
}

/// The receive window of one stream from an HTTP/2 upstream: what a
/// client that stops reading can leave buffered here per stream.
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// The HTTP/1.1 and HTTP/2 upstream clients, sharing one connection cap,
/// and the cap on HTTP/2 streams.
type Clients = (
    Client<CappedConnector, UpstreamBody>,
    Client<CappedConnector, UpstreamBody>,
    Caps,
);

fn upstream_clients(config: &Config) -> Clients {
    let u = &config.upstream;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(u.connect_timeout));
    connector.set_nodelay(true);
    let mut capped = CappedConnector::new(connector, u.max_connections);
    if let Some(tls) = &u.tls {
        capped = capped.with_tls(tls.clone(), u.connect_timeout);
    }
    let h2 = capped.for_h2();
    let http1 = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(u.pool_idle_timeout)
        .pool_max_idle_per_host(u.pool_max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(capped);
    // The connection window is the sum of every stream's, so that the
    // data a stalled client leaves unread counts against its own stream
    // only: with a smaller one, a few clients that stop reading would
    // hold the whole connection's window and stall every other stream on
    // it. Streams are capped at `max_connections`, which bounds the memory
    // at that many stream windows.
    let streams = u32::try_from(u.max_connections).unwrap_or(u32::MAX);
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(u.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_initial_stream_window_size(H2_STREAM_WINDOW)
        .http2_initial_connection_window_size(H2_STREAM_WINDOW.saturating_mul(streams).min(i32::MAX as u32))
        // A dead upstream connection is found by a ping unanswered, not
        // by the next request's response timeout.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .http2_keep_alive_timeout(u.connect_timeout.max(Duration::from_secs(5)))
        .build(h2);
    (http1, h2, Caps::new(u.max_connections))
}

fn connection_builder(config: &Config) -> auto::Builder<StreamExecutor> {
    let s = &config.server;
    // Each HTTP/2 stream runs with a progress deadline (see stall.rs).
    let mut b = auto::Builder::new(StreamExecutor);
    b.http1()
        .timer(TokioTimer::new())
        // Header deadline is enforced by TimedIo (see io.rs).
        .header_read_timeout(None)
        .max_buf_size(s.max_header_bytes)
        .max_headers(s.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.h2_max_concurrent_streams)
        // Rapid reset (CVE-2023-44487): streams the client resets before
        // they are served, and streams we had to reset, are bounded; past
        // either bound the connection gets GOAWAY. Streams that are served
        // go through the per-client limiter like any request.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(256))
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(s.write_timeout);
    b
}

/// Wall-clock Unix time in seconds, for timestamps that dashboards show.
fn unix_seconds() -> f64 {
    palisade_core::unix_now_ms() as f64 / 1000.0
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadReport {
    /// Changed settings that only a restart applies.
    pub needs_restart: Vec<&'static str>,
}

/// State shared by every connection.
pub struct App {
    /// Exported metrics.
    pub metrics: Metrics,
    /// Connection admission at accept (its counts outlive reloads).
    pub admission: Arc<Admission>,
    /// False while draining, for `/readyz`.
    pub ready: AtomicBool,
    /// A CPU profile is being taken (one at a time).
    pub profiling: AtomicBool,
    clock: TokioClock,
    runtime: ArcSwap<Runtime>,
    source: Option<ConfigSource>,
    reloading: tokio::sync::Mutex<()>,
    refreshing: std::sync::Mutex<()>,
    log_budget: LogBudget,
    transition_log_budget: LogBudget,
    /// Refused connections are logged on a budget of their own.
    pub refusal_log_budget: LogBudget,
    /// The learned-state log, when `[state]` is configured.
    state: std::sync::OnceLock<DurableState>,
    /// Cluster membership, when `[cluster]` is configured.
    pub cluster: Option<Arc<Cluster>>,
    /// SYN-flood defense, when `[syn]` is on.
    syn: std::sync::OnceLock<Arc<SynDefense>>,
    /// The access log, when `[access_log]` is on.
    access_log: std::sync::OnceLock<AccessLog>,
}

impl App {
    /// Builds the shared state from a validated config; `source` makes it
    /// reloadable.
    pub fn new(config: Config, source: Option<ConfigSource>) -> Self {
        let clock = TokioClock::new();
        let metrics = Metrics::new();
        metrics.config_last_reload_success.set(1);
        metrics.last_reload_success_timestamp.set(unix_seconds());
        for u in config.upstream_urls().filter_map(|u| u.authority()) {
            metrics.zero_upstream(intern(u.as_str()));
        }
        let admission = Arc::new(Admission::new(
            config.connections.clone(),
            config.shield.ipv6_prefix,
            config.shield.max_tracked_clients,
        ));
        let cluster = config
            .cluster
            .clone()
            .map(|c| Arc::new(Cluster::new(c, config.shield.max_tracked_clients)));
        let mut runtime = Runtime::build(config, clock, None, cluster.as_deref());
        crate::health::attach(&mut runtime, None, &metrics, clock);
        for label in runtime.challenged_routes() {
            metrics.zero_challenge(label);
        }
        Self {
            admission,
            runtime: ArcSwap::from_pointee(runtime),
            cluster,
            clock,
            metrics,
            ready: AtomicBool::new(true),
            profiling: AtomicBool::new(false),
            source,
            reloading: tokio::sync::Mutex::new(()),
            refreshing: std::sync::Mutex::new(()),
            log_budget: LogBudget::default(),
            transition_log_budget: LogBudget::default(),
            refusal_log_budget: LogBudget::default(),
            state: std::sync::OnceLock::new(),
            syn: std::sync::OnceLock::new(),
            access_log: std::sync::OnceLock::new(),
        }
    }

    /// Starts the SYN-flood defense (when configured) for the proxy port.
    pub fn start_syn_defense(self: &Arc<Self>, listen: std::net::SocketAddr) -> Option<Arc<SynDefense>> {
        let rt = self.runtime();
        let settings = rt.config.syn.clone()?;
        let weak = Arc::downgrade(self);
        let penalize: Arc<dyn Fn(std::net::IpAddr) + Send + Sync> = Arc::new(move |ip| {
            if let Some(app) = weak.upgrade() {
                app.penalize_syn_flood(ip);
            }
        });
        let data_dir = rt.config.state.as_ref().map(|s| s.data_dir.clone());
        let weak = Arc::downgrade(self);
        let share: Arc<dyn Fn(ipnet::IpNet, u64) + Send + Sync> = Arc::new(move |net, until| {
            if let Some(app) = weak.upgrade() {
                app.share_ban(net, until);
            }
        });
        let defense = SynDefense::start(
            settings,
            listen,
            rt.config.shield.ipv6_prefix,
            data_dir,
            penalize,
            share,
            NeverBan::build(&rt.config),
        );
        let _ = self.syn.set(defense.clone());
        Some(defense)
    }

    /// Rebuilds the never-ban set from `config` and the host, for the SYN
    /// defense and the cluster (when running).
    pub async fn rebuild_never_ban(&self, config: Config) {
        if self.syn.get().is_none() && self.cluster.is_none() {
            return;
        }
        // Resolves names: off the async workers.
        match tokio::task::spawn_blocking(move || NeverBan::build(&config)).await {
            Ok(never_ban) => {
                if let Some(c) = &self.cluster {
                    c.set_never_ban(never_ban.clone());
                }
                if let Some(d) = self.syn.get() {
                    d.set_never_ban(never_ban);
                }
            }
            Err(e) => tracing::error!("never-ban set not rebuilt, the old one stays: {e}"),
        }
    }

    /// The SYN-flood defense, when running.
    pub fn syn(&self) -> Option<&Arc<SynDefense>> {
        self.syn.get()
    }

    /// Whether the SYN-flood defense has banned this client.
    pub fn syn_banned(&self, ip: std::net::IpAddr) -> bool {
        self.syn.get().is_some_and(|d| d.is_banned(ip))
    }

    fn penalize_syn_flood(&self, ip: std::net::IpAddr) {
        let rt = self.runtime();
        let (Some(rep), Some(points)) = (
            rt.shield.reputation(),
            rt.config.syn.as_ref().map(|s| s.reputation_penalty),
        ) else {
            return;
        };
        let key = rt.shield.key_for_ip(ip);
        rep.penalize(&key, points, EventKind::SynFlood, self.now());
        Metrics::inc(&self.metrics.penalties, "syn_flood");
        self.persist_score(&rt, &key);
    }

    /// Takes `points` off a client's score for a challenge; `persist`
    /// queues the new score for the durable log and the cluster.
    fn challenge_penalty(&self, rt: &Runtime, key: &ClientKey, points: u8, persist: bool) {
        let Some(rep) = rt.shield.reputation() else { return };
        if points == 0 {
            return;
        }
        rep.penalize(key, points, EventKind::Challenge, self.now());
        if persist {
            Metrics::inc(&self.metrics.penalties, "challenge");
            self.persist_score(rt, key);
        }
    }

    /// Opens the durable state (when configured) and restores the scores
    /// it holds. Call once, before serving.
    pub fn open_state(&self) -> Result<(), String> {
        let rt = self.runtime();
        let Some(settings) = &rt.config.state else {
            return Ok(());
        };
        let (state, restored) = DurableState::open(
            settings,
            rt.shield.reputation(),
            rt.config.shield.ipv6_prefix,
            self.now(),
            &self.metrics,
        )
        .map_err(|e| format!("state.data_dir: {e}"))?;
        tracing::info!(
            dir = %settings.data_dir.display(),
            clients = restored.clients,
            replayed = restored.replayed,
            dropped_bytes = restored.dropped_bytes,
            "durable state restored"
        );
        let _ = self.state.set(state);
        Ok(())
    }

    /// Opens the access log (when configured) and starts its writer.
    /// Call once, before serving.
    pub fn open_access_log(&self) -> std::io::Result<()> {
        let rt = self.runtime();
        let Some(settings) = &rt.config.access_log else {
            return Ok(());
        };
        let log = AccessLog::start(settings, self.metrics.access_log_dropped.clone())?;
        let _ = self.access_log.set(log);
        Ok(())
    }

    /// Counts and logs a request answered 400 before any control: like
    /// every request, it has its `palisade_requests_total` count and, on
    /// the refusal budget, its access log line.
    fn answered_bad_request(&self, m: &Malformed<'_>, ja4: Option<&str>) {
        let method = metrics::method_label(m.method);
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint: "default",
                method,
                status: m.status.as_u16(),
            })
            .inc();
        let Some(log) = self.access_log.get() else { return };
        if !log.allow_refusal(self.now(), Refusal::BadRequest) {
            return;
        }
        let rt = self.runtime();
        let header = |name| m.headers.get(name).map(HeaderValue::as_bytes);
        let pending = log.begin(&RequestInfo {
            client: rt.shield.config().trusted_proxies.client_ip(m.peer, m.headers),
            peer: m.peer,
            method: m.method.as_str(),
            target: m.target,
            version: m.version,
            referer: header(REFERER),
            user_agent: header(USER_AGENT),
            ja4,
        });
        log.finish(
            pending,
            &access_log::Outcome {
                status: m.status.as_u16(),
                bytes: m.body_len,
                decision: access_log::BAD_REQUEST,
                upstream_status: None,
                latency: 0,
                unix_ms: palisade_core::unix_now_ms(),
            },
        );
    }

    /// Reopens the access log file (SIGUSR1, after logrotate moved it).
    pub fn reopen_access_log(&self) {
        if let Some(log) = self.access_log.get() {
            log.reopen();
        }
    }

    /// The learned-state log, when configured.
    pub fn state(&self) -> Option<&DurableState> {
        self.state.get()
    }

    /// Queues a client's new score for the durable log (automatic
    /// penalties: nobody waits for these).
    fn persist_score(&self, rt: &Runtime, key: &ClientKey) {
        let Some(rep) = rt.shield.reputation() else { return };
        let Some(entry) = crate::state::entry_for(rep, key, rt.config.shield.ipv6_prefix, self.now()) else {
            return;
        };
        self.share(entry);
        if let Some(state) = self.state.get()
            && !state.record_later(entry)
        {
            Metrics::inc(&self.metrics.state_records, "dropped");
        }
    }

    /// Tells the other cluster nodes about a score change.
    pub fn share(&self, entry: palisade_store::LogEntry) {
        if let Some(cluster) = &self.cluster {
            let event = ScoreEvent {
                net: entry.net,
                ban: false,
                score: entry.score,
                expires: entry.expires,
                at_ms: entry.at_ms,
            };
            cluster.publish(event, &self.metrics);
        }
    }

    /// Tells the other cluster nodes about a kernel ban (`until` in Unix
    /// seconds; a past one lifts it).
    pub fn share_ban(&self, net: ipnet::IpNet, until: u64) {
        if let Some(cluster) = &self.cluster {
            let event = ScoreEvent {
                net,
                ban: true,
                score: None,
                expires: until,
                at_ms: palisade_core::unix_now_ms(),
            };
            cluster.publish(event, &self.metrics);
        }
    }

    /// Applies a score change or ban another node published; `Err` says
    /// why this node's policy refuses it (never-ban set, prefix minimums,
    /// longest ban), whoever signed it. A ban is queued for the ban
    /// thread, waiting only for room in its queue.
    pub async fn apply_cluster_event(&self, e: &ScoreEvent) -> Result<(), String> {
        if e.ban {
            let Some(syn) = self.syn.get() else {
                tracing::debug!(net = %e.net, "cluster ban ignored: the SYN defense is off here");
                return Ok(());
            };
            let now = palisade_core::unix_now();
            let result = if e.expires > now {
                syn.ban_from_cluster(e.net, e.expires).await
            } else {
                return syn.unban_from_cluster(e.net).await.or_else(|err| {
                    tracing::error!(net = %e.net, "cluster unban not applied: {err}");
                    Ok(())
                });
            };
            return match result {
                Ok(()) => Ok(()),
                Err(err) if err.is_refusal() => Err(err.to_string()),
                Err(err) => {
                    tracing::error!(net = %e.net, "cluster ban not applied: {err}");
                    Ok(())
                }
            };
        }
        let rt = self.runtime();
        let Some(rep) = rt.shield.reputation() else {
            return Ok(());
        };
        // A score is about one client: an address, or an IPv6 prefix no
        // wider than this node's client key.
        let narrowest = match e.net {
            ipnet::IpNet::V4(_) => 32,
            ipnet::IpNet::V6(_) => rt.config.shield.ipv6_prefix,
        };
        if e.net.prefix_len() < narrowest {
            return Err(format!("{} is wider than one client (/{narrowest})", e.net));
        }
        if let Some(why) = self.cluster.as_ref().and_then(|c| c.protected(&e.net)) {
            return Err(why);
        }
        let key = ClientKey::from_ip(e.net.addr(), rt.config.shield.ipv6_prefix);
        let now = self.now();
        match e.score {
            Some(score) => {
                let age = palisade_core::unix_now_ms().saturating_sub(e.at_ms);
                rep.set_recorded(&key, score, age, EventKind::Cluster, now);
            }
            None => {
                rep.reset(&key);
            }
        }
        Ok(())
    }

    /// The runtime in force (config, shield, upstreams).
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Time on the daemon's clock.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Reads the config file again and applies it, or keeps the current one
    /// and returns why not.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let Some(source) = &self.source else {
            return Err(ReloadError::NoFile);
        };
        let _one_at_a_time = self.reloading.lock().await;
        let loaded = Config::load(&source.path, &source.overrides);
        let mut config = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.metrics.config_last_reload_success.set(0);
                Metrics::inc(&self.metrics.config_reloads, "error");
                tracing::error!("config reload failed, keeping the config in force: {e}");
                return Err(ReloadError::Invalid(e));
            }
        };
        if source.token.is_some() {
            config.admin.token.clone_from(&source.token);
        }
        let old = self.runtime();
        let mut needs_restart = Vec::new();
        if config.server.listen != old.config.server.listen {
            needs_restart.push("server.listen");
        }
        if config.server.backlog != old.config.server.backlog {
            needs_restart.push("server.backlog");
        }
        if config.admin.listen != old.config.admin.listen {
            needs_restart.push("admin.listen");
        }
        if config.admin.metrics_listen != old.config.admin.metrics_listen {
            needs_restart.push("admin.metrics_listen");
        }
        if config.state != old.config.state {
            needs_restart.push("state");
        }
        if config.cluster != old.config.cluster {
            needs_restart.push("cluster");
        }
        if config.access_log != old.config.access_log {
            needs_restart.push("access_log");
        }
        if config.shield.max_tracked_clients != old.config.shield.max_tracked_clients {
            tracing::warn!("clients.max_tracked changed: client tables start afresh");
        }
        self.admission.reconfigure(&config.connections);
        let mut runtime = Runtime::build(config, self.clock, Some(&old), self.cluster.as_deref());
        crate::health::attach(&mut runtime, Some(&old), &self.metrics, self.clock);
        crate::health::forget_gone(&runtime, &old, &self.metrics);
        for u in runtime.upstreams.iter().filter(|u| u.breaker.is_some()) {
            self.metrics.zero_upstream(u.label);
        }
        for label in runtime.challenged_routes() {
            self.metrics.zero_challenge(label);
        }
        self.rebuild_never_ban(runtime.config.clone()).await;
        self.runtime.store(Arc::new(runtime));
        self.metrics.config_last_reload_success.set(1);
        self.metrics.last_reload_success_timestamp.set(unix_seconds());
        Metrics::inc(&self.metrics.config_reloads, "ok");
        for key in &needs_restart {
            tracing::warn!("{key} changed: takes effect after a restart");
        }
        tracing::info!(file = %source.path.display(), "config reloaded");
        Ok(ReloadReport { needs_restart })
    }

    /// Refreshes the gauges that are computed from tables rather than counted.
    pub fn refresh_gauges(&self) {
        // Mirrored counters are stored, not added to: two scrapes refreshing
        // at once could otherwise store an older reading after a newer one.
        let _one_at_a_time = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let rt = self.runtime();
        let m = &self.metrics;
        let now = self.now();
        for (name, limiter) in rt.shield.limiters() {
            self.record_table_gauges(format!("limiter:{name}"), limiter.table());
        }
        if let Some(rep) = rt.shield.reputation() {
            self.record_table_gauges("reputation".into(), rep.table());
            for (bucket, n) in metrics::SCORE_BUCKETS.iter().zip(rep.distribution(now)) {
                m.reputation_scores
                    .get_or_create(&metrics::ScoreLabel { bucket })
                    .set(n as i64);
            }
        }
        let addresses = self.admission.addresses();
        self.table_gauges("connections".into(), addresses.len(), addresses.overflowed());
        if let Some(syn) = self.syn.get() {
            let (seen, active, total, half_open) = syn.gauges();
            metrics::set_counter(&m.syn_seen, seen);
            m.syn_bans_active.set(active as i64);
            metrics::set_counter(&m.syn_bans, total);
            m.syn_half_open.set(half_open as i64);
            let (batches, requests) = syn.batch_counts();
            metrics::set_counter(&m.ban_batches, batches);
            metrics::set_counter(&m.ban_requests, requests);
            for (reason, n) in syn.refused() {
                metrics::set_counter(&m.bans_refused.get_or_create(&metrics::ReasonLabel { reason }), n);
            }
            if let Some(x) = syn.xdp_stats() {
                for (kind, v) in [("seen", x.seen), ("dropped", x.dropped), ("syns", x.syns)] {
                    metrics::set_counter(&m.xdp_packets.get_or_create(&metrics::KindLabel { kind }), v);
                }
            }
            let k = syn.kernel_totals();
            for (kind, v) in [
                ("syncookies_sent", k.syncookies_sent),
                ("syncookies_recv", k.syncookies_recv),
                ("syncookies_failed", k.syncookies_failed),
                ("listen_overflows", k.listen_overflows),
                ("listen_drops", k.listen_drops),
                ("req_q_full_do_cookies", k.req_q_full_do_cookies),
                ("req_q_full_drop", k.req_q_full_drop),
                ("syn_retrans", k.syn_retrans),
                ("passive_opens", k.passive_opens),
                ("retrans_segs", k.retrans_segs),
            ] {
                metrics::set_counter(&m.kernel_tcp.get_or_create(&metrics::KindLabel { kind }), v);
            }
        }
        if let Some(cell) = &rt.shield.config().store {
            let info = cell.load().info();
            m.store_entries
                .set(i64::try_from(info.entries()).unwrap_or(i64::MAX));
            m.store_watermark
                .set(i64::try_from(info.watermark).unwrap_or(i64::MAX));
            m.store_bytes.set(i64::try_from(info.bytes).unwrap_or(i64::MAX));
        }
        if let Some(adaptive) = rt.shield.adaptive() {
            for (state, n) in adaptive.state_counts() {
                m.adaptive_clients
                    .get_or_create(&metrics::StateLabel {
                        state: state.as_str(),
                    })
                    .set(n as i64);
            }
            self.record_table_gauges("adaptive_breaker".into(), adaptive.table());
        }
        for u in &rt.upstreams {
            if let Some(b) = &u.breaker {
                let (state, _, transition) = b.state(now);
                if let Some(t) = transition {
                    self.breaker_transition(u.label, t);
                }
                m.breaker_state
                    .get_or_create(&metrics::UpstreamLabel { upstream: u.label })
                    .set(state.gauge());
            }
        }
    }

    /// Counts and logs a client's adaptive breaker transition. Many clients
    /// may change state at once under attack, so the log lines share a
    /// budget of their own; the counters see every one.
    pub fn adaptive_transition(&self, t: AdaptiveTransition) {
        self.metrics
            .adaptive_transitions
            .get_or_create(&metrics::AdaptiveLabels {
                from: t.from.as_str(),
                to: t.to.as_str(),
                reason: t.reason.as_str(),
            })
            .inc();
        if self.transition_log_budget.take(self.now()) {
            tracing::warn!(
                client = ?t.ip,
                from = t.from.as_str(),
                to = t.to.as_str(),
                reason = t.reason.as_str(),
                failure_rate = format_args!("{:.3}", t.rate),
                requests = t.requests,
                "adaptive breaker"
            );
        }
    }

    /// A client table's size and overflow count (a counter kept in step
    /// with the table's own).
    fn table_gauges(&self, table: String, len: usize, overflowed: u64) -> metrics::TableLabel {
        let label = metrics::TableLabel { table };
        self.metrics.tracked_clients.get_or_create(&label).set(len as i64);
        let c = self.metrics.table_overflows.get_or_create(&label);
        c.inc_by(overflowed.saturating_sub(c.get()));
        label
    }

    fn record_table_gauges<const N: usize>(&self, table: String, t: &palisade_limits::clients::ClientsN<N>) {
        let label = self.table_gauges(table, t.len(), t.overflowed());
        let c = self.metrics.table_takeovers.get_or_create(&label);
        c.inc_by(t.taken_over().saturating_sub(c.get()));
    }

    fn breaker_transition(&self, upstream: &'static str, t: Transition) {
        self.metrics.breaker_families().record(upstream, t);
    }

    /// Forwards one admitted request to a member of its route's pool, or
    /// answers 503 when no member's breaker admits it.
    async fn pass(
        self: Arc<Self>,
        conn: ClientConn,
        mut req: Request<Incoming>,
    ) -> Response<UpstreamResponseBody> {
        // The pool of the route matched, under the config it was matched
        // with (a reload in between may renumber routes and pools).
        let (rt, pool) = match req.extensions_mut().remove::<Routed>() {
            Some(Routed { runtime, pool }) => (runtime, pool),
            None => (self.runtime(), 0),
        };
        let Some(pool) = rt.pools.get(pool).or(rt.pools.first()) else {
            return not_forwarded(respond::upstream_failure(UpstreamFailure::Other).map(Either::Right));
        };
        match pool.choose(self.clock, |u, t| self.breaker_transition(u.label, t)) {
            Err(Unavailable { retry_after }) => {
                let mut r = respond::breaker_open(retry_after.div_ceil(NANOS_PER_SEC)).map(Either::Right);
                r.extensions_mut().insert(LocalRefusal(RejectReason::BreakerOpen));
                r
            }
            Ok((upstream, ticket)) => self.forward(&rt, upstream, ticket, &conn, req).await,
        }
    }

    async fn forward(
        &self,
        rt: &Runtime,
        upstream: &Upstream,
        ticket: Option<Attempt<TokioClock>>,
        conn: &ClientConn,
        mut req: Request<Incoming>,
    ) -> Response<UpstreamResponseBody> {
        let h2 = upstream.protocol == Protocol::H2;
        // Every stream to an HTTP/2 upstream shares its connection: without
        // a cap, clients would open as many as they have streams to us.
        let stream = if h2 {
            match rt.streams.slot(Some(&upstream.authority)) {
                Ok(slot) => Some(slot),
                Err(_) => return self.failed(upstream, ticket, conn, UpstreamFailure::AtCapacity, None),
            }
        } else {
            None
        };
        // An HTTP/1.1 `Upgrade` (WebSocket...) is passed through and, on
        // 101, becomes a byte tunnel; HTTP/2 has no such upgrade.
        let upgrade = if h2 {
            None
        } else {
            upgrade_protocol(&req).map(|proto| (proto, hyper::upgrade::on(&mut req)))
        };
        // gRPC servers insist on it; the only TE HTTP/2 allows.
        let te_trailers = h2 && asks_trailers(&req);
        let (mut parts, body) = req.into_parts();
        // HTTP/2 clients send :authority instead of Host; HTTP/1.1 upstreams need Host.
        if !parts.headers.contains_key(HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(HOST, v);
        }
        strip_hop_by_hop(&mut parts.headers);
        if te_trailers {
            parts
                .headers
                .insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        if parts.version == Version::HTTP_2 && !h2 {
            join_cookie_crumbs(&mut parts.headers);
        }
        // The clearance is ours: an upstream that logged or echoed it
        // would hand it to whoever reads that.
        if rt.challenge.is_some() {
            strip_cookie(&mut parts.headers, challenge::COOKIE);
        }
        if let Some((proto, _)) = &upgrade {
            parts.headers.insert(UPGRADE, proto.clone());
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let host = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned);
        let peer = conn.peer.ip().to_canonical();
        let proxies = &rt.shield.config().trusted_proxies;
        let trusted = proxies.contains(peer);
        let hop = Hop {
            peer,
            trusted,
            client: if trusted {
                proxies.client_ip(peer, &parts.headers)
            } else {
                peer
            },
            proto: if conn.tls { "https" } else { "http" },
            host: host.as_deref(),
        };
        set_forwarded(&mut parts.headers, &hop);
        if let Some(name) = &rt.config.server.tls_fingerprint_header {
            // A trusted proxy's ClientHello is its own: no JA4 of the
            // client it forwards for is known here.
            let own = conn
                .tls_fingerprint
                .as_ref()
                .map(|f| f.ja4.as_str())
                .filter(|_| hop.client == hop.peer);
            set_fingerprint(&mut parts.headers, name, own);
        }
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(upstream.scheme.clone());
        uri.authority = Some(upstream.authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or(PathAndQuery::from_static("/")),
        );
        parts.uri = match Uri::from_parts(uri) {
            Ok(u) => u,
            Err(_) => {
                return not_forwarded(respond::upstream_failure(UpstreamFailure::Other).map(Either::Right));
            }
        };
        parts.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        // Hyper's client sends a GET or HEAD body of unknown length as a
        // length of 0, dropping a chunked (or HTTP/2) body the client sent;
        // asking for chunked keeps it, framed as the client framed it.
        if !h2
            && !body.is_end_stream()
            && body.size_hint().exact().is_none()
            && !parts.headers.contains_key(CONTENT_LENGTH)
        {
            parts
                .headers
                .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        let cut = Arc::new(CutReason::default());
        let body = if body.is_end_stream() {
            Either::Right(Empty::new())
        } else {
            Either::Left(
                TimedBody::new(body, rt.body_limits, cut.clone())
                    .without_trailer(rt.config.server.tls_fingerprint_header.clone()),
            )
        };
        let client = if h2 { &rt.client_h2 } else { &rt.client };
        let sent = client.request(Request::from_parts(parts, body));
        let mut tls_detail = None;
        let failure = match tokio::time::timeout(rt.config.upstream.response_timeout, sent).await {
            Ok(Ok(mut resp)) => {
                let failed = rt
                    .config
                    .breaker
                    .as_ref()
                    .is_some_and(|b| b.failure_statuses.contains(resp.status().as_u16()));
                self.finish(
                    upstream,
                    ticket,
                    if failed {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    },
                );
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                let accepted = if switching {
                    resp.headers().get(UPGRADE).cloned()
                } else {
                    None
                };
                strip_hop_by_hop(resp.headers_mut());
                if let (Some((_, client_side)), Some(proto)) = (upgrade, accepted) {
                    resp.headers_mut().insert(UPGRADE, proto);
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    let idle = rt.config.server.tunnel_idle_timeout;
                    self.spawn_tunnel(client_side, upstream_side, conn.permit.clone(), idle);
                }
                if let Some(slot) = stream {
                    resp.extensions_mut().insert(StreamSlot {
                        _held: Arc::new(slot),
                    });
                }
                return resp.map(Either::Left);
            }
            Err(_) => UpstreamFailure::Timeout,
            Ok(Err(_)) if cut.get() == Some(Cut::TooSlow) => UpstreamFailure::SlowBody,
            Ok(Err(_)) if cut.get() == Some(Cut::TooLarge) => UpstreamFailure::BodyTooLarge,
            Ok(Err(e)) if in_error_chain(&e, |x| x.is::<AtCapacity>()) => UpstreamFailure::AtCapacity,
            Ok(Err(e)) if in_error_chain(&e, |x| x.is::<NoH2>()) => {
                tls_detail = Some(NoH2.to_string());
                UpstreamFailure::Tls(TlsReason::Handshake)
            }
            Ok(Err(ref e)) if let Some((reason, detail)) = failure_in_chain(e) => {
                tls_detail = Some(detail);
                UpstreamFailure::Tls(reason)
            }
            Ok(Err(e)) if e.is_connect() => UpstreamFailure::Connect,
            Ok(Err(e)) if caused_by_client_body(&e) => UpstreamFailure::ClientBody,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream request failed");
                UpstreamFailure::Other
            }
        };
        self.failed(upstream, ticket, conn, failure, tls_detail)
    }

    /// Settles the attempt of a request upstream could not answer, counts
    /// and logs why, and answers it.
    fn failed(
        &self,
        upstream: &Upstream,
        ticket: Option<Attempt<TokioClock>>,
        conn: &ClientConn,
        failure: UpstreamFailure,
        tls_detail: Option<String>,
    ) -> Response<UpstreamResponseBody> {
        let outcome = match failure {
            // Our own cap says nothing of the upstream's health.
            UpstreamFailure::SlowBody
            | UpstreamFailure::BodyTooLarge
            | UpstreamFailure::ClientBody
            | UpstreamFailure::AtCapacity => Outcome::Ignored,
            _ => Outcome::Failure,
        };
        self.finish(upstream, ticket, outcome);
        Metrics::inc(&self.metrics.upstream_errors, failure.as_str());
        let at_capacity = matches!(failure, UpstreamFailure::AtCapacity);
        if (outcome == Outcome::Failure || at_capacity) && self.log_budget.take(self.now()) {
            match &tls_detail {
                Some(reason) => tracing::warn!(
                    peer = %conn.peer,
                    upstream = upstream.label,
                    failure = failure.as_str(),
                    reason = %reason,
                    "upstream TLS handshake failed"
                ),
                None => {
                    tracing::warn!(peer = %conn.peer, upstream = upstream.label, failure = failure.as_str(), "upstream failed");
                }
            }
        }
        not_forwarded(respond::upstream_failure(failure).map(Either::Right))
    }

    /// Runs the byte tunnel of an upgraded connection in its own task. The
    /// connection's admission permit lives as long as the tunnel.
    fn spawn_tunnel(
        &self,
        client: OnUpgrade,
        upstream: OnUpgrade,
        permit: Option<Arc<Permit>>,
        idle: Duration,
    ) {
        let splice = self
            .metrics
            .tunnel_bytes
            .get_or_create(&metrics::KindLabel { kind: "splice" })
            .clone();
        let copy = self
            .metrics
            .tunnel_bytes
            .get_or_create(&metrics::KindLabel { kind: "copy" })
            .clone();
        let tunnels = self.metrics.tunnels.clone();
        crate::tasks::spawn(async move {
            let _permit = permit;
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let (mode, moved) = tunnel::run(client, upstream, idle).await;
            tunnels
                .get_or_create(&metrics::KindLabel { kind: mode.as_str() })
                .inc();
            let counter = if mode == TunnelMode::Splice {
                &splice
            } else {
                &copy
            };
            match moved {
                Ok((up, down)) => {
                    counter.inc_by(up + down);
                }
                Err(e) => tracing::debug!(error = %e, mode = mode.as_str(), "tunnel ended with an error"),
            }
        });
    }

    fn finish(&self, upstream: &Upstream, ticket: Option<Attempt<TokioClock>>, outcome: Outcome) {
        if let Some(t) = ticket
            && let Some(transition) = t.finish(outcome)
        {
            self.breaker_transition(upstream.label, transition);
        }
    }
}

/// Who the SYN defense never bans: allow-listed sources and trusted proxies.
/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Started from the built-in quickstart config.
    #[error("started without --config: there is no file to reload")]
    NoFile,
    /// The file is invalid; the config in force stays.
    #[error("{0}")]
    Invalid(#[from] ConfigError),
}

/// The protocol an HTTP/1.1 request asks to upgrade to, if it does.
fn upgrade_protocol(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    asks.then(|| req.headers().get(UPGRADE).cloned()).flatten()
}

/// Whether the request's `TE` asks for trailers.
fn asks_trailers<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(http::header::TE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| {
            t.split(|b| *b == b';')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        })
}

/// A response extension: the place under the stream cap of a response
/// from an HTTP/2 upstream, moved into its body so that it is held until
/// the body is done.
#[derive(Clone)]
struct StreamSlot {
    _held: Arc<Slot>,
}

/// Whether an upstream request failed because reading the client's body did.
fn caused_by_client_body(e: &(dyn std::error::Error + 'static)) -> bool {
    in_error_chain(e, |err| err.is::<BodyError>())
}

/// Whether `e` or any error in its `source()` chain matches.
pub(crate) fn in_error_chain(
    e: &(dyn std::error::Error + 'static),
    matches: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if matches(err) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The response body, keeping its request "in flight" until fully sent so
/// the connection's idle deadline does not run during a long download.
pub struct ResponseBody {
    inner: Either<Incoming, Full<Bytes>>,
    guard: Option<(InFlight, Option<RequestPermit>)>,
    /// Its stream's place under an HTTP/2 upstream's cap.
    stream: Option<StreamSlot>,
    /// What is left of an upstream chunk handed out a frame at a time.
    rest: Option<Bytes>,
}

/// The most of an upstream chunk an HTTP/2 stream gets per poll. Its
/// stall deadline counts polls: hyper polls again only once the previous
/// chunk has gone out, and a chunk of hundreds of KiB through a small
/// window took longer than `write_timeout` for a client that reads
/// steadily, which was then reset. 64 KiB keeps that rate low (6.5 KB/s at
/// the default 10 s); 16 KiB pieces cost a fast h2 download on loopback a
/// measurable share of its throughput, 64 KiB pieces did not.
const H2_STEP: usize = 64 * 1024;

impl ResponseBody {
    /// A response of our own, answered before any upstream is asked.
    fn local(body: Full<Bytes>, guard: InFlight) -> Self {
        Self {
            inner: Either::Right(body),
            guard: Some((guard, None)),
            stream: None,
            rest: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(rest) = &mut this.rest {
            let piece = rest.split_to(rest.len().min(H2_STEP));
            if rest.is_empty() {
                this.rest = None;
            }
            crate::stall::body_polled(false);
            crate::stall::body_sent(piece.len());
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let polled = match &mut this.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx),
            Either::Right(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.guard = None;
            this.stream = None;
        }
        crate::stall::body_polled(polled.is_pending());
        match polled {
            Poll::Ready(Some(Ok(frame))) if crate::stall::watched() => match frame.into_data() {
                Ok(mut data) if data.len() > H2_STEP => {
                    this.rest = Some(data.split_off(H2_STEP));
                    crate::stall::body_sent(data.len());
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Ok(data) => {
                    crate::stall::body_sent(data.len());
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let Some(rest) = &self.rest else {
            return inner;
        };
        let rest = rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// What is known of a client connection.
#[derive(Clone)]
pub struct ClientConn {
    /// TCP peer (or the client a PROXY header named).
    pub peer: SocketAddr,
    /// Whether the connection is TLS (for `Forwarded: proto=`).
    pub tls: bool,
    /// Its admission permit, shared with tunnels that outlive the HTTP
    /// connection.
    pub permit: Option<Arc<Permit>>,
    /// The TLS fingerprint of its ClientHello, when on TLS and known;
    /// clearance cookies are bound to it.
    pub tls_fingerprint: Option<TlsFingerprint>,
    /// The server name the client asked for in its ClientHello (compared
    /// form), when on TLS and it named one.
    pub sni: Option<Arc<str>>,
}

/// A connection's TLS fingerprints: its JA4, which the access log and the
/// upstream see, and the stable one (the same without the extensions that
/// session resumption adds), which clearances, `ja4` limits and the `ja4`
/// breaker go by, so a browser that resumes its session stays itself.
pub type TlsFingerprint = palisade_core::ja4::Fingerprints;

/// The body of a forwarded response, or of a local 502/503/504.
pub type UpstreamResponseBody = Either<Incoming, Full<Bytes>>;

/// The daemon's side of the request pipeline: the shield of the config in
/// force, plus kernel bans and cluster-wide limits as further checks, and
/// metrics and logs for every decision.
#[derive(Clone)]
pub struct Hooks {
    app: Arc<App>,
    /// Whether the connection is TLS (the clearance cookie is `Secure` then).
    tls: bool,
    /// Its TLS fingerprint, which clearances are bound to.
    fingerprint: Option<TlsFingerprint>,
}

impl Hooks {
    /// The hooks of one client connection.
    pub fn new(app: Arc<App>, conn: &ClientConn) -> Self {
        Self {
            app,
            tls: conn.tls,
            fingerprint: conn.tls_fingerprint,
        }
    }
    /// The challenge's part of a decision: a page to answer with, a
    /// verification's answer, or nothing (cleared, not challenged, or
    /// refused in `decision`: a machine client that would need a page).
    fn challenge(
        &self,
        rt: &Runtime,
        req: &RequestFacts<'_>,
        decision: &mut Decision,
    ) -> Option<(Response<Full<Bytes>>, &'static str)> {
        let ch = rt.challenge.as_deref()?;
        // Allow-listed clients are outside it; refused ones stay refused.
        if decision.exempt || decision.rejection.is_some() {
            return None;
        }
        let app = &self.app;
        let now_ms = palisade_core::unix_now_ms();
        let prefix = Prefix::of(decision.client_ip);
        // A trusted proxy's ClientHello is its own, not its client's.
        let fingerprint = self
            .fingerprint
            .as_ref()
            .filter(|_| decision.client_ip == req.peer.to_canonical())
            .map(|f| f.stable.as_str().as_bytes());
        if req.path == challenge::VERIFY_PATH {
            return Some(self.verify(rt, ch, req, decision, prefix, fingerprint, now_ms));
        }
        let route = ch.route(decision.route);
        if route.mode == ChallengeMode::Off || route.api {
            return None;
        }
        let endpoint = rt.route_labels.get(decision.route).copied().unwrap_or("default");
        let attack = match route.mode {
            ChallengeMode::UnderAttack => ch.attack_level(decision.route, now_ms),
            _ => 0,
        };
        let now = app.now();
        let rep = rt.shield.reputation();
        let score = rep.map_or(100.0, |r| r.score(&decision.key, now));
        let mut refused_cookie = false;
        if let Some(value) = challenge::clearance_cookie(req.headers) {
            match ch.check_clearance(value, prefix, fingerprint, now_ms) {
                // At the limits every client has: the page was the only
                // thing between it and the upstream.
                Ok(()) => return None,
                Err(failure) => {
                    app.metrics
                        .clearances_refused
                        .get_or_create(&metrics::EndpointReasonLabels {
                            endpoint,
                            reason: failure.as_str(),
                        })
                        .inc();
                    app.challenge_penalty(rt, &decision.key, ch.settings().cookie_penalty, true);
                    refused_cookie = true;
                }
            }
        }
        let suspicious = score < f64::from(route.below);
        let needed = refused_cookie
            || match route.mode {
                ChallengeMode::Off => false,
                ChallengeMode::Suspicious => suspicious,
                ChallengeMode::UnderAttack => suspicious || attack > 0,
                ChallengeMode::Always => true,
            };
        if !needed {
            return None;
        }
        let navigation = matches!(*req.method, http::Method::GET | http::Method::HEAD);
        if !navigation || !challenge::accepts_html(req.headers) {
            // A machine client cannot solve a page: it gets the refusal
            // the page stands in for.
            let rejection = if attack > 0 {
                Rejection {
                    reason: RejectReason::RateLimited,
                    retry_after_secs: Some(1),
                    quota: None,
                }
            } else {
                Rejection {
                    reason: RejectReason::Reputation,
                    retry_after_secs: None,
                    quota: None,
                }
            };
            decision.apply(rejection, palisade_core::Mode::Enforce);
            return None;
        }
        let s = ch.settings();
        let difficulty = challenge::difficulty(
            s.difficulty,
            s.max_difficulty,
            score,
            route.below,
            s.block_below,
            attack,
        );
        let id = rt.route_ids.get(decision.route).copied().unwrap_or(0);
        let token = ch.issue(prefix, id, difficulty, now_ms);
        // Refunded by the solve: a client that never solves pays it for
        // every page (and is not persisted: one point is not news).
        app.challenge_penalty(rt, &decision.key, s.issue_penalty, false);
        app.metrics
            .challenges_issued
            .get_or_create(&metrics::EndpointLabel { endpoint })
            .inc();
        Some((ch.page(&token, difficulty, req.target), challenge::ISSUED))
    }

    /// Answers a solution sent to [`challenge::VERIFY_PATH`].
    #[allow(clippy::too_many_arguments)]
    fn verify(
        &self,
        rt: &Runtime,
        ch: &Challenger,
        req: &RequestFacts<'_>,
        decision: &Decision,
        prefix: Prefix,
        fingerprint: Option<&[u8]>,
        now_ms: u64,
    ) -> (Response<Full<Bytes>>, &'static str) {
        let app = &self.app;
        let (token, nonce, back) = challenge::solution(req.target);
        let back = challenge::return_path(back);
        match ch.verify(token, nonce, prefix, now_ms) {
            Ok(solved) => {
                let endpoint = rt.route_label_of(Some(solved.route));
                app.metrics
                    .challenges_solved
                    .get_or_create(&metrics::EndpointLabel { endpoint })
                    .inc();
                app.metrics
                    .challenge_solve
                    .get_or_create(&metrics::EndpointLabel { endpoint })
                    .observe(now_ms.saturating_sub(solved.issued_ms) as f64 / 1000.0);
                if let Some(rep) = rt.shield.reputation() {
                    let points = ch.settings().issue_penalty;
                    rep.refund(&decision.key, points, EventKind::Challenge, app.now());
                }
                let clearance = ch.clearance(prefix, fingerprint, now_ms);
                (ch.passed(&clearance, &back, self.tls), challenge::PASSED)
            }
            Err(rejected) => {
                let endpoint = rt.route_label_of(rejected.route);
                app.metrics
                    .challenges_failed
                    .get_or_create(&metrics::EndpointReasonLabels {
                        endpoint,
                        reason: rejected.failure.as_str(),
                    })
                    .inc();
                if rejected.failure == Failure::Expired {
                    // Solved too late (a tab left in the background): back
                    // to the page, which serves a fresh challenge.
                    return (challenge::back_to(&back), challenge::FAILED);
                }
                app.challenge_penalty(rt, &decision.key, ch.settings().fail_penalty, true);
                (challenge::failed(), challenge::FAILED)
            }
        }
    }
}

impl Pipeline for Hooks {
    type Clock = TokioClock;
    type Snapshot = Arc<Runtime>;
    type Tag = Tag;

    fn load(&self) -> Arc<Runtime> {
        self.app.runtime()
    }

    fn shield<'a>(&self, rt: &'a Arc<Runtime>) -> &'a Shield<TokioClock> {
        &rt.shield
    }

    fn tls_fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_ref().map(|f| f.stable.as_str())
    }

    fn banned(&self, _: &Arc<Runtime>, client: std::net::IpAddr) -> bool {
        self.app.syn_banned(client)
    }

    fn begin(&self, rt: &Arc<Runtime>, req: &RequestFacts<'_>, decision: &mut Decision) -> Tag {
        let app = &self.app;
        if let Some(cluster) = &app.cluster
            && decision.rejection.is_none()
            && !decision.exempt
            && let Some(Some(window)) = rt.cluster_windows.get(decision.route)
            && let Some((_, quota, mode)) = rt.shield.limit_for(decision.route)
            && !cluster.admit(
                window,
                &decision.key,
                quota.window_limit.get(),
                palisade_core::unix_now_ms(),
            )
        {
            app.metrics.cluster_limited.inc();
            let rejection = Rejection {
                reason: RejectReason::RateLimited,
                retry_after_secs: Some(1),
                quota: Some(quota),
            };
            decision.apply(rejection, mode);
        }
        let answer = self.challenge(rt, req, decision);
        let start = decision.started;
        let endpoint = rt.route_labels.get(decision.route).copied().unwrap_or("default");
        if let Some(t) = decision.transition {
            app.adaptive_transition(t);
        }
        if decision.flooded {
            Metrics::inc(&app.metrics.penalties, "flood");
            app.persist_score(rt, &decision.key);
            if app.log_budget.take(start) {
                tracing::warn!(client = %decision.client_ip, "flood: more than the per-second threshold; reputation penalised");
            }
        }
        if let Some(reason) = decision.would_block {
            Metrics::inc(&app.metrics.would_block, reason.as_str());
            if app.log_budget.take(start) {
                tracing::info!(client = %decision.client_ip, %reason, endpoint, "would_block (shadow mode)");
            }
        }
        if let Some(rej) = &decision.rejection
            && app.log_budget.take(start)
        {
            tracing::info!(client = %decision.client_ip, reason = %rej.reason, endpoint, "refused");
        }
        let log = app.access_log.get().and_then(|log| {
            // Refused already: whether it gets a line is known now, before
            // any formatting.
            if let Some(rej) = &decision.rejection
                && !log.allow_refusal(start, Refusal::Decision(rej.reason))
            {
                return None;
            }
            // Pages are served by the thousand under attack: on the budget.
            if answer
                .as_ref()
                .is_some_and(|(_, label)| *label == challenge::ISSUED)
                && !log.allow_refusal(start, Refusal::Challenge)
            {
                return None;
            }
            let header = |name| req.headers.get(name).map(HeaderValue::as_bytes);
            Some(log.begin(&RequestInfo {
                client: decision.client_ip,
                peer: req.peer,
                method: req.method.as_str(),
                target: req.target,
                version: req.version,
                referer: header(REFERER),
                user_agent: header(USER_AGENT),
                ja4: self.fingerprint.as_ref().map(|f| f.ja4.as_str()),
            }))
        });
        let (answer, challenge) = answer.unzip();
        Tag {
            method: metrics::method_label(req.method),
            log,
            answer,
            challenge,
        }
    }

    fn answer(&self, tag: &mut Tag) -> Option<Response<Full<Bytes>>> {
        tag.answer.take()
    }

    fn end(&self, rt: &Arc<Runtime>, f: Finished<'_, Tag>) {
        let app = &self.app;
        let d = f.decision;
        if f.effects.penalized {
            Metrics::inc(&app.metrics.penalties, "error_streak");
            app.persist_score(rt, &d.key);
        }
        if let Some(t) = f.effects.transition {
            app.adaptive_transition(t);
        }
        let refused = d
            .rejection
            .map(|r| r.reason)
            .or_else(|| f.extensions.and_then(|e| e.get::<LocalRefusal>()).map(|r| r.0));
        let Tag {
            method,
            log,
            challenge,
            ..
        } = f.tag;
        match challenge {
            Some(decision) if refused.is_none() => {
                app.metrics
                    .decisions
                    .get_or_create(&metrics::DecisionLabel { decision })
                    .inc();
            }
            _ => app.metrics.decision(refused),
        }
        let endpoint = rt.route_labels.get(d.route).copied().unwrap_or("default");
        app.metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint,
                method,
                status: f.status.as_u16(),
            })
            .inc();
        let now = app.now();
        let elapsed = now.saturating_sub(d.started);
        app.metrics
            .latency
            .get_or_create(&LatencyLabels { endpoint, method })
            .observe(elapsed as f64 / NANOS_PER_SEC as f64);
        if let (Some(pending), Some(out)) = (log, app.access_log.get()) {
            // A refusal only the answer knew of (in-flight cap, breakers)
            // takes its place in the budget now.
            if let Some(reason) = refused
                && d.rejection.is_none()
                && !out.allow_refusal(now, Refusal::Decision(reason))
            {
                out.discard(pending);
                return;
            }
            let status = f.status.as_u16();
            let forwarded = refused.is_none()
                && challenge.is_none()
                && f.extensions.is_some_and(|e| e.get::<NotForwarded>().is_none());
            // No body goes with these, whatever Content-Length says.
            let bodiless = method == "HEAD" || status < 200 || status == 204 || status == 304;
            out.finish(
                pending,
                &access_log::Outcome {
                    status,
                    bytes: if bodiless { Some(0) } else { f.body_len },
                    decision: match (refused, challenge) {
                        (Some(r), _) => r.as_str(),
                        (None, Some(c)) => c,
                        (None, None) => "allowed",
                    },
                    upstream_status: forwarded.then_some(status),
                    latency: elapsed,
                    unix_ms: palisade_core::unix_now_ms(),
                },
            );
        }
    }

    fn bad_request(&self, m: &Malformed<'_>) {
        self.app
            .answered_bad_request(m, self.fingerprint.as_ref().map(|f| f.ja4.as_str()));
    }

    fn admitted(&self, rt: &Arc<Runtime>, decision: &Decision, extensions: &mut http::Extensions) {
        // The default pool needs nothing carried: it is first in every
        // config, and the plain path saves the allocation.
        if let Some(&pool) = rt.config.route_pools.get(decision.route)
            && pool != 0
        {
            extensions.insert(Routed {
                runtime: rt.clone(),
                pool,
            });
        }
    }
}

/// A request extension: the pool its route goes to, in `runtime`.
#[derive(Clone)]
struct Routed {
    runtime: Arc<Runtime>,
    pool: usize,
}

/// What [`Hooks::begin`] hands to [`Hooks::end`].
pub struct Tag {
    /// The method label, read while the request is at hand.
    method: &'static str,
    /// The request's side of its access log line, when it gets one.
    log: Option<Pending>,
    /// The challenge's answer, taken by [`Hooks::answer`].
    answer: Option<Response<Full<Bytes>>>,
    /// The decision a challenge answer shows in metrics and the log.
    challenge: Option<&'static str>,
}

/// A response extension: the proxy answered itself (an upstream failure,
/// a refused CONNECT), so it carries no upstream status.
#[derive(Clone, Copy)]
struct NotForwarded;

fn not_forwarded(mut r: Response<UpstreamResponseBody>) -> Response<UpstreamResponseBody> {
    r.extensions_mut().insert(NotForwarded);
    r
}

/// The innermost service: forwards what the shield admitted.
#[derive(Clone)]
pub struct Forward {
    app: Arc<App>,
    conn: ClientConn,
}

impl tower_service::Service<Request<Incoming>> for Forward {
    type Response = Response<UpstreamResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let (app, conn) = (self.app.clone(), self.conn.clone());
        Box::pin(async move {
            if req.extensions().get::<OverInFlight>().is_some() {
                return Ok(over_in_flight());
            }
            // A reverse proxy tunnels nothing on request: forwarded, a
            // CONNECT reached the upstream naming the upstream itself.
            if req.method() == http::Method::CONNECT {
                return Ok(not_forwarded(
                    respond::text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n").map(Either::Right),
                ));
            }
            // hyper bounds the fields of an HTTP/1.1 head, but an HTTP/2
            // header block only by its size: without this, an h2 client
            // sent the upstream as many fields as fit in max_header_bytes.
            if req.version() == Version::HTTP_2
                && forwarded_fields(req.headers()) > app.runtime().config.server.max_headers
            {
                return Ok(not_forwarded(
                    respond::text(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "Request Header Fields Too Large\n",
                    )
                    .map(Either::Right),
                ));
            }
            if declares_too_large(&req, app.runtime().config.server.max_body_size) {
                Metrics::inc(
                    &app.metrics.upstream_errors,
                    UpstreamFailure::BodyTooLarge.as_str(),
                );
                return Ok(not_forwarded(
                    respond::upstream_failure(UpstreamFailure::BodyTooLarge).map(Either::Right),
                ));
            }
            Ok(app.pass(conn, req).await)
        })
    }
}

/// The header lines `headers` makes on HTTP/1.1, where an HTTP/2 client's
/// cookie crumbs are one `Cookie` line.
fn forwarded_fields(headers: &http::HeaderMap) -> usize {
    let cookies = headers.get_all(http::header::COOKIE).iter().count();
    headers.len() - cookies.saturating_sub(1)
}

/// Whether the request's `Content-Length` is over `max` (0 = no limit):
/// it is refused before the upstream is asked. A body without one is
/// counted as it streams (see body.rs).
fn declares_too_large(req: &Request<Incoming>, max: u64) -> bool {
    max > 0
        && req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|len| len > max)
}

/// Marks a request whose address has `connections.max_in_flight_per_ip`
/// requests in flight already: it goes through the pipeline (counted,
/// logged) and is answered 429 instead of forwarded.
#[derive(Clone, Copy)]
struct OverInFlight;

fn over_in_flight() -> Response<UpstreamResponseBody> {
    let rejection = Rejection {
        reason: RejectReason::RateLimited,
        retry_after_secs: Some(1),
        quota: None,
    };
    let mut r = respond::rejection(&rejection, "in_flight").map(Either::Right);
    r.extensions_mut().insert(LocalRefusal(RejectReason::RateLimited));
    r
}

/// The hyper service of one client connection.
#[derive(Clone)]
pub struct ProxyService {
    pipeline: ShieldService<Forward, Hooks>,
    activity: Arc<ConnActivity>,
    permit: Option<Arc<Permit>>,
    app: Arc<App>,
    peer: SocketAddr,
    fingerprint: Option<TlsFingerprint>,
    sni: Option<Arc<str>>,
}

impl ProxyService {
    /// The pipeline for a connection from `conn.peer`.
    pub fn new(app: Arc<App>, conn: ClientConn, activity: Arc<ConnActivity>) -> Self {
        let peer = conn.peer;
        let permit = conn.permit.clone();
        let fingerprint = conn.tls_fingerprint;
        let sni = conn.sni.clone();
        let pipeline = ShieldLayer::with_pipeline(Hooks::new(app.clone(), &conn))
            // Nothing downstream reads it: save the allocation.
            .expose_client_ip(false)
            .layer(Forward {
                app: app.clone(),
                conn,
            })
            .with_peer(peer);
        Self {
            pipeline,
            activity,
            permit,
            app,
            peer,
            fingerprint,
            sni,
        }
    }

    /// Whether a request on a TLS connection names a host that the
    /// connection was not made for: one that gets another certificate than
    /// the server name the client opened it with. A client that reused a
    /// connection for such a host (HTTP/2 coalescing, a certificate
    /// covering both) is told to open one of its own (421). Without a
    /// server name there is nothing to contradict.
    fn misdirected<B>(&self, req: &Request<B>) -> bool {
        let Some(sni) = &self.sni else {
            return false;
        };
        let sent = req
            .uri()
            .authority()
            .map(|a| a.as_str().as_bytes())
            .or_else(|| req.headers().get(HOST).map(HeaderValue::as_bytes));
        // An unreadable host is the pipeline's 400.
        let Some(Ok(host)) = sent.map(|h| palisade_core::normalize_host(h, Some(443))) else {
            return false;
        };
        let name = match host.strip_prefix('[') {
            Some(_) => host.split_once(']').map_or(&*host, |(v6, _)| &v6[1..]),
            None => host.rsplit_once(':').map_or(&*host, |(name, _)| name),
        };
        if name == &**sni {
            return false;
        }
        let rt = self.app.runtime();
        rt.config
            .tls
            .as_ref()
            .is_some_and(|tls| !tls.certificates.serves_alike(sni, name))
    }

    /// Tells the metrics and the access log of a request this service
    /// answers itself, before the pipeline.
    fn answered_early<B>(&self, req: &Request<B>, r: &Response<Full<Bytes>>) {
        self.app.answered_bad_request(
            &Malformed {
                peer: self.peer.ip(),
                method: req.method(),
                target: palisade::request_target(req.uri()),
                version: req.version(),
                headers: req.headers(),
                status: r.status(),
                body_len: r.body().size_hint().exact(),
            },
            self.fingerprint.as_ref().map(|f| f.ja4.as_str()),
        );
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        // RFC 9112 §3.2. Forwarded, it would match no host route and reach
        // the upstream with the upstream's own address as its host.
        if req.version() == Version::HTTP_11
            && req.uri().authority().is_none()
            && !req.headers().contains_key(HOST)
        {
            let r = respond::text(StatusCode::BAD_REQUEST, "Bad Request: no Host\n");
            self.answered_early(&req, &r);
            return Box::pin(std::future::ready(Ok(r.map(|b| ResponseBody::local(b, guard)))));
        }
        if self.misdirected(&req) {
            let r = respond::text(StatusCode::MISDIRECTED_REQUEST, "Misdirected Request\n");
            self.answered_early(&req, &r);
            return Box::pin(std::future::ready(Ok(r.map(|b| ResponseBody::local(b, guard)))));
        }
        if !chunked_alone(req.headers()) {
            let mut r = respond::text(
                StatusCode::BAD_REQUEST,
                "Bad Request: Transfer-Encoding other than chunked\n",
            );
            // The body is left unread: where the next request starts is
            // exactly what is in doubt.
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            self.answered_early(&req, &r);
            return Box::pin(std::future::ready(Ok(r.map(|b| ResponseBody::local(b, guard)))));
        }
        let request_permit = match self.permit.as_ref().map(Permit::begin_request) {
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                req.extensions_mut().insert(OverInFlight);
                None
            }
            None => None,
        };
        // gRPC calls are POSTs: a GET claiming the gRPC content type keeps
        // its HTTP status, or a refusal would be a 200 with an empty body
        // that a cache in front may keep and serve for that page.
        let grpc = req.version() == Version::HTTP_2
            && req.method() == http::Method::POST
            && respond::is_grpc(req.headers());
        let mut pipeline = self.pipeline.clone();
        Box::pin(async move {
            // Forward is always ready; the call keeps tower's contract anyway.
            std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut pipeline, cx)).await?;
            let resp = tower_service::Service::call(&mut pipeline, req).await?;
            let (mut head, body) = resp.into_parts();
            let stream = head.extensions.remove::<StreamSlot>();
            let mut inner = match body {
                Either::Left(forwarded) => forwarded,
                Either::Right(refusal) => Either::Right(refusal),
            };
            // Our own answer to a gRPC call (a refusal, an upstream
            // failure), after the metrics and the log counted its HTTP
            // status: in gRPC's terms, which its client reads.
            if grpc && matches!(inner, Either::Right(_)) && !respond::is_grpc(&head.headers) {
                respond::into_grpc(&mut head);
                inner = Either::Right(Full::new(Bytes::new()));
            }
            Ok(Response::from_parts(
                head,
                ResponseBody {
                    stream,
                    inner,
                    guard: Some((guard, request_permit)),
                    rest: None,
                },
            ))
        })
    }
}

/// Whether the request's `Transfer-Encoding`, if any, is one `chunked`
/// and nothing else (RFC 9112 §6.1). Hyper reads any list ending in
/// `chunked` as chunked and undoes only that coding: forwarded, the body of
/// `gzip, chunked` would reach the upstream still gzipped but framed as
/// plain, and parsers disagree on what `identity, chunked`, `chunked`
/// twice or two header lines mean.
fn chunked_alone(headers: &http::HeaderMap) -> bool {
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(te), None) => te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    }
}

/// At most a few log lines per second for per-request events, so an attack
/// cannot turn logging into its amplifier. Counters carry the full story.
#[derive(Default)]
pub struct LogBudget {
    /// `(second << 32) | lines`.
    state: AtomicU64,
}

impl LogBudget {
    const PER_SECOND: u64 = 20;

    /// Whether a line may be written at `now` (clock nanos).
    pub fn take(&self, now: u64) -> bool {
        let second = now / NANOS_PER_SEC;
        let prev = self.state.load(Ordering::Relaxed);
        if prev >> 32 != second {
            self.state.store((second << 32) | 1, Ordering::Relaxed);
            return true;
        }
        (self.state.fetch_add(1, Ordering::Relaxed) & u64::from(u32::MAX)) < Self::PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_budget_caps_lines_per_second() {
        let b = LogBudget::default();
        let granted = (0..1000).filter(|_| b.take(5 * NANOS_PER_SEC)).count();
        assert_eq!(granted as u64, LogBudget::PER_SECOND);
        assert!(b.take(6 * NANOS_PER_SEC));
    }
}
