//! Prometheus metrics. Label values come from fixed sets (route names
//! from the config, known methods, status codes), so cardinality is bounded
//! whatever clients send.

use std::sync::atomic::AtomicU64;

use http::Method;
use palisade_core::RejectReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name (`default` or a configured route).
    pub endpoint: &'static str,
    /// Method, or `OTHER`.
    pub method: &'static str,
    /// Response status code.
    pub status: u16,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// Route name.
    pub endpoint: &'static str,
    /// Method, or `OTHER`.
    pub method: &'static str,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The value.
    pub reason: &'static str,
}

/// A single `reason`/`kind`/`table` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The value.
    pub kind: &'static str,
}

/// Decision labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// `allowed`, `rate_limited`, `reputation_blocked` or `denylisted`.
    pub decision: &'static str,
}

/// Table labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `limiter:<route>`, `reputation`, `adaptive_breaker` or `connections`.
    pub table: String,
}

/// An upstream label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// The upstream's `host:port`.
    pub upstream: &'static str,
}

/// A pool member.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    /// The pool's name.
    pub pool: &'static str,
    /// The member's `host:port`.
    pub member: &'static str,
}

/// A health check's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// The pool's name.
    pub pool: &'static str,
    /// The member's `host:port`.
    pub member: &'static str,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// The series active health checks write, shared with their tasks.
#[derive(Clone)]
pub struct HealthFamilies {
    /// 1 while the member is in rotation, 0 while its checks hold it out.
    pub member_up: Family<MemberLabels, Gauge>,
    /// Checks by result.
    pub checks: Family<CheckLabels, Counter>,
}

impl HealthFamilies {
    /// Zero series for a member, and its state.
    pub fn member(&self, pool: &'static str, member: &'static str, up: bool) {
        self.member_up
            .get_or_create(&MemberLabels { pool, member })
            .set(i64::from(up));
        for result in ["success", "failure"] {
            let _ = self.checks.get_or_create(&CheckLabels { pool, member, result });
        }
    }

    /// Drops a member's series (it left the config).
    pub fn forget(&self, pool: &'static str, member: &'static str) {
        self.member_up.remove(&MemberLabels { pool, member });
        for result in ["success", "failure"] {
            self.checks.remove(&CheckLabels { pool, member, result });
        }
    }
}

/// The breaker series, shared with the tasks that move breakers.
#[derive(Clone)]
pub struct BreakerFamilies {
    /// Breaker state by upstream.
    pub state: Family<UpstreamLabel, Gauge>,
    /// Breaker transitions.
    pub transitions: Family<TransitionLabels, Counter>,
}

impl BreakerFamilies {
    /// Counts and logs a breaker transition (rare by construction: always
    /// logged).
    pub fn record(&self, upstream: &'static str, t: palisade_limits::breaker::Transition) {
        self.transitions
            .get_or_create(&TransitionLabels {
                upstream,
                from: t.from.as_str(),
                to: t.to.as_str(),
            })
            .inc();
        self.state
            .get_or_create(&UpstreamLabel { upstream })
            .set(t.to.gauge());
        tracing::warn!(
            upstream,
            from = t.from.as_str(),
            to = t.to.as_str(),
            requests = t.counts.requests,
            failures = t.counts.failures,
            successes = t.counts.successes,
            "circuit breaker"
        );
    }
}

/// A breaker transition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// The upstream's `host:port`.
    pub upstream: &'static str,
    /// State before.
    pub from: &'static str,
    /// State after.
    pub to: &'static str,
}

/// An adaptive breaker transition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdaptiveLabels {
    /// State before.
    pub from: &'static str,
    /// State after.
    pub to: &'static str,
    /// What caused it.
    pub reason: &'static str,
}

/// A state label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state.
    pub state: &'static str,
}

/// A spawn site label (`file:line`; a fixed set: places in the code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    /// Where the tasks are spawned.
    pub site: String,
}

