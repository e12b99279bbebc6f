//! SYN-flood defense in the daemon.
//!
//! * A capture thread reads every SYN to our listener from an `AF_PACKET`
//!   socket (palisade-kernel's BPF filter) and flags a source the moment it
//!   and the global rate are over their thresholds.
//! * A ban thread is the only one to run the firewall and write the ban
//!   list after start: offenders, admin and cluster bans and lifts, expiry
//!   and reconciliation all queue for it, and it installs what queued
//!   meanwhile as one firewall transaction and one `bans.json` write,
//!   then answers who waits. For offenders it records how long after the
//!   first SYN the ban landed and takes `reputation_penalty` points.
//! * A poll task reads the kernel's TCP counters and half-open sockets,
//!   switches `tcp_syncookies` on when failed handshakes dominate for
//!   long enough (and back when they stop; judged by `CookieJudge`), and
//!   asks the ban thread to expire bans and reconcile the kernel's set.
//!
//! Without `CAP_NET_RAW` there is no capture (counters only); without
//! `CAP_NET_ADMIN` the firewall is a dry run. Both are said at start.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use palisade_core::{Clock as _, MonotonicClock, unix_now};
use palisade_kernel::capture::{SynCapture, SynRates, SynThresholds};
use palisade_kernel::firewall::{DryRun, Firewall, Iptables, Nftables};
use palisade_kernel::procnet::{TcpCounters, half_open, parse_tcp_table};
use palisade_kernel::xdp::{XdpDefense, XdpMode, XdpStats, interfaces_for};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::{FirewallChoice, SynSettings};
use crate::never_ban::NeverBan;

const SYNCOOKIES: &str = "/proc/sys/net/ipv4/tcp_syncookies";
/// Half-open connections from one source that make it an offender.
const HALF_OPEN_OFFENDER: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One active ban.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ban {
    /// The banned network (an IPv4 address or an IPv6 /64).
    pub net: IpNet,
    /// Unix seconds when it lapses.
    pub until: u64,
    /// `syn_flood` or `admin`.
    pub reason: String,
    /// SYNs/s from it when it was banned.
    pub rate: u64,
    /// Milliseconds from its first SYN to the ban in the kernel.
    pub latency_ms: Option<f64>,
    /// Milliseconds the firewall took to install the batch it was in.
    #[serde(default)]
    pub install_ms: Option<f64>,
}

/// Why a ban was not made.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// It overlaps an address that must stay reachable.
    #[error("{net} overlaps {covered}, which is never banned ({reason})")]
    Protected {
        /// The ban asked for.
        net: IpNet,
        /// The protected network it overlaps.
        covered: IpNet,
        /// Why that one is protected.
        reason: &'static str,
    },
    /// A prefix wider than `syn.min_prefix_v4`/`v6`.
    #[error("{net} is wider than /{min} (syn.min_prefix_v4, syn.min_prefix_v6)")]
    TooWide {
        /// The ban asked for.
        net: IpNet,
        /// The widest prefix allowed for its family.
        min: u8,
    },
    /// Longer than `syn.max_ban_duration`.
    #[error("{secs}s is longer than syn.max_ban_duration ({max}s)")]
    TooLong {
        /// Asked for.
        secs: u64,
        /// Allowed.
        max: u64,
    },
    /// The firewall failed.
    #[error("{0}")]
    Firewall(String),
}

impl BanError {
    /// The ban was refused by policy (a client error), not failed.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::Firewall(_))
    }

    /// The `reason` label of `palisade_bans_refused_total`.
    fn reason(&self) -> &'static str {
        match self {
            Self::Protected { reason, .. } => reason,
            Self::TooWide { .. } => "too_wide",
            Self::TooLong { .. } => "too_long",
            Self::Firewall(_) => "firewall",
        }
    }
}

struct Offender {
    ip: IpAddr,
    first_seen: u64,
    rate: u64,
    global: u64,
}

/// Jobs the ban thread holds at most; past that, offenders are dropped and
/// asking callers wait (asynchronously) for room.
const JOBS: usize = 4096;
/// Jobs one batch takes at most.
const MAX_BATCH: usize = 4096;

/// What the ban thread is asked to do.
enum Job {
    /// A source the capture thread, the XDP reader or the poll flagged.
    Offender(Offender),
    /// A ban asked for (admin, cluster), admitted already.
    Ban {
        ban: Ban,
        /// Only where it outlasts the ban in force (a cluster ban).
        only_if_longer: bool,
        /// Tell the cluster once it is in.
        share: bool,
        done: Option<oneshot::Sender<Result<(), BanError>>>,
    },
    /// A lift asked for; answers whether there was a ban.
    Unban {
        net: IpNet,
        share: bool,
        done: Option<oneshot::Sender<Result<bool, String>>>,
    },
    /// Lift the bans that lapsed.
    Expire,
    /// Make the kernel's set match our list.
    Reconcile,
    /// Shutting down.
    Stop,
}

/// Who asked for a change in a batch, to be answered after it.
enum Origin {
    Offender(Offender),
    Ban {
        share: bool,
        done: Option<oneshot::Sender<Result<(), BanError>>>,
    },
    Unban {
        share: bool,
        done: Option<oneshot::Sender<Result<bool, String>>>,
    },
    Expiry,
}

/// One change asked of the ban list.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    Ban { ban: Ban, only_if_longer: bool },
    Unban(IpNet),
}

/// What a batch of changes comes to: one install and one lift per
/// network, whatever the batch asked of it in between.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// Bans to put in (new, or replacing the one in force).
    install: Vec<Ban>,
    /// Networks to lift.
    lift: Vec<IpNet>,
    /// Per change, in order: for a ban, whether it took effect; for a
    /// lift, whether there was a ban to lift.
    outcome: Vec<bool>,
}

/// Folds `changes`, in order, over the bans in force: the last word on a
/// network wins, a cluster ban yields to a longer one, and a lift reports
/// whether the ban it lifts existed (in force or earlier in the batch).
fn plan(current: &BTreeMap<IpNet, Ban>, changes: &[Change]) -> Plan {
    let mut last: BTreeMap<IpNet, Option<Ban>> = BTreeMap::new();
    let mut outcome = Vec::with_capacity(changes.len());
    for change in changes {
        let net = match change {
            Change::Ban { ban, .. } => ban.net,
            Change::Unban(net) => *net,
        };
        let now = match last.get(&net) {
            Some(b) => b.as_ref(),
            None => current.get(&net),
        };
        match change {
            Change::Ban { ban, only_if_longer } => {
                if *only_if_longer && now.is_some_and(|b| b.until >= ban.until) {
                    outcome.push(false);
                } else {
                    last.insert(net, Some(ban.clone()));
                    outcome.push(true);
                }
            }
            Change::Unban(_) => {
                outcome.push(now.is_some());
                last.insert(net, None);
            }
        }
    }
    let mut plan = Plan {
        outcome,
        ..Plan::default()
    };
    for (net, ban) in last {
        match ban {
            Some(b) => plan.install.push(b),
            // The kernel may hold a ban we do not (the firewall ignores
            // absent ones), so a lift always goes through.
            None => plan.lift.push(net),
        }
    }
    plan
}

/// Whether a ban wider than `net` is in `held`.
fn covered(net: &IpNet, held: impl Fn(&IpNet) -> bool) -> bool {
    (0..net.prefix_len()).any(|len| IpNet::new(net.addr(), len).is_ok_and(|wider| held(&wider.trunc())))
}

/// The networks of `bans` strictly inside `net`.
fn inside<'a>(bans: &'a BTreeMap<IpNet, Ban>, net: &IpNet) -> impl Iterator<Item = IpNet> + 'a {
    let (lo, hi) = (
        IpNet::new(net.network(), 0).unwrap_or(*net),
        IpNet::new(net.broadcast(), net.max_prefix_len()).unwrap_or(*net),
    );
    let net = *net;
    bans.range(lo..=hi)
        .map(|(n, _)| *n)
        .filter(move |n| *n != net && net.contains(n))
}

/// The bans the kernel holds: those no wider ban covers. nftables refuses
/// an interval that overlaps one it holds, so a ban of `198.51.100.0/24`
/// while `198.51.100.7` was banned used to fail whole (and an attacker
/// could shield its network by getting one address of it banned first).
/// A ban inside a wider one stays out of the kernel, whose wider element
/// drops its packets, and goes in when the wider one is lifted. In user
/// space every ban holds, at accept, whatever the kernel has.
fn kernel_view(bans: &BTreeMap<IpNet, Ban>, now: u64) -> Vec<(IpNet, Duration)> {
    bans.values()
        .filter(|b| !covered(&b.net, |n| bans.contains_key(n)))
        .map(|b| (b.net, Duration::from_secs(b.until.saturating_sub(now).max(1))))
        .collect()
}

