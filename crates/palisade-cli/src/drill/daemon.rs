//! The Palisade under attack and the demo upstream behind it, each this
//! very binary started inside its namespace, and the monitor that watches
//! the daemon from inside the server namespace: its metrics over the admin
//! API on loopback (out of the attackers' reach), its CPU, descriptors and
//! memory from /proc.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::time::Instant;

use super::attack::Layer;
use super::lab::{self, Lab};

/// A process of ours, killed and reaped when dropped.
pub struct Guard {
    child: Child,
    what: &'static str,
}

impl Guard {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if it has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => bail!("the {} exited ({status})", self.what),
            _ => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ip netns exec NS <this binary> ARGS`. `ip` execs the program in place,
/// so the pid is the program's. Its own process group keeps a terminal's
/// Ctrl-C away from it (the drill stops it itself, after measuring), and
/// it dies with the drill even when the drill is killed outright.
fn spawn_in(ns: &str, args: &[&str], log: &Path, what: &'static str) -> anyhow::Result<Guard> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    // SAFETY: prctl and setpriority are async-signal-safe and touch no
    // memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lab::set_nice(lab::MEASURED_NICE);
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting the {what}"))?;
    Ok(Guard { child, what })
}

/// Where the demo upstream listens.
pub fn upstream_addr() -> SocketAddr {
    SocketAddr::from((lab::UPSTREAM, 8081))
}

/// Where Palisade listens, as clients see it.
pub fn proxy_addr() -> SocketAddr {
    SocketAddr::from((lab::SERVER, 8080))
}

/// Where the admin API listens, inside the server namespace.
pub fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// Starts the demo upstream in the upstream namespace.
pub fn start_upstream(lab: &Lab, dir: &Path) -> anyhow::Result<Guard> {
    let listen = upstream_addr().to_string();
    spawn_in(
        &lab.upstream,
        &["demo-upstream", "--listen", &listen],
        &dir.join("upstream.log"),
        "demo upstream",
    )
}

/// Starts `palisade run --config CONFIG` in the server namespace, on the
/// drill's addresses, in front of the demo upstream, and waits until it
/// answers `/readyz`.
pub fn start_palisade(lab: &Lab, config: &Path, dir: &Path) -> anyhow::Result<Guard> {
    let log = dir.join("palisade.log");
    let config = config.to_str().context("the config path is not UTF-8")?;
    let (listen, admin) = (proxy_addr().to_string(), admin_addr().to_string());
    let upstream = format!("http://{}", upstream_addr());
    let mut guard = spawn_in(
        &lab.server,
        &[
            "run",
            "--config",
            config,
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--upstream",
            &upstream,
        ],
        &log,
        "daemon",
    )?;
    let server = lab.server.clone();
    let ready = in_ns(&server, || {
        for _ in 0..150 {
            if get(admin_addr(), "/readyz").is_ok_and(|(status, _)| status == 200) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })?;
    if let Err(e) = guard.check() {
        bail!("{e}; its log:\n{}", tail(&log));
    }
    if !ready {
        bail!("the daemon did not get ready in 15 s; its log:\n{}", tail(&log));
    }
    Ok(guard)
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs `f` on a thread that entered `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || Lab::enter(&ns).map(|()| f()))
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in namespace panicked"))?
}

/// The daemon's admin API, for attacks: they run in the client namespace,
/// and the admin API listens on loopback in the server one.
#[derive(Clone, Debug)]
pub struct Admin {
    ns: Arc<str>,
    /// `admin.metrics_path`.
    pub metrics_path: Arc<str>,
}

impl Admin {
    /// The admin API of the daemon in `ns`.
    pub fn new(ns: &str, metrics_path: &str) -> Self {
        Self {
            ns: ns.into(),
            metrics_path: metrics_path.into(),
        }
    }