/// Score bucket labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScoreLabel {
    /// `0-9` … `90-100`.
    pub bucket: &'static str,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by endpoint, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response head, by endpoint and method.
    pub latency: Family<LatencyLabels, Histogram>,
    /// Protection outcomes.
    pub decisions: Family<DecisionLabel, Counter>,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// What shadow-mode controls would have refused.
    pub would_block: Family<KindLabel, Counter>,
    /// Reputation penalties by reason.
    pub penalties: Family<KindLabel, Counter>,
    /// Upstream failures by kind (`connect`, `timeout`, `other`).
    pub upstream_errors: Family<KindLabel, Counter>,
    /// Connections closed by a timeout, by kind.
    pub conn_timeouts: Family<KindLabel, Counter>,
    /// HTTP/2 responses reset for making no progress towards the client.
    pub stalled_responses: Counter,
    /// TLS handshakes that failed (timeouts are in `conn_timeouts`).
    pub tls_handshake_errors: Family<KindLabel, Counter>,
    /// Connections refused at accept, by reason.
    pub connections_refused: Family<KindLabel, Counter>,
    /// Upgraded connections tunnelled, by mode (`splice`, `copy`).
    pub tunnels: Family<KindLabel, Counter>,
    /// Bytes moved through tunnels, by mode.
    pub tunnel_bytes: Family<KindLabel, Counter>,
    /// Live tasks in the runtime (sampled by the watchdog).
    pub tasks_alive: Gauge,
    /// Live tasks of the busiest spawn sites.
    pub task_sites: Family<SiteLabel, Gauge>,
    /// Task-growth alerts by spawn site.
    pub task_growth_alerts: Family<SiteLabel, Counter>,
    /// Maintenance pages sent, by how (`sendfile`, `copy`).
    pub maintenance_responses: Family<KindLabel, Counter>,
    /// Client connections accepted.
    pub connections: Counter,
    /// Client connections open now.
    pub connections_open: Gauge,
    /// Clients tracked, by table (refreshed at scrape).
    pub tracked_clients: Family<TableLabel, Gauge>,
    /// New clients that had to share an overflow slot, by table.
    pub table_overflows: Family<TableLabel, Counter<u64, AtomicU64>>,
    /// Records handed from an idle client to a new one, by table.
    pub table_takeovers: Family<TableLabel, Counter<u64, AtomicU64>>,
    /// Tracked clients by reputation score bucket (refreshed at scrape).
    pub reputation_scores: Family<ScoreLabel, Gauge>,
    /// Upstream breaker state: 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<UpstreamLabel, Gauge>,
    /// Upstream breaker transitions.
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    /// Pool members in rotation (1) or held out by their health checks (0).
    pub upstream_member_up: Family<MemberLabels, Gauge>,
    /// Active health checks by result.
    pub upstream_health_checks: Family<CheckLabels, Counter>,
    /// Adaptive (per-client) breaker transitions.
    pub adaptive_transitions: Family<AdaptiveLabels, Counter>,
    /// Clients per adaptive breaker state other than closed.
    pub adaptive_clients: Family<StateLabel, Gauge>,
    /// 1 if the last config reload applied, 0 if it was rejected.
    pub config_last_reload_success: Gauge,
    /// Reload attempts by result (`ok`, `error`).
    pub config_reloads: Family<KindLabel, Counter>,
    /// Entries in the reputation store (refreshed at scrape).
    pub store_entries: Gauge,
    /// The store's feed watermark.
    pub store_watermark: Gauge,
    /// Size of the store snapshot in bytes.
    pub store_bytes: Gauge,
    /// Store updates by result (`applied`, `rejected`, `unchanged`,
    /// `reloaded`).
    pub store_updates: Family<KindLabel, Counter>,
    /// Feed updates rejected whole, by `reason` (see
    /// [`crate::feed::REJECT_REASONS`]).
    pub feed_rejected: Family<ReasonLabel, Counter>,
    /// Learned-state log records by result (`written`, `dropped`, `failed`).
    pub state_records: Family<KindLabel, Counter>,
    /// Clients with durable learned state.
    pub state_entries: Gauge,
    /// 1 while the last cluster sync reached Redis.
    pub cluster_up: Gauge,
    /// Other live cluster nodes.
    pub cluster_peers: Gauge,
    /// Score changes by `kind`: `published`, `applied` (from other nodes),
    /// `dropped` (queue full).
    pub cluster_events: Family<KindLabel, Counter>,
    /// Cluster syncs that failed.
    pub cluster_sync_errors: Counter,
    /// Requests refused by the shared (cluster) limit.
    pub cluster_limited: Counter,
    /// Shared records ignored, by `reason`: `unauthenticated`, `malformed`,
    /// `out_of_range`, `refused` (policy), `stale`.
    pub cluster_records_rejected: Family<ReasonLabel, Counter>,
    /// SYNs to the listener seen by the capture socket since start (set
    /// from the defense's own count at each scrape).
    pub syn_seen: Counter,
    /// Active SYN-flood (and admin) bans.
    pub syn_bans_active: Gauge,
    /// Bans installed since start (set from the defense's count).
    pub syn_bans: Counter,
    /// Half-open (SYN-RECV) connections on the listener.
    pub syn_half_open: Gauge,
    /// Firewall transactions made by the ban thread.
    pub ban_batches: Counter,
    /// Bans and lifts asked of the ban thread.
    pub ban_requests: Counter,
    /// Bans refused by `reason` (a protected address's kind, `too_wide`,
    /// `too_long`, `budget`).
    pub bans_refused: Family<ReasonLabel, Counter>,
    /// The kernel's cumulative TCP counters at the last poll, by `kind`
    /// (syncookies_sent, listen_overflows, listen_drops, syn_retrans,
    /// passive_opens, ...).
    pub kernel_tcp: Family<KindLabel, Counter>,
    /// XDP program counters by `kind`: `seen`, `dropped`, `syns`.
    pub xdp_packets: Family<KindLabel, Counter>,
    /// Unix time of the last config load that applied (start included).
    pub last_reload_success_timestamp: Gauge<f64, AtomicU64>,
    /// Challenge pages served, by route.
    pub challenges_issued: Family<EndpointLabel, Counter>,
    /// Challenges solved (a clearance cookie set), by the route they were
    /// issued on.
    pub challenges_solved: Family<EndpointLabel, Counter>,
    /// Verifications refused, by route (`unknown` when the token is not
    /// ours) and `reason`.
    pub challenges_failed: Family<EndpointReasonLabels, Counter>,
    /// Clearance cookies refused (the client is challenged again), by route
    /// and `reason`.
    pub clearances_refused: Family<EndpointReasonLabels, Counter>,
    /// Time from issue to a verified solution, by route.
    pub challenge_solve: Family<EndpointLabel, Histogram>,
}