/// What the kernel must change for `plan` to move the bans from `before`
/// (see [`kernel_view`]): bans to put in, and lifts. A network in both is
/// replaced (a re-ban, for its new duration). Only networks the plan
/// touches, and those inside them, are looked at.
fn kernel_changes(
    before: &BTreeMap<IpNet, Ban>,
    plan: &Plan,
    now: u64,
) -> (Vec<(IpNet, Duration)>, Vec<IpNet>) {
    let installed: BTreeMap<IpNet, &Ban> = plan.install.iter().map(|b| (b.net, b)).collect();
    let lifted: HashSet<IpNet> = plan.lift.iter().copied().collect();
    let held_after = |n: &IpNet| installed.contains_key(n) || (before.contains_key(n) && !lifted.contains(n));
    let mut affected: BTreeSet<IpNet> = installed.keys().copied().chain(lifted.iter().copied()).collect();
    for touched in installed.keys().chain(lifted.iter()) {
        affected.extend(inside(before, touched));
        affected.extend(
            installed
                .keys()
                .filter(|n| *n != touched && touched.contains(*n))
                .copied(),
        );
    }
    let ttl = |until: u64| Duration::from_secs(until.saturating_sub(now).max(1));
    let (mut ban, mut lift) = (Vec::new(), Vec::new());
    for net in affected {
        let was = before.contains_key(&net) && !covered(&net, |n| before.contains_key(n));
        let is = held_after(&net) && !covered(&net, held_after);
        let until = installed
            .get(&net)
            .map(|b| b.until)
            .or_else(|| before.get(&net).map(|b| b.until));
        match (was, is, until) {
            (false, true, Some(until)) => ban.push((net, ttl(until))),
            (true, true, Some(until)) if installed.contains_key(&net) => {
                ban.push((net, ttl(until)));
                lift.push(net);
            }
            (true, false, _) => lift.push(net),
            // The kernel may hold a ban we do not (the firewall ignores
            // absent ones), so a lift of one we do not know goes through.
            (false, false, _) if lifted.contains(&net) && !before.contains_key(&net) => lift.push(net),
            _ => {}
        }
    }
    (ban, lift)
}

fn stopped() -> BanError {
    BanError::Firewall("the SYN defense is shutting down".into())
}

/// The latest kernel view, for `/syn-stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Per second over the last poll.
    pub rates: TcpCounters,
    /// The counters as read at the last poll, for `/metrics` (which leaves
    /// rates to the query).
    #[serde(skip)]
    pub totals: TcpCounters,
    /// SYN-RECV sockets on our port.
    pub half_open: usize,
    /// Sources with the most half-open connections.
    pub half_open_top: Vec<(IpAddr, usize)>,
    /// Failed handshakes (SYN-ACK retransmits, SYNs dropped for a full SYN
    /// queue, unanswered cookies) ÷ (failed + passive opens), last second.
    pub retransmit_ratio: f64,
    /// `net.ipv4.tcp_syncookies` now (None: unreadable).
    pub syncookies: Option<u8>,
    /// We switched syncookies on (and will restore the old value).
    pub syncookies_forced: bool,
    /// Why: `retransmits` or `ban_budget`.
    pub syncookies_reason: Option<&'static str>,
    /// The switch's last steps, oldest first.
    pub syncookie_steps: Vec<CookieStep>,
    /// The XDP program's counters (when attached).
    pub xdp: Option<XdpStats>,
}

/// The running defense.
pub struct SynDefense {
    settings: SynSettings,
    port: u16,
    v6_prefix: u8,
    firewall: Box<dyn Firewall>,
    capturing: bool,
    bans: Mutex<BTreeMap<IpNet, Ban>>,
    banned: ArcSwap<HashSet<IpNet>>,
    /// Bans wider than one key (CIDR bans), checked by containment.
    banned_wide: ArcSwap<Vec<IpNet>>,
    rates: Mutex<SynRates>,
    snapshot: Mutex<Snapshot>,
    bans_path: Option<PathBuf>,
    clock: MonotonicClock,
    stop: Arc<AtomicBool>,
    /// Tells the cluster about bans made here.
    share: Arc<dyn Fn(IpNet, u64) + Send + Sync>,
    /// The XDP layer, when attached.
    xdp: Mutex<Option<XdpDefense>>,
    /// The ban thread's queue: offenders (capture, XDP, poll), bans and
    /// lifts asked for (admin, cluster), expiry and reconciliation.
    jobs: mpsc::Sender<Job>,
    /// Firewall transactions the ban thread made.
    batches: AtomicU64,
    /// Changes asked of the ban thread (bans and lifts).
    ban_requests: AtomicU64,
    /// Retransmitted SYNs per source at the last XDP read.
    xdp_retrans: Mutex<HashMap<IpAddr, u64>>,
    syns: AtomicU64,
    bans_total: AtomicU64,
    attack: AtomicBool,
    /// What no ban may cover (see [`NeverBan`]).
    never_ban: ArcSwap<NeverBan>,
    /// Bans refused, by reason.
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// When the per-source SYN bans of the last minute were made.
    budget: Mutex<VecDeque<u64>>,
    /// More offenders than the ban budget: the poll turns syncookies on.
    over_budget: AtomicBool,
}

impl std::fmt::Debug for SynDefense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynDefense")
            .field("firewall", &self.firewall.name())
            .field("capturing", &self.capturing)
            .finish_non_exhaustive()
    }
}

/// Attaches the XDP program to the interfaces carrying `listen`, or says
/// why not.
fn attach_xdp(listen: std::net::SocketAddr) -> Option<XdpDefense> {
    if listen.ip().is_loopback() {
        // Nothing reaches a loopback listener through a driver.
        tracing::info!(%listen, "SYN defense: loopback listener, XDP not attached");
        return None;
    }
    if !XdpDefense::built() {
        tracing::info!(
            "SYN defense: this build has no XDP program (built without clang): nftables and capture only"
        );
        return None;
    }
    let interfaces = match interfaces_for(listen.ip()) {
        Ok(i) if !i.is_empty() => i,
        Ok(_) => {
            tracing::warn!(%listen, "SYN defense: no interface carries the listen address: XDP not attached");
            return None;
        }
        Err(e) => {
            tracing::warn!("SYN defense: listing interfaces failed ({e}): XDP not attached");
            return None;
        }
    };
    let names: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    match XdpDefense::attach(&names, XdpMode::Default, &[listen.port()]) {
        Ok(x) => {
            tracing::info!(interfaces = ?interfaces, "SYN defense: XDP program attached (banned sources dropped in the driver hook)");
            Some(x)
        }
        Err(e) => {
            tracing::warn!(
                "SYN defense: XDP not attached ({e}; needs root and BPF): nftables and capture only"
            );
            None
        }
    }
}

fn choose_firewall(
    choice: FirewallChoice,
    timeout: Duration,
    port: u16,
    synproxy: &[u16],
) -> (Box<dyn Firewall>, Option<String>) {
    let nft = Nftables::new(timeout, &[port]).with_synproxy(synproxy);
    let ipt = Iptables::new(timeout, &[port]);
    let mut why = Vec::new();
    let candidates: Vec<Box<dyn Firewall>> = match choice {
        FirewallChoice::DryRun => return (Box::new(DryRun::default()), None),
        FirewallChoice::Nftables => vec![Box::new(nft)],
        FirewallChoice::Iptables => vec![Box::new(ipt)],
        FirewallChoice::Auto => vec![Box::new(nft), Box::new(ipt)],
    };
    for fw in candidates {
        match fw.setup() {
            Ok(()) => return (fw, (!why.is_empty()).then(|| why.join("; "))),
            Err(e) => why.push(format!("{}: {e}", fw.name())),
        }
    }
    (Box::new(DryRun::default()), Some(why.join("; ")))
}

/// One change of `net.ipv4.tcp_syncookies`, for `/syn-stats`.
#[derive(Debug, Clone, Serialize)]
pub struct CookieStep {
    /// Unix seconds.
    pub at: u64,
    /// The value written.
    pub syncookies: u8,
    /// `retransmits`, `ban_budget` (on) or `recovered` (back).
    pub reason: &'static str,
    /// The retransmit ratio over the last second then.
    pub ratio: f64,
}

/// How far back the failed-handshake ratio looks: one 100 ms poll may see
/// no failure even under a steady flood (the kernel retransmits a SYN-ACK
/// 1, 3, 7... seconds after its SYN); a second of polls does.
const RATIO_WINDOW: u64 = 1_000_000_000;
/// Switch steps kept for `/syn-stats`.
const STEPS_KEPT: usize = 16;

/// A change of `net.ipv4.tcp_syncookies` the judge asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    /// Turn it on, for this reason (`retransmits`, `ban_budget`).
    On(&'static str),
    /// Put back what it was: the ratio stayed low long enough.
    Off,
}