    /// `GET path`: the body of a 200 answer, within 2 s (an attack reads
    /// it within the 3 s the runner gives it past its budget).
    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        let (ns, p) = (self.ns.clone(), path.to_owned());
        let read = tokio::task::spawn_blocking(move || in_ns(&ns, move || get(admin_addr(), &p)));
        let answer = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .with_context(|| format!("GET {path} on the admin API: no answer in 2 s"))?
            .context("the admin API reader panicked")??
            .with_context(|| format!("GET {path} on the admin API"))?;
        match answer {
            (200, body) => Ok(body),
            (status, body) => bail!("GET {path} on the admin API: {status} {}", body.trim()),
        }
    }

    /// The metrics exposition.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let path = self.metrics_path.clone();
        self.get(&path).await
    }
}

/// `GET path` over a fresh connection: status and body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

/// The daemon's counters the drill reads defenses from.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    /// Packets XDP dropped (banned sources).
    pub xdp_dropped: f64,
    /// Kernel bans installed.
    pub bans: f64,
    /// Connections reset at accept.
    pub accept_refused: f64,
    /// Requests refused by a control, connections cut by a timeout,
    /// responses reset for stalling, requests answered 400/408/413/431.
    pub http_refused: f64,
    /// Reputation penalties, adaptive breaker changes, bans refused: the
    /// daemon noticed something, whether or not it refused yet.
    pub noticed: f64,
}

impl Counters {
    /// From a Prometheus text exposition.
    pub fn parse(text: &str) -> Self {
        let mut c = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let label = |key: &str| {
                labels
                    .split(',')
                    .find_map(|kv| {
                        kv.strip_prefix(key)?
                            .strip_prefix("=\"")?
                            .strip_suffix(['"', '}'])
                    })
                    .map(|v| v.trim_end_matches('"'))
            };
            match name {
                "palisade_xdp_packets_total" if label("kind") == Some("dropped") => c.xdp_dropped += value,
                "palisade_syn_bans_installed_total" => c.bans += value,
                "palisade_connections_refused_total" => c.accept_refused += value,
                "palisade_decisions_total" if label("decision") != Some("allowed") => {
                    c.http_refused += value;
                }
                "palisade_connection_timeouts_total" | "palisade_stalled_responses_total" => {
                    c.http_refused += value;
                }
                "palisade_requests_total"
                    if matches!(label("status"), Some("400" | "408" | "413" | "431")) =>
                {
                    c.http_refused += value;
                }
                "palisade_reputation_penalties_total"
                | "palisade_adaptive_breaker_transitions_total"
                | "palisade_bans_refused_total" => c.noticed += value,
                _ => {}
            }
        }
        c
    }

    /// The cheapest layer whose count rose from `before` to `self`, by at
    /// least `stray` packets or refusals (a ban counts at once): earlier
    /// attacks leave a trickle behind (SYN-ACK retransmits answered by a
    /// source banned since), which is not this attack being stopped.
    pub fn layer_since(&self, before: &Self, stray: f64) -> Option<Layer> {
        let rose = |now: f64, then: f64| now - then >= stray.max(1.0);
        [
            (rose(self.xdp_dropped, before.xdp_dropped), Layer::Xdp),
            (self.bans > before.bans, Layer::Nftables),
            (rose(self.accept_refused, before.accept_refused), Layer::Accept),
            (rose(self.http_refused, before.http_refused), Layer::Http),
        ]
        .into_iter()
        .find_map(|(rose, layer)| rose.then_some(layer))
    }

    /// Whether anything the daemon counts as noticing or refusing rose.
    pub fn noticed_since(&self, before: &Self) -> bool {
        self.noticed > before.noticed || self.layer_since(before, 1.0).is_some()
    }
}

/// One look at the daemon.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Since the drill started.
    pub at: Duration,
    /// Its counters (the last good scrape's, if this one failed).
    pub counters: Counters,
    /// User plus system CPU seconds since it started.
    pub cpu_s: f64,
    /// Open file descriptors, but for sockets to the upstream and the
    /// legitimate clients' connections: what an attack could leave behind.
    pub fds: u64,
    /// Sockets to the upstream: the pool's, idle or busy.
    pub upstream_fds: u64,
    /// Resident memory.
    pub rss_kib: u64,
}