/// A route label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// Route name.
    pub endpoint: &'static str,
}

/// A route and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointReasonLabels {
    /// Route name.
    pub endpoint: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// `palisade_build_info` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// Whether this build carries the XDP program.
    xdp: &'static str,
}

/// Counters the daemon does not count itself but mirrors from another
/// count (the SYN defense's, the kernel's, the XDP program's) are set to
/// that count at each scrape. Callers serialize the refresh, so a counter
/// never goes back between two scrapes unless its source was reset.
pub fn set_counter(counter: &Counter, value: u64) {
    counter.inner().store(value, std::sync::atomic::Ordering::Relaxed);
}

/// Score buckets, matching `Reputation::distribution`.
pub const SCORE_BUCKETS: [&str; 10] = [
    "0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90-100",
];

impl Metrics {
    /// Registers every metric under the `palisade_` prefix.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("palisade");
        let requests = Family::default();
        registry.register("requests", "Requests answered", requests.clone());
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            latency.clone(),
        );
        let decisions = Family::default();
        registry.register("decisions", "Protection decisions", decisions.clone());
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped: the writer (disk) fell behind and its queue was full",
            access_log_dropped.clone(),
        );
        let would_block = Family::default();
        registry.register(
            "would_block",
            "Requests a shadow-mode control would have refused",
            would_block.clone(),
        );
        let penalties = Family::default();
        registry.register(
            "reputation_penalties",
            "Reputation penalties applied",
            penalties.clone(),
        );
        let upstream_errors = Family::default();
        registry.register(
            "upstream_errors",
            "Upstream request failures",
            upstream_errors.clone(),
        );
        let conn_timeouts = Family::default();
        registry.register(
            "connection_timeouts",
            "Client connections closed by a timeout",
            conn_timeouts.clone(),
        );
        let stalled_responses = Counter::default();
        registry.register(
            "stalled_responses",
            "HTTP/2 responses reset after no progress towards the client for server.write_timeout",
            stalled_responses.clone(),
        );
        let tls_handshake_errors = Family::default();
        registry.register(
            "tls_handshake_errors",
            "TLS handshakes that failed",
            tls_handshake_errors.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Connections reset at accept, by reason",
            connections_refused.clone(),
        );
        let tunnels = Family::default();
        registry.register(
            "tunnels",
            "Upgraded connections tunnelled, by mode",
            tunnels.clone(),
        );
        let tunnel_bytes = Family::default();
        registry.register(
            "tunnel_bytes",
            "Bytes moved through tunnels, by mode",
            tunnel_bytes.clone(),
        );
        let tasks_alive = Gauge::default();
        registry.register("tasks_alive", "Live tasks in the runtime", tasks_alive.clone());
        let task_sites = Family::default();
        registry.register(
            "task_sites",
            "Live tasks of the busiest spawn sites",
            task_sites.clone(),
        );
        let task_growth_alerts = Family::default();
        registry.register(
            "task_growth_alerts",
            "Task-growth (leak) alerts by spawn site",
            task_growth_alerts.clone(),
        );
        let maintenance_responses = Family::default();
        registry.register(
            "maintenance_responses",
            "Maintenance pages sent, by how",
            maintenance_responses.clone(),
        );
        let connections = Counter::default();
        registry.register("connections", "Client connections accepted", connections.clone());
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open",
            connections_open.clone(),
        );
        let tracked_clients = Family::default();
        registry.register(
            "tracked_clients",
            "Clients tracked per table",
            tracked_clients.clone(),
        );
        let table_overflows = Family::default();
        registry.register(
            "client_table_overflows",
            "New clients charged to a shared overflow slot because the table was full",
            table_overflows.clone(),
        );
        let table_takeovers = Family::default();
        registry.register(
            "client_table_takeovers",
            "Records handed from an idle client (state equal to a fresh one) to a new client",
            table_takeovers.clone(),
        );
        let reputation_scores = Family::default();
        registry.register(
            "reputation_scores",
            "Tracked clients by reputation score bucket",
            reputation_scores.clone(),
        );
        let breaker_state = Family::default();
        registry.register(
            "breaker_state",
            "Upstream circuit breaker state: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::default();
        registry.register(
            "breaker_transitions",
            "Upstream circuit breaker state changes",
            breaker_transitions.clone(),
        );
        let upstream_member_up = Family::default();
        registry.register(
            "upstream_member_up",
            "1 while a pool member is in rotation, 0 while its health checks hold it out",
            upstream_member_up.clone(),
        );
        let upstream_health_checks = Family::default();
        registry.register(
            "upstream_health_checks",
            "Active health checks of pool members, by result",
            upstream_health_checks.clone(),
        );
        let adaptive_transitions = Family::default();
        registry.register(
            "adaptive_breaker_transitions",
            "Per-client adaptive breaker state changes",
            adaptive_transitions.clone(),
        );
        let adaptive_clients = Family::default();
        registry.register(
            "adaptive_breaker_clients",
            "Clients per adaptive breaker state (closed ones are not counted)",
            adaptive_clients.clone(),
        );
        let config_last_reload_success = Gauge::default();
        registry.register(
            "config_last_reload_success",
            "1 if the last config reload applied, 0 if it was rejected",
            config_last_reload_success.clone(),
        );
        let config_reloads = Family::default();
        registry.register(
            "config_reloads",
            "Config reload attempts by result",
            config_reloads.clone(),
        );
        let store_entries = Gauge::default();
        registry.register(
            "store_entries",
            "Entries in the reputation store",
            store_entries.clone(),
        );
        let store_watermark = Gauge::default();
        registry.register(
            "store_watermark",
            "Feed watermark of the reputation store",
            store_watermark.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register(
            "store_bytes",
            "Size of the reputation store snapshot",
            store_bytes.clone(),
        );
        let store_updates = Family::default();
        registry.register(
            "store_updates",
            "Reputation store updates by result (applied, rejected, unchanged, reloaded)",
            store_updates.clone(),
        );
        let feed_rejected = Family::default();
        registry.register(
            "feed_rejected",
            "Reputation feed updates rejected whole (the store in force stays), by reason",
            feed_rejected.clone(),
        );
        let state_records = Family::default();
        registry.register(
            "state_records",
            "Learned-state log records by result (written, dropped, failed)",
            state_records.clone(),
        );
        let state_entries = Gauge::default();
        registry.register(
            "state_entries",
            "Clients with durable learned state",
            state_entries.clone(),
        );
        let cluster_up = Gauge::default();
        registry.register(
            "cluster_up",
            "1 while the last cluster sync reached Redis",
            cluster_up.clone(),
        );
        let cluster_peers = Gauge::default();
        registry.register("cluster_peers", "Other live cluster nodes", cluster_peers.clone());
        let cluster_events = Family::default();
        registry.register(
            "cluster_events",
            "Reputation changes shared with the cluster by kind (published, applied, dropped)",
            cluster_events.clone(),
        );
        let cluster_sync_errors = Counter::default();
        registry.register(
            "cluster_sync_errors",
            "Cluster syncs that failed",
            cluster_sync_errors.clone(),
        );
        let cluster_limited = Counter::default();
        registry.register(
            "cluster_limited",
            "Requests refused by a shared (cluster-wide) limit",
            cluster_limited.clone(),
        );
        let cluster_records_rejected = Family::default();
        registry.register(
            "cluster_records_rejected",
            "Shared cluster records ignored by reason: unauthenticated, malformed, out_of_range, refused (policy), stale (replayed or overtaken)",
            cluster_records_rejected.clone(),
        );
        let syn_seen = Counter::default();
        registry.register(
            "syn_seen",
            "SYNs to the listener seen by the capture socket since start",
            syn_seen.clone(),
        );
        let syn_bans_active = Gauge::default();
        registry.register(
            "syn_bans_active",
            "Active kernel bans (SYN flood and admin)",
            syn_bans_active.clone(),
        );
        let syn_bans = Counter::default();
        registry.register(
            "syn_bans_installed",
            "Kernel bans installed since start",
            syn_bans.clone(),
        );
        let syn_half_open = Gauge::default();
        registry.register(
            "syn_half_open",
            "Half-open (SYN-RECV) connections on the listener",
            syn_half_open.clone(),
        );
        let ban_batches = Counter::default();
        registry.register(
            "ban_batches",
            "Firewall transactions of the ban thread (each holds every ban and lift queued meanwhile)",
            ban_batches.clone(),
        );
        let ban_requests = Counter::default();
        registry.register(
            "ban_requests",
            "Bans and lifts asked of the ban thread (SYN defense, admin, cluster, expiry)",
            ban_requests.clone(),
        );
        let bans_refused = Family::default();
        registry.register(
            "bans_refused",
            "Bans refused (SYN defense, admin, cluster) by reason: a protected address, too wide, too long, over budget",
            bans_refused.clone(),
        );
        let kernel_tcp = Family::default();
        registry.register(
            "kernel_tcp",
            "The kernel's cumulative TCP counters (network namespace, since boot) at the SYN defense's last poll",
            kernel_tcp.clone(),
        );
        let xdp_packets = Family::default();
        registry.register(
            "xdp_packets",
            "XDP program counters: packets seen, dropped (banned source), SYNs",
            xdp_packets.clone(),
        );
        let last_reload_success_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_reload_success_timestamp_seconds",
            "Unix time of the last config load that applied (the start counts)",
            last_reload_success_timestamp.clone(),
        );
        let challenges_issued = Family::default();
        registry.register(
            "challenges_issued",
            "Proof-of-work challenge pages served, by route",
            challenges_issued.clone(),
        );
        let challenges_solved = Family::default();
        registry.register(
            "challenges_solved",
            "Challenges solved and answered with a clearance cookie, by route",
            challenges_solved.clone(),
        );
        let challenges_failed = Family::default();
        registry.register(
            "challenges_failed",
            "Challenge verifications refused, by route and reason",
            challenges_failed.clone(),
        );
        let clearances_refused = Family::default();
        registry.register(
            "clearances_refused",
            "Clearance cookies refused (forged, expired, moved), by route and reason",
            clearances_refused.clone(),
        );
        let challenge_solve = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0])
        });
        registry.register(
            "challenge_solve_duration_seconds",
            "Time from a challenge's issue to its verified solution",
            challenge_solve.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1: the version and whether the XDP program is compiled in",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                xdp: if crate::xdp_built() { "true" } else { "false" },
            })
            .set(1);
        root.register_collector(Box::new(crate::process::Process));
        let registry = root;
        let m = Self {
            challenges_issued,
            challenges_solved,
            challenges_failed,
            clearances_refused,
            challenge_solve,
            last_reload_success_timestamp,
            xdp_packets,
            kernel_tcp,
            syn_seen,
            syn_bans_active,
            syn_bans,
            syn_half_open,
            ban_batches,
            ban_requests,
            bans_refused,
            cluster_up,
            cluster_peers,
            cluster_events,
            cluster_sync_errors,
            cluster_limited,
            cluster_records_rejected,
            store_entries,
            store_watermark,
            store_bytes,
            store_updates,
            feed_rejected,
            state_records,
            state_entries,
            tasks_alive,
            task_sites,
            task_growth_alerts,
            maintenance_responses,
            tunnels,
            tunnel_bytes,
            connections_refused,
            tls_handshake_errors,
            adaptive_transitions,
            adaptive_clients,
            breaker_state,
            breaker_transitions,
            upstream_member_up,
            upstream_health_checks,
            config_last_reload_success,
            config_reloads,
            registry,
            requests,
            latency,
            decisions,
            access_log_dropped,
            would_block,
            penalties,
            upstream_errors,
            conn_timeouts,
            stalled_responses,
            connections,
            connections_open,
            tracked_clients,
            table_overflows,
            table_takeovers,
            reputation_scores,
        };
        m.zero_known_series();
        m
    }

    /// Creates every series whose labels are known in advance at zero, so
    /// dashboards and alerts see 0 rather than "no data" before the first
    /// event.
    fn zero_known_series(&self) {
        use palisade_limits::adaptive::{AdaptiveState as A, Reason as R};
        for kind in ["applied", "rejected", "unchanged", "reloaded"] {
            let _ = self.store_updates.get_or_create(&KindLabel { kind });
        }
        for reason in crate::feed::REJECT_REASONS {
            let _ = self.feed_rejected.get_or_create(&ReasonLabel { reason });
        }
        for kind in ["written", "dropped", "failed"] {
            let _ = self.state_records.get_or_create(&KindLabel { kind });
        }
        for kind in ["published", "applied", "dropped"] {
            let _ = self.cluster_events.get_or_create(&KindLabel { kind });
        }
        for kind in [
            "syncookies_sent",
            "syncookies_recv",
            "syncookies_failed",
            "listen_overflows",
            "listen_drops",
            "req_q_full_do_cookies",
            "req_q_full_drop",
            "syn_retrans",
            "passive_opens",
            "retrans_segs",
        ] {
            let _ = self.kernel_tcp.get_or_create(&KindLabel { kind });
        }
        for kind in ["seen", "dropped", "syns"] {
            let _ = self.xdp_packets.get_or_create(&KindLabel { kind });
        }
        let kinds: [(&Family<KindLabel, Counter>, &[&'static str]); 9] = [
            (
                &self.would_block,
                &[
                    "rate_limited",
                    "reputation_blocked",
                    "denylisted",
                    "client_breaker_open",
                ],
            ),
            (
                &self.penalties,
                &["flood", "error_streak", "syn_flood", "challenge"],
            ),
            (
                &self.upstream_errors,
                &[
                    "connect",
                    "timeout",
                    "slow_body",
                    "body_too_large",
                    "client_body",
                    "at_capacity",
                    "other",
                ],
            ),
            (
                &self.conn_timeouts,
                &["header", "idle", "write", "slow_read", "stalled", "tls_handshake"],
            ),
            (
                &self.connections_refused,
                &[
                    "max_connections",
                    "max_per_ip",
                    "per_ip_rate",
                    "global_rate",
                    "denylisted",
                    "untrusted_proxy",
                    "proxy_header",
                    "proxy_header_timeout",
                    "proxy_header_pending",
                    "syn_flood",
                ],
            ),
            (&self.config_reloads, &["ok", "error"]),
            (&self.tunnels, &["splice", "copy"]),
            (&self.tunnel_bytes, &["splice", "copy"]),
            (&self.maintenance_responses, &["sendfile", "copy"]),
        ];
        for (family, values) in kinds {
            for kind in values {
                let _ = family.get_or_create(&KindLabel { kind });
            }
        }
        let _ = self
            .tls_handshake_errors
            .get_or_create(&KindLabel { kind: "failed" });
        for decision in [
            "allowed",
            "rate_limited",
            "reputation_blocked",
            "denylisted",
            "breaker_open",
            "client_breaker_open",
            "challenge",
            "challenge_passed",
            "challenge_failed",
        ] {
            let _ = self.decisions.get_or_create(&DecisionLabel { decision });
        }
        for (from, to, reason) in [
            (A::Closed, A::Degraded, R::FailureRate),
            (A::Degraded, A::Open, R::FailureRate),
            (A::Degraded, A::HalfOpen, R::Calm),
            (A::Open, A::HalfOpen, R::OpenElapsed),
            (A::HalfOpen, A::Closed, R::ProbesSucceeded),
            (A::HalfOpen, A::Open, R::ProbeFailed),
        ] {
            let _ = self.adaptive_transitions.get_or_create(&AdaptiveLabels {
                from: from.as_str(),
                to: to.as_str(),
                reason: reason.as_str(),
            });
        }
    }

    /// Zero series for a challenged route (known once the config is).
    pub fn zero_challenge(&self, endpoint: &'static str) {
        let _ = self.challenges_issued.get_or_create(&EndpointLabel { endpoint });
        let _ = self.challenges_solved.get_or_create(&EndpointLabel { endpoint });
        for f in crate::challenge::Failure::ALL {
            let labels = EndpointReasonLabels {
                endpoint,
                reason: f.as_str(),
            };
            let _ = self.challenges_failed.get_or_create(&labels);
            // A cookie holds no nonce: it is never unsolved.
            if f != crate::challenge::Failure::Unsolved {
                let _ = self.clearances_refused.get_or_create(&labels);
            }
        }
    }

    /// Zero series for an upstream's breaker (known once the config is).
    pub fn zero_upstream(&self, upstream: &'static str) {
        let _ = self.breaker_state.get_or_create(&UpstreamLabel { upstream });
        for (from, to) in [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
            ("half_open", "open"),
        ] {
            let _ = self
                .breaker_transitions
                .get_or_create(&TransitionLabels { upstream, from, to });
        }
    }

    /// The series health checks write.
    pub fn health_families(&self) -> HealthFamilies {
        HealthFamilies {
            member_up: self.upstream_member_up.clone(),
            checks: self.upstream_health_checks.clone(),
        }
    }

    /// The breaker series.
    pub fn breaker_families(&self) -> BreakerFamilies {
        BreakerFamilies {
            state: self.breaker_state.clone(),
            transitions: self.breaker_transitions.clone(),
        }
    }

    /// Counts a protection outcome.
    pub fn decision(&self, rejected: Option<RejectReason>) {
        let decision = rejected.map_or("allowed", RejectReason::as_str);
        self.decisions.get_or_create(&DecisionLabel { decision }).inc();
    }

    /// Counts a kind-labelled event.
    pub fn inc(family: &Family<KindLabel, Counter>, kind: &'static str) {
        family.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts a feed update rejected for `reason`.
    pub fn rejected_feed(&self, reason: &'static str) {
        self.feed_rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The exposition: OpenMetrics when `openmetrics`, else the Prometheus
    /// text format 0.0.4 (what curl, promtool and older scrapers read).
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The method as a bounded label value.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// A route name as a `'static` label value. Names come from the config, so
/// the set is small; interning keeps reloads from growing it.
pub fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}