/// Judges from counter deltas when syncookies must be forced on and when
/// they may go back: a pure function of what it is shown and when, so its
/// timing is tested without sleeping; the sysctl is written by the caller.
#[derive(Debug, Default)]
struct CookieJudge {
    /// (when, failed handshakes, passive opens) per poll, last second.
    window: VecDeque<(u64, u64, u64)>,
    high_since: Option<u64>,
    low_since: Option<u64>,
    /// Why we forced it on (None: we did not).
    forced: Option<&'static str>,
}

impl CookieJudge {
    /// Failed handshakes ÷ (failed + passive opens) over the window.
    fn ratio(&self) -> f64 {
        let (r, o) = self
            .window
            .iter()
            .fold((0u64, 0u64), |(r, o), (_, dr, dop)| (r + dr, o + dop));
        if r + o == 0 {
            0.0
        } else {
            r as f64 / (r + o) as f64
        }
    }

    /// One poll's deltas at `now` (ns): handshakes that failed (see
    /// [`failed_handshakes`]) and passive opens. Above `threshold` for `after`:
    /// on; below half of it for `after` while forced: off; in between
    /// neither clock runs. A flood from more sources than the ban budget
    /// (`over_budget`) turns it on at once.
    fn observe(
        &mut self,
        now: u64,
        failed: u64,
        opens: u64,
        over_budget: bool,
        threshold: f64,
        after: u64,
    ) -> (f64, Option<Switch>) {
        self.window.push_back((now, failed, opens));
        while self
            .window
            .front()
            .is_some_and(|(t, ..)| now.saturating_sub(*t) >= RATIO_WINDOW)
        {
            self.window.pop_front();
        }
        let ratio = self.ratio();
        if over_budget {
            self.low_since = None;
            return (ratio, self.forced.is_none().then_some(Switch::On("ban_budget")));
        }
        if ratio > threshold {
            self.low_since = None;
            let since = *self.high_since.get_or_insert(now);
            let due = now.saturating_sub(since) >= after && self.forced.is_none();
            return (ratio, due.then_some(Switch::On("retransmits")));
        }
        self.high_since = None;
        if ratio >= threshold / 2.0 {
            self.low_since = None;
            return (ratio, None);
        }
        let since = *self.low_since.get_or_insert(now);
        let due = now.saturating_sub(since) >= after && self.forced.is_some();
        (ratio, due.then_some(Switch::Off))
    }
}

/// What the counter poll carries from one look to the next.
struct PollState {
    last: Option<TcpCounters>,
    diag_failed: bool,
    last_at: u64,
    judge: CookieJudge,
    /// The sysctl's value before we forced it on.
    restore_to: Option<u8>,
    /// The last switch steps, oldest first.
    steps: VecDeque<CookieStep>,
    reconciled: u64,
    xdp_last: Option<XdpStats>,
    /// Half-open sockets at the last dump.
    half_open_last: usize,
}

impl PollState {
    fn new(now: u64) -> Self {
        Self {
            last: TcpCounters::read().ok(),
            diag_failed: false,
            last_at: now,
            judge: CookieJudge::default(),
            restore_to: None,
            steps: VecDeque::new(),
            reconciled: 0,
            xdp_last: None,
            half_open_last: 0,
        }
    }

    fn step(&mut self, syncookies: u8, reason: &'static str, ratio: f64) {
        if self.steps.len() == STEPS_KEPT {
            self.steps.pop_front();
        }
        self.steps.push_back(CookieStep {
            at: unix_now(),
            syncookies,
            reason,
            ratio: (ratio * 1000.0).round() / 1000.0,
        });
    }
}

