//! Per-source SYN accounting without eBPF: an `AF_PACKET`
//! socket with a classic BPF filter that lets only TCP SYNs (SYN set, ACK
//! clear) through to user space, IPv4 and IPv6.
//!
//! [`SynRates`] keeps the counts in 10 ms buckets over a 100 ms window,
//! globally and per source (bounded: a spoofed flood from millions of
//! addresses fills the table, then only the global count grows), and
//! flags an offender the moment both its own rate and the global rate are
//! over their thresholds: detection is per packet, not per polling tick.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const PACKET_OUTGOING: u8 = 4;
/// How long the capture naps between batches once it has drained.
const BATCH: Duration = Duration::from_millis(2);

/// One captured SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syn {
    /// Source address.
    pub source: IpAddr,
    /// Destination port.
    pub port: u16,
}

/// Parses an IP packet (from the network header on) into a SYN, if it is
/// one (SYN without ACK, first fragment).
pub fn parse_syn(packet: &[u8]) -> Option<Syn> {
    let version = packet.first()? >> 4;
    let (source, tcp) = match version {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if *packet.get(9)? != 6 || u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff != 0 {
                return None;
            }
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(src)), packet.get(ihl..)?)
        }
        6 => {
            if *packet.get(6)? != 6 {
                return None;
            }
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(src)), packet.get(40..)?)
        }
        _ => return None,
    };
    let flags = *tcp.get(13)?;
    (flags & 0x12 == 0x02).then(|| Syn {
        source,
        port: u16::from_be_bytes([tcp[2], tcp[3]]),
    })
}

/// The kernel-side filter: accept IPv4/IPv6 TCP segments with SYN set and
/// ACK clear (first 96 bytes), drop everything else before it is copied.
fn syn_filter() -> Vec<libc::sock_filter> {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // Classic BPF opcodes.
    const LDB_ABS: u16 = 0x30; // ldb [k]
    const LDH_ABS: u16 = 0x28; // ldh [k]
    const LDB_IND: u16 = 0x50; // ldb [x + k]
    const LDX_MSH: u16 = 0xb1; // ldx 4*([k]&0xf)
    const RSH: u16 = 0x74; // a >>= k
    const AND: u16 = 0x54; // a &= k
    const JEQ: u16 = 0x15;
    const JSET: u16 = 0x45;
    const RET: u16 = 0x06;
    // Jump offsets count from the next instruction; ACCEPT is 17, DROP 18.
    vec![
        /* 0 */ op(LDB_ABS, 0, 0, 0),
        /* 1 */ op(RSH, 0, 0, 4),
        /* 2 */ op(JEQ, 0, 8, 4), // IPv4 → 3, else → 11
        /* 3 */ op(LDB_ABS, 0, 0, 9),
        /* 4 */ op(JEQ, 0, 13, 6), // TCP → 5, else DROP
        /* 5 */ op(LDH_ABS, 0, 0, 6),
        /* 6 */ op(JSET, 11, 0, 0x1fff), // a later fragment → DROP
        /* 7 */ op(LDX_MSH, 0, 0, 0),
        /* 8 */ op(LDB_IND, 0, 0, 13),
        /* 9 */ op(AND, 0, 0, 0x12),
        /* 10 */ op(JEQ, 6, 7, 0x02), // SYN without ACK → ACCEPT, else DROP
        /* 11 */ op(JEQ, 0, 6, 6), // IPv6 → 12, else DROP
        /* 12 */ op(LDB_ABS, 0, 0, 6),
        /* 13 */ op(JEQ, 0, 4, 6), // next header TCP → 14, else DROP
        /* 14 */ op(LDB_ABS, 0, 0, 53),
        /* 15 */ op(AND, 0, 0, 0x12),
        /* 16 */ op(JEQ, 0, 1, 0x02),
        /* 17 ACCEPT */ op(RET, 0, 0, 96),
        /* 18 DROP */ op(RET, 0, 0, 0),
    ]
}