/// Samples the daemon every `EVERY` on a thread inside the server
/// namespace, until dropped.
pub struct Monitor {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the monitor looks: the resolution of detection times.
pub const EVERY: Duration = Duration::from_millis(100);

impl Monitor {
    /// Starts watching `pid`, whose admin API is [`admin_addr`] in `ns`.
    /// Connections from `legit` (the population's) are not counted in
    /// [`Sample::fds`].
    pub fn start(ns: &str, pid: u32, metrics_path: String, legit: Arc<[Ipv4Addr]>, t0: Instant) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, out, done) = (ns.to_owned(), samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            if Lab::enter(&ns).is_err() {
                return;
            }
            lab::set_nice(lab::MEASURED_NICE);
            let mut last = Counters::default();
            while !done.load(Ordering::Relaxed) {
                if let Ok((200, text)) = get(admin_addr(), &metrics_path) {
                    last = Counters::parse(&text);
                }
                let (cpu_s, fds, upstream_fds, rss_kib) = proc_stats(pid, &legit);
                let sample = Sample {
                    at: t0.elapsed(),
                    counters: last,
                    cpu_s,
                    fds,
                    upstream_fds,
                    rss_kib,
                };
                if let Ok(mut v) = out.lock() {
                    v.push(sample);
                }
                std::thread::sleep(EVERY);
            }
        });
        Self {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The last sample taken before `at`, however long before: a monitor
    /// starved of CPU for a while must not make the run's first sample the
    /// baseline of an attack.
    pub fn before(&self, at: Duration) -> Option<Sample> {
        let v = self.samples.lock().ok()?;
        v.iter().rev().find(|s| s.at < at).copied()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.lock().ok()?.last().copied()
    }

    /// Every sample taken in `[from, to)`.
    pub fn window(&self, from: Duration, to: Duration) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|v| v.iter().filter(|s| s.at >= from && s.at < to).copied().collect())
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CPU seconds (user + system), open descriptors (but for sockets to the
/// upstream and from `legit`), sockets to the upstream, and resident KiB
/// of `pid`.
fn proc_stats(pid: u32, legit: &[Ipv4Addr]) -> (f64, u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cpu_s = cpu_seconds(&stat);
    // The daemon's own view of its namespace's TCP sockets.
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let peers = socket_peers(&tcp);
    let (mut fds, mut upstream) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let peer = std::fs::read_link(fd.path())
            .ok()
            .and_then(|l| socket_inode(&l.to_string_lossy()))
            .and_then(|i| peers.get(&i));
        match peer {
            Some(p) if SocketAddr::V4(*p) == upstream_addr() => upstream += 1,
            Some(p) if legit.contains(p.ip()) => {}
            _ => fds += 1,
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (cpu_s, fds, upstream, rss_kib(&status))
}

/// The inode of a descriptor's link, `socket:[INODE]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The peer of every socket of a `/proc/net/tcp` table, by inode.
fn socket_peers(table: &str) -> HashMap<u64, SocketAddrV4> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, port) = f.get(2)?.split_once(':')?;
            // The kernel prints the network-order address as a host u32.
            let ip = Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.to_ne_bytes());
            let port = u16::from_str_radix(port, 16).ok()?;
            Some((f.get(9)?.parse().ok()?, SocketAddrV4::new(ip, port)))
        })
        .collect()
}

/// utime + stime from `/proc/PID/stat`, in seconds. Fields are counted
/// after the command name's closing parenthesis, which may hold spaces.
fn cpu_seconds(stat: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of the line, utime 14 and stime 15.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (field(14) + field(15)) as f64 / ticks
}