impl SynDefense {
    /// Starts capture (when permitted), the firewall and the ban thread;
    /// restores persisted bans. `penalize` is called for every offender.
    pub fn start(
        settings: SynSettings,
        listen: std::net::SocketAddr,
        v6_prefix: u8,
        data_dir: Option<PathBuf>,
        penalize: Arc<dyn Fn(IpAddr) + Send + Sync>,
        share: Arc<dyn Fn(IpNet, u64) + Send + Sync>,
        never_ban: NeverBan,
    ) -> Arc<Self> {
        let (firewall, fallback) = choose_firewall(
            settings.firewall,
            settings.ban_duration,
            listen.port(),
            &settings.synproxy_ports,
        );
        if !settings.synproxy_ports.is_empty() {
            if firewall.name() == "nftables" {
                // SYNPROXY only sees the client's ACK if conntrack does not
                // adopt mid-stream packets (the namespace's own sysctl).
                const LOOSE: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose";
                match std::fs::write(LOOSE, "0\n") {
                    Ok(()) => tracing::info!(
                        ports = ?settings.synproxy_ports,
                        "SYN defense: SYNPROXY answers handshakes (net.netfilter.nf_conntrack_tcp_loose=0)"
                    ),
                    Err(e) => {
                        tracing::warn!("SYN defense: SYNPROXY set up, but {LOOSE}: {e}; handshakes may fail")
                    }
                }
            } else {
                tracing::warn!("SYN defense: SYNPROXY needs nftables; not set up");
            }
        }
        if let Some(why) = &fallback {
            tracing::warn!("SYN defense: bans are a dry run (nothing changes in the kernel): {why}");
        }
        let capture = match SynCapture::open() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    "SYN defense: no per-source SYN capture ({e}; needs CAP_NET_RAW): kernel counters only"
                );
                None
            }
        };
        let thresholds = SynThresholds {
            global_per_sec: settings.global_threshold,
            source_per_sec: settings.source_threshold,
        };
        let bans_path = data_dir.map(|d| d.join("bans.json"));
        let xdp = if settings.xdp { attach_xdp(listen) } else { None };
        let port = listen.port();
        let (jobs, rx) = mpsc::channel::<Job>(JOBS);
        let defense = Arc::new(Self {
            port,
            v6_prefix,
            capturing: capture.is_some(),
            bans: Mutex::new(BTreeMap::new()),
            banned: ArcSwap::from_pointee(HashSet::new()),
            banned_wide: ArcSwap::from_pointee(Vec::new()),
            rates: Mutex::new(SynRates::new(thresholds, 100_000)),
            snapshot: Mutex::new(Snapshot::default()),
            bans_path,
            clock: MonotonicClock::new(),
            stop: Arc::new(AtomicBool::new(false)),
            share,
            xdp: Mutex::new(xdp),
            jobs,
            batches: AtomicU64::new(0),
            ban_requests: AtomicU64::new(0),
            xdp_retrans: Mutex::new(HashMap::new()),
            syns: AtomicU64::new(0),
            bans_total: AtomicU64::new(0),
            attack: AtomicBool::new(false),
            never_ban: ArcSwap::from_pointee(never_ban),
            refused: Mutex::new(BTreeMap::new()),
            budget: Mutex::new(VecDeque::new()),
            over_budget: AtomicBool::new(false),
            firewall,
            settings,
        });
        defense.restore();
        {
            let d = defense.clone();
            let spawned = std::thread::Builder::new()
                .name("palisade-bans".into())
                .spawn(move || d.ban_loop(rx, &*penalize));
            if let Err(e) = spawned {
                tracing::error!("SYN defense: cannot start the ban thread: {e}");
            }
        }
        if let Some(cap) = capture {
            let d = defense.clone();
            let spawned = std::thread::Builder::new()
                .name("palisade-syn".into())
                .spawn(move || d.capture_loop(&cap));
            if let Err(e) = spawned {
                tracing::error!("SYN defense: cannot start the capture thread: {e}");
            }
        }
        tracing::info!(
            port,
            capture = defense.capturing,
            xdp = ?lock(&defense.xdp).as_ref().map(|x| x.interfaces().to_vec()),
            firewall = defense.firewall.name(),
            global_threshold = defense.settings.global_threshold,
            source_threshold = defense.settings.source_threshold,
            "SYN defense on"
        );
        defense
    }

    /// The ban key of an address: itself, or its IPv6 prefix.
    pub fn key(&self, ip: IpAddr) -> IpNet {
        match ip.to_canonical() {
            IpAddr::V4(a) => IpNet::from(IpAddr::V4(a)),
            IpAddr::V6(a) => {
                IpNet::new(IpAddr::V6(a), self.v6_prefix).map_or(IpNet::from(IpAddr::V6(a)), |n| n.trunc())
            }
        }
    }

    /// What no ban may cover; set at start and on every reload.
    pub fn set_never_ban(&self, never_ban: NeverBan) {
        self.never_ban.store(Arc::new(never_ban));
    }

    /// Refuses `net` when it overlaps the never-ban set: counted by reason
    /// and logged (the first, second, fourth... time per reason, so a flood
    /// of refusals cannot flood the log).
    fn refuse_protected(&self, net: IpNet, path: &str) -> Result<(), BanError> {
        match self.never_ban.load().covers(&net) {
            None => Ok(()),
            Some((covered, why)) => {
                let e = BanError::Protected {
                    net,
                    covered,
                    reason: why.as_str(),
                };
                self.count_refusal(&e, path);
                Err(e)
            }
        }
    }

    fn count_refusal(&self, e: &BanError, path: &str) {
        let n = {
            let mut refused = lock(&self.refused);
            let n = refused.entry(e.reason()).or_insert(0);
            *n += 1;
            *n
        };
        if n.is_power_of_two() {
            tracing::warn!(path, refused = n, reason = e.reason(), "ban refused: {e}");
        }
    }

    /// Whether a ban asked for from outside (admin, cluster) is allowed:
    /// not too wide, not too long, nothing protected under it.
    fn admit(&self, net: IpNet, ttl: Duration, path: &str) -> Result<(), BanError> {
        let min = match net {
            IpNet::V4(_) => self.settings.min_prefix_v4,
            IpNet::V6(_) => self.settings.min_prefix_v6,
        };
        let max = self.settings.max_ban_duration;
        let e = if net.prefix_len() < min {
            BanError::TooWide { net, min }
        } else if ttl > max {
            BanError::TooLong {
                secs: ttl.as_secs(),
                max: max.as_secs(),
            }
        } else {
            return self.refuse_protected(net, path);
        };
        self.count_refusal(&e, path);
        Err(e)
    }

    /// Bans refused since start, by reason.
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        lock(&self.refused).iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Whether `ip` is banned (checked at accept and per request): its own
    /// key, or a wider ban holding it, so CIDR bans hold in user space too
    /// (a dry run has no kernel to enforce them).
    #[inline]
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let set = self.banned.load();
        if !set.is_empty() && set.contains(&self.key(ip)) {
            return true;
        }
        let wide = self.banned_wide.load();
        if wide.is_empty() {
            return false;
        }
        let ip = ip.to_canonical();
        wide.iter().any(|n| n.contains(&ip))
    }

    /// Publishes the lookup views of `bans`.
    fn refresh_banned(&self, bans: &BTreeMap<IpNet, Ban>) {
        let (wide, exact): (Vec<IpNet>, Vec<IpNet>) = bans.keys().partition(|n| {
            let key_len = match n {
                IpNet::V4(_) => 32,
                IpNet::V6(_) => self.v6_prefix,
            };
            n.prefix_len() < key_len
        });
        self.banned.store(Arc::new(exact.into_iter().collect()));
        self.banned_wide.store(Arc::new(wide));
    }

    fn capture_loop(&self, cap: &SynCapture) {
        let mut first_seen: HashMap<IpAddr, u64> = HashMap::new();
        let mut reported: HashSet<IpAddr> = HashSet::new();
        while !self.stop.load(Ordering::Acquire) {
            let (syn, age) = match cap.next() {
                Ok(Some(s)) => s,
                Ok(None) => {
                    // A quiet 100 ms: any flood is over; the next one's
                    // latency counts from its own first SYN.
                    first_seen.clear();
                    reported.clear();
                    continue;
                }
                Err(e) => {
                    tracing::error!("SYN capture failed, stopping it: {e}");
                    return;
                }
            };
            if syn.port != self.port {
                continue;
            }
            self.syns.fetch_add(1, Ordering::Relaxed);
            // When the kernel received it, not when this thread got to it.
            let now = self
                .clock
                .now()
                .saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX));
            let source = syn.source.to_canonical();
            let seen = lock(&self.rates).record(source, now);
            if first_seen.len() < 100_000 {
                first_seen.entry(source).or_insert(now);
            }
            self.attack.store(
                seen.global_per_sec > self.settings.global_threshold,
                Ordering::Relaxed,
            );
            if seen.offender && !reported.contains(&source) && !self.is_banned(source) {
                reported.insert(source);
                self.offender(Offender {
                    ip: source,
                    first_seen: first_seen.get(&source).copied().unwrap_or(now),
                    rate: seen.source_per_sec,
                    global: seen.global_per_sec,
                });
            }
        }
    }

    /// Queues an offender for the ban thread; a full queue drops it (the
    /// capture reports it again while it floods).
    fn offender(&self, o: Offender) {
        let _ = self.jobs.try_send(Job::Offender(o));
    }

    /// The ban thread: takes what queued while the last batch ran (up to
    /// `MAX_BATCH` jobs), turns it into one firewall transaction, one
    /// `bans.json` write and one new lookup view, then answers whoever
    /// waits. Nobody else runs the firewall after start, so async callers
    /// never wait on a process or an fsync, only on this thread's answer.
    fn ban_loop(&self, mut rx: mpsc::Receiver<Job>, penalize: &(dyn Fn(IpAddr) + Send + Sync)) {
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH
                && let Ok(j) = rx.try_recv()
            {
                jobs.push(j);
            }
            if !self.run_batch(jobs, penalize) {
                return;
            }
        }
    }

    /// One batch; false once asked to stop.
    fn run_batch(&self, jobs: Vec<Job>, penalize: &(dyn Fn(IpAddr) + Send + Sync)) -> bool {
        let now = unix_now();
        let ttl = self.settings.ban_duration;
        let mut changes = Vec::new();
        let mut origins = Vec::new();
        let (mut reconcile, mut go_on) = (false, true);
        // The capture thread and the XDP reader may both report a source.
        let mut seen = HashSet::new();
        for job in jobs {
            match job {
                Job::Offender(o) => {
                    let net = self.key(o.ip);
                    if self.is_banned(o.ip)
                        || !seen.insert(net)
                        || self.refuse_protected(net, "syn_flood").is_err()
                        || !self.spend_budget()
                    {
                        continue;
                    }
                    changes.push(Change::Ban {
                        ban: Ban {
                            net,
                            until: now.saturating_add(ttl.as_secs()),
                            reason: "syn_flood".into(),
                            rate: o.rate,
                            latency_ms: None,
                            install_ms: None,
                        },
                        only_if_longer: false,
                    });
                    origins.push(Origin::Offender(o));
                }
                Job::Ban {
                    ban,
                    only_if_longer,
                    share,
                    done,
                } => {
                    changes.push(Change::Ban { ban, only_if_longer });
                    origins.push(Origin::Ban { share, done });
                }
                Job::Unban { net, share, done } => {
                    changes.push(Change::Unban(net));
                    origins.push(Origin::Unban { share, done });
                }
                Job::Expire => {
                    for b in lock(&self.bans).values().filter(|b| b.until <= now) {
                        changes.push(Change::Unban(b.net));
                        origins.push(Origin::Expiry);
                    }
                }
                Job::Reconcile => reconcile = true,
                Job::Stop => go_on = false,
            }
        }
        self.ban_requests
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        let started = self.clock.now();
        let outcomes = self.install(&changes);
        let done_at = self.clock.now();
        let install_ms = done_at.saturating_sub(started) as f64 / 1e6;
        if outcomes.iter().any(Result::is_ok) {
            self.persist();
        }
        let batch = changes.len();
        for ((change, origin), outcome) in changes.into_iter().zip(origins).zip(outcomes) {
            match (origin, change) {
                (Origin::Offender(o), Change::Ban { ban, .. }) => {
                    if let Err(e) = outcome {
                        tracing::error!(source = %o.ip, "SYN defense: ban failed: {e}");
                        continue;
                    }
                    let latency = done_at.saturating_sub(o.first_seen) as f64 / 1e6;
                    if let Some(b) = lock(&self.bans).get_mut(&ban.net) {
                        b.latency_ms = Some(latency);
                        b.install_ms = Some(install_ms);
                    }
                    tracing::warn!(
                        source = %o.ip,
                        syn_per_sec = o.rate,
                        global_syn_per_sec = o.global,
                        latency_ms = latency,
                        install_ms,
                        batch,
                        firewall = self.firewall.name(),
                        "SYN flood: source banned for {}s",
                        ttl.as_secs()
                    );
                    lock(&self.rates).forget(&o.ip);
                    penalize(o.ip);
                    (self.share)(ban.net, ban.until);
                }
                (Origin::Ban { share, done }, Change::Ban { ban, .. }) => {
                    if outcome.is_ok() && share {
                        (self.share)(ban.net, ban.until);
                    }
                    if let Some(done) = done {
                        let _ = done.send(outcome.map(drop).map_err(BanError::Firewall));
                    }
                }
                (Origin::Unban { share, done }, Change::Unban(net)) => {
                    if outcome.is_ok() && share {
                        (self.share)(net, 1);
                    }
                    if let Some(done) = done {
                        let _ = done.send(outcome);
                    }
                }
                (Origin::Expiry, Change::Unban(net)) => {
                    if let Err(e) = outcome {
                        tracing::error!(%net, "SYN defense: lifting an expired ban failed: {e}");
                    }
                }
                _ => {}
            }
        }
        if reconcile {
            self.reconcile();
        }
        go_on
    }

    /// Makes `changes` in the firewall and the list, as one transaction;
    /// if that fails, each alone, so one the kernel refuses does not sink
    /// the others. Per change: what [`plan`] said, or why it failed.
    fn install(&self, changes: &[Change]) -> Vec<Result<bool, String>> {
        if changes.is_empty() {
            return Vec::new();
        }
        let plan = plan(&lock(&self.bans), changes);
        match self.apply(&plan) {
            Ok(()) => plan.outcome.into_iter().map(Ok).collect(),
            Err(_) if changes.len() > 1 => changes
                .iter()
                .flat_map(|c| self.install(std::slice::from_ref(c)))
                .collect(),
            Err(e) => vec![Err(e.to_string())],
        }
    }

    fn apply(&self, plan: &Plan) -> Result<(), palisade_kernel::firewall::FirewallError> {
        if plan.install.is_empty() && plan.lift.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        let nets: Vec<(IpNet, Duration)> = plan
            .install
            .iter()
            .map(|b| (b.net, Duration::from_secs(b.until.saturating_sub(now).max(1))))
            .collect();
        let (kernel_ban, kernel_lift) = kernel_changes(&lock(&self.bans), plan, now);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.firewall.apply(&kernel_ban, &kernel_lift)?;
        self.xdp_ban(&nets);
        if let Some(x) = lock(&self.xdp).as_mut() {
            for net in &plan.lift {
                if let Err(e) = x.unban(*net) {
                    tracing::error!("SYN defense: XDP unban of {net} failed: {e}");
                }
            }
        }
        let mut bans = lock(&self.bans);
        for b in &plan.install {
            bans.insert(b.net, b.clone());
        }
        for net in &plan.lift {
            bans.remove(net);
        }
        self.bans_total
            .fetch_add(plan.install.len() as u64, Ordering::Relaxed);
        self.refresh_banned(&bans);
        Ok(())
    }

    /// Takes one new ban from the budget of `syn.ban_budget` a minute.
    /// Sources are trivially spoofed: a flood "from" more addresses than
    /// that is more likely forged than real, and banning every address it
    /// names would ban bystanders. Past the budget the offender is refused
    /// and the poll escalates to syncookies, which need no source to be
    /// real.
    fn spend_budget(&self) -> bool {
        const MINUTE: u64 = 60_000_000_000;
        let now = self.clock.now();
        let mut made = lock(&self.budget);
        while made.front().is_some_and(|t| now.saturating_sub(*t) >= MINUTE) {
            made.pop_front();
        }
        if made.len() < self.settings.ban_budget as usize {
            made.push_back(now);
            return true;
        }
        drop(made);
        let n = {
            let mut refused = lock(&self.refused);
            let n = refused.entry("budget").or_insert(0);
            *n += 1;
            *n
        };
        if !self.over_budget.swap(true, Ordering::AcqRel) || n.is_power_of_two() {
            tracing::warn!(
                budget = self.settings.ban_budget,
                refused = n,
                "SYN flood from more sources than syn.ban_budget allows a minute (spoofed?): \
                 no more per-source bans, syncookies instead"
            );
        }
        false
    }

    fn xdp_ban(&self, nets: &[(IpNet, Duration)]) {
        if let Some(x) = lock(&self.xdp).as_mut() {
            for (net, _) in nets {
                if let Err(e) = x.ban(*net) {
                    tracing::error!("SYN defense: XDP ban of {net} failed: {e}");
                }
            }
        }
    }

    /// Judges sources by the XDP program's SYN counts (`dt` seconds since
    /// the last look): the kernel-side twin of the capture thread.
    fn judge_xdp(&self, dt: f64, last: &mut Option<XdpStats>) -> Option<XdpStats> {
        let mut guard = lock(&self.xdp);
        let x = guard.as_mut()?;
        let stats = x.stats().ok()?;
        let global = last.map_or(0, |l| stats.syns.saturating_sub(l.syns));
        *last = Some(stats);
        let global_rate = (global as f64 / dt) as u64;
        let sources = x.syns_by_source().unwrap_or_default();
        for (ip, _) in &sources {
            let _ = x.clear_syns(*ip);
        }
        let handshakes = x.sources().unwrap_or_default();
        drop(guard);
        // 64 half-open handshakes, or more than 80 % of a source's
        // SYNs being retransmits, make it an offender whatever the rates.
        let syns_of: HashMap<IpAddr, u64> = sources.iter().copied().collect();
        let mut previous = lock(&self.xdp_retrans);
        let mut current = HashMap::with_capacity(handshakes.len());
        for (ip, st) in handshakes {
            let retrans = st.retrans.saturating_sub(previous.get(&ip).copied().unwrap_or(0));
            current.insert(ip, st.retrans);
            let syns = syns_of.get(&ip).copied().unwrap_or(0);
            let retransmitting = syns >= 20 && retrans as f64 > 0.8 * syns as f64;
            if (st.half_open >= HALF_OPEN_OFFENDER as i64 || retransmitting) && !self.is_banned(ip) {
                self.offender(Offender {
                    ip,
                    first_seen: self.clock.now().saturating_sub((dt * 1e9) as u64),
                    rate: (syns as f64 / dt) as u64,
                    global: 0,
                });
            }
        }
        *previous = current;
        drop(previous);
        if global_rate <= self.settings.global_threshold {
            return Some(stats);
        }
        for (ip, n) in sources {
            let rate = (n as f64 / dt) as u64;
            if rate >= self.settings.source_threshold && !self.is_banned(ip) {
                self.offender(Offender {
                    ip,
                    first_seen: self.clock.now().saturating_sub((dt * 1e9) as u64),
                    rate,
                    global: global_rate,
                });
            }
        }
        Some(stats)
    }

    /// Bans a network by hand (admin API), answering once the ban is in
    /// the kernel and persisted; the cluster hears of it.
    pub async fn ban(&self, net: IpNet, ttl: Duration) -> Result<(), BanError> {
        let net = net.trunc();
        self.admit(net, ttl, "admin")?;
        let ban = Ban {
            net,
            until: unix_now().saturating_add(ttl.as_secs()),
            reason: "admin".into(),
            rate: 0,
            latency_ms: None,
            install_ms: None,
        };
        let (done, answer) = oneshot::channel();
        self.ask(Job::Ban {
            ban,
            only_if_longer: false,
            share: true,
            done: Some(done),
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    /// Applies a ban another node made (not shared again), under the same
    /// rules as a local one: a node's word is no licence to cut this one
    /// off from its upstream. Queued, not waited for: the sync goes on.
    pub async fn ban_from_cluster(&self, net: IpNet, until: u64) -> Result<(), BanError> {
        let net = net.trunc();
        if lock(&self.bans).get(&net).is_some_and(|b| b.until >= until) {
            return Ok(());
        }
        self.admit(
            net,
            Duration::from_secs(until.saturating_sub(unix_now())),
            "cluster",
        )?;
        let ban = Ban {
            net,
            until,
            reason: "cluster".into(),
            rate: 0,
            latency_ms: None,
            install_ms: None,
        };
        self.ask(Job::Ban {
            ban,
            only_if_longer: true,
            share: false,
            done: None,
        })
        .await
    }

    /// Lifts a ban by hand (admin API); the cluster hears of it. Returns
    /// whether there was one, once it is out of the kernel.
    pub async fn unban_shared(&self, net: IpNet) -> Result<bool, String> {
        let (done, answer) = oneshot::channel();
        self.ask(Job::Unban {
            net: net.trunc(),
            share: true,
            done: Some(done),
        })
        .await
        .map_err(|e| e.to_string())?;
        answer.await.map_err(|_| stopped().to_string())?
    }

    /// Lifts a ban another node lifted (queued, not waited for).
    pub async fn unban_from_cluster(&self, net: IpNet) -> Result<(), BanError> {
        self.ask(Job::Unban {
            net: net.trunc(),
            share: false,
            done: None,
        })
        .await
    }

    /// Hands a job to the ban thread, waiting (asynchronously) for room.
    async fn ask(&self, job: Job) -> Result<(), BanError> {
        self.jobs.send(job).await.map_err(|_| stopped())
    }

    /// Active bans.
    pub fn bans(&self) -> Vec<Ban> {
        lock(&self.bans).values().cloned().collect()
    }

    /// (firewall transactions, changes asked) by the ban thread so far.
    pub fn batch_counts(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.ban_requests.load(Ordering::Relaxed),
        )
    }

    fn persist(&self) {
        let Some(path) = &self.bans_path else { return };
        let bans = self.bans();
        let text = serde_json::to_string_pretty(&bans).unwrap_or_default();
        let written = match path.parent() {
            Some(dir) => std::fs::create_dir_all(dir).map_err(|e| e.to_string()),
            None => Ok(()),
        }
        .and_then(|()| palisade_store::write_atomically(path, text.as_bytes()).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::error!("SYN defense: bans not persisted: {e}");
        }
    }

    fn restore(&self) {
        let Some(path) = &self.bans_path else { return };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!("{}: {e}", path.display());
                return;
            }
        };
        let bans: Vec<Ban> = match serde_json::from_str(&text) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("{}: not a ban list, ignored: {e}", path.display());
                return;
            }
        };
        let now = unix_now();
        // A ban persisted before an address became protected (or before
        // protection existed) must not come back.
        let live: Vec<Ban> = bans
            .into_iter()
            .filter(|b| b.until > now && self.refuse_protected(b.net, "restore").is_ok())
            .collect();
        let nets: Vec<(IpNet, Duration)> = live
            .iter()
            .map(|b| (b.net, Duration::from_secs(b.until - now)))
            .collect();
        let restored: BTreeMap<IpNet, Ban> = live.iter().map(|b| (b.net, b.clone())).collect();
        if let Err(e) = self.firewall.ban(&kernel_view(&restored, now)) {
            tracing::error!("SYN defense: restoring {} bans failed: {e}", nets.len());
            return;
        }
        self.xdp_ban(&nets);
        let n = live.len();
        let mut bans = lock(&self.bans);
        bans.extend(live.into_iter().map(|b| (b.net, b)));
        self.refresh_banned(&bans);
        drop(bans);
        if n > 0 {
            tracing::info!(bans = n, "SYN defense: bans restored");
        }
    }

    /// Polls the kernel until `stop`: counters, half-open sockets,
    /// syncookies, ban expiry, reconciliation.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut state = Some(PollState::new(self.clock.now()));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = stop.changed() => break,
            }
            // A poll reads /proc, dumps sockets and may run the firewall:
            // milliseconds with many TIME-WAIT sockets, which must not stall
            // the proxy's workers (it did: p99 14 ms in the open-loop bench).
            let Some(mut st) = state.take() else { break };
            let this = self.clone();
            match tokio::task::spawn_blocking(move || {
                this.poll(&mut st);
                st
            })
            .await
            {
                Ok(st) => state = Some(st),
                Err(e) => {
                    tracing::error!("SYN defense: the counter poll failed, stopping it: {e}");
                    break;
                }
            }
        }
        let restore_to = state.and_then(|st| st.restore_to);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(old) = restore_to {
                let _ = set_syncookies(old);
            }
            self.shutdown();
        })
        .await;
    }

    /// One look at the kernel's counters and half-open sockets.
    fn poll(&self, st: &mut PollState) {
        let now = self.clock.now();
        let dt = (now.saturating_sub(st.last_at) as f64 / 1e9).max(1e-3);
        st.last_at = now;
        let mut snap = Snapshot::default();
        // Dumping sockets walks the kernel's whole connection table (3 ms
        // with 14 000 TIME-WAIT sockets here), so it waits for a sign that
        // a handshake hangs, or for the last dump to have found some.
        let mut suspect = true;
        let mut deltas = TcpCounters::default();
        if let Ok(current) = TcpCounters::read() {
            if let Some(prev) = &st.last {
                let d = current.since(prev);
                deltas = d;
                suspect = handshakes_may_hang(&d);
                let per_sec = |v: u64| (v as f64 / dt).round() as u64;
                snap.rates = TcpCounters {
                    syncookies_sent: per_sec(d.syncookies_sent),
                    syncookies_recv: per_sec(d.syncookies_recv),
                    syncookies_failed: per_sec(d.syncookies_failed),
                    listen_overflows: per_sec(d.listen_overflows),
                    listen_drops: per_sec(d.listen_drops),
                    req_q_full_do_cookies: per_sec(d.req_q_full_do_cookies),
                    req_q_full_drop: per_sec(d.req_q_full_drop),
                    syn_retrans: per_sec(d.syn_retrans),
                    passive_opens: per_sec(d.passive_opens),
                    out_segs: per_sec(d.out_segs),
                    retrans_segs: per_sec(d.retrans_segs),
                };
            }
            st.last = Some(current);
        }
        // A failed read keeps the last totals: a counter read as 0 would be
        // taken for a reset.
        snap.totals = st.last.unwrap_or_default();
        let sockets = if suspect || st.half_open_last > 0 {
            half_open_sockets(&mut st.diag_failed)
        } else {
            Vec::new()
        };
        let (total, per_source) = half_open(&sockets, &[self.port]);
        snap.half_open = total;
        st.half_open_last = total;
        // A source holding many half-open connections is flooding
        // whatever its SYN rate (HALF_OPEN_OFFENDER).
        for (ip, n) in &per_source {
            if *n >= HALF_OPEN_OFFENDER && !self.is_banned(*ip) {
                self.offender(Offender {
                    ip: *ip,
                    first_seen: now,
                    rate: 0,
                    global: 0,
                });
            }
        }
        let mut top: Vec<(IpAddr, usize)> = per_source.into_iter().collect();
        top.sort_by_key(|e| std::cmp::Reverse(e.1));
        top.truncate(10);
        snap.half_open_top = top;
        let after = u64::try_from(self.settings.syncookies_after.as_nanos()).unwrap_or(u64::MAX);
        let (ratio, switch) = st.judge.observe(
            now,
            failed_handshakes(&deltas),
            deltas.passive_opens,
            self.over_budget.swap(false, Ordering::AcqRel),
            self.settings.syncookies_ratio,
            after,
        );
        snap.retransmit_ratio = ratio;
        match switch {
            Some(Switch::On(reason)) => match set_syncookies(1) {
                Ok(old) if old != 1 => {
                    st.restore_to = Some(old);
                    st.judge.forced = Some(reason);
                    st.step(1, reason, ratio);
                    tracing::warn!(
                        reason,
                        ratio,
                        threshold = self.settings.syncookies_ratio,
                        seconds = self.settings.syncookies_after.as_secs_f64(),
                        budget = self.settings.ban_budget,
                        "{}: net.ipv4.tcp_syncookies=1",
                        if reason == "ban_budget" {
                            "SYN flood over the ban budget"
                        } else {
                            "SYN-ACK retransmits dominate"
                        }
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot set {SYNCOOKIES}: {e}"),
            },
            Some(Switch::Off) => {
                let old = st.restore_to.take().unwrap_or(1);
                let forced_by = st.judge.forced.take();
                match set_syncookies(old) {
                    Ok(_) => {
                        st.step(old, "recovered", ratio);
                        tracing::info!(
                            reason = "recovered",
                            forced_by,
                            ratio,
                            seconds = self.settings.syncookies_after.as_secs_f64(),
                            "SYN-ACK retransmits back to normal: net.ipv4.tcp_syncookies={old}"
                        );
                    }
                    Err(e) => tracing::warn!("cannot restore {SYNCOOKIES}: {e}"),
                }
            }
            None => {}
        }
        snap.syncookies = std::fs::read_to_string(SYNCOOKIES)
            .ok()
            .and_then(|v| v.trim().parse().ok());
        snap.syncookies_forced = st.restore_to.is_some();
        snap.syncookies_reason = st.judge.forced;
        snap.syncookie_steps = st.steps.iter().cloned().collect();
        if let Some(stats) = self.judge_xdp(dt, &mut st.xdp_last) {
            snap.xdp = Some(stats);
        }
        *lock(&self.snapshot) = snap;
        // Both run on the ban thread, between batches; a full queue means
        // it is busy, and the next poll asks again.
        let unix = unix_now();
        if lock(&self.bans).values().any(|b| b.until <= unix) {
            let _ = self.jobs.try_send(Job::Expire);
        }
        if now.saturating_sub(st.reconciled) >= self.settings.reconcile_interval.as_nanos() as u64
            && self.jobs.try_send(Job::Reconcile).is_ok()
        {
            st.reconciled = now;
        }
    }

    /// Makes the kernel hold exactly our bans: re-adds what disappeared
    /// (someone flushed the set), removes what we do not know.
    fn reconcile(&self) {
        let Ok(kernel) = self.firewall.list() else { return };
        let now = unix_now();
        let ours: Vec<(IpNet, Duration)> = {
            let bans = lock(&self.bans);
            kernel_view(&bans, now)
                .into_iter()
                .filter(|(n, _)| bans.get(n).is_some_and(|b| b.until > now))
                .collect()
        };
        let missing: Vec<(IpNet, Duration)> = ours
            .iter()
            .filter(|(n, _)| !kernel.contains(n))
            .copied()
            .collect();
        let known: HashSet<IpNet> = ours.iter().map(|(n, _)| *n).collect();
        let extra: Vec<IpNet> = kernel.iter().filter(|n| !known.contains(n)).copied().collect();
        if !missing.is_empty() || !extra.is_empty() {
            tracing::warn!(
                missing = missing.len(),
                unknown = extra.len(),
                "SYN defense: kernel bans drifted from ours; repairing"
            );
            self.batches.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.firewall.apply(&missing, &extra) {
                tracing::error!("SYN defense: repairing the kernel's bans failed: {e}");
            }
        }
    }

    /// Stops capture and removes our firewall rules (bans stay persisted).
    pub fn shutdown(&self) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        // The ban thread stops at its next batch.
        let _ = self.jobs.try_send(Job::Stop);
        if let Err(e) = self.firewall.teardown() {
            tracing::warn!("SYN defense: removing firewall rules: {e}");
        }
        // Detaches the XDP program.
        lock(&self.xdp).take();
    }

    /// `/syn-stats`.
    pub fn stats_json(&self) -> serde_json::Value {
        let now = self.clock.now();
        let snap = lock(&self.snapshot).clone();
        let rates = lock(&self.rates);
        let top: Vec<serde_json::Value> = rates
            .top(10, now)
            .into_iter()
            .map(|(ip, r)| serde_json::json!({ "ip": ip, "syn_per_sec": r }))
            .collect();
        let syn_per_sec = rates.global_per_sec(now);
        let tracked = rates.tracked();
        drop(rates);
        let unix = unix_now();
        let bans: Vec<serde_json::Value> = self
            .bans()
            .into_iter()
            .map(|b| {
                serde_json::json!({
                    "net": b.net, "expires_in_secs": b.until.saturating_sub(unix), "reason": b.reason,
                    "syn_per_sec": b.rate, "ban_latency_ms": b.latency_ms, "install_ms": b.install_ms,
                })
            })
            .collect();
        let attack = self.attack.load(Ordering::Relaxed) && syn_per_sec > self.settings.global_threshold;
        // What is being done about it, most severe first.
        let state = if snap.syncookies_forced {
            "syncookies_forced"
        } else if attack {
            "banning_offenders"
        } else if !bans.is_empty() {
            "bans_active"
        } else {
            "normal"
        };
        serde_json::json!({
            "mitigation": {
                "state": state,
                "firewall": self.firewall.name(),
                "capture": self.capturing,
                "syncookies": snap.syncookies,
                "syncookies_forced": snap.syncookies_forced,
                // retransmits: SYN-ACKs to sources that never answer
                // dominate; ban_budget: more offenders than syn.ban_budget
                // a minute, too many to be real; bans are left to stand.
                "syncookies_reason": snap.syncookies_reason,
                // Each switch on and back, with why and the ratio then.
                "syncookie_steps": snap.syncookie_steps,
                "active_bans": bans.len(),
                "bans_refused": self.refused().into_iter().collect::<BTreeMap<_, _>>(),
                // What no ban may cover now (the first 1 000).
                "never_ban": self.never_ban.load().entries().iter().take(1000)
                    .map(|(net, why)| serde_json::json!({ "net": net, "reason": why.as_str() }))
                    .collect::<Vec<_>>(),
            },
            "port": self.port,
            "capture": self.capturing,
            "firewall": self.firewall.name(),
            "syn_per_sec": syn_per_sec,
            "syns_total": self.syns.load(Ordering::Relaxed),
            "sources_tracked": tracked,
            "attack": attack,
            "kernel_per_sec": snap.rates,
            "half_open": snap.half_open,
            "half_open_top": snap.half_open_top.iter().map(|(ip, n)| serde_json::json!({"ip": ip, "half_open": n})).collect::<Vec<_>>(),
            "retransmit_ratio": (snap.retransmit_ratio * 1000.0).round() / 1000.0,
            "syncookies": snap.syncookies,
            "syncookies_forced": snap.syncookies_forced,
            "xdp": {
                "interfaces": lock(&self.xdp).as_ref().map(|x| x.interfaces().to_vec()),
                "stats": snap.xdp,
            },
            "top_sources": top,
            "bans": bans,
            "bans_total": self.bans_total.load(Ordering::Relaxed),
        })
    }

    /// The kernel's cumulative TCP counters at the last poll (zero before
    /// the first).
    pub fn kernel_totals(&self) -> TcpCounters {
        lock(&self.snapshot).totals
    }

    /// The firewall in use (`nftables`, `iptables`, `dry-run`).
    pub fn firewall_name(&self) -> &'static str {
        self.firewall.name()
    }

    /// Whether per-source SYN capture runs.
    pub fn capturing(&self) -> bool {
        self.capturing
    }

    /// The XDP program's counters, when attached.
    pub fn xdp_stats(&self) -> Option<XdpStats> {
        lock(&self.snapshot).xdp
    }

    /// Figures for `/metrics`: (SYNs seen, active bans, bans total, half-open).
    pub fn gauges(&self) -> (u64, usize, u64, usize) {
        (
            self.syns.load(Ordering::Relaxed),
            lock(&self.bans).len(),
            self.bans_total.load(Ordering::Relaxed),
            lock(&self.snapshot).half_open,
        )
    }
}