/// Packet sockets that receive only SYNs (all interfaces of this network
/// namespace). Needs `CAP_NET_RAW`.
///
/// One socket per IP version, bound to that protocol rather than
/// `ETH_P_ALL`: an `ETH_P_ALL` socket makes the kernel clone every packet
/// the host transmits for it (before any filter runs), which cost the proxy
/// 17 % of its throughput on loopback; protocol sockets see received
/// packets only, which is where SYNs to our port are.
pub struct SynCapture {
    sockets: [Socket; 2],
}

impl SynCapture {
    /// Opens the sockets and attaches the filter.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            sockets: [Self::socket(ETH_P_IP)?, Self::socket(ETH_P_IPV6)?],
        })
    }

    fn socket(protocol: u16) -> io::Result<Socket> {
        let socket = Socket::new(
            Domain::PACKET,
            Type::DGRAM,
            Some(Protocol::from(i32::from(protocol.to_be()))),
        )?;
        let filter = syn_filter();
        // `prog` points at `filter`, alive for the call; the kernel copies
        // the program.
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        set_option(&socket, libc::SO_ATTACH_FILTER, &prog)?;
        // The kernel stamps each packet on arrival: rates stay true when this
        // thread is starved and drains a backlog (as under a flood).
        set_option(&socket, libc::SO_TIMESTAMPNS, &(1 as libc::c_int))?;
        socket.set_nonblocking(true)?;
        socket.set_recv_buffer_size(4 << 20)?;
        Ok(socket)
    }

    /// The next SYN and how long ago the kernel received it, or `None`
    /// after 100 ms pass with none, so a loop can check whether to stop.
    /// Our own outgoing packets are skipped.
    ///
    /// Once both sockets are empty it naps for 2 ms before blocking:
    /// woken for every SYN, this thread cost four syscalls and a context
    /// switch per new connection, on the proxy's own cores; napping reads
    /// a burst of connections in one go. Rates are unaffected (each SYN
    /// carries its arrival time) and the socket buffer holds far more than
    /// a nap's worth of SYNs.
    pub fn next(&self) -> io::Result<Option<(Syn, Duration)>> {
        for round in 0..3 {
            for socket in &self.sockets {
                if let Some(syn) = Self::drain(socket)? {
                    return Ok(Some(syn));
                }
            }
            match round {
                0 => std::thread::sleep(BATCH),
                1 => self.wait(Duration::from_millis(100))?,
                _ => {}
            }
        }
        Ok(None)
    }

    /// Waits until either socket is readable, or `timeout`.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut fds = self.sockets.each_ref().map(|s| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of two pollfd for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The first SYN waiting on `socket`, if any, without blocking, with
    /// its age.
    fn drain(socket: &Socket) -> io::Result<Option<(Syn, Duration)>> {
        let mut buf = [0u8; 128];
        // sockaddr_ll, and room for one SCM_TIMESTAMPNS control message.
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 8];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: all-zero is a valid msghdr; the pointers set below
            // stay valid for the recvmsg call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&raw mut from).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of_val(&control) as _;
            // SAFETY: `msg` describes buffers we own, for this call only.
            let n = unsafe {
                libc::recvmsg(
                    std::os::fd::AsRawFd::as_raw_fd(socket),
                    &raw mut msg,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            if from.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            let Some(syn) = parse_syn(&buf[..(n as usize).min(buf.len())]) else {
                continue;
            };
            return Ok(Some((syn, age(&msg))));
        }
    }
}

