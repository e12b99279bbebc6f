//! SYN-flood defense in the daemon.
//!
//! * A capture thread reads every SYN to our listener from an `AF_PACKET`
//!   socket (palisade-kernel's BPF filter) and flags a source the moment it
//!   and the global rate are over their thresholds.
//! * A ban thread installs what queued meanwhile as one firewall batch,
//!   records how long after the source's first SYN the ban landed, takes
//!   `reputation_penalty` points from it, and persists the ban list.
//! * A poll task reads the kernel's TCP counters and half-open sockets,
//!   switches `tcp_syncookies` on when SYN-ACK retransmits dominate for
//!   long enough (and back when they stop), expires bans, and reconciles
//!   the kernel's set with our list.
//!
//! Without `CAP_NET_RAW` there is no capture (counters only); without
//! `CAP_NET_ADMIN` the firewall is a dry run. Both are said at start.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use palisade_core::{Clock as _, MonotonicClock, unix_now};
use palisade_kernel::capture::{SynCapture, SynRates, SynThresholds};
use palisade_kernel::firewall::{DryRun, Firewall, Iptables, Nftables};
use palisade_kernel::procnet::{TcpCounters, half_open, parse_tcp_table};
use palisade_kernel::xdp::{XdpDefense, XdpMode, XdpStats, interfaces_for};
use serde::{Deserialize, Serialize};

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

/// The latest kernel view, for `/syn-stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Per second over the last poll.
    pub rates: TcpCounters,
    /// SYN-RECV sockets on our port.
    pub half_open: usize,
    /// Sources with the most half-open connections.
    pub half_open_top: Vec<(IpAddr, usize)>,
    /// SYN-ACK retransmits ÷ (retransmits + passive opens), last poll.
    pub retransmit_ratio: f64,
    /// `net.ipv4.tcp_syncookies` now (None: unreadable).
    pub syncookies: Option<u8>,
    /// We switched syncookies on (and will restore the old value).
    pub syncookies_forced: bool,
    /// Why: `retransmits` or `ban_budget`.
    pub syncookies_reason: Option<&'static str>,
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
    /// Where offenders go (the capture thread and the XDP map reader).
    offenders: Mutex<Option<mpsc::SyncSender<Offender>>>,
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