/// Writes the sysctl (unless it holds `value` already); returns the value
/// it had.
fn set_syncookies(value: u8) -> std::io::Result<u8> {
    let old = std::fs::read_to_string(SYNCOOKIES)?.trim().parse().unwrap_or(1);
    if old != value {
        std::fs::write(SYNCOOKIES, format!("{value}\n"))?;
    }
    Ok(old)
}

/// Handshakes that did not complete, from counter deltas: SYN-ACKs
/// retransmitted (no answer within a second), SYNs dropped because the SYN
/// queue was full with syncookies off, and cookies sent but never
/// answered. Retransmits alone are no steady sign: with a full queue the
/// kernel stops queueing, and the queued SYN-ACKs are retransmitted in
/// bursts seconds apart (measured: 129 at once, then silence for 2 s, with
/// the listener's backlog of 128), while the dropped SYNs, or once
/// syncookies are on the unanswered cookies, keep coming.
fn failed_handshakes(d: &TcpCounters) -> u64 {
    d.syn_retrans
        .saturating_add(d.req_q_full_drop)
        .saturating_add(d.syncookies_sent.saturating_sub(d.syncookies_recv))
}

/// Whether counter deltas show handshakes that may be left half-open: one
/// not completed within a second makes the kernel retransmit its SYN-ACK,
/// and a full SYN queue sends cookies or drops. Without any of these, every
/// half-open socket is under a second old and on its way to completing.
fn handshakes_may_hang(d: &TcpCounters) -> bool {
    d.syn_retrans + d.syncookies_sent + d.req_q_full_do_cookies + d.req_q_full_drop + d.listen_drops > 0
}