/// A `SOL_SOCKET` option whose value is a plain C struct or int.
fn set_option<T>(socket: &Socket, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live, initialised T for the call and the kernel
    // reads exactly size_of::<T>() bytes of it.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How long ago the kernel stamped the packet `msg` carries (zero without a
/// stamp, or if the wall clock stepped back).
fn age(msg: &libc::msghdr) -> Duration {
    // SAFETY: `msg` was filled by recvmsg; CMSG_* walk its control buffer
    // within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null headers from CMSG_FIRSTHDR/NXTHDR are in bounds.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS {
            // SAFETY: an SCM_TIMESTAMPNS message carries one timespec;
            // read unaligned, the buffer gives no alignment promise.
            let ts = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>()) };
            // The stamp is CLOCK_REALTIME: compared with the same clock,
            // read now (a conversion of the kernel's stamp, not logic time).
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid timespec for the call.
            unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &raw mut now) };
            let nanos = |t: &libc::timespec| Duration::new(t.tv_sec as u64, t.tv_nsec as u32);
            return nanos(&now).saturating_sub(nanos(&ts));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    Duration::ZERO
}

/// Buckets per window.
const BUCKETS: usize = 10;
/// Bucket width.
const BUCKET_NS: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    /// Bucket index (time / width) of each slot.
    stamp: [u64; BUCKETS],
    count: [u32; BUCKETS],
}

impl Window {
    fn add(&mut self, now: u64) {
        let b = now / BUCKET_NS;
        let i = (b % BUCKETS as u64) as usize;
        if self.stamp[i] != b {
            self.stamp[i] = b;
            self.count[i] = 0;
        }
        self.count[i] += 1;
    }

    /// SYNs in the last window (100 ms).
    fn sum(&self, now: u64) -> u64 {
        let b = now / BUCKET_NS;
        (0..BUCKETS)
            .filter(|&i| b.saturating_sub(self.stamp[i]) < BUCKETS as u64 && self.stamp[i] <= b)
            .map(|i| u64::from(self.count[i]))
            .sum()
    }
}

/// Thresholds for [`SynRates`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynThresholds {
    /// SYNs/s to our ports (all sources) above which sources are judged.
    pub global_per_sec: u64,
    /// SYNs/s from one source that make it an offender during an attack.
    pub source_per_sec: u64,
}

/// Sliding SYN rates, global and per source, in bounded memory.
#[derive(Debug)]
pub struct SynRates {
    thresholds: SynThresholds,
    max_sources: usize,
    global: Window,
    sources: HashMap<IpAddr, Window>,
    total: u64,
    /// Bucket of the last pruning of quiet sources (at most one per bucket).
    pruned: u64,
}

/// What one SYN changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The source just crossed into offender territory.
    pub offender: bool,
    /// SYNs/s from all sources (last 100 ms, scaled).
    pub global_per_sec: u64,
    /// SYNs/s from this source.
    pub source_per_sec: u64,
}

impl SynRates {
    /// Tracks at most `max_sources` sources at a time.
    pub fn new(thresholds: SynThresholds, max_sources: usize) -> Self {
        Self {
            thresholds,
            max_sources,
            global: Window::default(),
            sources: HashMap::new(),
            total: 0,
            pruned: u64::MAX,
        }
    }

    /// Counts a SYN from `source` at `now` (nanoseconds, any origin).
    pub fn record(&mut self, source: IpAddr, now: u64) -> Seen {
        self.total += 1;
        self.global.add(now);
        if self.sources.len() >= self.max_sources
            && !self.sources.contains_key(&source)
            && self.pruned != now / BUCKET_NS
        {
            // Full: forget sources that went quiet (at most once per
            // bucket); if none did, this one only counts globally.
            self.pruned = now / BUCKET_NS;
            self.sources.retain(|_, w| w.sum(now) > 0);
        }
        let global_per_sec = self.global.sum(now) * 10;
        let source_per_sec = if self.sources.len() < self.max_sources || self.sources.contains_key(&source) {
            let w = self.sources.entry(source).or_default();
            w.add(now);
            w.sum(now) * 10
        } else {
            0
        };
        Seen {
            offender: global_per_sec > self.thresholds.global_per_sec
                && source_per_sec >= self.thresholds.source_per_sec,
            global_per_sec,
            source_per_sec,
        }
    }