/// What the counter poll carries from one look to the next.
struct PollState {
    last: Option<TcpCounters>,
    diag_failed: bool,
    last_at: u64,
    high_since: Option<u64>,
    low_since: Option<u64>,
    restore_to: Option<u8>,
    /// Why syncookies were switched on.
    forced_by: Option<&'static str>,
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
            high_since: None,
            low_since: None,
            restore_to: None,
            forced_by: None,
            reconciled: 0,
            xdp_last: None,
            half_open_last: 0,
        }
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
            offenders: Mutex::new(None),
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
        let (tx, rx) = mpsc::sync_channel::<Offender>(4096);
        *lock(&defense.offenders) = Some(tx.clone());
        {
            let d = defense.clone();
            let spawned = std::thread::Builder::new()
                .name("palisade-bans".into())
                .spawn(move || d.ban_loop(&rx, &*penalize));
            if let Err(e) = spawned {
                tracing::error!("SYN defense: cannot start the ban thread: {e}");
            }
        }
        if let Some(cap) = capture {
            let d = defense.clone();
            let spawned = std::thread::Builder::new()
                .name("palisade-syn".into())
                .spawn(move || d.capture_loop(&cap, &tx));
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

    fn capture_loop(&self, cap: &SynCapture, tx: &mpsc::SyncSender<Offender>) {
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
                let _ = tx.try_send(Offender {
                    ip: source,
                    first_seen: first_seen.get(&source).copied().unwrap_or(now),
                    rate: seen.source_per_sec,
                    global: seen.global_per_sec,
                });
            }
        }
    }

    fn ban_loop(&self, rx: &mpsc::Receiver<Offender>, penalize: &(dyn Fn(IpAddr) + Send + Sync)) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(o) = rx.try_recv() {
                batch.push(o);
            }
            // The capture thread and the XDP reader may both report a source.
            let mut seen = HashSet::new();
            batch.retain(|o| {
                !self.is_banned(o.ip)
                    && seen.insert(self.key(o.ip))
                    && self.refuse_protected(self.key(o.ip), "syn_flood").is_ok()
                    && self.spend_budget()
            });
            if batch.is_empty() {
                continue;
            }
            let ttl = self.settings.ban_duration;
            let nets: Vec<(IpNet, Duration)> = batch.iter().map(|o| (self.key(o.ip), ttl)).collect();
            let started = self.clock.now();
            if let Err(e) = self.firewall.ban(&nets) {
                tracing::error!("SYN defense: ban failed: {e}");
                continue;
            }
            self.xdp_ban(&nets);
            let done = self.clock.now();
            let install = done.saturating_sub(started) as f64 / 1e6;
            let until = unix_now() + ttl.as_secs();
            for o in &batch {
                let latency = done.saturating_sub(o.first_seen) as f64 / 1e6;
                tracing::warn!(
                    source = %o.ip,
                    syn_per_sec = o.rate,
                    global_syn_per_sec = o.global,
                    latency_ms = latency,
                    install_ms = install,
                    batch = batch.len(),
                    firewall = self.firewall.name(),
                    "SYN flood: source banned for {}s",
                    ttl.as_secs()
                );
                self.record(Ban {
                    net: self.key(o.ip),
                    until,
                    reason: "syn_flood".into(),
                    rate: o.rate,
                    latency_ms: Some(latency),
                    install_ms: Some(install),
                });
                lock(&self.rates).forget(&o.ip);
                penalize(o.ip);
                (self.share)(self.key(o.ip), until);
            }
            self.persist();
        }
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
        // SPEC F15: 64 half-open handshakes, or more than 80 % of a source's
        // SYNs being retransmits, make it an offender whatever the rates.
        let tx = lock(&self.offenders).clone();
        let syns_of: HashMap<IpAddr, u64> = sources.iter().copied().collect();
        let mut previous = lock(&self.xdp_retrans);
        let mut current = HashMap::with_capacity(handshakes.len());
        for (ip, st) in handshakes {
            let retrans = st.retrans.saturating_sub(previous.get(&ip).copied().unwrap_or(0));
            current.insert(ip, st.retrans);
            let syns = syns_of.get(&ip).copied().unwrap_or(0);
            let retransmitting = syns >= 20 && retrans as f64 > 0.8 * syns as f64;
            if (st.half_open >= HALF_OPEN_OFFENDER as i64 || retransmitting)
                && !self.is_banned(ip)
                && let Some(tx) = &tx
            {
                let _ = tx.try_send(Offender {
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
            if rate >= self.settings.source_threshold
                && !self.is_banned(ip)
                && let Some(tx) = &tx
            {
                let _ = tx.try_send(Offender {
                    ip,
                    first_seen: self.clock.now().saturating_sub((dt * 1e9) as u64),
                    rate,
                    global: global_rate,
                });
            }
        }
        Some(stats)
    }

    fn record(&self, ban: Ban) {
        let mut bans = lock(&self.bans);
        bans.insert(ban.net, ban);
        self.bans_total.fetch_add(1, Ordering::Relaxed);
        self.refresh_banned(&bans);
    }

    /// Bans a network by hand (admin API); the cluster hears of it.
    pub fn ban(&self, net: IpNet, ttl: Duration) -> Result<(), BanError> {
        let net = net.trunc();
        self.admit(net, ttl, "admin")?;
        let until = unix_now().saturating_add(ttl.as_secs());
        self.ban_until(net, until, "admin")?;
        (self.share)(net, until);
        Ok(())
    }

    /// Applies a ban another node made (not shared again), under the same
    /// rules as a local one: a node's word is no licence to cut this one
    /// off from its upstream.
    pub fn ban_from_cluster(&self, net: IpNet, until: u64) -> Result<(), BanError> {
        let net = net.trunc();
        if lock(&self.bans).get(&net).is_some_and(|b| b.until >= until) {
            return Ok(());
        }
        self.admit(
            net,
            Duration::from_secs(until.saturating_sub(unix_now())),
            "cluster",
        )?;
        self.ban_until(net, until, "cluster")
    }

    fn ban_until(&self, net: IpNet, until: u64, reason: &str) -> Result<(), BanError> {
        let ttl = Duration::from_secs(until.saturating_sub(unix_now()).max(1));
        self.firewall
            .ban(&[(net, ttl)])
            .map_err(|e| BanError::Firewall(e.to_string()))?;
        self.xdp_ban(&[(net, ttl)]);
        self.record(Ban {
            net,
            until,
            reason: reason.into(),
            rate: 0,
            latency_ms: None,
            install_ms: None,
        });
        self.persist();
        Ok(())
    }

    /// Lifts a ban by hand (admin API); the cluster hears of it.
    pub fn unban_shared(&self, net: IpNet) -> Result<bool, String> {
        let had = self.unban(net)?;
        (self.share)(net.trunc(), 1);
        Ok(had)
    }

    /// Lifts a ban. Returns whether there was one.
    pub fn unban(&self, net: IpNet) -> Result<bool, String> {
        let net = net.trunc();
        self.firewall.unban(&[net]).map_err(|e| e.to_string())?;
        if let Some(x) = lock(&self.xdp).as_mut()
            && let Err(e) = x.unban(net)
        {
            tracing::error!("SYN defense: XDP unban failed: {e}");
        }
        let mut bans = lock(&self.bans);
        let had = bans.remove(&net).is_some();
        self.refresh_banned(&bans);
        drop(bans);
        self.persist();
        Ok(had)
    }

    /// Active bans.
    pub fn bans(&self) -> Vec<Ban> {
        lock(&self.bans).values().cloned().collect()
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
        if let Err(e) = self.firewall.ban(&nets) {
            tracing::error!("SYN defense: restoring {} bans failed: {e}", nets.len());
            return;
        }
        self.xdp_ban(&nets);
        let n = live.len();
        for b in live {
            self.record(b);
        }
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
        if let Ok(current) = TcpCounters::read() {
            if let Some(prev) = &st.last {
                let d = current.since(prev);
                suspect = handshakes_may_hang(&d);
                let per_sec = |v: u64| (v as f64 / dt).round() as u64;
                snap.rates = TcpCounters {
                    syncookies_sent: per_sec(d.syncookies_sent),
                    syncookies_recv: per_sec(d.syncookies_recv),
                    syncookies_failed: per_sec(d.syncookies_failed),
                    listen_overflows: per_sec(d.listen_overflows),
                    listen_drops: per_sec(d.listen_drops),
                    req_q_full_do_cookies: per_sec(d.req_q_full_do_cookies),
                    syn_retrans: per_sec(d.syn_retrans),
                    passive_opens: per_sec(d.passive_opens),
                    out_segs: per_sec(d.out_segs),
                    retrans_segs: per_sec(d.retrans_segs),
                };
                let attempts = d.syn_retrans + d.passive_opens;
                snap.retransmit_ratio = if attempts == 0 {
                    0.0
                } else {
                    d.syn_retrans as f64 / attempts as f64
                };
            }
            st.last = Some(current);
        }
        let sockets = if suspect || st.half_open_last > 0 {
            half_open_sockets(&mut st.diag_failed)
        } else {
            Vec::new()
        };
        let (total, per_source) = half_open(&sockets, &[self.port]);
        snap.half_open = total;
        st.half_open_last = total;
        // A source holding many half-open connections is flooding
        // whatever its SYN rate (SPEC F15: 64).
        if let Some(tx) = lock(&self.offenders).clone() {
            for (ip, n) in &per_source {
                if *n >= HALF_OPEN_OFFENDER && !self.is_banned(*ip) {
                    let _ = tx.try_send(Offender {
                        ip: *ip,
                        first_seen: now,
                        rate: 0,
                        global: 0,
                    });
                }
            }
        }
        let mut top: Vec<(IpAddr, usize)> = per_source.into_iter().collect();
        top.sort_by_key(|e| std::cmp::Reverse(e.1));
        top.truncate(10);
        snap.half_open_top = top;
        // Sustained SYN-ACK retransmits, or a flood from more sources than
        // the ban budget: turn syncookies on; restore once the ratio has
        // stayed below half of it as long.
        let after = u64::try_from(self.settings.syncookies_after.as_nanos()).unwrap_or(u64::MAX);
        if self.over_budget.swap(false, Ordering::AcqRel) {
            st.low_since = None;
            if st.restore_to.is_none() {
                match set_syncookies(1) {
                    Ok(old) if old != 1 => {
                        st.restore_to = Some(old);
                        st.forced_by = Some("ban_budget");
                        tracing::warn!(
                            budget = self.settings.ban_budget,
                            "SYN flood over the ban budget: net.ipv4.tcp_syncookies=1"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("cannot set {SYNCOOKIES}: {e}"),
                }
            }
        } else if snap.retransmit_ratio > self.settings.syncookies_ratio {
            st.low_since = None;
            let since = *st.high_since.get_or_insert(now);
            if now - since >= after && st.restore_to.is_none() {
                match set_syncookies(1) {
                    Ok(old) if old != 1 => {
                        st.restore_to = Some(old);
                        st.forced_by = Some("retransmits");
                        tracing::warn!(
                            ratio = snap.retransmit_ratio,
                            seconds = self.settings.syncookies_after.as_secs(),
                            "SYN-ACK retransmits dominate: net.ipv4.tcp_syncookies=1"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("cannot set {SYNCOOKIES}: {e}"),
                }
            }
        } else {
            st.high_since = None;
            if snap.retransmit_ratio < self.settings.syncookies_ratio / 2.0 {
                let since = *st.low_since.get_or_insert(now);
                if let Some(old) = st.restore_to
                    && now - since >= after
                {
                    if set_syncookies(old).is_ok() {
                        tracing::info!(
                            forced_by = st.forced_by,
                            "SYN-ACK retransmits back to normal: net.ipv4.tcp_syncookies={old}"
                        );
                    }
                    st.restore_to = None;
                    st.forced_by = None;
                }
            }
        }
        snap.syncookies = std::fs::read_to_string(SYNCOOKIES)
            .ok()
            .and_then(|v| v.trim().parse().ok());
        snap.syncookies_forced = st.restore_to.is_some();
        snap.syncookies_reason = st.forced_by;
        if let Some(stats) = self.judge_xdp(dt, &mut st.xdp_last) {
            snap.xdp = Some(stats);
        }
        *lock(&self.snapshot) = snap;
        self.expire();
        if now.saturating_sub(st.reconciled) >= self.settings.reconcile_interval.as_nanos() as u64 {
            st.reconciled = now;
            self.reconcile();
        }
    }

    fn expire(&self) {
        let now = unix_now();
        let expired: Vec<IpNet> = lock(&self.bans)
            .values()
            .filter(|b| b.until <= now)
            .map(|b| b.net)
            .collect();
        for net in expired {
            if let Err(e) = self.unban(net) {
                tracing::error!("SYN defense: lifting an expired ban failed: {e}");
            }
        }
    }

    /// Makes the kernel hold exactly our bans: re-adds what disappeared
    /// (someone flushed the set), removes what we do not know.
    fn reconcile(&self) {
        let Ok(kernel) = self.firewall.list() else { return };
        let now = unix_now();
        let ours = self.bans();
        let missing: Vec<(IpNet, Duration)> = ours
            .iter()
            .filter(|b| !kernel.contains(&b.net) && b.until > now)
            .map(|b| (b.net, Duration::from_secs(b.until - now)))
            .collect();
        let known: HashSet<IpNet> = ours.iter().map(|b| b.net).collect();
        let extra: Vec<IpNet> = kernel.iter().filter(|n| !known.contains(n)).copied().collect();
        if !missing.is_empty() || !extra.is_empty() {
            tracing::warn!(
                missing = missing.len(),
                unknown = extra.len(),
                "SYN defense: kernel bans drifted from ours; repairing"
            );
            let _ = self.firewall.ban(&missing);
            let _ = self.firewall.unban(&extra);
        }
    }

    /// Stops capture and removes our firewall rules (bans stay persisted).
    pub fn shutdown(&self) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
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
                "active_bans": bans.len(),
                "bans_refused": self.refused().into_iter().collect::<BTreeMap<_, _>>(),
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

    /// The kernel's TCP counters per second over the last poll.
    pub fn kernel_rates(&self) -> TcpCounters {
        lock(&self.snapshot).rates
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

    /// Figures for `/metrics`: (SYNs seen, SYN/s, active bans, bans total, half-open).
    pub fn gauges(&self) -> (u64, u64, usize, u64, usize) {
        let now = self.clock.now();
        (
            self.syns.load(Ordering::Relaxed),
            lock(&self.rates).global_per_sec(now),
            lock(&self.bans).len(),
            self.bans_total.load(Ordering::Relaxed),
            lock(&self.snapshot).half_open,
        )
    }
}

/// Writes the sysctl; returns the value it had.
fn set_syncookies(value: u8) -> std::io::Result<u8> {
    let old = std::fs::read_to_string(SYNCOOKIES)?.trim().parse().unwrap_or(1);
    std::fs::write(SYNCOOKIES, format!("{value}\n"))?;
    Ok(old)
}

/// Whether counter deltas show handshakes that may be left half-open: one
/// not completed within a second makes the kernel retransmit its SYN-ACK,
/// and a full SYN queue sends cookies or drops. Without any of these, every
/// half-open socket is under a second old and on its way to completing.
fn handshakes_may_hang(d: &TcpCounters) -> bool {
    d.syn_retrans + d.syncookies_sent + d.req_q_full_do_cookies + d.listen_drops > 0
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