/// Sockets in SYN-RECV: from sock_diag (the kernel filters by state), or,
/// where that fails, from `/proc/net/tcp{,6}` (every socket, as text),
/// saying so once.
fn half_open_sockets(diag_failed: &mut bool) -> Vec<palisade_kernel::procnet::Socket> {
    if !*diag_failed {
        match palisade_kernel::diag::syn_recv() {
            Ok(sockets) => return sockets,
            Err(e) => {
                tracing::warn!("SYN defense: sock_diag unavailable ({e}); reading /proc/net/tcp instead");
                *diag_failed = true;
            }
        }
    }
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table)
            && let Ok(s) = parse_tcp_table(&text)
        {
            sockets.extend(s);
        }
    }
    sockets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(net: &str, until: u64, reason: &str) -> Ban {
        Ban {
            net: net.parse().unwrap_or_else(|e| panic!("{net}: {e}")),
            until,
            reason: reason.into(),
            rate: 0,
            latency_ms: None,
            install_ms: None,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_kernel_holds_only_bans_no_wider_one_covers() {
        let held =
            |bans: &[Ban]| -> BTreeMap<IpNet, Ban> { bans.iter().map(|b| (b.net, b.clone())).collect() };
        let inner = ban("198.51.100.7/32", 1600, "syn_flood");
        let wide = ban("198.51.100.0/24", 4600, "admin");
        let secs = |s: u64| Duration::from_secs(s);
        let changes = |before: &BTreeMap<IpNet, Ban>, changes: &[Change]| {
            kernel_changes(before, &plan(before, changes), 1000)
        };
        let ban_of = |b: &Ban| Change::Ban {
            ban: b.clone(),
            only_if_longer: false,
        };
        // A wider ban takes the place of the one inside it, in one go.
        assert_eq!(
            changes(&held(std::slice::from_ref(&inner)), &[ban_of(&wide)]),
            (vec![(wide.net, secs(3600))], vec![inner.net])
        );
        // One inside a wider ban changes nothing in the kernel...
        let both = held(&[inner.clone(), wide.clone()]);
        assert_eq!(
            changes(&held(std::slice::from_ref(&wide)), &[ban_of(&inner)]),
            (vec![], vec![])
        );
        assert_eq!(kernel_view(&both, 1000), vec![(wide.net, secs(3600))]);
        // ...until the wider one goes, and it comes back for what is left.
        assert_eq!(
            changes(&both, &[Change::Unban(wide.net)]),
            (vec![(inner.net, secs(600))], vec![wide.net])
        );
        // A re-ban is a replacement; a lift of what nobody holds still goes.
        let again = ban("198.51.100.0/24", 9000, "admin");
        let stranger = net("192.0.2.1/32");
        assert_eq!(
            changes(&both, &[ban_of(&again), Change::Unban(stranger)]),
            (vec![(wide.net, secs(8000))], vec![stranger, wide.net])
        );
        // Lifting the inner one while the wide one holds: nothing to do.
        assert_eq!(changes(&both, &[Change::Unban(inner.net)]), (vec![], vec![]));
    }

    #[test]
    fn a_burst_of_bans_is_one_install() {
        // 1 000 admin bans queued while the last batch ran: 500
        // networks, each asked twice.
        let addr = |j: u32| format!("198.19.{}.{}/32", j / 250, j % 250 + 1);
        let changes: Vec<Change> = (0..1000u32)
            .map(|i| Change::Ban {
                ban: ban(&addr(i % 500), 100 + u64::from(i), "admin"),
                only_if_longer: false,
            })
            .collect();
        let p = plan(&BTreeMap::new(), &changes);
        // One entry per network, the last word on each.
        assert_eq!(p.install.len(), 500);
        for b in &p.install {
            let j = (0..500).find(|j| net(&addr(*j)) == b.net).unwrap_or(u32::MAX);
            assert_eq!(b.until, 600 + u64::from(j), "{b:?}");
        }
        assert!(p.lift.is_empty());
        assert!(p.outcome.iter().all(|o| *o));
        let twice: Vec<Change> = [
            Change::Ban {
                ban: ban("198.19.0.1/32", 100, "admin"),
                only_if_longer: false,
            },
            Change::Ban {
                ban: ban("198.19.0.1/32", 50, "admin"),
                only_if_longer: false,
            },
        ]
        .into();
        let p = plan(&BTreeMap::new(), &twice);
        assert_eq!(p.install, vec![ban("198.19.0.1/32", 50, "admin")]);
        assert_eq!(p.outcome, vec![true, true]);
    }

    #[test]
    fn bans_and_lifts_in_one_batch_keep_their_order() {
        let mut current = BTreeMap::new();
        current.insert(net("198.19.1.1/32"), ban("198.19.1.1/32", 500, "syn_flood"));
        let p = plan(
            &current,
            &[
                // Lifted, then banned again: the ban stands.
                Change::Unban(net("198.19.1.1/32")),
                Change::Ban {
                    ban: ban("198.19.1.1/32", 900, "admin"),
                    only_if_longer: false,
                },
                // Banned, then lifted in the same batch: lifted, and the
                // lift knew of the ban before it.
                Change::Ban {
                    ban: ban("198.19.2.2/32", 900, "admin"),
                    only_if_longer: false,
                },
                Change::Unban(net("198.19.2.2/32")),
                // A lift of what nobody banned.
                Change::Unban(net("198.19.3.3/32")),
            ],
        );
        assert_eq!(p.install, vec![ban("198.19.1.1/32", 900, "admin")]);
        assert_eq!(p.lift, vec![net("198.19.2.2/32"), net("198.19.3.3/32")]);
        assert_eq!(p.outcome, vec![true, true, true, true, false]);
    }

    #[test]
    fn a_cluster_ban_yields_to_a_longer_one() {
        let mut current = BTreeMap::new();
        current.insert(net("198.19.1.1/32"), ban("198.19.1.1/32", 500, "admin"));
        let shorter = Change::Ban {
            ban: ban("198.19.1.1/32", 400, "cluster"),
            only_if_longer: true,
        };
        let longer = Change::Ban {
            ban: ban("198.19.1.1/32", 600, "cluster"),
            only_if_longer: true,
        };
        let p = plan(&current, std::slice::from_ref(&shorter));
        assert!(p.install.is_empty() && p.lift.is_empty(), "{p:?}");
        assert_eq!(p.outcome, vec![false]);
        let p = plan(&current, &[longer, shorter]);
        assert_eq!(p.install, vec![ban("198.19.1.1/32", 600, "cluster")]);
        assert_eq!(p.outcome, vec![true, false]);
    }

    const MS: u64 = 1_000_000;

    /// Feeds `judge` one poll every 100 ms from `start` for `polls` polls
    /// with these deltas; returns every switch asked for, with its time.
    fn feed(judge: &mut CookieJudge, start: u64, polls: u64, retrans: u64, opens: u64) -> Vec<(u64, Switch)> {
        let mut out = Vec::new();
        for i in 0..polls {
            let now = start + i * 100 * MS;
            if let (_, Some(s)) = judge.observe(now, retrans, opens, false, 0.85, 2_000 * MS) {
                // The caller records what it did.
                match s {
                    Switch::On(reason) => judge.forced = Some(reason),
                    Switch::Off => judge.forced = None,
                }
                out.push((now, s));
            }
        }
        out
    }

    #[test]
    fn sustained_retransmits_switch_syncookies_on_and_recovery_back() {
        let mut j = CookieJudge::default();
        // Healthy: handshakes complete, the odd retransmit.
        assert!(feed(&mut j, 0, 50, 1, 40).is_empty());
        // A spoofed flood: retransmits only. On after 2 s of it, not before.
        let on = feed(&mut j, 5_000 * MS, 40, 300, 0);
        assert_eq!(on.len(), 1, "{on:?}");
        let (at, step) = on[0];
        assert_eq!(step, Switch::On("retransmits"));
        // The window first holds 1 s of healthy polls, so the ratio
        // crosses 0.85 a few polls in; on 2 s after that.
        assert!((7_000 * MS..=7_600 * MS).contains(&at), "{at}");
        // It stops: the window empties in a second, then 2 s low: back.
        let off = feed(&mut j, 9_000 * MS, 50, 0, 30);
        assert_eq!(off.len(), 1, "{off:?}");
        assert_eq!(off[0].1, Switch::Off);
        assert!((11_000 * MS..=12_100 * MS).contains(&off[0].0), "{:?}", off[0]);
    }

    #[test]
    fn polls_without_retransmits_inside_a_flood_do_not_reset_the_clock() {
        // The kernel retransmits in bursts (1 s, 3 s... after each SYN):
        // one poll in five sees them. Per poll the ratio would jump
        // between 0 and 1 and never be high for 2 s in a row.
        let mut j = CookieJudge::default();
        let mut switched = Vec::new();
        for i in 0..40u64 {
            let now = i * 100 * MS;
            let retrans = if i % 5 == 0 { 500 } else { 0 };
            if let (_, Some(s)) = j.observe(now, retrans, 1, false, 0.85, 2_000 * MS) {
                switched.push((now, s));
                j.forced = Some("retransmits");
            }
        }
        assert_eq!(switched, vec![(2_000 * MS, Switch::On("retransmits"))]);
    }

    #[test]
    fn a_ratio_between_the_thresholds_holds_both_clocks_still() {
        let mut j = CookieJudge::default();
        // 60 % retransmits: not high enough to switch on...
        assert!(feed(&mut j, 0, 100, 60, 40).is_empty());
        // ...and once on, not low enough to switch back.
        j.forced = Some("retransmits");
        assert!(feed(&mut j, 20_000 * MS, 100, 60, 40).is_empty());
        // A quiet server (nothing at all) is low: back after 2 s.
        let off = feed(&mut j, 40_000 * MS, 40, 0, 0);
        assert_eq!(off.iter().map(|s| s.1).collect::<Vec<_>>(), vec![Switch::Off]);
    }

    #[test]
    fn failed_handshakes_count_drops_and_unanswered_cookies_not_answered_ones() {
        let d = TcpCounters {
            syn_retrans: 3,
            req_q_full_drop: 100,
            syncookies_sent: 50,
            syncookies_recv: 45,
            passive_opens: 45,
            ..TcpCounters::default()
        };
        assert_eq!(failed_handshakes(&d), 108);
        // A legitimate burst over a full queue: every cookie comes back.
        let burst = TcpCounters {
            syncookies_sent: 500,
            syncookies_recv: 500,
            passive_opens: 500,
            ..TcpCounters::default()
        };
        assert_eq!(failed_handshakes(&burst), 0);
    }

    #[test]
    fn over_the_ban_budget_switches_on_at_once_and_only_once() {
        let mut j = CookieJudge::default();
        let (_, s) = j.observe(0, 0, 10, true, 0.85, 2_000 * MS);
        assert_eq!(s, Some(Switch::On("ban_budget")));
        j.forced = Some("ban_budget");
        let (_, s) = j.observe(100 * MS, 0, 10, true, 0.85, 2_000 * MS);
        assert_eq!(s, None);
    }

    #[test]
    fn only_hanging_handshakes_call_for_a_socket_dump() {
        // Busy but healthy: thousands of completed handshakes.
        let quiet = TcpCounters {
            passive_opens: 5_000,
            out_segs: 100_000,
            retrans_segs: 3,
            ..TcpCounters::default()
        };
        assert!(!handshakes_may_hang(&quiet));
        for sign in [
            TcpCounters {
                syn_retrans: 1,
                ..quiet
            },
            TcpCounters {
                syncookies_sent: 1,
                ..quiet
            },
            TcpCounters {
                req_q_full_do_cookies: 1,
                ..quiet
            },
            TcpCounters {
                listen_drops: 1,
                ..quiet
            },
        ] {
            assert!(handshakes_may_hang(&sign), "{sign:?}");
        }
    }
}