    /// SYNs/s over the last 100 ms.
    pub fn global_per_sec(&self, now: u64) -> u64 {
        self.global.sum(now) * 10
    }

    /// The busiest sources now, highest first.
    pub fn top(&self, n: usize, now: u64) -> Vec<(IpAddr, u64)> {
        let mut v: Vec<(IpAddr, u64)> = self
            .sources
            .iter()
            .map(|(ip, w)| (*ip, w.sum(now) * 10))
            .filter(|(_, r)| *r > 0)
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.truncate(n);
        v
    }

    /// SYNs seen since start.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// Drops a source (e.g. once it is banned and its packets stop arriving).
    pub fn forget(&mut self, source: &IpAddr) {
        self.sources.remove(source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_syn(src: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[198, 18, 0, 1]);
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[33] = flags;
        p
    }

    #[test]
    fn only_syns_without_ack_parse() {
        let s = parse_syn(&ipv4_syn([198, 18, 0, 2], 8080, 0x02)).unwrap();
        assert_eq!(s.source, IpAddr::from([198, 18, 0, 2]));
        assert_eq!(s.port, 8080);
        assert!(
            parse_syn(&ipv4_syn([198, 18, 0, 2], 8080, 0x12)).is_none(),
            "SYN-ACK"
        );
        assert!(parse_syn(&ipv4_syn([198, 18, 0, 2], 8080, 0x10)).is_none(), "ACK");
        let mut frag = ipv4_syn([198, 18, 0, 2], 8080, 0x02);
        frag[7] = 1;
        assert!(parse_syn(&frag).is_none(), "later fragment");
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        v6[6] = 6;
        v6[8..24].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6[42..44].copy_from_slice(&443u16.to_be_bytes());
        v6[53] = 0x02;
        assert_eq!(
            parse_syn(&v6).unwrap().source,
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert!(parse_syn(&[0x45, 0, 0]).is_none(), "truncated");
    }

    #[test]
    fn a_fast_source_during_a_flood_is_an_offender_and_a_slow_one_is_not() {
        let t = SynThresholds {
            global_per_sec: 1000,
            source_per_sec: 500,
        };
        let mut r = SynRates::new(t, 100);
        let (flood, calm) = (IpAddr::from([198, 18, 0, 2]), IpAddr::from([198, 18, 0, 3]));
        let mut when = None;
        // 5 000 SYN/s from one source (one every 200 µs), a SYN every
        // 50 ms from another.
        for i in 0..2000u64 {
            let now = i * 200_000;
            let seen = r.record(flood, now);
            if seen.offender && when.is_none() {
                when = Some(now);
            }
            if i % 250 == 0 {
                assert!(!r.record(calm, now).offender);
            }
        }
        // Global > 1 000/s and source ≥ 500/s: 51 SYNs into the window.
        let at = when.expect("never flagged");
        assert!(at <= 20_000_000, "flagged after {} ms", at / 1_000_000);
        assert_eq!(r.top(1, 400_000_000)[0].0, flood);
    }

    #[test]
    fn a_burst_below_the_global_threshold_is_not_an_attack() {
        let t = SynThresholds {
            global_per_sec: 1000,
            source_per_sec: 50,
        };
        let mut r = SynRates::new(t, 100);
        // 90 SYNs in 100 ms = 900/s from one client: busy, not a flood.
        for i in 0..90u64 {
            assert!(!r.record(IpAddr::from([10, 0, 0, 1]), i * 1_000_000).offender);
        }
    }

    #[test]
    fn memory_stays_bounded_under_spoofed_sources() {
        let t = SynThresholds {
            global_per_sec: 1000,
            source_per_sec: 500,
        };
        let mut r = SynRates::new(t, 1000);
        for i in 0..100_000u32 {
            r.record(IpAddr::from(i.to_be_bytes()), u64::from(i) * 10_000);
        }
        assert!(r.tracked() <= 1000);
        assert_eq!(r.total(), 100_000);
    }
}