/// `VmRSS` from `/proc/PID/status`, in KiB.
fn rss_kib(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP palisade_decisions Protection decisions.
palisade_decisions_total{decision=\"allowed\"} 500
palisade_decisions_total{decision=\"rate_limited\"} 20
palisade_decisions_total{decision=\"reputation_blocked\"} 3
palisade_connections_refused_total{kind=\"per_ip\"} 7
palisade_connection_timeouts_total{kind=\"header\"} 2
palisade_requests_total{endpoint=\"default\",method=\"GET\",status=\"200\"} 500
palisade_requests_total{endpoint=\"default\",method=\"POST\",status=\"408\"} 4
palisade_xdp_packets_total{kind=\"seen\"} 1000
palisade_xdp_packets_total{kind=\"dropped\"} 900
palisade_syn_bans_installed_total 1
palisade_reputation_penalties_total{kind=\"flood\"} 5
";

    #[test]
    fn counters_add_up_what_each_layer_refused() {
        let c = Counters::parse(METRICS);
        assert_eq!(c.xdp_dropped, 900.0);
        assert_eq!(c.bans, 1.0);
        assert_eq!(c.accept_refused, 7.0);
        assert_eq!(c.http_refused, 20.0 + 3.0 + 2.0 + 4.0);
        assert_eq!(c.noticed, 5.0);
    }

    #[test]
    fn the_cheapest_layer_that_rose_is_the_one_that_acted() {
        let before = Counters::default();
        let mut after = Counters {
            http_refused: 1.0,
            accept_refused: 1.0,
            ..before
        };
        assert_eq!(after.layer_since(&before, 1.0), Some(Layer::Accept));
        after.xdp_dropped = 1.0;
        assert_eq!(after.layer_since(&before, 1.0), Some(Layer::Xdp));
        assert_eq!(before.layer_since(&before, 1.0), None);
        // A trickle left by an earlier attack is not this one stopped.
        assert_eq!(after.layer_since(&before, 150.0), None);
        after.bans = 1.0;
        assert_eq!(after.layer_since(&before, 150.0), Some(Layer::Nftables));
        let noticed = Counters {
            noticed: 1.0,
            ..before
        };
        assert!(noticed.noticed_since(&before) && noticed.layer_since(&before, 1.0).is_none());
    }

    #[test]
    fn sockets_are_told_apart_by_their_peer() {
        // 198.18.0.1:8080 <- a client; 198.18.2.1 -> 198.18.2.2:8081 (the
        // upstream) twice; a listener. Addresses as a little-endian host
        // prints them.
        let ip = |a: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(a));
        let (server, client) = (ip([198, 18, 0, 1]), ip([198, 18, 128, 9]));
        let (side, upstream) = (ip([198, 18, 2, 1]), ip([198, 18, 2, 2]));
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {server}:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 100 1\n\
             1: {server}:1F90 {client}:D431 01 00000000:00000000 00:00000000 00000000 0 0 101 1\n\
             2: {side}:9C40 {upstream}:1F91 01 00000000:00000000 00:00000000 00000000 0 0 102 1\n\
             3: {side}:9C41 {upstream}:1F91 01 00000000:00000000 00:00000000 00000000 0 0 103 1\n"
        );
        let peers = socket_peers(&table);
        assert_eq!(peers.len(), 4);
        assert_eq!(SocketAddr::V4(peers[&102]), upstream_addr());
        assert_eq!(SocketAddr::V4(peers[&103]), upstream_addr());
        assert_eq!(peers[&101], "198.18.128.9:54321".parse().unwrap());
        assert_eq!(socket_inode("socket:[102]"), Some(102));
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let stat = "4242 (pali sade) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 2 3";
        // SAFETY: as in cpu_seconds.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(cpu_seconds(stat), 300.0 / ticks);
        assert_eq!(cpu_seconds("garbage"), 0.0);
        assert_eq!(rss_kib("Name:\tx\nVmRSS:\t  12345 kB\n"), 12345);
    }
}
